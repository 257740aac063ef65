//! `backup`: protocol steps 2–7 for one runbook. Prepare every database (nothing is
//! paused yet) → pause the cluster → cut every database in parallel under the cut
//! deadline while the lease is renewed → release and check the window → copy every
//! database through the pipeline in parallel → commit the manifest, last.
//!
//! Prepare checks everything that can be checked before the pause: the pipeline's
//! keys and level, the storage (a probe object written and deleted, then the backup's
//! in-progress marker), and every database. The marker is rewritten every
//! [`HEARTBEAT`] while the backup runs, so orphan cleanup never takes it for dead.
//!
//! The pause covers only the cuts, so its length does not grow with the data. Every
//! failure before the commit releases the cluster (if paused) and deletes what was
//! written, so no backup is listed that is not whole; the error says whether that
//! deletion worked.
//!
//! [`Mode::UnsafeNoPause`] exists for negative controls: it skips the pause and cuts
//! and copies each database in turn, as a tool without a pause would, and marks the
//! manifest so nobody mistakes it for a restore point.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::adapters::{self, AdapterConfig, AdapterError, CutMarker, Prepared};
use crate::coordinator::{
    self, PauseFailed, PausePlan, PauseReport, PausedCluster, required_window,
};
use crate::grpc::client::{ConnectOptions, TlsOptions};
use crate::manifest::{self, DatabaseEntry, Manifest, Timings};
use crate::pipeline::{self, PipelineError, PipelineSettings};
use crate::resolve::{NodeAddress, parse_address_list, resolve_srv};
use crate::runbook::{PauseConfig, Runbook};
use crate::storage::{Storage, StorageError};
use crate::time::{Zone, unix_ms};
use stillpoint_node::grpc::auth::{AdminToken, ClientIdentity, read_certificate_pem};

/// How often a running backup rewrites its in-progress marker
/// ([`manifest::MARKER_FILE`]). Orphan cleanup waits far longer (an hour) before it
/// takes a directory for a dead backup's.
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// What a running backup reports, for progress bars or logs.
#[derive(Debug, Clone)]
pub enum Progress {
    Phase(&'static str),
    Copied { database: String, bytes: u64 },
    CopyDone { database: String },
}

pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The runbook or the environment is wrong; nothing was contacted or paused.
    #[error("{0}")]
    Setup(String),
    /// A key, passphrase or level the pipeline cannot use; nothing was paused.
    #[error("the [pipeline] settings cannot be used, nothing was paused: {0}")]
    Pipeline(PipelineError),
    /// The storage refused the probe or the marker; nothing was paused. The reason
    /// names the storage.
    #[error("{reason}; the storage cannot take this backup, so nothing was paused")]
    Storage { reason: String },
    #[error("preparing the databases failed, nothing was paused: {0}")]
    Prepare(String),
    #[error(transparent)]
    Pause(#[from] PauseFailed),
    #[error("cut failed: {reason}; the cluster was released and nothing was written")]
    Cut {
        reason: String,
        window: Box<PauseReport>,
    },
    #[error(
        "some nodes could not be released ({nodes}); they reopen when their lease expires; nothing was written"
    )]
    Unpause {
        nodes: String,
        window: Box<PauseReport>,
    },
    #[error("the pause window is not a valid restore point ({reasons}); nothing was copied")]
    WindowInvalid {
        reasons: String,
        window: Box<PauseReport>,
    },
    #[error("copy failed: {reason}; {cleanup}")]
    Copy {
        backup_id: String,
        reason: String,
        cleanup: Cleanup,
        window: Box<PauseReport>,
    },
    /// Stopped by the caller (SIGINT/SIGTERM) before the commit: the cluster was
    /// released first if it was paused, and the partial backup removed.
    #[error("interrupted during the {phase}: {released}; {cleanup}")]
    Interrupted {
        phase: &'static str,
        /// What became of the pause.
        released: String,
        cleanup: Cleanup,
        window: Option<Box<PauseReport>>,
    },
    #[error("writing the manifest of {backup_id} failed: {reason}; {cleanup}")]
    Commit {
        backup_id: String,
        reason: String,
        cleanup: Cleanup,
        window: Box<PauseReport>,
    },
}

