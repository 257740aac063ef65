//! The coordinator: pauses a whole cluster and releases it, never leaving a node paused.
//!
//! Protocol steps 3 and 5 (PRODUCT.md): **pause** every node (connect to all and sample
//! their clocks first, pausing nothing; then tier by tier, in parallel within a tier,
//! the first tier's lowest address alone first: it is the lock that makes one of two
//! racing coordinators lose cleanly), with a lease and a pause id (rolling back every
//! node that paused if any node fails), then **unpause** in reverse tier order and
//! check that every node stayed paused the whole window (same pause id, same boot id,
//! same pause sequence).
//!
//! [`PausedCluster`] is the only way to hold a paused cluster: it renews the lease,
//! `release()` consumes it, `detach()` hands it over to a state file on purpose,
//! `attach()` takes it back from one, and dropping it any other way releases the nodes
//! too. `report.rs` turns the outcome into the window JSON.
//!
//! Every call has a deadline (connect, pause, renew, unpause), so one node that stops
//! answering cannot hold up the others: earlier tiers are renewed while later tiers
//! drain, and a release goes on to the next tier once the current one answered or one
//! call deadline passed.

mod report;

pub use report::{NodeOutcome, NodeReport, PauseReport};

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::grpc::client::{CallError, ClockReading, ConnectOptions, NodeClient, Protocol};
use crate::grpc::pool::ConnectionPool;
use crate::resolve::{AddressError, NodeAddress, ensure_unique};
use crate::time::unix_ms;
use stillpoint_node::pause::{Holder, MAX_LEASE, NodeStatus, PauseOwner, check_id};

/// Added to twice the clock-skew bound: the shortest window that still proves an order
/// between the coordinator's clock and every node's.
pub const SKEW_MARGIN: Duration = Duration::from_millis(10);
const UNPAUSE_ATTEMPTS: u32 = 3;
const CLOCK_SAMPLES: usize = 3;

/// What to pause and how.
#[derive(Debug, Clone)]
pub struct PausePlan {
    /// Paused in order, each only after the previous one drained; released in reverse.
    pub tiers: Vec<Vec<NodeAddress>>,
    pub connect: ConnectOptions,
    pub max_wait: Duration,
    pub wait_outstanding: bool,
    pub lease: Duration,
    pub pause_id: String,
    /// This coordinator, beside the pause id: another coordinator given the same pause
    /// id is refused as another holder.
    pub coordinator_id: String,
    /// Speak only upstream `rpc.Admin`, even to nodes that offer leases (the
    /// `scalar-admin` binary): the pause then outlives this process, bounded only by
    /// each node's own upstream lease.
    pub upstream_only: bool,
    /// Connections kept open between pauses (`stillpoint serve`); `None`: connect
    /// afresh, as one-shot commands do.
    pub pool: Option<Arc<ConnectionPool>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no nodes to pause")]
    NoNodes,
    #[error("tier {0} has no nodes")]
    EmptyTier(usize),
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("lease must be between 1ms and 24h, got {}ms", .0.as_millis())]
    BadLease(Duration),
    #[error(
        "max pause wait ({}ms) must be shorter than the lease ({}ms), or the lease could \
         expire while nodes are still draining",
        .max_wait.as_millis(), .lease.as_millis()
    )]
    WaitLongerThanLease { max_wait: Duration, lease: Duration },
    #[error(
        "max pause wait is 0ms, which leaves no time to drain: give e.g. 10s, or do not \
         wait for in-flight requests (--no-wait)"
    )]
    ZeroMaxWait,
    #[error("connect timeout is 0ms, which would fail every connection; give e.g. 5s")]
    ZeroConnectTimeout,
    /// The admin token would go out unencrypted to a host that is not this one.
    #[error("{0}")]
    CleartextToken(String),
    #[error("max pause wait must be at most 24h, got {}ms", .0.as_millis())]
    WaitTooLong(Duration),
    /// Empty, too long, or with control characters (`node::check_id`).
    #[error("{0}")]
    BadPauseId(String),
}

impl PausePlan {
    /// A plan with a fresh random pause id.
    pub fn new(tiers: Vec<Vec<NodeAddress>>, lease: Duration, max_wait: Duration) -> Self {
        Self {
            tiers,
            connect: ConnectOptions::default(),
            max_wait,
            wait_outstanding: true,
            lease,
            pause_id: new_pause_id(),
            coordinator_id: new_coordinator_id(),
            upstream_only: false,
            pool: None,
        }
    }

    pub fn owner(&self) -> PauseOwner {
        PauseOwner::new(&self.pause_id, &self.coordinator_id)
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        if self.tiers.is_empty() {
            return Err(PlanError::NoNodes);
        }
        // Before anything is sent: the id goes to every node, log and state file.
        check_id("pause id", &self.pause_id).map_err(PlanError::BadPauseId)?;
        if let Some(empty) = self.tiers.iter().position(Vec::is_empty) {
            return Err(PlanError::EmptyTier(empty + 1));
        }
        ensure_unique(self.tiers.iter().flatten())?;
        if self.connect.connect_timeout.is_zero() {
            return Err(PlanError::ZeroConnectTimeout);
        }
        if let Some(refusal) = self
            .tiers
            .iter()
            .flatten()
            .find_map(|address| self.connect.cleartext_token_refusal(address))
        {
            return Err(PlanError::CleartextToken(refusal.to_string()));
        }
        // Checked for upstream plans too: the wire carries it as a signed 64-bit
        // millisecond count, into which a larger `-m` would wrap to a negative wait.
        if self.max_wait > MAX_LEASE {
            return Err(PlanError::WaitTooLong(self.max_wait));
        }
        // Upstream clients may send a zero wait (scalar-admin -m 0): keep their meaning.
        if self.upstream_only {
            return Ok(());
        }
        if self.wait_outstanding && self.max_wait.is_zero() {
            return Err(PlanError::ZeroMaxWait);
        }
        if self.lease.is_zero() || self.lease > MAX_LEASE {
            return Err(PlanError::BadLease(self.lease));
        }
        if self.max_wait >= self.lease {
            return Err(PlanError::WaitLongerThanLease {
                max_wait: self.max_wait,
                lease: self.lease,
            });
        }
        Ok(())
    }

    /// For connecting to a node (which may take the connect timeout twice: the
    /// connection, then the probe) and sampling its clock.
    fn connect_deadline(&self) -> Duration {
        self.connect.connect_timeout * 2 + Duration::from_secs(1)
    }

    /// For one node's pause call: its drain may use all of max_wait.
    fn pause_deadline(&self) -> Duration {
        self.max_wait + Duration::from_secs(2)
    }
}

pub fn new_pause_id() -> String {
    format!("sp-{}", uuid::Uuid::new_v4().simple())
}

