//! PostgreSQL point-in-time recovery to a backup's restore point.
//!
//! A logical copy (`pg_dump`) restores the state at the cut; point-in-time recovery
//! gets the same state from a physical base backup plus the WAL archive, replayed up
//! to the marker the cut left in the WAL. Three targets come from the manifest:
//! the named restore point (`pg_create_restore_point` inside the pause), the WAL insert
//! LSN read inside the pause, and the window's mid-time. Since nothing commits while
//! the cluster is paused, all three give the state at the cut.
//!
//! - [`base_backup`]: `pg_basebackup` (plain format, WAL streamed alongside) into an
//!   empty directory, tablespaces mapped into it; the password goes by `PGPASSWORD`,
//!   never the command line. A cancelled or failed one is killed with its WAL
//!   streamer and what it wrote removed.
//! - [`recover`]: refuses a base backup that starts after the cut (it already holds
//!   later commits, which no target can take back); copies the base backup into a
//!   scratch data directory without the source's lock file (`postmaster.pid`) (or has
//!   the caller extract it there: [`BaseBackup::Extract`]), and
//!   starts a throwaway server there on a configuration of its own
//!   (`stillpoint-pitr.conf`: the base backup's postgresql.conf when it has one, then
//!   ours; our own pg_hba.conf), with `recovery.signal` and the target. It listens on
//!   127.0.0.1 and on a unix socket inside the scratch directory, which is how we talk
//!   to it: nothing else can answer there. Archiving is off so it can never write into
//!   the source's archive. It waits until the server has replayed to the target and
//!   promoted, checks the rows per table against those counted at the cut, and reports
//!   the state, with a content hash when asked (every table read back). WAL comes from
//!   an archive directory, or from a [`spool`] the caller fills while replay runs
//!   ([`WalArchive::Spool`]). The server is stopped through the process we
//!   started (never a pid file we did not write), also when the caller cancels; the
//!   data directory (made absolute, and locked so two recoveries cannot share it)
//!   stays only if asked; one the operator made is emptied, not removed. PostgreSQL refuses to run as root, so a root
//!   caller names a system user to run it as (`setpriv`, which execs the server in its
//!   own place, so the process we started *is* the postmaster).
//! - Why a recovery failed is read from the server's log and put in the error itself
//!   (the log goes with the scratch directory): a port in use, a gap in the archive,
//!   an unreadable segment, or an archive that has not reached the target yet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::adapters::PostgresConfig;
use crate::adapters::postgres::conninfo::ConnString;
use crate::adapters::process;
use crate::manifest::DatabaseEntry;
use crate::time::Zone;

#[derive(Debug, thiserror::Error)]
pub enum PitrError {
    #[error("{0}")]
    Setup(String),
    #[error("pg_basebackup failed: {0}")]
    BaseBackup(String),
    #[error("recovery to {target} failed: {message}")]
    Recovery { target: String, message: String },
    /// The caller cancelled (SIGINT/SIGTERM); the scratch server was stopped first.
    #[error("interrupted: {0}")]
    Cancelled(String),
}

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// A named restore point (`recovery_target_name`).
    Name(String),
    /// A WAL position (`recovery_target_lsn`).
    Lsn(String),
    /// Unix milliseconds (`recovery_target_time`): the last commit at or before it.
    Time(i64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Name(name) => write!(f, "restore point {name:?}"),
            Target::Lsn(lsn) => write!(f, "LSN {lsn}"),
            Target::Time(ms) => write!(f, "time {}", Zone::UTC.format_ms(*ms)),
        }
    }
}

/// Which of the backup's markers to recover to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Name,
    Lsn,
    Time,
}