/// What became of a failed backup's directory. Either way it has no manifest, so it
/// is not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleanup {
    Deleted { backup_id: String },
    Failed { backup_id: String, error: String },
}

impl std::fmt::Display for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cleanup::Deleted { backup_id } => write!(
                f,
                "the partial backup {backup_id} was deleted and is not listed"
            ),
            Cleanup::Failed { backup_id, error } => write!(
                f,
                "the partial backup {backup_id} could not be deleted ({error}); it is not \
                 listed (it has no manifest), and `stillpoint prune` removes it once it has \
                 been left alone for an hour"
            ),
        }
    }
}

/// Why a backup stopped, before its directory is cleaned up (which happens once the
/// marker's heartbeat has stopped, so it cannot write the marker back).
enum Stopped {
    Error(BackupError),
    Interrupted {
        phase: &'static str,
        released: String,
        window: Option<Box<PauseReport>>,
    },
    Copy {
        reason: String,
        window: Box<PauseReport>,
    },
    Commit {
        reason: String,
        window: Box<PauseReport>,
    },
}

impl From<BackupError> for Stopped {
    fn from(error: BackupError) -> Self {
        Stopped::Error(error)
    }
}

impl From<PauseFailed> for Stopped {
    fn from(error: PauseFailed) -> Self {
        Stopped::Error(error.into())
    }
}

impl BackupError {
    /// The window, when the failure came after the pause.
    pub fn window(&self) -> Option<&PauseReport> {
        match self {
            BackupError::Cut { window, .. }
            | BackupError::Unpause { window, .. }
            | BackupError::WindowInvalid { window, .. }
            | BackupError::Copy { window, .. }
            | BackupError::Commit { window, .. } => Some(window),
            BackupError::Interrupted { window, .. } => window.as_deref(),
            _ => None,
        }
    }
}

/// Runs one backup to its commit point and returns the committed manifest.
pub async fn run(runbook: &Runbook, progress: ProgressSink) -> Result<Manifest, BackupError> {
    run_with(runbook, Mode::Paused, progress).await
}

/// Whether the backup pauses the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The protocol: every cut inside one pause.
    Paused,
    /// UNSAFE, for negative controls only: no pause; the databases are cut one after
    /// another while the cluster runs, the way a tool without a pause would, and the
    /// manifest is marked `unsafe_no_pause`. Drills of such copies are expected to fail.
    UnsafeNoPause,
}

/// [`run`], with the mode spelled out.
pub async fn run_with(
    runbook: &Runbook,
    mode: Mode,
    progress: ProgressSink,
) -> Result<Manifest, BackupError> {
    run_cancellable(runbook, mode, progress, &CancellationToken::new()).await
}

