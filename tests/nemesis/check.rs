//! The checker: reads the whole history, the storage and the live databases after the
//! run and names every violation of what the service promises.
//!
//! - **lease**: a node is never seen paused more than a second past the end of the
//!   lease it last reported under that pause (the coordinator gone, cut off or slow,
//!   the node must reopen by itself);
//! - **points**: every point drilled (a seeded sample and the newest) restores and
//!   passes `ledger-node check`, and `verify` finds every listed point's base and
//!   chunks whole and its chain without a gap;
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

/// Drills `sample` points chosen with `seed` and the newest, with a runbook whose
/// check knows the lost audits; then `verify` of every point.
pub fn points(
    env: &Env,
    history: &History,
    seed: u64,
    sample: usize,
    lost: &[String],
    violations: &mut Vec<Violation>,
    figures: &mut Figures,
) {
    let known = env.dir.join("known-unaudited.txt");
    std::fs::write(&known, lost.join("\n")).unwrap();
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
    // A seeded sample, and the newest always.
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut chosen = BTreeSet::from([ids.len() - 1]);
    while chosen.len() < (sample + 1).min(ids.len()) {
        chosen.insert(rng.between(0, ids.len() as u64 - 1) as usize);
    }
    for index in chosen {
        let id = &ids[index];
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
                detail: format!("point {id} (listed #{index}) failed its drill: {drill}"),
            });
        }
    }
    let (code, verified) = run_json(env, &["verify", "--output", "json"], &checking);
    history.log("verify", json!({ "exit": code, "ok": verified["ok"] }));
    if verified["points"].as_array().is_none() {
        violations.push(Violation {
            kind: "verify",
            detail: format!("verify did not report on the points (exit {code}): {verified}"),
        });
    }
    for point in verified["points"].as_array().into_iter().flatten() {
        if point["ok"] != true {
            violations.push(Violation {
                kind: "verify",
                detail: format!("verify finds a listed point unrestorable: {point}"),
            });
        }
    }
    for damaged in verified["damaged_points"].as_array().into_iter().flatten() {
        violations.push(Violation {
            kind: "verify",
            detail: format!("a point's manifest cannot be read: {damaged}"),
        });
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
