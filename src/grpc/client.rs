//! [`NodeClient`]: one connection to one node's admin services, in domain types.
//!
//! A node either serves our `LeaseAdmin` extension ([`Protocol::Lease`]) or only the
//! upstream `rpc.Admin` ([`Protocol::Upstream`]); [`NodeClient::connect`] finds out
//! which, so callers branch on a value instead of on error codes.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::wire::lease::lease_admin_client::LeaseAdminClient;
use super::wire::rpc::admin_client::AdminClient;
use super::wire::{lease, rpc};
use crate::node::{Holder, NodeStatus, Released};
use crate::resolve::NodeAddress;

/// How to reach nodes. TLS verifies the server certificate against the given CA (or the
/// system roots) and the node's host name, or `override_authority` when set.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub tls: Option<TlsOptions>,
    pub connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            tls: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM of the CA that signed the nodes' certificates; `None` uses the system roots.
    pub ca_pem: Option<String>,
    /// The name to expect in the node's certificate instead of its address's host.
    pub override_authority: Option<String>,
}

/// Which admin API a node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Upstream `rpc.Admin` plus stillpoint's `LeaseAdmin`.
    Lease,
    /// Only upstream `rpc.Admin`: no lease, no pause id, no clock or boot id.
    Upstream,
}

/// Why a call to a node failed, in terms a coordinator can act on.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("cannot connect: {0}")]
    Unreachable(String),
    #[error("no answer within {}ms", .0.as_millis())]
    TimedOut(Duration),
    /// The node refused because of its state: requests did not drain (upstream's
    /// FAILED_PRECONDITION), or it is not paused under our id.
    #[error("{0}")]
    Precondition(String),
    /// Another holder owns the node's pause (ABORTED).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("gRPC {code}: {message}")]
    Other { code: String, message: String },
}

impl From<Status> for CallError {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::FailedPrecondition => CallError::Precondition(message),
            Code::Aborted => CallError::Conflict(message),
            Code::InvalidArgument => CallError::Invalid(message),
            Code::Unavailable => CallError::Unavailable(message),
            Code::DeadlineExceeded => CallError::TimedOut(Duration::ZERO),
            code => CallError::Other {
                code: format!("{code:?}"),
                message,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeClient {
    address: NodeAddress,
    protocol: Protocol,
    upstream: AdminClient<Channel>,
    lease: LeaseAdminClient<Channel>,
}

impl NodeClient {
    /// Connects and probes for the `LeaseAdmin` extension.
    pub async fn connect(
        address: &NodeAddress,
        options: &ConnectOptions,
    ) -> Result<Self, CallError> {
        let channel = channel(address, options).await?;
        let mut lease = LeaseAdminClient::new(channel.clone());
        let probe = tokio::time::timeout(
            options.connect_timeout,
            lease.status(lease::StatusRequest {}),
        )
        .await
        .map_err(|_| CallError::TimedOut(options.connect_timeout))?;
        let protocol = match probe {
            Ok(_) => Protocol::Lease,
            Err(status) if status.code() == Code::Unimplemented => Protocol::Upstream,
            Err(status) => return Err(status.into()),
        };
        Ok(Self {
            address: address.clone(),
            protocol,
            upstream: AdminClient::new(channel),
            lease,
        })
    }

    pub fn address(&self) -> &NodeAddress {
        &self.address
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub async fn status(&mut self) -> Result<NodeStatus, CallError> {
        let status = self.lease.status(lease::StatusRequest {}).await?;
        Ok(status.into_inner().into())
    }

    pub async fn pause_leased(
        &mut self,
        pause_id: &str,
        lease: Duration,
        max_wait: Duration,
        wait_outstanding: bool,
    ) -> Result<NodeStatus, CallError> {
        let request = lease::LeasedPauseRequest {
            pause_id: pause_id.to_owned(),
            lease_ms: lease.as_millis() as u64,
            max_pause_wait_ms: max_wait.as_millis() as u64,
            wait_outstanding,
        };
        Ok(self.lease.pause(request).await?.into_inner().into())
    }

    pub async fn renew(
        &mut self,
        pause_id: &str,
        lease: Duration,
    ) -> Result<NodeStatus, CallError> {
        let request = lease::RenewRequest {
            pause_id: pause_id.to_owned(),
            lease_ms: lease.as_millis() as u64,
        };
        Ok(self.lease.renew(request).await?.into_inner().into())
    }

    pub async fn unpause_leased(&mut self, pause_id: &str) -> Result<Released, CallError> {
        let request = lease::UnpauseRequest {
            pause_id: pause_id.to_owned(),
        };
        let response = self.lease.unpause(request).await?.into_inner();
        let status = response.released.ok_or_else(|| CallError::Other {
            code: "Internal".to_owned(),
            message: "unpause answer carried no node status".to_owned(),
        })?;
        Ok(Released {
            was_paused: response.was_paused,
            status: status.into(),
        })
    }

    pub async fn pause_upstream(
        &mut self,
        max_wait: Duration,
        wait_outstanding: bool,
    ) -> Result<(), CallError> {
        let request = rpc::PauseRequest {
            wait_outstanding,
            max_pause_wait_time: Some(max_wait.as_millis() as i64),
        };
        self.upstream.pause(request).await?;
        Ok(())
    }

    pub async fn unpause_upstream(&mut self) -> Result<(), CallError> {
        self.upstream.unpause(()).await?;
        Ok(())
    }

    pub async fn check_paused_upstream(&mut self) -> Result<bool, CallError> {
        Ok(self.upstream.check_paused(()).await?.into_inner().paused)
    }

    /// The node's `Stats` JSON, parsed; non-JSON text is returned as a JSON string.
    pub async fn stats(&mut self) -> Result<serde_json::Value, CallError> {
        let text = self.upstream.stats(()).await?.into_inner().stats;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}

async fn channel(address: &NodeAddress, options: &ConnectOptions) -> Result<Channel, CallError> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|error| CallError::Invalid(format!("bad address {address}: {error}")))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if let Some(tls) = &options.tls {
        let mut config = ClientTlsConfig::new();
        config = match &tls.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some(authority) = &tls.override_authority {
            config = config.domain_name(authority.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|error| CallError::Invalid(format!("TLS settings for {address}: {error}")))?;
    }
    tokio::time::timeout(options.connect_timeout, endpoint.connect())
        .await
        .map_err(|_| CallError::TimedOut(options.connect_timeout))?
        .map_err(|error| CallError::Unreachable(crate::error_chain(&error)))
}

impl From<lease::NodeStatus> for NodeStatus {
    fn from(wire: lease::NodeStatus) -> Self {
        let holder = match (wire.paused, wire.pause_id.is_empty()) {
            (_, false) => Some(Holder::PauseId(wire.pause_id)),
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
