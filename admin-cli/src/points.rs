//! `stillpoint point`, `base-backup` into the storage, `restore --point`, `drill
//! --point`, and the points part of `list`: restore points without copies
//! (docs/runbooks/points.md). Flags are checked here, then each is a library call in
//! `stillpoint::points`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use stillpoint::points::restore::{
    self as point_restore, Destination, DrillRequest, PointRestoreError, RestoreRequest,
};
use stillpoint::points::take::{self, PointError, PointOptions};
use stillpoint::points::{self, PointManifest, base};
use stillpoint::runbook::Runbook;
use stillpoint::storage::Storage;

use crate::args::{OutputFormat, duration};
use crate::backup::{config_path, human_bytes, load_runbook};
use crate::drill::DrillArgs;
use crate::exit::{self, Failure};
use crate::output::print_json;
use crate::remote::ServerArgs;
use crate::restore::{BaseBackupArgs, RestoreArgs};
use crate::signal::run_cancellable;

#[derive(Debug, Clone, Args)]
pub struct PointArgs {
    /// The runbook: the cluster to pause, its databases (PostgreSQL and MariaDB with
    /// `archive = true`, exec), the storage (not with --server).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "server"
    )]
    pub config: Option<PathBuf>,
    /// How long to wait after the release for every archive to reach its marker
    /// before giving up (no point is written then).
    #[arg(long, default_value = "30s", value_parser = duration, value_name = "DURATION")]
    pub wait: Duration,
    /// Also count rows per table in each PostgreSQL, MariaDB or SQLite marker's snapshot (a
    /// scan of every table, after the release); restores and drills of the point then
    /// check them.
    #[arg(long, conflicts_with = "server")]
    pub count_rows: bool,
    /// `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: print the queued job and exit without waiting for it.
    #[arg(long, requires = "server")]
    pub no_wait: bool,
}

fn open_storage(runbook: &Runbook) -> Result<Storage, Failure> {
    Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .map_err(|error| Failure::new(exit::USAGE, error))
}

fn usage(error: impl std::fmt::Display) -> Failure {
    Failure::new(exit::USAGE, anyhow!("{error}"))
}

