//! A throwaway MariaDB server: `mariadb-install-db` into a temp dir, `mariadbd` on a free
//! port of 127.0.0.1 with its own socket, the binlog on (so GTIDs too), and `root`
//! reachable over TCP without a password; killed and removed on drop.
//!
//! Every program runs with `--no-defaults` so that the machine's `/etc/mysql` config
//! (which points at the system server's socket, port and data directory) cannot leak in.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use crate::process::{
    INSTALL_HINT, PORT_ATTEMPTS, Probe, READY_DEADLINE, find_binary, free_port, is_root,
    poll_until, read_log, run, stdout_text, succeeds,
};

/// Server options for both the bootstrap and the real server, chosen for a quick start
/// and small footprint: nothing here must survive a crash.
const SPEED_OPTIONS: &[&str] = &[
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=16M",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    // Native AIO needs io_setup slots, which several servers on one machine exhaust.
    "--innodb-use-native-aio=0",
    "--sync-binlog=0",
    "--skip-name-resolve",
];

/// How a [`MariaDb`] is configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MariaDbOptions {
    /// Every commit written to the OS before it returns (InnoDB's log and the binlog),
    /// so a killed server ([`MariaDb::kill`]) loses no committed transaction. Off, the
    /// log is written once a second, and a killed server loses up to that second.
    pub crash_safe: bool,
}

/// A running MariaDB server of its own, reachable as `mysql://root@127.0.0.1:{port}/{db}`
/// without a password.
#[derive(Debug)]
pub struct MariaDb {
    port: u16,
    bin_dir: PathBuf,
    /// `mariadbd`.
    server: PathBuf,
    options: MariaDbOptions,
    data_dir: PathBuf,
    child: Child,
    /// Dropped last, after the server has been killed, which removes everything.
    dir: TempDir,
}

impl MariaDb {
    /// Starts a server and returns once `root` can run `SELECT 1` over TCP; panics with
    /// the server log if it cannot within 30 s.
    pub fn start() -> MariaDb {
        MariaDb::start_with(MariaDbOptions::default())
    }

    /// Starts a server with `options`; as [`MariaDb::start`] otherwise.
    pub fn start_with(options: MariaDbOptions) -> MariaDb {
        let client = find_binary("mariadb", &[PathBuf::from("/usr/bin")])
            .unwrap_or_else(|| panic!("the mariadb client is not in PATH: {INSTALL_HINT}"));
        let bin_dir = client
            .parent()
            .expect("a file found in a directory has a parent")
            .to_path_buf();
        let install_db = find_binary("mariadb-install-db", std::slice::from_ref(&bin_dir))
            .unwrap_or_else(|| panic!("mariadb-install-db is not in PATH: {INSTALL_HINT}"));
        let server = find_binary(
            "mariadbd",
            &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")],
        )
        .unwrap_or_else(|| panic!("mariadbd is not in PATH nor /usr/sbin: {INSTALL_HINT}"));

        let dir = tempfile::Builder::new()
            .prefix("stillpoint-mariadb-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for MariaDB: {e}"));
        let data_dir = dir.path().join("data");
        let tmp_dir = dir.path().join("tmp");
        std::fs::create_dir(&tmp_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", tmp_dir.display()));

        run(
            Command::new(&install_db)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data_dir.display()))
                // `normal` creates root@localhost, root@127.0.0.1 and root@::1 without a
                // password; the default (`socket`) would only let the OS root in.
                .arg("--auth-root-authentication-method=normal")
                .arg("--skip-test-db")
                // The bootstrap server's temporary tables otherwise go to /tmp, where
                // other MariaDB processes (parallel tests, the system server) can
                // remove them mid-install.
                .arg(format!("--tmpdir={}", tmp_dir.display()))
                .args(user_args())
                .args(SPEED_OPTIONS)
                .current_dir(dir.path()),
            "",
            "mariadb-install-db",
        );

        let log_path = dir.path().join("server.log");
        let mut attempt = 1;
        loop {
            let port = free_port();
            let (mut child, ready) = launch(&server, dir.path(), &bin_dir, port, options);
            if let Err(why) = ready {
                let _ = child.kill();
                let _ = child.wait();
                let log = read_log(&log_path);
                // Another process took the port between free_port and the bind.
                let port_taken = log.contains("Address already in use");
                if port_taken && attempt < PORT_ATTEMPTS {
                    attempt += 1;
                    continue;
                }
                panic!("MariaDB did not start on port {port}: {why}\n--- server log ---\n{log}");
            }
            return MariaDb {
                port,
                bin_dir,
                server,
                options,
                data_dir,
                child,
                dir,
            };
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mysql://root@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    pub fn create_database(&self, name: &str) {
        self.sql(
            "",
            &format!("CREATE DATABASE `{}`", name.replace('`', "``")),
        );
    }

    /// Runs SQL through the `mariadb` client in batch mode without column names (tab
    /// between columns, one row per line), stopping at the first error. An empty
    /// `database` selects none. Returns stdout without its trailing newline; panics with
    /// stderr when a statement fails.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        let mut command = client(&self.bin_dir, self.port);
        if !database.is_empty() {
            command.arg(format!("--database={database}"));
        }
        let output = run(
            command.current_dir(self.dir.path()),
            sql,
            &format!("mariadb on {}", self.url(database)),
        );
        stdout_text(&output)
    }

    /// The directory of the client tools: `mariadb`, `mariadb-dump`, `mariadb-binlog`.
    /// (The server, `mariadbd`, lives in `/usr/sbin` on Debian.)
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server's data directory; the binlog files (`binlog.000001`, …) are in it.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    #[cfg(test)]
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server as a crash would (SIGKILL). [`MariaDb::restart`] starts it again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same port (InnoDB recovers, the binlog is
    /// reconciled with it) and returns once it answers; panics with the server log if it
    /// does not within 30 s.
    pub fn restart(&mut self) {
        let (child, ready) = launch(
            &self.server,
            self.dir.path(),
            &self.bin_dir,
            self.port,
            self.options,
        );
        self.child = child;
        if let Err(why) = ready {
            let log = read_log(&self.dir.path().join("server.log"));
            panic!(
                "MariaDB did not start again on port {}: {why}\n--- server log ---\n{log}",
                self.port
            );
        }
    }
}

