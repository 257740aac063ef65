//! The copy pipeline: a database's byte stream → zstd → age → BLAKE3 → storage
//! ([`store`]), and back again: storage → BLAKE3 check → age → zstd ([`open`],
//! [`verify`]).
//!
//! Each stage is optional and each is the standard format, so the `age` and `zstd`
//! command-line tools read our artifacts: `age -d -i key.txt db.sqlite.zst.age | zstd
//! -d`. The BLAKE3 hash and size in [`ArtifactInfo`] are over the *stored* bytes, so
//! damage is judged on what storage holds, whatever a later stage says, and
//! [`verify_checksum`] can check an artifact where the decryption keys are not.
//!
//! Memory stays bounded whatever the size: zstd and age run synchronously in one
//! `spawn_blocking` worker per artifact (zstd compresses on one thread of its own
//! beside it, holding about 24 MiB of 4 MiB jobs), which talks to async code
//! through a bounded channel (`channel.rs`, at most 512 KiB ahead of its reader) and
//! `SyncIoBridge`; storage adds its own bound (see [`crate::storage`]). Every worker
//! handle is awaited.
//!
//! - `channel.rs`: the bounded bridge between the worker and async readers.
//! - `tests.rs`: every stage combination, damage, memory bound, CLI interop.

mod channel;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufReader, Read, Write};

use age::secrecy::SecretString;
use tokio_util::io::SyncIoBridge;

use crate::adapters::ByteStream;
use crate::storage::{Storage, StorageError};
use channel::{ChannelReader, ChannelWriter, WorkerReader};

/// `ArtifactInfo::encryption` for artifacts encrypted to X25519 recipients.
pub const AGE_X25519: &str = "age-x25519";
/// `ArtifactInfo::encryption` for passphrase-encrypted artifacts.
pub const AGE_PASSPHRASE: &str = "age-passphrase";
/// The scrypt work factor (log2 N) for passphrase encryption: the one the `age` CLI
/// itself uses. The age crate would calibrate to this machine, and a fast machine's
/// choice can exceed what the CLI (or a slower restore host) accepts.
const SCRYPT_LOG_N: u8 = 18;
/// The largest work factor we accept when decrypting: the `age` CLI's own limit.
const SCRYPT_MAX_LOG_N: u8 = 22;
/// Raw bytes read from a copy at a time.
const READ_CHUNK: usize = 64 * 1024;
/// zstd compresses on a thread of its own (see [`encode`]), in jobs of this many
/// input bytes. Fixed, because zstd's own choice grows with the level (8 MiB at level
/// 3, up to 512 MiB at the highest); half of level 3's choice halves the memory
/// (zstd holds up to four jobs of input and the output of finished ones, about 24
/// MiB) and measured no slower (docs/performance.md).
const ZSTD_JOB_SIZE: u32 = 4 * 1024 * 1024;

/// How a copy is transformed on its way to storage. Default: stored as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineSettings {
    /// zstd level (e.g. 3); None: no compression.
    pub zstd_level: Option<i32>,
    pub encryption: Encryption,
}

/// Who can read the artifacts.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Encryption {
    #[default]
    None,
    /// age X25519 public keys, `age1…`. Any one of the matching identities decrypts.
    Recipients(Vec<String>),
    /// An age passphrase (scrypt). For keys held by people; prefer recipients.
    Passphrase(String),
}

/// What opens encrypted artifacts. Ignored for artifacts that are not encrypted.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Decryption {
    #[default]
    None,
    /// age X25519 secret keys, `AGE-SECRET-KEY-1…`.
    Identities(Vec<String>),
    Passphrase(String),
}

// Debug by hand: a passphrase or secret key must never reach a log.
impl fmt::Debug for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encryption::None => f.write_str("None"),
            Encryption::Recipients(r) => f.debug_tuple("Recipients").field(r).finish(),
            Encryption::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
        }
    }
}

impl fmt::Debug for Decryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decryption::None => f.write_str("None"),
            Decryption::Identities(ids) => write!(f, "Identities(<{} redacted>)", ids.len()),
            Decryption::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
        }
    }
}

