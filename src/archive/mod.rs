//! Continuous archives: a database's log (PostgreSQL WAL, MariaDB binlogs) kept
//! in the runbook's storage as a sequence of *chunks*, each stored through the
//! pipeline (zstd → age → BLAKE3) and catalogued by a small JSON record.
//!
//! Storage layout, per database (`docs/archive.md`):
//!
//! ```text
//! archive/<database>/<chunk name>.<push id><suffix>   the chunk, as the pipeline stored it
//! archive/<database>/<chunk name>.json                its record, written last
//! ```
//!
//! A chunk exists if and only if its record exists: the artifact is stored whole
//! first, then the record goes up in one atomic PUT (as a backup's manifest does), so
//! a listing never shows a chunk that is not whole. Every push stores its artifact
//! under a name of its own (`<push id>`), so two pushes of one chunk racing each other
//! never write into the same object: whichever record lands last names an artifact
//! that is whole. Records carry a BLAKE3 of the *plaintext* (age output differs on
//! every run, the plaintext does not): pushing the same chunk again is a no-op, and
//! the same name with other content is refused, naming both.
//!
//! - `mod.rs` (here): positions, chunk records, the layout, [`Archive`] (push, read,
//!   remove one database's chunks).
//! - `catalog.rs`: [`Catalog`], the ordered view of one database's archive: chunks
//!   in order, superseded ones set aside, coverage, gaps, "has it reached Y?".
//! - `wal.rs`: PostgreSQL WAL file names and their LSN ranges.
//! - `pg_changes.rs`: a PostgreSQL database's change stream (logical decoding),
//!   recorded beside its WAL for `stillpoint changes`, under `changes/<database>`.
//! - `postgres.rs`: the PostgreSQL archiver (a supervised `pg_receivewal` on a
//!   physical replication slot), the server checks archiving needs, `wal-push` and
//!   `wal-fetch`.
//! - `binlog.rs`: MariaDB binlog file names, their order, and walking events.
//! - `mariadb.rs`: the MariaDB binlog archiver (a supervised `mariadb-binlog --raw
//!   --stop-never`), its server checks, replay of a range into a target, and MariaDB
//!   base backups in storage.
//! - `supervise.rs`: the loop both archivers share: their session started again with
//!   backoff, and the errors retrying cannot fix.
//! - `base.rs`: base backups in storage (`bases/<database>/<id>/`) and their record,
//!   shared by every adapter.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, ReadBuf};

use crate::adapters::ByteStream;
use crate::pipeline::{self, ArtifactInfo, Decryption, PipelineError, PipelineSettings};
use crate::storage::{ObjectEntry, Storage, StorageError};

pub mod archivers;
pub mod base;
pub mod binlog;
mod catalog;
pub mod mariadb;
pub mod mariadb_backup;
pub mod pg_changes;
pub mod postgres;
pub mod sqlite;
pub mod sqlite_wal;
mod supervise;
pub mod wal;

pub use catalog::{Catalog, Coverage, Gap, NotReached};

/// The top directory of every archive in a storage.
pub const ARCHIVE_DIR: &str = "archive";
/// The top directory of every PostgreSQL change stream (`pg_changes.rs`), kept apart
/// so that it is never taken for a database's log.
pub const CHANGES_DIR: &str = "changes";
/// The version of the chunk record format this code writes and reads.
pub const RECORD_FORMAT: u32 = 1;
const RECORD_SUFFIX: &str = ".json";
/// Records read at once when a catalog is loaded.
const RECORD_READS: usize = 16;
/// How many more times a listing that shows a gap is read again (see `Archive::catalog`).
const GAP_RELISTS: usize = 3;

/// Chunk records this process has read, by storage and path, with the size and time
/// their listing gave. A record never changes once written (a chunk's name fixes its
/// content and a push never overwrites a record), so a catalog read again fetches
/// only the records that are new; a record removed and written again lists with
/// another time. Without it every read fetched every record, one GET each, and a
/// point waiting on its archive reads the catalog every 200 ms: a binlog archive
/// gains two chunks a second, and after half an hour each wait read thousands.
static RECORDS_READ: LazyLock<Mutex<HashMap<String, RecordRead>>> = LazyLock::new(Default::default);

struct RecordRead {
    size: u64,
    last_modified: chrono::DateTime<chrono::Utc>,
    record: ChunkRecord,
}

