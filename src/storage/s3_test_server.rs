//! Tests only: a real S3-compatible HTTP server (s3s + s3s-fs) in this process, on
//! 127.0.0.1 and a free port, over a temporary directory, with SigV4 authentication on.
//!
//! Self-contained on purpose (it uses nothing from this crate) so that integration
//! tests can include it as is: `#[path = "../../src/storage/s3_test_server.rs"] mod
//! s3_test_server;` — the `s3s`, `s3s-fs`, `hyper`, `http-body-util` and
//! `hyper-util` dev-dependencies are visible to them too.
//!
//! [`S3TestServer::start_holding`] holds back PUTs of chosen keys until the test
//! releases them ([`HeldPuts`]): a slow storage write, still under way when a client
//! stops waiting for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{HttpError, HttpResponse};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "stillpoint-test-access";
pub const SECRET_KEY: &str = "stillpoint-test-secret";

/// The server runs until [`S3TestServer::shutdown`] or until it is dropped (its tasks
/// live in a `JoinSet`, which aborts them on drop: nothing outlives the test).
pub struct S3TestServer {
    pub addr: SocketAddr,
    pub bucket: String,
    root: Root,
    tasks: JoinSet<()>,
}

/// The server's directory: its own temporary one, or one the caller keeps (so that a
/// second server can pick up what a stopped one stored).
enum Root {
    Owned(tempfile::TempDir),
    Borrowed(std::path::PathBuf),
}

impl Root {
    fn path(&self) -> &std::path::Path {
        match self {
            Root::Owned(dir) => dir.path(),
            Root::Borrowed(path) => path,
        }
    }
}

impl S3TestServer {
    /// Starts a server with one empty bucket, `bucket`.
    pub async fn start() -> Self {
        let root = tempfile::tempdir().expect("temporary directory for the S3 server");
        Self::serve(Root::Owned(root), None).await
    }

    /// Serves the bucket kept in `root` (created if missing), which outlives the server.
    pub async fn start_in(root: &std::path::Path) -> Self {
        Self::serve(Root::Borrowed(root.to_owned()), None).await
    }

    /// Starts a server that holds every PUT of a key ending in `suffix`: it reads the
    /// request whole, then waits for [`HeldPuts::release`] before storing it, and
    /// stores it even if the client has hung up meanwhile (as S3 does with a PUT it
    /// has received whole).
    pub async fn start_holding(suffix: &str) -> (Self, HeldPuts) {
        let root = tempfile::tempdir().expect("temporary directory for the S3 server");
        let hold = Arc::new(Hold {
            suffix: suffix.to_owned(),
            received: watch::Sender::new(0),
            released: watch::Sender::new(false),
            stored: watch::Sender::new(0),
        });
        let server = Self::serve(Root::Owned(root), Some(Arc::clone(&hold))).await;
        (server, HeldPuts(hold))
    }

    async fn serve(root: Root, hold: Option<Arc<Hold>>) -> Self {
        let bucket = "bucket".to_owned();
        // s3s-fs maps a bucket to a directory under its root.
        std::fs::create_dir_all(root.path().join(&bucket)).expect("bucket directory");
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the temp dir");
        let service = {
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            Holding {
                service: builder.build(),
                hold,
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Connections live in this task's own set, so aborting the accept loop
            // (shutdown or drop) drops, and so aborts, every connection too.
            let mut connections = JoinSet::new();
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        let conn = http
                            .serve_connection(TokioIo::new(socket), service.clone())
                            .into_owned();
                        connections.spawn(async move {
                            // A client hanging up mid-request is not the server's
                            // failure; the test sees the outcome on the client side.
                            let _ = conn.await;
                        });
                    }
                    // Reap finished connections so the set does not grow without bound.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        S3TestServer {
            addr,
            bucket,
            root,
            tasks,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `s3://bucket/prefix`
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_matches('/'))
    }

    /// Everything a client needs besides the URL. Credentials are explicit so that
    /// the client never falls back to instance metadata (a request off this machine).
    pub fn options(&self) -> BTreeMap<String, String> {
        [
            ("endpoint", self.endpoint()),
            ("allow_http", "true".to_owned()),
            ("region", "us-east-1".to_owned()),
            ("access_key_id", ACCESS_KEY.to_owned()),
            ("secret_access_key", SECRET_KEY.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Where the server keeps the bucket's objects, to inspect or damage them.
    pub fn bucket_dir(&self) -> std::path::PathBuf {
        self.root.path().join(&self.bucket)
    }

    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What [`S3TestServer::start_holding`] holds, shared by the server and the test.
struct Hold {
    suffix: String,
    /// PUTs received whole and held so far.
    received: watch::Sender<usize>,
    released: watch::Sender<bool>,
    /// Held PUTs stored so far (whatever S3 answered).
    stored: watch::Sender<usize>,
}

/// The test's side of the held PUTs.
pub struct HeldPuts(Arc<Hold>);

impl HeldPuts {
    /// Waits (at most `within`) until `count` PUTs have been received and held.
    pub async fn received(&self, count: usize, within: Duration) {
        let mut received = self.0.received.subscribe();
        tokio::time::timeout(within, received.wait_for(|received| *received >= count))
            .await
            .unwrap_or_else(|_| panic!("{count} held PUTs were not received within {within:?}"))
            .expect("the server's hold");
    }

    /// Lets every held PUT (and every later one) through.
    pub fn release(&self) {
        self.0.released.send_replace(true);
    }

    /// Waits (at most `within`) until `count` held PUTs have been stored.
    pub async fn stored(&self, count: usize, within: Duration) {
        let mut stored = self.0.stored.subscribe();
        tokio::time::timeout(within, stored.wait_for(|stored| *stored >= count))
            .await
            .unwrap_or_else(|_| panic!("{count} held PUTs were not stored within {within:?}"))
            .expect("the server's hold");
    }
}

/// The S3 service, with the PUTs `hold` names held back.
#[derive(Clone)]
struct Holding {
    service: S3Service,
    hold: Option<Arc<Hold>>,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Holding {
    type Response = HttpResponse;
    type Error = HttpError;
    type Future = BoxFuture<'static, Result<HttpResponse, HttpError>>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let hold = self.hold.as_ref().filter(|hold| {
            request.method() == http::Method::PUT && request.uri().path().ends_with(&hold.suffix)
        });
        let Some(hold) = hold.cloned() else {
            return hyper::service::Service::call(&self.service, request);
        };
        let service = self.service.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|error| HttpError::new(Box::new(error)))?
                .to_bytes();
            hold.received.send_modify(|received| *received += 1);
            // A task of its own, so that a client hanging up (which drops this future
            // with its connection) does not stop the PUT from being stored. It ends
            // once released, or with the test's runtime.
            let stored = tokio::spawn(async move {
                let _ = hold
                    .released
                    .subscribe()
                    .wait_for(|released| *released)
                    .await;
                let request = http::Request::from_parts(parts, s3s::Body::from(body));
                let response = service.call(request).await;
                hold.stored.send_modify(|stored| *stored += 1);
                response
            });
            stored
                .await
                .map_err(|error| HttpError::new(Box::new(error)))?
        })
    }
}
