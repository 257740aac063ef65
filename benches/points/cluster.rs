//! Points under load: the reference ledger cluster (3 `ledger-node` ledger nodes and
//! an auditor, requests held while paused) on a PostgreSQL of its own, both databases
//! archived by `stillpoint archive` with the runbook's defaults, a base backup of
//! each. `ledger-node load` runs in segments of equal length, alternating: one with
//! `stillpoint point` every 10 s, one without; the archiver runs throughout both.
//!
//! Measured: client throughput with points vs without; each point's pause-to-commit
//! time and window (from `point --output json`); and the archive's lag behind the
//! server: every 100 ms the server's flushed WAL position is sampled, and its lag is
//! the time until the archiver reports an archive that reaches it (zero when one
//! already did).

use std::process::Command;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::support::{self, Process, Row, Target, median, percentile};
use crate::{Archiver, Server, lsn, set_mode, stillpoint};

const LEDGERS: usize = 3;
const LOAD_CONCURRENCY: usize = 8;
const POINT_EVERY: Duration = Duration::from_secs(10);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const DATABASES: [&str; 2] = ["ledger", "auditor"];

#[derive(Default)]
pub struct ClusterRun {
    /// Transfers per second of each segment.
    pub with_points: Vec<f64>,
    pub without: Vec<f64>,
    pub pause_to_commit_ms: Vec<f64>,
    /// Of which the wait for every archive to reach its marker.
    pub wait_ms: Vec<f64>,
    /// From asking the first node to pause to every node released.
    pub pause_ms: Vec<f64>,
    /// CPU time of each `stillpoint point` process (user + system), ms.
    pub cpu_ms: Vec<f64>,
    pub window_ms: Vec<f64>,
    /// Per sample and archive, ms.
    pub lag_ms: Vec<f64>,
    /// Samples no report reached before the archiver stopped.
    pub unreached: usize,
    pub failed: u64,
    pub transfers: u64,
}

