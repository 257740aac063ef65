//! MariaDB base backups made with `mariadb-backup` (the default `base_method`), and
//! their restore into a data directory.
//!
//! **Backup** ([`base_backup`]): `mariadb-backup --backup --stream=xbstream` reads
//! the server's data directory *locally* (it copies InnoDB files and the redo log
//! written meanwhile), so it runs where that directory is readable; the server's
//! `@@datadir` is checked first and an unreadable one is refused, naming the fix (run
//! on the database host, or `base_method = "dump"`). The stream goes through the
//! pipeline (zstd → age → BLAKE3) into `bases/<database>/<id>/base.xbstream<suffix>`,
//! then the record (`kind = "mariadb_backup"`), last. mariadb-backup blocks commits
//! for a moment at its end (`BACKUP STAGE BLOCK_COMMIT`) and reports the binlog
//! position and GTID of exactly that state; they become the base's `start` and
//! `end`: a point's replay starts there. The password goes in a defaults file only
//! we can read (mode 0600, removed afterwards), never on the command line.
//!
//! **Restore** ([`restore_base`]): the stream extracted with `mbstream -x` into the
//! target data directory, then `mariadb-backup --prepare` (the copied redo applied:
//! the data is then as of the base's position). [`ScratchServer`] starts `mariadbd`
//! on such a directory, reached only through its own unix socket (no TCP, no
//! binlog, no grant checks: only our own user can reach the socket's directory), so
//! the archived binlog can be replayed into it (`archive::mariadb`'s replay), and
//! stops it cleanly (SIGTERM, waited for), leaving a data directory any MariaDB of
//! the same version starts on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tokio::process::{Child, Command};

use super::base::{self, BaseRecord};
use super::{ArchiveError, Position};
use crate::adapters::mariadb::{connect, parse_url, shown};
use crate::adapters::{self, MariadbConfig};
use crate::pipeline::{self, Decryption, PipelineSettings};
use crate::storage::Storage;

/// The base record's `kind` for a base this module makes.
pub const KIND: &str = "mariadb_backup";

/// How long a scratch server may take to start (crash recovery of a large base
/// included) or to stop.
const SERVER_WAIT: Duration = Duration::from_secs(300);

