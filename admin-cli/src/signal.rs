//! SIGINT and SIGTERM for every command: long work is not dropped mid-way on a signal
//! but told to stop through a `CancellationToken`, so it can clean up what it made
//! (release a pause, stop a scratch server, drop scratch databases) before exiting.
//! A clean-up that itself hangs (a node that stopped answering) is given up on a
//! further signal: an operator is never stuck behind it ([`Interrupts`]).

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};
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
/// own clean-up: the work must watch the token and return soon after it fires. A
/// second signal gives up on the clean-up (a server it waits for may hang) and exits
/// at once with status 1, saying so.
pub async fn run_cancellable<F, T>(work: impl FnOnce(CancellationToken) -> F) -> T
where
    F: Future<Output = T>,
{
    let cancel = CancellationToken::new();
    let work = work(cancel.clone());
    tokio::pin!(work);
    let mut interrupts = match Interrupts::new() {
        Ok(interrupts) => interrupts,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGINT/SIGTERM; they end the command at once");
            return work.await;
        }
    };
    tokio::select! {
        output = &mut work => return output,
        () = interrupts.recv() => {
            tracing::warn!("interrupted: stopping and cleaning up (interrupt again to stop at once)");
            cancel.cancel();
        }
    }
    match unless_interrupted_again(work, &mut interrupts).await {
        Some(output) => output,
        None => {
            crate::errln!(
                "error: interrupted again: stopped without finishing the clean-up; what it \
                 made may be left (a scratch server or database, a clone's new databases): \
                 see the log above"
            );
            std::process::exit(i32::from(crate::exit::ERROR));
        }
    }
}

/// SIGINT and SIGTERM, counted, from the moment this is made: a signal that arrives
/// while nobody is waiting is kept for the next [`Interrupts::recv`], so a quick second
/// Ctrl-C is never lost between two waits.
#[derive(Debug)]
pub struct Interrupts {
    interrupt: Signal,
    terminate: Signal,
    received: u32,
}

impl Interrupts {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            received: 0,
        })
    }

    /// Waits for the next signal.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        self.received += 1;
    }

    /// How many signals have been received so far.
    pub fn received(&self) -> u32 {
        self.received
    }
}

/// Waits for `cleanup` unless interrupted twice in all: the signal that started the
/// clean-up (if any) counts as the first, and the next one gives up on it (`None`).
pub async fn unless_interrupted_again<F: Future>(
    cleanup: F,
    interrupts: &mut Interrupts,
) -> Option<F::Output> {
    tokio::pin!(cleanup);
    loop {
        tokio::select! {
            output = &mut cleanup => return Some(output),
            () = interrupts.recv() => {
                if interrupts.received() >= 2 {
                    return None;
                }
                tracing::warn!("still cleaning up; interrupt again to stop waiting");
            }
        }
    }
}
