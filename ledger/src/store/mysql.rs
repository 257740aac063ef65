//! The MySQL / MariaDB backend of both stores (mysql_async, no TLS), InnoDB tables.
//!
//! Same tables and columns as SQLite, with MySQL's types: indexed text columns are
//! `VARCHAR(255)` (MySQL cannot index unbounded `TEXT`), and every table compares text
//! byte for byte (`utf8mb4_bin`), as SQLite does, so that tx ids differing only in case
//! stay different. `key` is a reserved word here and is always quoted.
//!
//! Several ledger nodes may share one database, so:
//!
//! - `CREATE TABLE IF NOT EXISTS` is safe to race in MySQL (metadata locks). Seeding
//!   happens in a transaction that first inserts the `meta` row `initial_total`: a
//!   second node's insert of the same key waits for the first one's transaction and
//!   then fails as a duplicate, so exactly one node seeds.
//! - A transfer first locks that same `meta` row (`SELECT … FOR UPDATE`); it is the
//!   chain head's lock, so transfers queue on it. Every read of the transfer is a
//!   locking read, which sees the latest committed rows whatever the isolation level
//!   (plain reads under InnoDB's default REPEATABLE READ could see a stale head).
//! - A read for the check is one `START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY`.
//!
//! Each store holds one connection; one that failed, or whose operation was abandoned
//! half-way, is dropped and the next call reconnects.

use std::time::{Duration, SystemTime};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, IsolationLevel, Opts, OptsBuilder, Transaction, TxOpts};
use tokio::sync::{Mutex, MutexGuard};

use stillpoint_node::time::unix_ms;

use super::{
    AuditRow, AuditorStore, Committed, DriverError, IfMissing, LedgerRow, LedgerSnapshot,
    LedgerStore, Seed, ServerUrl, StoreError, TransferOrder,
};
use crate::chain::{GENESIS_HASH, link_hash};

/// Seconds a statement waits for a row lock before it fails as [`StoreError::Busy`]
/// (see the PostgreSQL backend's `LOCK_TIMEOUT`).
const LOCK_WAIT_TIMEOUT_S: u32 = 10;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Server error codes this backend branches on.
const ER_DUP_ENTRY: u16 = 1062;
const ER_BAD_DB_ERROR: u16 = 1049;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;

/// Rows per `INSERT` while seeding accounts.
const SEED_BATCH: u32 = 1000;

const TABLE_OPTIONS: &str = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin";

fn ledger_schema() -> [String; 3] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS accounts (
                id BIGINT PRIMARY KEY,
                balance BIGINT NOT NULL
            ) {TABLE_OPTIONS}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS meta (
                `key` VARCHAR(255) PRIMARY KEY,
                value TEXT
            ) {TABLE_OPTIONS}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS ledger (
                seq BIGINT AUTO_INCREMENT PRIMARY KEY,
                tx_id VARCHAR(255) UNIQUE NOT NULL,
                from_account BIGINT NOT NULL,
                to_account BIGINT NOT NULL,
                amount BIGINT NOT NULL,
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL,
                committed_at_ms BIGINT NOT NULL
            ) {TABLE_OPTIONS}"
        ),
    ]
}

fn audit_schema() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS audit (
            tx_id VARCHAR(255) PRIMARY KEY,
            hash TEXT NOT NULL,
            recorded_at_ms BIGINT NOT NULL
        ) {TABLE_OPTIONS}"
    )
}

/// Why an operation failed: the driver, or a rule of the store.
enum Failure {
    My(mysql_async::Error),
    Store(StoreError),
}

impl From<mysql_async::Error> for Failure {
    fn from(error: mysql_async::Error) -> Self {
        Failure::My(error)
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::Store(error)
    }
}

fn server_code(error: &mysql_async::Error) -> Option<u16> {
    match error {
        mysql_async::Error::Server(server) => Some(server.code),
        _ => None,
    }
}

