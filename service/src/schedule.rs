//! The runbook's `[schedule]` at work: each entry waits for its next due time and
//! submits its job. After downtime a kind whose last due time passed while the service
//! was down runs once at start (one catch-up run, never a burst: the next due time is
//! always computed from now). An archived database with no base backup yet gets one
//! when points are scheduled (once its archive holds a first chunk; again until it
//! succeeds), since no point can be restorable without it; until it is there,
//! scheduled points are skipped (and say why), not failed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use stillpoint::runbook::{JobKind, ScheduleEntry};

use crate::Service;
use crate::jobs::{JobState, Trigger};

/// How long after a failed first base backup it is tried again.
const FIRST_BASE_RETRY: Duration = Duration::from_secs(30);

/// An entry of the schedule as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub kind: JobKind,
    pub cron: String,
    pub time_zone: String,
    pub next_run: Option<DateTime<Utc>>,
    pub last_scheduled_run: Option<DateTime<Utc>>,
}

impl Service {
    /// The schedule with each entry's next run after now.
    pub(crate) fn planned(&self) -> Vec<Planned> {
        let schedule = &self.runbook.schedule;
        let now = Utc::now();
        schedule
            .entries
            .iter()
            .map(|entry| Planned {
                kind: entry.kind,
                cron: entry.pattern.clone(),
                time_zone: schedule.time_zone.name().to_owned(),
                next_run: entry.next_after(schedule.time_zone, now),
                last_scheduled_run: self.jobs.last_scheduled_start(entry.kind),
            })
            .collect()
    }
}

/// Whether a run was due while nobody ran it: the last due time before `now` is after
/// the last run that started (a kind never run has nothing to catch up).
fn missed(
    entry: &ScheduleEntry,
    zone: chrono_tz::Tz,
    last_run: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    match (entry.last_due(zone, now), last_run) {
        (Some(due), Some(last)) => due > last,
        _ => false,
    }
}

/// Runs every entry until shutdown.
pub async fn run(service: Arc<Service>) {
    let schedule = &service.runbook.schedule;
    for entry in &schedule.entries {
        service.metrics.declare_scheduled(entry.kind);
    }
    let loops = schedule
        .entries
        .iter()
        .map(|entry| run_entry(&service, entry));
    let first_base = async {
        if schedule
            .entries
            .iter()
            .any(|entry| entry.kind == JobKind::Point)
        {
            take_first_base(&service).await;
        }
    };
    tokio::join!(futures::future::join_all(loops), first_base);
}

/// Takes a base backup of the archived databases that have none, once each one's
/// archive holds a first chunk (a base older than the archive's start could not be
/// replayed); tried again every [`FIRST_BASE_RETRY`] until it succeeds.
async fn take_first_base(service: &Arc<Service>) {
    let bases = service.runbook.base_backup_databases();
    while needs_base(service).await {
        let archived = || {
            let archives = service.archives.all();
            bases.iter().all(|name| {
                archives
                    .iter()
                    .any(|state| &state.database == name && state.archived_to.is_some())
            })
        };
        while !archived() {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = service.shutdown.cancelled() => return,
            }
        }
        tracing::info!("an archived database has no base backup yet: taking one now");
        let job = service.submit(JobKind::BaseBackup, Trigger::Schedule);
        let ended = loop {
            match service.jobs.get(&job.job_id) {
                Some(record) if !record.state.is_final() => {}
                record => break record,
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = service.shutdown.cancelled() => return,
            }
        };
        if ended.is_some_and(|record| record.state == JobState::Succeeded) {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(FIRST_BASE_RETRY) => {}
            () = service.shutdown.cancelled() => return,
        }
    }
}

async fn needs_base(service: &Service) -> bool {
    let view = service.view.read().await;
    service.runbook.base_backup_databases().iter().any(|name| {
        view.databases
            .iter()
            .find(|db| &db.database == name)
            .is_none_or(|db| db.bases.is_empty())
    })
}

async fn run_entry(service: &Arc<Service>, entry: &ScheduleEntry) {
    let zone = service.runbook.schedule.time_zone;
    let now = Utc::now();
    if missed(
        entry,
        zone,
        service.jobs.last_scheduled_start(entry.kind),
        now,
    ) {
        tracing::info!(
            "{} was due while the service was down: running it once now",
            entry.kind
        );
        service.submit(entry.kind, Trigger::Schedule);
    }
    let mut after = now;
    loop {
        let Some(next) = entry.next_after(zone, after) else {
            tracing::warn!(
                "{} ({}) has no next run; it stays idle",
                entry.kind,
                entry.pattern
            );
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = service.shutdown.cancelled() => return,
        }
        if entry.kind == JobKind::Point && needs_base(service).await {
            // Not a failure to alert on: the first base backup is still being taken.
            service.skip_scheduled(
                entry.kind,
                "an archived database has no base backup yet (the first one is being \
                 taken, or take one: POST /api/v1/jobs {\"kind\": \"base_backup\"})"
                    .to_owned(),
            );
        } else {
            service.submit(entry.kind, Trigger::Schedule);
        }
        // From now, not from `next`: a run that took longer than the interval is
        // followed by the next due time, not by the ones it missed.
        after = Utc::now().max(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint::runbook::schedule::parse_cron;

    fn entry(pattern: &str) -> ScheduleEntry {
        ScheduleEntry {
            kind: JobKind::Drill,
            pattern: pattern.to_owned(),
            cron: parse_cron(pattern).unwrap(),
        }
    }

    #[test]
    fn a_run_missed_during_downtime_is_caught_up_once_and_only_when_missed() {
        let daily = entry("0 4 * * *");
        let zone = chrono_tz::UTC;
        let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
        // Down from before 04:00 to after it: the 04:00 run was missed.
        assert!(missed(
            &daily,
            zone,
            Some(at("2026-11-29T04:00:01Z")),
            at("2026-11-30T05:00:00Z")
        ));
        // Ran at 04:00 today: nothing missed.
        assert!(!missed(
            &daily,
            zone,
            Some(at("2026-11-30T04:00:00Z")),
            at("2026-11-30T05:00:00Z")
        ));
        // Never ran: nothing to catch up (the schedule starts now).
        assert!(!missed(&daily, zone, None, at("2026-11-30T05:00:00Z")));
        // Two days down: still one catch-up, decided by one comparison.
        assert!(missed(
            &daily,
            zone,
            Some(at("2026-11-27T04:00:00Z")),
            at("2026-11-30T05:00:00Z")
        ));
    }
}
