//! The gate: per-node admission control. Every transaction enters and leaves it; a
//! pause closes it and waits until nothing is inside.
//!
//! - `admission.rs`: the lock-free counter (one atomic RMW to enter an open gate).
//! - this file: waiting — draining a closed gate, and holding or rejecting requests
//!   that arrive while it is closed.
//! - `layer.rs`: a tower `Layer` that puts any tonic or axum service behind a gate.
//!
//! The gate knows nothing about pause ids or leases; `crate::node` owns those.

mod admission;
mod layer;

pub use layer::{GateLayer, Gated};

use std::sync::Arc;
use std::sync::atomic::AtomicU64 as StatCounter;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use admission::{Admission, Entry};

/// Indirection so that `loom-check/` can compile `admission.rs` with loom's atomics.
mod atomic {
    pub use std::sync::atomic::{AtomicU64, Ordering};
}

/// What happens to a request that arrives while the gate is closed. The application
/// chooses; holding turns a pause into latency instead of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedPolicy {
    /// Refuse at once (gRPC UNAVAILABLE).
    Reject,
    /// Wait for the gate to reopen, up to `timeout`, then refuse.
    Hold { timeout: Duration },
}

/// Why a request was not let in.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("this node is paused for a backup; retry in a moment")]
    Paused,
    #[error(
        "this node stayed paused for a backup longer than the {}ms hold timeout; retry in a moment",
        .0.as_millis()
    )]
    HoldTimedOut(Duration),
}

/// Counters for `Stats` and reports; not used for any decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GateStats {
    pub in_flight: u64,
    pub closed: bool,
    pub held_now: u64,
    pub held_total: u64,
    pub rejected_total: u64,
}

#[derive(Debug)]
pub struct Gate {
    admission: Admission,
    policy: ClosedPolicy,
    /// Woken when the last request leaves a closed gate.
    drained: Notify,
    /// Woken when the gate opens, for held requests.
    reopened: Notify,
    held_now: StatCounter,
    held_total: StatCounter,
    rejected_total: StatCounter,
}

/// Proof of being inside the gate; leaving happens on drop.
#[must_use = "the request leaves the gate when the permit is dropped"]
#[derive(Debug)]
pub struct Permit<'a> {
    gate: &'a Gate,
}

/// A permit that owns a handle to its gate, for futures that must be `'static`.
#[must_use = "the request leaves the gate when the permit is dropped"]
#[derive(Debug)]
pub struct OwnedPermit {
    gate: Arc<Gate>,
}

impl Gate {
    pub fn new(policy: ClosedPolicy) -> Self {
        Self {
            admission: Admission::new(),
            policy,
            drained: Notify::new(),
            reopened: Notify::new(),
            held_now: StatCounter::new(0),
            held_total: StatCounter::new(0),
            rejected_total: StatCounter::new(0),
        }
    }

    pub fn policy(&self) -> ClosedPolicy {
        self.policy
    }

    /// Enters if the gate is open; never waits. One atomic RMW when open.
    #[inline]
    pub fn try_enter(&self) -> Option<Permit<'_>> {
        match self.admission.try_enter() {
            Entry::Admitted => Some(Permit { gate: self }),
            Entry::Closed { was_last } => {
                if was_last {
                    self.drained.notify_waiters();
                }
                None
            }
        }
    }

    /// Enters, applying the gate's [`ClosedPolicy`] when it is closed.
    pub async fn enter(&self) -> Result<Permit<'_>, Refused> {
        if let Some(permit) = self.try_enter() {
            return Ok(permit);
        }
        self.enter_slow().await
    }

    pub async fn enter_owned(self: &Arc<Self>) -> Result<OwnedPermit, Refused> {
        let permit = self.enter().await?;
        // Hand the admission over to the owned permit without leaving and re-entering.
        std::mem::forget(permit);
        Ok(OwnedPermit { gate: self.clone() })
    }

    #[cold]
    async fn enter_slow(&self) -> Result<Permit<'_>, Refused> {
        let timeout = match self.policy {
            ClosedPolicy::Reject => {
                self.rejected_total.fetch_add(1, Relaxed);
                return Err(Refused::Paused);
            }
            ClosedPolicy::Hold { timeout } => timeout,
        };
        self.held_now.fetch_add(1, Relaxed);
        self.held_total.fetch_add(1, Relaxed);
        // Counted out on drop too: a held request whose caller goes away (deadline,
        // disconnect) is dropped right here, and is no longer held.
        let _held = HeldGuard(&self.held_now);
        let deadline = Instant::now() + timeout;
        let outcome = loop {
            let reopened = self.reopened.notified();
            tokio::pin!(reopened);
            // Register before checking, so an `open` between the check and the await
            // cannot be missed.
            reopened.as_mut().enable();
            if let Some(permit) = self.try_enter() {
                break Ok(permit);
            }
            if tokio::time::timeout_at(deadline, reopened).await.is_err() {
                break self.try_enter().ok_or(Refused::HoldTimedOut(timeout));
            }
        };
        if outcome.is_err() {
            self.rejected_total.fetch_add(1, Relaxed);
        }
        outcome
    }

    /// Closes the gate; returns how many requests were inside at that instant.
    pub fn close(&self) -> u64 {
        self.admission.close()
    }

    /// Waits until nothing is inside, or `max_wait` passes; on timeout returns how many
    /// requests are still inside. Does not reopen the gate: the caller decides.
    pub async fn wait_drained(&self, max_wait: Duration) -> Result<(), u64> {
        let deadline = Instant::now() + max_wait;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.admission.in_flight() == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return match self.admission.in_flight() {
                    0 => Ok(()),
                    still_inside => Err(still_inside),
                };
            }
        }
    }

    pub fn open(&self) {
        self.admission.open();
        self.reopened.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.admission.is_closed()
    }

    pub fn in_flight(&self) -> u64 {
        self.admission.in_flight()
    }

    pub fn stats(&self) -> GateStats {
        GateStats {
            in_flight: self.in_flight(),
            closed: self.is_closed(),
            held_now: self.held_now.load(Relaxed),
            held_total: self.held_total.load(Relaxed),
            rejected_total: self.rejected_total.load(Relaxed),
        }
    }

    fn leave(&self) {
        if self.admission.leave() {
            self.drained.notify_waiters();
        }
    }
}

struct HeldGuard<'a>(&'a StatCounter);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

#[cfg(test)]
mod tests;
