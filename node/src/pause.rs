//! The node side of the admin protocol: who holds this node's pause, until when, and
//! whether it is still the same pause. Wraps the [`Gate`] with:
//!
//! - a **pause id** and the **coordinator id** beside it ([`PauseOwner`]): the same
//!   owner renews (idempotent), any other is refused instead of silently merging two
//!   coordinators' pauses, even two given the same pause id;
//! - a **lease**: a pause that is neither renewed nor released reopens the gate by
//!   itself ([`NodeAdmin::run_lease_watchdog`]), so a dead coordinator cannot leave the
//!   node paused;
//! - a **boot id** and a **pause sequence**, so a coordinator can prove afterwards that
//!   the node neither restarted nor was released and re-paused inside its window.
//!
//! Wire types stay out: `crate::grpc::server` converts to and from these types.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;
use crate::time::unix_ms;

/// Longest lease or drain wait a node accepts; longer values are almost certainly a unit
/// mistake (milliseconds given as seconds).
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest pause id or coordinator id a node accepts, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why `id` cannot name a pause (`what`: "pause id", "coordinator id"), if it cannot:
/// ids are written to logs, state files and reports, so they are 1 to
/// [`MAX_ID_LEN`] bytes without control characters (a newline or an escape sequence
/// would forge or garble a log line or a terminal).
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} must be 1 to {MAX_ID_LEN} bytes, got {}",
            id.len()
        ));
    }
    if let Some(control) = id.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{what} \"{}\" contains the control character {control:?}; use letters, \
             digits and punctuation",
            id.escape_default()
        ));
    }
    Ok(())
}

/// Which coordinator asks: the pause id it pauses under (random, or given by an
/// operator with `--pause-id`) and the coordinator instance it is. Two coordinators
/// given the same pause id are still two owners, so neither can renew, merge with or
/// release the other's pause.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PauseOwner {
    pub pause_id: String,
    /// Random per coordinator; empty from clients that predate it, which then match
    /// only each other.
    pub coordinator_id: String,
}

impl PauseOwner {
    pub fn new(pause_id: impl Into<String>, coordinator_id: impl Into<String>) -> Self {
        Self {
            pause_id: pause_id.into(),
            coordinator_id: coordinator_id.into(),
        }
    }
}

impl std::fmt::Display for PauseOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pause id {}", self.pause_id)?;
        if !self.coordinator_id.is_empty() {
            write!(f, " (coordinator {})", self.coordinator_id)?;
        }
        Ok(())
    }
}

/// Who holds a pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A stillpoint coordinator.
    Coordinator(PauseOwner),
    /// An upstream client (ScalarDL/ScalarDB `rpc.Admin`), which has no pause id.
    Upstream,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Coordinator(owner) => owner.fmt(f),
            Holder::Upstream => f.write_str("an upstream admin client (no pause id)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseCommand {
    pub holder: Holder,
    /// `None`: the pause lasts until released (only for upstream pauses on nodes
    /// configured without an upstream lease).
    pub lease: Option<Duration>,
    pub max_wait: Duration,
    pub wait_outstanding: bool,
}

/// A node's answer about its pause state, at `node_time`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub paused: bool,
    pub holder: Option<Holder>,
    pub boot_id: String,
    pub node_time_ms: i64,
    pub paused_since_ms: Option<i64>,
    pub pause_seq: u64,
    /// Live count; while closed it may include a request bouncing off the gate.
    pub in_flight: u64,
    pub drained_in_flight: u64,
    /// Exact: admitted requests inside when the node declared itself paused.
    pub in_flight_at_pause: u64,
    pub lease_remaining: Option<Duration>,
    pub held_now: u64,
}

