//! Base backups in storage: a full copy of one database that its archive replays
//! forward from (../shared/PRODUCT.md, "Points"). Every adapter stores its bases the
//! same way, as one record type ([`BaseRecord`]), so listing, verifying and pruning
//! them needs no adapter:
//!
//! ```text
//! bases/<database>/<id>/<artifact>      the copy, through the pipeline (zstd → age → BLAKE3)
//! bases/<database>/<id>/base.json       its record (BaseRecord), written last
//! ```
//!
//! As with backups and chunks, a base exists if and only if its record exists: the
//! artifact is stored whole first, then the record goes up in one atomic PUT. The
//! record's `start` is the log position the archive replays from (MariaDB: the
//! binlog position where the copy is consistent: a dump's snapshot, or where
//! mariadb-backup blocked commits; PostgreSQL: a bound at or before the base
//! backup's checkpoint redo point) and `end` where the copy is consistent (MariaDB:
//! the same position; PostgreSQL: a bound at or after the backup's end). A point at
//! marker M can restore from a base with `end <= M` when the archive covers
//! [`replay_from`]`(start)` to M.
//!
//! The adapter-specific parts live with their adapters: `archive::mariadb::base_backup`
//! (by `base_method`), `archive::mariadb_backup` (mariadb-backup's copy, the default)
//! and `archive::mariadb::restore_base` (a consistent dump), `points::base`
//! (PostgreSQL, pg_basebackup).

use std::collections::BTreeMap;

use futures::StreamExt;

use super::{ArchiveError, Position};
use crate::pipeline::ArtifactInfo;
use crate::storage::Storage;

/// The top directory of every base backup in a storage.
pub const BASES_DIR: &str = "bases";
/// The version of the base record format this code writes and reads.
pub const BASE_FORMAT: u32 = 1;
const RECORD_NAME: &str = "base.json";
/// Records read at once.
const READS: usize = 16;

/// The record that makes a base backup exist: `bases/<database>/<id>/base.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseRecord {
    pub format: u32,
    /// `YYYYMMDDTHHMMSSmmmZ-xxxx`, sortable by time.
    pub id: String,
    pub database: String,
    /// The adapter that made it (`postgres`, `mariadb`): who can restore it.
    pub adapter: String,
    /// What the artifact is: `pg_basebackup_tar` (one tar of the data directory,
    /// without WAL), `mariadb_backup` (`mariadb-backup --stream=xbstream`: the whole
    /// server's files, restored into a data directory) or `mariadb_dump` (the
    /// adapter's logical dump of one snapshot).
    pub kind: String,
    /// Where the archive replays from: the copy holds every change before it.
    pub start: Position,
    /// Where the copy is consistent: replay must reach this before any target.
    pub end: Position,
    /// PostgreSQL's timeline at the end of the copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// The copy as stored.
    pub artifact: ArtifactInfo,
    /// Adapter-specific facts, e.g. the time it took (`took_ms`), MariaDB's
    /// `gtid_binlog_pos`, the source database's name (`database`), its row counts
    /// (`rows.<table>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// Where the archive must start for a replay from a base at `start`: MariaDB's replay
/// reads the whole binlog file (its format description event first), PostgreSQL's
/// starts at the position itself.
pub fn replay_from(start: &Position) -> Position {
    super::mariadb::replay_from(start)
}

/// A new base id: the time, then a random suffix (two bases of one millisecond).
pub fn new_base_id() -> String {
    let now = chrono::Utc::now();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..4];
    format!("{}-{suffix}", now.format("%Y%m%dT%H%M%S%3fZ"))
}

/// `bases/<database>/<id>`.
pub fn base_prefix(database: &str, id: &str) -> Result<String, ArchiveError> {
    super::check_name("database name", database)?;
    super::check_name("base id", id)?;
    Ok(format!("{BASES_DIR}/{database}/{id}"))
}

