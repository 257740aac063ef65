//! Points on SQLite (issue 16): the reference cluster on SQLite (3 `ledger-node` ledger
//! nodes writing one SQLite file, an auditor with its own, requests held during a
//! pause), both files archived frame by frame by `stillpoint archive` (the CLI, as an
//! operator runs it: `archive = true`, `[archive] chunk_interval = "100ms"`).
//!
//! 1. **Cost to the writers**: `ledger-node load` in segments of equal length,
//!    alternating: with `stillpoint archive` running, and without (stopped); committed
//!    transfers per second of each kind.
//! 2. **Archive lag under load**: in a further segment with the archiver running, every
//!    100 ms each database's last commit is read from its log (`archive::sqlite::mark`,
//!    the marker a point takes, read without a pause), with the time. After the run,
//!    each sample's lag is the time until the storage held it: the modification time
//!    of the first chunk record (or snapshot record) whose frames include it, zero when
//!    one already did. Baseline: the configured `chunk_interval`. Negative control: a
//!    commit made while the archiver is stopped must be held by no record.
//! 3. **Restore of a point vs a plain copy**: a point taken after that segment, restored
//!    with `stillpoint restore --point ID --database ledger --to ledger=FILE` (the
//!    snapshot read back, the frames since it applied, `integrity_check`), against `cp`
//!    of the ledger file (checkpointed into one file first) and SQLite's backup API
//!    (rusqlite) of the same database; alternating, medians. The restored file is
//!    checked to hold the point's rows.
//!
//! Run: `scripts/bench sqlite_points`, or `cargo bench --bench sqlite_points [--
//! --quick]` after `cargo build --profile bench -p stillpoint-cli -p stillpoint-ledger`.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use stillpoint::archive::sqlite::mark;
use support::{Flags, Process, Row, Target, median, percentile};

const COMMAND: &str = "scripts/bench sqlite_points";
const SECTION: &str = "8. SQLite points";
const LEDGERS: usize = 3;
const LOAD_CONCURRENCY: usize = 8;
const DATABASES: [&str; 2] = ["ledger", "auditor"];
/// The runbook's `[archive] chunk_interval`: how often the archiver reads the log.
const CHUNK_INTERVAL: Duration = Duration::from_millis(100);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

struct Sizes {
    /// Pairs of load segments (with the archiver, without), alternating which first.
    pairs: usize,
    segment: Duration,
    /// Restores of each kind, alternating.
    restores: usize,
}

