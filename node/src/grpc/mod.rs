//! The gRPC edge of a node: the only module of this crate that touches prost and tonic
//! wire types.
//!
//! - `wire`: code generated from `proto/` (upstream `rpc.Admin`, our `LeaseAdmin`).
//! - `server.rs`: serves a [`crate::pause::NodeAdmin`] over both services, plus gRPC
//!   health and reflection.
//! - `auth.rs`: who may call the admin services (TLS, mutual TLS, bearer tokens), and
//!   the secret and credential types the coordinator's client shares.
//! - `tls.rs`: the admin port's TLS, accepted by the node itself so that each refused
//!   handshake is logged with its peer and reason.
//!
//! Everything crossing this boundary is converted here, so the rest of the crate never
//! sees a prost message or a `tonic::Status`.

pub mod auth;
pub mod server;
pub mod tls;

/// Generated wire types. Public for the coordinator's client (`stillpoint::grpc`) and
/// for tests that need an upstream-only server; the rest of this crate goes through
/// `server`.
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