pub fn new_coordinator_id() -> String {
    format!("c-{}", uuid::Uuid::new_v4().simple())
}

/// Deadline of one Renew or Unpause call, and of a connection made for one.
fn call_deadline(connect: &ConnectOptions) -> Duration {
    connect.connect_timeout
}

/// Deadline of one round of renewals: short enough that a round stuck on one node
/// still ends before the next is due, so the other nodes' leases never run out.
fn renew_deadline(connect: &ConnectOptions, lease: Duration) -> Duration {
    call_deadline(connect)
        .min(lease / 3)
        .max(Duration::from_millis(1))
}

/// Every attempt to release one node together: a connection and a call, retried.
fn release_deadline(connect: &ConnectOptions) -> Duration {
    connect.connect_timeout * 2 + Duration::from_secs(1)
}

/// Everything needed to release a pause later, possibly from another process: this is
/// what `stillpoint pause` writes to its state file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PauseRecord {
    pub pause_id: String,
    /// The coordinator that paused; empty in records written before it existed.
    #[serde(default)]
    pub coordinator_id: String,
    pub lease_ms: u64,
    /// False with `--no-wait`: nothing waited for requests in flight to finish.
    #[serde(default = "waited")]
    pub wait_outstanding: bool,
    /// Coordinator clock, when every node of every tier had drained and paused.
    pub paused_at_ms: i64,
    /// `None` when no node could report its clock (upstream-only nodes).
    pub skew_bound_ms: Option<u64>,
    pub tiers: Vec<Vec<PausedNode>>,
    /// The coordinator chose to speak only upstream `rpc.Admin`
    /// ([`PausePlan::upstream_only`], the `scalar-admin` binary): a node paused that way
    /// is no cause for a warning, whatever else it speaks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upstream_only: bool,
}

/// One node as it was when it paused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PausedNode {
    pub address: NodeAddress,
    pub protocol: Protocol,
    pub boot_id: Option<String>,
    pub pause_seq: Option<u64>,
    pub drained_in_flight: Option<u64>,
    pub in_flight_at_pause: Option<u64>,
    pub clock_offset_ms: Option<i64>,
    pub rtt_ms: Option<u64>,
}

fn waited() -> bool {
    true
}

/// A recorded time (Unix ms) must lie between 2000 and a day from now: one outside is
/// a damaged record, not a clock this process could have read.
pub fn check_time_ms(field: &str, ms: i64) -> Result<(), String> {
    const YEAR_2000_MS: i64 = 946_684_800_000;
    let latest = unix_ms(SystemTime::now()) + MAX_LEASE.as_millis() as i64;
    if (YEAR_2000_MS..=latest).contains(&ms) {
        Ok(())
    } else {
        Err(format!(
            "{field} {ms} is not a time between 2000 and a day from now"
        ))
    }
}

impl PauseRecord {
    pub fn nodes(&self) -> impl Iterator<Item = &PausedNode> {
        self.tiers.iter().flatten()
    }

    /// Who holds this pause on the nodes.
    pub fn owner(&self) -> PauseOwner {
        PauseOwner::new(&self.pause_id, &self.coordinator_id)
    }

    /// Whether a record read back (a state file written by another process, perhaps
    /// edited or damaged since) is one [`pause`] could have written: an id fit for
    /// logs, a lease a node accepts, at least one node in every tier, and times,
    /// clock offsets and bounds within a day of plausible. Anything else is refused
    /// as damaged, by name, before any of it is computed with.
    pub fn check(&self) -> Result<(), String> {
        const DAY_MS: u64 = MAX_LEASE.as_millis() as u64;
        check_id("pause id", &self.pause_id)?;
        if !self.coordinator_id.is_empty() {
            check_id("coordinator id", &self.coordinator_id)?;
        }
        if self.lease_ms == 0 || self.lease_ms > DAY_MS {
            return Err(format!(
                "lease_ms {} is not between 1ms and 24h",
                self.lease_ms
            ));
        }
        if self.tiers.is_empty() || self.tiers.iter().any(Vec::is_empty) {
            return Err("it records a pause without nodes, or an empty tier".to_owned());
        }
        check_time_ms("paused_at_ms", self.paused_at_ms)?;
        if self.skew_bound_ms.is_some_and(|bound| bound > DAY_MS) {
            return Err(format!(
                "skew_bound_ms {} is more than a day",
                self.skew_bound_ms.unwrap_or_default()
            ));
        }
        for node in self.nodes() {
            let offset_too_far = node
                .clock_offset_ms
                .is_some_and(|offset| offset.unsigned_abs() > DAY_MS);
            let rtt_too_long = node.rtt_ms.is_some_and(|rtt| rtt > DAY_MS);
            if offset_too_far || rtt_too_long {
                return Err(format!(
                    "the clock reading of {} (offset {:?}ms, round trip {:?}ms) is more \
                     than a day",
                    node.address, node.clock_offset_ms, node.rtt_ms
                ));
            }
        }
        Ok(())
    }

    /// When the nodes reopen by themselves if nobody renews (coordinator clock).
    pub fn lease_expires_at_ms(&self, renewed_at: SystemTime) -> i64 {
        unix_ms(renewed_at) + self.lease_ms as i64
    }
}

/// The pause could not be completed; every node that paused was released again.
#[derive(Debug, thiserror::Error)]
#[error("{summary}")]
pub struct PauseFailed {
    pub summary: String,
    pub nodes: Vec<NodeReport>,
    /// False when some node that paused could not be released; those nodes reopen when
    /// their lease expires (`nodes` says which and when).
    pub rolled_back: bool,
    pub pause_id: String,
}

/// A cluster that is paused right now. Release it, detach it, or drop it (which
/// releases it, blocking): there is no way to forget it.
#[derive(Debug)]
pub struct PausedCluster {
    record: PauseRecord,
    clients: HashMap<NodeAddress, NodeClient>,
    connect: ConnectOptions,
    lease: Duration,
    /// No node's lease was last extended before this: their leases run at least
    /// until it plus the lease.
    last_renewal: SystemTime,
    /// No node's lease was extended after this: they reopen by themselves by it plus
    /// the lease at the latest.
    last_renewal_attempt: SystemTime,
    /// When the next renewal is due: a third of the lease after the oldest lease
    /// granted or renewed (not after the pause returned: the first node paused may
    /// have held its lease through a long pause phase already).
    next_renewal: Instant,
    /// The window's start on the monotonic clock, to catch a step of the wall clock
    /// inside it; unknown for a pause attached from a state file.
    paused_at: Option<Instant>,
    lost: Vec<(NodeAddress, String)>,
    finished: bool,
}

