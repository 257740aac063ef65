//! `stillpoint pause`, `unpause`, `check-paused` and `stats`: validate the flags, make
//! one library call, print the report, choose the exit code.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use futures::future::join_all;
use stillpoint::coordinator::{
    self, PauseFailed, PausePlan, PauseReport, PausedCluster, Released, required_window,
};
use stillpoint::grpc::client::{CallError, ConnectOptions, NodeClient, Protocol};
use stillpoint::resolve::NodeAddress;
use stillpoint::time::{Zone, format_duration, from_unix_ms, unix_ms};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::args::{
    ConnectArgs, OutputArgs, OutputFormat, TargetArgs, duration, resolve_tiers, tier_sources,
};
use crate::exit::{self, Failure};
use crate::output::{print_json, print_report};
use crate::signal::{Interrupts, unless_interrupted_again};
use crate::state::{self, PauseState};

#[derive(Debug, Clone, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    /// How long each node may take to drain its in-flight requests. A node that cannot
    /// drain in time fails the pause, and every node that did pause is released again.
    #[arg(long, default_value = "30s", value_parser = duration, value_name = "DURATION")]
    pub max_pause_wait: Duration,

    /// Close the gates without waiting for in-flight requests to finish. The window is
    /// then valid only if no node reports a request still inside when it paused.
    #[arg(long)]
    pub no_wait: bool,

    /// Nodes reopen by themselves if the pause is neither renewed nor released within
    /// this long, so a lost coordinator cannot leave the cluster paused. Must be longer
    /// than --max-pause-wait; a lease not longer than the default max wait (30s) makes
    /// the max wait half the lease, unless --max-pause-wait is given.
    #[arg(long, default_value = "60s", value_parser = duration, value_name = "DURATION")]
    pub lease: Duration,

    /// Pause, hold the cluster paused this long (renewing the lease), unpause, and print
    /// the closed window: the whole cycle in one command.
    #[arg(long, value_parser = duration, value_name = "DURATION", conflicts_with = "keep_alive")]
    pub hold_for: Option<Duration>,

    /// The shortest acceptable window. With --hold-for the hold is extended to reach
    /// it, and also to twice the measured clock-skew bound plus a margin.
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub min_window: Option<Duration>,

    /// Stay in the foreground renewing the lease. Ends when `stillpoint unpause` closes
    /// the window elsewhere, or on Ctrl-C / SIGTERM, which unpauses and prints it.
    #[arg(long)]
    pub keep_alive: bool,

    /// Where a plain pause records its open window for `unpause`
    /// [default: $XDG_STATE_HOME/stillpoint/pause.json]
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// Use this pause id instead of a random one (1 to 128 bytes, no control characters).
    #[arg(long, value_name = "ID")]
    pub pause_id: Option<String>,
}

/// The max wait a pause uses: `max_wait`, unless it is the default and the lease given
/// is too short for it; then half the lease, said on stderr (a short lease is a choice
/// the operator made, the default max wait is not). A max wait given on the command
/// line is kept, and the plan's validation refuses it if it does not fit. A lease too
/// short to halve (1ms) is refused here, in its own words: the plan's message would
/// name a max wait of 30000ms the operator never gave.
fn fit_max_wait(lease: Duration, max_wait: Duration, given: bool) -> Result<Duration, Failure> {
    let fitted = lease / 2;
    // A zero lease is left to the plan, whose refusal gives the lease's whole range.
    if given || max_wait < lease || lease.is_zero() {
        return Ok(max_wait);
    }
    if fitted < Duration::from_millis(1) {
        return Err(usage(format!(
            "--lease {} is too short: the nodes need at least 1ms to drain and the lease \
             must be longer than that (2ms or more)",
            format_duration(lease)
        )));
    }
    // Whole milliseconds: the wire and the reports count them.
    let fitted = Duration::from_millis(fitted.as_millis() as u64);
    crate::errln!(
        "note: --lease {} is not longer than the default --max-pause-wait {}; nodes get \
         {} (half the lease) to drain instead: set --max-pause-wait to choose another",
        format_duration(lease),
        format_duration(max_wait),
        format_duration(fitted)
    );
    Ok(fitted)
}

