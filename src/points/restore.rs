//! Restoring and drilling a point. For each database: what it needs (its base backup
//! and every chunk from the base's start to the marker) is found and *checked first*,
//! every stored artifact's checksum re-read, before anything is written; then
//! [`crate::pitr`] claims the new data directory, the base tar is extracted straight
//! into it (once: no staging copy), and its scratch server replays to the point's
//! named restore point while the chunks are read back again and written, segment by
//! segment in replay order, into a small WAL spool (`pitr::spool`: a bounded
//! look-ahead, consumed segments removed) that `restore_command` waits on. Each chunk
//! goes at its offset in its segment (`ChunkRecord::range`), the file padded to the
//! segment's size. The rows per table are compared with the point's counts, when it
//! has them; only a drill reads every table back for a content hash.
//!
//! `restore` leaves the recovered (stopped) data directory where asked; a drill keeps
//! each recovered server running, reached through its unix socket, while the
//! runbook's `[drill]` checks run on them, then stops them and removes everything.
//!
//! A MariaDB database of a point whose base is mariadb-backup's (the default) is
//! restored into a new data directory, as PostgreSQL's: the base extracted and
//! prepared there (`archive::mariadb_backup`), a scratch server started on it, the
//! archived binlog replayed from the base's position to the point's marker, the rows
//! compared, the server stopped (a drill keeps it running for its checks, then stops
//! it and removes the directory). One whose base is a dump is restored into a
//! database on a server (a new, empty one: `restore --to mysql://…`; a scratch
//! database on the runbook's `drill_server_url` or source server for a drill, as a
//! backup's drill does): the dump loaded, then the binlog replayed
//! ([`crate::archive::mariadb::restore_point`]). [`check_destination`] refuses a
//! base sent where it cannot go, before anything is written; the same checks come
//! first in every case. exec databases restore by time, which a point does not do
//! for them.
//!
//! A SQLite database of a point is rebuilt into a new file
//! ([`crate::archive::sqlite::restore`]: the snapshot, then the frames up to the
//! marker, each checked against its chain), checked with `PRAGMA integrity_check`, its
//! rows compared with the point's counts, and only then renamed into place; a drill
//! rebuilds it into its scratch directory and runs the runbook's checks on the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use futures::{FutureExt as _, StreamExt as _};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::{PointDatabase, PointManifest};
use crate::adapters::{
    self, Adapter, AdapterConfig, CutMarker, MariadbConfig, PostgresConfig, process,
};
use crate::archive::base::{self, BaseRecord};
use crate::archive::mariadb::{self as binlog_archive, ReplayReport, ReplayTarget};
use crate::archive::mariadb_backup;
use crate::archive::{Archive, ChunkKind, ChunkRecord, Lsn, NotReached, Position, wal};
use crate::drill::CheckResult;
use crate::manifest::DatabaseEntry;
use crate::pipeline::{self, Decryption, PipelineSettings};
use crate::pitr::spool::Spool;
use crate::pitr::{
    self, BaseBackup, HeldRecovery, PitrError, Recovery, RecoveryReport, Target, WalArchive,
};
use crate::runbook::Runbook;
use crate::storage::Storage;
use crate::time::unix_ms;

