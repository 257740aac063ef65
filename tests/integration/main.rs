//! stillpoint's integration tests: one test binary, real processes, real ports. Each
//! test reads like a runbook; `util.rs` and `cluster.rs` hold the harness.

mod archive;
mod backup;
mod binlog;
mod changes;
mod changes_breaker;
mod cluster;
mod dns;
mod drill;
mod example_service;
mod faults;
// The storage unit tests use all of this server; these tests only part of it.
#[allow(dead_code)]
#[path = "../../src/storage/s3_test_server.rs"]
mod s3_test_server;
mod upstream_server;
mod util;

mod cli;
mod clone;
mod passwords;
mod pause;
mod pitr;
mod points;
mod points_breaker;
mod points_mariadb;
mod points_scenario;
mod points_sqlite;
mod protocols;
mod reference;
mod security;
mod serve;
mod standby;
