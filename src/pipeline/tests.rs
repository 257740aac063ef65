//! Pipeline tests: every stage combination round-trips, damage is caught and named,
//! memory stays bounded, and the standard `age` and `zstd` CLIs read our artifacts
//! (and we read theirs).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::*;
use crate::storage::Storage;

const MIB: usize = 1024 * 1024;

fn noise(len: usize, seed: u64) -> Vec<u8> {
    crate::storage::tests::noise(len, seed)
}

/// Half noise, half text: compresses, but not to nothing.
fn mixed(len: usize) -> Vec<u8> {
    let mut out = noise(len / 2, 11);
    let text = b"INSERT INTO ledger VALUES (42, 'transfer', 1000);\n";
    while out.len() < len {
        out.extend_from_slice(text);
    }
    out.truncate(len);
    out
}

fn stream(data: Vec<u8>) -> ByteStream {
    Box::pin(std::io::Cursor::new(data))
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    storage: Storage,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let storage = Storage::open(&format!("file://{}", root.display())).unwrap();
    Fixture {
        _dir: dir,
        root,
        storage,
    }
}

fn keypair() -> (String, String) {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    use age::secrecy::ExposeSecret;
    (identity.to_string().expose_secret().to_owned(), recipient)
}

async fn read_back(storage: &Storage, info: &ArtifactInfo, decryption: &Decryption) -> Vec<u8> {
    let mut out = Vec::new();
    open(storage, info, decryption)
        .await
        .expect("open")
        .read_to_end(&mut out)
        .await
        .expect("read the artifact to its end");
    out
}

