//! PostgreSQL WAL into the archive, continuously.
//!
//! [`PgArchiver`] supervises `pg_receivewal` (from the server's own bin dir, as
//! pg_dump and pg_basebackup are found) on a physical replication slot,
//! `stillpoint_<database>`, created if missing. pg_receivewal writes into a local
//! *spool* directory: the segment being received as `<segment>.partial`, renamed to
//! `<segment>` when whole. Every `partial_interval` the archiver
//!
//! 1. asks the server how far *our* pg_receivewal has flushed (its walsender's
//!    `flush_lsn`; with `--synchronous` it reports each flush at once, and only after
//!    the bytes are in the file, so the file holds at least that much);
//! 2. pushes every whole segment in the spool, then removes it from the spool (and
//!    the partial copies of it from the archive);
//! 3. pushes what the `.partial` segment gained since the archive's end, up to that
//!    flush position, as a piece (a partial chunk `<segment>.<from>-<to>.partial`), so
//!    a push costs only what was written since the last one. After [`MAX_PIECES`]
//!    pieces of one segment, one chunk of its whole beginning (`<segment>.<to>.partial`)
//!    replaces them, and the whole segment replaces that: a segment that fills slowly
//!    keeps the catalog short.
//!
//! So the archive trails the server by about `partial_interval`, without forcing
//! segment switches. The slot keeps the server's WAL until pg_receivewal has it.
//!
//! Resuming: pg_receivewal starts at the beginning of the newest segment in its
//! directory (PostgreSQL's `FindStreamingStart`), and it has no `--startpos`. A kept
//! spool resumes where it was (a segment streamed again holds the same bytes). An
//! empty one is seeded with an empty `.partial` file of the segment where the
//! archive ends (or, for an empty archive, where the slot's WAL starts): streaming
//! starts there, and the bytes already archived are streamed again and pushed as
//! no-ops. Nothing is lost, nothing is stored twice.
//!
//! Only flush positions reported by the walsender of the pg_receivewal this archiver
//! started are trusted: before starting one, the archiver waits until the slot is
//! free (ending a walsender left by an earlier run of *this* archiver, recognised by
//! its application_name, which names the host and spool), so any walsender on the
//! slot afterwards is ours. A position reported by an older one could be ahead of
//! what a seeded (empty) file holds.
//!
//! A pg_receivewal that exits is started again with backoff (1 s doubling to 30 s);
//! a cancellation stops it with SIGINT, pushes what it flushed, and returns. The
//! password goes by `PGPASSWORD`, never the command line.
//!
//! Also here: [`check_server`] (what archiving needs of the server, each problem
//! named with its fix), [`wal_push`] and [`wal_fetch`] (for `archive_command` and
//! `restore_command`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::process::Command;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::pg_changes::ChangeCapture;
use super::supervise::{ClientStderr, Ended, supervise, supervised_status};
use super::wal::{self, Segment};
use super::{
    Archive, ArchiveError, ChunkContent, ChunkKind, ChunkRecord, Lsn, NewChunk, Position,
    PushOutcome,
};
use crate::adapters::PostgresConfig;
use crate::adapters::postgres::conninfo::ConnString;
use crate::adapters::process;
use crate::pipeline::Decryption;

/// How long a pg_receivewal that was asked to stop (SIGINT) gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the archiver waits for a slot another process holds before giving up on
/// this attempt (a later attempt tries again).
const SLOT_BUSY_LIMIT: Duration = Duration::from_secs(30);
/// After this long, a walsender of an earlier run of this archiver still on the slot
/// is ended (its pg_receivewal outlived the archiver that started it).
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// How many pieces of a growing segment are pushed before one chunk of its whole
/// beginning replaces them (see [`PgArchiver::sweep`]).
const MAX_PIECES: usize = 30;

/// What the archiver of one database needs.
#[derive(Debug, Clone)]
pub struct ArchiverConfig {
    pub database: String,
    pub postgres: PostgresConfig,
    /// pg_receivewal's directory, of this archiver alone (it is locked).
    pub spool_dir: PathBuf,
    /// How often the growing segment is pushed.
    pub partial_interval: Duration,
    /// The physical replication slot.
    pub slot: String,
}

impl ArchiverConfig {
    /// The defaults: slot [`slot_name`], spool `<spool_root>/<database>`.
    pub fn new(
        database: &str,
        postgres: PostgresConfig,
        spool_root: &Path,
        partial_interval: Duration,
    ) -> ArchiverConfig {
        ArchiverConfig {
            database: database.to_owned(),
            postgres,
            spool_dir: spool_root.join(database),
            partial_interval,
            slot: slot_name(database),
        }
    }
}

