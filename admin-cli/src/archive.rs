//! `stillpoint archive`, `archive-list`, `wal-push` and `wal-fetch`: a database's log
//! into the runbook's storage. `archive` streams it continuously (in the foreground,
//! until SIGINT or SIGTERM); `archive-list` shows each archive's coverage and gaps;
//! `wal-push` and `wal-fetch` move one file at a time, as PostgreSQL's
//! `archive_command` and `restore_command`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use stillpoint::adapters::AdapterConfig;
use stillpoint::archive::archivers::{Archiver, Progress, ProgressWatch};
use stillpoint::archive::postgres::{self, Fetched};
use stillpoint::archive::{self as archives, Archive, ArchiveError, PushOutcome};
use stillpoint::backup;
use stillpoint::runbook::Runbook;
use stillpoint::storage::Storage;
use tokio_util::sync::CancellationToken;

use crate::args::OutputFormat;
use crate::backup::{human_bytes, load_runbook};
use crate::exit::{self, Failure};
use crate::output::{write_stderr, write_stdout};
use crate::signal::shutdown_signal;

#[derive(Debug, Clone, Args)]
pub struct ArchiveArgs {
    /// The runbook: its storage, pipeline and the databases with `archive = true`.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Archive only this PostgreSQL, MariaDB or SQLite database of the runbook (with or
    /// without `archive = true`).
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// `text`: a line per chunk stored; `json`: one JSON object per line.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ArchiveListArgs {
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Only this database's archive. Default: every database with `archive = true`
    /// and every archive the storage holds.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct WalPushArgs {
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The runbook's database whose archive this is.
    #[arg(long, value_name = "NAME")]
    pub database: String,
    /// The file PostgreSQL hands over (`%p`).
    pub path: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct WalFetchArgs {
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    #[arg(long, value_name = "NAME")]
    pub database: String,
    /// The file PostgreSQL asks for (`%f`).
    pub segment: String,
    /// Where to write it (`%p`).
    pub dest: PathBuf,
}

fn open_archive(runbook: &Runbook, database: &str) -> Result<Archive, Failure> {
    if !runbook.databases.iter().any(|db| db.name == database) {
        return Err(Failure::new(
            exit::USAGE,
            anyhow::anyhow!("{}", runbook.unknown_database(database)),
        ));
    }
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let settings =
        backup::pipeline_settings(runbook).map_err(|error| Failure::new(exit::USAGE, error))?;
    Archive::new(storage, settings, database).map_err(|error| Failure::new(exit::USAGE, error))
}

/// [`open_archive`] for wal-push and wal-fetch: the database must be PostgreSQL. Its
/// archive of another adapter holds no WAL, so a fetch from it would answer "not in
/// the archive", which PostgreSQL reads as the archive's end and promotes early.
fn open_wal_archive(runbook: &Runbook, database: &str) -> Result<Archive, Failure> {
    let archive = open_archive(runbook, database)?;
    match runbook.databases.iter().find(|db| db.name == database) {
        Some(db) if !matches!(db.adapter, AdapterConfig::Postgres(_)) => Err(Failure::new(
            exit::USAGE,
            anyhow!(
                "database {database} is {}, not PostgreSQL: wal-push and wal-fetch serve a \
                 PostgreSQL database's WAL archive; give --database the PostgreSQL \
                 database this server is",
                adapter_name(&db.adapter)
            ),
        )),
        _ => Ok(archive),
    }
}

fn adapter_name(adapter: &AdapterConfig) -> &'static str {
    match adapter {
        AdapterConfig::Postgres(_) => "PostgreSQL",
        AdapterConfig::Mariadb(_) => "MariaDB",
        AdapterConfig::Sqlite(_) => "SQLite",
        AdapterConfig::Exec(_) => "an exec database",
    }
}

/// `stillpoint archive`: every chosen database's archiver, until a signal.
pub async fn archive(args: ArchiveArgs) -> Result<u8, Failure> {
    let runbook = load_runbook(&args.config)?;
    let archivers = Archiver::for_runbook(&runbook, args.database.as_deref())
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let cancel = CancellationToken::new();
    let runs = futures::future::join_all(archivers.iter().map(|archiver| async {
        let result = archiver.run(&cancel).await;
        if result.is_err() {
            // One archiver that cannot go on stops the command: the others flush and
            // stop too, rather than leave an operator believing all is archived.
            cancel.cancel();
        }
        (archiver.database().to_owned(), result)
    }));
    let progress = print_progress(&archivers, args.output, &cancel);
    let signal = async {
        tokio::select! {
            () = shutdown_signal() => {
                tracing::warn!("interrupted: pushing what was received, then stopping");
                cancel.cancel();
            }
            () = cancel.cancelled() => {}
        }
    };
    let (results, (), ()) = tokio::join!(runs, progress, signal);
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|(name, result)| result.err().map(|e| format!("{name}: {e}")))
        .collect();
    if failures.is_empty() {
        Ok(exit::OK)
    } else {
        Err(Failure::new(
            exit::BACKUP_FAILED,
            anyhow!(failures.join("; ")),
        ))
    }
}

