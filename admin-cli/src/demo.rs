//! `stillpoint demo`: the README's first command. Starts a local reference cluster (3
//! ledger nodes sharing one SQLite ledger database, 1 auditor with its own) as real
//! `ledger-node` processes under load, backs it up (one pause, both databases cut
//! inside it, copies through zstd + age into a local directory), and drills the
//! backup: both copies restored into scratch files and the ledger's invariants checked
//! across the pair (balances, hash chain, ledger = auditor). Then, under the same
//! load, the cluster goes continuous ([`points`]): both SQLite logs archived frame by
//! frame, a point every 2 s, and two points rebuilt and checked. It also checks that
//! nothing committed inside the backup's window, prints a short report with the
//! points' timeline and cleans up.

mod points;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use age::secrecy::ExposeSecret as _;
use anyhow::{Context as _, bail};
use clap::Args;
use stillpoint::backup;
use stillpoint::coordinator::PauseReport;
use stillpoint::drill::{self, DrillReport};
use stillpoint::resolve::NodeAddress;
use stillpoint::runbook::Runbook;
use stillpoint::storage::Storage;

use crate::args::{OutputFormat, duration};
use crate::backup::human_bytes;
use crate::exit::{self, Failure};
use crate::output::{print_json, render_text};

use self::points::{ArchiverTasks, PointsReport};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// The shortest pause window (the cluster is held at least this long).
    #[arg(long, default_value = "200ms", value_parser = duration, value_name = "DURATION")]
    pub hold_for: Duration,
    /// Concurrent clients of the load generator.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

#[derive(Debug, serde::Serialize)]
struct DemoReport {
    ok: bool,
    backup_id: String,
    backup_ms: u64,
    stored_bytes: u64,
    window: PauseReport,
    requests_held_during_pause: u64,
    load: serde_json::Value,
    /// The drill of the backup: restored into scratch files and checked.
    drill: DrillReport,
    /// `ledger-node check` of the live databases: nothing committed inside the window.
    live_check: serde_json::Value,
    /// The continuous part: archivers, points under load, two of them drilled.
    points: PointsReport,
    elapsed_ms: u64,
}

/// Runs the demo until it ends or a signal (Ctrl-C, SIGTERM) arrives. On a signal the
/// demo's future is dropped: its `Children` stop every process it started. The
/// archivers are tasks of their own, so they are stopped and awaited here, and only
/// then is the scratch directory they write into removed. The cluster is the demo's
/// own, so nothing is left paused.
pub async fn demo(args: DemoArgs) -> Result<u8, Failure> {
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let archivers = ArchiverTasks::default();
    let result = tokio::select! {
        result = run(args, dir.path(), &archivers) => result,
        () = crate::signal::shutdown_signal() => Err(Failure::new(
            exit::ERROR,
            anyhow::anyhow!("interrupted: the demo's nodes, load and archivers were stopped and its scratch directory removed"),
        )),
    };
    archivers.stop().await;
    drop(dir);
    result
}