/// What releasing found out.
#[derive(Debug, Clone)]
pub struct Released {
    pub record: PauseRecord,
    /// Coordinator clock, just before the first node was released.
    pub window_end_ms: i64,
    pub nodes: Vec<NodeRelease>,
    /// Reasons the window cannot be a restore point; empty when it can.
    pub invalid_reasons: Vec<String>,
    pub warnings: Vec<String>,
    /// Nodes that could not be released reopen by themselves by then at the latest
    /// (coordinator clock), when their lease ends.
    pub lease_expires_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NodeRelease {
    pub address: NodeAddress,
    /// `Ok(stayed_paused)`: `None` when the node cannot tell (upstream-only).
    pub result: Result<Option<bool>, String>,
    /// Why it did not stay paused, when known.
    pub why_not: Option<String>,
    /// The node's clock offset and the call's round trip (ms) at release, measured
    /// like those taken before the pause; `None` for upstream nodes.
    pub clock: Option<(i64, u64)>,
}

impl Released {
    pub fn window_valid(&self) -> bool {
        self.invalid_reasons.is_empty() && self.all_released()
    }

    pub fn all_released(&self) -> bool {
        self.nodes.iter().all(|node| node.result.is_ok())
    }

    /// Nodes that may still be paused: they reopen when their lease expires.
    pub fn still_paused(&self) -> Vec<&NodeAddress> {
        self.nodes
            .iter()
            .filter(|node| node.result.is_err())
            .map(|node| &node.address)
            .collect()
    }

