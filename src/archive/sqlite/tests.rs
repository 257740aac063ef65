//! The SQLite archiver against real SQLite files written by other connections (as the
//! application's would be) and `file://` storage: every cut restores to exactly what
//! the database held at it, across the log's restarts; what the archiver cannot prove
//! continuous starts a new generation; a damaged chunk is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::pipeline::{Encryption, PipelineSettings};
use crate::storage::Storage;

struct Fixture {
    dir: tempfile::TempDir,
    path: PathBuf,
    archive: Archive,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&format!("file://{}", dir.path().join("store").display())).unwrap();
    let settings = PipelineSettings {
        zstd_level: Some(1),
        encryption: Encryption::None,
    };
    let archive = Archive::new(storage, settings, "app").unwrap();
    let path = dir.path().join("app.db");
    let conn = app_connection(&path);
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .unwrap();
    Fixture { dir, path, archive }
}

/// A connection as the application has one: WAL mode, SQLite's own checkpoints.
fn app_connection(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

fn config(fixture: &Fixture) -> SqliteArchiverConfig {
    let mut config = SqliteArchiverConfig::new(
        "app",
        &fixture.path,
        &fixture.dir.path().join("spool"),
        Duration::from_millis(50),
    );
    // Small cycles: the log restarts many times in a test.
    config.checkpoint_frames = 40;
    config
}

struct Running {
    archiver: Arc<SqliteArchiver>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ArchiveError>>,
}

fn start(config: SqliteArchiverConfig, archive: &Archive) -> Running {
    let archiver = Arc::new(SqliteArchiver::new(config, archive.clone()));
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let archiver = archiver.clone();
        let cancel = cancel.clone();
        async move { archiver.run(&cancel).await }
    });
    Running {
        archiver,
        cancel,
        task,
    }
}

impl Running {
    async fn stop(self) -> SqliteArchiverStatus {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
        self.archiver.status().borrow().clone()
    }
}

/// Writes until told to stop: inserts, updates and deletes, each its own transaction,
/// through three connections in turn (as several application processes would: each
/// connection writes its own count of restarts into the log's header).
fn load(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let connections: Vec<Connection> = (0..3).map(|_| app_connection(&path)).collect();
        let mut done = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let conn = &connections[done as usize % connections.len()];
            let v = format!("{done:0>200}");
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&v]).unwrap();
            if done.is_multiple_of(5) {
                conn.execute("UPDATE t SET v = v || 'u' WHERE id % 7 = ?1", [done % 7])
                    .unwrap();
            }
            if done.is_multiple_of(11) {
                conn.execute("DELETE FROM t WHERE id % 13 = ?1", [done % 13])
                    .unwrap();
            }
            done += 1;
        }
        done
    })
}

/// Everything the table holds, as one hash.
fn content(conn: &Connection) -> String {
    let mut statement = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    let mut hasher = blake3::Hasher::new();
    let mut rows = statement.query([]).unwrap();
    let mut count = 0;
    while let Some(row) = rows.next().unwrap() {
        let id: i64 = row.get(0).unwrap();
        let v: String = row.get(1).unwrap();
        hasher.update(&id.to_le_bytes());
        hasher.update(v.as_bytes());
        count += 1;
    }
    format!("{count} rows, {}", hasher.finalize().to_hex())
}

/// A cut as a point takes one: with writers held off (here by the write lock, in a
/// point by the pause), the marker and what the database holds.
fn cut(path: &Path) -> (BTreeMap<String, String>, String) {
    let conn = app_connection(path);
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let marker = mark(path).unwrap();
    let held = content(&conn);
    conn.execute_batch("ROLLBACK").unwrap();
    (marker, held)
}

