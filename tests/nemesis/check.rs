//! The checker: reads the whole history, the storage and the live databases after the
//! run and names every violation of what the service promises.
//!
//! - **lease**: a node is never seen paused more than a second past the end of the
//!   lease it last reported under that pause (the coordinator gone, cut off or slow,
//!   the node must reopen by itself);
//! - **partial**: every point is whole the moment it is listed (`watch.rs`): a
//!   restore asked for it then would find its base and its archive to the marker;
//! - **points**: every point drilled (a seeded sample and the newest) restores and
//!   passes `ledger-node check`, and `verify` finds every listed point's base and
//!   chunks whole and its chain without a gap;
//! - **gap**: a chunk deleted from storage (`lose_chunk`) is reported by `verify` in
//!   every point that needs it, and no point that needs it is listed after the loss;
//! - **lost audits**: a transfer in the live ledger and not in the live auditor exists
//!   only where a fault can make one (its ledger node or PostgreSQL killed between the
//!   commit and the record, around that kill): the reference ledger has no outbox, so
//!   the drills' check is told these (`--known-unaudited`), and only these;
//! - **clients**: a transfer fails only to a ledger node that was down, or whose
//!   database or auditor was, then or in the seconds after.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;

use serde_json::{Value, json};

use crate::env::Env;
use crate::faults::Rng;
use crate::history::History;
use crate::store::{self, Lost};

/// How long after a fault healed its effects may still show (reconnects, retries).
const AFTERMATH_MS: i64 = 10_000;

pub struct Violation {
    pub kind: &'static str,
    pub detail: String,
}

/// What was checked, for the summary.
#[derive(Default)]
pub struct Figures {
    pub points_listed: usize,
    pub points_drilled: usize,
    pub points_passed: usize,
    pub lost_audits: usize,
    pub failed_requests: usize,
    pub paused_samples: usize,
    pub points_seen: usize,
    /// Points a lost chunk broke, each failing `verify` as it must.
    pub gaps_reported: usize,
}

pub fn lease(lines: &[Value], violations: &mut Vec<Violation>) -> usize {
    // (node, boot, pause) → the latest end of lease the node reported.
    let mut deadlines: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    let mut reported = BTreeSet::new();
    let mut samples = 0;
    for line in lines.iter().filter(|line| line["event"] == "paused_sample") {
        samples += 1;
        let t = line["t"].as_i64().unwrap();
        let key = (
            line["node"].as_str().unwrap().to_owned(),
            line["boot_id"].as_str().unwrap().to_owned(),
            line["pause_id"].as_str().unwrap().to_owned(),
        );
        if let Some(deadline) = deadlines.get(&key)
            && t > deadline + 1000
            && reported.insert(key.clone())
        {
            violations.push(Violation {
                kind: "lease",
                detail: format!(
                    "{} was still paused (pause {}) {} ms after the end of its last lease",
                    key.0,
                    key.2,
                    t - deadline
                ),
            });
        }
        // A lease that ran out reads 0 (and moves nothing): the node should have
        // reopened then.
        let remaining = line["lease_remaining_ms"].as_i64().unwrap();
        if remaining > 0 {
            let deadline = deadlines.entry(key).or_insert(i64::MIN);
            *deadline = (*deadline).max(t + remaining);
        }
    }
    samples
}

/// The faults as intervals: (kind, target, start, end) in Unix ms.
fn fault_intervals(lines: &[Value]) -> Vec<(String, String, i64, i64)> {
    let mut open: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut intervals = Vec::new();
    for line in lines {
        let key = || {
            (
                line["kind"].as_str().unwrap().to_owned(),
                line["target"].as_str().unwrap().to_owned(),
            )
        };
        let t = line["t"].as_i64().unwrap();
        if line["event"] == "fault_start" {
            open.insert(key(), t);
        } else if line["event"] == "fault_end"
            && let Some(start) = open.remove(&key())
        {
            let (kind, target) = key();
            intervals.push((kind, target, start, t));
        }
    }
    intervals
}

/// Transfers in the live ledger that the live auditor never recorded; each must lie
/// at a kill of a ledger node or of PostgreSQL. Returns them, to be given to the drills.
pub fn lost_audits(env: &Env, lines: &[Value], violations: &mut Vec<Violation>) -> Vec<String> {
    let ledger = env.postgres.psql(
        "ledger",
        "SELECT tx_id || ' ' || committed_at_ms FROM ledger",
    );
    let audited: BTreeSet<String> = env
        .mariadb
        .sql("auditor", "SELECT tx_id FROM audit")
        .lines()
        .map(str::to_owned)
        .collect();
    let kills: Vec<(i64, i64)> = fault_intervals(lines)
        .into_iter()
        .filter(|(kind, ..)| kind == "kill_ledger_node" || kind == "kill_postgres")
        .map(|(_, _, start, _)| (start - 2000, start + 1000))
        .collect();
    let mut lost = Vec::new();
    for line in ledger.lines() {
        let Some((tx, committed)) = line.split_once(' ') else {
            continue;
        };
        if audited.contains(tx) {
            continue;
        }
        let committed: i64 = committed.parse().unwrap();
        if !kills
            .iter()
            .any(|(from, to)| (*from..=*to).contains(&committed))
        {
            violations.push(Violation {
                kind: "lost_audit",
                detail: format!(
                    "transfer {tx}, committed at {committed} ms, is in the ledger and not in \
                     the auditor, and no ledger node or PostgreSQL was killed then"
                ),
            });
        }
        lost.push(tx.to_owned());
    }
    lost
}

