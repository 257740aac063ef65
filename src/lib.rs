//! stillpoint: transactionally-consistent backups of a paused application cluster.
//!
//! Layout, in the direction data flows (see docs/ARCHITECTURE.md):
//!
//! - [`resolve`]: node addresses from lists and DNS SRV records.
//! - [`runbook`]: the TOML file a scheduled backup runs from.
//! - [`backup`]: protocol steps 2–7 for one runbook.
//! - [`adapters`]: prepare, cut, copy and restore each kind of database.
//! - [`pipeline`]: compression, encryption and checksums between a copy and storage.
//! - [`storage`]: local directories and S3-compatible object storage.
//! - [`archive`]: each database's log (PostgreSQL WAL) archived continuously into
//!   storage in chunks, and the catalog of those chunks.
//! - [`manifest`]: the JSON record whose presence commits a backup, and the storage
//!   layout of a backup.
//! - [`catalog`]: the backups a storage holds: list, verify, retention and prune.
//! - [`restore`]: one database of a backup into a target, checksum first.
//! - [`drill`]: every database of a backup into scratch targets, then checks.
//! - [`pitr`]: PostgreSQL base backups and point-in-time recovery to a backup's
//!   restore point.
//! - [`coordinator`]: pauses a cluster tier by tier, holds it under a lease, releases
//!   it and proves the window (the only caller of Unpause).
//! - [`grpc`]: the wire edge — admin services a node serves, and the client the
//!   coordinator uses. The only module that sees prost types.
//! - [`node`]: a node's pause state (pause id, lease, boot id) around its [`gate`].
//! - [`gate`]: per-node admission control every transaction passes through.
//! - [`time`]: Unix milliseconds, human durations, time zones.

pub mod adapters;
pub mod archive;
pub mod backup;
pub mod catalog;
pub mod coordinator;
pub mod drill;
pub mod gate;
pub mod grpc;
pub mod manifest;
pub mod node;
pub mod pipeline;
pub mod pitr;
pub mod resolve;
pub mod restore;
pub mod runbook;
pub mod storage;
pub mod time;

/// An error and its sources, joined with `: `. Drivers and transports put the useful
/// part (the server's message, the refused connection) in a source and show only a
/// summary themselves.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
