//! SQLite adapter tests on real WAL databases written by a second connection while the
//! adapter holds its snapshot.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rusqlite::Connection;

use super::*;
use crate::adapters::testing::{read_to_end, scratch_round_trip};

/// A WAL database with `accounts` rows and 10 `audit` rows, and the application's own
/// connection to keep writing to it.
fn live_db(dir: &Path, accounts: i64) -> (PathBuf, Connection) {
    let path = dir.join("ledger.sqlite");
    let app = Connection::open(&path).unwrap();
    let mode: String = app
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    app.execute_batch(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL);
         CREATE TABLE audit (id INTEGER PRIMARY KEY, note TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 10)
           INSERT INTO audit SELECT i, 'note ' || i FROM n;",
    )
    .unwrap();
    app.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT ?1)
         INSERT INTO accounts SELECT i, printf('owner-%d-%s', i, hex(randomblob(40))), 100 FROM n",
        [accounts],
    )
    .unwrap();
    (path, app)
}

fn adapter(path: &Path) -> Sqlite {
    Sqlite::new(
        "ledger",
        SqliteConfig {
            path: path.to_owned(),
        },
    )
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Writes the application makes after the cut: more rows, an update, deletes, a new
/// table, and a checkpoint attempt that would overwrite pages if the snapshot were not
/// pinned.
fn write_after_cut(app: &Connection) {
    app.execute_batch(
        "INSERT INTO accounts (owner, balance) SELECT owner || '-late', 1 FROM accounts LIMIT 500;
         UPDATE accounts SET balance = 0 WHERE id = 1;
         DELETE FROM audit WHERE id <= 5;
         CREATE TABLE late (x INTEGER);
         INSERT INTO late VALUES (1);",
    )
    .unwrap();
    app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

#[tokio::test]
async fn copy_holds_the_cut_snapshot_not_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, app) = live_db(dir.path(), 1000);
    let adapter = adapter(&path);

    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-1").await.unwrap();
    assert_eq!(marker.kind, "sqlite-snapshot");
    assert_eq!(marker.details["path"], path.display().to_string());

    write_after_cut(&app);
    // The writes really happened: the live database has them.
    assert_eq!(count(&app, "SELECT count(*) FROM accounts"), 1500);

    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    let summary = copy.finished.await.unwrap();
    assert_eq!(
        summary.row_counts,
        Some(BTreeMap::from([
            ("accounts".to_owned(), 1000),
            ("audit".to_owned(), 10)
        ]))
    );

    let restored = dir.path().join("restored.sqlite");
    adapter
        .restore(
            Box::pin(std::io::Cursor::new(bytes)),
            restored.to_str().unwrap(),
        )
        .await
        .unwrap();
    let r = Connection::open(&restored).unwrap();
    assert_eq!(count(&r, "SELECT count(*) FROM accounts"), 1000);
    assert_eq!(count(&r, "SELECT sum(balance) FROM accounts"), 100_000);
    assert_eq!(count(&r, "SELECT count(*) FROM audit"), 10);
    assert_eq!(
        count(&r, "SELECT count(*) FROM sqlite_schema WHERE name = 'late'"),
        0
    );
    // The application's database is untouched by the backup and keeps its writes.
    assert_eq!(count(&app, "SELECT count(*) FROM late"), 1);
}

/// Negative control for the test above: the same backup routine, run from a connection
/// that holds no snapshot, does see the later writes. So the check above can fail,
/// and what keeps the copy at the cut is the pinned read transaction.
#[tokio::test]
async fn without_the_pinned_snapshot_the_backup_sees_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, app) = live_db(dir.path(), 1000);
    write_after_cut(&app);

    let unpinned = Connection::open(&path).unwrap();
    let out = dir.path().join("unpinned.sqlite");
    backup_into(&unpinned, &out).unwrap();
    let r = Connection::open(&out).unwrap();
    assert_eq!(count(&r, "SELECT count(*) FROM accounts"), 1500);
    assert_eq!(count(&r, "SELECT count(*) FROM late"), 1);
}

