//! `stillpoint list`, `show`, `verify` and `prune`: the read side of a runbook's
//! storage. A backup is listed only when its manifest is committed; damaged manifests
//! and incomplete backups are reported by name, never a crash.

use std::path::PathBuf;

use clap::Args;
use stillpoint::catalog::{self, CheckOutcome};
use stillpoint::manifest::Manifest;
use stillpoint::storage::Storage;

use crate::args::OutputFormat;
use crate::backup::{human_bytes, load_runbook};
use crate::exit::{self, Failure};
use crate::output::{print_json, render_text};

#[derive(Debug, Clone, Args)]
pub struct CatalogArgs {
    /// The runbook whose storage to read.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// A backup id, or `latest`.
    pub backup: String,
    #[command(flatten)]
    pub catalog: CatalogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// Keep the N newest backups (overrides the runbook's [retention]).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last D days that have backups.
    #[arg(long, value_name = "D")]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last W ISO weeks that have backups.
    #[arg(long, value_name = "W")]
    pub keep_weekly: Option<u32>,
    /// Print what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune even if no restore point would be left (every backup kept is an unsafe
    /// `--no-pause` copy or has missing artifacts, or none is kept).
    #[arg(long)]
    pub allow_no_restore_point: bool,
}

async fn open(args: &CatalogArgs) -> Result<(stillpoint::runbook::Runbook, Storage), Failure> {
    let runbook = load_runbook(&args.config)?;
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    Ok((runbook, storage))
}

pub async fn list(args: CatalogArgs) -> Result<u8, Failure> {
    let (runbook, storage) = open(&args).await?;
    let found = catalog::list(&storage).await?;
    let points = crate::points::list_json(&runbook, &storage).await?;
    match args.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "storage": found.storage,
            "points": points,
            "backups": found.backups.iter().map(|manifest| summary(&found, manifest)).collect::<Vec<_>>(),
            "damaged": found.damaged.iter().map(|d| serde_json::json!({"path": d.path, "error": d.error})).collect::<Vec<_>>(),
            "incomplete": found.orphans().iter().map(|o| serde_json::json!({
                "backup_id": o.backup_id, "prefix": o.prefix, "objects": o.objects, "bytes": o.bytes,
                "incomplete_uploads": o.incomplete_uploads, "hidden_bytes": o.hidden_bytes,
                "marker": o.marker, "last_modified": o.last_modified.to_rfc3339(),
            })).collect::<Vec<_>>(),
        })),
        OutputFormat::Text => {
            if found.backups.is_empty() {
                crate::outln!("no backups in {}", found.storage);
            } else {
                crate::outln!(
                    "{:<26} {:<30} {:<6} {:>10}  DATABASES",
                    "BACKUP",
                    "RESTORE POINT (UTC)",
                    "VALID",
                    "STORED"
                );
                for manifest in &found.backups {
                    let stored: u64 = manifest
                        .artifacts()
                        .map(|(_, artifact)| artifact.stored_size)
                        .sum();
                    let names: Vec<&str> = manifest
                        .databases
                        .iter()
                        .map(|db| db.name.as_str())
                        .collect();
                    crate::outln!(
                        "{:<26} {:<30} {:<6} {:>10}  {}",
                        manifest.backup_id,
                        manifest
                            .window
                            .restore_point_date_time
                            .as_deref()
                            .unwrap_or("-"),
                        if manifest.unsafe_no_pause {
                            "UNSAFE"
                        } else if !found.problems_of(&manifest.backup_id).is_empty() {
                            "BROKEN"
                        } else if manifest.window.window_valid {
                            "yes"
                        } else {
                            "NO"
                        },
                        human_bytes(stored),
                        names.join(", ")
                    );
                }
            }
            for (id, problems) in &found.problems {
                for problem in problems {
                    crate::outln!("broken backup {id}: {problem}; it is not a restore point");
                }
            }
            for damaged in &found.damaged {
                crate::outln!("damaged manifest {}: {}", damaged.path, damaged.error);
            }
            for orphan in found.orphans() {
                let uploads = match (orphan.incomplete_uploads, orphan.hidden_bytes) {
                    (0, _) => String::new(),
                    (n, 0) => format!(", {n} unfinished upload(s)"),
                    (n, bytes) => format!(", {n} unfinished upload(s) of {}", human_bytes(bytes)),
                };
                crate::outln!(
                    "incomplete backup {} ({} objects, {}{uploads}; last written {}) is not listed; `stillpoint prune` removes it once nothing has written to it for an hour",
                    orphan.prefix,
                    orphan.objects,
                    human_bytes(orphan.bytes),
                    orphan.last_modified.format("%Y-%m-%d %H:%M:%S UTC"),
                );
            }
            crate::output::write_stdout(&crate::points::list_text(&points));
        }
    }
    Ok(exit::OK)
}

