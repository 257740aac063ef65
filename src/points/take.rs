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
//! - MariaDB (`archive = true`): on a connection opened in prepare, `START TRANSACTION
//!   WITH CONSISTENT SNAPSHOT, READ ONLY`, then the binlog position of exactly that
//!   snapshot (`binlog_snapshot_file` / `_position`) and `@@gtid_binlog_pos`. The
//!   archive must cover the binlog from the start of the base's file
//!   ([`base::replay_from`]) to that position. As for PostgreSQL, `count_rows` counts
//!   rows per table in that snapshot after the release. The wait polls the archive's
//!   catalog in the storage, as for PostgreSQL: `stillpoint archive` is another
//!   process, so its archiver's in-memory status is not visible here.
//!
//! - SQLite (`archive = true`): on a read-only connection opened in prepare, a read
//!   transaction pinned inside the pause (for `count_rows`), and the log's last commit
//!   read from its WAL file ([`crate::archive::sqlite::mark`]): cycle, frame and
//!   checksum. Its position in the archive is known only once the archiver has pushed
//!   that frame, so the wait resolves it ([`crate::archive::sqlite::position_of`]).
//!
//! When every database has an exact marker the window is not held open to the
//! clock-skew floor (the mid-time restores nothing), only to `[pause] min_window`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use mysql_async::prelude::Queryable;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{
    BaseRef, FORMAT, PointDatabase, PointManifest, PointTimings, PointsError, new_id, point_path,
};
use crate::adapters::postgres::conninfo::ConnString;
use crate::adapters::{self, Adapter, AdapterConfig, CutMarker, Prepared};
use crate::archive::base::{self, BaseRecord};
use crate::archive::{Archive, Lsn, NotReached, Position};
use crate::backup::pause_plan;
use crate::coordinator::{self, PauseFailed, PauseReport, PausedCluster, SkewFloor};
use crate::grpc::pool::ConnectionPool;
use crate::pipeline::PipelineSettings;
use crate::runbook::{DatabaseConfig, Runbook};
use crate::storage::Storage;
use crate::time::{Zone, unix_ms};

/// How often the archives are looked at while a point waits for them.
const ARCHIVE_POLL: Duration = Duration::from_millis(200);
/// How many catalog reads in a row, [`ARCHIVE_POLL`] apart, must show the same gap
/// before a point fails on it. A listing of `file://` storage taken while an archiver
/// replaces pieces of a segment can miss both the old and the new chunk, a gap that
/// the next read does not show.
const GAP_READS: usize = 3;

const CANCELLED: &str = "stopped: the cluster was released at once and no point was written";

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
    /// Stopped from outside (a signal, a service shutting down): the cluster was
    /// released at once.
    #[error("{CANCELLED}")]
    Cancelled { window: Box<PauseReport> },
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
            | PointError::Commit { window, .. }
            | PointError::Cancelled { window } => Some(window),
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
    /// Connections to the nodes kept open between points (`stillpoint serve`).
    pub pool: Option<Arc<ConnectionPool>>,
}

