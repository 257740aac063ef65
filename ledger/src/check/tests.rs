//! Each invariant is shown passing on a real SQLite ledger + auditor, then failing, with
//! a message that names the culprit, after one targeted tamper (the negative controls).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;

use super::*;
use crate::store::{self, AuditorStore, DbUrl, LedgerStore, Seed, StoreError, TransferOrder};

struct Cluster {
    _dir: tempfile::TempDir,
    ledger_path: PathBuf,
    auditor_path: PathBuf,
    ledger: Arc<dyn LedgerStore>,
    auditor: Arc<dyn AuditorStore>,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ledger_path = dir.path().join("ledger.db");
        let auditor_path = dir.path().join("auditor.db");
        let seed = Seed {
            accounts: 10,
            initial_balance: 1000,
        };
        Cluster {
            ledger: store::open_ledger(&DbUrl::Sqlite(ledger_path.clone()), seed).unwrap(),
            auditor: store::open_auditor(&DbUrl::Sqlite(auditor_path.clone())).unwrap(),
            ledger_path,
            auditor_path,
            _dir: dir,
        }
    }

    /// Commits and audits `count` transfers, as a ledger node would.
    fn transfers(&self, prefix: &str, count: i64) {
        for n in 0..count {
            transfer_and_record(&*self.ledger, &*self.auditor, &format!("{prefix}-{n}"), n);
        }
    }

    fn report(&self, window: Option<Window>) -> CheckReport {
        let ledger = store::read_ledger(&DbUrl::Sqlite(self.ledger_path.clone())).unwrap();
        let audit = store::read_auditor(&DbUrl::Sqlite(self.auditor_path.clone())).unwrap();
        check(&ledger, &audit, window)
    }

    fn tamper(path: &Path, sql: &str) {
        let changed = Connection::open(path).unwrap().execute(sql, []).unwrap();
        assert_eq!(changed, 1, "the tamper {sql:?} must change exactly one row");
    }
}

fn transfer_and_record(ledger: &dyn LedgerStore, auditor: &dyn AuditorStore, tx_id: &str, n: i64) {
    let order = TransferOrder {
        tx_id: tx_id.to_owned(),
        from: n % 10 + 1,
        to: (n + 3) % 10 + 1,
        amount: 1 + n % 5,
    };
    let committed = ledger.transfer(&order).unwrap();
    auditor.record(tx_id, &committed.hash).unwrap();
}

fn failing<'a>(report: &'a CheckReport, name: &str) -> &'a Check {
    assert!(!report.ok, "the report passed: {report}");
    let check = report
        .checks
        .iter()
        .find(|check| check.name == name)
        .unwrap_or_else(|| panic!("no check named {name}: {report}"));
    assert!(!check.ok, "{name} passed: {report}");
    check
}

#[test]
fn a_consistent_cluster_passes_every_check() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 25);
    let report = cluster.report(None);
    assert!(report.ok, "{report}");
    assert_eq!(report.transactions, 25);
    let names: Vec<_> = report.checks.iter().map(|check| check.name).collect();
    assert_eq!(names, ["balances", "hash_chain", "ledger_matches_auditor"]);
}

#[test]
fn a_tampered_balance_fails_with_the_sum() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 5);
    Cluster::tamper(
        &cluster.ledger_path,
        "UPDATE accounts SET balance = balance - 50 WHERE id = 4",
    );
    let report = cluster.report(None);
    let check = failing(&report, "balances");
    assert!(
        check
            .detail
            .contains("balances sum to 9950, expected 10000"),
        "{}",
        check.detail
    );
    // Only the tampered invariant fails.
    assert_eq!(report.checks.iter().filter(|check| !check.ok).count(), 1);
}

#[test]
fn a_negative_balance_is_named() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 3);
    // Moves money without changing the sum: only the sign rule can catch it.
    let conn = Connection::open(&cluster.ledger_path).unwrap();
    conn.execute_batch(
        "UPDATE accounts SET balance = balance - 5000 WHERE id = 7;
         UPDATE accounts SET balance = balance + 5000 WHERE id = 8;",
    )
    .unwrap();
    let check = failing(&cluster.report(None), "balances").clone();
    assert!(check.detail.contains("account 7 holds"), "{}", check.detail);
    assert!(!check.detail.contains("sum to"), "{}", check.detail);
}

