//! `stillpoint serve` as an operator runs it: the reference cluster (ledger on
//! PostgreSQL, auditor on MariaDB) under load, the service archiving both, taking a
//! base backup at start and a point every 5 s by its `[schedule]`. The API lists the
//! points, `/metrics` (parsed by Python's prometheus_client, as Prometheus would)
//! shows them and an archive lag under 5 s, the status page in headless Chromium
//! draws them on its timeline, and a drill the API triggers passes
//! `ledger-node check`. SIGTERM in the middle of a point's pause: the service
//! releases the nodes itself (long before their lease), exits 0, and after a restart
//! the schedule goes on with every point listed once; a point asked for through the API
//! while a scheduled one holds the pause waits for it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stillpoint_testkit::{MariaDb, Postgres, PostgresOptions, rendered_dom};

use crate::cluster::{Cluster, Load};
use crate::util::{Process, bin, paused_flags, wait_until};

const OPERATOR: &str = "operator-token-0123456789abcdef";
const OBSERVER: &str = "observer-token-0123456789abcdef";

struct Setup {
    _postgres: Postgres,
    _mariadb: MariaDb,
    cluster: Cluster,
    dir: tempfile::TempDir,
    runbook: PathBuf,
}

impl Setup {
    /// `pause`: extra `[pause]` keys.
    fn start(pause: &str) -> Setup {
        let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
        postgres.create_database("ledger");
        let mariadb = MariaDb::start();
        mariadb.create_database("auditor");
        let cluster = Cluster::start_on(
            2,
            postgres.url("ledger"),
            mariadb.url("auditor"),
            &[],
            tempfile::tempdir().unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        // Drills' scratch servers run as `postgres` and read what is staged under it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for (name, token) in [("operator.token", OPERATOR), ("observer.token", OBSERVER)] {
            let path = dir.path().join(name);
            std::fs::write(&path, token).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let runbook = dir.path().join("runbook.toml");
        let text = format!(
            r#"
cluster = "serve-test"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
{pause}
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
[storage]
url = "file://{storage}"
[archive]
partial_interval = "200ms"
chunk_interval = "200ms"
spool_dir = "{spool}"
[schedule]
point = "*/5 * * * * *"
[drill]
scratch_dir = "{scratch}"
[[drill.checks]]
name = "ledger_node_check"
command = ["ledger-node", "check", "--ledger-db", "{{ledger}}", "--auditor-db", "{{auditor}}"]
"#,
            ledgers = cluster
                .ledgers
                .iter()
                .map(|node| format!("\"{}\"", node.address))
                .collect::<Vec<_>>()
                .join(", "),
            auditor = cluster.auditor.address,
            ledger_db = postgres.url("ledger"),
            pg_bin = postgres.bin_dir().display(),
            auditor_db = mariadb.url("auditor"),
            mariadb_bin = mariadb.bin_dir().display(),
            storage = dir.path().join("storage").display(),
            spool = dir.path().join("spool").display(),
            scratch = dir.path().display(),
        );
        std::fs::write(&runbook, text).unwrap();
        Setup {
            _postgres: postgres,
            _mariadb: mariadb,
            cluster,
            dir,
            runbook,
        }
    }

    /// Starts `stillpoint serve` on a free port; returns it and its address.
    fn serve(&self) -> (Process, String) {
        let ours = bin("ledger-node").parent().unwrap().display().to_string();
        let path = format!("{ours}:{}", std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new(bin("stillpoint"))
            .args(["serve", "--config"])
            .arg(&self.runbook)
            .args(["--listen", "127.0.0.1:0", "--token-file"])
            .arg(self.dir.path().join("operator.token"))
            .arg("--observer-token-file")
            .arg(self.dir.path().join("observer.token"))
            // The status page is loaded by a browser, which sends no token.
            .arg("--public-status")
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The first line names the address; the rest is logged to a file for a failure.
        let mut stderr = child.stderr.take().unwrap();
        let log = self.dir.path().join("serve.log");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            let mut buffer = [0u8; 4096];
            let mut first = Vec::new();
            let mut sent = false;
            while let Ok(read) = stderr.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                let _ = file.write_all(&buffer[..read]);
                if !sent {
                    first.extend_from_slice(&buffer[..read]);
                    if first.contains(&b'\n') {
                        let _ = sender.send(String::from_utf8_lossy(&first).into_owned());
                        sent = true;
                    }
                }
            }
        });
        let line = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("serve printed where it listens");
        let address = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        let mut service = Process::new(child, "stillpoint serve".to_owned());
        wait_until(Duration::from_secs(60), "serve to be ready", || {
            assert!(!service.has_exited(), "serve exited:\n{}", self.log());
            try_http(&address, "GET", "/readyz", None, "").is_ok_and(|(status, _)| status == 200)
        });
        (service, address)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }
}