#[derive(Debug, Clone, Args)]
pub struct UnpauseArgs {
    /// Without -a/-s, the nodes come from the state file written by `pause`.
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    /// The state file written by `pause` [default: $XDG_STATE_HOME/stillpoint/pause.json]
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn pause(args: PauseArgs, matches: &clap::ArgMatches) -> Result<u8, Failure> {
    let sources = tier_sources(matches, &args.targets);
    if sources.is_empty() {
        return Err(usage(
            "give the nodes to pause with -a HOST:PORT,… or -s SRV-NAME",
        ));
    }
    let state_file = args.state_file.clone().unwrap_or_else(state::default_path);
    let plain = args.hold_for.is_none();
    // Claimed before looking, so that two pauses sharing a state file cannot both find
    // it empty; held until the record is saved (or the pause failed).
    let claim = if plain {
        let claim =
            state::claim(&state_file, "pause").map_err(|error| Failure::new(exit::USAGE, error))?;
        if let Some(existing) = state::load(&state_file)? {
            return Err(usage(format!(
                "a pause is already recorded in {} (pause id {}, started at {}ms); run \
                 `stillpoint unpause` first, or pass another --state-file",
                state_file.display(),
                existing.record.pause_id,
                existing.record.paused_at_ms
            )));
        }
        Some(claim)
    } else {
        None
    };
    let tiers = resolve_tiers(&sources, args.targets.dns_server).await?;
    let max_wait_given =
        matches.value_source("max_pause_wait") == Some(clap::parser::ValueSource::CommandLine);
    let max_wait = fit_max_wait(args.lease, args.max_pause_wait, max_wait_given)?;
    let mut plan = PausePlan::new(tiers, args.lease, max_wait);
    plan.connect = args.connect.options()?;
    plan.wait_outstanding = !args.no_wait;
    if let Some(id) = &args.pause_id {
        plan.pause_id = id.clone();
    }
    plan.validate()
        .map_err(|error| Failure::new(exit::USAGE, error))?;

    // Listened to from before the first node pauses: a signal in the middle of the
    // pause phase rolls back the nodes already paused instead of ending the process
    // and leaving them to their lease. From the pause on, a signal releases the
    // cluster (and a second stops waiting for nodes that do not answer).
    let mut interrupts = interrupts()?;
    let zone = args.output.time_zone;
    let paused = match pause_unless_interrupted(&plan, &mut interrupts).await? {
        Ok(paused) => paused,
        Err(failure) => {
            print_report(
                &PauseReport::failed(&failure, plan.lease.as_millis() as u64, zone),
                args.output.output,
            );
            let code = if failure.rolled_back {
                exit::PAUSE_FAILED
            } else {
                exit::UNPAUSE_FAILED
            };
            return Err(Failure::new(code, failure));
        }
    };

    if let Some(hold_for) = args.hold_for {
        let wanted = hold_for.max(required_window(
            paused.record().skew_bound_ms,
            args.min_window.unwrap_or_default(),
        ));
        return hold_then_release(paused, wanted, &args, &mut interrupts).await;
    }

    // Record before leaving the cluster paused: if the record cannot be written, an
    // operator could not unpause by pause id later, so release now instead.
    let record = paused.record().clone();
    let min_window_ms = args.min_window.map(|min| min.as_millis() as u64);
    if let Err(error) = state::save(
        &state_file,
        &PauseState::new(
            record.clone(),
            unix_ms(paused.last_renewal()),
            min_window_ms,
        ),
    ) {
        let released = paused.release().await;
        print_report(&PauseReport::closed(&released, zone), args.output.output);
        return Err(Failure::new(
            exit::PAUSE_FAILED,
            error.context("the pause was released"),
        ));
    }
    drop(claim);
    if args.keep_alive {
        return keep_alive(paused, &state_file, &args, &mut interrupts).await;
    }
    let renewed_at = paused.last_renewal();
    let record = paused.detach();
    print_report(
        &PauseReport::open(&record, renewed_at, zone),
        args.output.output,
    );
    if args.output.output == OutputFormat::Text {
        crate::outln!(
            "  recorded in {}; close the window with `stillpoint unpause`",
            state_file.display()
        );
    }
    Ok(exit::OK)
}

/// Pauses `plan`; a signal meanwhile stops the pause and rolls it back (`Ok(Err(_))`,
/// reported like any failed pause). A second signal stops waiting for the roll-back.
pub(crate) async fn pause_unless_interrupted(
    plan: &PausePlan,
    interrupts: &mut Interrupts,
) -> Result<Result<PausedCluster, PauseFailed>, Failure> {
    let cancel = CancellationToken::new();
    let pausing = coordinator::pause_cancellable(plan, &cancel);
    tokio::pin!(pausing);
    tokio::select! {
        outcome = &mut pausing => return Ok(outcome),
        () = interrupts.recv() => {
            tracing::warn!("interrupted: stopping the pause and releasing the nodes already paused");
            cancel.cancel();
        }
    }
    match unless_interrupted_again(pausing, interrupts).await {
        Some(outcome) => Ok(outcome),
        None => {
            let lease_ends_ms = unix_ms(SystemTime::now()) + plan.lease.as_millis() as i64;
            Err(Failure::new(
                exit::UNPAUSE_FAILED,
                anyhow::anyhow!(
                    "interrupted again: stopped waiting for the roll-back of pause {}; nodes \
                     not released yet reopen by themselves when their lease ends, by \
                     {lease_ends_ms}ms at the latest; `stillpoint check-paused -a …` shows them",
                    plan.pause_id
                ),
            ))
        }
    }
}

pub(crate) fn interrupts() -> Result<Interrupts, Failure> {
    Interrupts::new().map_err(|error| {
        Failure::new(
            exit::ERROR,
            anyhow::anyhow!("cannot listen for SIGINT/SIGTERM: {error}"),
        )
    })
}

async fn hold_then_release(
    mut paused: PausedCluster,
    hold: Duration,
    args: &PauseArgs,
    interrupts: &mut Interrupts,
) -> Result<u8, Failure> {
    let until = Instant::now() + hold;
    tokio::select! {
        () = paused.hold_until(until) => {}
        () = interrupts.recv() => tracing::warn!("interrupted: releasing the pause early"),
    }
    let released = release(paused, interrupts, args.output.time_zone).await?;
    finish_window(&released, args.min_window, &args.output)
}

/// Releases `paused`; a second interrupt stops waiting for nodes that do not answer.
async fn release(
    paused: PausedCluster,
    interrupts: &mut Interrupts,
    zone: Zone,
) -> Result<Released, Failure> {
    let lease_ends_ms = paused.lease_expires_at_ms();
    match unless_interrupted_again(paused.release(), interrupts).await {
        Some(released) => Ok(released),
        None => Err(Failure::new(
            exit::UNPAUSE_FAILED,
            anyhow::anyhow!(
                "interrupted again: stopped waiting for the release; nodes not released \
                 yet reopen by themselves when their lease ends, by {} at the latest \
                 ({lease_ends_ms}ms); `stillpoint check-paused -a …` shows them",
                zone.format_ms(lease_ends_ms)
            ),
        )),
    }
}

async fn keep_alive(
    mut paused: PausedCluster,
    state_file: &std::path::Path,
    args: &PauseArgs,
    interrupts: &mut Interrupts,
) -> Result<u8, Failure> {
    print_report(
        &PauseReport::open(
            paused.record(),
            paused.last_renewal(),
            args.output.time_zone,
        ),
        args.output.output,
    );
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(paused.renewal_due()) => {}
            () = interrupts.recv() => break,
        }
        if let Err(reason) = paused.renew().await {
            // `unpause` elsewhere removes the state file once it has released every node:
            // then a failed renewal is the expected end of this process, not an error.
            if !state_file.exists() {
                let record = paused.detach();
                tracing::info!(pause_id = %record.pause_id, "the pause was closed by `stillpoint unpause`");
                return Ok(exit::OK);
            }
            tracing::warn!(%reason, "keep-alive renewal failed");
            // No round has renewed every node for a whole lease (this process was
            // suspended, or nodes restarted or stopped answering): some node has
            // reopened by itself, so the window can no longer be a restore point.
            // Holding the others paused for it would only keep the cluster down.
            let lease = Duration::from_millis(paused.record().lease_ms);
            if SystemTime::now() > paused.last_renewal() + lease {
                crate::errln!(
                    "no renewal has reached every node for a whole lease ({}ms): the pause \
                     is lost on some node, so the window cannot be a restore point; \
                     releasing the cluster",
                    lease.as_millis()
                );
                return release_keep_alive(paused, state_file, args, interrupts).await;
            }
        }
    }
    tracing::warn!("interrupted: releasing the pause");
    release_keep_alive(paused, state_file, args, interrupts).await
}

