//! A tower `Layer` that puts a whole service behind a [`Gate`]: one line in a tonic or
//! axum router (`.layer(GateLayer::new(gate))`).
//!
//! The permit is held until the inner service's response future resolves, which covers
//! the whole handler of a unary call. A streamed response body is not covered.
//!
//! A request that meets a closed gate in hold mode waits inside its own future: if its
//! caller goes away (a gRPC deadline, a disconnect), the server drops that future and
//! the request is never run. With [`GateLayer::run_to_completion`], a request that is
//! admitted runs as a task on the given `TaskTracker` instead, so a caller going away
//! cannot cut it off halfway (a pause could otherwise call the node drained while a
//! commit is under way); the server waits for the tracker at shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_util::task::TaskTracker;

use super::{Gate, Refused};

#[derive(Debug, Clone)]
pub struct GateLayer {
    gate: Arc<Gate>,
    tracker: Option<TaskTracker>,
}

impl GateLayer {
    pub fn new(gate: Arc<Gate>) -> Self {
        Self {
            gate,
            tracker: None,
        }
    }

    /// Runs each admitted request to completion as a task on `tracker`, even if its
    /// caller goes away. Requests still waiting at a closed gate are not admitted yet:
    /// they wait in the caller's future and vanish with it.
    pub fn run_to_completion(mut self, tracker: TaskTracker) -> Self {
        self.tracker = Some(tracker);
        self
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.gate.clone(),
            tracker: self.tracker.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    tracker: Option<TaskTracker>,
}

/// Routes by the wrapped service's name, so a gated tonic service can be added to
/// tonic `Routes` as it is.
impl<S: tonic::server::NamedService> tonic::server::NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Gated<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        let tracker = self.tracker.clone();
        Box::pin(async move {
            // Held here, in the caller's own future: nothing is spawned before the
            // request is admitted.
            let permit = match gate.enter_owned().await {
                Ok(permit) => permit,
                Err(refused) => return Ok(refusal(&request, &refused)),
            };
            let admitted = async move {
                let response = inner.call(request).await;
                drop(permit);
                response
            };
            let Some(tracker) = tracker else {
                return admitted.await;
            };
            match tracker.spawn(admitted).await {
                Ok(response) => response,
                Err(error) => Ok(tonic::Status::internal(format!(
                    "request handler failed: {error}"
                ))
                .into_http()),
            }
        })
    }
}

/// gRPC callers get UNAVAILABLE (retryable); plain HTTP callers get 503 + Retry-After.
fn refusal<ReqBody, ResBody: Default>(
    request: &http::Request<ReqBody>,
    refused: &Refused,
) -> http::Response<ResBody> {
    let is_grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if is_grpc {
        return tonic::Status::unavailable(refused.to_string()).into_http();
    }
    let mut response = http::Response::new(ResBody::default());
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;

    use tower::{Layer as _, ServiceExt as _};

    use super::GateLayer;
    use crate::gate::{ClosedPolicy, Gate};

    fn echo() -> impl tower::Service<
        http::Request<String>,
        Response = http::Response<String>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|request: http::Request<String>| async move {
            Ok::<_, Infallible>(http::Response::new(request.into_body()))
        })
    }

    fn request(content_type: &str) -> http::Request<String> {
        http::Request::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .body("hello".to_owned())
            .unwrap()
    }

    #[tokio::test]
    async fn open_gate_passes_requests_through() {
        let gate = Arc::new(Gate::new(ClosedPolicy::Reject));
        let service = GateLayer::new(gate.clone()).layer(echo());
        let response = service.oneshot(request("text/plain")).await.unwrap();
        assert_eq!(response.into_body(), "hello");
        assert_eq!(
            gate.in_flight(),
            0,
            "the permit is released with the response"
        );
    }

    /// Issue 17.3, in the layer applications embed: a request held at a closed gate
    /// whose caller goes away never reaches the service, even with run_to_completion;
    /// an admitted one runs to its end although its caller went away.
    #[tokio::test]
    async fn a_held_request_whose_caller_left_never_runs_and_an_admitted_one_finishes() {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        use std::time::Duration;

        let gate = Arc::new(Gate::new(ClosedPolicy::Hold {
            timeout: Duration::from_secs(60),
        }));
        let tracker = tokio_util::task::TaskTracker::new();
        let started = Arc::new(AtomicU32::new(0));
        let finished = Arc::new(AtomicU32::new(0));
        let (proceed, wait) = tokio::sync::watch::channel(false);
        let service = {
            let (started, finished) = (started.clone(), finished.clone());
            tower::service_fn(move |request: http::Request<String>| {
                let (started, finished, mut wait) =
                    (started.clone(), finished.clone(), wait.clone());
                async move {
                    started.fetch_add(1, SeqCst);
                    wait.wait_for(|go| *go).await.unwrap();
                    finished.fetch_add(1, SeqCst);
                    Ok::<_, Infallible>(http::Response::new(request.into_body()))
                }
            })
        };
        let layer = GateLayer::new(gate.clone()).run_to_completion(tracker.clone());

        // Admitted, then its caller leaves: it still runs to its end.
        let admitted = tokio::spawn(layer.layer(service.clone()).oneshot(request("text/plain")));
        while started.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        admitted.abort();
        assert!(admitted.await.unwrap_err().is_cancelled());

        // Held at the closed gate, then its caller leaves: it must never run.
        gate.close();
        let held = tokio::spawn(layer.layer(service).oneshot(request("text/plain")));
        while gate.stats().held_now == 0 {
            tokio::task::yield_now().await;
        }
        held.abort();
        assert!(held.await.unwrap_err().is_cancelled());
        assert_eq!(
            gate.stats().held_now,
            0,
            "the caller's departure ends the hold"
        );

        proceed.send(true).unwrap();
        tracker.close();
        tracker.wait().await;
        gate.open();
        tokio::task::yield_now().await;
        assert_eq!(started.load(SeqCst), 1, "the held request ran");
        assert_eq!(finished.load(SeqCst), 1, "the admitted request was cut off");
    }

    #[tokio::test]
    async fn closed_gate_answers_grpc_unavailable_and_http_503() {
        let gate = Arc::new(Gate::new(ClosedPolicy::Reject));
        gate.close();
        let layer = GateLayer::new(gate);

        let grpc = layer
            .layer(echo())
            .oneshot(request("application/grpc"))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(grpc.headers()).expect("grpc-status header");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("paused for a backup"),
            "{}",
            status.message()
        );

        let plain = layer
            .layer(echo())
            .oneshot(request("text/plain"))
            .await
            .unwrap();
        assert_eq!(plain.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(plain.headers()[http::header::RETRY_AFTER], "1");
        assert!(
            plain.into_body().is_empty(),
            "the inner service must not have run"
        );
    }
}
