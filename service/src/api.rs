//! The service's HTTP side (axum): the API under `/api/v1`, `/metrics`, the status
//! page, `/healthz`, `/readyz` and `/openapi.json` (docs/api/openapi.json, the
//! document every route here keeps to). Who may call what is decided here, in one
//! place: bearer tokens with two roles, as the nodes' admin API has (docs/security.md):
//! an operator token may trigger jobs, an observer token may only read. Every error is
//! JSON that names the problem and the fix. Connections silent for 30 s are closed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use stillpoint::runbook::JobKind;
use stillpoint_node::grpc::auth::{AdminToken, MIN_TOKEN_LEN, ServerTls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::Service;
use crate::jobs::Trigger;

/// The OpenAPI document, served as committed.
pub const OPENAPI: &str = include_str!("../../docs/api/openapi.json");

/// The tokens the API accepts; only their digests are kept (compared in constant time).
pub struct Auth {
    operator: blake3::Hash,
    observer: Option<blake3::Hash>,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Observer,
    Operator,
}

impl Auth {
    pub fn new(operator: &AdminToken, observer: Option<&AdminToken>) -> Result<Auth, String> {
        let digest = |token: &AdminToken, which: &str| {
            let len = token.expose().len();
            if len < MIN_TOKEN_LEN {
                return Err(format!(
                    "the {which} token is {len} characters; use at least {MIN_TOKEN_LEN} \
                     (e.g. `openssl rand -hex 32`)"
                ));
            }
            Ok(blake3::hash(token.expose().as_bytes()))
        };
        let operator_digest = digest(operator, "operator")?;
        let observer = observer
            .map(|token| digest(token, "observer"))
            .transpose()?;
        if observer == Some(operator_digest) {
            return Err(
                "the observer token is the operator token; give the observer a token of its own"
                    .to_owned(),
            );
        }
        Ok(Auth {
            operator: operator_digest,
            observer,
        })
    }

    fn role(&self, headers: &HeaderMap) -> Result<Role, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "no bearer token: send `Authorization: Bearer <token>` (the operator or \
                 observer token `stillpoint serve` was started with)",
            ));
        };
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` are
        // `Bearer`, as clients and proxies send it.
        let token = value
            .to_str()
            .ok()
            .and_then(|text| text.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                ApiError::unauthorized("malformed Authorization header: write `Bearer <token>`")
            })?;
        let digest = blake3::hash(token.as_bytes());
        if digest == self.operator {
            Ok(Role::Operator)
        } else if self.observer == Some(digest) {
            Ok(Role::Observer)
        } else {
            Err(ApiError::unauthorized("wrong bearer token"))
        }
    }
}

/// An error answer: a status and a message that names the problem and the fix.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn unauthorized(message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type Shared = State<Arc<Service>>;
type Answer = Result<Response, ApiError>;

fn read(service: &Service, headers: &HeaderMap) -> Result<Role, ApiError> {
    service.auth.role(headers)
}

fn operate(service: &Service, headers: &HeaderMap) -> Result<(), ApiError> {
    match service.auth.role(headers)? {
        Role::Operator => Ok(()),
        Role::Observer => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the observer token may only read; triggering a job needs the operator token",
        )),
    }
}

/// Every route of the service.
pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/api/v1/backups", get(list_backups))
        .route("/api/v1/backups/{id}", get(show_backup))
        .route("/api/v1/points", get(list_points))
        .route("/api/v1/points/{id}", get(show_point))
        .route("/api/v1/archives", get(archives))
        .route("/api/v1/schedule", get(schedule))
        .route("/api/v1/jobs", get(list_jobs).post(trigger_job))
        .route("/api/v1/jobs/{id}", get(show_job))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(service)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such path; /openapi.json lists the API's paths")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this path does not take that method; /openapi.json lists what each path takes",
    )
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(service): Shared) -> Response {
    if service.ready.load(Ordering::Relaxed) {
        Json(json!({ "ready": true })).into_response()
    } else if service.shutdown.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "the service is stopping" })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "the service is starting" })),
        )
            .into_response()
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(service): Shared, headers: HeaderMap) -> Answer {
    if !service.public_status {
        read(&service, &headers)?;
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        service.metrics.encode(),
    )
        .into_response())
}

async fn status_page(State(service): Shared, headers: HeaderMap) -> Answer {
    if !service.public_status {
        read(&service, &headers)?;
    }
    Ok(Html(crate::page::render(&service).await).into_response())
}

async fn list_backups(State(service): Shared, headers: HeaderMap) -> Answer {
    read(&service, &headers)?;
    let view = service.view.read().await;
    Ok(Json(json!({ "backups": view.backups })).into_response())
}

async fn show_backup(State(service): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    read(&service, &headers)?;
    let view = service.view.read().await;
    let backup = view.backup(&id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no backup {id:?} is listed; GET /api/v1/backups lists them"
        ))
    })?;
    Ok(Json(json!({ "summary": backup, "manifest": backup.manifest })).into_response())
}

async fn list_points(State(service): Shared, headers: HeaderMap) -> Answer {
    read(&service, &headers)?;
    let view = service.view.read().await;
    Ok(Json(json!({ "points": view.points })).into_response())
}

async fn show_point(State(service): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    read(&service, &headers)?;
    let view = service.view.read().await;
    let point = view.point(&id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no point {id:?} is listed; GET /api/v1/points lists them"
        ))
    })?;
    Ok(Json(json!({ "summary": point, "manifest": point.manifest })).into_response())
}

async fn archives(State(service): Shared, headers: HeaderMap) -> Answer {
    read(&service, &headers)?;
    let view = service.view.read().await;
    Ok(Json(json!({
        "archivers": service.archives.all(),
        "archives": view.databases,
        "problems": view.problems,
    }))
    .into_response())
}

async fn schedule(State(service): Shared, headers: HeaderMap) -> Answer {
    read(&service, &headers)?;
    Ok(Json(json!({ "entries": service.planned() })).into_response())
}

#[derive(Deserialize)]
struct JobsQuery {
    limit: Option<usize>,
}

async fn list_jobs(
    State(service): Shared,
    headers: HeaderMap,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    read(&service, &headers)?;
    let Query(query) = query.map_err(|_| {
        ApiError::bad_request("limit must be a whole number of jobs, e.g. ?limit=20")
    })?;
    let limit = query.limit.unwrap_or(100).min(500);
    Ok(Json(json!({ "jobs": service.jobs.list(limit) })).into_response())
}

async fn show_job(State(service): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    read(&service, &headers)?;
    let job = service.jobs.get(&id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no job {id:?}; GET /api/v1/jobs lists the newest {}",
            500
        ))
    })?;
    Ok(Json(job).into_response())
}

/// The most a job request's body may hold: `{"kind": "base_backup"}` is 25 bytes.
const MAX_JOB_REQUEST: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    kind: String,
}

/// The job kind a `POST /api/v1/jobs` body asks for: a JSON object with the one key
/// `kind`. Public for the `job_request` fuzz target.
pub fn parse_job_request(body: &[u8]) -> Result<JobKind, ApiError> {
    let not_a_request = |error: String| {
        ApiError::bad_request(format!(
            "the body must be a JSON object like {{\"kind\": \"point\"}}: {error}"
        ))
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| not_a_request(error.to_string()))?;
    // serde would also take `["point"]` (a struct from a sequence); the document
    // promises an object and nothing else.
    if !value.is_object() {
        return Err(not_a_request(format!("got {value}")));
    }
    let request: JobRequest =
        serde_json::from_value(value).map_err(|error| not_a_request(error.to_string()))?;
    // A `Value` keeps only the last of repeated keys, so `{"kind": "backup", "kind":
    // "point"}` came through as a point (it breaks the job_request fuzz target's
    // property). Read as the struct, the body's repeated `kind` is refused.
    serde_json::from_slice::<JobRequest>(body).map_err(|error| not_a_request(error.to_string()))?;
    request.kind.parse().map_err(ApiError::bad_request)
}

