//! PostgreSQL adapter: an exported snapshot fixed inside the pause, dumped after it.
//!
//! - prepare: connects (tokio-postgres, no TLS), refuses a standby or a server older
//!   than 10, reads `wal_level`, `archive_mode` and the archive command/library, and
//!   fails if `require_archiving` is set but WAL is not archived. It also checks that
//!   `pg_dump` exists and is not older than the server, so the copy cannot fail for
//!   that reason after the cluster was paused.
//! - cut: on the held connection, `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`,
//!   then `LOCK TABLE … IN ACCESS SHARE MODE` on every table the copy will dump (listed
//!   in prepare), then `pg_export_snapshot()` and the WAL insert position; with
//!   archiving on, also `pg_create_restore_point('stillpoint-<backup id>')`. None of it
//!   grows with the data. (Both WAL functions are allowed in a read-only transaction;
//!   the tests run them there.) The locks come before the snapshot and last until the
//!   copy ends: TRUNCATE (and other DDL that breaks an older snapshot) cannot run
//!   between the release and pg_dump taking its own locks, where it would empty the
//!   copy of a table and the row counts alike. It waits for the copy instead, or, if
//!   it queued before pg_dump took its own locks (PostgreSQL then queues pg_dump behind
//!   it), pg_dump gives up after `--lock-wait-timeout` and the backup fails, loudly. A
//!   table that appears or disappears between prepare and the cut fails the cut.
//! - copy: `pg_dump --snapshot=<id> --format=custom --compress=0` streams the snapshot
//!   while our transaction keeps it alive; `finished` waits for pg_dump, then counts
//!   rows per table in the same snapshot and only then ends the transaction.
//! - restore: `pg_restore --no-owner --exit-on-error --single-transaction` from the
//!   stream into a target database that must have no user relations (a drill's scratch
//!   copy also without the source's GRANTs, `--no-acl`: a drill server of its own
//!   lacks the roles they name). Drills create a
//!   scratch database on the source's server (or `drill_server_url`), from template0
//!   with the source's encoding and locale (read in prepare, kept in the cut marker),
//!   and drop it with `WITH (FORCE)` (PostgreSQL 13+).
//! - drill checks (`query`): one statement (prepared first, which refuses more), run in
//!   a read-only transaction; each value typed by its column's type.
//!
//! Connection strings are parsed once (`conninfo.rs`): messages show them without the
//! password, pg_dump and pg_restore get them without it and the password in
//! `PGPASSWORD` (never on a command line, where `ps` shows it), and the password may
//! come from the string, `PGPASSWORD` or the password file, as libpq would take it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use futures::FutureExt;
use tokio::process::Command;
use tokio_postgres::Client;
use tokio_util::task::AbortOnDropHandle;

use super::process;
use super::{
    Adapter, AdapterError, ByteStream, Copy, CopySummary, CutMarker, PostgresConfig, Prepared,
    Rows, Value,
};

pub(crate) mod conninfo;

use conninfo::ConnString;

/// pg_current_wal_insert_lsn, pg_export_snapshot on REPEATABLE READ and pg_dump's
/// --snapshot all exist from PostgreSQL 10 on.
const MIN_SERVER_VERSION: i32 = 100_000;

pub struct Postgres {
    name: String,
    config: PostgresConfig,
    /// Per scratch database this drill made: the session holding its advisory lock.
    holds: std::sync::Mutex<BTreeMap<String, Connection>>,
}

/// The advisory lock a drill holds, on a session of the drill server, from before it
/// creates a scratch database until it has dropped it: (this class, hashtext(name)).
/// `pg_locks` shows it from every database of the server, so a clean-up run with any
/// runbook sees it.
const SCRATCH_LOCK_CLASS: i32 = 0x5354_4450;

