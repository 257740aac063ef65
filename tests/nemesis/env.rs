//! The cluster under test and everything around it, each a real process this run
//! starts and can kill: PostgreSQL (the ledger database) and MariaDB (the auditor's),
//! three ledger nodes and the auditor node, the S3-compatible storage (moto_server) or
//! a small tmpfs for file storage, `stillpoint serve` with its runbook, and one
//! `ledger-node load` per ledger node.
//!
//! Addresses: clients use each node's application port on 127.0.0.1; the service
//! reaches each node's admin port at 127.0.0.11 and up, and the storage at 127.0.0.20,
//! so that `net::Lanes` can cut or slow exactly those paths.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint_testkit::{MariaDb, MariaDbOptions, Postgres, PostgresOptions, free_port};

pub const LEDGER_NODES: usize = 3;
/// The service's address for the storage.
pub const STORAGE_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 20);
/// The pause lease the service gives the nodes: what the lease check measures against.
pub const LEASE: Duration = Duration::from_secs(6);
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
const TOKEN: &str = "nemesis-operator-token-0123456789";

/// A child process, SIGKILLed and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status();
    }

    pub fn exited(&mut self) -> bool {
        !matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, SIGKILLing it after `within`.
    pub fn wait(mut self, within: Duration) {
        let started = Instant::now();
        while !self.exited() && started.elapsed() < within {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for(within: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn listens(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
}

/// Appends to `path` (a process's stderr, kept across its restarts).
fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// A ledger or auditor node: its command line, ports, and process when it runs.
pub struct Node {
    pub name: String,
    /// Where clients send transfers (and ledger nodes their audit records).
    pub app: SocketAddr,
    /// Where the service pauses it, at the node's own address.
    pub admin: SocketAddr,
    args: Vec<String>,
    /// The file libfaketime reads the node's clock offset from (`+0`, `+30`).
    pub clock: Option<PathBuf>,
    log: PathBuf,
    pub process: Option<Proc>,
}

impl Node {
    pub fn start(&mut self) {
        let mut command = Command::new(stillpoint_testkit::workspace_binary("ledger-node"));
        command.args(&self.args);
        if let Some(clock) = &self.clock {
            command
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", clock)
                .env("FAKETIME_CACHE_DURATION", "1")
                // Only the wall clock steps: leases and timers run on the monotonic one.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.log))
            .spawn()
            .unwrap();
        let mut process = Proc(child);
        wait_for(Duration::from_secs(30), &self.name, || {
            assert!(
                !process.exited(),
                "{} exited; see {}",
                self.name,
                self.log.display()
            );
            listens(self.app) && listens(self.admin)
        });
        self.process = Some(process);
    }

    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.signal("KILL");
            process.wait(Duration::from_secs(10));
        }
    }
}

pub enum Storage {
    /// moto_server, at STORAGE_HOST.
    S3 { process: Proc, port: u16 },
    /// A directory on a tmpfs of its own (unmounted on drop).
    File { mount: PathBuf },
}

pub struct Env {
    pub postgres: Postgres,
    pub mariadb: MariaDb,
    pub nodes: Vec<Node>,
    pub storage: Storage,
    pub runbook: PathBuf,
    pub service_port: u16,
    pub service: Option<Proc>,
    pub loads: Vec<Proc>,
    pub dir: PathBuf,
    // Last: removed after every process that uses it has stopped.
    _dir: tempfile::TempDir,
}

impl Env {
    pub fn start(s3: bool, seed: u64) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-nemesis-")
            .tempdir()
            .unwrap();
        // Drills' scratch PostgreSQL servers run as `postgres` and read what is here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let path = dir.path().to_owned();
        let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
        postgres.create_database("ledger");
        let mariadb = MariaDb::start_with(MariaDbOptions { crash_safe: true });
        mariadb.create_database("auditor");

        let auditor_app: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
        let mut nodes = vec![Node {
            name: "auditor".to_owned(),
            app: auditor_app,
            admin: (Ipv4Addr::new(127, 0, 0, 14), free_port()).into(),
            args: Vec::new(),
            clock: None,
            log: path.join("auditor.log"),
            process: None,
        }];
        for k in 0..LEDGER_NODES {
            let clock = path.join(format!("clock-{k}"));
            std::fs::write(&clock, "+0\n").unwrap();
            nodes.push(Node {
                name: format!("ledger-{k}"),
                app: (Ipv4Addr::LOCALHOST, free_port()).into(),
                admin: (Ipv4Addr::new(127, 0, 0, 11 + k as u8), free_port()).into(),
                args: Vec::new(),
                clock: Some(clock),
                log: path.join(format!("ledger-{k}.log")),
                process: None,
            });
        }
        // The auditor first (ledger nodes record through it).
        for node in &mut nodes {
            let (role, db) = if node.name == "auditor" {
                ("auditor", mariadb.url("auditor"))
            } else {
                ("ledger", postgres.url("ledger"))
            };
            node.args = [
                "serve",
                "--role",
                role,
                "--listen",
                &node.app.to_string(),
                "--admin-listen",
                &node.admin.to_string(),
                "--db",
                &db,
            ]
            .map(str::to_owned)
            .to_vec();
            if role == "ledger" {
                node.args
                    .extend(["--auditor".to_owned(), auditor_app.to_string()]);
            }
            node.start();
        }

        let storage = if s3 {
            let port = free_port();
            let child = Command::new("moto_server")
                .args(["-H", &STORAGE_HOST.to_string(), "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(log_file(&path.join("moto.log")))
                .spawn()
                .expect("moto_server (scripts/install-packages installs it)");
            let process = Proc(child);
            wait_for(Duration::from_secs(60), "moto_server", || {
                listens((STORAGE_HOST, port).into())
            });
            let created = Command::new("python3")
                .args([
                    "-c",
                    &format!(
                        "import boto3; boto3.client('s3', endpoint_url='http://{STORAGE_HOST}:{port}', \
                         aws_access_key_id='k', aws_secret_access_key='s', \
                         region_name='us-east-1').create_bucket(Bucket='nemesis')"
                    ),
                ])
                .status()
                .unwrap();
            assert!(created.success(), "creating the bucket failed");
            Storage::S3 { process, port }
        } else {
            let mount = path.join("storage");
            std::fs::create_dir(&mount).unwrap();
            let mounted = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1g", "nemesis"])
                .arg(&mount)
                .status()
                .unwrap();
            assert!(
                mounted.success(),
                "mounting a tmpfs for the storage failed (needs root)"
            );
            Storage::File { mount }
        };

        let runbook = path.join("runbook.toml");
        std::fs::write(
            &runbook,
            runbook_text(&path, &nodes, &postgres, &mariadb, &storage),
        )
        .unwrap();
        let token = path.join("operator.token");
        std::fs::write(&token, TOKEN).unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();

        let mut env = Env {
            postgres,
            mariadb,
            nodes,
            storage,
            runbook,
            service_port: free_port(),
            service: None,
            loads: Vec::new(),
            dir: path,
            _dir: dir,
        };
        env.start_load(seed);
        env
    }

    pub fn ledgers(&mut self) -> impl Iterator<Item = &mut Node> {
        self.nodes.iter_mut().filter(|node| node.name != "auditor")
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|node| node.name == name)
            .unwrap()
    }

    /// One `ledger-node load` per ledger node, each writing every transfer to
    /// `load-<k>.log`, so a failure can be traced to the node it was sent to.
    fn start_load(&mut self, seed: u64) {
        let apps: Vec<SocketAddr> = self.ledgers().map(|node| node.app).collect();
        for (k, app) in apps.iter().enumerate() {
            let child = Command::new(stillpoint_testkit::workspace_binary("ledger-node"))
                .args(["load", "--targets", &app.to_string()])
                .args([
                    "--concurrency",
                    "3",
                    "--duration",
                    "24h",
                    "--output",
                    "json",
                ])
                .arg("--seed")
                .arg((seed + k as u64).to_string())
                .arg("--latency-log")
                .arg(self.dir.join(format!("load-{k}.log")))
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(self.dir.join(format!("load-{k}.json"))).unwrap())
                .stderr(log_file(&self.dir.join(format!("load-{k}.stderr"))))
                .spawn()
                .unwrap();
            self.loads.push(Proc(child));
        }
    }

    /// Stops the load (SIGTERM: in-flight transfers finish and are logged).
    pub fn stop_load(&mut self) {
        for load in self.loads.drain(..) {
            load.signal("TERM");
            load.wait(Duration::from_secs(60));
        }
    }

    pub fn stillpoint(&self) -> Command {
        let mut command = Command::new(stillpoint_testkit::workspace_binary("stillpoint"));
        // Drill checks run `ledger-node` from PATH.
        let ours = stillpoint_testkit::workspace_binary("ledger-node")
            .parent()
            .unwrap()
            .display()
            .to_string();
        command.env(
            "PATH",
            format!("{ours}:{}", std::env::var("PATH").unwrap_or_default()),
        );
        command
    }

    pub fn start_service(&mut self) {
        let child = self
            .stillpoint()
            .args(["serve", "--config"])
            .arg(&self.runbook)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.service_port))
            .arg("--token-file")
            .arg(self.dir.join("operator.token"))
            // Each job's start and end, with its duration: what a slow run is read from.
            .env("STILLPOINT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join("serve.log")))
            .spawn()
            .unwrap();
        let mut process = Proc(child);
        let port = self.service_port;
        wait_for(
            Duration::from_secs(120),
            "stillpoint serve to be ready",
            || {
                assert!(
                    !process.exited(),
                    "serve exited; see {}/serve.log",
                    self.dir.display()
                );
                http_get(port, "/readyz").is_some_and(|(status, _)| status == 200)
            },
        );
        self.service = Some(process);
    }

    pub fn kill_service(&mut self) {
        if let Some(process) = self.service.take() {
            process.signal("KILL");
            process.wait(Duration::from_secs(10));
        }
    }

    /// SIGTERM: the service releases any pause and flushes the archives.
    pub fn stop_service(&mut self) {
        if let Some(process) = self.service.take() {
            process.signal("TERM");
            process.wait(Duration::from_secs(120));
        }
    }

    /// The service's archiving children (pg_receivewal, mariadb-binlog).
    pub fn streamers(&self) -> Vec<(u32, String)> {
        let Some(service) = &self.service else {
            return Vec::new();
        };
        // Each thread lists the children it spawned: the tokio workers spawn them.
        let tasks = std::fs::read_dir(format!("/proc/{}/task", service.pid()));
        let children: Vec<String> = tasks
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
            .collect();
        children
            .iter()
            .flat_map(|list| list.split_whitespace())
            .filter_map(|pid| {
                let pid: u32 = pid.parse().ok()?;
                let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                let name = name.trim().to_owned();
                matches!(name.as_str(), "pg_receivewal" | "mariadb-binlog").then_some((pid, name))
            })
            .collect()
    }

    /// The service's API: GET `path` with the operator token.
    pub fn api(&self, path: &str) -> Option<serde_json::Value> {
        let (status, body) = http_get(self.service_port, path)?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.loads.clear();
        // SIGTERM, not SIGKILL: the service's running jobs stop and clean up (a drill
        // removes its scratch server, which a SIGKILL left running).
        self.stop_service();
        for node in &mut self.nodes {
            node.kill();
        }
        if let Storage::File { mount } = &self.storage {
            let _ = Command::new("umount").arg(mount).status();
        }
    }
}

/// A plain HTTP/1.1 GET on the service, with the operator token: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2))
            .ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
         Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

fn runbook_text(
    dir: &Path,
    nodes: &[Node],
    postgres: &Postgres,
    mariadb: &MariaDb,
    storage: &Storage,
) -> String {
    let ledgers: Vec<String> = nodes
        .iter()
        .filter(|node| node.name != "auditor")
        .map(|node| format!("\"{}\"", node.admin))
        .collect();
    let auditor = nodes.iter().find(|node| node.name == "auditor").unwrap();
    let storage = match storage {
        Storage::S3 { port, .. } => format!(
            "url = \"s3://nemesis/points\"\noptions = {{ endpoint = \"http://{STORAGE_HOST}:{port}\", \
             allow_http = \"true\", region = \"us-east-1\", access_key_id = \"k\", \
             secret_access_key = \"s\" }}"
        ),
        Storage::File { mount } => format!("url = \"file://{}\"", mount.display()),
    };
    format!(
        r#"cluster = "nemesis"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
lease = "{lease}s"
max_wait = "2s"
cut_deadline = "4s"
[[databases]]
name = "ledger"
role = "ledger"
adapter = "postgres"
url = "{ledger_db}"
bin_dir = "{pg_bin}"
archive = true
[[databases]]
name = "auditor"
role = "auditor"
adapter = "mariadb"
url = "{auditor_db}"
bin_dir = "{mariadb_bin}"
archive = true
[storage]
{storage}
[archive]
partial_interval = "500ms"
chunk_interval = "2s"
spool_dir = "{spool}"
[schedule]
point = "*/3 * * * * *"
base_backup = "0 */10 * * * *"
drill = "30 */7 * * * *"
[drill]
scratch_dir = "{scratch}"
[[drill.checks]]
name = "ledger_node_check"
command = ["ledger-node", "check", "--ledger-db", "{{ledger}}", "--auditor-db", "{{auditor}}"]
"#,
        ledgers = ledgers.join(", "),
        auditor = auditor.admin,
        lease = LEASE.as_secs(),
        ledger_db = postgres.url("ledger"),
        pg_bin = postgres.bin_dir().display(),
        auditor_db = mariadb.url("auditor"),
        mariadb_bin = mariadb.bin_dir().display(),
        spool = dir.join("spool").display(),
        scratch = dir.display(),
    )
}
