//! Storage tests: one suite, run against `file://` and against a real S3 server
//! (s3s-fs over HTTP on loopback), plus URL parsing and redaction.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::s3_test_server::S3TestServer;
use super::{Storage, StorageError, redact_url};

const MIB: usize = 1024 * 1024;
/// The smallest part S3 accepts: a 12 MiB artifact takes three parts.
const PART: usize = 5 * MIB;

/// Deterministic bytes that do not compress, so sizes mean what they say.
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn read_all(storage: &Storage, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    storage
        .get(path)
        .await
        .expect("get")
        .read_to_end(&mut out)
        .await
        .expect("read the object to its end");
    out
}

/// Yields `data` in odd-sized pieces, then fails instead of ending.
struct FailingReader {
    data: Vec<u8>,
    pos: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos == self.data.len() {
            return Poll::Ready(Err(std::io::Error::other("the database went away")));
        }
        let n = buf.remaining().min(self.data.len() - self.pos).min(100_003);
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// The behaviour both backends must share.
async fn storage_suite(storage: Storage) {
    // A streamed artifact larger than two parts round-trips byte for byte.
    let big = noise(12 * MIB + 12_345, 7);
    let stored = storage
        .put_stream("backups/b1/db.sqlite", &big[..])
        .await
        .expect("put_stream");
    assert_eq!(stored, big.len() as u64);
    assert!(
        read_all(&storage, "backups/b1/db.sqlite").await == big,
        "round trip changed bytes"
    );

    // A small one goes up in one PUT.
    storage
        .put_stream("backups/b1/small.bin", &b"tiny"[..])
        .await
        .unwrap();
    assert_eq!(read_all(&storage, "backups/b1/small.bin").await, b"tiny");

    // put_atomic replaces whole.
    storage
        .put_atomic("backups/b1/manifest.json", Bytes::from_static(b"{\"v\":1}"))
        .await
        .unwrap();
    storage
        .put_atomic("backups/b1/manifest.json", Bytes::from_static(b"{\"v\":2}"))
        .await
        .unwrap();
    assert_eq!(
        &storage.get_bytes("backups/b1/manifest.json").await.unwrap()[..],
        b"{\"v\":2}"
    );
    storage
        .put_atomic("backups/b2/manifest.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    storage
        .put_atomic("backupsX/other", Bytes::from_static(b"x"))
        .await
        .unwrap();

    // list is by path segment and reports sizes.
    let mut listed: Vec<(String, u64)> = storage
        .list("backups")
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.path, e.size))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("backups/b1/db.sqlite".to_owned(), big.len() as u64),
            ("backups/b1/manifest.json".to_owned(), 7),
            ("backups/b1/small.bin".to_owned(), 4),
            ("backups/b2/manifest.json".to_owned(), 2),
        ]
    );
    assert_eq!(storage.list("").await.unwrap().len(), 5);
    assert!(storage.list("nothing/here").await.unwrap().is_empty());

    let head = storage.head("backups/b1/db.sqlite").await.unwrap().unwrap();
    assert_eq!(head.size, big.len() as u64);
    assert!(storage.head("backups/b1/missing").await.unwrap().is_none());

    // delete, and a missing object reads as NotFound naming the path.
    storage.delete("backups/b1/small.bin").await.unwrap();
    storage
        .delete("backups/b1/small.bin")
        .await
        .expect("deleting twice is fine");
    let err = storage
        .get("backups/b1/small.bin")
        .await
        .err()
        .expect("gone");
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("backups/b1/small.bin"), "{err}");

    // delete_prefix removes one backup and nothing beside it.
    assert_eq!(storage.delete_prefix("backups/b1").await.unwrap(), 2);
    let left: Vec<String> = storage
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&"backups/b2/manifest.json".to_owned()));
    assert!(left.contains(&"backupsX/other".to_owned()));
    assert!(matches!(
        storage.delete_prefix("").await,
        Err(StorageError::InvalidPath { .. })
    ));

    // An input that fails after more than one part leaves no object behind: the
    // multipart upload is aborted, not completed.
    let err = storage
        .put_stream(
            "backups/b3/broken.bin",
            FailingReader {
                data: noise(7 * MIB, 3),
                pos: 0,
            },
        )
        .await
        .expect_err("the input failed");
    assert!(matches!(err, StorageError::Input { .. }), "{err}");
    assert!(err.to_string().contains("the database went away"), "{err}");
    assert!(
        storage
            .head("backups/b3/broken.bin")
            .await
            .unwrap()
            .is_none()
    );
    // Same for an input that fails inside the first part.
    let err = storage
        .put_stream(
            "backups/b3/broken-small.bin",
            FailingReader {
                data: noise(1000, 3),
                pos: 0,
            },
        )
        .await
        .expect_err("the input failed");
    assert!(matches!(err, StorageError::Input { .. }), "{err}");
    assert!(
        storage
            .head("backups/b3/broken-small.bin")
            .await
            .unwrap()
            .is_none()
    );

    // Paths that could escape are refused, naming the path.
    let err = storage
        .put_atomic("backups/../etc", Bytes::new())
        .await
        .expect_err("a .. segment");
    assert!(err.to_string().contains("backups/../etc"), "{err}");
}

