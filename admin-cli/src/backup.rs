//! `stillpoint backup`: runs a runbook's backup, with progress bars on a terminal and
//! quiet JSON otherwise, and picks the exit code from how it ended.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use stillpoint::backup::{self, BackupError, Progress};
use stillpoint::manifest::Manifest;
use stillpoint::runbook::Runbook;
use stillpoint::storage::redact_url;
use tokio_util::sync::CancellationToken;

use crate::args::{OutputFormat, zone_arg};
use crate::exit::{self, Failure};
use crate::output::{print_json, render_text};
use crate::remote::ServerArgs;
use crate::signal::{Interrupts, unless_interrupted_again};

#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// The runbook (TOML) naming the cluster, its databases and the storage (not
    /// with --server).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "server"
    )]
    pub config: Option<PathBuf>,
    /// `text` for people (with progress bars on a terminal), `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// IANA time zone for printed times.
    #[arg(long, default_value = "UTC", value_parser = zone_arg, value_name = "ZONE")]
    pub time_zone: stillpoint::time::Zone,
    /// UNSAFE, for negative controls: cut the databases one after another without
    /// pausing the cluster. The backup is marked unsafe, never `latest`, and its
    /// drill is expected to fail. Refused without --i-know-this-is-unsafe.
    #[arg(long)]
    pub no_pause: bool,
    /// Confirms --no-pause.
    #[arg(long, requires = "no_pause")]
    pub i_know_this_is_unsafe: bool,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: print the queued job and exit without waiting for it.
    #[arg(long, requires = "server")]
    pub no_wait: bool,
}

/// The runbook `--config` names. Clap asks for it unless `--server` is given, and
/// every `--server` path returns before a runbook is read.
pub fn config_path(config: &Option<PathBuf>) -> Result<&std::path::Path, Failure> {
    config.as_deref().ok_or_else(|| {
        Failure::new(
            exit::USAGE,
            anyhow::anyhow!("give the runbook with --config FILE (or a service with --server URL)"),
        )
    })
}

pub fn load_runbook(path: &std::path::Path) -> Result<Runbook, Failure> {
    Runbook::load(path).map_err(|error| Failure::new(exit::USAGE, error))
}

pub async fn backup(args: BackupArgs) -> Result<u8, Failure> {
    if let Some(remote) = args.server.remote()? {
        return remote.trigger("backup", args.no_wait, args.output).await;
    }
    let runbook = load_runbook(config_path(&args.config)?)?;
    let (bars, progress) = progress(args.output, "backup");
    let mode = match (args.no_pause, args.i_know_this_is_unsafe) {
        (false, _) => backup::Mode::Paused,
        (true, true) => {
            crate::errln!(
                "WARNING: --no-pause: the cluster is NOT paused; this copy is not a \
                 consistent restore point and is marked unsafe"
            );
            backup::Mode::UnsafeNoPause
        }
        (true, false) => {
            return Err(Failure::new(
                exit::USAGE,
                anyhow::anyhow!(
                    "--no-pause takes copies that need not agree with each other; it exists \
                     to show what the pause prevents. Add --i-know-this-is-unsafe to run it"
                ),
            ));
        }
    };
    // SIGINT/SIGTERM (Ctrl-C, systemd, Kubernetes, `timeout`) stop the backup through
    // its cancellation token: a paused cluster is released at once instead of waiting
    // for its lease, child processes are killed and the partial backup is removed. A
    // second signal stops waiting for that.
    let mut interrupts = Interrupts::new()
        .map_err(|error| anyhow::anyhow!("cannot listen for SIGINT/SIGTERM: {error}"))?;
    let cancel = CancellationToken::new();
    let work = backup::run_cancellable(&runbook, mode, progress, &cancel);
    tokio::pin!(work);
    let result = tokio::select! {
        result = &mut work => result,
        () = interrupts.recv() => {
            crate::errln!(
                "interrupted: stopping the backup, releasing the cluster and removing the \
                 partial backup (interrupt again to stop waiting)"
            );
            cancel.cancel();
            match unless_interrupted_again(&mut work, &mut interrupts).await {
                Some(result) => result,
                None => {
                    if let Some(bars) = bars {
                        bars.clear();
                    }
                    return Err(Failure::new(
                        exit::ERROR,
                        anyhow::anyhow!(
                            "interrupted twice: stopped without waiting for the clean-up; \
                             nodes still paused reopen when their lease expires, and \
                             `stillpoint prune` removes the partial backup once it has been \
                             left alone for an hour"
                        ),
                    ));
                }
            }
        }
    };
    if let Some(bars) = bars {
        bars.clear();
    }
    match result {
        Ok(manifest) => {
            print_manifest(&manifest, &runbook, args.output);
            Ok(exit::OK)
        }
        Err(error) => {
            if let Some(window) = error.window() {
                match args.output {
                    OutputFormat::Json => print_json(
                        &serde_json::json!({ "error": error.to_string(), "window": window }),
                    ),
                    OutputFormat::Text => crate::output::write_stderr(&render_text(window)),
                }
            } else if args.output == OutputFormat::Json {
                print_json(&serde_json::json!({ "error": error.to_string() }));
            }
            Err(Failure::new(exit_code(&error), error))
        }
    }
}

