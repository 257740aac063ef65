//! Each invariant is shown passing on a real ledger + auditor, then failing, with a
//! message that names the culprit, after one targeted tamper (the negative controls).
//!
//! Every test runs on SQLite, PostgreSQL and MariaDB (see `on_every_backend!` at the
//! end): the check must read all three the same way, and each backend's store must keep
//! the same rules. The servers are throwaway ones from `stillpoint-testkit`, one per
//! test; tampering goes through each database's own client (rusqlite, psql, mariadb), as
//! an operator's mistake or an attacker's edit would.

use std::sync::Arc;

use rusqlite::Connection;
use stillpoint_testkit::{MariaDb, Postgres};

use super::*;
use crate::store::{self, AuditorStore, DbUrl, LedgerStore, Seed, StoreError, TransferOrder};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
    MariaDb,
}

/// Where a backend's databases live: a directory of SQLite files or a server of its own.
enum Server {
    Sqlite(tempfile::TempDir),
    Postgres(Postgres),
    MariaDb(MariaDb),
}

impl Server {
    fn start(backend: Backend) -> Server {
        match backend {
            Backend::Sqlite => Server::Sqlite(tempfile::tempdir().unwrap()),
            Backend::Postgres => Server::Postgres(Postgres::start()),
            Backend::MariaDb => Server::MariaDb(MariaDb::start()),
        }
    }

    /// The URL of `database`, which need not exist yet.
    fn url(&self, database: &str) -> DbUrl {
        let url = match self {
            Server::Sqlite(dir) => format!(
                "sqlite:{}",
                dir.path().join(format!("{database}.db")).display()
            ),
            Server::Postgres(pg) => pg.url(database),
            Server::MariaDb(db) => db.url(database),
        };
        url.parse().unwrap()
    }

    fn database_exists(&self, database: &str) -> bool {
        match self {
            Server::Sqlite(dir) => dir.path().join(format!("{database}.db")).exists(),
            Server::Postgres(pg) => {
                pg.psql(
                    "postgres",
                    &format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'"),
                ) == "1"
            }
            Server::MariaDb(db) => {
                db.sql(
                    "",
                    &format!(
                        "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = '{database}'"
                    ),
                ) == "1"
            }
        }
    }

    /// Runs one UPDATE or DELETE behind the stores' backs and checks that it changed
    /// exactly one row, so that a tamper that missed cannot pass for a check that missed.
    fn tamper(&self, database: &str, sql: &str) {
        let changed = match self {
            Server::Sqlite(dir) => Connection::open(dir.path().join(format!("{database}.db")))
                .unwrap()
                .execute(sql, [])
                .unwrap()
                .to_string(),
            Server::Postgres(pg) => pg.psql(
                database,
                &format!("WITH changed AS ({sql} RETURNING 1) SELECT count(*) FROM changed"),
            ),
            Server::MariaDb(db) => db.sql(database, &format!("{sql}; SELECT ROW_COUNT();")),
        };
        assert_eq!(
            changed, "1",
            "the tamper {sql:?} must change exactly one row"
        );
    }
}

impl Server {
    /// Takes the primary key off the audit table, as a restore that lost its
    /// constraints (or an attacker) could, so that a tx id can appear twice.
    fn drop_audit_primary_key(&self) {
        match self {
            Server::Sqlite(dir) => Connection::open(dir.path().join(format!("{AUDITOR}.db")))
                .unwrap()
                .execute_batch(
                    "CREATE TABLE audit_copy (tx_id TEXT NOT NULL, hash TEXT NOT NULL, \
                                              recorded_at_ms INTEGER NOT NULL);
                     INSERT INTO audit_copy SELECT * FROM audit;
                     DROP TABLE audit;
                     ALTER TABLE audit_copy RENAME TO audit;",
                )
                .unwrap(),
            Server::Postgres(pg) => {
                pg.psql(AUDITOR, "ALTER TABLE audit DROP CONSTRAINT audit_pkey");
            }
            Server::MariaDb(db) => {
                db.sql(AUDITOR, "ALTER TABLE audit DROP PRIMARY KEY");
            }
        }
    }
}

