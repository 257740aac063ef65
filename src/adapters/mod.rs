//! Database adapters: how each kind of database is prepared before the pause, cut
//! inside it, copied after it, and restored. Built from runbook config through one
//! closed enum ([`AdapterConfig`] → [`build`]).
//!
//! The lifecycle is a type: [`Adapter::prepare`] (before anything is paused: connect,
//! check settings) returns a [`Prepared`], whose [`Prepared::cut`] runs inside the pause
//! and must not copy data, and whose [`Prepared::copy`] (after unpause) streams the
//! state the cut fixed.
//!
//! - `sqlite.rs`: a read snapshot of a WAL-mode database, copied page-consistently.
//! - `postgres.rs`: exported snapshot + WAL LSN (+ named restore point when archiving),
//!   copied with `pg_dump --snapshot`.
//! - `mariadb.rs`: `START TRANSACTION WITH CONSISTENT SNAPSHOT` + binlog/GTID position,
//!   copied as a logical SQL dump over that same transaction.
//! - `exec.rs`: user commands for the cut and, optionally, the copy.
//!
//! Restored targets are read back through optional capabilities with defaults
//! ([`Adapter::query`], [`Adapter::row_counts`], scratch targets for drills), so an
//! adapter that cannot do them (exec) says so by name.
//!
//! - `process.rs`: how every adapter (and a drill's command checks) runs child
//!   processes (killed on drop, reaped, stderr drained).
//! - `value.rs`: the typed [`Value`] of a query result that drill checks compare.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::io::AsyncRead;

pub mod exec;
pub mod mariadb;
pub mod postgres;
pub(crate) mod process;
pub mod sqlite;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod value;

pub use value::Value;

/// The one place runbook config becomes an adapter.
pub fn build(name: &str, config: &AdapterConfig) -> Arc<dyn Adapter> {
    match config {
        AdapterConfig::Sqlite(c) => Arc::new(sqlite::Sqlite::new(name, c.clone())),
        AdapterConfig::Postgres(c) => Arc::new(postgres::Postgres::new(name, c.clone())),
        AdapterConfig::Mariadb(c) => Arc::new(mariadb::Mariadb::new(name, c.clone())),
        AdapterConfig::Exec(c) => Arc::new(exec::Exec::new(name, c.clone())),
    }
}

/// Bytes flowing out of a database (a copy) or into one (a restore).
pub type ByteStream = Pin<Box<dyn AsyncRead + Send + 'static>>;

/// A copy in progress. Read `stream` to its end, then await `finished`: it says
/// whether the producer (pg_dump, a dump loop, a user command) succeeded.
pub struct Copy {
    pub stream: ByteStream,
    pub finished: BoxFuture<'static, Result<CopySummary, AdapterError>>,
}

/// What a finished copy learned, read from the same snapshot as the copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopySummary {
    /// Rows per table at the cut, where the adapter can count them.
    pub row_counts: Option<BTreeMap<String, u64>>,
}

/// The per-database marker that fixes the consistent state: snapshot id, restore
/// point name, LSN, binlog/GTID position, a command's output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CutMarker {
    /// e.g. "postgres-snapshot", "mariadb-snapshot", "sqlite-snapshot", "exec".
    pub kind: String,
    /// Adapter-specific facts, e.g. {"lsn": "0/16B3748", "restore_point": "…"}.
    pub details: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// Connecting or a setting check failed (before any pause).
    #[error("database {database}: {message}")]
    Prepare { database: String, message: String },
    /// The cut failed inside the pause.
    #[error("database {database}: cut failed: {message}")]
    Cut { database: String, message: String },
    #[error("database {database}: copy failed: {message}")]
    Copy { database: String, message: String },
    #[error("database {database}: restore failed: {message}")]
    Restore { database: String, message: String },
}

