//! `stillpoint restore`, `base-backup` and `pitr`: putting a backup back. `restore`
//! loads one database's logical copy into a target; `base-backup` and `pitr` are
//! PostgreSQL's physical route to the same restore point (base backup + WAL archive,
//! replayed to the marker the cut left).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use stillpoint::adapters::{self, AdapterConfig, PostgresConfig};
use stillpoint::catalog;
use stillpoint::manifest::Manifest;
use stillpoint::pitr::{self, BaseBackup, PitrError, Recovery, TargetKind, WalArchive};
use stillpoint::restore::{self, RestoreError};
use stillpoint::runbook::Runbook;
use stillpoint::storage::Storage;

use crate::args::{OutputFormat, duration};
use crate::backup::{human_bytes, load_runbook};
use crate::exit::{self, Failure};
use crate::output::print_json;
use crate::signal::{run_cancellable, shutdown_signal};

#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// A backup id, or `latest` (the newest backup that is a valid restore point).
    #[arg(required_unless_present = "point")]
    pub backup: Option<String>,
    /// Restore a point instead of a backup: its id, `latest`, or a time (RFC 3339),
    /// which picks the newest point at or before it. Every database of the point (or
    /// --database) is replayed from its base backup into a new data directory: --to
    /// DIR for one database, DIR/<database> for several.
    #[arg(long, value_name = "ID|latest|TIME", conflicts_with_all = ["backup", "force"])]
    pub point: Option<String>,
    /// The runbook: its storage, decryption key and the database's adapter settings.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The database to restore, by its name in the runbook and manifest (required for
    /// a backup; a point restores all its databases without it).
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// Where to: a new SQLite file path, or the URL of an empty PostgreSQL or MariaDB
    /// database (postgres://…, mysql://…). For --point: a new data directory for a
    /// PostgreSQL database (DIR/<database> for several), the URL of a new, empty
    /// database for a MariaDB one, a new file for a SQLite one (DIR/<database>.sqlite
    /// for a plain DIR); given once per database as NAME=TARGET when the point has
    /// several (`--to ledger=/srv/ledger --to auditor=mysql://…/auditor_new`).
    #[arg(long, value_name = "TARGET", required = true, action = clap::ArgAction::Append)]
    pub to: Vec<String>,
    /// --point: give up if replay has not reached the point by then.
    #[arg(long, default_value = "10m", value_parser = duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// --point: run the recovery server as this system user (PostgreSQL refuses
    /// root). Default when run as root: postgres.
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
    /// Empty a non-empty target first (drops its tables). Without it, a target that
    /// holds anything is refused.
    #[arg(long)]
    pub force: bool,
    /// `text` for people (with a progress bar on a terminal), `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct BaseBackupArgs {
    /// The runbook. Into the storage: its archived PostgreSQL and MariaDB databases;
    /// with --to: a PostgreSQL database.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The database. Without --to, default: every archived (`archive = true`)
    /// PostgreSQL and MariaDB database of the runbook.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// A new (or empty) local directory for a plain-format base backup. Without it the
    /// base backup goes into the runbook's storage (a tar, through the pipeline), for
    /// points: the database must be archived.
    #[arg(long, value_name = "DIR", requires = "database")]
    pub to: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct PitrArgs {
    /// A backup id, or `latest`: whose restore point to recover to.
    pub backup: String,
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The PostgreSQL database of the backup.
    #[arg(long, value_name = "NAME")]
    pub database: String,
    /// A plain-format base backup taken before the backup (`stillpoint base-backup`).
    #[arg(long, value_name = "DIR")]
    pub base_backup: PathBuf,
    /// The directory the server's archive_command copies WAL segments into.
    #[arg(long, value_name = "DIR")]
    pub wal_archive: PathBuf,
    /// Which marker of the backup to stop at: the named restore point created inside
    /// the pause, the WAL LSN read inside the pause, or the window's mid-time.
    #[arg(long, value_enum, default_value_t = TargetArg::Name)]
    pub target: TargetArg,
    /// The scratch data directory (new or empty); default: a temporary directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Port for the scratch server (on 127.0.0.1); default: a free one.
    #[arg(long)]
    pub port: Option<u16>,
    /// Give up if replay has not reached the target by then.
    #[arg(long, default_value = "10m", value_parser = duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Keep the recovered (stopped) data directory; start it with pg_ctl -D DIR start.
    #[arg(long)]
    pub keep: bool,
    /// Run the scratch server as this system user (PostgreSQL refuses root). Default
    /// when run as root: postgres.
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    Name,
    Lsn,
    Time,
}