/// [`run_with`], stopped early when `cancel` fires (the CLI fires it on SIGINT and
/// SIGTERM): the phase under way is abandoned (cuts and copies dropped, which kills
/// their child processes), a paused cluster is released at once rather than left to
/// its lease, the partial backup is removed, and [`BackupError::Interrupted`] says
/// what became of each. A pause in progress finishes first (it is bounded by its
/// deadlines) and is then released; a commit under way finishes, and then the
/// backup exists.
pub async fn run_cancellable(
    runbook: &Runbook,
    mode: Mode,
    progress: ProgressSink,
    cancel: &CancellationToken,
) -> Result<Manifest, BackupError> {
    let started = Instant::now();
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .map_err(|error| BackupError::Setup(error.to_string()))?;
    let settings = pipeline_settings(runbook)?;
    // 2. Prepare begins with what needs no network: keys and level.
    settings.check().map_err(BackupError::Pipeline)?;
    check_identity_opens(runbook)?;
    let plan = match mode {
        Mode::Paused => Some(pause_plan(&runbook.pause).await?),
        Mode::UnsafeNoPause => None,
    };
    let adapters: Vec<_> = runbook
        .databases
        .iter()
        .map(|database| adapters::build(&database.name, &database.adapter))
        .collect();
    // Artifact paths are known (and checked) before anything is contacted.
    let backup_id = manifest::new_backup_id();
    let paths = adapters
        .iter()
        .zip(&runbook.databases)
        .map(|(adapter, database)| {
            let path = manifest::artifact_path(
                &backup_id,
                adapter.name(),
                adapter.artifact_extension(),
                &settings,
            );
            path.map(|path| has_copy(&database.adapter).then_some(path))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| BackupError::Setup(error.to_string()))?;

    // 2. Prepare: the storage takes writes and deletes, and holds our marker from now
    // on, refreshed while the backup runs.
    progress(Progress::Phase("prepare"));
    let marker =
        manifest::marker_path(&backup_id).map_err(|error| BackupError::Setup(error.to_string()))?;
    let marker_body = bytes::Bytes::from(manifest::marker_json(
        &backup_id,
        unix_ms(SystemTime::now()),
    ));
    prepare_storage(&storage, &backup_id, &marker, marker_body.clone()).await?;
    let work = marked(
        runbook, &storage, &settings, plan, adapters, paths, &backup_id, started, progress, cancel,
    );
    let outcome = tokio::select! {
        outcome = work => outcome,
        never = keep_marker_fresh(&storage, &marker, marker_body, HEARTBEAT) => match never {},
    };
    match outcome {
        Ok(manifest) => {
            if let Err(error) = storage.delete(&marker).await {
                tracing::warn!(%backup_id, %error, "could not delete the committed backup's in-progress marker");
            }
            Ok(manifest)
        }
        Err(stopped) => {
            let cleanup = discard(&storage, &backup_id).await;
            Err(match stopped {
                Stopped::Error(error) => {
                    if let Cleanup::Failed { error: why, .. } = &cleanup {
                        tracing::warn!(%backup_id, error = %why, "could not delete the failed backup's marker");
                    }
                    error
                }
                Stopped::Interrupted {
                    phase,
                    released,
                    window,
                } => BackupError::Interrupted {
                    phase,
                    released,
                    cleanup,
                    window,
                },
                Stopped::Copy { reason, window } => BackupError::Copy {
                    backup_id,
                    reason,
                    cleanup,
                    window,
                },
                Stopped::Commit { reason, window } => BackupError::Commit {
                    backup_id,
                    reason,
                    cleanup,
                    window,
                },
            })
        }
    }
}

/// Writes and deletes a probe object, then writes the backup's marker: a missing
/// bucket, wrong credentials or a directory that takes no files fail here, before
/// anything is paused.
async fn prepare_storage(
    storage: &Storage,
    backup_id: &str,
    marker: &str,
    marker_body: bytes::Bytes,
) -> Result<(), BackupError> {
    let failed = |error: StorageError| BackupError::Storage {
        reason: error.to_string(),
    };
    let probe =
        manifest::probe_path(backup_id).map_err(|error| BackupError::Setup(error.to_string()))?;
    storage.probe(&probe).await.map_err(failed)?;
    storage
        .put_atomic(marker, marker_body)
        .await
        .map_err(failed)
}

/// Rewrites the marker every `every`, for as long as it is polled (it never ends):
/// the directory of a running backup never looks older than `every`.
async fn keep_marker_fresh(
    storage: &Storage,
    marker: &str,
    body: bytes::Bytes,
    every: Duration,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(every).await;
        if let Err(error) = storage.put_atomic(marker, body.clone()).await {
            tracing::warn!(%error, "could not refresh the backup's in-progress marker");
        }
    }
}

