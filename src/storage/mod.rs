//! Where backups live: a local directory (`file:///abs/dir`) or S3-compatible object
//! storage (`s3://bucket/prefix`), both through `object_store`.
//!
//! [`Storage`] is the only type the rest of stillpoint writes through. It owns the URL
//! (shown redacted: never a credential), the backend, and the upload tuning that keeps
//! memory bounded: [`Storage::put_stream`] holds at most
//! `part_size × (max_concurrency + 1)` bytes whatever the artifact's size.
//! Paths are `/`-separated and relative to the URL's directory or prefix.
//!
//! Unfinished uploads are invisible to `list` on both backends: the local store
//! writes `name#N` beside an object and renames it when done, and S3 keeps the parts
//! of a multipart upload until it is completed or aborted. A process killed mid-copy
//! leaves them behind, so [`Storage::list_incomplete`] finds them (a directory walk;
//! S3's ListMultipartUploads) and [`Storage::delete_prefix`] removes them with the
//! objects.
//!
//! A write keeps going when its caller stops waiting for it (the local backend
//! writes in `spawn_blocking`; S3 stores a PUT it has received). Every write runs as a
//! counted task (`tracked.rs`), and [`Storage::writes_finished`] waits for them all:
//! what deletes a stopped job's objects calls it first, or a write still under way
//! could put an object back after the delete.
//!
//! - `multipart.rs`: S3's ListMultipartUploads, which object_store does not offer.
//! - `tracked.rs`: the counted writes.
//! - `tests.rs`: the same round-trip tests against `file://` and a real S3 server.
//! - `s3_test_server.rs` (tests only): an in-process S3 server on loopback.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::ClientConfigKey;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::adapters::ByteStream;

mod multipart;
#[cfg(test)]
// Shared with tests/integration, which use parts (`start_in`) these tests do not.
#[allow(dead_code)]
pub(crate) mod s3_test_server;
#[cfg(test)]
pub(crate) mod tests;
mod tracked;

/// The URL forms [`Storage::open`] accepts, for error messages.
const SUPPORTED: &str = "file:///absolute/dir, s3://bucket[/prefix]";