impl serde::Serialize for Holder {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// False when the node was already open, e.g. because its lease had expired.
    pub was_paused: bool,
    /// The state just before the gate reopened.
    pub status: NodeStatus,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    #[error(
        "{in_flight} request(s) still in flight after waiting {}ms; the gate was reopened",
        .max_wait.as_millis()
    )]
    DrainTimeout { in_flight: u64, max_wait: Duration },
    #[error("this node is already paused by {held_by}; refusing to merge it with {requested_by}")]
    HeldByOther {
        held_by: Holder,
        requested_by: Holder,
    },
    #[error("this node is not paused under {owner} (it is {current})")]
    NotPausedBy { owner: PauseOwner, current: String },
    #[error("the pause was cancelled by an unpause while it was draining")]
    CancelledWhileDraining,
    #[error("invalid request: {0}")]
    InvalidArgument(String),
}

/// The coarse kind of an [`AdminError`]: what a caller may do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The node is busy or held; retrying later may work.
    Retryable,
    /// Another holder owns the pause: retrying will not help until it is released.
    Conflict,
    /// The request itself is wrong.
    Invalid,
}

impl AdminError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdminError::DrainTimeout { .. } | AdminError::NotPausedBy { .. } => {
                ErrorKind::Retryable
            }
            AdminError::HeldByOther { .. } | AdminError::CancelledWhileDraining => {
                ErrorKind::Conflict
            }
            AdminError::InvalidArgument(_) => ErrorKind::Invalid,
        }
    }
}

#[derive(Debug)]
enum Phase {
    Open,
    Draining {
        holder: Holder,
        attempt: u64,
    },
    Paused {
        holder: Holder,
        since: SystemTime,
        drained_in_flight: u64,
        in_flight_at_pause: u64,
        lease_deadline: Option<Instant>,
    },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    pause_seq: u64,
    attempts: u64,
}

/// The node-side pause controller. One per node process, shared by the admin services.
#[derive(Debug)]
pub struct NodeAdmin {
    gate: Arc<Gate>,
    boot_id: String,
    upstream_lease: Option<Duration>,
    state: Mutex<State>,
    /// Woken on every phase change: by the lease watchdog and by pauses waiting to join.
    changed: Notify,
}

impl NodeAdmin {
    /// `upstream_lease` bounds pauses from upstream clients, which cannot renew; `None`
    /// keeps them until released, as upstream servers do.
    pub fn new(gate: Arc<Gate>, upstream_lease: Option<Duration>) -> Self {
        Self {
            gate,
            boot_id: uuid::Uuid::new_v4().to_string(),
            upstream_lease,
            state: Mutex::new(State {
                phase: Phase::Open,
                pause_seq: 0,
                attempts: 0,
            }),
            changed: Notify::new(),
        }
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn upstream_lease(&self) -> Option<Duration> {
        self.upstream_lease
    }

    /// Closes the gate and waits for it to drain, or renews the lease when `command`'s
    /// holder already holds the pause.
    pub async fn pause(&self, command: PauseCommand) -> Result<NodeStatus, AdminError> {
        validate(&command)?;
        let (attempt, in_flight_at_close) = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                match &mut state.phase {
                    Phase::Paused {
                        holder,
                        lease_deadline,
                        ..
                    } => {
                        if *holder != command.holder {
                            return Err(AdminError::HeldByOther {
                                held_by: holder.clone(),
                                requested_by: command.holder,
                            });
                        }
                        *lease_deadline = command.lease.map(|lease| Instant::now() + lease);
                        self.changed.notify_waiters();
                        return Ok(self.status_of(&state));
                    }
                    Phase::Draining { holder, .. } if *holder != command.holder => {
                        return Err(AdminError::HeldByOther {
                            held_by: holder.clone(),
                            requested_by: command.holder,
                        });
                    }
                    // The same holder is already draining (a retried call): wait for
                    // that attempt's outcome, then decide again.
                    Phase::Draining { .. } => {}
                    Phase::Open => {
                        state.attempts += 1;
                        let attempt = state.attempts;
                        let in_flight = self.gate.close();
                        state.phase = Phase::Draining {
                            holder: command.holder.clone(),
                            attempt,
                        };
                        break (attempt, in_flight);
                    }
                }
            }
            changed.await;
        };