impl Postgres {
    pub fn new(name: &str, config: PostgresConfig) -> Self {
        Postgres {
            name: name.to_owned(),
            config,
            holds: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    fn tool(&self, name: &str) -> PathBuf {
        match &self.config.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }
}

/// A connection and the task that drives it. Dropping this aborts the task, which
/// closes the connection (and with it any open transaction).
struct Connection {
    client: Client,
    driver: AbortOnDropHandle<Result<(), tokio_postgres::Error>>,
}

async fn connect(url: &str) -> Result<Connection, String> {
    connect_with(&ConnString::parse(url)?).await
}

async fn connect_with(target: &ConnString) -> Result<Connection, String> {
    let (client, connection) = target.connect().await?;
    Ok(Connection {
        client,
        driver: AbortOnDropHandle::new(tokio::spawn(connection)),
    })
}

impl Connection {
    /// Ends the session cleanly and waits for the driver task.
    async fn close(self) {
        drop(self.client);
        let _ = self.driver.await;
    }
}

/// The source database's encoding and locale, recorded in the cut marker: a drill's
/// scratch database is created with them (from template0), so that a restore neither
/// fails on bytes the server's default encoding refuses (SQL_ASCII, LATIN1 data) nor
/// converts the text to another encoding.
#[derive(Debug, Clone)]
struct CharacterSettings {
    encoding: String,
    lc_collate: String,
    lc_ctype: String,
}

/// What prepare learned about the server's WAL settings.
#[derive(Debug, Clone)]
struct WalSettings {
    wal_level: String,
    archive_mode: String,
    /// Why WAL is not archived, if it is not.
    not_archived_because: Option<String>,
}

#[async_trait::async_trait]
impl Adapter for Postgres {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn artifact_extension(&self) -> &'static str {
        "pgdump"
    }

    async fn prepare(&self) -> Result<Box<dyn Prepared>, AdapterError> {
        let err = |message: String| AdapterError::Prepare {
            database: self.name.clone(),
            message,
        };
        let source = ConnString::parse(&self.config.url).map_err(err)?;
        let conn = connect_with(&source).await.map_err(err)?;
        let shown = source.shown();
        let facts = conn
            .client
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
                        current_database(), pg_is_in_recovery(), current_setting('wal_level'), \
                        current_setting('archive_mode'), current_setting('archive_command'), \
                        coalesce(current_setting('archive_library', true), ''), \
                        pg_encoding_to_char(d.encoding), d.datcollate::text, d.datctype::text \
                 FROM pg_database d WHERE d.datname = current_database()",
                &[],
            )
            .await
            .map_err(|e| err(format!("reading settings of {shown}: {}", error_text(&e))))?;
        let version_num: i32 = facts.get(0);
        let server_version: String = facts.get(1);
        let database: String = facts.get(2);
        let in_recovery: bool = facts.get(3);
        if version_num < MIN_SERVER_VERSION {
            return Err(err(format!(
                "{shown} runs PostgreSQL {server_version}; stillpoint needs 10 or newer"
            )));
        }
        if in_recovery {
            return Err(err(format!(
                "{shown} is a standby (in recovery): a restore point and the WAL position can only \
                 be taken on the primary; point this database at the primary"
            )));
        }
        let wal = wal_settings(facts.get(4), facts.get(5), facts.get(6), facts.get(7));
        let character = CharacterSettings {
            encoding: facts.get(8),
            lc_collate: facts.get(9),
            lc_ctype: facts.get(10),
        };
        if self.config.require_archiving
            && let Some(why) = &wal.not_archived_because
        {
            return Err(err(format!(
                "{shown} does not archive WAL ({why}), but require_archiving is set: without \
                 archived WAL the backup's restore point cannot be replayed to. Set wal_level = \
                 replica, archive_mode = on and archive_command (or archive_library) in \
                 postgresql.conf and restart the server, or drop require_archiving"
            )));
        }
        // Our session sits idle in its snapshot transaction between the cut and the
        // end of the copy: a server-wide idle or statement timeout must not end it.
        conn.client
            .batch_execute("SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0")
            .await
            .map_err(|e| err(format!("configuring the session: {}", error_text(&e))))?;

        check_pg_dump(&self.tool("pg_dump"), version_num)
            .await
            .map_err(err)?;
        let tables = dumped_tables(&conn.client)
            .await
            .map_err(|e| err(format!("listing the tables of {shown}: {}", error_text(&e))))?;

        Ok(Box::new(PostgresPrepared {
            name: self.name.clone(),
            source,
            require_archiving: self.config.require_archiving,
            pg_dump: self.tool("pg_dump"),
            conn,
            server_version,
            database,
            wal,
            character,
            tables,
            snapshot: None,
        }))
    }