#[derive(Debug, thiserror::Error)]
pub enum PointRestoreError {
    /// The point, the runbook or the flags do not fit; nothing was written.
    #[error("{0}")]
    Setup(String),
    /// Something the point needs is missing or damaged; nothing was written.
    #[error("point {point} cannot be restored, nothing was written: {problem}")]
    Missing { point: String, problem: String },
    /// Extracting the base or writing the WAL failed.
    #[error("{0}")]
    Staging(String),
    #[error(transparent)]
    Recovery(#[from] PitrError),
    /// Loading a MariaDB base or replaying its binlog failed, or what it restored is
    /// not what the point holds.
    #[error("{0}")]
    Replay(String),
}

/// What one database of a point needs, all present and checked.
#[derive(Debug, Clone)]
pub struct Needed {
    pub database: String,
    /// `postgres` or `mariadb`.
    pub adapter: String,
    pub base: BaseRecord,
    /// The chunks from the one holding the base's start to the one holding the marker.
    pub chunks: Vec<ChunkRecord>,
    /// Timeline history files (replay asks for them).
    pub others: Vec<ChunkRecord>,
    /// PostgreSQL's named restore point.
    pub restore_point: Option<String>,
    pub target: Position,
}

impl Needed {
    pub fn stored_bytes(&self) -> u64 {
        self.base.artifact.stored_size
            + self
                .chunks
                .iter()
                .chain(&self.others)
                .map(|chunk| chunk.artifact.stored_size)
                .sum::<u64>()
    }
}

/// What database `name` of `point` needs, found in the storage: its base backup and
/// the archive's chunks from the base's start to the marker without a gap. Nothing is
/// read but records; [`check`] reads the artifacts.
pub async fn needs(
    storage: &Storage,
    settings: &PipelineSettings,
    point: &PointManifest,
    name: &str,
) -> Result<Needed, PointRestoreError> {
    let missing = |problem: String| PointRestoreError::Missing {
        point: point.point_id.clone(),
        problem,
    };
    let entry = point.database(name).ok_or_else(|| {
        PointRestoreError::Setup(format!(
            "point {} has no database {name:?}; it has: {}",
            point.point_id,
            point
                .databases
                .iter()
                .map(|database| database.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    if !restores_from_base(&entry.adapter) {
        return Err(PointRestoreError::Setup(format!(
            "database {name} of point {} is {}: a point restores PostgreSQL, MariaDB and \
             SQLite databases (from a base and an archive); exec databases restore by time",
            point.point_id, entry.adapter
        )));
    }
    let restore_point = entry.marker.details.get("restore_point").cloned();
    let (Some(base_ref), Some(target), true) = (
        &entry.base,
        &entry.target,
        restore_point.is_some() || matches!(entry.adapter.as_str(), "mariadb" | "sqlite"),
    ) else {
        return Err(missing(format!(
            "database {name} has no base backup, target or restore point in the point's \
             manifest"
        )));
    };
    let base = base::read_record(storage, name, &base_ref.id)
        .await
        .map_err(|error| missing(format!("base backup {} of {name}: {error}", base_ref.id)))?
        .ok_or_else(|| {
            missing(format!(
                "base backup {} of {name} is not in the storage (its record {} is gone)",
                base_ref.id,
                base::record_path(name, &base_ref.id).unwrap_or_default()
            ))
        })?;
    let archive = Archive::new(storage.clone(), settings.clone(), name)
        .map_err(|error| PointRestoreError::Setup(error.to_string()))?;
    let catalog = archive
        .catalog()
        .await
        .map_err(|error| missing(format!("the archive of {name}: {error}")))?;
    let from = base::replay_from(&base.start);
    catalog.covers(&from, target).map_err(|why| {
        let segments = missing_segments(&catalog, &why);
        let named = if let Some(chunk) = missing_binlog(&why) {
            format!(" (missing binlog chunk: {chunk})")
        } else if segments.is_empty() {
            String::new()
        } else {
            format!(" (missing WAL: {})", segments.join(", "))
        };
        missing(format!("database {name}: {why}{named}"))
    })?;
    // From the chunk that holds where replay starts to the first that reaches the
    // target (none when the target is where the base is: a SQLite point taken at
    // its snapshot).
    let mut chunks = Vec::new();
    if target > &from {
        let first = catalog
            .chunks
            .iter()
            .rposition(|chunk| chunk.range().is_some_and(|(start, _)| *start <= from))
            .expect("covers() found the holder");
        for chunk in &catalog.chunks[first..] {
            chunks.push(chunk.clone());
            if chunk.range().is_some_and(|(_, end)| end >= target) {
                break;
            }
        }
    }
    let others = catalog
        .others
        .iter()
        .filter(|chunk| chunk.name.ends_with(".history"))
        .cloned()
        .collect();
    Ok(Needed {
        database: name.to_owned(),
        adapter: entry.adapter.clone(),
        base,
        chunks,
        others,
        restore_point,
        target: target.clone(),
    })
}

/// Whether a point restores a database of this adapter from a base and an archive.
pub fn restores_from_base(adapter: &str) -> bool {
    matches!(adapter, "postgres" | "mariadb" | "sqlite")
}

/// The chunk a stretch of binlog the archive lacks was, by name, when the stretch
/// lies in one file (a chunk is cut within one file): what an operator looks for.
fn missing_binlog(why: &NotReached) -> Option<String> {
    let NotReached::Gap(gap) = why else {
        return None;
    };
    let ((file, from), (to_file, to)) = (gap.from.as_binlog()?, gap.to.as_binlog()?);
    (file == to_file).then(|| crate::archive::binlog::chunk_name(file, from, to))
}

/// The WAL segments a stretch the archive lacks would be in, by name (at most a few):
/// what an operator looks for in a server's pg_wal or another copy.
fn missing_segments(catalog: &crate::archive::Catalog, why: &NotReached) -> Vec<String> {
    let (from, to) = match why {
        NotReached::Gap(gap) => (&gap.from, &gap.to),
        NotReached::StartsAfter {
            first_start, from, ..
        } => (from, first_start),
        NotReached::EndsBefore { end, target, .. } => (end, target),
        NotReached::Empty { .. } => return Vec::new(),
    };
    let (Some(from), Some(to)) = (from.lsn(), to.lsn()) else {
        return Vec::new();
    };
    let Some(sample) = catalog.chunks.first() else {
        return Vec::new();
    };
    let (Some(size), Some(timeline)) = (sample.segment_size, sample.timeline) else {
        return Vec::new();
    };
    let first = wal::Segment::containing(timeline, from, size);
    let last = wal::Segment::containing(timeline, Lsn(to.0.saturating_sub(1).max(from.0)), size);
    let mut names = Vec::new();
    let mut at = first.start(size);
    while at <= last.start(size) {
        if names.len() == 5 {
            names.push("…".to_owned());
            break;
        }
        names.push(wal::Segment::containing(timeline, at, size).name(size));
        at = Lsn(at.0 + size);
    }
    names
}

/// Re-reads every stored artifact `needed` names and checks its checksum: the first
/// one missing or damaged is named. Artifacts already in `checked` are skipped; the
/// ones checked here are added.
pub async fn check(
    storage: &Storage,
    point: &PointManifest,
    needed: &Needed,
    checked: &mut Checked,
) -> Result<(), PointRestoreError> {
    let missing = |problem: String| PointRestoreError::Missing {
        point: point.point_id.clone(),
        problem,
    };
    if !checked.contains(&needed.base.artifact.path) {
        pipeline::verify_checksum(storage, &needed.base.artifact)
            .await
            .map_err(|error| {
                missing(format!(
                    "base backup {} of {}: {error}",
                    needed.base.id, needed.database
                ))
            })?;
        checked.insert(needed.base.artifact.path.clone());
    }
    let archive = Archive::new(
        storage.clone(),
        PipelineSettings::default(),
        &needed.database,
    )
    .map_err(|error| PointRestoreError::Setup(error.to_string()))?;
    for chunk in needed.chunks.iter().chain(&needed.others) {
        if checked.contains(&chunk.artifact.path) {
            continue;
        }
        let mut verified = pipeline::verify_checksum(storage, &chunk.artifact).await;
        // A running archiver replaces the growing segment's partial chunk with a
        // longer one (or the whole segment) and removes it: check the one that holds
        // at least as much now.
        if let Err(error) = &verified
            && error.is_not_found()
            && let Some(current) = crate::archive::postgres::superseding(&archive, chunk).await
        {
            verified = pipeline::verify_checksum(storage, &current.artifact).await;
        }
        verified.map_err(|error| {
            missing(format!(
                "chunk {} of the archive of {}: {error}",
                chunk.name, needed.database
            ))
        })?;
        checked.insert(chunk.artifact.path.clone());
    }
    Ok(())
}

/// Artifacts (by path) whose checksums one run of [`check`] has already verified:
/// `verify` of many points reads a base or chunk they share once. A path names one
/// push of one artifact, so it always holds the same bytes.
pub type Checked = std::collections::BTreeSet<String>;

/// Everything [`restore_one`] needs.
#[derive(Debug, Clone)]
pub struct RestoreRequest<'a> {
    pub runbook: &'a Runbook,
    pub storage: &'a Storage,
    pub settings: &'a PipelineSettings,
    pub decryption: &'a Decryption,
    pub point: &'a PointManifest,
    pub database: &'a str,
    /// Where the database goes.
    pub destination: Destination<'a>,
    /// Where the WAL is spooled while replay runs (a few segments at a time; removed
    /// afterwards), and a MariaDB binlog reassembled; default: the system's temporary
    /// directory. A PostgreSQL base goes straight into its data directory.
    pub staging_in: Option<&'a Path>,
    pub port: u16,
    pub timeout: Duration,
    /// Keep the recovered (stopped) data directory.
    pub keep: bool,
    pub run_as: Option<String>,
    /// PostgreSQL: read every table back for a content hash (a drill reports it); a
    /// restore only counts rows, when the point has counts.
    pub content_hash: bool,
}

/// Where a database of a point is restored.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    /// PostgreSQL: a new data directory (empty or absent).
    DataDir(&'a Path),
    /// MariaDB: the URL of a new, empty database (`mysql://…/name`).
    Database(&'a str),
    /// SQLite: a new file (absent).
    File(&'a Path),
}

/// A MariaDB database of a point restored: its base loaded, its binlog replayed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BinlogRestoreReport {
    /// The target, without its password.
    pub target: String,
    pub replay: ReplayReport,
    /// Whether the rows per table were compared with (and equal) those counted in
    /// the point's snapshot; false only for a point without counts.
    pub row_counts_match_point: bool,
    /// Loading the base and replaying the binlog.
    pub replay_ms: u64,
}

/// A SQLite database of a point rebuilt into a file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileRestoreReport {
    pub path: String,
    /// Frames of the log applied to the snapshot.
    pub frames: u64,
    /// Whether the rows per table were compared with (and equal) the point's counts.
    pub row_counts_match_point: bool,
    pub replay_ms: u64,
}

/// A database of a point restored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointRestoreReport {
    pub point_id: String,
    pub database: String,
    pub base_id: String,
    pub chunks: usize,
    pub stored_bytes: u64,
    /// Finding and checking what the point needs.
    pub check_ms: u64,
    /// Before recovery starts (PostgreSQL): the WAL spool set up. The base is
    /// extracted in the recovery (`recovery.base_ms`), the WAL written while it
    /// replays.
    pub staging_ms: u64,
    /// PostgreSQL: the recovery to the named restore point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryReport>,
    /// MariaDB: the base loaded and the binlog replayed to the marker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binlog: Option<BinlogRestoreReport>,
    /// SQLite: the file rebuilt from its snapshot and frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRestoreReport>,
    pub total_ms: u64,
}

impl PointRestoreReport {
    /// Whether the restored rows per table were compared with the point's counts
    /// (and equal them: a difference fails the restore).
    pub fn row_counts_checked(&self) -> bool {
        self.recovery
            .as_ref()
            .map(|recovery| recovery.row_counts_match_cut)
            .or(self.binlog.as_ref().map(|b| b.row_counts_match_point))
            .or(self.file.as_ref().map(|f| f.row_counts_match_point))
            .unwrap_or(false)
    }
}

/// Restores one database of a point: PostgreSQL into a new data directory (left
/// stopped when `keep`), MariaDB into a new database.
pub async fn restore_one(
    request: RestoreRequest<'_>,
    cancel: &CancellationToken,
) -> Result<PointRestoreReport, PointRestoreError> {
    if let Destination::Database(url) = request.destination {
        return restore_binlog(request, url, cancel).await;
    }
    if let Destination::File(path) = request.destination {
        return restore_sqlite(request, path, cancel).await;
    }
    if let (Destination::DataDir(data_dir), Some("mariadb")) = (
        request.destination,
        request
            .point
            .database(request.database)
            .map(|db| db.adapter.as_str()),
    ) {
        let (held, report) = restore_mariadb_server(request, data_dir, cancel).await?;
        held.stop(true).await.map_err(PointRestoreError::Replay)?;
        return Ok(report);
    }
    let (held, report) = restore_held(request, cancel).await?;
    let recovery = held.stop().await;
    Ok(PointRestoreReport {
        recovery: Some(recovery),
        ..report
    })
}

/// What restoring a MariaDB database of a point starts with, before anything is
/// written: its runbook entry, what it needs (checked, and fit for where it goes) and
/// its archive.
async fn checked_mariadb<'a>(
    request: &RestoreRequest<'a>,
) -> Result<(&'a MariadbConfig, Needed, Archive), PointRestoreError> {
    let name = request.database;
    let config = mariadb_config(request.runbook, name)?;
    let needed = needs(request.storage, request.settings, request.point, name).await?;
    check_destination(request.point, &needed, &request.destination)?;
    check(request.storage, request.point, &needed, &mut Checked::new()).await?;
    let archive = Archive::new(
        request.storage.clone(),
        request.settings.clone(),
        &needed.database,
    )
    .map_err(|error| PointRestoreError::Setup(error.to_string()))?;
    Ok((config, needed, archive))
}

/// The database the archived events were written to on the source: the base's own
/// record of it, or the runbook's name.
pub(crate) fn source_database(needed: &Needed, name: &str) -> String {
    needed
        .base
        .details
        .get("database")
        .cloned()
        .unwrap_or_else(|| name.to_owned())
}

/// A MariaDB database of a point into the new, empty database `url`: what it needs
/// checked first, then its base loaded and the binlog replayed to the marker, then
/// the rows per table compared with the point's counts.
pub(super) async fn restore_binlog(
    request: RestoreRequest<'_>,
    url: &str,
    cancel: &CancellationToken,
) -> Result<PointRestoreReport, PointRestoreError> {
    let started = Instant::now();
    let name = request.database;
    let (config, needed, archive) = checked_mariadb(&request).await?;
    let check_ms = elapsed_ms(started);
    let replay_started = Instant::now();
    let target = ReplayTarget {
        url: url.to_owned(),
        source_database: source_database(&needed, name),
        bin_dir: config.bin_dir.clone(),
        work_dir: request
            .staging_in
            .map_or_else(std::env::temp_dir, Path::to_owned),
    };
    let replayed = tokio::select! {
        replayed = binlog_archive::restore_point(&archive, request.decryption, &needed.base, &needed.target, &target) => replayed,
        () = cancel.cancelled() => {
            return Err(PointRestoreError::Recovery(PitrError::Cancelled(format!(
                "stopped while restoring {name}; the target database may hold part of it: \
                 drop it"
            ))));
        }
    };
    let replay = replayed.map_err(|error| PointRestoreError::Replay(error.to_string()))?;
    let replay_ms = elapsed_ms(replay_started);
    let row_counts_match_point =
        compare_mariadb_rows(request.point, name, url, config.bin_dir.as_deref()).await?;
    Ok(PointRestoreReport {
        point_id: request.point.point_id.clone(),
        database: name.to_owned(),
        base_id: needed.base.id.clone(),
        chunks: needed.chunks.len(),
        stored_bytes: needed.stored_bytes(),
        check_ms,
        staging_ms: 0,
        recovery: None,
        binlog: Some(BinlogRestoreReport {
            target: crate::storage::redact_url(url),
            replay,
            row_counts_match_point,
            replay_ms,
        }),
        file: None,
        total_ms: elapsed_ms(started),
    })
}

/// A SQLite database of a point into the new file `path`: what it needs checked
/// first, then rebuilt beside `path` (the snapshot and the frames to the marker),
/// checked (`PRAGMA integrity_check`, the rows per table against the point's counts)
/// and only then renamed into place, so `path` never holds part of a database.
pub(super) async fn restore_sqlite(
    request: RestoreRequest<'_>,
    path: &Path,
    cancel: &CancellationToken,
) -> Result<PointRestoreReport, PointRestoreError> {
    let started = Instant::now();
    let name = request.database;
    let needed = needs(request.storage, request.settings, request.point, name).await?;
    check_destination(request.point, &needed, &request.destination)?;
    check(request.storage, request.point, &needed, &mut Checked::new()).await?;
    if path.exists() {
        return Err(PointRestoreError::Setup(format!(
            "{} exists: a point restores {name} into a new file; give a path that does not \
             exist yet. Nothing was written",
            path.display()
        )));
    }
    let archive = Archive::new(
        request.storage.clone(),
        request.settings.clone(),
        &needed.database,
    )
    .map_err(|error| PointRestoreError::Setup(error.to_string()))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|error| {
            PointRestoreError::Setup(format!("creating {}: {error}", parent.display()))
        })?;
    }
    let check_ms = elapsed_ms(started);
    let replay_started = Instant::now();
    let beside = path.with_file_name(format!(
        ".{}.stillpoint-restore-{}",
        path.file_name()
            .map_or_else(|| name.into(), |f| f.to_string_lossy()),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let rebuilt = tokio::select! {
        rebuilt = crate::archive::sqlite::restore(
            &archive,
            &needed.base,
            &needed.chunks,
            &needed.target,
            request.decryption,
            &beside,
        ) => rebuilt,
        () = cancel.cancelled() => Err(format!("stopped while restoring {name}")),
    };
    let compared = match rebuilt {
        Ok(()) => {
            let compared = compare_sqlite_rows(request.point, name, &beside).await;
            // The checks opened the file in WAL mode: their empty -wal and -shm files
            // stay beside it, not in the restored database's place.
            for suffix in ["-wal", "-shm"] {
                let mut side = beside.clone().into_os_string();
                side.push(suffix);
                let _ = std::fs::remove_file(side);
            }
            compared
        }
        Err(error) => Err(PointRestoreError::Replay(format!(
            "database {name}: rebuilding it from base backup {}: {error}",
            needed.base.id
        ))),
    };
    let renamed = compared.and_then(|matched| {
        std::fs::rename(&beside, path)
            .map(|()| matched)
            .map_err(|error| {
                PointRestoreError::Staging(format!(
                    "moving the restored {name} to {}: {error}",
                    path.display()
                ))
            })
    });
    let row_counts_match_point = match renamed {
        Ok(matched) => matched,
        Err(error) => {
            let _ = std::fs::remove_file(&beside);
            if cancel.is_cancelled() {
                return Err(PointRestoreError::Recovery(PitrError::Cancelled(format!(
                    "stopped while restoring {name}; nothing was left at {}",
                    path.display()
                ))));
            }
            return Err(error);
        }
    };
    Ok(PointRestoreReport {
        point_id: request.point.point_id.clone(),
        database: name.to_owned(),
        base_id: needed.base.id.clone(),
        chunks: needed.chunks.len(),
        stored_bytes: needed.stored_bytes(),
        check_ms,
        staging_ms: 0,
        recovery: None,
        binlog: None,
        file: Some(FileRestoreReport {
            path: path.display().to_string(),
            frames: needed.target.as_sqlite().map_or(0, |(_, frame)| frame)
                - needed.base.start.as_sqlite().map_or(0, |(_, frame)| frame),
            row_counts_match_point,
            replay_ms: elapsed_ms(replay_started),
        }),
        total_ms: elapsed_ms(started),
    })
}

/// Whether the restored file's rows per table equal the point's counts (false when
/// the point has none); a difference is an error naming the tables.
async fn compare_sqlite_rows(
    point: &PointManifest,
    name: &str,
    file: &Path,
) -> Result<bool, PointRestoreError> {
    let Some(expected) = point.database(name).and_then(|db| db.row_counts.clone()) else {
        return Ok(false);
    };
    let path = file.to_owned();
    let counted = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| e.to_string())?;
        crate::adapters::sqlite::row_counts(&conn).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| PointRestoreError::Replay(e.to_string()))?
    .map_err(|error| PointRestoreError::Replay(format!("counting rows of {name}: {error}")))?;
    match row_count_difference(&expected, &counted) {
        None => Ok(true),
        Some(difference) => Err(PointRestoreError::Replay(format!(
            "database {name} restored from point {} does not hold the point's rows: \
             {difference}",
            point.point_id
        ))),
    }
}

/// Whether `destination` is where database `needed.database` of `point` can go:
/// PostgreSQL and a `mariadb_backup` base (a whole server's files) into a data
/// directory, a MariaDB dump into a database. Checked before anything is written.
pub fn check_destination(
    point: &PointManifest,
    needed: &Needed,
    destination: &Destination<'_>,
) -> Result<(), PointRestoreError> {
    let name = &needed.database;
    match (needed.adapter == "sqlite", destination) {
        (true, Destination::File(_)) => return Ok(()),
        (true, _) => {
            return Err(PointRestoreError::Setup(format!(
                "database {name} of point {} is SQLite: a point restores it into a new file; \
                 give --to {name}=FILE (or a directory, where it becomes {name}.sqlite). \
                 Nothing was written",
                point.point_id
            )));
        }
        (false, Destination::File(_)) => {
            return Err(PointRestoreError::Setup(format!(
                "database {name} of point {} is {}, not SQLite: it does not restore into a \
                 file. Nothing was written",
                point.point_id, needed.adapter
            )));
        }
        (false, _) => {}
    }
    let physical = needed.adapter == "postgres" || needed.base.kind == mariadb_backup::KIND;
    match (destination, physical) {
        (Destination::DataDir(_), true) | (Destination::Database(_), false) => Ok(()),
        (Destination::File(_), _) => unreachable!("SQLite destinations are decided above"),
        (Destination::Database(_), true) if needed.adapter == "mariadb" => {
            Err(PointRestoreError::Setup(format!(
                "database {name} of point {} restores from base backup {}, a mariadb-backup \
                 copy of the whole server, which becomes a data directory, not a database on \
                 a running server: give --to {name}=DIR (a new, empty directory), then start \
                 mariadbd on it. Nothing was written",
                point.point_id, needed.base.id
            )))
        }
        (Destination::Database(_), _) => Err(PointRestoreError::Setup(format!(
            "database {name} of point {} is {}: a point restores it into a new data \
             directory, not a database URL",
            point.point_id, needed.adapter
        ))),
        (Destination::DataDir(_), false) => Err(PointRestoreError::Setup(format!(
            "database {name} of point {} restores from base backup {}, a dump of one \
             database ({}): it loads into a new, empty database; give --to \
             {name}=mysql://user@host:port/new_database. Nothing was written",
            point.point_id, needed.base.id, needed.base.kind
        ))),
    }
}

/// A MariaDB database of a point restored into a data directory from a
/// `mariadb_backup` base: what it needs checked first, then the base extracted and
/// prepared in the claimed directory, a scratch server started on it, the binlog
/// replayed to the marker and the rows per table compared with the point's counts.
/// The server is left running (a drill's checks); anything failing removes what was
/// written.
pub(super) async fn restore_mariadb_server(
    request: RestoreRequest<'_>,
    data_dir: &Path,
    cancel: &CancellationToken,
) -> Result<(HeldMariadb, PointRestoreReport), PointRestoreError> {
    let started = Instant::now();
    let name = request.database;
    let (config, needed, archive) = checked_mariadb(&request).await?;
    let bin_dir = config.bin_dir.as_deref();
    let check_ms = elapsed_ms(started);
    let replay_started = Instant::now();
    let work_dir = request
        .staging_in
        .map_or_else(std::env::temp_dir, Path::to_owned);
    let source_database = source_database(&needed, name);
    let replay_error = |error: crate::archive::ArchiveError| {
        PointRestoreError::Replay(format!("restoring {name}: {error}"))
    };
    let work = async {
        // Every chunk read and checked before the directory is touched.
        let fetched = binlog_archive::fetch_range(
            &archive,
            request.decryption,
            &needed.base.start,
            &needed.target,
            &work_dir,
        )
        .await
        .map_err(replay_error)?;
        let dir = pitr::ClaimedDir::claim(data_dir, false)?;
        mariadb_backup::restore_base(
            request.storage,
            request.decryption,
            &needed.base,
            data_dir,
            bin_dir,
        )
        .await
        .map_err(replay_error)?;
        let server = mariadb_backup::ScratchServer::start(data_dir, bin_dir)
            .await
            .map_err(|why| PointRestoreError::Replay(format!("restoring {name}: {why}")))?;
        let url = server.url(&source_database);
        let held = HeldMariadb { server, dir, url };
        let target = ReplayTarget {
            url: held.url.clone(),
            source_database: source_database.clone(),
            bin_dir: config.bin_dir.clone(),
            work_dir: work_dir.clone(),
        };
        let replay = fetched.apply(&target).await.map_err(replay_error)?;
        let rows = compare_mariadb_rows(request.point, name, &held.url, bin_dir).await?;
        Ok::<_, PointRestoreError>((held, replay, rows))
    };
    let (held, replay, row_counts_match_point) = tokio::select! {
        done = work => done?,
        () = cancel.cancelled() => {
            return Err(PointRestoreError::Recovery(PitrError::Cancelled(format!(
                "stopped while restoring {name}; its scratch server was stopped and {} removed",
                data_dir.display()
            ))));
        }
    };
    let replay_ms = elapsed_ms(replay_started);
    let report = PointRestoreReport {
        point_id: request.point.point_id.clone(),
        database: name.to_owned(),
        base_id: needed.base.id.clone(),
        chunks: needed.chunks.len(),
        stored_bytes: needed.stored_bytes(),
        check_ms,
        staging_ms: 0,
        recovery: None,
        binlog: Some(BinlogRestoreReport {
            target: data_dir.display().to_string(),
            replay,
            row_counts_match_point,
            replay_ms,
        }),
        file: None,
        total_ms: elapsed_ms(started),
    };
    Ok((held, report))
}

/// A MariaDB data directory restored to a point, its scratch server running.
pub(super) struct HeldMariadb {
    server: mariadb_backup::ScratchServer,
    /// Removed when dropped unless kept.
    dir: pitr::ClaimedDir,
    /// The restored database on the scratch server.
    pub(super) url: String,
}

impl HeldMariadb {
    /// Shuts the server down cleanly; the directory stays when `keep` (and the
    /// shutdown worked), and is removed otherwise.
    pub(super) async fn stop(self, keep: bool) -> Result<(), String> {
        let HeldMariadb {
            server, mut dir, ..
        } = self;
        let data_dir = server.data_dir().to_owned();
        server.stop().await.map_err(|why| {
            format!(
                "{why}; {} was removed (a data directory left there is whole)",
                data_dir.display()
            )
        })?;
        dir.keep = keep;
        Ok(())
    }
}

/// Compares the rows per table of the restored MariaDB database at `url` with the
/// point's counts: `Ok(false)` when the point has none, an error naming the tables
/// that differ.
async fn compare_mariadb_rows(
    point: &PointManifest,
    name: &str,
    url: &str,
    bin_dir: Option<&Path>,
) -> Result<bool, PointRestoreError> {
    let entry = point_entry(point, name)?;
    let Some(expected) = &entry.row_counts else {
        return Ok(false);
    };
    let adapter = adapters::mariadb::Mariadb::new(
        name,
        MariadbConfig {
            url: url.to_owned(),
            bin_dir: bin_dir.map(Path::to_owned),
            drill_server_url: None,
            base_method: Default::default(),
        },
    );
    let found = adapter
        .row_counts(url)
        .await
        .map_err(|error| PointRestoreError::Replay(error.to_string()))?;
    if let Some(difference) = row_count_difference(expected, &found) {
        return Err(PointRestoreError::Replay(format!(
            "database {name} restored to point {} holds other rows than the point's \
             snapshot: {difference}",
            point.point_id
        )));
    }
    Ok(true)
}

/// The first tables whose rows differ between what a point counted and what a
/// restore holds, or `None` when they are equal.
pub(super) fn row_count_difference(
    expected: &BTreeMap<String, u64>,
    found: &BTreeMap<String, u64>,
) -> Option<String> {
    let tables: std::collections::BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
    let differ: Vec<String> = tables
        .into_iter()
        .filter(|table| expected.get(*table) != found.get(*table))
        .take(5)
        .map(|table| {
            let shown = |count: Option<&u64>| count.map_or("none".to_owned(), u64::to_string);
            format!(
                "{table}: {} in the point, {} restored",
                shown(expected.get(table)),
                shown(found.get(table))
            )
        })
        .collect();
    (!differ.is_empty()).then(|| differ.join(", "))
}

/// [`restore_one`], with the recovered server left running (a drill's checks).
pub async fn restore_held(
    request: RestoreRequest<'_>,
    cancel: &CancellationToken,
) -> Result<(HeldRecovery, PointRestoreReport), PointRestoreError> {
    let started = Instant::now();
    let config = postgres_config(request.runbook, request.database)?;
    let Destination::DataDir(data_dir) = request.destination else {
        return Err(PointRestoreError::Setup(format!(
            "database {} is PostgreSQL: a point restores it into a new data directory, not \
             a database URL",
            request.database
        )));
    };
    let needed = needs(
        request.storage,
        request.settings,
        request.point,
        request.database,
    )
    .await?;
    check(request.storage, request.point, &needed, &mut Checked::new()).await?;
    let check_ms = elapsed_ms(started);
    let staging_started = Instant::now();
    let staging = staging_dir(request.staging_in)?;
    let archive = Archive::new(
        request.storage.clone(),
        request.settings.clone(),
        &needed.database,
    )
    .map_err(|error| PointRestoreError::Setup(error.to_string()))?;
    let segments = wal_segments(&needed.chunks)?;
    let spool = Spool::create(
        &staging.path().join("wal"),
        &needed
            .others
            .iter()
            .map(|chunk| chunk.name.clone())
            .collect::<Vec<_>>(),
        segments.iter().map(|(name, _)| name.clone()).collect(),
        request.run_as.as_deref(),
    )
    .await
    .map_err(PointRestoreError::Staging)?;
    let staging_ms = elapsed_ms(staging_started);
    let extract =
        || extract_base(request.storage, request.decryption, &needed.base, data_dir).boxed();
    let feed = || feed_spool(&archive, request.decryption, &needed, &segments, &spool).boxed();
    let entry = point_entry(request.point, request.database)?;
    let recovery = Recovery {
        config,
        entry: &entry,
        base_backup: BaseBackup::Extract {
            name: &needed.base.id,
            extract: &extract,
        },
        wal_archive: WalArchive::Spool {
            spool: &spool,
            feed: &feed,
        },
        data_dir,
        target: Target::Name(needed.restore_point.clone().unwrap_or_default()),
        port: request.port,
        timeout: request.timeout,
        keep: request.keep,
        // A point restore's target is whole or gone.
        keep_unfinished: false,
        run_as: request.run_as.clone(),
        content_hash: request.content_hash,
    };
    let held = pitr::recover_held(recovery, cancel).await?;
    // Replay is over: the spool is no longer read.
    drop(spool);
    drop(staging);
    let report = PointRestoreReport {
        point_id: request.point.point_id.clone(),
        database: request.database.to_owned(),
        base_id: needed.base.id.clone(),
        chunks: needed.chunks.len(),
        stored_bytes: needed.stored_bytes(),
        check_ms,
        staging_ms,
        recovery: Some(held.report().clone()),
        binlog: None,
        file: None,
        total_ms: elapsed_ms(started),
    };
    Ok((held, report))
}

pub(crate) fn postgres_config<'a>(
    runbook: &'a Runbook,
    database: &str,
) -> Result<&'a PostgresConfig, PointRestoreError> {
    match runbook
        .databases
        .iter()
        .find(|db| db.name == database)
        .map(|db| &db.adapter)
    {
        Some(AdapterConfig::Postgres(config)) => Ok(config),
        Some(_) => Err(PointRestoreError::Setup(format!(
            "database {database} of the runbook is not PostgreSQL"
        ))),
        None => Err(PointRestoreError::Setup(format!(
            "the runbook has no database {database:?}: it says how to reach the server's \
             tools (bin_dir) and which user and database to read back"
        ))),
    }
}

