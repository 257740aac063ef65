//! A tower `Layer` that puts a whole service behind a [`Gate`]: one line in a tonic or
//! axum router (`.layer(GateLayer::new(gate))`).
//!
//! The permit is held until the inner service's response future resolves, which covers
//! the whole handler of a unary call. A streamed response body is not covered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::{Gate, Refused};

#[derive(Debug, Clone)]
pub struct GateLayer {
    gate: Arc<Gate>,
}

impl GateLayer {
    pub fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.gate.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Gated<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Default,
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
        Box::pin(async move {
            match gate.enter_owned().await {
                Ok(permit) => {
                    let response = inner.call(request).await;
                    drop(permit);
                    response
                }
                Err(refused) => Ok(refusal(&request, &refused)),
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