impl Decryption {
    /// Reads an age identity file (as `age-keygen` writes it): every line starting
    /// with `AGE-SECRET-KEY-1`; comments and blank lines are skipped.
    pub fn from_identity_file(path: &std::path::Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::IdentityFile {
            file: path.display().to_string(),
            problem: source.to_string(),
        })?;
        let keys: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("AGE-SECRET-KEY-1"))
            .map(str::to_owned)
            .collect();
        if keys.is_empty() {
            return Err(PipelineError::IdentityFile {
                file: path.display().to_string(),
                problem: "it holds no AGE-SECRET-KEY-1… line; create one with age-keygen"
                    .to_owned(),
            });
        }
        Ok(Decryption::Identities(keys))
    }
}

/// One stored artifact, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArtifactInfo {
    /// Relative to the storage root.
    pub path: String,
    /// Raw bytes the copy produced.
    pub size: u64,
    /// Bytes in storage (after compression and encryption).
    pub stored_size: u64,
    /// BLAKE3 of the stored bytes, lowercase hex.
    pub blake3: String,
    /// e.g. "zstd-3"; None: not compressed.
    pub compression: Option<String>,
    /// "age-x25519" or "age-passphrase"; None: not encrypted.
    pub encryption: Option<String>,
}

/// What [`verify`] found for a sound artifact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub path: String,
    pub stored_size: u64,
    /// Bytes after decryption and decompression (equal to the manifest's `size`).
    pub size: u64,
    pub blake3: String,
}

/// Which check a damaged artifact failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageStage {
    /// The stored bytes' BLAKE3 or size differ from the manifest.
    Checksum,
    /// age refused the stored bytes (a damaged header or chunk).
    Decryption,
    /// zstd refused the decrypted bytes, or they decode to the wrong size.
    Decompression,
}

impl fmt::Display for DamageStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DamageStage::Checksum => "checksum verification",
            DamageStage::Decryption => "decryption",
            DamageStage::Decompression => "decompression",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("age recipient #{index} ({recipient:?}) is not an X25519 public key (age1…): {reason}")]
    BadRecipient {
        index: usize,
        recipient: String,
        reason: String,
    },
    /// The key itself is never part of the message.
    #[error(
        "age identity #{index} is not an X25519 secret key (AGE-SECRET-KEY-1…); check the key file (the key is not shown)"
    )]
    BadIdentity { index: usize },
    #[error(
        "encryption is on but no age recipient (age1…) is given; add recipients or turn encryption off"
    )]
    NoRecipients,
    #[error("the age passphrase is empty; set one, or use recipients")]
    EmptyPassphrase,
    #[error("zstd level {level} is out of range; use {min}..={max} (3 is zstd's default)")]
    BadZstdLevel { level: i32, min: i32, max: i32 },
    #[error("age identity file {file}: {problem}")]
    IdentityFile { file: String, problem: String },
    /// The copy (the input stream) failed; nothing was stored.
    #[error("artifact {path}: reading the database copy failed, nothing was stored: {source}")]
    Input {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("artifact {path}: compressing or encrypting failed, nothing was stored: {source}")]
    Encode {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "artifact {path}: storage took {stored} bytes but the pipeline produced {produced}; store it again"
    )]
    StoredSizeMismatch {
        path: String,
        stored: u64,
        produced: u64,
    },
    /// Reading the artifact back from storage failed (not damage: retry).
    #[error("artifact {path}: reading it from storage failed: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("artifact {path} is damaged: {stage} failed: {detail}")]
    Damaged {
        path: String,
        stage: DamageStage,
        detail: String,
    },
    #[error("artifact {path} is encrypted ({encryption}) but no key was given; pass {needed}")]
    MissingKey {
        path: String,
        encryption: String,
        needed: &'static str,
    },
    #[error(
        "artifact {path} is encrypted ({encryption}), which needs {needed}, but {given} was given"
    )]
    KeyKindMismatch {
        path: String,
        encryption: String,
        needed: &'static str,
        given: &'static str,
    },
    #[error("artifact {path} ({encryption}): {problem}")]
    WrongKey {
        path: String,
        encryption: String,
        problem: String,
    },
    #[error(
        "artifact {path}: the manifest says {what} {value:?}, which this stillpoint does not know ({known}); use a newer stillpoint"
    )]
    Unsupported {
        path: String,
        what: &'static str,
        value: String,
        known: &'static str,
    },
    #[error("artifact {path}: the pipeline worker failed: {message}")]
    Worker { path: String, message: String },
    /// The reader of [`open`]'s stream dropped it before the end.
    #[error("artifact {path}: the reader of the decoded stream stopped reading")]
    Abandoned { path: String },
}

