//! Helpers shared by the adapters' tests: one database server of each kind for all the
//! tests that run at the same time, reading a copy to its end, and the steps and
//! checks the PostgreSQL and MariaDB tests have in common, written once over
//! [`TestServer`] (cut and copy, restore into a new database, a scratch database's
//! round trip, a non-empty target refused, read-only checks, typed values).

use std::sync::{Arc, Mutex, Weak};

use tokio::io::AsyncReadExt;

use super::Copy;

/// The server in `slot` if a running test still holds it, else a new one from `start`.
///
/// A `Weak` rather than a `static` server: statics are never dropped, so the server
/// would outlive the test binary. Here the last test to finish stops it.
pub(crate) fn shared<T>(slot: &'static Mutex<Weak<T>>, start: impl FnOnce() -> T) -> Arc<T> {
    let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(start());
    *slot = Arc::downgrade(&server);
    server
}

/// A database name no other test uses on a shared server.
pub(crate) fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Reads the stream to its end (as a caller must before awaiting `finished`).
pub(crate) async fn read_to_end(copy: &mut Copy) -> Vec<u8> {
    let mut bytes = Vec::new();
    copy.stream.read_to_end(&mut bytes).await.unwrap();
    bytes
}

/// The read-back capabilities a drill relies on, on a real database: copies what
/// `adapter` points at, restores it into a new scratch target, checks that the row
/// counts equal those taken at the cut and that `sql` returns `expected`, then
/// empties the target (a second restore must then succeed) and drops it. Returns the
/// scratch target, so the caller can check it is gone.
pub(crate) async fn scratch_round_trip(
    adapter: &dyn super::Adapter,
    dir: &std::path::Path,
    sql: &str,
    expected: &[&[super::Value]],
) -> String {
    let mut prepared = adapter.prepare().await.unwrap();
    let cut = prepared.cut("b-scratch").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    let at_cut = copy.finished.await.unwrap().row_counts.unwrap();

    let target = adapter
        .create_scratch(&unique_name("scratch"), dir, &cut)
        .await
        .unwrap();
    let restore = |bytes: Vec<u8>| adapter.restore(Box::pin(std::io::Cursor::new(bytes)), &target);
    restore(bytes.clone()).await.unwrap();
    assert_eq!(adapter.row_counts(&target).await.unwrap(), at_cut);
    let rows = adapter.query(&target, sql).await.unwrap();
    let expected: Vec<Vec<super::Value>> = expected.iter().map(|row| row.to_vec()).collect();
    assert_eq!(rows, expected);

    // A second restore into the same target is refused until it is emptied.
    assert!(restore(bytes.clone()).await.is_err());
    adapter.clear(&target).await.unwrap();
    assert!(
        adapter
            .row_counts(&target)
            .await
            .unwrap_or_default()
            .is_empty()
    );
    restore(bytes).await.unwrap();
    assert_eq!(adapter.row_counts(&target).await.unwrap(), at_cut);

    adapter.drop_scratch(&target).await.unwrap();
    target
}

/// What the PostgreSQL and MariaDB adapter tests need of a throwaway server, so the
/// tests they share are written once.
pub(crate) trait TestServer {
    fn url(&self, database: &str) -> String;
    fn create_database(&self, name: &str);
    /// Runs `sql` in `database` with the server's own client; what it printed.
    fn run_sql(&self, database: &str, sql: &str) -> String;
    /// Whether a database of that name exists on the server.
    fn has_database(&self, name: &str) -> bool;
}

impl TestServer for stillpoint_testkit::Postgres {
    fn url(&self, database: &str) -> String {
        self.url(database)
    }
    fn create_database(&self, name: &str) {
        self.create_database(name)
    }
    fn run_sql(&self, database: &str, sql: &str) -> String {
        self.psql(database, sql)
    }
    fn has_database(&self, name: &str) -> bool {
        let sql = format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'");
        self.psql("postgres", &sql).trim() != "0"
    }
}

