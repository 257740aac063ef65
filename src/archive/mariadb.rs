//! MariaDB binlogs into the archive, continuously; replay of an archived range into a
//! target; MariaDB base backups in storage.
//!
//! **Archiving.** [`BinlogArchiver`] supervises `mariadb-binlog --read-from-remote-server
//! --raw --stop-never`, which copies the server's binlog files byte for byte into a
//! spool directory (a fresh one per run: `<spool_dir>/<run id>/`). Every
//! `chunk_interval` the archiver walks the events of the file being written from
//! where the archive ends, takes the whole ones (never a half-written event: see
//! `binlog::walk`, which also checks each event's end position against its header, so
//! the offsets are the server's) and pushes them as a chunk `[(file, start), (file,
//! end))`. So the archive trails the server by about `chunk_interval` without
//! `FLUSH BINARY LOGS`. A chunk whose last event is a ROTATE or STOP ends its file,
//! and ends at `(next file, 4)`, where the next file's first chunk starts: the
//! catalog sees one continuous log across files. A file that ends otherwise (the
//! server crashed) is closed once the next file appears, by an empty chunk
//! (`<file>.<end>.end`) from its end to `(next file, 4)`. Each chunk's record carries
//! the GTID state at its end (`details.gtid_binlog_pos`, followed through the GTID
//! list and GTID events; the end may lie inside a transaction, whose GTID it then
//! includes), the file and the byte range.
//!
//! Resuming: raw mode copies whole files (an offset inside a file would not be the
//! server's), so each run streams the file where the archive ends from its start
//! and pushes only what lies past the archive's end. Nothing is lost and nothing is
//! stored twice: chunks start exactly where the archive ends, and a push of a chunk
//! the archive holds is a no-op. A new archive starts at the beginning of the
//! server's current binlog file. A file the server has purged (`expire_logs_days`,
//! `PURGE BINARY LOGS`) before the archiver had it cannot be archived: the archiver
//! stops and says so (the archive would have a gap).
//!
//! The archiver connects with a replica server id of its own
//! (`--stop-never-slave-server-id`, derived from the host and spool): the server
//! ends an older connection with the same id, so a mariadb-binlog orphaned by a
//! killed archiver stops streaming when the next run starts. The password goes by
//! `MYSQL_PWD`, never the command line.
//!
//! **Replay** ([`replay`], [`restore_point`] = base + replay): the chunks from the
//! start of the base's file to the target position are read (every one checked)
//! *before* anything is written ([`fetch_range`]), reassembled into binlog files
//! (the magic, then the chunks' bytes) in a work directory, and applied with `mariadb-binlog --start-position --stop-position
//! --database <source> [--rewrite-db source->target] files… | mariadb`.
//! [`replay_until_time`] stops at an instant instead (`--stop-datetime`): plain
//! point-in-time recovery, which no pause proves consistent with other databases.
//!
//! **Base backups** ([`base_backup`]): by the database's `base_method`,
//! `mariadb-backup --stream` (the default: `mariadb_backup.rs`, restored into a data
//! directory) or the adapter's consistent dump (one snapshot, its binlog position
//! read in the same transaction; [`restore_base`] loads it into a new database),
//! stored through the pipeline under `bases/<database>/<id>/` (`base.rs`), with the
//! binlog position where the copy is consistent as the base's `start`.
//!
//! Also here: [`check_server`], what archiving needs of the server, each problem
//! named with the one setting or grant to change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use tokio::io::{AsyncReadExt, AsyncSeekExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::base::{self, BaseRecord};
use super::binlog::{self, GtidState};
use super::supervise::{ClientStderr, Ended, supervise, supervised_status};
use super::{Archive, ArchiveError, ChunkContent, ChunkKind, NewChunk, Position, PushOutcome};
use crate::adapters::mariadb::{connect, parse_url, shown};
use crate::adapters::{self, Adapter, MariadbBaseMethod, MariadbConfig};
use crate::pipeline::{self, Decryption, PipelineSettings};
use crate::storage::Storage;

/// The most bytes of events one chunk takes (one event longer than this goes whole).
const CHUNK_MAX: u64 = 64 << 20;

/// What the archiver of one MariaDB database needs.
#[derive(Debug, Clone)]
pub struct BinlogArchiverConfig {
    pub database: String,
    pub mariadb: MariadbConfig,
    /// The archiver's own directory (locked); each run streams into a fresh
    /// directory under it.
    pub spool_dir: PathBuf,
    /// How often the file being written is cut into a chunk.
    pub chunk_interval: Duration,
    /// The replica server id mariadb-binlog announces; unique per archiver.
    pub server_id: u32,
}

impl BinlogArchiverConfig {
    /// The defaults: spool `<spool_root>/<database>`, a server id derived from the
    /// host and spool.
    pub fn new(
        database: &str,
        mariadb: MariadbConfig,
        spool_root: &Path,
        chunk_interval: Duration,
    ) -> BinlogArchiverConfig {
        let spool_dir = spool_root.join(database);
        BinlogArchiverConfig {
            database: database.to_owned(),
            mariadb,
            server_id: replica_server_id(&spool_dir),
            spool_dir,
            chunk_interval,
        }
    }
}

/// A replica server id for this host and spool, in `[2^30, 2^31)`: far from the
/// small ids servers are usually given, and the same on every run, so a new run
/// replaces an orphaned one's connection.
pub fn replica_server_id(spool: &Path) -> u32 {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let spool = std::path::absolute(spool).unwrap_or_else(|_| spool.to_owned());
    let hash = blake3::hash(format!("{}\n{}", host.trim(), spool.display()).as_bytes());
    let bytes: [u8; 4] = hash.as_bytes()[..4].try_into().expect("4 bytes");
    (1 << 30) | (u32::from_le_bytes(bytes) & ((1 << 30) - 1))
}

/// What a binlog archiver has done, for progress output and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BinlogArchiverStatus {
    /// The archive's end: it holds the log up to here.
    pub archived_to: Option<Position>,
    /// The server's binlog position (`SHOW MASTER STATUS`) at the last look.
    pub server_position: Option<Position>,
    pub last_chunk: Option<String>,
    pub chunks_stored: u64,
    /// Whether a mariadb-binlog is streaming now.
    pub streaming: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
}

impl BinlogArchiverStatus {
    /// Bytes the server has that the archive has not, when both are in one file.
    pub fn lag_bytes(&self) -> Option<u64> {
        let (file, archived) = self.archived_to.as_ref()?.as_binlog()?;
        let (server_file, server) = self.server_position.as_ref()?.as_binlog()?;
        (file == server_file).then(|| server.saturating_sub(archived))
    }
}

supervised_status!(BinlogArchiverStatus);

/// The archiver of one MariaDB database's binlog.
#[derive(Debug)]
pub struct BinlogArchiver {
    config: BinlogArchiverConfig,
    archive: Archive,
    status: watch::Sender<BinlogArchiverStatus>,
}

/// Where the archive ends, and the GTID state there.
struct SessionState {
    dir: PathBuf,
    archived_to: Option<Position>,
    /// The GTID state at `archived_to`, once the spool has shown it.
    gtids: Option<GtidState>,
}

impl BinlogArchiver {
    pub fn new(config: BinlogArchiverConfig, archive: Archive) -> BinlogArchiver {
        BinlogArchiver {
            config,
            archive,
            status: watch::Sender::new(BinlogArchiverStatus::default()),
        }
    }

