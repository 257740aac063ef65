//! The SQLite archiver: a WAL-mode database's committed frames pushed to its archive as
//! they appear, and snapshots of the whole file as base backups. The approach is
//! Litestream's (<https://litestream.io/how-it-works/>), kept to what a point needs.
//!
//! - **A read transaction held open** (`reader`). While a connection reads, SQLite
//!   neither restarts the log nor (for a reader that sees no log frames) copies frames
//!   into the database, so no frame can be overwritten before it is read here. Other
//!   connections' checkpoints stop short of it; a `TRUNCATE` or `RESTART` checkpoint
//!   asked for by the application waits and returns busy.
//! - **Checkpoints made here.** Once the log's cycle holds `checkpoint_frames`, the
//!   archiver takes the write lock (`writer`: `BEGIN IMMEDIATE`, so nothing commits),
//!   reads the last frames, ends its read, runs a `PASSIVE` checkpoint, reads again
//!   and lets writers go. When the checkpoint got every frame into the database, the
//!   next writer restarts the log: the cycle is *sealed*, and a new cycle (checkpoint
//!   sequence one higher) continues the archive.
//! - **Generations.** A snapshot starts a generation: position `(generation, 0)`.
//!   Positions count the frames archived since, across the cycles of the log. Anything
//!   the archiver cannot prove continuous starts a new generation with a new snapshot,
//!   never a wrong chain: a log that restarted without the seal, a checkpoint sequence
//!   that jumped, a WAL truncated or removed, a database file replaced (a restore), or
//!   an archiver that was not running while the log went on.
//! - **A snapshot** is taken under the write lock: the file copied and the log's
//!   committed frames applied to the copy (a checkpoint running meanwhile only writes
//!   pages those frames hold), so it is exactly the database at the log's last commit.
//!   Writers wait for the copy: a few milliseconds for a database of megabytes, longer
//!   for a big one. One is also taken every `snapshot_interval` within a generation,
//!   so a restore replays at most that much log.
//!
//! A chunk is frames `[start, end)` of one cycle, stored raw (frame headers, salts and
//! checksums included); its record names the cycle and the checksum it chains from, so
//! a restore checks every frame as SQLite's recovery would. A point's marker is the
//! log's last commit inside the pause ([`mark`]), resolved to a position once the
//! archive holds it ([`position_of`]); [`restore`] rebuilds the file from a snapshot
//! and the frames up to that position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::base::{self, BaseRecord};
use super::sqlite_wal::{self, Checksum, Committed, WalHeader, WalNow};
use super::supervise::{Ended, supervise, supervised_status};
use super::{
    Archive, ArchiveError, Catalog, ChunkContent, ChunkKind, ChunkRecord, NewChunk, Position,
};
use crate::pipeline::{self, Decryption};

/// What a SQLite base backup is: the database file, as of its `start`.
pub const SNAPSHOT_KIND: &str = "sqlite_snapshot";
/// How long the archiver waits for SQLite's locks.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the archiver tries again for the write lock.
const WRITE_LOCK_RETRY: Duration = Duration::from_micros(200);

/// Where and how one SQLite database is archived.
#[derive(Debug, Clone)]
pub struct SqliteArchiverConfig {
    pub database: String,
    /// The database file (WAL mode).
    pub path: PathBuf,
    /// How often the log is read: about how far the archive trails the database.
    pub poll: Duration,
    /// A new snapshot within the generation after this long.
    pub snapshot_interval: Duration,
    /// A checkpoint once the log's cycle holds this many frames.
    pub checkpoint_frames: u32,
    /// Where snapshots are written before they are pushed.
    pub spool: PathBuf,
}

impl SqliteArchiverConfig {
    pub fn new(database: &str, path: &Path, spool_root: &Path, poll: Duration) -> Self {
        SqliteArchiverConfig {
            database: database.to_owned(),
            path: path.to_owned(),
            poll,
            snapshot_interval: Duration::from_secs(3600),
            checkpoint_frames: 1000,
            spool: spool_root.join(database),
        }
    }
}

/// What the archiver has done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqliteArchiverStatus {
    /// The archive's end: it holds the log up to here.
    pub archived_to: Option<Position>,
    /// The end of the log's committed frames at the last look, as a position of the
    /// archive (ahead of `archived_to` while a chunk is pushed).
    pub log_position: Option<Position>,
    /// Committed bytes of the log not in the archive at the last look.
    pub pending_bytes: Option<u64>,
    /// Snapshots stored by this archiver (a new generation, or the interval).
    pub snapshots: u64,
    pub last_chunk: Option<String>,
    pub chunks_stored: u64,
    pub streaming: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
}

supervised_status!(SqliteArchiverStatus);

/// The archiver of one SQLite database.
#[derive(Debug)]
pub struct SqliteArchiver {
    config: SqliteArchiverConfig,
    archive: Archive,
    status: watch::Sender<SqliteArchiverStatus>,
}

/// Where the archive is in the log: the next frame to read, in which cycle, and the
/// position it will have.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    generation: u64,
    position: u64,
    /// The cycle being read; none when the generation began with no log.
    cycle: Option<WalHeader>,
    next_frame: u32,
    chain: Checksum,
    /// The archiver's checkpoint got every frame of the cycle into the database: the
    /// next cycle continues the generation.
    sealed: bool,
    /// When the newest snapshot was taken (by this archiver: when it began).
    snapshot_at: Instant,
}

