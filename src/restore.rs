//! Restoring one database of a committed backup into a target: the artifact's
//! checksum is checked first (so a damaged artifact is named before anything is
//! written to the target), then the target is emptied if asked (`--force`), then the
//! artifact streams from storage through decryption and decompression straight into
//! the adapter's restore. `stillpoint restore` restores one database; drills restore
//! every database this way.
//!
//! Emptying a target cannot be undone, so before it everything that can be checked
//! is: the checksum, that the key opens the artifact and its first block decrypts
//! and decompresses, that the artifact can be opened for the copy, and (in the
//! adapter's `restore_replacing`) that the target is reachable and nobody else is
//! using it. A SQLite target is not emptied at all: the new file replaces it whole
//! once written and checked.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, ReadBuf};

use crate::adapters::{Adapter, AdapterError, ByteStream};
use crate::backup::{Progress, ProgressSink};
use crate::manifest::{DatabaseEntry, Manifest};
use crate::pipeline::{self, Decryption, PipelineError};
use crate::storage::Storage;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("backup {backup_id} has no database {database:?}; it has: {known}")]
    NoSuchDatabase {
        backup_id: String,
        database: String,
        known: String,
    },
    #[error(
        "database {database} of backup {backup_id} has no artifact (an exec cut without a copy command): there is nothing to restore"
    )]
    NoArtifact { backup_id: String, database: String },
    #[error(
        "database {database} was backed up by the {recorded} adapter, but the runbook configures it as {configured}"
    )]
    WrongAdapter {
        database: String,
        recorded: String,
        configured: String,
    },
    #[error("not restoring database {database}: {source}; the target was not touched")]
    Damaged {
        database: String,
        #[source]
        source: PipelineError,
    },
    /// The artifact is sound but cannot be opened with the key given (or at all).
    #[error("not restoring database {database}: {source}; the target was not touched")]
    CannotOpen {
        database: String,
        #[source]
        source: PipelineError,
    },
    #[error("restoring database {database} failed: {source}")]
    Pipeline {
        database: String,
        #[source]
        source: PipelineError,
    },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

/// What one restore did and how long each part took.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestoreReport {
    pub database: String,
    /// The artifact's stored (compressed, encrypted) size.
    pub stored_bytes: u64,
    /// Reading the artifact once to check its BLAKE3 and size.
    pub checksum_ms: u64,
    /// Streaming it into the target (decrypt, decompress, the database's own load).
    pub load_ms: u64,
    pub total_ms: u64,
}

/// The manifest's entry for `database`, or an error listing the ones it has.
pub fn entry<'a>(
    manifest: &'a Manifest,
    database: &str,
) -> Result<&'a DatabaseEntry, RestoreError> {
    manifest
        .databases
        .iter()
        .find(|entry| entry.name == database)
        .ok_or_else(|| RestoreError::NoSuchDatabase {
            backup_id: manifest.backup_id.clone(),
            database: database.to_owned(),
            known: manifest
                .databases
                .iter()
                .map(|entry| entry.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Restores `entry` (a database of `manifest`) into `target` with `adapter`, which
/// must be the kind of adapter that made the copy. With `force`, what the target holds
/// is replaced ([`Adapter::restore_replacing`], after the checksum and key checks);
/// without it a non-empty target is refused. `progress` hears the bytes loaded into the
/// target (decrypted and decompressed) as they go, then the end of the load, as a
/// backup's copies report theirs.
#[allow(clippy::too_many_arguments)]
pub async fn restore_database(
    storage: &Storage,
    manifest: &Manifest,
    entry: &DatabaseEntry,
    adapter: Arc<dyn Adapter>,
    target: &str,
    decryption: &Decryption,
    force: bool,
    progress: ProgressSink,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let database = entry.name.clone();
    let Some(artifact) = &entry.artifact else {
        return Err(RestoreError::NoArtifact {
            backup_id: manifest.backup_id.clone(),
            database,
        });
    };
    if adapter.kind() != entry.adapter {
        return Err(RestoreError::WrongAdapter {
            database,
            recorded: entry.adapter.clone(),
            configured: adapter.kind().to_owned(),
        });
    }

    pipeline::verify_checksum(storage, artifact)
        .await
        .map_err(|source| RestoreError::Damaged {
            database: database.clone(),
            source,
        })?;
    let checksum_ms = started.elapsed().as_millis() as u64;

    let loading = Instant::now();
    if force {
        pipeline::check_opens(storage, artifact, decryption)
            .await
            .map_err(|source| match source.damage() {
                Some(_) => RestoreError::Damaged {
                    database: database.clone(),
                    source,
                },
                None => RestoreError::CannotOpen {
                    database: database.clone(),
                    source,
                },
            })?;
    }
    let stream = pipeline::open(storage, artifact, decryption)
        .await
        .map_err(|source| RestoreError::Pipeline {
            database: database.clone(),
            source,
        })?;
    let stream: ByteStream = Box::pin(Counted {
        inner: stream,
        bytes: 0,
        database: database.clone(),
        progress: progress.clone(),
    });
    if force {
        // Checks the target is reachable and unused before it empties (or, for
        // SQLite, replaces) it.
        adapter.restore_replacing(stream, target).await?;
    } else {
        adapter.restore(stream, target).await?;
    }
    progress(Progress::CopyDone {
        database: database.clone(),
    });
    Ok(RestoreReport {
        database,
        stored_bytes: artifact.stored_size,
        checksum_ms,
        load_ms: loading.elapsed().as_millis() as u64,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

/// The artifact's plain bytes on their way into the target, counted for `progress`.
struct Counted {
    inner: ByteStream,
    bytes: u64,
    database: String,
    progress: ProgressSink,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.inner.as_mut().poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.bytes += read as u64;
            (self.progress)(Progress::Copied {
                database: self.database.clone(),
                bytes: self.bytes,
            });
        }
        polled
    }
}
