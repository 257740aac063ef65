//! A PostgreSQL database's change stream into storage, beside its WAL archive: what
//! `stillpoint changes` exports (`crate::changes::postgres`). WAL alone cannot give
//! it: its tuples carry no column names and need the catalog of their time, so the
//! server decodes them itself while it still has that catalog.
//!
//! [`ChangeCapture`] keeps a logical replication slot, `stillpoint_<database>_changes`,
//! with PostgreSQL's own `test_decoding` plugin (in every server; `wal2json` would need
//! a package and, on some builds, `output_plugin_libraries`). Every `interval` it
//!
//! 1. notes the server's flush position `L` and reads the slot's changes up to it
//!    with `pg_logical_slot_peek_changes` (at most [`MAX_CHANGES`] at once; peeking
//!    consumes nothing);
//! 2. pushes them as one chunk covering `(S, T]`: the transactions whose commit record
//!    ends after `S`, the slot's position, and at or before `T` (the last commit read;
//!    `L` when the read was not cut short, so a quiet stream still moves on);
//! 3. only then moves the slot to `T` with `pg_replication_slot_advance`.
//!
//! A change row's `lsn` is where its record starts, a commit row's where its commit
//! record *ends*, and decoding from a slot at `T` skips every transaction whose commit
//! record starts before `T`: so a slot moved to a commit row's `lsn` starts exactly
//! after that transaction. A crash between push and advance leaves the slot behind
//! the stream's end; the next session moves it to the end first, so nothing is
//! stored twice, and nothing is lost because the slot never moves past what storage
//! holds. The slot keeps the server's WAL (and old catalog rows) until then, as the
//! WAL archiver's slot does.
//!
//! A point's PostgreSQL marker is the LSN where its restore point record ends; a
//! transaction is after the point exactly when its commit record ends after that LSN,
//! which is what the chunks' ranges are in.
//!
//! A chunk's plaintext is JSON lines: first `{"tables": {"public.t": ["id"], …}}`, the
//! primary key columns of every table its rows name (as the server's catalog had them
//! when captured; `null` for none), then one `{"lsn", "xid", "data"}` per row the
//! plugin wrote, in commit order.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::supervise::{Ended, supervise, supervised_status};
use super::{Archive, ArchiveError, ChunkContent, ChunkKind, Lsn, NewChunk, Position};
use crate::adapters::PostgresConfig;
use crate::adapters::postgres::error_text;

/// Changes read at once: what bounds a chunk (and the memory a capture or an export
/// holds), apart from one transaction larger than this, which is read whole.
pub const MAX_CHANGES: i32 = 10_000;
/// The output plugin: PostgreSQL's own.
pub const PLUGIN: &str = "test_decoding";

/// `stillpoint_<database>_changes`, as [`super::postgres::slot_name`] makes names.
pub fn slot_name(database: &str) -> String {
    let mut name = super::postgres::slot_name(database);
    name.truncate(63 - "_changes".len());
    name + "_changes"
}

/// What a capture has done.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureStatus {
    /// The stream holds every transaction committed up to here.
    pub captured_to: Option<Lsn>,
    pub chunks_stored: u64,
    pub streaming: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
}

supervised_status!(CaptureStatus);

/// The change stream of one PostgreSQL database.
#[derive(Debug)]
pub struct ChangeCapture {
    database: String,
    postgres: PostgresConfig,
    slot: String,
    interval: Duration,
    stream: Archive,
    status: watch::Sender<CaptureStatus>,
}

impl ChangeCapture {
    /// `stream` is the database's [`Archive::change_stream`].
    pub fn new(
        database: &str,
        postgres: PostgresConfig,
        interval: Duration,
        stream: Archive,
    ) -> ChangeCapture {
        ChangeCapture {
            database: database.to_owned(),
            postgres,
            slot: slot_name(database),
            interval,
            stream,
            status: watch::Sender::new(CaptureStatus::default()),
        }
    }

    pub fn status(&self) -> watch::Receiver<CaptureStatus> {
        self.status.subscribe()
    }