/// Releases a keep-alive's pause (on a signal, or once it is lost), forgets the state
/// file once every node is released, and prints the window.
async fn release_keep_alive(
    paused: PausedCluster,
    state_file: &std::path::Path,
    args: &PauseArgs,
    interrupts: &mut Interrupts,
) -> Result<u8, Failure> {
    let released = release(paused, interrupts, args.output.time_zone).await?;
    if released.all_released() {
        state::remove(state_file)?;
    }
    finish_window(&released, args.min_window, &args.output)
}

pub async fn unpause(args: UnpauseArgs, matches: &clap::ArgMatches) -> Result<u8, Failure> {
    let state_file = args.state_file.clone().unwrap_or_else(state::default_path);
    let connect = args.connect.options()?;
    let sources = tier_sources(matches, &args.targets);
    // Held for the whole command: a pause recording into this file meanwhile is
    // refused, and this never reads a file a running pause is about to write.
    let claim = state::claim(&state_file, "unpause");
    // With the nodes named, neither a damaged state file nor one another process is
    // using stands between the operator and an open cluster: the file is set aside
    // (kept, and said so) and the nodes released.
    let (recorded, damaged, _claim) = match claim {
        Ok(claim) => match state::load(&state_file) {
            Ok(recorded) => (recorded, None, Some(claim)),
            Err(error) if !sources.is_empty() => (None, Some(error), Some(claim)),
            Err(error) => return Err(error.into()),
        },
        Err(error) if !sources.is_empty() => (None, Some(error), None),
        Err(error) => return Err(Failure::new(exit::USAGE, error)),
    };
    if sources.is_empty() {
        return match recorded {
            Some(state) => close_recorded_window(state, &state_file, connect, &args.output).await,
            None => Err(usage(format!(
                "no pause is recorded in {}; give the nodes with -a/-s to unpause them anyway",
                state_file.display()
            ))),
        };
    }
    let tiers = resolve_tiers(&sources, args.targets.dns_server).await?;
    let named: BTreeSet<&NodeAddress> = tiers.iter().flatten().collect();
    match recorded {
        Some(state)
            if state
                .record
                .nodes()
                .map(|node| &node.address)
                .collect::<BTreeSet<_>>()
                == named =>
        {
            close_recorded_window(state, &state_file, connect, &args.output).await
        }
        // The nodes named are the ones to release. The recorded window is another
        // pause: closing it, or leaving its file as if it were closed, would act on
        // nodes the operator did not name.
        Some(state) => {
            let list = |nodes: Vec<String>| nodes.join(", ");
            let warning = format!(
                "the nodes given ({}) are not the ones recorded in {} (pause id {} over {}): \
                 released only the nodes given, without a window; the recorded window stays \
                 open, and its nodes not given here stay paused until `stillpoint unpause \
                 --state-file {}` or their lease ends",
                list(named.iter().map(ToString::to_string).collect()),
                state_file.display(),
                state.record.pause_id,
                list(
                    state
                        .record
                        .nodes()
                        .map(|node| node.address.to_string())
                        .collect()
                ),
                state_file.display(),
            );
            unpause_without_record(tiers, &connect, args.output.output, vec![warning]).await
        }
        None => {
            let warnings = damaged
                .map(|error| {
                    format!(
                        "{error:#}; released the nodes given without a window, and left \
                         the file as it is"
                    )
                })
                .into_iter()
                .collect();
            unpause_without_record(tiers, &connect, args.output.output, warnings).await
        }
    }
}