pub(crate) fn mariadb_config<'a>(
    runbook: &'a Runbook,
    database: &str,
) -> Result<&'a MariadbConfig, PointRestoreError> {
    match runbook
        .databases
        .iter()
        .find(|db| db.name == database)
        .map(|db| &db.adapter)
    {
        Some(AdapterConfig::Mariadb(config)) => Ok(config),
        Some(_) => Err(PointRestoreError::Setup(format!(
            "database {database} of the runbook is not MariaDB"
        ))),
        None => Err(PointRestoreError::Setup(format!(
            "the runbook has no database {database:?}: it says where the server's tools \
             (bin_dir) are"
        ))),
    }
}

/// The point's database as pitr reads a backup's: its marker LSN bounds the base, its
/// row counts are what the recovered state must hold.
fn point_entry(point: &PointManifest, name: &str) -> Result<DatabaseEntry, PointRestoreError> {
    let database: &PointDatabase = point
        .database(name)
        .ok_or_else(|| PointRestoreError::Setup(format!("point has no database {name}")))?;
    Ok(DatabaseEntry {
        name: database.name.clone(),
        role: database.role.clone(),
        adapter: database.adapter.clone(),
        cut: CutMarker {
            kind: database.marker.kind.clone(),
            details: database.marker.details.clone(),
        },
        artifact: None,
        row_counts: database.row_counts.clone(),
    })
}

