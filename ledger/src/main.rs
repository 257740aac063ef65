//! `ledger-node`: serve a node of the reference ledger cluster, drive it with load, or
//! check a ledger and an auditor database against each other.
//!
//! Thin by design: parse arguments, set up tracing on stderr, bind, and call the
//! library. stdout carries only machine-readable lines (listening addresses, reports).
//!
//! Exit status: 0 success; 1 the load saw failed transfers or the check found a broken
//! invariant; 2 the command could not run (bad arguments, database, address, …).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use stillpoint_ledger::check::{self, Window};
use stillpoint_ledger::load::{self, Bound, LoadConfig};
use stillpoint_ledger::node::{DEFAULT_RECORD_RETRY_FOR, LedgerOptions};
use stillpoint_ledger::serve::{self, Role, ServeConfig};
use stillpoint_ledger::signal::cancel_on_signal;
use stillpoint_ledger::store::{self, DbUrl, Seed};
use stillpoint_node::gate::ClosedPolicy;
use stillpoint_node::grpc::auth::{AdminSecurity, AdminToken, Role as TokenRole, ServerTls};
use stillpoint_node::pause::MAX_LEASE;
use stillpoint_node::time::{format_duration, parse_duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ledger-node",
    version,
    about = "Reference ledger + auditor cluster for stillpoint"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one ledger or auditor node until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Send random transfers to ledger nodes and report how they ended.
    Load(LoadArgs),
    /// Check a ledger database and an auditor database against each other.
    Check(CheckArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Ledger,
    Auditor,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Hold requests that arrive during a pause until it ends (up to --hold-timeout).
    Hold,
    /// Refuse them at once with UNAVAILABLE.
    Reject,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Address for the application service (and the admin services, unless
    /// --admin-listen is given). Port 0 picks a free port; the chosen address is printed
    /// as `listening on ADDR`.
    #[arg(long)]
    listen: SocketAddr,
    /// The node's database: sqlite:PATH, postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE
    /// or mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (MySQL or MariaDB). A missing
    /// database is created. Ledger nodes of one cluster share one database; the auditor
    /// may use another kind than the ledger.
    #[arg(long, value_parser = parse_db_url, value_name = "URL")]
    db: DbUrl,
    /// The auditor node a ledger node records every transfer with (host:port).
    #[arg(long, required_if_eq("role", "ledger"))]
    auditor: Option<String>,
    /// Serve the admin services on their own address, printed as `admin listening on ADDR`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "hold")]
    closed_policy: PolicyArg,
    /// How long a held request waits for a pause to end before it is refused.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hold_timeout: Duration,
    /// Lease on pauses from upstream rpc.Admin clients. They cannot renew, so without a
    /// bound a client that dies mid-backup would leave the node paused until someone
    /// notices; a pause that ends by itself after 10 minutes is the safer failure.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    upstream_pause_lease: Duration,
    /// Accounts to seed an empty ledger database with (numbered 1..=N).
    #[arg(long, default_value_t = Seed::default().accounts)]
    accounts: u32,
    /// Balance of each seeded account.
    #[arg(long, default_value_t = Seed::default().initial_balance)]
    initial_balance: i64,
    /// Honour the test-only hold_inside_gate_ms field of Transfer.
    #[arg(long)]
    allow_slow_transfers: bool,
    /// Serve the admin services over TLS with this PEM certificate (chain). Needs
    /// --tls-key and --admin-listen: the application port stays plaintext.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "admin_listen"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: refuse admin calls (UNAUTHENTICATED) that present no certificate
    /// signed by this PEM CA. Needs --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Refuse admin calls (UNAUTHENTICATED) without `authorization: Bearer <token>`
    /// carrying the token in this file (at least 16 characters). A file, not a flag
    /// value, because command lines are visible to every user of the host.
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// A second token that may only read state (CheckPaused, Stats, Status), for
    /// monitoring; it gets PERMISSION_DENIED on Pause, Unpause and Renew.
    #[arg(long, value_name = "PATH")]
    admin_observer_token_file: Option<PathBuf>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("bound").required(true).args(["duration", "count"])))]