/// One HTTP/1.1 request; the status and the body.
fn http(address: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    try_http(address, method, path, token, body)
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
}

fn try_http(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token.map_or(String::new(), |token| {
        format!("Authorization: Bearer {token}\r\n")
    });
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn get_json(address: &str, path: &str, token: &str) -> Value {
    let (status, body) = http(address, "GET", path, Some(token), "");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|error| panic!("GET {path}: {error}: {body}"))
}

fn point_ids(address: &str) -> Vec<String> {
    get_json(address, "/api/v1/points", OBSERVER)["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| point["point_id"].as_str().unwrap().to_owned())
        .collect()
}

/// `/metrics` as Prometheus reads it: parsed by prometheus_client's OpenMetrics
/// parser (a document it rejects fails the test), as `{name: [[labels, value]]}`.
fn scraped_metrics(address: &str) -> Value {
    let (status, text) = http(address, "GET", "/metrics", Some(OBSERVER), "");
    assert_eq!(status, 200, "{text}");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        out.setdefault(sample.name, []).append([sample.labels, sample.value])
print(json.dumps(out))
"#;
    let mut python = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    python
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "prometheus_client could not parse /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn sample(metrics: &Value, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    metrics[name].as_array()?.iter().find_map(|sample| {
        let matches = label.is_none_or(|(key, value)| sample[0][key] == value);
        matches.then(|| sample[1].as_f64()).flatten()
    })
}

/// Waits for a job the API started to end; its record.
fn wait_for_job(address: &str, job_id: &str, within: Duration) -> Value {
    let mut record = Value::Null;
    wait_until(within, &format!("job {job_id} to end"), || {
        record = get_json(address, &format!("/api/v1/jobs/{job_id}"), OBSERVER);
        !matches!(record["state"].as_str(), Some("queued" | "running"))
    });
    record
}

