//! What each kind of job does: one call into the `stillpoint` library, the same the
//! one-shot commands make, and its result as JSON for the job's record. Rules about
//! when jobs run live in `jobs.rs`; this file only runs them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use stillpoint::backup::{self, Mode};
use stillpoint::catalog;
use stillpoint::points::prune as points_prune;
use stillpoint::points::restore::{self as point_restore, DrillRequest};
use stillpoint::points::take::{self, PointOptions};
use stillpoint::points::{self, base, verify::verify_point};
use stillpoint::runbook::JobKind;
use tokio_util::sync::CancellationToken;

use crate::Service;

/// How long a drill's checks may run.
const DRILL_TIMEOUT: Duration = Duration::from_secs(600);
/// Incomplete backups nothing has written to for this long are removed by prune (a
/// running backup refreshes its marker every minute).
const INCOMPLETE_GRACE: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// A job that failed: why, and what it had found (a drill's failed checks).
pub struct Failure {
    pub error: String,
    pub result: Option<Value>,
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure {
            error: stillpoint::error_chain(&error),
            result: None,
        }
    }
}

fn failure(error: impl Into<String>) -> Failure {
    Failure {
        error: error.into(),
        result: None,
    }
}

fn to_json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Runs one job of `kind` to its end, or until the service shuts down: each kind then
/// stops by itself (a pause released, scratch servers removed, nothing half-made
/// listed). Dropping the future is safe too, only less tidy.
pub async fn run(service: &Arc<Service>, kind: JobKind) -> Result<Value, Failure> {
    let cancel = service.shutdown.child_token();
    match kind {
        JobKind::Point => point(service, &cancel).await,
        JobKind::BaseBackup => base_backup(service, &cancel).await,
        JobKind::Backup => full_backup(service, &cancel).await,
        JobKind::Drill => drill(service, &cancel).await,
        // Reads, and removals each of which leaves the catalog whole: dropping them at
        // any await is safe.
        JobKind::Verify => until_cancelled(verify(service), &cancel).await,
        JobKind::Prune => until_cancelled(prune(service), &cancel).await,
    }
}

async fn until_cancelled(
    work: impl Future<Output = Result<Value, Failure>>,
    cancel: &CancellationToken,
) -> Result<Value, Failure> {
    tokio::select! {
        outcome = work => outcome,
        () = cancel.cancelled() => Err(failure("stopped: the service is shutting down")),
    }
}

async fn point(service: &Service, cancel: &CancellationToken) -> Result<Value, Failure> {
    let options = PointOptions {
        pool: Some(service.pool.clone()),
        ..PointOptions::default()
    };
    let taken = take::run_cancellable(
        &service.runbook,
        &service.storage,
        &service.settings,
        &options,
        cancel,
    )
    .await;
    match taken {
        Ok(manifest) => Ok(to_json(&manifest)),
        Err(error) => Err(Failure {
            error: error.to_string(),
            result: error.window().map(|window| json!({ "window": window })),
        }),
    }
}

async fn base_backup(service: &Service, cancel: &CancellationToken) -> Result<Value, Failure> {
    let names = service.runbook.base_backup_databases();
    if names.is_empty() {
        return Err(failure(
            "the runbook has no PostgreSQL or MariaDB database with archive = true: there is \
             nothing to take a base backup of",
        ));
    }
    let mut records = Vec::new();
    for name in &names {
        let record = base::take(
            &service.runbook,
            name,
            &service.storage,
            &service.settings,
            cancel,
        )
        .await?;
        records.push(record);
    }
    Ok(json!({ "bases": records }))
}

async fn full_backup(service: &Service, cancel: &CancellationToken) -> Result<Value, Failure> {
    let quiet: backup::ProgressSink = Arc::new(|_| {});
    let manifest = backup::run_cancellable(&service.runbook, Mode::Paused, quiet, cancel).await?;
    Ok(to_json(&manifest))
}

/// Drills the newest point; without points, the newest restorable backup.
async fn drill(service: &Service, cancel: &CancellationToken) -> Result<Value, Failure> {
    let decryption = backup::decryption(&service.runbook)?;
    let (found, _) = points::list_points(&service.storage).await?;
    if let Some(point) = found.last() {
        let request = DrillRequest {
            runbook: &service.runbook,
            storage: &service.storage,
            settings: &service.settings,
            decryption: &decryption,
            point,
            timeout: DRILL_TIMEOUT,
            run_as: stillpoint::pitr::running_as_root().then(|| "postgres".to_owned()),
        };
        let report = point_restore::drill(request, cancel).await?;
        return checked(to_json(&report), report.ok, || {
            format!("the drill of point {} failed a check", report.point_id)
        });
    }
    let listing = catalog::list(&service.storage).await?;
    let Some(manifest) = listing.latest() else {
        return Err(failure(
            "there is no point and no backup to drill yet; take one (POST /api/v1/jobs with \
             kind point or backup) or wait for the schedule",
        ));
    };
    let quiet: backup::ProgressSink = Arc::new(|_| {});
    let report = stillpoint::drill::run(
        &service.runbook,
        &service.storage,
        manifest,
        &decryption,
        false,
        cancel.clone(),
        quiet,
    )
    .await?;
    checked(to_json(&report), report.ok, || {
        format!("the drill of backup {} failed a check", manifest.backup_id)
    })
}

