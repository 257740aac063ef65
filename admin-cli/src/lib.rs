//! The `stillpoint` and `scalar-admin` command lines. Clap structs live here and only
//! here; they are validated and turned into `stillpoint` library calls.
//!
//! - `archive.rs`: `archive`, `wal-push`, `wal-fetch`: a database's log into storage.
//! - `args.rs`: flags shared by every cluster command (targets, TLS, output).
//! - `pause.rs`: `pause`, `unpause`, `check-paused`, `stats`.
//! - `backup.rs`: `backup`, and the progress bars `backup`, `restore` and `drill`
//!   show on a terminal.
//! - `catalog.rs`: `list`, `show`, `verify`, `prune`.
//! - `changes.rs`: `changes`, the change records between two points.
//! - `restore.rs`: `restore`, and PostgreSQL's `base-backup` and `pitr`.
//! - `clone.rs`: `clone`, a point into another runbook's new databases.
//! - `drill.rs`: `drill`, with its table, JSON and JUnit reports.
//! - `serve.rs`: `serve`, the long-running service (the `stillpoint-service` crate).
//! - `remote.rs`: `--server`: `list`, `show`, `point`, `backup`, `drill`, `verify`
//!   asking a running `stillpoint serve` over its HTTP API.
//! - `demo.rs`: `demo`, a local reference cluster paused and checked.
//! - `docs.rs`: `completions` and `man`, generated from the clap command tree.
//! - `scalar_admin.rs`: the upstream-compatible `scalar-admin` flags.
//! - `signal.rs`: SIGINT/SIGTERM, and cancelling long work so it cleans up first.
//! - `state.rs`: the state file that carries a pause from `pause` to `unpause`.
//! - `output.rs`: JSON for machines, text for people.
//! - `exit.rs`: exit codes.

pub mod archive;
pub mod args;
pub mod backup;
pub mod catalog;
pub mod changes;
pub mod cli;
pub mod clone;
pub mod demo;
pub mod docs;
pub mod drill;
pub mod exit;
pub mod output;
pub mod pause;
pub mod points;
pub mod remote;
pub mod restore;
pub mod scalar_admin;
pub mod serve;
pub mod signal;
pub mod standby;
pub mod state;

/// Logs go to stderr so that stdout carries only the report.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STILLPOINT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| output::QuietStderr)
        .init();
}

/// Runs a command future on a runtime and turns its outcome into an exit code,
/// printing the error chain for people on stderr.
pub fn finish(result: Result<u8, exit::Failure>) -> std::process::ExitCode {
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(failure) => {
            errln!("error: {}", error_chain(&failure.error));
            std::process::ExitCode::from(failure.code)
        }
    }
}

/// The error and its causes joined by ": ", each said once: many errors already quote
/// their cause in their own message (so that logs and JSON carry it), and `{:#}` would
/// print it a second time.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = anyhow::Error::new(io).context("cannot read runbook r.toml: no such file");
        assert_eq!(
            super::error_chain(&error),
            "cannot read runbook r.toml: no such file"
        );
        let error = anyhow::anyhow!("the socket closed").context("connecting to the node");
        assert_eq!(
            super::error_chain(&error),
            "connecting to the node: the socket closed"
        );
    }
}