    async fn restore(&self, copy: ByteStream, target: &str) -> Result<(), AdapterError> {
        let err = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        let is_scratch = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(target);
        let target = ConnString::parse(target).map_err(err)?;
        let conn = connect_with(&target).await.map_err(err)?;
        let existing = conn
            .client
            .query(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') \
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND n.nspname NOT LIKE 'pg\\_%' \
                 ORDER BY 1 LIMIT 5",
                &[],
            )
            .await
            .map_err(|e| err(format!("inspecting {}: {}", target.shown(), error_text(&e))))?;
        conn.close().await;
        if !existing.is_empty() {
            let names: Vec<String> = existing.iter().map(|r| r.get(0)).collect();
            return Err(err(format!(
                "refusing to restore into {}: the database is not empty (it has {}{}); restore \
                 into a new, empty database",
                target.shown(),
                names.join(", "),
                if names.len() == 5 { ", …" } else { "" }
            )));
        }

        let mut cmd = Command::new(self.tool("pg_restore"));
        // One transaction: a restore that fails half-way leaves the target as empty as
        // it was, so it can simply be retried.
        cmd.args([
            "--no-owner",
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
        ]);
        if is_scratch {
            // A drill's scratch copy is read by the drill alone, often on a server of
            // its own (drill_server_url) that lacks the source's roles: their GRANTs
            // would fail the restore, and prove nothing about the data.
            cmd.arg("--no-acl");
        }
        target.libpq_args(&mut cmd);
        process::run_with_stdin(cmd, "pg_restore", copy, false)
            .await
            .map_err(err)
    }

