//! Restore drills: every database of one backup is restored into a scratch target
//! (a file in a scratch directory, a new database on a server), in parallel, and then
//! checked:
//!
//! - built in: each artifact's checksum, each restore, and the rows per table against
//!   the counts the adapter took at the cut;
//! - from the runbook's `[drill]`: one query with an expected result, or two queries
//!   (usually on two databases) that must return the same rows in any order.
//!
//! The report carries the restore time per database and in total (RTO), the age of
//! the restore point (RPO at drill time) and every check's result. Scratch targets are
//! removed afterwards unless the caller keeps them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::adapters::{self, Adapter, Rows, Value};
use crate::backup::{Progress, ProgressSink};
use crate::manifest::{DatabaseEntry, Manifest};
use crate::pipeline::Decryption;
use crate::restore::{self, RestoreError, RestoreReport};
use crate::runbook::{CheckKind, CheckQuery, DrillCheck, Expected, ExpectedValue, Runbook};
use crate::storage::Storage;
use crate::time::unix_ms;

/// How many differing rows a failed check names.
const NAMED_ROWS: usize = 5;

/// How every scratch database and file of a drill begins, so that leftovers of a
/// drill that was killed can be found (`stillpoint drill --cleanup`).
pub const SCRATCH_MARKER: &str = "stillpoint_drill_";

/// How a drill's scratch directory (for SQLite files and exec targets) begins, in
/// the runbook's `scratch_dir` or the system's temporary directory.
const SCRATCH_DIR_PREFIX: &str = "stillpoint-drill-";

/// A file in a drill's scratch directory that the drill holds locked (`flock`) while
/// it runs: a clean-up leaves a directory whose lock it cannot take.
const SCRATCH_DIR_LOCK: &str = ".stillpoint-drill.lock";

#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillReport {
    pub backup_id: String,
    pub cluster: String,
    /// Every check passed.
    pub ok: bool,
    pub restore_point_timestamp_ms: Option<i64>,
    pub restore_point_date_time: Option<String>,
    /// Whether the backup's pause window was a valid restore point, as the `window`
    /// check re-derived it from the manifest's recorded facts.
    pub window_valid: bool,
    /// How old the restore point was when the drill ran: the data a restore now loses.
    pub rpo_ms: Option<i64>,
    /// Wall time to restore every database (they restore in parallel).
    pub rto_ms: u64,
    pub total_ms: u64,
    pub databases: Vec<DatabaseDrill>,
    pub checks: Vec<CheckResult>,
    /// Scratch targets left in place (`keep`), or that could not be removed.
    pub left_behind: Vec<String>,
    /// Scratch targets of earlier drills found before this one began (a drill that was
    /// killed leaves them): `stillpoint drill --cleanup` removes them.
    pub leftovers: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DatabaseDrill {
    pub name: String,
    pub adapter: String,
    /// Where it was restored, without passwords.
    pub target: Option<String>,
    pub restore: Option<RestoreReport>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    /// `checksum:<db>`, `restore:<db>`, `row_counts:<db>`, `window`, or the runbook's name.
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("{0}")]
    Setup(String),
    /// Stopped by a signal (or the caller's token). Scratch targets were removed,
    /// except those named.
    #[error("{}", interrupted(.left_behind))]
    Interrupted { left_behind: Vec<String> },
}

fn interrupted(left_behind: &[String]) -> String {
    if left_behind.is_empty() {
        "the drill was interrupted; its scratch targets were removed".to_owned()
    } else {
        format!(
            "the drill was interrupted; these scratch targets could not be removed: {} (run \
             `stillpoint drill --cleanup`)",
            left_behind.join(", ")
        )
    }
}

/// Restores every database of `manifest` into scratch targets and checks them.
/// Check failures are in the report (`ok == false`); `Err` means the drill could not
/// start at all, or was interrupted through `cancel`. Either way, every scratch target
/// it made is removed before it returns, unless `keep` says otherwise. `progress`
/// hears the phases and each database's bytes loaded, for progress bars or logs.
pub async fn run(
    runbook: &Runbook,
    storage: &Storage,
    manifest: &Manifest,
    decryption: &Decryption,
    keep: bool,
    cancel: CancellationToken,
    progress: ProgressSink,
) -> Result<DrillReport, DrillError> {
    let started = Instant::now();
    let mut planned = Vec::new();
    for entry in &manifest.databases {
        let config = runbook
            .databases
            .iter()
            .find(|database| database.name == entry.name)
            .ok_or_else(|| {
                DrillError::Setup(format!(
                    "backup {} has database {:?}, which the runbook does not configure; \
                     add it to [[databases]] so the drill knows how to restore it",
                    manifest.backup_id, entry.name
                ))
            })?;
        planned.push((entry, adapters::build(&entry.name, &config.adapter)));
    }
    // Before this drill makes its own: what earlier (killed) drills left behind.
    let leftovers = find_leftovers(runbook)
        .await
        .into_iter()
        .map(|leftover| leftover.shown)
        .collect();
    let scratch = scratch_dir(runbook)?;
    let scratch_hold = hold_directory(scratch.path());
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..6];

    // Every scratch target first, so that whatever comes next (a failed restore, a
    // signal) knows exactly what to remove. Creating one is quick and not interrupted.
    let created =
        join_all(planned.iter().map(|(entry, adapter)| {
            create_target(entry, adapter.as_ref(), scratch.path(), run_id)
        }))
        .await;
    let mut targets: BTreeMap<&str, (Arc<dyn Adapter>, String)> = BTreeMap::new();
    for ((entry, adapter), created) in planned.iter().zip(&created) {
        if let Ok(Some(target)) = created {
            targets.insert(&entry.name, (adapter.clone(), target.clone()));
        }
    }

    let work =
        async {
            let restoring = Instant::now();
            progress(Progress::Phase("restore"));
            let restored = join_all(planned.iter().zip(created).map(
                |((entry, adapter), created)| {
                    restore_one(
                        storage,
                        manifest,
                        entry,
                        adapter.clone(),
                        decryption,
                        created,
                        progress.clone(),
                    )
                },
            ))
            .await;
            progress(Progress::Phase("checks"));
            let rto_ms = restoring.elapsed().as_millis() as u64;

            let mut checks = vec![window_check(manifest)];
            let mut databases = Vec::new();
            for ((entry, adapter), outcome) in planned.iter().zip(restored) {
                checks.extend(outcome.checks);
                if let (Some(target), true) = (&outcome.target, outcome.restored) {
                    checks.push(row_count_check(entry, adapter.as_ref(), target).await);
                }
                databases.push(DatabaseDrill {
                    name: entry.name.clone(),
                    adapter: entry.adapter.clone(),
                    target: outcome.target.as_deref().map(crate::storage::redact_url),
                    restore: outcome.report,
                    error: outcome.error,
                });
            }
            let restored: Vec<&str> = databases
                .iter()
                .filter(|database| database.restore.is_some())
                .map(|database| database.name.as_str())
                .collect();
            for check in &runbook.drill.checks {
                checks.push(run_check(check, &targets, &restored).await);
            }
            (rto_ms, databases, checks)
        };
    // A signal drops the work where it stands (restores' child processes are killed
    // with it) and goes straight to the clean-up below.
    let finished = tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        finished = work => Some(finished),
    };

    let mut left_behind = Vec::new();
    for (adapter, target) in targets.values() {
        let removed = if keep {
            Err("kept".to_owned())
        } else {
            adapter
                .drop_scratch(target)
                .await
                .map_err(|error| error.to_string())
        };
        if let Err(why) = removed {
            if !keep {
                tracing::warn!(target = %crate::storage::redact_url(target), %why, "could not remove a scratch target");
            }
            left_behind.push(crate::storage::redact_url(target));
        }
    }
    if keep {
        left_behind.push(scratch.keep().display().to_string());
    } else if let Err(error) = scratch.close() {
        tracing::warn!(%error, "could not remove the drill's scratch directory");
    }
    drop(scratch_hold);
    let Some((rto_ms, databases, checks)) = finished else {
        return Err(DrillError::Interrupted { left_behind });
    };

    let rpo_ms = manifest
        .window
        .restore_point_timestamp_ms
        .map(|point| unix_ms(SystemTime::now()) - point);
    Ok(DrillReport {
        backup_id: manifest.backup_id.clone(),
        cluster: manifest.cluster.clone(),
        ok: checks.iter().all(|check| check.ok),
        restore_point_timestamp_ms: manifest.window.restore_point_timestamp_ms,
        restore_point_date_time: manifest.window.restore_point_date_time.clone(),
        window_valid: checks
            .iter()
            .any(|check| check.name == "window" && check.ok),
        rpo_ms,
        rto_ms,
        total_ms: started.elapsed().as_millis() as u64,
        databases,
        checks,
        left_behind,
        leftovers,
    })
}

