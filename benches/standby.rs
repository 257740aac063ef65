//! Standby lag under load (issue 14): the reference ledger cluster (3 ledger nodes on
//! PostgreSQL, the auditor on MariaDB with a dump base) under `ledger-node load`,
//! archived by `stillpoint archive`, a point every `POINT_EVERY`, and `stillpoint
//! standby` following it into a PostgreSQL standby server and a MariaDB database.
//!
//! Sampled every `SAMPLE_EVERY` from `stillpoint standby status --output json`: the
//! standby's lag = now − the time of the newest point every standby database has
//! passed (what a failover at that instant would lose beyond the failure itself).
//! The baseline is the point interval: a standby that moved to each point the
//! instant it was taken would still lag between 0 and one interval behind (plus the
//! point's own pause-to-commit time), so p99 / interval near 1 is the best a standby
//! at points can do, and what more it adds is the standby's own cost (a restart of the
//! PostgreSQL server and a binlog apply per point).
//!
//! Run: `scripts/bench standby`, or `cargo bench --bench standby [-- --quick]` after
//! `cargo build --profile bench -p stillpoint-cli -p stillpoint-ledger`.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stillpoint_testkit::{DetachedPostgres, MariaDb, Postgres, PostgresOptions, free_port};
use support::{Flags, Process, Row, Target, median, percentile};