/// A database as configured in the runbook. Send + Sync so the backup can prepare,
/// cut and copy every database in parallel.
#[async_trait::async_trait]
pub trait Adapter: Send + Sync + 'static {
    /// The database's name in the runbook.
    fn name(&self) -> &str;

    /// "sqlite", "postgres", "mariadb", "exec".
    fn kind(&self) -> &'static str;

    /// File extension of a raw copy ("sqlite", "pgdump", "sql", "bin").
    fn artifact_extension(&self) -> &'static str;

    /// Before anything is paused: connect, check settings, hold what the cut needs.
    async fn prepare(&self) -> Result<Box<dyn Prepared>, AdapterError>;

    /// Restores a copy this adapter made into `target` (a file path for SQLite, a URL
    /// of an empty database for PostgreSQL and MariaDB).
    async fn restore(&self, copy: ByteStream, target: &str) -> Result<(), AdapterError>;

    /// Empties `target` so a restore may go into it (`restore --force`).
    async fn clear(&self, target: &str) -> Result<(), AdapterError> {
        let _ = target;
        Err(self.unsupported("emptying a restore target (--force)"))
    }

    /// `restore --force`: restores `copy` in place of what `target` holds. The
    /// default empties the target ([`Adapter::clear`], which refuses a target in use)
    /// and restores into it, so a restore that fails after that leaves the target
    /// empty or partly restored. An adapter that can write the new copy beside the
    /// old one and swap it in whole (SQLite) overrides this, so that a restore that
    /// fails leaves the old target as it was.
    async fn restore_replacing(&self, copy: ByteStream, target: &str) -> Result<(), AdapterError> {
        self.clear(target).await?;
        self.restore(copy, target).await
    }

    /// A new, empty scratch target for a drill, named after `label`, next to the
    /// source (or where the config says): a file in `dir`, a new database. `cut` is
    /// the marker of the copy that will be restored into it, so the target can be made
    /// like the source was (PostgreSQL: its encoding and locale).
    async fn create_scratch(
        &self,
        label: &str,
        dir: &Path,
        cut: &CutMarker,
    ) -> Result<String, AdapterError> {
        let _ = (label, dir, cut);
        Err(self.unsupported("drill scratch targets"))
    }

    /// Removes a scratch target made by [`Adapter::create_scratch`].
    async fn drop_scratch(&self, target: &str) -> Result<(), AdapterError> {
        let _ = target;
        Ok(())
    }

    /// The scratch targets on this database's drill server whose names begin with
    /// `marker`: what drills that were killed left behind. Targets in the drill's
    /// scratch directory (files) are found by the drill itself, so the default is none.
    async fn list_scratch(&self, marker: &str) -> Result<Vec<String>, AdapterError> {
        let _ = marker;
        Ok(Vec::new())
    }

    /// Why `target`, a scratch target [`Adapter::list_scratch`] found, is in use by a
    /// running drill (which holds it from before it is created until it is dropped), or
    /// `None` if no drill holds it: `stillpoint drill --cleanup` leaves those alone.
    async fn scratch_in_use(&self, target: &str) -> Result<Option<String>, AdapterError> {
        let _ = target;
        Ok(None)
    }

    /// Runs one statement against a restored target, for drill checks, so that it
    /// cannot write (a read-only transaction or connection; more than one statement is
    /// refused); every value keeps its type ([`Value`]).
    async fn query(&self, target: &str, sql: &str) -> Result<Rows, AdapterError> {
        let _ = (target, sql);
        Err(self.unsupported("SQL checks"))
    }

    /// Rows per table of a restored target, named as the copy's [`CopySummary`]
    /// names them, so a drill can compare them with the counts taken at the cut.
    async fn row_counts(&self, target: &str) -> Result<BTreeMap<String, u64>, AdapterError> {
        let _ = target;
        Err(self.unsupported("row counts"))
    }

    /// Creates the table `table` in `target` holding `fields` as rows of
    /// (`field`, `value`) text: a note a restored copy carries about itself, such as
    /// where a clone came from (`stillpoint clone`). Fails if the table exists.
    async fn write_note(
        &self,
        target: &str,
        table: &str,
        fields: &[(String, String)],
    ) -> Result<(), AdapterError> {
        let _ = (target, table, fields);
        Err(self.unsupported("notes in a restored copy"))
    }

    fn unsupported(&self, what: &str) -> AdapterError {
        AdapterError::Restore {
            database: self.name().to_owned(),
            message: format!("the {} adapter does not support {what}", self.kind()),
        }
    }
}

/// A query's result: rows of typed values.
pub type Rows = Vec<Vec<Value>>;

#[async_trait::async_trait]
pub trait Prepared: Send {
    /// Inside the pause. Fixes the consistent state and returns its marker; its cost
    /// must not grow with the size of the database.
    async fn cut(&mut self, backup_id: &str) -> Result<CutMarker, AdapterError>;

    /// After unpause: streams exactly the state the cut fixed.
    async fn copy(self: Box<Self>) -> Result<Copy, AdapterError>;
}

/// How a database is reached and cut, as written in the runbook. One closed enum:
/// adding an adapter means adding a variant here and a case in `build`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "adapter", rename_all = "lowercase")]
pub enum AdapterConfig {
    Sqlite(SqliteConfig),
    Postgres(PostgresConfig),
    Mariadb(MariadbConfig),
    Exec(ExecConfig),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file (in WAL mode).
    pub path: std::path::PathBuf,
}