/// A directory the scratch server's user can read (it runs `restore_command` there).
pub(super) fn staging_dir(within: Option<&Path>) -> Result<tempfile::TempDir, PointRestoreError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("stillpoint-point-");
    let dir = match within {
        Some(within) => builder.tempdir_in(within),
        None => builder.tempdir(),
    }
    .map_err(|error| {
        PointRestoreError::Staging(format!("creating a staging directory: {error}"))
    })?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(
        |error| PointRestoreError::Staging(format!("opening the staging directory: {error}")),
    )?;
    Ok(dir)
}

/// The base backup's tar extracted into `data_dir` (claimed and empty: recovery runs
/// this), straight from the storage.
pub(crate) async fn extract_base(
    storage: &Storage,
    decryption: &Decryption,
    base: &BaseRecord,
    data_dir: &Path,
) -> Result<(), String> {
    let stream = pipeline::open(storage, &base.artifact, decryption)
        .await
        .map_err(|error| format!("opening it: {error}"))?;
    let mut tar = Command::new("tar");
    tar.arg("--extract")
        .arg("--file=-")
        .arg("--no-same-owner")
        .arg("--directory")
        .arg(data_dir);
    process::run_with_stdin(tar, "tar", stream, false)
        .await
        .map_err(|error| tar_failure(&error, data_dir))
}