/// Closes the window a plain `pause` recorded: holds it (renewing) until it is long
/// enough to be a restore point, as `--hold-for` does — twice the clock-skew bound plus
/// a margin, and `--min-window` if the pause was given one — then releases it, and
/// forgets the record once every node is released.
async fn close_recorded_window(
    state: PauseState,
    state_file: &std::path::Path,
    connect: ConnectOptions,
    output: &OutputArgs,
) -> Result<u8, Failure> {
    let mut interrupts = interrupts()?;
    let min_window = state.min_window_ms.map(Duration::from_millis);
    let mut paused =
        PausedCluster::attach(state.record, connect, from_unix_ms(state.renewed_at_ms));
    let wanted = required_window(
        paused.record().skew_bound_ms,
        min_window.unwrap_or_default(),
    );
    let open_for_ms = unix_ms(SystemTime::now()) - paused.record().paused_at_ms;
    let rest =
        Duration::from_millis((wanted.as_millis() as i64 - open_for_ms.max(0)).max(0) as u64);
    if !rest.is_zero() {
        let why = match min_window {
            Some(min) if min >= wanted => {
                format!(
                    "`stillpoint pause` was given --min-window {}ms",
                    min.as_millis()
                )
            }
            _ => format!(
                "a restore point needs a window longer than twice the clock-skew bound plus a \
                 margin ({}ms)",
                wanted.as_millis()
            ),
        };
        crate::errln!("holding the window {}ms more: {why}", rest.as_millis());
        tokio::select! {
            () = paused.hold_until(Instant::now() + rest) => {}
            () = interrupts.recv() => tracing::warn!("interrupted: releasing before the window is long enough"),
        }
    }
    let released = release(paused, &mut interrupts, output.time_zone).await?;
    if released.all_released() {
        state::remove(state_file)?;
    }
    finish_window(&released, min_window, output)
}