fn summary(found: &catalog::Catalog, manifest: &Manifest) -> serde_json::Value {
    serde_json::json!({
        "backup_id": manifest.backup_id,
        "cluster": manifest.cluster,
        "created_at_ms": manifest.created_at_ms,
        "window_valid": manifest.window.window_valid,
        "unsafe_no_pause": manifest.unsafe_no_pause,
        // A restore point: paused, and every artifact in storage with its size.
        "restorable": found.is_restorable(manifest),
        "problems": found.problems_of(&manifest.backup_id),
        "restore_point_timestamp_ms": manifest.window.restore_point_timestamp_ms,
        "restore_point_date_time": manifest.window.restore_point_date_time,
        "databases": manifest.databases.iter().map(|db| &db.name).collect::<Vec<_>>(),
        "stored_bytes": manifest.artifacts().map(|(_, artifact)| artifact.stored_size).sum::<u64>(),
    })
}

pub async fn show(args: ShowArgs) -> Result<u8, Failure> {
    let (_, storage) = open(&args.catalog).await?;
    let found = catalog::list(&storage).await?;
    let manifest =
        catalog::resolve(&found, &args.backup).map_err(|error| Failure::new(exit::USAGE, error))?;
    match args.catalog.output {
        OutputFormat::Json => print_json(manifest),
        OutputFormat::Text => {
            crate::outln!(
                "backup {} of cluster {} ({})",
                manifest.backup_id,
                manifest.cluster,
                manifest.status
            );
            crate::output::write_stdout(&render_text(&manifest.window));
            for database in &manifest.databases {
                crate::outln!(
                    "  database {} ({}, {})",
                    database.name,
                    database.role.as_deref().unwrap_or("-"),
                    database.adapter
                );
                for (key, value) in &database.cut.details {
                    crate::outln!("    cut {key} = {value}");
                }
                if let Some(artifact) = &database.artifact {
                    crate::outln!(
                        "    artifact {}: {} → {} stored, blake3 {}",
                        artifact.path,
                        human_bytes(artifact.size),
                        human_bytes(artifact.stored_size),
                        artifact.blake3
                    );
                }
            }
        }
    }
    Ok(exit::OK)
}

pub async fn verify(args: ShowArgs) -> Result<u8, Failure> {
    let (runbook, storage) = open(&args.catalog).await?;
    let decryption = stillpoint::backup::decryption(&runbook)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let found = catalog::list(&storage).await?;
    let manifest =
        catalog::resolve(&found, &args.backup).map_err(|error| Failure::new(exit::USAGE, error))?;
    let checks = catalog::verify(&storage, manifest, &decryption).await;
    let ok = checks.iter().all(|check| check.is_sound());
    // A wrong key, a missing one or a storage that cannot be read says nothing about
    // the artifact: "damaged" is only what the checksum, decryption or decompression
    // found wrong with the stored bytes.
    let damaged = checks.iter().any(
        |check| matches!(&check.outcome, CheckOutcome::Failed(error) if error.damage().is_some()),
    );
    let results: Vec<serde_json::Value> = checks
        .iter()
        .map(|check| {
            let path = manifest
                .databases
                .iter()
                .find(|db| db.name == check.database)
                .and_then(|db| db.artifact.as_ref())
                .map(|artifact| artifact.path.clone());
            match &check.outcome {
                CheckOutcome::NoArtifact => serde_json::json!({"database": check.database, "ok": true, "artifact": null}),
                CheckOutcome::Sound(report) => serde_json::json!({
                    "database": check.database, "ok": true, "path": path,
                    "size": report.size, "stored_size": report.stored_size,
                }),
                CheckOutcome::ChecksumOnly { stored_size } => serde_json::json!({
                    "database": check.database, "ok": true, "path": path, "stored_size": stored_size,
                    "checksum_only": true,
                    "note": CHECKSUM_ONLY,
                }),
                CheckOutcome::Failed(error) => serde_json::json!({
                    "database": check.database, "ok": false, "path": path, "error": error.to_string(),
                    "damaged": error.damage().is_some(),
                }),
            }
        })
        .collect();
    match args.catalog.output {
        OutputFormat::Json => print_json(
            &serde_json::json!({"backup_id": manifest.backup_id, "ok": ok, "damaged": damaged, "artifacts": results}),
        ),
        OutputFormat::Text => {
            for (result, check) in results.iter().zip(&checks) {
                let verdict = if result["ok"] == true { "ok  " } else { "FAIL" };
                let detail = match &check.outcome {
                    CheckOutcome::Failed(error) => error.to_string(),
                    CheckOutcome::ChecksumOnly { .. } => CHECKSUM_ONLY.to_owned(),
                    CheckOutcome::NoArtifact => "the cut made no copy".to_owned(),
                    CheckOutcome::Sound(_) => {
                        "checksum, decryption and decompression ok".to_owned()
                    }
                };
                crate::outln!(
                    "{verdict} {} {}: {detail}",
                    check.database,
                    result["path"].as_str().unwrap_or("(no artifact)")
                );
            }
            let checksum_only = checks
                .iter()
                .any(|check| matches!(check.outcome, CheckOutcome::ChecksumOnly { .. }));
            crate::outln!(
                "backup {}: {}",
                manifest.backup_id,
                match (ok, checksum_only) {
                    (false, _) if damaged => "DAMAGED",
                    (false, _) => {
                        "NOT VERIFIED: some artifacts could not be checked (see above); \
                         none was found damaged"
                    }
                    (true, true) => {
                        "checksums verified, not decrypted (set age_identity_file or \
                         age_passphrase_file in the runbook to check decryption and \
                         decompression too)"
                    }
                    (true, false) => "verified",
                }
            );
        }
    }
    if ok {
        Ok(exit::OK)
    } else if damaged {
        Err(Failure::new(
            exit::BACKUP_FAILED,
            anyhow::anyhow!("backup {} has damaged artifacts", manifest.backup_id),
        ))
    } else {
        Err(Failure::new(
            exit::BACKUP_FAILED,
            anyhow::anyhow!(
                "backup {} could not be verified (a key that does not open it, or storage \
                 that could not be read: see above); no artifact was found damaged",
                manifest.backup_id
            ),
        ))
    }
}