/// `stillpoint_<database>`, lowercased, with anything a slot name may not hold
/// (only `a-z`, `0-9`, `_`) replaced by `_`, at most 63 bytes.
pub fn slot_name(database: &str) -> String {
    let mut name: String = format!("stillpoint_{database}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

/// What an archiver has done, for progress output and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ArchiverStatus {
    /// The archive holds the log without a gap up to here (the end of its last
    /// stretch without a gap).
    pub archived_to: Option<Lsn>,
    /// The server's WAL position at the archiver's last look.
    pub server_lsn: Option<Lsn>,
    /// The last chunk stored, and how many this archiver stored.
    pub last_chunk: Option<String>,
    pub chunks_stored: u64,
    /// Whether a pg_receivewal is streaming now.
    pub streaming: bool,
    /// How often pg_receivewal was started again after it stopped.
    pub restarts: u32,
    pub last_error: Option<String>,
}

impl ArchiverStatus {
    /// How many bytes of WAL the server has that the archive has not.
    pub fn lag_bytes(&self) -> Option<u64> {
        Some(self.server_lsn?.0.saturating_sub(self.archived_to?.0))
    }
}

supervised_status!(ArchiverStatus);

/// The archiver of one PostgreSQL database.
#[derive(Debug)]
pub struct PgArchiver {
    config: ArchiverConfig,
    archive: Archive,
    status: watch::Sender<ArchiverStatus>,
    /// The change stream recorded beside the WAL (`changes = true`).
    /// (Boxed: most archivers have none.)
    changes: Option<Box<ChangeCapture>>,
}

impl PgArchiver {
    pub fn new(config: ArchiverConfig, archive: Archive) -> PgArchiver {
        PgArchiver {
            config,
            archive,
            status: watch::Sender::new(ArchiverStatus::default()),
            changes: None,
        }
    }

    /// Records `capture`'s change stream while the WAL is archived.
    pub fn with_changes(mut self, capture: ChangeCapture) -> PgArchiver {
        self.changes = Some(Box::new(capture));
        self
    }

    /// The change stream's capture, when there is one.
    pub fn changes(&self) -> Option<&ChangeCapture> {
        self.changes.as_deref()
    }

    pub fn status(&self) -> watch::Receiver<ArchiverStatus> {
        self.status.subscribe()
    }

    pub fn config(&self) -> &ArchiverConfig {
        &self.config
    }

    fn server_error(&self, message: String) -> ArchiveError {
        ArchiveError::Server {
            database: self.config.database.clone(),
            message,
        }
    }

    /// Archives until `cancel` fires, then pushes what pg_receivewal flushed and
    /// returns. Fails only for what retrying cannot fix: the server's settings, the
    /// spool in use by another archiver, a chunk that conflicts with the archive.
    pub async fn run(&self, cancel: &CancellationToken) -> Result<(), ArchiveError> {
        let _spool = SpoolLock::take(&self.config.spool_dir)
            .map_err(|message| self.server_error(message))?;
        let Some(capture) = &self.changes else {
            return supervise(&self.config.database, &self.status, cancel, || {
                self.session(cancel)
            })
            .await;
        };
        // Both until `cancel`; what stops one for good stops the other.
        let stop = cancel.child_token();
        let wal = async {
            let result = supervise(&self.config.database, &self.status, &stop, || {
                self.session(&stop)
            })
            .await;
            stop.cancel();
            result
        };
        let changes = async {
            let result = capture.run(&stop).await;
            stop.cancel();
            result
        };
        let (wal, changes) = tokio::join!(wal, changes);
        wal.and(changes)
    }

    /// One connection and one pg_receivewal, until it exits or `cancel` fires.
    async fn session(&self, cancel: &CancellationToken) -> Result<Ended, ArchiveError> {
        let (client, source, _driver) = connect(&self.config.postgres.url, |message| {
            self.server_error(message)
        })
        .await?;
        let facts =
            check_connected(&client, &source)
                .await
                .map_err(|message| ArchiveError::Settings {
                    database: self.config.database.clone(),
                    message,
                })?;
        let slot = ensure_slot(&client, &self.config.slot)
            .await
            .map_err(|message| self.server_error(message))?;

        let catalog = self.archive.catalog().await?;
        // Partial chunks left superseded by a run stopped between its two steps.
        for stale in &catalog.superseded {
            self.archive.remove(stale).await?;
        }
        let mut state = SessionState {
            facts,
            archived_to: catalog.end().and_then(|end| end.lsn()),
            partials: BTreeMap::new(),
            flush: None,
        };
        for chunk in &catalog.chunks {
            if chunk.kind == ChunkKind::PgWalPartial
                && let Some((segment, _, _)) = wal::parse_partial_chunk_name(&chunk.name)
            {
                state
                    .partials
                    .entry(segment.to_owned())
                    .or_default()
                    .push(chunk.clone());
            }
        }
        self.publish(&state, None);
        // Whole segments a previous run left in the spool go first.
        self.sweep(&mut state).await?;
        let timeline = catalog
            .chunks
            .last()
            .and_then(|chunk| chunk.timeline)
            .unwrap_or(state.facts.timeline);
        let start = state
            .archived_to
            .or(slot.restart_lsn)
            .unwrap_or(slot.current);
        self.seed_spool(timeline, start, state.facts.segment_size)
            .map_err(|message| self.server_error(message))?;

        let app_name = application_name(&self.config.spool_dir);
        if let Some(ended) = self.wait_for_free_slot(&client, &app_name, cancel).await? {
            return Ok(ended);
        }
        let mut command = Command::new(tool(&self.config.postgres, "pg_receivewal"));
        source.libpq_args(&mut command);
        command
            .arg("--directory")
            .arg(&self.config.spool_dir)
            .arg("--slot")
            .arg(&self.config.slot)
            .args([
                "--no-loop",
                "--synchronous",
                "--no-password",
                "--status-interval=1",
            ])
            .env("PGAPPNAME", &app_name)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|error| ArchiveError::Settings {
            database: self.config.database.clone(),
            message: format!(
                "cannot run {}: {error}; set bin_dir to the server's PostgreSQL bin directory",
                tool(&self.config.postgres, "pg_receivewal").display()
            ),
        })?;
        let mut stderr = ClientStderr::new("pg_receivewal", &self.config.database, &mut child);
        let mut walsender: Option<i32> = None;
        self.status.send_modify(|status| status.streaming = true);
        let mut ticks = tokio::time::interval(self.config.partial_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let ended = loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    if let Some(pid) = child.id() {
                        process::send_signal(pid, "INT").await;
                    }
                    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                    break Ended::Cancelled;
                }
                status = child.wait() => break Ended::Exited(stderr.exit_reason(status).await),
                () = stderr.next_line() => {}
                _ = ticks.tick() => {
                    if walsender.is_none() {
                        walsender = active_pid(&client, &self.config.slot)
                            .await
                            .map_err(|message| self.server_error(message))?;
                    }
                    let (flush, current) = positions(&client, walsender)
                        .await
                        .map_err(|message| self.server_error(message))?;
                    if let Some(flush) = flush {
                        state.flush = state.flush.max(Some(flush));
                    }
                    self.sweep(&mut state).await?;
                    self.publish(&state, current);
                }
            }
        };
        // The last flush our pg_receivewal reported is in the slot once it is gone
        // (a physical slot's restart_lsn is the flush position its receiver reports,
        // overwritten by each report): only if it reported at all.
        if state.flush.is_some()
            && let Ok(slot) = slot_state(&client, &self.config.slot).await
            && slot.active_pid.is_none()
        {
            state.flush = state.flush.max(slot.restart_lsn);
        }
        self.sweep(&mut state).await?;
        let current = positions(&client, None).await.ok().and_then(|(_, c)| c);
        self.publish(&state, current);
        Ok(ended)
    }

    fn publish(&self, state: &SessionState, server_lsn: Option<Lsn>) {
        self.status.send_modify(|status| {
            status.archived_to = state.archived_to;
            if server_lsn.is_some() {
                status.server_lsn = server_lsn;
            }
        });
    }

    /// Pushes what the spool holds: whole segments and history files (then removed
    /// from the spool), and the partial segment up to the flush position.
    async fn sweep(&self, state: &mut SessionState) -> Result<(), ArchiveError> {
        let segment_size = state.facts.segment_size;
        let files = spool_files(&self.config.spool_dir).map_err(|source| ArchiveError::Io {
            database: self.config.database.clone(),
            path: self.config.spool_dir.display().to_string(),
            source,
        })?;
        for name in &files {
            let path = self.config.spool_dir.join(name);
            if let Some(segment) = Segment::parse(name, segment_size) {
                let chunk = segment_chunk(name, segment, segment_size);
                let outcome = self
                    .archive
                    .push(chunk, ChunkContent::File(path.clone()))
                    .await?;
                self.stored(state, &outcome);
                for partial in state.partials.remove(name.as_str()).unwrap_or_default() {
                    self.archive.remove(&partial).await?;
                }
                remove_file(&path).map_err(|source| ArchiveError::Io {
                    database: self.config.database.clone(),
                    path: path.display().to_string(),
                    source,
                })?;
            } else if name.ends_with(".history") {
                let outcome = self
                    .archive
                    .push(other_chunk(name), ChunkContent::File(path.clone()))
                    .await?;
                self.stored(state, &outcome);
                let _ = remove_file(&path);
            }
        }
        let Some(flush) = state.flush else {
            return Ok(());
        };
        for name in &files {
            let Some(segment_name) = name.strip_suffix(".partial") else {
                continue;
            };
            let Some(segment) = Segment::parse(segment_name, segment_size) else {
                continue;
            };
            let start = segment.start(segment_size);
            let end = flush.min(segment.end(segment_size));
            if end <= start || state.archived_to.is_some_and(|to| end <= to) {
                continue;
            }
            let kept = state.partials.entry(segment_name.to_owned()).or_default();
            // A piece continues the archive where it ends inside this segment, so a
            // push costs what was written since the last one. After MAX_PIECES pieces,
            // one chunk of the segment's whole beginning replaces them: a segment that
            // fills slowly keeps the catalog short.
            let from = match state.archived_to {
                Some(to) if to > start && kept.len() < MAX_PIECES => to,
                _ => start,
            };
            let path = self.config.spool_dir.join(name);
            let bytes = match read_range(&path, from.0 - start.0, end.0 - start.0).await {
                Ok(bytes) => bytes,
                // pg_receivewal finished the segment and renamed it since the listing:
                // the next sweep stores it whole. (Failing the session here would stop
                // pg_receivewal, perhaps while it zero-fills its next file.)
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ArchiveError::Io {
                        database: self.config.database.clone(),
                        path: path.display().to_string(),
                        source,
                    });
                }
            };
            let chunk = NewChunk {
                name: wal::partial_chunk_name(segment_name, from.0 - start.0, end.0 - start.0),
                kind: ChunkKind::PgWalPartial,
                timeline: Some(segment.timeline),
                start: Some(Position::Lsn(from)),
                end: Some(Position::Lsn(end)),
                segment_size: Some(segment_size),
                details: BTreeMap::new(),
            };
            let outcome = self
                .archive
                .push(chunk, ChunkContent::Bytes(Bytes::from(bytes)))
                .await?;
            self.stored(state, &outcome);
            // The pieces this chunk holds all of are superseded now.
            let record = outcome.record();
            let kept = state.partials.entry(segment_name.to_owned()).or_default();
            let (older, others): (Vec<ChunkRecord>, Vec<ChunkRecord>) = kept
                .drain(..)
                .partition(|old| old.name != record.name && holds(record, old));
            *kept = others;
            if !kept.iter().any(|r| r.name == record.name) {
                kept.push(record.clone());
            }
            for old in older {
                self.archive.remove(&old).await?;
            }
        }
        Ok(())
    }

    fn stored(&self, state: &mut SessionState, outcome: &PushOutcome) {
        let record = outcome.record();
        if let Some((Position::Lsn(start), Position::Lsn(end))) = record.range() {
            // Only a chunk that continues the archive moves its end.
            if state.archived_to.is_none_or(|to| *start <= to) {
                state.archived_to = state.archived_to.max(Some(*end));
            }
        }
        if let PushOutcome::Stored(record) = outcome {
            tracing::info!(database = %self.config.database, chunk = %record.name, "archived");
            self.status.send_modify(|status| {
                status.last_chunk = Some(record.name.clone());
                status.chunks_stored += 1;
                status.archived_to = state.archived_to;
            });
        } else {
            self.status
                .send_modify(|status| status.archived_to = state.archived_to);
        }
    }

    /// An empty spool gets an empty `.partial` of the segment holding `start`, where
    /// pg_receivewal then starts streaming (see the module header).
    fn seed_spool(&self, timeline: u32, start: Lsn, segment_size: u64) -> Result<(), String> {
        let dir = &self.config.spool_dir;
        let files = spool_files(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for name in &files {
            if name
                .strip_suffix(".partial")
                .is_some_and(wal::is_segment_name)
            {
                reset_unfinished_zero_fill(&dir.join(name), segment_size)?;
            }
        }
        let has_wal = files.iter().any(|name| {
            wal::is_segment_name(name)
                || name
                    .strip_suffix(".partial")
                    .is_some_and(wal::is_segment_name)
        });
        if has_wal {
            return Ok(());
        }
        let segment = Segment::containing(timeline, start, segment_size);
        let path = dir.join(format!("{}.partial", segment.name(segment_size)));
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        // pg_receivewal takes a .partial of exactly one segment's size and writes into
        // it from its start.
        file.set_len(segment_size)
            .map_err(|e| format!("sizing {}: {e}", path.display()))?;
        Ok(())
    }

    /// Waits until nothing holds the slot. A walsender of an earlier run of this
    /// archiver (same host and spool: its pg_receivewal outlived us) is ended.
    async fn wait_for_free_slot(
        &self,
        client: &Client,
        app_name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Ended>, ArchiveError> {
        let began = Instant::now();
        loop {
            let row = client
                .query_one(
                    "SELECT s.active_pid, a.application_name FROM pg_replication_slots s \
                     LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
                     WHERE s.slot_name = $1",
                    &[&self.config.slot],
                )
                .await
                .map_err(|e| self.server_error(format!("reading the slot: {e}")))?;
            let pid: Option<i32> = row.get(0);
            let holder: Option<String> = row.get(1);
            let Some(pid) = pid else {
                return Ok(None);
            };
            if holder.as_deref() == Some(app_name) && began.elapsed() >= ORPHAN_GRACE {
                tracing::warn!(
                    database = %self.config.database,
                    "ending walsender {pid}: a pg_receivewal of an earlier run of this archiver \
                     still holds slot {}",
                    self.config.slot
                );
                let _ = client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await;
            } else if began.elapsed() >= SLOT_BUSY_LIMIT {
                return Err(self.server_error(format!(
                    "replication slot {} is in use by process {pid} ({}): another archiver of \
                     this database may be running; stop it, or give this one another slot",
                    self.config.slot,
                    holder.as_deref().unwrap_or("unknown application")
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = cancel.cancelled() => return Ok(Some(Ended::Cancelled)),
            }
        }
    }
}

struct SessionState {
    facts: ServerFacts,
    archived_to: Option<Lsn>,
    /// Partial chunks in the archive per segment, removed once superseded.
    partials: BTreeMap<String, Vec<ChunkRecord>>,
    /// The furthest flush position our pg_receivewal reported.
    flush: Option<Lsn>,
}

/// A client of the server `url` names (its connection driven until the handle is
/// dropped), for an archiver's session; `error` makes its errors.
pub(super) async fn connect(
    url: &str,
    error: impl Fn(String) -> ArchiveError,
) -> Result<
    (
        Client,
        ConnString,
        AbortOnDropHandle<Result<(), tokio_postgres::Error>>,
    ),
    ArchiveError,
> {
    let source = ConnString::parse(url)
        .map_err(|message| error(format!("the database's URL: {message}")))?;
    let (client, connection) = source.connect().await.map_err(&error)?;
    Ok((
        client,
        source,
        AbortOnDropHandle::new(tokio::spawn(connection)),
    ))
}

/// What the archiver learned about the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerFacts {
    pub segment_size: u64,
    pub timeline: u32,
}

/// The settings streaming archiving needs, as read from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSettings {
    pub wal_level: String,
    pub max_wal_senders: i64,
    pub max_replication_slots: i64,
    pub role: String,
    pub can_replicate: bool,
    pub in_recovery: bool,
}

impl ArchiveSettings {
    /// Every setting that keeps WAL from being streamed, each with its fix; empty
    /// when archiving can run.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.in_recovery {
            problems
                .push("the server is a standby (in recovery); archive from the primary".to_owned());
        }
        if !matches!(self.wal_level.as_str(), "replica" | "logical") {
            problems.push(format!(
                "wal_level is {}; set wal_level = replica in postgresql.conf and restart the \
                 server",
                self.wal_level
            ));
        }
        if self.max_wal_senders < 1 {
            problems.push(format!(
                "max_wal_senders is {}; set max_wal_senders = 10 (each archiver uses one) in \
                 postgresql.conf and restart the server",
                self.max_wal_senders
            ));
        }
        if self.max_replication_slots < 1 {
            problems.push(format!(
                "max_replication_slots is {}; set max_replication_slots = 10 (each archiver \
                 uses one) in postgresql.conf and restart the server",
                self.max_replication_slots
            ));
        }
        if !self.can_replicate {
            problems.push(format!(
                "role {role} has neither REPLICATION nor SUPERUSER; run ALTER ROLE {role} \
                 REPLICATION, and allow it a `replication` line in pg_hba.conf",
                role = self.role
            ));
        }
        problems
    }
}

