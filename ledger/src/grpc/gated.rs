//! The reference application's services behind the node's gate, whose calls run to
//! completion once admitted.
//!
//! When a client disconnects, tonic drops the call's future. For a transfer that would
//! cut it in half: committed on the ledger but never recorded by the auditor, and the
//! gate permit gone early, so a pause could call the node drained while a commit is
//! still under way. So each *admitted* call (gate permit included) runs as a task on a
//! `TaskTracker` that the server waits for at shutdown. A call held at a closed gate
//! is not admitted yet: it waits in its own request future, and a caller that gives up
//! (deadline, disconnect) takes it away with it, so it never runs after the pause
//! (`stillpoint_node::gate::GateLayer::run_to_completion`). Nothing is detached.

use std::sync::Arc;

use stillpoint_node::gate::{Gate, GateLayer, Gated};
use tokio_util::task::TaskTracker;
use tower::Layer;

/// `service` behind `gate`, each admitted call running to its end on `tracker`.
pub fn gated_app<S>(service: S, gate: Arc<Gate>, tracker: TaskTracker) -> Gated<S> {
    GateLayer::new(gate)
        .run_to_completion(tracker)
        .layer(service)
}
