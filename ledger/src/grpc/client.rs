//! Clients of the cluster's own services, answering in domain types: the auditor client
//! a ledger node records through, and the ledger client the load generator drives.
//! Dependencies flow one way: `load` uses this module, never the reverse.

use std::time::Duration;

use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::wire::auditor_client::AuditorClient as WireAuditorClient;
use super::wire::ledger_client::LedgerClient as WireLedgerClient;
use super::wire::{RecordRequest, TransferRequest};
use super::{ERROR_KIND_KEY, INSUFFICIENT_FUNDS};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid address {target:?}: {source}")]
    InvalidAddress {
        target: String,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: tonic::transport::Error,
    },
}

/// Accepts `host:port` as well as a full `http://host:port` URL.
fn endpoint(target: &str) -> Result<Endpoint, ClientError> {
    let url = if target.contains("://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    Endpoint::from_shared(url)
        .map(|endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
        .map_err(|source| ClientError::InvalidAddress {
            target: target.to_owned(),
            source,
        })
}

/// Why a Record call failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordCallError {
    pub retryable: bool,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct AuditorClient {
    target: String,
    inner: WireAuditorClient<Channel>,
}

impl AuditorClient {
    /// Connects on first use, so that a ledger node can start before its auditor.
    pub fn lazy(target: &str) -> Result<Self, ClientError> {
        Ok(AuditorClient {
            target: target.to_owned(),
            inner: WireAuditorClient::new(endpoint(target)?.connect_lazy()),
        })
    }

    /// Returns when the auditor first recorded the transaction. UNAVAILABLE is
    /// retryable: the auditor is paused, restarting or unreachable, and has recorded
    /// nothing, or has recorded exactly this (Record is idempotent). So are UNKNOWN
    /// and CANCELLED, which the auditor never answers: they are the connection
    /// breaking mid-call (the auditor killed), after which the record may or may not
    /// be there. Giving up on them left transfers in the ledger that the auditor never
    /// recorded (the nemesis found one of each, within 11 ms of a SIGKILL of the
    /// auditor).
    pub async fn record(&self, tx_id: &str, hash: &str) -> Result<i64, RecordCallError> {
        let request = RecordRequest {
            tx_id: tx_id.to_owned(),
            hash: hash.to_owned(),
        };
        match self.inner.clone().record(request).await {
            Ok(reply) => Ok(reply.into_inner().recorded_at_ms),
            Err(status) => Err(RecordCallError {
                retryable: matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                message: format!(
                    "auditor {}: {:?}: {}",
                    self.target,
                    status.code(),
                    status.message()
                ),
            }),
        }
    }
}

/// How a transfer ended, as a client of the ledger sees it (and the load generator
/// counts it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferOutcome {
    Committed,
    /// A paused node refused it (gate in reject mode, or a hold that timed out).
    Rejected(String),
    /// Insufficient funds: the ledger said no, correctly.
    Declined,
    /// Anything else.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct LedgerClient {
    target: String,
    inner: WireLedgerClient<Channel>,
}

impl LedgerClient {
    pub async fn connect(target: &str) -> Result<Self, ClientError> {
        let channel = endpoint(target)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                target: target.to_owned(),
                source,
            })?;
        Ok(LedgerClient {
            target: target.to_owned(),
            inner: WireLedgerClient::new(channel),
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// `hold_inside_gate_ms` is test-only (see `TransferRequest`); pass 0.
    pub async fn transfer(
        &self,
        from: i64,
        to: i64,
        amount: i64,
        hold_inside_gate_ms: u64,
    ) -> TransferOutcome {
        let request = TransferRequest {
            from_account: from,
            to_account: to,
            amount,
            hold_inside_gate_ms,
        };
        let status = match self.inner.clone().transfer(request).await {
            Ok(_) => return TransferOutcome::Committed,
            Err(status) => status,
        };
        let declined = status.code() == Code::FailedPrecondition
            && status
                .metadata()
                .get(ERROR_KIND_KEY)
                .is_some_and(|kind| kind == INSUFFICIENT_FUNDS);
        // UNAVAILABLE also comes from a node that is down or unreachable; only the
        // gate's own refusal ("this node is paused for a backup…") is a rejection, so a
        // node that died during a test shows up as failures.
        let paused = status.code() == Code::Unavailable && status.message().contains("paused");
        let message = format!("{}: {:?}: {}", self.target, status.code(), status.message());
        if declined {
            TransferOutcome::Declined
        } else if paused {
            TransferOutcome::Rejected(message)
        } else {
            TransferOutcome::Failed(message)
        }
    }
}