#[test]
fn an_edited_transfer_breaks_the_chain_at_its_seq() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 10);
    Cluster::tamper(
        &cluster.ledger_path,
        "UPDATE ledger SET amount = amount + 1 WHERE seq = 6",
    );
    let check = failing(&cluster.report(None), "hash_chain").clone();
    assert!(
        check
            .detail
            .starts_with("hash chain broken at seq 6 (tx tx-5)"),
        "{}",
        check.detail
    );
}

#[test]
fn a_relinked_row_breaks_the_chain_at_the_next_seq() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 10);
    // A forger who recomputes row 4's hash after editing it still breaks row 5's link.
    let conn = Connection::open(&cluster.ledger_path).unwrap();
    let (prev, tx_id, from, to): (String, String, i64, i64) = conn
        .query_row(
            "SELECT prev_hash, tx_id, from_account, to_account FROM ledger WHERE seq = 4",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    let forged = crate::chain::link_hash(&prev, &tx_id, from, to, 99);
    conn.execute(
        "UPDATE ledger SET amount = 99, hash = ?1 WHERE seq = 4",
        [&forged],
    )
    .unwrap();
    let check = failing(&cluster.report(None), "hash_chain").clone();
    assert!(
        check
            .detail
            .starts_with("hash chain broken at seq 5 (tx tx-4)"),
        "{}",
        check.detail
    );
}

#[test]
fn a_missing_audit_row_is_named() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 8);
    Cluster::tamper(
        &cluster.auditor_path,
        "DELETE FROM audit WHERE tx_id = 'tx-3'",
    );
    let report = cluster.report(None);
    let check = failing(&report, "ledger_matches_auditor");
    assert_eq!(
        check.detail,
        "1 transaction(s) in the ledger are missing from the auditor: tx-3"
    );
    assert_eq!(report.checks.iter().filter(|check| !check.ok).count(), 1);
}

#[test]
fn an_audit_row_unknown_to_the_ledger_is_named() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 3);
    cluster.auditor.record("ghost", &"ab".repeat(32)).unwrap();
    let check = failing(&cluster.report(None), "ledger_matches_auditor").clone();
    assert_eq!(
        check.detail,
        "1 transaction(s) in the auditor are missing from the ledger: ghost"
    );
}

#[test]
fn a_different_audited_hash_is_named() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 3);
    Cluster::tamper(
        &cluster.auditor_path,
        &format!(
            "UPDATE audit SET hash = '{}' WHERE tx_id = 'tx-1'",
            "cd".repeat(32)
        ),
    );
    let check = failing(&cluster.report(None), "ledger_matches_auditor").clone();
    assert!(
        check.detail.contains("different hashes") && check.detail.contains("tx-1 (ledger "),
        "{}",
        check.detail
    );
}

#[test]
fn a_commit_inside_the_window_is_named() {
    let cluster = Cluster::new();
    cluster.transfers("before", 3);
    cluster.transfers("inside", 1);
    // A window after every write so far: the check passes.
    let now = stillpoint::time::unix_ms(std::time::SystemTime::now());
    let window = Window {
        start_ms: now + 60_000,
        end_ms: now + 120_000,
    };
    let quiet = cluster.report(Some(window));
    assert!(quiet.ok, "{quiet}");
    // Move one transfer's commit and record into the window (as if the node had
    // written it while paused): the check fails and names it.
    let inside_ms = window.start_ms + 10;
    Cluster::tamper(
        &cluster.ledger_path,
        &format!("UPDATE ledger SET committed_at_ms = {inside_ms} WHERE tx_id = 'inside-0'"),
    );
    Cluster::tamper(
        &cluster.auditor_path,
        &format!("UPDATE audit SET recorded_at_ms = {inside_ms} WHERE tx_id = 'inside-0'"),
    );
    let report = cluster.report(Some(window));
    let check = failing(&report, "quiet_window");
    let span = format!("[{}, {}]", window.start_ms, window.end_ms);
    assert_eq!(
        check.detail,
        format!(
            "1 ledger transaction(s) committed inside {span}: inside-0 at {inside_ms}; \
             1 auditor record(s) written inside {span}: inside-0 at {inside_ms}"
        )
    );
    // The window's edges are inside too.
    let edge = Window {
        start_ms: inside_ms,
        end_ms: inside_ms,
    };
    failing(&cluster.report(Some(edge)), "quiet_window");
}

