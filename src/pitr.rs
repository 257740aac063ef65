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
//!   empty directory.
//! - [`recover`]: copies a base backup into a scratch data directory, starts a
//!   throwaway server on a free port (TCP on 127.0.0.1 only, archiving off so it can
//!   never write into the source's archive) with `recovery.signal` and the target,
//!   waits until it has replayed to the target and promoted, and reports the state it
//!   reached with a content hash of the database. The server is stopped before
//!   returning; the data directory stays only if asked. PostgreSQL refuses to run as
//!   root, so a root caller names a system user to run it as (`runuser`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_postgres::NoTls;

use crate::adapters::PostgresConfig;
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
pub async fn base_backup(
    config: &PostgresConfig,
    dir: &Path,
) -> Result<BaseBackupReport, PitrError> {
    let started = Instant::now();
    require_empty_dir(dir)?;
    let (url, password) = split_password(&config.url)?;
    let mut command = Command::new(tool(config, "pg_basebackup"));
    command
        .arg(format!("--dbname={url}"))
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
        .kill_on_drop(true);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command.output().await.map_err(|error| {
        PitrError::BaseBackup(format!(
            "cannot run {}: {error}",
            tool(config, "pg_basebackup").display()
        ))
    })?;
    if !output.status.success() {
        return Err(PitrError::BaseBackup(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    let label = std::fs::read_to_string(dir.join("backup_label")).unwrap_or_default();
    let start_lsn = label
        .lines()
        .find_map(|line| line.strip_prefix("START WAL LOCATION: "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned);
    Ok(BaseBackupReport {
        dir: dir.to_owned(),
        start_lsn,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// What [`recover`] needs.
#[derive(Debug, Clone)]
pub struct Recovery<'a> {
    /// The source database's config: its URL names the database and user to read
    /// back, its `bin_dir` where `postgres` lives.
    pub config: &'a PostgresConfig,
    /// A plain-format base backup directory (from [`base_backup`] or pg_basebackup).
    pub base_backup: &'a Path,
    /// The directory PostgreSQL's `archive_command` copies WAL segments into.
    pub wal_archive: &'a Path,
    /// The scratch data directory to create (must be empty or absent).
    pub data_dir: &'a Path,
    pub target: Target,
    pub port: u16,
    /// How long replay may take before recovery is given up.
    pub timeout: Duration,
    /// Leave the (stopped) data directory in place afterwards.
    pub keep: bool,
    /// The system user to run the scratch server as (through `runuser`), for a caller
    /// running as root: PostgreSQL refuses to run as root.
    pub run_as: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoveryReport {
    pub target: Target,
    /// The last WAL record replayed.
    pub reached_lsn: Option<String>,
    /// The commit time of the last transaction replayed, Unix ms.
    pub last_transaction_at_ms: Option<i64>,
    pub last_transaction_date_time: Option<String>,
    pub recovery_ms: u64,
    pub content: ContentHash,
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
/// it reached. The scratch server is always stopped before this returns.
pub async fn recover(request: Recovery<'_>) -> Result<RecoveryReport, PitrError> {
    let started = Instant::now();
    let target_text = request.target.to_string();
    let fail = |message: String| PitrError::Recovery {
        target: target_text.clone(),
        message,
    };
    if !request.base_backup.join("PG_VERSION").exists() {
        return Err(PitrError::Setup(format!(
            "{} is not a plain-format base backup (it has no PG_VERSION); take one with \
             `stillpoint base-backup` or pg_basebackup --format=plain",
            request.base_backup.display()
        )));
    }
    if !request.wal_archive.is_dir() {
        return Err(PitrError::Setup(format!(
            "the WAL archive {} is not a directory",
            request.wal_archive.display()
        )));
    }
    require_empty_dir(request.data_dir)?;
    copy_dir(request.base_backup, request.data_dir).await?;
    let cleanup = ScratchDir {
        path: request.data_dir.to_owned(),
        keep: request.keep,
    };
    std::fs::write(request.data_dir.join("recovery.signal"), b"")
        .map_err(|error| fail(format!("writing recovery.signal: {error}")))?;
    let log_path = request.data_dir.join("stillpoint-recovery.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|error| fail(format!("creating {}: {error}", log_path.display())))?;
    if let Some(user) = &request.run_as {
        chown(user, request.data_dir).await?;
    }

    let server_command = ServerCommand {
        config: request.config,
        run_as: request.run_as.as_deref(),
        data_dir: request.data_dir,
    };
    let mut server = server_command.command("postgres");
    server
        .arg("-D")
        .arg(request.data_dir)
        .args(["-p", &request.port.to_string(), "-h", "127.0.0.1"])
        .args(settings(&request))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    let child = server.spawn().map_err(|error| {
        fail(format!(
            "cannot start {}: {error}",
            tool(request.config, "postgres").display()
        ))
    })?;
    let mut server = Server {
        child,
        command: server_command,
    };

    let url = scratch_url(&request.config.url, request.port)?;
    let outcome = wait_for_promotion(&mut server, &url, request.timeout, &log_path).await;
    let report = match outcome {
        Ok(()) => read_state(&url).await,
        Err(message) => Err(message),
    };
    server.stop().await;
    let (reached_lsn, last_transaction_at_ms, content) = report.map_err(fail)?;
    Ok(RecoveryReport {
        target: request.target.clone(),
        reached_lsn,
        last_transaction_at_ms,
        last_transaction_date_time: last_transaction_at_ms.map(|ms| Zone::UTC.format_ms(ms)),
        recovery_ms: started.elapsed().as_millis() as u64,
        content,
        data_dir: cleanup.keep.then(|| cleanup.path.clone()),
    })
}

/// The scratch server's settings. Passed on the command line, so they win over
/// whatever the base backup's postgresql.conf and postgresql.auto.conf say.
fn settings(request: &Recovery<'_>) -> Vec<String> {
    let archive = request
        .wal_archive
        .display()
        .to_string()
        .replace('\'', "''");
    let mut settings = vec![
        // Never archive into the source's archive, never accept local socket
        // connections meant for another server.
        "archive_mode=off".to_owned(),
        "unix_socket_directories=".to_owned(),
        format!("restore_command=cp '{archive}/%f' '%p'"),
        "recovery_target_action=promote".to_owned(),
        "hot_standby=on".to_owned(),
    ];
    settings.push(match &request.target {
        Target::Name(name) => format!("recovery_target_name={name}"),
        Target::Lsn(lsn) => format!("recovery_target_lsn={lsn}"),
        Target::Time(ms) => format!("recovery_target_time={}", postgres_time(*ms)),
    });
    settings
        .into_iter()
        .flat_map(|setting| ["-c".to_owned(), setting])
        .collect()
}

/// `2026-11-22 01:02:03.456+00`, which recovery_target_time reads exactly.
fn postgres_time(ms: i64) -> String {
    let at = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    at.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string()
}

/// Runs the server's programs as the caller, or as `run_as` through `runuser`.
struct ServerCommand<'a> {
    config: &'a PostgresConfig,
    run_as: Option<&'a str>,
    data_dir: &'a Path,
}

impl ServerCommand<'_> {
    fn command(&self, program: &str) -> Command {
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command
                    .args(["-u", user, "--"])
                    .arg(tool(self.config, program));
                command
            }
            None => Command::new(tool(self.config, program)),
        };
        // The caller's working directory may be closed to the server's user.
        command.current_dir(self.data_dir);
        command
    }
}

struct Server<'a> {
    child: Child,
    command: ServerCommand<'a>,
}

impl Server<'_> {
    /// Fast shutdown through pg_ctl, which waits for every backend (killing our child
    /// would only kill `runuser`); SIGKILL if that fails.
    async fn stop(&mut self) {
        let stopped = self
            .command
            .command("pg_ctl")
            .arg("stop")
            .arg("--pgdata")
            .arg(self.command.data_dir)
            .args(["--mode=fast", "--wait", "--timeout=30", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|status| status.success());
        if !stopped {
            let _ = self.child.kill().await;
        }
        let _ = self.child.wait().await;
    }
}

/// `chown -R user: dir`, for a data directory the server's user must own.
async fn chown(user: &str, dir: &Path) -> Result<(), PitrError> {
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

async fn wait_for_promotion(
    server: &mut Server<'_>,
    url: &str,
    timeout: Duration,
    log_path: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(explain_exit(status, log_path));
        }
        if let Ok((client, connection)) = tokio_postgres::connect(url, NoTls).await {
            let driver = tokio::spawn(connection);
            let in_recovery = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map(|row| row.get::<_, bool>(0));
            drop(client);
            let _ = driver.await;
            if let Ok(false) = in_recovery {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "replay did not reach the target within {}s; the server log is {}",
                timeout.as_secs(),
                log_path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Why the scratch server exited, in words an operator can act on.
fn explain_exit(status: std::process::ExitStatus, log_path: &Path) -> String {
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let fatal: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("FATAL") || line.contains("PANIC"))
        .collect();
    if log.contains("recovery ended before configured recovery target was reached") {
        return "the WAL archive ends before the target: the segment holding it has not \
                been archived yet (run SELECT pg_switch_wal() on the source, or wait for \
                archive_timeout), or the base backup is newer than the target"
            .to_owned();
    }
    format!(
        "the scratch server exited ({status}): {}",
        if fatal.is_empty() {
            log.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
        } else {
            fatal.join(" / ")
        }
    )
}

type State = (Option<String>, Option<i64>, ContentHash);

async fn read_state(url: &str) -> Result<State, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|error| format!("connecting to the recovered server: {error}"))?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT pg_last_wal_replay_lsn()::text, \
             (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .map_err(|error| format!("reading the replay position: {error}"))?;
    let content = content_hash_with(&client)
        .await
        .map_err(|error| format!("hashing the recovered database: {error}"))?;
    drop(client);
    let _ = driver.await;
    Ok((row.get(0), row.get(1), content))
}

/// The [`ContentHash`] of the PostgreSQL database `url` names: compare a recovered
/// database with a restored logical copy, or two recoveries with each other.
pub async fn content_hash(url: &str) -> Result<ContentHash, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|error| format!("connecting: {error}"))?;
    let driver = tokio::spawn(connection);
    let hash = content_hash_with(&client)
        .await
        .map_err(|error| error.to_string());
    drop(client);
    let _ = driver.await;
    hash
}

async fn content_hash_with(
    client: &tokio_postgres::Client,
) -> Result<ContentHash, tokio_postgres::Error> {
    let tables = client
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1",
            &[],
        )
        .await?;
    let mut hashes = BTreeMap::new();
    let mut digest = blake3::Hasher::new();
    for table in tables {
        let table: String = table.get(0);
        // Each row's text form, sorted: independent of physical order and of how the
        // rows got there (replayed WAL or a pg_restore).
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') \
                     FROM {table} t"
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

/// Removes the scratch data directory when dropped, unless it is to be kept.
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn require_empty_dir(dir: &Path) -> Result<(), PitrError> {
    let has_entries = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if has_entries {
        return Err(PitrError::Setup(format!(
            "{} is not empty; give a new or empty directory",
            dir.display()
        )));
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
fn set_private(dir: &Path) -> Result<(), PitrError> {
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

fn tool(config: &PostgresConfig, name: &str) -> PathBuf {
    match &config.bin_dir {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

/// The source URL pointed at the scratch server: same user, password and database.
fn scratch_url(source: &str, port: u16) -> Result<String, PitrError> {
    let mut url = url::Url::parse(source).map_err(|_| {
        PitrError::Setup(
            "point-in-time recovery needs a postgres:// URL for the database".to_owned(),
        )
    })?;
    url.set_host(Some("127.0.0.1"))
        .and_then(|()| {
            url.set_port(Some(port))
                .map_err(|()| url::ParseError::InvalidPort)
        })
        .map_err(|error| PitrError::Setup(format!("building the scratch server's URL: {error}")))?;
    Ok(url.to_string())
}

/// The URL without its password (for a command line) and the password (for
/// PGPASSWORD).
fn split_password(source: &str) -> Result<(String, Option<String>), PitrError> {
    let mut url = url::Url::parse(source).map_err(|_| {
        PitrError::Setup("base backups need a postgres:// URL for the database".to_owned())
    })?;
    // tokio-postgres's own parser percent-decodes it exactly as a connection would.
    let password = tokio_postgres::Config::from_str(source)
        .ok()
        .and_then(|config| {
            config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        });
    let _ = url.set_password(None);
    Ok((url.to_string(), password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_time_is_utc_with_milliseconds() {
        assert_eq!(
            postgres_time(1_700_000_000_123),
            "2023-11-14 22:13:20.123+00"
        );
    }

    #[test]
    fn passwords_leave_the_url_for_pgpassword() {
        let (url, password) = split_password("postgres://u:p%40ss@h:5432/db").unwrap();
        assert_eq!(url, "postgres://u@h:5432/db");
        assert_eq!(password.as_deref(), Some("p@ss"));
    }

    #[test]
    fn the_scratch_url_keeps_user_and_database() {
        assert_eq!(
            scratch_url("postgres://u@db.example:5432/ledger?x=1", 6000).unwrap(),
            "postgres://u@127.0.0.1:6000/ledger?x=1"
        );
    }
}