/// The recovery target of `kind` for one PostgreSQL database of a backup.
pub fn target_for(
    entry: &DatabaseEntry,
    restore_point_ms: Option<i64>,
    kind: TargetKind,
) -> Result<Target, PitrError> {
    if entry.adapter != "postgres" {
        return Err(PitrError::Setup(format!(
            "database {} was backed up by the {} adapter; point-in-time recovery is for PostgreSQL",
            entry.name, entry.adapter
        )));
    }
    let detail = |key: &str| entry.cut.details.get(key).cloned();
    match kind {
        TargetKind::Name => detail("restore_point").map(Target::Name).ok_or_else(|| {
            PitrError::Setup(format!(
                "the cut of {} made no named restore point ({}); use --target lsn or time",
                entry.name,
                detail("restore_point_error")
                    .unwrap_or_else(|| "the server did not archive WAL".to_owned())
            ))
        }),
        TargetKind::Lsn => detail("lsn")
            .map(Target::Lsn)
            .ok_or_else(|| PitrError::Setup(format!("the cut of {} recorded no LSN", entry.name))),
        TargetKind::Time => restore_point_ms.map(Target::Time).ok_or_else(|| {
            PitrError::Setup("the backup's window has no restore point time".to_owned())
        }),
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BaseBackupReport {
    pub dir: PathBuf,
    /// From the backup label: where replay of this base backup starts.
    pub start_lsn: Option<String>,
    pub took_ms: u64,
}

/// Takes a base backup of the server `config.url` points at into `dir` (which must be
/// empty or absent), with the WAL needed to make it consistent streamed alongside.
/// When `cancel` fires (SIGINT/SIGTERM), pg_basebackup is killed and waited for, and
/// what it wrote is removed before this returns [`PitrError::Cancelled`]; a failed
/// pg_basebackup leaves nothing behind either: a half-written base backup must never
/// pass for one.
pub async fn base_backup(
    config: &PostgresConfig,
    dir: &Path,
    cancel: &CancellationToken,
) -> Result<BaseBackupReport, PitrError> {
    let started = Instant::now();
    // Claimed first: pg_basebackup's own emptiness check is no lock, and a run that
    // failed on a directory another run was filling used to remove the other's work.
    let mut claim = ClaimedDir::claim(dir, false)?;
    let source = ConnString::parse(&config.url)
        .map_err(|message| PitrError::Setup(format!("the database's URL: {message}")))?;
    let mut command = Command::new(tool(config, "pg_basebackup"));
    source.libpq_args(&mut command);
    // pg_basebackup writes each tablespace at the source's own location unless told
    // otherwise: outside `dir` (on the source's host a directory in use, which it
    // refuses). Each goes into `dir` instead, where `recover` finds it.
    let absolute = std::path::absolute(dir)
        .map_err(|error| PitrError::Setup(format!("resolving {}: {error}", dir.display())))?;
    // A source that accepted the connection but does not answer would hold this
    // forever: the signal must still end it (the claim removes the directory).
    let listed = tokio::select! {
        listed = tablespaces(&source) => listed?,
        () = cancel.cancelled() => {
            return Err(PitrError::Cancelled(format!(
                "stopped while listing the source's tablespaces, before pg_basebackup \
                 started; nothing was written to {}",
                dir.display()
            )));
        }
    };
    let mapped: Vec<String> = listed.iter().map(|(oid, _)| oid.clone()).collect();
    for (oid, location) in listed {
        let ours = absolute.join(TABLESPACES_DIR).join(&oid);
        let escape = |path: &str| path.replace('=', "\\=");
        command.arg(format!(
            "--tablespace-mapping={}={}",
            escape(&location),
            escape(&ours.display().to_string())
        ));
    }
    command
        .arg("--pgdata")
        .arg(dir)
        .args([
            "--format=plain",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-password",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: pg_basebackup forks a WAL streamer that writes into
        // the directory too, and both must stop when we do.
        .process_group(0);
    let mut child = command.spawn().map_err(|error| {
        PitrError::BaseBackup(format!(
            "cannot run {}: {error}",
            tool(config, "pg_basebackup").display()
        ))
    })?;
    let mut group = process::GroupKiller::new(&child);
    let mut stderr = child.stderr.take();
    let finished = tokio::select! {
        finished = async {
            let mut text = Vec::new();
            if let Some(pipe) = stderr.as_mut() {
                let _ = tokio::io::AsyncReadExt::read_to_end(pipe, &mut text).await;
            }
            (child.wait().await, text)
        } => Some(finished),
        () = cancel.cancelled() => None,
    };
    let Some((status, stderr)) = finished else {
        // Killed and reaped before the directory is removed: nothing may still write
        // into it.
        group.kill().await;
        let _ = child.wait().await;
        return Err(PitrError::Cancelled(match claim.remove() {
            Ok(()) => format!(
                "pg_basebackup was stopped and the partial base backup {} removed",
                dir.display()
            ),
            Err(error) => format!(
                "pg_basebackup was stopped, but removing the partial base backup {} \
                 failed ({error}): delete it by hand, it is not a base backup",
                dir.display()
            ),
        }));
    };
    let status = status
        .map_err(|error| PitrError::BaseBackup(format!("waiting for pg_basebackup: {error}")))?;
    if status.success() {
        group.disarm();
    } else {
        // Its WAL streamer must not outlive it. pg_basebackup removes what it wrote
        // after its own errors, but not when something killed it.
        group.kill().await;
        let removed = match claim.remove() {
            Ok(()) => String::new(),
            Err(error) => format!(
                "; removing the partial base backup {} failed ({error}): delete it by hand",
                dir.display()
            ),
        };
        return Err(PitrError::BaseBackup(format!(
            "{} (from {}){removed}",
            String::from_utf8_lossy(&stderr).trim(),
            source.shown()
        )));
    }
    // pg_basebackup links each mapped tablespace by the absolute path it wrote to:
    // relative links keep leading to the base backup's own copy after it is moved.
    for oid in &mapped {
        let link = dir.join("pg_tblspc").join(oid);
        let relink = std::fs::remove_file(&link).and_then(|()| {
            std::os::unix::fs::symlink(Path::new("..").join(TABLESPACES_DIR).join(oid), &link)
        });
        if let Err(error) = relink {
            let removed = match claim.remove() {
                Ok(()) => "removed",
                Err(_) => "left behind: delete it by hand",
            };
            return Err(PitrError::BaseBackup(format!(
                "linking tablespace {oid} in {} relatively: {error}; the base backup was \
                 {removed}",
                dir.display()
            )));
        }
    }
    // A whole base backup: it stays.
    claim.keep = true;
    Ok(BaseBackupReport {
        dir: dir.to_owned(),
        start_lsn: label_start_lsn(dir),
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// Removes what a failed or stopped base backup wrote into `dir`: the directory
/// itself if it was made for the base backup, its contents if the operator made it.
fn remove_written(dir: &Path, existed: bool) -> std::io::Result<()> {
    if !existed {
        return match std::fs::remove_dir_all(dir) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Where a base backup keeps tablespaces that live outside the source's data
/// directory, and where a recovery keeps its copies of them: `<dir>/<this>/<oid>`.
const TABLESPACES_DIR: &str = "stillpoint-tablespaces";

/// The source's tablespaces outside its data directory: (oid, absolute location).
pub(crate) async fn tablespaces(source: &ConnString) -> Result<Vec<(String, String)>, PitrError> {
    let (client, connection) = source.connect().await.map_err(|error| {
        PitrError::BaseBackup(format!("listing the source's tablespaces: {error}"))
    })?;
    let driver = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT oid::text, pg_tablespace_location(oid) FROM pg_tablespace \
             WHERE pg_tablespace_location(oid) LIKE '/%' ORDER BY oid",
            &[],
        )
        .await;
    drop(client);
    let _ = driver.await;
    let rows = rows.map_err(|error| {
        PitrError::BaseBackup(format!(
            "listing the tablespaces of {}: {error}",
            source.shown()
        ))
    })?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The START WAL LOCATION of a base backup's `backup_label`, if it has one.
fn label_start_lsn(dir: &Path) -> Option<String> {
    let label = std::fs::read_to_string(dir.join("backup_label")).ok()?;
    label
        .lines()
        .find_map(|line| line.strip_prefix("START WAL LOCATION: "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}

/// Work the caller hands recovery, run when recovery gets to it: extracting a base
/// backup into the data directory, or feeding a WAL spool. An `Err` names what failed.
pub type Job<'a> =
    dyn Fn() -> futures::future::BoxFuture<'a, Result<(), String>> + Send + Sync + 'a;

/// Where the base backup comes from.
#[derive(Clone, Copy)]
pub enum BaseBackup<'a> {
    /// A plain-format base backup directory (from [`base_backup`] or pg_basebackup),
    /// or a file-level copy or snapshot of a data directory: copied into the data
    /// directory.
    Dir(&'a Path),
    /// `extract` writes the base backup straight into the data directory (claimed and
    /// empty when it runs): a tar extracted once, no second copy. `name` names it.
    Extract { name: &'a str, extract: &'a Job<'a> },
}

impl std::fmt::Debug for BaseBackup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BaseBackup::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
            BaseBackup::Extract { name, .. } => {
                f.debug_struct("Extract").field("name", name).finish()
            }
        }
    }
}

impl std::fmt::Display for BaseBackup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BaseBackup::Dir(dir) => write!(f, "{}", dir.display()),
            BaseBackup::Extract { name, .. } => write!(f, "{name}"),
        }
    }
}

/// Where restore_command finds the WAL.
#[derive(Clone, Copy)]
pub enum WalArchive<'a> {
    /// A directory holding the segments (`archive_command`'s copies): `cp` from it.
    Dir(&'a Path),
    /// A [`spool::Spool`] that `feed` fills while the base is put in place and the
    /// server replays; restore_command waits there for each segment. A failed feed
    /// fails the recovery.
    Spool {
        spool: &'a spool::Spool,
        feed: &'a Job<'a>,
    },
}

impl WalArchive<'_> {
    fn dir(&self) -> &Path {
        match self {
            WalArchive::Dir(dir) => dir,
            WalArchive::Spool { spool, .. } => spool.dir(),
        }
    }
}

impl std::fmt::Debug for WalArchive<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalArchive::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
            WalArchive::Spool { spool, .. } => f.debug_tuple("Spool").field(spool).finish(),
        }
    }
}

/// What [`recover`] needs.
#[derive(Debug, Clone)]
pub struct Recovery<'a, 'j> {
    /// The source database's config: its URL names the database and user to read
    /// back, its `bin_dir` where `postgres` lives.
    pub config: &'a PostgresConfig,
    /// The database's entry in the backup's manifest: its cut LSN bounds the base
    /// backup, its row counts are what the recovered state must hold.
    pub entry: &'a DatabaseEntry,
    pub base_backup: BaseBackup<'j>,
    pub wal_archive: WalArchive<'j>,
    /// The scratch data directory (must be empty or absent; a relative path is taken
    /// from the working directory). It is locked while recovery uses it.
    pub data_dir: &'a Path,
    pub target: Target,
    pub port: u16,
    /// How long replay may take before recovery is given up.
    pub timeout: Duration,
    /// Leave the (stopped) data directory in place afterwards.
    pub keep: bool,
    /// With `keep`, leave it also when recovery fails or is interrupted (`pitr
    /// --keep`: its server log explains the failure). A point restore's target is
    /// removed instead: half-copied or half-replayed, it is no restore, and an
    /// operator would find a data directory that looks like one.
    pub keep_unfinished: bool,
    /// The system user to run the scratch server as (through `setpriv`), for a caller
    /// running as root: PostgreSQL refuses to run as root.
    pub run_as: Option<String>,
    /// Read every table back for a [`ContentHash`] of the state reached (`pitr`, a
    /// drill). A plain point restore does not: it only counts rows, when the cut has
    /// counts to compare with.
    pub content_hash: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoveryReport {
    pub target: Target,
    /// Where replay of the base backup started (backup_label, or the last checkpoint
    /// of a file-level copy).
    pub base_backup_start_lsn: String,
    /// The last WAL record replayed.
    pub reached_lsn: Option<String>,
    /// The commit time of the last transaction replayed, Unix ms.
    pub last_transaction_at_ms: Option<i64>,
    pub last_transaction_date_time: Option<String>,
    /// Whether the rows per table were compared with (and equal) those counted at the
    /// cut; false only for a manifest without row counts.
    pub row_counts_match_cut: bool,
    /// Of `recovery_ms`: the base backup copied or extracted into the data directory.
    pub base_ms: u64,
    pub recovery_ms: u64,
    /// `null` when the tables were not read back (`Recovery::content_hash` off).
    pub content: Option<ContentHash>,
    /// The data directory, when kept.
    pub data_dir: Option<PathBuf>,
}

/// Rows and an md5 per table (over each row's text form, sorted), and a digest of
/// them all: equal digests mean equal contents, whatever the physical layout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContentHash {
    pub tables: BTreeMap<String, TableHash>,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableHash {
    pub rows: u64,
    pub md5: String,
}

/// Recovers a scratch copy of the server to `request.target` and reports the state
/// it reached. The scratch server is always stopped before this returns, also when
/// `cancel` fires (then the error is [`PitrError::Cancelled`]).
pub async fn recover(
    request: Recovery<'_, '_>,
    cancel: &CancellationToken,
) -> Result<RecoveryReport, PitrError> {
    Ok(recover_held(request, cancel).await?.stop().await)
}

/// A recovered scratch server left running for its caller (a point drill's checks),
/// reached only through its unix socket ([`HeldRecovery::url`]). [`HeldRecovery::stop`]
/// stops it and removes its data directory unless kept; dropped without it, the
/// server is killed and the directory removed all the same.
pub struct HeldRecovery {
    report: RecoveryReport,
    url: String,
    scratch: Scratch,
}

impl HeldRecovery {
    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// A `postgres://` URL of the recovered database through the scratch server's
    /// socket: the source URL's user and database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server (then the data directory goes, unless kept).
    pub async fn stop(mut self) -> RecoveryReport {
        if let Some(server) = self.scratch.server.as_mut() {
            server.stop().await;
        }
        self.report
    }
}

/// [`recover`], leaving the recovered server running: see [`HeldRecovery`].
pub async fn recover_held(
    request: Recovery<'_, '_>,
    cancel: &CancellationToken,
) -> Result<HeldRecovery, PitrError> {
    let started = Instant::now();
    // The server runs in the data directory and every path it is given is absolute:
    // a relative one is resolved here, once, so that all checks and reports use the
    // path the server will.
    let data_dir = std::path::absolute(request.data_dir).map_err(|error| {
        PitrError::Setup(format!("resolving {}: {error}", request.data_dir.display()))
    })?;
    let request = Recovery {
        data_dir: &data_dir,
        ..request
    };
    for (what, path) in [
        ("scratch data directory", request.data_dir),
        ("WAL archive", request.wal_archive.dir()),
    ] {
        require_configurable(what, path)?;
    }
    let base_dir = match request.base_backup {
        BaseBackup::Dir(dir) => Some(dir),
        BaseBackup::Extract { .. } => None,
    };
    refuse_overlap(request.data_dir, base_dir, request.wal_archive.dir())?;
    let _reading = base_dir.map(lock_for_reading).transpose()?.flatten();
    // Claimed before anything is checked or written: whatever happens next, what we
    // wrote goes (unless kept) when this is dropped, after the server has been stopped.
    let dir = ClaimedDir::claim(request.data_dir, request.keep && request.keep_unfinished)?;
    check_setup(&request)?;
    let mut scratch = Scratch {
        _dir: dir,
        server: None,
    };
    let outcome = tokio::select! {
        outcome = replay(&request, &mut scratch) => outcome,
        () = cancel.cancelled() => Err(PitrError::Cancelled(if request.keep && request.keep_unfinished {
            format!("the scratch server was stopped; {} was kept", request.data_dir.display())
        } else {
            format!(
                "the scratch server was stopped and {} removed",
                request.data_dir.display()
            )
        })),
    };
    let reached = match outcome {
        Ok(reached) => reached,
        Err(error) => {
            if let Some(server) = scratch.server.as_mut() {
                server.stop().await;
            }
            return Err(error);
        }
    };
    // Whole now: kept if asked (until here, only `keep_unfinished` kept it).
    scratch._dir.keep = request.keep;
    let url = socket_url(&request.config.url, request.data_dir, request.port)?;
    let report = RecoveryReport {
        target: request.target.clone(),
        base_backup_start_lsn: format_lsn(reached.base_start),
        reached_lsn: reached.lsn,
        last_transaction_at_ms: reached.last_transaction_at_ms,
        last_transaction_date_time: reached
            .last_transaction_at_ms
            .map(|ms| Zone::UTC.format_ms(ms)),
        row_counts_match_cut: reached.row_counts_checked,
        base_ms: reached.base_ms,
        recovery_ms: started.elapsed().as_millis() as u64,
        content: reached.content,
        data_dir: request.keep.then(|| request.data_dir.to_owned()),
    };
    Ok(HeldRecovery {
        report,
        url,
        scratch,
    })
}

/// `postgres://<user>@<socket dir, percent-encoded>:<port>/<database>`: a URL libpq,
/// tokio-postgres and the adapters read as the unix socket in `data_dir`.
fn socket_url(source: &str, data_dir: &Path, port: u16) -> Result<String, PitrError> {
    let source = ConnString::parse(source)
        .map_err(|message| PitrError::Setup(format!("the database's URL: {message}")))?;
    let encode = |text: &str| {
        percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let user = source.user().map(|user| format!("{}@", encode(user)));
    Ok(format!(
        "postgres://{}{}:{port}/{}",
        user.unwrap_or_default(),
        encode(&data_dir.display().to_string()),
        encode(source.dbname().unwrap_or("postgres"))
    ))
}

/// A shared lock on the base backup directory while it is read. `base-backup` holds
/// an exclusive one (its claim) while it writes, and a half-written base backup has
/// its backup_label and PG_VERSION early on: it must not be taken for a whole one.
/// A directory that cannot be opened is reported by the checks that read it; one on a
/// file system without locks is read unlocked.
fn lock_for_reading(base: &Path) -> Result<Option<std::fs::File>, PitrError> {
    let Ok(file) = std::fs::File::open(base) else {
        return Ok(None);
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(PitrError::Setup(format!(
            "the base backup {} is still being written by stillpoint base-backup; wait \
             for it to finish",
            base.display()
        ))),
        Err(std::fs::TryLockError::Error(_)) => Ok(None),
    }
}

/// A path that goes into PostgreSQL's configuration (the data directory and its files,
/// restore_command's archive) must be UTF-8 (it is written as text; other bytes would
/// be replaced and name another directory) without control characters (a newline ends
/// a quoted value in the configuration file).
fn require_configurable(what: &str, path: &Path) -> Result<(), PitrError> {
    let Some(text) = path.to_str() else {
        return Err(PitrError::Setup(format!(
            "the {what} {} is not valid UTF-8, which PostgreSQL's configuration cannot \
             name; choose another path",
            path.display()
        )));
    };
    if text.chars().any(char::is_control) {
        return Err(PitrError::Setup(format!(
            "the {what} {text:?} contains a control character, which PostgreSQL's \
             configuration cannot name; choose another path"
        )));
    }
    Ok(())
}

/// The scratch data directory must lie neither inside the base backup or the WAL
/// archive nor around them: recovery would copy the base backup into itself, or write
/// into what it reads from (a killed recovery left its half-copy inside the base
/// backup, which the next recovery copied along).
fn refuse_overlap(
    data_dir: &Path,
    base_backup: Option<&Path>,
    archive: &Path,
) -> Result<(), PitrError> {
    let scratch = resolve_existing_prefix(data_dir);
    let inputs = base_backup
        .map(|base| ("base backup", base))
        .into_iter()
        .chain([("WAL archive", archive)]);
    for (what, other) in inputs {
        // A missing one is reported by the checks that read it.
        let Ok(other) = std::fs::canonicalize(other) else {
            continue;
        };
        if scratch.starts_with(&other) || other.starts_with(&scratch) {
            return Err(PitrError::Setup(format!(
                "the scratch data directory {} overlaps the {what} {}: recovery would \
                 write into what it reads; choose a data directory outside it",
                data_dir.display(),
                other.display()
            )));
        }
    }
    Ok(())
}

/// `path` with its longest existing prefix resolved (symlinks, `..`), the rest as is.
fn resolve_existing_prefix(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        if let Ok(resolved) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(resolved, |acc, name| acc.join(name));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent;
            }
            _ => return path.to_owned(),
        }
    }
}

/// What can be checked before the base backup is read.
fn check_setup(request: &Recovery<'_, '_>) -> Result<(), PitrError> {
    if !request.wal_archive.dir().is_dir() {
        return Err(PitrError::Setup(format!(
            "the WAL archive {} is not a directory",
            request.wal_archive.dir().display()
        )));
    }
    // The server's unix socket lives in the data directory; the kernel limits its path.
    let socket = request
        .data_dir
        .join(format!(".s.PGSQL.{}", request.port))
        .display()
        .to_string();
    if socket.len() > 107 {
        return Err(PitrError::Setup(format!(
            "the scratch server's socket {socket} would be longer than a unix socket path may \
             be (107 bytes); give a shorter --data-dir"
        )));
    }
    // What recovery reads back: the user and database of the source's URL.
    ConnString::parse(&request.config.url)
        .map_err(|message| PitrError::Setup(format!("the database's URL: {message}")))?;
    Ok(())
}

/// The base backup at `base` (its directory, or the data directory it was extracted
/// into), checked before the server starts on it; returns where its replay starts.
async fn check_base(request: &Recovery<'_, '_>, base: &Path) -> Result<u64, PitrError> {
    let version = std::fs::read_to_string(base.join("PG_VERSION")).map_err(|_| {
        PitrError::Setup(format!(
            "{} is not a plain-format base backup (it has no PG_VERSION); take one with \
             `stillpoint base-backup` or pg_basebackup --format=plain",
            request.base_backup
        ))
    })?;
    let major: u32 = version.trim().parse().unwrap_or(0);
    if major < 12 {
        return Err(PitrError::Setup(format!(
            "the base backup is PostgreSQL {}; point-in-time recovery here needs 12 or newer \
             (recovery.signal)",
            version.trim()
        )));
    }
    let start = base_backup_start(request.config, base).await?;
    if let Some(cut) = request.entry.cut.details.get("lsn") {
        let cut_lsn = parse_lsn(cut).ok_or_else(|| {
            PitrError::Setup(format!("the manifest's cut LSN {cut:?} is not an LSN"))
        })?;
        if start > cut_lsn {
            return Err(PitrError::Setup(format!(
                "the base backup {} starts at WAL {}, after the backup's cut at {cut}: it \
                 already holds changes committed after the restore point, and no recovery \
                 target can take them back; use a base backup taken before the backup",
                request.base_backup,
                format_lsn(start)
            )));
        }
    }
    Ok(start)
}

/// Where replay of a base backup starts: its backup_label (pg_basebackup, or a copy
/// made between pg_backup_start and pg_backup_stop), else, for a file-level copy or a
/// snapshot of a data directory, the redo point of its last checkpoint.
async fn base_backup_start(config: &PostgresConfig, base: &Path) -> Result<u64, PitrError> {
    if let Some(lsn) = label_start_lsn(base) {
        return parse_lsn(&lsn).ok_or_else(|| {
            PitrError::Setup(format!(
                "the backup_label of {} has an unreadable START WAL LOCATION {lsn:?}",
                base.display()
            ))
        });
    }
    let pg_controldata = tool(config, "pg_controldata");
    let output = Command::new(&pg_controldata)
        .arg("-D")
        .arg(base)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| {
            PitrError::Setup(format!("cannot run {}: {error}", pg_controldata.display()))
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("Latest checkpoint's REDO location:"))
        .and_then(|lsn| parse_lsn(lsn.trim()))
        .ok_or_else(|| {
            PitrError::Setup(format!(
                "{} has no backup_label and pg_controldata cannot read its last checkpoint: {}",
                base.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        })
}

/// `0/16B3748` as one number, for comparisons.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The scratch data directory and the server running in it, held outside the future
/// that does the work, so they can be cleaned up after that future was dropped.
struct Scratch {
    /// Removes the directory when dropped; the server is stopped explicitly before.
    _dir: ClaimedDir,
    server: Option<Server>,
}

/// What recovery reached.
struct Reached {
    /// Where replay of the base backup started.
    base_start: u64,
    base_ms: u64,
    lsn: Option<String>,
    last_transaction_at_ms: Option<i64>,
    content: Option<ContentHash>,
    row_counts_checked: bool,
}

/// [`replay_base`], with a WAL spool fed alongside: a feed that fails ends it.
async fn replay(request: &Recovery<'_, '_>, scratch: &mut Scratch) -> Result<Reached, PitrError> {
    let WalArchive::Spool { feed, .. } = request.wal_archive else {
        return replay_base(request, scratch).await;
    };
    let replaying = replay_base(request, scratch);
    tokio::pin!(replaying);
    tokio::select! {
        reached = &mut replaying => reached,
        fed = feed() => match fed {
            Ok(()) => replaying.await,
            Err(message) => Err(PitrError::Recovery {
                target: request.target.to_string(),
                message: format!("feeding the WAL spool {}: {message}", request.wal_archive.dir().display()),
            }),
        },
    }
}

/// Put the base in place, configure, start, wait for the promotion, read the state
/// back. The caller stops the server.
async fn replay_base(
    request: &Recovery<'_, '_>,
    scratch: &mut Scratch,
) -> Result<Reached, PitrError> {
    let target_text = request.target.to_string();
    let fail = |message: String| PitrError::Recovery {
        target: target_text.clone(),
        message,
    };
    let placing = Instant::now();
    let base_start = match request.base_backup {
        BaseBackup::Dir(dir) => {
            let start = check_base(request, dir).await?;
            copy_dir(dir, request.data_dir).await?;
            start
        }
        BaseBackup::Extract { name, extract } => {
            extract()
                .await
                .map_err(|why| PitrError::Setup(format!("extracting base backup {name}: {why}")))?;
            set_private(request.data_dir)?;
            check_base(request, request.data_dir).await?
        }
    };
    // `--wal-method=none` leaves pg_wal empty, and a tar may leave it out.
    std::fs::create_dir_all(request.data_dir.join("pg_wal"))
        .map_err(|error| PitrError::Setup(format!("creating pg_wal: {error}")))?;
    let base_ms = placing.elapsed().as_millis() as u64;
    let data_dir = std::fs::canonicalize(request.data_dir).map_err(|error| {
        PitrError::Setup(format!("resolving {}: {error}", request.data_dir.display()))
    })?;
    // A copy of a running data directory carries the source's lock file: the scratch
    // server would refuse to start on it, and anything that read it would signal the
    // source's postmaster. standby.signal (pg_basebackup -R) would keep the scratch
    // server a standby that never promotes.
    for file in ["postmaster.pid", "postmaster.opts", "standby.signal"] {
        match std::fs::remove_file(data_dir.join(file)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(PitrError::Setup(format!(
                    "removing the copied {file} from {}: {error}",
                    data_dir.display()
                )));
            }
            _ => {}
        }
    }
    let base_dir = match request.base_backup {
        BaseBackup::Dir(dir) => dir,
        BaseBackup::Extract { .. } => &data_dir,
    };
    relocate_tablespaces(base_dir, &data_dir).await?;
    // restore_command runs in the data directory: a relative archive path would miss.
    let archive = std::fs::canonicalize(request.wal_archive.dir()).map_err(|error| {
        PitrError::Setup(format!(
            "resolving {}: {error}",
            request.wal_archive.dir().display()
        ))
    })?;
    let restore = match request.wal_archive {
        WalArchive::Dir(_) => restore_command(&archive),
        WalArchive::Spool { spool, .. } => spool.restore_command(),
    };
    let scratch_config = ScratchConfig::new(request, &data_dir);
    scratch_config.write()?;
    std::fs::write(data_dir.join("recovery.signal"), b"")
        .map_err(|error| fail(format!("writing recovery.signal: {error}")))?;
    let log_path = data_dir.join("stillpoint-recovery.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|error| fail(format!("creating {}: {error}", log_path.display())))?;
    if let Some(user) = &request.run_as {
        chown(user, &data_dir).await?;
    }

    let mut command = server_command(request.config, request.run_as.as_deref(), &data_dir)
        .await
        .map_err(PitrError::Setup)?;
    command
        .arg("-D")
        .arg(&data_dir)
        .args(scratch_config.args(request, &restore))
        // cp's messages in the log are read back to explain a failure.
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    let child = command.spawn().map_err(|error| {
        fail(format!(
            "cannot start {}: {error}",
            tool(request.config, "postgres").display()
        ))
    })?;
    let server = scratch.server.insert(Server { child });

    let probe = probe_config(&request.config.url, &data_dir, request.port)?;
    let explain = Explain {
        log_path: &log_path,
        kept: request.keep && request.keep_unfinished,
        port: request.port,
        archive: &archive,
        run_as: request.run_as.as_deref(),
    };
    wait_for_promotion(server, &probe, request.timeout, &explain)
        .await
        .map_err(&fail)?;
    let state = read_state(
        &probe,
        request.content_hash,
        request.entry.row_counts.is_some(),
    )
    .await
    .map_err(&fail)?;
    let row_counts_checked = match (&request.entry.row_counts, &state.rows) {
        (Some(expected), Some(rows)) => {
            compare_with_cut(rows, expected).map_err(&fail)?;
            true
        }
        _ => false,
    };
    let State {
        lsn,
        last_transaction_at_ms,
        content,
        ..
    } = state;
    Ok(Reached {
        base_start,
        base_ms,
        lsn,
        last_transaction_at_ms,
        content,
        row_counts_checked,
    })
}

/// The rows per table of the recovered state against those counted at the cut.
fn compare_with_cut(
    found: &BTreeMap<String, u64>,
    expected: &BTreeMap<String, u64>,
) -> Result<(), String> {
    let mut differences = Vec::new();
    for (table, rows) in expected {
        match found.get(table) {
            Some(found) if found == rows => {}
            Some(found) => {
                differences.push(format!("{table} has {found} rows, the cut had {rows}"))
            }
            None => differences.push(format!("{table} is missing (the cut had {rows} rows)")),
        }
    }
    for (table, rows) in found {
        if !expected.contains_key(table) {
            differences.push(format!("{table} ({rows} rows) did not exist at the cut"));
        }
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the recovered state is not the backup's cut: {}; the base backup or the WAL \
         archive is not this database's, or something committed during the pause outside \
         the cluster",
        differences.join("; ")
    ))
}

/// The scratch server's own configuration: settings that keep it apart from the
/// source, written to `stillpoint-pitr.conf` (after an include of the base backup's
/// postgresql.conf, if any: a Debian/Ubuntu cluster keeps its configuration in /etc,
/// so its base backups have none) and repeated on the command line, where
/// postgresql.auto.conf cannot override them. Our pg_hba.conf lets local connections
/// in on the scratch directory's socket (a directory only the server's user and root
/// can enter) and nothing over TCP.
struct ScratchConfig {
    data_dir: PathBuf,
    /// (name, value), in order.
    settings: Vec<(&'static str, String)>,
}

impl ScratchConfig {
    fn new(request: &Recovery<'_, '_>, data_dir: &Path) -> ScratchConfig {
        let path = |name: &str| data_dir.join(name).display().to_string();
        let mut settings = vec![
            ("data_directory", data_dir.display().to_string()),
            ("hba_file", path(HBA_FILE)),
            ("ident_file", path(IDENT_FILE)),
            ("listen_addresses", "127.0.0.1".to_owned()),
            ("port", request.port.to_string()),
            // A list: each entry double-quoted, a quote inside doubled.
            (
                "unix_socket_directories",
                format!(
                    "\"{}\"",
                    data_dir.display().to_string().replace('"', "\"\"")
                ),
            ),
            // Never archive into the source's archive, never stream from its primary,
            // never write the source's external pid file.
            ("archive_mode", "off".to_owned()),
            ("primary_conninfo", String::new()),
            ("primary_slot_name", String::new()),
            ("external_pid_file", String::new()),
            // Commands the source's configuration may give recovery (a warm standby's
            // `pg_archivecleanup` on the source's own archive, a trigger file removed at
            // the end): none of them is ours to run.
            ("recovery_end_command", String::new()),
            ("archive_cleanup_command", String::new()),
            // A delayed standby's setting would hold replay back for that long.
            ("recovery_min_apply_delay", "0".to_owned()),
            // The log goes to our file (stderr), in words we can read back: never to
            // syslog or a log directory the source's configuration names.
            ("log_destination", "stderr".to_owned()),
            ("logging_collector", "off".to_owned()),
            ("lc_messages", "C".to_owned()),
            ("ssl", "off".to_owned()),
            // Off: a hot standby would check that max_connections and its kin are at
            // least the source's, which a configuration of our own cannot know.
            ("hot_standby", "off".to_owned()),
            ("cluster_name", "stillpoint-pitr".to_owned()),
        ];
        if std::fs::read_to_string(data_dir.join("PG_VERSION"))
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .is_some_and(|major| major < 15)
        {
            // Before 15 the statistics collector wrote here; the source's setting may
            // name a directory the source uses.
            settings.push(("stats_temp_directory", "pg_stat_tmp".to_owned()));
        }
        ScratchConfig {
            data_dir: data_dir.to_owned(),
            settings,
        }
    }

    fn config_file(&self) -> PathBuf {
        self.data_dir.join(CONFIG_FILE)
    }

    fn write(&self) -> Result<(), PitrError> {
        let mut text = String::from(
            "# Written by stillpoint pitr: the scratch server's own configuration. The base\n\
             # backup's postgresql.conf, when it has one, is read first; these settings win.\n\
             include_if_exists = 'postgresql.conf'\n",
        );
        for (name, value) in &self.settings {
            text.push_str(&format!("{name} = {}\n", config_quote(value)));
        }
        let files = [
            (self.config_file(), text),
            (
                self.data_dir.join(HBA_FILE),
                "# Written by stillpoint pitr: the scratch directory's socket only.\n\
                 local all all trust\n"
                    .to_owned(),
            ),
            (self.data_dir.join(IDENT_FILE), String::new()),
        ];
        for (path, text) in files {
            std::fs::write(&path, text).map_err(|error| {
                PitrError::Setup(format!("writing {}: {error}", path.display()))
            })?;
        }
        Ok(())
    }

    /// `-c name=value` for every setting (values as they are: the command line is not
    /// parsed like a file), then the recovery settings.
    fn args(&self, request: &Recovery<'_, '_>, restore_command: &str) -> Vec<String> {
        let mut settings: Vec<String> =
            vec![format!("config_file={}", self.config_file().display())];
        settings.extend(
            self.settings
                .iter()
                .map(|(name, value)| format!("{name}={value}")),
        );
        settings.push(format!("restore_command={restore_command}"));
        settings.push("recovery_target_action=promote".to_owned());
        let (ours, value) = match &request.target {
            Target::Name(name) => ("recovery_target_name", name.clone()),
            Target::Lsn(lsn) => ("recovery_target_lsn", lsn.clone()),
            Target::Time(ms) => ("recovery_target_time", postgres_time(*ms)),
        };
        // Any other target the base backup's configuration sets is cleared: PostgreSQL
        // refuses more than one.
        for other in RECOVERY_TARGETS.into_iter().filter(|name| *name != ours) {
            settings.push(format!("{other}="));
        }
        settings.push(format!("{ours}={value}"));
        settings
            .into_iter()
            .flat_map(|setting| ["-c".to_owned(), setting])
            .collect()
    }
}

/// Every recovery_target setting: only one may be set.
const RECOVERY_TARGETS: [&str; 5] = [
    "recovery_target",
    "recovery_target_name",
    "recovery_target_lsn",
    "recovery_target_time",
    "recovery_target_xid",
];

const CONFIG_FILE: &str = "stillpoint-pitr.conf";
const HBA_FILE: &str = "stillpoint-pitr-hba.conf";
const IDENT_FILE: &str = "stillpoint-pitr-ident.conf";

/// A value in a configuration file: single quotes, with `'` and `\` escaped.
fn config_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// `cp '<archive>/%f' "%p"`. PostgreSQL hands restore_command to `sh` after replacing
/// `%f`, `%p` and `%%`: the archive path is quoted for `sh` (a `'` closes the quote,
/// is escaped, and reopens it), and its own `%` signs are doubled.
fn restore_command(archive: &Path) -> String {
    format!("cp {}/%f \"%p\"", shell_path(archive))
}

/// A path quoted for `sh` inside restore_command (its `%` signs doubled).
fn shell_path(path: &Path) -> String {
    sh_quote(&path.display().to_string()).replace('%', "%%")
}

/// `text` single-quoted for `sh` (a `'` closes the quote, is escaped, and reopens it).
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// `2026-11-22 01:02:03.456+00`, which recovery_target_time reads exactly.
fn postgres_time(ms: i64) -> String {
    let at = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    at.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string()
}

/// A command for the server's `postgres`: run directly, or as `run_as` through
/// `setpriv`, which execs it (unlike `runuser` or `su`, which fork and wait), so the
/// child we hold is the postmaster itself and signals reach it, not a wrapper.
async fn server_command(
    config: &PostgresConfig,
    run_as: Option<&str>,
    data_dir: &Path,
) -> Result<Command, String> {
    tool_command(config, run_as, "postgres", data_dir).await
}

/// A command for the server's tool `name` (`postgres`, `pg_ctl`), as
/// [`server_command`] runs `postgres`: as `run_as` through `setpriv` when given, in
/// `data_dir`.
pub(crate) async fn tool_command(
    config: &PostgresConfig,
    run_as: Option<&str>,
    name: &str,
    data_dir: &Path,
) -> Result<Command, String> {
    let postgres = tool(config, name);
    let mut command = match run_as {
        Some(user) => {
            let gid = Command::new("id")
                .args(["-g", "--", user])
                .output()
                .await
                .map_err(|error| format!("running id: {error}"))?;
            if !gid.status.success() {
                return Err(format!(
                    "cannot find the system user {user:?} to run the scratch server as: {}",
                    String::from_utf8_lossy(&gid.stderr).trim()
                ));
            }
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={user}"))
                .arg(format!(
                    "--regid={}",
                    String::from_utf8_lossy(&gid.stdout).trim()
                ))
                .args(["--init-groups", "--"])
                .arg(postgres);
            command
        }
        None => Command::new(postgres),
    };
    // The caller's working directory may be closed to the server's user.
    command.current_dir(data_dir);
    Ok(command)
}

/// The scratch server: the postmaster process we started.
struct Server {
    child: Child,
}

impl Server {
    /// Fast shutdown (SIGINT to the postmaster, which ends its backends first), then
    /// SIGKILL if it has not exited within 30 s. The pid is our unreaped child's, so it
    /// cannot have been reused by anything else.
    async fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = self.child.id() {
            process::send_signal(pid, "INT").await;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// `chown -R user: dir`, for a data directory the server's user must own.
pub(crate) async fn chown(user: &str, dir: &Path) -> Result<(), PitrError> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:"))
        .arg(dir)
        .status()
        .await
        .map_err(|error| PitrError::Setup(format!("running chown: {error}")))?;
    if !status.success() {
        return Err(PitrError::Setup(format!(
            "chown -R {user}: {} failed; does the user {user} exist?",
            dir.display()
        )));
    }
    Ok(())
}

/// How to reach the scratch server: its unix socket in the scratch directory (which
/// only it can have made), as the source URL's user, to its database.
fn probe_config(
    source: &str,
    data_dir: &Path,
    port: u16,
) -> Result<tokio_postgres::Config, PitrError> {
    let source = ConnString::parse(source)
        .map_err(|message| PitrError::Setup(format!("the database's URL: {message}")))?;
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(data_dir)
        .port(port)
        .application_name("stillpoint-pitr")
        .connect_timeout(Duration::from_secs(10));
    if let Some(user) = source.user() {
        config.user(user);
    }
    if let Some(dbname) = source.dbname() {
        config.dbname(dbname);
    }
    Ok(config)
}

/// What explaining a failure needs.
struct Explain<'a> {
    log_path: &'a Path,
    kept: bool,
    port: u16,
    archive: &'a Path,
    run_as: Option<&'a str>,
}

async fn wait_for_promotion(
    server: &mut Server,
    probe: &tokio_postgres::Config,
    timeout: Duration,
    explain: &Explain<'_>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match server.child.try_wait() {
            Ok(Some(status)) => return Err(explain.exit(status)),
            Ok(None) => {}
            Err(error) => return Err(format!("cannot watch the scratch server: {error}")),
        }
        match probe.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                let driver = tokio::spawn(connection);
                let in_recovery = client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .map(|row| row.get::<_, bool>(0));
                drop(client);
                let _ = driver.await;
                match in_recovery {
                    Ok(false) => return Ok(()),
                    Ok(true) => {}
                    Err(error) => last_error = Some(error.to_string()),
                }
            }
            Err(error) => match error.code() {
                // Still replaying: the server says so until it has promoted.
                Some(code) if *code == tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW => {}
                // The server is up and refuses us for good (no such role or database).
                Some(_) => {
                    return Err(format!(
                        "the recovered server refused the connection: {}",
                        crate::adapters::postgres::error_text(&error)
                    ));
                }
                // No socket yet, or it is starting: remembered for the timeout message.
                None => last_error = Some(crate::adapters::postgres::error_text(&error)),
            },
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "replay did not reach the target within {}s{}; {}",
                timeout.as_secs(),
                last_error
                    .map(|error| format!(" (the last connection attempt: {error})"))
                    .unwrap_or_default(),
                explain.log_tail()
            ));
        }
        // Not a wait for a state: the interval between two probes of the server.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Explain<'_> {
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path).unwrap_or_default()
    }

    /// The server log's last lines (without our probes' own noise), and where the log
    /// is when it is kept: it goes with the scratch directory otherwise.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().filter(|line| !is_probe_noise(line)).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" / ");
        let kept = if self.kept {
            format!(" (the whole log is {})", self.log_path.display())
        } else {
            String::new()
        };
        if tail.is_empty() {
            format!("the server log is empty{kept}")
        } else {
            format!("the server log ends: {tail}{kept}")
        }
    }

    /// Why the scratch server exited, in words an operator can act on.
    fn exit(&self, status: std::process::ExitStatus) -> String {
        let log = self.log();
        if log.contains("could not bind") && log.contains("already in use") {
            return format!(
                "the scratch server could not start: port {} on 127.0.0.1 is in use by \
                 another server; choose another --port, or leave it out for a free one",
                self.port
            );
        }
        if log.contains("recovery ended before configured recovery target was reached") {
            return self.archive_ended(&log);
        }
        if log.contains("requested recovery stop point is before consistent recovery point") {
            return "the target lies before the point where the base backup becomes \
                    consistent: the base backup is newer than the target; use one taken \
                    before the backup"
                .to_owned();
        }
        let fatal: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("FATAL") || line.contains("PANIC"))
            .filter(|line| !is_probe_noise(line))
            .collect();
        if fatal.is_empty() {
            format!("the scratch server exited ({status}); {}", self.log_tail())
        } else {
            format!(
                "the scratch server exited ({status}): {}",
                fatal.join(" / ")
            )
        }
    }

    /// Recovery ran out of WAL before the target. Which segment it could not get, and
    /// why, from restore_command's (`cp`'s) messages and the archive's contents.
    fn archive_ended(&self, log: &str) -> String {
        let failed = failed_segments(log);
        let archive = self.archive.display();
        if let Some((segment, _)) = failed.iter().find(|(_, denied)| *denied) {
            return format!(
                "the scratch server cannot read {segment} in the WAL archive {archive} \
                 (permission denied): make the archive readable by {}",
                self.run_as
                    .map(|user| format!("the user {user}"))
                    .unwrap_or_else(|| "the user stillpoint runs as".to_owned())
            );
        }
        let Some(missing) = failed.iter().map(|(segment, _)| segment).max() else {
            return format!(
                "the WAL archive {archive} ends before the target, or the base backup is \
                 newer than the target; {}",
                self.log_tail()
            );
        };
        let later: Vec<String> = archived_segments(self.archive)
            .into_iter()
            // Same timeline, further on.
            .filter(|name| name[..8] == missing[..8] && name > missing)
            .collect();
        match later.first() {
            Some(next) => format!(
                "the WAL archive {archive} has a gap: {missing} is missing but later segments \
                 (from {next}) are there, and replay cannot pass the gap; copy {missing} \
                 into the archive from the source's pg_wal if it is still there, or recover \
                 from a base backup taken after the gap"
            ),
            None => format!(
                "the WAL archive {archive} ends before the target: {missing} has not been \
                 archived yet (run SELECT pg_switch_wal() on the source, or wait for \
                 archive_timeout), or the base backup is newer than the target"
            ),
        }
    }
}