/// S3 requires every part but the last to be at least 5 MiB, and allows 10,000 parts:
/// 16 MiB parts reach 160 GB per artifact.
pub const DEFAULT_PART_SIZE: usize = 16 * 1024 * 1024;
/// Parts uploaded at once by one `put_stream`.
pub const DEFAULT_MAX_CONCURRENCY: usize = 4;
/// S3's limit on one whole request, body included. object_store's default (30 s),
/// with its retries of a stream bounded to 3 minutes from the start of a GET, failed
/// every artifact read that took longer than about 3.5 minutes ("request or response
/// body error"): a restore, drill or verify of a large database. A read lasts as long
/// as its consumer takes, so there is no practical limit on a whole request; a server
/// that stops sending is caught by [`S3_READ_TIMEOUT`] instead. The runbook's
/// `timeout` option (or `AWS_TIMEOUT`) overrides it.
const S3_REQUEST_TIMEOUT: &str = "365 days";
/// S3's limit on each read from the server (it resets after every read): a
/// connection that stalls fails, and object_store retries it from where it stopped.
/// Overridden by the `read_timeout` option (or `AWS_READ_TIMEOUT`).
const S3_READ_TIMEOUT: &str = "60s";
/// How much `put_stream` reads from its input at a time.
const READ_CHUNK: usize = 64 * 1024;
/// How much `get` reads from a local file at a time (one blocking call each).
const LOCAL_READ_CHUNK: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage URL {url} has unsupported scheme {scheme:?}; supported: {SUPPORTED}")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("storage URL {url} is not valid: {reason}; expected one of {SUPPORTED}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "storage {url}: option {key:?} is not an S3 setting object_store knows (e.g. endpoint, region, allow_http, access_key_id)"
    )]
    UnknownOption { url: String, key: String },
    #[error("storage {url}: options ({keys}) only apply to s3:// URLs; remove them")]
    OptionsForFile { url: String, keys: String },
    #[error("storage {url}: cannot open: {message}")]
    Open { url: String, message: String },
    #[error("storage {url}: {path:?} is not a valid object path: {reason}")]
    InvalidPath {
        url: String,
        path: String,
        reason: String,
    },
    #[error("storage {url}: {path} does not exist")]
    NotFound { url: String, path: String },
    /// object_store's message already carries its causes, so it is not also this
    /// error's `source()`: an error chain would print each of them again (an S3
    /// error body five times over).
    #[error("storage {url}: {op} {path} failed: {cause}{}", hint(cause))]
    Backend {
        url: String,
        path: String,
        op: &'static str,
        // Boxed: object_store's error is large, and every Result here carries it.
        cause: Box<object_store::Error>,
    },
    /// S3 answers a write into a bucket that does not exist with 404, which
    /// object_store reports as the object not being found.
    #[error(
        "storage {url}: writing {path} failed: the bucket does not exist; create it, or fix the [storage] url"
    )]
    NoBucket { url: String, path: String },
    /// The input of `put_stream` failed; nothing was stored under `path`.
    #[error(
        "storage {url}: storing {path} stopped because its input failed (nothing was stored): {source}"
    )]
    Input {
        url: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Writing a streamed upload failed; nothing was stored under `path`.
    #[error("storage {url}: uploading {path} failed (nothing was stored): {source}")]
    Upload {
        url: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

/// One stored object, as `list` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Relative to the storage root, `/`-separated.
    pub path: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// An upload that was started and never finished: invisible to [`Storage::list`],
/// yet holding space (and, on S3, billed parts) until it is removed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IncompleteUpload {
    /// The object it would have become, relative to the storage root.
    pub path: String,
    /// Bytes written so far, where the storage tells (S3 does not list part sizes).
    pub bytes: Option<u64>,
    /// Its last write (a local file) or its start (an S3 multipart upload).
    pub last_modified: DateTime<Utc>,
    #[serde(skip)]
    handle: UploadHandle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum UploadHandle {
    /// object_store's local in-progress file, `name#N`.
    File(std::path::PathBuf),
    /// An S3 multipart upload: its full key (with the URL's prefix) and id.
    Multipart { key: String, upload_id: String },
}

/// Where a backend keeps what `list` does not show.
#[derive(Clone)]
enum Hidden {
    /// The local store's root directory, to walk.
    Local(std::path::PathBuf),
    S3(multipart::MultipartUploads),
    /// A store handed in by a test: nothing hidden to find.
    #[cfg(test)]
    Nothing,
}

/// A backup destination. Cheap to clone (the backend is shared).
#[derive(Clone)]
pub struct Storage {
    /// Redacted: safe to print.
    url: String,
    /// The backend, wrapped in [`tracked::Tracked`].
    store: Arc<dyn ObjectStore>,
    /// Its writes under way (shared by clones).
    writes: tracked::Writes,
    hidden: Hidden,
    part_size: usize,
    max_concurrency: usize,
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

// By hand so that no backend configuration (which holds credentials) is ever printed.
impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("url", &self.url)
            .field("part_size", &self.part_size)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl Storage {
    /// Opens `file:///abs/dir` (created if missing) or `s3://bucket/prefix` (endpoint,
    /// region and credentials from the standard `AWS_*` environment variables).
    pub fn open(url: &str) -> Result<Self, StorageError> {
        Self::open_with_options(url, &BTreeMap::new())
    }

    /// Like [`Storage::open`], with explicit S3 settings that override the environment:
    /// keys as object_store names them (`endpoint`, `region`, `allow_http`,
    /// `access_key_id`, `secret_access_key`, `virtual_hosted_style_request`, …).
    pub fn open_with_options(
        url: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<Self, StorageError> {
        let shown = redact_url(url);
        let invalid = |reason: &str| StorageError::InvalidUrl {
            url: shown.clone(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(invalid(
                "it has a query or fragment; pass settings as storage options instead",
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // object_store takes no credentials from a URL; refusing is better than
            // silently ignoring them and signing requests with other ones.
            return Err(invalid(
                "it carries credentials; pass them through AWS_ACCESS_KEY_ID / \
                 AWS_SECRET_ACCESS_KEY or the access_key_id / secret_access_key options",
            ));
        }
        let (store, hidden): (Arc<dyn ObjectStore>, Hidden) = match parsed.scheme() {
            "file" => {
                if !options.is_empty() {
                    return Err(StorageError::OptionsForFile {
                        url: shown,
                        keys: options.keys().cloned().collect::<Vec<_>>().join(", "),
                    });
                }
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid(
                        "a file URL needs an absolute path: file:///abs/dir (three slashes)",
                    ));
                }
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| invalid("it does not name an absolute local path"))?;
                // A scheduled job's first run should not need a manual mkdir.
                std::fs::create_dir_all(&dir).map_err(|e| StorageError::Open {
                    url: shown.clone(),
                    message: format!("cannot create directory {}: {e}", dir.display()),
                })?;
                let local = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| StorageError::Open {
                        url: shown.clone(),
                        message: e.to_string(),
                    })?
                    // Deleting a backup's last file removes its directory, so an
                    // emptied backup leaves nothing behind.
                    .with_automatic_cleanup(true)
                    // A backup is only as good as its durability: match S3, where a
                    // completed PUT is durable.
                    .with_fsync(true);
                (Arc::new(local), Hidden::Local(dir))
            }
            "s3" | "s3a" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| invalid("it names no bucket: s3://bucket/prefix"))?
                    .to_owned();
                let builder = s3_builder(&shown, &bucket, options)?;
                let client_options = multipart::client_options(&builder);
                let s3 = builder.build().map_err(|e| StorageError::Open {
                    url: shown.clone(),
                    message: e.to_string(),
                })?;
                // The URL keeps its path percent-encoded (`we%20ird`); the prefix is
                // what it spells (`we ird`), as `aws s3` would store it.
                let prefix = percent_encoding::percent_decode_str(parsed.path())
                    .decode_utf8()
                    .map_err(|_| invalid("its path is not UTF-8 once percent-decoded"))?;
                let prefix = prefix.trim_matches('/');
                let prefix = if prefix.is_empty() {
                    None
                } else {
                    Some(Path::parse(prefix).map_err(|e| invalid(&e.to_string()))?)
                };
                let uploads =
                    multipart::MultipartUploads::new(s3.clone(), prefix.clone(), &client_options)
                        .map_err(|e| StorageError::Open {
                        url: shown.clone(),
                        message: e.to_string(),
                    })?;
                let store: Arc<dyn ObjectStore> = match prefix {
                    None => Arc::new(s3),
                    Some(prefix) => Arc::new(PrefixStore::new(s3, prefix)),
                };
                (store, Hidden::S3(uploads))
            }
            other => {
                return Err(StorageError::UnsupportedScheme {
                    url: shown,
                    scheme: other.to_owned(),
                });
            }
        };
        Ok(Self::tracking(shown, store, hidden))
    }

    /// Wraps any object store, e.g. one that fails on purpose.
    #[cfg(test)]
    pub(crate) fn from_object_store(store: Arc<dyn ObjectStore>, url: &str) -> Self {
        Self::tracking(url.to_owned(), store, Hidden::Nothing)
    }

    fn tracking(url: String, store: Arc<dyn ObjectStore>, hidden: Hidden) -> Self {
        let tracked = tracked::Tracked::new(store);
        let writes = tracked.writes().clone();
        Storage {
            url,
            store: Arc::new(tracked),
            writes,
            hidden,
            part_size: DEFAULT_PART_SIZE,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        }
    }

    /// Returns once no write through this storage (or a clone of it) is under way,
    /// including writes whose caller stopped waiting for them: a `put_stream` dropped
    /// mid-upload still finishes (or fails) the PUT or part it had started. Whatever
    /// deletes the objects of a job that was stopped calls this first, so that no
    /// write of that job lands after the delete.
    pub async fn writes_finished(&self) {
        self.writes.finished().await;
    }

    /// How many writes through this storage (or a clone of it) are under way now.
    pub fn writes_under_way(&self) -> usize {
        self.writes.under_way()
    }

    /// Size of one multipart-upload part, and of the largest artifact stored with a
    /// single PUT. S3 needs at least 5 MiB.
    pub fn with_part_size(mut self, part_size: usize) -> Self {
        self.part_size = part_size.max(1);
        self
    }

    /// Parts of one upload in flight at once.
    pub fn with_max_concurrency(mut self, max_concurrency: usize) -> Self {
        self.max_concurrency = max_concurrency.max(1);
        self
    }

    /// The URL with any credentials replaced by `***`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Streams `input` to `path` and returns the number of bytes stored. Inputs up to
    /// one part go up in a single PUT, larger ones as a multipart upload; either way the
    /// object appears only when complete, and a failed input or upload leaves nothing
    /// (the multipart upload is aborted).
    pub async fn put_stream(
        &self,
        path: &str,
        mut input: impl AsyncRead + Send + Unpin,
    ) -> Result<u64, StorageError> {
        let location = self.location(path)?;
        let mut writer =
            BufWriter::with_capacity(Arc::clone(&self.store), location, self.part_size)
                .with_max_concurrency(self.max_concurrency);
        let mut buf = vec![0u8; READ_CHUNK];
        let mut stored = 0u64;
        let failure = loop {
            let n = match input.read(&mut buf).await {
                Ok(0) => break None,
                Ok(n) => n,
                Err(source) => {
                    break Some(StorageError::Input {
                        url: self.url.clone(),
                        path: path.to_owned(),
                        source,
                    });
                }
            };
            // BufWriter waits here while `max_concurrency` parts are in flight: this
            // is the back-pressure that bounds memory.
            if let Err(source) = writer.write_all(&buf[..n]).await {
                break Some(self.upload_error(path, source));
            }
            stored += n as u64;
        };
        if let Some(error) = failure {
            // Best effort: the error that stopped us matters more than a failed abort,
            // and an unfinished upload is never visible as an object.
            let _ = writer.abort().await;
            return Err(error);
        }
        writer
            .shutdown()
            .await
            .map_err(|source| self.upload_error(path, source))?;
        Ok(stored)
    }

    /// Stores `bytes` with one PUT: readers see the old object or the new one, never a
    /// part (S3 PUTs are atomic; the local store writes a temporary file and renames).
    pub async fn put_atomic(&self, path: &str, bytes: Bytes) -> Result<(), StorageError> {
        let location = self.location(path)?;
        self.store
            .put(&location, PutPayload::from(bytes))
            .await
            .map_err(|e| self.backend_error("put", path, e))?;
        Ok(())
    }

    /// Streams an object back.
    pub async fn get(&self, path: &str) -> Result<ByteStream, StorageError> {
        let location = self.location(path)?;
        let result = self
            .store
            .get(&location)
            .await
            .map_err(|e| self.backend_error("get", path, e))?;
        let url = self.url.clone();
        let shown_path = path.to_owned();
        let failed = move |e: String, kind| {
            std::io::Error::new(
                kind,
                format!("storage {url}: reading {shown_path} failed: {e}"),
            )
        };
        let stream = match result.payload {
            // A local file, read in large blocks: object_store's own stream reads 8
            // KiB per blocking call, which made reading an artifact back slower than
            // hashing and decrypting it (docs/performance.md, restore).
            GetResultPayload::File(file, _) => {
                let length = result.range.end - result.range.start;
                let file = tokio::fs::File::from_std(file).take(length);
                ReaderStream::with_capacity(file, LOCAL_READ_CHUNK)
                    .map_err(move |e| failed(e.to_string(), e.kind()))
                    .boxed()
            }
            GetResultPayload::Stream(stream) => stream
                .map_err(move |e| {
                    let kind = object_store_kind(&e);
                    failed(e.to_string(), kind)
                })
                .boxed(),
        };
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    /// Reads a small object whole (a manifest).
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes, StorageError> {
        let location = self.location(path)?;
        let result = self
            .store
            .get(&location)
            .await
            .map_err(|e| self.backend_error("get", path, e))?;
        result
            .bytes()
            .await
            .map_err(|e| self.backend_error("get", path, e))
    }

    /// The object at `path`, or None if there is none.
    pub async fn head(&self, path: &str) -> Result<Option<ObjectEntry>, StorageError> {
        let location = self.location(path)?;
        match self.store.head(&location).await {
            Ok(meta) => Ok(Some(entry(meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend_error("head", path, e)),
        }
    }

    /// Every object under `prefix` (a directory-like path: `backups` lists
    /// `backups/…`, not `backupsX`), in no particular order. `""` lists everything.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>, StorageError> {
        let location = self.prefix_location(prefix)?;
        self.store
            .list(location.as_ref())
            .map_ok(entry)
            .try_collect()
            .await
            .map_err(|e| self.backend_error("list", prefix, e))
    }

    /// The objects under `prefix` whose paths sort after `after` (which lies under
    /// `prefix`), in no particular order: on S3 one `ListObjectsV2` with `StartAfter`,
    /// so the objects before it cost nothing.
    pub async fn list_after(
        &self,
        prefix: &str,
        after: &str,
    ) -> Result<Vec<ObjectEntry>, StorageError> {
        let location = self.prefix_location(prefix)?;
        let offset = self.location(after)?;
        self.store
            .list_with_offset(location.as_ref(), &offset)
            .map_ok(entry)
            .try_collect()
            .await
            .map_err(|e| self.backend_error("list", prefix, e))
    }

    /// Deletes one object. Deleting a missing object is not an error: S3 behaves so,
    /// and the local store is made to match, so that a retried prune converges.
    pub async fn delete(&self, path: &str) -> Result<(), StorageError> {
        let location = self.location(path)?;
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend_error("delete", path, e)),
        }
    }

    /// Stores a small object at `path` and deletes it again: proof, before anything
    /// depends on it, that this storage exists and takes writes and deletes with the
    /// credentials given.
    pub async fn probe(&self, path: &str) -> Result<(), StorageError> {
        self.put_atomic(path, Bytes::from_static(b"stillpoint storage probe\n"))
            .await?;
        self.delete(path).await
    }

    /// Every unfinished upload under `prefix` (see the module header), in no
    /// particular order.
    pub async fn list_incomplete(
        &self,
        prefix: &str,
    ) -> Result<Vec<IncompleteUpload>, StorageError> {
        let location = self.prefix_location(prefix)?;
        match &self.hidden {
            Hidden::Local(root) => {
                let root = root.clone();
                let dir = match &location {
                    Some(location) => root.join(location.as_ref()),
                    None => root.clone(),
                };
                tokio::task::spawn_blocking(move || local_in_progress(&root, &dir))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|found| found)
                    .map_err(|e| self.backend_error("list unfinished uploads", prefix, io_error(e)))
            }
            Hidden::S3(uploads) => uploads
                .list(location.as_ref())
                .await
                .map_err(|e| self.backend_error("list multipart uploads", prefix, e)),
            #[cfg(test)]
            Hidden::Nothing => Ok(Vec::new()),
        }
    }

    /// Removes an unfinished upload: deletes the local in-progress file, or aborts the
    /// S3 multipart upload (which frees its parts). One already gone is not an error.
    pub async fn abort_incomplete(&self, upload: &IncompleteUpload) -> Result<(), StorageError> {
        let removed = match &upload.handle {
            UploadHandle::File(file) => match tokio::fs::remove_file(file).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(e)),
                _ => Ok(()),
            },
            UploadHandle::Multipart { key, upload_id } => match &self.hidden {
                Hidden::S3(uploads) => uploads.abort(key, upload_id).await,
                _ => Ok(()),
            },
        };
        match removed {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend_error("abort the upload of", &upload.path, e)),
        }
    }

    /// Deletes every object under `prefix`, and removes every unfinished upload
    /// there, and returns how many objects there were. Refuses the empty prefix:
    /// nothing in stillpoint means to delete a whole storage.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, StorageError> {
        let location = self
            .prefix_location(prefix)?
            .ok_or_else(|| StorageError::InvalidPath {
                url: self.url.clone(),
                path: prefix.to_owned(),
                reason: "refusing to delete everything in the storage".to_owned(),
            })?;
        let locations = self
            .store
            .list(Some(&location))
            .map_ok(|meta| meta.location)
            .boxed();
        let deleted: Vec<Path> = self
            .store
            .delete_stream(locations)
            .or_else(|e| async move {
                match e {
                    // Gone between list and delete: someone else won the race.
                    object_store::Error::NotFound { path, .. } => Ok(Path::from(path)),
                    e => Err(e),
                }
            })
            .try_collect()
            .await
            .map_err(|e| self.backend_error("delete", prefix, e))?;
        for upload in self.list_incomplete(prefix).await? {
            self.abort_incomplete(&upload).await?;
        }
        Ok(deleted.len())
    }

    fn location(&self, path: &str) -> Result<Path, StorageError> {
        match self.prefix_location(path)? {
            Some(location) => Ok(location),
            None => Err(StorageError::InvalidPath {
                url: self.url.clone(),
                path: path.to_owned(),
                reason: "an object path must not be empty".to_owned(),
            }),
        }
    }

    /// None for the root.
    fn prefix_location(&self, path: &str) -> Result<Option<Path>, StorageError> {
        let trimmed = path.trim_matches('/');
        if trimmed.is_empty() {
            return Ok(None);
        }
        Path::parse(trimmed)
            .map(Some)
            .map_err(|e| StorageError::InvalidPath {
                url: self.url.clone(),
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }

    fn backend_error(&self, op: &'static str, path: &str, e: object_store::Error) -> StorageError {
        match e {
            // Nothing to find in a write: what is missing is where it goes.
            object_store::Error::NotFound { .. } if op == "put" => StorageError::NoBucket {
                url: self.url.clone(),
                path: path.to_owned(),
            },
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                url: self.url.clone(),
                path: path.to_owned(),
            },
            cause => StorageError::Backend {
                url: self.url.clone(),
                path: path.to_owned(),
                op,
                cause: Box::new(cause),
            },
        }
    }

    fn upload_error(&self, path: &str, source: std::io::Error) -> StorageError {
        StorageError::Upload {
            url: self.url.clone(),
            path: path.to_owned(),
            source,
        }
    }
}

