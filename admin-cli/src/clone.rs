//! `stillpoint clone`: every database of a point into the new databases another
//! runbook names, all of them or none (`stillpoint::points::clone`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use stillpoint::points::clone::{self, CloneRequest, NOTE_TABLE};

use crate::args::{OutputFormat, duration};
use crate::backup::load_runbook;
use crate::exit::{self, Failure};
use crate::output::print_json;
use crate::points::{open_storage, resolve_point, restore_code, run_as};
use crate::signal::run_cancellable;

pub const EXAMPLE: &str = "\
Example:
  stillpoint clone --point latest --source prod.toml --config staging.toml

staging.toml names a database for each of the point's, by the same name and adapter,
with the URL of a new database (or a new SQLite file):

  [[databases]]
  name = \"ledger\"
  adapter = \"postgres\"
  url = \"postgres://clone@staging-pg:5432/ledger_20261201\"

Each clone holds a table stillpoint_clone (field, value): the point, its time, the
source cluster and database, the base backup, when it was cloned.";

#[derive(Debug, Clone, Args)]
pub struct CloneArgs {
    /// The point: its id, `latest`, or a time (RFC 3339), which picks the newest point
    /// at or before it.
    #[arg(long, value_name = "ID|latest|TIME")]
    pub point: String,
    /// The clone's runbook: a [[databases]] entry for each of the point's databases,
    /// by the same name and adapter, whose URL names the new database (created here;
    /// one that exists is refused) or whose path is a new SQLite file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The runbook of the cluster the point is of: its storage holds the point, and
    /// its databases say how each restores (tools, the user and database to read).
    #[arg(long, value_name = "FILE")]
    pub source: PathBuf,
    /// Where scratch servers and staging go while each database is restored.
    /// Default: the system's temporary directory.
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Give up if replay has not reached the point by then.
    #[arg(long, default_value = "10m", value_parser = duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Run scratch PostgreSQL servers as this system user (PostgreSQL refuses root).
    /// Default when run as root: postgres.
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
    /// `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

pub async fn clone(args: CloneArgs) -> Result<u8, Failure> {
    let source = load_runbook(&args.source)?;
    let target = load_runbook(&args.config)?;
    let storage = open_storage(&source)?;
    let usage = |error: stillpoint::backup::BackupError| Failure::new(exit::USAGE, error);
    let settings = stillpoint::backup::pipeline_settings(&source).map_err(usage)?;
    let decryption = stillpoint::backup::decryption(&source).map_err(usage)?;
    let point = resolve_point(&storage, &args.point).await?;
    if args.output == OutputFormat::Text {
        crate::errln!(
            "cloning point {} (mid-time {}) of cluster {} into the databases of {} …",
            point.point_id,
            point
                .window
                .restore_point_date_time
                .as_deref()
                .unwrap_or("-"),
            point.cluster,
            args.config.display()
        );
    }
    let report = run_cancellable(|cancel| {
        let request = CloneRequest {
            source: &source,
            storage: &storage,
            settings: &settings,
            decryption: &decryption,
            point: &point,
            target: &target,
            scratch_in: args.scratch_dir.as_deref(),
            timeout: args.timeout,
            run_as: run_as(&args.run_as),
        };
        async move { clone::clone(request, &cancel).await }
    })
    .await
    .map_err(|error| Failure::new(restore_code(&error), error))?;
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => {
            for database in &report.databases {
                crate::outln!(
                    "cloned {} ({}) into {} from base backup {} + {} chunk(s): restore {} \
                     ms, copy {} ms; rows per table {}",
                    database.name,
                    database.adapter,
                    database.target,
                    database.base_id,
                    database.chunks,
                    database.restore_ms,
                    database.copy_ms,
                    if database.row_counts_match_point {
                        "match the point's counts"
                    } else {
                        "not compared (the point has no counts)"
                    }
                );
            }
            crate::outln!(
                "clone of point {} done in {:.1}s; each database holds table {NOTE_TABLE} \
                 saying where it came from",
                report.point_id,
                report.total_ms as f64 / 1000.0
            );
        }
    }
    Ok(exit::OK)
}
