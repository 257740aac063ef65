//! A throwaway PostgreSQL server: `initdb` into a temp dir, `postgres` on a free port of
//! 127.0.0.1 with trust auth and its unix socket inside the temp dir, stopped and removed
//! on drop. Also [`DetachedPostgres`]: a server the program under test started, stopped
//! on drop.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the temp dir is given
//! to the `postgres` system user and the server-side commands run through
//! `runuser -u postgres --`. Clients (psql, pg_isready) run as the caller and connect
//! over TCP as the database user `postgres`.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use crate::process::{
    INSTALL_HINT, PORT_ATTEMPTS, Probe, READY_DEADLINE, chown_recursive, find_binary, free_port,
    is_root, poll_until, read_log, run, stdout_text, succeeds,
};

/// The system user PostgreSQL runs as when the tests run as root (Debian's package
/// creates it).
const SYSTEM_USER: &str = "postgres";

/// How a [`Postgres`] is configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Archive WAL into `<tempdir>/wal_archive` (`wal_level=logical`, `archive_mode=on`)
    /// and keep the durability settings PITR needs, for tests that restore to a point in
    /// time. Off, the server trades durability for start-up and write speed.
    pub wal_archive: bool,
}

/// A running PostgreSQL server of its own, reachable as
/// `postgres://postgres@127.0.0.1:{port}/{db}` without a password.
#[derive(Debug)]
pub struct Postgres {
    port: u16,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    wal_archive: Option<PathBuf>,
    /// `postgres`, or `runuser` wrapping it when running as root.
    child: Child,
    /// Whether server-side commands go through `runuser -u postgres --`.
    as_system_user: bool,
    /// Dropped last, after the server has stopped, which removes everything.
    dir: TempDir,
}

impl Postgres {
    /// Starts a server with default [`PostgresOptions`].
    pub fn start() -> Postgres {
        Postgres::start_with(PostgresOptions::default())
    }

