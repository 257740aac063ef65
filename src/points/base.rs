//! `stillpoint base-backup` into the storage, for every archived database of a
//! runbook: MariaDB's is `archive::mariadb::base_backup` (`mariadb-backup --stream`
//! by default, or the adapter's consistent dump with `base_method = "dump"`, each
//! with the binlog position where it is consistent); PostgreSQL's, here, is a physical base backup,
//! `pg_basebackup --format=tar --pgdata=- --wal-method=none`, streamed through the
//! pipeline (zstd → age → BLAKE3) as one tar, then its record written last
//! (`bases/<database>/<id>/base.json`), so a base is listed only when whole.
//!
//! No WAL goes into the base: the database's archive holds it (`-X none`), so a
//! database that is not archived (`archive = true`) is refused before anything runs.
//! pg_basebackup writes only one tar to stdout, so a server with tablespaces outside
//! its data directory is refused too (take a local base backup with `--to DIR`).
//! Where replay starts and where the base becomes consistent are recorded as bounds
//! read from the server itself: its WAL insert position just before pg_basebackup
//! starts (at or before the backup's checkpoint redo point, where replay starts) and
//! just after it ends (at or after the backup's end, which replay must pass). A
//! restore asks the archive for a little more WAL than it strictly needs, never less;
//! pg_basebackup reports the exact points only when it streams WAL itself.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::PointsError;
use crate::adapters::postgres::conninfo::ConnString;
use crate::adapters::{AdapterConfig, process};
use crate::archive::base::{self, BASE_FORMAT, BaseRecord};
use crate::archive::{Archive, ArchiveError, Lsn, Position};
use crate::pipeline::{self, PipelineSettings};
use crate::runbook::Runbook;
use crate::storage::Storage;
use crate::time::unix_ms;

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("{0}")]
    Setup(String),
    #[error("base backup of {database} failed: {message}; nothing was kept")]
    Failed { database: String, message: String },
    #[error("base backup of {database} was interrupted; what it stored was removed")]
    Cancelled { database: String },
}

impl From<PointsError> for BaseError {
    fn from(error: PointsError) -> Self {
        BaseError::Setup(error.to_string())
    }
}