/// A seeded ledger and an auditor on one backend. Fields drop in order: the stores
/// disconnect before their server stops.
struct Cluster {
    ledger: Arc<dyn LedgerStore>,
    auditor: Arc<dyn AuditorStore>,
    ledger_url: DbUrl,
    auditor_url: DbUrl,
    server: Server,
}

const LEDGER: &str = "ledger";
const AUDITOR: &str = "auditor";

impl Cluster {
    async fn new(backend: Backend) -> Self {
        let server = Server::start(backend);
        let ledger_url = server.url(LEDGER);
        let auditor_url = server.url(AUDITOR);
        let seed = Seed {
            accounts: 10,
            initial_balance: 1000,
        };
        Cluster {
            ledger: store::open_ledger(&ledger_url, seed).await.unwrap(),
            auditor: store::open_auditor(&auditor_url).await.unwrap(),
            ledger_url,
            auditor_url,
            server,
        }
    }

    /// Commits and audits `count` transfers, as a ledger node would.
    async fn transfers(&self, prefix: &str, count: i64) {
        for n in 0..count {
            transfer_and_record(&*self.ledger, &*self.auditor, &format!("{prefix}-{n}"), n).await;
        }
    }

    async fn report(&self, window: Option<Window>) -> CheckReport {
        let ledger = store::read_ledger(&self.ledger_url).await.unwrap();
        let audit = store::read_auditor(&self.auditor_url).await.unwrap();
        check(&ledger, &audit, window)
    }
}

async fn transfer_and_record(
    ledger: &dyn LedgerStore,
    auditor: &dyn AuditorStore,
    tx_id: &str,
    n: i64,
) {
    let order = TransferOrder {
        tx_id: tx_id.to_owned(),
        from: n % 10 + 1,
        to: (n + 3) % 10 + 1,
        amount: 1 + n % 5,
    };
    let committed = ledger.transfer(&order).await.unwrap();
    auditor.record(tx_id, &committed.hash).await.unwrap();
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

async fn a_consistent_cluster_passes_every_check(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 25).await;
    let report = cluster.report(None).await;
    assert!(report.ok, "{report}");
    assert_eq!(report.transactions, 25);
    let names: Vec<_> = report.checks.iter().map(|check| check.name).collect();
    assert_eq!(names, ["balances", "hash_chain", "ledger_matches_auditor"]);
    // The chain is numbered from 1 without gaps on every backend.
    let seqs: Vec<i64> = store::read_ledger(&cluster.ledger_url)
        .await
        .unwrap()
        .rows
        .iter()
        .map(|row| row.seq)
        .collect();
    assert_eq!(seqs, (1..=25).collect::<Vec<_>>());
}

async fn a_tampered_balance_fails_with_the_sum(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 5).await;
    cluster.server.tamper(
        LEDGER,
        "UPDATE accounts SET balance = balance - 50 WHERE id = 4",
    );
    let report = cluster.report(None).await;
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

async fn a_negative_balance_is_named(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 3).await;
    // Moves money without changing the sum: only the sign rule can catch it.
    cluster.server.tamper(
        LEDGER,
        "UPDATE accounts SET balance = balance - 5000 WHERE id = 7",
    );
    cluster.server.tamper(
        LEDGER,
        "UPDATE accounts SET balance = balance + 5000 WHERE id = 8",
    );
    let check = failing(&cluster.report(None).await, "balances").clone();
    assert!(check.detail.contains("account 7 holds"), "{}", check.detail);
    assert!(!check.detail.contains("sum to"), "{}", check.detail);
}

async fn an_edited_transfer_breaks_the_chain_at_its_seq(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 10).await;
    cluster.server.tamper(
        LEDGER,
        "UPDATE ledger SET amount = amount + 1 WHERE seq = 6",
    );
    let check = failing(&cluster.report(None).await, "hash_chain").clone();
    assert!(
        check
            .detail
            .starts_with("hash chain broken at seq 6 (tx tx-5)"),
        "{}",
        check.detail
    );
}