#[tokio::test]
async fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not-yet-created");
    let url = format!("file://{}", root.display());
    let storage = Storage::open(&url).unwrap().with_part_size(PART);
    assert_eq!(storage.to_string(), url);
    storage_suite(storage).await;
    // The objects are plain files under the directory.
    assert!(root.join("backups/b2/manifest.json").is_file());
    // Deleting a backup's last file removed its directory.
    assert!(!root.join("backups/b1").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server() {
    let server = S3TestServer::start().await;
    let storage = Storage::open_with_options(&server.url("team/prod"), &server.options())
        .unwrap()
        .with_part_size(PART);
    storage_suite(storage.clone()).await;
    // The big artifact really went up as a multipart upload of three 5 MiB-or-less
    // parts: S3 marks such an object's ETag with "-<parts>".
    storage
        .put_stream("multipart", &noise(12 * MIB, 5)[..])
        .await
        .unwrap();
    let meta = object_store::ObjectStoreExt::head(
        storage.store.as_ref(),
        &object_store::path::Path::from("multipart"),
    )
    .await
    .unwrap();
    let e_tag = meta.e_tag.expect("an ETag");
    assert!(e_tag.trim_matches('"').ends_with("-3"), "ETag {e_tag}");
    // The prefix from the URL is where the objects went.
    assert!(
        server
            .bucket_dir()
            .join("team/prod/backups/b2/manifest.json")
            .is_file()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn s3_wrong_credentials_fail_with_the_url_and_path() {
    let server = S3TestServer::start().await;
    let mut options = server.options();
    options.insert("secret_access_key".into(), "not-the-secret".into());
    let storage = Storage::open_with_options(&server.url("p"), &options).unwrap();
    let err = storage
        .put_atomic("backups/x/manifest.json", Bytes::from_static(b"{}"))
        .await
        .expect_err("bad signature");
    let message = err.to_string();
    assert!(message.contains("s3://bucket/p"), "{message}");
    assert!(message.contains("backups/x/manifest.json"), "{message}");
    assert!(!message.contains("not-the-secret"), "{message}");
    server.shutdown().await;
}

#[test]
fn unsupported_scheme_names_it_and_the_supported_ones() {
    let err = Storage::open("gs://bucket/x").unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StorageError::UnsupportedScheme { .. }));
    assert!(message.contains("\"gs\""), "{message}");
    assert!(message.contains("file:///"), "{message}");
    assert!(message.contains("s3://"), "{message}");
}

#[test]
fn urls_with_credentials_are_refused_without_showing_them() {
    let err = Storage::open("s3://AKIAEXAMPLE:hunter2@bucket/prefix").unwrap_err();
    let message = err.to_string();
    assert!(!message.contains("hunter2"), "{message}");
    assert!(!message.contains("AKIAEXAMPLE"), "{message}");
    assert!(message.contains("***@bucket/prefix"), "{message}");
}

#[test]
fn redaction() {
    assert_eq!(
        redact_url("s3://key:secret@bucket/a/b"),
        "s3://***@bucket/a/b"
    );
    assert_eq!(redact_url("s3://bucket/a?token=abc"), "s3://bucket/a?***");
    assert_eq!(redact_url("file:///var/backups"), "file:///var/backups");
    // Even an unparseable URL loses its secrets.
    assert_eq!(redact_url("s3://u:p@[bad/x"), "s3://***@[bad/x");
}

#[test]
fn file_urls_must_be_absolute_and_take_no_options() {
    let err = Storage::open("file://relative/dir").unwrap_err();
    assert!(err.to_string().contains("file:///abs/dir"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let options = BTreeMap::from([("endpoint".to_owned(), "http://x".to_owned())]);
    let err = Storage::open_with_options(&format!("file://{}", dir.path().display()), &options)
        .unwrap_err();
    assert!(matches!(err, StorageError::OptionsForFile { .. }), "{err}");
}

#[test]
fn unknown_s3_options_are_named_and_values_never_shown() {
    let options = BTreeMap::from([("endpiont".to_owned(), "supersecret".to_owned())]);
    let err = Storage::open_with_options("s3://bucket/p", &options).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("endpiont"), "{message}");
    assert!(!message.contains("supersecret"), "{message}");
}

#[test]
fn debug_never_shows_credentials() {
    let options = BTreeMap::from([
        ("endpoint".to_owned(), "http://127.0.0.1:9".to_owned()),
        ("access_key_id".to_owned(), "AKIAEXAMPLE".to_owned()),
        ("secret_access_key".to_owned(), "hunter2".to_owned()),
    ]);
    let storage = Storage::open_with_options("s3://bucket/p", &options).unwrap();
    let shown = format!("{storage} {storage:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("AKIAEXAMPLE"), "{shown}");
}

/// Issue 18 defect 3: passwords with `/`, `?`, `@`, `#` and `%`-escapes, raw or
/// encoded, in URLs that parse or not, and `key=value` strings: no fragment of the
/// password is shown.
#[test]
fn redaction_hides_passwords_with_url_characters() {
    let words = ["Zebra", "Quokka", "Okapi"];
    for url in [
        "postgres://app:Zebra/Quokka@db:5432/ledger",
        "postgres://app:12/Zebra@db:5432/ledger",
        "postgres://app:Zebra?Quokka@db/ledger",
        "postgres://app:Zebra#Quokka@db/ledger",
        "postgres://app:Zebra@Quokka@db/ledger",
        "postgres://app:Zebra%2FQuokka%40Okapi@db/ledger",
        "postgres://app:Zebra/Quokka?Okapi@db/ledger?sslmode=require",
        "s3://key:Zebra/Quokka@bucket/prefix",
        "mysql://root:Zebra#Quokka@127.0.0.1:3306/auditor",
        "postgres://db/ledger?password=Zebra",
        "postgres://db/ledger#Zebra",
        "host=db user=app password='Zebra Quokka' dbname=ledger",
        "host=db password=Zebra",
        "host=db password='Zebra",
    ] {
        let shown = redact_url(url);
        for word in words {
            assert!(!shown.contains(word), "{url} shown as {shown}");
        }
    }
    // What is not secret stays readable.
    assert_eq!(
        redact_url("postgres://app:Zebra/Quokka@db:5432/ledger"),
        "postgres://***@db:5432/ledger"
    );
    assert_eq!(
        redact_url("host=db password='Zebra Quokka' dbname=ledger"),
        "host=db password=*** dbname=ledger"
    );
    assert_eq!(
        redact_url("/var/lib/app/ledger.db"),
        "/var/lib/app/ledger.db"
    );
    assert_eq!(
        redact_url("postgres://app@db:5432/ledger"),
        "postgres://***@db:5432/ledger"
    );
}

/// Issue 19.12: `s3://bucket/we ird/` stored objects under `we%20ird/`: the URL's
/// percent-encoded path was used as the prefix.
#[tokio::test]
async fn s3_prefixes_are_stored_as_written_not_percent_encoded() {
    let server = S3TestServer::start().await;
    let storage = Storage::open_with_options(&server.url("we ird/p"), &server.options()).unwrap();
    storage
        .put_atomic("backups/x", Bytes::from_static(b"1"))
        .await
        .unwrap();
    let stored: Vec<String> = std::fs::read_dir(server.bucket_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        server.bucket_dir().join("we ird/p/backups/x").is_file(),
        "stored under {stored:?}"
    );
    server.shutdown().await;
}

/// object_store's default limit on a whole S3 request is 30 s, body included, and it
/// retries a broken stream only within 3 minutes of the GET's start: every artifact
/// read that took longer than about 3.5 minutes (a restore, drill or verify of a
/// large database, at the pace of pg_restore) failed with "request or response body
/// error". Reads are now limited per read from the server, not per request; what the
/// runbook sets still wins.
#[test]
fn s3_reads_are_not_cut_off_by_a_whole_request_timeout() {
    use object_store::aws::AmazonS3ConfigKey;
    use object_store::{ClientConfigKey, ClientOptions};
    use std::time::Duration;

    let setting = |options: &[(&str, &str)], key: ClientConfigKey| {
        let options: BTreeMap<String, String> = options
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        super::s3_builder("s3://bucket", "bucket", &options)
            .unwrap()
            .get_config_value(&AmazonS3ConfigKey::Client(key))
    };
    // Values as they were set: the environment's or the runbook's text, else ours.
    let set = |text: &str| Some(text.to_owned());
    // The whole request: no practical limit, not object_store's 30 s.
    let default = ClientOptions::new().get_config_value(&ClientConfigKey::Timeout);
    assert_eq!(
        default,
        ClientOptions::new()
            .with_timeout(Duration::from_secs(30))
            .get_config_value(&ClientConfigKey::Timeout)
    );
    let whole = setting(&[], ClientConfigKey::Timeout);
    assert_ne!(
        whole, default,
        "a whole S3 request is still limited to 30 s"
    );
    assert_eq!(whole, set("365 days"));
    // Each read from the server: a stalled connection still fails.
    assert_eq!(setting(&[], ClientConfigKey::ReadTimeout), set("60s"));
    // The runbook's options win.
    assert_eq!(
        setting(&[("timeout", "90s")], ClientConfigKey::Timeout),
        set("90s")
    );
    assert_eq!(
        setting(&[("read_timeout", "5s")], ClientConfigKey::ReadTimeout),
        set("5s")
    );
}

/// A store whose PUTs go on after their caller drops them, as object_store's local
/// backend does (it writes in `spawn_blocking`) and as an S3 server does with a PUT
/// it has received; each waits for `gate` to open, says when it has started, and
/// counts in `landed` once it has stored its object.
#[derive(Debug)]
struct DetachedPuts {
    inner: std::sync::Arc<object_store::memory::InMemory>,
    gate: tokio::sync::watch::Sender<bool>,
    started: std::sync::Arc<tokio::sync::Notify>,
    landed: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
}

impl std::fmt::Display for DetachedPuts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DetachedPuts")
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for DetachedPuts {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let (inner, location) = (std::sync::Arc::clone(&self.inner), location.clone());
        let mut gate = self.gate.subscribe();
        let landed = std::sync::Arc::clone(&self.landed);
        self.started.notify_one();
        tokio::spawn(async move {
            let _ = gate.wait_for(|open| *open).await;
            let stored = inner.put_opts(&location, payload, opts).await;
            landed.send_modify(|count| *count += 1);
            stored
        })
        .await
        .expect("the put task")
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A backup stopped by SIGINT left a partial backup listed as incomplete in one CI
/// run: its copy was dropped while the local store's PUT of an artifact was under
/// way in `spawn_blocking`, the clean-up deleted the backup's directory, and the PUT
/// then renamed its file into place. A dropped write now still counts until it ends,
/// and `writes_finished` waits for it, so a delete after it is the last word.
#[tokio::test]
async fn a_dropped_write_is_waited_for_so_a_delete_after_it_is_final() {
    let (gate, _) = tokio::sync::watch::channel(false);
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let store = std::sync::Arc::new(DetachedPuts {
        inner: std::sync::Arc::new(object_store::memory::InMemory::new()),
        gate,
        started: std::sync::Arc::clone(&started),
        landed: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
    });
    // Waits (bounded) until `count` dropped writes have stored their objects.
    let landed = |count: usize| {
        let mut landed = store.landed.subscribe();
        async move {
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                landed.wait_for(|landed| *landed >= count),
            )
            .await
            .expect("the dropped write to land")
            .unwrap();
        }
    };
    let storage = Storage::from_object_store(store.clone(), "memory://detached");
    let listed = |storage: &Storage| {
        let storage = storage.clone();
        async move {
            let mut paths: Vec<String> = storage
                .list("backups")
                .await
                .unwrap()
                .into_iter()
                .map(|entry| entry.path)
                .collect();
            paths.sort();
            paths
        }
    };
    // Starts a PUT of `path` and drops it once the store has begun it, as a copy
    // dropped on a signal does.
    let drop_mid_write = |path: &'static str| {
        let (storage, started) = (storage.clone(), std::sync::Arc::clone(&started));
        async move {
            let put = storage.put_stream(path, &b"part of a backup"[..]);
            tokio::pin!(put);
            tokio::select! {
                stored = &mut put => panic!("the PUT ended with its gate shut: {stored:?}"),
                () = started.notified() => {}
            }
        }
    };

    // The negative control: delete at once, as the clean-up did, and the dropped
    // write puts its object back afterwards.
    drop_mid_write("backups/raced/db.zst").await;
    assert_eq!(storage.writes_under_way(), 1);
    storage.delete_prefix("backups/raced").await.unwrap();
    assert_eq!(listed(&storage).await, Vec::<String>::new());
    store.gate.send_replace(true);
    landed(1).await;
    assert_eq!(
        listed(&storage).await,
        ["backups/raced/db.zst"],
        "the control: a write dropped mid-way lands after a delete that did not wait"
    );
    storage.delete_prefix("backups/raced").await.unwrap();

    // Waiting first: `writes_finished` does not return while the dropped write is
    // still under way (its gate is shut, so no amount of polling can end it), and
    // the delete after it leaves nothing behind.
    store.gate.send_replace(false);
    drop_mid_write("backups/waited/db.zst").await;
    assert_eq!(storage.writes_under_way(), 1);
    let finished = storage.writes_finished();
    tokio::pin!(finished);
    for _ in 0..100 {
        assert!(
            futures::poll!(&mut finished).is_pending(),
            "writes_finished returned while a write was under way"
        );
        tokio::task::yield_now().await;
    }
    store.gate.send_replace(true);
    tokio::time::timeout(std::time::Duration::from_secs(30), finished)
        .await
        .expect("the write ended once its gate opened");
    assert_eq!(storage.writes_under_way(), 0);
    assert_eq!(listed(&storage).await, ["backups/waited/db.zst"]);
    storage.delete_prefix("backups/waited").await.unwrap();
    landed(2).await;
    assert_eq!(listed(&storage).await, Vec::<String>::new());
}