/// How many lines of tar's complaint an extraction error keeps.
const TAR_ERROR_LINES: usize = 4;

/// tar's failure, short: tar goes on after a write fails, one line per file, so a full
/// or read-only target gave thousands of lines. The first few say why; the target and
/// the fix are named when the cause is the target's disk.
fn tar_failure(error: &str, data_dir: &Path) -> String {
    let mut lines = error.lines();
    let mut message = lines
        .by_ref()
        .take(TAR_ERROR_LINES)
        .collect::<Vec<_>>()
        .join("\n");
    let more = lines.count();
    if more > 0 {
        message.push_str(&format!("\n(and {more} more line(s) from tar)"));
    }
    let cause = if error.contains("No space left on device") {
        Some("is full")
    } else if error.contains("Read-only file system") {
        Some("is on a read-only file system")
    } else {
        None
    };
    if let Some(cause) = cause {
        message.push_str(&format!(
            "\nthe target {} {cause}: free space there or give another --to",
            data_dir.display()
        ));
    }
    message
}

/// The WAL segment files replay reads, in order, each with the chunks that fill it
/// (a whole segment's one chunk, or the partial chunks, "pieces", of one).
fn wal_segments(
    chunks: &[ChunkRecord],
) -> Result<Vec<(String, Vec<ChunkRecord>)>, PointRestoreError> {
    let mut segments: Vec<(String, Vec<ChunkRecord>)> = Vec::new();
    for chunk in chunks {
        let segment = match chunk.kind {
            ChunkKind::PgWalPartial => wal::parse_partial_chunk_name(&chunk.name)
                .map(|(segment, _, _)| segment.to_owned())
                .ok_or_else(|| {
                    PointRestoreError::Staging(format!(
                        "{} is not a partial chunk's name",
                        chunk.name
                    ))
                })?,
            _ => chunk.name.clone(),
        };
        match segments.last_mut() {
            Some((last, pieces)) if *last == segment => pieces.push(chunk.clone()),
            _ => segments.push((segment, vec![chunk.clone()])),
        }
    }
    Ok(segments)
}

