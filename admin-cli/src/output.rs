//! Rendering reports: one JSON object on stdout for machines, a short summary for
//! people. Nothing here decides anything.

use std::fmt::Write as _;

use stillpoint::coordinator::{NodeOutcome, PauseReport};

use crate::args::OutputFormat;

pub fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialize")
    );
}

pub fn print_report(report: &PauseReport, format: OutputFormat) {
    match format {
        OutputFormat::Json => print_json(report),
        OutputFormat::Text => print!("{}", render_text(report)),
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
