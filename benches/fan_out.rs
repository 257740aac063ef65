//! Fan-out: how long `coordinator::pause` takes until every node is paused, for 1, 8,
//! 32 and 64 admin endpoints (lightweight in-process nodes, real gRPC over loopback),
//! and the ratio 64 / 1. Each pause connects to every node and samples its clock, then
//! pauses them, as a backup does; the nodes are released after each measurement. It
//! also times the part the cluster feels: from the first pause request reaching a node
//! until every node is paused (connecting and sampling pause nothing).
//!
//! The nodes run in this process, on the same cores as the coordinator, so the
//! benchmark also reports the CPU each whole pause + release cycle cost and how busy
//! it kept the cores: on a machine with few cores, a parallel fan-out becomes
//! CPU-bound long before it becomes latency-bound.
//!
//! Run: `scripts/bench fan_out`, or `cargo bench --bench fan_out [-- --quick]`.

mod support;

use std::time::{Duration, Instant};

use stillpoint::coordinator::{self, PausePlan};
use stillpoint::resolve::parse_address_list;
use support::{FirstPause, Flags, Row, Target, median, ms, percentile};
use tokio_util::sync::CancellationToken;

const SIZES: [usize; 4] = [1, 8, 32, 64];
const SECTION: &str = "4. fan-out";
/// Idle time after each cycle, for its connections to close.
const SETTLE: Duration = Duration::from_millis(20);

fn main() {
    let flags = Flags::parse();
    let rounds = if flags.quick { 3 } else { 30 };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shutdown = CancellationToken::new();
    let first_pause = FirstPause::default();
    let results = runtime.block_on(async {
        let (addresses, servers) = support::start_admin_nodes_watched(
            *SIZES.last().unwrap(),
            shutdown.clone(),
            first_pause.clone(),
        )
        .await;
        // One warm-up pause of every node: first-use costs (lazy statics, the
        // allocator's first pages) are not what this measures.
        pause_once(&addresses, &first_pause).await;
        let mut cycles: Vec<Vec<Cycle>> = (0..SIZES.len()).map(|_| Vec::new()).collect();
        // Sizes interleaved round by round, so a slow spell on the machine (other
        // builds run beside this) hits every size alike.
        for _ in 0..rounds {
            for (index, &size) in SIZES.iter().enumerate() {
                cycles[index].push(pause_once(&addresses[..size], &first_pause).await);
            }
        }
        shutdown.cancel();
        for server in servers {
            server.await.unwrap();
        }
        cycles
    });
    let cycles = results;

    let mut table = format!(
        "{} {rounds} pauses per size, sizes interleaved; nodes and coordinator share the \
         machine's cores. CPU is the whole process's (coordinator and nodes), medians.\n\n\
         | admin endpoints | until all paused | p90 | of which paused: first pause request \
         → all paused | cores busy until all paused | CPU per endpoint, pause + release |\n\
         |---|---|---|---|---|---|\n",
        support::measured_line("scripts/bench fan_out")
    );
    let mut until_paused = Vec::new();
    let mut pausing_medians = Vec::new();
    for (size, cycles) in SIZES.iter().zip(&cycles) {
        let walls: Vec<f64> = cycles.iter().map(|c| ms(c.paused)).collect();
        let pausing: Vec<f64> = cycles.iter().map(|c| ms(c.pausing)).collect();
        let busy: Vec<f64> = cycles
            .iter()
            .map(|c| c.cpu_until_paused.as_secs_f64() / c.paused.as_secs_f64())
            .collect();
        let per_endpoint: Vec<f64> = cycles.iter().map(|c| ms(c.cpu) / *size as f64).collect();
        table.push_str(&format!(
            "| {size} | {:.1} ms | {:.1} ms | {:.2} ms | {:.2} | {:.2} ms |\n",
            median(&walls),
            percentile(&walls, 90.0),
            median(&pausing),
            median(&busy),
            median(&per_endpoint),
        ));
        until_paused.push(median(&walls));
        pausing_medians.push(median(&pausing));
    }
    let (one, most) = (until_paused[0], until_paused[SIZES.len() - 1]);
    let ratio = most / one;
    let (pausing_one, pausing_most) = (pausing_medians[0], pausing_medians[SIZES.len() - 1]);
    let pausing_ratio = pausing_most / pausing_one;
    table.push_str(&format!(
        "\n**64 / 1: {ratio:.2}×** (target ≤ 2×) until all paused; {pausing_ratio:.2}× from \
         the first pause request. CPU is the sum of the process's threads' \
         time on a CPU (/proc/self/task/*/schedstat); a cycle's CPU includes closing its \
         connections ({settle} ms after the release, before the next cycle starts).",
        settle = SETTLE.as_millis()
    ));
    let rows = [
        Row::new(
            SECTION,
            "time until all paused, 64 endpoints vs 1",
            format!("{most:.1} ms (64)"),
            format!("{one:.1} ms (1)"),
            Some(ratio),
            Target::AtMost(2.0),
        ),
        Row::new(
            SECTION,
            "of which paused (first pause request → all paused), 64 vs 1",
            format!("{pausing_most:.2} ms (64)"),
            format!("{pausing_one:.2} ms (1)"),
            Some(pausing_ratio),
            Target::None,
        ),
    ];
    flags.publish("fan-out", &table, &rows);
}

/// One pause + release cycle.
struct Cycle {
    /// Until `coordinator::pause` returned: every node paused.
    paused: Duration,
    /// From the first pause request reaching a node until `coordinator::pause` returned.
    pausing: Duration,
    /// CPU time of the whole process (coordinator and nodes) meanwhile.
    cpu_until_paused: Duration,
    /// CPU time of the whole cycle, release and closing the connections included.
    cpu: Duration,
}

/// Pauses `addresses` as one tier and releases them.
async fn pause_once(addresses: &[String], first_pause: &FirstPause) -> Cycle {
    let nodes = parse_address_list(&addresses.join(",")).unwrap();
    let plan = PausePlan::new(vec![nodes], Duration::from_secs(30), Duration::from_secs(5));
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let paused = coordinator::pause(&plan).await.expect("pause");
    let returned = Instant::now();
    let until_paused = returned - started;
    let pausing = returned - first_pause.take().expect("a pause request reached a node");
    let cpu_until_paused = process_cpu_time().saturating_sub(cpu_before);
    let released = paused.release().await;
    assert!(released.all_released(), "a node was not released");
    // Connections close in their own tasks after the release; let them, so that
    // this cycle pays for its own and the next starts on a quiet process.
    tokio::time::sleep(SETTLE).await;
    Cycle {
        paused: until_paused,
        pausing,
        cpu_until_paused,
        cpu: process_cpu_time().saturating_sub(cpu_before),
    }
}

/// CPU time of this process's threads so far, in nanoseconds from each thread's
/// /proc/self/task/TID/schedstat (time on a CPU, exact, where /proc/self/stat counts
/// 10 ms ticks). The runtime's threads live for the whole benchmark, so none of the
/// time is lost with an exited thread.
fn process_cpu_time() -> Duration {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path().join("schedstat");
        // A thread may end between listing and reading.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap();
        }
    }
    Duration::from_nanos(total)
}