/// `Debug` by hand, as for every config that holds a URL: without its password.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user[:password]@host:port/dbname`
    pub url: String,
    /// Fail `prepare` unless the server archives WAL (needed for point-in-time restore
    /// to the backup's named restore point).
    #[serde(default)]
    pub require_archiving: bool,
    /// Where pg_dump / pg_restore (and, for point-in-time recovery, pg_ctl and
    /// pg_basebackup) live, when not on PATH.
    #[serde(default)]
    pub bin_dir: Option<std::path::PathBuf>,
    /// A server where drills may create (and drop) scratch databases, as a URL of any
    /// database on it. Default: the source database's own server.
    #[serde(default)]
    pub drill_server_url: Option<String>,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &crate::redact::Url(&self.url))
            .field("require_archiving", &self.require_archiving)
            .field("bin_dir", &self.bin_dir)
            .field(
                "drill_server_url",
                &crate::redact::OptionalUrl(self.drill_server_url.as_deref()),
            )
            .finish()
    }
}

impl PostgresConfig {
    /// The server drills create their scratch databases on.
    pub fn drill_server(&self) -> &str {
        self.drill_server_url.as_deref().unwrap_or(&self.url)
    }
}

/// `Debug` by hand: the URLs without their passwords.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MariadbConfig {
    /// `mysql://user[:password]@host:port/dbname`
    pub url: String,
    /// Where the `mariadb` client lives (for restore), when not on PATH.
    #[serde(default)]
    pub bin_dir: Option<std::path::PathBuf>,
    /// A server where drills may create (and drop) scratch databases, as a URL of any
    /// database on it. Default: the source database's own server.
    #[serde(default)]
    pub drill_server_url: Option<String>,
    /// How `base-backup` copies this database for points (`mariadb_backup`, the
    /// default, or `dump`).
    #[serde(default)]
    pub base_method: MariadbBaseMethod,
}

/// How a MariaDB base backup for points is taken (`base_method` of a MariaDB
/// database in the runbook).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MariadbBaseMethod {
    /// `mariadb-backup --backup --stream=xbstream`: a physical copy of the whole
    /// server, read from its data directory, which must be readable where stillpoint
    /// runs. Restores into a data directory, many times faster than a dump loads
    /// (docs/performance.md, "MariaDB base restore").
    #[default]
    MariadbBackup,
    /// The adapter's consistent dump of the one database, over a connection: for
    /// servers whose files stillpoint cannot read (remote servers). Restores into a
    /// new, empty database of any server.
    Dump,
}

impl std::fmt::Debug for MariadbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MariadbConfig")
            .field("url", &crate::redact::Url(&self.url))
            .field("bin_dir", &self.bin_dir)
            .field(
                "drill_server_url",
                &crate::redact::OptionalUrl(self.drill_server_url.as_deref()),
            )
            .field("base_method", &self.base_method)
            .finish()
    }
}

impl MariadbConfig {
    /// The server drills create their scratch databases on.
    pub fn drill_server(&self) -> &str {
        self.drill_server_url.as_deref().unwrap_or(&self.url)
    }
}

/// `Debug` by hand: `env` values (a password handed to a hook) are hidden.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Run by `sh -c` inside the pause; its stdout becomes the cut marker.
    pub cut: String,
    /// Kill the cut command (and fail the backup) after this long.
    #[serde(
        default = "default_cut_timeout",
        deserialize_with = "crate::time::deserialize_duration"
    )]
    pub cut_timeout: std::time::Duration,
    /// Run by `sh -c` after unpause; its stdout is the copy. None: no artifact.
    #[serde(default)]
    pub copy: Option<String>,
    /// Run by `sh -c` with the copy on stdin and STILLPOINT_RESTORE_TARGET set.
    #[serde(default)]
    pub restore: Option<String>,
    /// Variables the hooks get with these values, beside the minimal environment
    /// (`exec::MINIMAL_ENVIRONMENT`): hooks inherit nothing else.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Names of stillpoint's own environment variables passed on to the hooks (e.g.
    /// `AWS_PROFILE`); every other variable is withheld.
    #[serde(default)]
    pub pass_env: Vec<String>,
}

impl std::fmt::Debug for ExecConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecConfig")
            .field("cut", &self.cut)
            .field("cut_timeout", &self.cut_timeout)
            .field("copy", &self.copy)
            .field("restore", &self.restore)
            .field("env", &crate::redact::Environment(&self.env))
            .field("pass_env", &self.pass_env)
            .finish()
    }
}

fn default_cut_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
