//! The status page as a browser renders it: the real `stillpoint serve` binary on a
//! free port, over a runbook whose storage already holds points, a backup, a base
//! backup and a drill's job record (written with the library's own types to the paths
//! the library reads), loaded in headless Chromium. The checks read the DOM Chromium
//! built, not the HTML the server sent: what an operator's browser would show.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use stillpoint::archive::base::{self, BaseRecord};
use stillpoint::archive::{Lsn, Position};
use stillpoint::coordinator::PauseReport;
use stillpoint::manifest::{self, Manifest, Timings};
use stillpoint::pipeline::ArtifactInfo;
use stillpoint::points::{PointManifest, PointTimings, point_path};
use stillpoint::runbook::JobKind;
use stillpoint::storage::Storage;
use stillpoint::time::Zone;
use stillpoint_service::jobs::JOBS_DIR;
use stillpoint_service::{JobRecord, JobState, Trigger};
use stillpoint_testkit::{rendered_dom, workspace_binary as bin};

/// How long the service may take to say where it listens, and Chromium to render.
const DEADLINE: Duration = Duration::from_secs(60);

/// A window of 10 ms whose mid-time is `at`, as a point or backup records it.
fn window(at: DateTime<Utc>) -> PauseReport {
    let mid = at.timestamp_millis();
    let mut window = PauseReport::unpaused(mid - 5, mid + 5, Zone::UTC);
    window.restore_point_timestamp_ms = Some(mid);
    window.window_ms = Some(10);
    window.window_valid = true;
    window
}

/// A committed point restoring at `at` (databases left out: the page lists points by
/// id and time only).
async fn put_point(storage: &Storage, at: DateTime<Utc>) -> String {
    let point_id = manifest::backup_id_at(at);
    let point = PointManifest {
        format: stillpoint::points::FORMAT,
        point_id: point_id.clone(),
        cluster: "page-test".to_owned(),
        window: window(at),
        exact: true,
        databases: Vec::new(),
        timings: PointTimings::default(),
        committed_at_ms: at.timestamp_millis(),
    };
    let json = serde_json::to_vec_pretty(&point).expect("a point manifest serializes");
    storage
        .put_atomic(&point_path(&point_id), json.into())
        .await
        .expect("write a point manifest");
    point_id
}

/// A committed backup (no artifact: an `exec` cut may make none) restoring at `at`.
async fn put_backup(storage: &Storage, at: DateTime<Utc>) -> String {
    let backup_id = manifest::backup_id_at(at);
    let backup = Manifest {
        manifest_version: manifest::MANIFEST_VERSION,
        backup_id: backup_id.clone(),
        cluster: "page-test".to_owned(),
        pause_id: "page-test-pause".to_owned(),
        created_at_ms: at.timestamp_millis(),
        window: window(at),
        databases: Vec::new(),
        tool_version: "test".to_owned(),
        status: manifest::STATUS_COMMITTED.to_owned(),
        timings: Timings {
            prepare_ms: 1,
            pause_ms: 10,
            cut_ms: 1,
            copy_ms: 1,
            total_ms: 13,
        },
        unsafe_no_pause: false,
    };
    manifest::write(storage, &backup)
        .await
        .expect("write a backup manifest");
    backup_id
}

async fn put_base(storage: &Storage, database: &str, at: DateTime<Utc>) {
    let id = at.format("%Y%m%dT%H%M%S%3fZ-b0b0").to_string();
    let record = BaseRecord {
        format: 1,
        id: id.clone(),
        database: database.to_owned(),
        adapter: "postgres".to_owned(),
        kind: "pg_basebackup_tar".to_owned(),
        start: Position::Lsn(Lsn(0x0100_0028)),
        end: Position::Lsn(Lsn(0x0100_0100)),
        timeline: Some(1),
        started_at_ms: at.timestamp_millis() - 2_000,
        finished_at_ms: at.timestamp_millis(),
        artifact: ArtifactInfo {
            path: format!("bases/{database}/{id}/base.tar"),
            size: 4096,
            stored_size: 2048,
            blake3: "0".repeat(64),
            compression: Some("zstd-3".to_owned()),
            encryption: None,
        },
        details: Default::default(),
    };
    base::write_record(storage, &record)
        .await
        .expect("write a base record");
}

