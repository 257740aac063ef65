//! The continuous part of `stillpoint demo`: after the backup and its drill, the same
//! cluster under the same load has both SQLite files archived (their logs read every
//! 100 ms, after a first snapshot of each), a point taken every [`EVERY`] for
//! [`FOR`], and two of those points, one picked at random and the newest, rebuilt into
//! scratch files and checked (`ledger-node check`, and the rows counted inside each
//! point's pause). What happened is kept as a timeline: each point's time, pause
//! window, wait for the archive and the archive's lag; each drill's restore time and
//! checks.
//!
//! The archivers run as tasks of [`ArchiverTasks`], which `demo` owns rather than this
//! module: when a signal drops the demo's future, `demo` still stops and awaits them
//! before it removes the scratch directory they write into.

use std::collections::BTreeMap;
use std::hash::BuildHasher as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use stillpoint::archive::ArchiveError;
use stillpoint::archive::archivers::{Archiver, ProgressWatch};
use stillpoint::archive::base;
use stillpoint::drill::CheckResult;
use stillpoint::points::PointManifest;
use stillpoint::points::restore::{self as point_restore, DrillRequest};
use stillpoint::points::take::{self, PointOptions};
use stillpoint::runbook::Runbook;
use stillpoint::storage::Storage;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backup::human_bytes;

/// How often a point is taken, and for how long: enough points to pick from, and the
/// whole demo still about a minute on 2 cores.
pub const EVERY: Duration = Duration::from_secs(2);
pub const FOR: Duration = Duration::from_secs(15);
/// How often SQLite's log is read: what a point waits for the archive, at most.
pub const CHUNK_INTERVAL: &str = "100ms";
/// The archivers' first snapshots (a point needs one) come within this, or the points
/// part gives up.
const FIRST_SNAPSHOTS: Duration = Duration::from_secs(30);
const SNAPSHOT_POLL: Duration = Duration::from_millis(100);
/// How long a point waits for every archive to reach its markers.
const POINT_WAIT: Duration = Duration::from_secs(20);
/// How long a drill may take to rebuild a point's files.
const DRILL_TIMEOUT: Duration = Duration::from_secs(60);

/// The archivers' tasks and the one token that stops them all.
#[derive(Default)]
pub struct ArchiverTasks {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl ArchiverTasks {
    fn spawn(&self, archiver: Archiver) -> JoinHandle<Result<(), ArchiveError>> {
        let cancel = self.cancel.clone();
        self.tracker
            .spawn(async move { archiver.run(&cancel).await })
    }

    /// Stops every archiver (each pushes what it has read first) and waits for all of
    /// them. Stopping twice is harmless.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The points part of the demo's report.
#[derive(Debug, Serialize)]
pub struct PointsReport {
    pub ok: bool,
    pub every_ms: u64,
    pub for_ms: u64,
    /// How long the archivers took to store their first snapshots.
    pub first_snapshots_ms: Option<u64>,
    /// Every point asked for, in order, taken or not.
    pub timeline: Vec<PointLine>,
    pub taken: usize,
    pub failed: usize,
    pub drills: Vec<DrillLine>,
    pub archivers: Vec<ArchiverLine>,
    /// What stopped the points part before any point was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One point asked for.
#[derive(Debug, Serialize)]
pub struct PointLine {
    /// When it was asked for, from the start of the points part.
    pub at_ms: u64,
    pub ok: bool,
    pub point_id: Option<String>,
    /// The point's time: its window's mid-time.
    pub time: Option<String>,
    /// The pause window, as the nodes proved it.
    pub window_ms: Option<i64>,
    /// From the release until every archive held the point's marker.
    pub wait_ms: Option<u64>,
    /// Each archiver's backlog when the point was asked for: log bytes committed but
    /// not archived yet.
    pub lag_bytes: BTreeMap<String, Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One point drilled: rebuilt into scratch files and checked.
#[derive(Debug, Serialize)]
pub struct DrillLine {
    /// `random` or `newest`.
    pub pick: &'static str,
    pub point_id: String,
    /// Every check passed and every database's rows were compared with the point's.
    pub ok: bool,
    /// Rebuilding every database of the point (in parallel).
    pub restore_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub row_counts_compared: bool,
    pub checks: Vec<CheckResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One archiver, once stopped.
#[derive(Debug, Serialize)]
pub struct ArchiverLine {
    pub database: String,
    pub chunks_stored: u64,
    pub restarts: u32,
    /// Its backlog at its last look.
    pub lag_bytes: Option<u64>,
    /// Why it stopped, when it stopped on its own (retrying could not help).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Archives `runbook`'s databases on `tasks`, takes points under the running load,
/// stops the archivers, and drills two of the points. Point and drill failures are
/// in the report; `Err` is a runbook the demo got wrong.
pub async fn run(
    runbook: &Runbook,
    tasks: &ArchiverTasks,
    say: &dyn Fn(&str),
) -> anyhow::Result<PointsReport> {
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)?;
    let settings = stillpoint::backup::pipeline_settings(runbook)?;
    let decryption = stillpoint::backup::decryption(runbook)?;
    let archivers = Archiver::for_runbook(runbook, None).context("the demo's archivers")?;

