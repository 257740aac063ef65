//! Change-record export (issue 14): `stillpoint changes` between two points vs
//! `mariadb-binlog --verbose` decoding the same binlog.
//!
//! One throwaway MariaDB (binlog_row_metadata = FULL) with a table of mixed columns,
//! archived by `stillpoint archive` (the CLI, `chunk_interval = "200ms"`, zstd), one
//! in-process admin node as the cluster to pause. Point A; then inserts (1,000 rows a
//! transaction), updates of every second row and deletes of every fifth, from
//! MariaDB's sequence engine; point B. Then, alternating, medians:
//!
//! - ours: `stillpoint changes --from A --to B --format jsonl` as a process, its
//!   records read from its stdout and counted: the whole command, fetching the
//!   chunks from the storage (read, checksum, zstd) and reassembling the files
//!   included;
//! - baseline: `mariadb-binlog --verbose --base64-output=DECODE-ROWS` with the same
//!   start and stop positions on the same files, already reassembled from the same
//!   chunks (`archive::mariadb::fetch_range`), its `### INSERT/UPDATE/DELETE` lines
//!   counted. DECODE-ROWS prints the rows only (no base64 BINLOG statements): the
//!   lighter of its outputs.
//!
//! Both must count the same rows (each a check of the other). MB/s is of the binlog
//! between the two markers.
//!
//! Run: `scripts/bench changes`, or `cargo bench --bench changes [-- --quick]` after
//! `cargo build --profile bench -p stillpoint-cli`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stillpoint::archive::{Archive, Position};
use stillpoint::pipeline::{Decryption, PipelineSettings};
use stillpoint::storage::Storage;
use stillpoint_testkit::MariaDb;
use support::{Flags, Row, Target, median};
use tokio_util::sync::CancellationToken;

const COMMAND: &str = "scripts/bench changes";
const SECTION: &str = "9. changes";
const DATABASE: &str = "shop";