#[tokio::test]
async fn vacuum_into_cannot_run_inside_the_snapshot_transaction() {
    // Why the copy uses the backup API: VACUUM INTO would be simpler, but SQLite
    // refuses it inside the read transaction that holds the cut's snapshot.
    let dir = tempfile::tempdir().unwrap();
    let (path, _app) = live_db(dir.path(), 10);
    let conn = open_checked(&path).unwrap();
    pin_snapshot(&conn).unwrap();
    let out = dir.path().join("vacuumed.sqlite");
    let err = conn
        .execute(&format!("VACUUM INTO '{}'", out.display()), [])
        .unwrap_err();
    assert!(err.to_string().contains("within a transaction"), "{err}");
}

#[tokio::test]
async fn cut_time_does_not_grow_with_size() {
    let mut report = Vec::new();
    for rows in [20_000, 200_000] {
        let dir = tempfile::tempdir().unwrap();
        let (path, _app) = live_db(dir.path(), rows);
        let mut prepared = adapter(&path).prepare().await.unwrap();
        let started = Instant::now();
        let marker = prepared.cut("b-1").await.unwrap();
        let took = started.elapsed();
        report.push(format!(
            "{rows} rows / {} pages: {took:?}",
            marker.details["page_count"]
        ));
        let mut copy = prepared.copy().await.unwrap();
        read_to_end(&mut copy).await;
        assert_eq!(
            copy.finished.await.unwrap().row_counts.unwrap()["accounts"],
            rows as u64
        );
    }
    println!("sqlite cut time: {}", report.join("; "));
}

#[tokio::test]
async fn prepare_requires_wal_mode_and_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollback.sqlite");
    Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA journal_mode=DELETE; CREATE TABLE t (x)")
        .unwrap();
    let err = adapter(&path).prepare().await.err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Prepare { .. }), "{msg}");
    assert!(msg.contains("database ledger"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("journal_mode=delete"), "{msg}");
    assert!(msg.contains("PRAGMA journal_mode=WAL"), "{msg}");

    let missing = dir.path().join("missing.sqlite");
    let msg = adapter(&missing).prepare().await.err().unwrap().to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    // Checking did not create it.
    assert!(!missing.exists());
}

#[tokio::test]
async fn copy_before_cut_is_refused_naming_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _app) = live_db(dir.path(), 10);
    let prepared = adapter(&path).prepare().await.unwrap();
    let err = prepared.copy().await.err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Copy { .. }), "{msg}");
    assert!(msg.contains("database ledger"), "{msg}");
}

#[tokio::test]
async fn restore_refuses_a_non_empty_target_or_a_stale_wal() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _app) = live_db(dir.path(), 10);
    let adapter = adapter(&path);

    // The live database itself is the most dangerous non-empty target.
    let err = adapter
        .restore(Box::pin(tokio::io::empty()), path.to_str().unwrap())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Restore { .. }), "{msg}");
    assert!(msg.contains("not empty"), "{msg}");
    assert_eq!(count(&_app, "SELECT count(*) FROM accounts"), 10);

    let target = dir.path().join("scratch.sqlite");
    std::fs::write(with_suffix(&target, "-wal"), b"stale frames").unwrap();
    let msg = adapter
        .restore(Box::pin(tokio::io::empty()), target.to_str().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("scratch.sqlite-wal"), "{msg}");
}

#[tokio::test]
async fn restore_into_an_empty_file_works_and_garbage_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _app) = live_db(dir.path(), 10);
    let adapter = adapter(&path);
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    copy.finished.await.unwrap();

    // An existing empty file (e.g. made by `touch` or mktemp) is an empty target.
    let target = dir.path().join("empty.sqlite");
    std::fs::write(&target, b"").unwrap();
    adapter
        .restore(
            Box::pin(std::io::Cursor::new(bytes)),
            target.to_str().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        count(
            &Connection::open(&target).unwrap(),
            "SELECT count(*) FROM accounts"
        ),
        10
    );

    let garbage = dir.path().join("garbage.sqlite");
    let err = adapter
        .restore(
            Box::pin(std::io::Cursor::new(vec![0x42u8; 8192])),
            garbage.to_str().unwrap(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("garbage.sqlite"), "{err}");
}