        // If this future is dropped mid-drain (the caller went away), reopen the gate.
        let mut guard = DrainGuard {
            admin: self,
            attempt,
            armed: true,
        };
        let drained = if command.wait_outstanding {
            self.gate.wait_drained(command.max_wait).await
        } else {
            Ok(())
        };
        guard.armed = false;

        let mut state = self.lock();
        if !matches!(state.phase, Phase::Draining { attempt: a, .. } if a == attempt) {
            return Err(AdminError::CancelledWhileDraining);
        }
        match drained {
            Ok(()) => {
                state.pause_seq += 1;
                state.phase = Phase::Paused {
                    holder: command.holder,
                    since: SystemTime::now(),
                    drained_in_flight: in_flight_at_close,
                    // A completed drain observed zero admitted requests; without a
                    // drain, whatever was inside at close is still (maybe) inside.
                    in_flight_at_pause: if command.wait_outstanding {
                        0
                    } else {
                        in_flight_at_close
                    },
                    lease_deadline: command.lease.map(|lease| Instant::now() + lease),
                };
                self.changed.notify_waiters();
                Ok(self.status_of(&state))
            }
            Err(in_flight) => {
                self.reopen(&mut state);
                tracing::warn!(
                    in_flight,
                    max_wait_ms = command.max_wait.as_millis() as u64,
                    "pause failed: requests did not drain in time; gate reopened"
                );
                Err(AdminError::DrainTimeout {
                    in_flight,
                    max_wait: command.max_wait,
                })
            }
        }
    }

    /// Extends the lease of the pause `owner` holds.
    pub fn renew(&self, owner: &PauseOwner, lease: Duration) -> Result<NodeStatus, AdminError> {
        validate_lease(lease)?;
        let mut state = self.lock();
        let wanted = Holder::Coordinator(owner.clone());
        match &mut state.phase {
            Phase::Paused {
                holder,
                lease_deadline,
                ..
            } if *holder == wanted => {
                *lease_deadline = Some(Instant::now() + lease);
                self.changed.notify_waiters();
                Ok(self.status_of(&state))
            }
            other => Err(AdminError::NotPausedBy {
                owner: owner.clone(),
                current: describe(other),
            }),
        }
    }

    /// Reopens the gate. `Some(owner)` is refused when another holder has the pause;
    /// `None` is the upstream Unpause, which always works.
    pub fn unpause(&self, owner: Option<&PauseOwner>) -> Result<Released, AdminError> {
        let mut state = self.lock();
        let status = self.status_of(&state);
        let (held_by, was_paused) = match &state.phase {
            Phase::Open => {
                return Ok(Released {
                    was_paused: false,
                    status,
                });
            }
            Phase::Draining { holder, .. } => (holder.clone(), false),
            Phase::Paused { holder, .. } => (holder.clone(), true),
        };
        if let Some(owner) = owner {
            let requested_by = Holder::Coordinator(owner.clone());
            if held_by != requested_by {
                return Err(AdminError::HeldByOther {
                    held_by,
                    requested_by,
                });
            }
        }
        self.reopen(&mut state);
        Ok(Released { was_paused, status })
    }

    pub fn status(&self) -> NodeStatus {
        self.status_of(&self.lock())
    }

    /// Reopens the gate when a lease runs out. Runs until `shutdown`; the node's `run`
    /// awaits it beside the servers.
    pub async fn run_lease_watchdog(&self, shutdown: CancellationToken) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = match self.lock().phase {
                Phase::Paused {
                    lease_deadline: Some(deadline),
                    ..
                } => Some(deadline),
                _ => None,
            };
            let expired = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut changed => {}
                () = expired => self.expire_lease_if_due(),
            }
        }
    }

    fn expire_lease_if_due(&self) {
        let mut state = self.lock();
        if let Phase::Paused {
            holder,
            since,
            lease_deadline: Some(deadline),
            ..
        } = &state.phase
            && *deadline <= Instant::now()
        {
            let paused_for = since.elapsed().unwrap_or_default();
            let holder = holder.to_string();
            // Reopened before it is logged: a log write that fails (an embedding
            // application's subscriber may panic on a closed stderr) must never keep
            // the gate closed past its lease.
            self.reopen(&mut state);
            drop(state);
            tracing::warn!(
                holder = %holder,
                paused_for_ms = paused_for.as_millis() as u64,
                "lease expired: the pause was neither renewed nor released (coordinator \
                 gone?); the gate was reopened"
            );
        }
    }

    fn reopen(&self, state: &mut State) {
        state.phase = Phase::Open;
        self.gate.open();
        self.changed.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this file; the state is
        // still meaningful, so keep serving rather than poisoning every later call.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn status_of(&self, state: &State) -> NodeStatus {
        let gate = self.gate.stats();
        let (paused, holder, since, drained, at_pause, lease_remaining) = match &state.phase {
            Phase::Open => (false, None, None, 0, 0, None),
            Phase::Draining { holder, .. } => (false, Some(holder.clone()), None, 0, 0, None),
            Phase::Paused {
                holder,
                since,
                drained_in_flight,
                in_flight_at_pause,
                lease_deadline,
            } => (
                true,
                Some(holder.clone()),
                Some(unix_ms(*since)),
                *drained_in_flight,
                *in_flight_at_pause,
                lease_deadline.map(|d| d.saturating_duration_since(Instant::now())),
            ),
        };
        NodeStatus {
            paused,
            holder,
            boot_id: self.boot_id.clone(),
            node_time_ms: unix_ms(SystemTime::now()),
            paused_since_ms: since,
            pause_seq: state.pause_seq,
            in_flight: gate.in_flight,
            drained_in_flight: drained,
            in_flight_at_pause: at_pause,
            lease_remaining,
            held_now: gate.held_now,
        }
    }
}