/// Closes a window: prints it and picks the exit code.
fn finish_window(
    released: &Released,
    min_window: Option<Duration>,
    output: &OutputArgs,
) -> Result<u8, Failure> {
    let mut report = PauseReport::closed(released, output.time_zone);
    if let (Some(min), Some(window_ms)) = (min_window, report.window_ms)
        && window_ms < min.as_millis() as i64
    {
        report.window_valid = false;
        report.invalid_reasons.push(format!(
            "the window ({window_ms}ms) is shorter than --min-window ({}ms)",
            min.as_millis()
        ));
    }
    print_report(&report, output.output);
    if !released.all_released() {
        let nodes: Vec<String> = released
            .still_paused()
            .iter()
            .map(ToString::to_string)
            .collect();
        return Err(Failure::new(
            exit::UNPAUSE_FAILED,
            anyhow::anyhow!(
                "could not release {}; they reopen by themselves when their lease ends, by \
                 {} at the latest ({}ms)",
                nodes.join(", "),
                output.time_zone.format_ms(released.lease_expires_at_ms),
                released.lease_expires_at_ms
            ),
        ));
    }
    if !report.window_valid {
        return Err(Failure::new(
            exit::WINDOW_INVALID,
            anyhow::anyhow!(
                "this window must not be used as a restore point: {}",
                report.invalid_reasons.join("; ")
            ),
        ));
    }
    Ok(exit::OK)
}

#[derive(Debug, serde::Serialize)]
struct NodeUnpause {
    address: NodeAddress,
    was_paused: Option<bool>,
    error: Option<String>,
}

