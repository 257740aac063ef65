//! Storage for both tiers, behind two small traits so that the nodes and the check do
//! not care which database holds the data:
//!
//! - [`LedgerStore`]: accounts, the `meta` row with the initial total, and the hash-chained
//!   `ledger` table that every ledger node of a cluster shares.
//! - [`AuditorStore`]: the auditor's `audit` table of (tx_id, hash).
//! - [`DbUrl`]: the one closed enum that config turns into a store.
//! - `sqlite.rs`, `postgres.rs`, `mysql.rs`: the backends. All three create the same
//!   tables with the same columns and keep the same rules: the first node seeds, a
//!   transfer is one transaction serialized on the chain head, and a read for the check
//!   is one consistent snapshot that creates nothing.
//!
//! The traits are async because the server backends' drivers are (tokio-postgres,
//! mysql_async); the SQLite backend runs its synchronous rusqlite calls on
//! `spawn_blocking`.

mod mysql;
mod postgres;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

/// Where a tier's data lives: `sqlite:PATH` (also `sqlite://PATH`),
/// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` (also `postgresql://`), or
/// `mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for MySQL and MariaDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    Postgres(ServerUrl),
    MySql(ServerUrl),
}

/// The URL of a database on a server, kept as given for the driver. It shows (in
/// `Display`, `Debug` and error messages) with any password hidden.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl {
    url: String,
}

impl ServerUrl {
    /// The URL as given, password included, for the driver only.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// The URL with the password, if any, replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_password(&self.url)
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// `scheme://user:secret@host/db` → `scheme://user:***@host/db`; anything else as is.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

const URL_FORMS: &str =
    "use sqlite:PATH, postgres://USER@HOST:PORT/DATABASE or mysql://USER@HOST:PORT/DATABASE";

impl std::str::FromStr for DbUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, StoreError> {
        let unsupported = |reason: String| StoreError::UnsupportedUrl {
            url: redact_password(url),
            reason,
        };
        let (scheme, rest) = url
            .split_once(':')
            .ok_or_else(|| unsupported(format!("no scheme; {URL_FORMS}")))?;
        let server = || ServerUrl {
            url: url.to_owned(),
        };
        match scheme {
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.is_empty() {
                    return Err(unsupported("the path after sqlite: is empty".to_owned()));
                }
                Ok(DbUrl::Sqlite(PathBuf::from(path)))
            }
            "postgres" | "postgresql" => {
                // Parsed here so that a bad URL fails when the command starts, not
                // when the first connection is made.
                let config: tokio_postgres::Config = url
                    .parse()
                    .map_err(|error| unsupported(stillpoint_node::error_chain(&error)))?;
                if config.get_hosts().is_empty() {
                    return Err(unsupported(format!("no host; {URL_FORMS}")));
                }
                Ok(DbUrl::Postgres(server()))
            }
            "mysql" => {
                let opts = mysql_async::Opts::from_url(url)
                    .map_err(|error| unsupported(error.to_string()))?;
                if opts.db_name().is_none_or(str::is_empty) {
                    return Err(unsupported(format!("no database name; {URL_FORMS}")));
                }
                Ok(DbUrl::MySql(server()))
            }
            _ => Err(unsupported(format!(
                "unknown scheme {scheme:?}; {URL_FORMS}"
            ))),
        }
    }
}

impl std::fmt::Display for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            DbUrl::Postgres(url) | DbUrl::MySql(url) => url.fmt(f),
        }
    }
}

/// Whether connecting to a database on a server may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IfMissing {
    /// For nodes, as SQLite creates a missing file.
    Create,
    /// For the check, which must not change what it judges: [`StoreError::NotFound`].
    Fail,
}

/// How the first ledger node to start seeds an empty ledger database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed {
    /// Accounts are numbered 1..=accounts.
    pub accounts: u32,
    pub initial_balance: i64,
}

impl Seed {
    /// What the balances must always sum to.
    pub fn initial_total(&self) -> Result<i64, StoreError> {
        i64::from(self.accounts)
            .checked_mul(self.initial_balance)
            .ok_or(StoreError::SeedTooLarge {
                accounts: self.accounts,
                initial_balance: self.initial_balance,
            })
    }
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

/// What a database driver reported, kept whole so that callers can inspect it.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", stillpoint_node::error_chain(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    MySql(#[from] mysql_async::Error),
    #[error("the server closed the connection")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {url:?}: {reason}")]
    UnsupportedUrl { url: String, reason: String },
    #[error("{url} does not exist; point at a database a node wrote (or a restored copy)")]
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
    /// A lock wait that outlived the busy timeout, a deadlock or a serialization
    /// failure: retrying can succeed.
    #[error("{url} stayed locked by another writer past the busy timeout: {source}")]
    Busy { url: String, source: DriverError },
    /// The server could not be reached or the connection broke; the next call
    /// reconnects, so retrying can succeed.
    #[error("cannot reach {url}: {source}; is the database server running?")]
    Unreachable { url: String, source: DriverError },
    #[error("{url}: {source}")]
    Database { url: String, source: DriverError },
    #[error("{url}: the storage task failed: {detail}")]
    TaskFailed { url: String, detail: String },
}