    /// The nodes that may still be paused, named for an error: `None` when every node
    /// was released.
    pub fn still_paused_names(&self) -> Option<String> {
        let nodes = self.still_paused();
        (!nodes.is_empty()).then(|| {
            nodes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

/// Pauses every node of `plan`, tier by tier. On any failure, releases every node that
/// paused (or may have) before returning the error.
///
/// First, with nothing paused yet, it connects to every node at once, learns its
/// protocol and samples its clock: a node that cannot be reached then fails the pause
/// with nothing to roll back, and the nodes paused first do not wait, paused, for the
/// handshakes of those paused last. Only then does it send the pauses. While a tier
/// drains, the tiers paused before it are renewed, so their leases cannot run out
/// however many tiers there are.
pub async fn pause(plan: &PausePlan) -> Result<PausedCluster, PauseFailed> {
    pause_cancellable(plan, &CancellationToken::new()).await
}

/// [`pause`], stopped early when `cancel` fires (the CLI fires it on SIGINT/SIGTERM):
/// the pause calls still under way are dropped (a node still draining reopens its gate
/// when its call goes away), and every node that paused, or may have, is released
/// before the error returns, exactly as when a node fails.
pub async fn pause_cancellable(
    plan: &PausePlan,
    cancel: &CancellationToken,
) -> Result<PausedCluster, PauseFailed> {
    if let Err(error) = plan.validate() {
        return Err(PauseFailed {
            summary: error.to_string(),
            nodes: Vec::new(),
            rolled_back: true,
            pause_id: plan.pause_id.clone(),
        });
    }
    let mut clients = HashMap::new();
    let mut tiers: Vec<Vec<PausedNode>> = Vec::new();
    let mut failures: Vec<NodeReport> = Vec::new();
    // Nodes whose pause call failed without the node's own refusal (a timeout, a lost
    // answer) may have paused all the same.
    let mut maybe_paused: Vec<(NodeAddress, Protocol)> = Vec::new();
    // Nodes of earlier tiers whose renewal failed while a later tier drained.
    let mut lost: Vec<(NodeAddress, String)> = Vec::new();
    // No paused node's lease was last extended before this.
    let mut leases_from: Option<SystemTime> = None;

    let all_nodes = plan
        .tiers
        .iter()
        .enumerate()
        .flat_map(|(index, tier)| tier.iter().map(move |address| (index, address)));
    let mut connected = HashMap::new();
    let connecting = join_all(all_nodes.map(|(index, address)| async move {
        (index, address, connect_node(plan, address).await)
    }));
    let connections = tokio::select! {
        biased;
        () = cancel.cancelled() => {
            return Err(roll_back(plan, tiers, clients, failures, maybe_paused, true).await);
        }
        connections = connecting => connections,
    };
    for (index, address, result) in connections {
        match result {
            Ok(node) => {
                clients.insert(address.clone(), node.client.clone());
                connected.insert(address, node);
            }
            Err(error) => failures.push(NodeReport::failed(address, index, None, &error)),
        }
    }
    // One process under two addresses (an IP and a DNS name, two aliases) would be
    // paused twice, and released twice, making the window look broken by a lease
    // that ran out. Refused with nothing paused, naming both.
    let mut seen: HashMap<&str, &NodeAddress> = HashMap::new();
    for (index, tier) in plan.tiers.iter().enumerate() {
        for address in tier {
            // Nodes that could not be reached are already failures.
            let Some(node) = connected.get(address) else {
                continue;
            };
            let Some(boot_id) = node.boot_id.as_deref() else {
                continue;
            };
            if let Some(first) = seen.insert(boot_id, address) {
                let error = CallError::Invalid(format!(
                    "{first} and {address} are the same node (boot id {boot_id}); list \
                     each node once"
                ));
                failures.push(NodeReport::failed(
                    address,
                    index,
                    Some(node.protocol),
                    &error,
                ));
            }
        }
    }
    if !failures.is_empty() {
        return Err(roll_back(plan, tiers, clients, failures, maybe_paused, false).await);
    }

    for (index, tier) in plan.tiers.iter().enumerate() {
        tiers.push(Vec::new());
        for batch in batches(index, tier) {
            let batch_started = SystemTime::now();
            let attempts = until_cancelled(
                batch
                    .iter()
                    .map(|address| pause_node(plan, &connected[*address])),
                cancel,
            );
            // Every node paused so far (earlier tiers, and the first tier's lock node
            // while the rest of its tier drains) is renewed while this batch drains,
            // on a schedule that starts from the oldest of their leases.
            let ((attempts, interrupted), renewed_at) = match leases_from {
                None => (attempts.await, None),
                Some(oldest) => {
                    let earlier: Vec<&PausedNode> = tiers.iter().flatten().collect();
                    while_renewing(plan, &earlier, oldest, &clients, &mut lost, attempts).await
                }
            };
            if interrupted {
                // The calls not answered were dropped mid-way: they may have paused.
                for address in batch.iter().filter(|address| {
                    !attempts
                        .iter()
                        .any(|(node, _)| node.client.address() == **address)
                }) {
                    let node = &connected[*address];
                    maybe_paused.push(((*address).clone(), node.protocol));
                    failures.push(NodeReport::failed(
                        address,
                        index,
                        Some(node.protocol),
                        &CallError::Interrupted,
                    ));
                }
            }
            // A lower bound of every lease now running: this batch's were granted after
            // it started, and the earlier nodes' renewed after that too.
            leases_from = match (leases_from, renewed_at) {
                (None, _) | (Some(_), Some(_)) => Some(batch_started),
                (Some(from), None) => Some(from),
            };
            for (node, result) in attempts {
                match result {
                    Ok(paused) => tiers[index].push(paused),
                    Err(error) => {
                        if may_have_paused(&error) {
                            maybe_paused.push((node.client.address().clone(), node.protocol));
                        }
                        failures.push(NodeReport::failed(
                            node.client.address(),
                            index,
                            Some(node.protocol),
                            &error,
                        ));
                    }
                }
            }
            // Also when the signal came just as the last call answered: nothing is
            // left to interrupt, but the operator asked for no pause.
            if !failures.is_empty() || cancel.is_cancelled() {
                let interrupted = cancel.is_cancelled();
                return Err(
                    roll_back(plan, tiers, clients, failures, maybe_paused, interrupted).await,
                );
            }
        }
    }

    let now = SystemTime::now();
    let skew_bound_ms = tiers
        .iter()
        .flatten()
        .filter_map(|node| Some(node.clock_offset_ms?.unsigned_abs() + node.rtt_ms?.div_ceil(2)))
        .max();
    Ok(PausedCluster {
        record: PauseRecord {
            pause_id: plan.pause_id.clone(),
            coordinator_id: plan.coordinator_id.clone(),
            lease_ms: plan.lease.as_millis() as u64,
            wait_outstanding: plan.wait_outstanding,
            paused_at_ms: unix_ms(now),
            skew_bound_ms,
            tiers,
            upstream_only: plan.upstream_only,
        },
        clients,
        connect: plan.connect.clone(),
        lease: plan.lease,
        last_renewal: leases_from.unwrap_or(now),
        last_renewal_attempt: now,
        next_renewal: instant_of(leases_from.unwrap_or(now)) + plan.lease / 3,
        paused_at: Some(Instant::now()),
        lost,
        finished: false,
    })
}

/// Runs pause calls together until they have all answered or `cancel` fires; returns
/// the answers received, and whether it was cancelled (the rest are then dropped).
async fn until_cancelled<'a, F>(
    calls: impl Iterator<Item = F>,
    cancel: &CancellationToken,
) -> (Vec<F::Output>, bool)
where
    F: Future<Output = (&'a ConnectedNode, Result<PausedNode, CallError>)>,
{
    let mut calls: FuturesUnordered<F> = calls.collect();
    let mut answered = Vec::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return (answered, true),
            next = calls.next() => match next {
                Some(answer) => answered.push(answer),
                None => return (answered, false),
            },
        }
    }
}

/// Whether a failed pause call may have paused the node all the same: only a refusal
/// the node itself answered with (or a connection that never carried the call) proves
/// it did not. A timeout, a dropped connection or a lost answer proves nothing.
fn may_have_paused(error: &CallError) -> bool {
    !matches!(
        error,
        CallError::Precondition(_)
            | CallError::Conflict(_)
            | CallError::Invalid(_)
            | CallError::Unauthenticated { .. }
            | CallError::PermissionDenied(_)
            | CallError::Tls(_)
            | CallError::CleartextToken { .. }
            | CallError::ProtocolMismatch(_)
            | CallError::ClientCertRefused(_)
    )
}

/// Runs `work` (a later tier's pause) while renewing the lease of `paused` (the tiers
/// paused before it) every third of the lease. A node whose renewal fails is recorded
/// in `lost`, which makes the window invalid. Returns the start of the last round in
/// which every node was renewed, if any.
async fn while_renewing<T>(
    plan: &PausePlan,
    paused: &[&PausedNode],
    oldest_lease: SystemTime,
    clients: &HashMap<NodeAddress, NodeClient>,
    lost: &mut Vec<(NodeAddress, String)>,
    work: impl Future<Output = T>,
) -> (T, Option<SystemTime>) {
    let owner = plan.owner();
    let mut renewed_at = None;
    let renewing = async {
        let mut due = instant_of(oldest_lease) + plan.lease / 3;
        loop {
            tokio::time::sleep_until(due).await;
            due = Instant::now() + plan.lease / 3;
            let started = SystemTime::now();
            let nodes = paused
                .iter()
                .copied()
                .filter(|node| node.protocol == Protocol::Lease);
            let results = renew_nodes(&owner, plan.lease, nodes, clients, &plan.connect).await;
            let mut all_renewed = true;
            for (address, result) in results {
                if let Err(reason) = result {
                    tracing::warn!(%address, %reason, "lease renewal failed while a later tier drained");
                    note_lost(lost, address, reason);
                    all_renewed = false;
                }
            }
            if all_renewed {
                renewed_at = Some(started);
            }
        }
    };
    let output = tokio::select! {
        output = work => output,
        never = renewing => never,
    };
    (output, renewed_at)
}

/// Records that `address` lost the pause, once: later renewals of a node that lost it
/// keep failing, and the window's reasons must name it once, with the first cause.
fn note_lost(lost: &mut Vec<(NodeAddress, String)>, address: NodeAddress, reason: String) {
    if !lost.iter().any(|(known, _)| *known == address) {
        lost.push((address, reason));
    }
}

/// `at` (a wall-clock time in the past) on the monotonic clock, for scheduling.
fn instant_of(at: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(at).unwrap_or_default();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// The order a tier is paused in: all its nodes at once, except in the first tier,
/// whose lowest address is paused alone first. That node is the cluster's lock: two
/// coordinators racing for the same cluster would otherwise each win some nodes and
/// both fail; this way the loser fails on the first node, before pausing anything, and
/// the winner goes on.
fn batches(tier_index: usize, tier: &[NodeAddress]) -> Vec<Vec<&NodeAddress>> {
    let Some(lock) = tier.iter().min_by_key(|address| address.to_string()) else {
        return Vec::new();
    };
    if tier_index > 0 || tier.len() == 1 {
        return vec![tier.iter().collect()];
    }
    vec![
        vec![lock],
        tier.iter().filter(|address| *address != lock).collect(),
    ]
}

/// A node connected to and measured, not paused yet.
struct ConnectedNode {
    client: NodeClient,
    /// The protocol this pause speaks to the node, which its rollback must speak too.
    protocol: Protocol,
    /// Offset and round trip (ms) of the node's clock; `None` for upstream nodes.
    clock: Option<(i64, u64)>,
    /// The node process's boot id, to see one node listed under two addresses;
    /// `None` for upstream nodes, which have none.
    boot_id: Option<String>,
}

async fn connect_node(plan: &PausePlan, address: &NodeAddress) -> Result<ConnectedNode, CallError> {
    let Some(pool) = &plan.pool else {
        return connect_node_with(plan, address, None).await;
    };
    match connect_node_with(plan, address, Some(pool)).await {
        Ok(node) => Ok(node),
        Err(_) => {
            // A pooled connection may have broken since the last pause (the node
            // restarted): once more on a new one.
            pool.forget(address);
            connect_node_with(plan, address, Some(pool)).await
        }
    }
}

async fn connect_node_with(
    plan: &PausePlan,
    address: &NodeAddress,
    pool: Option<&ConnectionPool>,
) -> Result<ConnectedNode, CallError> {
    let deadline = plan.connect_deadline();
    let connect = async {
        let (mut client, probe) = match pool {
            Some(pool) => pool.client(address, &plan.connect).await?,
            None => NodeClient::connect_sampled(address, &plan.connect).await?,
        };
        let protocol = if plan.upstream_only {
            Protocol::Upstream
        } else {
            client.protocol()
        };
        let (clock, boot_id) = match protocol {
            Protocol::Lease => (
                Some(sample_clock(&mut client, probe).await?),
                Some(client.status().await?.boot_id),
            ),
            Protocol::Upstream => (None, None),
        };
        Ok(ConnectedNode {
            client,
            protocol,
            clock,
            boot_id,
        })
    };
    tokio::time::timeout(deadline, connect)
        .await
        .unwrap_or(Err(CallError::TimedOut(deadline)))
}

async fn pause_node<'a>(
    plan: &PausePlan,
    node: &'a ConnectedNode,
) -> (&'a ConnectedNode, Result<PausedNode, CallError>) {
    let deadline = plan.pause_deadline();
    let mut client = node.client.clone();
    let pause = async {
        let mut paused = PausedNode {
            address: client.address().clone(),
            protocol: node.protocol,
            boot_id: None,
            pause_seq: None,
            drained_in_flight: None,
            in_flight_at_pause: None,
            clock_offset_ms: node.clock.map(|(offset_ms, _)| offset_ms),
            rtt_ms: node.clock.map(|(_, rtt_ms)| rtt_ms),
        };
        match node.protocol {
            Protocol::Lease => {
                let status = client
                    .pause_leased(
                        &plan.owner(),
                        plan.lease,
                        plan.max_wait,
                        plan.wait_outstanding,
                    )
                    .await?;
                paused.boot_id = Some(status.boot_id);
                paused.pause_seq = Some(status.pause_seq);
                paused.drained_in_flight = Some(status.drained_in_flight);
                paused.in_flight_at_pause = Some(status.in_flight_at_pause);
            }
            Protocol::Upstream => {
                client
                    .pause_upstream(plan.max_wait, plan.wait_outstanding)
                    .await?;
            }
        }
        Ok(paused)
    };
    let result = tokio::time::timeout(deadline, pause)
        .await
        .unwrap_or(Err(CallError::TimedOut(deadline)));
    (node, result)
}

/// Estimates the node's clock offset from the coordinator's as node_time minus the
/// midpoint of the call, keeping the sample with the shortest round trip (the offset is
/// then known to within rtt/2). `first` is the connection's probe, when it was one.
async fn sample_clock(
    client: &mut NodeClient,
    first: Option<ClockReading>,
) -> Result<(i64, u64), CallError> {
    let mut readings: Vec<ClockReading> = first.into_iter().collect();
    while readings.len() < CLOCK_SAMPLES {
        readings.push(client.read_clock().await?);
    }
    let best = readings
        .iter()
        .min_by_key(|reading| reading.rtt)
        .expect("CLOCK_SAMPLES > 0");
    let rtt_ms = best.rtt.as_millis() as u64;
    let midpoint_ms = unix_ms(best.sent_at) + (rtt_ms / 2) as i64;
    Ok((best.node_time_ms - midpoint_ms, rtt_ms))
}

async fn roll_back(
    plan: &PausePlan,
    tiers: Vec<Vec<PausedNode>>,
    mut clients: HashMap<NodeAddress, NodeClient>,
    failures: Vec<NodeReport>,
    maybe_paused: Vec<(NodeAddress, Protocol)>,
    interrupted: bool,
) -> PauseFailed {
    let record = PauseRecord {
        pause_id: plan.pause_id.clone(),
        coordinator_id: plan.coordinator_id.clone(),
        lease_ms: plan.lease.as_millis() as u64,
        wait_outstanding: plan.wait_outstanding,
        paused_at_ms: unix_ms(SystemTime::now()),
        skew_bound_ms: None,
        tiers,
        upstream_only: plan.upstream_only,
    };
    let mut to_release: Vec<Vec<PausedNode>> = record.tiers.clone();
    if let Some(last) = to_release.last_mut() {
        for (address, protocol) in &maybe_paused {
            last.push(PausedNode {
                address: address.clone(),
                // Released the way it was paused; a lease node by its owner, which
                // cannot open a pause that is not ours.
                protocol: *protocol,
                boot_id: None,
                pause_seq: None,
                drained_in_flight: None,
                in_flight_at_pause: None,
                clock_offset_ms: None,
                rtt_ms: None,
            });
        }
    }
    let releases = release_tiers(&record.owner(), &to_release, &mut clients, &plan.connect).await;
    let lease_expiry = unix_ms(SystemTime::now()) + record.lease_ms as i64;
    let release_of = |address: &NodeAddress| {
        releases
            .iter()
            .find(|release| release.address == *address)
            .map(|release| &release.result)
    };

    let mut nodes = Vec::new();
    let mut rolled_back = true;
    for (index, tier) in record.tiers.iter().enumerate() {
        for node in tier {
            let mut report = NodeReport::paused(node, index);
            match release_of(&node.address) {
                Some(Ok(_)) | None => report.outcome = NodeOutcome::RolledBack,
                Some(Err(error)) => {
                    rolled_back = false;
                    report.outcome = NodeOutcome::RollbackFailed;
                    report.error = Some(error.clone());
                    report.lease_expires_at_ms = Some(lease_expiry);
                }
            }
            nodes.push(report);
        }
    }
    for mut failure in failures.iter().cloned() {
        let maybe = maybe_paused
            .iter()
            .any(|(address, _)| *address == failure.address);
        if maybe && let Some(Err(error)) = release_of(&failure.address) {
            rolled_back = false;
            failure.error = Some(format!(
                "{}; it may have paused all the same, and releasing it failed too: {error}",
                failure.error.as_deref().unwrap_or("failed")
            ));
            failure.lease_expires_at_ms = Some(lease_expiry);
        }
        nodes.push(failure);
    }
    for (index, tier) in plan.tiers.iter().enumerate() {
        for address in tier {
            if !nodes.iter().any(|node| node.address == *address) {
                nodes.push(NodeReport::not_attempted(address, index));
            }
        }
    }

    let failed: Vec<String> = failures
        .iter()
        .map(|node| {
            let error = node.error.as_deref().unwrap_or("failed");
            // Some errors already begin with the node's address ("… speaks plaintext
            // gRPC, not TLS"): naming it twice in a row reads as a stutter.
            if error.starts_with(&node.address.to_string()) {
                error.to_owned()
            } else {
                format!("{}: {error}", node.address)
            }
        })
        .collect();
    let paused_count = record.nodes().count();
    let rollback = if paused_count == 0 && maybe_paused.is_empty() {
        "no node had paused".to_owned()
    } else if rolled_back && maybe_paused.is_empty() {
        format!("the pause was rolled back on all {paused_count} node(s) that had paused")
    } else if rolled_back {
        format!(
            "the pause was rolled back on all {} node(s) that had paused or may have",
            paused_count + maybe_paused.len()
        )
    } else {
        "ROLLBACK INCOMPLETE: some nodes may stay paused until their lease expires (see nodes)"
            .to_owned()
    };
    let what = if interrupted {
        "pause interrupted (SIGINT/SIGTERM) before every node had paused".to_owned()
    } else {
        format!(
            "pause failed on {} of {} node(s) ({})",
            failures.len(),
            plan.tiers.iter().map(Vec::len).sum::<usize>(),
            failed.join("; "),
        )
    };
    PauseFailed {
        summary: format!("{what}; {rollback}"),
        nodes,
        rolled_back,
        pause_id: plan.pause_id.clone(),
    }
}

impl PausedCluster {
    /// Takes back a pause left by an earlier process (a state file's record), to hold
    /// or release it. `renewed_at` is when its lease was last renewed, as recorded.
    pub fn attach(record: PauseRecord, connect: ConnectOptions, renewed_at: SystemTime) -> Self {
        let lease = Duration::from_millis(record.lease_ms);
        PausedCluster {
            record,
            clients: HashMap::new(),
            connect,
            lease,
            last_renewal: renewed_at,
            // Another process (a `--keep-alive`) may be renewing it still.
            last_renewal_attempt: SystemTime::now(),
            next_renewal: instant_of(renewed_at) + lease / 3,
            paused_at: None,
            lost: Vec::new(),
            finished: false,
        }
    }

    pub fn record(&self) -> &PauseRecord {
        &self.record
    }

    pub fn pause_id(&self) -> &str {
        &self.record.pause_id
    }

    /// No node's lease runs out before this plus the lease.
    pub fn last_renewal(&self) -> SystemTime {
        self.last_renewal
    }

    /// When [`PausedCluster::renew`] should run next: a third of the lease after the
    /// oldest lease still running was granted or renewed.
    pub fn renewal_due(&self) -> Instant {
        self.next_renewal
    }

    /// Every node reopens by itself by this time at the latest (coordinator clock,
    /// Unix ms) if it is neither renewed nor released again.
    pub fn lease_expires_at_ms(&self) -> i64 {
        unix_ms(self.last_renewal_attempt) + self.record.lease_ms as i64
    }

    /// Renews the lease on every node that has one, each call under a deadline. A node
    /// that no longer holds our pause (lease expired, restarted) or does not answer is
    /// remembered: the window is then invalid.
    pub async fn renew(&mut self) -> Result<(), String> {
        let renewed_at = SystemTime::now();
        // Counted as attempted from now: if this future is dropped mid-way (the end of
        // a hold), the renewals already sent may still reach their nodes.
        self.last_renewal_attempt = renewed_at;
        self.next_renewal = Instant::now() + self.lease / 3;
        let nodes = self
            .record
            .nodes()
            .filter(|node| node.protocol == Protocol::Lease);
        let results = renew_nodes(
            &self.record.owner(),
            self.lease,
            nodes,
            &self.clients,
            &self.connect,
        )
        .await;
        self.last_renewal_attempt = SystemTime::now();
        let mut failed = Vec::new();
        for (address, result) in results {
            if let Err(reason) = result {
                failed.push(format!("{address}: {reason}"));
                note_lost(&mut self.lost, address, reason);
            }
        }
        if failed.is_empty() {
            self.last_renewal = renewed_at;
            Ok(())
        } else {
            Err(format!("lease renewal failed: {}", failed.join("; ")))
        }
    }

    /// Keeps the cluster paused until `until`, renewing the lease every third of it.
    /// Returns at `until` even if a renewal is still waiting for an answer.
    pub async fn hold_until(&mut self, until: Instant) {
        loop {
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until.min(self.next_renewal)).await;
            if Instant::now() >= until {
                return;
            }
            tokio::select! {
                result = self.renew() => if let Err(reason) = result {
                    tracing::warn!(%reason, "lease renewal failed while holding the pause");
                },
                () = tokio::time::sleep_until(until) => return,
            }
        }
    }

    /// Releases every node (reverse tier order, retrying, each under a deadline) and
    /// checks the window.
    pub async fn release(self) -> Released {
        self.release_with(SkewFloor::Required).await
    }

    /// [`PausedCluster::release`], saying whether the window must be longer than the
    /// clock-skew floor to be valid: only when something restores by the window's
    /// mid-time (a point whose every database has an exact marker does not).
    pub async fn release_with(mut self, floor: SkewFloor) -> Released {
        self.finished = true;
        let lost = std::mem::take(&mut self.lost);
        release_checked(
            self.record.clone(),
            &mut self.clients,
            &self.connect,
            self.last_renewal_attempt,
            self.paused_at,
            lost,
            floor,
        )
        .await
    }

    /// Leaves the cluster paused on purpose, under its lease, and returns what a later
    /// [`PausedCluster::attach`] or `release_record` needs.
    pub fn detach(mut self) -> PauseRecord {
        self.finished = true;
        self.record.clone()
    }
}

/// Renews `owner`'s pause on `nodes` in parallel, each call under [`renew_deadline`].
async fn renew_nodes<'a>(
    owner: &PauseOwner,
    lease: Duration,
    nodes: impl Iterator<Item = &'a PausedNode>,
    clients: &HashMap<NodeAddress, NodeClient>,
    connect: &ConnectOptions,
) -> Vec<(NodeAddress, Result<(), String>)> {
    join_all(nodes.map(|node| {
        let client = clients.get(&node.address).cloned();
        renew_node(owner, lease, node, client, connect)
    }))
    .await
}

async fn renew_node(
    owner: &PauseOwner,
    lease: Duration,
    node: &PausedNode,
    client: Option<NodeClient>,
    connect: &ConnectOptions,
) -> (NodeAddress, Result<(), String>) {
    let deadline = renew_deadline(connect, lease);
    let renewal = async {
        let mut client = match client {
            Some(client) => client,
            None => NodeClient::connect(&node.address, connect).await?,
        };
        client.renew(owner, lease).await
    };
    let result = tokio::time::timeout(deadline, renewal)
        .await
        .unwrap_or(Err(CallError::TimedOut(deadline)))
        .map_err(|error| error.to_string())
        .and_then(|status| same_pause(node, &status));
    (node.address.clone(), result)
}

/// The node still holds the pause it took for us: same process, same pause.
fn same_pause(node: &PausedNode, status: &NodeStatus) -> Result<(), String> {
    if node.boot_id.as_deref() != Some(status.boot_id.as_str()) {
        return Err(format!(
            "the node restarted during the window (boot id {} is now {})",
            node.boot_id.as_deref().unwrap_or("?"),
            status.boot_id
        ));
    }
    if node.pause_seq != Some(status.pause_seq) {
        return Err("the node was released and paused again during the window".to_owned());
    }
    Ok(())
}

/// Releases a recorded pause from a state file written by an earlier process.
/// Connects to nodes it has no client for. `renewed_at` bounds when the nodes that
/// cannot be released reopen: their lease was not extended after it.
pub async fn release_record(
    record: PauseRecord,
    clients: &mut HashMap<NodeAddress, NodeClient>,
    connect: &ConnectOptions,
    renewed_at: SystemTime,
) -> Released {
    release_checked(
        record,
        clients,
        connect,
        renewed_at,
        None,
        Vec::new(),
        SkewFloor::Required,
    )
    .await
}

/// Whether a window shorter than twice the clock-skew bound (plus margin) is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkewFloor {
    /// The window's mid-time restores something (a PITR by time): a window too short
    /// for the skew bound cannot order it against every node's clock.
    Required,
    /// Every database has an exact marker made inside the pause (a named restore
    /// point, a log position): the mid-time restores nothing, so a short window is
    /// only a warning.
    NotNeeded,
}

