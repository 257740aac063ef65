//! Pause window under load: the reference cluster (3 `ledger-node` ledger processes
//! sharing one SQLite ledger, 1 auditor with its own, requests held during a pause)
//! under `ledger-node load`, backed up again and again with `backup::run` (pause →
//! cut both databases → unpause → copy → manifest). In the same run, against the same
//! cluster and load, a fixed 5 s hold: pause, sleep 5 s, unpause — what the Kubernetes
//! pause tool does by default.
//!
//! Measured: the pause window (as the manifest records it), the latency of committed
//! transfers that overlapped a pause against those that overlapped none (the load
//! generator's `--latency-log` gives each transfer's start and latency, on the same
//! clock as the pauses), and every transfer that failed or was refused.
//!
//! Run: `scripts/bench pause_load`, or `cargo bench --bench pause_load [-- --quick]`
//! after `cargo build --release -p stillpoint-ledger`.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stillpoint::backup::{self, Progress};
use stillpoint::coordinator::{self, PausePlan, PauseReport};
use stillpoint::resolve::parse_address_list;
use stillpoint::runbook::Runbook;
use stillpoint::time::Zone;
use support::{Flags, Process, Row, Target, median, percentile};

const SECTION: &str = "2. pause under load";
const LEDGERS: usize = 3;
const LOAD_CONCURRENCY: usize = 8;
/// The Kubernetes pause tool's fixed hold.
const FIXED_HOLD: Duration = Duration::from_secs(5);
/// Load between two pauses, so that most transfers meet no pause and give the
/// baseline latency.
const GAP: Duration = Duration::from_millis(300);
/// Load before the first pause: connections made, SQLite warm.
const WARM_UP: Duration = Duration::from_secs(2);

/// A span of wall-clock time in µs since the Unix epoch, the load log's clock.
#[derive(Clone, Copy)]
struct Span {
    start_us: u64,
    end_us: u64,
}

impl Span {
    fn overlaps(&self, start_us: u64, end_us: u64) -> bool {
        start_us < self.end_us && end_us > self.start_us
    }
}