/// A scratch target left by an earlier drill: a scratch database on a server, or a
/// scratch directory of files.
pub struct Leftover {
    /// Without passwords.
    pub shown: String,
    remove: LeftoverKind,
    /// Why it is not a leftover after all: a running drill holds it.
    in_use: Option<String>,
}

enum LeftoverKind {
    Target(Arc<dyn Adapter>, String),
    Directory(std::path::PathBuf),
}

/// What `stillpoint drill --cleanup` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CleanupReport {
    /// Scratch targets of earlier drills, now removed.
    pub removed: Vec<String>,
    /// Scratch targets that are still there, and why.
    pub failed: Vec<String>,
    /// Scratch targets a running drill holds, left alone, and which drill.
    pub in_use: Vec<String>,
    /// Servers (or directories) that could not be searched, and why.
    pub not_searched: Vec<String>,
}

/// Finds the scratch targets earlier drills of this runbook's databases left behind
/// (killed before they could remove them): databases on the drill servers whose names
/// begin with [`SCRATCH_MARKER`], and scratch directories in the scratch directory's
/// parent. A drill running at the same time holds its targets (a lock per scratch
/// database, a locked file in its directory): those are marked `in_use`.
async fn search_leftovers(runbook: &Runbook) -> (Vec<Leftover>, Vec<String>) {
    let mut found = Vec::new();
    let mut not_searched = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for database in &runbook.databases {
        let adapter = adapters::build(&database.name, &database.adapter);
        match adapter.list_scratch(SCRATCH_MARKER).await {
            Ok(targets) => {
                for target in targets {
                    let shown = crate::storage::redact_url(&target);
                    if !seen.insert(shown.clone()) {
                        continue;
                    }
                    // Not knowing is not "free": such a target is not removed.
                    let in_use = match adapter.scratch_in_use(&target).await {
                        Ok(in_use) => in_use,
                        Err(error) => Some(format!("whether a drill holds it is unknown: {error}")),
                    };
                    found.push(Leftover {
                        shown,
                        remove: LeftoverKind::Target(adapter.clone(), target),
                        in_use,
                    });
                }
            }
            Err(error) => not_searched.push(error.to_string()),
        }
    }
    let parent = runbook
        .drill
        .scratch_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    match std::fs::read_dir(&parent) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let is_scratch = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|name| name.starts_with(SCRATCH_DIR_PREFIX));
                if is_scratch && entry.path().is_dir() {
                    found.push(Leftover {
                        shown: entry.path().display().to_string(),
                        in_use: directory_in_use(&entry.path()),
                        remove: LeftoverKind::Directory(entry.path()),
                    });
                }
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => not_searched.push(format!("{}: {error}", parent.display())),
    }
    (found, not_searched)
}

async fn find_leftovers(runbook: &Runbook) -> Vec<Leftover> {
    let (found, not_searched) = search_leftovers(runbook).await;
    for why in not_searched {
        tracing::warn!(%why, "could not look for scratch targets of earlier drills");
    }
    // Another drill's running targets are not leftovers.
    found
        .into_iter()
        .filter(|leftover| leftover.in_use.is_none())
        .collect()
}

/// `stillpoint drill --cleanup`: removes every scratch target earlier drills left
/// behind (see [`search_leftovers`]).
pub async fn cleanup(runbook: &Runbook) -> CleanupReport {
    let (found, not_searched) = search_leftovers(runbook).await;
    let mut report = CleanupReport {
        not_searched,
        ..CleanupReport::default()
    };
    for leftover in found {
        if let Some(why) = &leftover.in_use {
            report.in_use.push(format!("{}: {why}", leftover.shown));
            continue;
        }
        let removed = match &leftover.remove {
            LeftoverKind::Target(adapter, target) => adapter
                .drop_scratch(target)
                .await
                .map_err(|error| error.to_string()),
            LeftoverKind::Directory(path) => {
                std::fs::remove_dir_all(path).map_err(|error| error.to_string())
            }
        };
        match removed {
            Ok(()) => report.removed.push(leftover.shown),
            Err(why) => report.failed.push(format!("{}: {why}", leftover.shown)),
        }
    }
    report
}