fn classify(url: &str, error: mysql_async::Error) -> StoreError {
    let url = url.to_owned();
    let code = server_code(&error);
    // Server errors leave the connection usable; anything else (I/O, protocol) means
    // it broke or never came up.
    let unreachable = code.is_none() && error.is_fatal();
    let source = DriverError::MySql(error);
    if matches!(code, Some(ER_LOCK_WAIT_TIMEOUT | ER_LOCK_DEADLOCK)) {
        StoreError::Busy { url, source }
    } else if unreachable {
        StoreError::Unreachable { url, source }
    } else {
        StoreError::Database { url, source }
    }
}

struct Session {
    conn: Conn,
    /// False while an operation runs; still false when a later one finds it, the
    /// operation was abandoned half-way and the connection's state is unknown.
    idle: bool,
}

/// A connection to one database, shared by the calls of one store.
struct My {
    url: ServerUrl,
    session: Mutex<Option<Session>>,
}

impl My {
    async fn open(url: &ServerUrl, missing: IfMissing) -> Result<My, StoreError> {
        let conn = connect(url, missing).await?;
        Ok(My {
            url: url.clone(),
            session: Mutex::new(Some(Session { conn, idle: true })),
        })
    }

    fn shown(&self) -> String {
        self.url.redacted()
    }

    async fn session(&self) -> Result<MutexGuard<'_, Option<Session>>, StoreError> {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|session| !session.idle) {
            tracing::warn!(url = %self.url, "dropping a MySQL connection left in an unknown state");
            *slot = None;
        }
        if slot.is_none() {
            let conn = connect(&self.url, IfMissing::Fail).await?;
            *slot = Some(Session { conn, idle: true });
        }
        Ok(slot)
    }

    /// Runs `work` on the connection and turns failures into [`StoreError`]s. A failure
    /// from the driver drops the connection: its state is not worth reasoning about, and
    /// a reconnect costs milliseconds.
    async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut Conn) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let mut slot = self.session().await?;
        let session = slot.as_mut().expect("session() leaves a connected session");
        session.idle = false;
        match work(&mut session.conn).await {
            Ok(value) => {
                session.idle = true;
                Ok(value)
            }
            Err(Failure::Store(error)) => {
                session.idle = true;
                Err(error)
            }
            Err(Failure::My(error)) => {
                *slot = None;
                Err(classify(&self.shown(), error))
            }
        }
    }
}

async fn connect(url: &ServerUrl, missing: IfMissing) -> Result<Conn, StoreError> {
    let shown = url.redacted();
    let opts = Opts::from_url(url.expose()).map_err(|error| StoreError::UnsupportedUrl {
        url: shown.clone(),
        reason: error.to_string(),
    })?;
    let with_session_settings = |opts: Opts| {
        OptsBuilder::from_opts(opts).init(vec![format!(
            "SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT_S}"
        )])
    };
    match connect_within_timeout(with_session_settings(opts.clone())).await {
        Ok(conn) => Ok(conn),
        Err(error) if server_code(&error) == Some(ER_BAD_DB_ERROR) => match missing {
            IfMissing::Fail => Err(StoreError::NotFound { url: shown }),
            IfMissing::Create => {
                create_database(&opts, &shown).await?;
                connect_within_timeout(with_session_settings(opts))
                    .await
                    .map_err(|error| classify(&shown, error))
            }
        },
        Err(error) => Err(classify(&shown, error)),
    }
}

async fn connect_within_timeout(opts: OptsBuilder) -> Result<Conn, mysql_async::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts)).await {
        Ok(connected) => connected,
        Err(_elapsed) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {CONNECT_TIMEOUT:?}"),
        )
        .into()),
    }
}