/// A line whenever an archiver stores a chunk or fails, until `cancel` fires (and
/// once more after, for the final flush).
async fn print_progress(archivers: &[Archiver], output: OutputFormat, cancel: &CancellationToken) {
    let mut receivers: Vec<ProgressWatch> = archivers.iter().map(Archiver::watch).collect();
    let mut shown: Vec<(u64, Option<String>, Option<String>)> =
        vec![(0, None, None); archivers.len()];
    let mut stopping = false;
    loop {
        for (index, receiver) in receivers.iter_mut().enumerate() {
            let now = receiver.look();
            let before = &shown[index];
            if now.chunks_stored != before.0
                || now.last_error != before.1
                || now.changes_error != before.2
            {
                let line = render(archivers[index].database(), &now, output);
                write_stdout(&format!("{line}\n"));
            }
            shown[index] = (now.chunks_stored, now.last_error, now.changes_error);
        }
        if stopping {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = cancel.cancelled() => {
                // Let the archivers push what they have before the last look.
                for receiver in &mut receivers {
                    receiver.stopped().await;
                }
                stopping = true;
            }
        }
    }
}

fn render(database: &str, progress: &Progress, output: OutputFormat) -> String {
    match output {
        OutputFormat::Json => {
            let mut line = serde_json::json!({
                "database": database,
                "archived_to": progress.archived_to.as_ref().map(ToString::to_string),
                "lag_bytes": progress.lag_bytes,
                "last_chunk": progress.last_chunk,
                "chunks_stored": progress.chunks_stored,
                "restarts": progress.restarts,
                "last_error": progress.last_error,
            });
            if let Some(changes_to) = &progress.changes_to {
                line["changes_to"] = serde_json::json!(changes_to.to_string());
                line["changes_error"] = serde_json::json!(progress.changes_error);
            }
            line[progress.server_key] =
                serde_json::json!(progress.server.as_ref().map(ToString::to_string));
            line.to_string()
        }
        OutputFormat::Text => {
            let mut line = format!(
                "{database}: archived to {}",
                progress
                    .archived_to
                    .as_ref()
                    .map_or("nothing yet".to_owned(), ToString::to_string)
            );
            if let Some(chunk) = &progress.last_chunk {
                line.push_str(&format!(" (last stored: {chunk})"));
            }
            if let Some(server) = &progress.server {
                line.push_str(&format!(", server at {server}"));
            }
            if let Some(lag) = progress.lag_bytes {
                line.push_str(&format!(", lag {}", human_bytes(lag)));
            }
            if let Some(changes_to) = &progress.changes_to {
                line.push_str(&format!(", change stream to {changes_to}"));
            }
            if let Some(error) = &progress.last_error {
                line.push_str(&format!("; last error: {error}"));
            }
            if let Some(error) = &progress.changes_error {
                line.push_str(&format!("; change stream's last error: {error}"));
            }
            line
        }
    }
}

/// `stillpoint wal-push`: PostgreSQL's `archive_command`. Exit 0 once the file is in
/// the archive (also when it already was, with the same content).
pub async fn wal_push(args: WalPushArgs) -> Result<u8, Failure> {
    let runbook = load_runbook(&args.config)?;
    let archive = open_wal_archive(&runbook, &args.database)?;
    match postgres::wal_push(&archive, &args.path).await {
        Ok(PushOutcome::Stored(record)) => {
            write_stderr(&format!(
                "archived {} ({} bytes) to {}\n",
                record.name,
                record.size,
                archive.storage()
            ));
            Ok(exit::OK)
        }
        Ok(PushOutcome::AlreadyArchived(record)) => {
            write_stderr(&format!(
                "{} is already archived with the same content; nothing was stored\n",
                record.name
            ));
            Ok(exit::OK)
        }
        Err(error) => Err(Failure::new(exit::BACKUP_FAILED, error)),
    }
}

