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

/// Path of one of the workspace's binaries, next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let mut directory = std::env::current_exe().expect("test executable path");
    directory.pop();
    if directory.ends_with("deps") {
        directory.pop();
    }
    let path = directory.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace` first (scripts/test does)",
        path.display()
    );
    path
}

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
    pub fn wait_output(mut self, within: Duration) -> Output {
        wait_until(within, &format!("{} to exit", self.name), || {
            self.has_exited()
        });
        self.child.take().unwrap().wait_with_output().unwrap()
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