/// What `verify` says of an encrypted artifact it could only checksum.
const CHECKSUM_ONLY: &str = "checksum only: no age identity or passphrase is configured, so \
     the artifact was not decrypted and decompression was not tried";

/// An incomplete backup written to more recently than this may still be running
/// (its marker is refreshed every `stillpoint::backup::HEARTBEAT`).
const INCOMPLETE_GRACE: chrono::TimeDelta = chrono::TimeDelta::hours(1);

pub async fn prune(args: PruneArgs) -> Result<u8, Failure> {
    let (runbook, storage) = open(&args.catalog).await?;
    let retention = &runbook.retention;
    let rules = catalog::Retention {
        keep_last: args.keep_last.or(retention.keep_last).unwrap_or(0) as usize,
        keep_daily: args.keep_daily.or(retention.keep_daily).unwrap_or(0) as usize,
        keep_weekly: args.keep_weekly.or(retention.keep_weekly).unwrap_or(0) as usize,
    };
    let found = catalog::list(&storage).await?;
    let now = chrono::Utc::now();
    let plan = catalog::plan_prune(&found, rules, now)
        .and_then(|plan| {
            catalog::check_prune(&found, &plan, args.allow_no_restore_point).map(|()| plan)
        })
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    // Incomplete backups (artifacts without a manifest) are never listed; remove the
    // ones nothing has written to for an hour: a running backup refreshes its marker
    // every minute.
    let stale = catalog::stale_orphans(&found, now, INCOMPLETE_GRACE);
    let verb = |doing: &'static str, would: &'static str| if args.dry_run { would } else { doing };
    let deleted = if args.dry_run {
        Vec::new()
    } else {
        let deleted = catalog::apply_prune(&storage, &plan).await?;
        for orphan in &stale {
            catalog::remove_orphan(&storage, orphan).await?;
        }
        deleted
    };
    match args.catalog.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "dry_run": args.dry_run,
            "keep": plan.keep.iter().map(|(id, reasons)| serde_json::json!({"backup_id": id, "reasons": reasons})).collect::<Vec<_>>(),
            "delete": plan.delete,
            "deleted": deleted.iter().map(|(id, objects)| serde_json::json!({"backup_id": id, "objects": objects})).collect::<Vec<_>>(),
            "incomplete_removed": stale.iter().map(|orphan| &orphan.prefix).collect::<Vec<_>>(),
        })),
        OutputFormat::Text => {
            for (id, reasons) in &plan.keep {
                crate::outln!("keep   {id}  ({})", reasons.join(", "));
            }
            for id in &plan.delete {
                crate::outln!("{} {id}", verb("delete", "would delete"));
            }
            for orphan in &stale {
                crate::outln!(
                    "{} incomplete backup {}",
                    verb("remove", "would remove"),
                    orphan.prefix
                );
            }
        }
    }
    Ok(exit::OK)
}