/// Failed transfers, each to the ledger node its load process sent it to, outside
/// every fault that takes that node down (with its aftermath).
pub fn clients(env: &Env, lines: &[Value], violations: &mut Vec<Violation>) -> usize {
    let intervals = fault_intervals(lines);
    let mut failed = 0;
    for k in 0..crate::env::LEDGER_NODES {
        let node = format!("ledger-{k}");
        let down: Vec<(i64, i64)> = intervals
            .iter()
            .filter(|(kind, target, ..)| {
                (kind == "kill_ledger_node" && *target == node)
                    || matches!(
                        kind.as_str(),
                        "kill_postgres" | "kill_mariadb" | "kill_auditor"
                    )
            })
            .map(|(_, _, start, end)| (*start, end + AFTERMATH_MS))
            .collect();
        let log = std::fs::read_to_string(env.dir.join(format!("load-{k}.log")))
            .unwrap_or_else(|e| panic!("the load's latency log of {node}: {e}"));
        let mut unexplained = Vec::new();
        for line in log.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(2) != Some(&"failed") {
                continue;
            }
            failed += 1;
            let start = fields[0].parse::<i64>().unwrap() / 1000;
            let end = start + fields[1].parse::<i64>().unwrap() / 1000;
            if !down.iter().any(|(from, to)| start <= *to && end >= *from) {
                unexplained.push(start);
            }
        }
        if let Some(first) = unexplained.first() {
            violations.push(Violation {
                kind: "client",
                detail: format!(
                    "{} transfer(s) to {node} failed while it, its database and its auditor \
                     were up (the first sent at {first} ms; see load-{k}.stderr)",
                    unexplained.len()
                ),
            });
        }
    }
    failed
}

/// Points that were partial when listed: the watcher (`watch.rs`) found something a
/// restore needs missing at once. Excused only when a `lose_chunk` fault struck
/// between the listing and the look (the verify rules below judge those points).
pub fn listing(lines: &[Value], violations: &mut Vec<Violation>) -> usize {
    let losses: Vec<i64> = lines
        .iter()
        .filter(|line| line["event"] == "fault_start" && line["kind"] == "lose_chunk")
        .map(|line| line["t"].as_i64().unwrap())
        .collect();
    let mut seen = 0;
    for line in lines.iter().filter(|line| line["event"] == "point_seen") {
        seen += 1;
        let problems = line["problems"].as_array().unwrap();
        let (listed, looked) = (
            line["listed_ms"].as_i64().unwrap(),
            line["t"].as_i64().unwrap(),
        );
        if problems.is_empty() || losses.iter().any(|t| (listed..=looked).contains(t)) {
            continue;
        }
        violations.push(Violation {
            kind: "partial",
            detail: format!(
                "point {} was listed at {listed} ms while a restore of it could not find \
                 what it needs ({looked} ms): {problems:?}",
                line["point_id"].as_str().unwrap()
            ),
        });
    }
    seen
}