async fn run(args: DemoArgs, dir: &Path, archivers: &ArchiverTasks) -> Result<u8, Failure> {
    let started = Instant::now();
    let ledger_node = sibling_binary("ledger-node")?;
    let ledger_path = dir.join("ledger.db");
    let auditor_path = dir.join("auditor.db");
    let ledger_db = format!("sqlite:{}", ledger_path.display());
    let auditor_db = format!("sqlite:{}", auditor_path.display());
    let say = |line: &str| {
        if args.output == OutputFormat::Text {
            crate::outln!("{line}");
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

    say("backing up: pause ledgers then auditor, cut both databases, unpause, copy …");
    let key = age::x25519::Identity::generate();
    let key_file = dir.join("age-key.txt");
    std::fs::write(&key_file, key.to_string().expose_secret())
        .context("writing the demo's age key")?;
    let storage_dir = dir.join("backups");
    std::fs::create_dir_all(&storage_dir)?;
    let inputs = RunbookInputs {
        ledgers: &ledgers,
        auditor: &auditor,
        hold_for: args.hold_for,
        ledger_path: &ledger_path,
        auditor_path: &auditor_path,
        key: &key,
        key_file: &key_file,
        storage: &storage_dir,
        scratch: dir,
    };
    let runbook = inputs.runbook(None)?;
    let held_before = held_total(&ledgers).await;
    let backup_started = Instant::now();
    let manifest = backup::run(&runbook, Arc::new(|_| {}))
        .await
        .map_err(|error| Failure::new(exit::BACKUP_FAILED, error))?;
    let backup_ms = backup_started.elapsed().as_millis() as u64;
    let requests_held = held_total(&ledgers).await.saturating_sub(held_before);
    let window = manifest.window.clone();

    say("drill: restoring both copies into scratch files and checking them …");
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)?;
    let decryption = backup::decryption(&runbook)?;
    let drill = drill::run(
        &runbook,
        &storage,
        &manifest,
        &decryption,
        false,
        tokio_util::sync::CancellationToken::new(),
        std::sync::Arc::new(|_| {}),
    )
    .await
    .map_err(|error| Failure::new(exit::BACKUP_FAILED, error))?;

    // The same cluster, under the same load, goes continuous.
    let continuous = inputs.runbook(Some(&ledger_node))?;
    let points = points::run(&continuous, archivers, &say).await?;
    let load = children.stop_with_output(load)?;
    let load: serde_json::Value =
        serde_json::from_slice(&load).context("reading the load report")?;

    say("checking that nothing committed inside the backup's window …");
    let check = |ledger: &str, auditor: &str, (start, end): (i64, i64)| {
        let output = Command::new(&ledger_node)
            .args([
                "check",
                "--ledger-db",
                ledger,
                "--auditor-db",
                auditor,
                "--output",
                "json",
                "--window-start-ms",
                &start.to_string(),
                "--window-end-ms",
                &end.to_string(),
            ])
            .stderr(Stdio::null())
            .output()
            .context("running ledger-node check")?;
        serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .context("reading the check report")
    };
    children.stop_all();
    let bounds = (
        window.pause_start_timestamp_ms.unwrap_or_default(),
        window.pause_end_timestamp_ms.unwrap_or_default(),
    );
    let live_check = check(&ledger_db, &auditor_db, bounds)?;

    let ok = window.window_valid
        && load["failed"] == 0
        && drill.ok
        && live_check["ok"] == true
        && points.ok;
    let report = DemoReport {
        ok,
        backup_id: manifest.backup_id.clone(),
        backup_ms,
        stored_bytes: manifest
            .artifacts()
            .map(|(_, artifact)| artifact.stored_size)
            .sum(),
        window,
        requests_held_during_pause: requests_held,
        load,
        drill,
        live_check,
        points,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => print_text(&report),
    }
    Ok(if ok { exit::OK } else { exit::ERROR })
}

/// The reference ledger's invariants as drill checks, in SQLite's dialect
/// (ledger/runbook.toml has the same checks for PostgreSQL and MariaDB, and also runs
/// `ledger-node check`, which recomputes every hash; these SQL checks only follow the
/// links).
const DEMO_CHECKS: &str = r#"
[[drill.checks]]
name = "balances_conserved"
database = "ledger"
sql = "SELECT sum(balance) - (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'initial_total') FROM accounts"
expect = 0

[[drill.checks]]
name = "no_negative_balance"
database = "ledger"
sql = "SELECT count(*) FROM accounts WHERE balance < 0"
expect = 0

[[drill.checks]]
name = "hash_chain_links"
database = "ledger"
sql = "SELECT count(*) FROM (SELECT prev_hash, lag(hash, 1, '0000000000000000000000000000000000000000000000000000000000000000') OVER (ORDER BY seq) AS expected FROM ledger) WHERE prev_hash <> expected"
expect = 0

[[drill.checks]]
name = "ledger_matches_auditor"
left = { database = "ledger", sql = "SELECT tx_id, hash FROM ledger" }
right = { database = "auditor", sql = "SELECT tx_id, hash FROM audit" }
"#;

/// What the demo's runbooks are written from.
struct RunbookInputs<'a> {
    ledgers: &'a [NodeAddress],
    auditor: &'a NodeAddress,
    hold_for: Duration,
    ledger_path: &'a Path,
    auditor_path: &'a Path,
    key: &'a age::x25519::Identity,
    key_file: &'a Path,
    storage: &'a Path,
    /// The demo's scratch directory: drills and the archivers' spool go there.
    scratch: &'a Path,
}

