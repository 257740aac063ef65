//! The archivers of a runbook, whichever log each archives: built from the databases
//! with `archive = true` (or one named database), run until cancelled, and watched
//! through one progress shape. `stillpoint archive` prints that progress;
//! `stillpoint serve` supervises the same archivers and exports it as metrics.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::mariadb::{BinlogArchiver, BinlogArchiverConfig, BinlogArchiverStatus};
use super::pg_changes::{CaptureStatus, ChangeCapture};
use super::postgres::{ArchiverConfig, ArchiverStatus, PgArchiver};
use super::sqlite::{SqliteArchiver, SqliteArchiverConfig, SqliteArchiverStatus};
use super::{Archive, ArchiveError, Position};
use crate::adapters::AdapterConfig;
use crate::backup;
use crate::runbook::Runbook;
use crate::storage::Storage;

/// One database's archiver.
#[derive(Debug)]
pub enum Archiver {
    Wal(PgArchiver),
    Binlog(BinlogArchiver),
    Sqlite(SqliteArchiver),
}

/// Why a runbook's archivers could not be built: a usage problem, named with its fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArchiversError(String);

impl Archiver {
    /// The archivers of every database with `archive = true`, or of `only` (with or
    /// without `archive = true`).
    pub fn for_runbook(
        runbook: &Runbook,
        only: Option<&str>,
    ) -> Result<Vec<Archiver>, ArchiversError> {
        let chosen: Vec<_> = match only {
            Some(name) => {
                let database = runbook
                    .databases
                    .iter()
                    .find(|db| db.name == name)
                    .ok_or_else(|| ArchiversError(runbook.unknown_database(name)))?;
                vec![database]
            }
            None => runbook.databases.iter().filter(|db| db.archive).collect(),
        };
        if chosen.is_empty() {
            return Err(ArchiversError(
                "no database of the runbook has archive = true; set it on the PostgreSQL, \
                 MariaDB and SQLite databases to archive, or pass --database NAME"
                    .to_owned(),
            ));
        }
        let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
            .map_err(|error| ArchiversError(error.to_string()))?;
        let settings = backup::pipeline_settings(runbook)
            .map_err(|error| ArchiversError(error.to_string()))?;
        let mut archivers = Vec::new();
        for database in chosen {
            let archive = Archive::new(storage.clone(), settings.clone(), &database.name)
                .map_err(|error| ArchiversError(error.to_string()))?;
            archivers.push(match &database.adapter {
                AdapterConfig::Postgres(config) => {
                    let mut archiver = PgArchiver::new(
                        ArchiverConfig::new(
                            &database.name,
                            config.clone(),
                            &runbook.spool_root(),
                            runbook.archive.partial_interval,
                        ),
                        archive,
                    );
                    if database.changes {
                        let stream = Archive::change_stream(
                            storage.clone(),
                            settings.clone(),
                            &database.name,
                        )
                        .map_err(|error| ArchiversError(error.to_string()))?;
                        archiver = archiver.with_changes(ChangeCapture::new(
                            &database.name,
                            config.clone(),
                            runbook.archive.chunk_interval,
                            stream,
                        ));
                    }
                    Archiver::Wal(archiver)
                }
                AdapterConfig::Mariadb(config) => Archiver::Binlog(BinlogArchiver::new(
                    BinlogArchiverConfig::new(
                        &database.name,
                        config.clone(),
                        &runbook.spool_root(),
                        runbook.archive.chunk_interval,
                    ),
                    archive,
                )),
                AdapterConfig::Sqlite(config) => {
                    let mut sqlite = SqliteArchiverConfig::new(
                        &database.name,
                        &config.path,
                        &runbook.spool_root(),
                        runbook.archive.chunk_interval,
                    );
                    sqlite.snapshot_interval = runbook.archive.snapshot_interval;
                    Archiver::Sqlite(SqliteArchiver::new(sqlite, archive))
                }
                AdapterConfig::Exec(_) => {
                    return Err(ArchiversError(format!(
                        "database {:?} is an exec database, which has no log to archive; only \
                         PostgreSQL, MariaDB and SQLite databases are archived",
                        database.name
                    )));
                }
            });
        }
        Ok(archivers)
    }

    pub fn database(&self) -> &str {
        match self {
            Archiver::Wal(archiver) => &archiver.config().database,
            Archiver::Binlog(archiver) => &archiver.config().database,
            Archiver::Sqlite(archiver) => &archiver.config().database,
        }
    }