/// Takes a base backup of a MariaDB database with `mariadb-backup --stream` into
/// `bases/<database>/<id>/`. The server's binlog must be on, and its data directory
/// readable here.
pub async fn base_backup(
    storage: &Storage,
    settings: &PipelineSettings,
    database: &str,
    config: &MariadbConfig,
) -> Result<BaseRecord, ArchiveError> {
    settings.check()?;
    let id = base::new_base_id();
    let prefix = base::base_prefix(database, &id)?;
    let settings_error = |message: String| ArchiveError::Settings {
        database: database.to_owned(),
        message,
    };
    let server_error = |message: String| ArchiveError::Server {
        database: database.to_owned(),
        message,
    };
    let opts = parse_url(&config.url).map_err(|m| settings_error(format!("its URL: {m}")))?;
    let source_database = opts
        .db_name()
        .filter(|db| !db.is_empty())
        .ok_or_else(|| settings_error(format!("its URL {} names no database", shown(&opts))))?
        .to_owned();
    let mut conn = connect(&opts).await.map_err(server_error)?;
    let row: Option<(String, String, u8)> = conn
        .query_first("SELECT @@datadir, @@version, @@log_bin")
        .await
        .map_err(|e| server_error(format!("reading @@datadir: {e}")))?;
    drop(conn);
    let (datadir, version, log_bin) =
        row.ok_or_else(|| server_error("reading @@datadir: no row".to_owned()))?;
    if log_bin == 0 {
        return Err(settings_error(
            "the server's binlog is off, so a base backup has no position to replay from; \
             set log_bin (and binlog_format = ROW) and restart the server"
                .to_owned(),
        ));
    }
    check_readable(Path::new(&datadir)).map_err(|why| {
        settings_error(format!(
            "mariadb-backup reads the server's data directory {datadir} (@@datadir of {}) \
             from this host's disk, and {why}. Run `stillpoint base-backup` on the database \
             host as a user who can read that directory, or set base_method = \"dump\" on \
             database {database} in the runbook (a consistent dump over the connection)",
            shown(&opts)
        ))
    })?;

    let work = tempfile::Builder::new()
        .prefix("stillpoint-mariadb-backup-")
        .tempdir()
        .map_err(|e| server_error(format!("creating a work directory: {e}")))?;
    let target_dir = work.path().join("target");
    let log_path = work.path().join("mariadb-backup.log");
    std::fs::create_dir(&target_dir)
        .map_err(|e| server_error(format!("creating {}: {e}", target_dir.display())))?;
    let mut command = Command::new(tool(config.bin_dir.as_deref(), "mariadb-backup"));
    // The defaults file must come first; it replaces every other option file (as
    // --no-defaults would), so the host's my.cnf changes nothing here.
    command.arg(format!(
        "--defaults-file={}",
        defaults_file(work.path(), opts.pass())
            .map_err(|e| server_error(format!("writing mariadb-backup's options: {e}")))?
            .display()
    ));
    super::mariadb::connection_args(&mut command, &opts);
    command
        .env_remove("MYSQL_PWD")
        .arg("--backup")
        .arg("--stream=xbstream")
        .arg(format!("--target-dir={}", target_dir.display()));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| server_error(format!("creating {}: {e}", log_path.display())))?;
    let started_at_ms = chrono::Utc::now().timestamp_millis();
    let (stream, producer) =
        adapters::process::spawn_producer_logging(command, "mariadb-backup", true, Some(log))
            .map_err(|e| {
                settings_error(format!(
                    "cannot run {}: {e}; install mariadb-backup (the server's version) or \
                     set bin_dir",
                    tool(config.bin_dir.as_deref(), "mariadb-backup").display()
                ))
            })?;
    let path = format!("{prefix}/base.xbstream{}", settings.suffix());
    let stored = pipeline::store(stream, settings, storage, &path, |_| {}).await;
    let waited = producer.wait().await;
    let said = std::fs::read_to_string(&log_path).unwrap_or_default();
    let remove = || async {
        if let Err(error) = storage.delete(&path).await
            && !error.is_not_found()
        {
            tracing::warn!(%path, %error, "could not remove a failed base backup's artifact");
        }
    };
    let artifact = match (stored, waited) {
        (Ok(artifact), Ok(())) => artifact,
        (_, Err(why)) => {
            remove().await;
            return Err(server_error(format!("{why}: {}", tail(&said))));
        }
        (Err(error), Ok(())) => {
            remove().await;
            return Err(error.into());
        }
    };
    let Some((file, offset, gtid)) = binlog_position(&said) else {
        remove().await;
        return Err(server_error(format!(
            "mariadb-backup did not report the binlog position of its copy: {}",
            tail(&said)
        )));
    };
    let start = Position::binlog(&file, offset);
    let finished_at_ms = chrono::Utc::now().timestamp_millis();
    let mut details = BTreeMap::from([
        ("database".to_owned(), source_database),
        ("server_version".to_owned(), version),
        ("datadir".to_owned(), datadir),
        (
            "took_ms".to_owned(),
            (finished_at_ms - started_at_ms).max(0).to_string(),
        ),
    ]);
    if !gtid.is_empty() {
        details.insert("gtid_binlog_pos".to_owned(), gtid);
    }
    let record = BaseRecord {
        format: base::BASE_FORMAT,
        id,
        database: database.to_owned(),
        adapter: "mariadb".to_owned(),
        kind: KIND.to_owned(),
        // Consistent where commits were blocked, which is where replay starts.
        end: start.clone(),
        start,
        timeline: None,
        started_at_ms,
        finished_at_ms,
        artifact,
        details,
    };
    if let Err(error) = base::write_record(storage, &record).await {
        remove().await;
        return Err(error);
    }
    Ok(record)
}

/// Why the data directory `dir` cannot be read here, if it cannot: it is absent (a
/// server on another host), or its listing or InnoDB's system tablespace cannot be
/// opened (another user's files).
fn check_readable(dir: &Path) -> Result<(), String> {
    std::fs::read_dir(dir).map_err(|e| format!("this host cannot list it ({e})"))?;
    let ibdata = dir.join("ibdata1");
    std::fs::File::open(&ibdata)
        .map(drop)
        .map_err(|e| format!("this host cannot read {} ({e})", ibdata.display()))
}

