//! The harness: starts real `ledger-node` processes on free ports, runs our binaries,
//! waits for states by polling with a deadline, and tears everything down on drop.
//!
//! The binaries come from the same target directory as this test; the test command
//! (`scripts/test`) builds the whole workspace first.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use stillpoint_testkit::workspace_binary as bin;

/// Path of one of the workspace's examples (`cargo build --examples`; scripts/test
/// builds them).
pub fn example(name: &str) -> PathBuf {
    let path = bin("stillpoint")
        .parent()
        .expect("the target directory")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --examples` first (scripts/test does)",
        path.display()
    );
    path
}

/// Polls `condition` every 20ms until it holds or `within` passes.
pub fn wait_until(within: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Process {
    child: Option<Child>,
    pub name: String,
}

impl Process {
    pub fn new(child: Child, name: String) -> Self {
        Self {
            child: Some(child),
            name,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    pub fn has_exited(&mut self) -> bool {
        let child = self.child.as_mut().expect("running");
        child.try_wait().unwrap().is_some()
    }

    /// Waits (bounded) for the process to exit by itself; returns what it printed.
    /// Its pipes are read while it runs: a child that fills one (64 KiB, e.g. a
    /// drill's JSON report) would otherwise block on the write and never exit.
    pub fn wait_output(mut self, within: Duration) -> Output {
        let child = self.child.as_mut().expect("running");
        let stdout = child.stdout.take().map(read_in_background);
        let stderr = child.stderr.take().map(read_in_background);
        wait_until(within, &format!("{} to exit", self.name), || {
            self.has_exited()
        });
        let status = self.child.take().unwrap().wait().unwrap();
        let read = |reader: Option<std::thread::JoinHandle<Vec<u8>>>| {
            reader.map_or_else(Vec::new, |reader| reader.join().unwrap())
        };
        Output {
            status,
            stdout: read(stdout),
            stderr: read(stderr),
        }
    }
}

/// Reads a pipe to its end on a thread of its own.
fn read_in_background(
    mut pipe: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a binary and waits for it to print `… listening on ADDR` lines on stdout;
/// returns the process and the addresses in the order printed.
pub fn spawn_listening(
    program: &Path,
    args: &[String],
    expected_lines: usize,
) -> (Process, Vec<String>) {
    // Node logs go to the test's stderr; warnings (lease expiries…) are enough.
    let log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
    spawn_listening_logged(program, args, expected_lines, &log_level, Stdio::inherit())
}

/// Like [`spawn_listening`], with the process's log level and stderr chosen (a file,
/// for tests that read what a node logged).
pub fn spawn_listening_logged(
    program: &Path,
    args: &[String],
    expected_lines: usize,
    log_level: &str,
    stderr: Stdio,
) -> (Process, Vec<String>) {
    spawn_listening_with_env(
        program,
        args,
        &[("RUST_LOG", log_level)],
        expected_lines,
        stderr,
    )
}

/// Like [`spawn_listening`], with extra environment variables (`RUST_LOG` among them
/// when the default level will not do) and stderr chosen.
pub fn spawn_listening_with_env(
    program: &Path,
    args: &[String],
    env: &[(&str, &str)],
    expected_lines: usize,
    stderr: Stdio,
) -> (Process, Vec<String>) {
    let default_log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", default_log_level)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|error| panic!("starting {}: {error}", program.display()));
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = mpsc::channel();
    // The reader thread ends when the child closes its stdout (at exit).
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let process = Process::new(child, format!("{} {}", program.display(), args.join(" ")));
    let mut addresses = Vec::new();
    while addresses.len() < expected_lines {
        let line = receiver
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{} never said it was listening", process.name));
        if let Some((_, address)) = line.split_once("listening on ") {
            addresses.push(address.trim().to_owned());
        }
    }
    (process, addresses)
}

/// Runs one of our binaries to completion (bounded) and returns its output.
pub fn run(program: &str, args: &[&str]) -> Output {
    run_with_env(program, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = Command::new(bin(program))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let process = Process::new(child, format!("{program} {}", args.join(" ")));
    process.wait_output(Duration::from_secs(120))
}

/// Starts one of our binaries in the background with its stdout piped and its stderr
/// read line by line into the returned channel (for tests that wait for a log line).
pub fn spawn_reading_stderr(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Process, mpsc::Receiver<String>) {
    let mut child = Command::new(bin(program))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = mpsc::channel();
    // Ends when the child closes its stderr (at exit).
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    (
        Process::new(child, format!("{program} {}", args.join(" "))),
        receiver,
    )
}

/// Waits (bounded) for a line containing `needle`; returns every line read so far.
pub fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    needle: &str,
    within: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!(
                "no line with {needle:?} within {within:?}; read:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// Runs a binary that prints one JSON object; returns its exit code and the object.
pub fn run_json(program: &str, args: &[&str]) -> (i32, Value) {
    run_json_with_env(program, args, &[])
}

/// [`run_json`] with extra environment variables.
pub fn run_json_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, Value) {
    let output = run_with_env(program, args, env);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "{program} {} printed no JSON ({error}):\nstdout: {stdout}\nstderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), value)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Whether each node is paused, asked in-process (no CLI start-up in the loop), so
/// that polling observes a change within milliseconds even on a loaded machine.
pub fn paused_flags(addresses: &str) -> Vec<bool> {
    paused_flags_as(addresses, None)
}

/// [`paused_flags`], asked with an admin token (for nodes that require one).
pub fn paused_flags_as(addresses: &str, token: Option<&str>) -> Vec<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut flags = Vec::new();
        for address in stillpoint::resolve::parse_address_list(addresses).unwrap() {
            let options = stillpoint::grpc::client::ConnectOptions {
                token: token.map(|text| {
                    stillpoint_node::AdminToken::parse(text, "the test").expect("a valid token")
                }),
                ..Default::default()
            };
            let mut client = stillpoint::grpc::client::NodeClient::connect(&address, &options)
                .await
                .unwrap_or_else(|error| panic!("{address}: {error}"));
            flags.push(client.status().await.unwrap().paused);
        }
        flags
    })
}

/// A runbook as an operator writes one, built in the order of its file: the cluster
/// and its pause tiers, the databases, the pipeline's keys, the storage and the
/// drill. Sections a test leaves empty are left out (each has defaults), except
/// `[pause]` and `[storage]`, which every runbook has.
///
/// ```ignore
/// let runbook = Runbook::for_cluster("test", &cluster)
///     .timeouts()
///     .cluster_sqlite(&cluster)
///     .database(Database::exec("hook", "echo cut"))
///     .zstd_level(3)
///     .file_storage(dir)
///     .write_in(dir);
/// ```
#[derive(Debug, Clone)]
pub struct Runbook {
    cluster: String,
    tiers: Vec<Vec<String>>,
    pause: Vec<String>,
    databases: Vec<Database>,
    pipeline: Vec<String>,
    age_recipients: Vec<String>,
    storage: Vec<String>,
    storage_options: Vec<String>,
    archive: Vec<String>,
    drill: Vec<String>,
    drill_checks: String,
}

impl Runbook {
    pub fn new(cluster: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
            tiers: Vec::new(),
            pause: Vec::new(),
            databases: Vec::new(),
            pipeline: Vec::new(),
            age_recipients: Vec::new(),
            storage: Vec::new(),
            storage_options: Vec::new(),
            archive: Vec::new(),
            drill: Vec::new(),
            drill_checks: String::new(),
        }
    }

    /// A runbook whose tiers are `cluster`'s: its ledger nodes first, then its auditor.
    pub fn for_cluster(name: &str, cluster: &crate::cluster::Cluster) -> Self {
        Self::new(name)
            .tier(cluster.ledgers.iter().map(|node| node.address.as_str()))
            .tier([cluster.auditor.address.as_str()])
    }

    /// A runbook whose one tier is a node nobody listens on: for `--no-pause` copies
    /// and the catalog commands, which never contact the cluster.
    pub fn standalone(name: &str) -> Self {
        Self::new(name).tier(["127.0.0.1:1"])
    }

    /// One more pause tier (paused after the ones before it).
    pub fn tier<S: AsRef<str>>(mut self, addresses: impl IntoIterator<Item = S>) -> Self {
        self.tiers.push(
            addresses
                .into_iter()
                .map(|address| address.as_ref().to_owned())
                .collect(),
        );
        self
    }

    /// A `[pause]` key with a string value (`lease`, `max_wait`, `cut_deadline`…).
    pub fn pause(mut self, key: &str, value: &str) -> Self {
        self.pause.push(format!("{key} = {}", toml_string(value)));
        self
    }

    /// A 30 s lease, 10 s to drain and 10 s for the cuts: room for a loaded machine.
    pub fn timeouts(self) -> Self {
        self.pause("lease", "30s")
            .pause("max_wait", "10s")
            .pause("cut_deadline", "10s")
    }

    pub fn database(mut self, database: Database) -> Self {
        self.databases.push(database);
        self
    }

    /// The reference cluster's own SQLite databases, `ledger` and `auditor`, each with
    /// its role.
    pub fn cluster_sqlite(self, cluster: &crate::cluster::Cluster) -> Self {
        let path = |url: &str| url.strip_prefix("sqlite:").unwrap().to_owned();
        self.database(Database::sqlite("ledger", path(&cluster.ledger_db)).role("ledger"))
            .database(Database::sqlite("auditor", path(&cluster.auditor_db)).role("auditor"))
    }

    pub fn zstd_level(mut self, level: i32) -> Self {
        self.pipeline.push(format!("zstd_level = {level}"));
        self
    }

    pub fn age_recipient(mut self, recipient: &str) -> Self {
        self.age_recipients.push(toml_string(recipient));
        self
    }

    pub fn age_identity_file(mut self, path: &Path) -> Self {
        self.pipeline.push(path_key("age_identity_file", path));
        self
    }

    pub fn age_passphrase_file(mut self, path: &Path) -> Self {
        self.pipeline.push(path_key("age_passphrase_file", path));
        self
    }

    pub fn storage_url(mut self, url: &str) -> Self {
        self.storage.push(format!("url = {}", toml_string(url)));
        self
    }

    /// Storage in `dir/backups` (created).
    pub fn file_storage(self, dir: &Path) -> Self {
        let storage = dir.join("backups");
        std::fs::create_dir_all(&storage).unwrap();
        self.storage_url(&format!("file://{}", storage.display()))
    }

    /// S3 storage at `url` through `endpoint` over plain HTTP, with `extra` options
    /// (credentials…).
    pub fn s3_storage(mut self, url: &str, endpoint: &str, extra: &[(&str, &str)]) -> Self {
        self = self.storage_url(url);
        let options = [
            ("endpoint", endpoint),
            ("allow_http", "true"),
            ("region", "us-east-1"),
        ];
        for (key, value) in options.iter().chain(extra) {
            self.storage_options
                .push(format!("{key} = {}", toml_string(value)));
        }
        self
    }

    /// An `[archive]` key with a string value (`partial_interval`, `chunk_interval`…).
    pub fn archive(mut self, key: &str, value: &str) -> Self {
        self.archive.push(format!("{key} = {}", toml_string(value)));
        self
    }

    pub fn archive_spool_dir(mut self, dir: &Path) -> Self {
        self.archive.push(path_key("spool_dir", dir));
        self
    }

    pub fn scratch_dir(mut self, dir: &Path) -> Self {
        self.drill.push(path_key("scratch_dir", dir));
        self
    }

    /// `[[drill.checks]]` tables, as the runbook's author writes them.
    pub fn drill_checks(mut self, toml: &str) -> Self {
        self.drill_checks.push_str(toml);
        self.drill_checks.push('\n');
        self
    }

    /// The runbook's TOML.
    pub fn toml(&self) -> String {
        let mut text = format!(
            "cluster = {}\n[pause]\ntiers = [",
            toml_string(&self.cluster)
        );
        let tiers: Vec<String> = self
            .tiers
            .iter()
            .map(|tier| {
                let addresses: Vec<String> = tier.iter().map(|a| toml_string(a)).collect();
                format!("{{ addresses = [{}] }}", addresses.join(", "))
            })
            .collect();
        text.push_str(&tiers.join(", "));
        text.push_str("]\n");
        push_lines(&mut text, &self.pause);
        for database in &self.databases {
            text.push_str("[[databases]]\n");
            push_lines(&mut text, &database.keys);
        }
        if !self.pipeline.is_empty() || !self.age_recipients.is_empty() {
            text.push_str("[pipeline]\n");
            push_lines(&mut text, &self.pipeline);
            if !self.age_recipients.is_empty() {
                let recipients = self.age_recipients.join(", ");
                text.push_str(&format!("age_recipients = [{recipients}]\n"));
            }
        }
        text.push_str("[storage]\n");
        push_lines(&mut text, &self.storage);
        if !self.storage_options.is_empty() {
            let options = self.storage_options.join(", ");
            text.push_str(&format!("options = {{ {options} }}\n"));
        }
        if !self.archive.is_empty() {
            text.push_str("[archive]\n");
            push_lines(&mut text, &self.archive);
        }
        if !self.drill.is_empty() {
            text.push_str("[drill]\n");
            push_lines(&mut text, &self.drill);
        }
        text.push_str(&self.drill_checks);
        text
    }

    /// Writes the runbook to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.toml()).unwrap();
        path.to_owned()
    }

    /// Writes the runbook to `dir/runbook.toml`; returns that path.
    pub fn write_in(&self, dir: &Path) -> PathBuf {
        self.write(&dir.join("runbook.toml"))
    }
}