/// Writes the timeline history files, then each WAL segment in replay order into the
/// spool, while recovery replays from it: each chunk read back (its checksum again)
/// and placed at its offset in its segment, the file padded to the segment's size (a
/// partial chunk as `wal-fetch` serves it).
async fn feed_spool(
    archive: &Archive,
    decryption: &Decryption,
    needed: &Needed,
    segments: &[(String, Vec<ChunkRecord>)],
    spool: &Spool,
) -> Result<(), String> {
    for chunk in &needed.others {
        let (_, bytes) = read_chunk(archive, decryption, chunk).await?;
        spool.publish(&chunk.name, &bytes).await?;
    }
    // Two segments read at once (each chunk is decompressed on a worker thread of
    // its own), published in order: replay on the other core must not outrun us.
    let mut files = futures::stream::iter(0..segments.len())
        .map(|index| async move {
            let (segment, pieces) = &segments[index];
            spool.wait_for_room(index).await;
            let mut file = Vec::new();
            for piece in pieces {
                let (chunk, bytes) = read_chunk(archive, decryption, piece).await?;
                place(&mut file, &chunk, &bytes)?;
            }
            Ok::<_, String>((segment, file))
        })
        .buffered(2);
    while let Some(file) = files.next().await {
        let (segment, file) = file?;
        spool.publish(segment, &file).await?;
    }
    spool.finish().await
}

/// A chunk's bytes (checked against its record), or those of the chunk that
/// superseded it since (a longer partial, the whole segment), with that chunk.
async fn read_chunk(
    archive: &Archive,
    decryption: &Decryption,
    chunk: &ChunkRecord,
) -> Result<(ChunkRecord, Vec<u8>), String> {
    let mut read = archive
        .read(chunk, decryption)
        .await
        .map(|bytes| (chunk.clone(), bytes));
    if read.is_err()
        && let Some(current) = crate::archive::postgres::superseding(archive, chunk).await
    {
        read = archive
            .read(&current, decryption)
            .await
            .map(|bytes| (current, bytes));
    }
    read.map_err(|error| format!("reading chunk {}: {error}", chunk.name))
}

/// Puts a WAL chunk's `bytes` into its segment's file at the chunk's offset in the
/// segment (its start LSN less the segment's), padded to the segment's size: a chunk
/// may hold any stretch `[from, to)` of its segment, not only its beginning.
fn place(file: &mut Vec<u8>, chunk: &ChunkRecord, bytes: &[u8]) -> Result<(), String> {
    let wrong = |why: &str| {
        format!(
            "chunk {} cannot be placed in its segment: {why}",
            chunk.name
        )
    };
    let (Some(size), Some(timeline), Some((start, end))) =
        (chunk.segment_size, chunk.timeline, chunk.range())
    else {
        return Err(wrong("its record has no segment size, timeline or range"));
    };
    let (Some(start), Some(end)) = (start.lsn(), end.lsn()) else {
        return Err(wrong("its range is not WAL positions"));
    };
    let segment_start = wal::Segment::containing(timeline, start, size).start(size);
    let offset = start.0 - segment_start.0;
    let length = end.0.checked_sub(start.0).unwrap_or(u64::MAX);
    if length != bytes.len() as u64 || offset + length > size {
        return Err(wrong(&format!(
            "its range {start}..{end} holds {length} bytes of a {size}-byte segment, it has {}",
            bytes.len()
        )));
    }
    file.resize(size as usize, 0);
    file[offset as usize..(offset + length) as usize].copy_from_slice(bytes);
    Ok(())
}

/// A point drilled: every database restored into a scratch server, then checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointDrillReport {
    pub point_id: String,
    pub cluster: String,
    pub ok: bool,
    pub restore_point_timestamp_ms: Option<i64>,
    /// How old the point was when the drill ran.
    pub rpo_ms: Option<i64>,
    /// Wall time to restore every database (in parallel).
    pub rto_ms: u64,
    pub total_ms: u64,
    pub databases: Vec<PointRestoreReport>,
    pub checks: Vec<CheckResult>,
}

/// What a point drill needs beyond the point.
#[derive(Debug, Clone)]
pub struct DrillRequest<'a> {
    pub runbook: &'a Runbook,
    pub storage: &'a Storage,
    pub settings: &'a PipelineSettings,
    pub decryption: &'a Decryption,
    pub point: &'a PointManifest,
    pub timeout: Duration,
    pub run_as: Option<String>,
}

