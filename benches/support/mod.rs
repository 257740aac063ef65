//! What the `harness = false` benchmarks share: their flags, the machine they ran on,
//! summary rows for `scripts/bench`, rewriting a section of docs/performance.md,
//! statistics, and lightweight in-process admin nodes.
//!
//! Each benchmark binary declares `mod support;` and uses what it needs, so some
//! items are unused in some binaries.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stillpoint_node::gate::{ClosedPolicy, Gate};
use stillpoint_node::pause::NodeAdmin;
use tokio_util::sync::CancellationToken;
use tower::util::MapRequestLayer;

/// The file every benchmark writes its detailed section into.
pub const DOCS: &str = "docs/performance.md";

/// Flags every benchmark takes (after `cargo bench --bench NAME --`).
pub struct Flags {
    /// Small sizes and few repetitions: checks that the benchmark works, measures
    /// little.
    pub quick: bool,
    /// Rewrite this benchmark's section of docs/performance.md.
    pub update_docs: bool,
    /// Write the summary rows (JSON) here, for `scripts/bench` to gather.
    pub results: Option<PathBuf>,
}

impl Flags {
    pub fn parse() -> Flags {
        let mut flags = Flags {
            quick: false,
            update_docs: false,
            results: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => flags.quick = true,
                "--update-docs" => flags.update_docs = true,
                "--results" => flags.results = Some(args.next().expect("--results FILE").into()),
                // `cargo bench` passes `--bench` to every benchmark binary.
                "--bench" => {}
                other => {
                    panic!("unknown flag {other}; expected --quick, --update-docs, --results FILE")
                }
            }
        }
        flags
    }

    /// Writes the section and the rows, as the flags ask.
    pub fn publish(&self, section: &str, body: &str, rows: &[Row]) {
        self.section(section, body);
        self.rows(rows);
    }

    /// Prints one section of the docs, and writes it there with --update-docs.
    pub fn section(&self, section: &str, body: &str) {
        println!("{body}\n");
        if self.update_docs {
            replace_section(DOCS, section, body);
        }
    }

    /// Writes this benchmark's summary rows to the --results file.
    pub fn rows(&self, rows: &[Row]) {
        if let Some(path) = &self.results {
            let json = serde_json::to_string_pretty(rows).unwrap();
            std::fs::write(path, json)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
    }
}

/// One line of the summary table: a ratio measured in this run, with the absolute
/// figures it came from.
#[derive(Debug, serde::Serialize)]
pub struct Row {
    /// The benchmark's part, e.g. "2. pause under load".
    pub section: String,
    /// What the ratio compares, e.g. "window p50 vs a fixed 5 s hold".
    pub measure: String,
    pub stillpoint: String,
    pub baseline: String,
    /// stillpoint / baseline; None for a count (failed requests).
    pub ratio: Option<f64>,
    /// e.g. "≤ 1.2×"; empty when the issue sets none.
    pub target: String,
    /// None when there is no target.
    pub met: Option<bool>,
}

/// A row's target, checked.
#[derive(Clone, Copy)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
    /// A count that must be zero (the count itself).
    Zero(u64),
    None,
}

impl Row {
    pub fn new(
        section: &str,
        measure: &str,
        stillpoint: String,
        baseline: String,
        ratio: Option<f64>,
        target: Target,
    ) -> Row {
        let (target, met) = match (target, ratio) {
            (Target::AtMost(limit), Some(ratio)) => (format!("≤ {limit}×"), Some(ratio <= limit)),
            (Target::AtLeast(limit), Some(ratio)) => (format!("≥ {limit}×"), Some(ratio >= limit)),
            (Target::Zero(count), _) => ("0".to_owned(), Some(count == 0)),
            (Target::AtMost(_) | Target::AtLeast(_), None) => {
                panic!("a ratio target needs a ratio")
            }
            (Target::None, _) => (String::new(), None),
        };
        Row {
            section: section.to_owned(),
            measure: measure.to_owned(),
            stillpoint,
            baseline,
            ratio,
            target,
            met,
        }
    }
}

/// "Intel(R) Xeon(R) Processor (2 cores)".
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{model} ({cores} cores)")
}

pub fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// "Measured DATE on MACHINE, `COMMAND`" plus what else ran.
pub fn measured_line(command: &str) -> String {
    format!("Measured {} on {}, `{command}`.", today(), machine())
}

/// Rewrites the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
pub fn replace_section(path: &str, name: &str, body: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let (head, rest) = text
        .split_once(&begin)
        .unwrap_or_else(|| panic!("{path} has no {begin} marker"));
    let (_, tail) = rest
        .split_once(&end)
        .unwrap_or_else(|| panic!("{path} has no {end} marker"));
    std::fs::write(path, format!("{head}{begin}\n{body}\n{end}{tail}")).unwrap();
    eprintln!("updated {path} ({name})");
}

pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Nearest-rank percentile (the load generator's definition); NaN without values.
pub fn percentile(values: &[f64], percent: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A binary of this workspace, built by `scripts/bench` into the same profile
/// directory as this benchmark (`target/release/`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("benchmark executable path");
    // target/release/deps/<bench>-<hash> → target/release/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("the benchmark runs from target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built; run scripts/bench, which builds it first",
        path.display()
    );
    path
}