impl Cursor {
    fn at(&self) -> Position {
        Position::Sqlite {
            generation: self.generation,
            frame: self.position,
        }
    }

    /// The cycle's facts, as chunk records, base records and markers carry them.
    fn details(&self) -> BTreeMap<String, String> {
        let mut details = BTreeMap::new();
        if let Some(cycle) = &self.cycle {
            details.insert(
                "checkpoint_seq".to_owned(),
                cycle.checkpoint_seq.to_string(),
            );
            details.insert("salt1".to_owned(), cycle.salts[0].to_string());
            details.insert("salt2".to_owned(), cycle.salts[1].to_string());
            details.insert("page_size".to_owned(), cycle.page_size.to_string());
            details.insert(
                "byte_order".to_owned(),
                if cycle.big_endian { "be" } else { "le" }.to_owned(),
            );
        }
        details.insert("frame".to_owned(), (self.next_frame - 1).to_string());
        details.insert("chain".to_owned(), sqlite_wal::checksum_text(self.chain));
        details
    }
}

/// What a look at the log found.
enum Look {
    /// Committed frames of the cycle being read (maybe none).
    Frames(Committed),
    /// The log continues in a new cycle, from its first frame.
    NextCycle(WalHeader, Committed),
    /// The log cannot be shown to continue the archive: why.
    Changed(String),
    /// Another file is at the database's path: the connections are opened again.
    Replaced(String),
}

impl SqliteArchiver {
    pub fn new(config: SqliteArchiverConfig, archive: Archive) -> SqliteArchiver {
        SqliteArchiver {
            config,
            archive,
            status: watch::channel(SqliteArchiverStatus::default()).0,
        }
    }

    pub fn config(&self) -> &SqliteArchiverConfig {
        &self.config
    }

    pub fn status(&self) -> watch::Receiver<SqliteArchiverStatus> {
        self.status.subscribe()
    }

    /// Archives until `cancel` fires (then reads the log once more and pushes what it
    /// has). Errors are retried with backoff, except a database that is not in WAL
    /// mode or cannot be opened at the first attempt.
    pub async fn run(&self, cancel: &CancellationToken) -> Result<(), ArchiveError> {
        supervise(&self.config.database, &self.status, cancel, || {
            self.session(cancel)
        })
        .await
    }

    async fn session(&self, cancel: &CancellationToken) -> Result<Ended, ArchiveError> {
        let config = self.config.clone();
        let log = blocking(&self.config.database, move || Log::open(&config)).await?;
        let (resumed, newest, log) = self.resume(log).await?;
        let (mut cursor, mut log) = match resumed {
            Some(cursor) => (cursor, log),
            None => {
                let reason = "the archive holds no chain this database's log continues";
                self.new_generation(log, newest, reason).await?
            }
        };
        tracing::info!(
            database = %self.config.database,
            generation = cursor.generation,
            "archiving SQLite's log from {}",
            cursor.at()
        );
        self.status.send_modify(|status| {
            status.streaming = true;
            status.archived_to = Some(cursor.at());
            status.log_position = Some(cursor.at());
        });
        loop {
            let stop = tokio::select! {
                () = tokio::time::sleep(self.config.poll) => false,
                () = cancel.cancelled() => true,
            };
            let at = cursor.clone();
            let (look, log_back) = blocking(&self.config.database, move || {
                let look = log.look(&at);
                Ok((look, log))
            })
            .await?;
            log = self.follow(look?, &mut cursor, log_back).await?;
            if stop {
                return Ok(Ended::Cancelled);
            }
            // A sealed cycle waits for its restart; one that went on is checkpointed
            // again.
            if cursor.next_frame > self.config.checkpoint_frames && !cursor.sealed {
                let at = cursor.clone();
                let ((look, sealed), log_back) = blocking(&self.config.database, move || {
                    let done = log.checkpoint(&at)?;
                    Ok((done, log))
                })
                .await?;
                let frames_read = matches!(look, Look::Frames(_));
                log = self.follow(look, &mut cursor, log_back).await?;
                if frames_read {
                    cursor.sealed = sealed;
                }
            }
            if cursor.snapshot_at.elapsed() >= self.config.snapshot_interval {
                log = self.snapshot_within(log, &mut cursor).await?;
                cursor.snapshot_at = Instant::now();
            }
        }
    }

    /// Acts on a look at the log: frames pushed, a new cycle followed, or a new
    /// generation begun.
    async fn follow(&self, look: Look, cursor: &mut Cursor, log: Log) -> Result<Log, ArchiveError> {
        match look {
            Look::Frames(frames) => {
                // Frames after the seal: the cycle went on (a reader kept the log from
                // restarting), so its end is no longer sealed.
                if frames.count > 0 {
                    cursor.sealed = false;
                }
                self.push(cursor, frames).await?;
                Ok(log)
            }
            Look::NextCycle(header, frames) => {
                cursor.cycle = Some(header);
                cursor.next_frame = 1;
                cursor.chain = header.checksum;
                cursor.sealed = false;
                self.push(cursor, frames).await?;
                Ok(log)
            }
            // One archiver per database (its lock): the cursor's generation is the
            // newest.
            Look::Changed(reason) => {
                let (fresh, log) = self
                    .new_generation(log, Some(cursor.generation), &reason)
                    .await?;
                *cursor = fresh;
                Ok(log)
            }
            Look::Replaced(reason) => {
                drop(log);
                let config = self.config.clone();
                let log = blocking(&self.config.database, move || Log::open(&config)).await?;
                let (fresh, log) = self
                    .new_generation(log, Some(cursor.generation), &reason)
                    .await?;
                *cursor = fresh;
                Ok(log)
            }
        }
    }