impl Default for PointOptions {
    fn default() -> Self {
        PointOptions {
            wait: Duration::from_secs(30),
            count_rows: false,
            pool: None,
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
    /// An archived MariaDB database, connected in prepare (REPEATABLE READ set), with
    /// the newest base backup there was then.
    Mariadb {
        conn: Box<mysql_async::Conn>,
        bases: Vec<BaseRecord>,
        archive: Archive,
    },
    /// An archived SQLite database, a read-only connection opened in prepare, with the
    /// base backups (the archiver's snapshots) there were then.
    Sqlite {
        // Shared with the blocking thread each SQLite call runs on.
        conn: Arc<std::sync::Mutex<rusqlite::Connection>>,
        path: std::path::PathBuf,
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
            Member::Postgres { .. } | Member::Mariadb { .. } | Member::Sqlite { .. } => true,
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
    run_cancellable(
        runbook,
        storage,
        settings,
        options,
        &CancellationToken::new(),
    )
    .await
}

/// [`run`], stopped when `cancel` fires: a pause under way is rolled back, a paused
/// cluster released at once (its window closed and reported), and no point written.
pub async fn run_cancellable(
    runbook: &Runbook,
    storage: &Storage,
    settings: &PipelineSettings,
    options: &PointOptions,
    cancel: &CancellationToken,
) -> Result<PointManifest, PointError> {
    let started = Instant::now();
    let point_id = new_id();
    let restore_point = format!("stillpoint-point-{point_id}");
    settings
        .check()
        .map_err(|error| PointError::Setup(format!("the [pipeline] settings: {error}")))?;
    let mut plan = pause_plan(&runbook.pause)
        .await
        .map_err(|error| PointError::Setup(error.to_string()))?;
    if let Some(pool) = &options.pool {
        pool.keep_only(plan.tiers.iter().flatten());
        plan.pool = Some(pool.clone());
    }
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
    let mut paused = coordinator::pause_cancellable(&plan, cancel).await?;
    let window_started = tokio::time::Instant::now();
    let marker_started = Instant::now();
    let markers = tokio::select! {
        markers = mark_all(
            &mut members,
            &restore_point,
            &point_id,
            &mut paused,
            runbook.pause.cut_deadline,
        ) => markers,
        () = cancel.cancelled() => Err(CANCELLED.to_owned()),
    };
    let marker_ms = elapsed_ms(marker_started);
    if markers.is_ok() {
        let floor = if exact {
            Duration::ZERO
        } else {
            coordinator::required_window(paused.record().skew_bound_ms, Duration::ZERO)
        };
        let hold = floor.max(runbook.pause.min_window.unwrap_or_default());
        tokio::select! {
            () = paused.hold_until(window_started + hold) => {}
            () = cancel.cancelled() => {}
        }
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
    if cancel.is_cancelled() {
        return Err(PointError::Cancelled {
            window: Box::new(window),
        });
    }
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

    // After the release: row counts in the markers' snapshots, if asked. A server
    // that stops answering now (hung, stopped) would hold the point forever: each
    // gets `--wait` to close its snapshot.
    let mut finished = Vec::new();
    for ((member, marker), database) in members.into_iter().zip(markers).zip(&runbook.databases) {
        let finishing = finish(member, marker, options.count_rows);
        finished.push(match tokio::time::timeout(options.wait, finishing).await {
            Ok(done) => done,
            Err(_) => Err(format!(
                "database {}: the server did not answer within {:?} (--wait) while the \
                 marker's snapshot was closed{}; is it stopped, hung or overloaded?",
                database.name,
                options.wait,
                if options.count_rows {
                    " and its rows counted"
                } else {
                    ""
                }
            )),
        });
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
            let (bases, archive) = archived(database, storage, settings).await?;
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
            if database.changes && level != "logical" {
                return Err(format!(
                    "database {name} has changes = true but wal_level = {level}, which records \
                     no change stream; set wal_level = logical and restart the server"
                ));
            }
            Ok(Member::Postgres {
                client: Box::new(client),
                driver,
                bases,
                archive,
            })
        }
        AdapterConfig::Mariadb(config) => {
            let (bases, archive) = archived(database, storage, settings).await?;
            let opts = crate::adapters::mariadb::parse_url(&config.url)
                .map_err(|message| format!("the URL of {name}: {message}"))?;
            let mut conn = crate::adapters::mariadb::connect(&opts)
                .await
                .map_err(|message| format!("database {name}: {message}"))?;
            let log_bin: Option<String> = conn
                .query_first("SELECT @@log_bin")
                .await
                .map_err(|e| format!("database {name}: reading log_bin: {e}"))?;
            if !log_bin.is_some_and(|on| on == "1" || on.eq_ignore_ascii_case("on")) {
                return Err(format!(
                    "database {name} has its binlog off, so it has no position to mark; set \
                     log_bin (and binlog_format = ROW) in the server's configuration and \
                     restart it"
                ));
            }
            conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .await
                .map_err(|e| format!("database {name}: setting the isolation level: {e}"))?;
            Ok(Member::Mariadb {
                conn: Box::new(conn),
                bases,
                archive,
            })
        }
        AdapterConfig::Exec(_) => {
            let adapter = adapters::build(name, &database.adapter);
            let prepared = adapter.prepare().await.map_err(|error| error.to_string())?;
            Ok(Member::ViaAdapter {
                adapter,
                prepared,
                exact: false,
            })
        }
        AdapterConfig::Sqlite(config) => {
            let (bases, archive) = archived(database, storage, settings).await?;
            let path = config.path.clone();
            let conn =
                tokio::task::spawn_blocking(move || crate::adapters::sqlite::open_checked(&path))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|message| format!("database {name}: {message}"))?;
            Ok(Member::Sqlite {
                conn: Arc::new(std::sync::Mutex::new(conn)),
                path: config.path.clone(),
                bases,
                archive,
            })
        }
    }
}

/// The base backups and archive of an archived database: refused when it is not
/// archived or has no base backup yet.
async fn archived(
    database: &DatabaseConfig,
    storage: &Storage,
    settings: &PipelineSettings,
) -> Result<(Vec<BaseRecord>, Archive), String> {
    let name = &database.name;
    if !database.archive {
        return Err(format!(
            "database {name} is not archived, so no point can restore it: set `archive = \
             true` in its [[databases]] entry and run `stillpoint archive`"
        ));
    }
    let (bases, unreadable) = base::list(storage, name)
        .await
        .map_err(|error| format!("database {name}: {error}"))?;
    if let Some((path, problem)) = unreadable.first() {
        tracing::warn!(%path, %problem, "a base backup record cannot be read");
    }
    if bases.is_empty() {
        return Err(match database.adapter {
            AdapterConfig::Sqlite(_) => format!(
                "database {name} has no snapshot in the storage yet: run `stillpoint archive \
                 --config RUNBOOK` (or `stillpoint serve`), whose archiver takes the first one"
            ),
            _ => format!(
                "database {name} has no base backup in the storage: run `stillpoint \
                 base-backup --config RUNBOOK --database {name}` first"
            ),
        });
    }
    let archive =
        Archive::new(storage.clone(), settings.clone(), name).map_err(|error| error.to_string())?;
    Ok((bases, archive))
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
        Member::Mariadb { conn, .. } => {
            // WITH CONSISTENT SNAPSHOT takes the read view now, inside the pause, and
            // MariaDB reports the binlog position of exactly that view.
            conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                .await
                .map_err(|e| format!("starting the snapshot transaction: {e}"))?;
            let status: Vec<(String, String)> = conn
                .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
                .await
                .map_err(|e| format!("reading the binlog position: {e}"))?;
            let facts: Option<(Option<String>, Option<String>)> = conn
                .query_first("SELECT @@gtid_binlog_pos, DATABASE()")
                .await
                .map_err(|e| format!("reading the GTID position: {e}"))?;
            let (gtid, source) = facts.unwrap_or_default();
            mariadb_marker(
                &status,
                gtid.unwrap_or_default(),
                source.unwrap_or_default(),
            )
        }
        Member::Sqlite { conn, path, .. } => {
            // The snapshot (for row counts) and the log's last commit, both inside the
            // pause, when nothing commits: the same state.
            let (conn, path) = (conn.clone(), path.clone());
            let marked = tokio::task::spawn_blocking(move || {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let mut facts = crate::adapters::sqlite::pin_snapshot(&conn)?;
                facts.extend(crate::archive::sqlite::mark(&path)?);
                Ok::<_, String>(facts)
            })
            .await
            .map_err(|e| format!("the SQLite marker's task failed: {e}"))?;
            Ok(CutMarker {
                kind: "sqlite-wal-position".to_owned(),
                details: marked?,
            })
        }
        Member::ViaAdapter { prepared, .. } => prepared
            .cut(point_id)
            .await
            .map_err(|error| error.to_string()),
    }
}

/// The marker of a MariaDB snapshot: its binlog position (from `SHOW STATUS LIKE
/// 'binlog_snapshot_%'`), GTID state and database.
fn mariadb_marker(
    status: &[(String, String)],
    gtid: String,
    database: String,
) -> Result<CutMarker, String> {
    let value = |key: &str| {
        status
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.clone())
    };
    let (Some(file), Some(position)) = (
        value("binlog_snapshot_file").filter(|file| !file.is_empty()),
        value("binlog_snapshot_position").filter(|p| p.parse::<u64>().is_ok_and(|p| p > 0)),
    ) else {
        return Err(
            "the server reports no binlog position for the snapshot (binlog_snapshot_file \
             / _position): is log_bin on?"
                .to_owned(),
        );
    };
    Ok(CutMarker {
        kind: "mariadb-binlog-position".to_owned(),
        details: BTreeMap::from([
            ("binlog_file".to_owned(), file),
            ("binlog_position".to_owned(), position),
            ("gtid_binlog_pos".to_owned(), gtid),
            ("database".to_owned(), database),
        ]),
    })
}

