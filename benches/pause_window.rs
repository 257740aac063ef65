//! Pause window vs database size: backs up a small and a more than ten times larger PostgreSQL
//! database through the whole protocol (pause → cut → unpause → copy → commit),
//! alternating between them, and reports the pause window of each as a ratio. The
//! window must not grow with the database: only the cut happens inside it.
//!
//! Run: `scripts/bench-window` (writes docs/performance.md), or
//! `cargo bench --bench pause_window` to print the table only.

use std::sync::Arc;
use std::time::Duration;

use stillpoint::backup;
use stillpoint::gate::{ClosedPolicy, Gate};
use stillpoint::node::NodeAdmin;
use stillpoint::runbook::Runbook;
use stillpoint_testkit::Postgres;
use tokio_util::sync::CancellationToken;

const SMALL_ROWS: u64 = 100_000;
const LARGE_ROWS: u64 = 15 * SMALL_ROWS;
const RUNS: usize = 7;
const NODES: usize = 4;

fn main() {
    let update_docs = std::env::args().any(|arg| arg == "--update-docs");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let postgres = Postgres::start();
    for (name, rows) in [("small", SMALL_ROWS), ("large", LARGE_ROWS)] {
        postgres.create_database(name);
        postgres.psql(
            name,
            &format!(
                "CREATE TABLE ledger (id bigint PRIMARY KEY, payload text NOT NULL); \
                 INSERT INTO ledger SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, {rows}) g; \
                 VACUUM ANALYZE ledger;"
            ),
        );
    }
    let size = |name: &str| -> u64 {
        postgres
            .psql(name, "SELECT pg_database_size(current_database())")
            .trim()
            .parse()
            .unwrap()
    };
    let (small_bytes, large_bytes) = (size("small"), size("large"));

    let storage = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let results = runtime.block_on(async {
        let (nodes, servers) = start_nodes(NODES, shutdown.clone()).await;
        let mut windows: [Vec<Duration>; 2] = Default::default();
        let mut cuts: [Vec<Duration>; 2] = Default::default();
        for run in 0..RUNS * 2 {
            let which = run % 2;
            let database = ["small", "large"][which];
            let runbook = runbook(&nodes, &postgres.url(database), storage.path());
            let manifest = backup::run(&runbook, Arc::new(|_| {}))
                .await
                .expect("backup");
            windows[which].push(Duration::from_millis(
                manifest.window.window_ms.unwrap() as u64
            ));
            cuts[which].push(Duration::from_millis(manifest.timings.cut_ms));
        }
        shutdown.cancel();
        for server in servers {
            server.await.unwrap();
        }
        (windows, cuts)
    });
    let (windows, cuts) = results;
    let median = |values: &[Duration]| {
        let mut sorted = values.to_vec();
        sorted.sort();
        sorted[sorted.len() / 2]
    };
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let (small_window, large_window) = (median(&windows[0]), median(&windows[1]));
    let table = format!(
        "Measured {} on {} ({} cores), `scripts/bench-window`: {RUNS} backups of each \
         database, alternating, {NODES} admin nodes; medians.\n\n\
         | database | size | pause window | cut | \n|---|---|---|---|\n\
         | small ({SMALL_ROWS} rows) | {:.0} MiB | {:.0} ms | {:.0} ms |\n\
         | large ({LARGE_ROWS} rows) | {:.0} MiB | {:.0} ms | {:.0} ms |\n\n\
         **Window ratio large / small: {:.2}×** (target ≤ 1.2×) for a database {:.1}× larger.",
        today(),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, usize::from),
        small_bytes as f64 / 1048576.0,
        ms(small_window),
        ms(median(&cuts[0])),
        large_bytes as f64 / 1048576.0,
        ms(large_window),
        ms(median(&cuts[1])),
        ms(large_window) / ms(small_window),
        large_bytes as f64 / small_bytes as f64,
    );
    println!("{table}");
    if update_docs {
        replace_section("docs/performance.md", "pause-window", &table);
    }
}

fn runbook(nodes: &[String], url: &str, storage: &std::path::Path) -> Runbook {
    let text = format!(
        "cluster = \"bench\"\n[pause]\ntiers = [{{ addresses = [{}] }}]\nlease = \"30s\"\nmax_wait = \"5s\"\n\
         [[databases]]\nname = \"ledger\"\nadapter = \"postgres\"\nurl = \"{url}\"\n\
         [pipeline]\nzstd_level = 3\n[storage]\nurl = \"file://{}\"\n",
        nodes
            .iter()
            .map(|node| format!("\"{node}\""))
            .collect::<Vec<_>>()
            .join(", "),
        storage.display()
    );
    Runbook::parse(&text, std::path::Path::new(".")).unwrap()
}

/// Lightweight nodes: just the admin services around a gate, as an application would
/// embed them.
async fn start_nodes(
    count: usize,
    shutdown: CancellationToken,
) -> (Vec<String>, Vec<tokio::task::JoinHandle<()>>) {
    let mut addresses = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..count {
        let admin = Arc::new(NodeAdmin::new(
            Arc::new(Gate::new(ClosedPolicy::Reject)),
            None,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addresses.push(listener.local_addr().unwrap().to_string());
        let routes = stillpoint::grpc::server::admin_routes(admin.clone()).await;
        let shutdown = shutdown.clone();
        servers.push(tokio::spawn(async move {
            let serving = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    shutdown.clone().cancelled_owned(),
                );
            let (served, ()) = tokio::join!(serving, admin.run_lease_watchdog(shutdown));
            served.unwrap();
        }));
    }
    (addresses, servers)
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// Rewrites the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
fn replace_section(path: &str, name: &str, body: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let (head, rest) = text.split_once(&begin).expect("begin marker");
    let (_, tail) = rest.split_once(&end).expect("end marker");
    std::fs::write(path, format!("{head}{begin}\n{body}\n{end}{tail}")).unwrap();
    eprintln!("updated {path}");
}