    pub fn status(&self) -> watch::Receiver<BinlogArchiverStatus> {
        self.status.subscribe()
    }

    pub fn config(&self) -> &BinlogArchiverConfig {
        &self.config
    }

    fn server_error(&self, message: String) -> ArchiveError {
        ArchiveError::Server {
            database: self.config.database.clone(),
            message,
        }
    }

    fn settings_error(&self, message: String) -> ArchiveError {
        ArchiveError::Settings {
            database: self.config.database.clone(),
            message,
        }
    }

    fn io(&self, path: &Path, source: std::io::Error) -> ArchiveError {
        ArchiveError::Io {
            database: self.config.database.clone(),
            path: path.display().to_string(),
            source,
        }
    }

    /// Archives until `cancel` fires, then pushes what mariadb-binlog received and
    /// returns. Fails only for what retrying cannot fix: the server's settings at
    /// start, a purged file, the spool in use, a chunk that conflicts.
    pub async fn run(&self, cancel: &CancellationToken) -> Result<(), ArchiveError> {
        let _spool = super::postgres::SpoolLock::take(&self.config.spool_dir)
            .map_err(|message| self.server_error(message))?;
        supervise(&self.config.database, &self.status, cancel, || {
            self.session(cancel)
        })
        .await
    }

    /// One connection and one mariadb-binlog, until it exits or `cancel` fires.
    async fn session(&self, cancel: &CancellationToken) -> Result<Ended, ArchiveError> {
        let opts = parse_url(&self.config.mariadb.url)
            .map_err(|message| self.settings_error(format!("the database's URL: {message}")))?;
        let mut conn = connect(&server_only(&opts)).await.map_err(|message| {
            if message.contains("Access denied") {
                self.settings_error(format!(
                    "{message} (the archiver's role needs to log in, and REPLICATION SLAVE \
                     and BINLOG MONITOR; no access to the database itself)"
                ))
            } else {
                self.server_error(message)
            }
        })?;
        let settings = read_settings(&mut conn)
            .await
            .map_err(|message| self.server_error(message))?;
        for warning in settings.warnings() {
            tracing::warn!(database = %self.archive.database(), "{warning}");
        }
        let problems = settings.problems();
        if !problems.is_empty() {
            return Err(self.settings_error(format!(
                "{} cannot stream its binlog to the archive: {}",
                shown(&opts),
                problems.join("; ")
            )));
        }
        let catalog = self.archive.catalog().await?;
        let archived_to = catalog.end();
        let listed = binary_logs(&mut conn)
            .await
            .map_err(|message| self.server_error(message))?;
        let start_file = match &archived_to {
            Some(Position::Binlog { file, .. }) => file.clone(),
            Some(other) => {
                return Err(self.settings_error(format!(
                    "the archive of {} holds another database's log (it ends at {other}), not \
                     binlogs: is the runbook's database the one archived there?",
                    self.config.database
                )));
            }
            None => server_position(&mut conn)
                .await
                .map_err(|message| self.server_error(message))?
                .as_binlog()
                .map(|(file, _)| file.to_owned())
                .unwrap_or_default(),
        };
        if !listed.iter().any(|(file, _)| *file == start_file) {
            return Err(self.settings_error(format!(
                "binlog file {start_file}, where the archive ends, is no longer on the server \
                 (it has {}): it was purged before it was archived, so the archive cannot go \
                 on without a gap. Keep binlogs longer (binlog_expire_logs_seconds); to start \
                 a new archive, move archive/{} aside in the storage",
                listed
                    .iter()
                    .map(|(file, _)| file.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.config.database
            )));
        }
        let dir = fresh_run_dir(&self.config.spool_dir)
            .map_err(|e| self.io(&self.config.spool_dir, e))?;
        let mut state = SessionState {
            dir: dir.clone(),
            archived_to,
            gtids: None,
        };
        self.publish(&state, None);

        let mut command = Command::new(tool(&self.config.mariadb, "mariadb-binlog"));
        command.arg("--no-defaults");
        client_args(&mut command, &opts);
        command
            .args(["--read-from-remote-server", "--raw", "--stop-never"])
            .arg(format!(
                "--stop-never-slave-server-id={}",
                self.config.server_id
            ))
            .arg(format!("--result-file={}/", dir.display()))
            .arg(&start_file)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|error| {
            self.settings_error(format!(
                "cannot run {}: {error}; set bin_dir to the directory of the MariaDB client \
                 tools",
                tool(&self.config.mariadb, "mariadb-binlog").display()
            ))
        })?;
        let mut stderr = ClientStderr::new("mariadb-binlog", &self.config.database, &mut child);
        self.status.send_modify(|status| status.streaming = true);
        let mut ticks = tokio::time::interval(self.config.chunk_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let ended = loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    // Raw mode writes each event as it arrives; whatever is cut
                    // short is not pushed (only whole events are).
                    let _ = child.kill().await;
                    break Ended::Cancelled;
                }
                status = child.wait() => break Ended::Exited(stderr.exit_reason(status).await),
                () = stderr.next_line() => {}
                _ = ticks.tick() => {
                    self.sweep(&mut state).await?;
                    let server = server_position(&mut conn)
                        .await
                        .map_err(|message| self.server_error(message))?;
                    self.publish(&state, Some(server));
                }
            }
        };
        self.sweep(&mut state).await?;
        let server = server_position(&mut conn).await.ok();
        self.publish(&state, server);
        let _ = conn.disconnect().await;
        Ok(ended)
    }

    fn publish(&self, state: &SessionState, server: Option<Position>) {
        self.status.send_modify(|status| {
            status.archived_to = state.archived_to.clone();
            if server.is_some() {
                status.server_position = server;
            }
        });
    }

    /// Pushes the whole events the spool holds past the archive's end, file by
    /// file, and removes the files wholly archived.
    ///
    /// The file being written is taken up to its length when the sweep first looks
    /// at it: under steady load it grows while a chunk is pushed, and a sweep that
    /// chased it returned only when the load paused. The archiver then never looked
    /// at its cancellation (the service could not stop while clients wrote) and
    /// pushed a chunk as fast as storage took one, whatever `chunk_interval` said.
    async fn sweep(&self, state: &mut SessionState) -> Result<(), ArchiveError> {
        let mut lengths = BTreeMap::new();
        loop {
            let files = spool_binlogs(&state.dir).map_err(|e| self.io(&state.dir, e))?;
            let (file, offset) = match &state.archived_to {
                Some(Position::Binlog { file, offset }) => (file.clone(), *offset),
                Some(_) => return Ok(()),
                // A new archive starts at the first file streamed.
                None => match files.first() {
                    Some(first) => (first.clone(), binlog::FIRST_EVENT),
                    None => return Ok(()),
                },
            };
            let Some(index) = files.iter().position(|name| *name == file) else {
                return Ok(());
            };
            let next = files.get(index + 1);
            let path = state.dir.join(&file);
            let current = tokio::fs::metadata(&path)
                .await
                .map_err(|e| self.io(&path, e))?
                .len();
            // A file with a next one is whole (raw mode writes the next file only
            // after this one's last event): its length is final.
            let len = match next {
                Some(_) => current,
                None => *lengths.entry(file.clone()).or_insert(current),
            };
            if len < offset {
                // Still streaming up to where the archive ends.
                return Ok(());
            }
            if state.gtids.is_none() {
                // The GTID state at the archive's end: from the file's GTID list and
                // the transactions before the end.
                // Read a chunk's worth at a time: the file may be large.
                let mut gtids = GtidState::new();
                let mut at = binlog::FIRST_EVENT;
                while at < offset {
                    let before = read_range(&path, at, (offset - at).min(CHUNK_MAX))
                        .await
                        .map_err(|e| self.io(&path, e))?;
                    let walked = binlog::walk(&before, at, CHUNK_MAX).map_err(|problem| {
                        self.server_error(format!("spool file {}: {problem}", path.display()))
                    })?;
                    if walked.events == 0 {
                        // One event longer than a chunk holds no GTID list or GTID:
                        // step over it by its length.
                        let length = before
                            .get(9..13)
                            .map(|b| u64::from(u32::from_le_bytes(b.try_into().expect("4"))))
                            .unwrap_or(0);
                        if length == 0 {
                            break;
                        }
                        at += length;
                        continue;
                    }
                    binlog::track_gtids(&before[..(walked.end - at) as usize], &mut gtids);
                    at = walked.end;
                }
                state.gtids = Some(gtids);
            }
            let mut bytes = read_range(&path, offset, (len - offset).min(CHUNK_MAX))
                .await
                .map_err(|e| self.io(&path, e))?;
            let mut walk = binlog::walk(&bytes, offset, CHUNK_MAX).map_err(|problem| {
                self.server_error(format!("spool file {}: {problem}", path.display()))
            })?;
            if walk.events == 0 && len - offset > CHUNK_MAX {
                // One event longer than a chunk: taken whole, however long.
                let header = read_range(&path, offset, binlog::HEADER_LEN as u64)
                    .await
                    .map_err(|e| self.io(&path, e))?;
                let length = u64::from(u32::from_le_bytes(
                    header[9..13].try_into().expect("4 bytes"),
                ));
                if offset + length <= len {
                    bytes = read_range(&path, offset, length)
                        .await
                        .map_err(|e| self.io(&path, e))?;
                    walk = binlog::walk(&bytes, offset, u64::MAX).map_err(|problem| {
                        self.server_error(format!("spool file {}: {problem}", path.display()))
                    })?;
                }
            }
            let mut gtids = state.gtids.clone().unwrap_or_default();
            let (chunk, content) = if walk.events > 0 {
                bytes.truncate((walk.end - offset) as usize);
                binlog::track_gtids(&bytes, &mut gtids);
                let (end, closed_by) = if walk.closes_file() {
                    let next_file = binlog::next_file(&file).ok_or_else(|| {
                        self.server_error(format!(
                            "binlog file {file} has no number to follow it with"
                        ))
                    })?;
                    let closed_by = if walk.last_type == Some(binlog::ROTATE_EVENT) {
                        "rotate"
                    } else {
                        "stop"
                    };
                    (
                        Position::binlog(&next_file, binlog::FIRST_EVENT),
                        Some(closed_by),
                    )
                } else if let Some(next) = next.filter(|_| walk.end == len) {
                    (
                        Position::binlog(next, binlog::FIRST_EVENT),
                        Some("next file"),
                    )
                } else {
                    (Position::binlog(&file, walk.end), None)
                };
                let mut chunk = binlog_chunk(
                    binlog::chunk_name(&file, offset, walk.end),
                    &file,
                    offset,
                    walk.end,
                    end,
                    &gtids,
                );
                if let Some(closed_by) = closed_by {
                    chunk
                        .details
                        .insert("closed_by".to_owned(), closed_by.to_owned());
                }
                (chunk, Bytes::from(bytes))
            } else if let Some(next) = next.filter(|_| offset == len) {
                // The server moved on and this file has nothing more: it ends here.
                let mut chunk = binlog_chunk(
                    binlog::end_chunk_name(&file, offset),
                    &file,
                    offset,
                    offset,
                    Position::binlog(next, binlog::FIRST_EVENT),
                    &gtids,
                );
                chunk
                    .details
                    .insert("closed_by".to_owned(), "next file".to_owned());
                (chunk, Bytes::new())
            } else {
                return Ok(());
            };
            let end = chunk.end.clone();
            let outcome = self
                .archive
                .push(chunk, ChunkContent::Bytes(content))
                .await?;
            self.stored(&outcome);
            let moved_on = end
                .as_ref()
                .and_then(Position::as_binlog)
                .is_some_and(|(end_file, _)| end_file != file);
            state.archived_to = end;
            state.gtids = Some(gtids);
            self.status
                .send_modify(|status| status.archived_to = state.archived_to.clone());
            if moved_on {
                // Wholly archived: the spool need not keep it.
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
    }

    fn stored(&self, outcome: &PushOutcome) {
        if let PushOutcome::Stored(record) = outcome {
            tracing::info!(database = %self.config.database, chunk = %record.name, "archived");
            self.status.send_modify(|status| {
                status.last_chunk = Some(record.name.clone());
                status.chunks_stored += 1;
            });
        }
    }
}

fn binlog_chunk(
    name: String,
    file: &str,
    start: u64,
    end_in_file: u64,
    end: Position,
    gtids: &GtidState,
) -> NewChunk {
    let mut details = BTreeMap::from([
        ("file".to_owned(), file.to_owned()),
        ("end_offset".to_owned(), end_in_file.to_string()),
    ]);
    if !gtids.is_empty() {
        details.insert("gtid_binlog_pos".to_owned(), binlog::gtid_text(gtids));
    }
    NewChunk {
        name,
        kind: ChunkKind::MariadbBinlog,
        timeline: None,
        start: Some(Position::binlog(file, start)),
        end: Some(end),
        segment_size: None,
        details,
    }
}

fn tool(config: &MariadbConfig, name: &str) -> PathBuf {
    match &config.bin_dir {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

/// How a MariaDB client tool reaches the server `opts` name: host and port (or the
/// socket) and user on the command line, the password in `MYSQL_PWD`.
fn client_args(command: &mut Command, opts: &Opts) {
    connection_args(command, opts);
    match opts.pass() {
        Some(password) => command.env("MYSQL_PWD", password),
        None => command.env_remove("MYSQL_PWD"),
    };
}

/// Host and port (or the socket) and user of the server `opts` name, as MariaDB's
/// tools take them on the command line; the password is the caller's to pass.
pub(crate) fn connection_args(command: &mut Command, opts: &Opts) {
    match opts.socket() {
        Some(socket) => command
            .arg("--protocol=SOCKET")
            .arg(format!("--socket={socket}")),
        None => command
            .arg("--protocol=TCP")
            .arg(format!("--host={}", opts.ip_or_hostname()))
            .arg(format!("--port={}", opts.tcp_port())),
    };
    if let Some(user) = opts.user() {
        command.arg(format!("--user={user}"));
    }
}

/// `opts` without the database: the binlog is the server's, and the archiver's
/// role needs no access to any database.
fn server_only(opts: &Opts) -> Opts {
    mysql_async::OptsBuilder::from_opts(opts.clone())
        .db_name(None::<String>)
        .into()
}

/// A new, empty run directory under the spool; the runs before it are removed (a
/// mariadb-binlog a killed archiver left behind writes into its own, now unlinked,
/// files, and fails when it next opens one).
fn fresh_run_dir(spool: &Path) -> std::io::Result<PathBuf> {
    for entry in std::fs::read_dir(spool)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    let dir = spool.join(format!(
        "run-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// The binlog files in a run directory, in log order.
fn spool_binlogs(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .filter(|name| binlog::sequence(name).is_some())
        .collect();
    names.sort_by_key(|name| (binlog::sequence(name), name.clone()));
    Ok(names)
}

async fn read_range(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut bytes).await?;
    Ok(bytes)
}

/// `SHOW BINARY LOGS`: each file the server has, and its size.
async fn binary_logs(conn: &mut Conn) -> Result<Vec<(String, u64)>, String> {
    let rows: Vec<mysql_async::Row> = conn
        .query("SHOW BINARY LOGS")
        .await
        .map_err(|e| format!("listing the binlog files (SHOW BINARY LOGS): {e}"))?;
    Ok(rows
        .into_iter()
        .filter_map(|row| Some((row.get::<String, _>(0)?, row.get::<u64, _>(1)?)))
        .collect())
}

/// The server's binlog position now (`SHOW MASTER STATUS`).
pub async fn server_position(conn: &mut Conn) -> Result<Position, String> {
    let row: Option<mysql_async::Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(|e| format!("reading the binlog position (SHOW MASTER STATUS): {e}"))?;
    let row = row.ok_or("SHOW MASTER STATUS returned nothing: is log_bin on?")?;
    let file: String = row.get(0).ok_or("SHOW MASTER STATUS has no file")?;
    let offset: u64 = row.get(1).ok_or("SHOW MASTER STATUS has no position")?;
    Ok(Position::binlog(&file, offset))
}

/// The settings binlog archiving needs, as read from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogSettings {
    pub log_bin: bool,
    pub binlog_format: String,
    pub binlog_row_image: String,
    /// `binlog_row_metadata` (MariaDB 10.5+; none on older servers): `FULL` puts
    /// column names and the primary key in the binlog, which `stillpoint changes`
    /// needs (archiving and restores do not).
    pub binlog_row_metadata: Option<String>,
    pub user: String,
    /// The account's grants, as `SHOW GRANTS` prints them.
    pub grants: Vec<String>,
}

impl BinlogSettings {
    /// Every setting or grant that keeps the binlog from being archived (or a point
    /// from being replayed exactly), each with its fix; empty when archiving can
    /// run.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.log_bin {
            problems.push(
                "the binlog is off (log_bin); set log_bin = binlog (and a server_id) in the \
                 server's configuration and restart it"
                    .to_owned(),
            );
        }
        if !self.binlog_format.eq_ignore_ascii_case("ROW") {
            problems.push(format!(
                "binlog_format is {}; set binlog_format = ROW (replay must apply exactly the \
                 rows that changed)",
                self.binlog_format
            ));
        }
        if !self.binlog_row_image.eq_ignore_ascii_case("FULL") {
            problems.push(format!(
                "binlog_row_image is {}; set binlog_row_image = FULL",
                self.binlog_row_image
            ));
        }
        for (privilege, why) in [
            ("REPLICATION SLAVE", "to stream the binlog"),
            ("BINLOG MONITOR", "to list the binlog files and position"),
        ] {
            if !self.has_global(privilege) {
                problems.push(format!(
                    "{user} lacks {privilege} ({why}); run GRANT {privilege} ON *.* TO {user}",
                    user = self.user
                ));
            }
        }
        problems
    }

    /// What keeps `stillpoint changes` from exporting this server's binlog, with the
    /// fix; archiving runs without it, so these are warnings only.
    pub fn warnings(&self) -> Vec<String> {
        match self.binlog_row_metadata.as_deref() {
            Some(value) if value.eq_ignore_ascii_case("FULL") => Vec::new(),
            value => vec![format!(
                "binlog_row_metadata is {}; set binlog_row_metadata = FULL (MariaDB 10.5+)                  so that `stillpoint changes` can name the columns and primary key of each                  change (archiving and restores do not need it)",
                value.unwrap_or("not available on this server")
            )],
        }
    }

    fn has_global(&self, privilege: &str) -> bool {
        // REPLICATION CLIENT is the old name of BINLOG MONITOR (10.5+ prints the new
        // one); SUPER grants both on older servers.
        let aliases: Vec<&str> = match privilege {
            "BINLOG MONITOR" => vec!["BINLOG MONITOR", "REPLICATION CLIENT", "SUPER"],
            "REPLICATION SLAVE" => vec!["REPLICATION SLAVE", "REPLICATION REPLICA"],
            other => vec![other],
        };
        self.grants.iter().any(|grant| {
            let grant = grant.to_ascii_uppercase();
            grant
                .strip_prefix("GRANT ")
                .and_then(|rest| rest.split_once(" ON *.* TO "))
                .is_some_and(|(privileges, _)| {
                    privileges.contains("ALL PRIVILEGES")
                        || privileges.split(',').any(|p| aliases.contains(&p.trim()))
                })
        })
    }
}

async fn read_settings(conn: &mut Conn) -> Result<BinlogSettings, String> {
    let row: Option<(String, String, String, String)> = conn
        .query_first("SELECT @@log_bin, @@binlog_format, @@binlog_row_image, CURRENT_USER()")
        .await
        .map_err(|e| format!("reading the binlog settings: {e}"))?;
    let (log_bin, binlog_format, binlog_row_image, user) =
        row.ok_or("reading the binlog settings: no row")?;
    // A query of its own: servers before MariaDB 10.5 lack the variable, and that
    // must not keep them from being archived.
    let binlog_row_metadata: Option<String> = conn
        .query_first("SELECT @@binlog_row_metadata")
        .await
        .ok()
        .flatten();
    let grants: Vec<String> = conn
        .query("SHOW GRANTS")
        .await
        .map_err(|e| format!("reading the account's grants: {e}"))?;
    let user = match user.split_once('@') {
        Some((name, host)) => format!("'{name}'@'{host}'"),
        None => user,
    };
    Ok(BinlogSettings {
        log_bin: log_bin == "1" || log_bin.eq_ignore_ascii_case("on"),
        binlog_format,
        binlog_row_image,
        binlog_row_metadata,
        user,
        grants,
    })
}

/// Checks that the server `config.url` names can have its binlog archived; the
/// error names every setting or grant to change and how.
pub async fn check_server(config: &MariadbConfig) -> Result<(), String> {
    let opts = parse_url(&config.url)?;
    let mut conn = connect(&server_only(&opts)).await?;
    let settings = read_settings(&mut conn).await;
    let _ = conn.disconnect().await;
    let problems = settings?.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} cannot stream its binlog to the archive: {}",
            shown(&opts),
            problems.join("; ")
        ))
    }
}