/// Where the archive must reach for a point's marker to restore: the LSN of a
/// PostgreSQL one, the binlog position of a MariaDB one.
pub(crate) fn marker_target(marker: &CutMarker) -> Option<Position> {
    let details = &marker.details;
    if let Some(lsn) = details.get("lsn") {
        return lsn.parse::<Lsn>().ok().map(Position::Lsn);
    }
    let file = details.get("binlog_file")?;
    let offset = details.get("binlog_position")?.parse().ok()?;
    Some(Position::binlog(file, offset))
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
        Member::Mariadb {
            mut conn,
            bases,
            archive,
        } => {
            let counts = if count_rows {
                Some(mariadb_row_counts(&mut conn).await.map_err(|e| {
                    format!(
                        "database {}: counting rows in the marker's snapshot: {e}",
                        archive.database()
                    )
                })?)
            } else {
                None
            };
            let _ = conn.query_drop("COMMIT").await;
            let _ = conn.disconnect().await;
            Ok((marker, counts, Some(archive), bases))
        }
        Member::Sqlite {
            conn,
            bases,
            archive,
            ..
        } => {
            let counted = tokio::task::spawn_blocking(move || {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let counts = count_rows
                    .then(|| crate::adapters::sqlite::row_counts(&conn))
                    .transpose();
                let _ = conn.execute_batch("COMMIT");
                counts
            })
            .await
            .map_err(|e| e.to_string())?;
            let counts = counted.map_err(|e| {
                format!(
                    "database {}: counting rows in the marker's snapshot: {e}",
                    archive.database()
                )
            })?;
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

/// Rows per table of the database, in the connection's transaction (the marker's
/// snapshot): the tables `Adapter::row_counts` counts in a restore.
async fn mariadb_row_counts(
    conn: &mut mysql_async::Conn,
) -> Result<BTreeMap<String, u64>, mysql_async::Error> {
    let tables: Vec<String> = conn
        .query(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED') ORDER BY TABLE_NAME",
        )
        .await?;
    let mut counts = BTreeMap::new();
    for table in tables {
        let count: Option<u64> = conn
            .query_first(format!(
                "SELECT COUNT(*) FROM `{}`",
                table.replace('`', "``")
            ))
            .await?;
        counts.insert(table, count.unwrap_or(0));
    }
    Ok(counts)
}

/// Waits until the archive covers the log from the newest base backup that ends
/// before the marker up to the marker, or `deadline`. A gap, or an archive that
/// starts after the base, does not heal by waiting: it fails at once. A SQLite
/// marker's position is found in the archive first, once the archiver has pushed it.
async fn restorable(
    entry: &PointDatabase,
    archive: &Archive,
    bases: &[BaseRecord],
    deadline: tokio::time::Instant,
) -> Result<(Position, BaseRef), String> {
    let name = &entry.name;
    let sqlite = entry.adapter == "sqlite";
    let fixed_target = marker_target(&entry.marker);
    if fixed_target.is_none() && !sqlite {
        return Err(format!("database {name}: its marker has no log position"));
    }
    let mut bases = bases.to_vec();
    let mut gap_reads = 0;
    loop {
        if fixed_target.is_none() {
            // A snapshot taken since the prepare may be where the marker lies (a new
            // generation began). Listed before the catalog is read: the archiver
            // stores a snapshot after the chunks before it, so the catalog read next
            // holds every chunk a snapshot listed here followed.
            bases = base::list(archive.storage(), name)
                .await
                .map_err(|error| format!("database {name}: {error}"))?
                .0;
        }
        // With the marker's position known, the base is too, and only the chunks
        // from where its replay starts are read.
        let replay_from = fixed_target.as_ref().and_then(|target| {
            let base = bases.iter().rev().find(|base| base.end <= *target)?;
            Some(base::replay_from(&base.start))
        });
        let catalog = match &replay_from {
            Some(from) => archive.catalog_from(from).await,
            None => archive.catalog().await,
        }
        .map_err(|error| format!("database {name}: reading its archive: {error}"))?;
        let target = match &fixed_target {
            Some(target) => target.clone(),
            None => {
                let position =
                    crate::archive::sqlite::position_of(&entry.marker.details, &catalog, &bases);
                let never =
                    || crate::archive::sqlite::never_archived(&entry.marker.details, &bases);
                match position {
                    Some(target) => target,
                    None if let Some(why) = never() => {
                        return Err(format!(
                            "database {name} cannot be restored to its marker: {why}"
                        ));
                    }
                    None if tokio::time::Instant::now() >= deadline => {
                        return Err(format!(
                            "database {name}: the archive did not reach the marker in time: \
                             the log's frame {} is not archived (is `stillpoint archive` \
                             running? `--wait` gives it longer)",
                            entry
                                .marker
                                .details
                                .get("frame")
                                .map_or("?", String::as_str)
                        ));
                    }
                    None => {
                        tokio::time::sleep(ARCHIVE_POLL).await;
                        continue;
                    }
                }
            }
        };
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
        let covered = catalog.covers(&base::replay_from(&base.start), &target);
        gap_reads = match &covered {
            Err(NotReached::Gap(_)) => gap_reads + 1,
            _ => 0,
        };
        match covered {
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
            // An archive that starts after the base fails at once; a gap once it has
            // been read GAP_READS times (gap_reads is 0 for anything but a gap).
            Err(why @ (NotReached::Gap(_) | NotReached::StartsAfter { .. }))
                if gap_reads == 0 || gap_reads >= GAP_READS =>
            {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(file: &str, position: &str) -> Vec<(String, String)> {
        vec![
            ("Binlog_snapshot_file".to_owned(), file.to_owned()),
            ("Binlog_snapshot_position".to_owned(), position.to_owned()),
        ]
    }

    /// A MariaDB marker is the snapshot's binlog position (what the archive must
    /// reach); a server without a binlog has none, and is refused by name.
    #[test]
    fn a_mariadb_marker_is_its_snapshots_binlog_position() {
        let marker = mariadb_marker(
            &status("binlog.000003", "1234"),
            "0-1-42".into(),
            "app".into(),
        )
        .unwrap();
        assert_eq!(marker.details["gtid_binlog_pos"], "0-1-42");
        assert_eq!(
            marker_target(&marker),
            Some(Position::binlog("binlog.000003", 1234))
        );
        for (file, position) in [("", "1234"), ("binlog.000003", "0"), ("binlog.000003", "")] {
            let refused = mariadb_marker(&status(file, position), String::new(), String::new());
            assert!(refused.unwrap_err().contains("is log_bin on?"));
        }
        assert!(mariadb_marker(&[], String::new(), String::new()).is_err());
    }

    #[test]
    fn a_postgres_marker_targets_its_lsn() {
        let marker = CutMarker {
            kind: "postgres-restore-point".to_owned(),
            details: BTreeMap::from([("lsn".to_owned(), "0/16B3748".to_owned())]),
        };
        assert_eq!(
            marker_target(&marker),
            Some(Position::Lsn("0/16B3748".parse().unwrap()))
        );
        let exec = CutMarker {
            kind: "exec".to_owned(),
            details: BTreeMap::new(),
        };
        assert_eq!(marker_target(&exec), None);
    }

    /// A point waits out a gap that the next catalog reads no longer show (a listing
    /// taken while the archiver replaced chunks), and fails on one that stays, naming
    /// it.
    #[tokio::test]
    async fn a_gap_fails_a_point_only_once_it_stays() {
        use crate::archive::{ChunkContent, ChunkKind, NewChunk};
        use crate::pipeline::ArtifactInfo;
        const SEGMENT: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
        let archive = Archive::new(storage, PipelineSettings::default(), "app").unwrap();
        let segment = |number: u64| {
            let name = crate::archive::wal::Segment {
                timeline: 1,
                number,
            }
            .name(SEGMENT);
            NewChunk {
                name,
                kind: ChunkKind::PgWalSegment,
                timeline: Some(1),
                start: Some(Position::Lsn(Lsn(number * SEGMENT))),
                end: Some(Position::Lsn(Lsn((number + 1) * SEGMENT))),
                segment_size: Some(SEGMENT),
                details: BTreeMap::new(),
            }
        };
        let bytes = || ChunkContent::Bytes(vec![0u8; 16].into());
        for number in [2, 4] {
            archive.push(segment(number), bytes()).await.unwrap();
        }
        let entry = PointDatabase {
            name: "app".to_owned(),
            role: None,
            adapter: "postgres".to_owned(),
            marker: CutMarker {
                kind: "postgres-restore-point".to_owned(),
                details: BTreeMap::from([("lsn".to_owned(), format!("{}", Lsn(4 * SEGMENT + 8)))]),
            },
            target: None,
            base: None,
            row_counts: None,
        };
        let base = BaseRecord {
            format: 1,
            id: "base".to_owned(),
            database: "app".to_owned(),
            adapter: "postgres".to_owned(),
            kind: "pg_basebackup_tar".to_owned(),
            start: Position::Lsn(Lsn(2 * SEGMENT)),
            end: Position::Lsn(Lsn(2 * SEGMENT + 8)),
            timeline: Some(1),
            started_at_ms: 0,
            finished_at_ms: 0,
            artifact: ArtifactInfo {
                path: "bases/app/base/base.tar".to_owned(),
                size: 0,
                stored_size: 0,
                blake3: String::new(),
                compression: None,
                encryption: None,
            },
            details: BTreeMap::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);

        // Segment 3 arrives while the point reads the catalog: no failure.
        let healing = {
            let archive = archive.clone();
            async move {
                tokio::time::sleep(ARCHIVE_POLL / 2).await;
                archive.push(segment(3), bytes()).await.unwrap();
            }
        };
        let (waited, ()) = tokio::join!(
            restorable(&entry, &archive, std::slice::from_ref(&base), deadline),
            healing
        );
        waited.unwrap();

        // Gone again, for good: the point fails well before its deadline, naming it.
        let catalog = archive.catalog().await.unwrap();
        let third = catalog.chunk(&segment(3).name).unwrap().clone();
        archive.remove(&third).await.unwrap();
        let started = tokio::time::Instant::now();
        let failed = restorable(&entry, &archive, std::slice::from_ref(&base), deadline)
            .await
            .unwrap_err();
        assert!(failed.contains("has a gap"), "{failed}");
        assert!(failed.contains(&segment(2).name), "{failed}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
