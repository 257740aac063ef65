//! The window report: what `stillpoint pause`/`unpause` print and what a backup
//! manifest embeds. Field names follow the ones existing runbook parsers already read
//! (`pause_start_timestamp_ms`, …) and add the restore point, skew bound and validity.

use std::time::SystemTime;

use super::{PauseFailed, PauseRecord, PausedNode, Released};
use crate::grpc::client::{CallError, Protocol};
use crate::resolve::NodeAddress;
use crate::time::Zone;

/// What happened to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeOutcome {
    /// Paused, and left paused (plain `pause`).
    Paused,
    /// Paused, then released.
    Released,
    /// Paused, and every attempt to release it failed: it reopens when its lease ends.
    ReleaseFailed,
    /// Could not be paused.
    Failed,
    /// Paused, then released again because another node failed.
    RolledBack,
    RollbackFailed,
    /// Its tier was never reached because an earlier tier failed.
    NotAttempted,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeReport {
    pub address: NodeAddress,
    /// 1-based, in the order the tiers were given.
    pub tier: usize,
    pub protocol: Option<Protocol>,
    pub outcome: NodeOutcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Requests that were in flight when the gate closed and had to finish first.
    pub drained_in_flight: Option<u64>,
    /// Requests inside the gate when the node reported itself paused (always 0).
    pub in_flight_at_pause: Option<u64>,
    /// Node clock minus coordinator clock, known to within `rtt_ms / 2`.
    pub clock_offset_ms: Option<i64>,
    pub rtt_ms: Option<u64>,
    pub boot_id: Option<String>,
    /// Whether the node proved it stayed under this pause for the whole window.
    pub stayed_paused: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lease_expires_at_ms: Option<i64>,
}

impl NodeReport {
    pub(super) fn paused(node: &PausedNode, tier_index: usize) -> Self {
        NodeReport {
            address: node.address.clone(),
            tier: tier_index + 1,
            protocol: Some(node.protocol),
            outcome: NodeOutcome::Paused,
            error: None,
            drained_in_flight: node.drained_in_flight,
            in_flight_at_pause: node.in_flight_at_pause,
            clock_offset_ms: node.clock_offset_ms,
            rtt_ms: node.rtt_ms,
            boot_id: node.boot_id.clone(),
            stayed_paused: None,
            lease_expires_at_ms: None,
        }
    }

    pub(super) fn failed(
        address: &NodeAddress,
        tier_index: usize,
        protocol: Option<Protocol>,
        error: &CallError,
    ) -> Self {
        NodeReport {
            protocol,
            outcome: NodeOutcome::Failed,
            error: Some(error.to_string()),
            ..Self::not_attempted(address, tier_index)
        }
    }

    pub(super) fn not_attempted(address: &NodeAddress, tier_index: usize) -> Self {
        NodeReport {
            address: address.clone(),
            tier: tier_index + 1,
            protocol: None,
            outcome: NodeOutcome::NotAttempted,
            error: None,
            drained_in_flight: None,
            in_flight_at_pause: None,
            clock_offset_ms: None,
            rtt_ms: None,
            boot_id: None,
            stayed_paused: None,
            lease_expires_at_ms: None,
        }
    }
}

/// The pause window as JSON. Times are Unix milliseconds on the coordinator's clock;
/// the `*_date_time` fields show the same instants in `timezone`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PauseReport {
    pub pause_id: String,
    pub pause_start_timestamp_ms: Option<i64>,
    pub pause_end_timestamp_ms: Option<i64>,
    pub pause_start_date_time: Option<String>,
    pub pause_end_date_time: Option<String>,
    pub timezone: String,
    /// The mid-time of the window: the point-in-time-restore target.
    pub restore_point_timestamp_ms: Option<i64>,
    pub restore_point_date_time: Option<String>,
    pub window_ms: Option<i64>,
    pub skew_bound_ms: Option<u64>,
    pub window_valid: bool,
    pub invalid_reasons: Vec<String>,
    pub warnings: Vec<String>,
    pub lease_ms: u64,
    /// Set while the window is open: when the nodes reopen by themselves.
    pub lease_expires_at_ms: Option<i64>,
    pub nodes: Vec<NodeReport>,
}

impl PauseReport {
    /// The window has started and is still open (plain `pause`).
    pub fn open(record: &PauseRecord, renewed_at: SystemTime, zone: Zone) -> Self {
        let nodes = nodes_of(record, |_| (NodeOutcome::Paused, None));
        PauseReport {
            pause_id: record.pause_id.clone(),
            pause_start_timestamp_ms: Some(record.paused_at_ms),
            pause_end_timestamp_ms: None,
            pause_start_date_time: Some(zone.format_ms(record.paused_at_ms)),
            pause_end_date_time: None,
            timezone: zone.name().to_owned(),
            restore_point_timestamp_ms: None,
            restore_point_date_time: None,
            window_ms: None,
            skew_bound_ms: record.skew_bound_ms,
            window_valid: false,
            invalid_reasons: vec![
                "the window is still open: run `stillpoint unpause` to close it".to_owned(),
            ],
            warnings: upstream_warnings(record),
            lease_ms: record.lease_ms,
            lease_expires_at_ms: Some(record.lease_expires_at_ms(renewed_at)),
            nodes,
        }
    }

