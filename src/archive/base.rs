//! Base backups in storage: a full copy of one database that its archive replays
//! forward from (../shared/PRODUCT.md, "Points"). Every adapter stores its bases the
//! same way, so listing, verifying and pruning them needs no adapter:
//!
//! ```text
//! bases/<database>/<id>/<artifact>      the copy, through the pipeline (zstd → age → BLAKE3)
//! bases/<database>/<id>/base.json       its record (BaseRecord), written last
//! ```
//!
//! As with backups and chunks, a base exists if and only if its record exists: the
//! artifact is stored whole first, then the record goes up in one atomic PUT. The
//! record's `start` is the log position the archive replays from (MariaDB: the
//! binlog position of the copy's snapshot; PostgreSQL: the base backup's start LSN),
//! so "is this point restorable from this base?" is `Catalog::covers(start, marker)`.
//!
//! The adapter-specific parts live with their archivers: `mariadb::base_backup` /
//! `mariadb::restore_base` here; PostgreSQL's elsewhere.

use std::collections::BTreeMap;

use super::{ArchiveError, Position};
use crate::pipeline::ArtifactInfo;
use crate::storage::Storage;

/// The top directory of every base backup in a storage.
pub const BASES_DIR: &str = "bases";
/// The version of the base record format this code writes and reads.
pub const BASE_FORMAT: u32 = 1;
const RECORD_NAME: &str = "base.json";

/// The record that makes a base backup exist: `bases/<database>/<id>/base.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseRecord {
    pub format: u32,
    pub database: String,
    /// The adapter that made it (`mariadb`, `postgres`): who can restore it.
    pub adapter: String,
    /// `YYYYMMDDTHHMMSSmmmZ-xxxx`, sortable by time.
    pub id: String,
    /// Where the archive replays from: the copy holds every change before it.
    pub start: Position,
    pub created_at_ms: i64,
    /// The copy as stored.
    pub artifact: ArtifactInfo,
    /// Adapter-specific facts, e.g. MariaDB's `gtid_binlog_pos`, the source
    /// database's name, its row counts (`rows.<table>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
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

/// Writes the record, last, in one atomic PUT.
pub async fn write_record(storage: &Storage, record: &BaseRecord) -> Result<(), ArchiveError> {
    let path = format!(
        "{}/{RECORD_NAME}",
        base_prefix(&record.database, &record.id)?
    );
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
    let path = format!("{}/{RECORD_NAME}", base_prefix(database, id)?);
    let bytes = match storage.get_bytes(&path).await {
        Ok(bytes) => bytes,
        Err(error) if error.is_not_found() => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let bad = |problem: String| ArchiveError::BadRecord {
        database: database.to_owned(),
        path: path.clone(),
        problem,
    };
    let record: BaseRecord = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if record.format != BASE_FORMAT {
        return Err(bad(format!(
            "it is format {}, this stillpoint reads format {BASE_FORMAT}",
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
    Ok(Some(record))
}

/// Every base of `database` with a record, oldest first. Directories without a
/// record (a base still being written, or killed half-way) are not bases.
pub async fn list(storage: &Storage, database: &str) -> Result<Vec<BaseRecord>, ArchiveError> {
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
    let mut records = Vec::new();
    for id in ids {
        if let Some(record) = read_record(storage, database, &id).await? {
            records.push(record);
        }
    }
    Ok(records)
}