impl PipelineError {
    /// The stored artifact is not there (deleted, or never whole).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PipelineError::Storage(error) if error.is_not_found())
    }
}

impl PipelineError {
    /// The damage stage, if the artifact itself is damaged.
    pub fn damage(&self) -> Option<DamageStage> {
        match self {
            PipelineError::Damaged { stage, .. } => Some(*stage),
            _ => None,
        }
    }
}

impl PipelineSettings {
    /// Checks levels and keys without storing anything: call it before pausing.
    pub fn check(&self) -> Result<(), PipelineError> {
        Plan::new(self).map(drop)
    }

    /// The manifest's `compression` label, e.g. "zstd-3".
    pub fn compression_label(&self) -> Option<String> {
        self.zstd_level.map(|level| format!("zstd-{level}"))
    }

    /// The manifest's `encryption` label.
    pub fn encryption_label(&self) -> Option<&'static str> {
        match self.encryption {
            Encryption::None => None,
            Encryption::Recipients(_) => Some(AGE_X25519),
            Encryption::Passphrase(_) => Some(AGE_PASSPHRASE),
        }
    }

    /// What these stages add to an artifact's file name: "", ".zst", ".age",
    /// ".zst.age" (in the order the stages run, as the CLIs expect).
    pub fn suffix(&self) -> &'static str {
        match (
            self.zstd_level.is_some(),
            self.encryption != Encryption::None,
        ) {
            (false, false) => "",
            (true, false) => ".zst",
            (false, true) => ".age",
            (true, true) => ".zst.age",
        }
    }
}

/// Settings with their keys parsed.
struct Plan {
    zstd_level: Option<i32>,
    encrypt: Option<EncryptKeys>,
}

enum EncryptKeys {
    Recipients(Vec<age::x25519::Recipient>),
    Passphrase(SecretString),
}

