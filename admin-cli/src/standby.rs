//! `stillpoint standby`: keep a standby set of databases following the primary's
//! archives point by point (in the foreground, until SIGINT/SIGTERM or a promotion),
//! `standby status` (lag per database, the newest point all passed) and `standby
//! promote` (every database stopped at one point, then promoted). Flags are checked
//! here; the work is `stillpoint::standby` (docs/runbooks/dr.md).

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Args, Subcommand};
use stillpoint::standby::{
    DatabaseStatus, Phase, PromoteReport, Standby, StandbyError, StatusReport,
};
use stillpoint::time::Zone;

use crate::args::OutputFormat;
use crate::backup::load_runbook;
use crate::exit::{self, Failure};
use crate::output::print_json;
use crate::signal::{Interrupts, unless_interrupted_again};

#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct StandbyArgs {
    #[command(subcommand)]
    pub action: Option<StandbyAction>,
    /// The standby's runbook: the primary's storage, its own databases by the same
    /// names, and a [standby] table (docs/runbook.md).
    #[arg(long, short = 'c', value_name = "FILE", required = true)]
    pub config: Option<PathBuf>,
    /// One round (every database to the newest point), then exit.
    #[arg(long)]
    pub once: bool,
    /// `text` for people, `json` for scripts (one JSON status per round).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Subcommand)]