    say(&format!(
        "archiving both databases (SQLite's log read every {CHUNK_INTERVAL}), a snapshot of \
         each first …"
    ));
    let mut running = Vec::new();
    for archiver in archivers {
        let database = archiver.database().to_owned();
        let progress = archiver.watch();
        running.push((database, progress, tasks.spawn(archiver)));
    }
    let mut report = PointsReport {
        ok: false,
        every_ms: EVERY.as_millis() as u64,
        for_ms: FOR.as_millis() as u64,
        first_snapshots_ms: None,
        timeline: Vec::new(),
        taken: 0,
        failed: 0,
        drills: Vec::new(),
        archivers: Vec::new(),
        error: None,
    };
    let mut points = Vec::new();
    match first_snapshots(&storage, &running).await {
        Ok(waited) => {
            report.first_snapshots_ms = Some(waited.as_millis() as u64);
            say(&format!(
                "taking a point every {} s for {} s under the same load …",
                EVERY.as_secs(),
                FOR.as_secs()
            ));
            points = take_points(runbook, &storage, &settings, &mut running, &mut report).await;
        }
        Err(error) => report.error = Some(error),
    }

    // The archivers stop before the cluster does; every point taken is in the archive
    // already (a point is written only once the archive holds its markers).
    tasks.stop().await;
    for (database, mut progress, handle) in running {
        let last = progress.look();
        let error = match handle.await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(stillpoint::error_chain(&error)),
            Err(error) => Some(format!("the archiver's task ended: {error}")),
        };
        report.archivers.push(ArchiverLine {
            database,
            chunks_stored: last.chunks_stored,
            restarts: last.restarts,
            lag_bytes: last.lag_bytes,
            error,
        });
    }

    let picks = pick(&points);
    if !picks.is_empty() {
        let ids: Vec<String> = picks
            .iter()
            .map(|(which, point)| format!("{} ({which})", point.point_id))
            .collect();
        say(&format!(
            "drill: rebuilding point {} into scratch files and checking them …",
            ids.join(" and ")
        ));
    }
    for (which, point) in picks {
        let request = DrillRequest {
            runbook,
            storage: &storage,
            settings: &settings,
            decryption: &decryption,
            point,
            timeout: DRILL_TIMEOUT,
            run_as: None,
        };
        // An interrupted demo drops this future; nothing else cancels a drill.
        let drilled = point_restore::drill(request, &CancellationToken::new()).await;
        report.drills.push(match drilled {
            Ok(drill) => {
                let compared = drill.databases.iter().all(|db| db.row_counts_checked());
                DrillLine {
                    pick: which,
                    point_id: drill.point_id,
                    ok: drill.ok && compared,
                    restore_ms: Some(drill.rto_ms),
                    total_ms: Some(drill.total_ms),
                    row_counts_compared: compared,
                    checks: drill.checks,
                    error: None,
                }
            }
            Err(error) => DrillLine {
                pick: which,
                point_id: point.point_id.clone(),
                ok: false,
                restore_ms: None,
                total_ms: None,
                row_counts_compared: false,
                checks: Vec::new(),
                error: Some(stillpoint::error_chain(&error)),
            },
        });
    }