    /// No pause at all (`backup --no-pause`): the span the cuts took, marked as not a
    /// restore point, so the manifest says plainly what it holds.
    pub fn unpaused(cuts_started_ms: i64, cuts_ended_ms: i64, zone: Zone) -> Self {
        PauseReport {
            pause_id: "none".to_owned(),
            pause_start_timestamp_ms: Some(cuts_started_ms),
            pause_end_timestamp_ms: Some(cuts_ended_ms),
            pause_start_date_time: Some(zone.format_ms(cuts_started_ms)),
            pause_end_date_time: Some(zone.format_ms(cuts_ended_ms)),
            timezone: zone.name().to_owned(),
            restore_point_timestamp_ms: None,
            restore_point_date_time: None,
            window_ms: Some(cuts_ended_ms - cuts_started_ms),
            skew_bound_ms: None,
            window_valid: false,
            invalid_reasons: vec![
                "UNSAFE: taken with --no-pause; the databases were cut one after another \
                 while the cluster kept running, so they need not agree with each other"
                    .to_owned(),
            ],
            warnings: Vec::new(),
            lease_ms: 0,
            lease_expires_at_ms: None,
            nodes: Vec::new(),
        }
    }

    /// The window is closed: every node was released (or we tried).
    pub fn closed(released: &Released, zone: Zone) -> Self {
        let record = &released.record;
        let start = record.paused_at_ms;
        let end = released.window_end_ms;
        let restore_point = start + (end - start) / 2;
        let lease_expiry = released.lease_expires_at_ms;
        let nodes = nodes_of(record, |address| {
            match released
                .nodes
                .iter()
                .find(|node| &node.address == address)
                .map(|node| &node.result)
            {
                Some(Ok(stayed)) => (NodeOutcome::Released, *stayed),
                Some(Err(_)) | None => (NodeOutcome::ReleaseFailed, None),
            }
        })
        .into_iter()
        .map(|mut node| {
            if node.outcome == NodeOutcome::ReleaseFailed {
                node.lease_expires_at_ms = Some(lease_expiry);
                node.error = released
                    .nodes
                    .iter()
                    .find(|release| release.address == node.address)
                    .and_then(|release| release.result.clone().err());
            }
            node
        })
        .collect();
        PauseReport {
            pause_id: record.pause_id.clone(),
            pause_start_timestamp_ms: Some(start),
            pause_end_timestamp_ms: Some(end),
            pause_start_date_time: Some(zone.format_ms(start)),
            pause_end_date_time: Some(zone.format_ms(end)),
            timezone: zone.name().to_owned(),
            restore_point_timestamp_ms: Some(restore_point),
            restore_point_date_time: Some(zone.format_ms(restore_point)),
            window_ms: Some(end - start),
            skew_bound_ms: record.skew_bound_ms,
            window_valid: released.window_valid(),
            invalid_reasons: released.invalid_reasons.clone(),
            warnings: released.warnings.clone(),
            lease_ms: record.lease_ms,
            lease_expires_at_ms: None,
            nodes,
        }
    }

    /// The pause never completed and was rolled back.
    pub fn failed(failure: &PauseFailed, lease_ms: u64, zone: Zone) -> Self {
        PauseReport {
            pause_id: failure.pause_id.clone(),
            pause_start_timestamp_ms: None,
            pause_end_timestamp_ms: None,
            pause_start_date_time: None,
            pause_end_date_time: None,
            timezone: zone.name().to_owned(),
            restore_point_timestamp_ms: None,
            restore_point_date_time: None,
            window_ms: None,
            skew_bound_ms: None,
            window_valid: false,
            invalid_reasons: vec![failure.summary.clone()],
            warnings: Vec::new(),
            lease_ms,
            lease_expires_at_ms: None,
            nodes: failure.nodes.clone(),
        }
    }
}

fn nodes_of(
    record: &PauseRecord,
    outcome_of: impl Fn(&NodeAddress) -> (NodeOutcome, Option<bool>),
) -> Vec<NodeReport> {
    record
        .tiers
        .iter()
        .enumerate()
        .flat_map(|(index, tier)| tier.iter().map(move |node| (index, node)))
        .map(|(index, node)| {
            let (outcome, stayed_paused) = outcome_of(&node.address);
            NodeReport {
                outcome,
                stayed_paused,
                ..NodeReport::paused(node, index)
            }
        })
        .collect()
}

/// Nodes that offered only upstream `rpc.Admin` when the coordinator would have used
/// leases; none when it chose upstream itself (`scalar-admin`), which asked for exactly
/// that.
fn upstream_warnings(record: &PauseRecord) -> Vec<String> {
    record
        .nodes()
        .filter(|node| node.protocol == Protocol::Upstream && !record.upstream_only)
        .map(|node| {
            format!(
                "{} speaks only the upstream admin API: no lease (it stays paused if nobody \
                 unpauses it), no pause id, no clock-skew estimate",
                node.address
            )
        })
        .collect()
}