/// A PostgreSQL WAL position, printed as PostgreSQL prints it (`0/16B3748`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(text: &str) -> Result<Lsn, String> {
        let parse = || {
            let (high, low) = text.trim().split_once('/')?;
            let high = u32::from_str_radix(high, 16).ok()?;
            let low = u32::from_str_radix(low, 16).ok()?;
            Some(Lsn((u64::from(high) << 32) | u64::from(low)))
        };
        parse().ok_or_else(|| format!("{text:?} is not an LSN (like 0/16B3748)"))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A position in a database's log. Positions of one database's archive are of one
/// kind and ordered; a chunk covers `[start, end)`.
///
/// - `Lsn`: PostgreSQL WAL, `{"lsn": "0/3000000"}`.
/// - `Binlog`: a byte offset in a MariaDB binlog file, `{"binlog": {"file":
///   "binlog.000003", "offset": 4}}`, ordered by the file's numeric suffix, then the
///   offset (`binlog.000010` after `binlog.000009`, also past six digits). The end of a
///   closed file is the same place in the log as the next file's first event, and is
///   written so: `(next file, 4)` (`binlog.rs`). GTID positions go in a chunk record's
///   `details`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    Lsn(Lsn),
    Binlog {
        file: String,
        offset: u64,
    },
    /// SQLite: frames archived since the snapshot that began the generation
    /// (`sqlite.rs`), `{"sqlite": {"generation": 2, "frame": 120}}`. A generation
    /// begins at frame 0 with a snapshot; generations do not connect.
    Sqlite {
        generation: u64,
        frame: u64,
    },
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Lsn(lsn) => write!(f, "{lsn}"),
            Position::Binlog { file, offset } => write!(f, "{file}:{offset}"),
            Position::Sqlite { generation, frame } => write!(f, "g{generation}:{frame}"),
        }
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Position) -> std::cmp::Ordering {
        match (self, other) {
            (Position::Lsn(a), Position::Lsn(b)) => a.cmp(b),
            (Position::Binlog { file: a, offset: x }, Position::Binlog { file: b, offset: y }) => {
                binlog::sequence(a)
                    .cmp(&binlog::sequence(b))
                    .then_with(|| a.cmp(b))
                    .then(x.cmp(y))
            }
            (
                Position::Sqlite {
                    generation: a,
                    frame: x,
                },
                Position::Sqlite {
                    generation: b,
                    frame: y,
                },
            ) => a.cmp(b).then(x.cmp(y)),
            // Never compared within one archive; any fixed order will do.
            (a, b) => a.kind_rank().cmp(&b.kind_rank()),
        }
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Position) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Position {
    fn kind_rank(&self) -> u8 {
        match self {
            Position::Lsn(_) => 0,
            Position::Binlog { .. } => 1,
            Position::Sqlite { .. } => 2,
        }
    }

    pub fn lsn(&self) -> Option<Lsn> {
        match self {
            Position::Lsn(lsn) => Some(*lsn),
            _ => None,
        }
    }

    /// The generation and frame, for a SQLite position.
    pub fn as_sqlite(&self) -> Option<(u64, u64)> {
        match self {
            Position::Sqlite { generation, frame } => Some((*generation, *frame)),
            _ => None,
        }
    }

    pub fn sqlite_generation(&self) -> Option<u64> {
        self.as_sqlite().map(|(generation, _)| generation)
    }

    /// Where a SQLite generation begins: not a gap after the one before it, which
    /// nothing replays across.
    pub fn starts_generation(&self) -> bool {
        matches!(self, Position::Sqlite { frame: 0, .. })
    }

    pub fn binlog(file: &str, offset: u64) -> Position {
        Position::Binlog {
            file: file.to_owned(),
            offset,
        }
    }

    /// The binlog file and offset, for a binlog position.
    pub fn as_binlog(&self) -> Option<(&str, u64)> {
        match self {
            Position::Binlog { file, offset } => Some((file, *offset)),
            _ => None,
        }
    }
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkKind {
    /// A whole PostgreSQL WAL segment.
    PgWalSegment,
    /// The beginning of a WAL segment that is still being written: its first
    /// `end - start` bytes. A later partial or the whole segment supersedes it.
    PgWalPartial,
    /// Any other file PostgreSQL archives (a timeline history, a backup history, a
    /// `.partial` left by a promotion): kept and served as is, outside the coverage.
    PgOther,
    /// Whole events of one MariaDB binlog file, `[start, end)` (`mariadb.rs`); the
    /// chunk that ends a file ends at the next file's `(file, 4)`. Chunks never
    /// overlap, so none is ever superseded.
    MariadbBinlog,
    /// Committed frames of one cycle of a SQLite WAL, raw (`sqlite.rs`).
    SqliteFrames,
    /// PostgreSQL's logical change stream: the transactions whose commit record
    /// ends in `(start, end]` (`pg_changes.rs`).
    PgChanges,
}

impl ChunkKind {
    /// Whether a chunk of this kind is the final form of its range (a partial is not).
    pub fn is_whole(self) -> bool {
        !matches!(self, ChunkKind::PgWalPartial)
    }
}

impl fmt::Display for ChunkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkKind::PgWalSegment => "WAL segment",
            ChunkKind::PgWalPartial => "partial WAL segment",
            ChunkKind::PgOther => "PostgreSQL archive file",
            ChunkKind::MariadbBinlog => "binlog chunk",
            ChunkKind::SqliteFrames => "SQLite WAL frames",
            ChunkKind::PgChanges => "PostgreSQL change stream chunk",
        })
    }
}