/// Reads the settings archiving needs from the server `config.url` names.
pub async fn archive_settings(config: &PostgresConfig) -> Result<ArchiveSettings, String> {
    let source = ConnString::parse(&config.url)?;
    let (client, connection) = source.connect().await?;
    let _driver = AbortOnDropHandle::new(tokio::spawn(connection));
    read_settings(&client, &source).await
}

async fn read_settings(client: &Client, source: &ConnString) -> Result<ArchiveSettings, String> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('max_wal_senders')::bigint, \
                    current_setting('max_replication_slots')::bigint, current_user::text, \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(|e| {
            format!(
                "reading the WAL settings of {}: {}",
                source.shown(),
                crate::adapters::postgres::error_text(&e)
            )
        })?;
    Ok(ArchiveSettings {
        wal_level: row.get(0),
        max_wal_senders: row.get(1),
        max_replication_slots: row.get(2),
        role: row.get(3),
        can_replicate: row.get::<_, Option<bool>>(4).unwrap_or(false),
        in_recovery: row.get(5),
    })
}

/// Checks that the server `config.url` names can be archived; the error names every
/// setting to change and how.
pub async fn check_server(config: &PostgresConfig) -> Result<(), String> {
    let source = ConnString::parse(&config.url)?;
    let problems = archive_settings(config).await?.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} cannot stream its WAL to the archive: {}",
            source.shown(),
            problems.join("; ")
        ))
    }
}