/// The S3 client settings: stillpoint's HTTP timeouts first, then the environment's
/// `AWS_*` settings (as `AmazonS3Builder::from_env` reads them), then the runbook's
/// options; each later one wins.
fn s3_builder(
    shown: &str,
    bucket: &str,
    options: &BTreeMap<String, String>,
) -> Result<AmazonS3Builder, StorageError> {
    let mut builder = AmazonS3Builder::new()
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            S3_REQUEST_TIMEOUT,
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ReadTimeout),
            S3_READ_TIMEOUT,
        );
    for (key, value) in std::env::vars_os() {
        if let (Some(key), Some(value)) = (key.to_str(), value.to_str())
            && key.starts_with("AWS_")
            && let Ok(config_key) = key.to_ascii_lowercase().parse()
        {
            builder = builder.with_config(config_key, value);
        }
    }
    let mut builder = builder.with_bucket_name(bucket);
    for (key, value) in options {
        let config_key: AmazonS3ConfigKey =
            key.to_ascii_lowercase()
                .parse()
                .map_err(|_| StorageError::UnknownOption {
                    url: shown.to_owned(),
                    key: key.clone(),
                })?;
        builder = builder.with_config(config_key, value);
    }
    Ok(builder)
}

/// What an S3 error answer means, when its code says it plainly.
fn hint(cause: &object_store::Error) -> &'static str {
    let text = cause.to_string();
    if text.contains("NoSuchBucket") {
        " (the bucket does not exist; create it, or fix the [storage] url)"
    } else if [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
    ]
    .iter()
    .any(|code| text.contains(code))
    {
        " (the credentials were refused; check AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY, or the access_key_id and secret_access_key options)"
    } else {
        ""
    }
}

