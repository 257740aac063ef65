//! `stillpoint clone`: every database of a point restored into the new databases a
//! second runbook names (another cluster), all of them or none, each carrying a note
//! of where it came from.
//!
//! How each database gets there (the same restores as `restore --point` and drills):
//! - PostgreSQL: recovered to the point's restore point in a scratch server, then
//!   copied with the adapter's own dump and restore into a new database on the target
//!   server. The restore leaves out owners and grants (`--no-owner --no-acl`): the
//!   new cluster need not have the source's roles.
//! - MariaDB from a dump base: loaded and replayed to the marker straight into a new
//!   database on the target server.
//! - MariaDB from a `mariadb_backup` base: restored and replayed in a scratch server,
//!   then copied by the adapter's dump into the new database.
//! - SQLite: rebuilt into the target runbook's file, which must not exist.
//!
//! All or none: what every database needs is found and checked, and every target
//! created empty, before anything is restored; a failure, or a cancel, drops every
//! target this run created. A target database that exists already is refused (a
//! clone makes new ones), so nothing an operator had is ever dropped.
//!
//! The note: a table [`NOTE_TABLE`] of (`field`, `value`) rows in each clone, written
//! after its rows were checked against the point's counts: the point's id and time,
//! the source cluster and database, the base backup, when it was cloned.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::PointManifest;
use super::restore::{
    Checked, Destination, PointRestoreError, RestoreRequest, check, check_destination, elapsed_ms,
    free_port, needs, postgres_config, restore_binlog, restore_held, restore_mariadb_server,
    restore_sqlite, row_count_difference, staging_dir,
};
use crate::adapters::{self, Adapter, AdapterConfig, MariadbConfig};
use crate::archive::mariadb_backup;
use crate::pipeline::{Decryption, PipelineSettings};
use crate::pitr::PitrError;
use crate::runbook::Runbook;
use crate::storage::{Storage, redact_url};

/// The table in every clone that says where it came from.
pub const NOTE_TABLE: &str = "stillpoint_clone";

/// Everything [`clone`] needs.
#[derive(Debug, Clone)]
pub struct CloneRequest<'a> {
    /// The runbook of the cluster the point is of: how each database restores (its
    /// tools, the user and database a recovered server is read as).
    pub source: &'a Runbook,
    pub storage: &'a Storage,
    pub settings: &'a PipelineSettings,
    pub decryption: &'a Decryption,
    pub point: &'a PointManifest,
    /// The clone's runbook: a database of the same name and kind for each of the
    /// point's, whose URL (or SQLite path) is the new database.
    pub target: &'a Runbook,
    /// Where scratch servers and staging go; default: the system's temporary directory.
    pub scratch_in: Option<&'a Path>,
    pub timeout: Duration,
    pub run_as: Option<String>,
}

/// One database of a clone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClonedDatabase {
    pub name: String,
    pub adapter: String,
    /// The new database's URL (without its password) or file.
    pub target: String,
    pub base_id: String,
    pub chunks: usize,
    /// Whether its rows per table were compared with (and equal) the point's counts.
    pub row_counts_match_point: bool,
    /// Restoring to the point (into a scratch server, or straight into the target).
    pub restore_ms: u64,
    /// Copying a scratch server's database into the target (0 when restored there).
    pub copy_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CloneReport {
    pub point_id: String,
    pub cluster: String,
    pub restore_point_timestamp_ms: Option<i64>,
    pub databases: Vec<ClonedDatabase>,
    pub total_ms: u64,
}

/// How one database of the point reaches its target.
enum Route {
    /// Recovered in a scratch PostgreSQL server, then copied.
    Postgres,
    /// Loaded and replayed straight into the target database.
    MariadbDump,
    /// Restored in a scratch MariaDB server, then copied.
    MariadbServer,
    /// Rebuilt into the target file.
    Sqlite,
}

/// A database of the point, where it goes and how.
struct Plan {
    name: String,
    adapter: String,
    route: Route,
    /// The target database's URL, or the SQLite file.
    target: String,
    /// Builds and drops the target database (not for SQLite).
    target_adapter: Arc<dyn Adapter>,
    base_id: String,
    chunks: usize,
}

/// What this run created, to drop on failure.
enum Created {
    Database {
        adapter: Arc<dyn Adapter>,
        url: String,
    },
    File(PathBuf),
}

