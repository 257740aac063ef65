//! The two kinds of node, in domain types; `grpc::server` wraps them and is the only
//! place that sees prost messages or `tonic::Status`.
//!
//! - [`LedgerNode`]: validates a transfer, commits it as the next hash-chain link, has
//!   the auditor record the link, and only then answers.
//! - [`AuditorNode`]: records links, idempotently.
//!
//! Both run as the inside of a gated request: a pause waits for everything here to
//! finish, including the call to the auditor. Each request runs as a task the server
//! waits for (see `grpc::gated_app`), so none of this is cut short when a client leaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::grpc::client::{AuditorClient, RecordCallError};
use crate::store::{AuditorStore, LedgerStore, StoreError, TransferOrder};

/// Longest test-only hold a ledger node accepts; longer is a unit mistake.
pub const MAX_HOLD_INSIDE_GATE: Duration = Duration::from_secs(600);

/// How long a ledger node keeps retrying an unavailable auditor by default. The ledger
/// row is already committed, so giving up breaks the ledger/auditor invariant; this
/// rides out an auditor restart or a pause, but not an outage.
pub const DEFAULT_RECORD_RETRY_FOR: Duration = Duration::from_secs(30);

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    pub from: i64,
    pub to: i64,
    pub amount: i64,
    /// Test-only: time to wait inside the gate before committing.
    pub hold_inside_gate: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub tx_id: String,
    pub hash: String,
    pub committed_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("invalid transfer: {0}")]
    Invalid(String),
    #[error(
        "hold_inside_gate_ms is a test-only field; start the node with --allow-slow-transfers to use it"
    )]
    SlowTransfersDisabled,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "transfer {tx_id} is committed on the ledger but the auditor did not record it \
         ({attempts} attempt(s) over {}ms): {reason}; the ledger and the auditor now disagree",
        .elapsed.as_millis()
    )]
    NotAudited {
        tx_id: String,
        attempts: u32,
        elapsed: Duration,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("invalid record: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerOptions {
    pub allow_slow_transfers: bool,
    pub record_retry_for: Duration,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            allow_slow_transfers: false,
            record_retry_for: DEFAULT_RECORD_RETRY_FOR,
        }
    }
}

pub struct LedgerNode {
    store: Arc<dyn LedgerStore>,
    auditor: AuditorClient,
    options: LedgerOptions,
    /// tx ids are `{boot id}-{counter}`: unique across nodes and restarts without
    /// coordination, and they say which node run committed them.
    boot_id: String,
    next_tx: AtomicU64,
}

impl LedgerNode {
    pub fn new(
        store: Arc<dyn LedgerStore>,
        auditor: AuditorClient,
        boot_id: &str,
        options: LedgerOptions,
    ) -> Self {
        LedgerNode {
            store,
            auditor,
            options,
            boot_id: boot_id.to_owned(),
            next_tx: AtomicU64::new(1),
        }
    }

    pub async fn transfer(&self, request: TransferRequest) -> Result<Receipt, TransferError> {
        validate(&request)?;
        if !request.hold_inside_gate.is_zero() {
            if !self.options.allow_slow_transfers {
                return Err(TransferError::SlowTransfersDisabled);
            }
            tokio::time::sleep(request.hold_inside_gate).await;
        }
        let order = TransferOrder {
            tx_id: format!(
                "{}-{}",
                self.boot_id,
                self.next_tx.fetch_add(1, Ordering::Relaxed)
            ),
            from: request.from,
            to: request.to,
            amount: request.amount,
        };
        let committed = self.store.transfer(&order).await?;
        self.record(&order.tx_id, &committed.hash).await?;
        Ok(Receipt {
            tx_id: order.tx_id,
            hash: committed.hash,
            committed_at_ms: committed.committed_at_ms,
        })
    }

    /// Retries only what the auditor calls retryable (it is paused, restarting or
    /// briefly locked), with capped exponential backoff, for `record_retry_for`.
    async fn record(&self, tx_id: &str, hash: &str) -> Result<(), TransferError> {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.auditor.record(tx_id, hash).await {
                Ok(_recorded_at_ms) => return Ok(()),
                Err(error) => error,
            };
            let RecordCallError { retryable, message } = error;
            if !retryable || started.elapsed() + backoff > self.options.record_retry_for {
                return Err(TransferError::NotAudited {
                    tx_id: tx_id.to_owned(),
                    attempts,
                    elapsed: started.elapsed(),
                    reason: message,
                });
            }
            tracing::warn!(tx_id, attempts, %message, "auditor unavailable; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn validate(request: &TransferRequest) -> Result<(), TransferError> {
    if request.from == request.to {
        return Err(TransferError::Invalid(format!(
            "from and to are the same account ({})",
            request.from
        )));
    }
    if request.amount <= 0 {
        return Err(TransferError::Invalid(format!(
            "amount must be positive, got {}",
            request.amount
        )));
    }
    if request.hold_inside_gate > MAX_HOLD_INSIDE_GATE {
        return Err(TransferError::Invalid(format!(
            "hold_inside_gate_ms {} is longer than the {}s limit",
            request.hold_inside_gate.as_millis(),
            MAX_HOLD_INSIDE_GATE.as_secs()
        )));
    }
    Ok(())
}

pub struct AuditorNode {
    store: Arc<dyn AuditorStore>,
}

impl AuditorNode {
    pub fn new(store: Arc<dyn AuditorStore>) -> Self {
        AuditorNode { store }
    }

    /// Returns when the transaction was first recorded.
    pub async fn record(&self, tx_id: String, hash: String) -> Result<i64, RecordError> {
        if tx_id.is_empty() {
            return Err(RecordError::Invalid("tx_id is empty".to_owned()));
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RecordError::Invalid(format!(
                "hash must be 64 hex digits, got {hash:?}"
            )));
        }
        Ok(self.store.record(&tx_id, &hash).await?)
    }
}