fn main() {
    let flags = Flags::parse();
    let (backups, holds) = if flags.quick { (10, 1) } else { (50, 3) };
    let dir = tempfile::tempdir().unwrap();
    let ledger_db = dir.path().join("ledger.db");
    let auditor_db = dir.path().join("auditor.db");
    let node = support::workspace_binary("ledger-node");

    let (_auditor, auditor) = Process::spawn_listening(Command::new(&node).args([
        "serve",
        "--role",
        "auditor",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &format!("sqlite:{}", auditor_db.display()),
    ]));
    let mut ledgers = Vec::new();
    let mut ledger_processes = Vec::new();
    for _ in 0..LEDGERS {
        let (process, address) = Process::spawn_listening(Command::new(&node).args([
            "serve",
            "--role",
            "ledger",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &format!("sqlite:{}", ledger_db.display()),
            "--auditor",
            &auditor,
            "--closed-policy",
            "hold",
        ]));
        ledger_processes.push(process);
        ledgers.push(address);
    }
    let latency_log = dir.path().join("latency.log");
    let load = Process::spawn(Command::new(&node).args([
        "load",
        "--targets",
        &ledgers.join(","),
        "--concurrency",
        &LOAD_CONCURRENCY.to_string(),
        "--duration",
        "1h",
        "--output",
        "json",
        "--latency-log",
        &latency_log.display().to_string(),
    ]));
    std::thread::sleep(WARM_UP);
    let measuring_from = now_us();

    let runbook = runbook(dir.path(), &ledgers, &auditor, &ledger_db, &auditor_db);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backup_windows, backup_spans, hold_windows, hold_spans) = runtime.block_on(async {
        let mut windows = Vec::new();
        let mut spans = Vec::new();
        for _ in 0..backups {
            let (window_ms, span) = one_backup(&runbook).await;
            windows.push(window_ms);
            spans.push(span);
            tokio::time::sleep(GAP).await;
        }
        let mut hold_windows = Vec::new();
        let mut hold_spans = Vec::new();
        for _ in 0..holds {
            let (window_ms, span) = fixed_hold(&ledgers, &auditor).await;
            hold_windows.push(window_ms);
            hold_spans.push(span);
            tokio::time::sleep(GAP).await;
        }
        (windows, spans, hold_windows, hold_spans)
    });
    let measuring_to = now_us();

    // SIGTERM: the generator finishes the transfers in flight, then reports.
    load.signal("TERM");
    let report: serde_json::Value = serde_json::from_str(&load.wait_stdout()).unwrap();
    let transfers = read_latency_log(&latency_log);

    // Committed transfers by what they met. Rejections and failures return at once
    // and would hide the latency a pause adds; they are counted separately.
    let mut met_backup = Vec::new();
    let mut met_hold = Vec::new();
    let mut outside = Vec::new();
    let mut unsuccessful = 0u64;
    let mut measured = 0u64;
    for (start_us, latency_us, outcome) in &transfers {
        let end_us = start_us + latency_us;
        if *start_us < measuring_from || end_us > measuring_to {
            continue;
        }
        measured += 1;
        if outcome == "rejected" || outcome == "failed" {
            unsuccessful += 1;
            continue;
        }
        if outcome != "ok" {
            continue;
        }
        let latency_ms = *latency_us as f64 / 1000.0;
        if backup_spans.iter().any(|s| s.overlaps(*start_us, end_us)) {
            met_backup.push(latency_ms);
        } else if hold_spans.iter().any(|s| s.overlaps(*start_us, end_us)) {
            met_hold.push(latency_ms);
        } else {
            outside.push(latency_ms);
        }
    }
    let p99 = |values: &[f64]| percentile(values, 99.0);
    let (backup_extra, hold_extra) = (
        p99(&met_backup) - p99(&outside),
        p99(&met_hold) - p99(&outside),
    );
    let (backup_p50, backup_p99) = (median(&backup_windows), percentile(&backup_windows, 99.0));
    let hold_p50 = median(&hold_windows);
    let whole_run_unsuccessful =
        report["failed"].as_u64().unwrap() + report["rejected"].as_u64().unwrap();

    let body = format!(
        "{measured_line} {LEDGERS} ledger nodes + 1 auditor on SQLite, requests held during \
         a pause; `ledger-node load --concurrency {LOAD_CONCURRENCY}` throughout \
         ({throughput:.0} transfers/s over the run). {backups} backups (ledger and \
         auditor databases, zstd 3 + age), then {holds} × a fixed {hold_s} s hold, {gap} ms \
         of load between pauses.\n\n\
         | | stillpoint backup | fixed 5 s hold | stillpoint / hold |\n\
         |---|---|---|---|\n\
         | pause window p50 | {backup_p50:.0} ms | {hold_p50:.0} ms | **{window_ratio:.4}×** |\n\
         | pause window p99 | {backup_p99:.0} ms | {hold_p99:.0} ms | {window_p99_ratio:.4}× |\n\
         | committed transfers that met a pause | {n_backup} | {n_hold} | |\n\
         | their latency p99 | {backup_met_p99:.1} ms | {hold_met_p99:.1} ms | |\n\
         | extra latency p99 (vs {outside_p99:.1} ms for the {n_outside} that met no pause) | \
         {backup_extra:.1} ms | {hold_extra:.1} ms | **{extra_ratio:.4}×** |\n\n\
         Failed or refused transfers: **{unsuccessful}** of {measured} while measuring \
         ({whole_run_unsuccessful} in the whole run, warm-up included; target 0 in hold mode).",
        measured_line = support::measured_line("scripts/bench pause_load"),
        throughput = report["throughput_per_s"].as_f64().unwrap(),
        hold_s = FIXED_HOLD.as_secs(),
        gap = GAP.as_millis(),
        hold_p99 = percentile(&hold_windows, 99.0),
        window_ratio = backup_p50 / hold_p50,
        window_p99_ratio = backup_p99 / percentile(&hold_windows, 99.0),
        n_backup = met_backup.len(),
        n_hold = met_hold.len(),
        backup_met_p99 = p99(&met_backup),
        hold_met_p99 = p99(&met_hold),
        outside_p99 = p99(&outside),
        n_outside = outside.len(),
        extra_ratio = backup_extra / hold_extra,
    );
    let rows = [
        Row::new(
            SECTION,
            "pause window p50 vs a fixed 5 s hold",
            format!("{backup_p50:.0} ms (p99 {backup_p99:.0} ms)"),
            format!("{hold_p50:.0} ms"),
            Some(backup_p50 / hold_p50),
            Target::None,
        ),
        Row::new(
            SECTION,
            "extra client latency p99 during a pause vs a fixed 5 s hold",
            format!("+{backup_extra:.1} ms"),
            format!("+{hold_extra:.0} ms"),
            Some(backup_extra / hold_extra),
            Target::None,
        ),
        Row::new(
            SECTION,
            "failed or refused client requests (hold mode)",
            format!("{unsuccessful} of {measured}"),
            String::new(),
            None,
            Target::Zero(unsuccessful),
        ),
    ];
    flags.publish("pause-load", &body, &rows);
}

