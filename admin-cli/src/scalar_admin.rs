//! `scalar-admin`: accepts the upstream ScalarDL/ScalarDB client's flags
//! (`-c PAUSE|UNPAUSE|CHECK_PAUSED -a host:port,… | -s SRV [-n] [-m MS] [--tls …]`) so
//! existing runbooks keep working, and speaks only the upstream `rpc.Admin` API.
//!
//! Unlike the upstream client it rolls back a partial pause: if one node fails to
//! pause, the others are unpaused before it exits non-zero.

use std::time::{Duration, SystemTime};

use clap::Parser;
use stillpoint::coordinator::{PausePlan, PauseReport};
use stillpoint::time::{Zone, unix_ms};
use stillpoint_node::grpc::UPSTREAM_DEFAULT_MAX_WAIT;

use crate::args::{ConnectArgs, OutputFormat, TierSource, resolve_tiers};
use crate::exit::{self, Failure};
use crate::output::print_json;
use crate::pause;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    Pause,
    Unpause,
    CheckPaused,
}

fn admin_command(text: &str) -> Result<AdminCommand, String> {
    match text.to_ascii_uppercase().as_str() {
        "PAUSE" => Ok(AdminCommand::Pause),
        "UNPAUSE" => Ok(AdminCommand::Unpause),
        "CHECK_PAUSED" => Ok(AdminCommand::CheckPaused),
        _ => Err(format!(
            "unknown command {text:?}; use PAUSE, UNPAUSE or CHECK_PAUSED"
        )),
    }
}

/// Pause, unpause or check a cluster through the upstream admin API (a drop-in for the
/// ScalarDL/ScalarDB scalar-admin client). Prints one JSON object on stdout.
#[derive(Debug, Parser)]
#[command(name = "scalar-admin", version, after_help = exit::HELP)]
pub struct ScalarAdminCli {
    /// PAUSE, UNPAUSE or CHECK_PAUSED (any case).
    #[arg(short = 'c', long = "command", value_parser = admin_command, value_name = "COMMAND")]
    pub command: AdminCommand,

    /// Comma-separated host:port admin endpoints.
    #[arg(
        short = 'a',
        long = "addresses",
        value_name = "HOST:PORT,…",
        required_unless_present = "srv"
    )]
    pub addresses: Option<String>,

    /// A DNS SRV service name whose targets are the nodes.
    #[arg(
        short = 's',
        long = "srv-service-url",
        value_name = "NAME",
        conflicts_with = "addresses"
    )]
    pub srv: Option<String>,

    /// Ask this DNS server (ip:port) for the SRV record instead of the system resolver.
    #[arg(long, value_name = "IP:PORT")]
    pub dns_server: Option<std::net::SocketAddr>,

    /// PAUSE: close the gates without waiting for in-flight requests.
    #[arg(short = 'n', long = "no-wait")]
    pub no_wait: bool,

    /// PAUSE: milliseconds each node may take to drain [default: 30000].
    #[arg(short = 'm', long = "max-pause-wait-time", value_name = "MS")]
    pub max_pause_wait_time: Option<u64>,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run() -> Result<u8, Failure> {
    let cli = ScalarAdminCli::parse();
    let source = match (&cli.addresses, &cli.srv) {
        (Some(list), _) => TierSource::Addresses(list.clone()),
        (None, Some(name)) => TierSource::Srv(name.clone()),
        (None, None) => unreachable!("clap requires -a or -s"),
    };
    let tiers = resolve_tiers(&[source], cli.dns_server).await?;
    let connect = cli.connect.options()?;
    let zone = Zone::UTC;
    match cli.command {
        AdminCommand::Pause => {
            let max_wait = cli
                .max_pause_wait_time
                .map_or(UPSTREAM_DEFAULT_MAX_WAIT, Duration::from_millis);
            let mut plan = PausePlan::new(tiers, Duration::from_secs(3600), max_wait);
            plan.connect = connect;
            plan.wait_outstanding = !cli.no_wait;
            plan.upstream_only = true;
            plan.validate()
                .map_err(|error| Failure::new(exit::USAGE, error))?;
            // A signal mid-way rolls back the nodes already paused.
            let mut interrupts = pause::interrupts()?;
            match pause::pause_unless_interrupted(&plan, &mut interrupts).await? {
                Ok(paused) => {
                    let renewed_at = paused.last_renewal();
                    let record = paused.detach();
                    let mut report = PauseReport::open(&record, renewed_at, zone);
                    // Upstream pauses have no lease of ours; the node's own applies.
                    report.lease_expires_at_ms = None;
                    print_json(&report);
                    Ok(exit::OK)
                }
                Err(failure) => {
                    print_json(&PauseReport::failed(&failure, 0, zone));
                    let code = if failure.rolled_back {
                        exit::PAUSE_FAILED
                    } else {
                        exit::UNPAUSE_FAILED
                    };
                    Err(Failure::new(code, failure))
                }
            }
        }
        AdminCommand::Unpause => {
            let end = unix_ms(SystemTime::now());
            crate::errln!("pause_end_timestamp_ms: {end} ({})", zone.format_ms(end));
            pause::unpause_without_record(tiers, &connect, OutputFormat::Json, Vec::new()).await
        }
        AdminCommand::CheckPaused => {
            let nodes: Vec<_> = tiers.into_iter().flatten().collect();
            pause::check_nodes(&nodes, &connect, OutputFormat::Json).await
        }
    }
}
