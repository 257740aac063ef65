//! The nemesis (issue 15): `stillpoint serve` taking a point every 3 s (and base
//! backups and drills by its schedule) of the reference cluster — 3 ledger nodes on
//! PostgreSQL, the auditor on MariaDB, S3-compatible storage in a process of its own —
//! under continuous load, while a seeded random schedule injects faults one after
//! another (`faults`): processes SIGKILLed and started again, the storage stopped or
//! slowed, the service cut off from a node, a node's clock stepped, a full disk, a
//! chunk lost from the storage. A watcher (`watch`) looks at every point as it is
//! listed. Then the checker (`check`) reads the whole history and names every
//! violation.
//!
//! `cargo test` runs the short version (90 s of faults, seed 1: scripts/test); the long runs
//! and their figures are in docs/reliability.md:
//!
//! ```text
//! scripts/nemesis --duration 30m --seed 7          # = cargo test --test nemesis -- …
//!   --storage file     a tmpfs for storage instead of S3 (adds the full-disk fault)
//!   --drill-sample N   points drilled besides the newest (default 2, long runs 20+)
//! ```
//!
//! It exits 1 naming each violation with the seed to replay it, and keeps the history
//! (JSON lines) and every process's log under target/nemesis/. It needs root (tc on
//! loopback, a tmpfs), libfaketime, moto_server, PostgreSQL and MariaDB
//! (scripts/install-packages).

mod check;
mod env;
mod faults;
mod history;
mod net;
mod observe;
mod store;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::env::{Env, STORAGE_HOST};
use crate::history::History;

struct Args {
    duration: Duration,
    seed: u64,
    s3: bool,
    drill_sample: usize,
}

/// Our flags, and libtest's (`cargo test` passes them) skipped: a name filter that
/// does not match "nemesis" skips the run, as it would skip a test. From
/// scripts/nemesis (which sets `STILLPOINT_NEMESIS_SCRIPT`) nothing else is expected,
/// so anything else is refused: `--durtion 30m` would otherwise be a flag skipped and
/// a filter that skips the whole run.
fn parse_args() -> Result<Option<Args>, String> {
    let strict = std::env::var_os("STILLPOINT_NEMESIS_SCRIPT").is_some();
    let mut args = Args {
        duration: Duration::from_secs(90),
        seed: 1,
        s3: true,
        drill_sample: 2,
    };
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        let mut value = |flag: &str| given.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "--duration" => {
                let text = value("--duration")?;
                args.duration = stillpoint_node::time::parse_duration(&text)
                    .map_err(|e| format!("--duration {text}: {e}"))?;
            }
            "--seed" => {
                let text = value("--seed")?;
                args.seed = text
                    .parse()
                    .map_err(|_| format!("--seed {text}: not a number"))?;
            }
            "--storage" => match value("--storage")?.as_str() {
                "s3" => args.s3 = true,
                "file" => args.s3 = false,
                other => return Err(format!("--storage {other}: write s3 or file")),
            },
            "--drill-sample" => {
                let text = value("--drill-sample")?;
                args.drill_sample = text
                    .parse()
                    .map_err(|_| format!("--drill-sample {text}: not a number"))?;
            }
            "--list" => {
                println!("nemesis: test");
                return Ok(None);
            }
            other if strict => {
                return Err(format!(
                    "{other}: not a flag of scripts/nemesis (--duration, --seed, --storage, \
                     --drill-sample)"
                ));
            }
            flag if flag.starts_with('-') => {}
            filter if !"nemesis".contains(filter) => return Ok(None),
            _ => {}
        }
    }
    Ok(Some(args))
}

/// Set by SIGINT or SIGTERM: the run stops injecting, stops what it started and
/// removes it (a run killed outright would leave its processes and tc rules behind).
fn on_signal() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        set.store(true, Ordering::Relaxed);
    });
    flag
}

