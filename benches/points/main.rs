//! Points (issue 11): continuous archiving, base backups and restore points, each
//! measured against a baseline in the same run.
//!
//! On one throwaway PostgreSQL holding a ledger database of ≥ 1 GB at default sizes
//! (generated once, as benches/postgres does), archived at the same time by `stillpoint
//! archive` (pg_receivewal on a slot) and by pgBackRest (its `archive-push` as the
//! server's `archive_command`):
//!
//! - `base.rs` (1): `stillpoint base-backup` vs `pgbackrest backup --type=full`.
//! - `restore.rs` (2, 3): after ≥ 500 MB of WAL since the bases, a point restored by
//!   `stillpoint restore --point` vs `pgbackrest restore --type=name` to the same
//!   restore point; and the point's restore against today's logical restore of the
//!   same database (`stillpoint backup`, then `stillpoint restore`).
//!
//! Then, on a PostgreSQL of its own, the reference ledger cluster under load:
//!
//! - `cluster.rs` (4, 5, 6): client throughput with a point every 10 s vs none, the
//!   points' pause-to-commit latency, and the archive's lag behind the server.
//!
//! And on a MariaDB of its own:
//!
//! - `mariadb.rs` (7): restoring the MariaDB base we store (a consistent dump) vs a
//!   `mariadb-backup --stream` backup, to choose the base format.
//!
//! Run: `scripts/bench points`, or `cargo bench --bench points [-- --quick]` after
//! `cargo build --profile bench -p stillpoint-cli -p stillpoint-ledger`.

#[path = "../support/mod.rs"]
mod support;

mod base;
mod cluster;
mod mariadb;
mod restore;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Flags, Process};
use tokio_util::sync::CancellationToken;

/// The documentation's command for every section of this benchmark.
pub const COMMAND: &str = "scripts/bench points";
/// Every row's part in the summary table.
pub const SECTION: &str = "7. points";
/// The pgBackRest stanza (its name for the one server it backs up).
const STANZA: &str = "bench";
/// zstd level of both tools, as the runbooks of benches/postgres use.
pub const ZSTD_LEVEL: u32 = 3;

/// Sizes, by --quick or not.
pub struct Sizes {
    pub rows: u64,
    /// Base backups of each tool, alternating.
    pub base_rounds: usize,
    /// WAL written between the bases and the point.
    pub wal_bytes: u64,
    /// Restores of each kind, alternating.
    pub restores: usize,
    /// Load segments of each kind (with points, without), alternating.
    pub segments: usize,
    pub segment: Duration,
    /// Rows of the MariaDB table whose base restores are compared.
    pub mariadb_rows: u64,
}