/// One `[[databases]]` entry of a [`Runbook`]: its name, adapter and keys.
#[derive(Debug, Clone)]
pub struct Database {
    keys: Vec<String>,
}

impl Database {
    fn of(name: &str, adapter: &str) -> Self {
        Self {
            keys: vec![
                format!("name = {}", toml_string(name)),
                format!("adapter = {}", toml_string(adapter)),
            ],
        }
    }

    pub fn sqlite(name: &str, path: impl AsRef<Path>) -> Self {
        Self::of(name, "sqlite").set("path", &path.as_ref().display().to_string())
    }

    pub fn postgres(name: &str, url: &str) -> Self {
        Self::of(name, "postgres").set("url", url)
    }

    pub fn mariadb(name: &str, url: &str) -> Self {
        Self::of(name, "mariadb").set("url", url)
    }

    /// An exec database: `cut` runs inside the pause (and `copy`, when set, after it).
    pub fn exec(name: &str, cut: &str) -> Self {
        Self::of(name, "exec").set("cut", cut)
    }

    /// `archive = true`: its log is archived into the storage (for points).
    pub fn archived(mut self) -> Self {
        self.keys.push("archive = true".to_owned());
        self
    }

    pub fn role(self, role: &str) -> Self {
        self.set("role", role)
    }

