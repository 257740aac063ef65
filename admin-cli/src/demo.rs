//! `stillpoint demo`: the README's first command. Starts a local reference cluster (3
//! ledger nodes sharing one SQLite ledger database, 1 auditor with its own) as real
//! `ledger-node` processes, runs a load against it, pauses the whole cluster for a
//! short window, checks the invariants across both databases (nothing committed inside
//! the window, balances, hash chain, ledger = auditor), prints a short report and
//! cleans up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use stillpoint::coordinator::{self, PausePlan, PauseReport};
use stillpoint::resolve::NodeAddress;
use stillpoint::time::Zone;

use crate::args::{OutputFormat, duration};
use crate::exit::{self, Failure};
use crate::output::{print_json, render_text};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// How long the cluster stays paused.
    #[arg(long, default_value = "200ms", value_parser = duration, value_name = "DURATION")]
    pub hold_for: Duration,
    /// Concurrent clients of the load generator.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

#[derive(Debug, serde::Serialize)]
struct DemoReport {
    ok: bool,
    window: PauseReport,
    requests_held_during_pause: u64,
    load: serde_json::Value,
    check: serde_json::Value,
    elapsed_ms: u64,
}

pub async fn demo(args: DemoArgs) -> Result<u8, Failure> {
    let started = Instant::now();
    let ledger_node = sibling_binary("ledger-node")?;
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let ledger_db = format!("sqlite:{}", dir.path().join("ledger.db").display());
    let auditor_db = format!("sqlite:{}", dir.path().join("auditor.db").display());
    let say = |line: &str| {
        if args.output == OutputFormat::Text {
            println!("{line}");
        }
    };

    say("starting 1 auditor and 3 ledger nodes (SQLite) …");
    let mut children = Children::default();
    let auditor = children.serve(&ledger_node, &["--role", "auditor", "--db", &auditor_db])?;
    let mut ledgers = Vec::new();
    for _ in 0..3 {
        ledgers.push(children.serve(
            &ledger_node,
            &[
                "--role",
                "ledger",
                "--db",
                &ledger_db,
                "--auditor",
                &auditor.to_string(),
            ],
        )?);
    }
    let targets = ledgers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");

    say(&format!("running load with {} clients …", args.concurrency));
    let load = Command::new(&ledger_node)
        .args([
            "load",
            "--targets",
            &targets,
            "--duration",
            "10m",
            "--output",
            "json",
        ])
        .args(["--concurrency", &args.concurrency.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the load generator")?;
    let load = children.adopt(load);
    tokio::time::sleep(Duration::from_secs(2)).await;

    say(&format!(
        "pausing ledgers, then the auditor, for {} …",
        stillpoint::time::format_duration(args.hold_for)
    ));
    let held_before = held_total(&ledgers).await;
    let plan = PausePlan::new(
        vec![ledgers.clone(), vec![auditor.clone()]],
        Duration::from_secs(30),
        Duration::from_secs(10),
    );
    let mut paused = coordinator::pause(&plan)
        .await
        .map_err(|failure| Failure::new(exit::PAUSE_FAILED, failure))?;
    paused
        .hold_until(tokio::time::Instant::now() + args.hold_for)
        .await;
    let released = paused.release().await;
    let window = PauseReport::closed(&released, Zone::UTC);
    let requests_held = held_total(&ledgers).await.saturating_sub(held_before);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = children.stop_with_output(load)?;
    let load: serde_json::Value =
        serde_json::from_slice(&load).context("reading the load report")?;

    say("checking both databases …");
    let (start, end) = (
        window.pause_start_timestamp_ms.unwrap_or_default(),
        window.pause_end_timestamp_ms.unwrap_or_default(),
    );
    let check = Command::new(&ledger_node)
        .args([
            "check",
            "--ledger-db",
            &ledger_db,
            "--auditor-db",
            &auditor_db,
            "--output",
            "json",
        ])
        .args([
            "--window-start-ms",
            &start.to_string(),
            "--window-end-ms",
            &end.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .context("running ledger-node check")?;
    let check: serde_json::Value =
        serde_json::from_slice(&check.stdout).context("reading the check report")?;
    children.stop_all();

    let ok = window.window_valid && load["failed"] == 0 && check["ok"] == true;
    let report = DemoReport {
        ok,
        window,
        requests_held_during_pause: requests_held,
        load,
        check,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => print_text(&report),
    }
    Ok(if ok { exit::OK } else { exit::ERROR })
}

fn print_text(report: &DemoReport) {
    println!();
    print!("{}", render_text(&report.window));
    println!(
        "  requests held during the pause: {} (clients saw latency, not errors)",
        report.requests_held_during_pause
    );
    println!(
        "load: {} ok, {} rejected, {} failed; p99 {} ms",
        report.load["ok"],
        report.load["rejected"],
        report.load["failed"],
        report.load["latency_ms"]["p99"]
    );
    for check in report.check["checks"].as_array().into_iter().flatten() {
        let mark = if check["ok"] == true { "ok  " } else { "FAIL" };
        println!(
            "check {mark} {}: {}",
            check["name"].as_str().unwrap_or("?"),
            check["detail"].as_str().unwrap_or("")
        );
    }
    println!(
        "{} in {:.1}s",
        if report.ok {
            "demo passed"
        } else {
            "demo FAILED"
        },
        report.elapsed_ms as f64 / 1000.0
    );
}

/// Sum of the ledger nodes' `held_total` gate counters.
async fn held_total(ledgers: &[NodeAddress]) -> u64 {
    let mut total = 0;
    for address in ledgers {
        let stats = async {
            let mut client =
                stillpoint::grpc::client::NodeClient::connect(address, &Default::default()).await?;
            client.stats().await
        }
        .await;
        if let Ok(stats) = stats {
            total += stats["gate"]["held_total"].as_u64().unwrap_or(0);
        }
    }
    total
}

/// Another binary of this workspace, installed next to `stillpoint`.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the stillpoint binary")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{name} was not found next to {}; build the whole workspace first: \
             cargo build --release --workspace",
            exe.display()
        );
    }
    Ok(path)
}

/// The demo's processes: stopped (SIGTERM, then SIGKILL) however the demo ends.
#[derive(Default)]
struct Children {
    children: Vec<Child>,
}

impl Children {
    /// Starts `ledger-node serve` on a free port and returns the address it printed.
    fn serve(&mut self, program: &Path, args: &[&str]) -> anyhow::Result<NodeAddress> {
        let mut child = Command::new(program)
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().expect("piped");
        self.children.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("ledger-node did not start: {line:?}"))?;
        Ok(address.parse()?)
    }

    fn adopt(&mut self, child: Child) -> usize {
        self.children.push(child);
        self.children.len() - 1
    }

    fn stop_with_output(&mut self, index: usize) -> anyhow::Result<Vec<u8>> {
        let child = self.children.remove(index);
        terminate(&child);
        Ok(child.wait_with_output()?.stdout)
    }

    fn stop_all(&mut self) {
        for child in &self.children {
            terminate(child);
        }
        for mut child in self.children.drain(..) {
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}
