//! Fan-out: how long `coordinator::pause` takes until every node is paused, for 1, 8,
//! 32 and 64 admin endpoints (lightweight in-process nodes, real gRPC over loopback),
//! and the ratio 64 / 1. Each pause connects to every node, samples its clock and
//! pauses it, as a backup does; the nodes are released after each measurement.
//!
//! The nodes run in this process, on the same cores as the coordinator, so the
//! benchmark also reports how busy the process kept the CPU: on a machine with few
//! cores, a parallel fan-out becomes CPU-bound long before it becomes latency-bound.
//!
//! Run: `scripts/bench fan_out`, or `cargo bench --bench fan_out [-- --quick]`.

mod support;

use std::time::{Duration, Instant};

use stillpoint::coordinator::{self, PausePlan};
use stillpoint::resolve::parse_address_list;
use support::{Flags, Row, Target, median, ms, percentile};
use tokio_util::sync::CancellationToken;

const SIZES: [usize; 4] = [1, 8, 32, 64];
const SECTION: &str = "4. fan-out";

fn main() {
    let flags = Flags::parse();
    let rounds = if flags.quick { 3 } else { 30 };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shutdown = CancellationToken::new();
    let results = runtime.block_on(async {
        let (addresses, servers) =
            support::start_admin_nodes(*SIZES.last().unwrap(), shutdown.clone()).await;
        // One warm-up pause of every node: first-use costs (lazy statics, the
        // allocator's first pages) are not what this measures.
        pause_once(&addresses).await;
        let mut walls: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
        let mut cpu = vec![Duration::ZERO; SIZES.len()];
        let mut wall_total = vec![Duration::ZERO; SIZES.len()];
        // Sizes interleaved round by round, so a slow spell on the machine (other
        // builds run beside this) hits every size alike.
        for _ in 0..rounds {
            for (index, &size) in SIZES.iter().enumerate() {
                let (wall, cpu_used) = pause_once(&addresses[..size]).await;
                cpu[index] += cpu_used;
                wall_total[index] += wall;
                walls[index].push(ms(wall));
            }
        }
        shutdown.cancel();
        for server in servers {
            server.await.unwrap();
        }
        (walls, cpu, wall_total)
    });
    let (walls, cpu, wall_total) = results;

    let mut table = format!(
        "{} {rounds} pauses per size, sizes interleaved; nodes and coordinator share the \
         machine's cores.\n\n\
         | admin endpoints | until all paused, median | p90 | process CPU per pause | cores busy |\n\
         |---|---|---|---|---|\n",
        support::measured_line("scripts/bench fan_out")
    );
    for (index, size) in SIZES.iter().enumerate() {
        let per_pause_cpu = cpu[index].as_secs_f64() * 1000.0 / rounds as f64;
        table.push_str(&format!(
            "| {size} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} |\n",
            median(&walls[index]),
            percentile(&walls[index], 90.0),
            per_pause_cpu,
            cpu[index].as_secs_f64() / wall_total[index].as_secs_f64(),
        ));
    }
    let (one, most) = (median(&walls[0]), median(&walls[SIZES.len() - 1]));
    let ratio = most / one;
    table.push_str(&format!(
        "\n**64 / 1: {ratio:.2}×** (target ≤ 2×). Process CPU is read from /proc/self/stat \
         (10 ms ticks, summed over all pauses of a size)."
    ));
    let rows = [Row::new(
        SECTION,
        "time until all paused, 64 endpoints vs 1",
        format!("{most:.1} ms (64)"),
        format!("{one:.1} ms (1)"),
        Some(ratio),
        Target::AtMost(2.0),
    )];
    flags.publish("fan-out", &table, &rows);
}

/// Pauses `addresses` as one tier, releases them, and returns how long the pause took
/// to return (every node paused) and the CPU time the process used meanwhile.
async fn pause_once(addresses: &[String]) -> (Duration, Duration) {
    let nodes = parse_address_list(&addresses.join(",")).unwrap();
    let plan = PausePlan::new(vec![nodes], Duration::from_secs(30), Duration::from_secs(5));
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let paused = coordinator::pause(&plan).await.expect("pause");
    let elapsed = started.elapsed();
    let cpu_used = process_cpu_time().saturating_sub(cpu_before);
    let released = paused.release().await;
    assert!(released.all_released(), "a node was not released");
    (elapsed, cpu_used)
}

/// User + system CPU time of this process so far, from /proc/self/stat (fields 14
/// and 15, in clock ticks of 1/100 s, Linux's USER_HZ).
fn process_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3, so field N is fields[N - 3].
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}
