//! Rendering reports: one JSON object on stdout for machines, a short summary for
//! people. Nothing here decides anything. Also how a command ends when whoever reads
//! its stdout goes away (`stillpoint list | head -1`): quietly, and with the exit
//! code its outcome calls for: what [`print_json`], [`print_report`] and [`outln!`]
//! print into a closed pipe is dropped, and the command goes on to its end, so a
//! failed backup or a damaged verify still exits non-zero.

use std::any::Any;
use std::fmt::Write as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;

use stillpoint::coordinator::{NodeOutcome, PauseReport};

use crate::args::OutputFormat;

/// Runs a command to its end. Reports go through [`write_stdout`], which drops what
/// a closed stdout cannot take, so the command ends with its own exit code. Lines
/// still printed with `println!` panic on a closed stdout (Rust ignores SIGPIPE, so
/// the write fails with EPIPE, and `println!` turns that into a panic): that panic is
/// caught here, after it has unwound (every destructor, a held pause's release among
/// them, has run), and ends the command quietly with exit 0. ripgrep's `main.rs` ends
/// the same way, from an error rather than a panic. Any other failed write to stdout
/// (a full disk behind `> window.json`) is caught the same way but is an error: the
/// report was lost, so the command says so and exits 1, without a panic's backtrace.
pub async fn quiet_on_closed_stdout<F>(command: F) -> Result<u8, crate::exit::Failure>
where
    F: Future<Output = Result<u8, crate::exit::Failure>>,
{
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !is_failed_stdout(info.payload_as_str()) {
                default(info);
            }
        }));
    });
    match AssertUnwindSafe(command).catch_unwind().await {
        Ok(result) => result,
        Err(panic) if is_closed_stdout(panic_text(&*panic)) => Ok(crate::exit::OK),
        Err(panic) if is_failed_stdout(panic_text(&*panic)) => Err(crate::exit::Failure::new(
            crate::exit::ERROR,
            anyhow::anyhow!(
                "cannot write the output to stdout{}",
                panic_text(&*panic)
                    .and_then(|text| text.strip_prefix(STDOUT_PANIC))
                    .unwrap_or_default()
            ),
        )),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> Option<&str> {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
}

/// How `println!` (and [`write_stdout`]) begin their panic on a failed write.
const STDOUT_PANIC: &str = "failed printing to stdout";

/// `println!`'s panic on any failed write to stdout.
fn is_failed_stdout(message: Option<&str>) -> bool {
    message.is_some_and(|message| message.starts_with(STDOUT_PANIC))
}

/// `println!`'s panic when stdout's reader has gone: "failed printing to stdout:
/// Broken pipe (os error 32)".
fn is_closed_stdout(message: Option<&str>) -> bool {
    is_failed_stdout(message)
        && message.is_some_and(|message| message.to_ascii_lowercase().contains("broken pipe"))
}

/// Writes `text` to stdout. Once stdout's reader has gone (EPIPE) the text is
/// dropped, and the command carries on to its own exit code; any other write error
/// (a full disk behind a redirection) panics, as `println!` does, and
/// [`quiet_on_closed_stdout`] turns that panic into an error (exit 1).
pub fn write_stdout(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(error) => panic!("{STDOUT_PANIC}: {error}"),
    }
}

/// Writes `text` to stderr, ignoring any error: a closed stderr (`2>&1 | head -1`)
/// has nobody to tell, and `eprintln!` would panic there, ending a command that may
/// hold a paused cluster.
pub fn write_stderr(text: &str) {
    use std::io::Write as _;
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_all(text.as_bytes())
        .and_then(|()| stderr.flush());
}

/// `eprintln!` through [`write_stderr`]: a closed stderr does not end the command.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_stderr(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// Log output for tracing: stderr, with write errors ignored. tracing-subscriber
/// reports a failed write with `eprintln!`, which panics on a closed stderr; inside a
/// destructor (the paused cluster's release on drop logs first) that panic aborts the
/// process before the release.
pub struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_stderr_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_stderr_bytes(bytes: &[u8]) {
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// `println!` through [`write_stdout`]: a closed stdout does not end the command.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_stdout("\n")
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

pub fn print_json(value: &impl serde::Serialize) {
    write_stdout(&format!(
        "{}\n",
        serde_json::to_string_pretty(value).expect("reports serialize")
    ));
}

pub fn print_report(report: &PauseReport, format: OutputFormat) {
    match format {
        OutputFormat::Json => print_json(report),
        OutputFormat::Text => write_stdout(&render_text(report)),
    }
}

pub fn render_text(report: &PauseReport) -> String {
    let mut text = String::new();
    let verdict = match (
        report.pause_start_timestamp_ms,
        report.pause_end_timestamp_ms,
    ) {
        (None, _) => "FAILED — nothing is paused".to_owned(),
        (Some(_), None) => "PAUSED — window open".to_owned(),
        (Some(_), Some(_)) if report.window_valid => {
            "window closed — valid restore point".to_owned()
        }
        (Some(_), Some(_)) => "window closed — NOT a valid restore point".to_owned(),
    };
    let _ = writeln!(text, "pause {}: {verdict}", report.pause_id);
    if let Some(start) = &report.pause_start_date_time {
        let _ = writeln!(text, "  start         {start}");
    }
    if let Some(end) = &report.pause_end_date_time {
        let _ = writeln!(
            text,
            "  end           {end}  ({}ms)",
            report.window_ms.unwrap_or_default()
        );
    }
    if let (Some(point), Some(ms)) = (
        &report.restore_point_date_time,
        report.restore_point_timestamp_ms,
    ) {
        let _ = writeln!(text, "  restore point {point}  ({ms})");
    }
    if let Some(bound) = report.skew_bound_ms {
        let _ = writeln!(text, "  clock skew    ±{bound}ms");
    }
    if let Some(expiry) = report.lease_expires_at_ms {
        let seconds =
            (expiry - stillpoint::time::unix_ms(std::time::SystemTime::now())).max(0) / 1000;
        let _ = writeln!(
            text,
            "  lease         nodes reopen by themselves in {seconds}s unless renewed or released"
        );
    }
    for node in &report.nodes {
        let outcome = match node.outcome {
            NodeOutcome::Paused => "paused",
            NodeOutcome::Released => "released",
            NodeOutcome::ReleaseFailed => "RELEASE FAILED",
            NodeOutcome::Failed => "FAILED",
            NodeOutcome::RolledBack => "rolled back",
            NodeOutcome::RollbackFailed => "ROLLBACK FAILED",
            NodeOutcome::NotAttempted => "not attempted",
        };
        let _ = write!(
            text,
            "  tier {} {:<22} {outcome}",
            node.tier,
            node.address.to_string()
        );
        if let Some(drained) = node.drained_in_flight {
            let _ = write!(text, ", drained {drained}");
        }
        if let (Some(offset), Some(rtt)) = (node.clock_offset_ms, node.rtt_ms) {
            let _ = write!(text, ", clock {offset:+}ms (rtt {rtt}ms)");
        }
        if node.stayed_paused == Some(false) {
            let _ = write!(text, ", did NOT stay paused");
        }
        if let Some(error) = &node.error {
            let _ = write!(text, ": {error}");
        }
        text.push('\n');
    }
    for reason in &report.invalid_reasons {
        let _ = writeln!(text, "  ! {reason}");
    }
    for warning in &report.warnings {
        let _ = writeln!(text, "  warning: {warning}");
    }
    text
}