/// Releases every node and judges the window: `paused_at` is its start on the
/// monotonic clock when this process paused it, `lost` the nodes that failed a renewal.
async fn release_checked(
    record: PauseRecord,
    clients: &mut HashMap<NodeAddress, NodeClient>,
    connect: &ConnectOptions,
    renewed_at: SystemTime,
    paused_at: Option<Instant>,
    lost: Vec<(NodeAddress, String)>,
    floor: SkewFloor,
) -> Released {
    // Read together, just before the first node is released.
    let window_end = SystemTime::now();
    let monotonic = paused_at.map(|start| start.elapsed());
    let nodes = release_tiers(&record.owner(), &record.tiers, clients, connect).await;
    let mut released = judge(record, unix_ms(window_end), monotonic, nodes, floor);
    for (address, reason) in lost {
        released.invalid_reasons.push(format!(
            "{address} lost the pause during the window ({reason})"
        ));
    }
    released.lease_expires_at_ms = unix_ms(renewed_at) + released.record.lease_ms as i64;
    released
}

/// Decides whether a released window is a restore point, from what the release found
/// out. `monotonic` is how long the window lasted on the monotonic clock, when known.
fn judge(
    record: PauseRecord,
    window_end_ms: i64,
    monotonic: Option<Duration>,
    nodes: Vec<NodeRelease>,
    floor: SkewFloor,
) -> Released {
    let owner = record.owner();
    let mut invalid_reasons = Vec::new();
    let mut warnings = Vec::new();
    for node in &nodes {
        match &node.result {
            Ok(Some(true)) => {}
            Ok(Some(false)) => invalid_reasons.push(format!(
                "{} did not stay paused under {owner} for the whole window{}",
                node.address,
                node.why_not
                    .as_deref()
                    .map(|why| format!(": {why}"))
                    .unwrap_or_default()
            )),
            // Only a node that offered no more than upstream's API is worth a word;
            // when the coordinator chose it (scalar-admin), that was the point.
            Ok(None) if record.upstream_only => {}
            Ok(None) => warnings.push(format!(
                "{} speaks only the upstream admin API: it has no lease, no pause id and no \
                 boot id, so a restart inside the window cannot be ruled out",
                node.address
            )),
            Err(error) => {
                invalid_reasons.push(format!("{} could not be released: {error}", node.address))
            }
        }
    }
    for node in record.nodes() {
        match node.in_flight_at_pause {
            Some(inside @ 1..) => invalid_reasons.push(format!(
                "{} still had {inside} request(s) in flight when it paused (--no-wait)",
                node.address
            )),
            // An upstream node cannot count them; without a drain nothing waited.
            None if !record.wait_outstanding => invalid_reasons.push(format!(
                "{} cannot report requests in flight (upstream admin API) and its drain \
                 was not awaited (--no-wait): requests may have been in flight when it \
                 paused",
                node.address
            )),
            _ => {}
        }
    }
    let window_ms = window_end_ms - record.paused_at_ms;
    match record.skew_bound_ms {
        Some(bound) => {
            let needed =
                (bound.saturating_mul(2) as i64).saturating_add(SKEW_MARGIN.as_millis() as i64);
            if window_ms <= needed && floor == SkewFloor::Required {
                invalid_reasons.push(format!(
                    "the window ({window_ms}ms) is not longer than twice the clock-skew bound \
                     plus margin ({needed}ms); hold the pause longer (--min-window)"
                ));
            } else if window_ms <= needed {
                warnings.push(format!(
                    "the window ({window_ms}ms) is not longer than twice the clock-skew bound \
                     plus margin ({needed}ms): its mid-time is no restore target, but every \
                     database has an exact marker"
                ));
            }
        }
        None => warnings
            .push("no node reported its clock, so the clock-skew bound is unknown".to_owned()),
    }
    if let Some(monotonic) = monotonic {
        let monotonic_ms = monotonic.as_millis() as i64;
        let stepped = window_ms - monotonic_ms;
        if stepped.abs() > drift_allowance_ms(monotonic_ms) {
            invalid_reasons.push(format!(
                "this coordinator's wall clock moved {window_ms}ms during the window while \
                 {monotonic_ms}ms passed (a clock step of {stepped}ms): the window's edges \
                 and mid-time cannot be trusted"
            ));
        }
    }
    for release in &nodes {
        let before = record
            .nodes()
            .find(|node| node.address == release.address)
            .and_then(|node| Some((node.clock_offset_ms?, node.rtt_ms?)));
        if let (Some(before), Some(after)) = (before, release.clock)
            && let Some(moved) = clock_moved(before, after, window_ms)
        {
            invalid_reasons.push(format!(
                "{}'s clock moved {moved}ms against this coordinator's during the window \
                 (offset {}ms before, {}ms at release): a clock was stepped, so the \
                 clock-skew bound no longer holds",
                release.address, before.0, after.0
            ));
        }
    }
    Released {
        record,
        window_end_ms,
        nodes,
        invalid_reasons,
        warnings,
        lease_expires_at_ms: 0,
    }
}