/// Where replay needs the archive to start for a base at `from`: the beginning of
/// its file (mariadb-binlog reads the file's format description event, at offset
/// 4, before it seeks to the start position). What a point asks of the catalog is
/// `covers(&replay_from(base start), marker)`.
pub fn replay_from(from: &Position) -> Position {
    match from {
        Position::Binlog { file, .. } => Position::binlog(file, binlog::FIRST_EVENT),
        other => other.clone(),
    }
}

/// Where a replay writes.
#[derive(Debug, Clone)]
pub struct ReplayTarget {
    /// `mysql://user[:password]@host:port/database`: the database to apply to.
    pub url: String,
    /// The database the archived events were written to on the source (the base
    /// record's `details.database`): only its changes are applied, renamed to the
    /// target's database when the names differ.
    pub source_database: String,
    /// Where `mariadb-binlog` and `mariadb` live, when not on PATH.
    pub bin_dir: Option<PathBuf>,
    /// Where the binlog files are reassembled (removed afterwards).
    pub work_dir: PathBuf,
}

/// What a replay applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    pub from: Position,
    pub to: Position,
    /// The chunks read, in order.
    pub chunks: Vec<String>,
    /// Binlog bytes read from the archive.
    pub bytes: u64,
    /// The GTID state at `to`, when the archive's chunks show it.
    pub gtid_binlog_pos: Option<String>,
}

