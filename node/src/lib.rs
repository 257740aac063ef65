//! stillpoint-node: what an application embeds so that stillpoint can pause it.
//!
//! A node of a stillpoint cluster puts its transactions behind a [`Gate`] and serves
//! the admin services through which a coordinator (the `stillpoint` CLI, or the
//! upstream `scalar-admin` client) pauses it: drain what is in flight, hold new
//! requests, and reopen when told to or when the pause's lease runs out. This crate is
//! that and nothing else: no storage, compression, encryption or database drivers (the
//! coordinator side is the `stillpoint` crate).
//!
//! - [`gate`]: per-node admission control every transaction passes through, and
//!   [`GateLayer`], which gates a whole tonic or axum service in one line.
//! - [`pause`]: the node's pause state around its gate: who holds the pause
//!   ([`PauseOwner`]), until when (the lease and its watchdog), and the boot id and
//!   pause sequence that prove a window afterwards. [`NodeAdmin`] is its handle.
//! - [`grpc`]: the admin services on the wire (upstream `rpc.Admin`, our `LeaseAdmin`,
//!   health, reflection) and who may call them (TLS, mutual TLS, bearer tokens).
//! - [`time`]: Unix milliseconds and human durations (`500ms`, `10s`).
//!
//! # Making a service pausable
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use stillpoint_node::{ClosedPolicy, Gate, GateLayer, NodeAdmin, admin_routes};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run(app: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! // One gate per node: every request of the application passes through it. While it
//! // is closed, a request waits up to 5 s for it to reopen (a pause becomes latency).
//! let gate = Arc::new(Gate::new(ClosedPolicy::Hold { timeout: Duration::from_secs(5) }));
//! let admin = Arc::new(NodeAdmin::new(gate.clone(), None));
//!
//! // The application's services behind the gate, the admin services on their own port
//! // (production nodes add TLS and tokens with `admin_routes_with`).
//! let app = tonic::transport::Server::builder()
//!     .layer(GateLayer::new(gate))
//!     .add_routes(app)
//!     .serve("127.0.0.1:50051".parse()?);
//! let admin_server = tonic::transport::Server::builder()
//!     .add_routes(admin_routes(admin.clone()).await)
//!     .serve("127.0.0.1:50052".parse()?);
//! // A pause the coordinator stops renewing reopens the gate by itself. The watchdog
//! // is awaited with the servers (a real service cancels `shutdown` when it stops).
//! let shutdown = CancellationToken::new();
//! let watchdog = async {
//!     admin.run_lease_watchdog(shutdown.clone()).await;
//!     Ok(())
//! };
//! tokio::try_join!(app, admin_server, watchdog)?;
//! # Ok(())
//! # }
//! ```
//!
//! `stillpoint pause --addresses 127.0.0.1:50052 --hold-for 5s` then pauses it.
//!
//! `examples/pausable_service.rs` is the same for an axum app, as a program: a token
//! from the environment, the gate's hold time, and one shutdown for both servers and
//! the watchdog (`cargo run -p stillpoint-node --example pausable_service`). The
//! integration tests run it and pause it with `stillpoint pause --hold-for` and with
//! `scalar-admin`.

pub mod gate;
pub mod grpc;
pub mod pause;
pub mod time;

pub use gate::{ClosedPolicy, Gate, GateLayer};
pub use grpc::auth::{AdminSecurity, AdminToken, Role, ServerTls};
pub use grpc::server::{admin_routes, admin_routes_with};
pub use pause::{NodeAdmin, PauseOwner};

/// An error and its sources, joined with `: `, each said once. Drivers and transports
/// put the useful part (the server's message, the refused connection) in a source and
/// show only a summary themselves; others already quote their source in their own
/// message (tonic's "tcp connect error" wraps an error of the same text), so a cause
/// the text already holds is not repeated. Some say it twice in one message (mysql_async:
/// "Input/output error: Input/output error: Connection refused"): a part said twice in a
/// row is said once.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split(": ") {
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn chain(texts: &[&'static str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |source, text| {
                Some(Layer {
                    text,
                    source: source.map(Box::new),
                })
            })
            .expect("at least one text")
    }

    #[test]
    fn each_cause_is_said_once() {
        let error = chain(&[
            "transport error",
            "tcp connect error",
            "tcp connect error",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            super::error_chain(&error),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
        // mysql_async's I/O error quotes its own I/O error, which quotes the OS error.
        let doubled = chain(&[
            "Input/output error: Input/output error: Connection refused (os error 111)",
            "Input/output error: Connection refused (os error 111)",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            super::error_chain(&doubled),
            "Input/output error: Connection refused (os error 111)"
        );
        let quoted = chain(&["cannot read r.toml: no such file", "no such file"]);
        assert_eq!(
            super::error_chain(&quoted),
            "cannot read r.toml: no such file"
        );
    }
}