    async fn clear(&self, target: &str) -> Result<(), AdapterError> {
        let shown = redact(target).url;
        let refuse = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        let conn = self.connect_target(target).await?;
        // Emptying a database an application still uses destroys its data under it:
        // refuse, naming who is there. Sessions that are just closing get a moment.
        let deadline = tokio::time::Instant::now() + CLEAR_SESSIONS_GRACE;
        let sessions = loop {
            let sessions = other_sessions(&conn.client)
                .await
                .map_err(|e| self.target_error(target, &e))?;
            if sessions.is_empty() || tokio::time::Instant::now() >= deadline {
                break sessions;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        if !sessions.is_empty() {
            return Err(refuse(format!(
                "refusing to empty {shown}: it is in use by {} other session(s) ({}); nothing \
                 was dropped. Stop what uses it (or end the sessions with \
                 pg_terminate_backend) and retry",
                sessions.len(),
                sessions.join("; ")
            )));
        }
        drop_everything(&conn.client, CLEAR_LOCK_TIMEOUT)
            .await
            .map_err(|e| {
                refuse(format!(
                    "emptying {shown} failed, nothing was dropped: {} (a session that \
                     connected meanwhile may hold a lock; waited at most {}s)",
                    error_text(&e),
                    CLEAR_LOCK_TIMEOUT.as_secs()
                ))
            })?;
        conn.close().await;
        Ok(())
    }

    async fn create_scratch(
        &self,
        label: &str,
        _dir: &Path,
        cut: &CutMarker,
    ) -> Result<String, AdapterError> {
        let server = self.config.drill_server();
        let target = with_database(server, label).map_err(|message| AdapterError::Restore {
            database: self.name.clone(),
            message,
        })?;
        // template0: template1 may hold objects or another encoding. The source's
        // encoding and locale, where the backup recorded them (older backups did not:
        // the server's defaults then).
        let mut create = format!("CREATE DATABASE {} TEMPLATE template0", quote_ident(label));
        let mut like = Vec::new();
        for (key, clause) in [
            ("encoding", "ENCODING"),
            ("lc_collate", "LC_COLLATE"),
            ("lc_ctype", "LC_CTYPE"),
        ] {
            if let Some(value) = cut.details.get(key) {
                create.push_str(&format!(" {clause} {}", quote_literal(value)));
                like.push(format!("{clause} {value}"));
            }
        }
        let conn = self.connect_target(server).await?;
        // Held before the database exists, so no clean-up can find it unheld. Tried,
        // not awaited: a key another drill holds (two names, one hash) must not make
        // this drill wait for that one to end.
        let locked: bool = conn
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&SCRATCH_LOCK_CLASS, &label],
            )
            .await
            .map_err(|e| self.target_error(&target, &e))?
            .get(0);
        if !locked {
            return Err(AdapterError::Restore {
                database: self.name.clone(),
                message: format!(
                    "another session holds the advisory lock of scratch database {label} \
                     (another drill's name hashes alike); run the drill again"
                ),
            });
        }
        conn.client.batch_execute(&create).await.map_err(|e| {
            let error = self.target_error(&target, &e);
            if like.is_empty() {
                return error;
            }
            AdapterError::Restore {
                database: self.name.clone(),
                message: format!(
                    "{error}, creating it like the source database ({}); the drill server \
                     must support that encoding and have that locale",
                    like.join(", ")
                ),
            }
        })?;
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.clone(), conn);
        Ok(target)
    }

    async fn drop_scratch(&self, target: &str) -> Result<(), AdapterError> {
        let database = scratch_database(&self.name, target)?;
        // A session in the scratch database could not drop it: connect to the database
        // it was created from instead.
        let server = self.config.drill_server();
        let conn = self.connect_target(server).await?;
        conn.client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&database)
            ))
            .await
            .map_err(|e| self.target_error(target, &e))?;
        conn.close().await;
        let hold = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(target);
        if let Some(hold) = hold {
            hold.close().await;
        }
        Ok(())
    }

    async fn scratch_in_use(&self, target: &str) -> Result<Option<String>, AdapterError> {
        let database = scratch_database(&self.name, target)?;
        let server = self.config.drill_server();
        let conn = self.connect_target(server).await?;
        let holder = conn
            .client
            .query_opt(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                   AND classid = ($1::int4)::oid AND objid = hashtext($2)::oid AND objsubid = 2 \
                 LIMIT 1",
                &[&SCRATCH_LOCK_CLASS, &database],
            )
            .await
            .map_err(|e| self.target_error(server, &e))?;
        conn.close().await;
        Ok(holder.map(|row| {
            format!(
                "a running drill holds it (PostgreSQL session pid {})",
                row.get::<_, i32>(0)
            )
        }))
    }

    async fn list_scratch(&self, marker: &str) -> Result<Vec<String>, AdapterError> {
        let server = self.config.drill_server();
        let conn = self.connect_target(server).await?;
        let names = conn
            .client
            .query(
                "SELECT datname FROM pg_database WHERE left(datname, length($1)) = $1 ORDER BY 1",
                &[&marker],
            )
            .await
            .map_err(|e| self.target_error(server, &e))?;
        conn.close().await;
        names
            .iter()
            .map(|row| {
                with_database(server, row.get(0)).map_err(|message| AdapterError::Restore {
                    database: self.name.clone(),
                    message,
                })
            })
            .collect()
    }

    async fn query(&self, target: &str, sql: &str) -> Result<Rows, AdapterError> {
        let conn = self.connect_target(target).await?;
        // Values print the same whatever the server's or the role's settings: bytea
        // as hex, floats in the shortest text that reads back exactly, times in UTC.
        conn.client
            .batch_execute(
                "SET bytea_output = 'hex'; SET extra_float_digits = 3; SET TimeZone = 'UTC'; \
                 SET DateStyle = 'ISO, YMD'",
            )
            .await
            .map_err(|e| self.target_error(target, &e))?;
        // A check reads and never writes: in a read-only transaction, the server
        // refuses any write (and later checks see the restored data unchanged).
        conn.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| self.target_error(target, &e))?;
        // Prepared first, which refuses more than one statement (a second could end
        // the transaction and write) and tells each column's type; the simple protocol
        // then returns each value as the server's text for it, which the type turns
        // back into a typed value.
        let statement = conn
            .client
            .prepare(sql)
            .await
            .map_err(|e| self.target_error(target, &e))?;
        let types: Vec<tokio_postgres::types::Type> = statement
            .columns()
            .iter()
            .map(|column| column.type_().clone())
            .collect();
        let messages = conn
            .client
            .simple_query(sql)
            .await
            .map_err(|e| self.target_error(target, &e))?;
        // The statement may have been a lone COMMIT; a ROLLBACK then only warns.
        conn.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| self.target_error(target, &e))?;
        conn.close().await;
        let mut rows = Rows::new();
        for message in messages {
            let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            if row.len() != types.len() {
                return Err(self.read_error(
                    target,
                    format!(
                        "the statement returned {} columns, but was prepared with {}",
                        row.len(),
                        types.len()
                    ),
                ));
            }
            let values = types
                .iter()
                .enumerate()
                .map(|(i, ty)| typed(ty, row.get(i)))
                .collect::<Result<Vec<_>, String>>()
                .map_err(|message| self.read_error(target, message))?;
            rows.push(values);
        }
        Ok(rows)
    }

    async fn row_counts(&self, target: &str) -> Result<BTreeMap<String, u64>, AdapterError> {
        let conn = self.connect_target(target).await?;
        let counts = row_counts(&conn.client)
            .await
            .map_err(|e| self.target_error(target, &e))?;
        conn.close().await;
        Ok(counts)
    }

    async fn write_note(
        &self,
        target: &str,
        table: &str,
        fields: &[(String, String)],
    ) -> Result<(), AdapterError> {
        let conn = self.connect_target(target).await?;
        let mut sql = format!(
            "CREATE TABLE {} (field text PRIMARY KEY, value text NOT NULL); ",
            quote_ident(table)
        );
        for (field, value) in fields {
            sql.push_str(&format!(
                "INSERT INTO {} VALUES ({}, {}); ",
                quote_ident(table),
                quote_literal(field),
                quote_literal(value)
            ));
        }
        // One transaction: the note is whole or absent.
        conn.client
            .batch_execute(&format!("BEGIN; {sql}COMMIT"))
            .await
            .map_err(|e| self.target_error(target, &e))?;
        conn.close().await;
        Ok(())
    }
}