/// The runbook, its storage and the backup `which` names.
pub async fn open_backup(
    config: &std::path::Path,
    which: &str,
) -> Result<(Runbook, Storage, Manifest), Failure> {
    let runbook = load_runbook(config)?;
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let found = catalog::list(&storage).await?;
    let manifest = catalog::resolve(&found, which)
        .map_err(|error| Failure::new(exit::USAGE, error))?
        .clone();
    Ok((runbook, storage, manifest))
}

fn adapter_config<'a>(runbook: &'a Runbook, database: &str) -> Result<&'a AdapterConfig, Failure> {
    runbook
        .databases
        .iter()
        .find(|db| db.name == database)
        .map(|db| &db.adapter)
        .ok_or_else(|| {
            Failure::new(
                exit::USAGE,
                anyhow::anyhow!("{}", runbook.unknown_database(database)),
            )
        })
}

fn postgres_config<'a>(
    runbook: &'a Runbook,
    database: &str,
) -> Result<&'a PostgresConfig, Failure> {
    match adapter_config(runbook, database)? {
        AdapterConfig::Postgres(config) => Ok(config),
        _ => Err(Failure::new(
            exit::USAGE,
            anyhow::anyhow!("database {database} does not use the postgres adapter"),
        )),
    }
}

pub async fn restore(args: RestoreArgs) -> Result<u8, Failure> {
    let Some(backup) = &args.backup else {
        return crate::points::restore_point(&args).await;
    };
    let Some(database) = &args.database else {
        return Err(Failure::new(
            exit::USAGE,
            anyhow::anyhow!("restoring a backup needs --database NAME"),
        ));
    };
    let database = database.as_str();
    let [to] = args.to.as_slice() else {
        return Err(Failure::new(
            exit::USAGE,
            anyhow::anyhow!("restoring a backup takes one --to TARGET"),
        ));
    };
    let (runbook, storage, manifest) = open_backup(&args.config, backup).await?;
    let decryption = stillpoint::backup::decryption(&runbook)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let entry =
        restore::entry(&manifest, database).map_err(|error| Failure::new(exit::USAGE, error))?;
    let adapter = adapters::build(database, adapter_config(&runbook, database)?);
    if args.output == OutputFormat::Text {
        crate::errln!(
            "restoring {} of backup {} (restore point {}) into {} …",
            database,
            manifest.backup_id,
            manifest
                .window
                .restore_point_date_time
                .as_deref()
                .unwrap_or("-"),
            stillpoint::storage::redact_url(to)
        );
    }
    let (bars, progress) = crate::backup::progress(args.output, "restore");
    let restoring = restore::restore_database(
        &storage,
        &manifest,
        entry,
        Arc::clone(&adapter),
        to,
        &decryption,
        args.force,
        progress,
    );
    // SIGINT/SIGTERM stop the restore: dropping it kills the restore tool (pg_restore
    // rolls its one transaction back) and removes a SQLite copy being written beside
    // its target, which is left as it was.
    let outcome = tokio::select! {
        outcome = restoring => outcome,
        () = shutdown_signal() => {
            if let Some(bars) = &bars {
                bars.clear();
            }
            return Err(Failure::new(
                exit::ERROR,
                anyhow::anyhow!(
                    "interrupted: the restore of {} into {} was stopped before it finished. \
                     A SQLite target is as it was; a PostgreSQL or MariaDB target may be \
                     empty or hold part of the copy (restore again with --force)",
                    database,
                    stillpoint::storage::redact_url(to)
                ),
            ));
        }
    };
    if let Some(bars) = &bars {
        bars.clear();
    }
    let report = outcome.map_err(|error| {
        let code = match error {
            RestoreError::NoSuchDatabase { .. }
            | RestoreError::NoArtifact { .. }
            | RestoreError::WrongAdapter { .. } => exit::USAGE,
            _ => exit::BACKUP_FAILED,
        };
        Failure::new(code, anyhow::anyhow!(stillpoint::error_chain(&error)))
    })?;
    match args.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "backup_id": manifest.backup_id,
            "restore_point_timestamp_ms": manifest.window.restore_point_timestamp_ms,
            "target": stillpoint::storage::redact_url(to),
            "restore": report,
        })),
        OutputFormat::Text => crate::outln!(
            "restored {} ({} stored) in {:.1}s (checksum {} ms, load {} ms)",
            report.database,
            human_bytes(report.stored_bytes),
            report.total_ms as f64 / 1000.0,
            report.checksum_ms,
            report.load_ms
        ),
    }
    Ok(exit::OK)
}