/// What two clocks may drift apart over `elapsed_ms` without a step: the margin, plus
/// 1000 ppm (NTP slews at most 500 ppm; free-running clocks are within ~100 ppm).
fn drift_allowance_ms(elapsed_ms: i64) -> i64 {
    SKEW_MARGIN.as_millis() as i64 + elapsed_ms.abs() / 1000
}

/// How far a node's clock offset moved between two readings `(offset_ms, rtt_ms)` taken
/// `elapsed_ms` apart, if by more than the readings' uncertainty and normal drift.
fn clock_moved(before: (i64, u64), after: (i64, u64), elapsed_ms: i64) -> Option<i64> {
    let moved = after.0.saturating_sub(before.0);
    let uncertainty = before.1.saturating_add(after.1).div_ceil(2) as i64;
    (moved.abs() > uncertainty + drift_allowance_ms(elapsed_ms)).then_some(moved)
}

/// The smallest hold that makes a window valid for this skew bound, or `min_window`.
pub fn required_window(skew_bound_ms: Option<u64>, min_window: Duration) -> Duration {
    let for_skew = skew_bound_ms
        .map(|bound| Duration::from_millis(bound.saturating_mul(2).saturating_add(1)) + SKEW_MARGIN)
        .unwrap_or_default();
    for_skew.max(min_window)
}