struct LoadArgs {
    /// Ledger nodes, comma-separated host:port; workers go round-robin across them.
    #[arg(long, value_delimiter = ',', required = true)]
    targets: Vec<String>,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Run this long (e.g. 3s).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Send this many transfers in all.
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// Seed of the random transfers; printed in the report so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// Accounts on the ledger (1..=N), as it was seeded.
    #[arg(long, default_value_t = Seed::default().accounts)]
    accounts: u32,
    /// Largest amount of one transfer.
    #[arg(long, default_value_t = 10)]
    max_amount: i64,
    /// Test-only: each transfer stays this long inside the ledger node's gate, to make
    /// a transaction that outlives a pause's max wait. Nodes refuse it unless started
    /// with --allow-slow-transfers.
    #[arg(long, value_parser = parse_duration, default_value = "0ms", value_name = "DURATION")]
    hold_inside_gate: Duration,
    /// Also write every transfer to this file, one line each: start (µs since the Unix
    /// epoch), latency (µs), outcome (ok, rejected, declined, failed). The pause
    /// benchmark uses it to compare transfers that met a pause with those that did not.
    #[arg(long, value_name = "PATH")]
    latency_log: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct CheckArgs {
    /// The ledger database: sqlite:PATH, postgres://USER@HOST:PORT/DATABASE or
    /// mysql://USER@HOST:PORT/DATABASE. Read in one snapshot; nothing is created or
    /// changed.
    #[arg(long, value_parser = parse_db_url, value_name = "URL")]
    ledger_db: DbUrl,
    /// The auditor database, in the same URL forms (it need not be the same kind).
    #[arg(long, value_parser = parse_db_url, value_name = "URL")]
    auditor_db: DbUrl,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// Also check that nothing was committed or recorded inside (start, end), in Unix
    /// milliseconds. The edges are outside: a stamp in the very millisecond of an edge
    /// cannot be told from one just before or after it. So the window must be at least
    /// 2 ms long (and at most 24 h, the longest pause); edges in seconds are refused.
    #[arg(long, requires = "window_end_ms", allow_negative_numbers = true)]
    window_start_ms: Option<i64>,
    /// The end of the window; see --window-start-ms.
    #[arg(long, requires = "window_start_ms", allow_negative_numbers = true)]
    window_end_ms: Option<i64>,
    /// A file of transaction ids, one per line, that may be in the ledger and missing
    /// from the auditor: their ledger node was killed between the two writes (this
    /// reference ledger has no outbox). For fault-injection runs (scripts/nemesis),
    /// which know them from the live databases; any other difference still fails.
    #[arg(long, value_name = "PATH")]
    known_unaudited: Option<std::path::PathBuf>,
}

fn parse_db_url(url: &str) -> Result<DbUrl, String> {
    url.parse()
        .map_err(|error: store::StoreError| error.to_string())
}

/// stderr for logs, dropping what cannot be written.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        // Write errors ignored: tracing reports a failed write with `eprintln!`, which
        // panics on a closed stderr (a log pipe whose reader died), in the middle of
        // whatever was logging: an admin call, the lease watchdog.
        .with_writer(|| QuietStderr)
        // Harnesses capture stderr into files; colour codes would only clutter them.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Load(args) => load(args).await,
            Command::Check(args) => check(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let security = admin_security(&args)?;
    let role = match (args.role, args.auditor) {
        (RoleArg::Auditor, _) => Role::Auditor,
        (RoleArg::Ledger, Some(auditor)) => Role::Ledger {
            auditor,
            seed: Seed {
                accounts: args.accounts,
                initial_balance: args.initial_balance,
            },
            options: LedgerOptions {
                allow_slow_transfers: args.allow_slow_transfers,
                record_retry_for: DEFAULT_RECORD_RETRY_FOR,
            },
        },
        (RoleArg::Ledger, None) => anyhow::bail!("a ledger node needs --auditor HOST:PORT"),
    };
    let closed_policy = match args.closed_policy {
        PolicyArg::Hold => ClosedPolicy::Hold {
            timeout: args.hold_timeout,
        },
        PolicyArg::Reject => ClosedPolicy::Reject,
    };
    anyhow::ensure!(
        !args.upstream_pause_lease.is_zero() && args.upstream_pause_lease <= MAX_LEASE,
        "--upstream-pause-lease {} is out of range; give 1ms to 24h",
        format_duration(args.upstream_pause_lease)
    );
    let node = serve::Node::open(ServeConfig {
        role,
        db: args.db,
        closed_policy,
        upstream_pause_lease: Some(args.upstream_pause_lease),
    })
    .await?
    .with_admin_security(security)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin_listener = match args.admin_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address}"))?,
        ),
        None => None,
    };
    // Test harnesses read these lines to learn ports chosen by the OS.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    if let Some(admin_listener) = &admin_listener {
        writeln!(
            stdout,
            "admin listening on {}",
            admin_listener.local_addr()?
        )?;
    }
    stdout.flush()?;
    drop(stdout);
    tracing::info!(boot_id = node.boot_id(), "serving");

    let shutdown = CancellationToken::new();
    let (served, ()) = tokio::join!(
        serve::run(node, listener, admin_listener, shutdown.clone()),
        cancel_on_signal(shutdown.clone()),
    );
    served?;
    Ok(ExitCode::SUCCESS)
}