/// The ledger tier's storage. Several ledger nodes, in several processes, may share one
/// database: `transfer` must serialize them, not fail them.
#[async_trait::async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// In one transaction: check funds, debit, credit, append the next hash-chain link.
    /// Insufficient funds writes nothing.
    async fn transfer(&self, order: &TransferOrder) -> Result<Committed, StoreError>;

    async fn snapshot(&self) -> Result<LedgerSnapshot, StoreError>;
}

/// The auditor tier's storage.
#[async_trait::async_trait]
pub trait AuditorStore: Send + Sync + 'static {
    /// Records a transaction and returns when it was first recorded. Recording the same
    /// (tx_id, hash) again is a no-op, so that a ledger node may retry safely.
    async fn record(&self, tx_id: &str, hash: &str) -> Result<i64, StoreError>;

    async fn snapshot(&self) -> Result<Vec<AuditRow>, StoreError>;
}

/// Opens (creating the database and schema, and seeding, if needed) a ledger database
/// for a ledger node.
pub async fn open_ledger(url: &DbUrl, seed: Seed) -> Result<Arc<dyn LedgerStore>, StoreError> {
    let initial_total = seed.initial_total()?;
    Ok(match url {
        DbUrl::Sqlite(path) => {
            Arc::new(sqlite::SqliteLedger::open(path, seed, initial_total).await?)
        }
        DbUrl::Postgres(url) => Arc::new(postgres::PgLedger::open(url, seed, initial_total).await?),
        DbUrl::MySql(url) => Arc::new(mysql::MySqlLedger::open(url, seed, initial_total).await?),
    })
}

/// Opens (creating the database and schema if needed) an auditor database for an
/// auditor node.
pub async fn open_auditor(url: &DbUrl) -> Result<Arc<dyn AuditorStore>, StoreError> {
    Ok(match url {
        DbUrl::Sqlite(path) => Arc::new(sqlite::SqliteAuditor::open(path).await?),
        DbUrl::Postgres(url) => Arc::new(postgres::PgAuditor::open(url).await?),
        DbUrl::MySql(url) => Arc::new(mysql::MySqlAuditor::open(url).await?),
    })
}

/// Reads an existing ledger database without creating or changing anything, so that a
/// check of a restored backup cannot repair what it is meant to judge.
pub async fn read_ledger(url: &DbUrl) -> Result<LedgerSnapshot, StoreError> {
    match url {
        DbUrl::Sqlite(path) => sqlite::read_ledger(path).await,
        DbUrl::Postgres(url) => postgres::read_ledger(url).await,
        DbUrl::MySql(url) => mysql::read_ledger(url).await,
    }
}

/// Reads an existing auditor database without creating or changing anything.
pub async fn read_auditor(url: &DbUrl) -> Result<Vec<AuditRow>, StoreError> {
    match url {
        DbUrl::Sqlite(path) => sqlite::read_auditor(path).await,
        DbUrl::Postgres(url) => postgres::read_auditor(url).await,
        DbUrl::MySql(url) => mysql::read_auditor(url).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_parse() {
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
    }

    #[test]
    fn server_urls_parse_and_keep_their_text() {
        for (url, postgres) in [
            ("postgres://postgres@127.0.0.1:5433/ledger", true),
            ("postgresql://u:pw@db.example:5432/ledger", true),
            ("mysql://root@127.0.0.1:3307/auditor", false),
            ("mysql://u:pw@db.example/auditor", false),
        ] {
            let parsed: DbUrl = url.parse().unwrap();
            match (&parsed, postgres) {
                (DbUrl::Postgres(server), true) | (DbUrl::MySql(server), false) => {
                    assert_eq!(server.expose(), url);
                }
                _ => panic!("{url} parsed as {parsed:?}"),
            }
        }
    }

    #[test]
    fn passwords_never_show() {
        let url: DbUrl = "postgres://u:hunter2@h:5432/db".parse().unwrap();
        assert_eq!(url.to_string(), "postgres://u:***@h:5432/db");
        assert!(!format!("{url:?}").contains("hunter2"));
        let url: DbUrl = "mysql://root:hunter2@h/db".parse().unwrap();
        assert_eq!(url.to_string(), "mysql://root:***@h/db");
        let error = "mysql://root:hunter2@h".parse::<DbUrl>().unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        assert_eq!(
            redact_password("postgres://u@h/db"),
            "postgres://u@h/db",
            "no password, nothing to hide"
        );
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        for bad in [
            "",
            "a.db",
            "sqlite:",
            "redis://x",
            "mysql://root@127.0.0.1:3306",
            "mysql://root@127.0.0.1:3306/",
            "postgres://",
        ] {
            let error = bad.parse::<DbUrl>().unwrap_err();
            assert!(
                matches!(error, StoreError::UnsupportedUrl { .. }),
                "{bad:?}: {error}"
            );
        }
        let error = "redis://x".parse::<DbUrl>().unwrap_err().to_string();
        assert!(
            error.contains("postgres://USER@HOST:PORT/DATABASE"),
            "{error}"
        );
    }
}
