//! Runs one node of the reference cluster: its application service (Ledger or Auditor)
//! behind the node's gate, the stillpoint admin services (never gated), and the lease
//! watchdog, until one shutdown token is cancelled — then waits for every call in
//! progress to finish.
//!
//! The binary binds the listeners (so it can print their addresses) and hands them to
//! [`run`]; tests can do the same with port 0.
//!
//! [`Node::with_admin_security`] puts the admin services behind TLS, mutual TLS and a
//! bearer token (docs/security.md). TLS needs the admin services on their own
//! listener: the reference application and its clients (the load generator, ledger
//! nodes calling the auditor) speak plaintext gRPC.

use std::sync::Arc;
use std::time::Duration;

use stillpoint_node::gate::{ClosedPolicy, Gate};
use stillpoint_node::grpc::auth::{AdminSecurity, ServerTls};
use stillpoint_node::grpc::server::admin_routes_with;
use stillpoint_node::pause::NodeAdmin;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::grpc::client::{AuditorClient, ClientError};
use crate::grpc::gated_app;
use crate::grpc::server::{AuditorService, LedgerService};
use crate::node::{AuditorNode, LedgerNode, LedgerOptions};
use crate::store::{self, DbUrl, Seed, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Ledger {
        /// Address of the auditor node (`host:port` or `http://host:port`).
        auditor: String,
        seed: Seed,
        options: LedgerOptions,
    },
    Auditor,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub role: Role,
    pub db: DbUrl,
    pub closed_policy: ClosedPolicy,
    /// Bounds pauses from upstream `rpc.Admin` clients, which cannot renew a lease.
    pub upstream_pause_lease: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the gRPC server stopped: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(
        "TLS on the admin services needs them on their own address (--admin-listen): the \
         application port stays plaintext for the reference cluster's own clients"
    )]
    TlsNeedsAdminListener,
    #[error("the admin TLS settings are not usable: {0}")]
    Tls(String),
}

/// A node whose database is open and ready, not yet serving.
pub struct Node {
    admin: Arc<NodeAdmin>,
    app: App,
    security: AdminSecurity,
}

enum App {
    Ledger(Arc<LedgerNode>),
    Auditor(Arc<AuditorNode>),
}

impl Node {
    /// Opens (and, for the first ledger node, seeds) the database before anything
    /// listens, so that a printed address means a node ready to serve.
    pub async fn open(config: ServeConfig) -> Result<Node, ServeError> {
        let gate = Arc::new(Gate::new(config.closed_policy));
        let admin = Arc::new(NodeAdmin::new(gate, config.upstream_pause_lease));
        let db = config.db;
        let app = match config.role {
            Role::Ledger {
                auditor,
                seed,
                options,
            } => {
                let auditor = AuditorClient::lazy(&auditor)?;
                let store = store::open_ledger(&db, seed).await?;
                App::Ledger(Arc::new(LedgerNode::new(
                    store,
                    auditor,
                    admin.boot_id(),
                    options,
                )))
            }
            Role::Auditor => {
                let store = store::open_auditor(&db).await?;
                App::Auditor(Arc::new(AuditorNode::new(store)))
            }
        };
        Ok(Node {
            admin,
            app,
            security: AdminSecurity::default(),
        })
    }

    /// Who may call this node's admin services (open by default). The TLS identity is
    /// loaded here, so a bad key or certificate fails before anything listens.
    pub fn with_admin_security(mut self, security: AdminSecurity) -> Result<Node, ServeError> {
        if let Some(tls) = security.tls() {
            tls.check()
                .map_err(|error| ServeError::Tls(error.to_string()))?;
        }
        self.security = security;
        Ok(self)
    }

    pub fn boot_id(&self) -> &str {
        self.admin.boot_id()
    }

    /// Adds the gated application service to `routes`.
    fn add_app(&self, routes: Routes, tracker: &TaskTracker) -> Routes {
        let gate = self.admin.gate().clone();
        match &self.app {
            App::Ledger(node) => routes.add_service(gated_app(
                LedgerService::server(node.clone()),
                gate,
                tracker.clone(),
            )),
            App::Auditor(node) => routes.add_service(gated_app(
                AuditorService::server(node.clone()),
                gate,
                tracker.clone(),
            )),
        }
    }
}

/// Serves until `shutdown` is cancelled (or a server fails, which cancels it), then
/// waits for calls in progress. With `admin_listener`, the admin services get their own
/// server; otherwise they share `listener` with the application.
pub async fn run(
    node: Node,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let admin_tls = node.security.tls().cloned();
    if admin_tls.is_some() && admin_listener.is_none() {
        return Err(ServeError::TlsNeedsAdminListener);
    }
    let calls = TaskTracker::new();
    let admin = admin_routes_with(node.admin.clone(), &node.security).await;
    let watchdog = node.admin.run_lease_watchdog(shutdown.clone());
    let result = match admin_listener {
        None => {
            let routes = node.add_app(admin, &calls);
            let ((), served) = tokio::join!(watchdog, serve(routes, listener, None, &shutdown));
            served
        }
        Some(admin_listener) => {
            let routes = node.add_app(Routes::default(), &calls);
            let ((), app_served, admin_served) = tokio::join!(
                watchdog,
                serve(routes, listener, None, &shutdown),
                serve(admin, admin_listener, admin_tls, &shutdown),
            );
            app_served.and(admin_served)
        }
    };
    // The servers have stopped taking calls; let the ones in progress finish, so no
    // transfer stops between its ledger commit and its auditor record.
    calls.close();
    calls.wait().await;
    tracing::info!("node stopped");
    result
}

/// Serves `routes` on `listener` until `shutdown`. With `tls`, the handshakes are
/// accepted by `ServerTls::incoming`, which logs every refused one at warn with the
/// peer's address (tonic's own TLS would log it at debug only).
async fn serve(
    routes: Routes,
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = Server::builder().add_routes(routes);
    let stopped = shutdown.clone().cancelled_owned();
    let result = match tls {
        None => server.serve_with_incoming_shutdown(incoming, stopped).await,
        Some(tls) => match tls.incoming(incoming) {
            Ok(incoming) => server.serve_with_incoming_shutdown(incoming, stopped).await,
            Err(error) => {
                shutdown.cancel();
                return Err(ServeError::Tls(error.to_string()));
            }
        },
    };
    // One server stopping, for whatever reason, stops the node: a node whose admin
    // port died could no longer be paused.
    shutdown.cancel();
    result.map_err(ServeError::from)
}

#[cfg(test)]
mod tests;
