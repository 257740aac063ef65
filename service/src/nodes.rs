//! The cluster's nodes between pauses: the service keeps a connection to each open
//! (so a scheduled point does not pay for the handshakes inside its setup) and asks
//! each every few seconds how long it has been paused, for the metric an alert on a
//! node paused past its lease reads. The runbook's tiers are resolved again each time,
//! so nodes an SRV answer no longer names are let go.

use std::sync::Arc;
use std::time::Duration;

use stillpoint::backup::pause_plan;

use crate::Service;

/// How often the nodes are asked.
const EVERY: Duration = Duration::from_secs(5);

pub async fn watch(service: Arc<Service>) {
    loop {
        look(&service).await;
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = service.shutdown.cancelled() => return,
        }
    }
}

async fn look(service: &Service) {
    let plan = match pause_plan(&service.runbook.pause).await {
        Ok(plan) => plan,
        Err(error) => {
            tracing::warn!("cannot resolve the cluster's nodes: {error}");
            return;
        }
    };
    service.pool.keep_only(plan.tiers.iter().flatten());
    for address in plan.tiers.iter().flatten() {
        let status = match service.pool.client(address, &plan.connect).await {
            Ok((mut client, _)) => client.status().await,
            Err(error) => Err(error),
        };
        match status {
            Ok(status) => {
                let paused_for = status.paused_since_ms.filter(|_| status.paused).map_or(
                    Duration::ZERO,
                    |since| {
                        Duration::from_millis(
                            status.node_time_ms.saturating_sub(since).max(0) as u64
                        )
                    },
                );
                service
                    .metrics
                    .node(&address.to_string(), paused_for, plan.lease);
            }
            Err(error) => {
                tracing::debug!(node = %address, "status: {error}");
                service.pool.forget(address);
            }
        }
    }
}