/// How long emptying a restore target waits for a lock before it gives up, having
/// dropped nothing.
const CLEAR_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long emptying a restore target waits for other sessions (ones just closing)
/// to leave it before it refuses.
const CLEAR_SESSIONS_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The other client sessions connected to this connection's database, for a message.
/// A session of a role this user is not a member of shows only its pid, user and
/// application: its `backend_type` (and address) read NULL. It counts as a session:
/// a restore user that is not a superuser would otherwise empty a database an
/// application uses under another role.
async fn other_sessions(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pid, coalesce(usename, '-'), coalesce(nullif(application_name, ''), '-'), \
                    coalesce(client_addr::text, \
                             CASE WHEN backend_type IS NULL THEN 'an address this user may not see' \
                                  ELSE 'local' END) \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND (backend_type = 'client backend' OR backend_type IS NULL) \
             ORDER BY pid",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            format!(
                "pid {} user {} application {} from {}",
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(3)
            )
        })
        .collect())
}

/// Drops every user schema and recreates an empty `public`, in one transaction that
/// waits at most `lock_timeout` for a lock, and commits in a message of its own. A
/// client killed while the DROP waits never sends that COMMIT, so the server rolls
/// the DROP back when it finds the client gone; sent as one implicit transaction,
/// the server would commit it by itself once the lock came.
async fn drop_everything(
    client: &Client,
    lock_timeout: std::time::Duration,
) -> Result<(), tokio_postgres::Error> {
    let schemas = client
        .query(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT IN \
             ('pg_catalog', 'information_schema', 'pg_toast') AND nspname NOT LIKE 'pg\\_%'",
            &[],
        )
        .await?;
    let mut sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms';",
        lock_timeout.as_millis()
    );
    for schema in schemas {
        let schema: String = schema.get(0);
        sql.push_str(&format!("DROP SCHEMA {} CASCADE;", quote_ident(&schema)));
    }
    // Every user schema went; `public` comes back empty, as in a new database.
    sql.push_str("CREATE SCHEMA IF NOT EXISTS public;");
    client.batch_execute(&sql).await?;
    client.batch_execute("COMMIT").await
}

impl Postgres {
    async fn connect_target(&self, target: &str) -> Result<Connection, AdapterError> {
        connect(target)
            .await
            .map_err(|message| AdapterError::Restore {
                database: self.name.clone(),
                message,
            })
    }

    fn read_error(&self, target: &str, message: String) -> AdapterError {
        AdapterError::Restore {
            database: self.name.clone(),
            message: format!("on {}: {message}", redact(target).url),
        }
    }

    fn target_error(&self, target: &str, error: &tokio_postgres::Error) -> AdapterError {
        AdapterError::Restore {
            database: self.name.clone(),
            message: format!("on {}: {}", redact(target).url, error_text(error)),
        }
    }
}