/// Applies the archived binlog from `from` (a base's position) up to `to` (a
/// point's marker, exclusive) to the target database. Every chunk needed is read
/// and checked first: a gap, a missing or damaged chunk is refused, naming it,
/// before anything is written to the target.
pub async fn replay(
    archive: &Archive,
    decryption: &Decryption,
    from: &Position,
    to: &Position,
    target: &ReplayTarget,
) -> Result<ReplayReport, ArchiveError> {
    fetch_range(archive, decryption, from, to, &target.work_dir)
        .await?
        .apply(target)
        .await
}

/// A point restore of one MariaDB database into `target.url` (a new, empty
/// database): the archive from the base to `to` is read and checked first, then the
/// base is restored and the binlog replayed. A missing or damaged chunk, or a
/// damaged base, is refused before anything is written.
pub async fn restore_point(
    archive: &Archive,
    decryption: &Decryption,
    base: &BaseRecord,
    to: &Position,
    target: &ReplayTarget,
) -> Result<ReplayReport, ArchiveError> {
    if base.database != archive.database() {
        return Err(ArchiveError::Settings {
            database: archive.database().to_owned(),
            message: format!(
                "base {} is of database {}, not {}",
                base.id,
                base.database,
                archive.database()
            ),
        });
    }
    let fetched = fetch_range(archive, decryption, &base.start, to, &target.work_dir).await?;
    pipeline::verify_checksum(archive.storage(), &base.artifact).await?;
    restore_base(
        archive.storage(),
        decryption,
        base,
        &target.url,
        target.bin_dir.as_deref(),
    )
    .await?;
    fetched.apply(target).await
}