async fn a_relinked_row_breaks_the_chain_at_the_next_seq(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 10).await;
    // A forger who recomputes row 4's hash after editing it still breaks row 5's link.
    let snapshot = store::read_ledger(&cluster.ledger_url).await.unwrap();
    let row = snapshot.rows.iter().find(|row| row.seq == 4).unwrap();
    let forged = crate::chain::link_hash(&row.prev_hash, &row.tx_id, row.from, row.to, 99);
    cluster.server.tamper(
        LEDGER,
        &format!("UPDATE ledger SET amount = 99, hash = '{forged}' WHERE seq = 4"),
    );
    let check = failing(&cluster.report(None).await, "hash_chain").clone();
    assert!(
        check
            .detail
            .starts_with("hash chain broken at seq 5 (tx tx-4)"),
        "{}",
        check.detail
    );
}

async fn a_missing_audit_row_is_named(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 8).await;
    cluster
        .server
        .tamper(AUDITOR, "DELETE FROM audit WHERE tx_id = 'tx-3'");
    let report = cluster.report(None).await;
    let check = failing(&report, "ledger_matches_auditor");
    assert_eq!(
        check.detail,
        "1 transaction(s) in the ledger are missing from the auditor: tx-3"
    );
    assert_eq!(report.checks.iter().filter(|check| !check.ok).count(), 1);

    // Known as unaudited (its node was killed between the two writes), it passes; any
    // other id known does not excuse it.
    let ledger = store::read_ledger(&cluster.ledger_url).await.unwrap();
    let audit = store::read_auditor(&cluster.auditor_url).await.unwrap();
    let known = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect();
    let report = check_knowing_unaudited(&ledger, &audit, None, &known(&["tx-3"]));
    assert!(report.ok, "{report}");
    let matched = report
        .checks
        .iter()
        .find(|check| check.name == "ledger_matches_auditor")
        .unwrap();
    assert_eq!(
        matched.detail,
        "both hold the same 7 transactions, but for 1 in the ledger alone that were given \
         as known unaudited"
    );
    let report = check_knowing_unaudited(&ledger, &audit, None, &known(&["tx-4"]));
    assert!(!report.ok, "{report}");
}

async fn an_audit_row_unknown_to_the_ledger_is_named(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 3).await;
    cluster
        .auditor
        .record("ghost", &"ab".repeat(32))
        .await
        .unwrap();
    let check = failing(&cluster.report(None).await, "ledger_matches_auditor").clone();
    assert_eq!(
        check.detail,
        "1 transaction(s) in the auditor are missing from the ledger: ghost"
    );
}

async fn a_different_audited_hash_is_named(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 3).await;
    cluster.server.tamper(
        AUDITOR,
        &format!(
            "UPDATE audit SET hash = '{}' WHERE tx_id = 'tx-1'",
            "cd".repeat(32)
        ),
    );
    let check = failing(&cluster.report(None).await, "ledger_matches_auditor").clone();
    assert!(
        check.detail.contains("different hashes") && check.detail.contains("tx-1 (ledger "),
        "{}",
        check.detail
    );
}

/// Issue 20.5: the auditor's rows were collapsed into a map by tx id, so a duplicate
/// row, or a second row with the same tx id and a bogus hash, passed. They are compared
/// as multisets now, and duplicates are named.
async fn duplicate_audit_rows_are_named(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 6).await;
    cluster.server.drop_audit_primary_key();
    // The same row twice.
    cluster.server.tamper(
        AUDITOR,
        "INSERT INTO audit SELECT tx_id, hash, recorded_at_ms FROM audit WHERE tx_id = 'tx-2'",
    );
    let check = failing(&cluster.report(None).await, "ledger_matches_auditor").clone();
    assert!(
        check.detail.contains("tx-2") && check.detail.contains("2 times in the auditor"),
        "{}",
        check.detail
    );
    // A second row for a known tx id with a bogus hash, recorded first (a map by tx id
    // kept the last row read: the right one).
    let bogus = "ee".repeat(32);
    cluster.server.tamper(
        AUDITOR,
        &format!("INSERT INTO audit (tx_id, hash, recorded_at_ms) VALUES ('tx-4', '{bogus}', 0)"),
    );
    let check = failing(&cluster.report(None).await, "ledger_matches_auditor").clone();
    assert!(
        check.detail.contains("tx-4") && check.detail.contains(&bogus),
        "{}",
        check.detail
    );
}