#[test]
fn insufficient_funds_write_nothing() {
    let cluster = Cluster::new();
    let order = TransferOrder {
        tx_id: "too-much".to_owned(),
        from: 1,
        to: 2,
        amount: 1001,
    };
    let error = cluster.ledger.transfer(&order).unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::InsufficientFunds {
                account: 1,
                balance: 1000,
                amount: 1001
            }
        ),
        "{error}"
    );
    let unknown = TransferOrder {
        to: 11,
        amount: 1,
        ..order
    };
    assert!(matches!(
        cluster.ledger.transfer(&unknown).unwrap_err(),
        StoreError::UnknownAccount(11)
    ));
    let report = cluster.report(None);
    assert!(report.ok, "{report}");
    assert_eq!(report.transactions, 0);
}

#[test]
fn recording_is_idempotent_but_refuses_a_second_hash() {
    let cluster = Cluster::new();
    let hash = "ef".repeat(32);
    let first = cluster.auditor.record("tx-1", &hash).unwrap();
    assert_eq!(cluster.auditor.record("tx-1", &hash).unwrap(), first);
    assert!(matches!(
        cluster.auditor.record("tx-1", &"01".repeat(32)),
        Err(StoreError::HashConflict { .. })
    ));
}

#[test]
fn a_second_node_does_not_seed_again() {
    let cluster = Cluster::new();
    cluster.transfers("tx", 4);
    let again = store::open_ledger(
        &DbUrl::Sqlite(cluster.ledger_path.clone()),
        Seed {
            accounts: 50,
            initial_balance: 7,
        },
    )
    .unwrap();
    let snapshot = again.snapshot().unwrap();
    assert_eq!(snapshot.initial_total, 10_000);
    assert_eq!(snapshot.balances.len(), 10);
    assert!(cluster.report(None).ok);
}

#[test]
fn reading_a_missing_or_foreign_database_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let error = store::read_ledger(&DbUrl::Sqlite(missing.clone())).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { .. }), "{error}");
    assert!(!missing.exists());
    let auditor_only = dir.path().join("auditor.db");
    store::open_auditor(&DbUrl::Sqlite(auditor_only.clone())).unwrap();
    let error = store::read_ledger(&DbUrl::Sqlite(auditor_only)).unwrap_err();
    assert!(
        matches!(error, StoreError::NotInitialized { .. }),
        "{error}"
    );
}

/// Two ledger nodes share one SQLite file: their transfers serialize through
/// BEGIN IMMEDIATE and the busy timeout instead of failing, and the chain stays whole.
#[test]
fn two_store_handles_on_one_file_transfer_concurrently() {
    let cluster = Cluster::new();
    let url = DbUrl::Sqlite(cluster.ledger_path.clone());
    let second = store::open_ledger(&url, Seed::default()).unwrap();
    let handles = [cluster.ledger.clone(), second];
    let per_handle = 150;
    std::thread::scope(|scope| {
        for (index, ledger) in handles.iter().enumerate() {
            let auditor = &*cluster.auditor;
            scope.spawn(move || {
                for n in 0..per_handle {
                    transfer_and_record(&**ledger, auditor, &format!("node{index}-{n}"), n);
                }
            });
        }
    });
    let report = cluster.report(None);
    assert!(report.ok, "{report}");
    assert_eq!(report.transactions, 2 * per_handle as usize);
    let mode: String = Connection::open(&cluster.ledger_path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}