/// Unpauses nodes that no state file describes (e.g. paused by `scalar-admin`): no
/// pause id, so no window either. `warnings` are printed with the result.
pub async fn unpause_without_record(
    tiers: Vec<Vec<NodeAddress>>,
    connect: &ConnectOptions,
    format: OutputFormat,
    warnings: Vec<String>,
) -> Result<u8, Failure> {
    let mut results = Vec::new();
    for tier in tiers.iter().rev() {
        results.extend(join_all(tier.iter().map(|address| unpause_one(address, connect))).await);
    }
    for warning in &warnings {
        crate::errln!("warning: {warning}");
    }
    match format {
        OutputFormat::Json => {
            print_json(&serde_json::json!({ "nodes": results, "warnings": warnings }))
        }
        OutputFormat::Text => {
            for node in &results {
                match (&node.error, node.was_paused) {
                    (Some(error), _) => {
                        crate::outln!("{:<22} FAILED: {error}", node.address.to_string())
                    }
                    (None, Some(false)) => {
                        crate::outln!("{:<22} was not paused", node.address.to_string())
                    }
                    (None, _) => crate::outln!("{:<22} unpaused", node.address.to_string()),
                }
            }
        }
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|node| node.error.is_some())
        .map(|node| node.address.to_string())
        .collect();
    if failed.is_empty() {
        Ok(exit::OK)
    } else {
        Err(Failure::new(
            exit::UNPAUSE_FAILED,
            anyhow::anyhow!("could not unpause {}", failed.join(", ")),
        ))
    }
}

/// Runs one call to a node that is already connected under the call deadline
/// (`--connect-timeout`): a node that stops answering (SIGSTOP, a hung process) is
/// named as such instead of holding up the command, and the other nodes, forever.
async fn answered<T>(
    connect: &ConnectOptions,
    call: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::time::timeout(connect.connect_timeout, call)
        .await
        .unwrap_or(Err(CallError::TimedOut(connect.connect_timeout)))
}

async fn unpause_one(address: &NodeAddress, connect: &ConnectOptions) -> NodeUnpause {
    let result = async {
        let mut client = NodeClient::connect(address, connect).await?;
        match client.protocol() {
            Protocol::Lease => answered(connect, client.unpause_leased(None))
                .await
                .map(|released| Some(released.was_paused)),
            Protocol::Upstream => answered(connect, client.unpause_upstream())
                .await
                .map(|()| None),
        }
    }
    .await;
    NodeUnpause {
        address: address.clone(),
        was_paused: result.as_ref().ok().copied().flatten(),
        error: result.err().map(|error| error.to_string()),
    }
}

#[derive(Debug, serde::Serialize)]
struct NodeState {
    address: NodeAddress,
    protocol: Option<Protocol>,
    paused: Option<bool>,
    holder: Option<String>,
    lease_remaining_ms: Option<u64>,
    in_flight: Option<u64>,
    held_now: Option<u64>,
    boot_id: Option<String>,
    error: Option<String>,
}

pub async fn check_paused(args: InspectArgs, matches: &clap::ArgMatches) -> Result<u8, Failure> {
    let (nodes, connect) = inspect_targets(&args, matches).await?;
    check_nodes(&nodes, &connect, args.output.output).await
}

