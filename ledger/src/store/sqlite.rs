//! The SQLite backend of both stores.
//!
//! Several ledger nodes in different processes share one file, so the file runs in WAL
//! mode (readers never block the writer) with a busy timeout, and every write
//! transaction starts with `BEGIN IMMEDIATE`: it takes the write lock up front, so two
//! writers queue on the busy handler instead of both reading and then deadlocking on the
//! upgrade to a write lock. Each node holds one connection behind a mutex, and every
//! call runs on a `spawn_blocking` thread, because rusqlite blocks.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use stillpoint_node::time::unix_ms;

use super::{
    AuditRow, AuditorStore, Committed, DriverError, LedgerRow, LedgerSnapshot, LedgerStore, Seed,
    StoreError, TransferOrder,
};
use crate::chain::{GENESIS_HASH, link_hash};

/// Long enough to queue behind a burst of other nodes' transfers, short enough that a
/// stuck writer surfaces as an error rather than a hang.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const LEDGER_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS accounts (
        id INTEGER PRIMARY KEY,
        balance INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT
    );
    CREATE TABLE IF NOT EXISTS ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        tx_id TEXT UNIQUE NOT NULL,
        from_account INTEGER NOT NULL,
        to_account INTEGER NOT NULL,
        amount INTEGER NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        committed_at_ms INTEGER NOT NULL
    );
";

const AUDIT_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS audit (
        tx_id TEXT PRIMARY KEY,
        hash TEXT NOT NULL,
        recorded_at_ms INTEGER NOT NULL
    );
";

/// Turns rusqlite errors into [`StoreError`]s that name the database; a lock that outlived
/// the busy timeout gets its own variant because retrying it can succeed.
struct Db {
    url: String,
    conn: Mutex<Connection>,
}

impl Db {
    fn error(&self, source: rusqlite::Error) -> StoreError {
        classify(&self.url, source)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-transaction dropped the transaction, which rolled it back, so the
        // connection is still usable.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn classify(url: &str, source: rusqlite::Error) -> StoreError {
    let busy = matches!(
        source.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    let url = url.to_owned();
    let source = DriverError::Sqlite(source);
    if busy {
        StoreError::Busy { url, source }
    } else {
        StoreError::Database { url, source }
    }
}

/// Runs rusqlite work off the async threads. The task runs to completion even if the
/// caller's future is dropped, so a transaction is never cut in half.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StoreError::TaskFailed {
            url: url_of(path),
            detail: error.to_string(),
        })?
}

fn url_of(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

/// Runs `open` again while it fails with SQLITE_BUSY, until [`BUSY_TIMEOUT`]. Nodes
/// that open a new file at the same moment get SQLITE_BUSY without SQLite's busy
/// handler being consulted (switching the file to WAL and recovering its WAL index
/// take locks that are not waited for), so opening waits here as every write does in
/// the busy handler.
fn retry_while_busy<T>(mut open: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match open() {
            Err(StoreError::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            outcome => return outcome,
        }
    }
}

/// Opens a connection for a node, creating the file if needed, in WAL mode.
fn open_for_node(path: &Path) -> Result<Db, StoreError> {
    let url = url_of(path);
    let fail = |source| classify(&url, source);
    let conn = Connection::open(path).map_err(fail)?;
    // Set before anything else, so that even switching to WAL waits for other nodes.
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(%url, %mode, "SQLite refused WAL mode; concurrent nodes will block each other's readers");
    }
    Ok(Db {
        url,
        conn: Mutex::new(conn),
    })
}

/// Opens an existing file without creating it and without changing its journal mode.
fn open_existing(path: &Path, table: &'static str, tier: &'static str) -> Result<Db, StoreError> {
    let url = url_of(path);
    if !path.exists() {
        return Err(StoreError::NotFound { url });
    }
    let fail = |source| classify(&url, source);
    let flags = OpenFlags::default() - OpenFlags::SQLITE_OPEN_CREATE;
    let conn = Connection::open_with_flags(path, flags).map_err(fail)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
    let has_table: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |row| row.get(0),
        )
        .map_err(fail)?;
    if !has_table {
        return Err(StoreError::NotInitialized { url, table, tier });
    }
    Ok(Db {
        url,
        conn: Mutex::new(conn),
    })
}

pub struct SqliteLedger {
    db: Arc<Db>,
    path: PathBuf,
}