async fn a_commit_inside_the_window_is_named(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("before", 3).await;
    cluster.transfers("inside", 1).await;
    // A window after every write so far: the check passes.
    let now = stillpoint_node::time::unix_ms(std::time::SystemTime::now());
    let window = Window {
        start_ms: now + 60_000,
        end_ms: now + 120_000,
    };
    let quiet = cluster.report(Some(window)).await;
    assert!(quiet.ok, "{quiet}");
    // Move one transfer's commit and record into the window (as if the node had
    // written it while paused): the check fails and names it.
    let inside_ms = window.start_ms + 10;
    cluster.server.tamper(
        LEDGER,
        &format!("UPDATE ledger SET committed_at_ms = {inside_ms} WHERE tx_id = 'inside-0'"),
    );
    cluster.server.tamper(
        AUDITOR,
        &format!("UPDATE audit SET recorded_at_ms = {inside_ms} WHERE tx_id = 'inside-0'"),
    );
    let report = cluster.report(Some(window)).await;
    let check = failing(&report, "quiet_window");
    let span = format!("({}, {})", window.start_ms, window.end_ms);
    assert_eq!(
        check.detail,
        format!(
            "1 ledger transaction(s) committed inside {span}: inside-0 at {inside_ms}; \
             1 auditor record(s) written inside {span}: inside-0 at {inside_ms}"
        )
    );
    // One millisecond inside either edge is inside ...
    let tight = Window {
        start_ms: inside_ms - 1,
        end_ms: inside_ms + 1,
    };
    failing(&cluster.report(Some(tight)).await, "quiet_window");
    // ... but the edges themselves are not: a stamp in the millisecond a window starts
    // or ends cannot be told from one just before or just after it.
    for edge in [
        Window {
            start_ms: inside_ms,
            end_ms: inside_ms + 5,
        },
        Window {
            start_ms: inside_ms - 5,
            end_ms: inside_ms,
        },
    ] {
        let report = cluster.report(Some(edge)).await;
        assert!(report.ok, "{report:?}");
    }
}

async fn insufficient_funds_write_nothing(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let order = TransferOrder {
        tx_id: "too-much".to_owned(),
        from: 1,
        to: 2,
        amount: 1001,
    };
    let error = cluster.ledger.transfer(&order).await.unwrap_err();
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
        cluster.ledger.transfer(&unknown).await.unwrap_err(),
        StoreError::UnknownAccount(11)
    ));
    let report = cluster.report(None).await;
    assert!(report.ok, "{report}");
    assert_eq!(report.transactions, 0);
    // The refusals released the chain head: the same store, and a second one on the
    // same database, can still transfer.
    let second = store::open_ledger(&cluster.ledger_url, Seed::default())
        .await
        .unwrap();
    transfer_and_record(&*second, &*cluster.auditor, "after", 1).await;
    transfer_and_record(&*cluster.ledger, &*cluster.auditor, "after-2", 2).await;
    assert!(cluster.report(None).await.ok);
}

async fn recording_is_idempotent_but_refuses_a_second_hash(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let hash = "ef".repeat(32);
    let first = cluster.auditor.record("tx-1", &hash).await.unwrap();
    assert_eq!(cluster.auditor.record("tx-1", &hash).await.unwrap(), first);
    assert!(matches!(
        cluster.auditor.record("tx-1", &"01".repeat(32)).await,
        Err(StoreError::HashConflict { .. })
    ));
    // tx ids compare byte for byte on every backend, as in SQLite.
    cluster.auditor.record("TX-1", &hash).await.unwrap();
    assert_eq!(cluster.auditor.snapshot().await.unwrap().len(), 2);
}

async fn a_second_node_does_not_seed_again(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    cluster.transfers("tx", 4).await;
    let again = store::open_ledger(
        &cluster.ledger_url,
        Seed {
            accounts: 50,
            initial_balance: 7,
        },
    )
    .await
    .unwrap();
    let snapshot = again.snapshot().await.unwrap();
    assert_eq!(snapshot.initial_total, 10_000);
    assert_eq!(snapshot.balances.len(), 10);
    assert!(cluster.report(None).await.ok);
}