/// Locks [`SCRATCH_DIR_LOCK`] in a drill's new scratch directory; the lock lasts as
/// long as the returned file is open (the process's end included, however it ends).
/// A file system without locks (some network mounts) only costs the hold, not the
/// drill: a clean-up that cannot take the lock there leaves the directory alone too.
fn hold_directory(dir: &std::path::Path) -> Option<std::fs::File> {
    let path = dir.join(SCRATCH_DIR_LOCK);
    let held = std::fs::File::create(&path).and_then(|file| file.lock().map(|()| file));
    match held {
        Ok(file) => Some(file),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "could not lock the drill's scratch directory; a clean-up run meanwhile cannot tell it is in use");
            None
        }
    }
}

/// Why a scratch directory is in use: a running drill holds its lock file. A
/// directory without one (made before drills locked them) is not.
fn directory_in_use(dir: &std::path::Path) -> Option<String> {
    let path = dir.join(SCRATCH_DIR_LOCK);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => return Some(format!("whether a drill holds it is unknown: {error}")),
    };
    match file.try_lock() {
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => Some(format!(
            "a running drill holds it ({} is locked)",
            path.display()
        )),
        Err(std::fs::TryLockError::Error(error)) => {
            Some(format!("whether a drill holds it is unknown: {error}"))
        }
    }
}

/// A new directory for scratch files: inside the runbook's `scratch_dir`, else in the
/// system's temporary directory.
fn scratch_dir(runbook: &Runbook) -> Result<tempfile::TempDir, DrillError> {
    let dir = match &runbook.drill.scratch_dir {
        Some(parent) => {
            std::fs::create_dir_all(parent).map_err(|error| {
                DrillError::Setup(format!(
                    "creating the drill's scratch_dir {}: {error}",
                    parent.display()
                ))
            })?;
            tempfile::Builder::new()
                .prefix(SCRATCH_DIR_PREFIX)
                .tempdir_in(parent)
        }
        None => tempfile::Builder::new()
            .prefix(SCRATCH_DIR_PREFIX)
            .tempdir(),
    };
    dir.map_err(|error| {
        DrillError::Setup(format!(
            "creating a scratch directory for the drill: {error}"
        ))
    })
}

struct RestoreOutcome {
    target: Option<String>,
    restored: bool,
    report: Option<RestoreReport>,
    error: Option<String>,
    checks: Vec<CheckResult>,
}

/// A scratch target for one database: `Ok(None)` if its backup has nothing to
/// restore (an exec cut without a copy), `Err` naming why none could be made.
async fn create_target(
    entry: &DatabaseEntry,
    adapter: &dyn Adapter,
    scratch: &std::path::Path,
    run_id: &str,
) -> Result<Option<String>, String> {
    if entry.artifact.is_none() {
        return Ok(None);
    }
    adapter
        .create_scratch(&scratch_label(run_id, &entry.name), scratch, &entry.cut)
        .await
        .map(Some)
        .map_err(|error| error.to_string())
}

async fn restore_one(
    storage: &Storage,
    manifest: &Manifest,
    entry: &DatabaseEntry,
    adapter: Arc<dyn Adapter>,
    decryption: &Decryption,
    created: Result<Option<String>, String>,
    progress: ProgressSink,
) -> RestoreOutcome {
    let started = Instant::now();
    let name = &entry.name;
    let mut outcome = RestoreOutcome {
        target: None,
        restored: false,
        report: None,
        error: None,
        checks: Vec::new(),
    };
    let target = match created {
        Ok(Some(target)) => target,
        Ok(None) => {
            // An exec cut without a copy command: the marker is the whole backup.
            outcome.checks.push(CheckResult {
                name: format!("restore:{name}"),
                ok: true,
                detail: "nothing to restore: the cut made no copy (an exec database without \
                         `copy`)"
                    .to_owned(),
                duration_ms: 0,
            });
            return outcome;
        }
        Err(error) => {
            outcome.checks.push(CheckResult {
                name: format!("restore:{name}"),
                ok: false,
                detail: format!("no scratch target: {error}"),
                duration_ms: elapsed_ms(started),
            });
            outcome.error = Some(error);
            return outcome;
        }
    };
    outcome.target = Some(target.clone());
    let result = restore::restore_database(
        storage, manifest, entry, adapter, &target, decryption, false, progress,
    )
    .await;
    match result {
        Ok(report) => {
            outcome.checks.push(CheckResult {
                name: format!("checksum:{name}"),
                ok: true,
                detail: format!(
                    "BLAKE3 and size match the manifest ({} bytes)",
                    report.stored_bytes
                ),
                duration_ms: report.checksum_ms,
            });
            outcome.checks.push(CheckResult {
                name: format!("restore:{name}"),
                ok: true,
                detail: format!(
                    "restored into {} in {} ms",
                    crate::storage::redact_url(&target),
                    report.load_ms
                ),
                duration_ms: report.load_ms,
            });
            outcome.restored = true;
            outcome.report = Some(report);
        }
        Err(error) => {
            let detail = crate::error_chain(&error);
            let checksum_failed = matches!(error, RestoreError::Damaged { .. });
            outcome.checks.push(CheckResult {
                name: format!("checksum:{name}"),
                ok: !checksum_failed,
                detail: if checksum_failed {
                    detail.clone()
                } else {
                    "BLAKE3 and size match the manifest".to_owned()
                },
                duration_ms: elapsed_ms(started),
            });
            outcome.checks.push(CheckResult {
                name: format!("restore:{name}"),
                ok: false,
                detail: detail.clone(),
                duration_ms: elapsed_ms(started),
            });
            outcome.error = Some(detail);
        }
    }
    outcome
}

/// A scratch database or file name: lower case (PostgreSQL folds unquoted names),
/// short enough for PostgreSQL's 63-byte identifiers, unique per drill run. The
/// readable part folds case and punctuation (`a-x`, `a_x` and `A.x` read alike), so a
/// hash of the exact name follows it: two databases never share a scratch target.
pub(crate) fn scratch_label(run_id: &str, database: &str) -> String {
    const HASH_HEX: usize = 8;
    let fixed = format!("{SCRATCH_MARKER}{run_id}__").len() + HASH_HEX;
    let safe: String = database
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(63 - fixed)
        .collect();
    let hash = blake3::hash(database.as_bytes()).to_hex();
    format!("{SCRATCH_MARKER}{run_id}_{safe}_{}", &hash[..HASH_HEX])
}