/// `verify` of every listed point, judged against the chunks `lose_chunk` deleted: a
/// point that needs a lost chunk must fail verify (the gap reported), and must have
/// been listed before the loss (the gap check); every other point must verify. Then
/// `sample` points chosen with `seed` and the newest, among those no loss touched,
/// are drilled with a runbook whose check knows the lost audits.
#[allow(clippy::too_many_arguments)]
pub fn points(
    env: &Env,
    history: &History,
    lines: &[Value],
    seed: u64,
    sample: usize,
    lost_audits: &[String],
    violations: &mut Vec<Violation>,
    figures: &mut Figures,
) {
    let known = env.dir.join("known-unaudited.txt");
    std::fs::write(&known, lost_audits.join("\n")).unwrap();
    let runbook = std::fs::read_to_string(&env.runbook).unwrap().replace(
        "\"{auditor}\"]",
        &format!(
            "\"{{auditor}}\", \"--known-unaudited\", \"{}\"]",
            known.display()
        ),
    );
    let checking = env.dir.join("checking.toml");
    std::fs::write(&checking, runbook).unwrap();

    let (_, listed) = run_json(env, &["list", "--output", "json"], &checking);
    let ids: Vec<String> = listed["points"]["points"]
        .as_array()
        .map(|points| {
            points
                .iter()
                .filter_map(|point| point["point_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    figures.points_listed = ids.len();
    history.log("points_listed", json!({ "count": ids.len() }));
    if ids.is_empty() {
        violations.push(Violation {
            kind: "points",
            detail: "the run listed no point at all".to_owned(),
        });
        return;
    }

    // Each point's manifest, and when its manifest was stored (listed): to the second
    // on moto_server, so a loss within the second before a listing counts as after it.
    let (storage, _) = store::open(&env.runbook);
    let (manifests, listed_at) = store::runtime().block_on(async {
        let (manifests, _) = stillpoint::points::list_points(&storage).await.unwrap();
        let listed_at: BTreeMap<String, i64> = storage
            .list(stillpoint::points::POINTS_DIR)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|entry| {
                let id = entry.path.split('/').nth(1)?.to_owned();
                Some((id, entry.last_modified.timestamp_millis()))
            })
            .collect();
        (manifests, listed_at)
    });
    let losses: Vec<(i64, Lost)> = lines
        .iter()
        .filter(|line| line["event"] == "fault_start" && line["kind"] == "lose_chunk")
        .map(|line| {
            let lost = serde_json::from_value(line["lost"].clone()).unwrap();
            (line["t"].as_i64().unwrap(), lost)
        })
        .collect();
    let needs_lost = |id: &str| -> Vec<&(i64, Lost)> {
        let Some(point) = manifests.iter().find(|point| point.point_id == id) else {
            return Vec::new();
        };
        losses
            .iter()
            .filter(|(_, lost)| store::needs_lost(point, lost))
            .collect()
    };

    let (code, verified) = run_json(env, &["verify", "--output", "json"], &checking);
    history.log("verify", json!({ "exit": code, "ok": verified["ok"] }));
    if verified["points"].as_array().is_none() {
        violations.push(Violation {
            kind: "verify",
            detail: format!("verify did not report on the points (exit {code}): {verified}"),
        });
    }
    for point in verified["points"].as_array().into_iter().flatten() {
        let id = point["point_id"].as_str().unwrap_or_default();
        let lost = needs_lost(id);
        let listed = listed_at.get(id).copied().unwrap_or(i64::MAX);
        for (when, chunk) in &lost {
            if *when < listed {
                violations.push(Violation {
                    kind: "gap",
                    detail: format!(
                        "point {id} was listed at {listed} ms although chunk {} of {} was \
                         lost at {when} ms, and a restore of it needs that chunk",
                        chunk.chunk, chunk.database
                    ),
                });
            }
        }
        match (point["ok"] == true, lost.first()) {
            (true, None) => {}
            (false, None) => violations.push(Violation {
                kind: "verify",
                detail: format!("verify finds a listed point unrestorable: {point}"),
            }),
            (true, Some((_, chunk))) => violations.push(Violation {
                kind: "gap",
                detail: format!(
                    "verify passes point {id}, whose restore needs chunk {} of {}, which \
                     was deleted: the gap is not reported",
                    chunk.chunk, chunk.database
                ),
            }),
            (false, Some(_)) => figures.gaps_reported += 1,
        }
    }
    for damaged in verified["damaged_points"].as_array().into_iter().flatten() {
        violations.push(Violation {
            kind: "verify",
            detail: format!("a point's manifest cannot be read: {damaged}"),
        });
    }

    // A seeded sample, and the newest, of the points no lost chunk broke.
    let whole: Vec<&String> = ids.iter().filter(|id| needs_lost(id).is_empty()).collect();
    let Some(newest) = whole.len().checked_sub(1) else {
        return;
    };
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut chosen = BTreeSet::from([newest]);
    while chosen.len() < (sample + 1).min(whole.len()) {
        chosen.insert(rng.between(0, whole.len() as u64 - 1) as usize);
    }
    for index in chosen {
        let id = whole[index];
        let (code, drill) = run_json(
            env,
            &["drill", "--point", id, "--output", "json"],
            &checking,
        );
        let passed = code == 0
            && drill["checks"]
                .as_array()
                .is_some_and(|checks| checks.iter().all(|check| check["ok"] == true));
        history.log(
            "drill",
            json!({ "point_id": id, "ok": passed, "report": drill }),
        );
        figures.points_drilled += 1;
        if passed {
            figures.points_passed += 1;
        } else {
            violations.push(Violation {
                kind: "points",
                detail: format!("point {id} failed its drill: {drill}"),
            });
        }
    }
}

/// Runs `stillpoint <args> --config <runbook>`: its exit code and JSON output.
fn run_json(env: &Env, args: &[&str], runbook: &Path) -> (i32, Value) {
    let output = env
        .stillpoint()
        .args(args)
        .arg("--config")
        .arg(runbook)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let code = output.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| json!({ "stderr": String::from_utf8_lossy(&output.stderr) }));
    (code, json)
}