    /// The cursor the archive's newest chain ends at, when the log still continues it
    /// (the archiver was stopped and the log went on in the same cycle).
    /// Also the newest generation stored (read once: a catalog of many chunks takes a
    /// while to read).
    async fn resume(&self, log: Log) -> Result<(Option<Cursor>, Option<u64>, Log), ArchiveError> {
        let catalog = self.archive.catalog().await?;
        let (bases, _) = base::list(self.archive.storage(), &self.config.database).await?;
        let newest = newest_generation(&catalog, &bases);
        let Some(stored) = stored_cursor(&catalog, &bases) else {
            return Ok((None, newest, log));
        };
        blocking(&self.config.database, move || {
            let continues = log.continues(&stored)?.then_some(stored);
            Ok((continues, newest, log))
        })
        .await
    }

    /// A new generation after `newest`: a snapshot under the write lock, stored as a
    /// base backup at `(generation, 0)`.
    async fn new_generation(
        &self,
        log: Log,
        newest: Option<u64>,
        reason: &str,
    ) -> Result<(Cursor, Log), ArchiveError> {
        let generation = newest.map_or(1, |g| g + 1);
        tracing::info!(
            database = %self.config.database,
            generation,
            "starting a new generation with a snapshot: {reason}"
        );
        let (taken, log) = self.take_snapshot(log).await?;
        let cursor = Cursor {
            generation,
            position: 0,
            cycle: taken.wal.as_ref().map(|wal| wal.header),
            next_frame: taken.wal.as_ref().map_or(1, |wal| wal.committed.last() + 1),
            chain: taken.wal.as_ref().map_or([0, 0], |wal| wal.committed.chain),
            sealed: false,
            snapshot_at: Instant::now(),
        };
        self.store_snapshot(&taken, &cursor, reason).await?;
        Ok((cursor, log))
    }

    /// A snapshot within the generation: the frames since the cursor pushed first,
    /// then the snapshot stored at the position they end at.
    async fn snapshot_within(&self, log: Log, cursor: &mut Cursor) -> Result<Log, ArchiveError> {
        let (taken, log) = self.take_snapshot(log).await?;
        let continued = taken.wal.as_ref().and_then(|wal| {
            let cycle = cursor.cycle.filter(|cycle| cycle.same_cycle(&wal.header))?;
            let size = cycle.frame_size();
            let from = (cursor.next_frame as usize - 1) * size;
            let tail = wal.committed.bytes.get(from..)?;
            let frames =
                sqlite_wal::committed_frames(&cycle, cursor.next_frame, cursor.chain, tail);
            (frames.last() == wal.committed.last()).then_some(frames)
        });
        match continued {
            Some(frames) => {
                self.push(cursor, frames).await?;
                self.store_snapshot(&taken, cursor, "the snapshot interval passed")
                    .await?;
                Ok(log)
            }
            // The log moved under the cursor since the last look: whatever it was,
            // the next look starts a new generation.
            None => Ok(log),
        }
    }

    async fn take_snapshot(&self, log: Log) -> Result<(Snapshot, Log), ArchiveError> {
        std::fs::create_dir_all(&self.config.spool).map_err(|source| ArchiveError::Io {
            database: self.config.database.clone(),
            path: self.config.spool.display().to_string(),
            source,
        })?;
        let file = tempfile::NamedTempFile::new_in(&self.config.spool).map_err(|source| {
            ArchiveError::Io {
                database: self.config.database.clone(),
                path: self.config.spool.display().to_string(),
                source,
            }
        })?;
        blocking(&self.config.database, move || {
            let started = Instant::now();
            let (wal, identity) = log.snapshot(file.path())?;
            Ok((
                Snapshot {
                    file,
                    wal,
                    identity,
                    took: started.elapsed(),
                },
                log,
            ))
        })
        .await
    }

    async fn store_snapshot(
        &self,
        taken: &Snapshot,
        cursor: &Cursor,
        reason: &str,
    ) -> Result<(), ArchiveError> {
        let storage = self.archive.storage();
        let id = base::new_base_id();
        let prefix = base::base_prefix(&self.config.database, &id)?;
        let started_at_ms = chrono::Utc::now().timestamp_millis();
        let path = format!("{prefix}/database.sqlite{}", self.archive.settings.suffix());
        let input = tokio::fs::File::open(taken.file.path())
            .await
            .map_err(|source| ArchiveError::Io {
                database: self.config.database.clone(),
                path: taken.file.path().display().to_string(),
                source,
            })?;
        let artifact = pipeline::store(
            Box::pin(input),
            &self.archive.settings,
            storage,
            &path,
            |_| {},
        )
        .await?;
        let mut details = cursor.details();
        details.insert("generation".to_owned(), cursor.generation.to_string());
        details.insert("took_ms".to_owned(), taken.took.as_millis().to_string());
        details.insert("reason".to_owned(), reason.to_owned());
        details.extend(taken.identity.clone().unwrap_or_default());
        let record = BaseRecord {
            format: base::BASE_FORMAT,
            id,
            database: self.config.database.clone(),
            adapter: "sqlite".to_owned(),
            kind: SNAPSHOT_KIND.to_owned(),
            start: cursor.at(),
            end: cursor.at(),
            timeline: None,
            started_at_ms,
            finished_at_ms: chrono::Utc::now().timestamp_millis(),
            artifact,
            details,
        };
        base::write_record(storage, &record).await?;
        self.status.send_modify(|status| {
            status.snapshots += 1;
            status.archived_to = Some(cursor.at());
            status.log_position = Some(cursor.at());
        });
        Ok(())
    }