/// Takes a base backup of the runbook's database `database` into `storage`.
pub async fn take(
    runbook: &Runbook,
    database: &str,
    storage: &Storage,
    settings: &PipelineSettings,
    cancel: &CancellationToken,
) -> Result<BaseRecord, BaseError> {
    let config = runbook
        .databases
        .iter()
        .find(|db| db.name == database)
        .ok_or_else(|| BaseError::Setup(format!("the runbook has no database {database:?}")))?;
    if !config.archive {
        return Err(BaseError::Setup(format!(
            "database {database} is not archived: a base backup in the storage holds no log \
             and replays from the archive. Set `archive = true` in its [[databases]] entry \
             and run `stillpoint archive` first"
        )));
    }
    let postgres = match &config.adapter {
        AdapterConfig::Postgres(postgres) => postgres,
        AdapterConfig::Mariadb(mariadb) => {
            // A failed dump removes what it stored; one dropped here by a signal
            // leaves at most an artifact without a record, which is not a base.
            let taken = tokio::select! {
                taken = crate::archive::mariadb::base_backup(storage, settings, database, mariadb) => taken,
                () = cancel.cancelled() => {
                    return Err(BaseError::Cancelled { database: database.to_owned() });
                }
            };
            return taken.map_err(|error| match error {
                ArchiveError::Settings { message, .. } => {
                    BaseError::Setup(format!("database {database}: {message}"))
                }
                other => BaseError::Failed {
                    database: database.to_owned(),
                    message: other.to_string(),
                },
            });
        }
        AdapterConfig::Sqlite(_) => {
            return Err(BaseError::Setup(format!(
                "database {database} is SQLite: its archiver takes its base backups itself \
                 (a snapshot when it starts a generation, then every [archive] \
                 snapshot_interval), so run `stillpoint archive` or `stillpoint serve`"
            )));
        }
        other => {
            return Err(BaseError::Setup(format!(
                "database {database} uses the {} adapter; base backups into the storage are \
                 for PostgreSQL, MariaDB and SQLite",
                super::take::adapter_kind(other)
            )));
        }
    };
    let source = ConnString::parse(&postgres.url)
        .map_err(|message| BaseError::Setup(format!("the URL of {database}: {message}")))?;
    let listed = crate::pitr::tablespaces(&source)
        .await
        .map_err(|error| BaseError::Setup(error.to_string()))?;
    if !listed.is_empty() {
        return Err(BaseError::Setup(format!(
            "{} has {} tablespace(s) outside its data directory ({}); pg_basebackup streams \
             only one tar, so a base backup into the storage cannot hold them. Take a local \
             one with `stillpoint base-backup --to DIR`",
            source.shown(),
            listed.len(),
            listed
                .iter()
                .map(|(_, location)| location.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    let (client, connection) = source
        .connect()
        .await
        .map_err(|message| BaseError::Setup(format!("database {database}: {message}")))?;
    let driver = tokio::spawn(connection);
    let before = insert_position(&client).await.map_err(BaseError::Setup)?;
    let id = base::new_base_id();
    let prefix = base::base_prefix(database, &id).map_err(|e| BaseError::Setup(e.to_string()))?;
    let artifact_path = format!("{prefix}/base.tar{}", settings.suffix());
    let started_at_ms = unix_ms(std::time::SystemTime::now());
    let started = Instant::now();
    let tool = crate::pitr::tool(postgres, "pg_basebackup");
    let mut command = Command::new(&tool);
    source.libpq_args(&mut command);
    command.args([
        "--pgdata=-",
        "--format=tar",
        "--wal-method=none",
        "--checkpoint=fast",
        "--no-password",
    ]);
    let failed = |message: String| BaseError::Failed {
        database: database.to_owned(),
        message,
    };
    let (stream, producer) = process::spawn_producer(command, "pg_basebackup", true)
        .map_err(|error| failed(format!("cannot run {}: {error}", tool.display())))?;
    let work = async {
        let stored = pipeline::store(stream, settings, storage, &artifact_path, |_| {}).await;
        let waited = producer.wait_stderr().await;
        (stored, waited)
    };
    // Dropping the work kills pg_basebackup (and its process group).
    let finished = tokio::select! {
        finished = work => Some(finished),
        () = cancel.cancelled() => None,
    };
    let remove = || async {
        if let Err(error) = storage.delete(&artifact_path).await
            && !error.is_not_found()
        {
            tracing::warn!(path = %artifact_path, %error, "could not remove a failed base backup's artifact");
        }
    };
    let Some((stored, waited)) = finished else {
        remove().await;
        return Err(BaseError::Cancelled {
            database: database.to_owned(),
        });
    };
    let (artifact, stderr) = match (stored, waited) {
        (Ok(artifact), Ok(stderr)) => (artifact, stderr),
        (_, Err(why)) => {
            remove().await;
            return Err(failed(why));
        }
        (Err(error), Ok(_)) => {
            remove().await;
            return Err(failed(error.to_string()));
        }
    };
    tracing::debug!(%stderr, "pg_basebackup finished");
    let after = insert_position(&client).await;
    drop(client);
    let _ = driver.await;
    let positions = match after {
        Ok(after) => WalPositions {
            start: before.0,
            end: after.0,
            timeline: Some(after.1),
        },
        Err(why) => {
            remove().await;
            return Err(failed(why));
        }
    };
    // Interrupted while it waits, the base goes like one interrupted while taken.
    let archived = tokio::select! {
        archived = require_archived_from(storage, settings, database, positions.start) => archived,
        () = cancel.cancelled() => Err(BaseError::Cancelled { database: database.to_owned() }),
    };
    if let Err(error) = archived {
        remove().await;
        return Err(error);
    }
    let record = BaseRecord {
        format: BASE_FORMAT,
        id: id.clone(),
        database: database.to_owned(),
        adapter: "postgres".to_owned(),
        kind: "pg_basebackup_tar".to_owned(),
        start: Position::Lsn(positions.start),
        end: Position::Lsn(positions.end),
        timeline: positions.timeline,
        started_at_ms,
        finished_at_ms: unix_ms(std::time::SystemTime::now()),
        artifact,
        details: BTreeMap::from([(
            "took_ms".to_owned(),
            started.elapsed().as_millis().to_string(),
        )]),
    };
    if let Err(error) = base::write_record(storage, &record).await {
        remove().await;
        return Err(failed(format!("writing its record: {error}")));
    }
    Ok(record)
}

#[derive(Debug, PartialEq, Eq)]
struct WalPositions {
    start: Lsn,
    end: Lsn,
    timeline: Option<u32>,
}

/// The server's WAL insert position and timeline now.
/// How long a base backup waits for an archive that holds nothing yet (an archiver
/// just started) to store its first chunk.
const FIRST_CHUNK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A base replays from the archive, so its record is written only once the archive
/// holds the WAL from where the base starts: a base taken right after the archiver
/// started may start before the archive does (it starts where its slot was made),
/// and would be listed while no point could ever replay from it. An empty archive
/// gets [`FIRST_CHUNK_WAIT`] for its first chunk.
async fn require_archived_from(
    storage: &Storage,
    settings: &PipelineSettings,
    database: &str,
    from: Lsn,
) -> Result<(), BaseError> {
    let archive = Archive::new(storage.clone(), settings.clone(), database)
        .map_err(|error| BaseError::Setup(format!("database {database}: {error}")))?;
    let from = Position::Lsn(from);
    let deadline = tokio::time::Instant::now() + FIRST_CHUNK_WAIT;
    let why = loop {
        let catalog = archive.catalog().await.map_err(|error| {
            BaseError::Setup(format!("database {database}: reading its archive: {error}"))
        })?;
        match catalog.coverage() {
            Some(coverage) if coverage.from <= from => return Ok(()),
            Some(coverage) => {
                break format!(
                    "starts at {}, after this base's start {from}",
                    coverage.from
                );
            }
            None if tokio::time::Instant::now() >= deadline => {
                break format!("held no WAL after {}s", FIRST_CHUNK_WAIT.as_secs());
            }
            None => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    };
    Err(BaseError::Setup(format!(
        "the archive of {database} {why}, so no point could replay this base backup: \
         start `stillpoint archive --config RUNBOOK` and take the base backup once \
         `stillpoint archive-list` shows a chunk of {database}; nothing was kept"
    )))
}

async fn insert_position(client: &tokio_postgres::Client) -> Result<(Lsn, u32), String> {
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, \
                    (SELECT timeline_id FROM pg_control_checkpoint())",
            &[],
        )
        .await
        .map_err(|e| {
            format!(
                "reading the WAL position: {}",
                crate::adapters::postgres::error_text(&e)
            )
        })?;
    let lsn: String = row.get(0);
    let timeline: i32 = row.get(1);
    let lsn = lsn.parse().map_err(|e: String| e)?;
    Ok((lsn, timeline as u32))
}
