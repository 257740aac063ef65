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