/// Plain point-in-time replay, to an instant rather than a point's marker: applies
/// the archived binlog from `from` (a base's position) up to the archive's end,
/// stopped before the first event at or after `until_ms` (Unix ms, a whole second:
/// binlog event times have one-second resolution). Nothing proves the state at an
/// arbitrary instant consistent with the application's other databases; this exists
/// to show the difference (the points scenario's negative control). Every chunk is
/// read and checked before anything is written, as for [`replay`].
pub async fn replay_until_time(
    archive: &Archive,
    decryption: &Decryption,
    from: &Position,
    until_ms: i64,
    target: &ReplayTarget,
) -> Result<ReplayReport, ArchiveError> {
    let stop = stop_datetime(until_ms).map_err(|message| ArchiveError::Settings {
        database: archive.database().to_owned(),
        message,
    })?;
    let end = archive
        .catalog()
        .await?
        .end()
        .ok_or_else(|| ArchiveError::Settings {
            database: archive.database().to_owned(),
            message: "the archive is empty: there is no binlog to replay".to_owned(),
        })?;
    fetch_range(archive, decryption, from, &end, &target.work_dir)
        .await?
        .apply_stopping(target, Some(stop))
        .await
}

/// `until_ms` as `mariadb-binlog --stop-datetime` takes it (UTC, whole seconds).
fn stop_datetime(until_ms: i64) -> Result<String, String> {
    if until_ms % 1000 != 0 {
        return Err(format!(
            "replay can stop only at a whole second (binlog event times are whole seconds), \
             not at {until_ms} ms"
        ));
    }
    chrono::DateTime::from_timestamp_millis(until_ms)
        .map(|at| at.format("%Y-%m-%d %H:%M:%S").to_string())
        .ok_or_else(|| format!("{until_ms} ms is not a time"))
}

/// The binlog of a range, read from the archive, checked and reassembled into
/// files in a work directory (removed when dropped): what [`replay`] applies.
#[derive(Debug)]
pub struct FetchedRange {
    database: String,
    work: tempfile::TempDir,
    /// The reassembled files, in order.
    files: Vec<String>,
    report: ReplayReport,
}

impl FetchedRange {
    /// What was read.
    pub fn report(&self) -> &ReplayReport {
        &self.report
    }

    /// The reassembled files, in order (each starts with the magic and its format
    /// description event): what `stillpoint changes` decodes.
    pub fn paths(&self) -> Vec<(String, PathBuf)> {
        self.files
            .iter()
            .map(|name| (name.clone(), self.work.path().join(name)))
            .collect()
    }

    /// Applies the range to the target: `mariadb-binlog` reads the reassembled
    /// files (`--start-position` applies to the first, `--stop-position` to the
    /// last) and prints SQL, which the `mariadb` client applies.
    pub async fn apply(self, target: &ReplayTarget) -> Result<ReplayReport, ArchiveError> {
        self.apply_stopping(target, None).await
    }

    /// [`apply`](Self::apply), also stopped before the first event at or after
    /// `stop_datetime` (`mariadb-binlog --stop-datetime`, in UTC), when given.
    async fn apply_stopping(
        self,
        target: &ReplayTarget,
        stop_datetime: Option<String>,
    ) -> Result<ReplayReport, ArchiveError> {
        let database = self.database.clone();
        let refuse = |message: String| ArchiveError::Settings {
            database: database.clone(),
            message,
        };
        let (from, to) = (&self.report.from, &self.report.to);
        let (Some((_, from_offset)), Some((to_file, to_offset))) =
            (from.as_binlog(), to.as_binlog())
        else {
            return Err(refuse(format!("{from} and {to} are not binlog positions")));
        };
        let target_opts = parse_url(&target.url).map_err(|m| refuse(format!("the target: {m}")))?;
        let target_db = target_opts
            .db_name()
            .filter(|db| !db.is_empty())
            .ok_or_else(|| {
                refuse(format!(
                    "the target {} names no database",
                    shown(&target_opts)
                ))
            })?
            .to_owned();
        if from == to {
            return Ok(self.report);
        }
        let bin = |name: &str| match &target.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        };
        let mut decoder = Command::new(bin("mariadb-binlog"));
        decoder
            .arg("--no-defaults")
            .arg(format!("--start-position={from_offset}"))
            .arg(format!("--database={}", target.source_database));
        if target.source_database != target_db {
            decoder.arg(format!(
                "--rewrite-db={}->{target_db}",
                target.source_database
            ));
        }
        if self.files.last().map(String::as_str) == Some(to_file) {
            decoder.arg(format!("--stop-position={to_offset}"));
        }
        if let Some(at) = &stop_datetime {
            // mariadb-binlog reads the datetime in its own local time zone.
            decoder
                .env("TZ", "UTC")
                .arg(format!("--stop-datetime={at}"));
        }
        decoder
            .args(self.files.iter().map(|name| self.work.path().join(name)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut decoding = decoder.spawn().map_err(|e| {
            refuse(format!(
                "cannot run {}: {e}; set bin_dir to the MariaDB client tools' directory",
                bin("mariadb-binlog").display()
            ))
        })?;
        let sql = decoding.stdout.take().expect("stdout is piped");
        let decoder_stderr = decoding.stderr.take().expect("stderr is piped");
        let decoder_said = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut text = String::new();
            let _ = BufReader::new(decoder_stderr)
                .take(64 * 1024)
                .read_to_string(&mut text)
                .await;
            text
        }));
        let mut client = Command::new(bin("mariadb"));
        client
            .arg("--no-defaults")
            .arg("--batch")
            .arg("--max-allowed-packet=1073741824")
            // The replayed transactions are the source's, with its GTIDs: written to
            // the target server's binlog they would repeat those GTIDs there (and, for
            // a drill's scratch database on the source server, in the source's own
            // binlog, which its replicas follow). A restored copy starts a history of
            // its own.
            .arg("--init-command=SET SESSION sql_log_bin = 0");
        client_args(&mut client, &target_opts);
        client.arg(format!("--database={target_db}"));
        let applied =
            adapters::process::run_with_stdin(client, "the mariadb client", Box::pin(sql), false)
                .await;
        let decoded = decoding.wait().await;
        let decoder_said = decoder_said.await.unwrap_or_default();
        let server_error = |message: String| ArchiveError::Server {
            database: database.clone(),
            message,
        };
        if applied.is_err() && died_of_broken_pipe(&decoded) {
            return Err(server_error(format!(
                "applying the binlog from {from} to {to} to {}: {}",
                shown(&target_opts),
                applied.err().unwrap_or_default()
            )));
        }
        match decoded {
            Ok(status) if status.success() => {}
            Ok(status) => {
                return Err(server_error(format!(
                    "mariadb-binlog failed ({status}) replaying {from} to {to}: {}",
                    decoder_said.trim()
                )));
            }
            Err(e) => return Err(server_error(format!("waiting for mariadb-binlog: {e}"))),
        }
        applied.map_err(|message| {
            server_error(format!(
                "applying the binlog from {from} to {to} to {}: {message}",
                shown(&target_opts)
            ))
        })?;
        Ok(self.report)
    }
}

