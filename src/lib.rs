//! stillpoint: transactionally-consistent backups of a paused application cluster.
//! This is the coordinator side; what a node embeds (the gate, its pause state and the
//! admin services) is the `stillpoint-node` crate.
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
//! - [`changes`]: the committed changes between two points, as records (MariaDB
//!   from its archived binlog).
//! - [`catalog`]: the backups a storage holds: list, verify, retention and prune.
//! - [`restore`]: one database of a backup into a target, checksum first.
//! - [`drill`]: every database of a backup into scratch targets, then checks.
//! - [`points`]: base backups in storage, points (a pause that marks every database),
//!   and restoring or drilling a point from its bases and archives.
//! - [`pitr`]: PostgreSQL base backups and point-in-time recovery to a backup's
//!   restore point.
//! - [`coordinator`]: pauses a cluster tier by tier, holds it under a lease, releases
//!   it and proves the window (the only caller of Unpause).
//! - [`grpc`]: the wire edge — the client the coordinator talks to nodes with. The
//!   only module that sees prost types.
//! - [`time`]: Unix milliseconds, human durations, time zones.
//! - [`redact`]: `Debug` of configuration without its secrets (URLs, credentials).

pub mod adapters;
pub mod archive;
pub mod backup;
pub mod catalog;
pub mod changes;
pub mod coordinator;
pub mod drill;
pub mod grpc;
pub mod manifest;
pub mod pipeline;
pub mod pitr;
pub mod points;
pub mod redact;
pub mod resolve;
pub mod restore;
pub mod runbook;
pub mod standby;
pub mod storage;
pub mod time;

pub use stillpoint_node::error_chain;
