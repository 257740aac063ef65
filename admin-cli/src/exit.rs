//! Exit codes, documented in `stillpoint --help` and docs/runbooks/pause.md. Scripts
//! branch on these, so they never change meaning.

/// Everything worked and, where a window was closed, it is a valid restore point.
pub const OK: u8 = 0;
/// An error that fits none of the codes below (I/O, a node unreachable for `stats`…).
pub const ERROR: u8 = 1;
/// Bad usage: unknown flag, malformed address or duration (clap uses 2 as well).
pub const USAGE: u8 = 2;
/// The pause failed and was rolled back: no node is left paused, there is no window.
pub const PAUSE_FAILED: u8 = 3;
/// Some node could not be released (or a failed pause could not be rolled back); the
/// output names it and when its lease reopens it.
pub const UNPAUSE_FAILED: u8 = 4;
/// Every node was released, but the window must not be used as a restore point.
pub const WINDOW_INVALID: u8 = 5;
/// A backup, verify or restore failed (a database, the storage, an artifact); the
/// cluster is not paused and no incomplete backup is listed.
pub const BACKUP_FAILED: u8 = 6;
/// A drill restored the backup, but a check of the restored data failed: the backup
/// is not a consistent restore point (or a check is wrong). The report names it.
pub const DRILL_FAILED: u8 = 7;
/// `wal-fetch` only: the archive could not be read (storage, damage, runbook).
/// PostgreSQL takes any exit from 1 to 125 of its `restore_command` as "not in the
/// archive", which ends recovery early; above 125 it aborts recovery instead.
pub const WAL_FETCH_FAILED: u8 = 126;

pub const HELP: &str = "\
Exit codes:
  0  success (and the window, if one was closed, is a valid restore point)
  1  other error
  2  bad usage (flags, addresses, durations)
  3  pause failed and was rolled back on every node
  4  unpause failed: some node may still be paused until its lease expires
  5  window not valid as a restore point (a node restarted or lost the pause,
     or the window was too short for the clock-skew bound)
  6  backup, verify or restore failed (database, storage or artifact); the cluster
     is not paused and nothing incomplete is listed
  7  drill: a check of the restored data failed (the report names it)
126  wal-fetch: the archive could not be read (so PostgreSQL aborts recovery
     instead of ending it early)";

/// An error carrying the exit code it should end the process with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::new(ERROR, error)
    }
}