/// Where the marker lies, once the archive holds it.
async fn position(archive: &Archive, marker: &BTreeMap<String, String>) -> Position {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let catalog = archive.catalog().await.unwrap();
        let (bases, _) = base::list(archive.storage(), "app").await.unwrap();
        if let Some(position) = position_of(marker, &catalog, &bases) {
            return position;
        }
        assert!(
            Instant::now() < deadline,
            "the archive never reached {marker:?}; it ends with {:#?}; bases {:#?}",
            catalog
                .chunks
                .iter()
                .rev()
                .take(2)
                .map(|c| (&c.start, &c.details))
                .collect::<Vec<_>>(),
            bases
                .iter()
                .map(|b| (&b.start, &b.details))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The database at `target`, restored from the newest snapshot before it, and what
/// it holds.
async fn restored(fixture: &Fixture, target: &Position, name: &str) -> Result<String, String> {
    let archive = &fixture.archive;
    let catalog = archive.catalog().await.unwrap();
    let (bases, _) = base::list(archive.storage(), "app").await.unwrap();
    let snapshot = bases
        .iter()
        .filter(|b| b.start.sqlite_generation() == target.sqlite_generation() && &b.start <= target)
        .max_by(|a, b| a.start.cmp(&b.start))
        .expect("a snapshot before the target");
    let chunks: Vec<ChunkRecord> = catalog
        .chunks
        .iter()
        .filter(|c| c.start.as_ref() >= Some(&snapshot.start) && c.start.as_ref() < Some(target))
        .cloned()
        .collect();
    let into = fixture.dir.path().join(name);
    restore(archive, snapshot, &chunks, target, &Decryption::None, &into).await?;
    Ok(content(&Connection::open(&into).unwrap()))
}

fn generations(bases: &[BaseRecord]) -> Vec<u64> {
    bases
        .iter()
        .filter_map(|b| b.start.sqlite_generation())
        .collect()
}

/// Under load, across many restarts of the log (cycles of 40 frames sealed by the
/// archiver's checkpoints, and SQLite's own checkpoints beside them), every cut
/// restores to exactly what the database held at it, all in one generation. A chunk
/// damaged in the storage is refused, not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cut_under_load_restores_exactly_across_restarts_of_the_log() {
    let fixture = fixture();
    let running = start(config(&fixture), &fixture.archive);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = load(fixture.path.clone(), stop.clone());
    // Cuts from the first snapshot on: nothing before it is archived.
    let mut status = running.archiver.status();
    status.wait_for(|s| s.snapshots == 1).await.unwrap();
    let mut cuts = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        cuts.push(cut(&fixture.path));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let mut targets = Vec::new();
    for (marker, _) in &cuts {
        targets.push(position(&fixture.archive, marker).await);
    }
    let status = running.stop().await;
    assert!(writes > 100, "the load wrote only {writes} transactions");

    let catalog = fixture.archive.catalog().await.unwrap();
    let cycles: std::collections::BTreeSet<&String> = catalog
        .chunks
        .iter()
        .filter_map(|c| c.details.get("salt1"))
        .collect();
    assert!(
        cycles.len() >= 3,
        "the log restarted only {} times",
        cycles.len()
    );
    assert!(catalog.gaps().is_empty(), "{:?}", catalog.gaps());
    let (bases, _) = base::list(fixture.archive.storage(), "app").await.unwrap();
    assert_eq!(
        generations(&bases),
        vec![1],
        "a new generation was started: {bases:#?}"
    );
    assert_eq!(status.snapshots, 1);

    for (i, ((_, held), target)) in cuts.iter().zip(&targets).enumerate() {
        let got = restored(&fixture, target, &format!("cut{i}.db"))
            .await
            .unwrap();
        assert_eq!(&got, held, "cut {i} at {target}");
    }
    // The cuts differ from each other, so the comparison above can fail.
    assert_ne!(cuts[0].1, cuts[7].1);

    // Negative control: one byte of a chunk's page changed in the storage (and its
    // record's hash made to agree) is refused by the frame chain.
    let chunk = catalog.chunks[1].clone();
    let mut bytes = fixture
        .archive
        .read(&chunk, &Decryption::None)
        .await
        .unwrap();
    bytes[FRAME_OFFSET_IN_PAGE] ^= 0x55;
    let damaged = NewChunk {
        name: format!("{}-damaged", chunk.name),
        kind: chunk.kind,
        timeline: None,
        start: chunk.start.clone(),
        end: chunk.end.clone(),
        segment_size: chunk.segment_size,
        details: chunk.details.clone(),
    };
    let stored = fixture
        .archive
        .push(damaged, ChunkContent::Bytes(bytes.into()))
        .await
        .unwrap();
    let mut chunks: Vec<ChunkRecord> = catalog.chunks.clone();
    chunks[1] = stored.record().clone();
    let (bases, _) = base::list(fixture.archive.storage(), "app").await.unwrap();
    let last = targets.last().unwrap();
    let error = restore(
        &fixture.archive,
        &bases[0],
        &chunks,
        last,
        &Decryption::None,
        &fixture.dir.path().join("damaged.db"),
    )
    .await
    .unwrap_err();
    assert!(
        error.contains(&stored.record().name) && error.contains("damaged"),
        "{error}"
    );

    // Negative control: a whole chunk of a chain that does not go on from the one
    // before it (here: its record says it starts one frame later) is refused.
    let mut details = chunk.details.clone();
    let first: u32 = details["first_frame"].parse().unwrap();
    details.insert("first_frame".to_owned(), (first + 1).to_string());
    let stray = NewChunk {
        name: format!("{}-stray", chunk.name),
        kind: chunk.kind,
        timeline: None,
        start: chunk.start.clone(),
        end: chunk.end.clone(),
        segment_size: chunk.segment_size,
        details,
    };
    let bytes = fixture
        .archive
        .read(&chunk, &Decryption::None)
        .await
        .unwrap();
    let stored = fixture
        .archive
        .push(stray, ChunkContent::Bytes(bytes.into()))
        .await
        .unwrap();
    chunks[1] = stored.record().clone();
    let error = restore(
        &fixture.archive,
        &bases[0],
        &chunks,
        last,
        &Decryption::None,
        &fixture.dir.path().join("stray.db"),
    )
    .await
    .unwrap_err();
    assert!(error.contains("another chain"), "{error}");
}

/// A byte inside the first frame's page (past its 24-byte header).
const FRAME_OFFSET_IN_PAGE: usize = 24 + 100;

/// The archiver stopped, the application forces a TRUNCATE checkpoint and writes on:
/// the archiver, started again, cannot prove the log continues and starts generation 2
/// with a new snapshot; cuts before and after both restore. Control: stopped and
/// started again with the log in the same cycle, it resumes generation 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_restarted_while_the_archiver_was_away_starts_a_new_generation() {
    let fixture = fixture();
    let app = app_connection(&fixture.path);
    let write = |n: u32| {
        for i in 0..n {
            app.execute("INSERT INTO t (v) VALUES (?1)", [format!("w{i}")])
                .unwrap();
        }
    };
    let running = start(config(&fixture), &fixture.archive);
    write(10);
    let before = cut(&fixture.path);
    position(&fixture.archive, &before.0).await;
    running.stop().await;

    // Control: the log went on in the same cycle while the archiver was away.
    write(5);
    let running = start(config(&fixture), &fixture.archive);
    let same = cut(&fixture.path);
    let same_at = position(&fixture.archive, &same.0).await;
    running.stop().await;
    let (bases, _) = base::list(fixture.archive.storage(), "app").await.unwrap();
    assert_eq!(generations(&bases), vec![1], "resumed, no new snapshot");
    assert_eq!(same_at.sqlite_generation(), Some(1));

    write(5);
    let busy: (i64, i64, i64) = app
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy.0, 0, "the TRUNCATE checkpoint ran: {busy:?}");
    write(7);
    let running = start(config(&fixture), &fixture.archive);
    let after = cut(&fixture.path);
    let after_at = position(&fixture.archive, &after.0).await;
    running.stop().await;
    let (bases, _) = base::list(fixture.archive.storage(), "app").await.unwrap();
    assert_eq!(generations(&bases), vec![1, 2], "{bases:#?}");
    assert_eq!(after_at.sqlite_generation(), Some(2));

    let before_at = position(&fixture.archive, &before.0).await;
    assert_eq!(
        restored(&fixture, &before_at, "before.db").await.unwrap(),
        before.1
    );
    assert_eq!(
        restored(&fixture, &same_at, "same.db").await.unwrap(),
        same.1
    );
    assert_eq!(
        restored(&fixture, &after_at, "after.db").await.unwrap(),
        after.1
    );
}