impl Plan {
    fn new(settings: &PipelineSettings) -> Result<Self, PipelineError> {
        if let Some(level) = settings.zstd_level {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(PipelineError::BadZstdLevel {
                    level,
                    min: *range.start(),
                    max: *range.end(),
                });
            }
        }
        let encrypt = match &settings.encryption {
            Encryption::None => None,
            Encryption::Recipients(recipients) => {
                if recipients.is_empty() {
                    return Err(PipelineError::NoRecipients);
                }
                let parsed = recipients
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        r.trim()
                            .parse::<age::x25519::Recipient>()
                            .map_err(|reason| PipelineError::BadRecipient {
                                index: i + 1,
                                recipient: r.clone(),
                                reason: reason.to_owned(),
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(EncryptKeys::Recipients(parsed))
            }
            Encryption::Passphrase(passphrase) => {
                if passphrase.is_empty() {
                    return Err(PipelineError::EmptyPassphrase);
                }
                Some(EncryptKeys::Passphrase(SecretString::from(
                    passphrase.clone(),
                )))
            }
        };
        Ok(Plan {
            zstd_level: settings.zstd_level,
            encrypt,
        })
    }
}

/// Streams `input` through the stages `settings` turn on into `storage` at `path`,
/// and returns what the manifest records. `progress` is called from the worker
/// thread with the total raw bytes read so far. If the input fails, nothing is
/// stored.
pub async fn store(
    input: ByteStream,
    settings: &PipelineSettings,
    storage: &Storage,
    path: &str,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<ArtifactInfo, PipelineError> {
    let (reader, worker) = encode_stream(input, settings, progress)?;
    let (stored, encoded) = tokio::join!(storage.put_stream(path, reader), worker);
    let encoded = encoded.map_err(|e| PipelineError::Worker {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let summary = match (encoded, stored) {
        (Ok(summary), Ok(stored)) => {
            if stored != summary.stored_size {
                return Err(PipelineError::StoredSizeMismatch {
                    path: path.to_owned(),
                    stored,
                    produced: summary.stored_size,
                });
            }
            summary
        }
        (Err(EncodeError::Input(source)), _) => {
            return Err(PipelineError::Input {
                path: path.to_owned(),
                source,
            });
        }
        // The upload stopped first and the worker only saw its reader go away.
        (Err(EncodeError::Output(e)), Err(storage)) if channel::is_reader_gone(&e) => {
            return Err(storage.into());
        }
        (Err(EncodeError::Output(source)), _) => {
            return Err(PipelineError::Encode {
                path: path.to_owned(),
                source,
            });
        }
        (Ok(_), Err(storage)) => return Err(storage.into()),
    };
    Ok(ArtifactInfo {
        path: path.to_owned(),
        size: summary.size,
        stored_size: summary.stored_size,
        blake3: summary.blake3,
        compression: settings.compression_label(),
        encryption: settings.encryption_label().map(str::to_owned),
    })
}

/// Streams an artifact back, decrypted and decompressed. The stream **fails** (an
/// `io::Error` naming the artifact, wrapping a [`PipelineError`]) instead of ending
/// if the stored bytes do not match the manifest's BLAKE3 and size, or if a stage
/// refuses them. age authenticates every 64 KiB chunk, so encrypted artifacts fail at
/// the first damaged chunk; unencrypted ones can only fail at the end, after the
/// consumer has seen most of the bytes. A consumer that cannot undo what it read
/// should call [`verify`] first. Read the stream to its end: that also awaits the
/// worker.
pub async fn open(
    storage: &Storage,
    info: &ArtifactInfo,
    decryption: &Decryption,
) -> Result<ByteStream, PipelineError> {
    let keys = DecryptKeys::for_artifact(info, decryption)?;
    let stored = storage.get(&info.path).await?;
    let stored = SyncIoBridge::new(stored);
    let (mut writer, reader) = channel::channel();
    let info_owned = info.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let failer = writer.failer();
        let result = decode(stored, &info_owned, &keys, &mut writer).and_then(|_| {
            writer.finish().map_err(|_| PipelineError::Abandoned {
                path: info_owned.path.clone(),
            })
        });
        if let Err(error) = result {
            failer.fail(io::Error::other(error));
        }
    });
    Ok(Box::pin(WorkerReader::new(
        reader,
        worker,
        format!("artifact {}", info.path),
    )))
}

/// Reads a whole artifact, checks its BLAKE3 and size against the manifest, decrypts
/// and decompresses it to nowhere, and reports the sizes. A damaged artifact gives
/// [`PipelineError::Damaged`], naming the path and which check failed; when the
/// stored bytes are wrong that is always the checksum, whatever a later stage said.
pub async fn verify(
    storage: &Storage,
    info: &ArtifactInfo,
    decryption: &Decryption,
) -> Result<VerifyReport, PipelineError> {
    let keys = DecryptKeys::for_artifact(info, decryption)?;
    let stored = SyncIoBridge::new(storage.get(&info.path).await?);
    let info_owned = info.clone();
    tokio::task::spawn_blocking(move || decode(stored, &info_owned, &keys, &mut io::sink()))
        .await
        .map_err(|e| PipelineError::Worker {
            path: info.path.clone(),
            message: e.to_string(),
        })?
}

/// Checks that `decryption` can open the artifact and that its first block decrypts
/// and decompresses, reading no further than that block: what a restore that must
/// first empty its target checks before it touches anything. (A key that does not
/// open the header is told apart from a damaged header by the checksum, which reads
/// the whole artifact.)
pub async fn check_opens(
    storage: &Storage,
    info: &ArtifactInfo,
    decryption: &Decryption,
) -> Result<(), PipelineError> {
    /// Takes the first block the decoder produces, then refuses more, which ends the
    /// decoding there.
    #[derive(Default)]
    struct FirstBlock {
        received: bool,
    }
    impl Write for FirstBlock {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if self.received {
                return Err(io::Error::other("the first block is enough"));
            }
            self.received = true;
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let keys = DecryptKeys::for_artifact(info, decryption)?;
    let stored = SyncIoBridge::new(storage.get(&info.path).await?);
    let info_owned = info.clone();
    tokio::task::spawn_blocking(move || {
        let mut first = FirstBlock::default();
        match decode(stored, &info_owned, &keys, &mut first) {
            Ok(_) => Ok(()),
            Err(PipelineError::Abandoned { .. }) if first.received => Ok(()),
            Err(error) => Err(error),
        }
    })
    .await
    .map_err(|e| PipelineError::Worker {
        path: info.path.clone(),
        message: e.to_string(),
    })?
}

/// Checks only that the stored bytes match the manifest's BLAKE3 and size, and
/// returns their size. Needs no key, so it runs where the decryption keys are not
/// (they are often kept offline); [`verify`] checks everything.
pub async fn verify_checksum(storage: &Storage, info: &ArtifactInfo) -> Result<u64, PipelineError> {
    use tokio::io::AsyncReadExt;
    let mut stored = storage.get(&info.path).await?;
    let mut hasher = blake3::Hasher::new();
    let mut count = 0u64;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = stored
            .read(&mut buf)
            .await
            .map_err(|source| PipelineError::Read {
                path: info.path.clone(),
                source,
            })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        count += n as u64;
    }
    let blake3 = hasher.finalize().to_hex().to_string();
    if count != info.stored_size || blake3 != info.blake3 {
        return Err(checksum_damage(info, count, &blake3, None));
    }
    Ok(count)
}

struct EncodeSummary {
    size: u64,
    stored_size: u64,
    blake3: String,
}

enum EncodeError {
    Input(io::Error),
    Output(io::Error),
}

type Worker = tokio::task::JoinHandle<Result<EncodeSummary, EncodeError>>;

/// Starts the encoding worker: the returned reader yields the stored bytes, the
/// handle the summary. The reader fails if the worker fails.
fn encode_stream(
    input: ByteStream,
    settings: &PipelineSettings,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<(ChannelReader, Worker), PipelineError> {
    let plan = Plan::new(settings)?;
    let input = SyncIoBridge::new(input);
    let (writer, reader) = channel::channel();
    let worker = tokio::task::spawn_blocking(move || {
        let failer = writer.failer();
        let result = encode(input, &plan, writer, &progress);
        if let Err(EncodeError::Input(e) | EncodeError::Output(e)) = &result {
            failer.fail(io::Error::new(e.kind(), e.to_string()));
        }
        result
    });
    Ok((reader, worker))
}

/// One stage of the write chain. `finish_sink` ends this stage's format (zstd's last
/// frame, age's last chunk), then the next stage's.
trait Sink: Write {
    fn finish_sink(self: Box<Self>) -> io::Result<Digest>;
}

struct Digest {
    stored_size: u64,
    blake3: String,
}

/// The last stage: hashes what is stored and hands it to the channel.
struct HashingWriter {
    inner: ChannelWriter,
    hasher: blake3::Hasher,
    count: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hasher.update(&data[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Sink for HashingWriter {
    fn finish_sink(self: Box<Self>) -> io::Result<Digest> {
        let HashingWriter {
            inner,
            hasher,
            count,
        } = *self;
        inner.finish()?;
        Ok(Digest {
            stored_size: count,
            blake3: hasher.finalize().to_hex().to_string(),
        })
    }
}

impl Sink for zstd::stream::write::Encoder<'static, Box<dyn Sink>> {
    fn finish_sink(self: Box<Self>) -> io::Result<Digest> {
        self.finish()?.finish_sink()
    }
}

impl Sink for age::stream::StreamWriter<Box<dyn Sink>> {
    fn finish_sink(self: Box<Self>) -> io::Result<Digest> {
        self.finish()?.finish_sink()
    }
}

/// Runs on the blocking worker: input → zstd → age → BLAKE3 → channel.
fn encode(
    mut input: impl Read,
    plan: &Plan,
    out: ChannelWriter,
    progress: &dyn Fn(u64),
) -> Result<EncodeSummary, EncodeError> {
    let mut sink: Box<dyn Sink> = Box::new(HashingWriter {
        inner: out,
        hasher: blake3::Hasher::new(),
        count: 0,
    });
    // Built from the storage end backwards: age wraps the hasher, zstd wraps age.
    if let Some(keys) = &plan.encrypt {
        let encryptor = match keys {
            EncryptKeys::Recipients(recipients) => {
                age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                    .map_err(|e| EncodeError::Output(io::Error::other(e.to_string())))?
            }
            EncryptKeys::Passphrase(passphrase) => {
                let mut recipient = age::scrypt::Recipient::new(passphrase.clone());
                recipient.set_work_factor(SCRYPT_LOG_N);
                age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                    .map_err(|e| EncodeError::Output(io::Error::other(e.to_string())))?
            }
        };
        sink = Box::new(encryptor.wrap_output(sink).map_err(EncodeError::Output)?);
    }
    if let Some(level) = plan.zstd_level {
        let mut encoder =
            zstd::stream::write::Encoder::new(sink, level).map_err(EncodeError::Output)?;
        // The frame checksum lets `zstd -d` (and we) catch damage zstd can see.
        encoder
            .include_checksum(true)
            .map_err(EncodeError::Output)?;
        // One zstd worker thread, as the zstd CLI uses by default: compression runs
        // beside this thread, which reads the copy, encrypts and hashes, instead of
        // taking turns with it (docs/performance.md has the profile). zstd then
        // compresses whole jobs from contiguous buffers, which also avoids its slower
        // ring-buffer ("extDict") match finder of single-threaded streaming.
        encoder.multithread(1).map_err(EncodeError::Output)?;
        encoder
            .set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB_SIZE))
            .map_err(EncodeError::Output)?;
        sink = Box::new(encoder);
    }
    let mut buf = vec![0u8; READ_CHUNK];
    let mut size = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EncodeError::Input(e)),
        };
        sink.write_all(&buf[..n]).map_err(EncodeError::Output)?;
        size += n as u64;
        progress(size);
    }
    let digest = sink.finish_sink().map_err(EncodeError::Output)?;
    Ok(EncodeSummary {
        size,
        stored_size: digest.stored_size,
        blake3: digest.blake3,
    })
}

