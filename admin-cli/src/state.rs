//! The state file: how a plain `stillpoint pause` hands its open window to a later
//! `stillpoint unpause`, possibly from another shell or host step of a runbook.
//!
//! Written atomically (temp file + rename) so a crash never leaves half a record.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use stillpoint::coordinator::PauseRecord;

const VERSION: u32 = 1;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PauseState {
    pub version: u32,
    pub record: PauseRecord,
    /// When the lease was last renewed, on this host's clock.
    pub renewed_at_ms: i64,
}

impl PauseState {
    pub fn new(record: PauseRecord, renewed_at_ms: i64) -> Self {
        Self {
            version: VERSION,
            record,
            renewed_at_ms,
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
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| format!("reading pause state {}", path.display()));
        }
    };
    let state: PauseState = serde_json::from_str(&text).with_context(|| {
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
    Ok(Some(state))
}

pub fn save(path: &Path, state: &PauseState) -> anyhow::Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating state directory {}", directory.display()))?;
    let temporary = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(state)?;
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
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