/// A defaults file holding the password (mode 0600, in our own work directory), or
/// none: `--defaults-file` then only keeps the host's option files out.
fn defaults_file(dir: &Path, password: Option<&str>) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("client.cnf");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    if let Some(password) = password {
        // An option-file value in double quotes keeps `#` and spaces, and reads the
        // escapes \\, \", \n and \r (the file is line-based).
        let quoted = password
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .replace('\r', "\\r");
        for group in ["client", "mariadb-backup"] {
            writeln!(file, "[{group}]\npassword=\"{quoted}\"")?;
        }
    }
    file.sync_all()?;
    Ok(path)
}

/// `(file, position, GTID)` from mariadb-backup's report, e.g. `MySQL binlog
/// position: filename 'binlog.000001', position '807', GTID of the last change
/// '0-1-3'` (the GTID may be empty).
fn binlog_position(log: &str) -> Option<(String, u64, String)> {
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("binlog position: filename '"))?;
    let quoted: Vec<&str> = line.split('\'').skip(1).step_by(2).collect();
    let file = quoted.first()?;
    let position = quoted.get(1)?.parse().ok()?;
    let gtid = quoted.get(2).copied().unwrap_or_default();
    (!file.is_empty()).then(|| (file.to_string(), position, gtid.to_owned()))
}

/// The last lines of a tool's log, for an error message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|line| !line.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

fn tool(bin_dir: Option<&Path>, name: &str) -> PathBuf {
    match bin_dir {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

/// `mariadbd`: beside the client tools, in the `sbin` next to their `bin`, or where
/// distributions install it.
fn server_binary(bin_dir: Option<&Path>) -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = bin_dir {
        candidates.push(dir.join("mariadbd"));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join("sbin").join("mariadbd"));
        }
    }
    candidates.push(PathBuf::from("/usr/sbin/mariadbd"));
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("mariadbd"))
}

/// Restores a `mariadb_backup` base into `data_dir` (which exists and is empty): the
/// artifact's checksum is checked first, then the stream is extracted (`mbstream -x`)
/// and prepared (`mariadb-backup --prepare`). The caller removes `data_dir`'s
/// contents on failure.
pub async fn restore_base(
    storage: &Storage,
    decryption: &Decryption,
    record: &BaseRecord,
    data_dir: &Path,
    bin_dir: Option<&Path>,
) -> Result<(), ArchiveError> {
    let failed = |message: String| ArchiveError::Server {
        database: record.database.clone(),
        message,
    };
    if record.kind != KIND {
        return Err(ArchiveError::Settings {
            database: record.database.clone(),
            message: format!(
                "base {} is a {}, not a {KIND} copy of a data directory",
                record.id, record.kind
            ),
        });
    }
    pipeline::verify_checksum(storage, &record.artifact).await?;
    let stream = pipeline::open(storage, &record.artifact, decryption).await?;
    let mut extract = Command::new(tool(bin_dir, "mbstream"));
    extract.arg("-x").arg("-C").arg(data_dir);
    adapters::process::run_with_stdin(extract, "mbstream", stream, false)
        .await
        .map_err(|why| failed(format!("extracting base {}: {why}", record.id)))?;
    let output = Command::new(tool(bin_dir, "mariadb-backup"))
        .arg("--no-defaults")
        .arg("--prepare")
        .arg(format!("--target-dir={}", data_dir.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| failed(format!("cannot run mariadb-backup --prepare: {e}")))?;
    if !output.status.success() {
        return Err(failed(format!(
            "mariadb-backup --prepare of base {} failed ({}): {}",
            record.id,
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr))
        )));
    }
    Ok(())
}

/// `mariadbd` on a restored data directory, reached only through a unix socket in a
/// directory of its own (0700). Killed if dropped; [`ScratchServer::stop`] shuts it
/// down cleanly.
pub struct ScratchServer {
    child: Child,
    run_dir: tempfile::TempDir,
    data_dir: PathBuf,
}

impl std::fmt::Debug for ScratchServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchServer")
            .field("data_dir", &self.data_dir)
            .field("socket", &self.socket())
            .finish()
    }
}