    /// Starts a server and returns once it accepts connections over TCP; panics with the
    /// server log if it does not within 30 s.
    pub fn start_with(options: PostgresOptions) -> Postgres {
        let bin_dir = find_bin_dir();
        let as_system_user = is_root();
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for PostgreSQL: {e}"));
        let data_dir = dir.path().join("data");
        let socket_dir = dir.path().join("socket");
        std::fs::create_dir(&socket_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", socket_dir.display()));
        let wal_archive = options.wal_archive.then(|| dir.path().join("wal_archive"));
        if let Some(archive) = &wal_archive {
            std::fs::create_dir(archive)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", archive.display()));
        }
        if as_system_user {
            chown_recursive(SYSTEM_USER, dir.path());
        }

        let server = ServerCommand {
            bin_dir: &bin_dir,
            dir: dir.path(),
            as_system_user,
        };
        run(
            server
                .command("initdb")
                .arg("--pgdata")
                .arg(&data_dir)
                .args([
                    "--username=postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    // Nothing here must survive a power cut, and skipping the fsyncs
                    // saves most of initdb's time.
                    "--no-sync",
                    "--no-instructions",
                ]),
            "",
            "initdb",
        );

        let log_path = dir.path().join("server.log");
        let mut attempt = 1;
        loop {
            let port = free_port();
            let (mut child, ready) = server.launch(&data_dir, port, wal_archive.as_deref());
            if let Err(why) = ready {
                server.stop(&data_dir, &mut child);
                let log = read_log(&log_path);
                // Another process took the port between free_port and the bind: the
                // data directory is fine, only the port needs to change.
                let port_taken = log.contains("could not bind") || log.contains("already in use");
                if port_taken && attempt < PORT_ATTEMPTS {
                    attempt += 1;
                    continue;
                }
                panic!("PostgreSQL did not start on port {port}: {why}\n--- server log ---\n{log}");
            }
            return Postgres {
                port,
                bin_dir,
                data_dir,
                wal_archive,
                child,
                as_system_user,
                dir,
            };
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
    }

    /// Creates a superuser `role` that must log in over TCP with `password`
    /// (SCRAM): the server's other users keep trust auth. For tests of how passwords
    /// reach the server and its tools (`replication` included, for pg_basebackup).
    pub fn add_password_role(&self, role: &str, password: &str) {
        self.psql(
            "postgres",
            &format!(
                "CREATE ROLE \"{}\" LOGIN SUPERUSER REPLICATION PASSWORD '{}'",
                role.replace('"', "\"\""),
                password.replace('\'', "''")
            ),
        );
        let hba_path = self.data_dir.join("pg_hba.conf");
        let hba = std::fs::read_to_string(&hba_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", hba_path.display()));
        // The first matching line wins: these go before initdb's trust lines.
        let quoted = format!("\"{}\"", role.replace('"', "\"\""));
        let lines = format!(
            "host all {quoted} 127.0.0.1/32 scram-sha-256\n\
             host replication {quoted} 127.0.0.1/32 scram-sha-256\n"
        );
        std::fs::write(&hba_path, format!("{lines}{hba}"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", hba_path.display()));
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// Runs SQL through `psql -At` (tuples only, unaligned, `|` between columns), one
    /// statement after another, stopping at the first error. Returns stdout without its
    /// trailing newline; panics with stderr when a statement fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = run(
            Command::new(self.bin_dir.join("psql"))
                .args(["--no-psqlrc", "--quiet", "--tuples-only", "--no-align"])
                .args(["--set", "ON_ERROR_STOP=1"])
                .args(["--host", "127.0.0.1", "--username", "postgres"])
                .arg("--port")
                .arg(self.port.to_string())
                .arg("--dbname")
                .arg(database)
                .args(["--file", "-"])
                .current_dir(self.dir.path()),
            sql,
            &format!("psql on {}", self.url(database)),
        );
        stdout_text(&output)
    }

    /// The directory holding `initdb`, `pg_ctl`, `pg_dump`, `pg_restore`, `psql` and the
    /// rest of the server's own version of the tools.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Where `archive_command` copies WAL segments, when started with `wal_archive`.
    pub fn wal_archive_dir(&self) -> Option<&Path> {
        self.wal_archive.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kills the server as a crash would: SIGKILL to the postmaster, no shutdown
    /// checkpoint. Its backends notice and exit by themselves. [`Postgres::restart`]
    /// starts it again.
    pub fn kill(&mut self) {
        let pid = self.postmaster_pid();
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same port (it runs crash recovery) and
    /// returns once it accepts connections; panics with the server log if it does not
    /// within 30 s. The backends of the killed postmaster may still hold its shared
    /// memory for a moment, which makes a start fail: it is tried again until then.
    pub fn restart(&mut self) {
        let server = ServerCommand {
            bin_dir: &self.bin_dir,
            dir: self.dir.path(),
            as_system_user: self.as_system_user,
        };
        let log_path = self.dir.path().join("server.log");
        let started = std::time::Instant::now();
        let child = loop {
            let (mut child, ready) =
                server.launch(&self.data_dir, self.port, self.wal_archive.as_deref());
            match ready {
                Ok(()) => break child,
                Err(why) => {
                    server.stop(&self.data_dir, &mut child);
                    if started.elapsed() > READY_DEADLINE {
                        let log = read_log(&log_path);
                        panic!(
                            "PostgreSQL did not start again on port {}: {why}\n--- server log ---\n{log}",
                            self.port
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        };
        self.child = child;
    }

    /// The postmaster's process id, from its lock file.
    pub fn postmaster_pid(&self) -> u32 {
        let pid_file = self.data_dir.join("postmaster.pid");
        read_log(&pid_file)
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", pid_file.display()))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Postgres {
            bin_dir,
            data_dir,
            child,
            as_system_user,
            dir,
            ..
        } = self;
        ServerCommand {
            bin_dir,
            dir: dir.path(),
            as_system_user: *as_system_user,
        }
        .stop(data_dir, child);
    }
}

/// A PostgreSQL server that the program under test started detached, to outlive its
/// own process (`stillpoint standby` does, for its standby server): stopped (immediate)
/// when dropped, if it runs.
#[derive(Debug)]
pub struct DetachedPostgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
}

impl DetachedPostgres {
    /// The server of `data_dir`, whose `pg_ctl` is in `bin_dir`; it need not run yet.
    pub fn new(data_dir: impl Into<PathBuf>, bin_dir: impl Into<PathBuf>) -> DetachedPostgres {
        DetachedPostgres {
            data_dir: data_dir.into(),
            bin_dir: bin_dir.into(),
        }
    }
}

impl Drop for DetachedPostgres {
    fn drop(&mut self) {
        if !self.data_dir.join("postmaster.pid").exists() {
            return;
        }
        // As `Postgres`'s own: the server runs as `postgres` when the tests run as root.
        ServerCommand {
            bin_dir: &self.bin_dir,
            dir: &self.data_dir,
            as_system_user: is_root(),
        }
        .stop_immediately(&self.data_dir);
    }
}

/// `-c name=value` settings for the server.
fn setting_args(wal_archive: Option<&Path>) -> Vec<OsString> {
    let mut settings: Vec<String> = vec![
        // Small, so that many servers fit on a test machine at once.
        "shared_buffers=32MB".into(),
        "max_connections=100".into(),
    ];
    match wal_archive {
        Some(archive) => {
            let archive = archive.display();
            settings.extend([
                // Logical: what a change stream (`changes = true`) needs; a superset
                // of replica, which PITR needs.
                "wal_level=logical".into(),
                "archive_mode=on".into(),
                // `test ! -f` refuses to overwrite a segment, as the PostgreSQL docs
                // recommend, so a mistake cannot silently corrupt the archive. Copying
                // to a temporary name and renaming makes a segment appear whole: a
                // reader polling for the file never sees it half-written.
                format!(
                    "archive_command=test ! -f {archive}/%f && cp %p {archive}/%f.tmp && mv {archive}/%f.tmp {archive}/%f"
                ),
            ]);
        }
        None => settings.extend([
            // Durability buys nothing in a throwaway server; PITR tests keep the defaults.
            "fsync=off".into(),
            "synchronous_commit=off".into(),
            "full_page_writes=off".into(),
        ]),
    }
    settings
        .into_iter()
        .flat_map(|setting| [OsString::from("-c"), OsString::from(setting)])
        .collect()
}

/// Whether the server accepts connections over TCP.
fn is_ready(bin_dir: &Path, port: u16) -> bool {
    succeeds(
        Command::new(bin_dir.join("pg_isready"))
            .args([
                "--host",
                "127.0.0.1",
                "--username",
                "postgres",
                "--dbname",
                "postgres",
            ])
            .args(["--timeout", "2", "--quiet"])
            .arg("--port")
            .arg(port.to_string()),
    )
}

/// Builds server-side commands: as the caller, or as `postgres` through `runuser` when
/// the caller is root.
struct ServerCommand<'a> {
    bin_dir: &'a Path,
    dir: &'a Path,
    as_system_user: bool,
}

impl ServerCommand<'_> {
    fn command(&self, program: &str) -> Command {
        let program = self.bin_dir.join(program);
        let mut command = if self.as_system_user {
            let mut command = Command::new("runuser");
            command.args(["-u", SYSTEM_USER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        // The caller's working directory may be unreadable for the postgres user.
        command.current_dir(self.dir);
        command
    }

    /// Starts the postmaster on `port`, its log in `server.log`, and waits until it
    /// accepts connections or exits.
    fn launch(
        &self,
        data_dir: &Path,
        port: u16,
        wal_archive: Option<&Path>,
    ) -> (Child, Result<(), String>) {
        let log_path = self.dir.join("server.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(self.dir.join("socket"))
            .args(["-h", "127.0.0.1"])
            .args(setting_args(wal_archive))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        let ready = poll_until(READY_DEADLINE, || match child.try_wait() {
            Ok(Some(status)) => Probe::Failed(format!("the server exited ({status})")),
            Err(e) => Probe::Failed(format!("cannot watch the server process: {e}")),
            Ok(None) if is_ready(self.bin_dir, port) => Probe::Ready,
            Ok(None) => Probe::NotYet,
        });
        (child, ready)
    }

    /// Stops the server and waits for it; never panics, because it runs in `Drop`.
    fn stop(&self, data_dir: &Path, child: &mut Child) {
        // `pg_ctl stop -m immediate` makes the postmaster end all its backends before it
        // exits, and waits for that; killing the process we spawned would only kill
        // `runuser` when running as root, and would orphan the backends either way.
        if !self.stop_immediately(data_dir) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// `pg_ctl stop -m immediate`, waiting up to 30 s; whether it stopped the server.
    fn stop_immediately(&self, data_dir: &Path) -> bool {
        succeeds(
            self.command("pg_ctl")
                .arg("stop")
                .arg("--pgdata")
                .arg(data_dir)
                .args(["--mode=immediate", "--wait", "--timeout=30", "--silent"]),
        )
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), else the directory
/// of the `initdb` found in `PATH`.
fn find_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let initdb = find_binary("initdb", &[]).unwrap_or_else(|| {
        panic!(
            "PostgreSQL's initdb is not in /usr/lib/postgresql/*/bin nor in PATH: {INSTALL_HINT}"
        )
    });
    // Follow a symlink such as /usr/local/bin/initdb to the real bin directory, where
    // pg_ctl, psql and pg_isready of the same version live.
    let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    let bin = initdb
        .parent()
        .expect("a file found in a directory has a parent")
        .to_path_buf();
    for tool in ["pg_ctl", "postgres", "psql", "pg_isready"] {
        if !bin.join(tool).is_file() {
            panic!("{} has initdb but no {tool}: {INSTALL_HINT}", bin.display());
        }
    }
    bin
}
