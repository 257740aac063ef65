//! The consistency check of a ledger database and an auditor database, live or
//! restored from a backup. Pure functions over snapshots, so each invariant can be
//! tested against a tampered copy:
//!
//! - `balances`: money is neither created nor destroyed (sum == initial total, and no
//!   account is negative);
//! - `hash_chain`: every link points at the previous one and recomputes;
//! - `ledger_matches_auditor`: both tiers know exactly the same (tx_id, hash) pairs,
//!   compared as multisets (a row twice is a difference, named) — the property a backup
//!   taken outside one pause breaks;
//! - `quiet_window` (optional): nothing was committed or recorded strictly inside a
//!   window, e.g. a pause ([`Window`] says the rule and refuses absurd windows).

use std::collections::{BTreeMap, BTreeSet};

use stillpoint_node::pause::MAX_LEASE;

use crate::chain::{GENESIS_HASH, link_hash};
use crate::store::{AuditRow, LedgerSnapshot};

/// How many tx ids a failed check names before it says "and N more".
const NAMED: usize = 10;

/// A range of Unix milliseconds, open at both ends: `(start, end)`. A stamp in the very
/// millisecond of either edge is outside, because it cannot be told from one just
/// before or just after it (timestamps have millisecond resolution). So a window
/// must be at least 2 ms long to contain anything; [`Window::new`] refuses shorter
/// ones, and ones that cannot be a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// The earliest plausible edge, 2001-09-09 in Unix milliseconds. An edge before it is
/// almost surely in seconds: 1700000000 is 2023 in seconds but January 1970 in ms.
const EARLIEST_MS: i64 = 1_000_000_000_000;

impl Window {
    /// The window `(start_ms, end_ms)`, or why it cannot be checked: edges the wrong
    /// way round, shorter than 2 ms (nothing could ever be inside, so the check could
    /// never fail), edges in seconds rather than milliseconds, or longer than any pause
    /// can be (a node's lease is at most [`MAX_LEASE`]).
    pub fn new(start_ms: i64, end_ms: i64) -> Result<Window, String> {
        if start_ms > end_ms {
            return Err(format!(
                "the window start {start_ms} is after its end {end_ms}"
            ));
        }
        if start_ms < EARLIEST_MS {
            return Err(format!(
                "the window start {start_ms} is before 2001: give Unix milliseconds, not \
                 seconds (e.g. {})",
                start_ms.saturating_mul(1000)
            ));
        }
        let length = end_ms - start_ms;
        if length < 2 {
            return Err(format!(
                "the window ({start_ms}, {end_ms}) is {length} ms long; its edges are outside \
                 it, so it must be at least 2 ms long to contain a millisecond"
            ));
        }
        if length as u128 > MAX_LEASE.as_millis() {
            return Err(format!(
                "the window ({start_ms}, {end_ms}) is {length} ms long, longer than any pause \
                 can be ({} ms, the longest lease)",
                MAX_LEASE.as_millis()
            ));
        }
        Ok(Window { start_ms, end_ms })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub checks: Vec<Check>,
    /// Rows in the ledger.
    pub transactions: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

pub fn check(ledger: &LedgerSnapshot, audit: &[AuditRow], window: Option<Window>) -> CheckReport {
    check_knowing_unaudited(ledger, audit, window, &BTreeSet::new())
}

/// [`check`], where the transactions in `unaudited` may be in the ledger and missing
/// from the auditor (and only those, only that way): their ledger node died between
/// its ledger commit and its auditor record. The reference ledger has no outbox, so a
/// SIGKILLed node leaves such transactions behind for good; a test that kills nodes
/// (scripts/nemesis) knows which they are from the live databases, and every point
/// after the kill holds them too.
pub fn check_knowing_unaudited(
    ledger: &LedgerSnapshot,
    audit: &[AuditRow],
    window: Option<Window>,
    unaudited: &BTreeSet<String>,
) -> CheckReport {
    let mut checks = vec![
        balances(ledger),
        hash_chain(ledger),
        ledger_matches_auditor(ledger, audit, unaudited),
    ];
    if let Some(window) = window {
        checks.push(quiet_window(ledger, audit, window));
    }
    CheckReport {
        ok: checks.iter().all(|check| check.ok),
        checks,
        transactions: ledger.rows.len(),
    }
}

fn passed(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: true,
        detail,
    }
}

fn failed(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: false,
        detail,
    }
}

