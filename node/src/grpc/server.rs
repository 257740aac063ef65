//! Serves a node's [`NodeAdmin`] over gRPC: the upstream-compatible `rpc.Admin`, our
//! `stillpoint.admin.v1.LeaseAdmin` extension, gRPC health and reflection. Every
//! service but health sits behind `auth::Guarded` (token, client certificate).
//!
//! Errors become `tonic::Status` in exactly one place, [`to_status`].

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::UPSTREAM_DEFAULT_MAX_WAIT;
use super::auth::{AdminSecurity, Guarded};
use super::wire::lease::lease_admin_server::{LeaseAdmin, LeaseAdminServer};
use super::wire::rpc::admin_server::{Admin, AdminServer};
use super::wire::{FILE_DESCRIPTOR_SET, lease, rpc};
use crate::pause::{
    AdminError, ErrorKind, Holder, NodeAdmin, NodeStatus, PauseCommand, PauseOwner,
};

/// Every admin service of a node, open to any caller, ready to add to a tonic server
/// (or to merge with the application's own services when they share a port). Right
/// for loopback-only tests; production nodes use [`admin_routes_with`].
pub async fn admin_routes(admin: Arc<NodeAdmin>) -> tonic::service::Routes {
    admin_routes_with(admin, &AdminSecurity::default()).await
}

/// Every admin service of a node, each behind `security`'s checks (token, client
/// certificate) except health. With TLS, serve them on `ServerTls::incoming`, which
/// accepts the handshakes and logs each refused one.
pub async fn admin_routes_with(
    admin: Arc<NodeAdmin>,
    security: &AdminSecurity,
) -> tonic::service::Routes {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<UpstreamAdmin>>().await;
    health
        .set_serving::<LeaseAdminServer<LeaseAdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor sets compiled into this binary are valid");
    let policy = security.policy();
    tonic::service::Routes::new(Guarded::new(
        AdminServer::new(UpstreamAdmin {
            admin: admin.clone(),
        }),
        policy.clone(),
    ))
    .add_service(Guarded::new(
        LeaseAdminServer::new(LeaseAdminService { admin }),
        policy.clone(),
    ))
    // Health is deliberately unguarded: see the `auth` module header.
    .add_service(health_service)
    .add_service(Guarded::new(reflection, policy))
}

/// `rpc.Admin`, exactly as upstream clients expect it.
#[derive(Debug, Clone)]
pub struct UpstreamAdmin {
    admin: Arc<NodeAdmin>,
}

#[tonic::async_trait]
impl Admin for UpstreamAdmin {
    async fn pause(&self, request: Request<rpc::PauseRequest>) -> Result<Response<()>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let max_wait = match request.max_pause_wait_time {
            None => UPSTREAM_DEFAULT_MAX_WAIT,
            Some(ms) if ms >= 0 => Duration::from_millis(ms as u64),
            Some(ms) => {
                return Err(Status::invalid_argument(format!(
                    "max_pause_wait_time must not be negative, got {ms}"
                )));
            }
        };
        tracing::info!(
            ?peer,
            max_wait_ms = max_wait.as_millis() as u64,
            "upstream pause"
        );
        self.admin
            .pause(PauseCommand {
                holder: Holder::Upstream,
                lease: self.admin.upstream_lease(),
                max_wait,
                wait_outstanding: request.wait_outstanding,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(()))
    }

    async fn unpause(&self, request: Request<()>) -> Result<Response<()>, Status> {
        tracing::info!(peer = ?request.remote_addr(), "upstream unpause");
        self.admin.unpause(None).map_err(to_status)?;
        Ok(Response::new(()))
    }

    async fn check_paused(
        &self,
        _: Request<()>,
    ) -> Result<Response<rpc::CheckPausedResponse>, Status> {
        Ok(Response::new(rpc::CheckPausedResponse {
            paused: self.admin.status().paused,
        }))
    }

    async fn stats(&self, _: Request<()>) -> Result<Response<rpc::StatsResponse>, Status> {
        let stats = serde_json::json!({
            "node": self.admin.status(),
            "gate": self.admin.gate().stats(),
        });
        Ok(Response::new(rpc::StatsResponse {
            stats: stats.to_string(),
        }))
    }
}

/// `stillpoint.admin.v1.LeaseAdmin`: pauses with a lease and a pause id.
#[derive(Debug, Clone)]
pub struct LeaseAdminService {
    admin: Arc<NodeAdmin>,
}

