//! `stillpoint point`: a pause that copies nothing. Prepare every database (connect,
//! find its base backup; nothing paused yet) → pause → a marker in every database,
//! in parallel, under the cut deadline → unpause and prove the window → wait, with a
//! deadline, until every archive has reached its marker → commit the point manifest,
//! last, and only when the point is restorable. Anything short of that writes nothing.
//!
//! How each kind of database takes part is [`Member`], one match on its adapter:
//!
//! - PostgreSQL (`archive = true`): on a connection opened in prepare,
//!   `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, then
//!   `pg_create_restore_point('stillpoint-point-<id>')` and the WAL insert position
//!   after it. The archive must cover the log from the base backup's start to that
//!   position. With `count_rows` the transaction (whose snapshot was taken inside the
//!   pause, when nothing commits) stays open after the release to count rows per
//!   table: what a restore of the point must hold.
//! - exec: its cut command (via the exec adapter), a marker restored by time; a point
//!   with one keeps the clock-skew floor.
//! - MariaDB: the adapter's cut (consistent snapshot + GTID and binlog position) is the
//!   marker, but its binlog archive is not in this build yet, so prepare refuses it.
//!
//! When every database has an exact marker the window is not held open to the
//! clock-skew floor (the mid-time restores nothing), only to `[pause] min_window`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use tokio_postgres::Client;

use super::{
    BaseRecord, BaseRef, FORMAT, PointDatabase, PointManifest, PointTimings, PointsError,
    list_bases, new_id, point_path,
};
use crate::adapters::postgres::conninfo::ConnString;
use crate::adapters::{self, Adapter, AdapterConfig, CutMarker, Prepared};
use crate::archive::{Archive, Lsn, NotReached, Position};
use crate::backup::pause_plan;
use crate::coordinator::{self, PauseFailed, PauseReport, PausedCluster, SkewFloor};
use crate::pipeline::PipelineSettings;
use crate::runbook::{DatabaseConfig, Runbook};
use crate::storage::Storage;
use crate::time::{Zone, unix_ms};

/// How often the archives are looked at while a point waits for them.
const ARCHIVE_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum PointError {
    /// The runbook, the storage or a database is not ready; nothing was paused.
    #[error("{0}; nothing was paused")]
    Setup(String),
    #[error(transparent)]
    Pause(#[from] PauseFailed),
    #[error("a marker failed: {reason}; the cluster was released and no point was written")]
    Marker {
        reason: String,
        window: Box<PauseReport>,
    },
    #[error(
        "some nodes could not be released ({nodes}); they reopen when their lease expires; no \
         point was written"
    )]
    Unpause {
        nodes: String,
        window: Box<PauseReport>,
    },
    #[error("the window is not a valid restore point ({reasons}); no point was written")]
    WindowInvalid {
        reasons: String,
        window: Box<PauseReport>,
    },
    /// The markers are in, but some database cannot restore to its marker (no base,
    /// a gap, an archive that did not get there in time).
    #[error("the point is not restorable: {}; no point was written", .problems.join("; "))]
    NotRestorable {
        problems: Vec<String>,
        window: Box<PauseReport>,
    },
    #[error("writing the point manifest failed: {reason}; no point was written")]
    Commit {
        reason: String,
        window: Box<PauseReport>,
    },
}

impl PointError {
    /// The closed window, when the cluster was paused.
    pub fn window(&self) -> Option<&PauseReport> {
        match self {
            PointError::Marker { window, .. }
            | PointError::Unpause { window, .. }
            | PointError::WindowInvalid { window, .. }
            | PointError::NotRestorable { window, .. }
            | PointError::Commit { window, .. } => Some(window),
            PointError::Setup(_) | PointError::Pause(_) => None,
        }
    }
}

impl From<PointsError> for PointError {
    fn from(error: PointsError) -> Self {
        PointError::Setup(error.to_string())
    }
}

/// What `point` is asked to do beyond the runbook.
#[derive(Debug, Clone)]
pub struct PointOptions {
    /// How long to wait for every archive to reach its marker.
    pub wait: Duration,
    /// Count rows per table in each PostgreSQL marker's snapshot (a scan of every
    /// table, after the release): what a restore must hold.
    pub count_rows: bool,
}

impl Default for PointOptions {
    fn default() -> Self {
        PointOptions {
            wait: Duration::from_secs(30),
            count_rows: false,
        }
    }
}

