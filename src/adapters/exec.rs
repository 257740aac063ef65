//! Exec adapter: the operator's own commands, for databases stillpoint has no adapter
//! for (or a storage snapshot, or a "flush and note the position" script).
//!
//! - prepare: nothing to connect; the commands run later.
//! - cut: `sh -c <cut>` inside the pause with `STILLPOINT_BACKUP_ID` and
//!   `STILLPOINT_DATABASE` set, killed (with everything it started) after
//!   `cut_timeout`. Exit 0 is required; its trimmed stdout (at most 64 KiB) becomes the
//!   marker's `output`.
//! - copy: `sh -c <copy>` after unpause with the same variables; its stdout is the
//!   copy and `finished` is its exit status. Without a copy command the stream is
//!   empty and the summary has no row counts: the cut alone is the backup (e.g. the
//!   hook took a storage snapshot), and the caller may record no artifact.
//! - restore: `sh -c <restore>` with the copy on stdin and `STILLPOINT_RESTORE_TARGET`
//!   set.
//!
//! Every hook runs with a minimal environment ([`MINIMAL_ENVIRONMENT`], `LC_*`), the
//! variables above, the runbook's `pass_env` names and its `env` values; nothing else
//! of stillpoint's environment (where AWS keys, PGPASSWORD and the admin token live).
//! A hook is done when its command exits, even if a helper it started in the
//! background still holds its stderr (or, for a cut, its stdout). A copy's stdout is
//! the copy itself: if a helper still holds it 5 s after the command exited, the end
//! of the copy cannot be told and the copy fails, saying so, instead of waiting. The cut's output is stored in the manifest in
//! clear: it must not be a secret.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use futures::FutureExt;
use tokio::process::Command;

use super::process::{self, GroupKiller, OUTPUT_LIMIT};
use super::{
    Adapter, AdapterError, ByteStream, Copy, CopySummary, CutMarker, ExecConfig, Prepared,
};

pub struct Exec {
    name: String,
    config: ExecConfig,
}

impl Exec {
    pub fn new(name: &str, config: ExecConfig) -> Self {
        Exec {
            name: name.to_owned(),
            config,
        }
    }
}

#[async_trait::async_trait]
impl Adapter for Exec {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "exec"
    }

    fn artifact_extension(&self) -> &'static str {
        "bin"
    }

    async fn prepare(&self) -> Result<Box<dyn Prepared>, AdapterError> {
        if self.config.cut.trim().is_empty() {
            return Err(AdapterError::Prepare {
                database: self.name.clone(),
                message: "the exec adapter's `cut` command is empty".to_owned(),
            });
        }
        Ok(Box::new(ExecPrepared {
            name: self.name.clone(),
            config: self.config.clone(),
            backup_id: None,
        }))
    }

    async fn restore(&self, copy: ByteStream, target: &str) -> Result<(), AdapterError> {
        let err = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        let Some(restore) = &self.config.restore else {
            return Err(err(
                "no restore command is configured (set `restore` for this database in the runbook)"
                    .to_owned(),
            ));
        };
        let mut cmd = shell(restore, &self.config);
        cmd.env("STILLPOINT_DATABASE", &self.name)
            .env("STILLPOINT_RESTORE_TARGET", target);
        process::run_with_stdin(cmd, "the restore command", copy, true)
            .await
            .map_err(err)
    }

    /// An empty directory: what the target means is up to the restore command.
    async fn create_scratch(
        &self,
        label: &str,
        dir: &Path,
        _cut: &CutMarker,
    ) -> Result<String, AdapterError> {
        let target = dir.join(label);
        tokio::fs::create_dir_all(&target)
            .await
            .map_err(|e| AdapterError::Restore {
                database: self.name.clone(),
                message: format!("creating {}: {e}", target.display()),
            })?;
        Ok(target.display().to_string())
    }
}

struct ExecPrepared {
    name: String,
    config: ExecConfig,
    /// Set by the cut; the copy command gets the same id.
    backup_id: Option<String>,
}