fn io_error(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(e),
    }
}

/// object_store's local in-progress files under `dir`: `name#N`, N all digits (its
/// `list` skips exactly these).
fn local_in_progress(
    root: &std::path::Path,
    dir: &std::path::Path,
) -> std::io::Result<Vec<IncompleteUpload>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let file = entry.path();
            if kind.is_dir() {
                pending.push(file);
                continue;
            }
            let Some(name) = file.file_name().and_then(|name| name.to_str()) else {
                continue;
            };
            let Some((object, number)) = name.rsplit_once('#') else {
                continue;
            };
            if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(relative) = file.with_file_name(object).strip_prefix(root).map(|p| {
                p.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/")
            }) else {
                continue;
            };
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                // Finished (renamed) between the listing and now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            found.push(IncompleteUpload {
                path: relative,
                bytes: Some(metadata.len()),
                last_modified: metadata.modified().map(DateTime::<Utc>::from)?,
                handle: UploadHandle::File(file),
            });
        }
    }
    Ok(found)
}

fn entry(meta: object_store::ObjectMeta) -> ObjectEntry {
    ObjectEntry {
        path: meta.location.to_string(),
        size: meta.size,
        last_modified: meta.last_modified,
    }
}

fn object_store_kind(e: &object_store::Error) -> std::io::ErrorKind {
    match e {
        object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
        _ => std::io::ErrorKind::Other,
    }
}