/// While the archiver holds its read transaction, a TRUNCATE checkpoint the
/// application asks for cannot restart the log: it returns busy, and the chain goes
/// on in one generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_cannot_restart_the_log_under_a_running_archiver() {
    let fixture = fixture();
    let app = app_connection(&fixture.path);
    app.busy_timeout(Duration::from_millis(200)).unwrap();
    let running = start(config(&fixture), &fixture.archive);
    for i in 0..20 {
        app.execute("INSERT INTO t (v) VALUES (?1)", [format!("a{i}")])
            .unwrap();
    }
    let first = cut(&fixture.path);
    position(&fixture.archive, &first.0).await;
    let (busy, ..): (i64, i64, i64) = app
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 1, "the archiver's read transaction held the log");
    for i in 0..20 {
        app.execute("INSERT INTO t (v) VALUES (?1)", [format!("b{i}")])
            .unwrap();
    }
    let second = cut(&fixture.path);
    let at = position(&fixture.archive, &second.0).await;
    running.stop().await;
    let (bases, _) = base::list(fixture.archive.storage(), "app").await.unwrap();
    assert_eq!(generations(&bases), vec![1]);
    assert_eq!(
        restored(&fixture, &at, "second.db").await.unwrap(),
        second.1
    );
}

/// A database file put in the place of the archived one (a restore) is another
/// database: a new generation, and its cuts restore to its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_put_in_place_of_the_database_starts_a_new_generation() {
    let fixture = fixture();
    let running = start(config(&fixture), &fixture.archive);
    let old = cut(&fixture.path);
    position(&fixture.archive, &old.0).await;

    let other = fixture.dir.path().join("other.db");
    let conn = app_connection(&other);
    conn.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL); INSERT INTO t (v) VALUES ('other');",
    )
    .unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    std::fs::rename(&other, &fixture.path).unwrap();
    let app = app_connection(&fixture.path);
    app.execute("INSERT INTO t (v) VALUES ('after')", [])
        .unwrap();
    let new = cut(&fixture.path);
    let at = position(&fixture.archive, &new.0).await;
    running.stop().await;
    assert_eq!(at.sqlite_generation(), Some(2));
    let got = restored(&fixture, &at, "new.db").await.unwrap();
    assert_eq!(got, new.1);
    assert!(got.starts_with("2 rows"), "{got}");
}