/// How one database of the runbook takes part in a point.
enum Member {
    /// An archived PostgreSQL database, connected in prepare, with the newest base
    /// backup there was then.
    Postgres {
        client: Box<Client>,
        driver: tokio::task::JoinHandle<()>,
        bases: Vec<BaseRecord>,
        archive: Archive,
    },
    /// A marker taken by the adapter's own cut (exec: restored by time).
    ViaAdapter {
        adapter: Arc<dyn Adapter>,
        prepared: Box<dyn Prepared>,
        exact: bool,
    },
}

impl Member {
    fn exact(&self) -> bool {
        match self {
            Member::Postgres { .. } => true,
            Member::ViaAdapter { exact, .. } => *exact,
        }
    }
}

/// Takes a point of the runbook's cluster.
pub async fn run(
    runbook: &Runbook,
    storage: &Storage,
    settings: &PipelineSettings,
    options: &PointOptions,
) -> Result<PointManifest, PointError> {
    let started = Instant::now();
    let point_id = new_id();
    let restore_point = format!("stillpoint-point-{point_id}");
    settings
        .check()
        .map_err(|error| PointError::Setup(format!("the [pipeline] settings: {error}")))?;
    let plan = pause_plan(&runbook.pause)
        .await
        .map_err(|error| PointError::Setup(error.to_string()))?;
    // 2. Prepare every database before anything is paused.
    let prepared = join_all(
        runbook
            .databases
            .iter()
            .map(|database| prepare(database, storage, settings)),
    )
    .await;
    let mut members = Vec::new();
    let mut problems = Vec::new();
    for result in prepared {
        match result {
            Ok(member) => members.push(member),
            Err(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() {
        return Err(PointError::Setup(problems.join("; ")));
    }
    let exact = members.iter().all(Member::exact);
    let prepare_ms = elapsed_ms(started);

    // 3–4. Pause, then mark every database inside the pause.
    let paused_at = Instant::now();
    let mut paused = coordinator::pause(&plan).await?;
    let window_started = tokio::time::Instant::now();
    let marker_started = Instant::now();
    let markers = mark_all(
        &mut members,
        &restore_point,
        &point_id,
        &mut paused,
        runbook.pause.cut_deadline,
    )
    .await;
    let marker_ms = elapsed_ms(marker_started);
    if markers.is_ok() {
        let floor = if exact {
            Duration::ZERO
        } else {
            coordinator::required_window(paused.record().skew_bound_ms, Duration::ZERO)
        };
        let hold = floor.max(runbook.pause.min_window.unwrap_or_default());
        paused.hold_until(window_started + hold).await;
    }
    // 5. Unpause, and prove the window.
    let released = paused
        .release_with(if exact {
            SkewFloor::NotNeeded
        } else {
            SkewFloor::Required
        })
        .await;
    let pause_ms = elapsed_ms(paused_at);
    let window = PauseReport::closed(&released, Zone::UTC);
    let markers = match markers {
        Ok(markers) => markers,
        Err(reason) => {
            return Err(PointError::Marker {
                reason,
                window: Box::new(window),
            });
        }
    };
    if let Some(nodes) = released.still_paused_names() {
        return Err(PointError::Unpause {
            nodes,
            window: Box::new(window),
        });
    }
    if !window.window_valid {
        return Err(PointError::WindowInvalid {
            reasons: window.invalid_reasons.join("; "),
            window: Box::new(window),
        });
    }

    // After the release: row counts in the markers' snapshots, if asked.
    let mut finished = Vec::new();
    for (member, marker) in members.into_iter().zip(markers) {
        finished.push(finish(member, marker, options.count_rows).await);
    }

    // Wait until every archive has reached its marker, from the base it restores from.
    let wait_started = Instant::now();
    let deadline = tokio::time::Instant::now() + options.wait;
    let mut databases = Vec::new();
    let mut problems = Vec::new();
    for (database, finished) in runbook.databases.iter().zip(finished) {
        let (marker, row_counts, archive, bases) = match finished {
            Ok(done) => done,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        let mut entry = PointDatabase {
            name: database.name.clone(),
            role: database.role.clone(),
            adapter: adapter_kind(&database.adapter).to_owned(),
            marker,
            target: None,
            base: None,
            row_counts,
        };
        if let Some(archive) = archive {
            match restorable(&entry, &archive, &bases, deadline).await {
                Ok((target, base)) => {
                    entry.target = Some(target);
                    entry.base = Some(base);
                }
                Err(problem) => problems.push(problem),
            }
        }
        databases.push(entry);
    }
    let wait_ms = elapsed_ms(wait_started);
    if !problems.is_empty() {
        return Err(PointError::NotRestorable {
            problems,
            window: Box::new(window),
        });
    }

    // 7. Commit, last.
    let mut manifest = PointManifest {
        format: FORMAT,
        point_id: point_id.clone(),
        cluster: runbook.cluster.clone(),
        window,
        exact,
        databases,
        timings: PointTimings {
            prepare_ms,
            pause_ms,
            marker_ms,
            wait_ms,
            pause_to_commit_ms: 0,
        },
        committed_at_ms: 0,
    };
    manifest.committed_at_ms = unix_ms(SystemTime::now());
    manifest.timings.pause_to_commit_ms = elapsed_ms(paused_at);
    let json = serde_json::to_vec_pretty(&manifest).expect("a point manifest serializes");
    if let Err(error) = storage
        .put_atomic(&point_path(&point_id), json.into())
        .await
    {
        return Err(PointError::Commit {
            reason: error.to_string(),
            window: Box::new(manifest.window),
        });
    }
    Ok(manifest)
}

async fn prepare(
    database: &DatabaseConfig,
    storage: &Storage,
    settings: &PipelineSettings,
) -> Result<Member, String> {
    let name = &database.name;
    match &database.adapter {
        AdapterConfig::Postgres(config) => {
            if !database.archive {
                return Err(format!(
                    "database {name} is not archived, so no point can restore it: set \
                     `archive = true` in its [[databases]] entry and run `stillpoint archive`"
                ));
            }
            let (bases, unreadable) = list_bases(storage, name)
                .await
                .map_err(|error| format!("database {name}: {error}"))?;
            if let Some((path, problem)) = unreadable.first() {
                tracing::warn!(%path, %problem, "a base backup record cannot be read");
            }
            if bases.is_empty() {
                return Err(format!(
                    "database {name} has no base backup in the storage: run `stillpoint \
                     base-backup --config RUNBOOK --database {name}` first"
                ));
            }
            let archive = Archive::new(storage.clone(), settings.clone(), name)
                .map_err(|error| error.to_string())?;
            let source = ConnString::parse(&config.url)
                .map_err(|message| format!("the URL of {name}: {message}"))?;
            let (client, connection) = source
                .connect()
                .await
                .map_err(|message| format!("database {name}: {message}"))?;
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            let level: String = client
                .query_one("SHOW wal_level", &[])
                .await
                .map_err(|e| format!("database {name}: reading wal_level: {e}"))?
                .get(0);
            if level == "minimal" {
                return Err(format!(
                    "database {name} has wal_level = minimal, which makes no restore points; \
                     set wal_level = replica and restart the server"
                ));
            }
            Ok(Member::Postgres {
                client: Box::new(client),
                driver,
                bases,
                archive,
            })
        }
        AdapterConfig::Mariadb(_) => Err(format!(
            "database {name} is MariaDB: points need its binlog archive, which this build \
             does not have yet (not yet supported); take backups of it with `stillpoint \
             backup` meanwhile"
        )),
        AdapterConfig::Exec(_) => {
            let adapter = adapters::build(name, &database.adapter);
            let prepared = adapter.prepare().await.map_err(|error| error.to_string())?;
            Ok(Member::ViaAdapter {
                adapter,
                prepared,
                exact: false,
            })
        }
        AdapterConfig::Sqlite(_) => Err(format!(
            "database {name} is SQLite, which has no log to archive: points cannot restore \
             it (use `stillpoint backup`)"
        )),
    }
}

/// Every database's marker, in parallel, under the cut deadline, the lease renewed
/// meanwhile.
async fn mark_all(
    members: &mut [Member],
    restore_point: &str,
    point_id: &str,
    paused: &mut PausedCluster,
    deadline: Duration,
) -> Result<Vec<CutMarker>, String> {
    let marks = join_all(
        members
            .iter_mut()
            .map(|member| mark(member, restore_point, point_id)),
    );
    let renewing = async {
        loop {
            tokio::time::sleep_until(paused.renewal_due()).await;
            if let Err(reason) = paused.renew().await {
                tracing::warn!(%reason, "lease renewal failed during the markers");
            }
        }
    };
    let results = tokio::select! {
        results = tokio::time::timeout(deadline, marks) => results.map_err(|_| format!(
            "the markers did not finish within the cut deadline of {}ms",
            deadline.as_millis()
        ))?,
        never = renewing => never,
    };
    let mut markers = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(marker) => markers.push(marker),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(markers)
    } else {
        Err(errors.join("; "))
    }
}

async fn mark(
    member: &mut Member,
    restore_point: &str,
    point_id: &str,
) -> Result<CutMarker, String> {
    match member {
        Member::Postgres { client, .. } => {
            let fail = |what: &str, e: tokio_postgres::Error| {
                format!("{what}: {}", crate::adapters::postgres::error_text(&e))
            };
            // The snapshot is taken by the first statement, inside the pause: with
            // nothing committing, it holds exactly what the restore point does.
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| fail("BEGIN", e))?;
            let point_lsn: String = client
                .query_one(
                    "SELECT pg_create_restore_point($1)::text",
                    &[&restore_point],
                )
                .await
                .map_err(|e| {
                    fail(
                        "pg_create_restore_point (run as a superuser, or GRANT EXECUTE ON \
                         FUNCTION pg_create_restore_point(text) to the runbook's user)",
                        e,
                    )
                })?
                .get(0);
            let lsn: String = client
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .map_err(|e| fail("reading the WAL insert position", e))?
                .get(0);
            Ok(CutMarker {
                kind: "postgres-restore-point".to_owned(),
                details: BTreeMap::from([
                    ("restore_point".to_owned(), restore_point.to_owned()),
                    ("restore_point_lsn".to_owned(), point_lsn),
                    ("lsn".to_owned(), lsn),
                ]),
            })
        }
        Member::ViaAdapter { prepared, .. } => prepared
            .cut(point_id)
            .await
            .map_err(|error| error.to_string()),
    }
}

type Finished = (
    CutMarker,
    Option<BTreeMap<String, u64>>,
    Option<Archive>,
    Vec<BaseRecord>,
);

/// After the release: row counts in the marker's snapshot if asked, then the marker's
/// transaction ends and the connection closes.
async fn finish(member: Member, marker: CutMarker, count_rows: bool) -> Result<Finished, String> {
    match member {
        Member::Postgres {
            client,
            driver,
            bases,
            archive,
        } => {
            let counts = if count_rows {
                Some(
                    crate::adapters::postgres::row_counts(&client)
                        .await
                        .map_err(|e| {
                            format!(
                                "database {}: counting rows in the marker's snapshot: {}",
                                archive.database(),
                                crate::adapters::postgres::error_text(&e)
                            )
                        })?,
                )
            } else {
                None
            };
            let _ = client.batch_execute("COMMIT").await;
            drop(client);
            let _ = driver.await;
            Ok((marker, counts, Some(archive), bases))
        }
        Member::ViaAdapter {
            adapter, prepared, ..
        } => {
            // The cut's marker is all a point takes; nothing is copied.
            drop(prepared);
            let _ = adapter;
            Ok((marker, None, None, Vec::new()))
        }
    }
}

/// Waits until the archive covers the log from the newest base backup that ends
/// before the marker up to the marker, or `deadline`. A gap, or an archive that
/// starts after the base, does not heal by waiting: it fails at once.
async fn restorable(
    entry: &PointDatabase,
    archive: &Archive,
    bases: &[BaseRecord],
    deadline: tokio::time::Instant,
) -> Result<(Position, BaseRef), String> {
    let name = &entry.name;
    let target: Lsn = entry
        .marker
        .details
        .get("lsn")
        .and_then(|lsn| lsn.parse().ok())
        .ok_or_else(|| format!("database {name}: its marker has no LSN"))?;
    let target = Position::Lsn(target);
    let base = bases
        .iter()
        .rev()
        .find(|base| base.end <= target)
        .ok_or_else(|| {
            format!(
                "database {name} has no base backup that ends before its marker at {target} \
                 (take one with `stillpoint base-backup`)"
            )
        })?;
    loop {
        let catalog = archive
            .catalog()
            .await
            .map_err(|error| format!("database {name}: reading its archive: {error}"))?;
        match catalog.covers(&base.start, &target) {
            Ok(()) => {
                return Ok((
                    target,
                    BaseRef {
                        id: base.id.clone(),
                        start: base.start.clone(),
                        end: base.end.clone(),
                    },
                ));
            }
            Err(why @ (NotReached::Gap(_) | NotReached::StartsAfter { .. })) => {
                return Err(format!(
                    "database {name} cannot replay from base backup {} to its marker: {why}",
                    base.id
                ));
            }
            Err(why) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "database {name}: the archive did not reach the marker in time: {why} (is \
                     `stillpoint archive` running? `--wait` gives it longer)"
                ));
            }
            Err(_) => tokio::time::sleep(ARCHIVE_POLL).await,
        }
    }
}

pub(crate) fn adapter_kind(config: &AdapterConfig) -> &'static str {
    match config {
        AdapterConfig::Sqlite(_) => "sqlite",
        AdapterConfig::Postgres(_) => "postgres",
        AdapterConfig::Mariadb(_) => "mariadb",
        AdapterConfig::Exec(_) => "exec",
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}
