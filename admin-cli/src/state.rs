//! The state file: how a plain `stillpoint pause` hands its open window to a later
//! `stillpoint unpause`, possibly from another shell or host step of a runbook.
//!
//! Written atomically (a temp file of its own + rename) so a crash never leaves half a
//! record. A pause that will write it, and an unpause that will close it, first take a
//! [`Claim`] (an exclusive `flock` on a lock file beside it), so two pauses sharing one
//! state file cannot both find it empty and both record a window (the second is
//! refused before it pauses anything), and an unpause never reads a file a pause is
//! about to write.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use stillpoint::coordinator::{PauseRecord, check_time_ms};

const VERSION: u32 = 1;
/// The longest `--min-window` the duration parser accepts (a week).
const MAX_MIN_WINDOW_MS: u64 = 7 * 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PauseState {
    pub version: u32,
    pub record: PauseRecord,
    /// When the lease was last renewed, on this host's clock.
    pub renewed_at_ms: i64,
    /// `--min-window` of the pause: `unpause` holds the window at least this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_window_ms: Option<u64>,
}

impl PauseState {
    pub fn new(record: PauseRecord, renewed_at_ms: i64, min_window_ms: Option<u64>) -> Self {
        Self {
            version: VERSION,
            record,
            renewed_at_ms,
            min_window_ms,
        }
    }
}

/// `$XDG_STATE_HOME/stillpoint/pause.json`, else `~/.local/state/stillpoint/pause.json`.
pub fn default_path() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("stillpoint").join("pause.json")
}

pub fn load(path: &Path) -> anyhow::Result<Option<PauseState>> {
    // Bytes, not text: a file that is not UTF-8 is as damaged as one that is not JSON,
    // and says so the same way.
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| format!("reading pause state {}", path.display()));
        }
    };
    let state: PauseState = serde_json::from_slice(&text).with_context(|| {
        format!(
            "pause state {} is not valid; inspect it, then delete it or pass -a to unpause \
             the nodes directly",
            path.display()
        )
    })?;
    anyhow::ensure!(
        state.version == VERSION,
        "pause state {} has version {}, this stillpoint reads version {VERSION}",
        path.display(),
        state.version
    );
    // Parsed is not enough: a value no pause could have written (edited, or damaged
    // in a way JSON still accepts) must not reach a hold, a release or a verdict.
    let checked = state
        .record
        .check()
        .and_then(|()| check_time_ms("renewed_at_ms", state.renewed_at_ms))
        .and_then(|()| match state.min_window_ms {
            Some(min) if min > MAX_MIN_WINDOW_MS => {
                Err(format!("min_window_ms {min} is more than a week"))
            }
            _ => Ok(()),
        });
    if let Err(problem) = checked {
        anyhow::bail!(
            "pause state {} is not valid: {problem}; inspect it, then delete it or pass -a \
             to unpause the nodes directly",
            path.display()
        );
    }
    Ok(Some(state))
}

pub fn save(path: &Path, state: &PauseState) -> anyhow::Result<()> {
    let directory = parent(path);
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating state directory {}", directory.display()))?;
    let text = serde_json::to_string_pretty(state)?;
    // A temp file of this process's own: two writers never share one.
    let mut temporary = tempfile::Builder::new()
        .prefix(".pause-state-")
        .tempfile_in(directory)
        .and_then(|mut file| file.write_all(text.as_bytes()).map(|()| file))
        .with_context(|| format!("writing pause state {}", path.display()))?;
    temporary
        .as_file_mut()
        .sync_all()
        .with_context(|| format!("writing pause state {}", path.display()))?;
    temporary
        .persist(path)
        .map(drop)
        .with_context(|| format!("writing pause state {}", path.display()))
}

pub fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing pause state {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The right to use a state file: an exclusive `flock` on `<state file>.lock`, held by
/// `pause` from before it looks at the file until its record is saved (or the pause
/// failed), and by `unpause` for its whole run, so that a pause and an unpause sharing
/// one file never interleave. The kernel drops the lock when its process ends, however
/// it ends, so a killed holder never leaves a stale claim. The lock file itself stays:
/// deleting it would let two processes lock two different files of the same name.
#[derive(Debug)]
pub struct Claim {
    _lock: std::fs::File,
}

/// Claims `path` for `command` (`pause`, `unpause`); refused, naming the holder, while
/// another process holds it.
pub fn claim(path: &Path, command: &str) -> anyhow::Result<Claim> {
    let directory = parent(path);
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating state directory {}", directory.display()))?;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .with_context(|| format!("opening {}", lock.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the message of whoever is refused; not read otherwise.
            let _ = file.set_len(0);
            let _ = writeln!(
                file,
                "pid {} running `stillpoint {command}`",
                std::process::id()
            );
            Ok(Claim { _lock: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock).unwrap_or_default();
            let holder = holder.trim();
            anyhow::bail!(
                "the state file {} is in use by another stillpoint ({}); wait for it to \
                 finish, or pass another --state-file",
                path.display(),
                if holder.is_empty() {
                    "pid unknown"
                } else {
                    holder
                },
            )
        }
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", lock.display()))
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
