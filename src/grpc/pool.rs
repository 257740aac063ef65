//! Connections to nodes kept open between pauses, for a long-running coordinator
//! (`stillpoint serve`): a point every few seconds would otherwise pay a TCP, TLS and
//! HTTP/2 handshake to every node inside each pause's setup. One-shot commands use no
//! pool. A connection that fails a call is dropped, and the next pause connects
//! afresh; addresses a tier no longer resolves to (an SRV answer that changed) are
//! dropped as each plan is made.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::client::{ClockReading, ConnectOptions, NodeClient};
use crate::grpc::client::CallError;
use crate::resolve::NodeAddress;

/// Open clients by node address.
#[derive(Debug, Default)]
pub struct ConnectionPool {
    clients: Mutex<HashMap<NodeAddress, NodeClient>>,
}

impl ConnectionPool {
    /// The pooled client for `address`, or a new connection (with the probe's clock
    /// reading, as [`NodeClient::connect_sampled`] gives it), which is then pooled.
    pub async fn client(
        &self,
        address: &NodeAddress,
        options: &ConnectOptions,
    ) -> Result<(NodeClient, Option<ClockReading>), CallError> {
        if let Some(client) = self.clients.lock().expect("pool").get(address).cloned() {
            return Ok((client, None));
        }
        let (client, reading) = NodeClient::connect_sampled(address, options).await?;
        self.clients
            .lock()
            .expect("pool")
            .insert(address.clone(), client.clone());
        Ok((client, reading))
    }

    /// Drops the connection to `address` (it failed a call).
    pub fn forget(&self, address: &NodeAddress) {
        self.clients.lock().expect("pool").remove(address);
    }

    /// Keeps only the connections to `addresses` (the nodes the runbook resolves to now).
    pub fn keep_only<'a>(&self, addresses: impl IntoIterator<Item = &'a NodeAddress>) {
        let keep: HashSet<&NodeAddress> = addresses.into_iter().collect();
        self.clients
            .lock()
            .expect("pool")
            .retain(|address, _| keep.contains(address));
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.clients.lock().expect("pool").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