async fn check_connected(client: &Client, source: &ConnString) -> Result<ServerFacts, String> {
    let problems = read_settings(client, source).await?.problems();
    if !problems.is_empty() {
        return Err(format!(
            "{} cannot stream its WAL to the archive: {}",
            source.shown(),
            problems.join("; ")
        ));
    }
    let row = client
        .query_one(
            "SELECT (SELECT bytes_per_wal_segment::bigint FROM pg_control_init()), \
                    pg_walfile_name(pg_current_wal_lsn())",
            &[],
        )
        .await
        .map_err(|e| format!("reading the WAL segment size: {e}"))?;
    let segment_size: i64 = row.get(0);
    let walfile: String = row.get(1);
    let segment_size = segment_size as u64;
    if !wal::valid_segment_size(segment_size) {
        return Err(format!(
            "the server reports a WAL segment size of {segment_size}"
        ));
    }
    let timeline = u32::from_str_radix(&walfile[..8.min(walfile.len())], 16)
        .map_err(|_| format!("the server names its WAL file {walfile:?}"))?;
    Ok(ServerFacts {
        segment_size,
        timeline,
    })
}

struct SlotState {
    restart_lsn: Option<Lsn>,
    active_pid: Option<i32>,
    /// The server's WAL position now, where a new slot's WAL starts.
    current: Lsn,
}