/// Releases tiers last to first, nodes of a tier in parallel. The next tier waits for
/// the current one to answer, but at most one call deadline: a node that does not
/// answer goes on being retried (under its own deadline) while the others are released.
async fn release_tiers(
    owner: &PauseOwner,
    tiers: &[Vec<PausedNode>],
    clients: &mut HashMap<NodeAddress, NodeClient>,
    connect: &ConnectOptions,
) -> Vec<NodeRelease> {
    let order_wait = call_deadline(connect);
    let mut running = FuturesUnordered::new();
    let mut done: Vec<NodeRelease> = Vec::new();
    for tier in tiers.iter().rev() {
        for node in tier {
            let client = clients.get(&node.address).cloned();
            running.push(release_node(owner, node, client, connect));
        }
        let next_tier_at = Instant::now() + order_wait;
        while tier
            .iter()
            .any(|node| !done.iter().any(|release| release.address == node.address))
        {
            tokio::select! {
                Some(release) = running.next() => done.push(release),
                () = tokio::time::sleep_until(next_tier_at) => {
                    tracing::warn!(
                        "a node of this tier has not answered its unpause within {}ms; \
                         releasing the next tier meanwhile",
                        order_wait.as_millis()
                    );
                    break;
                }
            }
        }
    }
    while let Some(release) = running.next().await {
        done.push(release);
    }
    done
}