/// Steps 2–7 once the marker is written: prepare the databases, pause, cut, release,
/// copy, commit. Without a `plan`, the unsafe `--no-pause` copy.
#[allow(clippy::too_many_arguments)]
async fn marked(
    runbook: &Runbook,
    storage: &Storage,
    settings: &PipelineSettings,
    plan: Option<PausePlan>,
    adapters: Vec<Arc<dyn adapters::Adapter>>,
    paths: Vec<Option<String>>,
    backup_id: &str,
    started: Instant,
    progress: ProgressSink,
    cancel: &CancellationToken,
) -> Result<Manifest, Stopped> {
    let backup_id = backup_id.to_owned();
    let unpaused_interrupt = |phase, released: &str| Stopped::Interrupted {
        phase,
        released: released.to_owned(),
        window: None,
    };
    // 2. Prepare: connect and check every database before anything is paused.
    let prepared = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(unpaused_interrupt("prepare", "nothing was paused")),
        prepared = join_all(adapters.iter().map(|adapter| adapter.prepare())) => prepared,
    };
    let mut prepared: Vec<Box<dyn Prepared>> = collect(prepared).map_err(BackupError::Prepare)?;
    let prepare_ms = elapsed_ms(started);

    let Some(plan) = plan else {
        // Dropping the copy under way kills its child process.
        return tokio::select! {
            biased;
            () = cancel.cancelled() => Err(unpaused_interrupt(
                "copy",
                "nothing was paused (--no-pause)",
            )),
            result = unpaused(
                runbook, storage, settings, &adapters, prepared, paths, backup_id, prepare_ms,
                started, progress,
            ) => result,
        };
    };

    // 3–4. Pause, then cut every database inside the pause. A pause under way is not
    // abandoned (nodes would be left to their lease): it is bounded by its deadlines,
    // and released right after if the backup was interrupted meanwhile.
    progress(Progress::Phase("pause"));
    let paused_at = Instant::now();
    let mut paused = coordinator::pause(&plan).await?;
    // The window starts once every node has paused, which is now.
    let window_started = tokio::time::Instant::now();
    progress(Progress::Phase("cut"));
    let cut_started = Instant::now();
    let mut interrupted = cancel.is_cancelled().then_some("pause");
    let cuts = if interrupted.is_some() {
        Err("interrupted".to_owned())
    } else {
        // Dropping the cuts under way (on a signal) kills their child processes.
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                interrupted = Some("cut");
                Err("interrupted".to_owned())
            }
            cuts = cut_all(&mut prepared, &backup_id, &mut paused, &runbook.pause) => cuts,
        }
    };
    let cut_ms = elapsed_ms(cut_started);
    if cuts.is_ok() {
        let hold = required_window(
            paused.record().skew_bound_ms,
            runbook.pause.min_window.unwrap_or_default(),
        );
        tokio::select! {
            biased;
            () = cancel.cancelled() => interrupted = Some("cut"),
            () = paused.hold_until(window_started + hold) => {}
        }
    }

    // 5. Unpause, and prove the window.
    progress(Progress::Phase("unpause"));
    let released = paused.release().await;
    let pause_ms = elapsed_ms(paused_at);
    let window = PauseReport::closed(&released, Zone::UTC);
    if let Some(phase) = interrupted {
        let released = if released.all_released() {
            "every node was released".to_owned()
        } else {
            format!(
                "some nodes could not be released ({}); they reopen when their lease expires",
                released
                    .still_paused()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(Stopped::Interrupted {
            phase,
            released,
            window: Some(Box::new(window)),
        });
    }
    let markers = match cuts {
        Ok(markers) => markers,
        Err(reason) => {
            return Err(BackupError::Cut {
                reason,
                window: Box::new(window),
            }
            .into());
        }
    };
    if let Some(nodes) = released.still_paused_names() {
        return Err(BackupError::Unpause {
            nodes,
            window: Box::new(window),
        }
        .into());
    }
    if !window.window_valid {
        return Err(BackupError::WindowInvalid {
            reasons: window.invalid_reasons.join("; "),
            window: Box::new(window),
        }
        .into());
    }

    // 6. Copy every database, streamed through the pipeline, in parallel.
    progress(Progress::Phase("copy"));
    let copy_started = Instant::now();
    let copying = join_all(prepared.into_iter().zip(&runbook.databases).zip(paths).map(
        |((prepared, database), path)| {
            copy_one(
                prepared,
                database.name.clone(),
                path,
                storage,
                settings,
                progress.clone(),
            )
        },
    ));
    // Dropping the copies under way (on a signal) kills their child processes; the
    // caller then removes what they stored.
    let copies = tokio::select! {
        biased;
        () = cancel.cancelled() => {
            return Err(Stopped::Interrupted {
                phase: "copy",
                released: "the cluster had already been released".to_owned(),
                window: Some(Box::new(window)),
            });
        }
        copies = copying => copies,
    };
    let copies = match collect(copies) {
        Ok(copies) => copies,
        Err(reason) => {
            return Err(Stopped::Copy {
                reason,
                window: Box::new(window),
            });
        }
    };
    let timings = Timings {
        prepare_ms,
        pause_ms,
        cut_ms,
        copy_ms: elapsed_ms(copy_started),
        total_ms: 0,
    };
    progress(Progress::Phase("commit"));
    commit(
        runbook,
        storage,
        &adapters,
        markers,
        copies,
        backup_id,
        window,
        timings,
        started,
        Mode::Paused,
    )
    .await
}

/// `--no-pause`: each database cut and copied in turn while the cluster runs, as a
/// tool without a pause would; the manifest says so.
#[allow(clippy::too_many_arguments)]
async fn unpaused(
    runbook: &Runbook,
    storage: &Storage,
    settings: &PipelineSettings,
    adapters: &[Arc<dyn adapters::Adapter>],
    prepared: Vec<Box<dyn Prepared>>,
    paths: Vec<Option<String>>,
    backup_id: String,
    prepare_ms: u64,
    started: Instant,
    progress: ProgressSink,
) -> Result<Manifest, Stopped> {
    progress(Progress::Phase("copy"));
    let first_cut_ms = unix_ms(SystemTime::now());
    let copy_started = Instant::now();
    let mut markers = Vec::new();
    let mut copies = Vec::new();
    for ((mut database, config), path) in prepared.into_iter().zip(&runbook.databases).zip(paths) {
        let copied = match database.cut(&backup_id).await {
            Ok(marker) => {
                markers.push(marker);
                copy_one(
                    database,
                    config.name.clone(),
                    path,
                    storage,
                    settings,
                    progress.clone(),
                )
                .await
            }
            Err(error) => Err(error),
        };
        match copied {
            Ok(copy) => copies.push(copy),
            Err(error) => {
                return Err(Stopped::Copy {
                    reason: error.to_string(),
                    window: Box::new(PauseReport::unpaused(
                        first_cut_ms,
                        unix_ms(SystemTime::now()),
                        Zone::UTC,
                    )),
                });
            }
        }
    }
    let window = PauseReport::unpaused(first_cut_ms, unix_ms(SystemTime::now()), Zone::UTC);
    let timings = Timings {
        prepare_ms,
        copy_ms: elapsed_ms(copy_started),
        ..Timings::default()
    };
    progress(Progress::Phase("commit"));
    commit(
        runbook,
        storage,
        adapters,
        markers,
        copies,
        backup_id,
        window,
        timings,
        started,
        Mode::UnsafeNoPause,
    )
    .await
}

/// Step 7: the manifest is written last; its presence is the backup.
#[allow(clippy::too_many_arguments)]
async fn commit(
    runbook: &Runbook,
    storage: &Storage,
    adapters: &[Arc<dyn adapters::Adapter>],
    markers: Vec<CutMarker>,
    copies: Vec<(Option<pipeline::ArtifactInfo>, adapters::CopySummary)>,
    backup_id: String,
    window: PauseReport,
    timings: Timings,
    started: Instant,
    mode: Mode,
) -> Result<Manifest, Stopped> {
    let databases = runbook
        .databases
        .iter()
        .zip(adapters)
        .zip(markers)
        .zip(copies)
        .map(
            |(((database, adapter), cut), (artifact, summary))| DatabaseEntry {
                name: database.name.clone(),
                role: database.role.clone(),
                adapter: adapter.kind().to_owned(),
                cut,
                artifact,
                row_counts: summary.row_counts,
            },
        )
        .collect();
    let manifest = Manifest {
        manifest_version: manifest::MANIFEST_VERSION,
        backup_id: backup_id.clone(),
        cluster: runbook.cluster.clone(),
        pause_id: window.pause_id.clone(),
        created_at_ms: unix_ms(SystemTime::now()),
        window: window.clone(),
        databases,
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        status: "committed".to_owned(),
        timings: Timings {
            total_ms: elapsed_ms(started),
            ..timings
        },
        unsafe_no_pause: mode == Mode::UnsafeNoPause,
    };
    if let Err(error) = manifest::write(storage, &manifest).await {
        return Err(Stopped::Commit {
            reason: error.to_string(),
            window: Box::new(window),
        });
    }
    Ok(manifest)
}

/// Cuts every database in parallel under the cut deadline, renewing the lease while
/// they run. Returns the markers in database order, or why the cut failed.
async fn cut_all(
    prepared: &mut [Box<dyn Prepared>],
    backup_id: &str,
    paused: &mut PausedCluster,
    pause: &PauseConfig,
) -> Result<Vec<CutMarker>, String> {
    let cuts = join_all(prepared.iter_mut().map(|database| database.cut(backup_id)));
    let deadline = tokio::time::timeout(pause.cut_deadline, cuts);
    // Timed from the oldest lease granted, as every other renewal is: the first node
    // paused has held its lease since before the pause phase ended.
    let renewing = async {
        loop {
            tokio::time::sleep_until(paused.renewal_due()).await;
            if let Err(reason) = paused.renew().await {
                tracing::warn!(%reason, "lease renewal failed during the cut");
            }
        }
    };
    let results = tokio::select! {
        results = deadline => results.map_err(|_| format!(
            "the cuts did not finish within the cut deadline of {}ms",
            pause.cut_deadline.as_millis()
        ))?,
        never = renewing => never,
    };
    collect(results)
}

async fn copy_one(
    prepared: Box<dyn Prepared>,
    database: String,
    path: Option<String>,
    storage: &Storage,
    settings: &PipelineSettings,
    progress: ProgressSink,
) -> Result<(Option<pipeline::ArtifactInfo>, adapters::CopySummary), AdapterError> {
    let copy = prepared.copy().await?;
    let Some(path) = path else {
        return Ok((None, copy.finished.await?));
    };
    let reporter = {
        let (progress, database) = (progress.clone(), database.clone());
        move |bytes| {
            progress(Progress::Copied {
                database: database.clone(),
                bytes,
            })
        }
    };
    let stored = pipeline::store(copy.stream, settings, storage, &path, reporter).await;
    let artifact = match stored {
        Ok(artifact) => artifact,
        Err(error) => {
            // Dropping the producer's future kills it (pg_dump, an exec command):
            // nobody will read the rest of its output.
            drop(copy.finished);
            return Err(AdapterError::Copy {
                database,
                message: error.to_string(),
            });
        }
    };
    // The producer's verdict matters even when storing succeeded: a truncated dump
    // streams happily to its end.
    let summary = copy.finished.await?;
    progress(Progress::CopyDone { database });
    Ok((Some(artifact), summary))
}

/// Removes a backup that will not be committed: its objects and unfinished uploads.
/// It is not listed either way (no manifest); this keeps the storage clean, and the
/// outcome goes into the error the operator reads.
///
/// It first waits for every write of the backup to end: a copy dropped on a signal
/// (or the marker's heartbeat, dropped with the work) may have a PUT or part under
/// way that still lands, and a delete before it would leave that object behind.
/// Only this backup writes through `storage` (opened by [`run_cancellable`]), so
/// this waits for nothing else.
async fn discard(storage: &Storage, backup_id: &str) -> Cleanup {
    let under_way = storage.writes_under_way();
    if under_way > 0 {
        tracing::warn!(
            %backup_id,
            "waiting for {under_way} storage write(s) of the stopped backup to finish \
             before removing it"
        );
    }
    storage.writes_finished().await;
    let deleted = match manifest::backup_prefix(backup_id) {
        Ok(prefix) => storage
            .delete_prefix(&prefix)
            .await
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match deleted {
        Ok(_) => Cleanup::Deleted {
            backup_id: backup_id.to_owned(),
        },
        Err(error) => Cleanup::Failed {
            backup_id: backup_id.to_owned(),
            error,
        },
    }
}

fn collect<T, E: std::fmt::Display>(results: Vec<Result<T, E>>) -> Result<Vec<T>, String> {
    let mut values = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(value) => values.push(value),
            Err(error) => errors.push(error.to_string()),
        }
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors.join("; "))
    }
}