#[async_trait::async_trait]
impl Prepared for ExecPrepared {
    async fn cut(&mut self, backup_id: &str) -> Result<CutMarker, AdapterError> {
        let err = |message: String| AdapterError::Cut {
            database: self.name.clone(),
            message,
        };
        let mut cmd = shell(&self.config.cut, &self.config);
        cmd.env("STILLPOINT_BACKUP_ID", backup_id)
            .env("STILLPOINT_DATABASE", &self.name)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("starting the cut command: {e}")))?;
        let mut group = GroupKiller::new(&child);

        // Done when the command exits, even if a helper it left running in the
        // background still holds its stdout or stderr.
        let run = process::wait_with_output(&mut child, OUTPUT_LIMIT);
        let Ok(outcome) = tokio::time::timeout(self.config.cut_timeout, run).await else {
            // Inside the pause every second counts: kill the whole group (sh and
            // anything it started), reap sh, and fail the cut.
            group.kill().await;
            let _ = child.wait().await;
            return Err(err(format!(
                "the cut command timed out after {} and was killed (raise cut_timeout if it \
                 legitimately needs longer)",
                human(self.config.cut_timeout)
            )));
        };
        let (status, out, errout) =
            outcome.map_err(|e| err(format!("waiting for the cut command: {e}")))?;
        group.disarm();
        let stderr = errout.text();
        if !status.success() {
            return Err(err(process::describe_failure(
                "the cut command",
                status,
                &stderr,
            )));
        }
        let mut details = BTreeMap::new();
        details.insert("output".to_owned(), out.text());
        if out.truncated {
            // The marker must not pretend to be the whole output.
            details.insert(
                "output_truncated_at_bytes".to_owned(),
                OUTPUT_LIMIT.to_string(),
            );
        }
        self.backup_id = Some(backup_id.to_owned());
        Ok(CutMarker {
            kind: "exec".to_owned(),
            details,
        })
    }

    async fn copy(self: Box<Self>) -> Result<Copy, AdapterError> {
        let name = self.name.clone();
        let err = |message: String| AdapterError::Copy {
            database: name.clone(),
            message,
        };
        let Some(backup_id) = self.backup_id else {
            return Err(err("copy was called before a successful cut".to_owned()));
        };
        let Some(copy) = &self.config.copy else {
            return Ok(Copy {
                stream: Box::pin(tokio::io::empty()),
                finished: futures::future::ready(Ok(CopySummary::default())).boxed(),
            });
        };
        let mut cmd = shell(copy, &self.config);
        cmd.env("STILLPOINT_BACKUP_ID", &backup_id)
            .env("STILLPOINT_DATABASE", &self.name);
        let (stream, producer) = process::spawn_producer(cmd, "the copy command", true)
            .map_err(|e| err(format!("starting the copy command: {e}")))?;
        let finished = async move {
            producer
                .wait()
                .await
                .map_err(|message| AdapterError::Copy {
                    database: name,
                    message,
                })?;
            Ok(CopySummary::default())
        }
        .boxed();
        Ok(Copy { stream, finished })
    }
}

/// `sh -c script` with the hooks' environment: [`MINIMAL_ENVIRONMENT`] and `LC_*` as
/// stillpoint has them, the runbook's `pass_env` names, then its `env` values.
fn shell(script: &str, config: &ExecConfig) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .env_clear()
        .envs(hook_environment(std::env::vars_os(), config));
    cmd
}

/// What a hook inherits from stillpoint's environment without being told: enough for
/// a shell script to find programs, its home and its locale, and nothing that is a
/// secret. stillpoint's environment often holds AWS keys, PGPASSWORD and the admin
/// token; a hook gets those only if the runbook names them in `pass_env`.
pub const MINIMAL_ENVIRONMENT: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR",
];

/// The hook environment built from `parent` (stillpoint's own) and the runbook.
fn hook_environment(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    config: &ExecConfig,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = parent
        .into_iter()
        .filter(|(name, _)| {
            let name = name.to_string_lossy();
            MINIMAL_ENVIRONMENT.contains(&name.as_ref())
                || name.starts_with("LC_")
                || config.pass_env.iter().any(|passed| *passed == name)
        })
        .collect();
    env.extend(
        config
            .env
            .iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value))),
    );
    env
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests;