async fn slot_state(client: &Client, slot: &str) -> Result<SlotState, String> {
    let row = client
        .query_one(
            "SELECT (SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1), \
                    (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1), \
                    pg_current_wal_lsn()::text",
            &[&slot],
        )
        .await
        .map_err(|e| format!("reading slot {slot}: {e}"))?;
    Ok(SlotState {
        restart_lsn: row.get::<_, Option<String>>(0).and_then(|t| t.parse().ok()),
        active_pid: row.get(1),
        current: row
            .get::<_, String>(2)
            .parse()
            .map_err(|e| format!("the server's WAL position: {e}"))?,
    })
}

/// The slot, created (reserving WAL from now) if missing.
async fn ensure_slot(client: &Client, slot: &str) -> Result<SlotState, String> {
    let kind: Option<String> = client
        .query_opt(
            "SELECT slot_type FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("reading slot {slot}: {e}"))?
        .map(|row| row.get(0));
    match kind.as_deref() {
        Some("physical") => {}
        Some(other) => {
            return Err(format!(
                "replication slot {slot} exists but is {other}, not physical; drop it or give \
                 the archiver another slot"
            ));
        }
        None => {
            client
                .execute(
                    "SELECT pg_create_physical_replication_slot($1, true)",
                    &[&slot],
                )
                .await
                .map_err(|e| {
                    format!(
                        "creating replication slot {slot}: {}",
                        crate::adapters::postgres::error_text(&e)
                    )
                })?;
            tracing::info!("created physical replication slot {slot}");
        }
    }
    slot_state(client, slot).await
}

async fn active_pid(client: &Client, slot: &str) -> Result<Option<i32>, String> {
    Ok(slot_state(client, slot).await?.active_pid)
}

/// Our walsender's flush position (when it has reported one) and the server's WAL
/// position.
async fn positions(
    client: &Client,
    walsender: Option<i32>,
) -> Result<(Option<Lsn>, Option<Lsn>), String> {
    let row = client
        .query_one(
            "SELECT (SELECT flush_lsn::text FROM pg_stat_replication WHERE pid = $1), \
                    pg_current_wal_lsn()::text",
            &[&walsender],
        )
        .await
        .map_err(|e| format!("reading the WAL positions: {e}"))?;
    let parse = |text: Option<String>| text.and_then(|t| t.parse::<Lsn>().ok());
    Ok((parse(row.get(0)), parse(row.get(1))))
}

/// `stillpoint-archive <hash>` of this host and spool: recognises a pg_receivewal a
/// previous run of the same archiver left behind.
fn application_name(spool: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let spool = std::path::absolute(spool).unwrap_or_else(|_| spool.to_owned());
    let hash = blake3::hash(format!("{}\n{}", host.trim(), spool.display()).as_bytes());
    format!("stillpoint-archive {}", &hash.to_hex()[..16])
}

fn tool(config: &PostgresConfig, name: &str) -> PathBuf {
    match &config.bin_dir {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

/// The spool directory, created if missing and held with an exclusive lock.
pub(super) struct SpoolLock {
    _file: std::fs::File,
}

impl SpoolLock {
    pub(super) fn take(dir: &Path) -> Result<SpoolLock, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating the spool directory {}: {e}", dir.display()))?;
        let path = dir.join(".stillpoint-archiver.lock");
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(SpoolLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(format!(
                "the spool directory {} is in use by another archiver; each archiver needs \
                 its own",
                dir.display()
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(format!("locking {}: {e}", path.display())),
        }
    }
}

/// File names in the spool, sorted (so segments go in log order).
fn spool_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// pg_receivewal makes a new `.partial` by writing zeros up to the segment size and
/// only then writes WAL into it; stopped in between, it leaves a file of another size,
/// which every later run refuses ("has N bytes, should be 0 or 16777216"). Such a file
/// holds nothing but zeros, so it is emptied, which pg_receivewal accepts and fills
/// again. A file of another size that holds anything else is not ours to touch.
fn reset_unfinished_zero_fill(path: &Path, segment_size: u64) -> Result<(), String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .len();
    if size == 0 || size == segment_size {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if bytes.iter().any(|&byte| byte != 0) {
        return Err(format!(
            "{} has {size} bytes, not 0 or a segment ({segment_size}), and holds WAL: \
             pg_receivewal cannot resume from it; move it aside",
            path.display()
        ));
    }
    tracing::warn!(
        path = %path.display(),
        size,
        "emptying a WAL file pg_receivewal was stopped while zero-filling"
    );
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|file| file.set_len(0))
        .map_err(|e| format!("emptying {}: {e}", path.display()))
}

/// The bytes `[from, to)` of the file at `path`.
async fn read_range(path: &Path, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(from)).await?;
    let mut bytes = vec![0u8; (to - from) as usize];
    file.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// Whether chunk `outer` holds every position chunk `inner` holds.
pub fn holds(outer: &ChunkRecord, inner: &ChunkRecord) -> bool {
    match (outer.range(), inner.range()) {
        (Some((outer_start, outer_end)), Some((inner_start, inner_end))) => {
            outer_start <= inner_start && inner_end <= outer_end
        }
        _ => false,
    }
}

fn segment_chunk(name: &str, segment: Segment, segment_size: u64) -> NewChunk {
    NewChunk {
        name: name.to_owned(),
        kind: ChunkKind::PgWalSegment,
        timeline: Some(segment.timeline),
        start: Some(Position::Lsn(segment.start(segment_size))),
        end: Some(Position::Lsn(segment.end(segment_size))),
        segment_size: Some(segment_size),
        details: BTreeMap::new(),
    }
}

fn other_chunk(name: &str) -> NewChunk {
    NewChunk {
        name: name.to_owned(),
        kind: ChunkKind::PgOther,
        timeline: None,
        start: None,
        end: None,
        segment_size: None,
        details: BTreeMap::new(),
    }
}

/// `archive_command`: stores the file PostgreSQL hands over (`%p`) as a chunk named
/// after it. A WAL segment must be whole (its size is the segment size); timeline
/// history, backup history and `.partial` files are kept as they are.
pub async fn wal_push(archive: &Archive, path: &Path) -> Result<PushOutcome, ArchiveError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ArchiveError::InvalidName(format!("{} has no file name", path.display())))?;
    let io = |source| ArchiveError::Io {
        database: archive.database().to_owned(),
        path: path.display().to_string(),
        source,
    };
    let size = tokio::fs::metadata(path).await.map_err(io)?.len();
    let chunk = if wal::is_segment_name(name) {
        let segment = Segment::parse(name, size)
            .filter(|_| wal::valid_segment_size(size))
            .ok_or_else(|| {
                ArchiveError::InvalidName(format!(
                    "{} is named like a WAL segment but holds {size} bytes, which is not a \
                     WAL segment size (a power of two from 1 MiB to 1 GiB): a segment is only \
                     archived whole",
                    path.display()
                ))
            })?;
        segment_chunk(name, segment, size)
    } else if name.ends_with(".history") || name.ends_with(".backup") || name.ends_with(".partial")
    {
        other_chunk(name)
    } else {
        return Err(ArchiveError::InvalidName(format!(
            "{} is not a file PostgreSQL archives (a WAL segment, .history, .backup or \
             .partial file)",
            path.display()
        )));
    };
    archive
        .push(chunk, ChunkContent::File(path.to_owned()))
        .await
}

/// What [`wal_fetch`] served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The chunk of that name.
    Whole(Box<ChunkRecord>),
    /// Only the beginning of the segment is archived: its partial chunks, in order
    /// and without a gap, padded with zeros to the segment size (what replay reads
    /// as the end of WAL).
    Partial(Vec<ChunkRecord>),
}