/// The `window` check: re-derives from the facts the manifest recorded (the unsafe
/// flag, the pause id, every node's outcome, boot id and proof that it stayed paused,
/// the window's edges and mid-time, the clock-skew bound and the nodes' clock readings)
/// whether the backup was cut inside one valid pause window, rather than trusting its
/// `window_valid` flag, which a hand edit (or a bug) can set on anything.
fn window_check(manifest: &Manifest) -> CheckResult {
    let (ok, detail) = match window_problems(manifest) {
        Ok(summary) => (true, summary),
        Err(problems) => (
            false,
            format!(
                "the backup's window is not a valid restore point: {}",
                problems.join("; ")
            ),
        ),
    };
    CheckResult {
        name: "window".to_owned(),
        ok,
        detail,
        duration_ms: 0,
    }
}

fn window_problems(manifest: &Manifest) -> Result<String, Vec<String>> {
    use crate::coordinator::NodeOutcome;
    use crate::grpc::client::Protocol;
    let window = &manifest.window;
    let mut problems = Vec::new();
    if manifest.unsafe_no_pause {
        problems.push(
            "UNSAFE: taken with --no-pause, so the databases were cut one after another \
             while the cluster ran"
                .to_owned(),
        );
    }
    if window.pause_id.is_empty() || window.pause_id == "none" {
        problems.push("no pause id is recorded: the cluster was not paused".to_owned());
    } else if window.pause_id != manifest.pause_id {
        problems.push(format!(
            "the window's pause id {} is not the backup's {}",
            window.pause_id, manifest.pause_id
        ));
    }
    if !window.window_valid {
        problems.push("the backup recorded the window as invalid".to_owned());
    }
    problems.extend(window.invalid_reasons.iter().cloned());

    // The window's edges, length and mid-time agree with each other.
    let length = match (
        window.pause_start_timestamp_ms,
        window.pause_end_timestamp_ms,
    ) {
        (Some(start), Some(end)) if end > start => {
            if window.window_ms != Some(end - start) {
                problems.push(format!(
                    "the recorded length {:?} ms is not end - start ({} ms)",
                    window.window_ms,
                    end - start
                ));
            }
            if window.restore_point_timestamp_ms != Some(start + (end - start) / 2) {
                problems.push(format!(
                    "the restore point {:?} is not the window's mid-time {}",
                    window.restore_point_timestamp_ms,
                    start + (end - start) / 2
                ));
            }
            Some(end - start)
        }
        (start, end) => {
            problems.push(format!(
                "the window has no valid start and end (start {start:?}, end {end:?})"
            ));
            None
        }
    };

    // Every node was paused under this pause and proved it stayed paused.
    if window.nodes.is_empty() {
        problems.push("no node is recorded as paused for the window".to_owned());
    }
    let mut upstream = 0;
    for node in &window.nodes {
        let address = &node.address;
        if node.outcome != NodeOutcome::Released {
            problems.push(format!(
                "{address} was not paused and released (outcome {:?})",
                node.outcome
            ));
        }
        if let Some(inside @ 1..) = node.in_flight_at_pause {
            problems.push(format!(
                "{address} had {inside} request(s) in flight when it paused"
            ));
        }
        match node.protocol {
            Some(Protocol::Lease) => {
                if node.boot_id.as_deref().is_none_or(str::is_empty) {
                    problems.push(format!("{address} recorded no boot id"));
                }
                if node.stayed_paused != Some(true) {
                    problems.push(format!(
                        "{address} did not prove it stayed paused for the whole window \
                         (stayed_paused {:?})",
                        node.stayed_paused
                    ));
                }
            }
            // Upstream nodes can prove nothing; the coordinator warns about them, and
            // so does this check's detail.
            Some(Protocol::Upstream) => upstream += 1,
            None => problems.push(format!("{address} recorded no protocol")),
        }
    }

    // The window is longer than twice the clock-skew bound plus the margin, and the
    // bound is no smaller than the nodes' own clock readings imply.
    let implied = window
        .nodes
        .iter()
        .filter_map(|node| Some(node.clock_offset_ms?.unsigned_abs() + node.rtt_ms?.div_ceil(2)))
        .max();
    match (window.skew_bound_ms, implied) {
        (Some(bound), implied) => {
            if let Some(implied) = implied.filter(|&implied| implied > bound) {
                problems.push(format!(
                    "the clock-skew bound {bound} ms is smaller than the nodes' clock \
                     readings imply ({implied} ms)"
                ));
            }
            let needed = 2 * bound as i64 + crate::coordinator::SKEW_MARGIN.as_millis() as i64;
            if let Some(length) = length.filter(|&length| length <= needed) {
                problems.push(format!(
                    "the window ({length} ms) is not longer than twice the clock-skew bound \
                     plus margin ({needed} ms)"
                ));
            }
        }
        (None, Some(implied)) => problems.push(format!(
            "no clock-skew bound is recorded, although the nodes' clocks imply {implied} ms"
        )),
        (None, None) if upstream < window.nodes.len() => {
            problems.push("no clock-skew bound is recorded".to_owned())
        }
        (None, None) => {}
    }

    if !problems.is_empty() {
        problems.dedup();
        return Err(problems);
    }
    let mut summary = format!(
        "the backup was cut inside one valid pause window of {} ms: {} node(s) released \
         under pause id {}, each proving it stayed paused (same boot id and pause sequence)",
        length.unwrap_or_default(),
        window.nodes.len(),
        window.pause_id
    );
    if let Some(bound) = window.skew_bound_ms {
        summary.push_str(&format!(
            ", longer than twice the clock-skew bound of {bound} ms"
        ));
    }
    if upstream > 0 {
        summary.push_str(&format!(
            "; {upstream} node(s) speak only the upstream API and cannot prove they were not \
             restarted inside the window"
        ));
    }
    Ok(summary)
}