/// Asks every node whether it is paused (and by whom, where it can tell); also
/// `scalar-admin -c CHECK_PAUSED`.
pub async fn check_nodes(
    nodes: &[NodeAddress],
    connect: &ConnectOptions,
    format: OutputFormat,
) -> Result<u8, Failure> {
    let states = join_all(nodes.iter().map(|address| check_one(address, connect))).await;
    let all_paused = states.iter().all(|state| state.paused == Some(true));
    match format {
        OutputFormat::Json => {
            print_json(&serde_json::json!({ "paused": all_paused, "nodes": states }))
        }
        OutputFormat::Text => {
            for state in &states {
                let text = match (&state.error, state.paused) {
                    (Some(error), _) => format!("ERROR: {error}"),
                    (None, Some(true)) => match (&state.holder, state.lease_remaining_ms) {
                        (Some(holder), Some(ms)) => {
                            format!("paused by {holder}, lease {ms}ms left")
                        }
                        (Some(holder), None) => format!("paused by {holder}"),
                        _ => "paused".to_owned(),
                    },
                    (None, _) => "not paused".to_owned(),
                };
                crate::outln!("{:<22} {text}", state.address.to_string());
            }
        }
    }
    let failed: Vec<String> = states
        .iter()
        .filter(|state| state.error.is_some())
        .map(|state| state.address.to_string())
        .collect();
    if !failed.is_empty() {
        return Err(Failure::new(
            exit::ERROR,
            anyhow::anyhow!("could not check {}", failed.join(", ")),
        ));
    }
    Ok(exit::OK)
}

async fn check_one(address: &NodeAddress, connect: &ConnectOptions) -> NodeState {
    let mut state = NodeState {
        address: address.clone(),
        protocol: None,
        paused: None,
        holder: None,
        lease_remaining_ms: None,
        in_flight: None,
        held_now: None,
        boot_id: None,
        error: None,
    };
    let result = async {
        let mut client = NodeClient::connect(address, connect).await?;
        state.protocol = Some(client.protocol());
        match client.protocol() {
            Protocol::Lease => {
                let status = answered(connect, client.status()).await?;
                state.paused = Some(status.paused);
                state.holder = status.holder.map(|holder| holder.to_string());
                state.lease_remaining_ms =
                    status.lease_remaining.map(|lease| lease.as_millis() as u64);
                state.in_flight = Some(status.in_flight);
                state.held_now = Some(status.held_now);
                state.boot_id = Some(status.boot_id);
            }
            Protocol::Upstream => {
                state.paused = Some(answered(connect, client.check_paused_upstream()).await?)
            }
        }
        Ok::<(), CallError>(())
    }
    .await;
    if let Err(error) = result {
        state.error = Some(error.to_string());
    }
    state
}

pub async fn stats(args: InspectArgs, matches: &clap::ArgMatches) -> Result<u8, Failure> {
    let (nodes, connect) = inspect_targets(&args, matches).await?;
    let stats = join_all(nodes.iter().map(|address| {
        let connect = connect.clone();
        async move {
            let result = async {
                let mut client = NodeClient::connect(address, &connect).await?;
                answered(&connect, client.stats()).await
            }
            .await;
            match result {
                Ok(stats) => serde_json::json!({ "address": address, "stats": stats }),
                Err(error) => serde_json::json!({ "address": address, "error": error.to_string() }),
            }
        }
    }))
    .await;
    let failed: Vec<String> = stats
        .iter()
        .filter(|node| node.get("error").is_some())
        .map(|node| node["address"].as_str().unwrap_or("?").to_owned())
        .collect();
    match args.output.output {
        OutputFormat::Json => print_json(&serde_json::json!({ "nodes": stats })),
        OutputFormat::Text => {
            for node in &stats {
                crate::outln!("{}", serde_json::to_string(node).expect("json"));
            }
        }
    }
    if !failed.is_empty() {
        return Err(Failure::new(
            exit::ERROR,
            anyhow::anyhow!("no stats from {}", failed.join(", ")),
        ));
    }
    Ok(exit::OK)
}

async fn inspect_targets(
    args: &InspectArgs,
    matches: &clap::ArgMatches,
) -> Result<(Vec<NodeAddress>, ConnectOptions), Failure> {
    let sources = tier_sources(matches, &args.targets);
    if sources.is_empty() {
        return Err(usage("give the nodes with -a HOST:PORT,… or -s SRV-NAME"));
    }
    let tiers = resolve_tiers(&sources, args.targets.dns_server).await?;
    Ok((
        tiers.into_iter().flatten().collect(),
        args.connect.options()?,
    ))
}

fn usage(message: impl std::fmt::Display) -> Failure {
    Failure::new(exit::USAGE, anyhow::anyhow!("{message}"))
}
