//! `stillpoint changes`: the committed changes between two points as JSON Lines or
//! CSV records (docs/runbooks/changes.md). Flags are checked here; the export is
//! `stillpoint::changes::export`. Records go to stdout or `--out FILE` (written
//! beside it and renamed into place only when complete); the summary goes to stderr,
//! as text or with `--output json` as one JSON object.

use std::io::Write;
use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use stillpoint::changes::{self, ChangesError, ExportRequest, RecordWriter};

use crate::args::OutputFormat;
use crate::backup::load_runbook;
use crate::exit::{self, Failure};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RecordFormat {
    /// One JSON object per line.
    Jsonl,
    /// CSV with a header; key, after and before hold JSON objects.
    Csv,
}

#[derive(Debug, Clone, Args)]
pub struct ChangesArgs {
    /// The runbook: its storage holds the points, bases and archives.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The older point: an id, `latest`, or a time (the newest point at or before
    /// it). Changes after its marker are exported.
    #[arg(long, value_name = "POINT")]
    pub from: String,
    /// The newer point (same forms): changes up to its marker are exported.
    #[arg(long, value_name = "POINT")]
    pub to: String,
    /// One database of the points (by its runbook name); default: every one (each
    /// must be MariaDB, or PostgreSQL with `changes = true`).
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// Only this table's changes (PostgreSQL: `schema.table`, or the table's name in
    /// any schema).
    #[arg(long, value_name = "TABLE")]
    pub table: Option<String>,
    /// How records are written.
    #[arg(long, value_enum)]
    pub format: RecordFormat,
    /// Write the records to FILE (created whole, or not at all) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Where the binlog is reassembled while it is decoded (removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The summary on stderr: `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

fn code(error: &ChangesError) -> u8 {
    match error {
        ChangesError::Setup(_) => exit::USAGE,
        ChangesError::Output(_) => exit::ERROR,
        _ => exit::BACKUP_FAILED,
    }
}

/// `stillpoint changes`.
pub async fn changes(args: ChangesArgs) -> Result<u8, Failure> {
    let usage = |error: &dyn std::fmt::Display| Failure::new(exit::USAGE, anyhow!("{error}"));
    let runbook = load_runbook(&args.config)?;
    let storage = stillpoint::storage::Storage::open_with_options(
        &runbook.storage.url,
        &runbook.storage.options,
    )
    .map_err(|error| Failure::new(exit::USAGE, error))?;
    let settings = stillpoint::backup::pipeline_settings(&runbook).map_err(|e| usage(&e))?;
    let decryption = stillpoint::backup::decryption(&runbook).map_err(|e| usage(&e))?;
    let from = crate::points::resolve_point(&storage, &args.from).await?;
    let to = crate::points::resolve_point(&storage, &args.to).await?;
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let request = ExportRequest {
        storage: &storage,
        settings: &settings,
        decryption: &decryption,
        from: &from,
        to: &to,
        database: args.database.as_deref(),
        table: args.table.as_deref(),
        work_dir: &work_dir,
    };
    let format = match args.format {
        RecordFormat::Jsonl => changes::OutputFormat::Jsonl,
        RecordFormat::Csv => changes::OutputFormat::Csv,
    };
    let result = match &args.out {
        Some(path) => {
            // Beside the file, renamed over it only once every record is written: a
            // failed export leaves no half file (the temporary one is removed on drop).
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => PathBuf::from("."),
            };
            let temp = tempfile::Builder::new()
                .prefix(".stillpoint-changes-")
                .tempfile_in(&dir)
                .map_err(|e| {
                    Failure::new(
                        exit::USAGE,
                        anyhow!("cannot write into {}: {e}", dir.display()),
                    )
                })?;
            let mut writer =
                RecordWriter::new(
                    std::io::BufWriter::new(temp.reopen().map_err(|e| {
                        Failure::new(exit::ERROR, anyhow!("{}: {e}", dir.display()))
                    })?),
                    format,
                );
            let report = changes::export(&request, &mut writer).await;
            match report {
                Ok(report) => {
                    writer
                        .finish()
                        .and_then(|file| file.into_inner().map_err(|e| e.into_error()))
                        .and_then(|file| file.sync_all())
                        .map_err(|e| {
                            Failure::new(exit::ERROR, anyhow!("writing {}: {e}", path.display()))
                        })?;
                    temp.persist(path).map_err(|e| {
                        Failure::new(exit::ERROR, anyhow!("writing {}: {e}", path.display()))
                    })?;
                    Ok(report)
                }
                Err(error) => Err(error),
            }
        }
        None => {
            let stdout = std::io::stdout().lock();
            let mut writer = RecordWriter::new(std::io::BufWriter::new(stdout), format);
            let report = changes::export(&request, &mut writer).await;
            match report {
                Ok(report) => writer
                    .finish()
                    .map(|_| report)
                    .map_err(ChangesError::Output),
                Err(error) => Err(error),
            }
        }
    };
    let report = match result {
        Ok(report) => report,
        // Whoever read the records went away (`| head`): end quietly.
        Err(ChangesError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(exit::OK);
        }
        Err(error) => return Err(Failure::new(code(&error), error)),
    };
    match args.output {
        OutputFormat::Json => crate::errln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialize")
        ),
        OutputFormat::Text => {
            crate::errln!(
                "{} change record(s) from point {} to point {} in {:.1}s",
                report.records,
                report.from_point,
                report.to_point,
                report.elapsed_ms as f64 / 1000.0
            );
            if let Some(table) = args.table.as_deref().filter(|_| report.records == 0) {
                // A misspelt table looks like a quiet one: say which it could be.
                crate::errln!(
                    "  no change of table {table:?} in the range: is the name right? \
                     (PostgreSQL: schema.table, or the table's name alone)"
                );
            }
            for db in &report.databases {
                let log = if db.adapter == "postgres" {
                    "change stream"
                } else {
                    "binlog"
                };
                crate::errln!(
                    "  {}: {log} {} to {}: {} record(s) of {} committed transaction(s), {} \
                     chunk(s), {} bytes of {log} read (fetch {} ms, decode {} ms){}",
                    db.database,
                    db.from,
                    db.to,
                    db.stats.records,
                    db.stats.transactions,
                    db.chunks,
                    db.stats.log_bytes,
                    db.fetch_ms,
                    db.decode_ms,
                    if db.stats.not_committed > 0 {
                        format!(
                            "; {} transaction(s) not committed within the range, left out",
                            db.stats.not_committed
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    let _ = std::io::stderr().flush();
    Ok(exit::OK)
}