async fn row_count_check(
    entry: &DatabaseEntry,
    adapter: &dyn Adapter,
    target: &str,
) -> CheckResult {
    let started = Instant::now();
    let name = format!("row_counts:{}", entry.name);
    // Written by stillpoint before it refused such tables (issue 20.3): their copies
    // hold rows from after the release, whatever the counts say.
    if let Some(tables) = entry.cut.details.get("non_transactional_tables") {
        return CheckResult {
            name,
            ok: false,
            detail: format!(
                "tables {tables} are on non-transactional engines, which the cut's snapshot \
                 did not cover: the copy is not the state at the cut"
            ),
            duration_ms: 0,
        };
    }
    let Some(expected) = &entry.row_counts else {
        return CheckResult {
            name,
            ok: true,
            detail: "the adapter recorded no row counts at the cut; nothing to compare".to_owned(),
            duration_ms: 0,
        };
    };
    let (ok, detail) = match adapter.row_counts(target).await {
        Err(error) => (false, format!("counting rows: {error}")),
        Ok(found) => compare_counts(expected, &found),
    };
    CheckResult {
        name,
        ok,
        detail,
        duration_ms: elapsed_ms(started),
    }
}

fn compare_counts(
    expected: &BTreeMap<String, u64>,
    found: &BTreeMap<String, u64>,
) -> (bool, String) {
    let mut differences = Vec::new();
    for (table, &want) in expected {
        match found.get(table) {
            Some(&have) if have == want => {}
            Some(&have) => differences.push(format!("{table}: {have} rows, {want} at the cut")),
            None => differences.push(format!("{table}: missing ({want} rows at the cut)")),
        }
    }
    for table in found.keys().filter(|table| !expected.contains_key(*table)) {
        differences.push(format!("{table}: not in the backup"));
    }
    if differences.is_empty() {
        let rows: u64 = expected.values().sum();
        (
            true,
            format!("{} tables, {rows} rows, as at the cut", expected.len()),
        )
    } else {
        (false, differences.join("; "))
    }
}