impl ScratchServer {
    /// Starts mariadbd on `data_dir` and returns once it accepts connections.
    pub async fn start(data_dir: &Path, bin_dir: Option<&Path>) -> Result<ScratchServer, String> {
        // Under the system's temporary directory: a socket path is limited to about
        // 100 bytes.
        let run_dir = tempfile::Builder::new()
            .prefix("stillpoint-mariadbd-")
            .tempdir()
            .map_err(|e| format!("creating the scratch server's directory: {e}"))?;
        let binary = server_binary(bin_dir);
        let mut command = Command::new(&binary);
        command.arg("--no-defaults");
        if crate::pitr::running_as_root() {
            // mariadbd refuses to run as root unless told to; the files are root's.
            command.arg("--user=root");
        }
        let at = |name: &str| run_dir.path().join(name).display().to_string();
        command
            .arg(format!("--datadir={}", data_dir.display()))
            .arg(format!("--socket={}", at("mysqld.sock")))
            .arg(format!("--pid-file={}", at("mysqld.pid")))
            .arg(format!("--log-error={}", at("error.log")))
            .arg(format!("--tmpdir={}", run_dir.path().display()))
            // The restored copy starts no history of its own in a binlog, takes no
            // connection but ours, and follows no replication source the original had.
            .args([
                "--skip-networking",
                "--skip-log-bin",
                "--skip-grant-tables",
                "--skip-slave-start",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| {
            format!(
                "cannot run {}: {e}; install the MariaDB server (the version the base was \
                 taken from)",
                binary.display()
            )
        })?;
        let mut server = ScratchServer {
            child,
            run_dir,
            data_dir: data_dir.to_owned(),
        };
        let opts = parse_url(&server.url("mysql")).map_err(|e| format!("the socket URL: {e}"))?;
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            if let Ok(conn) = connect(&opts).await {
                drop(conn);
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "mariadbd on {} exited ({status}) while starting: {}",
                    data_dir.display(),
                    server.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "mariadbd on {} did not accept connections within {}s: {}",
                    data_dir.display(),
                    SERVER_WAIT.as_secs(),
                    server.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The unix socket it listens on (its only way in).
    pub fn socket(&self) -> PathBuf {
        self.run_dir.path().join("mysqld.sock")
    }

    /// `mysql://root@localhost/<database>?socket=…`: any user is let in (no grant
    /// checks); the socket's directory is ours alone.
    pub fn url(&self, database: &str) -> String {
        let socket = self.socket().display().to_string();
        let encoded: String = url::form_urlencoded::byte_serialize(socket.as_bytes()).collect();
        format!("mysql://root@localhost/{database}?socket={encoded}")
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(self.run_dir.path().join("error.log")).unwrap_or_default())
    }

    /// Shuts the server down cleanly (SIGTERM: InnoDB flushes and closes its files)
    /// and waits for it.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(pid) = self.child.id() {
            adapters::process::send_signal(pid, "TERM").await;
        }
        match tokio::time::timeout(SERVER_WAIT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!(
                "mariadbd on {} exited with {status} when stopped: {}",
                self.data_dir.display(),
                self.log_tail()
            )),
            Ok(Err(e)) => Err(format!("waiting for mariadbd: {e}")),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(format!(
                    "mariadbd on {} did not stop within {}s and was killed",
                    self.data_dir.display(),
                    SERVER_WAIT.as_secs()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The position mariadb-backup reports at the end of its log, with and without
    /// a GTID.
    #[test]
    fn the_binlog_position_is_read_from_the_log() {
        let log = "[00] 2026-11-30 08:54:19 Streaming xtrabackup_binlog_info\n\
                   [00] 2026-11-30 08:54:19 MySQL binlog position: filename 'binlog.000001', \
                   position '807', GTID of the last change '0-1-3'\n\
                   [00] 2026-11-30 08:54:19 completed OK!\n";
        assert_eq!(
            binlog_position(log),
            Some(("binlog.000001".to_owned(), 807, "0-1-3".to_owned()))
        );
        let no_gtid = "MySQL binlog position: filename 'b.000002', position '4', GTID of the \
                       last change ''";
        assert_eq!(
            binlog_position(no_gtid),
            Some(("b.000002".to_owned(), 4, String::new()))
        );
        assert_eq!(binlog_position("[00] completed OK!"), None);
    }

    /// A password reaches mariadb-backup through a file only its owner reads.
    #[test]
    fn the_password_goes_in_a_private_defaults_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = defaults_file(dir.path(), Some(r#"p"w\d"#)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(r#"password="p\"w\\d""#), "{text}");
    }

    /// A data directory this host does not have is named as unreadable.
    #[test]
    fn an_absent_data_directory_is_not_readable() {
        let why = check_readable(Path::new("/nonexistent/mariadb/data")).unwrap_err();
        assert!(why.contains("cannot list it"), "{why}");
    }
}