struct DrainGuard<'a> {
    admin: &'a NodeAdmin,
    attempt: u64,
    armed: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.admin.lock();
        if matches!(state.phase, Phase::Draining { attempt, .. } if attempt == self.attempt) {
            // Reopened first: see `expire_lease_if_due`.
            self.admin.reopen(&mut state);
            drop(state);
            tracing::warn!("pause abandoned by its caller while draining; the gate was reopened");
        }
    }
}

fn describe(phase: &Phase) -> String {
    match phase {
        Phase::Open => "not paused".to_owned(),
        Phase::Draining { holder, .. } => format!("draining for {holder}"),
        Phase::Paused { holder, .. } => format!("paused by {holder}"),
    }
}

fn validate(command: &PauseCommand) -> Result<(), AdminError> {
    if let Holder::Coordinator(owner) = &command.holder {
        check_id("pause id", &owner.pause_id).map_err(AdminError::InvalidArgument)?;
        // Empty from clients that predate coordinator ids.
        if !owner.coordinator_id.is_empty() {
            check_id("coordinator id", &owner.coordinator_id)
                .map_err(AdminError::InvalidArgument)?;
        }
    }
    if let Some(lease) = command.lease {
        validate_lease(lease)?;
    }
    if command.max_wait > MAX_LEASE {
        return Err(AdminError::InvalidArgument(format!(
            "max pause wait {}ms is longer than the {}h limit",
            command.max_wait.as_millis(),
            MAX_LEASE.as_secs() / 3600
        )));
    }
    Ok(())
}

fn validate_lease(lease: Duration) -> Result<(), AdminError> {
    if lease.is_zero() || lease > MAX_LEASE {
        return Err(AdminError::InvalidArgument(format!(
            "lease must be between 1ms and {}h, got {}ms",
            MAX_LEASE.as_secs() / 3600,
            lease.as_millis()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