    report.ok = report.error.is_none()
        && report.failed == 0
        && !report.drills.is_empty()
        && report.drills.iter().all(|drill| drill.ok)
        && report
            .archivers
            .iter()
            .all(|archiver| archiver.error.is_none());
    Ok(report)
}

type Running = (String, ProgressWatch, JoinHandle<Result<(), ArchiveError>>);

/// Polls the storage until every archiver has stored a snapshot (a base backup, which
/// a point is built on), within [`FIRST_SNAPSHOTS`]; how long that took.
async fn first_snapshots(storage: &Storage, running: &[Running]) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let mut missing = Vec::new();
        for (database, _, _) in running {
            match base::list(storage, database).await {
                Ok((bases, _)) if !bases.is_empty() => {}
                Ok(_) => missing.push(database.clone()),
                Err(error) => missing.push(format!("{database} ({error})")),
            }
        }
        if missing.is_empty() {
            return Ok(started.elapsed());
        }
        if let Some((database, _, _)) = running.iter().find(|(_, _, task)| task.is_finished()) {
            return Err(format!(
                "the archiver of {database} stopped before its first snapshot (its error is \
                 under archivers)"
            ));
        }
        if started.elapsed() > FIRST_SNAPSHOTS {
            return Err(format!(
                "no snapshot of {} after {} s; no point was taken",
                missing.join(", "),
                FIRST_SNAPSHOTS.as_secs()
            ));
        }
        tokio::time::sleep(SNAPSHOT_POLL).await;
    }
}

/// A point every [`EVERY`] for [`FOR`] (the next one at once when a point took
/// longer); the points taken, each also a line of `report.timeline`.
async fn take_points(
    runbook: &Runbook,
    storage: &Storage,
    settings: &stillpoint::pipeline::PipelineSettings,
    running: &mut [Running],
    report: &mut PointsReport,
) -> Vec<PointManifest> {
    let options = PointOptions {
        wait: POINT_WAIT,
        count_rows: true,
        pool: None,
    };
    let started = Instant::now();
    let mut points = Vec::new();
    let mut next = started;
    while next.duration_since(started) < FOR {
        tokio::time::sleep_until(next.into()).await;
        let at_ms = started.elapsed().as_millis() as u64;
        let lag_bytes = running
            .iter_mut()
            .map(|(database, progress, _)| (database.clone(), progress.look().lag_bytes))
            .collect();
        let line = match take::run(runbook, storage, settings, &options).await {
            Ok(point) => {
                let line = PointLine {
                    at_ms,
                    ok: true,
                    point_id: Some(point.point_id.clone()),
                    time: point.window.restore_point_date_time.clone(),
                    window_ms: point.window.window_ms,
                    wait_ms: Some(point.timings.wait_ms),
                    lag_bytes,
                    error: None,
                };
                points.push(point);
                line
            }
            Err(error) => PointLine {
                at_ms,
                ok: false,
                point_id: None,
                time: None,
                window_ms: error.window().and_then(|window| window.window_ms),
                wait_ms: None,
                lag_bytes,
                error: Some(error.to_string()),
            },
        };
        report.timeline.push(line);
        next += EVERY;
    }
    report.taken = points.len();
    report.failed = report.timeline.len() - points.len();
    points
}

/// The points to drill: one picked at random among the older ones, and the newest.
fn pick(points: &[PointManifest]) -> Vec<(&'static str, &PointManifest)> {
    match points {
        [] => Vec::new(),
        [only] => vec![("newest", only)],
        [older @ .., newest] => {
            // std's hasher is keyed randomly per process: a random number without a
            // dependency for one pick.
            let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
            let chosen = &older[(random % older.len() as u64) as usize];
            vec![("random", chosen), ("newest", newest)]
        }
    }
}

/// The timeline for people: points, archive lag, drills.
pub fn print_text(report: &PointsReport) {
    crate::outln!(
        "points: one every {} s for {} s under load, both SQLite logs archived{}",
        report.every_ms / 1000,
        report.for_ms / 1000,
        report
            .first_snapshots_ms
            .map(|ms| format!(" (first snapshots stored in {:.1}s)", ms as f64 / 1000.0))
            .unwrap_or_default()
    );
    if let Some(error) = &report.error {
        crate::outln!("  FAIL {error}");
    }
    for line in &report.timeline {
        let at = format!("+{:.1}s", line.at_ms as f64 / 1000.0);
        match (&line.point_id, &line.error) {
            (Some(id), _) => crate::outln!(
                "  {at:>6}  point {id}  at {}  window {} ms  archive reached it {} ms after the \
                 release  lag {}",
                // The time of day of the RFC 3339 time: HH:MM:SS.mmm.
                line.time
                    .as_deref()
                    .and_then(|time| time.get(11..23))
                    .unwrap_or("?"),
                line.window_ms.unwrap_or_default(),
                line.wait_ms.unwrap_or_default(),
                lags(&line.lag_bytes)
            ),
            (None, error) => crate::outln!(
                "  {at:>6}  FAIL no point: {}",
                error.as_deref().unwrap_or("?")
            ),
        }
    }
    let archivers: Vec<String> = report
        .archivers
        .iter()
        .map(|archiver| match &archiver.error {
            None => format!("{} {} chunks", archiver.database, archiver.chunks_stored),
            Some(error) => format!("{} FAILED: {error}", archiver.database),
        })
        .collect();
    crate::outln!(
        "  {} points taken, {} failed; archived: {}",
        report.taken,
        report.failed,
        archivers.join(", ")
    );
    for drill in &report.drills {
        crate::outln!(
            "drill of point {} ({}): {}{}",
            drill.point_id,
            drill.pick,
            if drill.ok { "PASSED" } else { "FAILED" },
            drill
                .restore_ms
                .map(|ms| format!(", both files rebuilt in {:.2}s", ms as f64 / 1000.0))
                .unwrap_or_default()
        );
        if let Some(error) = &drill.error {
            crate::outln!("  FAIL {error}");
        }
        for check in &drill.checks {
            // A command check's detail is its command line and output; the last line
            // is its verdict (`consistent (711 transactions)`), the JSON has the rest.
            crate::outln!(
                "  {:<4} {:<20} {}",
                if check.ok { "ok" } else { "FAIL" },
                check.name,
                check.detail.lines().last().unwrap_or_default()
            );
        }
    }
}

/// `ledger 4.1 KiB, auditor 0 B`: each archiver's backlog.
fn lags(lags: &BTreeMap<String, Option<u64>>) -> String {
    lags.iter()
        .map(|(database, bytes)| {
            format!("{database} {}", bytes.map_or("?".to_owned(), human_bytes))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