/// Nodes of a new cluster start at the same moment on an empty database: exactly one of
/// them seeds. Each offers a different seed, so two seeders would show.
async fn nodes_starting_at_once_seed_exactly_once(backend: Backend) {
    let server = Server::start(backend);
    let url = server.url(LEDGER);
    let opened = futures::future::join_all((0..4).map(|node| {
        store::open_ledger(
            &url,
            Seed {
                accounts: 10 + node,
                initial_balance: 1000,
            },
        )
    }))
    .await;
    let stores: Vec<_> = opened.into_iter().map(Result::unwrap).collect();
    let snapshot = stores[0].snapshot().await.unwrap();
    let accounts = snapshot.balances.len() as i64;
    assert!((10..14).contains(&accounts), "{accounts} accounts");
    assert_eq!(snapshot.initial_total, accounts * 1000);
    for other in &stores[1..] {
        assert_eq!(other.snapshot().await.unwrap(), snapshot);
    }
}

async fn reading_a_missing_or_foreign_database_creates_nothing(backend: Backend) {
    let server = Server::start(backend);
    let error = store::read_ledger(&server.url("missing"))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::NotFound { .. }), "{error}");
    assert!(!server.database_exists("missing"));
    let error = store::read_auditor(&server.url("missing"))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::NotFound { .. }), "{error}");

    let auditor_only = server.url("auditor_only");
    store::open_auditor(&auditor_only).await.unwrap();
    let error = store::read_ledger(&auditor_only).await.unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::NotInitialized {
                table: "ledger",
                ..
            }
        ),
        "{error}"
    );
}

/// Two ledger nodes share one database: their transfers serialize on the chain head
/// instead of failing, and the chain stays whole.
async fn two_store_handles_on_one_database_transfer_concurrently(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let second = store::open_ledger(&cluster.ledger_url, Seed::default())
        .await
        .unwrap();
    let handles = [cluster.ledger.clone(), second];
    let per_handle = 150;
    let run = async |index: usize| {
        for n in 0..per_handle {
            transfer_and_record(
                &*handles[index],
                &*cluster.auditor,
                &format!("node{index}-{n}"),
                n,
            )
            .await;
        }
    };
    tokio::join!(run(0), run(1));
    let report = cluster.report(None).await;
    assert!(report.ok, "{report}");
    assert_eq!(report.transactions, 2 * per_handle as usize);
    // Interleaved, not one handle after the other: the lock was really contended.
    let snapshot = store::read_ledger(&cluster.ledger_url).await.unwrap();
    let switches = snapshot
        .rows
        .windows(2)
        .filter(|pair| pair[0].tx_id[..5] != pair[1].tx_id[..5])
        .count();
    assert!(switches > 1, "the two handles never interleaved");
    if let Server::Sqlite(dir) = &cluster.server {
        let mode: String = Connection::open(dir.path().join(format!("{LEDGER}.db")))
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}

/// Declares each test once per backend, as `check::tests::{sqlite,postgres,mariadb}::NAME`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        on_every_backend!(@backend sqlite, Sqlite, $($name),*);
        on_every_backend!(@backend postgres, Postgres, $($name),*);
        on_every_backend!(@backend mariadb, MariaDb, $($name),*);
    };
    (@backend $module:ident, $backend:ident, $($name:ident),*) => {
        mod $module {
            $(
                // Two workers, so that server start-up (blocking) and SQLite's blocking
                // tasks never starve the other side of a concurrent test.
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::$backend).await;
                }
            )*
        }
    };
}

on_every_backend!(
    a_consistent_cluster_passes_every_check,
    a_tampered_balance_fails_with_the_sum,
    a_negative_balance_is_named,
    an_edited_transfer_breaks_the_chain_at_its_seq,
    a_relinked_row_breaks_the_chain_at_the_next_seq,
    a_missing_audit_row_is_named,
    an_audit_row_unknown_to_the_ledger_is_named,
    a_different_audited_hash_is_named,
    duplicate_audit_rows_are_named,
    a_commit_inside_the_window_is_named,
    insufficient_funds_write_nothing,
    recording_is_idempotent_but_refuses_a_second_hash,
    a_second_node_does_not_seed_again,
    nodes_starting_at_once_seed_exactly_once,
    reading_a_missing_or_foreign_database_creates_nothing,
    two_store_handles_on_one_database_transfer_concurrently,
);