/// `url` as messages may show it: user info replaced by `***`, query and fragment by
/// `***`. Works for storage URLs, database URLs and paths, and for a PostgreSQL
/// `key=value` string (its password replaced by `***`).
///
/// The `url` crate decides where the authority ends, but libpq and tokio-postgres
/// read credentials up to the first `@` anywhere in the string: a password with a raw
/// `/`, `?` or `#` puts part of itself after what a URL parser calls the authority.
/// So whenever an `@` follows the parsed authority, or the string does not parse as a
/// URL, everything before the last `@` is cut: nothing of a password can survive.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_key_values(url);
    };
    let parsed = url::Url::parse(url).ok();
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let unambiguous = parsed.is_some() && !rest[authority_end..].contains('@');
    let (userinfo, host_and_rest) = if unambiguous {
        match rest[..authority_end].rfind('@') {
            Some(at) => (true, &rest[at + 1..]),
            None => (false, rest),
        }
    } else {
        match rest.rfind('@') {
            Some(at) => (true, &rest[at + 1..]),
            None => (false, rest),
        }
    };
    let host_and_rest = match host_and_rest.find(['?', '#']) {
        Some(cut) => format!("{}{}***", &host_and_rest[..cut], &host_and_rest[cut..=cut]),
        None => host_and_rest.to_owned(),
    };
    format!(
        "{scheme}://{}{host_and_rest}",
        if userinfo { "***@" } else { "" }
    )
}

/// A string that is not a URL: a path is shown as it is; a `key=value` connection
/// string with its password replaced, or not at all if it does not parse.
fn redact_key_values(text: &str) -> String {
    if !text.contains('=') {
        return text.to_owned();
    }
    match crate::adapters::postgres::conninfo::key_values(text) {
        Some(pairs) if pairs.iter().any(|(key, _)| key == "password") => pairs
            .iter()
            .map(|(key, value)| {
                if key == "password" {
                    format!("{key}=***")
                } else {
                    format!("{key}={value}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Some(_) => text.to_owned(),
        None => "(a connection string that does not parse; not shown, as it may hold a \
                 password)"
            .to_owned(),
    }
}