pub(crate) async fn run_check(
    check: &DrillCheck,
    targets: &BTreeMap<&str, (Arc<dyn Adapter>, String)>,
    restored: &[&str],
) -> CheckResult {
    let started = Instant::now();
    let result = async {
        for database in check.databases() {
            if !restored.contains(&database) {
                return Err(format!("not run: database {database} was not restored"));
            }
        }
        // A query that outlives the check's timeout is dropped (its connection with
        // it); the scratch database is dropped with its sessions afterwards.
        let bounded = |what: &str| {
            format!(
                "{what} did not finish within {} (the check's timeout; set timeout in the \
                 check to allow longer); it was abandoned",
                crate::time::format_duration(check.timeout)
            )
        };
        match &check.kind {
            CheckKind::Expect { query, expect } => {
                let rows = tokio::time::timeout(check.timeout, run_query(query, targets))
                    .await
                    .map_err(|_| bounded(&format!("the query on {}", query.database)))??;
                compare_expected(&query.database, &rows, expect)
            }
            CheckKind::Command { argv, env } => {
                run_command(argv, env, check.timeout, targets).await
            }
            CheckKind::Equal {
                left,
                right,
                allow_empty,
            } => {
                let both =
                    async { futures::join!(run_query(left, targets), run_query(right, targets)) };
                let (l, r) = tokio::time::timeout(check.timeout, both)
                    .await
                    .map_err(|_| {
                        bounded(&format!(
                            "the queries on {} and {}",
                            left.database, right.database
                        ))
                    })?;
                let (l, r) = (l?, r?);
                if l.is_empty() && r.is_empty() && !allow_empty {
                    return Err(format!(
                        "{} and {} both return no rows: an empty comparison proves nothing (if \
                         no rows is what the data should hold, say so with allow_empty = true)",
                        left.database, right.database
                    ));
                }
                compare_rows(left, l, right, r)
            }
        }
    }
    .await;
    let (ok, detail) = match result {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    CheckResult {
        name: check.name.clone(),
        ok,
        detail,
        duration_ms: elapsed_ms(started),
    }
}

/// How much of a command check's output its detail keeps.
const COMMAND_DETAIL_CHARS: usize = 2000;

/// A command check: the program run with `{database}` replaced by scratch targets, no
/// shell, stdin closed, killed (with everything it started) after `timeout`; exit
/// status 0 passes. A target URL with a password is never put on the command line,
/// where any user of the host could read it: such a placeholder belongs in `env`.
async fn run_command(
    argv: &[String],
    env: &BTreeMap<String, String>,
    timeout: std::time::Duration,
    targets: &BTreeMap<&str, (Arc<dyn Adapter>, String)>,
) -> Result<String, String> {
    use crate::adapters::process::{self, GroupKiller, OUTPUT_LIMIT};
    let target = |name: &str| targets.get(name).map(|(_, target)| target.as_str());
    for template in argv {
        for name in crate::runbook::placeholders(template).unwrap_or_default() {
            // In the user part, or as a parameter (libpq takes `?password=`).
            let has_password = target(name)
                .and_then(|target| url::Url::parse(target).ok())
                .is_some_and(|url| {
                    url.password().is_some()
                        || url
                            .query_pairs()
                            .any(|(key, _)| key.eq_ignore_ascii_case("password"))
                });
            if has_password {
                return Err(format!(
                    "not run: the scratch target of {name} carries a password, which would \
                     show on the command line to every user of the host; pass {{{name}}} \
                     through env instead"
                ));
            }
        }
    }
    let argv = argv
        .iter()
        .map(|template| crate::runbook::substitute(template, target))
        .collect::<Result<Vec<_>, _>>()?;
    let shown = argv.join(" ");
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (key, template) in env {
        command.env(key, crate::runbook::substitute(template, target)?);
    }
    let mut child = command
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", argv[0]))?;
    let mut group = GroupKiller::new(&child);
    // Done when the command exits, even if a helper it started holds its output open.
    let run = process::wait_with_output(&mut child, OUTPUT_LIMIT);
    let Ok(waited) = tokio::time::timeout(timeout, run).await else {
        group.kill().await;
        let _ = child.wait().await;
        return Err(format!(
            "{shown} did not finish within {} and was killed",
            crate::time::format_duration(timeout)
        ));
    };
    let (status, out, errout) = waited.map_err(|error| format!("waiting for {shown}: {error}"))?;
    group.disarm();
    let (out, errout) = (out.text(), errout.text());
    let output = [out.as_str(), errout.as_str()]
        .into_iter()
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let output = if output.chars().count() > COMMAND_DETAIL_CHARS {
        format!(
            "{}…",
            output
                .chars()
                .take(COMMAND_DETAIL_CHARS)
                .collect::<String>()
        )
    } else {
        output
    };
    if status.success() {
        Ok(format!("{shown} exited 0: {output}"))
    } else {
        Err(process::describe_failure(&shown, status, &output))
    }
}

async fn run_query(
    query: &CheckQuery,
    targets: &BTreeMap<&str, (Arc<dyn Adapter>, String)>,
) -> Result<Rows, String> {
    let (adapter, target) = targets
        .get(query.database.as_str())
        .ok_or_else(|| format!("database {} has no restored target", query.database))?;
    adapter
        .query(target, &query.sql)
        .await
        .map_err(|error| format!("query on {} failed: {error}", query.database))
}

/// Compares a result with what an `expect` check wants, row by row and value by value
/// (typed: [`ExpectedValue::matches`]), and names the first difference.
fn compare_expected(database: &str, rows: &Rows, expect: &Expected) -> Result<String, String> {
    let got = shorten(&render(rows));
    let shape = |rows: usize, columns: usize| match (rows, columns) {
        (0, _) => "no rows".to_owned(),
        (1, 1) => "one value".to_owned(),
        (1, n) => format!("one row of {n} values"),
        (n, _) => format!("{n} rows"),
    };
    let want_columns = expect.rows.first().map_or(0, Vec::len);
    if rows.len() != expect.rows.len()
        || rows
            .iter()
            .zip(&expect.rows)
            .any(|(g, w)| g.len() != w.len())
    {
        return Err(format!(
            "{database} returned {} ({got:?}), expected {} ({expect})",
            shape(rows.len(), rows.first().map_or(0, Vec::len)),
            shape(expect.rows.len(), want_columns)
        ));
    }
    for (index, (row, wanted)) in rows.iter().zip(&expect.rows).enumerate() {
        for (column, (value, want)) in row.iter().zip(wanted).enumerate() {
            if !want.matches(value) {
                let hint = match (value, want) {
                    (Value::Null, _) => {
                        " (NULL equals nothing; to expect it, select `… IS NULL` and expect true)"
                    }
                    (Value::Number(_) | Value::Float(_), ExpectedValue::Text(_)) => {
                        " (a number is not text: write expect without quotes)"
                    }
                    _ => "",
                };
                let at = if expect.scalar {
                    String::new()
                } else {
                    format!(" in row {}, column {}", index + 1, column + 1)
                };
                let value = match value {
                    Value::Null => "NULL".to_owned(),
                    Value::Text(text) => format!("the text {:?}", shorten(text)),
                    other => format!("the {} {}", other.kind(), shorten(&other.to_string())),
                };
                return Err(format!(
                    "{database} returned {value}{at}, expected {want}{hint}"
                ));
            }
        }
    }
    Ok(format!("{database} = {got}"))
}

/// Rows on lines, columns joined by `|`, NULL as `NULL`, bytes as `x'…'`: how rows
/// appear in reports.
fn render(rows: &Rows) -> String {
    rows.iter()
        .map(|row| {
            row.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A multiset of rows: each distinct row (typed values) and how often it occurs.
type RowCounts = BTreeMap<Vec<Value>, usize>;

/// Compares two result sets as multisets and names what only one side has.
fn compare_rows(
    left: &CheckQuery,
    left_rows: Rows,
    right: &CheckQuery,
    right_rows: Rows,
) -> Result<String, String> {
    let count = |rows: Rows| {
        let mut counts = RowCounts::new();
        for row in rows {
            *counts.entry(row).or_default() += 1;
        }
        counts
    };
    let (left_total, right_total) = (left_rows.len(), right_rows.len());
    let (left_counts, right_counts) = (count(left_rows), count(right_rows));
    fn only<'a>(this: &'a RowCounts, other: &RowCounts) -> Vec<&'a Vec<Value>> {
        let mut rows = Vec::new();
        for (row, &n) in this {
            let extra = n.saturating_sub(other.get(row).copied().unwrap_or(0));
            rows.extend(std::iter::repeat_n(row, extra));
        }
        rows
    }
    let only_left = only(&left_counts, &right_counts);
    let only_right = only(&right_counts, &left_counts);
    if only_left.is_empty() && only_right.is_empty() {
        return Ok(format!(
            "{} and {} return the same {left_total} rows (digest {})",
            left.database,
            right.database,
            digest(&left_counts)
        ));
    }
    let name = |rows: &[&Vec<Value>]| {
        let mut shown: Vec<String> = rows
            .iter()
            .take(NAMED_ROWS)
            .map(|row| render(&vec![(*row).clone()]))
            .collect();
        if rows.len() > NAMED_ROWS {
            shown.push(format!("and {} more", rows.len() - NAMED_ROWS));
        }
        shown.join(", ")
    };
    let mut detail = format!(
        "{} returns {left_total} rows, {} returns {right_total}",
        left.database, right.database
    );
    if !only_left.is_empty() {
        detail.push_str(&format!(
            "; {} only in {}: {}",
            only_left.len(),
            left.database,
            name(&only_left)
        ));
    }
    if !only_right.is_empty() {
        detail.push_str(&format!(
            "; {} only in {}: {}",
            only_right.len(),
            right.database,
            name(&only_right)
        ));
    }
    Err(detail)
}

/// An order-independent digest of a multiset of rows (BLAKE3 of the sorted rows, each
/// value with its type), so two passing reports can be compared by eye.
fn digest(rows: &RowCounts) -> String {
    let mut hasher = blake3::Hasher::new();
    for (row, n) in rows {
        for _ in 0..*n {
            hasher.update(&(row.len() as u64).to_le_bytes());
            for value in row {
                value.hash_into(&mut hasher);
            }
        }
    }
    hasher.finalize().to_hex()[..16].to_owned()
}

fn shorten(text: &str) -> String {
    const LIMIT: usize = 200;
    if text.chars().count() <= LIMIT {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(LIMIT).collect::<String>())
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(database: &str) -> CheckQuery {
        CheckQuery {
            database: database.to_owned(),
            sql: String::new(),
        }
    }

    fn rows(values: &[&str]) -> Rows {
        values
            .iter()
            .map(|v| vec![Value::Text((*v).to_owned()), Value::Null])
            .collect()
    }

    #[test]
    fn equal_result_sets_match_in_any_order() {
        let detail = compare_rows(
            &query("ledger"),
            rows(&["a", "b", "c"]),
            &query("auditor"),
            rows(&["c", "a", "b"]),
        )
        .unwrap();
        assert!(detail.contains("same 3 rows"), "{detail}");
    }

    #[test]
    fn differing_result_sets_name_the_rows_each_side_lacks() {
        let detail = compare_rows(
            &query("ledger"),
            rows(&["a", "b", "b", "x"]),
            &query("auditor"),
            rows(&["a", "b", "y"]),
        )
        .unwrap_err();
        assert!(
            detail.contains("ledger returns 4 rows, auditor returns 3"),
            "{detail}"
        );
        assert!(
            detail.contains("2 only in ledger: b|NULL, x|NULL"),
            "{detail}"
        );
        assert!(detail.contains("1 only in auditor: y|NULL"), "{detail}");
    }

    #[test]
    fn rows_differing_only_in_bytes_or_type_are_different_rows() {
        let bytes = |first: u8| vec![vec![Value::Bytes(vec![first, 0, 0x11, 0x22, 0x33])]];
        let detail = compare_rows(&query("a"), bytes(0xff), &query("b"), bytes(0xfe)).unwrap_err();
        assert!(detail.contains("only in a: x'ff00112233'"), "{detail}");
        let text = vec![vec![Value::Text("ab".to_owned())]];
        let blob = vec![vec![Value::Bytes(b"ab".to_vec())]];
        assert!(compare_rows(&query("a"), text, &query("b"), blob).is_err());
    }

    fn expect(toml: &str) -> Expected {
        let check: crate::runbook::Runbook = crate::runbook::Runbook::parse(
            &format!(
                "cluster = \"c\"\n[pause]\ntiers = [{{ addresses = [\"127.0.0.1:1\"] }}]\n\
                 [[databases]]\nname = \"db\"\nadapter = \"sqlite\"\npath = \"a.db\"\n\
                 [storage]\nurl = \"file:///tmp/b\"\n[[drill.checks]]\nname = \"c\"\n\
                 database = \"db\"\nsql = \"SELECT 1\"\nexpect = {toml}\n"
            ),
            std::path::Path::new("/"),
        )
        .unwrap();
        match &check.drill.checks[0].kind {
            CheckKind::Expect { expect, .. } => expect.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn number(text: &str) -> Value {
        Value::Number(text.to_owned())
    }

    /// Issue 20.10: booleans and floats could never match (PostgreSQL prints `t`,
    /// MariaDB `1`; `0` vs `0.0`; `1e+16` vs `1e16`). `expect` is compared as a value.
    #[test]
    fn expected_values_match_by_type_and_value() {
        let one = |value: Value| vec![vec![value]];
        for (toml, value) in [
            ("true", Value::Bool(true)),
            ("true", number("1")),
            ("false", number("0")),
            ("0", number("0")),
            ("0", Value::Float(0.0)),
            ("0", Value::Float(-0.0)),
            ("0.0", number("0")),
            ("0.0", Value::Float(0.0)),
            ("1e16", Value::Float(1e16)),
            ("1e16", number("10000000000000000")),
            ("10000000000000000", Value::Float(1e16)),
            ("-7", number("-7")),
            ("12.5", number("12.5")),
            ("\"NULL\"", Value::Text("NULL".to_owned())),
            ("\"ab\"", Value::Text("ab".to_owned())),
        ] {
            let result = compare_expected("db", &one(value.clone()), &expect(toml));
            assert!(result.is_ok(), "{toml} vs {value:?}: {result:?}");
        }
        for (toml, value) in [
            ("true", Value::Bool(false)),
            ("true", number("2")),
            ("false", Value::Null),
            ("0", Value::Float(0.5)),
            ("0", Value::Text("0".to_owned())),
            ("\"0\"", number("0")),
            ("\"NULL\"", Value::Null),
            ("\"ab\"", Value::Bytes(b"ab".to_vec())),
            ("\"6162\"", Value::Bytes(b"ab".to_vec())),
            ("1", Value::Bool(true)),
            ("9007199254740993", Value::Float(9007199254740992.0)),
        ] {
            let result = compare_expected("db", &one(value.clone()), &expect(toml));
            assert!(result.is_err(), "{toml} matched {value:?}");
        }
        let detail = compare_expected("db", &one(Value::Null), &expect("\"NULL\"")).unwrap_err();
        assert!(
            detail.contains("returned NULL, expected \"NULL\""),
            "{detail}"
        );
        assert!(detail.contains("IS NULL"), "{detail}");
    }

    /// Issue 20.7: the shape of the result counts: no rows never match one value.
    #[test]
    fn expected_rows_must_have_the_same_shape() {
        let rows = vec![
            vec![number("1"), Value::Text("a".to_owned())],
            vec![number("2"), Value::Null],
        ];
        let detail = compare_expected("db", &Vec::new(), &expect("1")).unwrap_err();
        assert!(detail.contains("returned no rows"), "{detail}");
        assert!(compare_expected("db", &Vec::new(), &expect("[]")).is_ok());
        assert!(compare_expected("db", &rows[..1].to_vec(), &expect("[1, \"a\"]")).is_ok());
        assert!(compare_expected("db", &rows, &expect("[1, \"a\"]")).is_err());
        let detail =
            compare_expected("db", &rows, &expect("[[1, \"a\"], [2, \"b\"]]")).unwrap_err();
        assert!(detail.contains("row 2, column 2"), "{detail}");
        assert!(compare_expected("db", &rows[..1].to_vec(), &expect("[[1, \"a\"]]")).is_ok());
    }

    /// A manifest of a valid backup (the one docs/manifest.md describes).
    fn valid_manifest() -> Manifest {
        crate::manifest::parse(
            "example.json",
            include_bytes!("../fuzz/seeds/manifest/example.json"),
        )
        .unwrap()
    }

    /// Issue 20.6: the window check re-derives validity from the recorded facts; each
    /// edit of one fact behind a `window_valid: true` fails it, naming the fact.
    #[test]
    fn the_window_check_rederives_validity_from_the_recorded_facts() {
        let check = window_check(&valid_manifest());
        assert!(check.ok, "{}", check.detail);
        type Edit = fn(&mut Manifest);
        let edits: [(Edit, &str); 12] = [
            (|m| m.unsafe_no_pause = true, "--no-pause"),
            (|m| m.window.pause_id = "none".to_owned(), "no pause id"),
            (|m| m.pause_id = "other".to_owned(), "is not the backup's"),
            (|m| m.window.nodes.clear(), "no node"),
            (|m| m.window.nodes[0].stayed_paused = None, "did not prove"),
            (|m| m.window.nodes[0].boot_id = None, "no boot id"),
            (
                |m| m.window.nodes[0].outcome = crate::coordinator::NodeOutcome::Paused,
                "was not paused and released",
            ),
            (
                |m| m.window.nodes[0].in_flight_at_pause = Some(2),
                "in flight",
            ),
            (
                |m| m.window.skew_bound_ms = Some(4000),
                "twice the clock-skew bound",
            ),
            (
                |m| m.window.skew_bound_ms = Some(1),
                "smaller than the nodes' clock",
            ),
            (
                |m| m.window.restore_point_timestamp_ms = Some(0),
                "mid-time",
            ),
            (
                |m| m.window.pause_end_timestamp_ms = None,
                "no valid start and end",
            ),
        ];
        for (edit, needle) in edits {
            let mut manifest = valid_manifest();
            edit(&mut manifest);
            assert!(manifest.window.window_valid);
            let check = window_check(&manifest);
            assert!(
                !check.ok,
                "passed after an edit ({needle}): {}",
                check.detail
            );
            assert!(check.detail.contains(needle), "{needle}: {}", check.detail);
        }
    }

    /// Issue 20.4: a command check gets the scratch targets and its exit status is the
    /// verdict; a URL with a password never reaches its command line.
    #[tokio::test]
    async fn command_checks_get_targets_and_their_exit_status_is_the_verdict() {
        let adapter = adapters::build(
            "db",
            &crate::adapters::AdapterConfig::Sqlite(crate::adapters::SqliteConfig {
                path: "/nonexistent".into(),
            }),
        );
        let mut targets = BTreeMap::new();
        targets.insert("db", (adapter.clone(), "/scratch/db.sqlite".to_owned()));
        let argv = |script: &str| {
            vec![
                "sh".to_owned(),
                "-c".to_owned(),
                script.to_owned(),
                "sh".to_owned(),
                "{db}".to_owned(),
            ]
        };
        let env = BTreeMap::from([("TARGET".to_owned(), "{db}".to_owned())]);
        let timeout = std::time::Duration::from_secs(30);
        let passed = run_command(&argv("echo \"$1 $TARGET\""), &env, timeout, &targets)
            .await
            .unwrap();
        assert!(
            passed.contains("/scratch/db.sqlite /scratch/db.sqlite"),
            "{passed}"
        );
        let failed = run_command(
            &argv("echo broken at seq 5; exit 3"),
            &env,
            timeout,
            &targets,
        )
        .await
        .unwrap_err();
        assert!(failed.contains("exited with status 3"), "{failed}");
        assert!(failed.contains("broken at seq 5"), "{failed}");
        let slow = run_command(
            &argv("sleep 30"),
            &env,
            std::time::Duration::from_millis(200),
            &targets,
        )
        .await
        .unwrap_err();
        assert!(slow.contains("did not finish within"), "{slow}");
        // A helper started in the background keeps the output pipes open: the check is
        // still done when its command exits, with the command's verdict and output.
        let helper = run_command(
            &argv("sleep 20 & echo started a helper; exit 4"),
            &env,
            std::time::Duration::from_secs(5),
            &targets,
        )
        .await
        .unwrap_err();
        assert!(helper.contains("exited with status 4"), "{helper}");
        assert!(helper.contains("started a helper"), "{helper}");

        targets.insert(
            "db",
            (
                adapter,
                "postgres://u:hunter2@127.0.0.1:5432/scratch".to_owned(),
            ),
        );
        let refused = run_command(&argv("true"), &env, timeout, &targets)
            .await
            .unwrap_err();
        assert!(refused.contains("through env"), "{refused}");
        assert!(!refused.contains("hunter2"), "{refused}");
        // libpq also takes the password as a URL parameter (`drill_server_url =
        // "postgres://u@host/db?password=…"`): the same refusal.
        for url in [
            "postgres://u@127.0.0.1:5432/scratch?password=hunter2",
            "postgres://u@127.0.0.1:5432/scratch?sslmode=disable&PASSWORD=hunter2",
        ] {
            let (adapter, _) = targets.remove("db").unwrap();
            targets.insert("db", (adapter, url.to_owned()));
            let refused = run_command(&argv("true"), &env, timeout, &targets)
                .await
                .unwrap_err();
            assert!(refused.contains("through env"), "{url}: {refused}");
        }
        let via_env = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "test -n \"$TARGET\"".to_owned(),
        ];
        run_command(&via_env, &env, timeout, &targets)
            .await
            .unwrap();
    }

    #[test]
    fn row_counts_name_each_table_that_differs() {
        let at_cut = BTreeMap::from([("a".to_owned(), 3), ("b".to_owned(), 4)]);
        assert!(compare_counts(&at_cut, &at_cut.clone()).0);
        let restored = BTreeMap::from([("a".to_owned(), 2), ("c".to_owned(), 1)]);
        let (ok, detail) = compare_counts(&at_cut, &restored);
        assert!(!ok);
        assert_eq!(
            detail,
            "a: 2 rows, 3 at the cut; b: missing (4 rows at the cut); c: not in the backup"
        );
    }

    #[test]
    fn results_render_as_lines_of_columns() {
        let rows = vec![
            vec![Value::Number("1".to_owned()), Value::Null],
            vec![Value::Number("2".to_owned()), Value::Text("x".to_owned())],
            vec![Value::Bytes(vec![0xff]), Value::Float(0.5)],
        ];
        assert_eq!(render(&rows), "1|NULL\n2|x\nx'ff'|0.5");
    }

    /// Issue 18.11: `a-x` and `a_x` were both `…_a_x`, so two databases of one backup
    /// shared a scratch target.
    #[test]
    fn scratch_labels_of_different_names_never_collide() {
        let names = [
            "a-x",
            "a_x",
            "A_x",
            "a.x",
            "a x",
            "ä_x",
            &"l".repeat(80),
            &format!("{}m", "l".repeat(80)),
        ];
        let labels: std::collections::BTreeSet<String> = names
            .iter()
            .map(|name| scratch_label("a1b2c3", name))
            .collect();
        assert_eq!(labels.len(), names.len(), "{labels:?}");
        for label in &labels {
            assert!(label.len() <= 63, "{label}");
            assert!(
                label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{label}"
            );
        }
    }

    #[test]
    fn scratch_labels_fit_postgres_identifiers() {
        let label = scratch_label("a1b2c3", &"Ledger-DB".repeat(10));
        assert!(label.len() <= 63, "{label}");
        assert!(label.starts_with("stillpoint_drill_a1b2c3_ledger_db"));
        assert_eq!(label, scratch_label("a1b2c3", &"Ledger-DB".repeat(10)));
    }
}
