//! SIGINT and SIGTERM for every command: long work is not dropped mid-way on a signal
//! but told to stop through a `CancellationToken`, so it can clean up what it made
//! (release a pause, stop a scratch server, drop scratch databases) before exiting.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C interrupts");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Runs `work` with a token that a signal cancels, and waits for `work` to finish its
/// own clean-up: the work must watch the token and return soon after it fires.
pub async fn run_cancellable<F, T>(work: impl FnOnce(CancellationToken) -> F) -> T
where
    F: Future<Output = T>,
{
    let cancel = CancellationToken::new();
    let work = work(cancel.clone());
    tokio::pin!(work);
    tokio::select! {
        output = &mut work => return output,
        () = shutdown_signal() => {
            tracing::warn!("interrupted: stopping and cleaning up");
            cancel.cancel();
        }
    }
    work.await
}