async fn trigger_job(State(service): Shared, headers: HeaderMap, body: Body) -> Answer {
    // The token first: a caller without one gets 401 before a byte of its body is read.
    operate(&service, &headers)?;
    let body = axum::body::to_bytes(body, MAX_JOB_REQUEST)
        .await
        .map_err(|error| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body could not be read within {MAX_JOB_REQUEST} bytes ({error}); \
                     send only {{\"kind\": \"point\"}}"
                ),
            )
        })?;
    let kind = parse_job_request(&body)?;
    if service.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is stopping and takes no new jobs",
        ));
    }
    let job = service.submit(kind, Trigger::Api);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/jobs/{}", job.job_id))],
        Json(job),
    )
        .into_response())
}

/// Serves the routes on `listener` (in TLS with `tls`) until the service shuts down.
pub async fn serve(
    service: Arc<Service>,
    listener: TcpListener,
    tls: Option<ServerTls>,
) -> std::io::Result<()> {
    let shutdown = service.shutdown.clone();
    let app = router(service);
    let stopping = async move { shutdown.cancelled().await };
    match tls {
        None => {
            axum::serve(IdleClosing(listener), app)
                .with_graceful_shutdown(stopping)
                .await
        }
        Some(tls) => {
            let local = listener.local_addr()?;
            let incoming = tls
                .incoming(tonic::transport::server::TcpIncoming::from(listener))
                .map_err(|error| std::io::Error::other(error.to_string()))?;
            let listener = TlsListener {
                incoming: Box::pin(incoming),
                local,
            };
            axum::serve(IdleClosing(listener), app)
                .with_graceful_shutdown(stopping)
                .await
        }
    }
}

