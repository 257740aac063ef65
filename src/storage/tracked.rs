//! Writes that run to their end even when their caller stops waiting, counted, so
//! that a clean-up can wait for every one of them before it deletes.
//!
//! Dropping a write's future does not stop the write. object_store's local backend
//! writes in `spawn_blocking`: a dropped `put` still creates its `name#N` file, fills
//! it and renames it into place, and a dropped multipart `complete` still renames. An
//! S3 PUT whose body has been sent is stored by the server whether or not anyone
//! reads its answer. A backup stopped by a signal drops its copies mid-write; when it
//! deleted its directory at once, a write still under way put a file back after the
//! delete, and the partial backup stayed listed as incomplete.
//!
//! [`Tracked`] runs each write of the store it wraps (put, multipart create, part,
//! complete and abort, copy, rename) as a task of its own, counted from the moment
//! the write is started until it has ended; [`Writes::finished`] returns once no write
//! is under way. The tasks are never detached: the caller awaits each, and a caller
//! that stopped waiting is replaced by whoever awaits [`Writes::finished`]. Reads,
//! lists and deletes pass through unchanged (a delete cannot bring an object back).

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};
use tokio::sync::watch;

/// The count of writes under way through one [`Tracked`] store. Cheap to clone; the
/// clones share the count.
#[derive(Debug, Clone)]
pub(crate) struct Writes {
    under_way: Arc<watch::Sender<usize>>,
}

/// One write under way; the count goes down when it is dropped (the task ended,
/// however it ended).
struct Counted(Arc<watch::Sender<usize>>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

impl Writes {
    fn new() -> Self {
        Writes {
            under_way: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Starts `write` as a task of its own and returns its outcome. The write is
    /// counted from now (before the returned future is first polled) until the task
    /// ends; dropping the returned future does not stop it.
    fn spawn<T: Send + 'static>(
        &self,
        write: impl Future<Output = Result<T>> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        self.under_way.send_modify(|count| *count += 1);
        let counted = Counted(Arc::clone(&self.under_way));
        let task = tokio::spawn(async move {
            let _counted = counted;
            write.await
        });
        async move {
            task.await
                .map_err(|source| object_store::Error::JoinError { source })?
        }
    }

    /// How many writes are under way now.
    pub(crate) fn under_way(&self) -> usize {
        *self.under_way.borrow()
    }

    /// Returns once no write is under way, including writes whose caller stopped
    /// waiting for them.
    pub(crate) async fn finished(&self) {
        let mut count = self.under_way.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = count.wait_for(|count| *count == 0).await;
    }
}

/// An object store whose writes are [`Writes`]-counted tasks.
#[derive(Debug)]
pub(crate) struct Tracked {
    inner: Arc<dyn ObjectStore>,
    writes: Writes,
}

impl Tracked {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Tracked {
            inner,
            writes: Writes::new(),
        }
    }

    pub(crate) fn writes(&self) -> &Writes {
        &self.writes
    }
}

impl fmt::Display for Tracked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Tracked {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let (inner, location) = (Arc::clone(&self.inner), location.clone());
        self.writes
            .spawn(async move { inner.put_opts(&location, payload, opts).await })
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let (inner, location) = (Arc::clone(&self.inner), location.clone());
        // Creating the upload writes too (a local `name#N` file, an S3 upload id).
        let upload = self
            .writes
            .spawn(async move { inner.put_multipart_opts(&location, opts).await })
            .await?;
        Ok(Box::new(TrackedUpload {
            inner: Some(upload),
            writes: self.writes.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let (inner, from, to) = (Arc::clone(&self.inner), from.clone(), to.clone());
        self.writes
            .spawn(async move { inner.copy_opts(&from, &to, options).await })
            .await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let (inner, from, to) = (Arc::clone(&self.inner), from.clone(), to.clone());
        self.writes
            .spawn(async move { inner.rename_opts(&from, &to, options).await })
            .await
    }
}

/// A multipart upload whose parts, completion and abort are counted writes. The
/// inner upload moves into the task that completes or aborts it (they need it
/// mutably while they run), and comes back when the task ends.
#[derive(Debug)]
struct TrackedUpload {
    inner: Option<Box<dyn MultipartUpload>>,
    writes: Writes,
}

impl TrackedUpload {
    fn finished() -> object_store::Error {
        object_store::Error::Generic {
            store: "stillpoint",
            source: "the upload was already completed or aborted".into(),
        }
    }

    /// Runs `step` (complete or abort) on the inner upload as a counted write.
    async fn finish_with<T, F>(&mut self, step: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(
                &'a mut Box<dyn MultipartUpload>,
            ) -> futures::future::BoxFuture<'a, Result<T>>
            + Send
            + 'static,
    {
        let mut upload = self.inner.take().ok_or_else(Self::finished)?;
        let (upload, result) = self
            .writes
            .spawn(async move {
                let result = step(&mut upload).await;
                Ok((upload, result))
            })
            .await?;
        self.inner = Some(upload);
        result
    }
}

#[async_trait::async_trait]
impl MultipartUpload for TrackedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        match &mut self.inner {
            Some(upload) => self.writes.spawn(upload.put_part(data)).boxed(),
            None => futures::future::ready(Err(Self::finished())).boxed(),
        }
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.finish_with(|upload| upload.complete()).await
    }

    async fn abort(&mut self) -> Result<()> {
        self.finish_with(|upload| upload.abort()).await
    }
}