/// Decryption keys, checked against what the artifact needs.
enum DecryptKeys {
    None,
    Identities(Vec<age::x25519::Identity>),
    Passphrase(SecretString),
}

const NEEDS_IDENTITY: &str = "an age identity (AGE-SECRET-KEY-1…)";
const NEEDS_PASSPHRASE: &str = "the age passphrase";

impl DecryptKeys {
    fn for_artifact(info: &ArtifactInfo, decryption: &Decryption) -> Result<Self, PipelineError> {
        let path = info.path.clone();
        if let Some(compression) = &info.compression
            && !compression.starts_with("zstd")
        {
            return Err(PipelineError::Unsupported {
                path,
                what: "compression",
                value: compression.clone(),
                known: "zstd-N",
            });
        }
        let Some(encryption) = info.encryption.as_deref() else {
            return Ok(DecryptKeys::None);
        };
        let given = match decryption {
            Decryption::None => "nothing",
            Decryption::Identities(_) => "an age identity",
            Decryption::Passphrase(_) => "a passphrase",
        };
        let mismatch = |needed| {
            if matches!(decryption, Decryption::None) {
                PipelineError::MissingKey {
                    path: info.path.clone(),
                    encryption: encryption.to_owned(),
                    needed,
                }
            } else {
                PipelineError::KeyKindMismatch {
                    path: info.path.clone(),
                    encryption: encryption.to_owned(),
                    needed,
                    given,
                }
            }
        };
        match (encryption, decryption) {
            (AGE_X25519, Decryption::Identities(ids)) => {
                if ids.is_empty() {
                    return Err(mismatch(NEEDS_IDENTITY));
                }
                let parsed = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        id.trim()
                            .parse::<age::x25519::Identity>()
                            .map_err(|_| PipelineError::BadIdentity { index: i + 1 })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(DecryptKeys::Identities(parsed))
            }
            (AGE_X25519, _) => Err(mismatch(NEEDS_IDENTITY)),
            (AGE_PASSPHRASE, Decryption::Passphrase(p)) => {
                Ok(DecryptKeys::Passphrase(SecretString::from(p.clone())))
            }
            (AGE_PASSPHRASE, _) => Err(mismatch(NEEDS_PASSPHRASE)),
            (other, _) => Err(PipelineError::Unsupported {
                path,
                what: "encryption",
                value: other.to_owned(),
                known: "age-x25519, age-passphrase",
            }),
        }
    }
}