/// A value from its text form (simple protocol) and its column's type. Types the drill
/// compares by value get one of their own; any other type keeps the server's text for
/// it, which is exact (dates, JSON, arrays, …).
fn typed(ty: &tokio_postgres::types::Type, text: Option<&str>) -> Result<Value, String> {
    use tokio_postgres::types::Type;
    let Some(text) = text else {
        return Ok(Value::Null);
    };
    let unreadable = || format!("cannot read {text:?} as a value of type {ty}");
    Ok(match *ty {
        Type::BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(unreadable()),
        },
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            Value::number(text).ok_or_else(unreadable)?
        }
        // NaN and ±Infinity are numerics too, but not exact ones.
        Type::NUMERIC => match Value::number(text) {
            Some(number) => number,
            None => Value::Float(text.parse().map_err(|_| unreadable())?),
        },
        Type::FLOAT4 | Type::FLOAT8 => Value::Float(text.parse().map_err(|_| unreadable())?),
        Type::BYTEA => {
            let hex = text.strip_prefix("\\x").ok_or_else(unreadable)?;
            Value::Bytes(decode_hex(hex).ok_or_else(unreadable)?)
        }
        _ => Value::Text(text.to_owned()),
    })
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(hex.get(at..at + 2)?, 16).ok())
        .collect()
}

/// `url` with its database replaced by `database`: where a scratch database lives.
fn with_database(url: &str, database: &str) -> Result<String, String> {
    let mut parsed = url::Url::parse(url).map_err(|_| {
        format!(
            "{} is not a postgres:// URL; drills need one to name scratch databases",
            redact(url).url
        )
    })?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

fn wal_settings(
    wal_level: String,
    archive_mode: String,
    archive_command: String,
    archive_library: String,
) -> WalSettings {
    let not_archived_because = if archive_mode == "off" {
        Some("archive_mode = off".to_owned())
    } else if wal_level == "minimal" {
        Some("wal_level = minimal".to_owned())
    } else if archive_command.trim().is_empty() && archive_library.trim().is_empty() {
        // archive_mode = on with nothing to run keeps segments waiting forever.
        Some("archive_mode is on but archive_command and archive_library are empty".to_owned())
    } else {
        None
    };
    WalSettings {
        wal_level,
        archive_mode,
        not_archived_because,
    }
}

/// pg_dump refuses to dump a server of a newer major version; find that out before
/// the pause rather than after it.
async fn check_pg_dump(pg_dump: &std::path::Path, server_version_num: i32) -> Result<(), String> {
    let out = Command::new(pg_dump)
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (install the PostgreSQL client tools or set bin_dir)",
                pg_dump.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    let major = text
        .split(") ")
        .nth(1)
        .and_then(|v| v.split(['.', ' ']).next())
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| format!("cannot read {}'s version from {text:?}", pg_dump.display()))?;
    let server_major = server_version_num / 10_000;
    if major < server_major {
        return Err(format!(
            "{} is version {major} but the server is {server_major}: pg_dump must be at least \
             as new as the server (set bin_dir to a newer PostgreSQL's bin directory)",
            pg_dump.display()
        ));
    }
    Ok(())
}

struct PostgresPrepared {
    name: String,
    /// The source's connection string, for pg_dump.
    source: ConnString,
    require_archiving: bool,
    pg_dump: PathBuf,
    conn: Connection,
    server_version: String,
    database: String,
    wal: WalSettings,
    character: CharacterSettings,
    /// The tables pg_dump will dump, as listed in prepare: the cut locks them.
    tables: Vec<(String, String)>,
    /// The exported snapshot id, once cut.
    snapshot: Option<String>,
}