impl SqliteLedger {
    pub async fn open(path: &Path, seed: Seed, initial_total: i64) -> Result<Self, StoreError> {
        let owned = path.to_owned();
        let db = blocking(path, move || {
            retry_while_busy(|| open_ledger(&owned, seed, initial_total))
        })
        .await?;
        Ok(SqliteLedger {
            db: Arc::new(db),
            path: path.to_owned(),
        })
    }
}

/// Creates the schema and seeds the accounts unless another node already did. Both
/// happen in one write transaction that looks for the `initial_total` row first, so
/// nodes starting at the same moment seed exactly once.
fn open_ledger(path: &Path, seed: Seed, initial_total: i64) -> Result<Db, StoreError> {
    let db = open_for_node(path)?;
    {
        let fail = |source| db.error(source);
        let mut conn = db.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        tx.execute_batch(LEDGER_SCHEMA).map_err(fail)?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'initial_total'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(fail)?;
        match existing {
            Some(total) => {
                tracing::info!(url = %db.url, initial_total = %total, "ledger already seeded by another node");
            }
            None => {
                let mut insert = tx
                    .prepare("INSERT INTO accounts (id, balance) VALUES (?1, ?2)")
                    .map_err(fail)?;
                for id in 1..=i64::from(seed.accounts) {
                    insert.execute((id, seed.initial_balance)).map_err(fail)?;
                }
                drop(insert);
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('initial_total', ?1)",
                    [initial_total.to_string()],
                )
                .map_err(fail)?;
                tracing::info!(url = %db.url, accounts = seed.accounts, initial_total, "seeded the ledger");
            }
        }
        tx.commit().map_err(fail)?;
    }
    Ok(db)
}

#[async_trait::async_trait]
impl LedgerStore for SqliteLedger {
    async fn transfer(&self, order: &TransferOrder) -> Result<Committed, StoreError> {
        let (db, order) = (self.db.clone(), order.clone());
        blocking(&self.path, move || transfer(&db, &order)).await
    }

    async fn snapshot(&self) -> Result<LedgerSnapshot, StoreError> {
        let db = self.db.clone();
        blocking(&self.path, move || snapshot_ledger(&db)).await
    }
}

