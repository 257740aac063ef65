//! Turns SIGINT or SIGTERM into the cancellation of a process's one shutdown token.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGINT or SIGTERM; returns early if something else
/// cancels it first, so it can be awaited beside the work it stops.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops this process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => return,
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}