/// `stillpoint point`.
pub async fn point(args: PointArgs) -> Result<u8, Failure> {
    if let Some(remote) = args.server.remote()? {
        return remote.trigger("point", args.no_wait, args.output).await;
    }
    let runbook = load_runbook(config_path(&args.config)?)?;
    let storage = open_storage(&runbook)?;
    let settings = stillpoint::backup::pipeline_settings(&runbook).map_err(usage)?;
    let options = PointOptions {
        wait: args.wait,
        count_rows: args.count_rows,
        pool: None,
    };
    // SIGINT/SIGTERM stop the point: a paused cluster is released at once (a second
    // signal gives up on that release; the lease covers it) and nothing is written,
    // since the manifest goes last.
    let result = run_cancellable(|cancel| {
        let (runbook, storage, settings, options) = (&runbook, &storage, &settings, &options);
        async move { take::run_cancellable(runbook, storage, settings, options, &cancel).await }
    })
    .await;
    let manifest = match result {
        Ok(manifest) => manifest,
        Err(error) => {
            if args.output == OutputFormat::Json
                && let Some(window) = error.window()
            {
                print_json(&serde_json::json!({
                    "ok": false,
                    "error": error.to_string(),
                    "window": window,
                }));
            }
            let code = match &error {
                PointError::Setup(_) => exit::USAGE,
                PointError::Pause(_) => exit::PAUSE_FAILED,
                PointError::Unpause { .. } => exit::UNPAUSE_FAILED,
                PointError::WindowInvalid { .. } => exit::WINDOW_INVALID,
                PointError::Cancelled { .. } => exit::ERROR,
                PointError::Marker { .. }
                | PointError::NotRestorable { .. }
                | PointError::Commit { .. } => exit::BACKUP_FAILED,
            };
            return Err(Failure::new(code, error));
        }
    };
    match args.output {
        OutputFormat::Json => print_json(&manifest),
        OutputFormat::Text => {
            crate::outln!(
                "point {} (mid-time {}), window {} ms, pause to commit {} ms",
                manifest.point_id,
                manifest
                    .window
                    .restore_point_date_time
                    .as_deref()
                    .unwrap_or("-"),
                manifest.window.window_ms.unwrap_or_default(),
                manifest.timings.pause_to_commit_ms
            );
            for database in &manifest.databases {
                let marker = database
                    .marker
                    .details
                    .get("restore_point")
                    .map(|point| {
                        format!(
                            "restore point {point} at {}",
                            database
                                .marker
                                .details
                                .get("lsn")
                                .map_or("?", String::as_str)
                        )
                    })
                    .or_else(|| {
                        let details = &database.marker.details;
                        Some(format!(
                            "binlog {}:{} (GTID {})",
                            details.get("binlog_file")?,
                            details.get("binlog_position")?,
                            details.get("gtid_binlog_pos").map_or("-", String::as_str)
                        ))
                    })
                    .unwrap_or_else(|| format!("{:?}", database.marker.details));
                crate::outln!(
                    "  {}: {marker}{}",
                    database.name,
                    database
                        .base
                        .as_ref()
                        .map(|base| format!(", from base backup {}", base.id))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(exit::OK)
}

/// `stillpoint base-backup` without `--to`: into the storage.
pub async fn base_backup(args: &BaseBackupArgs) -> Result<u8, Failure> {
    let runbook = load_runbook(&args.config)?;
    let storage = open_storage(&runbook)?;
    let settings = stillpoint::backup::pipeline_settings(&runbook).map_err(usage)?;
    let names: Vec<String> = match &args.database {
        Some(name) => vec![name.clone()],
        None => runbook.base_backup_databases(),
    };
    if names.is_empty() {
        return Err(usage(
            "the runbook has no PostgreSQL or MariaDB database with `archive = true` (a SQLite \
             one's archiver takes its own base backups); name one with --database, or give \
             --to DIR for a local base backup",
        ));
    }
    let mut records = Vec::new();
    for name in &names {
        let record = run_cancellable(|cancel| {
            let (runbook, storage, settings) = (&runbook, &storage, &settings);
            async move { base::take(runbook, name, storage, settings, &cancel).await }
        })
        .await
        .map_err(|error| {
            let code = match error {
                base::BaseError::Setup(_) => exit::USAGE,
                base::BaseError::Cancelled { .. } => exit::ERROR,
                base::BaseError::Failed { .. } => exit::BACKUP_FAILED,
            };
            Failure::new(code, error)
        })?;
        if args.output == OutputFormat::Text {
            crate::outln!(
                "base backup {} of {}: {} {} to {}, {} ({} stored)",
                record.id,
                record.database,
                if record.adapter == "mariadb" {
                    "binlog"
                } else {
                    "WAL"
                },
                record.start,
                record.end,
                human_bytes(record.artifact.size),
                human_bytes(record.artifact.stored_size)
            );
        }
        records.push(record);
    }
    if args.output == OutputFormat::Json {
        print_json(&records);
    }
    Ok(exit::OK)
}

/// The point `which` names. A manifest that cannot be read is named, never passed
/// over in silence: asked for by its id, it is the error (exit 6); newer than the
/// point `latest` resolves to, it is a warning (a restore of an older point than the
/// operator thinks loses data).
pub(crate) async fn resolve_point(
    storage: &Storage,
    which: &str,
) -> Result<PointManifest, Failure> {
    let (found, damaged) = points::list_points(storage).await.map_err(usage)?;
    let id_of = |path: &str| {
        path.strip_prefix("points/")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_owned()
    };
    if let Some((path, problem)) = damaged.iter().find(|(path, _)| id_of(path) == which) {
        return Err(Failure::new(
            exit::BACKUP_FAILED,
            anyhow::anyhow!(
                "point {which} cannot be restored: its manifest {path} cannot be read \
                 ({problem}); nothing was written. `stillpoint list` shows the readable points"
            ),
        ));
    }
    let point = points::resolve(&found, which).cloned().map_err(usage)?;
    if which == "latest" {
        for (path, problem) in damaged
            .iter()
            .filter(|(path, _)| id_of(path) > point.point_id)
        {
            crate::errln!(
                "warning: {path} is newer than point {} but cannot be read ({problem}); \
                 `latest` is the newest readable point",
                point.point_id
            );
        }
    }
    Ok(point)
}

fn run_as(flag: &Option<String>) -> Option<String> {
    flag.clone()
        .or_else(|| stillpoint::pitr::running_as_root().then(|| "postgres".to_owned()))
}

fn restore_code(error: &PointRestoreError) -> u8 {
    match error {
        PointRestoreError::Setup(_) => exit::USAGE,
        PointRestoreError::Recovery(stillpoint::pitr::PitrError::Cancelled(_)) => exit::ERROR,
        _ => exit::BACKUP_FAILED,
    }
}

/// `stillpoint restore --point`.
pub async fn restore_point(args: &RestoreArgs) -> Result<u8, Failure> {
    let which = args
        .point
        .as_deref()
        .expect("restore without a backup has --point");
    let runbook = load_runbook(&args.config)?;
    let storage = open_storage(&runbook)?;
    let settings = stillpoint::backup::pipeline_settings(&runbook).map_err(usage)?;
    let decryption = stillpoint::backup::decryption(&runbook).map_err(usage)?;
    let point = resolve_point(&storage, which).await?;
    let names: Vec<String> = match &args.database {
        Some(name) => vec![name.clone()],
        None => point.databases.iter().map(|db| db.name.clone()).collect(),
    };
    let adapters: Vec<(String, String)> = names
        .iter()
        .map(|name| {
            let adapter = point
                .database(name)
                .map_or("postgres", |db| db.adapter.as_str());
            (name.clone(), adapter.to_owned())
        })
        .collect();
    let targets = point_targets(&adapters, &args.to).map_err(usage)?;
    // Everything every database needs, checked before anything is written, and
    // whether its base can go where it is sent.
    for (name, target) in names.iter().zip(&targets) {
        let needed = point_restore::needs(&storage, &settings, &point, name)
            .await
            .map_err(|error| Failure::new(restore_code(&error), error))?;
        point_restore::check(&storage, &point, &needed, &mut Default::default())
            .await
            .map_err(|error| Failure::new(restore_code(&error), error))?;
        point_restore::check_destination(&point, &needed, &target.destination())
            .map_err(|error| Failure::new(restore_code(&error), error))?;
    }
    let mut reports = Vec::new();
    for (name, target) in names.iter().zip(&targets) {
        if args.output == OutputFormat::Text {
            crate::errln!(
                "restoring {name} of point {} (mid-time {}) into {} …",
                point.point_id,
                point
                    .window
                    .restore_point_date_time
                    .as_deref()
                    .unwrap_or("-"),
                match target {
                    PointTarget::DataDir(dir) | PointTarget::File(dir) => dir.display().to_string(),
                    PointTarget::Database(url) => stillpoint::storage::redact_url(url),
                }
            );
        }
        let port = free_port()?;
        let report = run_cancellable(|cancel| {
            let request = RestoreRequest {
                runbook: &runbook,
                storage: &storage,
                settings: &settings,
                decryption: &decryption,
                point: &point,
                database: name,
                destination: target.destination(),
                staging_in: None,
                port,
                timeout: args.timeout,
                keep: true,
                run_as: run_as(&args.run_as),
                // Nothing reads a content hash of a restore: the tables are not read
                // back (rows are counted when the point has counts).
                content_hash: false,
            };
            async move { point_restore::restore_one(request, &cancel).await }
        })
        .await
        .map_err(|error| Failure::new(restore_code(&error), error))?;
        if args.output == OutputFormat::Text {
            let rows = if report.row_counts_checked() {
                "match the point's counts"
            } else {
                "not compared (the point has no counts)"
            };
            match (&report.recovery, &report.binlog, target) {
                (Some(recovery), _, PointTarget::DataDir(data_dir)) => {
                    crate::outln!(
                        "restored {name} to {} from base backup {} + {} chunk(s) in {:.1}s \
                         (check {} ms, staging {} ms, replay {} ms of which the base \
                         extracted {} ms); rows per table {rows}",
                        recovery.target,
                        report.base_id,
                        report.chunks,
                        report.total_ms as f64 / 1000.0,
                        report.check_ms,
                        report.staging_ms,
                        recovery.recovery_ms,
                        recovery.base_ms,
                    );
                    crate::outln!(
                        "  {} (stopped; start it with pg_ctl -D {} -o \"-c config_file={}\" \
                         start)",
                        data_dir.display(),
                        data_dir.display(),
                        data_dir.join("stillpoint-pitr.conf").display()
                    );
                }
                (_, Some(binlog), _) => {
                    crate::outln!(
                        "restored {name} into {} from base backup {} + {} binlog chunk(s) to \
                         {} (GTID {}) in {:.1}s (check {} ms, load and replay {} ms); rows per \
                         table {rows}",
                        binlog.target,
                        report.base_id,
                        binlog.replay.chunks.len(),
                        binlog.replay.to,
                        binlog.replay.gtid_binlog_pos.as_deref().unwrap_or("?"),
                        report.total_ms as f64 / 1000.0,
                        report.check_ms,
                        binlog.replay_ms,
                    );
                    if let PointTarget::DataDir(data_dir) = target {
                        crate::outln!(
                            "  {} (stopped; a MariaDB data directory: start mariadbd \
                             --datadir={} on it, or copy it where the database should run)",
                            data_dir.display(),
                            data_dir.display()
                        );
                    }
                }
                (_, _, PointTarget::File(path)) => {
                    if let Some(file) = &report.file {
                        crate::outln!(
                            "restored {name} into {} from base backup {} + {} chunk(s) ({} \
                             frames) in {:.1}s (check {} ms, rebuild {} ms); rows per table \
                             {rows}",
                            path.display(),
                            report.base_id,
                            report.chunks,
                            file.frames,
                            report.total_ms as f64 / 1000.0,
                            report.check_ms,
                            file.replay_ms,
                        );
                    }
                }
                _ => crate::outln!("restored {name}"),
            }
        }
        reports.push(report);
    }
    if args.output == OutputFormat::Json {
        print_json(&serde_json::json!({
            "point_id": point.point_id,
            "restore_point_timestamp_ms": point.time_ms(),
            "databases": reports,
        }));
    }
    Ok(exit::OK)
}

/// Where `restore --point` puts one database.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PointTarget {
    DataDir(PathBuf),
    Database(String),
    File(PathBuf),
}

impl PointTarget {
    fn destination(&self) -> Destination<'_> {
        match self {
            PointTarget::DataDir(dir) => Destination::DataDir(dir),
            PointTarget::Database(url) => Destination::Database(url),
            PointTarget::File(path) => Destination::File(path),
        }
    }
}

/// Each database's target from the `--to` flags, for `(name, adapter)` in order:
/// `NAME=TARGET` names one database; a plain TARGET is for every database not named
/// (a directory: DIR itself for one PostgreSQL database, DIR/<name> for several; a
/// URL: the one MariaDB database). A MariaDB database needs a URL, a PostgreSQL one
/// a directory.
fn point_targets(
    databases: &[(String, String)],
    flags: &[String],
) -> Result<Vec<PointTarget>, String> {
    let mut named = std::collections::BTreeMap::new();
    let mut plain = Vec::new();
    for flag in flags {
        match flag.split_once('=') {
            Some((name, target)) if databases.iter().any(|(db, _)| db == name) => {
                if named.insert(name.to_owned(), target.to_owned()).is_some() {
                    return Err(format!("--to names {name} twice"));
                }
            }
            // NAME=… with a NAME the point lacks is a typo, not a directory named
            // `NAME=…` under the working directory.
            Some((name, _))
                if !flag.contains("://")
                    && !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                return Err(format!(
                    "--to {flag}: the point has no database {name:?}; it has: {}",
                    databases
                        .iter()
                        .map(|(db, _)| db.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            _ => plain.push(flag.clone()),
        }
    }
    let is_url = |target: &str| target.contains("://");
    let unnamed: Vec<&(String, String)> = databases
        .iter()
        .filter(|(name, _)| !named.contains_key(name))
        .collect();
    let plain_dir = plain.iter().find(|target| !is_url(target));
    let plain_url = plain.iter().find(|target| is_url(target));
    let urls = plain.iter().filter(|target| is_url(target)).count();
    if urls > 1 || plain.len() - urls > 1 {
        return Err(
            "give one plain --to DIR and one --to URL at most; name the others' targets with \
             --to NAME=TARGET"
                .to_owned(),
        );
    }
    let unnamed_postgres = unnamed
        .iter()
        .filter(|(_, adapter)| adapter == "postgres")
        .count();
    let unnamed_mariadb = unnamed
        .iter()
        .filter(|(_, adapter)| adapter == "mariadb")
        .count();
    if unnamed_mariadb > 1 && plain_url.is_some() {
        return Err(format!(
            "the point has {unnamed_mariadb} MariaDB databases: give each its own empty \
             database with --to NAME=mysql://…"
        ));
    }
    // A MariaDB database takes the plain URL when there is one, else the plain
    // directory (a mariadb-backup base becomes a data directory): DIR itself for the
    // one database that takes it, DIR/<name> for each of several.
    let in_dir = unnamed_postgres
        + if plain_url.is_none() {
            unnamed_mariadb
        } else {
            0
        };
    let mut targets = Vec::new();
    for (name, adapter) in databases {
        // A SQLite database becomes a new file: the one named, or <name>.sqlite in the
        // plain directory.
        if adapter == "sqlite" {
            let file = match (named.get(name), plain_dir) {
                // `sqlite:PATH` (as ledger-node and drill checks write it) is PATH.
                (Some(file), _) => PathBuf::from(
                    file.strip_prefix("sqlite://")
                        .or_else(|| file.strip_prefix("sqlite:"))
                        .unwrap_or(file),
                ),
                (None, Some(dir)) => Path::new(dir).join(format!("{name}.sqlite")),
                (None, None) => {
                    return Err(format!(
                        "database {name} is SQLite: a point restores it into a new file; give \
                         --to {name}=FILE or --to DIR (for DIR/{name}.sqlite)"
                    ));
                }
            };
            if is_url(&file.display().to_string()) {
                return Err(format!(
                    "database {name} is SQLite: a point restores it into a new file, not a URL"
                ));
            }
            targets.push(PointTarget::File(file));
            continue;
        }
        let target = if let Some(target) = named.get(name) {
            target.clone()
        } else if adapter == "mariadb" && plain_url.is_some() {
            plain_url.cloned().expect("checked")
        } else {
            let dir = plain_dir.ok_or_else(|| {
                if adapter == "mariadb" {
                    format!(
                        "database {name} is MariaDB: a point restores it into a new data \
                         directory (a mariadb-backup base) or a new, empty database (a dump \
                         base); give --to {name}=DIR or --to {name}=mysql://user@host:port/db"
                    )
                } else {
                    format!(
                        "database {name} is PostgreSQL: a point restores it into a new data \
                         directory; give --to DIR (or --to {name}=DIR)"
                    )
                }
            })?;
            if in_dir == 1 {
                dir.clone()
            } else {
                Path::new(dir).join(name).display().to_string()
            }
        };
        targets.push(match (adapter.as_str(), is_url(&target)) {
            ("mariadb", true) => PointTarget::Database(target),
            ("mariadb", false) => PointTarget::DataDir(PathBuf::from(target)),
            (_, false) => PointTarget::DataDir(PathBuf::from(target)),
            (_, true) => {
                return Err(format!(
                    "database {name} is PostgreSQL: a point restores it into a new data \
                     directory, not a URL"
                ));
            }
        });
    }
    Ok(targets)
}

/// `stillpoint drill --point`.
pub async fn drill_point(args: &DrillArgs, which: &str) -> Result<u8, Failure> {
    let runbook = load_runbook(config_path(&args.config)?)?;
    let storage = open_storage(&runbook)?;
    let settings = stillpoint::backup::pipeline_settings(&runbook).map_err(usage)?;
    let decryption = stillpoint::backup::decryption(&runbook).map_err(usage)?;
    let point = resolve_point(&storage, which).await?;
    if args.output == OutputFormat::Text {
        crate::errln!(
            "drill of point {}: replaying {} database(s) into scratch servers …",
            point.point_id,
            point.databases.len()
        );
    }
    let report = run_cancellable(|cancel| {
        let request = DrillRequest {
            runbook: &runbook,
            storage: &storage,
            settings: &settings,
            decryption: &decryption,
            point: &point,
            timeout: args.timeout,
            run_as: run_as(&None),
        };
        async move { point_restore::drill(request, &cancel).await }
    })
    .await
    .map_err(|error| Failure::new(restore_code(&error), error))?;
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => {
            crate::outln!(
                "point {}: {} (RTO {:.1}s, RPO {})",
                report.point_id,
                if report.ok { "PASSED" } else { "FAILED" },
                report.rto_ms as f64 / 1000.0,
                report
                    .rpo_ms
                    .map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0))
            );
            for check in &report.checks {
                crate::outln!(
                    "  {:<4} {}: {}",
                    if check.ok { "ok" } else { "FAIL" },
                    check.name,
                    check.detail
                );
            }
        }
    }
    Ok(if report.ok {
        exit::OK
    } else {
        exit::DRILL_FAILED
    })
}

/// The points part of `stillpoint list`: base backups, points, archive coverage.
pub async fn list_json(runbook: &Runbook, storage: &Storage) -> Result<serde_json::Value, Failure> {
    let settings = stillpoint::backup::pipeline_settings(runbook).map_err(usage)?;
    let mut names: Vec<String> = runbook
        .databases
        .iter()
        .filter(|db| db.archive)
        .map(|db| db.name.clone())
        .collect();
    names.extend(stillpoint::archive::archived_databases(storage).await?);
    names.extend(stillpoint::archive::base::databases(storage).await?);
    names.sort();
    names.dedup();
    let mut databases = Vec::new();
    for name in &names {
        let (bases, _) = stillpoint::archive::base::list(storage, name).await?;
        let archive = stillpoint::archive::Archive::new(storage.clone(), settings.clone(), name)
            .map_err(usage)?;
        let catalog = archive.catalog().await?;
        let coverage = catalog.coverage();
        databases.push(serde_json::json!({
            "database": name,
            "bases": bases.iter().map(|base| serde_json::json!({
                "id": base.id, "start": base.start.to_string(), "end": base.end.to_string(),
                "size": base.artifact.size, "stored_size": base.artifact.stored_size,
            })).collect::<Vec<_>>(),
            "archive": {
                "chunks": catalog.chunks.len(),
                "from": coverage.as_ref().map(|c| c.from.to_string()),
                "to": coverage.as_ref().map(|c| c.to.to_string()),
                "gaps": catalog.gaps(),
            },
        }));
    }
    let (found, damaged) = points::list_points(storage)
        .await
        .map_err(anyhow::Error::from)?;
    Ok(serde_json::json!({
        "databases": databases,
        "points": found.iter().map(|point| serde_json::json!({
            "point_id": point.point_id,
            "restore_point_date_time": point.window.restore_point_date_time,
            "window_ms": point.window.window_ms,
            "exact": point.exact,
            "databases": point.databases.iter().map(|db| serde_json::json!({
                "name": db.name,
                "base": db.base.as_ref().map(|base| &base.id),
                "target": db.target.as_ref().map(ToString::to_string),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "damaged_points": damaged.iter().map(|(path, problem)| serde_json::json!({"path": path, "error": problem})).collect::<Vec<_>>(),
    }))
}

/// The same, for people.
pub fn list_text(listing: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let empty = Vec::new();
    let databases = listing["databases"].as_array().unwrap_or(&empty);
    let found = listing["points"].as_array().unwrap_or(&empty);
    if databases.is_empty() && found.is_empty() {
        return text;
    }
    let _ = writeln!(text, "\nARCHIVES AND BASE BACKUPS");
    for database in databases {
        let archive = &database["archive"];
        let gaps = archive["gaps"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            text,
            "{}: archive {} chunks, {} to {}{}",
            database["database"].as_str().unwrap_or("?"),
            archive["chunks"],
            archive["from"].as_str().unwrap_or("-"),
            archive["to"].as_str().unwrap_or("-"),
            if gaps == 0 {
                ", no gaps".to_owned()
            } else {
                format!(", {gaps} GAP(S) (archive-list names them)")
            }
        );
        for base in database["bases"].as_array().unwrap_or(&empty) {
            let _ = writeln!(
                text,
                "  base {} from {} to {}, {} stored",
                base["id"].as_str().unwrap_or("?"),
                base["start"].as_str().unwrap_or("?"),
                base["end"].as_str().unwrap_or("?"),
                human_bytes(base["stored_size"].as_u64().unwrap_or(0))
            );
        }
    }
    let _ = writeln!(text, "\nPOINTS");
    if found.is_empty() {
        let _ = writeln!(text, "no points");
    }
    for point in found {
        let _ = writeln!(
            text,
            "{:<26} {:<30} window {:>5} ms  {}",
            point["point_id"].as_str().unwrap_or("?"),
            point["restore_point_date_time"].as_str().unwrap_or("-"),
            point["window_ms"],
            point["databases"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|db| format!(
                    "{} (base {})",
                    db["name"].as_str().unwrap_or("?"),
                    db["base"].as_str().unwrap_or("-")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    text
}

/// A port nothing listens on now (the OS picks it).
fn free_port() -> Result<u16, Failure> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| anyhow!("finding a free port: {error}"))?;
    Ok(listener.local_addr().map_err(anyhow::Error::from)?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dbs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(name, adapter)| (name.to_string(), adapter.to_string()))
            .collect()
    }

    fn flags(list: &[&str]) -> Vec<String> {
        list.iter().map(|flag| flag.to_string()).collect()
    }

    /// `--to NAME=TARGET` with a NAME the point does not have (a typo) is refused,
    /// naming the point's databases. Defect: it was taken for a plain directory and
    /// the restore written to `./ledgr=/srv/restore`, under the working directory.
    /// Control: a directory with `=` in a path component is still a directory.
    #[test]
    fn a_to_naming_no_database_is_refused() {
        let databases = dbs(&[("ledger", "postgres"), ("auditor", "mariadb")]);
        let error = point_targets(&databases, &flags(&["ledgr=/srv/restore"])).unwrap_err();
        assert!(error.contains("ledgr"), "{error}");
        assert!(error.contains("ledger, auditor"), "{error}");
        assert_eq!(
            point_targets(&dbs(&[("ledger", "postgres")]), &flags(&["/srv/a=b"])).unwrap(),
            [PointTarget::DataDir("/srv/a=b".into())]
        );
    }

    /// One plain --to serves what it fits (a directory PostgreSQL, a URL MariaDB,
    /// else a directory for MariaDB too: a mariadb-backup base is a data directory);
    /// NAME=TARGET names one; what fits no database is refused with the flag to give.
    /// Whether a MariaDB base fits its target is the restore's check (its kind).
    #[test]
    fn point_targets_follow_each_databases_adapter() {
        let url = "mysql://root@127.0.0.1:3306/auditor_new";
        assert_eq!(
            point_targets(&dbs(&[("auditor", "mariadb")]), &flags(&["/r"])).unwrap(),
            [PointTarget::DataDir("/r".into())]
        );
        assert_eq!(
            point_targets(
                &dbs(&[("ledger", "postgres"), ("auditor", "mariadb")]),
                &flags(&["/r"])
            )
            .unwrap(),
            [
                PointTarget::DataDir("/r/ledger".into()),
                PointTarget::DataDir("/r/auditor".into())
            ]
        );
        assert_eq!(
            point_targets(&dbs(&[("ledger", "postgres")]), &flags(&["/r"])).unwrap(),
            [PointTarget::DataDir("/r".into())]
        );
        assert_eq!(
            point_targets(
                &dbs(&[("a", "postgres"), ("b", "postgres")]),
                &flags(&["/r"])
            )
            .unwrap(),
            [
                PointTarget::DataDir("/r/a".into()),
                PointTarget::DataDir("/r/b".into())
            ]
        );
        assert_eq!(
            point_targets(
                &dbs(&[("ledger", "postgres"), ("auditor", "mariadb")]),
                &flags(&["/r", url])
            )
            .unwrap(),
            [
                PointTarget::DataDir("/r".into()),
                PointTarget::Database(url.into())
            ]
        );
        assert_eq!(
            point_targets(
                &dbs(&[("ledger", "postgres"), ("auditor", "mariadb")]),
                &flags(&["ledger=/x", &format!("auditor={url}")])
            )
            .unwrap(),
            [
                PointTarget::DataDir("/x".into()),
                PointTarget::Database(url.into())
            ]
        );
        let refused = |databases: &[(&str, &str)], given: &[&str], says: &str| {
            let error = point_targets(&dbs(databases), &flags(given)).unwrap_err();
            assert!(error.contains(says), "{error}");
        };
        refused(&[("auditor", "mariadb")], &[], "--to auditor=DIR");
        refused(&[("ledger", "postgres")], &[url], "give --to DIR");
        refused(
            &[("a", "mariadb"), ("b", "mariadb")],
            &[url],
            "give each its own",
        );
    }
}