#[async_trait::async_trait]
impl Prepared for PostgresPrepared {
    async fn cut(&mut self, backup_id: &str) -> Result<CutMarker, AdapterError> {
        let err = |message: String| AdapterError::Cut {
            database: self.name.clone(),
            message,
        };
        if self.snapshot.is_some() {
            return Err(err("the snapshot was already cut".to_owned()));
        }
        let client = &self.conn.client;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| err(format!("BEGIN: {}", error_text(&e))))?;
        // Before the snapshot (LOCK does not take one): a lock taken after it could
        // wait behind a TRUNCATE that the snapshot would then see as an empty table.
        // The timeout bounds a wait behind someone else's DDL, inside the pause.
        if !self.tables.is_empty() {
            let list = self
                .tables
                .iter()
                .map(|(schema, table)| format!("{}.{}", quote_ident(schema), quote_ident(table)))
                .collect::<Vec<_>>()
                .join(", ");
            client
                .batch_execute(&format!(
                    "SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {list} IN ACCESS SHARE MODE",
                    CUT_LOCK_TIMEOUT.as_millis()
                ))
                .await
                .map_err(|e| {
                    err(format!(
                        "locking the {} tables to copy: {} (a table was dropped or renamed \
                         since prepare, or another session's DDL held it past {}ms; run the \
                         backup again)",
                        self.tables.len(),
                        error_text(&e),
                        CUT_LOCK_TIMEOUT.as_millis()
                    ))
                })?;
        }
        // The insert position, not pg_current_wal_lsn (the write position): with
        // synchronous_commit = off a commit can be inserted but not yet written, and the
        // marker must lie after every commit the snapshot sees.
        let row = client
            .query_one(
                "SELECT pg_export_snapshot(), pg_current_wal_insert_lsn()::text",
                &[],
            )
            .await
            .map_err(|e| err(format!("exporting the snapshot: {}", error_text(&e))))?;
        let snapshot: String = row.get(0);
        let lsn: String = row.get(1);
        // Every table the snapshot holds, and so pg_dump will copy, must be locked.
        let in_snapshot = dumped_tables(client).await.map_err(|e| {
            err(format!(
                "listing the tables in the snapshot: {}",
                error_text(&e)
            ))
        })?;
        let unlocked: Vec<String> = in_snapshot
            .iter()
            .filter(|table| !self.tables.contains(table))
            .map(|(schema, table)| format!("{schema}.{table}"))
            .collect();
        if !unlocked.is_empty() {
            return Err(err(format!(
                "table(s) {} appeared between prepare and the cut, so the cut could not lock \
                 them before its snapshot; run the backup again",
                unlocked.join(", ")
            )));
        }

        let mut details = BTreeMap::from([
            ("snapshot".to_owned(), snapshot.clone()),
            ("lsn".to_owned(), lsn),
            ("server_version".to_owned(), self.server_version.clone()),
            ("database".to_owned(), self.database.clone()),
            ("wal_level".to_owned(), self.wal.wal_level.clone()),
            ("archive_mode".to_owned(), self.wal.archive_mode.clone()),
            ("encoding".to_owned(), self.character.encoding.clone()),
            ("lc_collate".to_owned(), self.character.lc_collate.clone()),
            ("lc_ctype".to_owned(), self.character.lc_ctype.clone()),
        ]);
        if self.wal.not_archived_because.is_none() {
            let point = restore_point_name(backup_id);
            // In a savepoint, so that a refusal (the function is superuser-only unless
            // granted) does not abort the transaction holding the snapshot.
            let created = async {
                client.batch_execute("SAVEPOINT restore_point").await?;
                match client
                    .query_one("SELECT pg_create_restore_point($1)::text", &[&point])
                    .await
                {
                    Ok(row) => {
                        client
                            .batch_execute("RELEASE SAVEPOINT restore_point")
                            .await?;
                        Ok(Ok(row.get::<_, String>(0)))
                    }
                    Err(e) => {
                        client
                            .batch_execute("ROLLBACK TO SAVEPOINT restore_point")
                            .await?;
                        Ok(Err(e))
                    }
                }
            }
            .await
            .map_err(|e: tokio_postgres::Error| {
                err(format!("creating a restore point: {}", error_text(&e)))
            })?;
            match created {
                Ok(lsn) => {
                    details.insert("restore_point".to_owned(), point);
                    details.insert("restore_point_lsn".to_owned(), lsn);
                }
                Err(e) => {
                    let why = format!(
                        "pg_create_restore_point was refused: {} (run stillpoint as a superuser, \
                         or GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO the \
                         backup user)",
                        error_text(&e)
                    );
                    if self.require_archiving {
                        return Err(err(why));
                    }
                    // Not required: the snapshot is still a good backup; say why the
                    // marker has no restore point.
                    details.insert("restore_point_error".to_owned(), why);
                }
            }
        }
        self.snapshot = Some(snapshot);
        Ok(CutMarker {
            kind: "postgres-snapshot".to_owned(),
            details,
        })
    }

    async fn copy(self: Box<Self>) -> Result<Copy, AdapterError> {
        let this = *self;
        let name = this.name.clone();
        let err = |message: String| AdapterError::Copy {
            database: name.clone(),
            message,
        };
        let Some(snapshot) = &this.snapshot else {
            return Err(err("copy was called before a successful cut".to_owned()));
        };
        let mut cmd = Command::new(&this.pg_dump);
        cmd.arg(format!("--snapshot={snapshot}"))
            .args(["--format=custom", "--compress=0", "--no-password"])
            // Our cut holds ACCESS SHARE on every table, so pg_dump's own locks are
            // granted at once, unless DDL (a TRUNCATE) queued for one after the
            // release: PostgreSQL then queues pg_dump behind it, and it behind our cut.
            // Failing the copy is the only outcome that neither hangs nor loses rows.
            .arg(format!(
                "--lock-wait-timeout={}",
                COPY_LOCK_TIMEOUT.as_millis()
            ));
        this.source.libpq_args(&mut cmd);
        let (stream, producer) = process::spawn_producer(cmd, "pg_dump", false)
            .map_err(|e| err(format!("starting {}: {e}", this.pg_dump.display())))?;

        let finished = async move {
            let err = |message: String| AdapterError::Copy {
                database: this.name.clone(),
                message,
            };
            // The snapshot transaction stays open (this future owns the connection)
            // until pg_dump has exited: pg_dump imports the snapshot at its start, but
            // an early end would fail it with "invalid snapshot identifier".
            producer.wait().await.map_err(|message| {
                // pg_dump's words for the lock timeout vary by version: "could not
                // obtain lock", or the statement timeout it sets for its LOCK TABLE.
                if message.contains("could not obtain lock") || message.contains("LOCK TABLE") {
                    err(format!(
                        "{message}: another session's DDL (TRUNCATE, ALTER TABLE, …) queued \
                         for a table after the cut, and would have changed the copy; the \
                         backup fails rather than copy a table the snapshot no longer \
                         holds. Run it again once the DDL is done"
                    ))
                } else {
                    err(message)
                }
            })?;
            let counts = row_counts(&this.conn.client)
                .await
                .map_err(|e| err(format!("counting rows in the snapshot: {}", error_text(&e))))?;
            this.conn
                .client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| {
                    err(format!(
                        "ending the snapshot transaction: {}",
                        error_text(&e)
                    ))
                })?;
            this.conn.close().await;
            Ok(CopySummary {
                row_counts: Some(counts),
            })
        }
        .boxed();
        Ok(Copy { stream, finished })
    }
}