    /// Pushes committed frames as one chunk and moves the cursor past them.
    async fn push(&self, cursor: &mut Cursor, frames: Committed) -> Result<(), ArchiveError> {
        let Some(cycle) = cursor.cycle else {
            return Ok(());
        };
        let start = cursor.at();
        let end = Position::Sqlite {
            generation: cursor.generation,
            frame: cursor.position + u64::from(frames.count),
        };
        self.status.send_modify(|status| {
            status.log_position = Some(end.clone());
            status.pending_bytes = Some(frames.bytes.len() as u64);
        });
        if frames.count == 0 {
            return Ok(());
        }
        let mut details = cursor.details();
        details.insert("first_frame".to_owned(), frames.first.to_string());
        details.insert(
            "end_chain".to_owned(),
            sqlite_wal::checksum_text(frames.chain),
        );
        details.remove("frame");
        let name = chunk_name(cursor.generation, cursor.position, u64::from(frames.count));
        let chunk = NewChunk {
            name: name.clone(),
            kind: ChunkKind::SqliteFrames,
            timeline: None,
            start: Some(start),
            end: Some(end.clone()),
            segment_size: Some(u64::from(cycle.page_size)),
            details,
        };
        self.archive
            .push(chunk, ChunkContent::Bytes(frames.bytes.into()))
            .await?;
        cursor.position += u64::from(frames.count);
        cursor.next_frame = frames.first + frames.count;
        cursor.chain = frames.chain;
        self.status.send_modify(|status| {
            status.archived_to = Some(end);
            status.last_chunk = Some(name);
            status.chunks_stored += 1;
            status.pending_bytes = Some(0);
            status.last_error = None;
        });
        Ok(())
    }
}

/// `<generation>-<first position>-<frames>.frames`, sortable.
fn chunk_name(generation: u64, position: u64, frames: u64) -> String {
    format!("{generation:08}-{position:012}-{frames:06}.frames")
}

struct Snapshot {
    file: tempfile::NamedTempFile,
    /// The log the copy was brought up to (none when there was none).
    wal: Option<WalNow>,
    /// The source file's size and modification time, when there was no log: what a
    /// marker without a log is matched by.
    identity: Option<BTreeMap<String, String>>,
    took: Duration,
}

/// The database's two connections: one holds the read transaction, one takes the
/// write lock when the archiver must stop writers for a moment.
struct Log {
    database: String,
    path: PathBuf,
    reader: Connection,
    writer: Connection,
    /// The file the connections opened: a file put in its place is another database.
    inode: u64,
    /// An exclusive `flock` on the database file while this archiver runs: a second
    /// archiver of the same file would write a second chain. (SQLite locks with
    /// `fcntl`, which `flock` does not touch.)
    _only_archiver: std::fs::File,
}