/// Stores `input`, checks everything the manifest will record, reads it back through
/// `open` and `verify`.
async fn round_trip(settings: &PipelineSettings, decryption: &Decryption, input: Vec<u8>) {
    let f = fixture();
    let path = format!("backups/b/db.sqlite{}", settings.suffix());
    let info = store(stream(input.clone()), settings, &f.storage, &path, |_| {})
        .await
        .unwrap_or_else(|e| panic!("store with {settings:?}: {e}"));

    let on_disk = std::fs::read(f.root.join(&path)).unwrap();
    assert_eq!(info.path, path);
    assert_eq!(info.size, input.len() as u64);
    assert_eq!(info.stored_size, on_disk.len() as u64);
    assert_eq!(info.blake3, blake3::hash(&on_disk).to_hex().to_string());
    assert_eq!(info.compression, settings.compression_label());
    assert_eq!(info.encryption.as_deref(), settings.encryption_label());
    match (settings.zstd_level, &settings.encryption) {
        (None, Encryption::None) => assert!(on_disk == input, "stored as is"),
        (Some(_), Encryption::None) => {
            assert_eq!(&on_disk[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
        }
        (_, _) => {
            assert!(
                on_disk.starts_with(b"age-encryption.org/v1\n"),
                "an age file"
            );
            assert!(
                input.len() < 64
                    || !on_disk
                        .windows(32)
                        .any(|w| input.len() >= 32 && w == &input[input.len() / 2..][..32]),
                "plaintext visible in an encrypted artifact"
            );
        }
    }
    if settings.zstd_level.is_some() && input.len() > MIB {
        assert!(
            info.stored_size < info.size,
            "compressible input did not shrink"
        );
    }

    assert!(
        read_back(&f.storage, &info, decryption).await == input,
        "round trip changed bytes"
    );
    let report = verify(&f.storage, &info, decryption).await.unwrap();
    assert_eq!(report.size, input.len() as u64);
    assert_eq!(
        verify_checksum(&f.storage, &info).await.unwrap(),
        info.stored_size
    );
    assert_eq!(report.stored_size, info.stored_size);
    assert_eq!(report.blake3, info.blake3);
}

fn recipients_settings(zstd_level: Option<i32>) -> (PipelineSettings, Decryption) {
    let (identity, recipient) = keypair();
    (
        PipelineSettings {
            zstd_level,
            encryption: Encryption::Recipients(vec![recipient]),
        },
        Decryption::Identities(vec![identity]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_is_optional() {
    let (age_only, age_key) = recipients_settings(None);
    let (both, both_key) = recipients_settings(Some(3));
    let cases = [
        (PipelineSettings::default(), Decryption::None),
        (
            PipelineSettings {
                zstd_level: Some(3),
                encryption: Encryption::None,
            },
            Decryption::None,
        ),
        (age_only, age_key),
        (both, both_key),
    ];
    for (settings, decryption) in &cases {
        for input in [Vec::new(), b"x".to_vec(), mixed(6 * MIB + 17)] {
            round_trip(settings, decryption, input).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_round_trip() {
    let settings = PipelineSettings {
        zstd_level: Some(1),
        encryption: Encryption::Passphrase("correct horse battery staple".into()),
    };
    let decryption = Decryption::Passphrase("correct horse battery staple".into());
    round_trip(&settings, &decryption, mixed(2 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_counts_raw_bytes() {
    let f = fixture();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let input = mixed(3 * MIB);
    store(
        stream(input.clone()),
        &PipelineSettings {
            zstd_level: Some(3),
            encryption: Encryption::None,
        },
        &f.storage,
        "a.zst",
        move |n| sink.lock().unwrap().push(n),
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() > 1,
        "progress reported only {} times",
        seen.len()
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "progress must grow");
    assert_eq!(*seen.last().unwrap(), input.len() as u64);
}

/// Generates `remaining` bytes of noise on demand and counts what it handed out.
struct CountingNoise {
    remaining: usize,
    state: u64,
    produced: Arc<AtomicU64>,
}

impl AsyncRead for CountingNoise {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = buf.remaining().min(self.remaining).min(64 * 1024);
        let mut block = vec![0u8; n.next_multiple_of(8)];
        for word in block.chunks_exact_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            word.copy_from_slice(&self.state.to_le_bytes());
        }
        buf.put_slice(&block[..n]);
        self.remaining -= n;
        self.produced.fetch_add(n as u64, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }
}

/// A 128 MiB copy never sits in memory: at every read of the stored stream, the
/// input has been read at most `BOUND` further. An implementation that buffered the
/// whole copy before emitting would fail on the first read; one with an unbounded
/// queue fails after the stall at a quarter, when the reader stops and the worker is
/// free to run ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded() {
    const TOTAL: usize = 128 * MIB;
    // zstd's jobs (four 4 MiB jobs of input, the output of finished ones) + channel
    // (512 KiB) + one age chunk + read buffers, with room; well under the 96 MiB an
    // unbounded queue reaches.
    const BOUND: u64 = 32 * MIB as u64;
    let (with_both, _) = recipients_settings(Some(1));
    for settings in [PipelineSettings::default(), with_both] {
        let produced = Arc::new(AtomicU64::new(0));
        let input = Box::pin(CountingNoise {
            remaining: TOTAL,
            state: 0x9e37_79b9_7f4a_7c15,
            produced: Arc::clone(&produced),
        });
        let (mut reader, worker) = encode_stream(input, &settings, |_| {}).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut consumed = 0u64;
        let mut max_lead = 0u64;
        let mut stalled = false;
        let started = std::time::Instant::now();
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            consumed += n as u64;
            if consumed >= (TOTAL / 4) as u64 && !stalled {
                stalled = true;
                // Not waiting for a state: a bounded pipeline passes however long
                // this is. It only gives an unbounded one the time to show itself.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            // Stored bytes of noise are a little more than raw bytes (frame and
            // chunk overhead), so this slightly understates the lead.
            let lead = produced.load(Ordering::SeqCst).saturating_sub(consumed);
            max_lead = max_lead.max(lead);
            assert!(
                lead <= BOUND,
                "{settings:?}: the input is {lead} bytes ahead of storage after {consumed} bytes"
            );
        }
        let Ok(summary) = worker.await.unwrap() else {
            panic!("the worker failed")
        };
        assert_eq!(summary.size, TOTAL as u64);
        assert!(consumed >= TOTAL as u64, "stored less than the input");
        println!(
            "{settings:?}: largest lead {max_lead} bytes, {:?}",
            started.elapsed()
        );
    }
}

/// Stores `input` with `settings`, then lets `damage` change the stored file.
async fn damaged(
    settings: &PipelineSettings,
    damage: impl FnOnce(&mut Vec<u8>),
) -> (Fixture, ArtifactInfo) {
    let f = fixture();
    let path = format!("backups/b/ledger.sql{}", settings.suffix());
    let info = store(stream(mixed(3 * MIB)), settings, &f.storage, &path, |_| {})
        .await
        .unwrap();
    let file = f.root.join(&path);
    let mut bytes = std::fs::read(&file).unwrap();
    damage(&mut bytes);
    std::fs::write(&file, bytes).unwrap();
    (f, info)
}

fn assert_damaged(err: &PipelineError, path: &str, stage: DamageStage) {
    let message = err.to_string();
    assert_eq!(err.damage(), Some(stage), "{message}");
    assert!(message.contains(path), "{message}");
    assert!(message.contains(&stage.to_string()), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_and_truncation_fail_the_checksum() {
    let (age_only, age_key) = recipients_settings(None);
    let (both, both_key) = recipients_settings(Some(3));
    let zstd_only = PipelineSettings {
        zstd_level: Some(3),
        encryption: Encryption::None,
    };
    let cases = [
        (PipelineSettings::default(), Decryption::None),
        (zstd_only, Decryption::None),
        (age_only, age_key),
        (both, both_key),
    ];
    for (settings, decryption) in &cases {
        // One flipped bit in the middle.
        let (f, info) = damaged(settings, |b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x01;
        })
        .await;
        let err = verify(&f.storage, &info, decryption).await.unwrap_err();
        assert_damaged(&err, &info.path, DamageStage::Checksum);
        let err = verify_checksum(&f.storage, &info).await.unwrap_err();
        assert_damaged(&err, &info.path, DamageStage::Checksum);
        // The stream fails too, naming the artifact, instead of ending cleanly.
        let mut out = Vec::new();
        let read = open(&f.storage, &info, decryption)
            .await
            .unwrap()
            .read_to_end(&mut out)
            .await;
        let io_err = read.expect_err("a damaged artifact must fail the stream");
        assert!(io_err.to_string().contains(&info.path), "{io_err}");
        let inner = io_err
            .get_ref()
            .and_then(|e| e.downcast_ref::<PipelineError>())
            .expect("the stream's error wraps a PipelineError");
        assert!(inner.damage().is_some(), "{inner}");

        // Cut short.
        let (f, info) = damaged(settings, |b| b.truncate(b.len() - 1000)).await;
        let err = verify(&f.storage, &info, decryption).await.unwrap_err();
        assert_damaged(&err, &info.path, DamageStage::Checksum);
        assert!(err.to_string().contains("bytes"), "{err}");
        let err = verify_checksum(&f.storage, &info).await.unwrap_err();
        assert_damaged(&err, &info.path, DamageStage::Checksum);
        let mut out = Vec::new();
        let read = open(&f.storage, &info, decryption)
            .await
            .unwrap()
            .read_to_end(&mut out)
            .await;
        assert!(
            read.is_err(),
            "{settings:?}: a truncated artifact must fail the stream"
        );
    }
}

/// When the manifest's checksum matches damaged bytes (they were written damaged),
/// the stage that refuses them is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_behind_a_matching_checksum_names_the_stage() {
    let rehash = |f: &Fixture, info: &ArtifactInfo| {
        let bytes = std::fs::read(f.root.join(&info.path)).unwrap();
        ArtifactInfo {
            blake3: blake3::hash(&bytes).to_hex().to_string(),
            stored_size: bytes.len() as u64,
            ..info.clone()
        }
    };
    let (age_only, age_key) = recipients_settings(None);
    let (f, info) = damaged(&age_only, |b| {
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
    })
    .await;
    let err = verify(&f.storage, &rehash(&f, &info), &age_key)
        .await
        .unwrap_err();
    assert_damaged(&err, &info.path, DamageStage::Decryption);

    let zstd_only = PipelineSettings {
        zstd_level: Some(3),
        encryption: Encryption::None,
    };
    let (f, info) = damaged(&zstd_only, |b| {
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
    })
    .await;
    let err = verify(&f.storage, &rehash(&f, &info), &Decryption::None)
        .await
        .unwrap_err();
    assert_damaged(&err, &info.path, DamageStage::Decompression);

    // A manifest that claims the wrong raw size.
    let f = fixture();
    let info = store(
        stream(b"twelve bytes".to_vec()),
        &PipelineSettings::default(),
        &f.storage,
        "x",
        |_| {},
    )
    .await
    .unwrap();
    let lying = ArtifactInfo {
        size: 13,
        ..info.clone()
    };
    let err = verify(&f.storage, &lying, &Decryption::None)
        .await
        .unwrap_err();
    assert_damaged(&err, "x", DamageStage::Decompression);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_and_never_shown() {
    let f = fixture();
    let (settings, right) = recipients_settings(Some(3));
    let info = store(
        stream(mixed(MIB)),
        &settings,
        &f.storage,
        "a.zst.age",
        |_| {},
    )
    .await
    .unwrap();

    let (other_identity, _) = keypair();
    let err = verify(
        &f.storage,
        &info,
        &Decryption::Identities(vec![other_identity.clone()]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PipelineError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("a.zst.age"), "{err}");
    assert!(!err.to_string().contains(&other_identity), "{err}");

    let err = verify(&f.storage, &info, &Decryption::None)
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::MissingKey { .. }), "{err}");
    let err = verify(&f.storage, &info, &Decryption::Passphrase("p".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PipelineError::KeyKindMismatch { .. }),
        "{err}"
    );

    let bad = "AGE-SECRET-KEY-1NOTAKEYATALL".to_owned();
    let err = verify(
        &f.storage,
        &info,
        &Decryption::Identities(vec![bad.clone()]),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, PipelineError::BadIdentity { index: 1 }),
        "{err}"
    );
    assert!(!err.to_string().contains(&bad), "{err}");
    assert!(
        !format!("{right:?}").contains("AGE-SECRET-KEY"),
        "Debug shows a key"
    );
    assert!(
        !format!("{:?}", Encryption::Passphrase("hunter2".into())).contains("hunter2"),
        "Debug shows a passphrase"
    );

    let err = PipelineSettings {
        zstd_level: None,
        encryption: Encryption::Recipients(vec!["age1nope".into()]),
    }
    .check()
    .unwrap_err();
    assert!(
        matches!(err, PipelineError::BadRecipient { index: 1, .. }),
        "{err}"
    );
    let err = PipelineSettings {
        zstd_level: Some(99),
        encryption: Encryption::None,
    }
    .check()
    .unwrap_err();
    assert!(matches!(err, PipelineError::BadZstdLevel { .. }), "{err}");
    assert!(
        PipelineSettings {
            zstd_level: None,
            encryption: Encryption::Recipients(vec![]),
        }
        .check()
        .is_err()
    );

    // A passphrase artifact with the wrong passphrase.
    let settings = PipelineSettings {
        zstd_level: None,
        encryption: Encryption::Passphrase("right".into()),
    };
    let info = store(
        stream(b"secret rows".to_vec()),
        &settings,
        &f.storage,
        "p.age",
        |_| {},
    )
    .await
    .unwrap();
    let err = verify(&f.storage, &info, &Decryption::Passphrase("wrong".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::WrongKey { .. }), "{err}");
}

/// Yields some bytes, then fails like a database connection that dropped.
struct FailingInput {
    left: usize,
}

impl AsyncRead for FailingInput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::Error::other(
                "connection reset by the database",
            )));
        }
        let n = buf.remaining().min(self.left);
        buf.put_slice(&vec![b'r'; n]);
        self.left -= n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copy_stores_nothing() {
    let f = fixture();
    let (settings, _) = recipients_settings(Some(3));
    for size in [10, 3 * MIB] {
        let storage = f.storage.clone().with_part_size(MIB);
        let err = store(
            Box::pin(FailingInput { left: size }),
            &settings,
            &storage,
            "broken.zst.age",
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PipelineError::Input { .. }), "{err}");
        assert!(err.to_string().contains("broken.zst.age"), "{err}");
        assert!(err.to_string().contains("connection reset"), "{err}");
        assert!(f.storage.head("broken.zst.age").await.unwrap().is_none());
    }
}

/// The interop tests drive the real CLIs; scripts/test installs them. A missing tool
/// fails the test: skipping would let the interop promise go unchecked.
fn require_tool(name: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed; scripts/test installs it (apt-get install {package})"
    );
}

fn run(script: &str, args: &[&Path]) -> std::process::Output {
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; {script}"))
        .arg("bash")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_age_and_zstd_clis_read_our_artifacts() {
    require_tool("age", "age");
    require_tool("age-keygen", "age");
    require_tool("zstd", "zstd");
    let f = fixture();
    let key = f.root.parent().unwrap().join("key.txt");
    run("age-keygen -o \"$1\" 2>/dev/null", &[&key]);
    let public = std::fs::read_to_string(&key)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_owned))
        .expect("age-keygen writes the public key");
    let settings = PipelineSettings {
        zstd_level: Some(3),
        encryption: Encryption::Recipients(vec![public]),
    };
    let input = mixed(5 * MIB + 3);
    let info = store(
        stream(input.clone()),
        &settings,
        &f.storage,
        "db.sql.zst.age",
        |_| {},
    )
    .await
    .unwrap();

    let artifact = f.root.join(&info.path);
    let out = run(
        "age -d -i \"$1\" \"$2\" | zstd -d -q -c",
        &[&key, &artifact],
    );
    assert!(out.stdout == input, "age | zstd decoded different bytes");
    // The identity file as age-keygen wrote it works for us too.
    let ours = Decryption::from_identity_file(&key).unwrap();
    assert!(read_back(&f.storage, &info, &ours).await == input);
}

/// The age CLI reads passphrases only from a terminal; `script` gives it one and
/// feeds it our stdin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_age_cli_reads_our_passphrase_artifacts() {
    require_tool("age", "age");
    require_tool("zstd", "zstd");
    require_tool("script", "bsdutils");
    let f = fixture();
    let settings = PipelineSettings {
        zstd_level: Some(3),
        encryption: Encryption::Passphrase("correct horse battery staple".into()),
    };
    let input = mixed(MIB + 5);
    let info = store(
        stream(input.clone()),
        &settings,
        &f.storage,
        "db.sql.zst.age",
        |_| {},
    )
    .await
    .unwrap();
    let artifact = f.root.join(&info.path);
    let plain = f.root.join("plain.zst");
    run(
        "printf '%s\\n' 'correct horse battery staple' \
         | script -qec \"age -d -o '$2' '$1'\" /dev/null >/dev/null",
        &[&artifact, &plain],
    );
    let out = run("zstd -d -q -c \"$1\"", &[&plain]);
    assert!(
        out.stdout == input,
        "age (passphrase) | zstd decoded different bytes"
    );
}

/// The reverse: what the CLIs write, we read (a restore host may have made it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_what_the_clis_write() {
    require_tool("age", "age");
    require_tool("zstd", "zstd");
    let f = fixture();
    let (identity, recipient) = keypair();
    let input = mixed(2 * MIB);
    let plain = f.root.join("plain.sql");
    std::fs::write(&plain, &input).unwrap();
    let artifact = f.root.join("cli.sql.zst.age");
    run(
        &format!("zstd -q -c \"$1\" | age -r {recipient} -o \"$2\""),
        &[&plain, &artifact],
    );
    let bytes = std::fs::read(&artifact).unwrap();
    let info = ArtifactInfo {
        path: "cli.sql.zst.age".into(),
        size: input.len() as u64,
        stored_size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
        compression: Some("zstd-3".into()),
        encryption: Some(AGE_X25519.into()),
    };
    let decryption = Decryption::Identities(vec![identity]);
    assert!(read_back(&f.storage, &info, &decryption).await == input);
    verify(&f.storage, &info, &decryption).await.unwrap();
}