fn main() {
    let flags = Flags::parse();
    let sizes = if flags.quick {
        Sizes {
            pairs: 1,
            segment: Duration::from_secs(8),
            restores: 1,
        }
    } else {
        Sizes {
            pairs: 4,
            segment: Duration::from_secs(30),
            restores: 3,
        }
    };
    let bench = Bench::start();
    let mut run = Run::default();

    // 1. Load with the archiver vs without, alternating.
    for pair in 0..sizes.pairs {
        eprintln!("load segments, pair {} of {}", pair + 1, sizes.pairs);
        for archived in [pair % 2 == 1, pair % 2 == 0] {
            let archiver = archived.then(|| bench.start_archiver());
            let (throughput, report) = bench.load(sizes.segment);
            run.count(&report);
            if let Some(archiver) = archiver {
                run.archiver_cpu_ms.push(archiver.stop());
                run.archived.push(throughput);
            } else {
                run.bare.push(throughput);
            }
        }
    }

    // 2. Archive lag under load, then a point.
    eprintln!("archive lag segment");
    let archiver = bench.start_archiver();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let files: Vec<PathBuf> = DATABASES.iter().map(|db| bench.file(db)).collect();
        std::thread::spawn(move || sample_markers(&files, &sampling))
    };
    let (_, report) = bench.load(sizes.segment);
    run.count(&report);
    sampling.store(false, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    let point = stillpoint_json(&[
        "point",
        "--config",
        bench.config(),
        "--count-rows",
        "--wait",
        "60s",
    ]);
    // Its CPU is not a segment's alone (the point, the wait for it): not counted.
    archiver.stop();

    // The negative control: a commit made while no archiver runs is held by nothing.
    let last = mark(&bench.file("ledger")).unwrap();
    let load = bench.spawn_load(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(30);
    let unarchived = loop {
        let now = mark(&bench.file("ledger")).unwrap();
        if now != last {
            break (SystemTime::now(), now);
        }
        assert!(
            Instant::now() < deadline,
            "the load committed nothing in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    run.count(&serde_json::from_str(&load.wait_stdout()).unwrap());

    for (index, database) in DATABASES.iter().enumerate() {
        let held = bench.held(database);
        for (at, marker) in &samples[index] {
            match held_since(&held, marker) {
                Some(since) => run
                    .lag_ms
                    .push(since.duration_since(*at).map_or(0.0, support::ms)),
                None => run.unreached += 1,
            }
        }
        if *database == "ledger" {
            assert!(
                held_since(&held, &unarchived.1).is_none(),
                "a commit made while the archiver was stopped ({:?}) counts as archived: the \
                 lag's resolution cannot fail",
                unarchived.1
            );
        }
    }
    assert!(
        !run.lag_ms.is_empty(),
        "no lag sample was resolved: {} unreached",
        run.unreached
    );

    // 3. The point restored vs a plain copy of the file.
    run.restore = Some(bench.compare_restores(&point, sizes.restores));
    drop(bench);

    let (body, rows) = run.report(&sizes);
    flags.publish("sqlite-points", &body, &rows);
}

/// The cluster and its runbook, in a scratch directory.
struct Bench {
    dir: tempfile::TempDir,
    runbook: PathBuf,
    ledgers: Vec<String>,
    /// Last, so that the nodes stop after everything that uses them.
    _nodes: Vec<Process>,
}

impl Bench {
    fn start() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let node = support::workspace_binary("ledger-node");
        let mut nodes = Vec::new();
        let (process, auditor) = Process::spawn_listening(Command::new(&node).args([
            "serve",
            "--role",
            "auditor",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &format!("sqlite:{}", dir.path().join("auditor.db").display()),
        ]));
        nodes.push(process);
        let mut ledgers = Vec::new();
        for _ in 0..LEDGERS {
            let (process, address) = Process::spawn_listening(Command::new(&node).args([
                "serve",
                "--role",
                "ledger",
                "--listen",
                "127.0.0.1:0",
                "--db",
                &format!("sqlite:{}", dir.path().join("ledger.db").display()),
                "--auditor",
                &auditor,
                "--closed-policy",
                "hold",
            ]));
            nodes.push(process);
            ledgers.push(address);
        }
        let key = age::x25519::Identity::generate();
        let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_owned();
        let identity_file = dir.path().join("key.txt");
        std::fs::write(&identity_file, format!("{identity}\n")).unwrap();
        let databases: String = DATABASES
            .iter()
            .map(|name| {
                format!(
                    "[[databases]]\nname = \"{name}\"\nrole = \"{name}\"\nadapter = \"sqlite\"\n\
                     path = \"{}\"\narchive = true\n",
                    dir.path().join(format!("{name}.db")).display()
                )
            })
            .collect();
        let runbook = dir.path().join("runbook.toml");
        std::fs::write(
            &runbook,
            format!(
                r#"
cluster = "bench-sqlite-points"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
lease = "30s"
max_wait = "10s"
{databases}
[pipeline]
zstd_level = 3
age_recipients = ["{recipient}"]
age_identity_file = "{identity_file}"
[storage]
url = "file://{storage}"
[archive]
spool_dir = "{spool}"
chunk_interval = "{chunk_ms}ms"
"#,
                ledgers = ledgers
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                recipient = key.to_public(),
                identity_file = identity_file.display(),
                storage = dir.path().join("storage").display(),
                spool = dir.path().join("spool").display(),
                chunk_ms = CHUNK_INTERVAL.as_millis(),
            ),
        )
        .unwrap();
        Bench {
            dir,
            runbook,
            ledgers,
            _nodes: nodes,
        }
    }

    fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    fn file(&self, database: &str) -> PathBuf {
        self.dir.path().join(format!("{database}.db"))
    }

    fn spawn_load(&self, duration: Duration) -> Process {
        Process::spawn(
            Command::new(support::workspace_binary("ledger-node")).args([
                "load",
                "--targets",
                &self.ledgers.join(","),
                "--concurrency",
                &LOAD_CONCURRENCY.to_string(),
                "--duration",
                &format!("{}ms", duration.as_millis()),
                "--output",
                "json",
            ]),
        )
    }

    /// Runs the load for `duration`: committed transfers per second, and its report.
    fn load(&self, duration: Duration) -> (f64, Value) {
        let report: Value = serde_json::from_str(&self.spawn_load(duration).wait_stdout()).unwrap();
        // Committed transfers only: a refused one returns at once and costs nothing.
        let ok = report["ok"].as_u64().unwrap();
        (
            ok as f64 / (report["elapsed_ms"].as_f64().unwrap() / 1000.0),
            report,
        )
    }

    /// `stillpoint archive`, once it holds both databases' last commits (the load is
    /// not running: what a stopped archiver missed is caught up, or snapshotted, before
    /// a segment starts).
    fn start_archiver(&self) -> Archiver {
        let archiver = Archiver::start(&self.runbook);
        let deadline = Instant::now() + Duration::from_secs(120);
        for database in DATABASES {
            let marker = mark(&self.file(database)).unwrap();
            while held_since(&self.held(database), &marker).is_none() {
                assert!(
                    Instant::now() < deadline,
                    "the archive of {database} did not reach its last commit {marker:?} \
                     within 2 minutes"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        archiver
    }

    /// What the storage holds of `database`'s log: every chunk record and snapshot
    /// record, with when it was written.
    fn held(&self, database: &str) -> Vec<Held> {
        let storage = self.dir.path().join("storage");
        let mut held = Vec::new();
        let read = |path: &Path| -> Option<(Value, SystemTime)> {
            let modified = std::fs::metadata(path).ok()?.modified().ok()?;
            let record = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
            Some((record, modified))
        };
        let chunks = storage.join("archive").join(database);
        for entry in std::fs::read_dir(&chunks).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Some((record, at)) = read(&path)
                && let Some(chunk) = Held::chunk(&record, at)
            {
                held.push(chunk);
            }
        }
        let bases = storage.join("bases").join(database);
        for entry in std::fs::read_dir(&bases).into_iter().flatten().flatten() {
            if let Some((record, at)) = read(&entry.path().join("base.json"))
                && let Some(snapshot) = Held::snapshot(&record, at)
            {
                held.push(snapshot);
            }
        }
        held
    }

    /// The point's ledger restored vs copies of the ledger file, alternating.
    fn compare_restores(&self, point: &Value, rounds: usize) -> Restores {
        let id = point["point_id"].as_str().unwrap().to_owned();
        let ledger = point["databases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|db| db["name"] == "ledger")
            .unwrap();
        // The file, checkpointed into one file (nothing writes now), so that a plain
        // copy of it is the whole database.
        let source = self.file("ledger");
        let conn = rusqlite::Connection::open(&source).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let (busy, ..): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0, "the ledger could not be checkpointed");
        let mut restores = Restores {
            id: id.clone(),
            file_bytes: std::fs::metadata(&source).unwrap().len(),
            ..Restores::default()
        };
        let out = self.dir.path().join("restored");
        std::fs::create_dir_all(&out).unwrap();
        for round in 0..rounds {
            for first in [round % 2 == 0, round % 2 == 1] {
                let file = out.join(format!("{round}-{first}.db"));
                if first {
                    let started = Instant::now();
                    let report = stillpoint_json(&[
                        "restore",
                        "--config",
                        self.config(),
                        "--point",
                        &id,
                        "--database",
                        "ledger",
                        "--to",
                        &format!("ledger={}", file.display()),
                    ]);
                    restores.restore_ms.push(support::ms(started.elapsed()));
                    restores.restored_bytes = std::fs::metadata(&file).unwrap().len();
                    let report = report["databases"][0].clone();
                    assert_eq!(
                        report["file"]["row_counts_match_point"], true,
                        "the restore compared no rows: {report}"
                    );
                    restores.reports.push(report);
                    restores.rows_checked = check_rows(&file, ledger);
                } else {
                    let started = Instant::now();
                    support_run(Command::new("cp").arg(&source).arg(&file));
                    restores.cp_ms.push(support::ms(started.elapsed()));
                    let copy = out.join(format!("{round}-backup.db"));
                    let started = Instant::now();
                    let mut target = rusqlite::Connection::open(&copy).unwrap();
                    // One step of every page (-1): the copy as one read transaction.
                    let step = rusqlite::backup::Backup::new(&conn, &mut target)
                        .unwrap()
                        .step(-1)
                        .unwrap();
                    assert_eq!(step, rusqlite::backup::StepResult::Done);
                    drop(target);
                    restores.backup_api_ms.push(support::ms(started.elapsed()));
                }
                std::fs::remove_file(&file).unwrap();
            }
        }
        restores
    }
}

/// The restored file holds the rows the point counted inside its pause (`--count-rows`),
/// table by table; returns how many tables were compared.
fn check_rows(file: &Path, ledger: &Value) -> usize {
    let counts = ledger["row_counts"]
        .as_object()
        .unwrap_or_else(|| panic!("the point counted no rows: {ledger}"));
    let conn = rusqlite::Connection::open(file).unwrap();
    for (table, count) in counts {
        let restored: i64 = conn
            .query_row(&format!("SELECT count(*) FROM \"{table}\""), [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(
            Some(restored),
            count.as_i64(),
            "table {table} of the restored point"
        );
    }
    counts.len()
}

/// A chunk of one log cycle (frames `first..=last`), or a snapshot taken at `frame` of
/// one (it holds every commit up to there), and when its record was written.
struct Held {
    cycle: [Option<String>; 3],
    first: u64,
    last: u64,
    at: SystemTime,
}

impl Held {
    fn cycle(details: &Value) -> [Option<String>; 3] {
        ["checkpoint_seq", "salt1", "salt2"].map(|key| details[key].as_str().map(str::to_owned))
    }

    fn chunk(record: &Value, at: SystemTime) -> Option<Held> {
        let details = &record["details"];
        let first: u64 = details["first_frame"].as_str()?.parse().ok()?;
        let start = record["start"]["sqlite"]["frame"].as_u64()?;
        let end = record["end"]["sqlite"]["frame"].as_u64()?;
        (end > start).then(|| Held {
            cycle: Held::cycle(details),
            first,
            last: first + (end - start) - 1,
            at,
        })
    }

    fn snapshot(record: &Value, at: SystemTime) -> Option<Held> {
        let details = &record["details"];
        let frame: u64 = details["frame"].as_str()?.parse().ok()?;
        Some(Held {
            cycle: Held::cycle(details),
            first: 0,
            last: frame,
            at,
        })
    }
}

/// When the storage first held the commit `marker` names: the earliest record of its
/// cycle whose frames reach it. None when none does (or the log was empty).
fn held_since(held: &[Held], marker: &BTreeMap<String, String>) -> Option<SystemTime> {
    let frame: u64 = marker.get("frame")?.parse().ok()?;
    let cycle = ["checkpoint_seq", "salt1", "salt2"].map(|key| marker.get(key).cloned());
    if frame == 0 || cycle.iter().any(Option::is_none) {
        return None;
    }
    held.iter()
        .filter(|h| h.cycle == cycle && h.first <= frame && frame <= h.last)
        .map(|h| h.at)
        .min()
}

type Samples = Vec<Vec<(SystemTime, BTreeMap<String, String>)>>;

/// Every [`SAMPLE_EVERY`] while `sampling`, each file's last commit, with the time.
fn sample_markers(files: &[PathBuf], sampling: &AtomicBool) -> Samples {
    let mut samples: Samples = vec![Vec::new(); files.len()];
    let started = Instant::now();
    let mut next = Duration::ZERO;
    while sampling.load(Ordering::SeqCst) {
        for (index, file) in files.iter().enumerate() {
            let at = SystemTime::now();
            if let Ok(marker) = mark(file) {
                samples[index].push((at, marker));
            }
        }
        next += SAMPLE_EVERY;
        std::thread::sleep(next.saturating_sub(started.elapsed()));
    }
    samples
}

/// `stillpoint archive --output json`; its lines are read and dropped.
struct Archiver {
    child: Child,
}

impl Archiver {
    fn start(runbook: &Path) -> Archiver {
        let mut child = Command::new(support::workspace_binary("stillpoint"))
            .args(["archive", "--config"])
            .arg(runbook)
            .args(["--output", "json"])
            // Not its warning that SIGTERM interrupted it, at every segment's end.
            .env("STILLPOINT_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"last_error\":\"") {
                    eprintln!("stillpoint archive: {line}");
                }
            }
        });
        Archiver { child }
    }

    /// Its CPU time (user + system, ms) until now, then SIGTERM (it pushes what it
    /// read and exits).
    fn stop(mut self) -> f64 {
        let cpu = process_cpu_ms(self.child.id());
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "stillpoint archive exited with {status}");
        cpu
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) of a running process, in ms (/proc/PID/stat).
fn process_cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here, in
    // clock ticks of 10 ms (USER_HZ).
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) * 10.0
}

/// `stillpoint ARGS… --output json`; panics with its output when it fails.
fn stillpoint_json(args: &[&str]) -> Value {
    let text = support_run(
        Command::new(support::workspace_binary("stillpoint"))
            .args(args)
            .args(["--output", "json"])
            .env("RUST_LOG", "warn"),
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stillpoint {args:?}: {e}: {text}"))
}

/// Runs `command` to the end; its stdout, or a panic with its output.
fn support_run(command: &mut Command) -> String {
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

#[derive(Default)]
struct Restores {
    id: String,
    file_bytes: u64,
    restored_bytes: u64,
    rows_checked: usize,
    restore_ms: Vec<f64>,
    cp_ms: Vec<f64>,
    backup_api_ms: Vec<f64>,
    /// `restore --output json`'s report of the ledger, per restore.
    reports: Vec<Value>,
}

#[derive(Default)]
struct Run {
    /// Committed transfers per second of each segment.
    archived: Vec<f64>,
    bare: Vec<f64>,
    /// CPU of `stillpoint archive` in each segment of part 1 (its catch-up before the
    /// segment included).
    archiver_cpu_ms: Vec<f64>,
    lag_ms: Vec<f64>,
    unreached: usize,
    transfers: u64,
    failed: u64,
    restore: Option<Restores>,
}

impl Run {
    fn count(&mut self, report: &Value) {
        self.transfers += report["ok"].as_u64().unwrap();
        self.failed += report["failed"].as_u64().unwrap() + report["rejected"].as_u64().unwrap();
    }

    fn report(&self, sizes: &Sizes) -> (String, Vec<Row>) {
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let (with, without) = (mean(&self.archived), mean(&self.bare));
        let ratio = with / without;
        let chunk_ms = support::ms(CHUNK_INTERVAL);
        let (lag_p50, lag_p99) = (median(&self.lag_ms), percentile(&self.lag_ms, 99.0));
        let lag_max = percentile(&self.lag_ms, 100.0);
        let restores = self.restore.as_ref().unwrap();
        let (restore, cp, backup_api) = (
            median(&restores.restore_ms),
            median(&restores.cp_ms),
            median(&restores.backup_api_ms),
        );
        let segment_secs = sizes.segment.as_secs();
        let last_restore = restores.reports.last().unwrap();
        let median_of = |value: fn(&Value) -> Option<f64>| {
            let values: Vec<f64> = restores.reports.iter().filter_map(value).collect();
            median(&values)
        };
        let body = format!(
            "{measured} {LEDGERS} ledger nodes + 1 auditor on SQLite (one ledger file, the \
             auditor's own), requests held during a pause; both files archived by `stillpoint \
             archive` (`chunk_interval` {chunk_ms:.0} ms, `snapshot_interval` the default \
             1 h); `ledger-node load --concurrency {LOAD_CONCURRENCY}`.\n\n\
             | | with `stillpoint archive` | without | ratio |\n|---|---|---|---|\n\
             | client throughput (mean of {pairs} segments of {segment_secs} s of each kind, \
             alternating) | {with:.0} transfers/s | {without:.0} transfers/s | \
             **{ratio:.3}×** |\n\n\
             Each pair (with / without, in the order run): {pairs_list}. CPU of the archiver \
             per segment: {cpu} (median {cpu_median:.0} ms, {cpu_share:.1}% of one core).\n\n\
             | archive lag under load ({lags} samples over both files, one segment of \
             {segment_secs} s) | p50 | p99 | max |\n|---|---|---|---|\n\
             | time from reading a database's last commit to the storage holding it | \
             {lag_p50:.0} ms | {lag_p99:.0} ms | {lag_max:.0} ms |\n\
             | baseline: `chunk_interval` | {chunk_ms:.0} ms | | |\n\n\
             Archive lag p99 / `chunk_interval`: **{lag_ratio:.2}×**. The lag of a sample \
             is the time from reading the file's log (`archive::sqlite::mark`, the marker a \
             point takes, here without a pause) to the modification time of the first chunk \
             or snapshot record in the storage whose frames include that commit (zero when one \
             already did). {unreached} samples were held by no record before the archiver \
             stopped. Negative control: a commit made after the archiver stopped is held by \
             no record (checked).\n\n\
             | restore of point `{id}` (the ledger, {file_mib:.1} MiB) | median of {rounds} \
             |\n|---|---|\n\
             | `stillpoint restore --point … --database ledger --to ledger=FILE`: the snapshot \
             and {chunks} chunks ({stored_kib:.0} KiB stored) read back, {frames} frames \
             applied, `integrity_check` (the command's own `total_ms` {total_ms:.0} ms: checks \
             {check_ms:.0} ms, rebuild {replay_ms:.0} ms) | {restore:.0} ms |\n\
             | `cp` of the database file (checkpointed into one file) | {cp:.1} ms |\n\
             | SQLite's backup API of the database into a new file (rusqlite) | \
             {backup_api:.1} ms |\n\n\
             **Point restore / `cp`: {restore_ratio:.1}×**; point restore / backup API: \
             {backup_ratio:.1}×. The restored file ({restored_mib:.1} MiB) holds the rows the \
             point counted inside its pause ({tables} tables checked). The restore is one \
             `stillpoint` process (runbook and storage opened, the snapshot decrypted and \
             decompressed, the frames checked and applied, `integrity_check`); `cp` and the \
             backup API only move the bytes. Committed transfers in the whole run: \
             {transfers}; failed or refused: {failed}.",
            measured = support::measured_line(COMMAND),
            pairs = sizes.pairs,
            pairs_list = self
                .archived
                .iter()
                .zip(&self.bare)
                .map(|(with, without)| format!("{:.3}×", with / without))
                .collect::<Vec<_>>()
                .join(", "),
            cpu = self
                .archiver_cpu_ms
                .iter()
                .map(|ms| format!("{ms:.0} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            cpu_median = median(&self.archiver_cpu_ms),
            cpu_share = median(&self.archiver_cpu_ms) / support::ms(sizes.segment) * 100.0,
            lags = self.lag_ms.len(),
            lag_ratio = lag_p99 / chunk_ms,
            unreached = self.unreached,
            id = restores.id,
            file_mib = support::mib(restores.file_bytes),
            rounds = restores.restore_ms.len(),
            chunks = last_restore["chunks"],
            stored_kib = last_restore["stored_bytes"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            frames = last_restore["file"]["frames"],
            total_ms = median_of(|r| r["total_ms"].as_f64()),
            check_ms = median_of(|r| r["check_ms"].as_f64()),
            replay_ms = median_of(|r| r["file"]["replay_ms"].as_f64()),
            restore_ratio = restore / cp,
            backup_ratio = restore / backup_api,
            restored_mib = support::mib(restores.restored_bytes),
            tables = restores.rows_checked,
            transfers = self.transfers,
            failed = self.failed,
        );
        let rows = vec![
            Row::new(
                SECTION,
                "ledger cluster on SQLite, client throughput with `stillpoint archive` vs without",
                format!("{with:.0} transfers/s"),
                format!("{without:.0} transfers/s"),
                Some(ratio),
                Target::None,
            ),
            Row::new(
                SECTION,
                "archive lag under load p99 (p50) vs `chunk_interval`",
                format!("{lag_p99:.0} ms ({lag_p50:.0} ms)"),
                format!("{chunk_ms:.0} ms"),
                Some(lag_p99 / chunk_ms),
                Target::None,
            ),
            Row::new(
                SECTION,
                &format!(
                    "restore of a point ({:.1} MiB ledger) vs `cp` of the file",
                    support::mib(restores.file_bytes)
                ),
                format!("{restore:.0} ms"),
                format!("{cp:.1} ms"),
                Some(restore / cp),
                Target::None,
            ),
        ];
        (body, rows)
    }
}