    fn server_error(&self, message: String) -> ArchiveError {
        ArchiveError::Server {
            database: self.database.clone(),
            message: format!("change stream: {message}"),
        }
    }

    /// Captures until `cancel` fires, reconnecting with backoff; fails only for what
    /// retrying cannot fix (`wal_level` is not `logical`, the slot is another
    /// plugin's, a chunk conflicts with the stream).
    pub async fn run(&self, cancel: &CancellationToken) -> Result<(), ArchiveError> {
        supervise(&self.database, &self.status, cancel, || {
            self.session(cancel)
        })
        .await
    }

    async fn session(&self, cancel: &CancellationToken) -> Result<Ended, ArchiveError> {
        let (client, _, _driver) =
            super::postgres::connect(&self.postgres.url, |message| self.server_error(message))
                .await?;
        let sql = |e: tokio_postgres::Error| self.server_error(error_text(&e));
        let level: String = client
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(sql)?
            .get(0);
        if level != "logical" {
            return Err(ArchiveError::Settings {
                database: self.database.clone(),
                message: format!(
                    "changes = true needs wal_level = logical (it is {level}): set it in \
                     postgresql.conf and restart the server, or remove changes = true"
                ),
            });
        }
        // What the plugin prints depends on these: times in UTC, bytea in hex.
        client
            .batch_execute(
                "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = \
                 'postgres'; SET bytea_output = 'hex'; SET extra_float_digits = 1",
            )
            .await
            .map_err(sql)?;
        self.lock_stream(&client).await?;
        let mut at = self.slot_position(&client).await?;
        // A push whose advance did not happen (the run was stopped between them):
        // the stream already holds up to its end.
        let catalog = self.stream.catalog().await?;
        if let (Some(end), Some(first)) = (
            catalog.end().and_then(|end| end.lsn()),
            catalog.coverage().and_then(|c| c.from.lsn()),
        ) && first <= at
            && at < end
        {
            self.advance(&client, end).await?;
            at = end;
        }
        self.status.send_modify(|status| {
            status.streaming = true;
            status.captured_to = Some(at);
        });
        loop {
            let cut = self.capture_once(&client, &mut at).await?;
            // More is waiting: read on at once, unless asked to stop.
            if cut && !cancel.is_cancelled() {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = cancel.cancelled() => {
                    // What was committed until now goes into the stream before it stops.
                    self.capture_once(&client, &mut at).await?;
                    return Ok(Ended::Cancelled);
                }
            }
        }
    }