pub enum StandbyAction {
    /// Each standby database's point, how far behind the archive it is (bytes, and
    /// time since its point), and the newest point every database has passed.
    Status(StatusArgs),
    /// Stop every standby database at one point (the newest they all reached, or
    /// --point), promote them, print the point.
    Promote(PromoteArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct PromoteArgs {
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The point: an id, `latest`, or a time (the newest point at or before it).
    /// Default: the newest point every standby database has reached.
    #[arg(long, value_name = "ID|latest|TIME")]
    pub point: Option<String>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

fn open(config: &std::path::Path) -> Result<Standby, Failure> {
    let runbook = load_runbook(config)?;
    let settings = stillpoint::backup::pipeline_settings(&runbook).map_err(usage)?;
    let decryption = stillpoint::backup::decryption(&runbook).map_err(usage)?;
    Standby::new(runbook, config, settings, decryption).map_err(|error| failure(&error))
}

fn usage(error: impl std::fmt::Display) -> Failure {
    Failure::new(exit::USAGE, anyhow!("{error}"))
}

fn failure(error: &StandbyError) -> Failure {
    let code = match error {
        StandbyError::Setup(_) | StandbyError::Refused(_) => exit::USAGE,
        _ => exit::ERROR,
    };
    Failure::new(code, anyhow!("{error}"))
}

pub async fn standby(args: StandbyArgs) -> Result<u8, Failure> {
    match args.action {
        Some(StandbyAction::Status(args)) => status(args).await,
        Some(StandbyAction::Promote(args)) => promote(args).await,
        None => {
            let config = args.config.clone().expect("clap requires --config");
            follow(&config, args.once, args.output).await
        }
    }
}

/// Rounds every `[standby] interval` until a signal (the round in progress is
/// finished first: a round stopped part way would leave a server heading to a point
/// the state does not name) or a promotion. A second signal stops at once, even in
/// the middle of a round that hangs (a standby server stopped or unreachable): an
/// operator or a service manager is never stuck behind it. What such a round leaves
/// is what a killed follower leaves, and the next round finds it (a MariaDB apply
/// under way is marked in the state first).
async fn follow(config: &std::path::Path, once: bool, output: OutputFormat) -> Result<u8, Failure> {
    let standby = open(config)?;
    let mut interrupts = Interrupts::new().map_err(|error| {
        Failure::new(
            exit::ERROR,
            anyhow!("cannot listen for SIGINT/SIGTERM: {error}"),
        )
    })?;
    let mut stopping = false;
    loop {
        let round = standby.follow_once();
        tokio::pin!(round);
        let state = tokio::select! {
            state = &mut round => state,
            () = interrupts.recv(), if !stopping => {
                stopping = true;
                crate::errln!(
                    "stopping after this round (it moves a database to a point; interrupt \
                     again to stop at once)…"
                );
                match unless_interrupted_again(&mut round, &mut interrupts).await {
                    Some(state) => state,
                    None => {
                        return Err(Failure::new(
                            exit::ERROR,
                            anyhow!(
                                "interrupted twice: stopped in the middle of a round. The \
                                 next round carries on from {}, or refuses a database it \
                                 left part way and says what to do",
                                standby.state_path().display()
                            ),
                        ));
                    }
                }
            }
        };
        let state = state.map_err(|error| failure(&error))?;
        let report = standby.status().await.map_err(|error| failure(&error))?;
        match output {
            OutputFormat::Json => crate::outln!(
                "{}",
                serde_json::to_string(&report).expect("reports serialize")
            ),
            _ => print_status(&report),
        }
        if state.promoted.is_some() {
            crate::errln!("the standby was promoted: nothing more to follow");
            return Ok(exit::OK);
        }
        if once || stopping {
            return Ok(exit::OK);
        }
        tokio::select! {
            () = tokio::time::sleep(standby.interval()) => {}
            () = interrupts.recv() => return Ok(exit::OK),
        }
    }
}

async fn status(args: StatusArgs) -> Result<u8, Failure> {
    let standby = open(&args.config)?;
    let report = standby.status().await.map_err(|error| failure(&error))?;
    match args.output {
        OutputFormat::Json => print_json(&report),
        _ => print_status(&report),
    }
    Ok(exit::OK)
}

async fn promote(args: PromoteArgs) -> Result<u8, Failure> {
    let standby = open(&args.config)?;
    let report = standby
        .promote(args.point.as_deref())
        .await
        .map_err(|error| failure(&error))?;
    match args.output {
        OutputFormat::Json => print_json(&report),
        _ => print_promoted(&report),
    }
    Ok(exit::OK)
}

fn time(ms: Option<i64>) -> String {
    ms.map_or("-".to_owned(), |ms| Zone::UTC.format_ms(ms))
}

fn print_status(report: &StatusReport) {
    crate::outln!(
        "{:<12} {:<9} {:<26} {:<28} {:>12} {:>10}  PHASE",
        "DATABASE",
        "ADAPTER",
        "POINT",
        "APPLIED",
        "LAG BYTES",
        "LAG"
    );
    for DatabaseStatus {
        name,
        adapter,
        point_id,
        applied,
        lag_bytes,
        lag_ms,
        phase,
        ..
    } in &report.databases
    {
        crate::outln!(
            "{:<12} {:<9} {:<26} {:<28} {:>12} {:>10}  {}",
            name,
            adapter,
            point_id.as_deref().unwrap_or("-"),
            applied.as_ref().map_or("-".to_owned(), |p| p.to_string()),
            lag_bytes.map_or("-".to_owned(), |b| b.to_string()),
            lag_ms.map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
            match phase {
                None => "not seeded".to_owned(),
                Some(Phase::Following) => "following".to_owned(),
                Some(Phase::Promoted) => "promoted".to_owned(),
                Some(Phase::Broken(problem)) => format!("broken: {problem}"),
            }
        );
    }
    match &report.common_point {
        Some(point) => crate::outln!(
            "newest point every database passed: {} ({})",
            point.point_id,
            time(point.time_ms)
        ),
        None => crate::outln!("newest point every database passed: none yet"),
    }
    if let Some(promoted) = &report.promoted {
        crate::outln!(
            "promoted at {} (point {}{})",
            time(Some(promoted.at_ms)),
            promoted.point_id.as_deref().unwrap_or("none"),
            if promoted.consistent {
                ""
            } else {
                ", NOT consistent"
            }
        );
    }
}

fn print_promoted(report: &PromoteReport) {
    if let Some(point) = &report.point {
        crate::outln!(
            "promoted every standby database at point {} ({})",
            point.point_id,
            time(point.time_ms)
        );
    }
    for (name, database) in &report.databases {
        crate::outln!("  {name}: {} at {}", database.adapter, database.position);
    }
}