/// The same pipeline through a real S3 server: a multipart upload of an encrypted,
/// compressed artifact, read back and verified over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_s3() {
    let server = crate::storage::s3_test_server::S3TestServer::start().await;
    let storage = Storage::open_with_options(&server.url("prod"), &server.options())
        .unwrap()
        .with_part_size(5 * MIB);
    let (settings, decryption) = recipients_settings(Some(1));
    // Noise does not compress, so the stored artifact spans three parts.
    let input = noise(12 * MIB, 99);
    let info = store(
        stream(input.clone()),
        &settings,
        &storage,
        "backups/b/ledger.sqlite.zst.age",
        |_| {},
    )
    .await
    .unwrap();
    assert!(info.stored_size > 10 * MIB as u64);
    assert!(read_back(&storage, &info, &decryption).await == input);
    let report = verify(&storage, &info, &decryption).await.unwrap();
    assert_eq!(report.size, input.len() as u64);

    // Damage in the server's copy is caught over HTTP too.
    let file = server.bucket_dir().join("prod").join(&info.path);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[7 * MIB] ^= 0x80;
    std::fs::write(&file, bytes).unwrap();
    let err = verify(&storage, &info, &decryption).await.unwrap_err();
    assert_damaged(&err, &info.path, DamageStage::Checksum);
    server.shutdown().await;
}
