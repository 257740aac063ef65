//! The gate's admission counter: one atomic word, nothing else.
//!
//! The top bit says "closed", the other 63 bits count requests inside. This file uses
//! only `super::atomic`, so that `loom-check/` can compile this very file against loom's
//! atomics and explore every interleaving of enter, leave, close and open.

use super::atomic::{AtomicU64, Ordering};

const CLOSED: u64 = 1 << 63;
const COUNT_MASK: u64 = CLOSED - 1;

/// What a request that tried to enter learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// It is inside and must call [`Admission::leave`] exactly once.
    Admitted,
    /// The gate was closed; it is not inside and must not call `leave`.
    Closed {
        /// It was the last one out of a closed gate: a drainer may be waiting for that.
        was_last: bool,
    },
}

#[derive(Debug, Default)]
pub struct Admission {
    state: AtomicU64,
}

impl Admission {
    pub fn new() -> Self {
        Self::default()
    }

    /// One read-modify-write on the fast path. Acquire keeps the request's own work
    /// from being reordered before its admission.
    #[inline]
    pub fn try_enter(&self) -> Entry {
        let before = self.state.fetch_add(1, Ordering::Acquire);
        if before & CLOSED == 0 {
            Entry::Admitted
        } else {
            // Back out. Counting first and checking after (instead of a CAS loop) keeps
            // the open path to one instruction; the drainer tolerates the brief bump.
            Entry::Closed {
                was_last: self.leave(),
            }
        }
    }

    /// Returns true when this was the last request inside a closed gate. Release makes
    /// the request's work visible to the drainer that observes the count reach zero.
    #[inline]
    pub fn leave(&self) -> bool {
        let before = self.state.fetch_sub(1, Ordering::Release);
        debug_assert!(before & COUNT_MASK > 0, "gate left more often than entered");
        before == CLOSED | 1
    }

    /// Closes the gate and returns how many requests were inside at that instant.
    pub fn close(&self) -> u64 {
        self.state.fetch_or(CLOSED, Ordering::AcqRel) & COUNT_MASK
    }

    pub fn open(&self) {
        self.state.fetch_and(!CLOSED, Ordering::AcqRel);
    }

    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    pub fn in_flight(&self) -> u64 {
        self.state.load(Ordering::Acquire) & COUNT_MASK
    }
}