/// Two archivers of one database (two operators, or `serve` beside `archive`) would
/// write two chains: the second is refused, naming the fix, while the first runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_archiver_of_the_same_database_is_refused() {
    let fixture = fixture();
    let running = start(config(&fixture), &fixture.archive);
    let mut status = running.archiver.status();
    status.wait_for(|s| s.streaming).await.unwrap();
    let second = SqliteArchiver::new(config(&fixture), fixture.archive.clone());
    let error = second
        .run(&CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("another archiver is archiving"), "{error}");
    running.stop().await;
    // Once the first has stopped, the lock is free again.
    let again = start(config(&fixture), &fixture.archive);
    let mut status = again.archiver.status();
    status.wait_for(|s| s.streaming).await.unwrap();
    again.stop().await;
}

/// A database in rollback-journal mode has no log: the archiver says so and how to
/// fix it, and does not retry.
#[tokio::test]
async fn a_database_not_in_wal_mode_is_refused_with_the_fix() {
    let fixture = fixture();
    let conn = Connection::open(&fixture.path).unwrap();
    conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    drop(conn);
    let archiver = SqliteArchiver::new(config(&fixture), fixture.archive.clone());
    let error = archiver.run(&CancellationToken::new()).await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("journal_mode=delete") && text.contains("PRAGMA journal_mode=WAL"),
        "{text}"
    );
}