/// Lines our own connection attempts leave in the log while the server replays.
fn is_probe_noise(line: &str) -> bool {
    line.contains("the database system is starting up")
        || line.contains("the database system is not yet accepting connections")
        || line.contains("consistent recovery state has not been yet reached")
}

/// WAL segments (24 hex digits) restore_command failed to copy, in log order, and
/// whether it was for want of permission.
fn failed_segments(log: &str) -> Vec<(String, bool)> {
    log.lines()
        .filter(|line| line.starts_with("cp: "))
        .filter_map(|line| {
            let segment = line.match_indices('/').find_map(|(at, _)| {
                let name = line.get(at + 1..at + 25)?;
                let after = line[at + 25..].chars().next();
                (name.chars().all(|c| c.is_ascii_hexdigit())
                    && !after.is_some_and(|c| c.is_ascii_alphanumeric()))
                .then(|| name.to_owned())
            })?;
            Some((segment, line.contains("Permission denied")))
        })
        .collect()
}

/// The WAL segment files in an archive directory, sorted.
fn archived_segments(archive: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(archive)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    names.sort();
    names
}

/// The recovered server's state.
struct State {
    lsn: Option<String>,
    last_transaction_at_ms: Option<i64>,
    content: Option<ContentHash>,
    /// Rows per table, when counted (or hashed).
    rows: Option<BTreeMap<String, u64>>,
}

