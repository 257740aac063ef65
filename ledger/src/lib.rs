//! The reference ledger cluster stillpoint pauses and backs up in its own tests: ledger
//! nodes that move money between accounts in one shared database, chaining every
//! transfer by hash, and an auditor that records each transfer's hash in a second
//! database. A backup is consistent exactly when the two databases agree.
//!
//! Layout, in the direction a transfer flows:
//!
//! - [`load`]: the load generator that drives ledger nodes.
//! - [`serve`]: runs one node: its gated application service, the stillpoint admin
//!   services and the lease watchdog, under one shutdown token.
//! - [`grpc`]: the wire edge (the only module that sees prost types or `tonic::Status`).
//! - [`node`]: what a ledger node and an auditor node do, in domain types.
//! - [`store`]: the databases behind two small traits; SQLite so far.
//! - [`chain`]: the hash-chain rule.
//! - [`check`]: the consistency check of a ledger and an auditor database.
//! - [`signal`]: SIGINT/SIGTERM to a cancellation token.

pub mod chain;
pub mod check;
pub mod grpc;
pub mod load;
pub mod node;
pub mod serve;
pub mod signal;
pub mod store;