impl Log {
    fn open(config: &SqliteArchiverConfig) -> Result<Log, ArchiveError> {
        let settings = |message: String| ArchiveError::Settings {
            database: config.database.clone(),
            message,
        };
        let server = |message: String| ArchiveError::Server {
            database: config.database.clone(),
            message,
        };
        if !config.path.is_file() {
            return Err(settings(format!(
                "{} does not exist or is not a file: check the path in the runbook",
                config.path.display()
            )));
        }
        let only_archiver = std::fs::File::open(&config.path)
            .map_err(|e| server(format!("opening {}: {e}", config.path.display())))?;
        if let Err(error) = only_archiver.try_lock() {
            return Err(match error {
                std::fs::TryLockError::WouldBlock => settings(format!(
                    "another archiver is archiving {} (it holds the archiver's lock on the \
                     file): stop it first; two archivers would write two chains of one log",
                    config.path.display()
                )),
                std::fs::TryLockError::Error(e) => {
                    server(format!("locking {}: {e}", config.path.display()))
                }
            });
        }
        let open = || {
            let conn = Connection::open_with_flags(
                &config.path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| server(format!("opening {}: {e}", config.path.display())))?;
            conn.busy_timeout(BUSY_TIMEOUT)
                .map_err(|e| server(e.to_string()))?;
            Ok::<_, ArchiveError>(conn)
        };
        let reader = open()?;
        let mode: String = reader
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .map_err(|e| server(format!("reading journal_mode: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(settings(format!(
                "{} is in journal_mode={mode}; only a WAL-mode database has a log to archive: \
                 run `PRAGMA journal_mode=WAL` on it once (it stays set)",
                config.path.display()
            )));
        }
        // The archiver's own connections never checkpoint behind its back.
        reader
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| server(e.to_string()))?;
        let writer = open()?;
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| server(e.to_string()))?;
        // SQLite's own busy handler sleeps longer and longer between tries, so among
        // writers that commit back to back the archiver would seldom get the lock: try
        // again every 200 µs instead, for as long as BUSY_TIMEOUT.
        writer
            .busy_handler(Some(|attempts| {
                std::thread::sleep(WRITE_LOCK_RETRY);
                WRITE_LOCK_RETRY * u32::try_from(attempts).unwrap_or(u32::MAX) < BUSY_TIMEOUT
            }))
            .map_err(|e| server(e.to_string()))?;
        let log = Log {
            database: config.database.clone(),
            path: config.path.clone(),
            reader,
            writer,
            inode: inode(&config.path).map_err(|e| server(e.to_string()))?,
            _only_archiver: only_archiver,
        };
        log.begin_read()?;
        Ok(log)
    }

    fn fail(&self, what: &str, error: impl std::fmt::Display) -> ArchiveError {
        ArchiveError::Server {
            database: self.database.clone(),
            message: format!("{what}: {error}"),
        }
    }

    /// Starts the read transaction that keeps the log from restarting under it.
    fn begin_read(&self) -> Result<(), ArchiveError> {
        self.reader
            .execute_batch("BEGIN; SELECT count(*) FROM sqlite_schema;")
            .map_err(|e| self.fail("starting the archiver's read transaction", e))
    }

    fn end_read(&self) -> Result<(), ArchiveError> {
        self.reader
            .execute_batch("COMMIT")
            .map_err(|e| self.fail("ending the archiver's read transaction", e))
    }

    fn read_wal(&self, from: Option<(u32, Checksum)>) -> Result<Option<WalNow>, ArchiveError> {
        sqlite_wal::read_wal(&self.path, from).map_err(|e| self.fail("reading the WAL", e))
    }

    /// What the log holds past the cursor (read from the cursor's frame on while the
    /// cycle is the same; from the start when it is not).
    fn look(&self, cursor: &Cursor) -> Result<Look, ArchiveError> {
        match inode(&self.path) {
            Ok(inode) if inode == self.inode => {}
            _ => {
                return Ok(Look::Replaced(format!(
                    "{} was replaced by another file (a restore?)",
                    self.path.display()
                )));
            }
        }
        if let Some(cycle) = cursor.cycle {
            let tail = self.read_wal(Some((cursor.next_frame, cursor.chain)))?;
            if let Some(tail) = tail.filter(|tail| cycle.same_cycle(&tail.header)) {
                return Ok(Look::Frames(tail.committed));
            }
        }
        let Some(now) = self.read_wal(None)? else {
            return Ok(match cursor.cycle {
                None => Look::Frames(Committed::default()),
                Some(_) => Look::Changed("the WAL was removed or truncated".to_owned()),
            });
        };
        match cursor.cycle {
            Some(cycle) if cycle.same_cycle(&now.header) => Ok(Look::Frames(Committed {
                first: cursor.next_frame,
                ..Committed::default()
            })),
            // The generation began without a log: its first cycle continues it.
            None => Ok(Look::NextCycle(now.header, now.committed)),
            // A restart adds one to the first salt of the log's shared header (the
            // checkpoint sequence is each connection's own count, not the log's).
            Some(cycle)
                if cursor.sealed && now.header.salts[0] == cycle.salts[0].wrapping_add(1) =>
            {
                Ok(Look::NextCycle(now.header, now.committed))
            }
            Some(cycle) => Ok(Look::Changed(format!(
                "the log restarted {} (salt {} → {}): frames may have gone unread",
                if cursor.sealed {
                    "more than once since the archiver's checkpoint"
                } else {
                    "without the archiver's checkpoint"
                },
                cycle.salts[0],
                now.header.salts[0]
            ))),
        }
    }

    /// Stops writers, reads the last frames, checkpoints with the read transaction
    /// ended, starts it again, lets writers go. Returns what the look under the lock
    /// found and, when it found the cycle's frames, whether the checkpoint got every
    /// frame into the database (the cycle is sealed).
    fn checkpoint(&self, cursor: &Cursor) -> Result<(Look, bool), ArchiveError> {
        let writer = &self.writer;
        if let Err(error) = writer.execute_batch("BEGIN IMMEDIATE") {
            // Writers kept the lock: the next round tries again.
            if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
                return Ok((Look::Frames(Committed::default()), false));
            }
            return Err(self.fail("taking the write lock for a checkpoint", error));
        }
        let result = (|| {
            let frames = match self.look(cursor)? {
                Look::Frames(frames) => frames,
                // A new cycle or a change: no checkpoint until it is followed.
                other => return Ok((other, false)),
            };
            self.end_read()?;
            let counts: Result<(i64, i64, i64), _> =
                self.reader
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    });
            self.begin_read()?;
            let (busy, log, done) = counts.map_err(|e| self.fail("checkpoint", e))?;
            let last = i64::from(frames.first + frames.count) - 1;
            let sealed = busy == 0 && log == done && log == last;
            Ok((Look::Frames(frames), sealed))
        })();
        let _ = writer.execute_batch("ROLLBACK");
        result
    }

    /// The database as of the log's last commit, into `into`: the file copied and the
    /// committed frames applied, under the write lock. The read transaction is started
    /// again under the same lock, so it sees exactly the snapshot.
    #[allow(clippy::type_complexity)]
    fn snapshot(
        &self,
        into: &Path,
    ) -> Result<(Option<WalNow>, Option<BTreeMap<String, String>>), ArchiveError> {
        let writer = &self.writer;
        writer
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.fail("taking the write lock for a snapshot", e))?;
        let result = (|| {
            let wal = self.read_wal(None)?;
            let identity = match wal {
                Some(_) => None,
                None => {
                    Some(file_identity(&self.path).map_err(|e| self.fail("reading the file", e))?)
                }
            };
            std::fs::copy(&self.path, into).map_err(|e| self.fail("copying the file", e))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(into)
                .map_err(|e| self.fail("opening the copy", e))?;
            if let Some(wal) = &wal {
                sqlite_wal::apply_frames(&mut file, wal.header.page_size, &wal.committed.bytes)
                    .map_err(|e| self.fail("applying the WAL to the copy", e))?;
            }
            file.sync_all()
                .map_err(|e| self.fail("syncing the copy", e))?;
            self.end_read()?;
            self.begin_read()?;
            Ok((wal, identity))
        })();
        let _ = writer.execute_batch("ROLLBACK");
        result
    }

    /// Whether the log still holds `stored`'s chain: the same cycle, with at least its
    /// frames, the last of them carrying its checksum.
    fn continues(&self, stored: &Cursor) -> Result<bool, ArchiveError> {
        let (Some(cycle), Some(now)) = (stored.cycle, self.read_wal(None)?) else {
            return Ok(false);
        };
        if !cycle.same_cycle(&now.header) || now.committed.last() + 1 < stored.next_frame {
            return Ok(false);
        }
        let size = cycle.frame_size();
        let upto = (stored.next_frame as usize - 1) * size;
        let prefix = sqlite_wal::committed_frames(
            &now.header,
            1,
            now.header.checksum,
            &now.committed.bytes[..upto],
        );
        Ok(prefix.last() + 1 == stored.next_frame && prefix.chain == stored.chain)
    }
}