/// A report that passed, or a failure that carries it.
fn checked(report: Value, ok: bool, why: impl FnOnce() -> String) -> Result<Value, Failure> {
    if ok {
        Ok(report)
    } else {
        Err(Failure {
            error: why(),
            result: Some(report),
        })
    }
}

/// Every point, and the newest restorable backup, read back and checked.
async fn verify(service: &Service) -> Result<Value, Failure> {
    let decryption = backup::decryption(&service.runbook)?;
    let (found, damaged) = points::list_points(&service.storage).await?;
    let mut verdicts = Vec::with_capacity(found.len());
    let mut artifacts_checked = Default::default();
    for point in &found {
        verdicts.push(
            verify_point(
                &service.storage,
                &service.settings,
                point,
                &mut artifacts_checked,
            )
            .await,
        );
    }
    let listing = catalog::list(&service.storage).await?;
    let backup = match listing.latest() {
        Some(manifest) => Some((
            manifest.backup_id.clone(),
            catalog::verify(&service.storage, manifest, &decryption).await,
        )),
        None => None,
    };
    let backup_ok = backup
        .as_ref()
        .is_none_or(|(_, checks)| checks.iter().all(|check| check.is_sound()));
    let points_ok = verdicts.iter().all(|verdict| verdict.ok) && damaged.is_empty();
    let report = json!({
        "ok": backup_ok && points_ok,
        "backup": backup.as_ref().map(|(id, checks)| json!({
            "backup_id": id,
            "artifacts": checks.iter().map(|check| json!({
                "database": check.database,
                "sound": check.is_sound(),
                "detail": format!("{:?}", check.outcome),
            })).collect::<Vec<_>>(),
        })),
        "points": to_json(&verdicts),
        "damaged_points": damaged.iter().map(|(path, error)| json!({ "path": path, "error": error })).collect::<Vec<_>>(),
    });
    checked(report, backup_ok && points_ok, || {
        let failed: Vec<&str> = verdicts
            .iter()
            .filter(|verdict| !verdict.ok)
            .map(|verdict| verdict.point_id.as_str())
            .chain(damaged.iter().map(|(path, _)| path.as_str()))
            .chain(
                backup
                    .iter()
                    .filter(|_| !backup_ok)
                    .map(|(id, _)| id.as_str()),
            )
            .collect();
        format!("verify found damage: {}", failed.join(", "))
    })
}

/// Removes what `[retention]` no longer keeps: backups, points, and the bases and
/// chunks no kept point needs (the rules `stillpoint prune` applies).
async fn prune(service: &Service) -> Result<Value, Failure> {
    let retention = &service.runbook.retention;
    let rules = catalog::Retention {
        keep_last: retention.keep_last.unwrap_or(0) as usize,
        keep_daily: retention.keep_daily.unwrap_or(0) as usize,
        keep_weekly: retention.keep_weekly.unwrap_or(0) as usize,
    };
    let now = chrono::Utc::now();
    let listing = catalog::list(&service.storage).await?;
    let plan = catalog::plan_prune(&listing, rules, now)?;
    catalog::check_prune(&listing, &plan, false)?;
    let stale = catalog::stale_orphans(&listing, now, INCOMPLETE_GRACE);
    let holdings = points_prune::holdings(&service.storage, &service.settings).await?;
    let points_plan = points_prune::plan(&holdings, rules, now)?;
    let deleted = catalog::apply_prune(&service.storage, &plan).await?;
    for orphan in &stale {
        catalog::remove_orphan(&service.storage, orphan).await?;
    }
    let removed = points_prune::apply(&service.storage, &points_plan).await?;
    Ok(json!({
        "deleted_backups": deleted.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        "incomplete_removed": stale.iter().map(|orphan| &orphan.prefix).collect::<Vec<_>>(),
        "deleted_points": points_plan.points.delete,
        "deleted_bases": points_plan.delete_bases.iter().map(|base| json!({ "database": base.database, "id": base.id })).collect::<Vec<_>>(),
        "removed_objects": removed,
        "notes": points_plan.notes,
    }))
}