/// The replay position and last commit; with `hash`, the content hash (and the rows
/// from it); else with `count`, the rows per table only.
async fn read_state(
    probe: &tokio_postgres::Config,
    hash: bool,
    count: bool,
) -> Result<State, String> {
    let (client, connection) = probe
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|error| {
            format!(
                "connecting to the recovered server: {}",
                crate::adapters::postgres::error_text(&error)
            )
        })?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT pg_last_wal_replay_lsn()::text, \
             (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .map_err(|error| format!("reading the replay position: {error}"))?;
    let (content, rows) = if hash {
        let content = content_hash_with(&client)
            .await
            .map_err(|error| format!("hashing the recovered database: {error}"))?;
        let rows = content
            .tables
            .iter()
            .map(|(table, hash)| (table.clone(), hash.rows))
            .collect();
        (Some(content), Some(rows))
    } else if count {
        let rows = row_counts_with(&client)
            .await
            .map_err(|error| format!("counting the recovered database's rows: {error}"))?;
        (None, Some(rows))
    } else {
        (None, None)
    };
    drop(client);
    let _ = driver.await;
    Ok(State {
        lsn: row.get(0),
        last_transaction_at_ms: row.get(1),
        content,
        rows,
    })
}

/// The [`ContentHash`] of the PostgreSQL database `url` names: compare a recovered
/// database with a restored logical copy, or two recoveries with each other.
pub async fn content_hash(url: &str) -> Result<ContentHash, String> {
    let (client, connection) = ConnString::parse(url)?.connect().await?;
    let driver = tokio::spawn(connection);
    let hash = content_hash_with(&client)
        .await
        .map_err(|error| error.to_string());
    drop(client);
    let _ = driver.await;
    hash
}