/// Whether the decoder died of SIGPIPE. A mariadb client that stopped on an error (a
/// duplicate key, a lost server) closes the pipe, and the decoder then dies of
/// SIGPIPE: the client's error is the cause, and the decoder's death says nothing.
fn died_of_broken_pipe(decoded: &std::io::Result<std::process::ExitStatus>) -> bool {
    matches!(decoded, Ok(status)
        if std::os::unix::process::ExitStatusExt::signal(status) == Some(13))
}

/// Reads every chunk of `[replay_from(from), to)` (each checked: the stored
/// checksum, the plaintext BLAKE3), and reassembles the binlog files in a new
/// directory under `work_dir`. A gap or a missing or damaged chunk is an error
/// naming it.
pub async fn fetch_range(
    archive: &Archive,
    decryption: &Decryption,
    from: &Position,
    to: &Position,
    work_dir: &Path,
) -> Result<FetchedRange, ArchiveError> {
    let database = archive.database().to_owned();
    let refuse = |message: String| ArchiveError::Settings {
        database: database.clone(),
        message,
    };
    let io = |path: &Path, source: std::io::Error| ArchiveError::Io {
        database: database.clone(),
        path: path.display().to_string(),
        source,
    };
    let Some((from_file, _)) = from.as_binlog() else {
        return Err(refuse(format!(
            "replay of a binlog needs binlog positions, not {from}"
        )));
    };
    if to.as_binlog().is_none() || to < from {
        return Err(refuse(format!(
            "cannot replay from {from} to {to}: the end must be a binlog position at or \
             after the start"
        )));
    }
    let catalog = archive.catalog().await?;
    let start = replay_from(from);
    catalog
        .covers(&start, to)
        .map_err(|reason| ArchiveError::NotCovered(Box::new(reason)))?;
    let work = tempfile::Builder::new()
        .prefix("stillpoint-replay-")
        .tempdir_in(work_dir)
        .map_err(|e| io(work_dir, e))?;
    let mut report = ReplayReport {
        from: from.clone(),
        to: to.clone(),
        chunks: Vec::new(),
        bytes: 0,
        gtid_binlog_pos: None,
    };
    // (name, open file, bytes written so far = the next offset)
    let mut files: Vec<(String, std::fs::File, u64)> = Vec::new();
    for chunk in &catalog.chunks {
        let Some((chunk_start, chunk_end)) = chunk.range() else {
            continue;
        };
        if *chunk_end <= start || chunk_start >= to {
            continue;
        }
        let Some((file, offset)) = chunk_start.as_binlog() else {
            continue;
        };
        let bytes = archive.read(chunk, decryption).await?;
        if files.last().is_none_or(|(name, _, _)| name != file) {
            let path = work.path().join(file);
            let mut created = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
            std::io::Write::write_all(&mut created, &binlog::MAGIC).map_err(|e| io(&path, e))?;
            files.push((file.to_owned(), created, binlog::FIRST_EVENT));
        }
        let (name, written, at) = files.last_mut().expect("pushed above");
        if *at != offset {
            return Err(refuse(format!(
                "chunk {} starts at {name}:{offset}, but the chunks before it end at \
                 {name}:{at}",
                chunk.name
            )));
        }
        let path = work.path().join(&*name);
        std::io::Write::write_all(written, &bytes).map_err(|e| io(&path, e))?;
        *at += bytes.len() as u64;
        report.bytes += bytes.len() as u64;
        report.chunks.push(chunk.name.clone());
        if chunk_end <= to {
            report.gtid_binlog_pos = chunk.details.get("gtid_binlog_pos").cloned();
        }
    }
    for (name, file, _) in &files {
        file.sync_all()
            .map_err(|e| io(&work.path().join(name), e))?;
    }
    let names: Vec<String> = files.into_iter().map(|(name, _, _)| name).collect();
    if names.first().map(String::as_str) != Some(from_file) {
        return Err(refuse(format!(
            "the archive holds no chunk of {from_file}, where the replay starts"
        )));
    }
    Ok(FetchedRange {
        database,
        work,
        files: names,
        report,
    })
}

