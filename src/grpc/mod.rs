//! The coordinator's gRPC edge: the only module of this crate that sees prost and
//! tonic wire types (generated in `stillpoint_node::grpc::wire`).
//!
//! - `client.rs`: [`client::NodeClient`], which the coordinator uses to talk to one node
//!   in domain types, over upstream `rpc.Admin` or our `LeaseAdmin`.
//! - `pool.rs`: connections kept open between pauses by a long-running coordinator.
//! - `probe.rs`: TLS probes that name what went wrong when a call fails at the
//!   transport (a TLS/plaintext mismatch, a refused client certificate).
//!
//! Everything crossing this boundary is converted here, so the rest of the crate never
//! sees a prost message or a `tonic::Status`. The node's side (server, auth, TLS
//! accept) is the `stillpoint-node` crate.

pub mod client;
pub mod pool;
pub mod probe;

#[cfg(test)]
mod tests;
