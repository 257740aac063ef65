//! Helpers shared by the adapters' tests: one database server of each kind for all the
//! tests that run at the same time, and reading a copy to its end.

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
