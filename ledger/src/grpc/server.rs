//! The `Ledger` and `Auditor` gRPC services: convert wire messages to domain requests,
//! call [`crate::node`], convert back. Node errors become `tonic::Status` here and
//! nowhere else.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::wire::auditor_server::{Auditor, AuditorServer};
use super::wire::ledger_server::{Ledger, LedgerServer};
use super::wire::{RecordReply, RecordRequest, TransferReply, TransferRequest};
use super::{ERROR_KIND_KEY, INSUFFICIENT_FUNDS};
use crate::node::{self, AuditorNode, LedgerNode, RecordError, TransferError};
use crate::store::StoreError;

#[derive(Clone)]
pub struct LedgerService {
    node: Arc<LedgerNode>,
}

impl LedgerService {
    pub fn server(node: Arc<LedgerNode>) -> LedgerServer<LedgerService> {
        LedgerServer::new(LedgerService { node })
    }
}

#[tonic::async_trait]
impl Ledger for LedgerService {
    async fn transfer(
        &self,
        request: Request<TransferRequest>,
    ) -> Result<Response<TransferReply>, Status> {
        let request = request.into_inner();
        let receipt = self
            .node
            .transfer(node::TransferRequest {
                from: request.from_account,
                to: request.to_account,
                amount: request.amount,
                hold_inside_gate: Duration::from_millis(request.hold_inside_gate_ms),
            })
            .await
            .map_err(transfer_status)?;
        Ok(Response::new(TransferReply {
            tx_id: receipt.tx_id,
            hash: receipt.hash,
            committed_at_ms: receipt.committed_at_ms,
        }))
    }
}

#[derive(Clone)]
pub struct AuditorService {
    node: Arc<AuditorNode>,
}

impl AuditorService {
    pub fn server(node: Arc<AuditorNode>) -> AuditorServer<AuditorService> {
        AuditorServer::new(AuditorService { node })
    }
}

#[tonic::async_trait]
impl Auditor for AuditorService {
    async fn record(
        &self,
        request: Request<RecordRequest>,
    ) -> Result<Response<RecordReply>, Status> {
        let request = request.into_inner();
        let recorded_at_ms = self
            .node
            .record(request.tx_id, request.hash)
            .await
            .map_err(record_status)?;
        Ok(Response::new(RecordReply { recorded_at_ms }))
    }
}

/// UNAVAILABLE is kept for "paused, try again" (the gate's answer), so a load generator
/// can count pauses apart from faults; a database lock that outlived its busy timeout
/// is ABORTED, gRPC's code for a concurrency conflict. An unreachable ledger database
/// is a fault of this node, not a pause: INTERNAL.
fn transfer_status(error: TransferError) -> Status {
    let message = error.to_string();
    match error {
        TransferError::Invalid(_) => Status::invalid_argument(message),
        TransferError::SlowTransfersDisabled => Status::failed_precondition(message),
        TransferError::Store(StoreError::InsufficientFunds { .. }) => {
            let mut status = Status::failed_precondition(message);
            status.metadata_mut().insert(
                ERROR_KIND_KEY,
                tonic::metadata::MetadataValue::from_static(INSUFFICIENT_FUNDS),
            );
            status
        }
        TransferError::Store(StoreError::UnknownAccount(_)) => Status::not_found(message),
        TransferError::Store(StoreError::Busy { .. }) => Status::aborted(message),
        TransferError::Store(_) | TransferError::NotAudited { .. } => Status::internal(message),
    }
}

/// A busy or unreachable auditor database is UNAVAILABLE, which ledger nodes retry (as a
/// broken connection): recording is idempotent, so a retry after a database restart is safe.
fn record_status(error: RecordError) -> Status {
    let message = error.to_string();
    match error {
        RecordError::Invalid(_) => Status::invalid_argument(message),
        RecordError::Store(StoreError::HashConflict { .. }) => Status::already_exists(message),
        RecordError::Store(StoreError::Busy { .. } | StoreError::Unreachable { .. }) => {
            Status::unavailable(message)
        }
        RecordError::Store(_) => Status::internal(message),
    }
}