pub async fn pause_plan(pause: &PauseConfig) -> Result<PausePlan, BackupError> {
    let mut tiers: Vec<Vec<NodeAddress>> = Vec::new();
    for tier in &pause.tiers {
        let nodes = match &tier.srv {
            Some(name) => resolve_srv(name, pause.dns_server)
                .await
                .map_err(|error| BackupError::Setup(error.to_string()))?,
            None => parse_address_list(&tier.addresses.join(","))
                .map_err(|error| BackupError::Setup(error.to_string()))?,
        };
        tiers.push(nodes);
    }
    let mut plan = PausePlan::new(tiers, pause.lease, pause.max_wait);
    let setup = |error: &dyn std::error::Error| BackupError::Setup(error.to_string());
    let tls = match &pause.tls {
        None => None,
        Some(tls) => Some(TlsOptions {
            ca_pem: match &tls.ca_root_cert_path {
                Some(path) => {
                    Some(read_certificate_pem("CA certificate", path).map_err(|e| setup(&e))?)
                }
                None => None,
            },
            override_authority: tls.override_authority.clone(),
            client_identity: match (&tls.client_cert_path, &tls.client_key_path) {
                (Some(cert), Some(key)) => {
                    Some(ClientIdentity::from_files(cert, key).map_err(|e| setup(&e))?)
                }
                _ => None,
            },
        }),
    };
    let token = match (&pause.token_file, &pause.token_env) {
        (Some(path), _) => Some(AdminToken::from_file(path).map_err(|e| setup(&e))?),
        (None, Some(name)) => Some(
            AdminToken::from_env(name)
                .map_err(|e| setup(&e))?
                .ok_or_else(|| {
                    BackupError::Setup(format!("[pause] token_env names {name}, which is not set"))
                })?,
        ),
        (None, None) => None,
    };
    plan.connect = ConnectOptions {
        tls,
        connect_timeout: pause.connect_timeout,
        token,
        allow_plaintext_token: pause.allow_plaintext_token,
    };
    plan.validate()
        .map_err(|error| BackupError::Setup(error.to_string()))?;
    Ok(plan)
}

