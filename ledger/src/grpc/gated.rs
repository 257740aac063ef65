//! [`GatedApp`]: an application service behind the node's gate, whose calls run to
//! completion.
//!
//! When a client disconnects, tonic drops the call's future. For a transfer that would
//! cut it in half: committed on the ledger but never recorded by the auditor, and the
//! gate permit gone early, so a pause could call the node drained while a commit is
//! still under way. So each call (gate permit included) runs as a task on a
//! `TaskTracker` that the server waits for at shutdown; the request future only awaits
//! that task. Nothing is detached.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use stillpoint::gate::{Gate, GateLayer, Gated};
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::{Layer, Service};

#[derive(Debug, Clone)]
pub struct GatedApp<S> {
    inner: Gated<S>,
    tracker: TaskTracker,
}

impl<S> GatedApp<S> {
    pub fn new(service: S, gate: Arc<Gate>, tracker: TaskTracker) -> Self {
        GatedApp {
            inner: GateLayer::new(gate).layer(service),
            tracker,
        }
    }
}

/// Routes by the wrapped service's name, so it can be added to tonic `Routes`.
impl<S: NamedService> NamedService for GatedApp<S> {
    const NAME: &'static str = S::NAME;
}

type Reply = Result<http::Response<Body>, Infallible>;

impl<S> Service<http::Request<Body>> for GatedApp<S>
where
    Gated<S>: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <Gated<S> as Service<http::Request<Body>>>::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = self.tracker.spawn(inner.call(request));
        Box::pin(async move {
            match call.await {
                Ok(reply) => reply,
                Err(error) => Ok(tonic::Status::internal(format!(
                    "request handler failed: {error}"
                ))
                .into_http()),
            }
        })
    }
}
