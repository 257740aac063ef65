//! The supervision every archiver shares: run its session (one connection, one
//! `pg_receivewal` or `mariadb-binlog`) again and again with backoff until cancelled,
//! and decide which errors retrying cannot fix. The archivers differ only in their
//! session; this loop, the status fields it keeps and the reading of their client's
//! stderr are the same for both.

use std::collections::VecDeque;
use std::future::Future;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ArchiveError;

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// How a session ended without an error.
pub(super) enum Ended {
    Cancelled,
    /// The log's client exited; why, in words.
    Exited(String),
}

/// The fields of an archiver's status that supervision keeps.
pub(super) trait Supervised {
    fn set_streaming(&mut self, streaming: bool);
    fn set_last_error(&mut self, error: String);
    fn count_restart(&mut self);
}

/// `impl Supervised` for an archiver's status with the fields `streaming: bool`,
/// `last_error: Option<String>` and `restarts: u32`, as every one has.
macro_rules! supervised_status {
    ($status:ty) => {
        impl $crate::archive::supervise::Supervised for $status {
            fn set_streaming(&mut self, streaming: bool) {
                self.streaming = streaming;
            }
            fn set_last_error(&mut self, error: String) {
                self.last_error = Some(error);
            }
            fn count_restart(&mut self) {
                self.restarts += 1;
            }
        }
    };
}
pub(super) use supervised_status;

/// Runs `session` until `cancel` fires, starting it again with backoff after it ends
/// or fails. Returns an error only for what retrying cannot fix: a chunk that
/// conflicts with the archive, a name that is not valid, or the server's settings on
/// the first attempt (later, a settings error is taken as the server restarting).
pub(super) async fn supervise<S, F, Fut>(
    database: &str,
    status: &watch::Sender<S>,
    cancel: &CancellationToken,
    mut session: F,
) -> Result<(), ArchiveError>
where
    S: Supervised,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Ended, ArchiveError>>,
{
    let mut backoff = BACKOFF_FIRST;
    let mut first = true;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let started = Instant::now();
        let outcome = session().await;
        status.send_modify(|status| status.set_streaming(false));
        match outcome {
            Ok(Ended::Cancelled) => return Ok(()),
            Ok(Ended::Exited(why)) => {
                tracing::warn!(database, "{why}; starting it again");
                status.send_modify(|status| status.set_last_error(why));
            }
            Err(error @ (ArchiveError::Conflict { .. } | ArchiveError::InvalidName(_))) => {
                return Err(error);
            }
            Err(error @ ArchiveError::Settings { .. }) if first => return Err(error),
            Err(error) => {
                let text = crate::error_chain(&error);
                tracing::warn!(database, "{text}; trying again");
                status.send_modify(|status| status.set_last_error(text));
            }
        }
        first = false;
        if started.elapsed() >= BACKOFF_RESET {
            backoff = BACKOFF_FIRST;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        status.send_modify(S::count_restart);
    }
}

/// The last lines of a log client's stderr kept to explain its exit.
const STDERR_LINES: usize = 20;

/// The stderr of an archiver's log client (`pg_receivewal`, `mariadb-binlog`): each
/// line logged as it comes, the last ones kept to say why the client stopped.
pub(super) struct ClientStderr {
    client: &'static str,
    database: String,
    lines: Option<Lines<BufReader<ChildStderr>>>,
    said: VecDeque<String>,
}

impl ClientStderr {
    pub(super) fn new(client: &'static str, database: &str, child: &mut Child) -> ClientStderr {
        ClientStderr {
            client,
            database: database.to_owned(),
            lines: child.stderr.take().map(|pipe| BufReader::new(pipe).lines()),
            said: VecDeque::new(),
        }
    }

    /// Logs the next line; pending for ever once stderr is closed (for `select!`).
    pub(super) async fn next_line(&mut self) {
        let Some(lines) = self.lines.as_mut() else {
            return std::future::pending().await;
        };
        match lines.next_line().await {
            Ok(Some(line)) => {
                tracing::info!(database = %self.database, "{}: {line}", self.client);
                remember(&mut self.said, line);
            }
            _ => self.lines = None,
        }
    }

    /// Why the client stopped: its exit status and the last lines it wrote (read
    /// to the end first, briefly: what it said last explains the exit).
    pub(super) async fn exit_reason(&mut self, status: std::io::Result<ExitStatus>) -> String {
        if let Some(lines) = self.lines.as_mut() {
            while let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await
            {
                remember(&mut self.said, line);
            }
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let said: Vec<&str> = self.said.iter().map(String::as_str).collect();
        format!("{} stopped ({status}): {}", self.client, said.join(" / "))
    }
}

fn remember(said: &mut VecDeque<String>, line: String) {
    if said.len() == STDERR_LINES {
        said.pop_front();
    }
    said.push_back(line);
}
