//! A small HTTP service made pausable by stillpoint: a counter behind axum, with the
//! gate in front of its routes and the admin services on a port of their own.
//!
//! ```text
//! cargo run -p stillpoint-node --example pausable_service -- 127.0.0.1:8080 127.0.0.1:50052
//! stillpoint pause --addresses 127.0.0.1:50052 --hold-for 5s     # or, with the upstream client:
//! scalar-admin -c PAUSE -a 127.0.0.1:50052 ... scalar-admin -c UNPAUSE -a 127.0.0.1:50052
//! ```
//!
//! Arguments: the app's address and the admin address (each `127.0.0.1:0` when left
//! out; the ports taken are printed). Environment: `STILLPOINT_ADMIN_TOKEN`, a bearer
//! token the admin services then require (the CLI reads the same variable);
//! `PAUSABLE_HOLD`, e.g. `5s`: how long a request waits at a closed gate (without it, a
//! paused service refuses requests at once with 503 and `Retry-After`).
//!
//! Everything under "the glue" is what embedding costs; the app above it knows nothing
//! of pauses.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use stillpoint_node::time::parse_duration;
use stillpoint_node::{
    AdminSecurity, AdminToken, ClosedPolicy, Gate, GateLayer, NodeAdmin, Role, admin_routes_with,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

/// The application: `POST /increment` adds one, `GET /count` reads the counter.
fn app() -> Router {
    async fn increment(State(count): State<Arc<AtomicU64>>) -> String {
        (count.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }
    async fn read(State(count): State<Arc<AtomicU64>>) -> String {
        count.load(Ordering::SeqCst).to_string()
    }
    Router::new()
        .route("/increment", post(increment))
        .route("/count", get(read))
        .with_state(Arc::new(AtomicU64::new(0)))
}

type BoxError = Box<dyn Error + Send + Sync>;

/// Errors end the program with their message (not `main`'s `Debug` of them) and exit 1.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "pausable_service: {}",
                stillpoint_node::error_chain(&*error)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// Binds `address` (`127.0.0.1:0` when not given), naming it when that fails.
async fn listen(address: Option<String>) -> Result<TcpListener, BoxError> {
    let address = address.unwrap_or("127.0.0.1:0".into());
    let listener = TcpListener::bind(&address).await;
    Ok(listener.map_err(|error| format!("cannot listen on {address:?}: {error}"))?)
}

async fn run() -> Result<(), BoxError> {
    // The glue. One gate for the node, and the node's pause state around it; its
    // settings are read before anything binds, so a bad one is said first.
    let policy = match std::env::var("PAUSABLE_HOLD") {
        Ok(hold) => ClosedPolicy::Hold {
            timeout: parse_duration(&hold).map_err(|e| format!("PAUSABLE_HOLD: {e}"))?,
        },
        Err(_) => ClosedPolicy::Reject,
    };
    let gate = Arc::new(Gate::new(policy));
    let admin = Arc::new(NodeAdmin::new(gate.clone(), None));
    let mut security = AdminSecurity::default();
    if let Some(token) = AdminToken::from_env("STILLPOINT_ADMIN_TOKEN")? {
        security = security.with_token(&token, Role::Operator)?;
    }
    let mut args = std::env::args().skip(1);
    let app_listener = listen(args.next()).await?;
    let admin_listener = listen(args.next()).await?;
    println!("app listening on {}", app_listener.local_addr()?);
    println!("admin listening on {}", admin_listener.local_addr()?);

    // Ctrl-C stops both servers and the lease watchdog; all three are awaited.
    let shutdown = CancellationToken::new();
    let app = axum::serve(app_listener, app().layer(GateLayer::new(gate)))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let admin_server = tonic::transport::Server::builder()
        .add_routes(admin_routes_with(admin.clone(), &security).await)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(admin_listener),
            shutdown.clone().cancelled_owned(),
        );
    tokio::try_join!(
        async { app.await.map_err(BoxError::from) },
        async { admin_server.await.map_err(BoxError::from) },
        async {
            admin.run_lease_watchdog(shutdown.clone()).await;
            Ok(())
        },
        async { Ok(tokio::signal::ctrl_c().await.map(|()| shutdown.cancel())?) },
    )?;
    Ok(())
}