impl RunbookInputs<'_> {
    /// The runbook an operator would write for this cluster. With `ledger_node`, the
    /// same cluster archived continuously for points: both SQLite databases with
    /// `archive = true`, their logs read every 100 ms, and the drill check that a
    /// point's rebuilt files pass `ledger-node check` (the drill replaces
    /// `{ledger}` and `{auditor}` with the rebuilt files' paths).
    fn runbook(&self, ledger_node: Option<&Path>) -> anyhow::Result<Runbook> {
        let quoted = self
            .ledgers
            .iter()
            .map(|address| format!("\"{address}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let (archived, archiving) = match ledger_node {
            None => ("", String::new()),
            Some(ledger_node) => (
                "archive = true\n",
                format!(
                    r#"
[archive]
chunk_interval = "{chunk_interval}"
spool_dir = "{spool}"

[[drill.checks]]
name = "ledger_node_check"
command = ["{ledger_node}", "check", "--ledger-db", "sqlite:{{ledger}}", "--auditor-db", "sqlite:{{auditor}}"]
"#,
                    chunk_interval = points::CHUNK_INTERVAL,
                    spool = self.scratch.join("spool").display(),
                    ledger_node = ledger_node.display(),
                ),
            ),
        };
        // The backup's drill runs the SQL checks; a point's, `ledger-node check`,
        // which recomputes every hash the SQL checks only follow.
        let checks = if ledger_node.is_none() {
            DEMO_CHECKS
        } else {
            ""
        };
        let text = format!(
            r#"cluster = "demo"
[pause]
tiers = [{{ addresses = [{quoted}] }}, {{ addresses = ["{auditor}"] }}]
lease = "30s"
max_wait = "10s"
min_window = "{hold}ms"

[[databases]]
name = "ledger"
role = "ledger"
adapter = "sqlite"
path = "{ledger}"
{archived}
[[databases]]
name = "auditor"
role = "auditor"
adapter = "sqlite"
path = "{auditor_db}"
{archived}
[pipeline]
zstd_level = 3
age_recipients = ["{recipient}"]
age_identity_file = "{key_file}"

[storage]
url = "file://{storage}"

[drill]
scratch_dir = "{scratch}"
{archiving}{checks}"#,
            auditor = self.auditor,
            hold = self.hold_for.as_millis(),
            ledger = self.ledger_path.display(),
            auditor_db = self.auditor_path.display(),
            recipient = self.key.to_public(),
            key_file = self.key_file.display(),
            storage = self.storage.display(),
            scratch = self.scratch.display(),
        );
        Runbook::parse(&text, Path::new("."))
            .map_err(|error| anyhow::anyhow!("the demo's runbook is invalid: {error}"))
    }
}

fn print_text(report: &DemoReport) {
    crate::outln!();
    crate::output::write_stdout(&render_text(&report.window));
    crate::outln!(
        "  requests held during the pause: {} (clients saw latency, not errors)",
        report.requests_held_during_pause
    );
    crate::outln!(
        "load: {} ok, {} rejected, {} failed; p99 {:.1} ms",
        report.load["ok"],
        report.load["rejected"],
        report.load["failed"],
        report.load["latency_ms"]["p99"]
            .as_f64()
            .unwrap_or_default()
    );
    crate::outln!(
        "backup {}: {} stored in {:.1}s (zstd + age)",
        report.backup_id,
        human_bytes(report.stored_bytes),
        report.backup_ms as f64 / 1000.0
    );
    crate::output::write_stdout(&crate::drill::render_text(&report.drill));
    let quiet = report.live_check["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|check| check["name"] == "quiet_window");
    for check in quiet {
        let mark = if check["ok"] == true { "ok  " } else { "FAIL" };
        crate::outln!(
            "live check {mark} {}: {}",
            check["name"].as_str().unwrap_or("?"),
            check["detail"].as_str().unwrap_or("")
        );
    }
    points::print_text(&report.points);
    crate::outln!(
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