/// One run at a time on a machine: runs share loopback's tc rules (a second would
/// replace the first's, and remove them when it ends) and the addresses
/// 127.0.0.11–20. Held (an flock) until the process exits.
fn lock_the_machine() -> Result<std::fs::File, String> {
    let path = std::path::Path::new("/run/lock/stillpoint-nemesis.lock");
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another nemesis run is under way on this machine (it holds {}): runs share \
             loopback's tc rules and the addresses 127.0.0.11-20, so they cannot overlap; \
             wait for it to end, or stop it with SIGINT",
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("{}: {e}", path.display())),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nemesis: {error}");
            return ExitCode::from(2);
        }
    };
    let _machine = match lock_the_machine() {
        Ok(lock) => lock,
        Err(error) => {
            eprintln!("nemesis: {error}");
            return ExitCode::from(2);
        }
    };
    // From the start: a signal during set-up must not kill the run before it can stop
    // what it started.
    let interrupted = on_signal();
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/nemesis")
        .join(format!("seed-{}", args.seed));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let history = Arc::new(History::create(&out.join("history.jsonl")));
    let started = Instant::now();
    eprintln!(
        "nemesis: seed {}, {:?} of faults, {} storage; history in {}",
        args.seed,
        args.duration,
        if args.s3 { "S3" } else { "file" },
        history.path.display()
    );

    let mut env = Env::start(args.s3, args.seed);
    let mut peers: Vec<std::net::Ipv4Addr> = env
        .ledgers()
        .map(|node| match node.admin.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(_) => unreachable!("IPv4 admin addresses"),
        })
        .collect();
    peers.push(STORAGE_HOST);
    let lanes = net::Lanes::install(&peers).unwrap_or_else(|error| panic!("{error}"));
    history.log(
        "run_start",
        json!({
            "seed": args.seed,
            "duration_s": args.duration.as_secs(),
            "storage": if args.s3 { "s3" } else { "file" },
            "faults": faults::Kind::all(args.s3).iter().map(|kind| kind.name()).collect::<Vec<_>>(),
            "dir": env.dir,
        }),
    );

    env.start_service();
    history.log("service_started", json!({}));
    // The first base backup, with the service's archivers running: points need it.
    let base = env
        .stillpoint()
        .args(["base-backup", "--config"])
        .arg(&env.runbook)
        .output()
        .unwrap();
    assert!(
        base.status.success(),
        "the first base backup failed: {}",
        String::from_utf8_lossy(&base.stderr)
    );
    history.log("base_backup", json!({}));
    let observer = observe::Observer::start(
        env.nodes
            .iter()
            .map(|node| (node.name.clone(), node.admin))
            .collect(),
        history.clone(),
    );
    let watcher = watch::Watcher::start(&env.runbook, history.clone());

    let injected = faults::schedule(
        &mut env,
        &lanes,
        &history,
        &observer.paused,
        &interrupted,
        args.seed,
        args.s3,
        args.duration,
    );
    history.log("faults_over", json!({ "injected": injected }));
    if interrupted.load(Ordering::Relaxed) {
        // Everything this run started is stopped and removed on the way out; the tc
        // rules too.
        eprintln!("nemesis: interrupted; stopping everything it started, no check");
        drop(observer);
        drop(watcher);
        return ExitCode::from(130);
    }

    // With everything healed, the service must list a new point within 90 s.
    let mut violations = Vec::new();
    let listed = |env: &Env| {
        env.api("/api/v1/points")
            .and_then(|answer| answer["points"].as_array().map(Vec::len))
    };
    let before = listed(&env).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(90);
    let recovered = loop {
        if listed(&env).is_some_and(|now| now > before) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    history.log("recovered", json!({ "point_after_faults": recovered }));
    if !recovered {
        violations.push(check::Violation {
            kind: "recovery",
            detail: "no point was listed within 90 s after the last fault healed".to_owned(),
        });
    }
    env.stop_service();
    history.log("service_stopped", json!({}));
    drop(watcher);
    // Watched until no ledger node is paused (or two leases have passed): a node left
    // paused after the service's release is then seen outliving its lease.
    let watching = Instant::now();
    while observer.paused.load(Ordering::Relaxed) && watching.elapsed() < env::LEASE * 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(observer);
    env.stop_load();
    drop(lanes);
    history.log("load_stopped", json!({}));

    let lines = history::read(&history.path);
    let mut figures = check::Figures {
        paused_samples: check::lease(&lines, &mut violations),
        points_seen: check::listing(&lines, &mut violations),
        failed_requests: check::clients(&env, &lines, &mut violations),
        ..Default::default()
    };
    let lost = check::lost_audits(&env, &lines, &mut violations);
    figures.lost_audits = lost.len();
    check::points(
        &env,
        &history,
        &lines,
        args.seed,
        args.drill_sample,
        &lost,
        &mut violations,
        &mut figures,
    );

    let lines = history::read(&history.path);
    let mut by_kind = std::collections::BTreeMap::<String, u64>::new();
    for line in lines.iter().filter(|line| line["event"] == "fault_start") {
        *by_kind
            .entry(line["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let summary = json!({
        "seed": args.seed,
        "duration_s": args.duration.as_secs(),
        "run_s": started.elapsed().as_secs(),
        "storage": if args.s3 { "s3" } else { "file" },
        "faults": injected,
        "faults_by_kind": by_kind,
        "points_listed": figures.points_listed,
        "points_drilled": figures.points_drilled,
        "points_passed": figures.points_passed,
        "points_seen_at_listing": figures.points_seen,
        "points_broken_by_lost_chunks": figures.gaps_reported,
        "lost_audits": figures.lost_audits,
        "failed_requests": figures.failed_requests,
        "paused_samples": figures.paused_samples,
        "violations": violations.iter().map(|v| json!({ "kind": v.kind, "detail": v.detail })).collect::<Vec<_>>(),
    });
    std::fs::write(out.join("summary.json"), format!("{summary:#}\n")).unwrap();
    println!("{summary:#}");
    // The processes' logs, beside the history.
    for entry in std::fs::read_dir(&env.dir).unwrap().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".log") || name.ends_with(".stderr") || name.ends_with(".json") {
            let _ = std::fs::copy(entry.path(), out.join(&*name));
        }
    }
    if violations.is_empty() {
        eprintln!("nemesis: 0 violations");
        ExitCode::SUCCESS
    } else {
        for violation in &violations {
            eprintln!(
                "nemesis: VIOLATION ({}): {}",
                violation.kind, violation.detail
            );
        }
        eprintln!(
            "nemesis: {} violation(s); replay with scripts/nemesis --seed {} --duration {}s{}",
            violations.len(),
            args.seed,
            args.duration.as_secs(),
            if args.s3 { "" } else { " --storage file" }
        );
        ExitCode::FAILURE
    }
}
