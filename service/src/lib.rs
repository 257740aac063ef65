//! `stillpoint serve`: one long-running process for one runbook. It keeps the
//! runbook's archivers running, runs its `[schedule]` (points, base backups, backups,
//! drills, verify, prune), and answers an HTTP API, Prometheus metrics and a status
//! page. It keeps no state of its own outside the runbook's storage: restarted, it
//! reads back what is there (points, backups, bases, archives, job records).
//!
//! Layout (data flows API/schedule → jobs → the `stillpoint` library → storage):
//! - `lib.rs`: [`ServeConfig`], [`Service`] (what every part shares), [`run`]: start,
//!   serve, and stop in order on shutdown.
//! - `schedule.rs`: when each scheduled job is due, catch-up after downtime.
//! - `jobs.rs`: the job table, the rules that keep jobs apart, job records.
//! - `work.rs`: what each kind of job does (one library call each).
//! - `archiving.rs`: the archivers, their progress and lag.
//! - `nodes.rs`: connections to the nodes kept open between pauses; their pause state.
//! - `view.rs`: what storage holds (points, backups, bases, archives), re-read after
//!   each job and every few seconds.
//! - `api.rs`: HTTP routes, bearer tokens and roles, JSON errors.
//! - `metrics.rs`: the Prometheus metrics.
//! - `page.rs`: the status page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stillpoint::archive::archivers::Archiver;
use stillpoint::grpc::pool::ConnectionPool;
use stillpoint::pipeline::PipelineSettings;
use stillpoint::runbook::Runbook;
use stillpoint::storage::Storage;
use stillpoint_node::grpc::auth::{AdminToken, ServerTls};
use tokio::net::TcpListener;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod api;
mod archiving;
pub mod jobs;
pub mod metrics;
mod nodes;
mod page;
mod schedule;
mod view;
mod work;

pub use jobs::{JobRecord, JobState, Trigger};

/// Everything `stillpoint serve` is started with.
pub struct ServeConfig {
    pub runbook: Runbook,
    /// The API's operator token: triggers jobs, reads everything.
    pub operator_token: AdminToken,
    /// A token that may only read.
    pub observer_token: Option<AdminToken>,
    /// Serve HTTPS with this certificate and key.
    pub tls: Option<ServerTls>,
    /// `/` and `/metrics` answer without a token.
    pub public_status: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The runbook, storage or tokens cannot be used; nothing was started.
    #[error("{0}")]
    Setup(String),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// What every part of the service shares.
pub struct Service {
    runbook: Runbook,
    storage: Storage,
    settings: PipelineSettings,
    jobs: jobs::Jobs,
    metrics: metrics::Metrics,
    archives: archiving::ArchiveBoard,
    view: RwLock<view::View>,
    auth: api::Auth,
    /// Connections to the nodes, kept open between pauses.
    pool: Arc<ConnectionPool>,
    public_status: bool,
    /// Set once storage answered and the archivers started: `/readyz` says so.
    ready: AtomicBool,
    /// Fired by SIGTERM: no new jobs, running ones dropped (a pause released).
    shutdown: CancellationToken,
    /// Every job, so that shutdown waits for each to let go of what it holds.
    tasks: TaskTracker,
}

/// How often what storage holds is read again besides after each job: archives grow
/// on their own.
const VIEW_EVERY: Duration = Duration::from_secs(5);

/// Runs the service on `listener` until `shutdown` fires, then stops in order: no new
/// jobs; a job in progress is dropped (a pause in progress is released by the service
/// itself); archivers push what they have; the HTTP server finishes its answers.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let runbook = config.runbook;
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .map_err(|error| ServeError::Setup(error.to_string()))?;
    let settings = stillpoint::backup::pipeline_settings(&runbook)
        .map_err(|error| ServeError::Setup(error.to_string()))?;
    settings
        .check()
        .map_err(|error| ServeError::Setup(format!("the [pipeline] settings: {error}")))?;
    let archivers = if runbook.databases.iter().any(|db| db.archive) {
        Archiver::for_runbook(&runbook, None)
            .map_err(|error| ServeError::Setup(error.to_string()))?
    } else {
        Vec::new()
    };
    let auth = api::Auth::new(&config.operator_token, config.observer_token.as_ref())
        .map_err(ServeError::Setup)?;
    // An object of its own under service/: "service/" itself is where job records
    // live, a directory on file storage once one job has ended, so a probe put there
    // refused every restart.
    let probe = format!("service/probe-{}", uuid::Uuid::new_v4().simple());
    let Some(probed) = unless_stopped(&shutdown, storage.probe(&probe)).await else {
        return Ok(());
    };
    probed.map_err(|error| {
        ServeError::Setup(format!(
            "the storage {} cannot be written: {error}",
            storage.url()
        ))
    })?;
    let Some(restored) = unless_stopped(&shutdown, jobs::restore_records(&storage)).await else {
        return Ok(());
    };
    let service = Arc::new(Service {
        runbook,
        storage,
        settings,
        jobs: jobs::Jobs::new(restored),
        metrics: metrics::Metrics::new(),
        archives: archiving::ArchiveBoard::default(),
        view: RwLock::new(view::View::default()),
        auth,
        pool: Arc::new(ConnectionPool::default()),
        public_status: config.public_status,
        ready: AtomicBool::new(false),
        shutdown,
        tasks: TaskTracker::new(),
    });
    if unless_stopped(&service.shutdown, service.refresh_view())
        .await
        .is_none()
    {
        return Ok(());
    }

    let archiving = tokio::spawn(archiving::run(service.clone(), archivers));
    service.ready.store(true, Ordering::Relaxed);
    let scheduling = tokio::spawn(schedule::run(service.clone()));
    let viewing = tokio::spawn(refresh_views(service.clone()));
    let watching = tokio::spawn(nodes::watch(service.clone()));
    let serving = api::serve(service.clone(), listener, config.tls);
    tracing::info!(
        "serving runbook {} ({} scheduled job kinds)",
        service.runbook.cluster,
        service.runbook.schedule.entries.len()
    );
    let served = serving.await;

    // The HTTP server returns once `shutdown` fired (or it failed: then stop the rest).
    service.shutdown.cancel();
    service.ready.store(false, Ordering::Relaxed);
    let _ = scheduling.await;
    service.tasks.close();
    service.tasks.wait().await;
    let _ = archiving.await;
    let _ = viewing.await;
    let _ = watching.await;
    tracing::info!("stopped: every job ended and every archiver flushed");
    served.map_err(ServeError::Http)
}

/// `work` unless `shutdown` fires first (then `None`). Start-up waits on storage, which
/// may not answer for minutes (an S3 endpoint behind a dropped route): SIGTERM stopped
/// nothing then, and systemd killed the service at its TimeoutStopSec.
async fn unless_stopped<T>(
    shutdown: &CancellationToken,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        value = work => Some(value),
        () = shutdown.cancelled() => {
            tracing::info!("stopped during start-up, before anything ran");
            None
        }
    }
}

async fn refresh_views(service: Arc<Service>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(VIEW_EVERY) => service.refresh_view().await,
            () = service.shutdown.cancelled() => return,
        }
    }
}

/// The address a listener bound, for logs and tests.
pub fn local_address(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