#[tonic::async_trait]
impl LeaseAdmin for LeaseAdminService {
    async fn pause(
        &self,
        request: Request<lease::LeasedPauseRequest>,
    ) -> Result<Response<lease::NodeStatus>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        tracing::info!(
            ?peer,
            pause_id = %request.pause_id,
            coordinator_id = %request.coordinator_id,
            lease_ms = request.lease_ms,
            "pause"
        );
        let status = self
            .admin
            .pause(PauseCommand {
                holder: Holder::Coordinator(PauseOwner::new(
                    request.pause_id,
                    request.coordinator_id,
                )),
                lease: Some(Duration::from_millis(request.lease_ms)),
                max_wait: Duration::from_millis(request.max_pause_wait_ms),
                wait_outstanding: request.wait_outstanding,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(status.into()))
    }

    async fn renew(
        &self,
        request: Request<lease::RenewRequest>,
    ) -> Result<Response<lease::NodeStatus>, Status> {
        let request = request.into_inner();
        let status = self
            .admin
            .renew(
                &PauseOwner::new(request.pause_id, request.coordinator_id),
                Duration::from_millis(request.lease_ms),
            )
            .map_err(to_status)?;
        Ok(Response::new(status.into()))
    }

    async fn unpause(
        &self,
        request: Request<lease::UnpauseRequest>,
    ) -> Result<Response<lease::UnpauseResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        tracing::info!(
            ?peer,
            pause_id = %request.pause_id,
            coordinator_id = %request.coordinator_id,
            "unpause"
        );
        let owner = (!request.pause_id.is_empty())
            .then(|| PauseOwner::new(request.pause_id, request.coordinator_id));
        let released = self.admin.unpause(owner.as_ref()).map_err(to_status)?;
        Ok(Response::new(lease::UnpauseResponse {
            was_paused: released.was_paused,
            released: Some(released.status.into()),
        }))
    }

    async fn status(
        &self,
        _: Request<lease::StatusRequest>,
    ) -> Result<Response<lease::NodeStatus>, Status> {
        Ok(Response::new(self.admin.status().into()))
    }
}

/// The one place where admin errors become gRPC statuses. A drain timeout stays
/// FAILED_PRECONDITION, which upstream clients already understand.
fn to_status(error: AdminError) -> Status {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::Retryable => Status::failed_precondition(message),
        ErrorKind::Conflict => Status::aborted(message),
        ErrorKind::Invalid => Status::invalid_argument(message),
    }
}

impl From<NodeStatus> for lease::NodeStatus {
    fn from(status: NodeStatus) -> Self {
        let (pause_id, coordinator_id) = match status.holder {
            Some(Holder::Coordinator(owner)) => (owner.pause_id, owner.coordinator_id),
            Some(Holder::Upstream) | None => (String::new(), String::new()),
        };
        lease::NodeStatus {
            paused: status.paused,
            pause_id,
            coordinator_id,
            boot_id: status.boot_id,
            node_time_ms: status.node_time_ms,
            paused_since_ms: status.paused_since_ms.unwrap_or(0),
            pause_seq: status.pause_seq,
            in_flight: status.in_flight,
            drained_in_flight: status.drained_in_flight,
            in_flight_at_pause: status.in_flight_at_pause,
            lease_remaining_ms: status.lease_remaining.map_or(0, |d| d.as_millis() as u64),
            held_now: status.held_now,
        }
    }
}

/// The way back, for the coordinator's client (`stillpoint::grpc::client`): a status
/// read off the wire. Here beside its inverse, since both types are this crate's.
impl From<lease::NodeStatus> for NodeStatus {
    fn from(wire: lease::NodeStatus) -> Self {
        let holder = match (wire.paused, wire.pause_id.is_empty()) {
            (_, false) => Some(Holder::Coordinator(PauseOwner::new(
                wire.pause_id,
                wire.coordinator_id,
            ))),
            (true, true) => Some(Holder::Upstream),
            (false, true) => None,
        };
        NodeStatus {
            paused: wire.paused,
            holder,
            boot_id: wire.boot_id,
            node_time_ms: wire.node_time_ms,
            paused_since_ms: (wire.paused_since_ms != 0).then_some(wire.paused_since_ms),
            pause_seq: wire.pause_seq,
            in_flight: wire.in_flight,
            drained_in_flight: wire.drained_in_flight,
            in_flight_at_pause: wire.in_flight_at_pause,
            lease_remaining: (wire.lease_remaining_ms != 0)
                .then(|| Duration::from_millis(wire.lease_remaining_ms)),
            held_now: wire.held_now,
        }
    }
}