/// The record that makes a chunk exist: `archive/<database>/<name>.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkRecord {
    pub format: u32,
    pub database: String,
    /// Unique within the database's archive: a WAL file name, or for a partial segment
    /// `<segment>.<bytes covered, 8 hex digits>.partial`.
    pub name: String,
    pub kind: ChunkKind,
    /// PostgreSQL's timeline, for WAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// The log positions the chunk covers, `[start, end)`; none for [`ChunkKind::PgOther`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Position>,
    /// The WAL segment size of the server (a partial is served padded to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<u64>,
    /// Plaintext bytes.
    pub size: u64,
    /// BLAKE3 of the plaintext, lowercase hex: what idempotence compares.
    pub plaintext_blake3: String,
    /// The stored artifact (its BLAKE3 is over the stored bytes).
    pub artifact: ArtifactInfo,
    pub archived_at_ms: i64,
    /// Kind-specific facts (e.g. a binlog chunk's GTID sets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

impl ChunkRecord {
    /// `[start, end)`, when the chunk covers a range of the log.
    pub fn range(&self) -> Option<(&Position, &Position)> {
        Some((self.start.as_ref()?, self.end.as_ref()?))
    }
}

/// What a push is to store, apart from the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChunk {
    pub name: String,
    pub kind: ChunkKind,
    pub timeline: Option<u32>,
    pub start: Option<Position>,
    pub end: Option<Position>,
    pub segment_size: Option<u64>,
    pub details: BTreeMap<String, String>,
}

/// Where a chunk's bytes come from.
#[derive(Debug, Clone)]
pub enum ChunkContent {
    Bytes(Bytes),
    /// A file that must not change while it is pushed (a whole WAL segment).
    File(PathBuf),
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    Stored(ChunkRecord),
    /// The archive already holds this chunk with the same content: nothing was
    /// written.
    AlreadyArchived(ChunkRecord),
}

impl PushOutcome {
    pub fn record(&self) -> &ChunkRecord {
        match self {
            PushOutcome::Stored(record) | PushOutcome::AlreadyArchived(record) => record,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "archive of {database}: chunk {name} is already archived with other content \
         ({existing_size} bytes, BLAKE3 {existing_blake3}) than the one pushed now \
         ({new_size} bytes, BLAKE3 {new_blake3}); nothing was stored. Two servers may be \
         archiving into one database's archive, or the file changed: check which is right"
    )]
    Conflict {
        database: String,
        name: String,
        existing_size: u64,
        existing_blake3: String,
        new_size: u64,
        new_blake3: String,
    },
    #[error("archive: {0}")]
    InvalidName(String),
    #[error("archive of {database}: record {path} cannot be read: {problem}")]
    BadRecord {
        database: String,
        path: String,
        problem: String,
    },
    #[error("archive of {database}: reading {path} failed: {source}")]
    Io {
        database: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "archive of {database}: {name} changed while it was pushed (hashed as {expected_size} \
         bytes, BLAKE3 {expected}; stored {stored_size} bytes, BLAKE3 {stored}); the stored \
         copy was removed, push it again"
    )]
    ChangedWhilePushed {
        database: String,
        name: String,
        expected: String,
        expected_size: u64,
        stored: String,
        stored_size: u64,
    },
    #[error("archive of {database}: chunk {name} is not in the archive")]
    NotFound { database: String, name: String },
    /// The server, or the way to it (retried by an archiver).
    #[error("archive of {database}: {message}")]
    Server { database: String, message: String },
    /// What the server's settings or this host lack: the message names the setting
    /// and the fix. An archiver that finds it at start stops instead of retrying.
    #[error("archive of {database}: {message}")]
    Settings { database: String, message: String },
    /// The archive lacks part of a range a restore needs (a gap, or not reached yet).
    #[error("{0}")]
    NotCovered(Box<NotReached>),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ArchiveError {
    /// What was to be read is not in the storage (removed, or never whole).
    pub fn is_not_found(&self) -> bool {
        match self {
            ArchiveError::NotFound { .. } => true,
            ArchiveError::Pipeline(error) => error.is_not_found(),
            ArchiveError::Storage(error) => error.is_not_found(),
            _ => false,
        }
    }
}