/// `bases/<database>/<id>/base.json`.
pub fn record_path(database: &str, id: &str) -> Result<String, ArchiveError> {
    Ok(format!("{}/{RECORD_NAME}", base_prefix(database, id)?))
}

/// Writes the record, last, in one atomic PUT.
pub async fn write_record(storage: &Storage, record: &BaseRecord) -> Result<(), ArchiveError> {
    let path = record_path(&record.database, &record.id)?;
    let json = serde_json::to_vec_pretty(record).expect("a base record serializes");
    storage.put_atomic(&path, json.into()).await?;
    Ok(())
}

/// The record of base `id` of `database`, if it exists.
pub async fn read_record(
    storage: &Storage,
    database: &str,
    id: &str,
) -> Result<Option<BaseRecord>, ArchiveError> {
    let path = record_path(database, id)?;
    let bytes = match storage.get_bytes(&path).await {
        Ok(bytes) => bytes,
        Err(error) if error.is_not_found() => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    parse(database, id, &path, &bytes).map(Some)
}

fn parse(database: &str, id: &str, path: &str, bytes: &[u8]) -> Result<BaseRecord, ArchiveError> {
    let bad = |problem: String| ArchiveError::BadRecord {
        database: database.to_owned(),
        path: path.to_owned(),
        problem,
    };
    let record: BaseRecord = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if record.format != BASE_FORMAT {
        return Err(bad(format!(
            "it is format {}, this stillpoint reads format {BASE_FORMAT}; use a newer \
             stillpoint",
            record.format
        )));
    }
    if record.database != database || record.id != id {
        return Err(bad(format!(
            "it describes base {} of {}, not the one its path names",
            record.id, record.database
        )));
    }
    if !record
        .artifact
        .path
        .starts_with(&format!("{}/", base_prefix(database, id)?))
    {
        return Err(bad(format!(
            "its artifact {} is outside its directory",
            record.artifact.path
        )));
    }
    Ok(record)
}

/// Every base of `database` with a record, oldest first, and the records that cannot
/// be read (path, problem). Directories without a record (a base still being written,
/// or killed half-way) are not bases.
pub async fn list(
    storage: &Storage,
    database: &str,
) -> Result<(Vec<BaseRecord>, Vec<(String, String)>), ArchiveError> {
    super::check_name("database name", database)?;
    let prefix = format!("{BASES_DIR}/{database}/");
    let listing = storage.list(&format!("{BASES_DIR}/{database}")).await?;
    let mut ids: Vec<String> = listing
        .iter()
        .filter_map(|entry| entry.path.strip_prefix(&prefix))
        .filter_map(|rest| rest.strip_suffix(&format!("/{RECORD_NAME}")))
        .filter(|id| !id.contains('/'))
        .map(str::to_owned)
        .collect();
    ids.sort();
    let read: Vec<Result<Option<BaseRecord>, ArchiveError>> = futures::stream::iter(ids)
        .map(|id| async move { read_record(storage, database, &id).await })
        .buffered(READS)
        .collect()
        .await;
    let mut found = Vec::new();
    let mut bad = Vec::new();
    for result in read {
        match result {
            Ok(Some(record)) => found.push(record),
            // Removed between the listing and the read (a prune).
            Ok(None) => {}
            Err(ArchiveError::BadRecord { path, problem, .. }) => bad.push((path, problem)),
            Err(error) => return Err(error),
        }
    }
    Ok((found, bad))
}

/// Every database with a base backup (or a directory for one) in `storage`.
pub async fn databases(storage: &Storage) -> Result<Vec<String>, ArchiveError> {
    let listing = storage.list(BASES_DIR).await?;
    let mut names: Vec<String> = listing
        .iter()
        .filter_map(|entry| entry.path.strip_prefix(&format!("{BASES_DIR}/")))
        .filter_map(|rest| rest.split_once('/').map(|(db, _)| db.to_owned()))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}
