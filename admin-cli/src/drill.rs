//! `stillpoint drill`: restore a backup into scratch targets, check it, and report as
//! a table for people, JSON for scripts and JUnit XML for CI (one test case per check).
//! SIGINT/SIGTERM stop it after it removed its scratch targets; `--cleanup` removes
//! those of drills that were killed outright.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use stillpoint::drill::{self, DrillReport};

use crate::args::OutputFormat;
use crate::exit::{self, Failure};
use crate::output::print_json;
use crate::remote::ServerArgs;
use crate::restore::open_backup;

#[derive(Debug, Clone, Args)]
pub struct DrillArgs {
    /// A backup id, or `latest` (the newest backup that is a valid restore point).
    /// Not with --server: the service drills its newest point, else its newest backup.
    #[arg(required_unless_present_any = ["cleanup", "point", "server"], conflicts_with = "server")]
    pub backup: Option<String>,
    /// Drill a point instead of a backup: its id, `latest`, or a time (RFC 3339). Each
    /// PostgreSQL database is replayed from its base backup into a scratch server, the
    /// runbook's [drill] checks run on them, and RTO is reported.
    #[arg(long, value_name = "ID|latest|TIME", conflicts_with_all = ["backup", "cleanup", "keep"])]
    pub point: Option<String>,
    /// --point: give up if replay has not reached the point by then.
    #[arg(long, default_value = "10m", value_parser = crate::args::duration, value_name = "DURATION")]
    pub timeout: std::time::Duration,
    /// Instead of a drill: find the scratch databases and directories that drills
    /// killed outright (SIGKILL, a crash) left on the runbook's drill servers and in
    /// its scratch directory (their names begin with `stillpoint_drill_` /
    /// `stillpoint-drill-`), and remove them. Targets a running drill holds are left
    /// alone and listed as in use.
    #[arg(long, conflicts_with_all = ["backup", "junit", "keep", "server"])]
    pub cleanup: bool,
    /// The runbook: storage, keys, databases, and the `[drill]` checks (not with
    /// --server).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "server"
    )]
    pub config: Option<PathBuf>,
    /// Also write the checks as JUnit XML, one test case per check, for CI.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Leave the scratch targets in place (their names are in the report).
    #[arg(long)]
    pub keep: bool,
    /// `text` for people (with a progress bar per database on a terminal), `json` for
    /// scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: print the queued job and exit without waiting for it.
    #[arg(long, requires = "server")]
    pub no_wait: bool,
}

pub async fn drill(args: DrillArgs) -> Result<u8, Failure> {
    if let Some(remote) = args.server.remote()? {
        return remote.trigger("drill", args.no_wait, args.output).await;
    }
    if let Some(point) = &args.point {
        return crate::points::drill_point(&args, point).await;
    }
    let Some(backup) = &args.backup else {
        return cleanup(&args).await;
    };
    let (runbook, storage, manifest) =
        open_backup(crate::backup::config_path(&args.config)?, backup).await?;
    let decryption = stillpoint::backup::decryption(&runbook)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    // Opened now, not after the drill: a path that cannot be written must not cost a
    // whole drill (and its report) to find out.
    let junit = match &args.junit {
        Some(path) => Some((
            path,
            std::fs::File::create(path).map_err(|error| {
                Failure::new(
                    exit::USAGE,
                    anyhow::anyhow!(
                        "cannot write the JUnit report {}: {error}; nothing was restored",
                        path.display()
                    ),
                )
            })?,
        )),
        None => None,
    };
    if args.output == OutputFormat::Text {
        crate::errln!(
            "drill of backup {}: restoring {} databases into scratch targets …",
            manifest.backup_id,
            manifest.databases.len()
        );
    }
    let (bars, progress) = crate::backup::progress(args.output, "drill");
    let report = crate::signal::run_cancellable(|cancel| {
        drill::run(
            &runbook,
            &storage,
            &manifest,
            &decryption,
            args.keep,
            cancel,
            progress,
        )
    })
    .await;
    if let Some(bars) = &bars {
        bars.clear();
    }
    let report = report.map_err(|error| match error {
        drill::DrillError::Interrupted { .. } => Failure::new(exit::ERROR, error),
        drill::DrillError::Setup(_) => Failure::new(exit::USAGE, error),
    })?;
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => crate::output::write_stdout(&render_text(&report)),
    }
    // After the report is out, so that a failure here does not lose it.
    if let Some((path, file)) = junit {
        write_junit(path, file, &report)?;
    }
    Ok(if report.ok {
        exit::OK
    } else {
        exit::DRILL_FAILED
    })
}

/// `stillpoint drill --cleanup`.
async fn cleanup(args: &DrillArgs) -> Result<u8, Failure> {
    let runbook = crate::backup::load_runbook(crate::backup::config_path(&args.config)?)?;
    let report = drill::cleanup(&runbook).await;
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => {
            if report.removed.is_empty() && report.failed.is_empty() && report.in_use.is_empty() {
                crate::outln!("no scratch targets of earlier drills found");
            }
            for in_use in &report.in_use {
                crate::outln!("left alone, in use: {in_use}");
            }
            for removed in &report.removed {
                crate::outln!("removed {removed}");
            }
            for failed in &report.failed {
                crate::outln!("NOT removed: {failed}");
            }
            for why in &report.not_searched {
                crate::outln!("not searched: {why}");
            }
        }
    }
    Ok(
        if report.failed.is_empty() && report.not_searched.is_empty() {
            exit::OK
        } else {
            exit::ERROR
        },
    )
}