/// Where a read error in the decode chain started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Storage,
    Decryption,
    Decompression,
}

/// Records the innermost stage whose read failed: a storage error surfaces through
/// age and zstd too, but it is not their failure.
struct Tagged<'a, R> {
    inner: R,
    origin: Origin,
    first_failure: &'a Cell<Option<Origin>>,
}

impl<R: Read> Read for Tagged<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| {
            if self.first_failure.get().is_none() {
                self.first_failure.set(Some(self.origin));
            }
        })
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Why the decode chain stopped early.
enum DecodeFailure {
    /// age could not parse the header.
    Header(age::DecryptError),
    /// age parsed the header but no key opened it.
    Key(age::DecryptError),
    Read(io::Error),
    /// The sink refused bytes: `open`'s reader went away.
    Sink,
}

/// Runs on a blocking worker: stored bytes → BLAKE3 → age → zstd → `sink`. Always
/// reads the stored bytes to their end, so the checksum can be judged even when a
/// stage failed first.
fn decode(
    stored: impl Read,
    info: &ArtifactInfo,
    keys: &DecryptKeys,
    sink: &mut dyn Write,
) -> Result<VerifyReport, PipelineError> {
    let path = &info.path;
    let first_failure = Cell::new(None);
    let mut stored = HashingReader {
        inner: BufReader::with_capacity(READ_CHUNK, stored),
        hasher: blake3::Hasher::new(),
        count: 0,
    };
    let mut produced = 0u64;
    let outcome = (|| -> Result<(), DecodeFailure> {
        let base = Tagged {
            inner: &mut stored,
            origin: Origin::Storage,
            first_failure: &first_failure,
        };
        let mut reader: Box<dyn Read + '_> = match keys {
            DecryptKeys::None => Box::new(base),
            DecryptKeys::Identities(ids) => {
                let decryptor = age::Decryptor::new(base).map_err(DecodeFailure::Header)?;
                let plain = decryptor
                    .decrypt(ids.iter().map(|i| i as &dyn age::Identity))
                    .map_err(DecodeFailure::Key)?;
                Box::new(Tagged {
                    inner: plain,
                    origin: Origin::Decryption,
                    first_failure: &first_failure,
                })
            }
            DecryptKeys::Passphrase(passphrase) => {
                let decryptor = age::Decryptor::new(base).map_err(DecodeFailure::Header)?;
                let mut identity = age::scrypt::Identity::new(passphrase.clone());
                identity.set_max_work_factor(SCRYPT_MAX_LOG_N);
                let plain = decryptor
                    .decrypt(std::iter::once(&identity as &dyn age::Identity))
                    .map_err(DecodeFailure::Key)?;
                Box::new(Tagged {
                    inner: plain,
                    origin: Origin::Decryption,
                    first_failure: &first_failure,
                })
            }
        };
        if info.compression.is_some() {
            let decoder = zstd::stream::read::Decoder::new(reader).map_err(DecodeFailure::Read)?;
            reader = Box::new(Tagged {
                inner: decoder,
                origin: Origin::Decompression,
                first_failure: &first_failure,
            });
        }
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DecodeFailure::Read(e)),
            };
            sink.write_all(&buf[..n]).map_err(|_| DecodeFailure::Sink)?;
            produced += n as u64;
        }
    })();

    let read_error = |source| PipelineError::Read {
        path: path.clone(),
        source,
    };
    // Failures that say nothing about the artifact end the work here.
    let stage_failure: Option<(DamageStage, String)> = match outcome {
        Ok(()) => None,
        Err(DecodeFailure::Sink) => return Err(PipelineError::Abandoned { path: path.clone() }),
        Err(DecodeFailure::Read(e)) if first_failure.get() == Some(Origin::Storage) => {
            return Err(read_error(e));
        }
        Err(DecodeFailure::Header(e)) if first_failure.get() == Some(Origin::Storage) => {
            return Err(read_error(io::Error::other(e.to_string())));
        }
        Err(DecodeFailure::Header(e)) => Some((
            DamageStage::Decryption,
            format!("the age header is not valid: {e}"),
        )),
        Err(DecodeFailure::Key(e)) => {
            // Judge the checksum first: a damaged header also opens with no key.
            drain(&mut stored).map_err(read_error)?;
            if checksum_matches(&stored, info) {
                let problem = match keys {
                    DecryptKeys::Passphrase(_) => {
                        format!("the passphrase does not open it ({e}); check the passphrase")
                    }
                    _ => format!(
                        "none of the given identities opens it ({e}); pass the identity \
                         matching one of the recipients the backup was encrypted to"
                    ),
                };
                return Err(PipelineError::WrongKey {
                    path: path.clone(),
                    encryption: info.encryption.clone().unwrap_or_default(),
                    problem,
                });
            }
            Some((DamageStage::Decryption, e.to_string()))
        }
        Err(DecodeFailure::Read(e)) => {
            let stage = match first_failure.get() {
                Some(Origin::Decryption) => DamageStage::Decryption,
                Some(Origin::Decompression) => DamageStage::Decompression,
                // Not tagged: the outermost stage refused its own input.
                _ if info.compression.is_some() => DamageStage::Decompression,
                _ => DamageStage::Decryption,
            };
            Some((stage, e.to_string()))
        }
    };
    drain(&mut stored).map_err(read_error)?;

    let blake3 = stored.hasher.finalize().to_hex().to_string();
    if !checksum_matches(&stored, info) {
        return Err(checksum_damage(
            info,
            stored.count,
            &blake3,
            stage_failure.as_ref(),
        ));
    }
    if let Some((stage, detail)) = stage_failure {
        return Err(PipelineError::Damaged {
            path: path.clone(),
            stage,
            detail: format!(
                "{detail}; the stored bytes match the manifest's checksum, so they were \
                 written this way"
            ),
        });
    }
    if produced != info.size {
        return Err(PipelineError::Damaged {
            path: path.clone(),
            stage: DamageStage::Decompression,
            detail: format!(
                "it decodes to {produced} bytes, the manifest says {}",
                info.size
            ),
        });
    }
    Ok(VerifyReport {
        path: path.clone(),
        stored_size: stored.count,
        size: produced,
        blake3,
    })
}

fn drain(reader: &mut impl Read) -> io::Result<u64> {
    io::copy(reader, &mut io::sink())
}

fn checksum_damage(
    info: &ArtifactInfo,
    stored_size: u64,
    blake3: &str,
    also: Option<&(DamageStage, String)>,
) -> PipelineError {
    let mut detail = format!(
        "the stored bytes are {stored_size} bytes with BLAKE3 {blake3}, the manifest says {} \
         bytes with BLAKE3 {}; the stored copy was altered or truncated, restore from another \
         backup",
        info.stored_size, info.blake3
    );
    if let Some((stage, message)) = also {
        detail.push_str(&format!(" ({stage} also failed: {message})"));
    }
    PipelineError::Damaged {
        path: info.path.clone(),
        stage: DamageStage::Checksum,
        detail,
    }
}

fn checksum_matches<R>(stored: &HashingReader<R>, info: &ArtifactInfo) -> bool {
    stored.count == info.stored_size
        && stored.hasher.clone().finalize().to_hex().as_str() == info.blake3
}