/// Creates the database the URL names, as SQLite creates a missing file.
async fn create_database(opts: &Opts, shown: &str) -> Result<(), StoreError> {
    let name = opts.db_name().unwrap_or_default().replace('`', "``");
    let without_database = OptsBuilder::from_opts(opts.clone()).db_name(None::<String>);
    let fail = |error| classify(shown, error);
    let mut conn = connect_within_timeout(without_database)
        .await
        .map_err(fail)?;
    conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{name}`"))
        .await
        .map_err(fail)?;
    conn.disconnect().await.map_err(fail)?;
    tracing::info!(url = %shown, "created the database (if it was still missing)");
    Ok(())
}

/// Commits on success and rolls back on failure, inside the operation, so that no lock
/// outlives it: mysql_async would otherwise roll back only on the next query.
async fn finish<T>(tx: Transaction<'_>, result: Result<T, Failure>) -> Result<T, Failure> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(failure) => {
            tx.rollback().await?;
            Err(failure)
        }
    }
}

async fn table_exists(conn: &mut Conn, table: &str) -> Result<bool, mysql_async::Error> {
    let count: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = ?",
            (table,),
        )
        .await?;
    Ok(count.unwrap_or(0) > 0)
}

pub struct MySqlLedger {
    my: My,
}

impl MySqlLedger {
    pub async fn open(url: &ServerUrl, seed: Seed, initial_total: i64) -> Result<Self, StoreError> {
        let my = My::open(url, IfMissing::Create).await?;
        let shown = my.shown();
        my.run(async |conn| {
            for statement in ledger_schema() {
                conn.query_drop(statement).await?;
            }
            let mut tx = conn.start_transaction(TxOpts::default()).await?;
            let result = async {
                let claimed = tx
                    .exec_drop(
                        "INSERT INTO meta (`key`, value) VALUES ('initial_total', ?)",
                        (initial_total.to_string(),),
                    )
                    .await;
                match claimed {
                    Ok(()) => {}
                    Err(error) if server_code(&error) == Some(ER_DUP_ENTRY) => {
                        tracing::info!(url = %shown, "ledger already seeded by another node");
                        return Ok(());
                    }
                    Err(error) => return Err(error.into()),
                }
                let mut first = 1;
                while first <= seed.accounts {
                    let last = first.saturating_add(SEED_BATCH - 1).min(seed.accounts);
                    // Integers only, so formatting them into the statement is safe.
                    let values = (first..=last)
                        .map(|id| format!("({id}, {})", seed.initial_balance))
                        .collect::<Vec<_>>()
                        .join(", ");
                    tx.query_drop(format!("INSERT INTO accounts (id, balance) VALUES {values}"))
                        .await?;
                    first = match last.checked_add(1) {
                        Some(next) => next,
                        None => break,
                    };
                }
                tracing::info!(url = %shown, accounts = seed.accounts, initial_total, "seeded the ledger");
                Ok(())
            }
            .await;
            finish(tx, result).await
        })
        .await?;
        Ok(MySqlLedger { my })
    }
}

#[async_trait::async_trait]
impl LedgerStore for MySqlLedger {
    async fn transfer(&self, order: &TransferOrder) -> Result<Committed, StoreError> {
        let shown = self.my.shown();
        self.my
            .run(async |conn| {
                let mut tx = conn.start_transaction(TxOpts::default()).await?;
                let result = async {
                    let head: Option<i64> = tx
                        .query_first("SELECT 1 FROM meta WHERE `key` = 'initial_total' FOR UPDATE")
                        .await?;
                    if head.is_none() {
                        return Err(Failure::Store(StoreError::NotInitialized {
                            url: shown.clone(),
                            table: "meta",
                            tier: "ledger",
                        }));
                    }
                    let mut balance_of = async |id: i64| -> Result<i64, Failure> {
                        let balance: Option<i64> = tx
                            .exec_first(
                                "SELECT balance FROM accounts WHERE id = ? FOR UPDATE",
                                (id,),
                            )
                            .await?;
                        balance.ok_or(Failure::Store(StoreError::UnknownAccount(id)))
                    };
                    let from_balance = balance_of(order.from).await?;
                    balance_of(order.to).await?;
                    if from_balance < order.amount {
                        return Err(Failure::Store(StoreError::InsufficientFunds {
                            account: order.from,
                            balance: from_balance,
                            amount: order.amount,
                        }));
                    }
                    tx.exec_drop(
                        "UPDATE accounts SET balance = balance - ? WHERE id = ?",
                        (order.amount, order.from),
                    )
                    .await?;
                    tx.exec_drop(
                        "UPDATE accounts SET balance = balance + ? WHERE id = ?",
                        (order.amount, order.to),
                    )
                    .await?;
                    let prev_hash: String = tx
                        .query_first("SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1 FOR UPDATE")
                        .await?
                        .unwrap_or_else(|| GENESIS_HASH.to_owned());
                    let hash =
                        link_hash(&prev_hash, &order.tx_id, order.from, order.to, order.amount);
                    let committed_at_ms = unix_ms(SystemTime::now());
                    tx.exec_drop(
                        "INSERT INTO ledger
                         (tx_id, from_account, to_account, amount, prev_hash, hash, committed_at_ms)
                         VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            &order.tx_id,
                            order.from,
                            order.to,
                            order.amount,
                            &prev_hash,
                            &hash,
                            committed_at_ms,
                        ),
                    )
                    .await?;
                    let seq = tx.last_insert_id().ok_or_else(|| StoreError::Corrupt {
                        url: shown.clone(),
                        detail: "the ledger insert returned no AUTO_INCREMENT seq".to_owned(),
                    })?;
                    Ok(Committed {
                        seq: seq as i64,
                        hash,
                        committed_at_ms,
                    })
                }
                .await;
                finish(tx, result).await
            })
            .await
    }

    async fn snapshot(&self) -> Result<LedgerSnapshot, StoreError> {
        snapshot_ledger(&self.my).await
    }
}

/// Options of the read-only, one-snapshot transaction every read for the check runs in.
fn snapshot_options() -> TxOpts {
    let mut options = TxOpts::default();
    options
        .with_consistent_snapshot(true)
        .with_isolation_level(IsolationLevel::RepeatableRead)
        .with_readonly(true);
    options
}

type RowTuple = (i64, String, i64, i64, i64, String, String, i64);

/// Reads meta, balances and the chain in one snapshot, so that a live ledger yields a
/// state that really existed.
async fn snapshot_ledger(my: &My) -> Result<LedgerSnapshot, StoreError> {
    let shown = my.shown();
    my.run(async |conn| {
        let mut tx = conn.start_transaction(snapshot_options()).await?;
        let result = async {
            let initial_total: Option<String> = match tx
                .query_first("SELECT value FROM meta WHERE `key` = 'initial_total'")
                .await?
            {
                Some(value) => value,
                None => {
                    return Err(Failure::Store(StoreError::NotInitialized {
                        url: shown.clone(),
                        table: "meta",
                        tier: "ledger",
                    }));
                }
            };
            let initial_total = initial_total
                .as_deref()
                .and_then(|total| total.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    url: shown.clone(),
                    detail: format!("meta.initial_total is {initial_total:?}, not an integer"),
                })?;
            let balances: Vec<(i64, i64)> = tx
                .query("SELECT id, balance FROM accounts ORDER BY id")
                .await?;
            let rows: Vec<RowTuple> = tx
                .query(
                    "SELECT seq, tx_id, from_account, to_account, amount, prev_hash, hash, committed_at_ms
                     FROM ledger ORDER BY seq",
                )
                .await?;
            let rows = rows
                .into_iter()
                .map(
                    |(seq, tx_id, from, to, amount, prev_hash, hash, committed_at_ms)| LedgerRow {
                        seq,
                        tx_id,
                        from,
                        to,
                        amount,
                        prev_hash,
                        hash,
                        committed_at_ms,
                    },
                )
                .collect();
            Ok(LedgerSnapshot {
                initial_total,
                balances,
                rows,
            })
        }
        .await;
        finish(tx, result).await
    })
    .await
}

/// Connects to an existing database for the check, creating nothing, and makes sure it
/// has `table`.
async fn open_existing(
    url: &ServerUrl,
    table: &'static str,
    tier: &'static str,
) -> Result<My, StoreError> {
    let my = My::open(url, IfMissing::Fail).await?;
    let exists = my
        .run(async |conn| Ok(table_exists(conn, table).await?))
        .await?;
    if !exists {
        return Err(StoreError::NotInitialized {
            url: my.shown(),
            table,
            tier,
        });
    }
    Ok(my)
}

pub async fn read_ledger(url: &ServerUrl) -> Result<LedgerSnapshot, StoreError> {
    snapshot_ledger(&open_existing(url, "ledger", "ledger").await?).await
}

pub struct MySqlAuditor {
    my: My,
}

impl MySqlAuditor {
    pub async fn open(url: &ServerUrl) -> Result<Self, StoreError> {
        let my = My::open(url, IfMissing::Create).await?;
        my.run(async |conn| Ok(conn.query_drop(audit_schema()).await?))
            .await?;
        Ok(MySqlAuditor { my })
    }
}

#[async_trait::async_trait]
impl AuditorStore for MySqlAuditor {
    async fn record(&self, tx_id: &str, hash: &str) -> Result<i64, StoreError> {
        self.my
            .run(async |conn| {
                let now = unix_ms(SystemTime::now());
                // One statement, its own transaction. A plain INSERT rather than INSERT
                // IGNORE, which would also turn other errors into warnings.
                let inserted = conn
                    .exec_drop(
                        "INSERT INTO audit (tx_id, hash, recorded_at_ms) VALUES (?, ?, ?)",
                        (tx_id, hash, now),
                    )
                    .await;
                match inserted {
                    Ok(()) => return Ok(now),
                    Err(error) if server_code(&error) == Some(ER_DUP_ENTRY) => {}
                    Err(error) => return Err(error.into()),
                }
                // A retry of a call whose answer was lost; rows are never deleted, so
                // the row is still there.
                let (recorded, recorded_at_ms): (String, i64) = conn
                    .exec_first(
                        "SELECT hash, recorded_at_ms FROM audit WHERE tx_id = ?",
                        (tx_id,),
                    )
                    .await?
                    .ok_or_else(|| StoreError::Corrupt {
                        url: self.my.shown(),
                        detail: format!("{tx_id} is a duplicate key but has no row"),
                    })?;
                if recorded != hash {
                    return Err(Failure::Store(StoreError::HashConflict {
                        tx_id: tx_id.to_owned(),
                        recorded,
                        offered: hash.to_owned(),
                    }));
                }
                Ok(recorded_at_ms)
            })
            .await
    }

    async fn snapshot(&self) -> Result<Vec<AuditRow>, StoreError> {
        snapshot_audit(&self.my).await
    }
}

async fn snapshot_audit(my: &My) -> Result<Vec<AuditRow>, StoreError> {
    my.run(async |conn| {
        let mut tx = conn.start_transaction(snapshot_options()).await?;
        let result = async {
            let rows: Vec<(String, String, i64)> = tx
                .query(
                    "SELECT tx_id, hash, recorded_at_ms FROM audit ORDER BY recorded_at_ms, tx_id",
                )
                .await?;
            Ok(rows
                .into_iter()
                .map(|(tx_id, hash, recorded_at_ms)| AuditRow {
                    tx_id,
                    hash,
                    recorded_at_ms,
                })
                .collect())
        }
        .await;
        finish(tx, result).await
    })
    .await
}

pub async fn read_auditor(url: &ServerUrl) -> Result<Vec<AuditRow>, StoreError> {
    snapshot_audit(&open_existing(url, "audit", "auditor").await?).await
}