/// The encoding side of the runbook's pipeline (a passphrase read from its file), for
/// backups and archives.
pub fn pipeline_settings(runbook: &Runbook) -> Result<PipelineSettings, BackupError> {
    let config = &runbook.pipeline;
    let encryption = match (&config.age_recipients[..], &config.age_passphrase_file) {
        ([], None) => pipeline::Encryption::None,
        (recipients, None) => pipeline::Encryption::Recipients(recipients.to_vec()),
        (_, Some(path)) => pipeline::Encryption::Passphrase(read_secret(path)?),
    };
    Ok(PipelineSettings {
        zstd_level: config.zstd_level,
        encryption,
    })
}

/// With both `age_recipients` and an `age_identity_file` that this host can read, at
/// least one identity must belong to a recipient: otherwise every backup would be
/// encrypted to keys the runbook's own identity cannot open, and `verify`, `restore`
/// and `drill` would find out only when they are needed. An identity file this host
/// cannot read (kept on the restore hosts only) is not checked.
fn check_identity_opens(runbook: &Runbook) -> Result<(), BackupError> {
    let config = &runbook.pipeline;
    let Some(file) = &config.age_identity_file else {
        return Ok(());
    };
    if config.age_recipients.is_empty() {
        return Ok(());
    }
    let Ok(pipeline::Decryption::Identities(identities)) =
        pipeline::Decryption::from_identity_file(file)
    else {
        return Ok(());
    };
    let recipients: Vec<&str> = config.age_recipients.iter().map(|r| r.trim()).collect();
    let opens = identities.iter().any(|identity| {
        identity
            .trim()
            .parse::<age::x25519::Identity>()
            .is_ok_and(|identity| recipients.contains(&identity.to_public().to_string().as_str()))
    });
    if opens {
        Ok(())
    } else {
        Err(BackupError::Setup(format!(
            "no identity in age_identity_file {} belongs to any of the {} age_recipients: \
             backups would be encrypted to keys the runbook's own identity cannot open \
             (verify, restore and drill would fail); fix the recipients or the identity \
             file. Nothing was paused",
            file.display(),
            recipients.len()
        )))
    }
}