/// Restores every database of `point` into scratch servers and runs the runbook's
/// `[drill]` checks on them. Everything each database needs is checked before any of
/// them is written: a missing or damaged chunk or base is `Err`, naming it. Check
/// failures are in the report (`ok == false`).
pub async fn drill(
    request: DrillRequest<'_>,
    cancel: &CancellationToken,
) -> Result<PointDrillReport, PointRestoreError> {
    let started = Instant::now();
    let point = request.point;
    let mut checks = Vec::new();
    // What each MariaDB database's base is: a mariadb-backup copy restores into a
    // scratch server of its own, a dump into a scratch database.
    let mut physical_mariadb = std::collections::BTreeSet::new();
    // Every database's needs, found and checked before anything is written.
    for database in &point.databases {
        let checked = Instant::now();
        let needed = needs(request.storage, request.settings, point, &database.name).await?;
        check(request.storage, point, &needed, &mut Checked::new()).await?;
        if needed.adapter == "mariadb" && needed.base.kind == mariadb_backup::KIND {
            physical_mariadb.insert(database.name.clone());
        }
        checks.push(CheckResult {
            name: format!("checksum:{}", database.name),
            ok: true,
            detail: format!(
                "base backup {} and {} chunk(s) ({} stored) read back, checksums match",
                needed.base.id,
                needed.chunks.len() + needed.others.len(),
                needed.stored_bytes()
            ),
            duration_ms: elapsed_ms(checked),
        });
    }
    let scratch = staging_dir(request.runbook.drill.scratch_dir.as_deref())?;
    // MariaDB databases go into scratch databases on their drill server (as a
    // backup's drill does), made first so that whatever comes next knows what to
    // drop; PostgreSQL ones into scratch servers, on free ports.
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let mut destinations: Vec<DrillDestination> = Vec::new();
    let mut scratch_databases: Vec<(Arc<dyn Adapter>, String)> = Vec::new();
    let mut setup_error = None;
    for database in &point.databases {
        let config = request
            .runbook
            .databases
            .iter()
            .find(|db| db.name == database.name)
            .ok_or_else(|| {
                PointRestoreError::Setup(format!(
                    "point {} has database {:?}, which the runbook does not configure; add it \
                     to [[databases]] so the drill knows how to restore it",
                    point.point_id, database.name
                ))
            });
        let destination = match config {
            Ok(_) if database.adapter == "sqlite" => Ok(DrillDestination::File(
                scratch.path().join(format!("{}.sqlite", database.name)),
            )),
            Ok(_) if physical_mariadb.contains(&database.name) => {
                Ok(DrillDestination::MariadbServer {
                    data_dir: scratch.path().join(format!("{}-data", database.name)),
                })
            }
            Ok(config) if matches!(config.adapter, AdapterConfig::Mariadb(_)) => {
                let adapter = adapters::build(&database.name, &config.adapter);
                let label = crate::drill::scratch_label(run_id, &database.name);
                match adapter
                    .create_scratch(&label, scratch.path(), &database.marker)
                    .await
                {
                    Ok(url) => {
                        scratch_databases.push((adapter, url.clone()));
                        Ok(DrillDestination::Database(url))
                    }
                    Err(error) => Err(PointRestoreError::Setup(format!(
                        "creating a scratch database for {}: {error}",
                        database.name
                    ))),
                }
            }
            Ok(_) => free_port()
                .map(|port| DrillDestination::Server {
                    data_dir: scratch.path().join(format!("{}-data", database.name)),
                    port,
                })
                .map_err(PointRestoreError::Setup),
            Err(error) => Err(error),
        };
        match destination {
            Ok(destination) => destinations.push(destination),
            Err(error) => {
                setup_error = Some(error);
                break;
            }
        }
    }
    let drop_scratch = |scratch_databases: Vec<(Arc<dyn Adapter>, String)>| async move {
        for (adapter, url) in scratch_databases {
            if let Err(error) = adapter.drop_scratch(&url).await {
                tracing::warn!(target = %crate::storage::redact_url(&url), %error, "could not remove a drill's scratch database (`stillpoint drill --cleanup` removes it)");
            }
        }
    };
    if let Some(error) = setup_error {
        drop_scratch(scratch_databases).await;
        return Err(error);
    }
    let restoring = Instant::now();
    let restores = join_all(point.databases.iter().zip(&destinations).map(
        |(database, destination)| {
            let staging = scratch.path().to_owned();
            let request = request.clone();
            async move {
                let restore = RestoreRequest {
                    runbook: request.runbook,
                    storage: request.storage,
                    settings: request.settings,
                    decryption: request.decryption,
                    point,
                    database: &database.name,
                    destination: match destination {
                        DrillDestination::Server { data_dir, .. }
                        | DrillDestination::MariadbServer { data_dir } => {
                            Destination::DataDir(data_dir)
                        }
                        DrillDestination::Database(url) => Destination::Database(url),
                        DrillDestination::File(path) => Destination::File(path),
                    },
                    staging_in: Some(&staging),
                    port: match destination {
                        DrillDestination::Server { port, .. } => *port,
                        _ => 0,
                    },
                    timeout: request.timeout,
                    keep: false,
                    run_as: request.run_as.clone(),
                    // A drill reports what it restored by its content.
                    content_hash: true,
                };
                match destination {
                    DrillDestination::Server { .. } => restore_held(restore, cancel)
                        .await
                        .map(|(server, report)| (Held::Server(Box::new(server)), report)),
                    DrillDestination::Database(url) => restore_binlog(restore, url, cancel)
                        .await
                        .map(|report| (Held::Database(url.clone()), report)),
                    DrillDestination::MariadbServer { data_dir } => {
                        restore_mariadb_server(restore, data_dir, cancel)
                            .await
                            .map(|(server, report)| (Held::MariadbServer(Box::new(server)), report))
                    }
                    DrillDestination::File(path) => restore_sqlite(restore, path, cancel)
                        .await
                        .map(|report| (Held::Database(path.display().to_string()), report)),
                }
            }
        },
    ))
    .await;
    let rto_ms = elapsed_ms(restoring);
    let mut held = Vec::new();
    let mut failed = Vec::new();
    for (database, restored) in point.databases.iter().zip(restores) {
        match restored {
            Ok(pair) => held.push((database.name.clone(), pair)),
            Err(error) => failed.push((database.name.clone(), error)),
        }
    }
    if let Some((_, PointRestoreError::Recovery(PitrError::Cancelled(why)))) = failed
        .iter()
        .find(|(_, error)| matches!(error, PointRestoreError::Recovery(PitrError::Cancelled(_))))
    {
        let why = why.clone();
        for (_, (restored, _)) in held {
            match restored {
                Held::Server(server) => {
                    server.stop().await;
                }
                Held::MariadbServer(server) => stop_scratch_mariadb(*server).await,
                Held::Database(_) => {}
            }
        }
        drop_scratch(scratch_databases).await;
        return Err(PointRestoreError::Recovery(PitrError::Cancelled(why)));
    }
    for (name, error) in &failed {
        checks.push(CheckResult {
            name: format!("restore:{name}"),
            ok: false,
            detail: error.to_string(),
            duration_ms: 0,
        });
    }
    for (name, (_, report)) in &held {
        let detail = match (&report.recovery, &report.binlog) {
            (Some(recovery), _) => format!(
                "replayed base backup {} + {} chunk(s) to {} (LSN {}) in {} ms",
                report.base_id,
                report.chunks,
                recovery.target,
                recovery.reached_lsn.as_deref().unwrap_or("?"),
                report.total_ms
            ),
            (None, Some(binlog)) => format!(
                "loaded base backup {} and replayed {} chunk(s) of binlog from {} to {} \
                 (GTID {}) in {} ms",
                report.base_id,
                binlog.replay.chunks.len(),
                binlog.replay.from,
                binlog.replay.to,
                binlog.replay.gtid_binlog_pos.as_deref().unwrap_or("?"),
                report.total_ms
            ),
            (None, None) => match &report.file {
                Some(file) => format!(
                    "rebuilt from base backup {} + {} chunk(s) ({} frames) in {} ms",
                    report.base_id, report.chunks, file.frames, report.total_ms
                ),
                None => format!("restored in {} ms", report.total_ms),
            },
        };
        checks.push(CheckResult {
            name: format!("restore:{name}"),
            ok: true,
            detail,
            duration_ms: report.total_ms,
        });
        checks.push(CheckResult {
            name: format!("row_counts:{name}"),
            ok: true,
            detail: if report.row_counts_checked() {
                "rows per table equal those counted in the point's snapshot".to_owned()
            } else {
                "not compared: the point has no row counts (point --count-rows)".to_owned()
            },
            duration_ms: 0,
        });
    }
    // The runbook's checks, on the running scratch servers and databases.
    let targets: BTreeMap<&str, (Arc<dyn Adapter>, String)> = held
        .iter()
        .filter_map(|(name, (restored, _))| {
            let config = request
                .runbook
                .databases
                .iter()
                .find(|db| &db.name == name)?;
            let url = match restored {
                Held::Server(server) => server.url().to_owned(),
                Held::MariadbServer(server) => server.url.clone(),
                Held::Database(url) => url.clone(),
            };
            Some((name.as_str(), (adapters::build(name, &config.adapter), url)))
        })
        .collect();
    let restored: Vec<&str> = targets.keys().copied().collect();
    let checking = async {
        let mut results = Vec::new();
        for check in &request.runbook.drill.checks {
            results.push(crate::drill::run_check(check, &targets, &restored).await);
        }
        results
    };
    let results = tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        results = checking => Some(results),
    };
    drop(targets);
    let mut databases = Vec::new();
    for (_, (restored, report)) in held {
        match restored {
            Held::Server(server) => {
                let recovery = server.stop().await;
                databases.push(PointRestoreReport {
                    recovery: Some(recovery),
                    ..report
                });
            }
            Held::MariadbServer(server) => {
                stop_scratch_mariadb(*server).await;
                databases.push(report);
            }
            Held::Database(_) => databases.push(report),
        }
    }
    drop_scratch(scratch_databases).await;
    drop(scratch);
    let Some(results) = results else {
        return Err(PointRestoreError::Recovery(PitrError::Cancelled(
            "the drill was interrupted; its scratch servers and databases were stopped and \
             removed"
                .to_owned(),
        )));
    };
    checks.extend(results);
    Ok(PointDrillReport {
        point_id: point.point_id.clone(),
        cluster: point.cluster.clone(),
        ok: checks.iter().all(|check| check.ok),
        restore_point_timestamp_ms: point.time_ms(),
        rpo_ms: point.time_ms().map(|at| unix_ms(SystemTime::now()) - at),
        rto_ms,
        total_ms: elapsed_ms(started),
        databases,
        checks,
    })
}