/// Starts `mariadbd` on the data directory in `dir` and `port`, its log in
/// `dir/server.log` (emptied first, so a retry's log shows only its own run), and waits
/// until it answers or exits.
fn launch(
    server: &Path,
    dir: &Path,
    bin_dir: &Path,
    port: u16,
    options: MariaDbOptions,
) -> (Child, Result<(), String>) {
    let log_path = dir.join("server.log");
    File::create(&log_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let mut command = Command::new(server);
    command
        .arg("--no-defaults")
        .args(user_args())
        .arg(format!("--datadir={}", dir.join("data").display()))
        .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
        .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
        .arg(format!("--log-error={}", log_path.display()))
        .arg(format!("--tmpdir={}", dir.join("tmp").display()))
        .arg(format!("--port={port}"))
        .arg("--bind-address=127.0.0.1")
        // The binlog, in the data directory, is what point-in-time recovery and
        // GTID positions need; row format records exact changes.
        .arg("--log-bin=binlog")
        .arg("--server-id=1")
        .arg("--binlog-format=ROW")
        // Column names and the primary key in every table map: what `stillpoint
        // changes` needs to name the columns of a change.
        .arg("--binlog-row-metadata=FULL")
        .arg("--character-set-server=utf8mb4")
        .arg("--collation-server=utf8mb4_general_ci")
        .args(SPEED_OPTIONS);
    if options.crash_safe {
        // Written to the OS at every commit (flushed to disk once a second): a killed
        // process loses nothing, a power cut could.
        command.arg("--innodb-flush-log-at-trx-commit=2");
    }
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let ready = poll_until(READY_DEADLINE, || match child.try_wait() {
        Ok(Some(status)) => Probe::Failed(format!("the server exited ({status})")),
        Err(e) => Probe::Failed(format!("cannot watch the server process: {e}")),
        Ok(None) if is_ready(bin_dir, port) => Probe::Ready,
        Ok(None) => Probe::NotYet,
    });
    (child, ready)
}

/// mariadbd refuses to run as root unless told to; the alternative, the `mysql`
/// system user, would need the temp dir handed over as PostgreSQL does.
fn user_args() -> &'static [&'static str] {
    if is_root() { &["--user=root"] } else { &[] }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        // mariadbd is our direct child (no runuser wrapper), and its threads die with
        // it, so SIGKILL leaves nothing behind; a clean shutdown would only cost time
        // for data about to be deleted.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `mariadb` client as root over TCP, batch mode, no column names.
fn client(bin_dir: &Path, port: u16) -> Command {
    let mut command = Command::new(bin_dir.join("mariadb"));
    command
        .arg("--no-defaults")
        .args(["--protocol=TCP", "--host=127.0.0.1", "--user=root"])
        .arg(format!("--port={port}"))
        .args(["--batch", "--skip-column-names"]);
    command
}

fn is_ready(bin_dir: &Path, port: u16) -> bool {
    succeeds(
        client(bin_dir, port)
            .arg("--connect-timeout=2")
            .args(["--execute", "SELECT 1"]),
    )
}