    pub fn bin_dir(self, dir: &Path) -> Self {
        self.set("bin_dir", &dir.display().to_string())
    }

    /// Any other key, with a string value (`copy`, `drill_server_url`…).
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.keys.push(format!("{key} = {}", toml_string(value)));
        self
    }
}

fn push_lines(text: &mut String, lines: &[String]) {
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
}

/// `key = "path"`.
fn path_key(key: &str, path: &Path) -> String {
    format!("{key} = {}", toml_string(&path.display().to_string()))
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// The builder writes what the runbook parser reads, values that need escaping
/// included, so a test's runbook says what the test means.
#[test]
fn the_runbook_builder_writes_what_the_parser_reads() {
    use stillpoint::adapters::AdapterConfig;

    let odd_path = "/tmp/an \"odd\" \\ name.db";
    let cut = "echo \"cut\"; printf '%s\\n' done";
    let runbook = Runbook::new("test")
        .tier(["127.0.0.1:1", "127.0.0.1:2"])
        .tier(["127.0.0.1:3"])
        .timeouts()
        .database(Database::sqlite("app", odd_path).role("ledger"))
        .database(Database::exec("hook", cut).set("copy", "head -c 1 /dev/zero"))
        .database(Database::postgres("pg", "postgres://u@127.0.0.1/db").archived())
        .zstd_level(3)
        .age_recipient("age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p")
        .s3_storage(
            "s3://bucket/prefix",
            "http://127.0.0.1:9000",
            &[("access_key_id", "k")],
        )
        .archive("chunk_interval", "200ms")
        .archive_spool_dir(Path::new("/tmp/spool"))
        .scratch_dir(Path::new("/tmp/scratch"))
        .drill_checks(
            "[[drill.checks]]\nname = \"one\"\ndatabase = \"app\"\nsql = \"SELECT 1\"\nexpect = 1",
        );
    let text = runbook.toml();
    let parsed = stillpoint::runbook::Runbook::parse(&text, Path::new("/"))
        .unwrap_or_else(|error| panic!("{error}\n{text}"));
    assert_eq!(parsed.cluster, "test");
    let tiers: Vec<&[String]> = parsed
        .pause
        .tiers
        .iter()
        .map(|tier| tier.addresses.as_slice())
        .collect();
    assert_eq!(
        tiers,
        [&["127.0.0.1:1", "127.0.0.1:2"][..], &["127.0.0.1:3"][..]]
    );
    assert_eq!(parsed.pause.lease, Duration::from_secs(30));
    assert_eq!(parsed.pause.max_wait, Duration::from_secs(10));
    assert_eq!(parsed.pause.cut_deadline, Duration::from_secs(10));
    assert_eq!(parsed.databases.len(), 3, "{text}");
    assert_eq!(parsed.databases[0].role.as_deref(), Some("ledger"));
    match &parsed.databases[0].adapter {
        AdapterConfig::Sqlite(config) => assert_eq!(config.path, Path::new(odd_path)),
        other => panic!("not sqlite: {other:?}"),
    }
    match &parsed.databases[1].adapter {
        AdapterConfig::Exec(config) => {
            assert_eq!(config.cut, cut);
            assert_eq!(config.copy.as_deref(), Some("head -c 1 /dev/zero"));
        }
        other => panic!("not exec: {other:?}"),
    }
    assert!(!parsed.databases[1].archive && parsed.databases[2].archive);
    assert_eq!(parsed.archive.chunk_interval, Duration::from_millis(200));
    assert_eq!(
        parsed.archive.spool_dir.as_deref(),
        Some(Path::new("/tmp/spool"))
    );
    assert_eq!(parsed.pipeline.zstd_level, Some(3));
    assert_eq!(parsed.pipeline.age_recipients.len(), 1);
    assert_eq!(parsed.storage.url, "s3://bucket/prefix");
    assert_eq!(parsed.storage.options["endpoint"], "http://127.0.0.1:9000");
    assert_eq!(parsed.storage.options["access_key_id"], "k");
    assert_eq!(
        parsed.drill.scratch_dir.as_deref(),
        Some(Path::new("/tmp/scratch"))
    );
    assert_eq!(parsed.drill.checks.len(), 1);
}