/// How often [`wal_fetch`] lists a growing segment's pieces again when one it chose
/// was removed before it was read (a running archiver replaced it with a chunk that
/// holds it).
const FETCH_ATTEMPTS: usize = 3;

/// `restore_command`: writes the file PostgreSQL asks for (`%f`) to `dest` (`%p`). A
/// segment only archived partially is served from its partial chunks, padded to the
/// segment size. [`ArchiveError::NotFound`] when the archive has neither.
pub async fn wal_fetch(
    archive: &Archive,
    decryption: &Decryption,
    name: &str,
    dest: &Path,
) -> Result<Fetched, ArchiveError> {
    let not_found = || ArchiveError::NotFound {
        database: archive.database().to_owned(),
        name: name.to_owned(),
    };
    let (bytes, fetched) = match archive.record(name).await? {
        Some(record) => (
            archive.read(&record, decryption).await?,
            Fetched::Whole(Box::new(record)),
        ),
        None if wal::is_segment_name(name) => {
            let mut attempt = 1;
            loop {
                let pieces = partial_pieces(archive, name).await?;
                if pieces.is_empty() {
                    return Err(not_found());
                }
                match assemble_segment(archive, decryption, &pieces).await {
                    Ok(bytes) => break (bytes, Fetched::Partial(pieces)),
                    Err(error) if error.is_not_found() && attempt < FETCH_ATTEMPTS => {
                        attempt += 1;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        None => return Err(not_found()),
    };
    // Written beside the destination and renamed over it: PostgreSQL never reads a
    // half-written file.
    let io = |source| ArchiveError::Io {
        database: archive.database().to_owned(),
        path: dest.display().to_string(),
        source,
    };
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dest.with_file_name(format!(".{file_name}.stillpoint-fetch"));
    tokio::fs::write(&temporary, &bytes).await.map_err(io)?;
    tokio::fs::rename(&temporary, dest).await.map_err(io)?;
    Ok(fetched)
}

/// A segment from chunks of it that follow one another from its start: each one's
/// bytes at its offset, zeros after the last.
async fn assemble_segment(
    archive: &Archive,
    decryption: &Decryption,
    pieces: &[ChunkRecord],
) -> Result<Vec<u8>, ArchiveError> {
    let mut segment = Vec::new();
    for piece in pieces {
        let bytes = archive.read(piece, decryption).await?;
        let offset = piece_offset(piece).ok_or_else(|| {
            ArchiveError::InvalidName(format!(
                "{} is not a partial chunk with a WAL range",
                piece.name
            ))
        })?;
        let end = offset + bytes.len();
        if segment.len() < end {
            segment.resize(end, 0);
        }
        segment[offset..end].copy_from_slice(&bytes);
        if let Some(size) = piece.segment_size {
            segment.resize(segment.len().max(size as usize), 0);
        }
    }
    Ok(segment)
}

/// Where a chunk's bytes start within its segment.
fn piece_offset(chunk: &ChunkRecord) -> Option<usize> {
    let start = chunk.start.as_ref()?.lsn()?;
    let size = chunk.segment_size?;
    Some((start.0 % size) as usize)
}

/// The partial chunks of `segment` that hold its beginning without a gap, in order;
/// a piece another one holds all of is left out. Empty when none starts the segment.
async fn partial_pieces(
    archive: &Archive,
    segment: &str,
) -> Result<Vec<ChunkRecord>, ArchiveError> {
    let mut ranges = partial_names(archive, segment).await?;
    // By start, the longest first: each piece must start where the ones before it
    // reach, or the chain ends there.
    ranges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut chain = Vec::new();
    let mut reach = 0;
    for (from, to, name) in ranges {
        if from > reach {
            break;
        }
        if to <= reach {
            continue;
        }
        let Some(record) = archive.record(&name).await? else {
            break;
        };
        chain.push(record);
        reach = to;
    }
    Ok(chain)
}

/// Every partial chunk of `segment` in the archive's listing: `(from, to, name)`.
async fn partial_names(
    archive: &Archive,
    segment: &str,
) -> Result<Vec<(u64, u64, String)>, ArchiveError> {
    let listing = archive.storage().list(&archive.prefix()).await?;
    Ok(listing
        .iter()
        .filter_map(|entry| entry.path.rsplit('/').next())
        .filter_map(|file| file.strip_suffix(super::RECORD_SUFFIX))
        .filter_map(|name| {
            let (of, from, to) = wal::parse_partial_chunk_name(name)?;
            (of == segment).then(|| (from, to, name.to_owned()))
        })
        .collect())
}

/// The chunk that now holds everything the partial chunk `chunk` held, after a
/// running archiver replaced it (and removed it): the whole segment, or a partial
/// chunk of the segment's beginning that reaches as far.
pub async fn superseding(archive: &Archive, chunk: &ChunkRecord) -> Option<ChunkRecord> {
    if chunk.kind != ChunkKind::PgWalPartial {
        return None;
    }
    let (segment, from, to) = wal::parse_partial_chunk_name(&chunk.name)?;
    if let Ok(Some(whole)) = archive.record(segment).await {
        return Some(whole);
    }
    let (_, name) = partial_names(archive, segment)
        .await
        .ok()?
        .into_iter()
        .filter(|(other_from, other_to, _)| *other_from <= from && to <= *other_to)
        .map(|(other_from, other_to, name)| (other_to - other_from, name))
        .max()?;
    archive.record(&name).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pg_receivewal stopped while zero-filling its next file left a file no later
    /// run accepts; the archiver restarted it forever (the points tests' stalls).
    #[test]
    fn an_unfinished_zero_fill_is_emptied_and_a_file_holding_wal_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let segment = 16 * 1024 * 1024;
        let zeros = dir.path().join("000000010000000000000003.partial");
        std::fs::write(&zeros, vec![0u8; 10_264_576]).unwrap();
        reset_unfinished_zero_fill(&zeros, segment).unwrap();
        assert_eq!(std::fs::metadata(&zeros).unwrap().len(), 0);

        let whole = dir.path().join("000000010000000000000004.partial");
        std::fs::File::create(&whole)
            .unwrap()
            .set_len(segment)
            .unwrap();
        reset_unfinished_zero_fill(&whole, segment).unwrap();
        assert_eq!(std::fs::metadata(&whole).unwrap().len(), segment);

        let wal = dir.path().join("000000010000000000000005.partial");
        let mut bytes = vec![0u8; 4096];
        bytes[100] = 0xd1;
        std::fs::write(&wal, &bytes).unwrap();
        let refused = reset_unfinished_zero_fill(&wal, segment).unwrap_err();
        assert!(refused.contains("holds WAL"), "{refused}");
        assert_eq!(std::fs::read(&wal).unwrap(), bytes);
    }

    fn ready() -> ArchiveSettings {
        ArchiveSettings {
            wal_level: "replica".to_owned(),
            max_wal_senders: 10,
            max_replication_slots: 10,
            role: "stillpoint".to_owned(),
            can_replicate: true,
            in_recovery: false,
        }
    }

    /// Each missing setting is named with what to set, one problem per setting.
    #[test]
    fn each_setting_archiving_needs_is_named_with_its_fix() {
        assert!(ready().problems().is_empty());
        let logical = ArchiveSettings {
            wal_level: "logical".to_owned(),
            ..ready()
        };
        assert!(logical.problems().is_empty());
        let cases: [(ArchiveSettings, &str); 5] = [
            (
                ArchiveSettings {
                    wal_level: "minimal".to_owned(),
                    ..ready()
                },
                "wal_level is minimal; set wal_level = replica",
            ),
            (
                ArchiveSettings {
                    max_wal_senders: 0,
                    ..ready()
                },
                "max_wal_senders is 0; set max_wal_senders = 10",
            ),
            (
                ArchiveSettings {
                    max_replication_slots: 0,
                    ..ready()
                },
                "max_replication_slots is 0; set max_replication_slots = 10",
            ),
            (
                ArchiveSettings {
                    can_replicate: false,
                    ..ready()
                },
                "run ALTER ROLE stillpoint REPLICATION",
            ),
            (
                ArchiveSettings {
                    in_recovery: true,
                    ..ready()
                },
                "archive from the primary",
            ),
        ];
        for (settings, expected) in cases {
            let problems = settings.problems();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(expected), "{problems:?}");
        }
    }

    #[test]
    fn slot_names_are_what_postgres_accepts() {
        assert_eq!(slot_name("ledger"), "stillpoint_ledger");
        assert_eq!(slot_name("Ledger-DB.1"), "stillpoint_ledger_db_1");
        assert_eq!(slot_name(&"x".repeat(80)).len(), 63);
    }
}
