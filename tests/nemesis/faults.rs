//! The faults and their seeded schedule. One fault at a time: each kind this run's
//! storage allows once per round, in a shuffled order, held for a random while, then
//! healed, with a random quiet gap before the next. Every start and end goes into the history with
//! what it touched, so the checker can tell which node was down when.

use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::env::{Env, LEASE, STORAGE_HOST, Storage};
use crate::history::History;
use crate::net::{Lane, Lanes};
use crate::store::{self, PATIENCE};

/// A seeded generator (splitmix64): the same seed gives the same schedule.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.between(low, high))
    }
}

/// What can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KillLedgerNode,
    KillAuditor,
    /// One of the service's log streamers (pg_receivewal or mariadb-binlog): the
    /// archiver's own process, which its supervision must start again.
    KillArchiver,
    KillService,
    KillPostgres,
    KillMariadb,
    StorageStopped,
    StorageSlow,
    /// The service cut off from one ledger node (its lease renewals and releases lost).
    PartitionNode,
    /// One ledger node's wall clock stepped by more than the skew margin.
    ClockStep,
    /// The file storage's filesystem full.
    DiskFull,
    /// A chunk the next points need deleted from storage: a gap no archiver can
    /// close, the log having moved past it. Healed by a base backup after it.
    LoseChunk,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillLedgerNode => "kill_ledger_node",
            Kind::KillAuditor => "kill_auditor",
            Kind::KillArchiver => "kill_archiver",
            Kind::KillService => "kill_service",
            Kind::KillPostgres => "kill_postgres",
            Kind::KillMariadb => "kill_mariadb",
            Kind::StorageStopped => "storage_stopped",
            Kind::StorageSlow => "storage_slow",
            Kind::PartitionNode => "partition_node",
            Kind::ClockStep => "clock_step",
            Kind::DiskFull => "disk_full",
            Kind::LoseChunk => "lose_chunk",
        }
    }

    /// The faults a run with this storage can inject.
    pub fn all(s3: bool) -> Vec<Kind> {
        let mut kinds = vec![
            Kind::KillLedgerNode,
            Kind::KillAuditor,
            Kind::KillArchiver,
            Kind::KillService,
            Kind::KillPostgres,
            Kind::KillMariadb,
            Kind::PartitionNode,
            Kind::ClockStep,
            Kind::LoseChunk,
        ];
        if s3 {
            kinds.extend([Kind::StorageStopped, Kind::StorageSlow]);
        } else {
            kinds.push(Kind::DiskFull);
        }
        kinds
    }
}