pub async fn base_backup(args: BaseBackupArgs) -> Result<u8, Failure> {
    let (Some(to), Some(database)) = (&args.to, &args.database) else {
        return crate::points::base_backup(&args).await;
    };
    let runbook = load_runbook(&args.config)?;
    let config = postgres_config(&runbook, database)?;
    // SIGINT/SIGTERM stop pg_basebackup and remove the partial base backup.
    let report =
        run_cancellable(|cancel| async move { pitr::base_backup(config, to, &cancel).await })
            .await
            .map_err(|error| {
                let code = match error {
                    PitrError::Cancelled(_) => exit::ERROR,
                    _ => exit::BACKUP_FAILED,
                };
                Failure::new(code, error)
            })?;
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => crate::outln!(
            "base backup of {} in {} (starts at WAL {}) in {:.1}s",
            database,
            report.dir.display(),
            report.start_lsn.as_deref().unwrap_or("?"),
            report.took_ms as f64 / 1000.0
        ),
    }
    Ok(exit::OK)
}

pub async fn pitr(args: PitrArgs) -> Result<u8, Failure> {
    let (runbook, _, manifest) = open_backup(&args.config, &args.backup).await?;
    let config = postgres_config(&runbook, &args.database)?;
    let entry = restore::entry(&manifest, &args.database)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let kind = match args.target {
        TargetArg::Name => TargetKind::Name,
        TargetArg::Lsn => TargetKind::Lsn,
        TargetArg::Time => TargetKind::Time,
    };
    let target = pitr::target_for(entry, manifest.window.restore_point_timestamp_ms, kind)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let mut temp = None;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("stillpoint-pitr-")
                .tempdir()
                .map_err(|error| anyhow::anyhow!("creating a scratch directory: {error}"))?;
            // The server's user must be able to reach the data directory inside.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(|error| anyhow::anyhow!("opening the scratch directory: {error}"))?;
            let data_dir = dir.path().join("data");
            temp = Some(dir);
            data_dir
        }
    };
    let port = match args.port {
        Some(port) => port,
        None => free_port()?,
    };
    if args.output == OutputFormat::Text {
        crate::errln!(
            "recovering {} from {} to {target} of backup {} on 127.0.0.1:{port} …",
            args.database,
            args.base_backup.display(),
            manifest.backup_id
        );
    }
    let request = Recovery {
        config,
        entry,
        base_backup: BaseBackup::Dir(&args.base_backup),
        wal_archive: WalArchive::Dir(&args.wal_archive),
        data_dir: &data_dir,
        target,
        port,
        timeout: args.timeout,
        keep: args.keep,
        keep_unfinished: args.keep,
        run_as: args
            .run_as
            .clone()
            .or_else(|| pitr::running_as_root().then(|| "postgres".to_owned())),
        content_hash: true,
    };
    // SIGINT/SIGTERM stop the scratch server and remove its directory before we exit.
    let outcome =
        run_cancellable(|cancel| async move { pitr::recover(request, &cancel).await }).await;
    if args.keep {
        // The data directory was kept: so is the temporary directory around it.
        if let Some(temp) = temp.take() {
            let _ = temp.keep();
        }
    }
    let report = outcome.map_err(|error| {
        let code = match error {
            PitrError::Cancelled(_) => exit::ERROR,
            _ => exit::BACKUP_FAILED,
        };
        Failure::new(code, error)
    })?;
    match args.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "backup_id": manifest.backup_id,
            "database": args.database,
            "recovery": report,
        })),
        OutputFormat::Text => {
            crate::outln!(
                "recovered to {} in {:.1}s: replayed to LSN {}, last transaction at {}",
                report.target,
                report.recovery_ms as f64 / 1000.0,
                report.reached_lsn.as_deref().unwrap_or("?"),
                report.last_transaction_date_time.as_deref().unwrap_or("-")
            );
            if let Some(content) = &report.content {
                for (table, hash) in &content.tables {
                    crate::outln!("  {table}: {} rows, md5 {}", hash.rows, hash.md5);
                }
                crate::outln!("  content digest {}", content.digest);
            }
            if let Some(dir) = &report.data_dir {
                crate::outln!(
                    "  kept {} (stopped; start it with pg_ctl -D {} -o \"-c config_file={}\" \
                     start)",
                    dir.display(),
                    dir.display(),
                    dir.join("stillpoint-pitr.conf").display()
                );
            }
        }
    }
    Ok(exit::OK)
}

/// A port nothing listens on now (the OS picks it).
fn free_port() -> Result<u16, Failure> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| anyhow::anyhow!("finding a free port: {error}"))?;
    Ok(listener.local_addr().map_err(anyhow::Error::from)?.port())
}