const SECTION: &str = "8. standby";
const COMMAND: &str = "scripts/bench standby";
const LEDGERS: usize = 3;
const LOAD_CONCURRENCY: usize = 8;
const POINT_EVERY: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn stillpoint(args: &[&str]) -> serde_json::Value {
    let output = Command::new(support::workspace_binary("stillpoint"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "stillpoint {args:?} failed");
    serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
}

/// A long-running child whose output goes nowhere (a piped stdout nobody reads
/// would fill and block it), killed and reaped when dropped.
struct Quiet(std::process::Child);

impl Quiet {
    fn spawn(command: &mut Command) -> Quiet {
        Quiet(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}")),
        )
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

fn main() {
    let flags = Flags::parse();
    let duration = if flags.quick {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(180)
    };
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
    postgres.create_database("ledger");
    let mariadb = MariaDb::start();
    mariadb.create_database("auditor");
    let node = support::workspace_binary("ledger-node");
    let (_auditor, auditor) = Process::spawn_listening(Command::new(&node).args([
        "serve",
        "--role",
        "auditor",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &mariadb.url("auditor"),
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
        ]));
        ledgers.push(address);
        _ledger_processes.push(process);
    }
    let quoted = |addresses: &[String]| {
        addresses
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let storage = dir.path().join("storage");
    let primary = dir.path().join("primary.toml");
    std::fs::write(
        &primary,
        format!(
            r#"cluster = "bench-standby"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = [{auditor}] }}]
[[databases]]
name = "ledger"
adapter = "postgres"
url = "{ledger_db}"
bin_dir = "{pg_bin}"
archive = true
[[databases]]
name = "auditor"
adapter = "mariadb"
url = "{auditor_db}"
bin_dir = "{mariadb_bin}"
archive = true
base_method = "dump"
[storage]
url = "file://{storage}"
[archive]
spool_dir = "{spool}"
"#,
            ledgers = quoted(&ledgers),
            auditor = quoted(std::slice::from_ref(&auditor)),
            ledger_db = postgres.url("ledger"),
            pg_bin = postgres.bin_dir().display(),
            auditor_db = mariadb.url("auditor"),
            mariadb_bin = mariadb.bin_dir().display(),
            storage = storage.display(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let primary = primary.to_str().unwrap();
    let _archiver = Quiet::spawn(
        Command::new(support::workspace_binary("stillpoint"))
            .args(["archive", "--config", primary]),
    );
    let _load = Process::spawn(Command::new(&node).args([
        "load",
        "--targets",
        &ledgers.join(","),
        "--concurrency",
        &LOAD_CONCURRENCY.to_string(),
        "--duration",
        "60m",
        "--output",
        "json",
    ]));
    std::thread::sleep(Duration::from_secs(3));
    stillpoint(&["base-backup", "--config", primary, "--output", "json"]);

    let standby_mariadb = MariaDb::start();
    standby_mariadb.create_database("auditor");
    let port = free_port();
    let data_dir = dir.path().join("standby-ledger");
    // `stillpoint standby` starts it detached, to outlive the follower.
    let _server = DetachedPostgres::new(&data_dir, postgres.bin_dir());
    let standby = dir.path().join("standby.toml");
    std::fs::write(
        &standby,
        format!(
            r#"cluster = "bench-standby-site"
[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]
[[databases]]
name = "ledger"
adapter = "postgres"
url = "postgres://postgres@127.0.0.1:{port}/ledger"
bin_dir = "{pg_bin}"
[[databases]]
name = "auditor"
adapter = "mariadb"
url = "{auditor_db}"
bin_dir = "{mariadb_bin}"
[storage]
url = "file://{storage}"
[standby]
dir = "{state}"
interval = "500ms"
[standby.postgres.ledger]
data_dir = "{data_dir}"
port = {port}
"#,
            pg_bin = postgres.bin_dir().display(),
            auditor_db = standby_mariadb.url("auditor"),
            mariadb_bin = standby_mariadb.bin_dir().display(),
            storage = storage.display(),
            state = dir.path().join("standby-state").display(),
            data_dir = data_dir.display(),
        ),
    )
    .unwrap();
    let standby = standby.to_str().unwrap();

    let point = || stillpoint(&["point", "--config", primary, "--output", "json"]);
    point();
    let _follower = Quiet::spawn(
        Command::new(support::workspace_binary("stillpoint"))
            .args(["standby", "--config", standby, "--output", "json"]),
    );
    // Until the standby has passed its first point (the seed: a base extracted).
    let seeded = Instant::now();
    while
        stillpoint(&["standby", "status", "--config", standby, "--output", "json"])["common_point"]
            .is_null()
    {
        assert!(
            seeded.elapsed() < Duration::from_secs(300),
            "the standby was not seeded within 5 minutes"
        );
        std::thread::sleep(SAMPLE_EVERY);
    }
    let seed_s = seeded.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut next_point = started;
    let mut lags = Vec::new();
    let mut points = 0;
    while started.elapsed() < duration {
        if Instant::now() >= next_point {
            point();
            points += 1;
            next_point += POINT_EVERY;
        }
        let status = stillpoint(&["standby", "status", "--config", standby, "--output", "json"]);
        if let Some(time) = status["common_point"]["time_ms"].as_i64() {
            lags.push((now_ms() - time) as f64);
        }
        std::thread::sleep(SAMPLE_EVERY);
    }

    let interval_ms = POINT_EVERY.as_millis() as f64;
    let (p50, p99) = (median(&lags), percentile(&lags, 99.0));
    let body = format!(
        "{}\n\n| measure | value |\n|---|---|\n\
         | points taken (one every {} s) | {points} |\n\
         | lag samples (every {} ms) | {} |\n\
         | standby lag p50 (now − newest point every standby database passed) | {p50:.0} ms |\n\
         | standby lag p99 | {p99:.0} ms |\n\
         | baseline: the point interval | {interval_ms:.0} ms |\n\
         | p99 / interval | **{:.2}×** |\n\
         | seeding (base extracted, replayed to the first point) | {seed_s:.1} s |",
        support::measured_line(COMMAND),
        POINT_EVERY.as_secs(),
        SAMPLE_EVERY.as_millis(),
        lags.len(),
        p99 / interval_ms,
    );
    let rows = vec![Row::new(
        SECTION,
        "standby lag under load p99 (p50) vs the point interval",
        format!("{p99:.0} ms (p50 {p50:.0} ms)"),
        format!("{interval_ms:.0} ms"),
        Some(p99 / interval_ms),
        Target::None,
    )];
    flags.publish("standby-lag", &body, &rows);
}