pub fn run(runtime: &tokio::runtime::Runtime, sizes: &crate::Sizes) -> ClusterRun {
    let dir = tempfile::tempdir().unwrap();
    // The server runs as `postgres` when we are root: it must reach its directory.
    set_mode(dir.path(), 0o755);
    let postgres = Server::init(&dir.path().join("pg"), "server", &[]);
    for database in DATABASES {
        postgres.create_database(database);
    }
    let node = support::workspace_binary("ledger-node");
    let (_auditor, auditor) = Process::spawn_listening(Command::new(&node).args([
        "serve",
        "--role",
        "auditor",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &postgres.url("auditor"),
    ]));
    let mut ledgers = Vec::new();
    let mut _ledger_processes = Vec::new();
    for _ in 0..LEDGERS {
        let (process, address) = Process::spawn_listening(Command::new(&node).args([
            "serve",
            "--role",
            "ledger",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &postgres.url("ledger"),
            "--auditor",
            &auditor,
            "--closed-policy",
            "hold",
        ]));
        _ledger_processes.push(process);
        ledgers.push(address);
    }
    let runbook = dir.path().join("runbook.toml");
    let quoted = |addresses: &[String]| {
        addresses
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let databases: String = DATABASES
        .iter()
        .map(|name| {
            format!(
                "[[databases]]\nname = \"{name}\"\nadapter = \"postgres\"\nurl = \"{}\"\n\
                 bin_dir = \"{}\"\narchive = true\n",
                postgres.url(name),
                postgres.bin_dir.display()
            )
        })
        .collect();
    std::fs::write(
        &runbook,
        format!(
            r#"
cluster = "bench-points-load"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
lease = "30s"
max_wait = "10s"
{databases}
[pipeline]
zstd_level = {level}
age_recipients = ["{recipient}"]
[storage]
url = "file://{storage}"
[archive]
spool_dir = "{spool}"
"#,
            ledgers = quoted(&ledgers),
            level = crate::ZSTD_LEVEL,
            recipient = age::x25519::Identity::generate().to_public(),
            storage = dir.path().join("storage").display(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let config = runbook.to_str().unwrap();
    let mut archiver = Archiver::start(&runbook);
    archiver.wait_streaming(&postgres, DATABASES.len());
    // The tables exist once the nodes serve; the base backups hold them.
    stillpoint(&["base-backup", "--config", config]);

    let stop_sampling = CancellationToken::new();
    let sampler = runtime.spawn(sample_wal(postgres.url("postgres"), stop_sampling.clone()));
    let mut result = ClusterRun::default();
    for pair in 0..sizes.segments {
        eprintln!("load segments, pair {} of {}", pair + 1, sizes.segments);
        for with_points in [pair % 2 == 1, pair % 2 == 0] {
            let load = Process::spawn(Command::new(&node).args([
                "load",
                "--targets",
                &ledgers.join(","),
                "--concurrency",
                &LOAD_CONCURRENCY.to_string(),
                "--duration",
                &format!("{}s", sizes.segment.as_secs()),
                "--output",
                "json",
            ]));
            if with_points {
                let started = Instant::now();
                // The first at half the interval, then every interval, while the load runs.
                let mut next = POINT_EVERY / 2;
                while next + Duration::from_secs(1) < sizes.segment {
                    std::thread::sleep(next.saturating_sub(started.elapsed()));
                    let cpu_before = children_cpu_ms();
                    let point = stillpoint(&["point", "--config", config, "--wait", "60s"]);
                    // The only child reaped meanwhile: the load generator still runs.
                    result.cpu_ms.push(children_cpu_ms() - cpu_before);
                    result
                        .pause_ms
                        .push(point["timings"]["pause_ms"].as_f64().unwrap());
                    result
                        .pause_to_commit_ms
                        .push(point["timings"]["pause_to_commit_ms"].as_f64().unwrap());
                    result
                        .wait_ms
                        .push(point["timings"]["wait_ms"].as_f64().unwrap());
                    result
                        .window_ms
                        .push(point["window"]["window_ms"].as_f64().unwrap_or(f64::NAN));
                    next += POINT_EVERY;
                }
            }
            let report: serde_json::Value = serde_json::from_str(&load.wait_stdout()).unwrap();
            // Committed transfers only: a refused one returns at once and costs nothing.
            let ok = report["ok"].as_u64().unwrap();
            let throughput = ok as f64 / (report["elapsed_ms"].as_f64().unwrap() / 1000.0);
            result.failed +=
                report["failed"].as_u64().unwrap() + report["rejected"].as_u64().unwrap();
            result.transfers += ok;
            if with_points {
                result.with_points.push(throughput);
            } else {
                result.without.push(throughput);
            }
        }
    }
    stop_sampling.cancel();
    let samples = runtime.block_on(sampler).unwrap();
    archiver.stop();

    let reports = archiver.reports.lock().unwrap();
    for database in DATABASES {
        let reached: Vec<(Instant, u64)> = reports
            .iter()
            .filter(|report| report.database == database)
            .map(|report| (report.at, report.archived_to))
            .collect();
        for (at, position) in &samples {
            match reached.iter().find(|(_, to)| to >= position) {
                Some((when, _)) => result
                    .lag_ms
                    .push(support::ms(when.saturating_duration_since(*at))),
                None => result.unreached += 1,
            }
        }
    }
    result
}

/// CPU time (user + system) of this process's children that have been waited for,
/// in ms (`cutime` + `cstime` of /proc/self/stat).
fn children_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (in parentheses, which may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // cutime and cstime are fields 16 and 17 of the whole line: 13 and 14 here.
    let ticks: f64 = fields[13].parse::<f64>().unwrap() + fields[14].parse::<f64>().unwrap();
    // Clock ticks are 100 per second on Linux (USER_HZ).
    ticks * 10.0
}

/// The server's flushed WAL position every [`SAMPLE_EVERY`] until `stop`: what an
/// archiver can have at best.
async fn sample_wal(url: String, stop: CancellationToken) -> Vec<(Instant, u64)> {
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => break,
        }
        let at = Instant::now();
        let row = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .unwrap();
        samples.push((at, lsn(row.get(0))));
    }
    drop(client);
    driver.await.unwrap().unwrap();
    samples
}

impl ClusterRun {
    pub fn report(&self, sizes: &crate::Sizes) -> (String, Vec<Row>) {
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let (with, without) = (mean(&self.with_points), mean(&self.without));
        let ratio = with / without;
        let (commit_p50, commit_p99) = (
            median(&self.pause_to_commit_ms),
            percentile(&self.pause_to_commit_ms, 99.0),
        );
        let (lag_p50, lag_p99) = (median(&self.lag_ms), percentile(&self.lag_ms, 99.0));
        let lag_max = percentile(&self.lag_ms, 100.0);
        let body = format!(
            "{measured} {LEDGERS} ledger nodes + 1 auditor on one PostgreSQL (both databases \
             archived, `partial_interval` 200 ms, the default), requests held during a pause; \
             `ledger-node load --concurrency {LOAD_CONCURRENCY}` in {segments} segments of \
             {secs} s of each kind, alternating. {points} points in all.\n\n\
             | | with a point every {every} s | without | ratio |\n|---|---|---|---|\n\
             | client throughput (mean of the segments) | {with:.0} transfers/s | \
             {without:.0} transfers/s | **{ratio:.3}×** |\n\n\
             Each pair of segments (with / without, in the order run): {pairs}. The spread \
             between pairs is the noise the mean ratio carries.\n\n\
             | point | p50 | p99 |\n|---|---|---|\n\
             | pause to commit (`timings.pause_to_commit_ms`) | {commit_p50:.0} ms | \
             {commit_p99:.0} ms |\n\
             | of which the wait for the archives to reach the markers | {wait_p50:.0} ms | \
             {wait_p99:.0} ms |\n\
             | pause (first node asked to pause → every node released) | {pause_p50:.0} \
             ms | {pause_p99:.0} ms |\n\
             | pause window | {window_p50:.0} ms | {window_p99:.0} ms |\n\
             | CPU of the `stillpoint point` process | {cpu_p50:.0} ms | {cpu_p99:.0} ms |\n\
             | archive lag under load ({lags} samples over both archives) | {lag_p50:.0} \
             ms | {lag_p99:.0} ms (max {lag_max:.0} ms) |\n\n\
             Throughput with points / without: **{ratio:.3}×** (target ≥ 0.99×). Archive \
             lag p99: **{lag_p99:.0} ms** (target ≤ 1 s). The lag of a sample is the time \
             from reading the server's flushed WAL position to the first report of the \
             archiver whose archive reaches it (the archiver reports each chunk it \
             stores); {unreached} samples were reached by no report before the archiver \
             stopped.{lag_why} Committed transfers: {transfers}; failed or refused: \
             {failed}.",
            measured = support::measured_line(crate::COMMAND),
            segments = sizes.segments,
            pairs = self
                .with_points
                .iter()
                .zip(&self.without)
                .map(|(with, without)| format!("{:.3}×", with / without))
                .collect::<Vec<_>>()
                .join(", "),
            secs = sizes.segment.as_secs(),
            points = self.pause_to_commit_ms.len(),
            every = POINT_EVERY.as_secs(),
            wait_p50 = median(&self.wait_ms),
            wait_p99 = percentile(&self.wait_ms, 99.0),
            pause_p50 = median(&self.pause_ms),
            pause_p99 = percentile(&self.pause_ms, 99.0),
            cpu_p50 = median(&self.cpu_ms),
            cpu_p99 = percentile(&self.cpu_ms, 99.0),
            window_p50 = median(&self.window_ms),
            window_p99 = percentile(&self.window_ms, 99.0),
            lags = self.lag_ms.len(),
            unreached = self.unreached,
            failed = self.failed,
            transfers = self.transfers,
            lag_why = if lag_p99 > 1000.0 {
                " Why over 1 s: the archiver pushes what the segment being written \
                 gained every `partial_interval` (200 ms by default), up to what \
                 pg_receivewal has flushed then; WAL written just after a push waits \
                 for the next one, and the push itself (zstd, age, storage) and the \
                 archiver's report come on top: on a busy machine each of them waits \
                 for a core."
            } else {
                ""
            },
        );
        let section = crate::SECTION;
        let rows = vec![
            Row::new(
                section,
                &format!(
                    "ledger cluster client throughput, a point every {} s vs none",
                    POINT_EVERY.as_secs()
                ),
                format!("{with:.0} transfers/s"),
                format!("{without:.0} transfers/s"),
                Some(ratio),
                Target::AtLeast(0.99),
            ),
            Row::new(
                section,
                "point pause-to-commit latency p50 (p99)",
                format!("{commit_p50:.0} ms ({commit_p99:.0} ms)"),
                String::new(),
                None,
                Target::None,
            ),
            // An absolute target, not a ratio.
            Row {
                section: section.to_owned(),
                measure: "archive lag under load, p99".to_owned(),
                stillpoint: format!("{lag_p99:.0} ms (p50 {lag_p50:.0} ms)"),
                baseline: String::new(),
                ratio: None,
                target: "≤ 1 s".to_owned(),
                met: Some(lag_p99 <= 1000.0),
            },
        ];
        (body, rows)
    }
}
