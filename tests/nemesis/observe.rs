//! The observer: asks every node for its pause state ten times a second, from
//! 127.0.0.2 (outside every network fault, see `net`), and writes what it sees into
//! the history: each sample while a node is paused (its pause id and how much lease it
//! has left), and each change between open, paused and unreachable. The lease check
//! reads these lines.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use stillpoint_node::grpc::wire::lease::StatusRequest;
use stillpoint_node::grpc::wire::lease::lease_admin_client::LeaseAdminClient;
use tonic::transport::{Channel, Endpoint};

use crate::history::History;
use crate::net::OBSERVER_SIDE;

const EVERY: Duration = Duration::from_millis(100);

pub struct Observer {
    /// Whether any ledger node was paused at the last look: faults that must meet a
    /// pause wait for it.
    pub paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    pub fn start(nodes: Vec<(String, SocketAddr)>, history: Arc<History>) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let paused = Arc::new(AtomicBool::new(false));
        let seen_paused = paused.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(watch(nodes, history, stopping, seen_paused));
        });
        Observer {
            paused,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a node was last seen as.
#[derive(Clone, PartialEq)]
enum Seen {
    Unknown,
    Unreachable,
    Open,
    Paused(String),
}

async fn watch(
    nodes: Vec<(String, SocketAddr)>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    any_ledger_paused: Arc<AtomicBool>,
) {
    let mut clients: Vec<Option<LeaseAdminClient<Channel>>> = vec![None; nodes.len()];
    let mut seen = vec![Seen::Unknown; nodes.len()];
    while !stop.load(Ordering::Relaxed) {
        for (index, (name, address)) in nodes.iter().enumerate() {
            if clients[index].is_none() {
                clients[index] = connect(*address).await;
            }
            let answer = match clients[index].as_mut() {
                Some(client) => {
                    tokio::time::timeout(Duration::from_secs(1), client.status(StatusRequest {}))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(tonic::Response::into_inner)
                }
                None => None,
            };
            let now = match &answer {
                None => {
                    // A restarted node needs a new connection.
                    clients[index] = None;
                    Seen::Unreachable
                }
                Some(status) if status.paused => Seen::Paused(status.pause_id.clone()),
                Some(_) => Seen::Open,
            };
            if let Some(status) = answer.as_ref().filter(|status| status.paused) {
                history.log(
                    "paused_sample",
                    json!({
                        "node": name,
                        "pause_id": status.pause_id,
                        "boot_id": status.boot_id,
                        "lease_remaining_ms": status.lease_remaining_ms,
                    }),
                );
            }
            if name.starts_with("ledger") {
                let paused =
                    nodes
                        .iter()
                        .zip(&seen)
                        .enumerate()
                        .any(|(other, ((name, _), seen))| {
                            name.starts_with("ledger")
                                && matches!(
                                    if other == index { &now } else { seen },
                                    Seen::Paused(_)
                                )
                        });
                any_ledger_paused.store(paused, Ordering::Relaxed);
            }
            if now != seen[index] {
                let state = match &now {
                    Seen::Unknown => unreachable!("never seen as unknown"),
                    Seen::Unreachable => "unreachable",
                    Seen::Open => "open",
                    Seen::Paused(_) => "paused",
                };
                history.log("node_state", json!({ "node": name, "state": state }));
                seen[index] = now;
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

async fn connect(address: SocketAddr) -> Option<LeaseAdminClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .local_address(Some(IpAddr::V4(OBSERVER_SIDE)));
    let channel = endpoint.connect().await.ok()?;
    Some(LeaseAdminClient::new(channel))
}