/// The admin services' TLS and tokens, from the serve flags. Read before anything
/// listens, so a missing file is an error at start, not a node that answers anyone.
fn admin_security(args: &ServeArgs) -> anyhow::Result<AdminSecurity> {
    let mut security = AdminSecurity::default();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let mut tls = ServerTls::from_files(cert, key)?;
        if let Some(ca) = &args.client_ca {
            tls = tls.with_client_ca(stillpoint_node::grpc::auth::read_certificate_pem(
                "client CA",
                ca,
            )?);
        }
        security = security.with_tls(tls);
    }
    for (path, role) in [
        (&args.admin_token_file, TokenRole::Operator),
        (&args.admin_observer_token_file, TokenRole::Observer),
    ] {
        if let Some(path) = path {
            security = security
                .with_token(&AdminToken::from_file(path)?, role)
                .with_context(|| format!("admin token file {}", path.display()))?;
        }
    }
    if security.tls().is_none() && security.checks_calls() {
        tracing::warn!(
            "the admin token travels in plaintext without --tls-cert; use TLS beyond loopback"
        );
    }
    Ok(security)
}

async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let bound = match (args.duration, args.count) {
        (Some(duration), _) => Bound::For(duration),
        (None, Some(count)) => Bound::Count(count),
        (None, None) => anyhow::bail!("give --duration or --count"),
    };
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let config = LoadConfig {
        targets: args.targets,
        concurrency: args.concurrency,
        bound,
        seed,
        accounts: args.accounts,
        max_amount: args.max_amount,
        hold_inside_gate: args.hold_inside_gate,
        keep_samples: args.latency_log.is_some(),
    };
    let shutdown = CancellationToken::new();
    let (report, ()) = tokio::join!(
        async {
            let report = load::run(config, shutdown.clone()).await;
            // Ends the signal listener too.
            shutdown.cancel();
            report
        },
        cancel_on_signal(shutdown.clone()),
    );
    let report = report?;
    if let Some(path) = &args.latency_log {
        write_latency_log(path, &report.samples)
            .with_context(|| format!("cannot write the latency log {}", path.display()))?;
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&report)?),
        Output::Text => print!("{report}"),
    }
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_latency_log(path: &std::path::Path, samples: &[load::Sample]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for sample in samples {
        writeln!(
            out,
            "{} {} {}",
            sample.started_unix_us,
            sample.latency_us,
            sample.outcome.as_str()
        )?;
    }
    out.flush()
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let window = match (args.window_start_ms, args.window_end_ms) {
        (Some(start_ms), Some(end_ms)) => Some(
            Window::new(start_ms, end_ms)
                .map_err(|why| anyhow::anyhow!("--window-start-ms/--window-end-ms: {why}"))?,
        ),
        _ => None,
    };
    let (ledger, audit) = tokio::try_join!(
        store::read_ledger(&args.ledger_db),
        store::read_auditor(&args.auditor_db),
    )?;
    let known_unaudited = match &args.known_unaudited {
        None => Default::default(),
        Some(path) => std::fs::read_to_string(path)
            .map_err(|error| anyhow::anyhow!("--known-unaudited {}: {error}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    let report = check::check_knowing_unaudited(&ledger, &audit, window, &known_unaudited);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&report)?),
        Output::Text => print!("{report}"),
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