/// `stillpoint wal-fetch`: PostgreSQL's `restore_command`. Exit 1 when the archive
/// does not have the file (PostgreSQL's "not there", which ends replay); 126 for any
/// other failure, which makes PostgreSQL abort recovery rather than take an archive
/// it could not read as one that ended.
pub async fn wal_fetch(args: WalFetchArgs) -> Result<u8, Failure> {
    fetch_one(&args).await.map_err(|failure| Failure {
        code: exit::WAL_FETCH_FAILED,
        ..failure
    })
}

async fn fetch_one(args: &WalFetchArgs) -> Result<u8, Failure> {
    let runbook = load_runbook(&args.config)?;
    let archive = open_wal_archive(&runbook, &args.database)?;
    let decryption =
        backup::decryption(&runbook).map_err(|error| Failure::new(exit::USAGE, error))?;
    match postgres::wal_fetch(&archive, &decryption, &args.segment, &args.dest).await {
        Ok(Fetched::Whole(_)) => Ok(exit::OK),
        Ok(Fetched::Partial(pieces)) => {
            let last = pieces.last();
            write_stderr(&format!(
                "{} is archived only up to {} ({} partial chunk{}, the last {}): served padded\n",
                args.segment,
                last.and_then(|piece| piece.end.as_ref())
                    .map_or("?".to_owned(), ToString::to_string),
                pieces.len(),
                if pieces.len() == 1 { "" } else { "s" },
                last.map_or("?", |piece| piece.name.as_str()),
            ));
            Ok(exit::OK)
        }
        Err(ArchiveError::NotFound { .. }) => {
            // PostgreSQL asks for files past the end of the archive on purpose: a
            // short line, no "error:".
            write_stderr(&format!(
                "{} is not in the archive of {}\n",
                args.segment, args.database
            ));
            Ok(exit::ERROR)
        }
        Err(error) => Err(Failure::new(exit::BACKUP_FAILED, error)),
    }
}

/// `stillpoint archive-list`: each archive's chunks, coverage and gaps. Exit 6 when
/// an archive has a gap or a record that cannot be read.
pub async fn archive_list(args: ArchiveListArgs) -> Result<u8, Failure> {
    let runbook = load_runbook(&args.config)?;
    let names: Vec<String> = match &args.database {
        Some(name) => vec![name.clone()],
        None => {
            let storage =
                Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
                    .map_err(|error| Failure::new(exit::USAGE, error))?;
            let mut names: Vec<String> = runbook
                .databases
                .iter()
                .filter(|db| db.archive)
                .map(|db| db.name.clone())
                .collect();
            names.extend(archives::archived_databases(&storage).await?);
            names.sort();
            names.dedup();
            names
        }
    };
    let mut damaged = false;
    let mut reports = Vec::new();
    for name in &names {
        let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
            .map_err(|error| Failure::new(exit::USAGE, error))?;
        let settings = backup::pipeline_settings(&runbook)
            .map_err(|error| Failure::new(exit::USAGE, error))?;
        let archive = Archive::new(storage, settings, name)
            .map_err(|error| Failure::new(exit::USAGE, error))?;
        let catalog = archive.catalog().await?;
        let gaps = catalog.gaps();
        damaged |= !gaps.is_empty() || !catalog.unreadable.is_empty();
        let coverage = catalog.coverage();
        match args.output {
            OutputFormat::Json => reports.push(serde_json::json!({
                "database": name,
                "chunks": catalog.chunks.len(),
                "from": coverage.as_ref().map(|c| c.from.to_string()),
                "to": coverage.as_ref().map(|c| c.to.to_string()),
                "gaps": gaps,
                "superseded": catalog.superseded.len(),
                "others": catalog.others.len(),
                "unreadable": catalog.unreadable,
            })),
            OutputFormat::Text => {
                let mut text = match &coverage {
                    Some(c) => format!(
                        "{name}: {} chunks, {} to {}",
                        catalog.chunks.len(),
                        c.from,
                        c.to
                    ),
                    None => format!("{name}: empty"),
                };
                if gaps.is_empty() {
                    text.push_str(", no gaps\n");
                } else {
                    text.push_str(&format!(", {} gap(s):\n", gaps.len()));
                    for gap in &gaps {
                        text.push_str(&format!("  {gap}\n"));
                    }
                }
                for (path, problem) in &catalog.unreadable {
                    text.push_str(&format!("  unreadable record {path}: {problem}\n"));
                }
                write_stdout(&text);
            }
        }
    }
    if args.output == OutputFormat::Json {
        write_stdout(&format!("{}\n", serde_json::Value::Array(reports)));
    }
    Ok(if damaged {
        exit::BACKUP_FAILED
    } else {
        exit::OK
    })
}