/// Releases one node: attempts (reconnecting after a failure), each call under
/// [`call_deadline`], all of them under [`release_deadline`].
async fn release_node(
    owner: &PauseOwner,
    node: &PausedNode,
    client: Option<NodeClient>,
    connect: &ConnectOptions,
) -> NodeRelease {
    let deadline = release_deadline(connect);
    let attempts = async {
        let mut last_error = String::new();
        let mut client = client;
        for attempt in 0..UNPAUSE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            let mut connected = match client.take() {
                Some(client) => client,
                None => match NodeClient::connect(&node.address, connect).await {
                    Ok(client) => client,
                    Err(error) => {
                        last_error = error.to_string();
                        continue;
                    }
                },
            };
            let call_deadline = call_deadline(connect);
            let call =
                tokio::time::timeout(call_deadline, release_call(owner, node, &mut connected))
                    .await
                    .unwrap_or(Err(CallError::TimedOut(call_deadline)));
            match call {
                Ok(release) => return release,
                // Another holder owns it now: retrying cannot help, and the node is not
                // ours to open. Our pause is gone, so the window is invalid.
                Err(CallError::Conflict(message)) => {
                    tracing::warn!(address = %node.address, %message, "node is held by another pause; leaving it");
                    return NodeRelease {
                        address: node.address.clone(),
                        result: Ok(Some(false)),
                        why_not: Some(format!("another pause holds it: {message}")),
                        clock: None,
                    };
                }
                Err(error) => last_error = error.to_string(),
            }
        }
        NodeRelease {
            address: node.address.clone(),
            result: Err(format!("{last_error} (after {UNPAUSE_ATTEMPTS} attempts)")),
            why_not: None,
            clock: None,
        }
    };
    tokio::time::timeout(deadline, attempts)
        .await
        .unwrap_or_else(|_| NodeRelease {
            address: node.address.clone(),
            result: Err(format!(
                "no answer within {}ms; gave up releasing it",
                deadline.as_millis()
            )),
            why_not: None,
            clock: None,
        })
}

/// One unpause call, timed like a clock reading for lease nodes.
async fn release_call(
    owner: &PauseOwner,
    node: &PausedNode,
    client: &mut NodeClient,
) -> Result<NodeRelease, CallError> {
    let (stayed_paused, why_not, clock) = match node.protocol {
        Protocol::Lease => {
            let sent_at = SystemTime::now();
            let started = Instant::now();
            let released = client.unpause_leased(Some(owner)).await?;
            let rtt_ms = started.elapsed().as_millis() as u64;
            let midpoint_ms = unix_ms(sent_at) + (rtt_ms / 2) as i64;
            let why_not = if !released.was_paused {
                Some("it was not paused at release (its lease ran out, or it restarted)".to_owned())
            } else if released.status.holder != Some(Holder::Coordinator(owner.clone())) {
                Some("another pause held it at release".to_owned())
            } else {
                same_pause(node, &released.status).err()
            };
            let clock = (released.status.node_time_ms - midpoint_ms, rtt_ms);
            (Some(why_not.is_none()), why_not, Some(clock))
        }
        Protocol::Upstream => (release_upstream(client).await?, None, None),
    };
    Ok(NodeRelease {
        address: node.address.clone(),
        result: Ok(stayed_paused),
        why_not,
        clock,
    })
}

/// Upstream nodes cannot prove they stayed paused; an open gate at release time does
/// prove they did not.
async fn release_upstream(client: &mut NodeClient) -> Result<Option<bool>, CallError> {
    let still_paused = client.check_paused_upstream().await?;
    client.unpause_upstream().await?;
    Ok(if still_paused { None } else { Some(false) })
}

impl Drop for PausedCluster {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Last resort (an early return or a panic): release on a thread of its own,
        // with fresh connections, because the caller's runtime may be the one that is
        // blocked in this drop. Bounded, so a dead network cannot hang the process;
        // the lease covers whatever this does not reach.
        tracing::error!(pause_id = %self.record.pause_id, "paused cluster dropped without release; releasing now");
        let record = self.record.clone();
        let connect = self.connect.clone();
        let renewed_at = self.last_renewal_attempt;
        let releasing = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                // The timeout is made inside the runtime: its timer needs one.
                runtime.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        release_record(record, &mut HashMap::new(), &connect, renewed_at),
                    )
                    .await
                    .ok()
                });
            }
        });
        releasing.join().ok();
    }
}

#[cfg(test)]
mod tests;