/// Takes a base backup of a MariaDB database into `bases/<database>/<id>/` by the
/// database's `base_method`: `mariadb-backup --stream` (the default,
/// `archive::mariadb_backup`), or the adapter's consistent dump (one snapshot; no
/// pause needed, a point replays from the snapshot's binlog position to its own
/// marker), stored through the pipeline, then the record. The server's binlog must
/// be on.
pub async fn base_backup(
    storage: &Storage,
    settings: &PipelineSettings,
    database: &str,
    config: &MariadbConfig,
) -> Result<BaseRecord, ArchiveError> {
    if config.base_method == MariadbBaseMethod::MariadbBackup {
        return super::mariadb_backup::base_backup(storage, settings, database, config).await;
    }
    let id = base::new_base_id();
    let prefix = base::base_prefix(database, &id)?;
    settings.check()?;
    let started_at_ms = chrono::Utc::now().timestamp_millis();
    let adapter_error = |e: adapters::AdapterError| ArchiveError::Server {
        database: database.to_owned(),
        message: e.to_string(),
    };
    let adapter = adapters::mariadb::Mariadb::new(database, config.clone());
    let mut prepared = adapter.prepare().await.map_err(adapter_error)?;
    let cut = prepared.cut(&id).await.map_err(adapter_error)?;
    let (Some(file), Some(offset)) = (
        cut.details.get("binlog_file"),
        cut.details
            .get("binlog_position")
            .and_then(|p| p.parse::<u64>().ok()),
    ) else {
        return Err(ArchiveError::Settings {
            database: database.to_owned(),
            message: "the server's binlog is off, so a base backup has no position to replay \
                      from; set log_bin (and binlog_format = ROW) and restart the server"
                .to_owned(),
        });
    };
    let start = Position::binlog(file, offset);
    let copy = prepared.copy().await.map_err(adapter_error)?;
    let path = format!("{prefix}/{database}.sql{}", settings.suffix());
    let stored = pipeline::store(copy.stream, settings, storage, &path, |_| {}).await;
    let summary = copy.finished.await;
    let (artifact, summary) = match (stored, summary) {
        (Ok(artifact), Ok(summary)) => (artifact, summary),
        (stored, summary) => {
            let _ = storage.delete(&path).await;
            return Err(match (stored, summary) {
                (_, Err(e)) => adapter_error(e),
                (Err(e), _) => e.into(),
                _ => unreachable!("one of the two failed"),
            });
        }
    };
    let mut details: BTreeMap<String, String> = cut
        .details
        .iter()
        .filter(|(key, _)| {
            matches!(
                key.as_str(),
                "database" | "server_version" | "gtid_binlog_pos" | "tables" | "views"
            )
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    for (table, rows) in summary.row_counts.unwrap_or_default() {
        details.insert(format!("rows.{table}"), rows.to_string());
    }
    let finished_at_ms = chrono::Utc::now().timestamp_millis();
    details.insert(
        "took_ms".to_owned(),
        (finished_at_ms - started_at_ms).max(0).to_string(),
    );
    let record = BaseRecord {
        format: base::BASE_FORMAT,
        id,
        database: database.to_owned(),
        adapter: "mariadb".to_owned(),
        kind: "mariadb_dump".to_owned(),
        // One snapshot: consistent where it starts.
        end: start.clone(),
        start,
        timeline: None,
        started_at_ms,
        finished_at_ms,
        artifact,
        details,
    };
    if let Err(error) = base::write_record(storage, &record).await {
        let _ = storage.delete(&path).await;
        return Err(error);
    }
    Ok(record)
}

/// Restores a MariaDB dump base backup into `target` (a new, empty database): the
/// artifact's checksum is checked first (nothing written yet), then the dump is
/// streamed into the `mariadb` client, which must see its end marker. A
/// `mariadb_backup` base restores into a data directory instead
/// (`archive::mariadb_backup::restore_base`).
pub async fn restore_base(
    storage: &Storage,
    decryption: &Decryption,
    record: &BaseRecord,
    target: &str,
    bin_dir: Option<&Path>,
) -> Result<(), ArchiveError> {
    if record.adapter != "mariadb" {
        return Err(ArchiveError::Settings {
            database: record.database.clone(),
            message: format!(
                "base {} was made by the {} adapter, not mariadb",
                record.id, record.adapter
            ),
        });
    }
    if record.kind == super::mariadb_backup::KIND {
        return Err(ArchiveError::Settings {
            database: record.database.clone(),
            message: format!(
                "base {} is a mariadb-backup copy of the whole server: it restores into a \
                 new data directory, not into a database",
                record.id
            ),
        });
    }
    pipeline::verify_checksum(storage, &record.artifact).await?;
    let stream = pipeline::open(storage, &record.artifact, decryption).await?;
    let adapter = adapters::mariadb::Mariadb::new(
        &record.database,
        MariadbConfig {
            url: target.to_owned(),
            bin_dir: bin_dir.map(Path::to_owned),
            drill_server_url: None,
            base_method: Default::default(),
        },
    );
    adapter
        .restore(stream, target)
        .await
        .map_err(|e| ArchiveError::Server {
            database: record.database.clone(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mariadb client's error is reported when the decoder merely died of the
    /// pipe the client closed (it said "mariadb-binlog failed (signal: 13 (SIGPIPE))"
    /// and nothing of the duplicate key behind it); a decoder that failed on its own
    /// is still reported as itself.
    #[test]
    fn a_decoder_killed_by_the_closed_pipe_is_not_the_cause() {
        use std::os::unix::process::ExitStatusExt;
        let status = |raw| Ok(std::process::ExitStatus::from_raw(raw));
        assert!(died_of_broken_pipe(&status(13)));
        assert!(!died_of_broken_pipe(&status(0)));
        assert!(!died_of_broken_pipe(&status(1 << 8)));
        assert!(!died_of_broken_pipe(&status(9)));
        assert!(!died_of_broken_pipe(&Err(std::io::Error::other("wait"))));
    }

    fn ready() -> BinlogSettings {
        BinlogSettings {
            log_bin: true,
            binlog_format: "ROW".to_owned(),
            binlog_row_image: "FULL".to_owned(),
            binlog_row_metadata: Some("FULL".to_owned()),
            user: "'archiver'@'%'".to_owned(),
            grants: vec![
                "GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `archiver`@`%` IDENTIFIED \
                 BY PASSWORD '*x'"
                    .to_owned(),
            ],
        }
    }

    /// A replay by time stops at a whole second, given to mariadb-binlog in UTC.
    #[test]
    fn a_replay_stops_at_a_whole_second_in_utc() {
        assert_eq!(
            stop_datetime(1_764_479_419_000).as_deref(),
            Ok("2025-11-30 05:10:19")
        );
        let error = stop_datetime(1_764_479_419_500).unwrap_err();
        assert!(error.contains("whole second"), "{error}");
    }

    /// binlog_row_metadata is what `changes` needs, not archiving: a warning naming
    /// the setting, never a problem.
    #[test]
    fn row_metadata_is_a_warning_for_changes_not_a_problem_for_archiving() {
        assert!(ready().warnings().is_empty());
        for value in [Some("MINIMAL".to_owned()), None] {
            let settings = BinlogSettings {
                binlog_row_metadata: value,
                ..ready()
            };
            assert!(settings.problems().is_empty());
            let warnings = settings.warnings();
            assert_eq!(warnings.len(), 1);
            assert!(
                warnings[0].contains("set binlog_row_metadata = FULL"),
                "{warnings:?}"
            );
        }
    }

    /// Each missing setting or grant is named with what to change, one problem each.
    #[test]
    fn each_setting_archiving_needs_is_named_with_its_fix() {
        assert!(ready().problems().is_empty());
        let root = BinlogSettings {
            grants: vec!["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost`".to_owned()],
            ..ready()
        };
        assert!(root.problems().is_empty());
        let old_name = BinlogSettings {
            grants: vec![
                "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO `a`@`%`".to_owned(),
            ],
            ..ready()
        };
        assert!(old_name.problems().is_empty());
        let cases: [(BinlogSettings, &str); 5] = [
            (
                BinlogSettings {
                    log_bin: false,
                    ..ready()
                },
                "set log_bin = binlog",
            ),
            (
                BinlogSettings {
                    binlog_format: "MIXED".to_owned(),
                    ..ready()
                },
                "binlog_format is MIXED; set binlog_format = ROW",
            ),
            (
                BinlogSettings {
                    binlog_row_image: "MINIMAL".to_owned(),
                    ..ready()
                },
                "set binlog_row_image = FULL",
            ),
            (
                BinlogSettings {
                    grants: vec!["GRANT BINLOG MONITOR ON *.* TO `archiver`@`%`".to_owned()],
                    ..ready()
                },
                "GRANT REPLICATION SLAVE ON *.* TO 'archiver'@'%'",
            ),
            (
                BinlogSettings {
                    // On one database only: not what streaming needs.
                    grants: vec![
                        "GRANT REPLICATION SLAVE ON *.* TO `archiver`@`%`".to_owned(),
                        "GRANT ALL PRIVILEGES ON `app`.* TO `archiver`@`%`".to_owned(),
                    ],
                    ..ready()
                },
                "GRANT BINLOG MONITOR ON *.* TO 'archiver'@'%'",
            ),
        ];
        for (settings, expected) in cases {
            let problems = settings.problems();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(expected), "{problems:?}");
        }
    }

    #[test]
    fn replay_starts_at_the_beginning_of_the_bases_file() {
        assert_eq!(
            replay_from(&Position::binlog("binlog.000007", 12345)),
            Position::binlog("binlog.000007", 4)
        );
    }

    /// An event of `length` bytes of type `kind` at `offset`.
    fn event(offset: u64, kind: u8, length: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; length];
        bytes[4] = kind;
        bytes[9..13].copy_from_slice(&(length as u32).to_le_bytes());
        bytes[13..17].copy_from_slice(&((offset + length as u64) as u32).to_le_bytes());
        bytes
    }

    fn write(dir: &Path, file: &str, events: &[Vec<u8>]) {
        let mut bytes = binlog::MAGIC.to_vec();
        for event in events {
            bytes.extend(event);
        }
        std::fs::write(dir.join(file), bytes).unwrap();
    }

    /// An archiver of database `app` that sweeps `spool` into file storage at
    /// `storage`, with no server behind it.
    fn spool_archiver(storage: &Path, spool: &Path) -> (Archive, BinlogArchiver) {
        let storage = Storage::open(&format!("file://{}", storage.display())).unwrap();
        let archive = Archive::new(storage, PipelineSettings::default(), "app").unwrap();
        let config = BinlogArchiverConfig::new(
            "app",
            MariadbConfig {
                url: "mysql://u@127.0.0.1:1/app".to_owned(),
                bin_dir: None,
                drill_server_url: None,
                base_method: Default::default(),
            },
            spool,
            Duration::from_secs(1),
        );
        (archive.clone(), BinlogArchiver::new(config, archive))
    }

    /// A sweep of a file that grows all the while (a server under steady load)
    /// ends, at the length the file had when the sweep began.
    #[tokio::test]
    async fn a_sweep_ends_while_the_file_keeps_growing() {
        let (storage_dir, spool) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (archive, archiver) = spool_archiver(storage_dir.path(), spool.path());
        let dir = fresh_run_dir(spool.path()).unwrap();
        write(&dir, "binlog.000001", &[event(4, 15, 100)]);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, path) = (stop.clone(), dir.join("binlog.000001"));
            std::thread::spawn(move || {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                let mut offset = 104;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    file.write_all(&event(offset, 2, 50)).unwrap();
                    offset += 50;
                    std::thread::sleep(Duration::from_micros(200));
                }
                offset
            })
        };
        let mut state = SessionState {
            dir,
            archived_to: None,
            gtids: None,
        };
        // Many sweeps: one that chases the file would not come back while it grows.
        for _ in 0..20 {
            let sweep = archiver.sweep(&mut state);
            let swept = tokio::time::timeout(Duration::from_secs(60), sweep).await;
            assert!(swept.is_ok(), "a sweep did not end while the file grew");
            swept.unwrap().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.join().unwrap();
        // Once the file stops growing, one more sweep takes the rest.
        archiver.sweep(&mut state).await.unwrap();
        assert_eq!(
            state.archived_to,
            Some(Position::binlog("binlog.000001", written))
        );
        assert!(archive.catalog().await.unwrap().gaps().is_empty());
    }

    /// What the archiver pushes from a spool, without a server: whole events only,
    /// a ROTATE ends a file at the next one's start, a file the server left without
    /// one (a crash) is closed by an end chunk once the next file appears, and a new
    /// run that streams the file again pushes only what lies past the archive's end.
    #[tokio::test]
    async fn the_spool_is_cut_at_whole_events_and_files_follow_each_other() {
        let (storage_dir, spool) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (archive, archiver) = spool_archiver(storage_dir.path(), spool.path());
        let run = |archived_to| {
            let dir = fresh_run_dir(spool.path()).unwrap();
            SessionState {
                dir,
                archived_to,
                gtids: None,
            }
        };
        let mut state = run(None);
        let dir = state.dir.clone();
        // Two whole events and the first 10 bytes of a third.
        let third = event(154, 2, 31);
        write(
            &dir,
            "binlog.000001",
            &[event(4, 15, 100), event(104, 2, 50), third[..10].to_vec()],
        );
        archiver.sweep(&mut state).await.unwrap();
        assert_eq!(
            state.archived_to,
            Some(Position::binlog("binlog.000001", 154))
        );
        // The rest of it, then the ROTATE.
        write(
            &dir,
            "binlog.000001",
            &[
                event(4, 15, 100),
                event(104, 2, 50),
                third.clone(),
                event(185, binlog::ROTATE_EVENT, 40),
            ],
        );
        write(&dir, "binlog.000002", &[event(4, 15, 100)]);
        archiver.sweep(&mut state).await.unwrap();
        assert_eq!(
            state.archived_to,
            Some(Position::binlog("binlog.000002", 104))
        );
        assert!(
            !dir.join("binlog.000001").exists(),
            "archived files leave the spool"
        );
        // The server crashed: binlog.000003 appears, binlog.000002 never got a ROTATE.
        write(&dir, "binlog.000003", &[event(4, 15, 60)]);
        archiver.sweep(&mut state).await.unwrap();
        assert_eq!(
            state.archived_to,
            Some(Position::binlog("binlog.000003", 64))
        );

        // A new run streams binlog.000003 again, longer now.
        let mut state = run(archive.catalog().await.unwrap().end());
        write(
            &state.dir,
            "binlog.000003",
            &[event(4, 15, 60), event(64, 2, 30)],
        );
        assert!(!dir.exists(), "the earlier run's directory is removed");
        archiver.sweep(&mut state).await.unwrap();

        let catalog = archive.catalog().await.unwrap();
        let chunks: Vec<(&str, Option<&str>)> = catalog
            .chunks
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.details.get("closed_by").map(String::as_str),
                )
            })
            .collect();
        assert_eq!(
            chunks,
            [
                ("binlog.000001.000000000004-00000000009A", None),
                ("binlog.000001.00000000009A-0000000000E1", Some("rotate")),
                ("binlog.000002.000000000004-000000000068", None),
                ("binlog.000002.000000000068.end", Some("next file")),
                ("binlog.000003.000000000004-000000000040", None),
                ("binlog.000003.000000000040-00000000005E", None),
            ]
        );
        assert!(catalog.gaps().is_empty(), "{:?}", catalog.gaps());
        catalog
            .covers(
                &Position::binlog("binlog.000001", 4),
                &Position::binlog("binlog.000003", 94),
            )
            .unwrap();
        // Each chunk holds exactly its file's bytes.
        let second = archive
            .read(&catalog.chunks[1], &Decryption::None)
            .await
            .unwrap();
        let mut expected = third;
        expected.extend(event(185, binlog::ROTATE_EVENT, 40));
        assert!(second == expected);
    }
}