/// A file's size and modification time (to the nanosecond), as details.
fn file_identity(path: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let metadata = std::fs::metadata(path)?;
    let modified = metadata
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(BTreeMap::from([
        ("file_size".to_owned(), metadata.len().to_string()),
        ("file_mtime_ns".to_owned(), modified.as_nanos().to_string()),
    ]))
}

fn inode(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino())
}

/// Runs SQLite's blocking calls off the async threads.
async fn blocking<T: Send + 'static>(
    database: &str,
    work: impl FnOnce() -> Result<T, ArchiveError> + Send + 'static,
) -> Result<T, ArchiveError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ArchiveError::Server {
            database: database.to_owned(),
            message: format!("the archiver's SQLite task failed: {e}"),
        })?
}

/// The newest generation the archive or its bases have.
fn newest_generation(catalog: &Catalog, bases: &[BaseRecord]) -> Option<u64> {
    let chunks = catalog.chunks.iter().filter_map(|c| c.start.as_ref());
    let snapshots = bases.iter().map(|b| &b.start);
    chunks
        .chain(snapshots)
        .filter_map(Position::sqlite_generation)
        .max()
}

/// The cursor at the end of the newest generation's chain: its last chunk, or its
/// newest snapshot when no chunk follows that.
fn stored_cursor(catalog: &Catalog, bases: &[BaseRecord]) -> Option<Cursor> {
    let chunk = catalog
        .chunks
        .iter()
        .filter(|c| c.kind == ChunkKind::SqliteFrames)
        .max_by(|a, b| a.end.cmp(&b.end));
    let snapshot = bases
        .iter()
        .filter(|b| b.kind == SNAPSHOT_KIND)
        .max_by(|a, b| a.start.cmp(&b.start));
    match (chunk, snapshot) {
        (Some(chunk), snapshot)
            if snapshot.is_none_or(|s| Some(&s.start) <= chunk.end.as_ref()) =>
        {
            let first: u32 = chunk.details.get("first_frame")?.parse().ok()?;
            let Position::Sqlite { generation, frame } = chunk.end.clone()? else {
                return None;
            };
            let (_, start_frame) = chunk.start.as_ref()?.as_sqlite()?;
            Some(Cursor {
                generation,
                position: frame,
                cycle: Some(cycle_of(&chunk.details)?),
                next_frame: first + u32::try_from(frame - start_frame).ok()?,
                chain: sqlite_wal::parse_checksum(chunk.details.get("end_chain")?)?,
                sealed: false,
                snapshot_at: Instant::now(),
            })
        }
        (_, Some(snapshot)) => {
            let (generation, position) = snapshot.start.as_sqlite()?;
            let frame: u32 = snapshot.details.get("frame")?.parse().ok()?;
            Some(Cursor {
                generation,
                position,
                cycle: cycle_of(&snapshot.details),
                next_frame: frame + 1,
                chain: sqlite_wal::parse_checksum(snapshot.details.get("chain")?)?,
                sealed: false,
                snapshot_at: Instant::now(),
            })
        }
        _ => None,
    }
}

/// The cycle a record's details name (its header as far as a chain check needs it).
fn cycle_of(details: &BTreeMap<String, String>) -> Option<WalHeader> {
    let number = |key: &str| details.get(key)?.parse::<u32>().ok();
    Some(WalHeader {
        big_endian: details.get("byte_order")? == "be",
        page_size: number("page_size")?,
        checkpoint_seq: number("checkpoint_seq")?,
        salts: [number("salt1")?, number("salt2")?],
        checksum: sqlite_wal::parse_checksum(details.get("chain")?)?,
    })
}