fn transfer(db: &Db, order: &TransferOrder) -> Result<Committed, StoreError> {
    let fail = |source| db.error(source);
    let mut conn = db.lock();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail)?;
    let balance_of = |id: i64| {
        tx.query_row("SELECT balance FROM accounts WHERE id = ?1", [id], |row| {
            row.get::<_, i64>(0)
        })
        .optional()
        .map_err(fail)?
        .ok_or(StoreError::UnknownAccount(id))
    };
    let from_balance = balance_of(order.from)?;
    balance_of(order.to)?;
    if from_balance < order.amount {
        // Dropping `tx` rolls back: nothing was written.
        return Err(StoreError::InsufficientFunds {
            account: order.from,
            balance: from_balance,
            amount: order.amount,
        });
    }
    tx.execute(
        "UPDATE accounts SET balance = balance - ?2 WHERE id = ?1",
        (order.from, order.amount),
    )
    .map_err(fail)?;
    tx.execute(
        "UPDATE accounts SET balance = balance + ?2 WHERE id = ?1",
        (order.to, order.amount),
    )
    .map_err(fail)?;
    let prev_hash: String = tx
        .query_row(
            "SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(fail)?
        .unwrap_or_else(|| GENESIS_HASH.to_owned());
    let hash = link_hash(&prev_hash, &order.tx_id, order.from, order.to, order.amount);
    let committed_at_ms = unix_ms(SystemTime::now());
    tx.execute(
            "INSERT INTO ledger (tx_id, from_account, to_account, amount, prev_hash, hash, committed_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
        .map_err(fail)?;
    let seq = tx.last_insert_rowid();
    tx.commit().map_err(fail)?;
    Ok(Committed {
        seq,
        hash,
        committed_at_ms,
    })
}

pub async fn read_ledger(path: &Path) -> Result<LedgerSnapshot, StoreError> {
    let owned = path.to_owned();
    blocking(path, move || {
        snapshot_ledger(&open_existing(&owned, "ledger", "ledger")?)
    })
    .await
}

/// Reads meta, balances and the chain in one read transaction, so that a live ledger
/// yields a state that really existed.
fn snapshot_ledger(db: &Db) -> Result<LedgerSnapshot, StoreError> {
    let fail = |source| db.error(source);
    let mut conn = db.lock();
    let tx = conn.transaction().map_err(fail)?;
    let initial_total: String = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'initial_total'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(fail)?
        .ok_or_else(|| StoreError::NotInitialized {
            url: db.url.clone(),
            table: "meta",
            tier: "ledger",
        })?;
    let initial_total = initial_total.parse().map_err(|_| StoreError::Corrupt {
        url: db.url.clone(),
        detail: format!("meta.initial_total is {initial_total:?}, not an integer"),
    })?;
    let balances = tx
        .prepare("SELECT id, balance FROM accounts ORDER BY id")
        .and_then(|mut statement| {
            statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(fail)?;
    let rows = tx
        .prepare(
            "SELECT seq, tx_id, from_account, to_account, amount, prev_hash, hash, committed_at_ms
             FROM ledger ORDER BY seq",
        )
        .and_then(|mut statement| {
            statement
                .query_map([], |row| {
                    Ok(LedgerRow {
                        seq: row.get(0)?,
                        tx_id: row.get(1)?,
                        from: row.get(2)?,
                        to: row.get(3)?,
                        amount: row.get(4)?,
                        prev_hash: row.get(5)?,
                        hash: row.get(6)?,
                        committed_at_ms: row.get(7)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(fail)?;
    tx.commit().map_err(fail)?;
    Ok(LedgerSnapshot {
        initial_total,
        balances,
        rows,
    })
}

pub struct SqliteAuditor {
    db: Arc<Db>,
    path: PathBuf,
}

impl SqliteAuditor {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let owned = path.to_owned();
        let db = blocking(path, move || {
            retry_while_busy(|| {
                let db = open_for_node(&owned)?;
                db.lock()
                    .execute_batch(AUDIT_SCHEMA)
                    .map_err(|source| db.error(source))?;
                Ok(db)
            })
        })
        .await?;
        Ok(SqliteAuditor {
            db: Arc::new(db),
            path: path.to_owned(),
        })
    }
}

#[async_trait::async_trait]
impl AuditorStore for SqliteAuditor {
    async fn record(&self, tx_id: &str, hash: &str) -> Result<i64, StoreError> {
        let (db, tx_id, hash) = (self.db.clone(), tx_id.to_owned(), hash.to_owned());
        blocking(&self.path, move || record(&db, &tx_id, &hash)).await
    }

    async fn snapshot(&self) -> Result<Vec<AuditRow>, StoreError> {
        let db = self.db.clone();
        blocking(&self.path, move || snapshot_audit(&db)).await
    }
}

fn record(db: &Db, tx_id: &str, hash: &str) -> Result<i64, StoreError> {
    let fail = |source| db.error(source);
    let conn = db.lock();
    let now = unix_ms(SystemTime::now());
    // A single statement is its own write transaction; no read precedes the write,
    // so there is no lock upgrade to deadlock on.
    let inserted = conn
        .execute(
            "INSERT INTO audit (tx_id, hash, recorded_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (tx_id) DO NOTHING",
            (tx_id, hash, now),
        )
        .map_err(fail)?;
    if inserted == 1 {
        return Ok(now);
    }
    // A retry of a call whose answer was lost; rows are never deleted, so the row is
    // still there.
    let (recorded, recorded_at_ms): (String, i64) = conn
        .query_row(
            "SELECT hash, recorded_at_ms FROM audit WHERE tx_id = ?1",
            [tx_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(fail)?;
    if recorded != hash {
        return Err(StoreError::HashConflict {
            tx_id: tx_id.to_owned(),
            recorded,
            offered: hash.to_owned(),
        });
    }
    Ok(recorded_at_ms)
}

pub async fn read_auditor(path: &Path) -> Result<Vec<AuditRow>, StoreError> {
    let owned = path.to_owned();
    blocking(path, move || {
        snapshot_audit(&open_existing(&owned, "audit", "auditor")?)
    })
    .await
}

fn snapshot_audit(db: &Db) -> Result<Vec<AuditRow>, StoreError> {
    db.lock()
        .prepare("SELECT tx_id, hash, recorded_at_ms FROM audit ORDER BY recorded_at_ms, tx_id")
        .and_then(|mut statement| {
            statement
                .query_map([], |row| {
                    Ok(AuditRow {
                        tx_id: row.get(0)?,
                        hash: row.get(1)?,
                        recorded_at_ms: row.get(2)?,
                    })
                })?
                .collect()
        })
        .map_err(|source| db.error(source))
}
