//! The runbook's archivers inside the service: started with it, restarted with
//! backoff by their own supervision (`stillpoint::archive::supervise`), started again
//! here if one stops with an error retrying could not fix (after a longer pause, and
//! said in the log and its status), and stopped with a flush on shutdown. Watches each
//! one's progress for the API and metrics, and turns it into a lag in seconds: how
//! long the oldest log byte the archive does not hold yet has been on the server.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use stillpoint::archive::Position;
use stillpoint::archive::archivers::{Archiver, Progress};

use crate::Service;

/// How often each archiver's progress is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(200);
/// After an archiver stopped with an error its own supervision could not fix.
const RESTART_AFTER: Duration = Duration::from_secs(30);

/// One database's archive as the API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiveState {
    pub database: String,
    pub streaming: bool,
    pub archived_to: Option<String>,
    pub server_position: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub chunks_stored: u64,
    pub restarts: u32,
    pub last_chunk: Option<String>,
    pub last_error: Option<String>,
    /// PostgreSQL with `changes = true`: how far its change stream holds every
    /// commit, and its capture's last error.
    pub changes_to: Option<String>,
    pub changes_error: Option<String>,
}

/// The newest state of every archiver, by database.
#[derive(Default)]
pub struct ArchiveBoard {
    states: Mutex<BTreeMap<String, ArchiveState>>,
}

impl ArchiveBoard {
    pub fn all(&self) -> Vec<ArchiveState> {
        self.states
            .lock()
            .expect("archive board")
            .values()
            .cloned()
            .collect()
    }

    fn set(&self, state: ArchiveState) {
        self.states
            .lock()
            .expect("archive board")
            .insert(state.database.clone(), state);
    }
}

/// The server positions seen, oldest first, so a lag in seconds can be read off: the
/// time of the first position the archive has not reached.
#[derive(Default)]
struct Lag {
    seen: VecDeque<(Instant, Position)>,
}

impl Lag {
    fn observe(&mut self, now: Instant, progress: &Progress) -> Option<Duration> {
        let server = progress.server.clone()?;
        if self.seen.back().is_none_or(|(_, last)| *last != server) {
            self.seen.push_back((now, server));
        }
        let Some(archived) = &progress.archived_to else {
            return self.seen.front().map(|(at, _)| now - *at);
        };
        while self
            .seen
            .front()
            .is_some_and(|(_, position)| position <= archived)
        {
            self.seen.pop_front();
        }
        Some(
            self.seen
                .front()
                .map_or(Duration::ZERO, |(at, _)| now - *at),
        )
    }
}

/// Runs every archiver of the runbook until the service shuts down. Returns once each
/// has flushed and stopped.
pub async fn run(service: Arc<Service>, archivers: Vec<Archiver>) {
    let runs = archivers
        .into_iter()
        .map(|archiver| keep_running(service.clone(), archiver));
    futures::future::join_all(runs).await;
}

async fn keep_running(service: Arc<Service>, archiver: Archiver) {
    let database = archiver.database().to_owned();
    let cancel = service.shutdown.child_token();
    let watching = watch(&service, &archiver);
    let running = async {
        loop {
            match archiver.run(&cancel).await {
                Ok(()) => return,
                Err(error) => {
                    let text = stillpoint::error_chain(&error);
                    tracing::error!(
                        database,
                        "the archiver stopped: {text}; starting it again in {}s",
                        RESTART_AFTER.as_secs()
                    );
                    tokio::select! {
                        () = tokio::time::sleep(RESTART_AFTER) => {}
                        () = cancel.cancelled() => return,
                    }
                }
            }
        }
    };
    tokio::join!(running, watching);
}

/// Publishes the archiver's progress to the board and metrics until it stops.
async fn watch(service: &Service, archiver: &Archiver) {
    let database = archiver.database().to_owned();
    let mut progress = archiver.watch();
    let mut lag = Lag::default();
    let mut stopping = false;
    loop {
        let now = progress.look();
        let lag_seconds = lag.observe(Instant::now(), &now);
        service.metrics.archive(
            &database,
            lag_seconds,
            now.lag_bytes,
            now.streaming,
            now.restarts,
        );
        service.archives.set(ArchiveState {
            database: database.clone(),
            streaming: now.streaming,
            archived_to: now.archived_to.as_ref().map(ToString::to_string),
            server_position: now.server.as_ref().map(ToString::to_string),
            lag_bytes: now.lag_bytes,
            lag_seconds: lag_seconds.map(|lag| lag.as_secs_f64()),
            chunks_stored: now.chunks_stored,
            restarts: now.restarts,
            last_chunk: now.last_chunk.clone(),
            last_error: now.last_error.clone(),
            changes_to: now.changes_to.as_ref().map(ToString::to_string),
            changes_error: now.changes_error.clone(),
        });
        if stopping {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(LOOK_EVERY) => {}
            () = service.shutdown.cancelled() => {
                progress.stopped().await;
                stopping = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint::archive::Lsn;

    fn progress(server: u64, archived: Option<u64>) -> Progress {
        Progress {
            archived_to: archived.map(|lsn| Position::Lsn(Lsn(lsn))),
            server: Some(Position::Lsn(Lsn(server))),
            server_key: "server_lsn",
            lag_bytes: None,
            last_chunk: None,
            chunks_stored: 0,
            streaming: true,
            restarts: 0,
            last_error: None,
            changes_to: None,
            changes_error: None,
        }
    }

    #[test]
    fn the_lag_is_the_age_of_the_oldest_position_not_archived() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut lag = Lag::default();
        // Caught up: no lag.
        assert_eq!(
            lag.observe(at(0), &progress(100, Some(100))),
            Some(Duration::ZERO)
        );
        // The server moves on at 1 s and 2 s; the archive still holds 100 at 3 s.
        lag.observe(at(1000), &progress(200, Some(100)));
        lag.observe(at(2000), &progress(300, Some(100)));
        assert_eq!(
            lag.observe(at(3000), &progress(300, Some(100))),
            Some(Duration::from_millis(2000))
        );
        // The archive reaches 200: the oldest byte missing is 300's, seen at 2 s.
        assert_eq!(
            lag.observe(at(3500), &progress(300, Some(200))),
            Some(Duration::from_millis(1500))
        );
        // A server that keeps writing while the archive keeps up has no lag to speak of.
        assert_eq!(
            lag.observe(at(4000), &progress(300, Some(300))),
            Some(Duration::ZERO)
        );
    }
}
