//! `stillpoint list`, `show`, `verify` and `prune`: the read side of a runbook's
//! storage. A backup is listed only when its manifest is committed; damaged manifests
//! and incomplete backups are reported by name, never a crash.

use std::path::PathBuf;

use clap::Args;
use stillpoint::catalog::{self, CheckOutcome};
use stillpoint::manifest::Manifest;
use stillpoint::points::PointManifest;
use stillpoint::points::prune as points_prune;
use stillpoint::points::verify::PointVerdict;
use stillpoint::storage::Storage;

use crate::args::OutputFormat;
use crate::backup::{config_path, human_bytes, load_runbook};
use crate::exit::{self, Failure};
use crate::output::{print_json, render_text};
use crate::remote::ServerArgs;

#[derive(Debug, Clone, Args)]
pub struct CatalogArgs {
    /// The runbook whose storage to read (not with --server).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "server"
    )]
    pub config: Option<PathBuf>,
    /// `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub server: ServerArgs,
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
    /// Keep the N newest backups, and the N newest points (overrides the runbook's
    /// [retention]).
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
    let runbook = load_runbook(config_path(&args.config)?)?;
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    Ok((runbook, storage))
}

pub async fn list(args: CatalogArgs) -> Result<u8, Failure> {
    if let Some(remote) = args.server.remote()? {
        return remote.list(args.output).await;
    }
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
    if let Some(remote) = args.catalog.server.remote()? {
        return remote.show(&args.backup, args.catalog.output).await;
    }
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

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// A backup id, or `latest`. Without it (and without `--point`): the newest
    /// restorable backup, if any, and every point (all that --server verifies).
    #[arg(conflicts_with = "server")]
    pub backup: Option<String>,
    /// A point to verify (an id, `latest`, or a time): its base backups and every
    /// chunk from each base to the marker, re-read, and the chain without a gap.
    #[arg(long, value_name = "ID|latest|TIME", conflicts_with = "server")]
    pub point: Option<String>,
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// With --server: print the queued job and exit without waiting for it.
    #[arg(long, requires = "server")]
    pub no_wait: bool,
}

/// One backup, verified: its JSON, its text lines, whether it is sound and whether
/// anything was found damaged.
struct BackupVerdict {
    backup_id: String,
    json: serde_json::Value,
    text: Vec<String>,
    ok: bool,
    damaged: bool,
}

async fn verify_backup(
    storage: &Storage,
    manifest: &Manifest,
    decryption: &stillpoint::pipeline::Decryption,
) -> BackupVerdict {
    let checks = catalog::verify(storage, manifest, decryption).await;
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
    let mut text = Vec::new();
    for (result, check) in results.iter().zip(&checks) {
        let verdict = if result["ok"] == true { "ok  " } else { "FAIL" };
        let detail = match &check.outcome {
            CheckOutcome::Failed(error) => error.to_string(),
            CheckOutcome::ChecksumOnly { .. } => CHECKSUM_ONLY.to_owned(),
            CheckOutcome::NoArtifact => "the cut made no copy".to_owned(),
            CheckOutcome::Sound(_) => "checksum, decryption and decompression ok".to_owned(),
        };
        text.push(format!(
            "{verdict} {} {}: {detail}",
            check.database,
            result["path"].as_str().unwrap_or("(no artifact)")
        ));
    }
    let checksum_only = checks
        .iter()
        .any(|check| matches!(check.outcome, CheckOutcome::ChecksumOnly { .. }));
    text.push(format!(
        "backup {}: {}",
        manifest.backup_id,
        match (ok, checksum_only) {
            (false, _) if damaged => "DAMAGED",
            (false, _) => {
                "NOT VERIFIED: some artifacts could not be checked (see above); none was \
                 found damaged"
            }
            (true, true) => {
                "checksums verified, not decrypted (set age_identity_file or \
                 age_passphrase_file in the runbook to check decryption and decompression \
                 too)"
            }
            (true, false) => "verified",
        }
    ));
    BackupVerdict {
        backup_id: manifest.backup_id.clone(),
        json: serde_json::json!({"backup_id": manifest.backup_id, "ok": ok, "damaged": damaged, "artifacts": results}),
        text,
        ok,
        damaged,
    }
}

