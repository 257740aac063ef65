//! MariaDB adapter: a consistent-snapshot transaction opened inside the pause, dumped
//! as SQL over that same transaction after it.
//!
//! - prepare: connects (mysql_async, no TLS), requires the URL to name a database,
//!   records whether the binlog is on (not required) and sets the session up for a
//!   long, slow-consumer dump (UTC, utf8mb4, generous network timeouts).
//! - cut: `START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY` at REPEATABLE READ,
//!   then `binlog_snapshot_file`/`_position` (MariaDB reports the binlog position that
//!   matches this very snapshot), `@@gtid_binlog_pos`, and the list of tables and views.
//!   Every table the copy reads is held by a shared metadata lock from before the
//!   snapshot to the end of the copy, so DDL sent right after the release (TRUNCATE,
//!   ALTER) waits for the copy instead of emptying a table in the snapshot's view or
//!   breaking it: a second connection opened in prepare takes the locks before the
//!   snapshot, the snapshot's own transaction takes them after it, and `copy` closes
//!   the first. Each wait is bounded (`CUT_LOCK_TIMEOUT`). Metadata only: nothing here
//!   grows with the data.
//! - copy: a logical dump produced over that connection, inside that transaction:
//!   `SHOW CREATE TABLE` for each base table, then its rows as batched `INSERT`s with
//!   every value written according to its column type, then views, each after the views
//!   it reads. It is produced by
//!   one task into a bounded pipe as it is read, so memory stays flat whatever the
//!   size. Each table's dumped rows are checked against `COUNT(*)` in the same
//!   snapshot, and those counts are the summary.
//! - restore: pipes the dump into the `mariadb` client (password in `MYSQL_PWD`) for an
//!   empty target database, and checks the dump's end marker went through.
//! - drill checks (`query`): one prepared statement in a `READ ONLY` transaction; each
//!   value typed by the binary protocol and its column's type and character set.
//!
//! Not in the dump: triggers, stored routines, events, sequences, users and grants.
//! Tables on non-transactional engines (MyISAM, Aria, MEMORY, …) are refused in prepare
//! (and, if one appeared since, in the cut): a consistent snapshot does not cover them,
//! so their copy would hold rows written after the release. System-versioned tables are
//! dumped with their history (`FOR SYSTEM_TIME ALL`, replayed with
//! `system_versioning_insert_history`, which needs MariaDB 10.11 or newer where the dump
//! is restored); row counts are of their current rows, on both sides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::{FutureExt, TryStreamExt};
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{Column, Conn, Opts, Row, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::process::Command;
use tokio_util::task::AbortOnDropHandle;

use super::process;
use super::{
    Adapter, AdapterError, ByteStream, Copy, CopySummary, CutMarker, MariadbConfig, Prepared, Rows,
};

/// The dump's last line. A restore that does not see it was fed a truncated copy.
const END_MARKER: &str = "-- stillpoint: dump complete";

/// An INSERT statement is flushed once it holds this much SQL: well under the default
/// `max_allowed_packet` (16 MiB) of the server that will replay it, and big enough
/// that the restore is not dominated by per-statement cost.
const INSERT_BATCH_BYTES: usize = 512 * 1024;

/// Bytes the dump may run ahead of its reader.
const PIPE_BYTES: usize = 256 * 1024;

pub struct Mariadb {
    name: String,
    config: MariadbConfig,
    /// Per scratch database this drill made: the connection holding its named lock
    /// (`GET_LOCK` of the database's name, server-wide), from before it was created
    /// until it is dropped, so that a clean-up leaves it alone.
    holds: Mutex<BTreeMap<String, Conn>>,
}

impl Mariadb {
    pub fn new(name: &str, config: MariadbConfig) -> Self {
        Mariadb {
            name: name.to_owned(),
            config,
            holds: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A URL for messages: everything but the password.
pub(crate) fn shown(opts: &Opts) -> String {
    format!(
        "mysql://{}@{}:{}/{}",
        opts.user().unwrap_or(""),
        opts.ip_or_hostname(),
        opts.tcp_port(),
        opts.db_name().unwrap_or("")
    )
}

pub(crate) fn parse_url(url: &str) -> Result<Opts, String> {
    // A password with a raw `/`, `?` or `#` leaves part of itself after what the URL
    // parser takes for the host: `mysql://u:12/x@h/db` reads as host `u`, port 12 and
    // database `x@h/db`, which would be connected to and shown in messages. An `@`
    // after the host, or a `#` anywhere, is refused instead.
    if let Some((_, rest)) = url.split_once("://") {
        let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if rest[host_end..].contains(['@', '#']) {
            return Err(
                "the URL has an `@` after its host or a `#` (a password's /, ?, #, @ \
                 and % must be percent-encoded, e.g. / as %2F, @ as %40, % as %25)"
                    .to_owned(),
            );
        }
    }
    // The parser's error may quote the URL, password and all; say only what is wrong.
    Opts::from_url(url).map_err(|e| match e {
        mysql_async::UrlError::Invalid => "the URL is not a valid mysql:// URL (a password's /, \
             ?, #, @ and % must be percent-encoded, e.g. / as %2F)"
            .to_owned(),
        mysql_async::UrlError::UnsupportedScheme { scheme } => {
            format!("the URL's scheme is {scheme:?}, expected mysql://")
        }
        other => format!("the URL is not usable: {}", kind_of(&other)),
    })
}

fn kind_of(e: &mysql_async::UrlError) -> &'static str {
    match e {
        mysql_async::UrlError::FeatureRequired { .. } => "it needs a feature this build lacks",
        mysql_async::UrlError::InvalidParamValue { .. } => "a parameter has an invalid value",
        mysql_async::UrlError::UnknownParameter { .. } => "it has an unknown parameter",
        _ => "it could not be parsed",
    }
}

/// How long connecting to a MariaDB server may take, handshake and authentication
/// included: a server that accepts connections but never answers (stopped, hung) must
/// not hang a backup's prepare or a drill forever.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest packet our connections read (the protocol's limit). The driver's
/// default, the server's `max_allowed_packet`, bounds what a client may send; a row
/// the server holds and sends can be larger (several values, each within it), and
/// the dump must read every row.
const MAX_PACKET: usize = 1 << 30;

pub(crate) async fn connect(opts: &Opts) -> Result<Conn, String> {
    let reading =
        mysql_async::OptsBuilder::from_opts(opts.clone()).max_allowed_packet(Some(MAX_PACKET));
    match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(reading)).await {
        Ok(connected) => connected
            .map_err(|e| format!("connecting to {}: {}", shown(opts), crate::error_chain(&e))),
        Err(_) => Err(format!(
            "connecting to {}: the server did not answer within {}s (is it stopped, hung \
             or overloaded? check that it runs and accepts connections)",
            shown(opts),
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

#[async_trait::async_trait]
impl Adapter for Mariadb {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "mariadb"
    }

    fn artifact_extension(&self) -> &'static str {
        "sql"
    }

    async fn prepare(&self) -> Result<Box<dyn Prepared>, AdapterError> {
        let err = |message: String| AdapterError::Prepare {
            database: self.name.clone(),
            message,
        };
        let opts = parse_url(&self.config.url).map_err(err)?;
        let url = shown(&opts);
        if opts.db_name().is_none_or(str::is_empty) {
            return Err(err(format!(
                "{url} names no database: put the database after the port, e.g. mysql://user@host:3306/ledger"
            )));
        }
        let mut conn = connect(&opts).await.map_err(err)?;
        let facts: Option<(String, String, String, String)> = conn
            .query_first("SELECT VERSION(), DATABASE(), @@log_bin, @@gtid_binlog_pos")
            .await
            .map_err(|e| {
                err(format!(
                    "reading server settings of {url}: {e} (is this a MariaDB server? the \
                     adapter relies on MariaDB's GTID and binlog snapshot variables)"
                ))
            })?;
        let (server_version, database, log_bin, _) =
            facts.ok_or_else(|| err(format!("reading server settings of {url}: no row")))?;
        let engines: Vec<(String, Option<String>)> = conn
            .query(TABLE_ENGINES)
            .await
            .map_err(|e| err(format!("listing the tables of {url}: {e}")))?;
        let outside = outside_snapshot(&engines);
        if !outside.is_empty() {
            return Err(err(format!(
                "{url} has tables a consistent snapshot does not cover: {} (only \
                 transactional engines such as InnoDB take part in one, so their copy would \
                 hold rows written after the release). Convert them with ALTER TABLE … \
                 ENGINE=InnoDB, or move them out of this database",
                outside.join(", ")
            )));
        }
        // A dump session must see plain backtick-quoted DDL (sql_mode could hold
        // ANSI_QUOTES), UTC timestamps that replay identically anywhere, and must not
        // be cut off while a slow consumer (an upload) holds up its reads.
        for setup in [
            "SET NAMES utf8mb4",
            "SET SESSION sql_mode = '', time_zone = '+00:00', net_write_timeout = 3600, \
             net_read_timeout = 3600, wait_timeout = 86400",
        ] {
            conn.query_drop(setup)
                .await
                .map_err(|e| err(format!("configuring the session on {url}: {e}")))?;
        }
        // The cut's metadata locks wait at most this long (inside the pause); the dump
        // puts the server's default back once the cluster is released.
        let mut holder = connect(&opts).await.map_err(err)?;
        for conn in [&mut conn, &mut holder] {
            conn.query_drop(format!(
                "SET SESSION lock_wait_timeout = {}",
                CUT_LOCK_TIMEOUT.as_secs()
            ))
            .await
            .map_err(|e| err(format!("configuring the session on {url}: {e}")))?;
        }
        Ok(Box::new(MariadbPrepared {
            name: self.name.clone(),
            conn: Some(conn),
            holder: Some(holder),
            tables: engines.into_iter().map(|(table, _)| table).collect(),
            server_version,
            database,
            binlog_on: log_bin == "1" || log_bin.eq_ignore_ascii_case("on"),
            objects: None,
        }))
    }

    async fn restore(&self, copy: ByteStream, target: &str) -> Result<(), AdapterError> {
        let err = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        let opts = parse_url(target).map_err(err)?;
        let url = shown(&opts);
        let Some(db) = opts.db_name().filter(|d| !d.is_empty()) else {
            return Err(err(format!("the target {url} names no database")));
        };
        let mut conn = connect(&opts).await.map_err(|message| {
            if message.contains("Unknown database") {
                err(format!(
                    "{message}: a restore goes into a new, empty database; create it first \
                     (CREATE DATABASE `{db}`)"
                ))
            } else {
                err(message)
            }
        })?;
        let existing: Vec<String> = conn
            .query(
                "SELECT TABLE_NAME FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME LIMIT 5",
            )
            .await
            .map_err(|e| err(format!("inspecting {url}: {e}")))?;
        let _ = conn.disconnect().await;
        if !existing.is_empty() {
            return Err(err(format!(
                "refusing to restore into {url}: the database is not empty (it has {}{}); \
                 restore into a new, empty database",
                existing.join(", "),
                if existing.len() == 5 { ", …" } else { "" }
            )));
        }

        let client = match &self.config.bin_dir {
            Some(dir) => dir.join("mariadb"),
            None => PathBuf::from("mariadb"),
        };
        let mut cmd = Command::new(&client);
        // --no-defaults: the target URL says everything, so an option file (a
        // developer's ~/.my.cnf, /etc/mysql) cannot redirect the restore elsewhere.
        cmd.arg("--no-defaults")
            .arg("--batch")
            // The client's own limit (16 MiB by default) must not be below the server's:
            // a large row's INSERT is as large as the row.
            .arg("--max-allowed-packet=1073741824")
            .arg("--default-character-set=utf8mb4");
        match opts.socket() {
            Some(socket) => cmd
                .arg("--protocol=SOCKET")
                .arg(format!("--socket={socket}")),
            None => cmd
                .arg("--protocol=TCP")
                .arg(format!("--host={}", opts.ip_or_hostname()))
                .arg(format!("--port={}", opts.tcp_port())),
        };
        if let Some(user) = opts.user() {
            cmd.arg(format!("--user={user}"));
        }
        cmd.arg(format!("--database={db}"));
        if let Some(password) = opts.pass() {
            cmd.env("MYSQL_PWD", password);
        }

        let tail = Arc::new(Mutex::new(Vec::new()));
        let input = Box::pin(TailKeeper {
            inner: copy,
            tail: tail.clone(),
        });
        process::run_with_stdin(cmd, "the mariadb client", input, false)
            .await
            .map_err(err)?;
        let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        if !String::from_utf8_lossy(&tail)
            .trim_end()
            .ends_with(END_MARKER)
        {
            return Err(err(format!(
                "the copy ended without stillpoint's end marker: it is truncated (or not a \
                 stillpoint MariaDB dump), so {url} holds only part of it"
            )));
        }
        Ok(())
    }

    async fn clear(&self, target: &str) -> Result<(), AdapterError> {
        let shown = parse_url(target).map_or_else(|_| "the target".to_owned(), |o| shown(&o));
        let refuse = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        let mut conn = self.connect_target(target).await?;
        // Without the PROCESS privilege the server lists only this user's own
        // connections, so an application's (another user's) would go unseen.
        let sees_all = sees_every_connection(&mut conn)
            .await
            .map_err(|e| self.target_error(target, e))?;
        if !sees_all {
            let _ = conn.disconnect().await;
            return Err(refuse(format!(
                "refusing to empty {shown}: its user lacks the PROCESS privilege, so the \
                 server shows it only its own connections and whether anything else uses \
                 the database cannot be told; nothing was dropped. Restore as a user that \
                 has it (GRANT PROCESS ON *.* TO …), or into a new, empty database without \
                 --force"
            )));
        }
        // Emptying a database an application still uses destroys its data under it:
        // refuse, naming who is there. Connections that are just closing get a moment.
        let deadline = tokio::time::Instant::now() + CLEAR_SESSIONS_GRACE;
        let sessions = loop {
            let sessions: Vec<(u64, String, String)> = conn
                .query(
                    "SELECT ID, USER, HOST FROM information_schema.PROCESSLIST \
                     WHERE DB = DATABASE() AND ID <> CONNECTION_ID() ORDER BY ID",
                )
                .await
                .map_err(|e| self.target_error(target, e))?;
            if sessions.is_empty() || tokio::time::Instant::now() >= deadline {
                break sessions;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        if !sessions.is_empty() {
            let _ = conn.disconnect().await;
            return Err(refuse(format!(
                "refusing to empty {shown}: it is in use by {} other connection(s) ({}); \
                 nothing was dropped. Stop what uses it (or KILL the connections) and retry",
                sessions.len(),
                sessions
                    .iter()
                    .map(|(id, user, host)| format!("id {id} user {user} from {host}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        drop_everything(&mut conn, CLEAR_LOCK_TIMEOUT)
            .await
            .map_err(|e| {
                refuse(format!(
                    "emptying {shown} failed: {e} (a connection made meanwhile may hold a \
                     lock; waited at most {}s); no table was dropped",
                    CLEAR_LOCK_TIMEOUT.as_secs()
                ))
            })?;
        let _ = conn.disconnect().await;
        Ok(())
    }

    async fn create_scratch(
        &self,
        label: &str,
        _dir: &Path,
        _cut: &CutMarker,
    ) -> Result<String, AdapterError> {
        let server = self.config.drill_server();
        let target = with_database(server, label).map_err(|message| AdapterError::Restore {
            database: self.name.clone(),
            message,
        })?;
        let mut conn = self.connect_target(server).await?;
        // Held before the database exists, so no clean-up can find it unheld. (Lock
        // names may be 64 characters long; scratch labels are at most 63.)
        let locked: Option<i64> = conn
            .exec_first("SELECT GET_LOCK(?, 10)", (label,))
            .await
            .map_err(|e| self.target_error(&target, e))?;
        if locked != Some(1) {
            return Err(AdapterError::Restore {
                database: self.name.clone(),
                message: format!("another connection holds the lock named {label}"),
            });
        }
        conn.query_drop(format!(
            "CREATE DATABASE {} CHARACTER SET utf8mb4",
            quote_ident(label)
        ))
        .await
        .map_err(|e| self.target_error(&target, e))?;
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.clone(), conn);
        Ok(target)
    }

    async fn drop_scratch(&self, target: &str) -> Result<(), AdapterError> {
        let mut conn = self.connect_target(target).await?;
        let database: Option<String> = conn
            .query_first("SELECT DATABASE()")
            .await
            .map_err(|e| self.target_error(target, e))?;
        if let Some(database) = database {
            // Like PostgreSQL's DROP DATABASE … WITH (FORCE): a check interrupted
            // mid-query can leave a session behind that would hold the drop up.
            let sessions: Vec<u64> = conn
                .exec(
                    "SELECT ID FROM information_schema.PROCESSLIST \
                     WHERE DB = ? AND ID <> CONNECTION_ID()",
                    (&database,),
                )
                .await
                .map_err(|e| self.target_error(target, e))?;
            for session in sessions {
                // It may have ended by itself meanwhile.
                let _ = conn.query_drop(format!("KILL {session}")).await;
            }
            conn.query_drop(format!(
                "DROP DATABASE IF EXISTS {}",
                quote_ident(&database)
            ))
            .await
            .map_err(|e| self.target_error(target, e))?;
        }
        let _ = conn.disconnect().await;
        let hold = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(target);
        if let Some(hold) = hold {
            let _ = hold.disconnect().await;
        }
        Ok(())
    }

    async fn scratch_in_use(&self, target: &str) -> Result<Option<String>, AdapterError> {
        let opts = parse_url(target).map_err(|message| AdapterError::Restore {
            database: self.name.clone(),
            message,
        })?;
        let Some(database) = opts.db_name().map(str::to_owned) else {
            return Ok(None);
        };
        let server = self.config.drill_server();
        let mut conn = self.connect_target(server).await?;
        let holder: Option<Option<u64>> = conn
            .exec_first("SELECT IS_USED_LOCK(?)", (&database,))
            .await
            .map_err(|e| self.target_error(server, e))?;
        let _ = conn.disconnect().await;
        Ok(holder
            .flatten()
            .map(|id| format!("a running drill holds it (MariaDB connection id {id})")))
    }

    async fn list_scratch(&self, marker: &str) -> Result<Vec<String>, AdapterError> {
        let server = self.config.drill_server();
        let mut conn = self.connect_target(server).await?;
        let names: Vec<String> = conn
            .exec(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA \
                 WHERE LEFT(SCHEMA_NAME, CHAR_LENGTH(?)) = ? ORDER BY 1",
                (marker, marker),
            )
            .await
            .map_err(|e| self.target_error(server, e))?;
        let _ = conn.disconnect().await;
        names
            .iter()
            .map(|name| {
                with_database(server, name).map_err(|message| AdapterError::Restore {
                    database: self.name.clone(),
                    message,
                })
            })
            .collect()
    }

    async fn query(&self, target: &str, sql: &str) -> Result<Rows, AdapterError> {
        let mut conn = self.connect_target(target).await?;
        conn.query_drop("SET NAMES utf8mb4, time_zone = '+00:00'")
            .await
            .map_err(|e| self.target_error(target, e))?;
        // A check reads and never writes: in a read-only transaction, the server
        // refuses any write (and later checks see the restored data unchanged).
        conn.query_drop("START TRANSACTION READ ONLY")
            .await
            .map_err(|e| self.target_error(target, e))?;
        // A prepared statement (the binary protocol): one statement only (a second
        // could end the transaction and write), and values arrive typed (numbers as
        // numbers), with each column's type and character set to tell bytes from text.
        let rows: Vec<Row> = conn
            .exec(sql, ())
            .await
            .map_err(|e| self.target_error(target, e))?;
        conn.query_drop("ROLLBACK")
            .await
            .map_err(|e| self.target_error(target, e))?;
        let _ = conn.disconnect().await;
        Ok(rows
            .into_iter()
            .map(|row| {
                let columns = row.columns();
                row.unwrap()
                    .into_iter()
                    .zip(columns.iter())
                    .map(|(value, column)| typed(column, value))
                    .collect()
            })
            .collect())
    }

    async fn row_counts(&self, target: &str) -> Result<BTreeMap<String, u64>, AdapterError> {
        let mut conn = self.connect_target(target).await?;
        // The tables the copy counted: system-versioned ones too (current rows).
        let tables: Vec<(String, Option<String>)> = conn
            .query(TABLE_ENGINES)
            .await
            .map_err(|e| self.target_error(target, e))?;
        let mut counts = BTreeMap::new();
        for (table, _) in tables {
            let count: Option<u64> = conn
                .query_first(format!("SELECT COUNT(*) FROM {}", quote_ident(&table)))
                .await
                .map_err(|e| self.target_error(target, e))?;
            counts.insert(table, count.unwrap_or(0));
        }
        let _ = conn.disconnect().await;
        Ok(counts)
    }

    async fn write_note(
        &self,
        target: &str,
        table: &str,
        fields: &[(String, String)],
    ) -> Result<(), AdapterError> {
        let mut conn = self.connect_target(target).await?;
        // InnoDB and one transaction: the note is whole or absent (the CREATE commits
        // by itself; the rows go in together).
        conn.query_drop(format!(
            "CREATE TABLE {} (field VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL) \
             ENGINE=InnoDB CHARACTER SET utf8mb4",
            quote_ident(table)
        ))
        .await
        .map_err(|e| self.target_error(target, e))?;
        let mut tx = conn
            .start_transaction(Default::default())
            .await
            .map_err(|e| self.target_error(target, e))?;
        for (field, value) in fields {
            tx.exec_drop(
                format!("INSERT INTO {} VALUES (?, ?)", quote_ident(table)),
                (field, value),
            )
            .await
            .map_err(|e| self.target_error(target, e))?;
        }
        tx.commit()
            .await
            .map_err(|e| self.target_error(target, e))?;
        let _ = conn.disconnect().await;
        Ok(())
    }
}

impl Mariadb {
    async fn connect_target(&self, target: &str) -> Result<Conn, AdapterError> {
        let err = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        connect(&parse_url(target).map_err(err)?).await.map_err(err)
    }

    fn target_error(&self, target: &str, error: mysql_async::Error) -> AdapterError {
        let shown = parse_url(target).map_or_else(|_| "the target".to_owned(), |o| shown(&o));
        AdapterError::Restore {
            database: self.name.clone(),
            message: format!("on {shown}: {error}"),
        }
    }
}

/// How long emptying a restore target waits for its table locks before it gives up,
/// having dropped nothing.
const CLEAR_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long emptying a restore target waits for other connections (ones just
/// closing) to leave it before it refuses.
const CLEAR_SESSIONS_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Drops every table and view of the connection's database. DDL commits by itself
/// in MariaDB, so the tables are first locked, all at once, waiting at most
/// `lock_timeout`; only then is the DROP sent, and it cannot wait any more. A client
/// killed while the locks are awaited never sends it, so nothing is dropped. Views
/// (no data, and not droppable under LOCK TABLES) go after the tables.
/// Whether this connection's user sees every connection in PROCESSLIST: PROCESS (or
/// ALL PRIVILEGES) granted on `*.*`. Privileges that come through a role are not
/// looked at: such a user is refused, which is the safe side.
async fn sees_every_connection(conn: &mut Conn) -> Result<bool, mysql_async::Error> {
    let grants: Vec<String> = conn.query("SHOW GRANTS").await?;
    Ok(grants.iter().any(|grant| {
        let grant = grant.to_ascii_uppercase();
        grant
            .strip_prefix("GRANT ")
            .and_then(|rest| rest.split_once(" ON *.* TO "))
            .is_some_and(|(privileges, _)| {
                privileges.contains("ALL PRIVILEGES")
                    || privileges.split(',').any(|p| p.trim() == "PROCESS")
            })
    }))
}

async fn drop_everything(
    conn: &mut Conn,
    lock_timeout: std::time::Duration,
) -> Result<(), mysql_async::Error> {
    let objects: Vec<(String, String)> = conn
        .query(
            "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE()",
        )
        .await?;
    let (views, tables): (Vec<_>, Vec<_>) =
        objects.into_iter().partition(|(_, kind)| kind == "VIEW");
    conn.query_drop(format!(
        "SET SESSION lock_wait_timeout = {}",
        lock_timeout.as_secs().max(1)
    ))
    .await?;
    conn.query_drop("SET FOREIGN_KEY_CHECKS = 0").await?;
    if !tables.is_empty() {
        let names: Vec<String> = tables.iter().map(|(name, _)| quote_ident(name)).collect();
        let locks: Vec<String> = names.iter().map(|name| format!("{name} WRITE")).collect();
        conn.query_drop(format!("LOCK TABLES {}", locks.join(", ")))
            .await?;
        conn.query_drop(format!("DROP TABLE IF EXISTS {}", names.join(", ")))
            .await?;
        conn.query_drop("UNLOCK TABLES").await?;
    }
    for (view, _) in views {
        conn.query_drop(format!("DROP VIEW IF EXISTS {}", quote_ident(&view)))
            .await?;
    }
    Ok(())
}

/// `url` with its database replaced by `database`: where a scratch database lives.
fn with_database(url: &str, database: &str) -> Result<String, String> {
    let mut parsed = url::Url::parse(url)
        .map_err(|_| "the drill server URL is not a valid mysql:// URL".to_owned())?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

/// A value of the binary protocol by its column: DECIMAL as an exact number, binary
/// strings (character set `binary`), BIT and GEOMETRY as bytes, other strings as text,
/// temporal values as MariaDB prints them.
fn typed(column: &Column, value: Value) -> super::Value {
    use super::Value as Typed;
    use ColumnType::*;
    match value {
        Value::NULL => Typed::Null,
        Value::Int(i) => Typed::Number(i.to_string()),
        Value::UInt(u) => Typed::Number(u.to_string()),
        // A FLOAT by the shortest decimal that reads back as it (what PostgreSQL prints
        // for a `real`): widened bit for bit, 0.1 would be 0.10000000149011612, and
        // equal to neither an expected 0.1 nor the same value read from another server.
        Value::Float(f) => Typed::Float(f.to_string().parse().unwrap_or(f64::from(f))),
        Value::Double(d) => Typed::Float(d),
        Value::Bytes(bytes) => match column.column_type() {
            MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => {
                match std::str::from_utf8(&bytes).ok().and_then(Typed::number) {
                    Some(number) => number,
                    None => Typed::Bytes(bytes),
                }
            }
            MYSQL_TYPE_BIT | MYSQL_TYPE_GEOMETRY => Typed::Bytes(bytes),
            _ if column.character_set() == BINARY_CHARSET => Typed::Bytes(bytes),
            _ => Typed::text(bytes),
        },
        Value::Date(year, month, day, hour, minute, second, micros) => {
            let mut text = format!("{year:04}-{month:02}-{day:02}");
            if column.column_type() != MYSQL_TYPE_DATE {
                text.push_str(&format!(" {hour:02}:{minute:02}:{second:02}"));
                if micros != 0 {
                    text.push_str(&format!(".{micros:06}"));
                }
            }
            Typed::Text(text)
        }
        Value::Time(negative, days, hours, minutes, seconds, micros) => {
            let hours = u64::from(days) * 24 + u64::from(hours);
            let mut text = format!(
                "{}{hours:02}:{minutes:02}:{seconds:02}",
                if negative { "-" } else { "" }
            );
            if micros != 0 {
                text.push_str(&format!(".{micros:06}"));
            }
            Typed::Text(text)
        }
    }
}

/// What the cut found in the database, in dump order.
struct Objects {
    /// Base tables, system-versioned ones included.
    tables: Vec<Table>,
    views: Vec<String>,
}

struct Table {
    name: String,
    /// `WITH SYSTEM VERSIONING`: dumped with its history.
    versioned: bool,
}

/// Every base table (system-versioned ones too) and its engine.
const TABLE_ENGINES: &str = "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES \
     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED') \
     ORDER BY TABLE_NAME";

/// `table (engine)` for each table whose engine a consistent snapshot does not cover.
fn outside_snapshot(engines: &[(String, Option<String>)]) -> Vec<String> {
    engines
        .iter()
        .filter(|(_, engine)| !engine.as_deref().is_some_and(is_transactional))
        .map(|(table, engine)| format!("{table} ({})", engine.as_deref().unwrap_or("no engine")))
        .collect()
}

/// How long the cut waits for a table's metadata lock (inside the pause) before it
/// fails: only someone else's DDL, running or queued, holds it that long.
const CUT_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// One statement that takes a shared metadata lock on each of `tables` and reads no
/// row. Held until the transaction ends, the lock keeps DDL (TRUNCATE, ALTER, DROP)
/// off the table: its snapshot would otherwise see a TRUNCATEd table as empty, or
/// fail with "Table definition has changed".
fn metadata_lock_statement(tables: &[String]) -> String {
    tables
        .iter()
        .map(|table| format!("(SELECT 1 FROM {} LIMIT 0)", quote_ident(table)))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

struct MariadbPrepared {
    name: String,
    /// Moved into the dump task by `copy`.
    conn: Option<Conn>,
    /// A second connection that holds the tables' metadata locks from before the
    /// snapshot until `conn` holds its own (which it can only take after the snapshot:
    /// START TRANSACTION ends any earlier transaction and its locks). Closed by `copy`.
    holder: Option<Conn>,
    /// The base tables listed in prepare, which `holder` locks.
    tables: Vec<String>,
    server_version: String,
    database: String,
    binlog_on: bool,
    /// Set by the cut.
    objects: Option<Objects>,
}

#[async_trait::async_trait]
impl Prepared for MariadbPrepared {
    async fn cut(&mut self, _backup_id: &str) -> Result<CutMarker, AdapterError> {
        let err = |message: String| AdapterError::Cut {
            database: self.name.clone(),
            message,
        };
        if self.objects.is_some() {
            return Err(err("the snapshot was already cut".to_owned()));
        }
        let lost = || err("the connection was lost by an earlier failure".to_owned());
        let locking = |what: &str, e: mysql_async::Error| {
            err(format!(
                "{what}: {e} (another session's DDL on one of them held or queued for its \
                 lock past {}s, or a table was dropped or renamed since prepare; run the \
                 backup again)",
                CUT_LOCK_TIMEOUT.as_secs()
            ))
        };
        // Before the snapshot: from here until the copy ends, no DDL can change a table
        // the copy will read (see `metadata_lock_statement`).
        let holder = self.holder.as_mut().ok_or_else(lost)?;
        holder
            .query_drop("START TRANSACTION READ ONLY")
            .await
            .map_err(|e| err(format!("starting the lock-holding transaction: {e}")))?;
        if !self.tables.is_empty() {
            holder
                .query_drop(metadata_lock_statement(&self.tables))
                .await
                .map_err(|e| {
                    locking(
                        &format!("locking the {} tables to copy", self.tables.len()),
                        e,
                    )
                })?;
        }
        let conn = self.conn.as_mut().ok_or_else(lost)?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(|e| err(format!("setting the isolation level: {e}")))?;
        // WITH CONSISTENT SNAPSHOT takes the InnoDB read view now, not at the first read.
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(|e| err(format!("starting the snapshot transaction: {e}")))?;
        let status: Vec<(String, String)> = conn
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
            .await
            .map_err(|e| err(format!("reading the binlog position: {e}")))?;
        let gtid: Option<String> = conn
            .query_first("SELECT @@gtid_binlog_pos")
            .await
            .map_err(|e| err(format!("reading the GTID position: {e}")))?;
        let listed: Vec<(String, String, Option<String>)> = conn
            .query(
                "SELECT TABLE_NAME, TABLE_TYPE, ENGINE FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME",
            )
            .await
            .map_err(|e| err(format!("listing tables: {e}")))?;

        let mut details = BTreeMap::from([
            ("database".to_owned(), self.database.clone()),
            ("server_version".to_owned(), self.server_version.clone()),
            (
                "log_bin".to_owned(),
                if self.binlog_on { "ON" } else { "OFF" }.to_owned(),
            ),
        ]);
        if self.binlog_on {
            for (name, value) in status {
                // binlog_snapshot_file / binlog_snapshot_position: the binlog
                // coordinates of exactly this snapshot, even if writes raced the cut.
                if let Some(key) = name.to_ascii_lowercase().strip_prefix("binlog_snapshot_") {
                    details.insert(format!("binlog_{key}"), value);
                }
            }
            // The GTID state read right after the snapshot; inside the pause no
            // application writes can fall between the two.
            details.insert("gtid_binlog_pos".to_owned(), gtid.unwrap_or_default());
        }

        let mut objects = Objects {
            tables: Vec::new(),
            views: Vec::new(),
        };
        let mut not_copied = Vec::new();
        let mut engines = Vec::new();
        let mut versioned = 0;
        for (table, kind, engine) in listed {
            match kind.as_str() {
                "BASE TABLE" | "SYSTEM VERSIONED" => {
                    engines.push((table.clone(), engine));
                    let versioned_table = kind == "SYSTEM VERSIONED";
                    versioned += usize::from(versioned_table);
                    objects.tables.push(Table {
                        name: table,
                        versioned: versioned_table,
                    });
                }
                "VIEW" => objects.views.push(table),
                _ => not_copied.push(format!("{table} ({kind})")),
            }
        }
        // Prepare refused these; one may have been created (or altered) since.
        let outside = outside_snapshot(&engines);
        if !outside.is_empty() {
            return Err(err(format!(
                "tables {} are on engines a consistent snapshot does not cover (they \
                 appeared since prepare); convert them with ALTER TABLE … ENGINE=InnoDB",
                outside.join(", ")
            )));
        }
        // A table the holder did not lock could have been changed by DDL between the
        // snapshot and the lock below.
        let unlocked: Vec<&str> = objects
            .tables
            .iter()
            .map(|table| table.name.as_str())
            .filter(|table| !self.tables.iter().any(|held| held == table))
            .collect();
        if !unlocked.is_empty() {
            return Err(err(format!(
                "table(s) {} appeared between prepare and the cut, so the cut could not lock \
                 them before its snapshot; run the backup again",
                unlocked.join(", ")
            )));
        }
        // The snapshot's own locks, held until the dump commits; the holder's are then
        // no longer needed (`copy` closes it, after the release).
        if !objects.tables.is_empty() {
            let names: Vec<String> = objects.tables.iter().map(|t| t.name.clone()).collect();
            conn.query_drop(metadata_lock_statement(&names))
                .await
                .map_err(|e| locking("locking the tables in the snapshot", e))?;
        }
        details.insert("tables".to_owned(), objects.tables.len().to_string());
        details.insert("views".to_owned(), objects.views.len().to_string());
        if versioned > 0 {
            details.insert("system_versioned_tables".to_owned(), versioned.to_string());
        }
        if !not_copied.is_empty() {
            details.insert("not_copied".to_owned(), not_copied.join(","));
        }
        self.objects = Some(objects);
        Ok(CutMarker {
            kind: "mariadb-snapshot".to_owned(),
            details,
        })
    }

    async fn copy(mut self: Box<Self>) -> Result<Copy, AdapterError> {
        let name = self.name.clone();
        let (Some(objects), Some(conn)) = (self.objects.take(), self.conn.take()) else {
            return Err(AdapterError::Copy {
                database: name,
                message: "copy was called before a successful cut".to_owned(),
            });
        };
        // The snapshot's transaction holds its tables now: the holder lets go.
        if let Some(holder) = self.holder.take() {
            let _ = holder.disconnect().await;
        }
        let (reader, writer) = tokio::io::duplex(PIPE_BYTES);
        let header = format!(
            "-- stillpoint logical dump of `{}` (MariaDB {}), one consistent snapshot\n",
            self.database, self.server_version
        );
        // The dump must run while the caller reads the stream, so it cannot live in
        // `finished` (not polled until the stream is done): it is a task, awaited by
        // `finished` and aborted if the copy is dropped.
        let task = AbortOnDropHandle::new(tokio::spawn(dump(conn, objects, writer, header)));
        let finished = async move {
            let result = match task.await {
                Ok(result) => result,
                Err(e) => Err(format!("the dump task failed: {e}")),
            };
            result
                .map(|counts| CopySummary {
                    row_counts: Some(counts),
                })
                .map_err(|message| AdapterError::Copy {
                    database: name,
                    message,
                })
        }
        .boxed();
        Ok(Copy {
            stream: Box::pin(reader),
            finished,
        })
    }
}

fn is_transactional(engine: &str) -> bool {
    // The engines whose reads honour a consistent snapshot.
    ["InnoDB", "XtraDB", "RocksDB", "TokuDB"]
        .iter()
        .any(|e| e.eq_ignore_ascii_case(engine))
}

/// Writes the whole dump into `out` and returns rows per table. Dropping `out` on any
/// error ends the stream early; `finished` reports the error.
async fn dump<W: AsyncWrite + Unpin>(
    mut conn: Conn,
    objects: Objects,
    mut out: W,
    header: String,
) -> Result<BTreeMap<String, u64>, String> {
    let write = |e: std::io::Error| format!("the copy's reader went away: {e}");
    out.write_all(header.as_bytes()).await.map_err(write)?;
    // Replayed by the client before anything else: the same quoting and time zone as
    // the dump session, and no checks that table order could trip.
    out.write_all(
        b"SET NAMES utf8mb4;\n\
          SET TIME_ZONE = '+00:00';\n\
          SET SQL_MODE = 'NO_AUTO_VALUE_ON_ZERO';\n\
          SET FOREIGN_KEY_CHECKS = 0;\n\
          SET UNIQUE_CHECKS = 0;\n\n",
    )
    .await
    .map_err(write)?;
    if objects.tables.iter().any(|table| table.versioned) {
        // History rows keep their own ROW START / ROW END (MariaDB 10.11+).
        out.write_all(b"SET @@system_versioning_insert_history = 1;\n\n")
            .await
            .map_err(write)?;
    }

    // The cut's short lock wait was for inside the pause; a view's definition may wait
    // as long as the server lets any statement.
    conn.query_drop("SET SESSION lock_wait_timeout = DEFAULT")
        .await
        .map_err(|e| format!("configuring the dump session: {e}"))?;

    let mut counts = BTreeMap::new();
    for table in &objects.tables {
        let dumped = dump_table(&mut conn, table, &mut out).await?;
        // An independent count in the same snapshot: a dump that lost or invented
        // rows fails here rather than in a drill. For a versioned table the dump holds
        // its history too; the summary counts current rows, as a restored copy does.
        let name = &table.name;
        let quoted = quote_ident(name);
        let all_rows = if table.versioned {
            format!("SELECT COUNT(*) FROM {quoted} FOR SYSTEM_TIME ALL")
        } else {
            format!("SELECT COUNT(*) FROM {quoted}")
        };
        let counted: Option<u64> = conn
            .query_first(all_rows)
            .await
            .map_err(|e| format!("counting rows of {name}: {e}"))?;
        let counted = counted.unwrap_or(0);
        if counted != dumped {
            return Err(format!(
                "table {name}: dumped {dumped} rows but COUNT(*) in the same snapshot is {counted}"
            ));
        }
        let current = if table.versioned {
            conn.query_first(format!("SELECT COUNT(*) FROM {quoted}"))
                .await
                .map_err(|e| format!("counting rows of {name}: {e}"))?
                .unwrap_or(0)
        } else {
            counted
        };
        counts.insert(name.clone(), current);
    }
    let mut views = Vec::new();
    for view in &objects.views {
        let row: Option<(String, String, String, String)> = conn
            .query_first(format!("SHOW CREATE VIEW {}", quote_ident(view)))
            .await
            .map_err(|e| format!("reading the definition of view {view}: {e}"))?;
        let (_, create, _, _) = row.ok_or_else(|| format!("view {view} has no definition"))?;
        views.push((view.clone(), without_definer(&create)));
    }
    for (_, create) in in_dependency_order(views) {
        out.write_all(format!("{create};\n\n").as_bytes())
            .await
            .map_err(write)?;
    }
    conn.query_drop("COMMIT")
        .await
        .map_err(|e| format!("ending the snapshot transaction: {e}"))?;
    let _ = conn.disconnect().await;
    out.write_all(
        format!("SET FOREIGN_KEY_CHECKS = 1;\nSET UNIQUE_CHECKS = 1;\n{END_MARKER}\n").as_bytes(),
    )
    .await
    .map_err(write)?;
    out.shutdown().await.map_err(write)?;
    Ok(counts)
}

/// `CREATE TABLE` and the rows of one table (with its history, if it is versioned);
/// returns how many rows were written.
async fn dump_table<W: AsyncWrite + Unpin>(
    conn: &mut Conn,
    table: &Table,
    out: &mut W,
) -> Result<u64, String> {
    let write = |e: std::io::Error| format!("the copy's reader went away: {e}");
    let versioned = table.versioned;
    let table = table.name.as_str();
    let quoted = quote_ident(table);
    let create: Option<(String, String)> = conn
        .query_first(format!("SHOW CREATE TABLE {quoted}"))
        .await
        .map_err(|e| format!("reading the definition of {table}: {e}"))?;
    let (_, create) = create.ok_or_else(|| format!("table {table} has no definition"))?;
    out.write_all(format!("{create};\n\n").as_bytes())
        .await
        .map_err(write)?;

    // Generated columns are computed on restore; inserting into them is an error.
    let listed: Vec<(String, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND IS_GENERATED = 'NEVER' \
             ORDER BY ORDINAL_POSITION",
            (table,),
        )
        .await
        .map_err(|e| format!("listing the columns of {table}: {e}"))?;
    if listed.is_empty() {
        return Ok(0);
    }
    // The server prints a FLOAT with 6 significant digits (16777216 as 16777200, the
    // float nearest 1/3 as 0.333333), which read back as another float. A FLOAT is read
    // as the DOUBLE it converts to exactly, whose text reads back as that very float.
    let mut read: Vec<String> = listed
        .iter()
        .map(|(column, data_type)| {
            if data_type.eq_ignore_ascii_case("float") {
                format!("CAST({} AS DOUBLE)", quote_ident(column))
            } else {
                quote_ident(column)
            }
        })
        .collect();
    let mut columns: Vec<String> = listed.into_iter().map(|(column, _)| column).collect();
    let mut from = quoted.clone();
    if versioned {
        // The period's columns: named in the table, or the implicit, hidden
        // row_start / row_end. With system_versioning_insert_history they are written
        // like any column, so each history row keeps its period.
        let period: Vec<String> = conn
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? \
                   AND GENERATION_EXPRESSION IN ('ROW START', 'ROW END') \
                 ORDER BY GENERATION_EXPRESSION = 'ROW END'",
                (table,),
            )
            .await
            .map_err(|e| format!("listing the period columns of {table}: {e}"))?;
        let period = if period.is_empty() {
            vec!["row_start".to_owned(), "row_end".to_owned()]
        } else {
            period
        };
        read.extend(period.iter().map(|c| quote_ident(c)));
        columns.extend(period);
        from.push_str(" FOR SYSTEM_TIME ALL");
    }
    let column_list = columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let insert_prefix = format!("INSERT INTO {quoted} ({column_list}) VALUES\n").into_bytes();

    let mut result = conn
        .query_iter(format!("SELECT {} FROM {from}", read.join(", ")))
        .await
        .map_err(|e| format!("reading {table}: {e}"))?;
    let mut rows = result
        .stream::<Row>()
        .await
        .map_err(|e| format!("reading {table}: {e}"))?;
    // Bytes, not a String: values are escaped byte for byte, whatever their encoding.
    let mut batch = Vec::new();
    let mut dumped = 0u64;
    if let Some(rows) = rows.as_mut() {
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(|e| format!("reading {table}: {e}"))?
        {
            batch.extend_from_slice(if batch.is_empty() {
                &insert_prefix
            } else {
                b",\n"
            });
            let cols = row.columns();
            push_row(&mut batch, &cols, row.unwrap_raw());
            dumped += 1;
            if batch.len() >= INSERT_BATCH_BYTES {
                batch.extend_from_slice(b";\n");
                out.write_all(&batch).await.map_err(write)?;
                batch.clear();
            }
        }
    }
    drop(rows);
    drop(result);
    if !batch.is_empty() {
        batch.extend_from_slice(b";\n");
        out.write_all(&batch).await.map_err(write)?;
    }
    out.write_all(b"\n").await.map_err(write)?;
    Ok(dumped)
}

/// `(v1, v2, …)` for one row.
fn push_row(sql: &mut Vec<u8>, columns: &[Column], values: Vec<Option<Value>>) {
    sql.push(b'(');
    for (i, (column, value)) in columns.iter().zip(values).enumerate() {
        if i > 0 {
            sql.extend_from_slice(b", ");
        }
        push_value(sql, column.column_type(), column.character_set(), value);
    }
    sql.push(b')');
}

/// The character set id MariaDB reports for binary data (and for numbers and dates,
/// which is why the column type is looked at first).
const BINARY_CHARSET: u16 = 63;

/// One value as an SQL literal that reads back as the same value. Over the text
/// protocol every non-NULL value arrives as the server's text for it; the column's
/// type decides how to write that text down.
fn push_value(sql: &mut Vec<u8>, ty: ColumnType, charset: u16, value: Option<Value>) {
    let bytes = match value {
        None | Some(Value::NULL) => {
            sql.extend_from_slice(b"NULL");
            return;
        }
        Some(Value::Bytes(bytes)) => bytes,
        // The text protocol only yields bytes; anything else would be a driver change,
        // written with the driver's own SQL rendering rather than guessed at.
        Some(other) => {
            sql.extend_from_slice(other.as_sql(false).as_bytes());
            return;
        }
    };
    use ColumnType::*;
    match ty {
        MYSQL_TYPE_TINY
        | MYSQL_TYPE_SHORT
        | MYSQL_TYPE_INT24
        | MYSQL_TYPE_LONG
        | MYSQL_TYPE_LONGLONG
        | MYSQL_TYPE_FLOAT
        | MYSQL_TYPE_DOUBLE
        | MYSQL_TYPE_DECIMAL
        | MYSQL_TYPE_NEWDECIMAL
        | MYSQL_TYPE_YEAR
            if !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(b)) =>
        {
            // Numbers as the server printed them: exact for DECIMAL, and the shortest
            // text that reads back as the same FLOAT/DOUBLE.
            sql.extend_from_slice(&bytes);
        }
        MYSQL_TYPE_BIT | MYSQL_TYPE_GEOMETRY => push_hex(sql, &bytes),
        MYSQL_TYPE_VARCHAR
        | MYSQL_TYPE_VAR_STRING
        | MYSQL_TYPE_STRING
        | MYSQL_TYPE_TINY_BLOB
        | MYSQL_TYPE_MEDIUM_BLOB
        | MYSQL_TYPE_LONG_BLOB
        | MYSQL_TYPE_BLOB
            if charset == BINARY_CHARSET =>
        {
            // Escaped, not hex: a hex literal is twice the value's size, so a row of a
            // few MiB made an INSERT larger than the restoring server's
            // max_allowed_packet. `_binary` keeps the bytes from being read as text.
            sql.extend_from_slice(b"_binary");
            push_quoted(sql, &bytes)
        }
        _ => push_quoted(sql, &bytes),
    }
}

/// `X'…'`: exact for any bytes, and valid for zero of them (unlike `0x`).
fn push_hex(sql: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    sql.extend_from_slice(b"X'");
    for b in bytes {
        sql.push(HEX[usize::from(b >> 4)]);
        sql.push(HEX[usize::from(b & 0xf)]);
    }
    sql.push(b'\'');
}

/// A quoted string with the escapes `mysql_real_escape_string` uses, byte for byte,
/// so the literal survives the client's and the server's parsers unchanged. (The dump
/// sets a sql_mode without NO_BACKSLASH_ESCAPES, which these escapes need.)
fn push_quoted(sql: &mut Vec<u8>, bytes: &[u8]) {
    sql.push(b'\'');
    for &b in bytes {
        match b {
            0 => sql.extend_from_slice(b"\\0"),
            b'\'' => sql.extend_from_slice(b"\\'"),
            b'"' => sql.extend_from_slice(b"\\\""),
            b'\\' => sql.extend_from_slice(b"\\\\"),
            b'\n' => sql.extend_from_slice(b"\\n"),
            b'\r' => sql.extend_from_slice(b"\\r"),
            0x1a => sql.extend_from_slice(b"\\Z"),
            b => sql.push(b),
        }
    }
    sql.push(b'\'');
}

fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Views ordered so that each comes after the views its definition names: one view
/// read by another must exist when the other is created on restore. A view counts as
/// named when its quoted name appears in the definition, as the server writes every
/// table and view a definition reads; a name that appears for another reason (a
/// column alias) only moves it earlier, and views that cannot be ordered (a
/// mention both ways) keep their order at the end.
fn in_dependency_order(mut pending: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut ordered = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = pending.iter().position(|(view, create)| {
            !pending
                .iter()
                .any(|(other, _)| other != view && create.contains(&quote_ident(other)))
        });
        match ready {
            Some(index) => ordered.push(pending.remove(index)),
            None => ordered.append(&mut pending),
        }
    }
    ordered
}

/// `CREATE … DEFINER=`u`@`h` SQL SECURITY …` without the DEFINER clause: the definer
/// account rarely exists on a restore target, and naming another account needs SUPER.
fn without_definer(create: &str) -> String {
    let Some(start) = create.find(" DEFINER=") else {
        return create.to_owned();
    };
    match create[start + 1..].find(" SQL SECURITY") {
        Some(end) => format!("{}{}", &create[..start], &create[start + 1 + end..]),
        None => create.to_owned(),
    }
}

/// Passes a stream through and keeps its last bytes, to check the dump's end marker
/// after the client has consumed everything.
struct TailKeeper {
    inner: ByteStream,
    tail: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for TailKeeper {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = self.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let new = &buf.filled()[before..];
            let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            tail.extend_from_slice(new);
            let keep = END_MARKER.len() + 64;
            if tail.len() > keep {
                let cut = tail.len() - keep;
                tail.drain(..cut);
            }
        }
        poll
    }
}

#[cfg(test)]
mod tests;