// ---------------------------------------------------------------------------------
// Points: the marker taken inside the pause, and where it lies in the archive.

/// The marker of a SQLite database inside a pause: its log's last commit (cycle and
/// frame, with the frame's checksum), or no log at all.
pub fn mark(db: &Path) -> Result<BTreeMap<String, String>, String> {
    if !db.exists() {
        return Err(format!("{} does not exist", db.display()));
    }
    let wal = sqlite_wal::read_wal(db, None).map_err(|e| format!("reading the WAL: {e}"))?;
    let mut details = BTreeMap::new();
    if let Some(wal) = wal {
        let header = wal.header;
        details.insert(
            "checkpoint_seq".to_owned(),
            header.checkpoint_seq.to_string(),
        );
        details.insert("salt1".to_owned(), header.salts[0].to_string());
        details.insert("salt2".to_owned(), header.salts[1].to_string());
        details.insert("frame".to_owned(), wal.committed.last().to_string());
        details.insert(
            "chain".to_owned(),
            sqlite_wal::checksum_text(wal.committed.chain),
        );
    } else {
        // No log: the file alone is the database, named by its size and time.
        details.insert("frame".to_owned(), "0".to_owned());
        details.extend(file_identity(db).map_err(|e| format!("reading {}: {e}", db.display()))?);
    }
    Ok(details)
}

/// Where a marker lies in the archive, once the archive holds it: the end of the
/// chunk frame it names, or the snapshot taken at it.
pub fn position_of(
    marker: &BTreeMap<String, String>,
    catalog: &Catalog,
    bases: &[BaseRecord],
) -> Option<Position> {
    let frame: u32 = marker.get("frame")?.parse().ok()?;
    let same_cycle = |details: &BTreeMap<String, String>| {
        ["checkpoint_seq", "salt1", "salt2"]
            .iter()
            .all(|key| details.get(*key) == marker.get(*key))
    };
    if marker.contains_key("checkpoint_seq") && frame > 0 {
        for chunk in catalog.chunks.iter().rev() {
            if chunk.kind != ChunkKind::SqliteFrames || !same_cycle(&chunk.details) {
                continue;
            }
            let first: u32 = chunk.details.get("first_frame")?.parse().ok()?;
            let (generation, start) = chunk.start.as_ref()?.as_sqlite()?;
            let (_, end) = chunk.end.as_ref()?.as_sqlite()?;
            let last = first + u32::try_from(end - start).ok()? - 1;
            if (first..=last).contains(&frame) {
                if frame == last && chunk.details.get("end_chain") != marker.get("chain") {
                    return None;
                }
                return Some(Position::Sqlite {
                    generation,
                    frame: start + u64::from(frame - first) + 1,
                });
            }
        }
    }
    // A marker at a snapshot: no frame committed since it was taken.
    bases
        .iter()
        .rev()
        .filter(|b| b.kind == SNAPSHOT_KIND)
        .find(|b| {
            let same_file = ["file_size", "file_mtime_ns"]
                .iter()
                .all(|key| b.details.get(*key) == marker.get(*key));
            b.details.get("frame") == marker.get("frame")
                && if marker.contains_key("checkpoint_seq") {
                    same_cycle(&b.details) && b.details.get("chain") == marker.get("chain")
                } else {
                    same_file
                }
        })
        .map(|b| b.start.clone())
}

/// Why the archive will never hold a marker it does not hold now: a snapshot of the
/// marker's cycle that began a generation past it (the archiver started, or started
/// again, after the point's pause). A snapshot within a generation says nothing: the
/// frames before it were pushed first.
pub fn never_archived(marker: &BTreeMap<String, String>, bases: &[BaseRecord]) -> Option<String> {
    let frame: u32 = marker.get("frame")?.parse().ok()?;
    let salts = ["salt1", "salt2"].map(|key| marker.get(key));
    bases
        .iter()
        .filter(|b| b.kind == SNAPSHOT_KIND && b.start.starts_generation())
        .filter(|b| ["salt1", "salt2"].map(|k| b.details.get(k)) == salts)
        .filter_map(|b| Some((b, b.details.get("frame")?.parse::<u32>().ok()?)))
        .find(|(_, snapshot_frame)| *snapshot_frame > frame)
        .map(|(b, snapshot_frame)| {
            format!(
                "the archive of this log begins at frame {snapshot_frame} (snapshot {}, \
                 {}), after the marker's frame {frame}: the archiver began after the point's \
                 pause",
                b.id, b.start
            )
        })
}

// ---------------------------------------------------------------------------------
// Restore.

