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