fn balances(ledger: &LedgerSnapshot) -> Check {
    const NAME: &str = "balances";
    // i128: a tampered balance must produce a message, not an overflow.
    let sum: i128 = ledger.balances.iter().map(|&(_, b)| i128::from(b)).sum();
    let negative: Vec<String> = ledger
        .balances
        .iter()
        .filter(|&&(_, balance)| balance < 0)
        .map(|(id, balance)| format!("account {id} holds {balance}"))
        .collect();
    let mut problems = Vec::new();
    if sum != i128::from(ledger.initial_total) {
        problems.push(format!(
            "balances sum to {sum}, expected {}",
            ledger.initial_total
        ));
    }
    if !negative.is_empty() {
        problems.push(format!("negative balances: {}", name_some(&negative)));
    }
    if problems.is_empty() {
        passed(
            NAME,
            format!(
                "{} accounts sum to {}",
                ledger.balances.len(),
                ledger.initial_total
            ),
        )
    } else {
        failed(NAME, problems.join("; "))
    }
}

/// Reports the first broken link only: every later link depends on it.
fn hash_chain(ledger: &LedgerSnapshot) -> Check {
    const NAME: &str = "hash_chain";
    let mut expected_prev = GENESIS_HASH;
    for row in &ledger.rows {
        if row.prev_hash != expected_prev {
            return failed(
                NAME,
                format!(
                    "hash chain broken at seq {} (tx {}): prev_hash {} is not the previous link's hash {}",
                    row.seq, row.tx_id, row.prev_hash, expected_prev
                ),
            );
        }
        let recomputed = link_hash(&row.prev_hash, &row.tx_id, row.from, row.to, row.amount);
        if row.hash != recomputed {
            return failed(
                NAME,
                format!(
                    "hash chain broken at seq {} (tx {}): stored hash {} does not match its contents (recomputed {})",
                    row.seq, row.tx_id, row.hash, recomputed
                ),
            );
        }
        expected_prev = &row.hash;
    }
    passed(NAME, format!("{} links verified", ledger.rows.len()))
}