/// The text lines of a verified point.
fn point_text(verdict: &PointVerdict) -> Vec<String> {
    let mut text = Vec::new();
    for database in &verdict.databases {
        let line = match (&database.problem, &database.skipped) {
            (Some(problem), _) => format!("FAIL {}: {problem}", database.database),
            (None, Some(why)) => format!("skip {}: {why}", database.database),
            (None, None) => format!(
                "ok   {}: base {} and {} chunk(s), {} stored, checksums ok, no gap to the \
                 marker",
                database.database,
                database.base_id.as_deref().unwrap_or("-"),
                database.chunks,
                human_bytes(database.stored_bytes)
            ),
        };
        text.push(line);
    }
    text.push(format!(
        "point {}: {}",
        verdict.point_id,
        if verdict.ok {
            "verified"
        } else {
            "NOT RESTORABLE (see above)"
        }
    ));
    text
}

pub async fn verify(args: VerifyArgs) -> Result<u8, Failure> {
    if let Some(remote) = args.catalog.server.remote()? {
        return remote
            .trigger("verify", args.no_wait, args.catalog.output)
            .await;
    }
    let (runbook, storage) = open(&args.catalog).await?;
    let decryption = stillpoint::backup::decryption(&runbook)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let settings = stillpoint::backup::pipeline_settings(&runbook)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let usage =
        |error: &dyn std::fmt::Display| Failure::new(exit::USAGE, anyhow::anyhow!("{error}"));
    // Which backup and which points: the ones named, or (with neither) the newest
    // restorable backup if there is one and every point.
    let everything = args.backup.is_none() && args.point.is_none();
    let found = catalog::list(&storage).await?;
    let backup = match &args.backup {
        Some(which) => Some(catalog::resolve(&found, which).map_err(|error| usage(&error))?),
        None if everything => found.latest(),
        None => None,
    };
    // A backup asked for by itself reads nothing of points.
    let (all_points, damaged_points) = if args.point.is_some() || everything {
        stillpoint::points::list_points(&storage)
            .await
            .map_err(|error| Failure::new(exit::BACKUP_FAILED, error))?
    } else {
        Default::default()
    };
    let points: Vec<&PointManifest> = match &args.point {
        Some(which) => {
            vec![stillpoint::points::resolve(&all_points, which).map_err(|error| usage(&error))?]
        }
        None if everything => all_points.iter().collect(),
        None => Vec::new(),
    };
    if everything && backup.is_none() && points.is_empty() && damaged_points.is_empty() {
        return Err(usage(&format!(
            "{} holds no backup and no point to verify; `stillpoint list` shows what is there",
            found.storage
        )));
    }
    let backup = match backup {
        Some(manifest) => Some(verify_backup(&storage, manifest, &decryption).await),
        None => None,
    };
    let mut verdicts = Vec::with_capacity(points.len());
    let mut checked = Default::default();
    for point in points {
        verdicts.push(
            stillpoint::points::verify::verify_point(&storage, &settings, point, &mut checked)
                .await,
        );
    }
    // Only a backup asked for by itself keeps the output it always had.
    let backup_only = args.point.is_none() && args.backup.is_some();
    let points_ok = verdicts.iter().all(|verdict| verdict.ok) && damaged_points.is_empty();
    match args.catalog.output {
        OutputFormat::Json if backup_only => {
            print_json(&backup.as_ref().expect("a backup was named").json)
        }
        OutputFormat::Json => print_json(&serde_json::json!({
            "ok": backup.as_ref().is_none_or(|b| b.ok) && points_ok,
            "backup": backup.as_ref().map(|b| &b.json),
            "points": verdicts,
            "damaged_points": damaged_points.iter().map(|(path, error)| serde_json::json!({"path": path, "error": error})).collect::<Vec<_>>(),
        })),
        OutputFormat::Text => {
            for line in backup.iter().flat_map(|b| &b.text) {
                crate::outln!("{line}");
            }
            for line in verdicts.iter().flat_map(point_text) {
                crate::outln!("{line}");
            }
            for (path, error) in &damaged_points {
                crate::outln!("FAIL damaged point manifest {path}: {error}");
            }
        }
    }
    if let Some(backup) = backup.as_ref().filter(|backup| !backup.ok) {
        return Err(Failure::new(
            exit::BACKUP_FAILED,
            if backup.damaged {
                anyhow::anyhow!("backup {} has damaged artifacts", backup.backup_id)
            } else {
                anyhow::anyhow!(
                    "backup {} could not be verified (a key that does not open it, or \
                     storage that could not be read: see above); no artifact was found \
                     damaged",
                    backup.backup_id
                )
            },
        ));
    }
    if !points_ok {
        let failed: Vec<&str> = verdicts
            .iter()
            .filter(|verdict| !verdict.ok)
            .map(|verdict| verdict.point_id.as_str())
            .chain(damaged_points.iter().map(|(path, _)| path.as_str()))
            .collect();
        return Err(Failure::new(
            exit::BACKUP_FAILED,
            anyhow::anyhow!(
                "{} point(s) cannot be restored as they are: {} (see above)",
                failed.len(),
                failed.join(", ")
            ),
        ));
    }
    Ok(exit::OK)
}

