//! Storage for both tiers, behind two small traits so that other databases can be added
//! next to SQLite without touching the nodes or the check:
//!
//! - [`LedgerStore`]: accounts, the `meta` row with the initial total, and the hash-chained
//!   `ledger` table that every ledger node of a cluster shares.
//! - [`AuditorStore`]: the auditor's `audit` table of (tx_id, hash).
//! - [`DbUrl`]: the one closed enum that config turns into a store.
//! - `sqlite.rs`: the only backend so far.
//!
//! Store methods block (rusqlite is synchronous); async callers run them on
//! `tokio::task::spawn_blocking`. A future PostgreSQL or MySQL backend can implement the
//! same traits with a synchronous driver, or the traits can grow async twins then.

mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

/// Where a tier's data lives. Parsed from `sqlite:PATH` (also `sqlite://PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
}

impl std::str::FromStr for DbUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, StoreError> {
        let unsupported = |reason: &str| StoreError::UnsupportedUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = url
            .split_once(':')
            .ok_or_else(|| unsupported("expected sqlite:PATH"))?;
        match scheme {
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.is_empty() {
                    return Err(unsupported("the path after sqlite: is empty"));
                }
                Ok(DbUrl::Sqlite(PathBuf::from(path)))
            }
            "postgres" | "postgresql" | "mysql" => Err(unsupported(
                "only SQLite is implemented so far; use sqlite:PATH",
            )),
            _ => Err(unsupported("unknown scheme; use sqlite:PATH")),
        }
    }
}

impl std::fmt::Display for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
        }
    }
}

/// How the first ledger node to start seeds an empty ledger database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed {
    /// Accounts are numbered 1..=accounts.
    pub accounts: u32,
    pub initial_balance: i64,
}

impl Default for Seed {
    fn default() -> Self {
        Seed {
            accounts: 100,
            initial_balance: 1000,
        }
    }
}

/// A transfer the ledger node has validated and named; the store checks funds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferOrder {
    pub tx_id: String,
    pub from: i64,
    pub to: i64,
    pub amount: i64,
}

/// What a committed transfer became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub seq: i64,
    pub hash: String,
    pub committed_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub seq: i64,
    pub tx_id: String,
    pub from: i64,
    pub to: i64,
    pub amount: i64,
    pub prev_hash: String,
    pub hash: String,
    pub committed_at_ms: i64,
}

/// Everything the check needs from a ledger database, read in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerSnapshot {
    pub initial_total: i64,
    /// (account id, balance), by id.
    pub balances: Vec<(i64, i64)>,
    /// By seq.
    pub rows: Vec<LedgerRow>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub tx_id: String,
    pub hash: String,
    pub recorded_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {url:?}: {reason}")]
    UnsupportedUrl { url: String, reason: String },
    #[error("{url} does not exist; point at the database file a node wrote (or a restored copy)")]
    NotFound { url: String },
    #[error(
        "{url} has no {table:?} table: it is not a {tier} database, or no {tier} node has started on it yet"
    )]
    NotInitialized {
        url: String,
        table: &'static str,
        tier: &'static str,
    },
    #[error("{url}: {detail}")]
    Corrupt { url: String, detail: String },
    #[error(
        "cannot seed {accounts} accounts of {initial_balance}: the total does not fit in 64 bits"
    )]
    SeedTooLarge { accounts: u32, initial_balance: i64 },
    #[error("account {0} does not exist")]
    UnknownAccount(i64),
    #[error("insufficient funds: account {account} holds {balance}, the transfer needs {amount}")]
    InsufficientFunds {
        account: i64,
        balance: i64,
        amount: i64,
    },
    #[error("transaction {tx_id} is already recorded with hash {recorded}, not {offered}")]
    HashConflict {
        tx_id: String,
        recorded: String,
        offered: String,
    },
    #[error("{url} stayed locked by another writer past the busy timeout: {source}")]
    Busy {
        url: String,
        source: rusqlite::Error,
    },
    #[error("{url}: {source}")]
    Database {
        url: String,
        source: rusqlite::Error,
    },
}

/// The ledger tier's storage. Several ledger nodes, in several processes, may share one
/// database: `transfer` must serialize them, not fail them.
pub trait LedgerStore: Send + Sync + 'static {
    /// In one transaction: check funds, debit, credit, append the next hash-chain link.
    /// Insufficient funds writes nothing.
    fn transfer(&self, order: &TransferOrder) -> Result<Committed, StoreError>;

    fn snapshot(&self) -> Result<LedgerSnapshot, StoreError>;
}

/// The auditor tier's storage.
pub trait AuditorStore: Send + Sync + 'static {
    /// Records a transaction and returns when it was first recorded. Recording the same
    /// (tx_id, hash) again is a no-op, so that a ledger node may retry safely.
    fn record(&self, tx_id: &str, hash: &str) -> Result<i64, StoreError>;

    fn snapshot(&self) -> Result<Vec<AuditRow>, StoreError>;
}

/// Opens (creating and seeding if needed) a ledger database for a ledger node.
pub fn open_ledger(url: &DbUrl, seed: Seed) -> Result<Arc<dyn LedgerStore>, StoreError> {
    match url {
        DbUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteLedger::open(path, seed)?)),
    }
}

/// Opens (creating if needed) an auditor database for an auditor node.
pub fn open_auditor(url: &DbUrl) -> Result<Arc<dyn AuditorStore>, StoreError> {
    match url {
        DbUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteAuditor::open(path)?)),
    }
}

/// Reads an existing ledger database without creating or changing anything, so that a
/// check of a restored backup cannot repair what it is meant to judge.
pub fn read_ledger(url: &DbUrl) -> Result<LedgerSnapshot, StoreError> {
    match url {
        DbUrl::Sqlite(path) => sqlite::read_ledger(path),
    }
}

/// Reads an existing auditor database without creating or changing anything.
pub fn read_auditor(url: &DbUrl) -> Result<Vec<AuditRow>, StoreError> {
    match url {
        DbUrl::Sqlite(path) => sqlite::read_auditor(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_sqlite_only() {
        assert_eq!(
            "sqlite:/tmp/a.db".parse::<DbUrl>().unwrap(),
            DbUrl::Sqlite("/tmp/a.db".into())
        );
        assert_eq!(
            "sqlite:///tmp/a.db".parse::<DbUrl>().unwrap(),
            DbUrl::Sqlite("/tmp/a.db".into())
        );
        assert_eq!(
            "sqlite:rel.db".parse::<DbUrl>().unwrap(),
            DbUrl::Sqlite("rel.db".into())
        );
        for bad in ["", "a.db", "sqlite:", "postgres://h/db", "redis://x"] {
            assert!(bad.parse::<DbUrl>().is_err(), "{bad:?} parsed");
        }
    }
}