/// Compares the (tx id, hash) rows of both tiers as multisets: a tx id missing from
/// one side, a hash that differs, and a tx id that appears more than once on a side
/// (a duplicate row, or a second row with another hash) are each named.
fn ledger_matches_auditor(
    ledger: &LedgerSnapshot,
    audit: &[AuditRow],
    unaudited: &BTreeSet<String>,
) -> Check {
    const NAME: &str = "ledger_matches_auditor";
    let mut hashes: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
    for row in &ledger.rows {
        hashes.entry(&row.tx_id).or_default().0.push(&row.hash);
    }
    for row in audit {
        hashes.entry(&row.tx_id).or_default().1.push(&row.hash);
    }
    let mut missing_from_audit = Vec::new();
    let mut known_unaudited = 0;
    let mut missing_from_ledger = Vec::new();
    let mut differing = Vec::new();
    let mut repeated = Vec::new();
    for (tx, (in_ledger, in_audit)) in &hashes {
        for (side, rows) in [("ledger", in_ledger), ("auditor", in_audit)] {
            if rows.len() > 1 {
                repeated.push(format!(
                    "{tx} ({} times in the {side}: {})",
                    rows.len(),
                    rows.join(", ")
                ));
            }
        }
        match (in_ledger.as_slice(), in_audit.as_slice()) {
            (_, []) if unaudited.contains(*tx) => known_unaudited += 1,
            (_, []) => missing_from_audit.push(tx.to_string()),
            ([], _) => missing_from_ledger.push(tx.to_string()),
            ([ledger_hash], [audit_hash]) if ledger_hash != audit_hash => {
                differing.push(format!("{tx} (ledger {ledger_hash}, auditor {audit_hash})"))
            }
            _ => {}
        }
    }
    let mut problems = Vec::new();
    if !missing_from_audit.is_empty() {
        problems.push(format!(
            "{} transaction(s) in the ledger are missing from the auditor: {}",
            missing_from_audit.len(),
            name_some(&missing_from_audit)
        ));
    }
    if !missing_from_ledger.is_empty() {
        problems.push(format!(
            "{} transaction(s) in the auditor are missing from the ledger: {}",
            missing_from_ledger.len(),
            name_some(&missing_from_ledger)
        ));
    }
    if !differing.is_empty() {
        problems.push(format!(
            "{} transaction(s) have different hashes in the ledger and the auditor: {}",
            differing.len(),
            name_some(&differing)
        ));
    }
    if !repeated.is_empty() {
        problems.push(format!(
            "{} transaction(s) appear more than once: {}",
            repeated.len(),
            name_some(&repeated)
        ));
    }
    if problems.is_empty() {
        let known = if known_unaudited > 0 {
            format!(
                ", but for {known_unaudited} in the ledger alone that were given as known \
                 unaudited"
            )
        } else {
            String::new()
        };
        passed(
            NAME,
            format!(
                "both hold the same {} transactions{known}",
                hashes.len() - known_unaudited
            ),
        )
    } else {
        failed(NAME, problems.join("; "))
    }
}

fn quiet_window(ledger: &LedgerSnapshot, audit: &[AuditRow], window: Window) -> Check {
    const NAME: &str = "quiet_window";
    // Open at both ends. Timestamps have millisecond resolution: a commit stamped in
    // the millisecond the window starts finished before every node had paused, and one
    // stamped in the millisecond it ends began after the release (the soak saw both,
    // hundreds of times in a thousand cycles). A commit made while paused stamps a
    // later millisecond whenever the window is longer than two.
    let inside = |ms: i64| window.start_ms < ms && ms < window.end_ms;
    let committed: Vec<String> = ledger
        .rows
        .iter()
        .filter(|row| inside(row.committed_at_ms))
        .map(|row| format!("{} at {}", row.tx_id, row.committed_at_ms))
        .collect();
    let recorded: Vec<String> = audit
        .iter()
        .filter(|row| inside(row.recorded_at_ms))
        .map(|row| format!("{} at {}", row.tx_id, row.recorded_at_ms))
        .collect();
    let span = format!("({}, {})", window.start_ms, window.end_ms);
    let mut problems = Vec::new();
    if !committed.is_empty() {
        problems.push(format!(
            "{} ledger transaction(s) committed inside {span}: {}",
            committed.len(),
            name_some(&committed)
        ));
    }
    if !recorded.is_empty() {
        problems.push(format!(
            "{} auditor record(s) written inside {span}: {}",
            recorded.len(),
            name_some(&recorded)
        ));
    }
    if problems.is_empty() {
        passed(NAME, format!("nothing committed or recorded inside {span}"))
    } else {
        failed(NAME, problems.join("; "))
    }
}

/// The first few items, then how many more.
fn name_some(items: &[String]) -> String {
    let mut text = items
        .iter()
        .take(NAMED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > NAMED {
        text.push_str(&format!(", and {} more", items.len() - NAMED));
    }
    text
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for check in &self.checks {
            let verdict = if check.ok { "ok  " } else { "FAIL" };
            writeln!(f, "{verdict} {}: {}", check.name, check.detail)?;
        }
        let verdict = if self.ok {
            "consistent"
        } else {
            "INCONSISTENT"
        };
        writeln!(f, "{verdict} ({} transactions)", self.transactions)
    }
}

#[cfg(test)]
mod tests;