fn exit_code(error: &BackupError) -> u8 {
    match error {
        BackupError::Setup(_) | BackupError::Pipeline(_) => exit::USAGE,
        BackupError::Pause(failure) if !failure.rolled_back => exit::UNPAUSE_FAILED,
        BackupError::Pause(_) => exit::PAUSE_FAILED,
        BackupError::Interrupted { .. } => exit::ERROR,
        BackupError::Unpause { .. } => exit::UNPAUSE_FAILED,
        BackupError::WindowInvalid { .. } => exit::WINDOW_INVALID,
        BackupError::Prepare(_)
        | BackupError::Storage { .. }
        | BackupError::Cut { .. }
        | BackupError::Copy { .. }
        | BackupError::Commit { .. } => exit::BACKUP_FAILED,
    }
}

fn print_manifest(manifest: &Manifest, runbook: &Runbook, format: OutputFormat) {
    match format {
        OutputFormat::Json => print_json(&serde_json::json!({
            "backup_id": manifest.backup_id,
            // Storage::open refuses URLs with credentials; redacting anyway keeps this
            // line safe if that ever changes.
            "storage": redact_url(&runbook.storage.url),
            "manifest": manifest,
        })),
        OutputFormat::Text => {
            crate::outln!(
                "backup {} committed to {}",
                manifest.backup_id,
                redact_url(&runbook.storage.url)
            );
            crate::output::write_stdout(&render_text(&manifest.window));
            for database in &manifest.databases {
                let size =
                    database
                        .artifact
                        .as_ref()
                        .map_or("no artifact".to_owned(), |artifact| {
                            format!(
                                "{} → {} stored",
                                human_bytes(artifact.size),
                                human_bytes(artifact.stored_size)
                            )
                        });
                let cut: Vec<String> = database
                    .cut
                    .details
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                crate::outln!(
                    "  {:<12} {:<9} {size}; cut {}",
                    database.name,
                    database.adapter,
                    cut.join(" ")
                );
            }
            let timings = &manifest.timings;
            crate::outln!(
                "  timings: prepare {}ms, paused {}ms (cut {}ms), copy {}ms, total {}ms",
                timings.prepare_ms,
                timings.pause_ms,
                timings.cut_ms,
                timings.copy_ms,
                timings.total_ms
            );
        }
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Progress bars on stderr when it is a terminal and the output is for people;
/// otherwise progress goes to the log (at info, not shown by default), so that a
/// redirected stderr carries no bar noise. `command` names the log lines.
pub(crate) fn progress(
    output: OutputFormat,
    command: &'static str,
) -> (Option<Bars>, backup::ProgressSink) {
    let bars =
        (output == OutputFormat::Text && std::io::stderr().is_terminal()).then(Bars::default);
    let sink: backup::ProgressSink = match &bars {
        Some(bars) => {
            let bars = bars.clone();
            Arc::new(move |event| bars.show(event))
        }
        None => Arc::new(move |event| tracing::info!(?event, command, "progress")),
    };
    (bars, sink)
}

/// One spinner per database while copying (or restoring), on stderr.
#[derive(Clone, Default)]
pub(crate) struct Bars {
    multi: MultiProgress,
    bars: Arc<Mutex<HashMap<String, ProgressBar>>>,
}

impl Bars {
    fn show(&self, event: Progress) {
        match event {
            Progress::Phase(phase) => {
                let _ = self.multi.println(format!("… {phase}"));
            }
            Progress::Copied { database, bytes } => {
                let mut bars = self
                    .bars
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let bar = bars.entry(database.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix:<12} {bytes} ({bytes_per_sec})",
                        )
                        .expect("valid template"),
                    );
                    bar.set_prefix(database);
                    bar
                });
                bar.set_position(bytes);
                bar.tick();
            }
            Progress::CopyDone { database } => {
                if let Some(bar) = self
                    .bars
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .get(&database)
                {
                    bar.finish();
                }
            }
        }
    }

    pub(crate) fn clear(&self) {
        let _ = self.multi.clear();
    }
}
