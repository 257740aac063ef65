//! The gRPC edge: the only module that touches prost and tonic wire types.
//!
//! - `wire`: code generated from `proto/` (upstream `rpc.Admin`, our `LeaseAdmin`).
//! - `server.rs`: serves a [`crate::node::NodeAdmin`] over both services, plus gRPC
//!   health and reflection.
//! - `auth.rs`: who may call the admin services (TLS, mutual TLS, bearer tokens), and
//!   the secret types both sides share.
//! - `client.rs`: [`client::NodeClient`], which the coordinator uses to talk to one node
//!   in domain types.
//! - `handshake.rs`: TLS handshakes that fail: the node accepts its admin port's TLS
//!   itself and logs each refused handshake; the client probes a port to name a
//!   TLS/plaintext mismatch or a refused client certificate.
//!
//! Everything crossing this boundary is converted here, so the rest of the crate never
//! sees a prost message or a `tonic::Status`.

pub mod auth;
pub mod client;
pub mod handshake;
pub mod server;

/// Generated wire types. Public for embedders and for tests that need an upstream-only
/// server; the rest of this crate goes through `client` and `server`.
pub mod wire {
    pub mod rpc {
        tonic::include_proto!("rpc");
    }
    pub mod lease {
        tonic::include_proto!("stillpoint.admin.v1");
    }
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("admin_descriptor");
}

/// Upstream's default when a PauseRequest carries no max_pause_wait_time.
pub const UPSTREAM_DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