/// One database's archive in a storage: pushes, reads and removes its chunks.
#[derive(Debug, Clone)]
pub struct Archive {
    storage: Storage,
    settings: PipelineSettings,
    database: String,
    /// [`ARCHIVE_DIR`], or [`CHANGES_DIR`] for a change stream.
    dir: &'static str,
}

impl Archive {
    /// The archive of `database`; its name becomes a directory, so it must be a plain
    /// name (letters, digits, `.`, `_`, `-`).
    pub fn new(
        storage: Storage,
        settings: PipelineSettings,
        database: &str,
    ) -> Result<Archive, ArchiveError> {
        check_name("database name", database)?;
        settings.check()?;
        Ok(Archive {
            storage,
            settings,
            database: database.to_owned(),
            dir: ARCHIVE_DIR,
        })
    }

    /// The change stream of PostgreSQL `database` (`changes/<database>`): chunks and
    /// records as an archive's, of the logical decoding output.
    pub fn change_stream(
        storage: Storage,
        settings: PipelineSettings,
        database: &str,
    ) -> Result<Archive, ArchiveError> {
        Ok(Archive {
            dir: CHANGES_DIR,
            ..Archive::new(storage, settings, database)?
        })
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// `archive/<database>` (`changes/<database>` for a change stream).
    pub fn prefix(&self) -> String {
        format!("{}/{}", self.dir, self.database)
    }

    fn record_path(&self, name: &str) -> String {
        format!("{}/{name}{RECORD_SUFFIX}", self.prefix())
    }

    /// The record of chunk `name`, if the archive holds it.
    pub async fn record(&self, name: &str) -> Result<Option<ChunkRecord>, ArchiveError> {
        check_name("chunk name", name)?;
        let path = self.record_path(name);
        match self.storage.get_bytes(&path).await {
            Ok(bytes) => self.parse_record(&path, &bytes).map(Some),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    fn parse_record(&self, path: &str, bytes: &[u8]) -> Result<ChunkRecord, ArchiveError> {
        let bad = |problem: String| ArchiveError::BadRecord {
            database: self.database.clone(),
            path: path.to_owned(),
            problem,
        };
        let record: ChunkRecord = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if record.format != RECORD_FORMAT {
            return Err(bad(format!(
                "it is format {}, this stillpoint reads format {RECORD_FORMAT}; use a newer \
                 stillpoint",
                record.format
            )));
        }
        if record.database != self.database || self.record_path(&record.name) != path {
            return Err(bad(format!(
                "it describes chunk {} of database {}, not the chunk its path names",
                record.name, record.database
            )));
        }
        if !record
            .artifact
            .path
            .starts_with(&format!("{}/", self.prefix()))
        {
            return Err(bad(format!(
                "its artifact {} is outside {}",
                record.artifact.path,
                self.prefix()
            )));
        }
        Ok(record)
    }

    /// Every record of this archive, in no particular order, and the records that
    /// could not be read (path, problem). Only records this process has not read
    /// before are fetched ([`RECORDS_READ`]).
    pub async fn records(&self) -> Result<(Vec<ChunkRecord>, Vec<(String, String)>), ArchiveError> {
        self.records_after(None).await
    }

    /// The records whose names sort after `after` (all of them with None), as
    /// [`Archive::records`].
    async fn records_after(
        &self,
        after: Option<&str>,
    ) -> Result<(Vec<ChunkRecord>, Vec<(String, String)>), ArchiveError> {
        let prefix = self.prefix();
        let listing = match after {
            Some(after) => {
                self.storage
                    .list_after(&prefix, &format!("{prefix}/{after}"))
                    .await?
            }
            None => self.storage.list(&prefix).await?,
        };
        let scope = format!("{}\n{prefix}/{}", self.storage, after.unwrap_or_default());
        let key = |path: &str| format!("{}\n{path}", self.storage);
        let mut records = Vec::new();
        let mut unread = Vec::new();
        {
            let mut read = RECORDS_READ.lock().unwrap_or_else(|p| p.into_inner());
            let listed: BTreeMap<String, ObjectEntry> = listing
                .into_iter()
                .filter(|entry| entry.path.ends_with(RECORD_SUFFIX))
                .map(|entry| (key(&entry.path), entry))
                .collect();
            // Records no longer listed (removed partials, pruned chunks) are forgotten;
            // the ones before `after` were not listed, and are kept.
            let scope_start = format!("{}\n{prefix}/", self.storage);
            read.retain(|key, _| {
                !key.starts_with(&scope_start) || key <= &scope || listed.contains_key(key)
            });
            for (key, entry) in listed {
                match read.get(&key) {
                    Some(seen)
                        if seen.size == entry.size && seen.last_modified == entry.last_modified =>
                    {
                        records.push(seen.record.clone())
                    }
                    _ => unread.push(entry),
                }
            }
        }
        let fetched: Vec<(ObjectEntry, Result<ChunkRecord, ArchiveError>)> =
            futures::stream::iter(unread)
                .map(|entry| async move {
                    let result = match self.storage.get_bytes(&entry.path).await {
                        Ok(bytes) => self.parse_record(&entry.path, &bytes),
                        Err(error) => Err(error.into()),
                    };
                    (entry, result)
                })
                .buffer_unordered(RECORD_READS)
                .collect()
                .await;
        let mut unreadable = Vec::new();
        for (entry, result) in fetched {
            match result {
                Ok(record) => {
                    RECORDS_READ
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            key(&entry.path),
                            RecordRead {
                                size: entry.size,
                                last_modified: entry.last_modified,
                                record: record.clone(),
                            },
                        );
                    records.push(record);
                }
                // Removed between the listing and the read: a superseded partial.
                Err(ArchiveError::Storage(error)) if error.is_not_found() => {}
                Err(ArchiveError::Storage(error)) => return Err(error.into()),
                Err(error) => unreadable.push((entry.path, error.to_string())),
            }
        }
        Ok((records, unreadable))
    }

    /// The catalog of the chunks from the one holding `from` on, when the chunk names
    /// allow listing from there (MariaDB's: `<binlog file>.<start>-<end>`; any other
    /// position reads the whole catalog): what a replay from `from` needs. On S3 the
    /// chunks before are not even listed. A point's wait reads this every 200 ms, and
    /// a binlog archive gains a chunk every `chunk_interval`: listing all of them made
    /// the wait as slow as the archive was long (2,400 objects, 4 s on moto_server,
    /// after half an hour).
    pub async fn catalog_from(&self, from: &Position) -> Result<Catalog, ArchiveError> {
        match from {
            // Names sort as positions: the file's chunks and every later file's
            // follow the bare file name.
            // (Up to binlog.999999: the next file, binlog.1000000, sorts before it.)
            Position::Binlog { file, .. }
                if binlog::sequence(file).is_some_and(|number| number < 999_999) =>
            {
                self.catalog_after(Some(file)).await
            }
            _ => self.catalog().await,
        }
    }

    /// The catalog of this archive: chunks in order, coverage and gaps.
    ///
    /// A listing taken while an archiver stores chunks can miss records that exist: a
    /// directory read is no snapshot (a local file system may skip entries while
    /// others are added beside them), so the newest chunks can appear with a hole
    /// before them. A gap is therefore listed again, a few times, and the catalog
    /// built from every record seen; a real gap stays in all of them.
    pub async fn catalog(&self) -> Result<Catalog, ArchiveError> {
        self.catalog_after(None).await
    }

    async fn catalog_after(&self, after: Option<&str>) -> Result<Catalog, ArchiveError> {
        let (records, unreadable) = self.records_after(after).await?;
        let mut catalog = Catalog::new(&self.database, records.clone(), unreadable);
        let mut seen: BTreeMap<String, ChunkRecord> = records
            .into_iter()
            .map(|record| (record.name.clone(), record))
            .collect();
        for relist in 0..GAP_RELISTS {
            if catalog.gaps().is_empty() {
                break;
            }
            // Apart in time: a listing taken at once can miss the same entry again.
            tokio::time::sleep(std::time::Duration::from_millis(20 << relist)).await;
            let (again, unreadable) = self.records_after(after).await?;
            for record in again {
                seen.insert(record.name.clone(), record);
            }
            catalog = Catalog::new(&self.database, seen.values().cloned().collect(), unreadable);
        }
        Ok(catalog)
    }

    /// Stores a chunk unless the archive already has it. The same name with the same
    /// plaintext is [`PushOutcome::AlreadyArchived`]; with other plaintext,
    /// [`ArchiveError::Conflict`]. The chunk is listed only once it is stored whole.
    pub async fn push(
        &self,
        chunk: NewChunk,
        content: ChunkContent,
    ) -> Result<PushOutcome, ArchiveError> {
        check_name("chunk name", &chunk.name)?;
        let (size, plaintext) = self.plaintext_hash(&content).await?;
        if let Some(existing) = self.record(&chunk.name).await? {
            return self.same_or_conflict(existing, size, &plaintext);
        }
        let push_id = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let artifact_path = format!(
            "{}/{}.{push_id}{}",
            self.prefix(),
            chunk.name,
            self.settings.suffix()
        );
        let hasher = Arc::new(Mutex::new(blake3::Hasher::new()));
        let input: ByteStream = match &content {
            ChunkContent::Bytes(bytes) => Box::pin(std::io::Cursor::new(bytes.clone())),
            ChunkContent::File(path) => Box::pin(tokio::fs::File::open(path).await.map_err(
                |source| ArchiveError::Io {
                    database: self.database.clone(),
                    path: path.display().to_string(),
                    source,
                },
            )?),
        };
        let input = Box::pin(HashingRead {
            inner: input,
            hasher: hasher.clone(),
        });
        let artifact =
            pipeline::store(input, &self.settings, &self.storage, &artifact_path, |_| {}).await?;
        let stored = hasher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finalize()
            .to_hex()
            .to_string();
        if stored != plaintext || artifact.size != size {
            let _ = self.storage.delete(&artifact_path).await;
            return Err(ArchiveError::ChangedWhilePushed {
                database: self.database.clone(),
                name: chunk.name,
                expected: plaintext,
                expected_size: size,
                stored,
                stored_size: artifact.size,
            });
        }
        let record = ChunkRecord {
            format: RECORD_FORMAT,
            database: self.database.clone(),
            name: chunk.name,
            kind: chunk.kind,
            timeline: chunk.timeline,
            start: chunk.start,
            end: chunk.end,
            segment_size: chunk.segment_size,
            size,
            plaintext_blake3: plaintext,
            artifact,
            archived_at_ms: chrono::Utc::now().timestamp_millis(),
            details: chunk.details,
        };
        let record_path = self.record_path(&record.name);
        let json = serde_json::to_vec_pretty(&record).expect("a chunk record serializes");
        if let Err(error) = self.storage.put_atomic(&record_path, json.into()).await {
            let _ = self.storage.delete(&record.artifact.path).await;
            return Err(error.into());
        }
        // Another push of the same chunk may have raced this one: the record that
        // landed last wins, and the loser's artifact goes (both are whole either way).
        match self.record(&record.name).await? {
            Some(landed) if landed.artifact.path != record.artifact.path => {
                let _ = self.storage.delete(&record.artifact.path).await;
                self.same_or_conflict(landed, record.size, &record.plaintext_blake3)
            }
            _ => Ok(PushOutcome::Stored(record)),
        }
    }

    fn same_or_conflict(
        &self,
        existing: ChunkRecord,
        size: u64,
        plaintext: &str,
    ) -> Result<PushOutcome, ArchiveError> {
        if existing.plaintext_blake3 == plaintext && existing.size == size {
            return Ok(PushOutcome::AlreadyArchived(existing));
        }
        Err(ArchiveError::Conflict {
            database: self.database.clone(),
            name: existing.name,
            existing_size: existing.size,
            existing_blake3: existing.plaintext_blake3,
            new_size: size,
            new_blake3: plaintext.to_owned(),
        })
    }

    async fn plaintext_hash(&self, content: &ChunkContent) -> Result<(u64, String), ArchiveError> {
        match content {
            ChunkContent::Bytes(bytes) => {
                Ok((bytes.len() as u64, blake3::hash(bytes).to_hex().to_string()))
            }
            ChunkContent::File(path) => {
                let owned = path.clone();
                let hashed = tokio::task::spawn_blocking(move || hash_file(&owned))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|result| result);
                hashed.map_err(|source| ArchiveError::Io {
                    database: self.database.clone(),
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }

    /// The chunk's plaintext, streamed back (checked against the stored BLAKE3 as
    /// [`pipeline::open`] does).
    pub async fn open(
        &self,
        record: &ChunkRecord,
        decryption: &Decryption,
    ) -> Result<ByteStream, ArchiveError> {
        Ok(pipeline::open(&self.storage, &record.artifact, decryption).await?)
    }

    /// The chunk's plaintext, whole, with its plaintext BLAKE3 checked.
    pub async fn read(
        &self,
        record: &ChunkRecord,
        decryption: &Decryption,
    ) -> Result<Vec<u8>, ArchiveError> {
        use tokio::io::AsyncReadExt;
        let mut stream = self.open(record, decryption).await?;
        let mut bytes = Vec::with_capacity(record.size as usize);
        stream
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| ArchiveError::Io {
                database: self.database.clone(),
                path: record.artifact.path.clone(),
                source,
            })?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if hash != record.plaintext_blake3 {
            return Err(ArchiveError::Pipeline(PipelineError::Damaged {
                path: record.artifact.path.clone(),
                stage: pipeline::DamageStage::Decompression,
                detail: format!(
                    "its plaintext has BLAKE3 {hash}, the record says {}",
                    record.plaintext_blake3
                ),
            }));
        }
        Ok(bytes)
    }

    /// Removes a chunk: its record first (from then on it is not listed), then its
    /// artifact.
    pub async fn remove(&self, record: &ChunkRecord) -> Result<(), ArchiveError> {
        self.storage.delete(&self.record_path(&record.name)).await?;
        self.storage.delete(&record.artifact.path).await?;
        Ok(())
    }

    /// Artifacts under this archive that no record names (a push killed between its
    /// artifact and its record, or the loser of a race): safe to delete once no push
    /// is running.
    pub async fn unrecorded_artifacts(&self) -> Result<Vec<String>, ArchiveError> {
        let listing = self.storage.list(&self.prefix()).await?;
        let (records, _) = self.records().await?;
        let named: std::collections::HashSet<&str> =
            records.iter().map(|r| r.artifact.path.as_str()).collect();
        Ok(listing
            .into_iter()
            .map(|entry| entry.path)
            .filter(|path| !path.ends_with(RECORD_SUFFIX) && !named.contains(path.as_str()))
            .collect())
    }
}

/// Names become object paths: letters, digits, `.`, `_`, `-`, not starting with `.`,
/// and a chunk name never ends like a record.
fn check_name(what: &str, name: &str) -> Result<(), ArchiveError> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with(RECORD_SUFFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        Ok(())
    } else {
        Err(ArchiveError::InvalidName(format!(
            "{what} {name:?} cannot name a directory or object in the archive; use letters, \
             digits, '.', '_' and '-' only"
        )))
    }
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let size = std::io::copy(&mut file, &mut hasher)?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}

/// Hashes what passes through it.
struct HashingRead {
    inner: ByteStream,
    hasher: Arc<Mutex<blake3::Hasher>>,
}

impl AsyncRead for HashingRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            self.hasher
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .update(&buf.filled()[before..]);
        }
        polled
    }
}

/// Every database that has an archive in `storage`.
pub async fn archived_databases(storage: &Storage) -> Result<Vec<String>, ArchiveError> {
    databases_under(storage, ARCHIVE_DIR).await
}

/// Every database that has a change stream in `storage`.
pub async fn change_stream_databases(storage: &Storage) -> Result<Vec<String>, ArchiveError> {
    databases_under(storage, CHANGES_DIR).await
}

async fn databases_under(storage: &Storage, dir: &str) -> Result<Vec<String>, ArchiveError> {
    let listing = storage.list(dir).await?;
    let mut names: Vec<String> = listing
        .iter()
        .filter_map(|entry| entry.path.strip_prefix(&format!("{dir}/")))
        .filter_map(|rest| rest.split_once('/').map(|(db, _)| db.to_owned()))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests;