    /// Takes the database's change stream for this session: an advisory lock held
    /// while the connection lives. Two captures of one slot (two archivers of the
    /// database with different spools, on two hosts, or under two runbooks) would
    /// each store chunks claiming what the other read: changes lost and duplicated,
    /// silently. The second waits (retrying) until the first is gone.
    async fn lock_stream(&self, client: &Client) -> Result<(), ArchiveError> {
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('stillpoint change stream ' || $1))",
                &[&self.slot],
            )
            .await
            .map_err(|e| self.server_error(error_text(&e)))?
            .get(0);
        if locked {
            return Ok(());
        }
        Err(self.server_error(format!(
            "another capture holds the change stream of slot {} (a `stillpoint archive` or \
             `serve` of this database with another spool, or on another host): only one may \
             read a slot, so this one waits until that one stops; stop one of them",
            self.slot
        )))
    }

    /// The slot's position, the slot made first when missing (the stream starts
    /// there: what was committed before was never captured).
    async fn slot_position(&self, client: &Client) -> Result<Lsn, ArchiveError> {
        let sql = |e: tokio_postgres::Error| self.server_error(error_text(&e));
        let row = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, plugin::text, database::text, \
                        current_database()::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(sql)?;
        let lsn: Option<String> = match row {
            Some(row) => {
                let (plugin, database, current): (Option<String>, Option<String>, String) =
                    (row.get(1), row.get(2), row.get(3));
                if plugin.as_deref() != Some(PLUGIN) || database.as_deref() != Some(&current) {
                    return Err(ArchiveError::Settings {
                        database: self.database.clone(),
                        message: format!(
                            "replication slot {} exists but is not a {PLUGIN} slot of database \
                             {current} (plugin {}, database {}); drop it \
                             (SELECT pg_drop_replication_slot('{}')) so the capture makes its own",
                            self.slot,
                            plugin.as_deref().unwrap_or("none: a physical slot"),
                            database.as_deref().unwrap_or("none"),
                            self.slot
                        ),
                    });
                }
                row.get(0)
            }
            None => {
                tracing::info!(
                    database = %self.database,
                    slot = %self.slot,
                    "creating the change stream's logical replication slot"
                );
                client
                    .query_one(
                        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, $2)",
                        &[&self.slot, &PLUGIN],
                    )
                    .await
                    .map_err(sql)?
                    .get(0)
            }
        };
        lsn.and_then(|text| text.parse().ok()).ok_or_else(|| {
            self.server_error(format!("replication slot {} has no position", self.slot))
        })
    }

    async fn advance(&self, client: &Client, to: Lsn) -> Result<(), ArchiveError> {
        client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&self.slot, &to.to_string()],
            )
            .await
            .map_err(|e| self.server_error(error_text(&e)))?;
        Ok(())
    }

    /// Reads what the slot has up to the flush position, pushes it, moves the slot.
    /// Returns whether the read was cut short (more is waiting).
    async fn capture_once(&self, client: &Client, at: &mut Lsn) -> Result<bool, ArchiveError> {
        let sql = |e: tokio_postgres::Error| self.server_error(error_text(&e));
        let row = client
            .query_one(
                "SELECT pg_current_wal_flush_lsn()::text, (SELECT confirmed_flush_lsn::text \
                 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&self.slot],
            )
            .await
            .map_err(sql)?;
        let (flush, slot_at): (String, Option<String>) = (row.get(0), row.get(1));
        let flush: Lsn = flush
            .parse()
            .map_err(|e| self.server_error(format!("flush position {flush}: {e}")))?;
        // The next chunk starts at `at`: only true while the slot is where this
        // session left it. Moved or made again by someone else, what lies between was
        // never read here; a new session starts the stream at the slot, a visible gap.
        if slot_at.as_deref().and_then(|text| text.parse().ok()) != Some(*at) {
            return Err(self.server_error(format!(
                "replication slot {} is at {}, not where this capture left it ({at}): \
                 something else moved, dropped or made it; the change stream goes on from \
                 the slot, with a gap",
                self.slot,
                slot_at.as_deref().unwrap_or("nothing: it was dropped")
            )));
        }
        let rows = client
            .query(
                "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes($1, \
                 $2::text::pg_lsn, $3, 'include-xids', '1', 'include-timestamp', '1', \
                 'skip-empty-xacts', '1')",
                &[&self.slot, &flush.to_string(), &MAX_CHANGES],
            )
            .await
            .map_err(sql)?;
        let cut = rows.len() >= MAX_CHANGES as usize;
        let mut lines: Vec<StreamRow> = Vec::with_capacity(rows.len());
        let mut last_commit = None;
        for row in &rows {
            let (lsn, xid, data): (String, Option<String>, String) =
                (row.get(0), row.get(1), row.get(2));
            let lsn: Lsn = lsn
                .parse()
                .map_err(|e| self.server_error(format!("change row lsn {lsn}: {e}")))?;
            if data.starts_with("COMMIT") {
                last_commit = Some((lines.len() + 1, lsn));
            }
            lines.push(StreamRow {
                lsn: lsn.to_string(),
                // A non-transactional message has none (0); the export skips it.
                xid: xid.and_then(|xid| xid.parse().ok()).unwrap_or(0),
                data,
            });
        }
        // Only whole transactions: a peek ends with a commit, but be exact about it.
        let to = match last_commit {
            Some((rows_kept, end)) => {
                lines.truncate(rows_kept);
                if cut { end } else { end.max(flush) }
            }
            None if cut => {
                return Err(self.server_error(format!(
                    "{MAX_CHANGES} change rows without a commit from slot {}",
                    self.slot
                )));
            }
            None => flush,
        };
        if to <= *at {
            return Ok(false);
        }
        let tables = self.keys_of(client, &lines).await?;
        let mut content = serde_json::to_vec(&StreamHeader { tables }).expect("JSON");
        content.push(b'\n');
        for line in &lines {
            serde_json::to_writer(&mut content, line).expect("JSON");
            content.push(b'\n');
        }
        let chunk = NewChunk {
            name: chunk_name(*at, to),
            kind: ChunkKind::PgChanges,
            timeline: None,
            start: Some(Position::Lsn(*at)),
            end: Some(Position::Lsn(to)),
            segment_size: None,
            details: BTreeMap::from([("changes".to_owned(), lines.len().to_string())]),
        };
        self.stream
            .push(chunk, ChunkContent::Bytes(Bytes::from(content)))
            .await?;
        self.advance(client, to).await?;
        *at = to;
        self.status.send_modify(|status| {
            status.captured_to = Some(to);
            status.chunks_stored += 1;
        });
        Ok(cut)
    }

    /// The primary key columns of every table the rows name, looked up for each
    /// chunk: a session lasts weeks under `serve`, and a key changed meanwhile
    /// (`ALTER TABLE … ADD PRIMARY KEY`) must not keep the old one's columns.
    async fn keys_of(
        &self,
        client: &Client,
        rows: &[StreamRow],
    ) -> Result<BTreeMap<String, Option<Vec<String>>>, ArchiveError> {
        let mut tables = BTreeMap::new();
        for row in rows {
            let Some(name) = row.data.strip_prefix("table ").and_then(row_table) else {
                continue;
            };
            if tables.contains_key(name) {
                continue;
            }
            let columns: Vec<String> = client
                .query(
                    "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
                           ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                         WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
                         ORDER BY array_position(i.indkey::int2[], a.attnum)",
                    &[&name],
                )
                .await
                .map_err(|e| self.server_error(error_text(&e)))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            tables.insert(name.to_owned(), (!columns.is_empty()).then_some(columns));
        }
        Ok(tables)
    }
}