#[tokio::test]
async fn a_scratch_file_is_restored_read_back_emptied_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _app) = live_db(dir.path(), 1000);
    let scratch = tempfile::tempdir().unwrap();
    let target = scratch_round_trip(
        &adapter(&path),
        scratch.path(),
        "SELECT count(*), sum(balance), NULL, x'00ff', 0.5 FROM accounts",
        &[&[
            Value::Number("1000".to_owned()),
            Value::Number("100000".to_owned()),
            Value::Null,
            Value::Bytes(vec![0, 0xff]),
            Value::Float(0.5),
        ]],
    )
    .await;
    assert!(target.starts_with(&scratch.path().display().to_string()));
    assert!(!Path::new(&target).exists(), "{target} was not removed");
}

/// Issue 18.10: `restore --force` (clear, then restore) refuses a database another
/// connection has open, and replaces a dead one (its `-wal` and `-shm` too) whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_refuses_an_open_database_and_restore_replaces_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let (source, app) = live_db(dir.path(), 100);
    let adapter = adapter(&source);
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b1").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    copy.finished.await.unwrap();

    // The application still has it open (idle, between transactions).
    let err = adapter
        .clear(&source.display().to_string())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("another process has it open"), "{err}");
    app.execute("INSERT INTO audit VALUES (11, 'still here')", [])
        .unwrap();
    let rows: i64 = app
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 11);

    // A database whose process died, leaving its -wal and -shm behind.
    let dead = dir.path().join("dead.sqlite");
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3, os; c = sqlite3.connect('{}'); c.execute('PRAGMA journal_mode=WAL'); \
             c.execute('CREATE TABLE old (x)'); c.execute('INSERT INTO old VALUES (1)'); \
             c.commit(); os._exit(0)",
            dead.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(with_suffix(&dead, "-wal").exists() && with_suffix(&dead, "-shm").exists());
    let target = dead.display().to_string();
    adapter.clear(&target).await.unwrap();
    for leftover in ["", "-wal", "-shm", "-journal"] {
        assert!(!with_suffix(&dead, leftover).exists(), "{leftover:?} left");
    }
    adapter
        .restore(Box::pin(std::io::Cursor::new(bytes)), &target)
        .await
        .unwrap();
    let restored = Connection::open(&dead).unwrap();
    let rows: i64 = restored
        .query_row("SELECT count(*) FROM accounts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 100);
    // Nothing staged is left beside it.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".restoring")),
        "{names:?}"
    );
}

/// Issue 20.2: invalid UTF-8 TEXT was decoded lossily (two different values read back
/// equal) and a BLOB read back as the hex text of its bytes. Values now keep their
/// type and bytes.
#[tokio::test]
async fn values_of_different_types_or_bytes_stay_different() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _app) = live_db(dir.path(), 1);
    let adapter = adapter(&path);
    let target = path.display().to_string();
    for (left, right) in [
        (
            "SELECT CAST(x'ff61' AS TEXT)",
            "SELECT CAST(x'fe61' AS TEXT)",
        ),
        ("SELECT x'6162'", "SELECT '6162'"),
        ("SELECT x'6162'", "SELECT 'ab'"),
        ("SELECT 1", "SELECT '1'"),
        ("SELECT NULL", "SELECT 'NULL'"),
    ] {
        let l = adapter.query(&target, left).await.unwrap();
        let r = adapter.query(&target, right).await.unwrap();
        assert_ne!(
            l, r,
            "{left} and {right} must not read back as the same value"
        );
    }
}