/// Lightweight nodes: only the admin services around a gate, as an application would
/// embed them, each on its own loopback port with its own tonic server. Returns their
/// addresses and the server tasks, which end when `shutdown` is cancelled.
pub async fn start_admin_nodes(
    count: usize,
    shutdown: CancellationToken,
) -> (Vec<String>, Vec<tokio::task::JoinHandle<()>>) {
    start_admin_nodes_watched(count, shutdown, FirstPause::default()).await
}

/// When the first `LeaseAdmin/Pause` request reached any of the nodes that share it:
/// the moment the cluster began to feel a pause.
#[derive(Clone, Default)]
pub struct FirstPause(Arc<Mutex<Option<Instant>>>);

impl FirstPause {
    fn saw(&self) {
        self.0.lock().unwrap().get_or_insert_with(Instant::now);
    }

    /// The first arrival since the last call, and forget it.
    pub fn take(&self) -> Option<Instant> {
        self.0.lock().unwrap().take()
    }
}

/// [`start_admin_nodes`], recording the first pause request in `first_pause`.
pub async fn start_admin_nodes_watched(
    count: usize,
    shutdown: CancellationToken,
    first_pause: FirstPause,
) -> (Vec<String>, Vec<tokio::task::JoinHandle<()>>) {
    let mut addresses = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..count {
        let admin = Arc::new(NodeAdmin::new(
            Arc::new(Gate::new(ClosedPolicy::Reject)),
            None,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addresses.push(listener.local_addr().unwrap().to_string());
        let routes = stillpoint_node::grpc::server::admin_routes(admin.clone()).await;
        // No Nagle delay, as ledger-node serves: without it a small response can wait
        // for the client's delayed ACK, and every pause gains tens of milliseconds.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let shutdown = shutdown.clone();
        let first_pause = first_pause.clone();
        let watch = MapRequestLayer::new(move |request: http::Request<tonic::body::Body>| {
            if request.uri().path() == "/stillpoint.admin.v1.LeaseAdmin/Pause" {
                first_pause.saw();
            }
            request
        });
        servers.push(tokio::spawn(async move {
            let serving = tonic::transport::Server::builder()
                .layer(watch)
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
            let (served, ()) = tokio::join!(serving, admin.run_lease_watchdog(shutdown));
            served.unwrap();
        }));
    }
    (addresses, servers)
}

/// A child process, killed and reaped when dropped (a panicking benchmark leaves
/// nothing running).
pub struct Process {
    child: Option<Child>,
}

impl Process {
    /// Starts `program` with stdout piped; read it with [`Process::wait_stdout`].
    pub fn spawn(command: &mut Command) -> Process {
        let child = command
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        Process { child: Some(child) }
    }

    /// Starts a server that prints `listening on ADDR` first, and returns it with ADDR.
    pub fn spawn_listening(command: &mut Command) -> (Process, String) {
        let mut process = Process::spawn(command.env("RUST_LOG", "warn"));
        let stdout = process.child.as_mut().unwrap().stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        // Keep reading, so a later line never meets a closed pipe; the thread ends
        // when the process closes its stdout.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{command:?} printed {line:?}, not `listening on ADDR`"))
            .to_owned();
        (process, address)
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Its stdout, to read as it comes (a long-running process reporting progress).
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child.as_mut().unwrap().stdout.take().unwrap()
    }

    /// Waits for the process to exit and returns what it printed on stdout.
    pub fn wait_stdout(mut self) -> String {
        let output = self.child.take().unwrap().wait_with_output().unwrap();
        String::from_utf8(output.stdout).unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A table shaped like `ledger-node`'s own ledger (a hash chain of transfers) with
/// `rows` rows, in the (new) database `name`, through `psql(database, sql)`, filled by SQL: generating it through the
/// application would take hours. Each row's `prev_hash` is the previous row's `hash`,
/// as in the real chain, so the data compresses the way a real ledger does (hashes do
/// not; repeated ones do). Returns `pg_database_size` afterwards.
pub fn create_ledger_table(psql: impl Fn(&str, &str) -> String, name: &str, rows: u64) -> u64 {
    psql(
        name,
        &format!(
            "CREATE TABLE ledger (
                 seq bigint NOT NULL, tx_id text NOT NULL,
                 from_account bigint NOT NULL, to_account bigint NOT NULL,
                 amount bigint NOT NULL, prev_hash text NOT NULL, hash text NOT NULL,
                 committed_at_ms bigint NOT NULL);
             INSERT INTO ledger
             SELECT g, md5('tx' || g), 1 + (g * 7919) % 1000, 1 + (g * 104729) % 1000,
                    1 + g % 100, md5((g - 1)::text) || md5('p' || (g - 1)),
                    md5(g::text) || md5('p' || g), 1700000000000 + g * 7
             FROM generate_series(1::bigint, {rows}) g;
             -- Indexes after the load, as a restore builds them.
             ALTER TABLE ledger ADD PRIMARY KEY (seq);
             ALTER TABLE ledger ADD CONSTRAINT ledger_tx_id_key UNIQUE (tx_id);
             -- Frozen and analysed now, so the first copy does not pay for hint bits.
             VACUUM (FREEZE, ANALYZE) ledger;"
        ),
    );
    psql(name, "SELECT pg_database_size(current_database())")
        .trim()
        .parse()
        .unwrap()
}
