//! Pausing and releasing a real ledger + auditor cluster under load.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, Load, transfer};
use crate::util::{
    Process, bin, paused_flags, run, run_json, spawn_reading_stderr, stderr, wait_for_line,
    wait_until,
};

/// `stillpoint pause --keep-alive` in the background, renewing a `lease` lease.
fn keep_alive_pause(cluster: &Cluster, lease: &str, state_file: &std::path::Path) -> Process {
    let child = std::process::Command::new(bin("stillpoint"))
        .args([
            "pause",
            "--keep-alive",
            "--lease",
            lease,
            "--max-pause-wait",
            "1s",
            "--output",
            "json",
        ])
        .args(["-a", &cluster.ledger_tier(), "-a", &cluster.auditor.address])
        .args(["--state-file", state_file.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Process::new(child, "stillpoint pause --keep-alive".to_owned())
}

/// `stillpoint unpause` of the window recorded in `state_file`: exit code and report.
fn unpause(state_file: &std::path::Path) -> (i32, Value) {
    run_json(
        "stillpoint",
        &[
            "unpause",
            "--state-file",
            state_file.to_str().unwrap(),
            "--output",
            "json",
        ],
    )
}

fn all_nodes(cluster: &Cluster) -> String {
    format!("{},{}", cluster.ledger_tier(), cluster.auditor.address)
}

fn node_stats(address: &str) -> Value {
    let (code, report) = run_json("stillpoint", &["stats", "-a", address, "--output", "json"]);
    assert_eq!(code, 0, "{report}");
    report["nodes"][0]["stats"].clone()
}

/// The main scenario: 3 ledger nodes + 1 auditor under load, one command that
/// pauses (ledgers first, then the auditor), holds 200ms and releases.
#[test]
fn hold_for_under_load_gives_a_valid_window_with_nothing_committed_inside() {
    let cluster = Cluster::start(3);
    let load = Load::start(&cluster.ledger_tier(), 8, &[]);
    wait_until(
        Duration::from_secs(30),
        "the load to commit transfers",
        || cluster.transactions() >= 20,
    );

    let (code, window) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "200ms",
            "-a",
            &cluster.ledger_tier(),
            "-a",
            &cluster.auditor.address,
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{window:#}");
    let committed_during_run = cluster.transactions();
    wait_until(
        Duration::from_secs(30),
        "the load to go on after the pause",
        || cluster.transactions() > committed_during_run + 20,
    );
    let report = load.stop();

    // The fields runbook parsers read, and ours.
    for field in [
        "pause_start_timestamp_ms",
        "pause_end_timestamp_ms",
        "pause_start_date_time",
        "pause_end_date_time",
        "timezone",
        "restore_point_timestamp_ms",
        "restore_point_date_time",
        "skew_bound_ms",
        "window_valid",
        "pause_id",
        "nodes",
    ] {
        assert!(!window[field].is_null(), "missing {field} in {window:#}");
    }
    assert_eq!(window["window_valid"], true, "{window:#}");
    let start = window["pause_start_timestamp_ms"].as_i64().unwrap();
    let end = window["pause_end_timestamp_ms"].as_i64().unwrap();
    assert!(
        end - start >= 200,
        "held {}ms, asked for 200ms",
        end - start
    );
    assert_eq!(
        window["restore_point_timestamp_ms"].as_i64().unwrap(),
        start + (end - start) / 2
    );

    let nodes = window["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    for node in nodes {
        assert_eq!(node["outcome"], "released", "{node}");
        assert_eq!(
            node["in_flight_at_pause"], 0,
            "nodes report zero in flight: {node}"
        );
        assert_eq!(node["stayed_paused"], true, "{node}");
        assert!(node["clock_offset_ms"].is_i64(), "{node}");
    }
    assert_eq!(nodes[3]["tier"], 2, "the auditor is the second tier");

    // Held, not failed: clients saw latency, not errors.
    assert_eq!(report["failed"], 0, "{report:#}");
    assert_eq!(report["rejected"], 0, "{report:#}");
    let held: u64 = cluster
        .ledgers
        .iter()
        .map(|node| {
            node_stats(&node.address)["gate"]["held_total"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(
        held > 0,
        "no request arrived during the 200ms pause: the test proved nothing"
    );

    // Nothing committed inside the window, and the invariants hold.
    let (code, check) = cluster.check(Some((start, end)));
    assert_eq!(code, 0, "{check:#}");
    // The same check over the whole run (a minute either side of the window covers the
    // load) must fail, or it could not have failed above.
    let (code, check) = cluster.check(Some((start - 60_000, end + 60_000)));
    assert_eq!(code, 1, "window check cannot fail: {check:#}");
}

#[test]
fn text_output_is_for_people() {
    let cluster = Cluster::start(1);
    let output = run(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "-a",
            &cluster.ledger_tier(),
            "-a",
            &cluster.auditor.address,
        ],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(text.contains("valid restore point"), "{text}");
    assert!(text.contains("restore point"), "{text}");
    assert!(text.contains(&cluster.auditor.address), "{text}");
}

/// A coordinator killed with SIGKILL while it holds a pause cannot unpause; the nodes'
/// lease must.
#[test]
fn sigkill_of_the_cli_leaves_every_node_unpaused_within_the_lease() {
    let cluster = Cluster::start(2);
    let nodes = all_nodes(&cluster);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let coordinator = keep_alive_pause(&cluster, "2s", &state_file);
    wait_until(Duration::from_secs(20), "every node to pause", || {
        paused_flags(&nodes).iter().all(|paused| *paused)
    });
    // The keep-alive renews: one and a half leases later the cluster is still paused.
    std::thread::sleep(Duration::from_millis(3_000));
    assert!(
        paused_flags(&nodes).iter().all(|paused| *paused),
        "keep-alive did not renew"
    );

    coordinator.signal("KILL");
    let killed_at = Instant::now();
    drop(coordinator);
    let took = wait_until(
        Duration::from_secs(10),
        "the lease to reopen every node",
        || paused_flags(&nodes).iter().all(|paused| !paused),
    );
    assert!(
        killed_at.elapsed() <= Duration::from_secs(3),
        "nodes reopened {took:?} after the kill; lease 2s + 1s allowed"
    );
}

/// A transfer that stays inside its gate longer than the max wait: that node's pause
/// fails with FAILED_PRECONDITION, every other node is released, the cluster serves.
#[test]
fn a_node_that_cannot_drain_fails_the_pause_and_everyone_is_released() {
    let cluster = Cluster::start_with(3, &["--allow-slow-transfers"]);
    // Not the lowest address: that one is paused alone first as the lock, and had it
    // failed, the others would never have been paused to be rolled back.
    let slow_node = cluster
        .ledgers
        .iter()
        .map(|node| node.address.clone())
        .max()
        .unwrap();
    let slow = Load::start(&slow_node, 1, &["--hold-inside-gate", "4s"]);
    wait_until(
        Duration::from_secs(20),
        "the slow transfer to be inside the gate",
        || node_stats(&slow_node)["gate"]["in_flight"].as_u64() == Some(1),
    );

    let output = run(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "100ms",
            "--max-pause-wait",
            "500ms",
            "-a",
            &cluster.ledger_tier(),
            "-a",
            &cluster.auditor.address,
            "--output",
            "json",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(3),
        "exit code for a rolled-back pause; {}",
        stderr(&output)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let outcome = |address: &str| -> Value {
        report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|node| node["address"] == address)
            .unwrap_or_else(|| panic!("{address} missing from {report:#}"))
            .clone()
    };
    let failed = outcome(&slow_node);
    assert_eq!(failed["outcome"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("1 request(s) still in flight"),
        "{failed}"
    );
    for other in cluster
        .ledgers
        .iter()
        .filter(|node| node.address != slow_node)
    {
        assert_eq!(
            outcome(&other.address)["outcome"],
            "rolled_back",
            "{report:#}"
        );
    }
    assert_eq!(
        outcome(&cluster.auditor.address)["outcome"],
        "not_attempted"
    );
    assert!(
        paused_flags(&all_nodes(&cluster))
            .iter()
            .all(|paused| !paused)
    );

    // The gate reopened: the slow transfer and new ones complete.
    let report = slow.stop();
    assert_eq!(report["failed"], 0, "{report:#}");
    let load = Load::start(&cluster.ledger_tier(), 2, &[]);
    let before = cluster.transactions();
    wait_until(
        Duration::from_secs(20),
        "the cluster to keep serving",
        || cluster.transactions() > before + 5,
    );
    assert_eq!(load.stop()["failed"], 0);
}

/// A plain `pause` leaves the cluster paused and records the window; `unpause` closes it.
/// A second coordinator with another pause id is refused instead of merging.
#[test]
fn plain_pause_then_unpause_and_a_second_pause_is_refused() {
    let cluster = Cluster::start(1);
    let nodes = all_nodes(&cluster);
    let state = tempfile::tempdir().unwrap();
    let first = state.path().join("first.json");
    let second = state.path().join("second.json");
    let pause = |state_file: &std::path::Path| {
        run_json(
            "stillpoint",
            &[
                "pause",
                "-a",
                &cluster.ledger_tier(),
                "-a",
                &cluster.auditor.address,
                "--state-file",
                state_file.to_str().unwrap(),
                "--output",
                "json",
            ],
        )
    };

    let (code, opened) = pause(&first);
    assert_eq!(code, 0, "{opened:#}");
    assert!(opened["pause_end_timestamp_ms"].is_null());
    assert!(opened["lease_expires_at_ms"].is_i64());
    assert!(first.exists(), "the window must be recorded for unpause");

    let (code, refused) = pause(&second);
    assert_eq!(code, 3, "{refused:#}");
    let reason = refused["invalid_reasons"][0].as_str().unwrap();
    assert!(reason.contains("already paused by pause id"), "{reason}");
    assert!(
        paused_flags(&nodes).iter().all(|paused| *paused),
        "the refused pause released ours"
    );

    let (code, closed) = unpause(&first);
    assert_eq!(code, 0, "{closed:#}");
    assert_eq!(closed["window_valid"], true);
    assert_eq!(closed["pause_id"], opened["pause_id"]);
    assert!(!first.exists(), "a closed window leaves no state behind");
    assert!(paused_flags(&nodes).iter().all(|paused| !paused));
}

/// A node that restarts inside the window silently drops its pause; the window must be
/// reported as unusable (exit 5).
#[test]
fn a_node_restarted_inside_the_window_invalidates_it() {
    let mut cluster = Cluster::start(2);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let (code, opened) = run_json(
        "stillpoint",
        &[
            "pause",
            "-a",
            &cluster.ledger_tier(),
            "-a",
            &cluster.auditor.address,
            "--lease",
            "60s",
            "--state-file",
            state_file.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{opened:#}");
    cluster.ledgers[0].restart();

    let output = run(
        "stillpoint",
        &[
            "unpause",
            "--state-file",
            state_file.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    let closed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(closed["window_valid"], false);
    let reasons = closed["invalid_reasons"].to_string();
    assert!(reasons.contains(&cluster.ledgers[0].address), "{reasons}");
    assert!(stderr(&output).contains("must not be used as a restore point"));
    // Every node was still released.
    assert!(
        paused_flags(&all_nodes(&cluster))
            .iter()
            .all(|paused| !paused)
    );
}

/// `--keep-alive` renews in the foreground; `unpause` from another shell closes the
/// window from the state file, and the keep-alive process then ends by itself.
#[test]
fn keep_alive_ends_when_unpause_closes_the_window_elsewhere() {
    let cluster = Cluster::start(1);
    let nodes = all_nodes(&cluster);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let mut keep_alive = keep_alive_pause(&cluster, "1500ms", &state_file);
    wait_until(Duration::from_secs(20), "the pause to be recorded", || {
        state_file.exists()
    });
    // Hold the window as an operator would: unpausing within a few milliseconds makes
    // it shorter than the skew-bound floor, which is (rightly) reported invalid.
    std::thread::sleep(Duration::from_millis(200));

    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
    assert_eq!(closed["window_valid"], true, "{closed:#}");
    assert!(paused_flags(&nodes).iter().all(|paused| !paused));
    wait_until(
        Duration::from_secs(10),
        "the keep-alive process to end",
        || keep_alive.has_exited(),
    );
    let output = keep_alive.wait_output(Duration::from_secs(1));
    assert!(
        output.status.success(),
        "keep-alive exit: {:?}",
        output.status
    );
}

/// `--min-window` extends a short hold; `--time-zone` shows the window in that zone.
#[test]
fn min_window_extends_the_hold_and_times_use_the_zone() {
    let cluster = Cluster::start(1);
    let (code, window) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "10ms",
            "--min-window",
            "300ms",
            "--time-zone",
            "Asia/Tokyo",
            "-a",
            &cluster.ledger_tier(),
            "-a",
            &cluster.auditor.address,
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{window:#}");
    assert!(window["window_ms"].as_i64().unwrap() >= 300, "{window:#}");
    assert_eq!(window["timezone"], "Asia/Tokyo");
    assert!(
        window["restore_point_date_time"]
            .as_str()
            .unwrap()
            .ends_with("+09:00")
    );
}

/// A plain `stillpoint pause` of `tiers` recording its window in `state_file`, with
/// `extra` flags; returns the exit code and the report.
fn plain_pause(tiers: &[&str], state_file: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["pause", "--state-file", state_file.to_str().unwrap()];
    for tier in tiers {
        args.extend(["-a", tier]);
    }
    args.extend(["--output", "json"]);
    args.extend_from_slice(extra);
    run_json("stillpoint", &args)
}

fn outcome_of(report: &Value, address: &str) -> Value {
    report["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {report:#}"))
        .iter()
        .find(|node| node["address"] == address)
        .unwrap_or_else(|| panic!("{address} missing from {report:#}"))
        .clone()
}

/// Issue 17.1: `unpause -a` names the nodes to release. When a state file records a
/// window over other nodes, those are not released behind the operator's back, and
/// the file is kept (and mentioned), not silently closed.
#[test]
fn unpause_with_addresses_releases_those_nodes_and_keeps_a_state_file_that_disagrees() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let auditor = cluster.auditor.address.clone();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let (code, opened) = plain_pause(&[&ledger], &state_file, &[]);
    assert_eq!(code, 0, "{opened:#}");
    let (code, upstream) = run_json("scalar-admin", &["-c", "PAUSE", "-a", &auditor]);
    assert_eq!(code, 0, "{upstream:#}");

    let output = run(
        "stillpoint",
        &[
            "unpause",
            "-a",
            &auditor,
            "--state-file",
            state_file.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        paused_flags(&auditor),
        [false],
        "the node named on the command line must be released"
    );
    assert_eq!(
        paused_flags(&ledger),
        [true],
        "a node that was not named was released (from the state file)"
    );
    assert!(
        state_file.exists(),
        "the state file's window was closed although its nodes were not named"
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    assert!(
        said.contains(state_file.to_str().unwrap()) && said.contains(&ledger),
        "the disagreement with the state file must be said: {said}"
    );

    // The recorded window is still there to close.
    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
    assert_eq!(closed["pause_id"], opened["pause_id"]);
    assert_eq!(paused_flags(&ledger), [false]);
}

/// Issue 17.2 (and its "done when"): one node SIGSTOPped inside a `--hold-for 1s`
/// window. Every other node is released without waiting for it, the command returns
/// within the release deadline, and the report names the node and when its lease ends.
#[test]
fn a_stopped_node_does_not_hold_up_the_release_of_the_others() {
    let cluster = Cluster::start(2);
    let nodes = all_nodes(&cluster);
    let child = std::process::Command::new(bin("stillpoint"))
        .args(["pause", "--hold-for", "1s", "--connect-timeout", "2s"])
        .args(["-a", &cluster.ledger_tier(), "-a", &cluster.auditor.address])
        .args(["--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let coordinator = Process::new(child, "stillpoint pause --hold-for 1s".to_owned());
    wait_until(Duration::from_secs(20), "every node to pause", || {
        paused_flags(&nodes).iter().all(|paused| *paused)
    });
    cluster.auditor.signal("STOP");
    let stopped_at = Instant::now();

    // The ledgers are released one call deadline (2s) after the 1s hold at most.
    let took = wait_until(
        Duration::from_secs(8),
        "the ledger nodes to be released while the auditor is stopped",
        || {
            paused_flags(&cluster.ledger_tier())
                .iter()
                .all(|paused| !paused)
        },
    );
    let output = coordinator.wait_output(Duration::from_secs(15));
    let returned_after = stopped_at.elapsed();
    cluster.auditor.signal("CONT");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&output.stdout)));
    assert_eq!(output.status.code(), Some(4), "{report:#}");
    // 1s hold + 5s release deadline (2 × connect timeout + 1s) + slack for a busy machine.
    assert!(
        returned_after <= Duration::from_secs(10),
        "returned {returned_after:?} after the node stopped"
    );
    assert!(
        took <= Duration::from_secs(8),
        "ledgers released after {took:?}"
    );
    for ledger in &cluster.ledgers {
        assert_eq!(outcome_of(&report, &ledger.address)["outcome"], "released");
    }
    let stopped = outcome_of(&report, &cluster.auditor.address);
    assert_eq!(stopped["outcome"], "release_failed", "{stopped:#}");
    assert!(
        stopped["error"]
            .as_str()
            .unwrap()
            .contains("no answer within"),
        "{stopped:#}"
    );
    let lease_ends = stopped["lease_expires_at_ms"]
        .as_i64()
        .expect("when its lease ends");
    assert!(lease_ends > report["pause_start_timestamp_ms"].as_i64().unwrap());
    assert!(
        stderr(&output).contains(&cluster.auditor.address),
        "{}",
        stderr(&output)
    );
}

/// Issue 17.2: a release stuck on a node that does not answer is abandoned by a second
/// Ctrl-C; the command says which nodes may stay paused and until when.
#[test]
fn a_second_interrupt_stops_waiting_for_a_node_that_does_not_answer() {
    let cluster = Cluster::start(1);
    let nodes = all_nodes(&cluster);
    let (coordinator, stderr_lines) = spawn_reading_stderr(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "60s",
            "--connect-timeout",
            "60s",
            "-a",
            &cluster.ledger_tier(),
            "-a",
            &cluster.auditor.address,
        ],
        &[],
    );
    wait_until(Duration::from_secs(20), "every node to pause", || {
        paused_flags(&nodes).iter().all(|paused| *paused)
    });
    cluster.auditor.signal("STOP");
    coordinator.signal("INT");
    wait_for_line(&stderr_lines, "interrupted", Duration::from_secs(10));
    coordinator.signal("INT");
    let interrupted_at = Instant::now();
    let output = coordinator.wait_output(Duration::from_secs(10));
    cluster.auditor.signal("CONT");
    assert!(
        interrupted_at.elapsed() < Duration::from_secs(5),
        "exited {:?} after the second interrupt",
        interrupted_at.elapsed()
    );
    assert_eq!(output.status.code(), Some(4));
    // The reader ends at the process's exit, so this takes every line it printed.
    let rest: Vec<String> = stderr_lines.iter().collect();
    let said = rest.join("\n");
    assert!(said.contains("lease"), "{said}");
}

/// Issue 17.3: requests held at a paused node's gate whose callers gave up (their
/// gRPC deadline passed) are never run; a patient caller held the same way is.
#[test]
fn a_held_request_whose_caller_gave_up_is_never_run() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let before = cluster.transactions();
    let (code, opened) = plain_pause(&[&ledger], &state_file, &[]);
    assert_eq!(code, 0, "{opened:#}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let patient = runtime.spawn({
        let ledger = ledger.clone();
        async move { transfer(&ledger, Duration::from_secs(60)).await }
    });
    let gave_up = runtime.block_on(futures::future::join_all(
        (0..3).map(|_| transfer(&ledger, Duration::from_millis(500))),
    ));
    for result in &gave_up {
        let code = result.as_ref().expect_err("held past its deadline").code();
        assert!(
            matches!(code, tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
            "{result:?}"
        );
    }
    assert_eq!(
        node_stats(&ledger)["gate"]["held_now"],
        1,
        "only the patient transfer should still be held"
    );

    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
    runtime
        .block_on(patient)
        .unwrap()
        .expect("the patient transfer runs after the pause");
    wait_until(Duration::from_secs(10), "the gate to be empty", || {
        let gate = node_stats(&ledger)["gate"].clone();
        gate["held_now"] == 0 && gate["in_flight"] == 0
    });
    assert_eq!(
        cluster.transactions(),
        before + 1,
        "transfers whose callers had given up were committed after the pause"
    );
}

/// Issue 17.5: `--min-window` is kept with the open window, so `unpause` (from another
/// shell, or closing a `--keep-alive` pause) holds the window as long as asked.
#[test]
fn min_window_is_kept_from_pause_to_unpause() {
    let cluster = Cluster::start(1);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let tiers = [cluster.ledger_tier(), cluster.auditor.address.clone()];
    let tiers: Vec<&str> = tiers.iter().map(String::as_str).collect();

    let (code, opened) = plain_pause(&tiers, &state_file, &["--min-window", "2s"]);
    assert_eq!(code, 0, "{opened:#}");
    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
    assert!(
        closed["window_ms"].as_i64().unwrap() >= 2_000,
        "plain pause: {closed:#}"
    );

    let mut keep_alive = std::process::Command::new(bin("stillpoint"));
    keep_alive
        .args([
            "pause",
            "--keep-alive",
            "--lease",
            "3s",
            "--max-pause-wait",
            "1s",
        ])
        .args(["--min-window", "2s", "-a", tiers[0], "-a", tiers[1]])
        .args(["--state-file", state_file.to_str().unwrap()])
        .stdout(std::process::Stdio::null());
    let mut keep_alive = Process::new(keep_alive.spawn().unwrap(), "keep-alive".to_owned());
    wait_until(Duration::from_secs(20), "the pause to be recorded", || {
        state_file.exists()
    });
    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
    assert!(
        closed["window_ms"].as_i64().unwrap() >= 2_000,
        "keep-alive: {closed:#}"
    );
    wait_until(Duration::from_secs(10), "the keep-alive to end", || {
        keep_alive.has_exited()
    });
}

/// Issue 17.6: while a later tier drains, the earlier tiers' leases are renewed. Here
/// tier 2 takes ~2s to drain under a 3s lease, and the window is then held 1.5s: the
/// first tier's lease would have run out before the first renewal of the hold.
#[test]
fn earlier_tiers_keep_their_lease_while_a_later_tier_drains() {
    let cluster = Cluster::start_with(2, &["--allow-slow-transfers"]);
    let first = cluster.ledgers[0].address.clone();
    let second = cluster.ledgers[1].address.clone();
    let slow = Load::start(&second, 1, &["--hold-inside-gate", "2400ms"]);
    wait_until(
        Duration::from_secs(20),
        "the slow transfer to be inside the gate",
        || node_stats(&second)["gate"]["in_flight"].as_u64() == Some(1),
    );
    let (code, window) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "1500ms",
            "--lease",
            "3s",
            "--max-pause-wait",
            "2500ms",
            "-a",
            &first,
            "-a",
            &second,
            "--output",
            "json",
        ],
    );
    slow.stop();
    assert_eq!(
        outcome_of(&window, &second)["drained_in_flight"],
        1,
        "the second tier did not have to drain, so the test proved nothing: {window:#}"
    );
    assert_eq!(code, 0, "{window:#}");
    assert_eq!(window["window_valid"], true, "{window:#}");
}

/// Issue 17.7: two plain pauses sharing a state file: the second is refused before it
/// pauses anything, and the file keeps the first one's record.
#[test]
fn two_plain_pauses_sharing_a_state_file_cannot_both_succeed() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let auditor = cluster.auditor.address.clone();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let start = |address: &str| {
        let child = std::process::Command::new(bin("stillpoint"))
            .args(["pause", "-a", address, "--output", "json"])
            .args(["--state-file", state_file.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Process::new(child, format!("pause -a {address}"))
    };
    // Started together: both look for a record before either has written one.
    let (a, b) = (start(&ledger), start(&auditor));
    let a = a.wait_output(Duration::from_secs(60));
    let b = b.wait_output(Duration::from_secs(60));
    let codes = (a.status.code(), b.status.code());
    let (winner, loser, loser_node) = match codes {
        (Some(0), Some(2)) => (a, b, auditor.clone()),
        (Some(2), Some(0)) => (b, a, ledger.clone()),
        _ => panic!(
            "exactly one pause may win, got exit codes {codes:?}:\n{}\n{}",
            stderr(&a),
            stderr(&b)
        ),
    };
    assert!(
        stderr(&loser).contains(state_file.to_str().unwrap()),
        "{}",
        stderr(&loser)
    );
    assert_eq!(
        paused_flags(&loser_node),
        [false],
        "the refused pause paused its node"
    );
    let won: Value = serde_json::from_slice(&winner.stdout).unwrap();
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(recorded["record"]["pause_id"], won["pause_id"]);
    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
}

/// Issue 17.8: a second coordinator given the same `--pause-id` is another holder: it
/// is refused, and it cannot release the first one's pause.
#[test]
fn a_second_coordinator_reusing_a_pause_id_is_refused() {
    let cluster = Cluster::start(1);
    let nodes = all_nodes(&cluster);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let tiers = [cluster.ledger_tier(), cluster.auditor.address.clone()];
    let tiers: Vec<&str> = tiers.iter().map(String::as_str).collect();
    let (code, opened) = plain_pause(&tiers, &state_file, &["--pause-id", "nightly"]);
    assert_eq!(code, 0, "{opened:#}");

    let (code, second) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "--pause-id",
            "nightly",
            "-a",
            tiers[0],
            "-a",
            tiers[1],
            "--output",
            "json",
        ],
    );
    assert_eq!(
        code, 3,
        "the second coordinator must be refused: {second:#}"
    );
    let reason = second["invalid_reasons"][0].as_str().unwrap();
    assert!(
        reason.contains("already paused by pause id nightly"),
        "{reason}"
    );
    assert!(
        paused_flags(&nodes).iter().all(|paused| *paused),
        "the second coordinator released the first one's pause"
    );
    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
    assert_eq!(closed["window_valid"], true, "{closed:#}");
}

/// A plain `pause` closed by `unpause` at once is held, like `--hold-for`, until the
/// window is longer than twice the clock-skew bound plus the margin: a window closed
/// too early could not be a restore point. (Found when a loaded machine measured a
/// 19 ms round trip and the tests' quick unpauses came out invalid.) The recorded
/// skew bound is raised by hand so the floor is far above the time `unpause` takes.
#[test]
fn unpause_holds_a_plain_pause_until_the_window_can_be_a_restore_point() {
    let cluster = Cluster::start(1);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let tiers = [cluster.ledger_tier(), cluster.auditor.address.clone()];
    let tiers: Vec<&str> = tiers.iter().map(String::as_str).collect();

    let (code, opened) = plain_pause(&tiers, &state_file, &[]);
    assert_eq!(code, 0, "{opened:#}");
    let mut recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    recorded["record"]["skew_bound_ms"] = 400.into();
    std::fs::write(&state_file, recorded.to_string()).unwrap();

    let output = run(
        "stillpoint",
        &[
            "unpause",
            "--state-file",
            state_file.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    let closed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{closed:#}\n{}",
        stderr(&output)
    );
    assert_eq!(closed["window_valid"], true, "{closed:#}");
    assert!(
        closed["window_ms"].as_i64().unwrap() > 2 * 400 + 10,
        "{closed:#}"
    );
    assert!(
        stderr(&output).contains("clock-skew bound"),
        "the hold is not explained: {}",
        stderr(&output)
    );
    assert_eq!(paused_flags(&all_nodes(&cluster)), [false, false]);
}

/// A signal while the pause phase is under way (the first tier paused, the second
/// still draining a slow transfer) rolls back: the paused tier is released at once,
/// not left to its lease, the draining node reopens, and the exit code says the pause
/// failed. Before, SIGINT/SIGTERM ended the process and the first tier stayed paused
/// for the whole lease.
#[test]
fn a_signal_during_the_pause_phase_rolls_back_the_nodes_already_paused() {
    let cluster = Cluster::start_with(2, &["--allow-slow-transfers"]);
    let first = cluster.ledgers[0].address.clone();
    let second = cluster.ledgers[1].address.clone();
    let slow = Load::start(&second, 1, &["--hold-inside-gate", "30s"]);
    wait_until(
        Duration::from_secs(20),
        "the slow transfer to be inside the gate",
        || node_stats(&second)["gate"]["in_flight"].as_u64() == Some(1),
    );
    for signal in ["INT", "TERM"] {
        let child = std::process::Command::new(bin("stillpoint"))
            .args(["pause", "--hold-for", "1s", "--lease", "60s"])
            .args(["--max-pause-wait", "50s", "-a", &first, "-a", &second])
            .args(["--output", "json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let coordinator = Process::new(child, format!("stillpoint pause (SIG{signal})"));
        wait_until(
            Duration::from_secs(20),
            "the first tier to pause while the second drains",
            || paused_flags(&first) == [true] && node_stats(&second)["gate"]["closed"] == true,
        );
        coordinator.signal(signal);
        let output = coordinator.wait_output(Duration::from_secs(15));
        assert_eq!(
            output.status.code(),
            Some(3),
            "SIG{signal}: a rolled-back pause exits 3; {}",
            stderr(&output)
        );
        // Released by the roll-back, not by the 60s lease.
        assert_eq!(paused_flags(&format!("{first},{second}")), [false, false]);
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            outcome_of(&report, &first)["outcome"],
            "rolled_back",
            "{report:#}"
        );
        assert!(
            stderr(&output).contains("interrupted"),
            "SIG{signal}: {}",
            stderr(&output)
        );
    }
    slow.stop();
}

/// `unpause -a` opens the nodes it names even when the state file is damaged
/// (truncated, not JSON, not UTF-8): it says what is wrong with the file and leaves
/// it for inspection. Before, it refused ("pause state … is not valid … pass -a"),
/// even though -a was given, and the node stayed paused.
#[test]
fn unpause_with_addresses_works_past_a_damaged_state_file() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    for damage in [&b"{\"version\": 1, \"rec"[..], b"\xff\xfe not json", b""] {
        let (code, opened) = plain_pause(&[&ledger], &state_file, &[]);
        assert_eq!(code, 0, "{opened:#}");
        std::fs::write(&state_file, damage).unwrap();
        let output = run(
            "stillpoint",
            &[
                "unpause",
                "-a",
                &ledger,
                "--state-file",
                state_file.to_str().unwrap(),
            ],
        );
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(
            paused_flags(&ledger),
            [false],
            "the named node stayed paused"
        );
        let said = stderr(&output);
        assert!(
            said.contains(state_file.to_str().unwrap()) && said.contains("not valid"),
            "{said}"
        );
        assert_eq!(
            std::fs::read(&state_file).unwrap(),
            damage,
            "the file was changed"
        );
        std::fs::remove_file(&state_file).unwrap();
    }
}

/// `unpause -a`, `check-paused` and `stats` (and scalar-admin's UNPAUSE and
/// CHECK_PAUSED, which share them) give up on a node that accepted the connection but
/// never answers the call, within the call deadline, name it, and still handle the
/// other nodes. Before, each of them waited for it forever.
#[test]
fn commands_name_a_node_that_never_answers_and_handle_the_others() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let hung = crate::upstream_server::UpstreamOnlyServer::start();
    hung.calls
        .hang
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let hung_address = hung.address.to_string();
    let both = format!("{ledger},{hung_address}");
    let timeout = ["--connect-timeout", "1s"];
    let commands: [(&str, Vec<&str>); 5] = [
        (
            "stillpoint",
            [&["unpause", "-a", &both][..], &timeout].concat(),
        ),
        (
            "stillpoint",
            [&["check-paused", "-a", &both][..], &timeout].concat(),
        ),
        (
            "stillpoint",
            [&["stats", "-a", &both][..], &timeout].concat(),
        ),
        (
            "scalar-admin",
            [&["-c", "UNPAUSE", "-a", &both][..], &timeout].concat(),
        ),
        (
            "scalar-admin",
            [&["-c", "CHECK_PAUSED", "-a", &both][..], &timeout].concat(),
        ),
    ];
    for (program, args) in commands {
        if args[0] == "unpause" || args[1] == "UNPAUSE" {
            let (code, paused) = run_json(
                "scalar-admin",
                &["-c", "PAUSE", "-a", &ledger, "-m", "1000"],
            );
            assert_eq!(code, 0, "{paused:#}");
        }
        let child = std::process::Command::new(bin(program))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let output = Process::new(child, format!("{program} {}", args.join(" ")))
            .wait_output(Duration::from_secs(30));
        let took = started.elapsed();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            stderr(&output)
        );
        assert!(
            took < Duration::from_secs(10),
            "{program} {args:?} took {took:?}"
        );
        assert_ne!(output.status.code(), Some(0), "{program} {args:?}: {said}");
        assert!(said.contains(&hung_address), "{program} {args:?}: {said}");
        assert!(said.contains(&ledger), "{program} {args:?}: {said}");
        assert_eq!(paused_flags(&ledger), [false], "{program} {args:?}: {said}");
    }
}

/// Issue 17.7, the lock: a `pause` still pausing (its second tier draining) holds the
/// state file for its whole run; an `unpause` sharing the file is refused meanwhile,
/// naming the pause's pid, instead of reading a file about to be written ("no pause is
/// recorded") and interleaving with it. `unpause -a` still releases the nodes it names.
/// Once the pause has recorded its window, `unpause` closes it.
#[test]
fn unpause_is_refused_while_a_pause_sharing_the_state_file_runs() {
    let cluster = Cluster::start_with(2, &["--allow-slow-transfers"]);
    let first = cluster.ledgers[0].address.clone();
    let second = cluster.ledgers[1].address.clone();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let slow = Load::start(&second, 1, &["--hold-inside-gate", "3s"]);
    wait_until(
        Duration::from_secs(20),
        "the slow transfer to be inside the gate",
        || node_stats(&second)["gate"]["in_flight"].as_u64() == Some(1),
    );
    let child = std::process::Command::new(bin("stillpoint"))
        .args([
            "pause",
            "--max-pause-wait",
            "20s",
            "-a",
            &first,
            "-a",
            &second,
        ])
        .args([
            "--state-file",
            state_file.to_str().unwrap(),
            "--output",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pausing = Process::new(child, "stillpoint pause".to_owned());
    let pid = pausing.pid();
    wait_until(
        Duration::from_secs(20),
        "the first tier to pause while the second drains",
        || paused_flags(&first) == [true] && node_stats(&second)["gate"]["closed"] == true,
    );
    let refused = run(
        "stillpoint",
        &["unpause", "--state-file", state_file.to_str().unwrap()],
    );
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains(&format!("pid {pid}")),
        "the holder is not named: {}",
        stderr(&refused)
    );
    assert_eq!(
        paused_flags(&first),
        [true],
        "the refused unpause released a node"
    );

    let opened = pausing.wait_output(Duration::from_secs(30));
    assert_eq!(opened.status.code(), Some(0), "{}", stderr(&opened));
    slow.stop();
    let (code, closed) = unpause(&state_file);
    assert_eq!(code, 0, "{closed:#}");
    assert_eq!(paused_flags(&format!("{first},{second}")), [false, false]);
}

/// Lease renewals are timed from the oldest lease granted, not from when the pause
/// returned. Here one tier of two ledgers: the lowest address (the tier's lock) pauses
/// alone first, then the other takes ~2.4s to drain under a 3s lease. Before, nothing
/// renewed the lock node while its tier drained, and the hold's first renewal came a
/// third of a lease after the pause returned: ~3.4s after the lock node's lease began,
/// so it had reopened by itself and the window was invalid.
#[test]
fn renewals_are_timed_from_the_first_lease_granted() {
    let cluster = Cluster::start_with(2, &["--allow-slow-transfers"]);
    let slow_node = cluster
        .ledgers
        .iter()
        .map(|node| node.address.clone())
        .max()
        .unwrap();
    let slow = Load::start(&slow_node, 1, &["--hold-inside-gate", "2400ms"]);
    wait_until(
        Duration::from_secs(20),
        "the slow transfer to be inside the gate",
        || node_stats(&slow_node)["gate"]["in_flight"].as_u64() == Some(1),
    );
    let (code, window) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "1500ms",
            "--lease",
            "3s",
            "--max-pause-wait",
            "2500ms",
            "-a",
            &cluster.ledger_tier(),
            "--output",
            "json",
        ],
    );
    slow.stop();
    assert!(
        outcome_of(&window, &slow_node)["drained_in_flight"]
            .as_u64()
            .is_some_and(|drained| drained >= 1),
        "the slow node did not have to drain, so the test proved nothing: {window:#}"
    );
    assert_eq!(code, 0, "{window:#}");
    assert_eq!(window["window_valid"], true, "{window:#}");
}

/// A state file that parses but holds values no pause could have written (edited by
/// hand, or damaged in a way JSON still accepts) is refused as not valid, naming the
/// field, and `unpause -a` still opens the node. Before, a huge skew bound or clock
/// offset, or a paused_at_ms far in the past, made `unpause` panic (exit 101); an
/// empty node list or a huge min_window_ms closed a "valid restore point".
#[test]
fn unpause_refuses_a_state_file_with_impossible_values_without_panicking() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    type Edit = (&'static str, fn(&mut Value));
    let edits: [Edit; 7] = [
        ("skew_bound_ms", |s| {
            s["record"]["skew_bound_ms"] = u64::MAX.into()
        }),
        ("paused_at_ms", |s| {
            s["record"]["paused_at_ms"] = i64::MIN.into()
        }),
        ("paused_at_ms", |s| {
            s["record"]["paused_at_ms"] = i64::MAX.into()
        }),
        ("clock reading", |s| {
            s["record"]["tiers"][0][0]["clock_offset_ms"] = i64::MIN.into()
        }),
        ("without nodes", |s| {
            s["record"]["tiers"] = Value::Array(Vec::new())
        }),
        ("min_window_ms", |s| s["min_window_ms"] = u64::MAX.into()),
        ("lease_ms", |s| s["record"]["lease_ms"] = 0.into()),
    ];
    for (field, edit) in edits {
        let (code, opened) = plain_pause(&[&ledger], &state_file, &[]);
        assert_eq!(code, 0, "{opened:#}");
        let mut recorded: Value =
            serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
        edit(&mut recorded);
        std::fs::write(&state_file, recorded.to_string()).unwrap();

        let output = run(
            "stillpoint",
            &["unpause", "--state-file", state_file.to_str().unwrap()],
        );
        let said = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{field}: {said}");
        assert!(
            said.contains("not valid") && said.contains(field),
            "{field}: {said}"
        );

        let output = run(
            "stillpoint",
            &[
                "unpause",
                "-a",
                &ledger,
                "--state-file",
                state_file.to_str().unwrap(),
            ],
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "{field}: {}",
            stderr(&output)
        );
        assert_eq!(paused_flags(&ledger), [false], "{field}");
        std::fs::remove_file(&state_file).unwrap();
    }
}

/// One node listed twice under two addresses (its IP and `localhost`) is refused before
/// anything is paused, naming both. Before, it was paused twice (the second pause
/// counted as a renewal), released twice, and the window called invalid because the
/// node "was not paused at release (its lease ran out, or it restarted)".
#[test]
fn one_node_under_two_addresses_is_refused_before_pausing() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let port = ledger.rsplit_once(':').unwrap().1;
    let alias = format!("localhost:{port}");
    for tiers in [
        vec![format!("{ledger},{alias}")],
        vec![ledger.clone(), alias.clone()],
    ] {
        let mut args = vec!["pause", "--hold-for", "100ms", "--output", "json"];
        for tier in &tiers {
            args.extend(["-a", tier]);
        }
        let (code, report) = run_json("stillpoint", &args);
        assert_eq!(code, 3, "{report:#}");
        let reason = report["invalid_reasons"][0].as_str().unwrap();
        assert!(
            reason.contains("same node") && reason.contains(&alias) && reason.contains(&ledger),
            "{reason}"
        );
        assert!(reason.contains("no node had paused"), "{reason}");
        assert_eq!(node_stats(&ledger)["node"]["pause_seq"], 0, "{report:#}");
    }
}

/// A `--keep-alive` whose renewals have not reached every node for a whole lease (here
/// the process itself was suspended, as Ctrl-Z does, past its 2s lease) knows the
/// nodes reopened by themselves: it releases the cluster, says the window is lost and
/// exits 5 instead of renewing in vain forever while looking alive. Before, it kept
/// running, warning, with the window silently gone.
#[test]
fn a_keep_alive_that_lost_its_lease_ends_and_says_so() {
    let cluster = Cluster::start(1);
    let nodes = all_nodes(&cluster);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let (keep_alive, stderr_lines) = spawn_reading_stderr(
        "stillpoint",
        &[
            "pause",
            "--keep-alive",
            "--lease",
            "2s",
            "--max-pause-wait",
            "1s",
            "-a",
            &cluster.ledger_tier(),
            "-a",
            &cluster.auditor.address,
            "--state-file",
            state_file.to_str().unwrap(),
        ],
        &[],
    );
    wait_until(Duration::from_secs(20), "every node to pause", || {
        state_file.exists() && paused_flags(&nodes).iter().all(|paused| *paused)
    });
    keep_alive.signal("STOP");
    wait_until(
        Duration::from_secs(10),
        "the lease to reopen every node",
        || paused_flags(&nodes).iter().all(|paused| !paused),
    );
    keep_alive.signal("CONT");
    let output = keep_alive.wait_output(Duration::from_secs(10));
    let said: Vec<String> = stderr_lines.iter().collect();
    let said = said.join("\n");
    assert_eq!(output.status.code(), Some(5), "{said}");
    assert!(said.contains("whole lease"), "{said}");
    assert!(!state_file.exists(), "the lost window is still recorded");
}

/// `unpause` run with both stdout and stderr closed (`… 2>&1 | head -0`) still closes
/// the window: a message that cannot be written is dropped. Before, the first message
/// on stderr ("holding the window …") panicked, and tracing's own report of the
/// failed log write panicked again inside the paused cluster's drop: the process
/// aborted (SIGABRT), the cluster stayed paused until its lease and the state file
/// stayed behind.
#[test]
fn unpause_with_stdout_and_stderr_closed_still_releases() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("pause.json");
    let (code, opened) = plain_pause(&[&ledger], &state_file, &["--min-window", "1s"]);
    assert_eq!(code, 0, "{opened:#}");
    let mut child = std::process::Command::new(bin("stillpoint"))
        .args(["unpause", "--state-file", state_file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Whoever read them has gone: every write gets EPIPE.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let output =
        Process::new(child, "stillpoint unpause".to_owned()).wait_output(Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(0), "{:?}", output.status);
    assert_eq!(paused_flags(&ledger), [false]);
    assert!(!state_file.exists(), "the closed window is still recorded");
}

/// A node whose stderr has no reader any more (its log pipe died) still pauses, and
/// still reopens by itself when the lease runs out. Before, tracing's report of the
/// failed log write panicked in the middle of the admin call (the pause failed with an
/// h2 error and "ROLLBACK INCOMPLETE"), and the lease watchdog logged before it
/// reopened the gate, so a log write could keep a node closed past its lease.
#[test]
fn a_node_whose_log_pipe_died_still_pauses_and_reopens_at_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let args: Vec<String> = [
        "serve",
        "--role",
        "auditor",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &format!("sqlite:{}", dir.path().join("auditor.db").display()),
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    let (_node, addresses) = crate::util::spawn_listening_logged(
        &bin("ledger-node"),
        &args,
        1,
        "info",
        std::process::Stdio::from(writer),
    );
    let node = addresses[0].clone();
    let state_file = dir.path().join("pause.json");
    let (code, opened) = plain_pause(
        &[&node],
        &state_file,
        &["--lease", "1s", "--max-pause-wait", "500ms"],
    );
    assert_eq!(code, 0, "{opened:#}");
    let paused_at = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the lease to reopen the node",
        || paused_flags(&node) == [false],
    );
    assert!(
        paused_at.elapsed() < Duration::from_secs(3),
        "reopened {:?} after a 1s lease",
        paused_at.elapsed()
    );
}

/// A node that lost its pause during a hold (here released by another operator's
/// `unpause -a` while `pause --hold-for` renews it every third of a second) is named once
/// among the window's reasons, with the first cause. Before, every later renewal added
/// the same reason again: hundreds of lines for half a second of a short lease.
#[test]
fn a_node_that_lost_its_pause_is_named_once() {
    let cluster = Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let (holder, _stderr) = spawn_reading_stderr(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "3s",
            "--lease",
            "1s",
            "--max-pause-wait",
            "500ms",
            "-a",
            &ledger,
            "--output",
            "json",
        ],
        &[],
    );
    wait_until(Duration::from_secs(20), "the node to pause", || {
        paused_flags(&ledger) == [true]
    });
    let other = run("stillpoint", &["unpause", "-a", &ledger]);
    assert_eq!(other.status.code(), Some(0), "{}", stderr(&other));
    let output = holder.wait_output(Duration::from_secs(20));
    let window: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(5), "{window:#}");
    let lost = window["invalid_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|reason| reason.as_str().unwrap().contains("lost the pause"))
        .count();
    assert_eq!(lost, 1, "{window:#}");
}