/// What `verify` says of an encrypted artifact it could only checksum.
const CHECKSUM_ONLY: &str = "checksum only: no age identity or passphrase is configured, so \
     the artifact was not decrypted and decompression was not tried";

/// An incomplete backup written to more recently than this may still be running
/// (its marker is refreshed every `stillpoint::backup::HEARTBEAT`).
const INCOMPLETE_GRACE: chrono::TimeDelta = chrono::TimeDelta::hours(1);

pub async fn prune(args: PruneArgs) -> Result<u8, Failure> {
    if args.catalog.server.server.is_some() {
        return Err(Failure::new(
            exit::USAGE,
            anyhow::anyhow!(
                "prune does not take --server: the service prunes by its runbook's [retention] \
                 on its schedule; run prune with --config here to choose other rules"
            ),
        ));
    }
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
    // Points by the same rules, then the bases and chunks no kept point needs.
    let settings = stillpoint::backup::pipeline_settings(&runbook)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let holdings = points_prune::holdings(&storage, &settings)
        .await
        .map_err(|error| Failure::new(exit::BACKUP_FAILED, error))?;
    let points_plan = points_prune::plan(&holdings, rules, now)
        .map_err(|error| Failure::new(exit::USAGE, error))?;
    let verb = |doing: &'static str, would: &'static str| if args.dry_run { would } else { doing };
    let (deleted, points_removed) = if args.dry_run {
        (Vec::new(), 0)
    } else {
        let deleted = catalog::apply_prune(&storage, &plan).await?;
        for orphan in &stale {
            catalog::remove_orphan(&storage, orphan).await?;
        }
        let removed = points_prune::apply(&storage, &points_plan)
            .await
            .map_err(|error| Failure::new(exit::BACKUP_FAILED, error))?;
        (deleted, removed)
    };
    match args.catalog.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "dry_run": args.dry_run,
            "keep": plan.keep.iter().map(|(id, reasons)| serde_json::json!({"backup_id": id, "reasons": reasons})).collect::<Vec<_>>(),
            "delete": plan.delete,
            "deleted": deleted.iter().map(|(id, objects)| serde_json::json!({"backup_id": id, "objects": objects})).collect::<Vec<_>>(),
            "incomplete_removed": stale.iter().map(|orphan| &orphan.prefix).collect::<Vec<_>>(),
            "points": {
                "keep": points_plan.points.keep.iter().map(|(id, reasons)| serde_json::json!({"point_id": id, "reasons": reasons})).collect::<Vec<_>>(),
                "delete": points_plan.points.delete,
                "keep_bases": points_plan.keep_bases.iter().map(|(base, reasons)| serde_json::json!({"database": base.database, "id": base.id, "reasons": reasons})).collect::<Vec<_>>(),
                "delete_bases": points_plan.delete_bases,
                "delete_chunks": points_plan.delete_chunks,
                "notes": points_plan.notes,
                "removed_objects": points_removed,
            },
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
            for (id, reasons) in &points_plan.points.keep {
                crate::outln!("keep   point {id}  ({})", reasons.join(", "));
            }
            for id in &points_plan.points.delete {
                crate::outln!("{} point {id}", verb("delete", "would delete"));
            }
            for (base, reasons) in &points_plan.keep_bases {
                crate::outln!(
                    "keep   base {} of {}  ({})",
                    base.id,
                    base.database,
                    reasons.join(", ")
                );
            }
            for base in &points_plan.delete_bases {
                crate::outln!(
                    "{} base {} of {}",
                    verb("delete", "would delete"),
                    base.id,
                    base.database
                );
            }
            for chunks in &points_plan.delete_chunks {
                crate::outln!(
                    "{} {} chunk(s) of the {} of {} before {} ({} to {})",
                    verb("delete", "would delete"),
                    chunks.chunks.len(),
                    if chunks.change_stream {
                        "change stream"
                    } else {
                        "archive"
                    },
                    chunks.database,
                    chunks.floor,
                    chunks.chunks.first().map(String::as_str).unwrap_or("-"),
                    chunks.chunks.last().map(String::as_str).unwrap_or("-"),
                );
            }
            for note in &points_plan.notes {
                crate::outln!("note   {note}");
            }
        }
    }
    Ok(exit::OK)
}