fn main() {
    let flags = Flags::parse();
    let (rows, runs) = if flags.quick {
        (20_000u64, 1)
    } else {
        (200_000u64, 3)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let (nodes, servers) = runtime.block_on(support::start_admin_nodes(1, shutdown.clone()));

    let server = MariaDb::start();
    server.create_database(DATABASE);
    server.sql(
        DATABASE,
        "CREATE TABLE items (
             id BIGINT PRIMARY KEY, qty INT NOT NULL, price DECIMAL(12,2) NOT NULL,
             name VARCHAR(64) NOT NULL, note TEXT NULL, at DATETIME(3) NOT NULL
         ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    );
    let dir = tempfile::tempdir().unwrap();
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"
cluster = "changes-bench"
[pause]
tiers = [{{ addresses = ["{node}"] }}]
[[databases]]
name = "{DATABASE}"
adapter = "mariadb"
url = "{url}"
bin_dir = "{bin}"
archive = true
base_method = "dump"
[storage]
url = "file://{storage}"
[archive]
chunk_interval = "200ms"
spool_dir = "{spool}"
"#,
            node = nodes[0],
            url = server.url(DATABASE),
            bin = server.bin_dir().display(),
            storage = dir.path().join("storage").display(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let config = runbook.to_str().unwrap();
    let mut archiver = Command::new(support::workspace_binary("stillpoint"))
        .args(["archive", "--config", config])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    stillpoint_json(&["base-backup", "--config", config]);
    let a = stillpoint_json(&["point", "--config", config, "--wait", "120s"]);
    let generating = Instant::now();
    let batch = 1_000;
    for start in (1..=rows).step_by(batch) {
        let end = (start + batch as u64 - 1).min(rows);
        server.sql(
            DATABASE,
            &format!(
                "INSERT INTO items SELECT seq, seq % 1000, seq / 100, concat('item ', seq),
                     IF(seq % 3 = 0, NULL, md5(seq)), '2026-11-30 12:00:00.123'
                 FROM seq_{start}_to_{end};
                 UPDATE items SET qty = qty + 1, note = 'updated'
                     WHERE id BETWEEN {start} AND {end} AND id % 2 = 0;
                 DELETE FROM items WHERE id BETWEEN {start} AND {end} AND id % 5 = 0;"
            ),
        );
    }
    let expected = rows + rows / 2 + rows / 5;
    eprintln!(
        "generated {expected} row changes in {:.0?}",
        generating.elapsed()
    );
    let b = stillpoint_json(&["point", "--config", config, "--wait", "120s"]);
    let _ = Command::new("kill")
        .args(["-TERM", &archiver.id().to_string()])
        .status();
    let _ = archiver.wait();
    let (a_id, b_id) = (
        a["point_id"].as_str().unwrap().to_owned(),
        b["point_id"].as_str().unwrap().to_owned(),
    );
    let target = |point: &Value| -> Position {
        serde_json::from_value(point["databases"][0]["target"].clone()).unwrap()
    };
    let (from, to) = (target(&a), target(&b));

    // The baseline's files: the same chunks, reassembled by the same code.
    let storage =
        Storage::open(&format!("file://{}", dir.path().join("storage").display())).unwrap();
    let archive = Archive::new(storage, PipelineSettings::default(), DATABASE).unwrap();
    let fetched = runtime
        .block_on(stillpoint::archive::mariadb::fetch_range(
            &archive,
            &Decryption::None,
            &from,
            &to,
            dir.path(),
        ))
        .unwrap();
    let files = fetched.paths();
    let (Some((_, from_offset)), Some((_, to_offset))) = (from.as_binlog(), to.as_binlog()) else {
        panic!("binlog markers");
    };
    let sizes: Vec<u64> = files
        .iter()
        .map(|(_, path)| std::fs::metadata(path).unwrap().len())
        .collect();
    let range_bytes = sizes.iter().sum::<u64>() - from_offset - (sizes.last().unwrap() - to_offset);

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        eprintln!("changes export, round {} of {runs}", run + 1);
        for mine in [run % 2 == 0, run % 2 == 1] {
            let (took, counted) = if mine {
                timed_lines(
                    Command::new(support::workspace_binary("stillpoint"))
                        .args(["changes", "--config", config, "--from", &a_id])
                        .args(["--to", &b_id, "--format", "jsonl"])
                        .arg("--work-dir")
                        .arg(dir.path())
                        .env("RUST_LOG", "warn"),
                    |_| true,
                )
            } else {
                timed_lines(
                    Command::new(server.bin_dir().join("mariadb-binlog"))
                        .args(["--no-defaults", "--verbose", "--base64-output=DECODE-ROWS"])
                        .arg(format!("--start-position={from_offset}"))
                        .arg(format!("--stop-position={to_offset}"))
                        .args(files.iter().map(|(_, path)| path)),
                    |line| {
                        line.starts_with("### INSERT INTO")
                            || line.starts_with("### UPDATE ")
                            || line.starts_with("### DELETE FROM")
                    },
                )
            };
            assert_eq!(
                counted,
                expected,
                "{} counted {counted} row changes, {expected} were made",
                if mine {
                    "stillpoint changes"
                } else {
                    "mariadb-binlog"
                }
            );
            if mine {
                ours.push(took.as_secs_f64());
            } else {
                theirs.push(took.as_secs_f64());
            }
        }
    }
    drop(fetched);
    shutdown.cancel();
    for server in servers {
        let _ = runtime.block_on(server);
    }

    let (ours_s, theirs_s) = (median(&ours), median(&theirs));
    let mb = range_bytes as f64 / 1e6;
    let rate = |seconds: f64| {
        format!(
            "{:.0} records/s ({:.1} MB/s)",
            expected as f64 / seconds,
            mb / seconds
        )
    };
    let ratio = theirs_s / ours_s;
    let body = format!(
        "{}\n\n\
         | | {expected} row changes, {mb:.1} MB of binlog between the points | time (median of {runs}) | throughput |\n\
         |---|---|---|---|\n\
         | ours: `stillpoint changes --format jsonl` (fetch from storage + decode + JSON) | | {ours_s:.2} s | {} |\n\
         | `mariadb-binlog --verbose --base64-output=DECODE-ROWS` (files already fetched) | | {theirs_s:.2} s | {} |\n\n\
         **Export throughput ours / mariadb-binlog: {ratio:.2}×** (above 1: ours is faster).",
        support::measured_line(COMMAND),
        rate(ours_s),
        rate(theirs_s),
    );
    let rows = [Row::new(
        SECTION,
        "export throughput: `stillpoint changes --format jsonl` (records/s, fetch included) vs \
         `mariadb-binlog --verbose` decoding the same chunks",
        rate(ours_s),
        rate(theirs_s),
        Some(ratio),
        Target::None,
    )];
    flags.publish("changes-bench", &body, &rows);
}

/// Runs `command` with its stdout read line by line; how long until it exited, and
/// how many lines `count` accepted.
fn timed_lines(command: &mut Command, count: impl Fn(&str) -> bool) -> (Duration, u64) {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let said = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut counted = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if count(&line.unwrap()) {
            counted += 1;
        }
    }
    let status = child.wait().unwrap();
    let took = started.elapsed();
    let said = said.join().unwrap();
    assert!(status.success(), "{command:?} failed ({status}): {said}");
    (took, counted)
}

fn stillpoint_json(args: &[&str]) -> Value {
    let output = Command::new(support::workspace_binary("stillpoint"))
        .args(args)
        .args(["--output", "json"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "stillpoint {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stillpoint {args:?}: {e}: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
