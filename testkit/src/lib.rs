//! Throwaway database servers for tests: PostgreSQL and MariaDB started from the
//! system's binaries in temporary directories on free ports, torn down on drop.
//! Installs nothing: `scripts/test` installs the packages first.
//!
//! Layout:
//! - [`Postgres`] (`postgres.rs`): `initdb` + `postgres` in a temp dir, trust auth, TCP on
//!   127.0.0.1 and a unix socket inside the temp dir; optional WAL archiving for PITR;
//!   roles that must log in with a password, for tests of how passwords travel; and
//!   [`DetachedPostgres`], a server the program under test started, stopped on drop.
//! - [`MariaDb`] (`mariadb.rs`): `mariadb-install-db` + `mariadbd` with the binlog (and so
//!   GTIDs) on, root without a password over TCP.
//! - `chromium.rs`: [`rendered_dom`], a page as headless Chromium builds it.
//! - `process.rs`: what both share: finding binaries (the system's, and the
//!   workspace's own), free ports, running a command and failing loudly, polling for
//!   readiness with a deadline, whether the test runs as root.
//!
//! Everything here is synchronous and panics on failure: it is test scaffolding, and a
//! panic that carries the server log is the most useful thing a broken setup can give.
//! The servers never touch the machine's own PostgreSQL (5432) or MariaDB (3306): each
//! gets its own data directory, port and socket.
//!
//! A server is stopped and its directory removed when its value is dropped, including
//! while a failing test unwinds. A test process killed outright (SIGKILL) leaves its
//! servers running; they hold nothing but their temp dir.

mod chromium;
mod mariadb;
mod postgres;
mod process;

pub use chromium::rendered_dom;
pub use mariadb::{MariaDb, MariaDbOptions};
pub use postgres::{DetachedPostgres, Postgres, PostgresOptions};
pub use process::{free_port, running_as_root, workspace_binary};

#[cfg(test)]
mod tests;
