//! An admin server that implements only the three upstream methods (Pause, Unpause,
//! CheckPaused), like an unmodified ScalarDL node: no Stats, no LeaseAdmin. It counts
//! the calls it receives so tests can see what the CLI did to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};

use stillpoint_node::grpc::wire::rpc::admin_server::{Admin, AdminServer};
use stillpoint_node::grpc::wire::rpc::{CheckPausedResponse, PauseRequest, StatsResponse};
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
pub struct Calls {
    pub paused: AtomicBool,
    pub pauses: AtomicU32,
    pub unpauses: AtomicU32,
    /// `wait_outstanding` of the last Pause received.
    pub waited: AtomicBool,
    /// Set: Unpause, CheckPaused and Stats are received and never answered, like a
    /// node whose process hangs after accepting the connection.
    pub hang: AtomicBool,
}

#[derive(Debug, Clone)]
struct UpstreamOnly {
    calls: Arc<Calls>,
}

impl UpstreamOnly {
    async fn hang_if_told(&self) {
        if self.calls.hang.load(SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[tonic::async_trait]
impl Admin for UpstreamOnly {
    async fn pause(&self, request: Request<PauseRequest>) -> Result<Response<()>, Status> {
        self.calls
            .waited
            .store(request.into_inner().wait_outstanding, SeqCst);
        self.calls.pauses.fetch_add(1, SeqCst);
        self.calls.paused.store(true, SeqCst);
        Ok(Response::new(()))
    }

    async fn unpause(&self, _: Request<()>) -> Result<Response<()>, Status> {
        self.hang_if_told().await;
        self.calls.unpauses.fetch_add(1, SeqCst);
        self.calls.paused.store(false, SeqCst);
        Ok(Response::new(()))
    }

    async fn check_paused(&self, _: Request<()>) -> Result<Response<CheckPausedResponse>, Status> {
        self.hang_if_told().await;
        Ok(Response::new(CheckPausedResponse {
            paused: self.calls.paused.load(SeqCst),
        }))
    }

    async fn stats(&self, _: Request<()>) -> Result<Response<StatsResponse>, Status> {
        self.hang_if_told().await;
        Err(Status::unimplemented("this node predates Stats"))
    }
}

/// Runs until dropped, on a runtime of its own so that plain `#[test]`s can use it.
pub struct UpstreamOnlyServer {
    pub address: SocketAddr,
    pub calls: Arc<Calls>,
    _runtime: tokio::runtime::Runtime,
}

impl UpstreamOnlyServer {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let calls = Arc::new(Calls::default());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();
        let service = AdminServer::new(UpstreamOnly {
            calls: calls.clone(),
        });
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Self {
            address,
            calls,
            _runtime: runtime,
        }
    }
}