fn main() {
    let flags = Flags::parse();
    let sizes = if flags.quick {
        Sizes {
            rows: 200_000,
            base_rounds: 1,
            wal_bytes: 48 << 20,
            restores: 1,
            segments: 1,
            segment: Duration::from_secs(12),
            mariadb_rows: 50_000,
        }
    } else {
        // About 1.1 GB with its indexes, the size of benches/postgres's large database.
        Sizes {
            rows: 3_500_000,
            base_rounds: 3,
            wal_bytes: 512 << 20,
            restores: 2,
            segments: 4,
            segment: Duration::from_secs(30),
            mariadb_rows: 1_000_000,
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shutdown = CancellationToken::new();
    let (nodes, servers) = runtime.block_on(support::start_admin_nodes(1, shutdown.clone()));

    let mut rows = Vec::new();
    {
        let mut fixture = Fixture::create(&sizes, &nodes);
        let bases = base::compare(&fixture, sizes.base_rounds);
        let prepared = restore::prepare(&fixture, sizes.wal_bytes);
        let restores = restore::compare(&fixture, &prepared, sizes.restores);
        fixture.archiver.stop();
        let (body, row) = bases.report(&fixture);
        flags.section("points-base", &body);
        rows.push(row);
        let (body, mut more) = restores.report(&fixture, &prepared);
        flags.section("points-restore", &body);
        rows.append(&mut more);
        // The server, its archives and pgBackRest's repository go before the next part.
    }
    let cluster = cluster::run(&runtime, &sizes);
    let mariadb = mariadb::compare(&runtime, sizes.mariadb_rows, sizes.restores);

    shutdown.cancel();
    runtime.block_on(async {
        for server in servers {
            server.await.unwrap();
        }
    });

    let (body, mut more) = cluster.report(&sizes);
    flags.section("points-load", &body);
    rows.append(&mut more);
    let (body, row) = mariadb.report();
    flags.section("points-mariadb", &body);
    rows.push(row);
    flags.rows(&rows);
}

/// The server with the large database, both archivers on it, the runbook, pgBackRest.
pub struct Fixture {
    /// First, so that it stops before the server when a panic drops everything.
    pub archiver: Archiver,
    pub postgres: Server,
    pub rows: u64,
    /// `pg_database_size` of the large database after generation.
    pub bytes: u64,
    /// Scratch space on the same disk as both repositories: storage, pgBackRest's
    /// repository, restored data directories.
    pub dir: tempfile::TempDir,
    pub runbook: PathBuf,
    pub pgbackrest: PgBackRest,
}

/// The large database's name in the server and the runbook.
pub const DATABASE: &str = "large";

impl Fixture {
    fn create(sizes: &Sizes, nodes: &[String]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // Restores run their servers as `postgres`, which must reach what is under it.
        set_mode(dir.path(), 0o755);
        let pgbackrest = PgBackRest::new(dir.path());
        // pgBackRest archives through the server's archive_command from the start.
        let postgres = Server::init(
            &dir.path().join("pg"),
            "server",
            &[
                "archive_mode=on".to_owned(),
                format!("archive_command='{}'", pgbackrest.archive_command()),
            ],
        );
        pgbackrest.configure(&postgres);
        let started = Instant::now();
        postgres.create_database(DATABASE);
        let bytes =
            support::create_ledger_table(|db, sql| postgres.psql(db, sql), DATABASE, sizes.rows);
        eprintln!(
            "generated {:.0} MiB in {:.0?}",
            support::mib(bytes),
            started.elapsed()
        );
        pgbackrest.run(&["stanza-create"]);
        pgbackrest.run(&["check"]);

        let key = age::x25519::Identity::generate();
        let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_owned();
        let identity_file = dir.path().join("key.txt");
        std::fs::write(&identity_file, format!("{identity}\n")).unwrap();
        let runbook = dir.path().join("runbook.toml");
        std::fs::write(
            &runbook,
            format!(
                r#"
cluster = "bench-points"
[pause]
tiers = [{{ addresses = [{nodes}] }}]
lease = "30s"
max_wait = "5s"
[[databases]]
name = "{DATABASE}"
adapter = "postgres"
url = "{url}"
bin_dir = "{bin_dir}"
archive = true
[pipeline]
zstd_level = {ZSTD_LEVEL}
age_recipients = ["{recipient}"]
age_identity_file = "{identity_file}"
[storage]
url = "file://{storage}"
[archive]
spool_dir = "{spool}"
"#,
                nodes = nodes
                    .iter()
                    .map(|node| format!("\"{node}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                url = postgres.url(DATABASE),
                bin_dir = postgres.bin_dir.display(),
                recipient = key.to_public(),
                identity_file = identity_file.display(),
                storage = dir.path().join("storage").display(),
                spool = dir.path().join("spool").display(),
            ),
        )
        .unwrap();
        let archiver = Archiver::start(&runbook);
        archiver.wait_streaming(&postgres, 1);
        Fixture {
            postgres,
            rows: sizes.rows,
            bytes,
            dir,
            runbook,
            pgbackrest,
            archiver,
        }
    }

    pub fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }
}

/// pgBackRest on the same server: its own configuration file, repository, log and
/// lock directories under the scratch directory (the same disk as our storage), run
/// as the server's system user (it reads the data directory).
pub struct PgBackRest {
    pub config: PathBuf,
    pub repo: PathBuf,
}

impl PgBackRest {
    fn new(dir: &Path) -> PgBackRest {
        let home = dir.join("pgbackrest");
        let repo = home.join("repo");
        for sub in ["repo", "log", "lock"] {
            std::fs::create_dir_all(home.join(sub)).unwrap();
        }
        PgBackRest {
            config: home.join("pgbackrest.conf"),
            repo,
        }
    }

    /// Writes its configuration for `server`.
    fn configure(&self, server: &Server) {
        let home = self.config.parent().unwrap();
        std::fs::write(
            &self.config,
            format!(
                "[global]\n\
                 repo1-path={repo}\n\
                 # Encrypted, as our storage is (age); kept, never expired, in this run.\n\
                 repo1-cipher-type=aes-256-cbc\n\
                 repo1-cipher-pass=bench-only-passphrase\n\
                 repo1-retention-full=100\n\
                 # zstd at our level, one process as ours has (pg_basebackup).\n\
                 compress-type=zst\n\
                 compress-level={ZSTD_LEVEL}\n\
                 process-max=1\n\
                 start-fast=y\n\
                 log-path={home}/log\n\
                 lock-path={home}/lock\n\
                 log-level-console=warn\n\
                 log-level-file=off\n\
                 \n\
                 [{STANZA}]\n\
                 pg1-path={data}\n\
                 pg1-port={port}\n\
                 pg1-socket-path={socket}\n\
                 pg1-user=postgres\n",
                repo = self.repo.display(),
                home = home.display(),
                data = server.data_dir.display(),
                port = server.port,
                socket = server.data_dir.display(),
            ),
        )
        .unwrap();
        chown_to_postgres(home);
    }

    fn archive_command(&self) -> String {
        format!(
            "pgbackrest --config={} --stanza={STANZA} archive-push %p",
            self.config.display()
        )
    }

    /// `pgbackrest --config=… --stanza=bench ARGS…`, as the server's user; panics with
    /// its output when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let mut command = as_postgres("pgbackrest");
        command
            .arg(format!("--config={}", self.config.display()))
            .arg(format!("--stanza={STANZA}"))
            .args(args);
        run(&mut command)
    }
}

/// `stillpoint archive --output json`, running for the whole benchmark; a thread reads
/// its lines as they come and notes when each arrived, with how far the archive of
/// its database then reached.
pub struct Archiver {
    process: Option<Process>,
    pub reports: Arc<Mutex<Vec<ArchiveReport>>>,
}

pub struct ArchiveReport {
    pub at: Instant,
    pub database: String,
    pub archived_to: u64,
}

impl Archiver {
    pub fn start(runbook: &Path) -> Archiver {
        let mut process = Process::spawn(
            Command::new(support::workspace_binary("stillpoint"))
                .args(["archive", "--config"])
                .arg(runbook)
                .args(["--output", "json"])
                .env("RUST_LOG", "warn"),
        );
        let stdout = process.take_stdout();
        let reports: Arc<Mutex<Vec<ArchiveReport>>> = Arc::default();
        let sink = reports.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let Ok(report) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let (Some(database), Some(to)) =
                    (report["database"].as_str(), report["archived_to"].as_str())
                {
                    sink.lock().unwrap().push(ArchiveReport {
                        at,
                        database: database.to_owned(),
                        archived_to: lsn(to),
                    });
                }
            }
        });
        Archiver {
            process: Some(process),
            reports,
        }
    }

    /// Waits until `server` streams to every archiver (`databases` replication slots
    /// active): a base backup started earlier could begin before the archive does.
    pub fn wait_streaming(&self, server: &Server, databases: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let sql = "SELECT count(*) FROM pg_replication_slots \
                   WHERE active AND slot_name LIKE 'stillpoint\\_%'";
        while server.psql("postgres", sql) != databases.to_string() {
            assert!(
                Instant::now() < deadline,
                "stillpoint archive did not start streaming within 2 minutes"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM: it pushes what it received, stops pg_receivewal and exits.
    pub fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            process.signal("TERM");
            process.wait_stdout();
        }
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// "16/B374D848" → its 64-bit position.
pub fn lsn(text: &str) -> u64 {
    let (high, low) = text
        .trim()
        .split_once('/')
        .unwrap_or_else(|| panic!("{text:?} is not an LSN"));
    (u64::from_str_radix(high, 16).unwrap() << 32) | u64::from_str_radix(low, 16).unwrap()
}

/// `stillpoint ARGS… --output json`; panics with its stderr when it fails.
pub fn stillpoint(args: &[&str]) -> serde_json::Value {
    let text = run(Command::new(support::workspace_binary("stillpoint"))
        .args(args)
        .args(["--output", "json"])
        .env("RUST_LOG", "warn"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stillpoint {args:?}: {e}: {text}"))
}

/// Runs `command` to the end; its stdout, or a panic naming it with its stderr.
pub fn run(command: &mut Command) -> String {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `program` as the server's system user: PostgreSQL refuses to run as root, and the
/// testkit's servers (and their data directories) belong to `postgres` then.
pub fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if stillpoint::pitr::running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

pub fn chown_to_postgres(path: &Path) {
    if stillpoint::pitr::running_as_root() {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path));
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A PostgreSQL server the benchmark runs itself, on 127.0.0.1, a port of its own and
/// its data directory as its socket directory; stopped (and its data directory
/// removed) when dropped. Not the testkit's: that one fixes `archive_command` on the
/// server's command line, where nothing overrides it, and pgBackRest's must go there.
pub struct Server {
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub port: u16,
}

impl Server {
    /// `initdb` into `parent/name` (`parent` given to the server's user), then
    /// [`Server::start`].
    pub fn init(parent: &Path, name: &str, settings: &[String]) -> Server {
        std::fs::create_dir_all(parent).unwrap();
        set_mode(parent, 0o755);
        chown_to_postgres(parent);
        let bin_dir = bin_dir();
        let data_dir = parent.join(name);
        run(as_postgres(bin_dir.join("initdb"))
            .arg("--pgdata")
            .arg(&data_dir)
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]));
        Server::start(&bin_dir, &data_dir, settings)
    }

    /// Starts the server in `data_dir` with `settings` (`name=value`, over any file's);
    /// returns once recovery, if any, has ended (promoted) and it accepts connections:
    /// the end both point restores are timed to.
    pub fn start(bin_dir: &Path, data_dir: &Path, settings: &[String]) -> Server {
        let port = stillpoint_testkit::free_port();
        // As the testkit's servers: small, so that several fit on the machine.
        let mut options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{socket}' \
             -c shared_buffers=32MB",
            socket = data_dir.display(),
        );
        for setting in settings {
            options.push_str(&format!(" -c {setting}"));
        }
        run(as_postgres(bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(data_dir)
            .args(["-o", &options, "-l"])
            .arg(data_dir.with_extension("log"))
            .args(["--no-wait", "start"]));
        let server = Server {
            bin_dir: bin_dir.to_owned(),
            data_dir: data_dir.to_owned(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            // Connections open while a standby still replays; only the end counts.
            let answer = server.try_psql("postgres", "SELECT pg_is_in_recovery()");
            if answer.as_deref() == Ok("f") {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "the server in {} did not finish recovery ({answer:?}): {}",
                data_dir.display(),
                std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
    }

    /// Runs SQL (statements one after another, as a file: VACUUM included); the
    /// output without its trailing newline, or a panic with the error.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        self.try_psql(database, sql)
            .unwrap_or_else(|error| panic!("{sql} failed on {}: {error}", self.url(database)))
    }

    /// [`Server::psql`], with psql's error instead of a panic.
    fn try_psql(&self, database: &str, sql: &str) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new(self.bin_dir.join("psql"))
            .args(["--no-psqlrc", "--quiet", "--tuples-only", "--no-align"])
            .args(["--set", "ON_ERROR_STOP=1", "--file", "-"])
            .args(["--host", "127.0.0.1", "--username", "postgres"])
            .args(["--port", &self.port.to_string(), "--dbname", database])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .map_err(|e| format!("cannot write to psql: {e}"))?;
        let output = child.wait_with_output().map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_postgres(self.bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(self.data_dir.with_extension("log"));
    }
}

/// The newest PostgreSQL's bin directory (`/usr/lib/postgresql/<version>/bin`), where
/// the testkit also looks first.
fn bin_dir() -> PathBuf {
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
    versions
        .pop()
        .expect("no PostgreSQL in /usr/lib/postgresql/*/bin: run scripts/install-packages")
        .1
}
