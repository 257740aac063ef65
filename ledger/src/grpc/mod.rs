//! The gRPC edge of the ledger cluster: the only module that touches prost and tonic
//! wire types.
//!
//! - `wire`: code generated from `proto/ledger.proto`.
//! - `server.rs`: the `Ledger` and `Auditor` services over [`crate::node`], and the one
//!   place where node errors become `tonic::Status`.
//! - `gated.rs`: [`gated_app`], which puts an application service behind the node's
//!   gate and lets each admitted call finish even if its client goes away (a held call
//!   whose client goes away never runs).
//! - `client.rs`: the auditor client ledger nodes use and the ledger client the load
//!   generator uses, answering in domain types.

pub mod client;
mod gated;
pub mod server;

pub use gated::gated_app;

/// Generated wire types. Public so that integration tests can send fields the load
/// generator never sends (such as `hold_inside_gate_ms`).
pub mod wire {
    tonic::include_proto!("stillpoint.ledger.v1");
}

/// Trailer that tells a declined transfer (insufficient funds) apart from other
/// FAILED_PRECONDITION answers without parsing messages.
const ERROR_KIND_KEY: &str = "ledger-error";
const INSUFFICIENT_FUNDS: &str = "insufficient-funds";