/// The user tables, each named `schema.table` as the manifest's row counts name them,
/// and quoted to query.
async fn user_tables(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let tables = client
        .query(
            "SELECT n.nspname || '.' || c.relname, \
                    quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1",
            &[],
        )
        .await?;
    Ok(tables.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Rows per table: what comparing with the cut's counts needs, without hashing.
async fn row_counts_with(
    client: &tokio_postgres::Client,
) -> Result<BTreeMap<String, u64>, tokio_postgres::Error> {
    let mut rows = BTreeMap::new();
    for (table, quoted) in user_tables(client).await? {
        let row = client
            .query_one(&format!("SELECT count(*) FROM {quoted}"), &[])
            .await?;
        rows.insert(table, row.get::<_, i64>(0) as u64);
    }
    Ok(rows)
}

async fn content_hash_with(
    client: &tokio_postgres::Client,
) -> Result<ContentHash, tokio_postgres::Error> {
    let mut hashes = BTreeMap::new();
    let mut digest = blake3::Hasher::new();
    for (table, quoted) in user_tables(client).await? {
        // Each row's text form, sorted: independent of physical order and of how the
        // rows got there (replayed WAL or a pg_restore).
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') \
                     FROM {quoted} t"
                ),
                &[],
            )
            .await?;
        let hash = TableHash {
            rows: row.get::<_, i64>(0) as u64,
            md5: row.get(1),
        };
        digest.update(format!("{table}\t{}\t{}\n", hash.rows, hash.md5).as_bytes());
        hashes.insert(table, hash);
    }
    Ok(ContentHash {
        tables: hashes,
        digest: digest.finalize().to_hex()[..16].to_owned(),
    })
}