/// A drill of `point_id` that passed, recorded the way the service keeps finished jobs.
async fn put_drill(storage: &Storage, point_id: &str, at: DateTime<Utc>) -> String {
    let job_id = format!("{}-drill-0badc0de", at.format("%Y%m%dT%H%M%S%.3fZ"));
    let record = JobRecord {
        job_id: job_id.clone(),
        kind: JobKind::Drill,
        // Asked by the API, not the schedule: a scheduled one would make the service
        // catch up on this morning's missed drill at start, and change the page.
        trigger: Trigger::Api,
        state: JobState::Succeeded,
        queued_at: at,
        started_at: Some(at),
        finished_at: Some(at + TimeDelta::seconds(40)),
        duration_ms: Some(40_000),
        result: Some(serde_json::json!({ "point_id": point_id, "ok": true })),
        error: None,
        note: None,
    };
    let json = serde_json::to_vec_pretty(&record).expect("a job record serializes");
    storage
        .put_atomic(&format!("{JOBS_DIR}{job_id}.json"), json.into())
        .await
        .expect("write a job record");
    job_id
}

/// `stillpoint serve`, killed when dropped.
struct Served {
    child: Child,
    url: String,
    /// Its stderr, line by line, from after the address.
    log: mpsc::Receiver<String>,
}

impl Served {
    /// What the service wrote since it said where it listens (for failure messages).
    fn log(&self) -> String {
        self.log.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `stillpoint serve` on a free port and reads the address it prints.
fn serve(runbook: &Path, token: &Path) -> Served {
    let mut child = Command::new(bin("stillpoint"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--public-status",
            "--config",
        ])
        .arg(runbook)
        .arg("--token-file")
        .arg(token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stillpoint serve");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (lines, received) = mpsc::channel();
    // Reads stderr to its end, so the service never blocks on a full pipe; the lines
    // go to the test until it stops listening.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = DEADLINE.saturating_sub(started.elapsed());
        match received.recv_timeout(left) {
            Ok(line) => {
                if let Some(url) = line
                    .strip_prefix("stillpoint serve: page-test on ")
                    .and_then(|rest| rest.split_whitespace().next())
                {
                    return Served {
                        child,
                        url: url.to_owned(),
                        log: received,
                    };
                }
                seen.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "stillpoint serve did not say where it listens within {DEADLINE:?}; its stderr:\n{}",
                    seen.join("\n")
                );
            }
        }
    }
}

/// Every start tag `<name …>` in `dom`, as its text.
fn tags<'a>(dom: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("<{name} ");
    dom.match_indices(&open)
        .map(|(start, _)| {
            let end = dom[start..].find('>').expect("a tag ends") + start;
            &dom[start..=end]
        })
        .collect()
}

/// The value of `attribute="…"` in a start tag.
fn attribute<'a>(tag: &'a str, attribute: &str) -> Option<&'a str> {
    let key = format!(" {attribute}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')? + start;
    Some(&tag[start..end])
}

