//! stillpoint: transactionally-consistent backups of a paused application cluster.
//!
//! Layout, in the direction data flows (see docs/ARCHITECTURE.md):
//!
//! - [`resolve`]: node addresses from lists and DNS SRV records.
//! - [`coordinator`]: pauses a cluster tier by tier, holds it under a lease, releases
//!   it and proves the window (the only caller of Unpause).
//! - [`grpc`]: the wire edge — admin services a node serves, and the client the
//!   coordinator uses. The only module that sees prost types.
//! - [`node`]: a node's pause state (pause id, lease, boot id) around its [`gate`].
//! - [`gate`]: per-node admission control every transaction passes through.
//! - [`time`]: Unix milliseconds, human durations, time zones.

pub mod coordinator;
pub mod gate;
pub mod grpc;
pub mod node;
pub mod resolve;
pub mod time;