/// The qualified table name a change row starts with (`public."we ird"` of
/// `table public."we ird": INSERT: …`), as the server prints it; a TRUNCATE's list
/// of tables is not one name and is left out.
fn row_table(after_table: &str) -> Option<&str> {
    let mut quoted = false;
    for (at, c) in after_table.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ':' if !quoted => return Some(&after_table[..at]),
            ',' if !quoted => return None,
            _ => {}
        }
    }
    None
}

/// `<start>-<end>`, each 16 hex digits: names sort as the stream does.
pub fn chunk_name(start: Lsn, end: Lsn) -> String {
    format!("{:016X}-{:016X}", start.0, end.0)
}

/// A chunk's first line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StreamHeader {
    pub tables: BTreeMap<String, Option<Vec<String>>>,
}

/// One row the plugin wrote.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StreamRow {
    /// A change's record start; a commit's record end.
    pub lsn: String,
    pub xid: u64,
    pub data: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_and_chunk_names() {
        assert_eq!(slot_name("ledger"), "stillpoint_ledger_changes");
        assert!(slot_name(&"x".repeat(100)).len() <= 63);
        assert!(slot_name(&"x".repeat(100)).ends_with("_changes"));
        let name = chunk_name(Lsn(0x1_5469B0), Lsn(0x2_0000_0000));
        assert_eq!(name, "00000000015469B0-0000000200000000");
        assert!(chunk_name(Lsn(9), Lsn(10)) < chunk_name(Lsn(10), Lsn(11)));
    }

    #[test]
    fn a_rows_table_is_read_through_quotes_and_a_truncate_names_none() {
        assert_eq!(
            row_table("public.t: INSERT: id[text]:'a'"),
            Some("public.t")
        );
        assert_eq!(
            row_table("public.\"we: ird\": DELETE: x[int]:1"),
            Some("public.\"we: ird\"")
        );
        assert_eq!(row_table("public.a, public.b: TRUNCATE: (no-flags)"), None);
    }
}