pub fn render_text(report: &DrillReport) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "drill of backup {} ({}): {}",
        report.backup_id,
        report.cluster,
        if report.ok { "PASSED" } else { "FAILED" }
    );
    let _ = writeln!(
        text,
        "  restore point {}, {} old (RPO at drill time)",
        report.restore_point_date_time.as_deref().unwrap_or("none"),
        report
            .rpo_ms
            .map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0))
    );
    let _ = writeln!(
        text,
        "  restore time (RTO) {:.1}s for {} databases in parallel; drill {:.1}s in all",
        report.rto_ms as f64 / 1000.0,
        report.databases.len(),
        report.total_ms as f64 / 1000.0
    );
    for database in &report.databases {
        match &database.restore {
            Some(restore) => {
                let _ = writeln!(
                    text,
                    "  {:<12} {:<9} restored in {:.1}s",
                    database.name,
                    database.adapter,
                    restore.total_ms as f64 / 1000.0
                );
            }
            None => {
                let _ = writeln!(
                    text,
                    "  {:<12} {:<9} NOT restored: {}",
                    database.name,
                    database.adapter,
                    database.error.as_deref().unwrap_or("?")
                );
            }
        }
    }
    let width = report
        .checks
        .iter()
        .map(|check| check.name.len())
        .max()
        .unwrap_or(0);
    for check in &report.checks {
        let _ = writeln!(
            text,
            "  {} {:<width$}  {}",
            if check.ok { "ok  " } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    for left in &report.left_behind {
        let _ = writeln!(text, "  left in place: {left}");
    }
    for leftover in &report.leftovers {
        let _ = writeln!(
            text,
            "  left by an earlier drill: {leftover} (`stillpoint drill --cleanup` removes it)"
        );
    }
    text
}

fn write_junit(path: &Path, mut file: std::fs::File, report: &DrillReport) -> Result<(), Failure> {
    use std::io::Write;
    file.write_all(junit(report).as_bytes()).map_err(|error| {
        Failure::new(
            exit::ERROR,
            anyhow::anyhow!("writing the JUnit report {}: {error}", path.display()),
        )
    })
}

/// JUnit XML as CI servers read it: one suite for the drill, one case per check, a
/// `<failure>` with the check's detail for each that failed.
pub fn junit(report: &DrillReport) -> String {
    let failures = report.checks.iter().filter(|check| !check.ok).count();
    let suite = format!("stillpoint drill {}", report.backup_id);
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuites name=\"stillpoint drill\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">",
        report.checks.len(),
        report.total_ms as f64 / 1000.0
    );
    let _ = writeln!(
        xml,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{:.3}\">",
        escape(&suite),
        report.checks.len(),
        report.total_ms as f64 / 1000.0
    );
    for check in &report.checks {
        let _ = write!(
            xml,
            "    <testcase classname=\"stillpoint.drill.{}\" name=\"{}\" time=\"{:.3}\"",
            escape(&report.cluster),
            escape(&check.name),
            check.duration_ms as f64 / 1000.0
        );
        if check.ok {
            let _ = writeln!(xml, "/>");
        } else {
            let _ = writeln!(
                xml,
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                escape(&check.detail),
                escape(&check.detail)
            );
        }
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 cannot carry other control characters at all.
            c if c.is_control() && !matches!(c, '\n' | '\t' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint::drill::CheckResult;

    fn report(checks: Vec<CheckResult>) -> DrillReport {
        DrillReport {
            backup_id: "20260101T000000Z-abcdef".to_owned(),
            cluster: "ledger".to_owned(),
            ok: checks.iter().all(|c| c.ok),
            restore_point_timestamp_ms: None,
            restore_point_date_time: None,
            window_valid: true,
            rpo_ms: None,
            rto_ms: 0,
            total_ms: 1500,
            databases: Vec::new(),
            checks,
            left_behind: Vec::new(),
            leftovers: Vec::new(),
        }
    }

    #[test]
    fn junit_has_one_case_per_check_and_escapes_failures() {
        let xml = junit(&report(vec![
            CheckResult {
                name: "checksum:ledger".to_owned(),
                ok: true,
                detail: "fine".to_owned(),
                duration_ms: 5,
            },
            CheckResult {
                name: "ledger_matches_auditor".to_owned(),
                ok: false,
                detail: "ledger <4 rows> & \"auditor\"".to_owned(),
                duration_ms: 20,
            },
        ]));
        assert_eq!(xml.matches("<testcase ").count(), 2, "{xml}");
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert!(
            xml.contains("<failure message=\"ledger &lt;4 rows&gt; &amp; &quot;auditor&quot;\">"),
            "{xml}"
        );
        assert!(
            xml.contains("name=\"checksum:ledger\" time=\"0.005\"/>"),
            "{xml}"
        );
    }
}