/// One whole backup; returns its window and the span from just before the pause to
/// just after the release (the span in which a node's gate may be closed).
async fn one_backup(runbook: &Runbook) -> (f64, Span) {
    let marks: Arc<Mutex<Vec<(&'static str, u64)>>> = Arc::default();
    let sink = {
        let marks = marks.clone();
        Arc::new(move |progress: Progress| {
            if let Progress::Phase(phase) = progress {
                marks.lock().unwrap().push((phase, now_us()));
            }
        })
    };
    let manifest = backup::run(runbook, sink).await.expect("backup");
    let marks = marks.lock().unwrap();
    let at = |phase| marks.iter().find(|(p, _)| *p == phase).unwrap().1;
    // "pause" is reported just before the first node is asked; "copy" just after the
    // last one was released.
    let span = Span {
        start_us: at("pause"),
        end_us: at("copy"),
    };
    (manifest.window.window_ms.unwrap() as f64, span)
}

/// Pauses the cluster, holds it for [`FIXED_HOLD`], releases it.
async fn fixed_hold(ledgers: &[String], auditor: &str) -> (f64, Span) {
    let plan = PausePlan::new(
        vec![
            parse_address_list(&ledgers.join(",")).unwrap(),
            parse_address_list(auditor).unwrap(),
        ],
        Duration::from_secs(30),
        Duration::from_secs(10),
    );
    let start_us = now_us();
    let mut paused = coordinator::pause(&plan).await.expect("pause");
    paused
        .hold_until(tokio::time::Instant::now() + FIXED_HOLD)
        .await;
    let released = paused.release().await;
    let end_us = now_us();
    assert!(released.all_released(), "a node was not released");
    let window = PauseReport::closed(&released, Zone::UTC);
    (window.window_ms.unwrap() as f64, Span { start_us, end_us })
}

fn runbook(
    dir: &Path,
    ledgers: &[String],
    auditor: &str,
    ledger_db: &Path,
    auditor_db: &Path,
) -> Runbook {
    let recipient = age::x25519::Identity::generate().to_public().to_string();
    let quoted = |addresses: &[String]| {
        addresses
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"
cluster = "bench"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
lease = "30s"
max_wait = "10s"
[[databases]]
name = "ledger"
role = "ledger"
adapter = "sqlite"
path = "{ledger_db}"
[[databases]]
name = "auditor"
role = "auditor"
adapter = "sqlite"
path = "{auditor_db}"
[pipeline]
zstd_level = 3
age_recipients = ["{recipient}"]
[storage]
url = "file://{storage}"
"#,
        ledgers = quoted(ledgers),
        ledger_db = ledger_db.display(),
        auditor_db = auditor_db.display(),
        storage = dir.join("backups").display(),
    );
    Runbook::parse(&text, dir).unwrap()
}

/// (start µs, latency µs, outcome) per transfer, as `ledger-node load --latency-log`
/// writes them.
fn read_latency_log(path: &Path) -> Vec<(u64, u64, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let mut fields = line.split(' ');
            let mut number = || fields.next().unwrap().parse::<u64>().unwrap();
            let (start, latency) = (number(), number());
            (start, latency, fields.next().unwrap().to_owned())
        })
        .collect()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}
