//! Tests only: a real S3-compatible HTTP server (s3s + s3s-fs) in this process, on
//! 127.0.0.1 and a free port, over a temporary directory, with SigV4 authentication on.
//!
//! Self-contained on purpose (it uses nothing from this crate) so that integration
//! tests can include it as is: `#[path = "../../src/storage/s3_test_server.rs"] mod
//! s3_test_server;` — the `s3s`, `s3s-fs` and `hyper-util` dev-dependencies are
//! visible to them too.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
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
        Self::serve(Root::Owned(root)).await
    }

    /// Serves the bucket kept in `root` (created if missing), which outlives the server.
    pub async fn start_in(root: &std::path::Path) -> Self {
        Self::serve(Root::Borrowed(root.to_owned())).await
    }

    async fn serve(root: Root) -> Self {
        let bucket = "bucket".to_owned();
        // s3s-fs maps a bucket to a directory under its root.
        std::fs::create_dir_all(root.path().join(&bucket)).expect("bucket directory");
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the temp dir");
        let service = {
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            builder.build()
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