/// How long a connection may stay silent (nothing read or written) before it is
/// closed. The HTTP server has no timeout of its own: a client that connects and never
/// finishes its request kept its socket forever, and a thousand of them used up the
/// process's file descriptors (systemd's default limit is 1024), which locked out every
/// other client and the storage and archivers too.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);

/// A listener whose connections are closed after [`IDLE_CONNECTION`] of silence.
struct IdleClosing<L>(L);

impl<L: axum::serve::Listener> axum::serve::Listener for IdleClosing<L> {
    type Io = IdleClosed<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, peer) = self.0.accept().await;
        let deadline = Box::pin(tokio::time::sleep(IDLE_CONNECTION));
        (IdleClosed { io, deadline }, peer)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection that fails its next read or write once it has been silent for
/// [`IDLE_CONNECTION`]; the HTTP server then closes it.
struct IdleClosed<Io> {
    io: Io,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<Io> IdleClosed<Io> {
    /// `poll` is one read, write, flush or shutdown of the connection: progress moves
    /// the deadline; waiting past it is an error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut Io>, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>>
    where
        Io: Unpin,
    {
        match poll(Pin::new(&mut self.io), cx) {
            Poll::Ready(result) => {
                let next = tokio::time::Instant::now() + IDLE_CONNECTION;
                self.deadline.as_mut().reset(next);
                Poll::Ready(result)
            }
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the connection was silent for {IDLE_CONNECTION:?}"),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for IdleClosed<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.watch(cx, |io, cx| io.poll_read(cx, buf))
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for IdleClosed<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.watch(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.watch(cx, AsyncWrite::poll_flush)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.watch(cx, AsyncWrite::poll_shutdown)
    }
}

/// TLS connections as axum takes them; refused handshakes are logged by
/// [`ServerTls::incoming`] and skipped.
struct TlsListener {
    incoming: Pin<Box<dyn Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream
                        .get_ref()
                        .0
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (stream, peer);
                }
                Some(Err(_)) => continue,
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATOR: &str = "operator-token-0123456789";
    const OBSERVER: &str = "observer-token-0123456789";

    fn role_for(authorization: &str) -> Result<Role, ApiError> {
        let token = |text| AdminToken::parse(text, "the test").unwrap();
        let auth = Auth::new(&token(OPERATOR), Some(&token(OBSERVER))).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
        auth.role(&headers)
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_nothing_else_is_taken() {
        for scheme in ["Bearer", "bearer", "BEARER"] {
            assert_eq!(
                role_for(&format!("{scheme} {OPERATOR}")).unwrap(),
                Role::Operator,
                "{scheme}"
            );
        }
        assert_eq!(
            role_for(&format!("bearer {OBSERVER}")).unwrap(),
            Role::Observer
        );
        for refused in [
            format!("Basic {OPERATOR}"),
            format!("Bearerx {OPERATOR}"),
            OPERATOR.to_owned(),
            "Bearer ".to_owned(),
            "Bearer wrong-token-0123456789".to_owned(),
        ] {
            let error = role_for(&refused).unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED, "{refused}");
        }
    }
    #[test]
    fn a_job_request_is_an_object_with_one_kind() {
        assert_eq!(
            parse_job_request(br#"{"kind": "point"}"#).unwrap(),
            JobKind::Point
        );
        assert_eq!(
            parse_job_request(br#" {"kind":"base_backup"} "#).unwrap(),
            JobKind::BaseBackup
        );
        for (body, problem) in [
            (&br#"["point"]"#[..], "got [\"point\"]"),
            (br#"{"kind": "point", "x": 1}"#, "unknown field `x`"),
            (br#"{}"#, "missing field `kind`"),
            (br#"{"kind": "snapshot"}"#, "unknown job kind \"snapshot\""),
            // Broke the job_request fuzz target's property: the last repeated key won.
            (
                br#"{"kind": "backup", "kind": "point"}"#,
                "duplicate field `kind`",
            ),
            (
                br#"{"kind": "point", "kind": "point"}"#,
                "duplicate field `kind`",
            ),
        ] {
            let error = parse_job_request(body).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert!(error.message.contains(problem), "{}", error.message);
        }
    }
}