/// Where a drill restores one database.
enum DrillDestination {
    /// PostgreSQL: a scratch server on a new data directory.
    Server { data_dir: PathBuf, port: u16 },
    /// MariaDB from a mariadb-backup base: a scratch server on a new data directory
    /// (reached through its own socket).
    MariadbServer { data_dir: PathBuf },
    /// MariaDB from a dump: a scratch database (its URL).
    Database(String),
    /// SQLite: a file in the drill's scratch directory.
    File(PathBuf),
}

/// A database a drill restored, while its checks run.
enum Held {
    Server(Box<HeldRecovery>),
    MariadbServer(Box<HeldMariadb>),
    /// A MariaDB scratch database's URL, or a SQLite file's path.
    Database(String),
}

/// Stops a drill's scratch MariaDB server and removes its data directory.
async fn stop_scratch_mariadb(server: HeldMariadb) {
    if let Err(why) = server.stop(false).await {
        tracing::warn!(%why, "a drill's scratch MariaDB server did not stop cleanly");
    }
}

/// A port nothing listens on now (the OS picks it).
pub(super) fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("finding a free port: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| format!("finding a free port: {error}"))
}

pub(super) fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Gap;

    /// A binlog gap within one file names the chunk that held it; across files, or
    /// in WAL, there is no one chunk to name.
    #[test]
    fn a_binlog_gap_names_the_missing_chunk() {
        let gap = |from: Position, to: Position| {
            NotReached::Gap(Gap {
                database: "auditor".to_owned(),
                after: "a".to_owned(),
                from,
                before: "b".to_owned(),
                to,
            })
        };
        assert_eq!(
            missing_binlog(&gap(
                Position::binlog("binlog.000002", 0x68),
                Position::binlog("binlog.000002", 0x9A)
            ))
            .as_deref(),
            Some("binlog.000002.000000000068-00000000009A")
        );
        assert_eq!(
            missing_binlog(&gap(
                Position::binlog("binlog.000002", 0x68),
                Position::binlog("binlog.000003", 4)
            )),
            None
        );
        assert_eq!(
            missing_binlog(&gap(Position::Lsn(Lsn(1)), Position::Lsn(Lsn(2)))),
            None
        );
    }

    const SEGMENT: u64 = 16 << 20;

    /// A WAL chunk of segment 3 (timeline 1) holding `[from, to)` of it (offsets).
    fn piece(from: u64, to: u64) -> ChunkRecord {
        let segment = "000000010000000000000003";
        let start = 3 * SEGMENT;
        let whole = from == 0 && to == SEGMENT;
        ChunkRecord {
            format: 1,
            database: "ledger".to_owned(),
            name: if whole {
                segment.to_owned()
            } else {
                wal::partial_chunk_name(segment, from, to)
            },
            kind: if whole {
                ChunkKind::PgWalSegment
            } else {
                ChunkKind::PgWalPartial
            },
            timeline: Some(1),
            start: Some(Position::Lsn(Lsn(start + from))),
            end: Some(Position::Lsn(Lsn(start + to))),
            segment_size: Some(SEGMENT),
            size: to - from,
            plaintext_blake3: String::new(),
            artifact: crate::pipeline::ArtifactInfo {
                path: String::new(),
                size: 0,
                stored_size: 0,
                blake3: String::new(),
                compression: None,
                encryption: None,
            },
            archived_at_ms: 0,
            details: BTreeMap::new(),
        }
    }

    /// A chunk's bytes go at its range's offset in the segment, not at 0, and the
    /// file is padded to the segment's size; pieces fill one file together. Negative
    /// controls: bytes that do not fit the range, a range past the segment.
    #[test]
    fn chunks_are_placed_at_their_offset_in_their_segment() {
        let mut file = Vec::new();
        place(&mut file, &piece(0, 4096), &[1; 4096]).unwrap();
        assert_eq!(file.len() as u64, SEGMENT);
        place(&mut file, &piece(8192, 12288), &[2; 4096]).unwrap();
        assert!(file[..4096].iter().all(|b| *b == 1));
        assert!(file[4096..8192].iter().all(|b| *b == 0));
        assert!(file[8192..12288].iter().all(|b| *b == 2));
        assert!(file[12288..].iter().all(|b| *b == 0));

        let mut whole = Vec::new();
        place(&mut whole, &piece(0, SEGMENT), &vec![7; SEGMENT as usize]).unwrap();
        assert!(whole.iter().all(|b| *b == 7));

        let error = place(&mut Vec::new(), &piece(8192, 12288), &[2; 100]).unwrap_err();
        assert!(error.contains("holds 4096 bytes"), "{error}");
        let mut past = piece(8192, 12288);
        past.end = Some(Position::Lsn(Lsn(5 * SEGMENT)));
        assert!(place(&mut Vec::new(), &past, &[0; 4096]).is_err());
    }

    /// The chunks of one segment (a partial, or several pieces) make one file, in
    /// replay order.
    #[test]
    fn chunks_are_grouped_into_segment_files_in_order() {
        let mut next = piece(0, SEGMENT);
        next.name = "000000010000000000000004".to_owned();
        next.start = Some(Position::Lsn(Lsn(4 * SEGMENT)));
        next.end = Some(Position::Lsn(Lsn(5 * SEGMENT)));
        let segments = wal_segments(&[piece(0, 4096), piece(4096, 8192), next]).unwrap();
        let names: Vec<(&str, usize)> = segments
            .iter()
            .map(|(name, pieces)| (name.as_str(), pieces.len()))
            .collect();
        assert_eq!(
            names,
            [
                ("000000010000000000000003", 2),
                ("000000010000000000000004", 1)
            ]
        );
    }

    #[test]
    fn a_tar_flood_on_a_full_target_is_cut_short_and_names_the_target() {
        let mut error =
            String::from("tar exited with status 2: tar: base/1/1: Wrote only 512 of 10240 bytes");
        for file in 0..500 {
            error.push_str(&format!(
                "\ntar: base/1/{file}: Cannot write: No space left on device"
            ));
        }
        let message = tar_failure(&error, Path::new("/srv/restore/ledger"));
        assert_eq!(message.lines().count(), TAR_ERROR_LINES + 2, "{message}");
        assert!(
            message.contains("(and 497 more line(s) from tar)"),
            "{message}"
        );
        assert!(
            message.contains("the target /srv/restore/ledger is full"),
            "{message}"
        );
        // Control: a short complaint about the base itself is kept whole, with no
        // word about the target.
        let damaged = "tar exited with status 2: tar: Unexpected EOF in archive";
        assert_eq!(tar_failure(damaged, Path::new("/srv/x")), damaged);
    }

    #[test]
    fn row_counts_that_differ_are_named_per_table() {
        let counts = |list: &[(&str, u64)]| -> BTreeMap<String, u64> {
            list.iter().map(|(t, n)| (t.to_string(), *n)).collect()
        };
        let point = counts(&[("ledger", 10), ("accounts", 3)]);
        assert_eq!(row_count_difference(&point, &point.clone()), None);
        assert_eq!(
            row_count_difference(&point, &counts(&[("ledger", 11), ("accounts", 3)])).as_deref(),
            Some("ledger: 10 in the point, 11 restored")
        );
        assert_eq!(
            row_count_difference(&point, &counts(&[("ledger", 10)])).as_deref(),
            Some("accounts: 3 in the point, none restored")
        );
    }
}