impl TestServer for stillpoint_testkit::MariaDb {
    fn url(&self, database: &str) -> String {
        self.url(database)
    }
    fn create_database(&self, name: &str) {
        self.create_database(name)
    }
    fn run_sql(&self, database: &str, sql: &str) -> String {
        self.sql(database, sql)
    }
    fn has_database(&self, name: &str) -> bool {
        !self
            .sql("", &format!("SHOW DATABASES LIKE '{name}'"))
            .trim()
            .is_empty()
    }
}

/// What a backup of one database holds: the cut's marker, the copy's bytes and the
/// row counts read at the cut.
pub(crate) struct Copied {
    pub marker: super::CutMarker,
    pub bytes: Vec<u8>,
    pub row_counts: std::collections::BTreeMap<String, u64>,
}

/// Prepares, cuts (as backup `b-1`) and copies what `adapter` points at.
pub(crate) async fn cut_and_copy(adapter: &dyn super::Adapter) -> Copied {
    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-1").await.unwrap();
    let (bytes, row_counts) = copy_of(prepared).await;
    Copied {
        marker,
        bytes,
        row_counts,
    }
}

/// Copies a database that was prepared and cut: its bytes and its row counts.
pub(crate) async fn copy_of(
    prepared: Box<dyn super::Prepared>,
) -> (Vec<u8>, std::collections::BTreeMap<String, u64>) {
    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    let row_counts = copy.finished.await.unwrap().row_counts.unwrap();
    (bytes, row_counts)
}

/// Restores `bytes` into a new database named after `prefix` on `server`; returns its
/// name.
pub(crate) async fn restore_into_new(
    adapter: &dyn super::Adapter,
    server: &dyn TestServer,
    prefix: &str,
    bytes: Vec<u8>,
) -> String {
    let restored = unique_name(prefix);
    server.create_database(&restored);
    adapter
        .restore(
            Box::pin(std::io::Cursor::new(bytes)),
            &server.url(&restored),
        )
        .await
        .unwrap();
    restored
}

/// [`scratch_round_trip`] on a database server: afterwards the scratch database is gone.
pub(crate) async fn scratch_database_round_trip(
    adapter: &dyn super::Adapter,
    server: &dyn TestServer,
    sql: &str,
    expected: &[&[super::Value]],
) {
    let dir = tempfile::tempdir().unwrap();
    let target = scratch_round_trip(adapter, dir.path(), sql, expected).await;
    let scratch = target.rsplit('/').next().unwrap();
    assert!(scratch.starts_with("scratch_"), "{target}");
    assert!(!server.has_database(scratch), "{scratch} was not dropped");
}

/// A restore into a database that holds tables is refused, naming one of them
/// (`table`), and leaves it as it was (`count_sql` still prints `rows`).
pub(crate) async fn restore_refuses_a_non_empty_target(
    adapter: &dyn super::Adapter,
    server: &dyn TestServer,
    database: &str,
    table: &str,
    (count_sql, rows): (&str, &str),
) {
    let err = adapter
        .restore(Box::pin(tokio::io::empty()), &server.url(database))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, super::AdapterError::Restore { .. }), "{msg}");
    assert!(msg.contains("not empty"), "{msg}");
    assert!(msg.contains(table), "{msg}");
    assert_eq!(server.run_sql(database, count_sql), rows);
}

/// Drill checks are read-only: each of `statements` fails, and writes nothing
/// (`count_sql` still prints `rows`).
pub(crate) async fn checks_cannot_write(
    adapter: &dyn super::Adapter,
    server: &dyn TestServer,
    database: &str,
    statements: &[&str],
    (count_sql, rows): (&str, &str),
) {
    let target = server.url(database);
    for sql in statements {
        let result = adapter.query(&target, sql).await;
        assert!(result.is_err(), "{sql:?} ran: {result:?}");
        assert_eq!(server.run_sql(database, count_sql), rows, "{sql:?} wrote");
    }
}

/// Each pair of queries reads back different values (types and bytes are kept).
pub(crate) async fn pairs_read_back_differently(
    adapter: &dyn super::Adapter,
    target: &str,
    pairs: &[(&str, &str)],
) {
    for (left, right) in pairs {
        let l = adapter.query(target, left).await.unwrap();
        let r = adapter.query(target, right).await.unwrap();
        assert_ne!(
            l, r,
            "{left} and {right} must not read back as the same value"
        );
    }
}