#[test]
fn serve_takes_points_every_5s_under_load_and_shows_them_in_the_api_and_metrics() {
    let setup = Setup::start("");
    let load = Load::start(&setup.cluster.ledger_tier(), 4, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || setup.cluster.transactions() >= 20,
    );
    let (service, address) = setup.serve();
    let started = Instant::now();

    // Tokens: none is 401, an observer may read but not trigger (403).
    let (status, body) = http(&address, "GET", "/api/v1/points", None, "");
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(
        &address,
        "POST",
        "/api/v1/jobs",
        Some(OBSERVER),
        r#"{"kind":"point"}"#,
    );
    assert_eq!(status, 403, "{body}");

    // A base backup at start (the storage had none), then a point every 5 s.
    wait_until(Duration::from_secs(150), "10 points to be listed", || {
        point_ids(&address).len() >= 10
    });
    eprintln!(
        "10 points listed {:.0}s after the start",
        started.elapsed().as_secs_f64()
    );
    let jobs = get_json(&address, "/api/v1/jobs?limit=500", OBSERVER);
    let jobs = jobs["jobs"].as_array().unwrap();
    assert!(
        jobs.iter()
            .any(|job| job["kind"] == "base_backup" && job["state"] == "succeeded"),
        "no base backup at start: {jobs:?}\n{}",
        setup.log()
    );

    let metrics = scraped_metrics(&address);
    let listed = sample(&metrics, "stillpoint_points_restorable", None).unwrap();
    assert!(listed >= 10.0, "{metrics}");
    let newest = sample(&metrics, "stillpoint_newest_point_timestamp_seconds", None).unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        now - newest < 30.0,
        "the newest point is {}s old",
        now - newest
    );
    for database in ["ledger", "auditor"] {
        let lag = sample(
            &metrics,
            "stillpoint_archive_lag_seconds",
            Some(("database", database)),
        )
        .unwrap_or_else(|| panic!("no archive lag for {database}: {metrics}"));
        assert!(lag < 5.0, "{database}'s archive lags {lag}s");
        assert_eq!(
            sample(
                &metrics,
                "stillpoint_archiver_up",
                Some(("database", database))
            ),
            Some(1.0),
            "{metrics}"
        );
    }
    assert!(
        sample(
            &metrics,
            "stillpoint_job_successes_total",
            Some(("kind", "point"))
        )
        .unwrap()
            >= 10.0,
        "{metrics}"
    );

    // The status page in a browser: its timeline's marks stand for every point listed
    // (dense points share a mark, which says how many it stands for).
    let listed = point_ids(&address).len();
    let dom = rendered_dom(
        &format!("http://{address}/"),
        &setup.dir.path().join("chromium"),
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", setup.log()));
    let marked: usize = dom
        .match_indices("<circle class=\"point")
        .map(|(start, _)| {
            let tag = &dom[start..start + dom[start..].find('>').unwrap()];
            let count = tag.split("data-count=\"").nth(1).unwrap();
            count[..count.find('"').unwrap()].parse::<usize>().unwrap()
        })
        .sum();
    assert!(
        marked >= 10 && marked <= listed + 2,
        "the timeline marks {marked} points; the API listed {listed}"
    );

    // A drill the API asks for restores the newest point and passes ledger-node check.
    let (status, body) = http(
        &address,
        "POST",
        "/api/v1/jobs",
        Some(OPERATOR),
        r#"{"kind":"drill"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap();
    let record = wait_for_job(
        &address,
        job["job_id"].as_str().unwrap(),
        Duration::from_secs(180),
    );
    assert_eq!(record["state"], "succeeded", "{record}\n{}", setup.log());
    assert_eq!(record["result"]["ok"], true, "{record}");
    let metrics = scraped_metrics(&address);
    assert_eq!(
        sample(&metrics, "stillpoint_drill_last_result", None),
        Some(1.0)
    );

    load.stop();
    service.signal("TERM");
    let output = service.wait_output(Duration::from_secs(60));
    assert!(output.status.success(), "{}", setup.log());
}

#[test]
fn sigterm_during_a_scheduled_points_pause_releases_the_nodes_and_a_restart_goes_on() {
    // Every point holds its pause for 4 s: long enough to send SIGTERM inside it. The
    // lease is 60 s: nodes unpaused within a few seconds were released by the service.
    let setup = Setup::start("lease = \"60s\"\nmin_window = \"4s\"");
    let load = Load::start(&setup.cluster.ledger_tier(), 2, &[]);
    let (service, address) = setup.serve();
    let nodes = format!(
        "{},{}",
        setup.cluster.ledger_tier(),
        setup.cluster.auditor.address
    );
    wait_until(Duration::from_secs(150), "2 points to be listed", || {
        point_ids(&address).len() >= 2
    });
    wait_until(Duration::from_secs(30), "a point's pause", || {
        paused_flags(&nodes).iter().all(|paused| *paused)
    });
    let signalled = Instant::now();
    service.signal("TERM");
    wait_until(Duration::from_secs(10), "every node to be released", || {
        paused_flags(&nodes).iter().all(|paused| !paused)
    });
    let released_in = signalled.elapsed();
    eprintln!("released {} ms after SIGTERM", released_in.as_millis());
    assert!(released_in < Duration::from_secs(10), "{released_in:?}");
    let output = service.wait_output(Duration::from_secs(60));
    assert!(
        output.status.success(),
        "exit: {:?}\n{}",
        output.status,
        setup.log()
    );

    let storage = setup.dir.path().join("storage");
    let listed_before = std::fs::read_dir(storage.join("points")).unwrap().count();

    // Restarted: it reads back what is there, and the schedule goes on.
    let (service, address) = setup.serve();
    let before = point_ids(&address);
    assert_eq!(before.len(), listed_before, "{before:?}");
    wait_until(
        Duration::from_secs(60),
        "new points after the restart",
        || point_ids(&address).len() >= before.len() + 2,
    );

    // Never two pauses at once: a point asked for while a scheduled one holds the
    // pause waits for it, and says so.
    wait_until(Duration::from_secs(30), "a point's pause", || {
        paused_flags(&nodes).iter().all(|paused| *paused)
    });
    let (status, body) = http(
        &address,
        "POST",
        "/api/v1/jobs",
        Some(OPERATOR),
        r#"{"kind":"point"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap();
    let record = wait_for_job(
        &address,
        job["job_id"].as_str().unwrap(),
        Duration::from_secs(60),
    );
    assert_eq!(record["state"], "succeeded", "{record}");
    let note = record["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("waited for job") && note.contains("(point)"),
        "{record}"
    );

    let after = point_ids(&address);
    let mut unique = after.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), after.len(), "a point listed twice: {after:?}");
    assert!(
        before.iter().all(|id| after.contains(id)),
        "a point was lost: {before:?} → {after:?}"
    );
    // The interrupted point left a record saying so, and no point.
    let jobs = get_json(&address, "/api/v1/jobs?limit=500", OBSERVER);
    assert!(
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|job| job["kind"] == "point" && job["state"] == "cancelled"),
        "{jobs}"
    );
    load.stop();
    service.signal("TERM");
    let output = service.wait_output(Duration::from_secs(60));
    assert!(output.status.success(), "{}", setup.log());
}