/// Rebuilds the database at `target` into `into` (a new file): the snapshot read
/// back, then every frame of `chunks` (the chunks from the snapshot's position up to
/// the one holding `target`, in order) checked against its cycle's chain and applied,
/// stopping at `target`, which must be a commit. Then `PRAGMA integrity_check`.
pub async fn restore(
    archive: &Archive,
    snapshot: &BaseRecord,
    chunks: &[ChunkRecord],
    target: &Position,
    decryption: &Decryption,
    into: &Path,
) -> Result<(), String> {
    if snapshot.kind != SNAPSHOT_KIND {
        return Err(format!(
            "base {} is a {}, not a SQLite snapshot",
            snapshot.id, snapshot.kind
        ));
    }
    let (generation, mut at) = snapshot
        .start
        .as_sqlite()
        .ok_or_else(|| format!("base {} has no SQLite position", snapshot.id))?;
    let (target_generation, target_frame) = target
        .as_sqlite()
        .ok_or_else(|| format!("{target} is not a SQLite position"))?;
    if target_generation != generation || target_frame < at {
        return Err(format!(
            "base {} (at {}) cannot replay to {target}",
            snapshot.id, snapshot.start
        ));
    }
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = pipeline::open(archive.storage(), &snapshot.artifact, decryption)
            .await
            .map_err(|e| e.to_string())?;
        let mut file = tokio::fs::File::create(into)
            .await
            .map_err(|e| format!("creating {}: {e}", into.display()))?;
        tokio::io::copy(&mut stream, &mut file)
            .await
            .map_err(|e| format!("writing the snapshot to {}: {e}", into.display()))?;
        file.flush().await.map_err(|e| e.to_string())?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(into)
        .map_err(|e| format!("opening {}: {e}", into.display()))?;
    // Where the log stood at the snapshot: each chunk must go on from there (its
    // cycle, frame and checksum), so chunks of another chain never meet.
    let mut expected = Continuation {
        cycle: cycle_of(&snapshot.details),
        next_frame: snapshot
            .details
            .get("frame")
            .and_then(|f| f.parse::<u32>().ok())
            .map_or(1, |frame| frame + 1),
        chain: snapshot
            .details
            .get("chain")
            .and_then(|c| sqlite_wal::parse_checksum(c))
            .unwrap_or_default(),
    };
    for chunk in chunks {
        if at >= target_frame {
            break;
        }
        let (chunk_generation, start) = chunk
            .start
            .as_ref()
            .and_then(Position::as_sqlite)
            .ok_or_else(|| format!("chunk {} has no SQLite position", chunk.name))?;
        if chunk_generation != generation || start != at {
            return Err(format!(
                "chunk {} starts at {}, the replay is at {}",
                chunk.name,
                chunk
                    .start
                    .as_ref()
                    .map_or(String::new(), ToString::to_string),
                Position::Sqlite {
                    generation,
                    frame: at
                }
            ));
        }
        let cycle = cycle_of(&chunk.details)
            .ok_or_else(|| format!("chunk {}'s record does not name its log cycle", chunk.name))?;
        let first: u32 = chunk
            .details
            .get("first_frame")
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("chunk {}'s record has no first_frame", chunk.name))?;
        if !expected.continued_by(&cycle, first) {
            return Err(format!(
                "chunk {} (frame {first} of the log cycle with salts {}/{}) does not go on \
                 from where the replay is (frame {} of {}): it belongs to another chain; \
                 refusing a wrong database",
                chunk.name,
                cycle.salts[0],
                cycle.salts[1],
                expected.next_frame,
                expected.cycle.map_or("no log".to_owned(), |c| format!(
                    "salts {}/{}",
                    c.salts[0], c.salts[1]
                ))
            ));
        }
        let bytes = archive
            .read(chunk, decryption)
            .await
            .map_err(|e| e.to_string())?;
        let wanted = (target_frame - at).min((bytes.len() / cycle.frame_size()) as u64);
        let frames = &bytes[..wanted as usize * cycle.frame_size()];
        let checked = sqlite_wal::committed_frames(&cycle, first, cycle.checksum, frames);
        if u64::from(checked.count) != wanted {
            return Err(format!(
                "chunk {}: frame {} of its cycle is damaged or does not chain (or {} is no \
                 commit): refusing a wrong database",
                chunk.name,
                first + checked.count,
                Position::Sqlite {
                    generation,
                    frame: at + wanted
                }
            ));
        }
        sqlite_wal::apply_frames(&mut file, cycle.page_size, frames)
            .map_err(|e| format!("writing {}: {e}", into.display()))?;
        at += wanted;
        expected = Continuation {
            cycle: Some(cycle),
            next_frame: first + checked.count,
            chain: checked.chain,
        };
    }
    if at != target_frame {
        return Err(format!(
            "the chunks end at {}, before {target}",
            Position::Sqlite {
                generation,
                frame: at
            }
        ));
    }
    file.sync_all().map_err(|e| e.to_string())?;
    drop(file);
    let path = into.to_owned();
    tokio::task::spawn_blocking(move || integrity_check(&path))
        .await
        .map_err(|e| e.to_string())?
}

/// Where a replay stands in the log: what the next chunk must continue.
struct Continuation {
    cycle: Option<WalHeader>,
    next_frame: u32,
    chain: Checksum,
}

impl Continuation {
    /// Whether a chunk of `cycle` (its `checksum` the chain its first frame continues)
    /// starting at frame `first` goes on from here: the next frame of this cycle, or
    /// the first frame of the next cycle (first salt one higher), or of the first
    /// cycle after a snapshot taken with no log.
    fn continued_by(&self, cycle: &WalHeader, first: u32) -> bool {
        match &self.cycle {
            Some(now) if now.same_cycle(cycle) => {
                first == self.next_frame && cycle.checksum == self.chain
            }
            Some(now) => first == 1 && cycle.salts[0] == now.salts[0].wrapping_add(1),
            None => first == 1,
        }
    }
}

fn integrity_check(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| format!("opening the restored {}: {e}", path.display()))?;
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .map_err(|e| format!("integrity_check of {}: {e}", path.display()))?;
    if result != "ok" {
        return Err(format!(
            "the restored {} fails PRAGMA integrity_check: {result}",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