/// A directory we write into (a recovery's scratch data directory, a base backup),
/// claimed: made if absent, locked (`flock` on the directory itself, so nothing is
/// written beside it) so that a second command cannot use it at the same time, and
/// required to be empty. When dropped, what was
/// written is removed unless it is to be kept: the directory itself if the claim made
/// it, only its contents if the operator did.
pub(crate) struct ClaimedDir {
    path: PathBuf,
    /// Whether dropping leaves what was written (set once the work is whole).
    pub(crate) keep: bool,
    created: bool,
    /// Holds the lock until the directory has been cleaned up (fields drop after
    /// `drop` has run).
    _lock: std::fs::File,
}

impl ClaimedDir {
    pub(crate) fn claim(path: &Path, keep: bool) -> Result<ClaimedDir, PitrError> {
        // Parents are made as `mkdir -p` (and pg_basebackup) would; only the directory
        // itself counts as made by the claim.
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                PitrError::Setup(format!("creating {}: {error}", parent.display()))
            })?;
        }
        let created = match std::fs::create_dir(path) {
            Ok(()) => true,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(error) => {
                return Err(PitrError::Setup(format!(
                    "creating the scratch data directory {}: {error}",
                    path.display()
                )));
            }
        };
        let lock = std::fs::File::open(path)
            .map_err(|error| PitrError::Setup(format!("opening {}: {error}", path.display())))?;
        let in_use = || {
            PitrError::Setup(format!(
                "{} is in use by another stillpoint command (base-backup, pitr or restore --point), which \
                 holds a lock on it; choose another directory, or wait for that one to \
                 finish",
                path.display()
            ))
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(in_use()),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(PitrError::Setup(format!(
                    "locking {}: {error}",
                    path.display()
                )));
            }
        }
        // The previous holder may have removed the directory (and another run made it
        // again) between our open and our lock: the lock counts only on the directory
        // that is at the path now.
        use std::os::unix::fs::MetadataExt as _;
        let same = match (lock.metadata(), std::fs::metadata(path)) {
            (Ok(locked), Ok(current)) => {
                locked.dev() == current.dev() && locked.ino() == current.ino()
            }
            _ => false,
        };
        if !same {
            return Err(in_use());
        }
        let mut claim = ClaimedDir {
            path: path.to_owned(),
            // Until it is known to be empty, nothing in it is ours to remove.
            keep: true,
            created,
            _lock: lock,
        };
        require_empty_dir(path)?;
        claim.keep = keep;
        Ok(claim)
    }
}