/// The decryption side of the runbook's pipeline, for verify, restore and drill.
pub fn decryption(runbook: &Runbook) -> Result<pipeline::Decryption, BackupError> {
    let config = &runbook.pipeline;
    if let Some(path) = &config.age_identity_file {
        return pipeline::Decryption::from_identity_file(path)
            .map_err(|error| BackupError::Setup(error.to_string()));
    }
    if let Some(path) = &config.age_passphrase_file {
        return Ok(pipeline::Decryption::Passphrase(read_secret(path)?));
    }
    Ok(pipeline::Decryption::None)
}

fn read_secret(path: &std::path::Path) -> Result<String, BackupError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
        .map_err(|error| BackupError::Setup(format!("reading {}: {error}", path.display())))
}

/// An exec database without a copy command has a cut marker but no artifact.
fn has_copy(config: &AdapterConfig) -> bool {
    !matches!(config, AdapterConfig::Exec(exec) if exec.copy.is_none())
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18.8: the marker a running backup holds is rewritten while it runs, so
    /// its directory never looks older than the heartbeat.
    #[tokio::test]
    async fn the_marker_is_rewritten_while_the_backup_runs() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
        let id = manifest::new_backup_id();
        let marker = manifest::marker_path(&id).unwrap();
        let body = bytes::Bytes::from(manifest::marker_json(&id, 0));
        prepare_storage(&storage, &id, &marker, body.clone())
            .await
            .unwrap();
        let first = storage.head(&marker).await.unwrap().unwrap().last_modified;
        // The probe object is gone again; only the marker is there.
        let listed: Vec<String> = storage
            .list("backups")
            .await
            .unwrap()
            .into_iter()
            .map(|entry| entry.path)
            .collect();
        assert_eq!(listed, std::slice::from_ref(&marker));
        let refreshed = async {
            loop {
                let now = storage.head(&marker).await.unwrap().unwrap().last_modified;
                if now > first {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            within = tokio::time::timeout(Duration::from_secs(30), refreshed) => {
                within.expect("the marker was not rewritten within 30s");
            }
            never = keep_marker_fresh(&storage, &marker, body, Duration::from_millis(50)) => {
                match never {}
            }
        }
    }
}