/// The next time the cron `0 4 * * *` fires after `now`, in UTC.
fn next_four_oclock(now: DateTime<Utc>) -> DateTime<Utc> {
    let today = now
        .date_naive()
        .and_hms_opt(4, 0, 0)
        .expect("04:00 exists")
        .and_utc();
    if today > now {
        today
    } else {
        today + TimeDelta::days(1)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_the_last_day_databases_drill_and_schedule_in_a_browser() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage_dir = dir.path().join("storage");
    let storage =
        Storage::open(&format!("file://{}", storage_dir.display())).expect("open the storage");
    let now = Utc::now();

    // Four points inside the last day, far enough apart to get a mark each, and one
    // from 25 h ago that the timeline must leave out.
    let mut recent = Vec::new();
    for hours_ago in [23, 12, 1] {
        recent.push(put_point(&storage, now - TimeDelta::hours(hours_ago)).await);
    }
    recent.push(put_point(&storage, now - TimeDelta::minutes(10)).await);
    let too_old = put_point(&storage, now - TimeDelta::hours(25)).await;
    let backup = put_backup(&storage, now - TimeDelta::hours(6)).await;
    put_base(&storage, "ledger", now - TimeDelta::hours(20)).await;
    let newest_point = recent.last().expect("a recent point").clone();
    let drill = put_drill(&storage, &newest_point, now - TimeDelta::hours(2)).await;

    // One archived database whose server is not there (port 1 refuses): its row must
    // still show, with the archiver not streaming. Only daily and weekly jobs are
    // scheduled, so nothing runs during the test and the page holds still.
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"cluster = "page-test"

[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]

[[databases]]
name = "ledger"
adapter = "postgres"
url = "postgres://stillpoint@127.0.0.1:1/ledger"
archive = true

[storage]
url = "file://{}"

[archive]
spool_dir = "{}"

[schedule]
drill = "0 4 * * *"
verify = "0 5 * * 0"
"#,
            storage_dir.display(),
            // Not the default under the system's temporary directory, which would
            // outlive the test.
            dir.path().join("spool").display()
        ),
    )
    .expect("write the runbook");
    let token = dir.path().join("token");
    std::fs::write(&token, "a-test-token-of-enough-length-0123456789").expect("write the token");

    let served = serve(&runbook, &token);
    let dom = rendered_dom(&format!("{}/", served.url), &dir.path().join("chromium"))
        .unwrap_or_else(|error| panic!("{error}\nthe service's log:\n{}", served.log()));

    // The timeline: one circle per point of the last 24 h, none for the older one.
    let circles = tags(&dom, "circle");
    let mut drawn: Vec<&str> = circles
        .iter()
        .filter(|tag| attribute(tag, "class").is_some_and(|class| class.contains("point")))
        .filter_map(|tag| attribute(tag, "data-point-id"))
        .collect();
    drawn.sort_unstable();
    let mut expected: Vec<&str> = recent.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(drawn, expected, "the timeline's point marks");
    assert!(
        !dom.contains(&format!("data-point-id=\"{too_old}\"")),
        "the point from 25 h ago ({too_old}) is drawn"
    );
    assert!(
        dom.contains("<svg id=\"timeline\""),
        "the timeline is an inline svg"
    );
    let backups: Vec<&str> = tags(&dom, "polygon")
        .iter()
        .filter_map(|tag| attribute(tag, "data-backup-id"))
        .collect();
    assert_eq!(backups, [backup.as_str()], "the timeline's backup marks");

    // The summary counts every listed point, the old one too.
    assert!(
        dom.contains("<span id=\"points-count\">5</span>"),
        "the summary's point count"
    );

    // One row for the archived database: not streaming (nothing listens), its base.
    let rows = tags(&dom, "tr");
    let databases: Vec<&str> = rows
        .iter()
        .filter(|tag| attribute(tag, "class") == Some("database"))
        .filter_map(|tag| attribute(tag, "data-database"))
        .collect();
    assert_eq!(databases, ["ledger"], "the database rows");
    let ledger = rows
        .iter()
        .find(|tag| attribute(tag, "data-database") == Some("ledger"))
        .expect("the ledger row");
    assert_eq!(attribute(ledger, "data-streaming"), Some("false"));
    let row_start = dom.find(*ledger).expect("the ledger row in the dom");
    let row = &dom[row_start..row_start + dom[row_start..].find("</tr>").expect("row end")];
    assert!(
        row.contains("<td class=\"bases number\">1</td>"),
        "the ledger row counts its base backup: {row}"
    );

    // The last drill: passed, the point it drilled, a link to its job.
    let last_drill = tags(&dom, "div")
        .into_iter()
        .find(|tag| attribute(tag, "id") == Some("last-drill"))
        .expect("the last drill");
    assert_eq!(attribute(last_drill, "class"), Some("passed"));
    assert_eq!(attribute(last_drill, "data-job-id"), Some(drill.as_str()));
    assert!(dom.contains(&format!("<span class=\"drilled\">{newest_point}</span>")));
    assert!(dom.contains(&format!("href=\"/api/v1/jobs/{drill}\"")));

    // The schedule: the drill's next run is the next 04:00 UTC.
    let drill_row_start = dom
        .find("<tr class=\"entry\" data-kind=\"drill\">")
        .expect("the schedule's drill row");
    let drill_row = &dom[drill_row_start..];
    let next_run = tags(drill_row, "time")
        .first()
        .and_then(|tag| attribute(tag, "datetime"))
        .expect("the drill's next run");
    let expected_next =
        next_four_oclock(Utc::now()).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(next_run, expected_next, "the drill's next run");
    assert!(dom.contains("data-kind=\"verify\""), "the verify entry");

    // An open page stays current.
    assert!(dom.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
    drop(served);
}