impl ClaimedDir {
    /// Removes what was written now, saying whether that worked (dropping removes it
    /// too, silently).
    fn remove(&mut self) -> std::io::Result<()> {
        self.keep = true;
        remove_written(&self.path, !self.created)
    }
}

impl Drop for ClaimedDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = remove_written(&self.path, !self.created);
        }
    }
}

fn require_empty_dir(dir: &Path) -> Result<(), PitrError> {
    if dir.exists() && !dir.is_dir() {
        return Err(PitrError::Setup(format!(
            "{} is not a directory; give a new or empty directory",
            dir.display()
        )));
    }
    let has_entries = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if has_entries {
        return Err(PitrError::Setup(format!(
            "{} is not empty; give a new or empty directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Puts every tablespace of the copied base backup inside the scratch directory. A
/// tablespace is a link in `pg_tblspc` (or a line of `tablespace_map`, from which the
/// server makes the links) to a directory elsewhere: into the base backup itself
/// (`base-backup`'s mapping), or, in a file-level copy, the source's live tablespace.
/// The server would write through the link there; it is pointed at a copy of ours
/// instead: the one `copy_dir` already made when the tablespace was inside the base
/// backup, a new one under `stillpoint-tablespaces` otherwise.
async fn relocate_tablespaces(base: &Path, data_dir: &Path) -> Result<(), PitrError> {
    let base = std::fs::canonicalize(base)
        .map_err(|error| PitrError::Setup(format!("resolving {}: {error}", base.display())))?;
    let place = async |oid: &str, target: &Path| -> Result<PathBuf, PitrError> {
        let target = std::fs::canonicalize(target).map_err(|error| {
            PitrError::Setup(format!(
                "the base backup's tablespace {oid} is at {}, which cannot be read: {error}",
                target.display()
            ))
        })?;
        if target.starts_with(data_dir) {
            return Ok(target);
        }
        if let Ok(inside) = target.strip_prefix(&base) {
            let copied = data_dir.join(inside);
            if copied.is_dir() {
                return Ok(copied);
            }
        }
        let ours = data_dir.join(TABLESPACES_DIR).join(oid);
        copy_dir(&target, &ours).await?;
        Ok(ours)
    };
    let setup =
        |what: String| move |error: std::io::Error| PitrError::Setup(format!("{what}: {error}"));
    let links = data_dir.join("pg_tblspc");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries {
            let entry = entry.map_err(setup(format!("reading {}", links.display())))?;
            let link = entry.path();
            // Not a link: a tablespace made in place, inside the data directory.
            let Ok(target) = std::fs::read_link(&link) else {
                continue;
            };
            let oid = entry.file_name().to_string_lossy().into_owned();
            let ours = place(&oid, &links.join(target)).await?;
            std::fs::remove_file(&link).map_err(setup(format!("removing {}", link.display())))?;
            std::os::unix::fs::symlink(&ours, &link)
                .map_err(setup(format!("linking {}", link.display())))?;
        }
    }
    let map = data_dir.join("tablespace_map");
    if let Ok(text) = std::fs::read_to_string(&map) {
        let mut rewritten = String::new();
        for line in text.lines().filter(|line| !line.is_empty()) {
            let Some((oid, path)) = line.split_once(' ') else {
                return Err(PitrError::Setup(format!(
                    "{} has an unreadable line {line:?}",
                    map.display()
                )));
            };
            // A backslash escapes the character after it (a newline in the path).
            let mut target = String::new();
            let mut chars = path.chars();
            while let Some(c) = chars.next() {
                target.push(if c == '\\' {
                    chars.next().unwrap_or(c)
                } else {
                    c
                });
            }
            let ours = place(oid, Path::new(&target)).await?;
            let ours = ours
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('\n', "\\\n")
                .replace('\r', "\\\r");
            rewritten.push_str(&format!("{oid} {ours}\n"));
        }
        std::fs::write(&map, rewritten).map_err(setup(format!("writing {}", map.display())))?;
    }
    Ok(())
}

/// `cp -a`: keeps the permissions and modes PostgreSQL insists on.
async fn copy_dir(from: &Path, to: &Path) -> Result<(), PitrError> {
    std::fs::create_dir_all(to)
        .map_err(|error| PitrError::Setup(format!("creating {}: {error}", to.display())))?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        // Dropped when recovery is cancelled: the copy must stop with it.
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|error| PitrError::Setup(format!("running cp: {error}")))?;
    if !status.success() {
        return Err(PitrError::Setup(format!(
            "copying the base backup {} to {} failed",
            from.display(),
            to.display()
        )));
    }
    set_private(to)
}

/// PostgreSQL refuses a data directory others can read.
pub(crate) fn set_private(dir: &Path) -> Result<(), PitrError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|error| PitrError::Setup(format!("chmod 700 {}: {error}", dir.display())))
}

/// Whether this process runs as root (effective uid 0), from `/proc/self/status`.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

pub(crate) fn tool(config: &PostgresConfig, name: &str) -> PathBuf {
    match &config.bin_dir {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

pub mod spool;

#[cfg(test)]
mod tests;
