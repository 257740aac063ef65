//! The bridge between the pipeline's blocking worker (zstd and age are synchronous) and
//! async readers: a bounded channel of chunks, so the worker can never run more than
//! `CHANNEL_DEPTH × CHUNK` bytes ahead of whoever reads.
//!
//! The end of the stream is an explicit message. A worker that stops without sending
//! it (an error, a panic) makes the reader fail instead of seeing a clean, truncated
//! end: a storage upload must never complete on a half-written artifact.

use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes per message.
pub(crate) const CHUNK: usize = 64 * 1024;
/// Messages in flight. With `CHUNK` this bounds the worker's lead to 512 KiB.
pub(crate) const CHANNEL_DEPTH: usize = 8;

pub(crate) enum Msg {
    Data(Bytes),
    Done,
    Failed(io::Error),
}

pub(crate) fn channel() -> (ChannelWriter, ChannelReader) {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    (
        ChannelWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
        },
        ChannelReader {
            rx,
            pending: Bytes::new(),
            ended: false,
        },
    )
}

/// The blocking side. Buffers up to one `CHUNK`, then blocks until the channel has
/// room: that wait is the back-pressure.
pub(crate) struct ChannelWriter {
    tx: mpsc::Sender<Msg>,
    buf: BytesMut,
}

impl ChannelWriter {
    /// A handle that can report a failure after the writer itself was consumed by a
    /// chain of encoders.
    pub(crate) fn failer(&self) -> Failer {
        Failer {
            tx: self.tx.clone(),
        }
    }

    /// Sends what is buffered and the end-of-stream marker.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.tx.blocking_send(Msg::Done).map_err(|_| reader_gone())
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx
            .blocking_send(Msg::Data(chunk))
            .map_err(|_| reader_gone())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    /// Buffered bytes stay until a chunk is full or the stream finishes: holding the
    /// tail back until `finish` means a reader never sees the last bytes of an
    /// artifact whose checksum turned out wrong.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Marks the stream as failed, so the reader returns `error` instead of an end.
pub(crate) struct Failer {
    tx: mpsc::Sender<Msg>,
}

impl Failer {
    pub(crate) fn fail(self, error: io::Error) {
        // If the reader is gone there is nobody left to tell.
        let _ = self.tx.blocking_send(Msg::Failed(error));
    }
}

/// The kind a `ChannelWriter` fails with when the reader was dropped: the consumer
/// (an upload, a restore) stopped, and its own error is the one worth reporting.
pub(crate) fn is_reader_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

fn reader_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the reader of the pipeline stopped reading",
    )
}

/// The async side.
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<Msg>,
    pending: Bytes,
    ended: bool,
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = buf.remaining().min(self.pending.len());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(Msg::Data(chunk)) => self.pending = chunk,
                Some(Msg::Done) => {
                    self.ended = true;
                    return Poll::Ready(Ok(()));
                }
                Some(Msg::Failed(error)) => {
                    self.rx.close();
                    return Poll::Ready(Err(error));
                }
                None => {
                    return Poll::Ready(Err(io::Error::other(
                        "the pipeline stopped before the end of the artifact",
                    )));
                }
            }
        }
    }
}

/// A `ChannelReader` that, once its stream has ended or failed, also awaits the
/// worker that fed it, so a consumer that reads to the end leaves no task behind and
/// sees a panic in the worker as an error.
pub(crate) struct WorkerReader {
    inner: ChannelReader,
    worker: Option<JoinHandle<()>>,
    outcome: Option<io::Result<()>>,
    label: String,
}

impl WorkerReader {
    pub(crate) fn new(inner: ChannelReader, worker: JoinHandle<()>, label: String) -> Self {
        WorkerReader {
            inner,
            worker: Some(worker),
            outcome: None,
            label,
        }
    }
}

impl AsyncRead for WorkerReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.outcome.is_none() {
            let before = buf.filled().len();
            let result = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
            if result.is_ok() && buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            this.outcome = Some(result);
        }
        if let Some(worker) = this.worker.as_mut() {
            let joined = ready!(Pin::new(worker).poll(cx));
            this.worker = None;
            if let Err(join_error) = joined {
                this.outcome = Some(Err(io::Error::other(format!(
                    "{}: the pipeline worker failed: {join_error}",
                    this.label
                ))));
            }
        }
        match this.outcome.take() {
            Some(Ok(())) => {
                this.outcome = Some(Ok(()));
                Poll::Ready(Ok(()))
            }
            Some(Err(error)) => {
                // Later reads keep failing rather than looking like a clean end.
                this.outcome = Some(Err(io::Error::new(error.kind(), error.to_string())));
                Poll::Ready(Err(error))
            }
            None => unreachable!("outcome is set above"),
        }
    }
}