    /// Archives until `cancel` fires (then pushes what it has), restarting its
    /// client with backoff; an error is what retrying cannot fix.
    pub async fn run(&self, cancel: &CancellationToken) -> Result<(), ArchiveError> {
        match self {
            Archiver::Wal(archiver) => archiver.run(cancel).await,
            Archiver::Binlog(archiver) => archiver.run(cancel).await,
            Archiver::Sqlite(archiver) => archiver.run(cancel).await,
        }
    }

    pub fn watch(&self) -> ProgressWatch {
        match self {
            Archiver::Wal(archiver) => ProgressWatch::Wal(
                archiver.status(),
                archiver.changes().map(ChangeCapture::status),
            ),
            Archiver::Binlog(archiver) => ProgressWatch::Binlog(archiver.status()),
            Archiver::Sqlite(archiver) => ProgressWatch::Sqlite(archiver.status()),
        }
    }
}

/// A view of one archiver's status, the same for both kinds.
pub enum ProgressWatch {
    /// The WAL archiver's, and its change stream's when it has one.
    Wal(
        watch::Receiver<ArchiverStatus>,
        Option<watch::Receiver<CaptureStatus>>,
    ),
    Binlog(watch::Receiver<BinlogArchiverStatus>),
    Sqlite(watch::Receiver<SqliteArchiverStatus>),
}

/// What an archiver has done, the same for both kinds of archiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The archive holds the log without a gap up to here.
    pub archived_to: Option<Position>,
    /// The server's position at the archiver's last look, and its kind's JSON key
    /// (`server_lsn` for WAL, `server_position` for binlogs and SQLite's log).
    pub server: Option<Position>,
    pub server_key: &'static str,
    pub lag_bytes: Option<u64>,
    pub last_chunk: Option<String>,
    pub chunks_stored: u64,
    pub streaming: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// A PostgreSQL change stream (`changes = true`): how far it holds every commit,
    /// and its capture's last error.
    pub changes_to: Option<Position>,
    pub changes_error: Option<String>,
}

impl ProgressWatch {
    /// The status now, marking it seen.
    pub fn look(&mut self) -> Progress {
        match self {
            ProgressWatch::Wal(receiver, changes) => {
                let (changes_to, changes_error) = changes.as_mut().map_or((None, None), |c| {
                    let now = c.borrow_and_update();
                    (now.captured_to.map(Position::Lsn), now.last_error.clone())
                });
                let now = receiver.borrow_and_update();
                Progress {
                    archived_to: now.archived_to.map(Position::Lsn),
                    server: now.server_lsn.map(Position::Lsn),
                    server_key: "server_lsn",
                    lag_bytes: now.lag_bytes(),
                    last_chunk: now.last_chunk.clone(),
                    chunks_stored: now.chunks_stored,
                    streaming: now.streaming,
                    restarts: now.restarts,
                    last_error: now.last_error.clone(),
                    changes_to,
                    changes_error,
                }
            }
            ProgressWatch::Binlog(receiver) => {
                let now = receiver.borrow_and_update();
                Progress {
                    archived_to: now.archived_to.clone(),
                    server: now.server_position.clone(),
                    server_key: "server_position",
                    lag_bytes: now.lag_bytes(),
                    last_chunk: now.last_chunk.clone(),
                    chunks_stored: now.chunks_stored,
                    streaming: now.streaming,
                    restarts: now.restarts,
                    last_error: now.last_error.clone(),
                    changes_to: None,
                    changes_error: None,
                }
            }
            ProgressWatch::Sqlite(receiver) => {
                let now = receiver.borrow_and_update();
                Progress {
                    archived_to: now.archived_to.clone(),
                    server: now.log_position.clone(),
                    server_key: "server_position",
                    lag_bytes: now.pending_bytes,
                    last_chunk: now.last_chunk.clone(),
                    chunks_stored: now.chunks_stored,
                    streaming: now.streaming,
                    restarts: now.restarts,
                    last_error: now.last_error.clone(),
                    changes_to: None,
                    changes_error: None,
                }
            }
        }
    }

    /// Waits until the archiver is not streaming (it stopped after a cancel).
    pub async fn stopped(&mut self) {
        let _ = match self {
            ProgressWatch::Wal(receiver, _) => {
                receiver.wait_for(|s| !s.streaming).await.map(|_| ())
            }
            ProgressWatch::Binlog(receiver) => {
                receiver.wait_for(|s| !s.streaming).await.map(|_| ())
            }
            ProgressWatch::Sqlite(receiver) => {
                receiver.wait_for(|s| !s.streaming).await.map(|_| ())
            }
        };
    }
}