/// Waits (at most 10 s) until the observer sees a ledger node paused: a fault that
/// lands inside a pause is the one that tests the lease and the release.
fn at_a_pause(paused: &AtomicBool) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if paused.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Injects one fault, holds it, heals it, and logs both ends. Returns when healed and
/// whatever was restarted is up again; false when there was nothing to inject it
/// into. Half of the partitions and service kills wait for a pause first.
pub fn inject(
    env: &mut Env,
    lanes: &Lanes,
    history: &History,
    rng: &mut Rng,
    paused: &AtomicBool,
    kind: Kind,
) -> bool {
    let in_pause = matches!(kind, Kind::PartitionNode | Kind::KillService)
        && rng.next().is_multiple_of(2)
        && at_a_pause(paused);
    let ledger = format!("ledger-{}", rng.between(0, 2));
    let start = |target: &str, fields: serde_json::Value| {
        let mut line = json!({ "kind": kind.name(), "target": target, "in_pause": in_pause });
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        history.log("fault_start", line);
    };
    let end = |target: &str| {
        history.log(
            "fault_end",
            json!({ "kind": kind.name(), "target": target }),
        )
    };
    match kind {
        Kind::KillLedgerNode | Kind::KillAuditor => {
            let name = if kind == Kind::KillAuditor {
                "auditor".to_owned()
            } else {
                ledger
            };
            // The auditor at most 8 s: ledger nodes retry their records for 30 s.
            let down = rng.millis(500, 8000);
            start(&name, json!({ "down_ms": down.as_millis() as u64 }));
            env.node(&name).kill();
            std::thread::sleep(down);
            env.node(&name).start();
            end(&name);
        }
        Kind::KillArchiver => {
            let streamers = env.streamers();
            if streamers.is_empty() {
                history.log(
                    "fault_skipped",
                    json!({ "kind": kind.name(), "why": "no streamer runs" }),
                );
                return false;
            }
            let (pid, name) = &streamers[rng.between(0, streamers.len() as u64 - 1) as usize];
            start(name, json!({ "pid": pid }));
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            end(name);
        }
        Kind::KillService => {
            let down = rng.millis(200, 6000);
            start("service", json!({ "down_ms": down.as_millis() as u64 }));
            env.kill_service();
            std::thread::sleep(down);
            env.start_service();
            end("service");
        }
        Kind::KillPostgres => {
            let down = rng.millis(500, 6000);
            start("postgres", json!({ "down_ms": down.as_millis() as u64 }));
            env.postgres.kill();
            std::thread::sleep(down);
            env.postgres.restart();
            end("postgres");
        }
        Kind::KillMariadb => {
            let down = rng.millis(500, 6000);
            start("mariadb", json!({ "down_ms": down.as_millis() as u64 }));
            env.mariadb.kill();
            std::thread::sleep(down);
            env.mariadb.restart();
            end("mariadb");
        }
        Kind::StorageStopped => {
            let Storage::S3 { process, .. } = &env.storage else {
                unreachable!("only with S3 storage")
            };
            let down = rng.millis(1000, 10_000);
            start("storage", json!({ "down_ms": down.as_millis() as u64 }));
            process.signal("STOP");
            std::thread::sleep(down);
            process.signal("CONT");
            end("storage");
        }
        Kind::StorageSlow => {
            let slow = rng.millis(2000, 15_000);
            start("storage", json!({ "slow_ms": slow.as_millis() as u64 }));
            lanes.set(STORAGE_HOST, Lane::Slow);
            std::thread::sleep(slow);
            lanes.set(STORAGE_HOST, Lane::Open);
            end("storage");
        }
        Kind::PartitionNode => {
            // Sometimes shorter than the lease (renewals late), sometimes longer (the
            // node must reopen by itself and the pause fail).
            let cut = rng.millis(1000, LEASE.as_millis() as u64 + 5000);
            let node = env.node(&ledger);
            let IpAddr::V4(address) = node.admin.ip() else {
                unreachable!("admin addresses are IPv4")
            };
            start(&ledger, json!({ "cut_ms": cut.as_millis() as u64 }));
            lanes.set(address, Lane::Cut);
            std::thread::sleep(cut);
            lanes.set(address, Lane::Open);
            end(&ledger);
        }
        Kind::ClockStep => {
            // More than any skew margin, either way.
            let sign = if rng.next().is_multiple_of(2) { 1 } else { -1 };
            let step = rng.between(10, 120) as i64 * sign;
            let hold = rng.millis(2000, 15_000);
            let clock = env.node(&ledger).clock.clone().unwrap();
            start(
                &ledger,
                json!({ "step_s": step, "hold_ms": hold.as_millis() as u64 }),
            );
            std::fs::write(&clock, format!("{step:+}\n")).unwrap();
            std::thread::sleep(hold);
            std::fs::write(&clock, "+0\n").unwrap();
            end(&ledger);
        }
        Kind::LoseChunk => {
            // Points must stop being listed until a base backup after the gap (the
            // point's gap check), and `verify` must name the gap in every point listed
            // before that needs the chunk (the checker's rules).
            let first = if rng.next().is_multiple_of(2) {
                "ledger"
            } else {
                "auditor"
            };
            let second = if first == "ledger" {
                "auditor"
            } else {
                "ledger"
            };
            let pick = rng.next();
            let (storage, settings) = store::open(&env.runbook);
            let runtime = store::runtime();
            let lost = [first, second].into_iter().find_map(|database| {
                let losing = store::lose_chunk(&storage, &settings, database, pick);
                match runtime.block_on(async { tokio::time::timeout(PATIENCE, losing).await }) {
                    Ok(Ok(lost)) => lost,
                    Ok(Err(error)) => panic!("lose_chunk in {database}: {error}"),
                    Err(_) => panic!("lose_chunk in {database}: the storage did not answer"),
                }
            });
            let Some(lost) = lost else {
                history.log(
                    "fault_skipped",
                    json!({ "kind": kind.name(), "why": "no whole chunk after the newest base yet" }),
                );
                return false;
            };
            start(&lost.database, json!({ "lost": lost }));
            // A MariaDB base replays from the start of its binlog file: a new file
            // first, so that the base's replay begins past the gap.
            if lost.database == "auditor" {
                env.mariadb.sql("auditor", "FLUSH BINARY LOGS");
            }
            let mut tries = 0;
            loop {
                tries += 1;
                let base = env
                    .stillpoint()
                    .args(["base-backup", "--config"])
                    .arg(&env.runbook)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap();
                if base.status.success() {
                    break;
                }
                let why = String::from_utf8_lossy(&base.stderr).into_owned();
                history.log("heal_failed", json!({ "kind": kind.name(), "why": why }));
                if tries == 3 {
                    break;
                }
            }
            end(&lost.database);
        }
        Kind::DiskFull => {
            let Storage::File { mount } = &env.storage else {
                unreachable!("only with file storage")
            };
            let ballast = mount.join("ballast");
            let full = rng.millis(2000, 10_000);
            start("storage", json!({ "full_ms": full.as_millis() as u64 }));
            // Everything that is left, as one file: writes fail with ENOSPC (and so
            // does dd, at the end, which is the point).
            let _ = Command::new("dd")
                .args(["if=/dev/zero", "bs=1M", "status=none"])
                .arg(format!("of={}", ballast.display()))
                .stderr(std::process::Stdio::null())
                .status();
            std::thread::sleep(full);
            std::fs::remove_file(&ballast).unwrap();
            end("storage");
        }
    }
    true
}

/// Runs the schedule until `duration` has passed (or `interrupted`): a fault, then a
/// quiet gap.
#[allow(clippy::too_many_arguments)]
pub fn schedule(
    env: &mut Env,
    lanes: &Lanes,
    history: &History,
    paused: &AtomicBool,
    interrupted: &AtomicBool,
    seed: u64,
    s3: bool,
    duration: Duration,
) -> usize {
    let mut rng = Rng::new(seed);
    let mut kinds = Kind::all(s3);
    let started = Instant::now();
    let mut injected = 0;
    // Every kind once per round, in an order shuffled each round: even a short run
    // meets each of them.
    let over = || started.elapsed() >= duration || interrupted.load(Ordering::Relaxed);
    while !over() {
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.between(0, i as u64) as usize);
        }
        for kind in kinds.clone() {
            if over() {
                break;
            }
            std::thread::sleep(rng.millis(1000, 4000));
            if inject(env, lanes, history, &mut rng, paused, kind) {
                injected += 1;
            }
        }
    }
    injected
}