/// Clones every database of `request.point` into the target runbook's databases:
/// all of them, or (on `Err`) none, every target this run created dropped again.
pub async fn clone(
    request: CloneRequest<'_>,
    cancel: &CancellationToken,
) -> Result<CloneReport, PointRestoreError> {
    let started = Instant::now();
    let plans = plan(&request).await?;
    let mut created = Vec::new();
    let result = run(&request, &plans, &mut created, cancel).await;
    match result {
        Ok(databases) => Ok(CloneReport {
            point_id: request.point.point_id.clone(),
            cluster: request.point.cluster.clone(),
            restore_point_timestamp_ms: request.point.time_ms(),
            databases,
            total_ms: elapsed_ms(started),
        }),
        Err(error) => {
            let undone = undo(created).await;
            Err(with_undo(error, &undone))
        }
    }
}

/// Each database's target and route, and everything it needs found and checked:
/// nothing is written here.
async fn plan(request: &CloneRequest<'_>) -> Result<Vec<Plan>, PointRestoreError> {
    let point = request.point;
    let mut plans = Vec::new();
    for database in &point.databases {
        let name = &database.name;
        let config = request
            .target
            .databases
            .iter()
            .find(|db| &db.name == name)
            .map(|db| &db.adapter)
            .ok_or_else(|| {
                PointRestoreError::Setup(format!(
                    "the clone's runbook has no database {name:?}: a clone restores every \
                     database of point {} ({}); add a [[databases]] entry named {name} with \
                     the new database's URL. Nothing was written",
                    point.point_id,
                    point
                        .databases
                        .iter()
                        .map(|db| db.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let needed = needs(request.storage, request.settings, point, name).await?;
        let route = match (database.adapter.as_str(), config) {
            ("postgres", AdapterConfig::Postgres(_)) => Route::Postgres,
            ("mariadb", AdapterConfig::Mariadb(_)) if needed.base.kind == mariadb_backup::KIND => {
                Route::MariadbServer
            }
            ("mariadb", AdapterConfig::Mariadb(_)) => Route::MariadbDump,
            ("sqlite", AdapterConfig::Sqlite(_)) => Route::Sqlite,
            (adapter, _) => {
                return Err(PointRestoreError::Setup(format!(
                    "database {name} of point {} is {adapter}, but the clone's runbook \
                     configures {name} with another adapter{}. Nothing was written",
                    point.point_id,
                    if adapter == "exec" {
                        " (and an exec database is restored by its own commands: it cannot \
                         be cloned)"
                    } else {
                        ""
                    }
                )));
            }
        };
        // The source runbook says how the point's databases restore.
        if matches!(route, Route::Postgres) {
            postgres_config(request.source, name)?;
        }
        check(request.storage, point, &needed, &mut Checked::new()).await?;
        let (target, target_adapter) = target_of(name, config)?;
        if let Route::Sqlite = route {
            check_destination(point, &needed, &Destination::File(Path::new(&target)))?;
            if Path::new(&target).exists() {
                return Err(PointRestoreError::Setup(format!(
                    "{target} exists: a clone makes new databases; remove it or name another \
                     file for {name} in the clone's runbook. Nothing was written"
                )));
            }
        }
        plans.push(Plan {
            name: name.clone(),
            adapter: database.adapter.clone(),
            route,
            target,
            target_adapter,
            base_id: needed.base.id.clone(),
            chunks: needed.chunks.len(),
        });
    }
    let mut targets: Vec<&str> = plans.iter().map(|plan| plan.target.as_str()).collect();
    targets.sort_unstable();
    if let Some(pair) = targets.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(PointRestoreError::Setup(format!(
            "the clone's runbook gives two databases the same target {}: each needs its own. \
             Nothing was written",
            redact_url(pair[0])
        )));
    }
    Ok(plans)
}

/// The target of database `name` from the clone's runbook, and an adapter that
/// creates and drops it on its server (reached through the server's own maintenance
/// database: the target does not exist yet).
fn target_of(
    name: &str,
    config: &AdapterConfig,
) -> Result<(String, Arc<dyn Adapter>), PointRestoreError> {
    let on_server = |url: &str, maintenance: &str| {
        let mut parsed = url::Url::parse(url).map_err(|_| {
            PointRestoreError::Setup(format!(
                "the clone's runbook gives {name} the URL {}, which cannot be read as a URL",
                redact_url(url)
            ))
        })?;
        let database = parsed.path().trim_start_matches('/').to_owned();
        if database.is_empty() || database.contains('/') {
            return Err(PointRestoreError::Setup(format!(
                "the clone's runbook gives {name} the URL {}, which names no database: end it \
                 with /<new database>",
                redact_url(url)
            )));
        }
        parsed.set_path(&format!("/{maintenance}"));
        Ok(parsed.to_string())
    };
    let mut config = config.clone();
    let target = match &mut config {
        AdapterConfig::Postgres(postgres) => {
            postgres.drill_server_url = Some(on_server(&postgres.url, "postgres")?);
            postgres.url.clone()
        }
        AdapterConfig::Mariadb(mariadb) => {
            mariadb.drill_server_url = Some(on_server(&mariadb.url, "mysql")?);
            mariadb.url.clone()
        }
        AdapterConfig::Sqlite(sqlite) => sqlite.path.display().to_string(),
        AdapterConfig::Exec(_) => unreachable!("exec databases are refused in plan"),
    };
    Ok((target, adapters::build(name, &config)))
}

/// The name of the database a URL ends in (checked by [`target_of`]).
fn database_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|parsed| {
            percent_encoding::percent_decode_str(parsed.path().trim_start_matches('/'))
                .decode_utf8()
                .ok()
                .map(|name| name.into_owned())
        })
        .unwrap_or_default()
}

/// Creates every target database, then restores each database into its target,
/// checks its rows and writes its note. Every target created is pushed to `created`
/// as soon as it exists.
async fn run(
    request: &CloneRequest<'_>,
    plans: &[Plan],
    created: &mut Vec<Created>,
    cancel: &CancellationToken,
) -> Result<Vec<ClonedDatabase>, PointRestoreError> {
    for plan in plans {
        if let Route::Sqlite = plan.route {
            continue;
        }
        let marker = &request
            .point
            .database(&plan.name)
            .expect("the plan is of the point's databases")
            .marker;
        let database = database_of(&plan.target);
        let creating = plan
            .target_adapter
            .create_scratch(&database, Path::new(""), marker);
        let url = until_cancelled(creating, &plan.name, cancel)
            .await?
            .map_err(|error| {
                PointRestoreError::Setup(format!(
                    "creating the clone's database for {} ({}): {error}; a clone makes new \
                     databases: drop that one or name another in the clone's runbook",
                    plan.name,
                    redact_url(&plan.target)
                ))
            })?;
        created.push(Created::Database {
            adapter: plan.target_adapter.clone(),
            url,
        });
    }
    let scratch = staging_dir(request.scratch_in)?;
    let mut databases = Vec::new();
    for plan in plans {
        if cancel.is_cancelled() {
            return Err(cancelled(&plan.name));
        }
        let restoring = Instant::now();
        let restore = |destination| RestoreRequest {
            runbook: request.source,
            storage: request.storage,
            settings: request.settings,
            decryption: request.decryption,
            point: request.point,
            database: &plan.name,
            destination,
            staging_in: Some(scratch.path()),
            port: 0,
            timeout: request.timeout,
            keep: false,
            run_as: request.run_as.clone(),
            content_hash: false,
        };
        let data_dir = scratch.path().join(format!("{}-data", plan.name));
        let mut copy_ms = 0;
        match plan.route {
            Route::Postgres => {
                let port = free_port().map_err(PointRestoreError::Setup)?;
                let (held, _) = restore_held(
                    RestoreRequest {
                        port,
                        ..restore(Destination::DataDir(&data_dir))
                    },
                    cancel,
                )
                .await?;
                let copying = Instant::now();
                let source = postgres_config(request.source, &plan.name)?;
                let scratch_adapter = adapters::build(
                    &plan.name,
                    &AdapterConfig::Postgres(adapters::PostgresConfig {
                        url: held.url().to_owned(),
                        require_archiving: false,
                        bin_dir: source.bin_dir.clone(),
                        drill_server_url: None,
                    }),
                );
                let copied = copy_into(&*scratch_adapter, plan, cancel).await;
                held.stop().await;
                copied?;
                copy_ms = elapsed_ms(copying);
            }
            Route::MariadbDump => {
                restore_binlog(
                    restore(Destination::Database(&plan.target)),
                    &plan.target,
                    cancel,
                )
                .await?;
            }
            Route::MariadbServer => {
                let (held, _) = restore_mariadb_server(
                    restore(Destination::DataDir(&data_dir)),
                    &data_dir,
                    cancel,
                )
                .await?;
                let copying = Instant::now();
                let bin_dir = match request
                    .source
                    .databases
                    .iter()
                    .find(|db| db.name == plan.name)
                    .map(|db| &db.adapter)
                {
                    Some(AdapterConfig::Mariadb(config)) => config.bin_dir.clone(),
                    _ => None,
                };
                let scratch_adapter = adapters::build(
                    &plan.name,
                    &AdapterConfig::Mariadb(MariadbConfig {
                        url: held.url.clone(),
                        bin_dir,
                        drill_server_url: None,
                        base_method: Default::default(),
                    }),
                );
                let copied = copy_into(&*scratch_adapter, plan, cancel).await;
                if let Err(why) = held.stop(false).await {
                    tracing::warn!(%why, "a clone's scratch MariaDB server did not stop cleanly");
                }
                copied?;
                copy_ms = elapsed_ms(copying);
            }
            Route::Sqlite => {
                let path = PathBuf::from(&plan.target);
                let restored =
                    restore_sqlite(restore(Destination::File(&path)), &path, cancel).await;
                // It exists only once whole (renamed into place).
                if path.exists() {
                    created.push(Created::File(path.clone()));
                }
                restored?;
            }
        }
        let restore_ms = elapsed_ms(restoring) - copy_ms;
        let row_counts_match_point =
            until_cancelled(check_rows(request.point, plan), &plan.name, cancel).await??;
        until_cancelled(write_note(request, plan), &plan.name, cancel).await??;
        databases.push(ClonedDatabase {
            name: plan.name.clone(),
            adapter: plan.adapter.clone(),
            target: redact_url(&plan.target),
            base_id: plan.base_id.clone(),
            chunks: plan.chunks,
            row_counts_match_point,
            restore_ms,
            copy_ms,
        });
    }
    Ok(databases)
}

/// Copies the database a scratch server holds (quiet: nothing else writes to it)
/// into the plan's target with the adapter's own cut, copy and restore.
async fn copy_into(
    scratch: &dyn Adapter,
    plan: &Plan,
    cancel: &CancellationToken,
) -> Result<(), PointRestoreError> {
    let failed = |error: adapters::AdapterError| {
        PointRestoreError::Replay(format!(
            "copying {} from its scratch server into {}: {error}",
            plan.name,
            redact_url(&plan.target)
        ))
    };
    let work = async {
        let mut prepared = scratch.prepare().await.map_err(failed)?;
        prepared.cut("clone").await.map_err(failed)?;
        let copy = prepared.copy().await.map_err(failed)?;
        plan.target_adapter
            .restore(copy.stream, &plan.target)
            .await
            .map_err(failed)?;
        copy.finished.await.map_err(failed)?;
        Ok(())
    };
    tokio::select! {
        done = work => done,
        () = cancel.cancelled() => Err(cancelled(&plan.name)),
    }
}

/// Whether the clone's rows per table equal the point's counts (false when the
/// point has none); a difference is an error naming the tables.
async fn check_rows(point: &PointManifest, plan: &Plan) -> Result<bool, PointRestoreError> {
    let Some(expected) = point
        .database(&plan.name)
        .and_then(|db| db.row_counts.as_ref())
    else {
        return Ok(false);
    };
    let found = plan
        .target_adapter
        .row_counts(&plan.target)
        .await
        .map_err(|error| PointRestoreError::Replay(error.to_string()))?;
    match row_count_difference(expected, &found) {
        None => Ok(true),
        Some(difference) => Err(PointRestoreError::Replay(format!(
            "the clone of {} ({}) does not hold point {}'s rows: {difference}",
            plan.name,
            redact_url(&plan.target),
            point.point_id
        ))),
    }
}

/// The note of where this clone came from, as a table in the target.
async fn write_note(request: &CloneRequest<'_>, plan: &Plan) -> Result<(), PointRestoreError> {
    let point = request.point;
    let fields: Vec<(String, String)> = [
        ("point_id", point.point_id.clone()),
        (
            "point_time",
            point
                .window
                .restore_point_date_time
                .clone()
                .unwrap_or_default(),
        ),
        ("source_cluster", point.cluster.clone()),
        ("source_database", plan.name.clone()),
        ("base_id", plan.base_id.clone()),
        ("storage", request.storage.url().to_owned()),
        ("cloned_at", chrono::Utc::now().to_rfc3339()),
    ]
    .into_iter()
    .map(|(field, value)| (field.to_owned(), value))
    .collect();
    plan.target_adapter
        .write_note(&plan.target, NOTE_TABLE, &fields)
        .await
        .map_err(|error| PointRestoreError::Replay(error.to_string()))
}

/// `work`, unless the clone is cancelled first: a target server that stopped
/// answering must not hold up the undo.
async fn until_cancelled<T>(
    work: impl std::future::Future<Output = T>,
    name: &str,
    cancel: &CancellationToken,
) -> Result<T, PointRestoreError> {
    tokio::select! {
        done = work => Ok(done),
        () = cancel.cancelled() => Err(cancelled(name)),
    }
}

fn cancelled(name: &str) -> PointRestoreError {
    PointRestoreError::Recovery(PitrError::Cancelled(format!(
        "stopped while cloning {name}"
    )))
}

/// Drops every target this run created; what could not be dropped, by name.
async fn undo(created: Vec<Created>) -> Vec<(String, Result<(), String>)> {
    let mut undone = Vec::new();
    for target in created.into_iter().rev() {
        match target {
            Created::Database { adapter, url } => {
                let dropped = adapter.drop_scratch(&url).await.map_err(|e| e.to_string());
                undone.push((redact_url(&url), dropped));
            }
            Created::File(path) => {
                let removed = std::fs::remove_file(&path).map_err(|e| e.to_string());
                undone.push((path.display().to_string(), removed));
            }
        }
    }
    undone
}

/// `error`, saying what the undo dropped and (loudly) what it could not.
fn with_undo(
    error: PointRestoreError,
    undone: &[(String, Result<(), String>)],
) -> PointRestoreError {
    if undone.is_empty() {
        return error;
    }
    let dropped: Vec<&str> = undone
        .iter()
        .filter(|(_, result)| result.is_ok())
        .map(|(target, _)| target.as_str())
        .collect();
    let left: Vec<String> = undone
        .iter()
        .filter_map(|(target, result)| result.as_ref().err().map(|why| format!("{target} ({why})")))
        .collect();
    let mut undo = String::from("; the clone was undone");
    if !dropped.is_empty() {
        undo.push_str(&format!(", dropped {}", dropped.join(", ")));
    }
    if !left.is_empty() {
        undo.push_str(&format!(
            "; COULD NOT DROP {}: drop it by hand",
            left.join(", ")
        ));
    }
    match error {
        PointRestoreError::Recovery(PitrError::Cancelled(why)) => {
            PointRestoreError::Recovery(PitrError::Cancelled(format!("{why}{undo}")))
        }
        PointRestoreError::Setup(why) => PointRestoreError::Setup(format!("{why}{undo}")),
        other => PointRestoreError::Replay(format!("{other}{undo}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::PostgresConfig;

    fn postgres(url: &str) -> AdapterConfig {
        AdapterConfig::Postgres(PostgresConfig {
            url: url.to_owned(),
            require_archiving: false,
            bin_dir: None,
            drill_server_url: None,
        })
    }

    #[test]
    fn a_target_url_must_name_the_new_database() {
        let (target, _) =
            target_of("ledger", &postgres("postgres://u@db:5432/ledger_copy")).unwrap();
        assert_eq!(target, "postgres://u@db:5432/ledger_copy");
        assert_eq!(database_of(&target), "ledger_copy");
        for url in ["postgres://u@db:5432", "postgres://u@db:5432/", "not a url"] {
            let Err(PointRestoreError::Setup(message)) = target_of("ledger", &postgres(url)) else {
                panic!("{url} was taken as a target");
            };
            assert!(message.contains("ledger"), "{message}");
        }
    }

    #[test]
    fn an_undone_clone_names_what_it_dropped_and_what_it_could_not() {
        let error = PointRestoreError::Replay("database auditor: restore failed".to_owned());
        let undone = vec![
            ("mysql://***@m/auditor_c".to_owned(), Ok(())),
            (
                "postgres://***@p/ledger_c".to_owned(),
                Err("connection refused".to_owned()),
            ),
        ];
        let message = with_undo(error, &undone).to_string();
        assert_eq!(
            message,
            "database auditor: restore failed; the clone was undone, dropped \
             mysql://***@m/auditor_c; COULD NOT DROP postgres://***@p/ledger_c (connection \
             refused): drop it by hand"
        );
        let setup = with_undo(PointRestoreError::Setup("exists".to_owned()), &[]);
        assert_eq!(setup.to_string(), "exists");
    }
}