/// How long the cut waits for its table locks (inside the pause) before it fails.
const CUT_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long pg_dump waits for its table locks, which only DDL queued behind the cut's
/// own locks can delay (see `copy`).
const COPY_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The tables pg_dump copies and locks: ordinary and partitioned tables outside the
/// system schemas, as (schema, name), sorted.
async fn dumped_tables(client: &Client) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The restore point's name: recognisable in the server log and in
/// `recovery_target_name`. PostgreSQL limits it to 63 bytes.
fn restore_point_name(backup_id: &str) -> String {
    let mut name = format!("stillpoint-{backup_id}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Rows per ordinary table, counted in the connection's current transaction (the
/// snapshot), as `schema.table`. Partitioned parents are skipped: their rows are
/// counted in their partitions.
pub(crate) async fn row_counts(
    client: &Client,
) -> Result<BTreeMap<String, u64>, tokio_postgres::Error> {
    let tables = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    let mut counts = BTreeMap::new();
    for table in tables {
        let schema: String = table.get(0);
        let relname: String = table.get(1);
        let n: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}.{}",
                    quote_ident(&schema),
                    quote_ident(&relname)
                ),
                &[],
            )
            .await?
            .get(0);
        counts.insert(format!("{schema}.{relname}"), n as u64);
    }
    Ok(counts)
}

/// The database a scratch target's URL names.
fn scratch_database(name: &str, target: &str) -> Result<String, AdapterError> {
    tokio_postgres::Config::from_str(target)
        .ok()
        .and_then(|c| c.get_dbname().map(str::to_owned))
        .ok_or_else(|| AdapterError::Restore {
            database: name.to_owned(),
            message: format!("{} names no database", redact(target).url),
        })
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal (standard_conforming_strings, on since PostgreSQL 9.1).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The server's message for a database error (tokio-postgres's Display says only "db
/// error"), else the error itself.
pub(crate) fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        },
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// A connection string as messages may show it: without its password, or, for a
/// string that does not parse, words that say so (see [`conninfo::shown`]).
struct Redacted {
    url: String,
}

fn redact(url: &str) -> Redacted {
    Redacted {
        url: conninfo::shown(url),
    }
}

#[cfg(test)]
mod tests;
