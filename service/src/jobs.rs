//! Jobs: what the service runs (a point, a base backup, a backup, a drill, verify,
//! prune), whether the schedule or the API asked. Owns the rules that keep jobs apart
//! (never two pauses at once; never two runs of one kind), each job's record (kept in
//! memory, and in storage under `service/jobs/` once it ends, so a restarted service
//! knows what ran), and the library call each kind is.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stillpoint::runbook::JobKind;
use stillpoint::storage::Storage;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::work;

/// Where finished jobs' records are kept in the runbook's storage.
pub const JOBS_DIR: &str = "service/jobs/";
/// How long a job has to stop by itself once the service shuts down.
const CANCEL_GRACE: Duration = Duration::from_secs(20);
/// How many records the service keeps in memory (the newest; storage keeps all).
const KEPT: usize = 500;

/// Who asked for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Api,
}

impl Trigger {
    /// The `schedule` label of the job metrics: the kind's schedule, or `api`.
    pub fn label(self, kind: JobKind) -> &'static str {
        match self {
            Trigger::Schedule => kind.as_str(),
            Trigger::Api => "api",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for another job to release the cluster (or to finish its kind).
    Queued,
    Running,
    Succeeded,
    Failed,
    /// Not run: it would have overlapped another job (`note` names it).
    Skipped,
    /// Stopped by a shutdown before it finished; nothing it did is listed.
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// One job, as the API shows it and storage keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub kind: JobKind,
    pub trigger: Trigger,
    pub state: JobState,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<u64>,
    /// What the job made or found (a point manifest, a drill report, …).
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    /// Why it waited or was skipped.
    pub note: Option<String>,
}

/// A new job id: sortable by time, then kind, then a random part.
fn new_job_id(kind: JobKind, at: DateTime<Utc>) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{}-{kind}-{}",
        at.format("%Y%m%dT%H%M%S%.3fZ"),
        &random[..8]
    )
}

fn new_record(kind: JobKind, trigger: Trigger) -> JobRecord {
    let now = Utc::now();
    JobRecord {
        job_id: new_job_id(kind, now),
        kind,
        trigger,
        state: JobState::Queued,
        queued_at: now,
        started_at: None,
        finished_at: None,
        duration_ms: None,
        result: None,
        error: None,
        note: None,
    }
}

/// The job table and the locks that keep jobs apart.
pub struct Jobs {
    records: Mutex<VecDeque<JobRecord>>,
    /// Held by a job that pauses the cluster, for as long as it runs.
    pause: Arc<AsyncMutex<()>>,
    /// One per kind: held by the running job of that kind.
    kinds: HashMap<JobKind, Arc<AsyncMutex<()>>>,
}

impl Jobs {
    pub fn new(restored: Vec<JobRecord>) -> Jobs {
        let mut records: VecDeque<JobRecord> = restored.into();
        while records.len() > KEPT {
            records.pop_front();
        }
        Jobs {
            records: Mutex::new(records),
            pause: Arc::new(AsyncMutex::new(())),
            kinds: JobKind::ALL
                .into_iter()
                .map(|kind| (kind, Arc::new(AsyncMutex::new(()))))
                .collect(),
        }
    }

    /// The newest records first (at most `limit`).
    pub fn list(&self, limit: usize) -> Vec<JobRecord> {
        let records = self.records.lock().expect("job table");
        records.iter().rev().take(limit).cloned().collect()
    }

    pub fn get(&self, job_id: &str) -> Option<JobRecord> {
        let records = self.records.lock().expect("job table");
        records.iter().rev().find(|r| r.job_id == job_id).cloned()
    }

    /// The newest record of `kind` run by the schedule that started (catch-up after
    /// downtime compares it with the schedule's last due time).
    pub fn last_scheduled_start(&self, kind: JobKind) -> Option<DateTime<Utc>> {
        let records = self.records.lock().expect("job table");
        records
            .iter()
            .filter(|r| r.kind == kind && r.trigger == Trigger::Schedule)
            .filter_map(|r| r.started_at)
            .max()
    }

    /// The running job that `holds` says may hold a lock, for notes that name who is
    /// in the way: the running job of a kind, or for the pause, one whose kind pauses
    /// (not merely the first job running, which named a drill as holding the pause).
    fn running(&self, holds: impl Fn(JobKind) -> bool) -> Option<JobRecord> {
        let records = self.records.lock().expect("job table");
        records
            .iter()
            .find(|r| r.state == JobState::Running && holds(r.kind))
            .cloned()
    }

    fn insert(&self, record: JobRecord) {
        let mut records = self.records.lock().expect("job table");
        records.push_back(record);
        while records.len() > KEPT {
            records.pop_front();
        }
    }

    fn update(&self, job_id: &str, change: impl FnOnce(&mut JobRecord)) -> Option<JobRecord> {
        let mut records = self.records.lock().expect("job table");
        let record = records.iter_mut().rev().find(|r| r.job_id == job_id)?;
        change(record);
        Some(record.clone())
    }
}

/// The locks a job holds while it runs.
struct Held {
    _kind: OwnedMutexGuard<()>,
    _pause: Option<OwnedMutexGuard<()>>,
}

/// Reads every job record kept in storage (oldest first); unreadable ones are
/// skipped with a warning: they only inform the schedule's catch-up.
pub async fn restore_records(storage: &Storage) -> Vec<JobRecord> {
    let entries = match storage.list(JOBS_DIR).await {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!("cannot list the job records in {JOBS_DIR}: {error}");
            return Vec::new();
        }
    };
    let mut records = Vec::new();
    for entry in entries.iter().filter(|e| e.path.ends_with(".json")) {
        match storage.get_bytes(&entry.path).await {
            Ok(bytes) => match serde_json::from_slice::<JobRecord>(&bytes) {
                Ok(record) => records.push(record),
                Err(error) => tracing::warn!("job record {} is unreadable: {error}", entry.path),
            },
            Err(error) => tracing::warn!("job record {} is unreadable: {error}", entry.path),
        }
    }
    records.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    records
}

impl crate::Service {
    /// Queues a job and starts it. A scheduled job that would overlap another is
    /// skipped (a scheduled backup waits for a point instead: it is rarer and worth
    /// more); a job the API asked for waits its turn.
    pub fn submit(self: &Arc<Self>, kind: JobKind, trigger: Trigger) -> JobRecord {
        let record = new_record(kind, trigger);
        self.metrics.job_attempted(kind, trigger);
        let waits = trigger == Trigger::Api || kind == JobKind::Backup;
        let kind_lock = self.jobs.kinds[&kind].clone();
        let pause_lock = self.jobs.pause.clone();
        let job_id = record.job_id.clone();

        // Scheduled jobs decide now whether they run, so the answer is immediate.
        let kind_guard = match kind_lock.clone().try_lock_owned() {
            Ok(guard) => Some(guard),
            Err(_) if trigger == Trigger::Schedule => {
                let holder = self.holder(|running| running == kind);
                return self.skip(
                    record,
                    format!("the previous {kind} ({holder}) is still running"),
                );
            }
            Err(_) => None,
        };
        let pause_guard = if !kind.pauses() {
            Some(None)
        } else if kind_guard.is_none() {
            // It waits for its kind first, then for the pause: a job that took the pause
            // here and then waited for its kind deadlocked with the kind's holder when
            // that one was about to wait for the pause.
            None
        } else {
            match pause_lock.clone().try_lock_owned() {
                Ok(guard) => Some(Some(guard)),
                Err(_) if !waits => {
                    let holder = self.holder(JobKind::pauses);
                    return self.skip(
                        record,
                        format!("{holder} holds the cluster's pause; a point never waits for one"),
                    );
                }
                Err(_) => None,
            }
        };
        self.jobs.insert(record.clone());
        let service = self.clone();
        self.tasks.spawn(async move {
            let mut waited = Vec::new();
            let kind_guard = match kind_guard {
                Some(guard) => guard,
                None => {
                    waited.push(service.holder(|running| running == kind));
                    kind_lock.lock_owned().await
                }
            };
            let pause_guard = match pause_guard {
                Some(guard) => guard,
                None => {
                    waited.push(service.holder(JobKind::pauses));
                    Some(pause_lock.lock_owned().await)
                }
            };
            let held = Held {
                _kind: kind_guard,
                _pause: pause_guard,
            };
            let note = (!waited.is_empty()).then(|| format!("waited for {}", waited.join(" and ")));
            service.run(job_id, kind, trigger, note, held).await;
        });
        record
    }

    /// Names the running job in the way (see [`Jobs::running`]).
    fn holder(&self, holds: impl Fn(JobKind) -> bool) -> String {
        self.jobs
            .running(holds)
            .map_or("another job".to_owned(), |r| {
                format!("job {} ({})", r.job_id, r.kind)
            })
    }

    /// Records a scheduled job that is not run, and why.
    pub(crate) fn skip_scheduled(&self, kind: JobKind, why: String) {
        self.metrics.job_attempted(kind, Trigger::Schedule);
        self.skip(new_record(kind, Trigger::Schedule), why);
    }

    fn skip(&self, mut record: JobRecord, why: String) -> JobRecord {
        tracing::warn!(job = %record.job_id, "scheduled {} skipped: {why}", record.kind);
        record.state = JobState::Skipped;
        record.finished_at = Some(Utc::now());
        record.note = Some(why);
        self.metrics.job_skipped(record.kind, record.trigger);
        self.jobs.insert(record.clone());
        record
    }

    async fn run(
        self: Arc<Self>,
        job_id: String,
        kind: JobKind,
        trigger: Trigger,
        note: Option<String>,
        held: Held,
    ) {
        let started = Instant::now();
        self.jobs.update(&job_id, |r| {
            r.state = JobState::Running;
            r.started_at = Some(Utc::now());
            r.note = note;
        });
        tracing::info!(job = %job_id, "{kind} started ({})", trigger.label(kind));
        // A shutdown cancels the job: it releases a paused cluster itself and removes
        // what it made (nothing it stored is listed: manifests and records go last).
        // Work that does not stop within the grace period is dropped, which releases a
        // paused cluster too (PausedCluster's drop).
        let work = work::run(&self, kind);
        tokio::pin!(work);
        let outcome = tokio::select! {
            outcome = &mut work => Some(outcome),
            () = self.shutdown.cancelled() => {
                tokio::time::timeout(CANCEL_GRACE, &mut work).await.ok()
            }
        };
        let outcome = outcome.filter(|_| !self.shutdown.is_cancelled());
        drop(held);
        let elapsed = started.elapsed();
        let record = self.jobs.update(&job_id, |r| {
            r.finished_at = Some(Utc::now());
            r.duration_ms = Some(elapsed.as_millis() as u64);
            match outcome {
                Some(Ok(result)) => {
                    r.state = JobState::Succeeded;
                    r.result = Some(result);
                }
                Some(Err(failure)) => {
                    r.state = JobState::Failed;
                    r.error = Some(failure.error);
                    r.result = failure.result;
                }
                None => {
                    r.state = JobState::Cancelled;
                    r.error = Some("the service stopped before the job finished".to_owned());
                }
            }
        });
        let Some(record) = record else { return };
        match record.state {
            JobState::Succeeded => {
                tracing::info!(job = %job_id, "{kind} succeeded in {} ms", elapsed.as_millis());
                self.metrics.job_succeeded(kind, trigger, elapsed);
            }
            JobState::Failed => {
                tracing::warn!(job = %job_id, "{kind} failed: {}", record.error.as_deref().unwrap_or("?"));
                self.metrics.job_failed(kind, trigger, elapsed);
            }
            _ => {}
        }
        if kind == JobKind::Drill
            && let Some(result) = &record.result
            && let Some(passed) = result.get("ok").and_then(serde_json::Value::as_bool)
        {
            self.metrics.drill_finished(passed, Utc::now());
        }
        if kind == JobKind::Point
            && let Some(window_ms) = record
                .result
                .as_ref()
                .and_then(|result| result["window"]["window_ms"].as_f64())
        {
            self.metrics.pause_window(window_ms / 1000.0);
        }
        let path = format!("{JOBS_DIR}{job_id}.json");
        let bytes = serde_json::to_vec_pretty(&record).expect("a job record serializes");
        if let Err(error) = self.storage.put_atomic(&path, bytes.into()).await {
            tracing::warn!(job = %job_id, "cannot store the job's record at {path}: {error}");
        }
        self.refresh_view().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_sort_by_time_and_name_their_kind() {
        let early = new_job_id(JobKind::Point, "2026-11-30T12:00:00Z".parse().unwrap());
        let late = new_job_id(JobKind::Drill, "2026-11-30T12:00:01Z".parse().unwrap());
        assert!(early < late, "{early} {late}");
        assert!(early.starts_with("20261130T120000.000Z-point-"), "{early}");
    }

    /// A service over a runbook whose one node is a closed port (a point fails at
    /// once) and whose storage is `dir`.
    fn service(dir: &std::path::Path) -> Arc<crate::Service> {
        let text = format!(
            "cluster = \"jobs-test\"\n[pause]\ntiers = [{{ addresses = [\"127.0.0.1:1\"] }}]\n\
             [[databases]]\nname = \"app\"\nadapter = \"exec\"\ncut = \"true\"\n\
             [storage]\nurl = \"file://{}\"\n",
            dir.display()
        );
        let runbook = stillpoint::runbook::Runbook::parse(&text, dir).unwrap();
        let storage =
            Storage::open_with_options(&runbook.storage.url, &runbook.storage.options).unwrap();
        let settings = stillpoint::backup::pipeline_settings(&runbook).unwrap();
        let token =
            stillpoint_node::grpc::auth::AdminToken::parse("operator-token-0123456789", "test")
                .unwrap();
        Arc::new(crate::Service {
            runbook,
            storage,
            settings,
            jobs: Jobs::new(Vec::new()),
            metrics: crate::metrics::Metrics::new(),
            archives: Default::default(),
            view: Default::default(),
            auth: crate::api::Auth::new(&token, None).unwrap(),
            pool: Default::default(),
            public_status: false,
            ready: Default::default(),
            shutdown: Default::default(),
            tasks: Default::default(),
        })
    }

    // One thread: spawned jobs run only when the test waits, so the interleaving is
    // the one written here.
    #[tokio::test(flavor = "current_thread")]
    async fn two_api_points_submitted_around_a_pause_release_both_run() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        // Another job holds the pause: the first point takes its kind and will wait.
        let other = service.jobs.pause.clone().try_lock_owned().unwrap();
        let first = service.submit(JobKind::Point, Trigger::Api);
        // The pause is let go before the first point's task asked for it; the second
        // point finds its kind taken and the pause free.
        drop(other);
        let second = service.submit(JobKind::Point, Trigger::Api);
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let states: Vec<_> = [&first, &second]
                    .iter()
                    .map(|job| service.jobs.get(&job.job_id).unwrap().state)
                    .collect();
                if states.iter().all(|state| state.is_final()) {
                    return states;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let states = ended.unwrap_or_else(|_| {
            panic!(
                "the two points wait on each other: {:?}",
                service.jobs.list(10)
            )
        });
        // The node is a closed port: each ran and failed.
        assert_eq!(states, [JobState::Failed, JobState::Failed]);
    }

    #[test]
    fn the_job_named_as_holding_the_pause_is_one_that_pauses() {
        let running = |kind, at: &str| JobRecord {
            state: JobState::Running,
            started_at: Some(at.parse().unwrap()),
            ..new_record(kind, Trigger::Api)
        };
        // A drill (which never pauses) started first; a backup holds the pause.
        let drill = running(JobKind::Drill, "2026-11-30T04:00:00Z");
        let backup = running(JobKind::Backup, "2026-11-30T04:01:00Z");
        let jobs = Jobs::new(vec![drill.clone(), backup.clone()]);
        assert_eq!(
            jobs.running(JobKind::pauses).map(|r| r.job_id),
            Some(backup.job_id)
        );
        assert_eq!(
            jobs.running(|kind| kind == JobKind::Drill)
                .map(|r| r.job_id),
            Some(drill.job_id)
        );
        assert_eq!(jobs.running(|kind| kind == JobKind::Point), None);
    }

    #[test]
    fn the_newest_scheduled_start_of_a_kind_is_found() {
        let record = |kind, trigger, at: &str| JobRecord {
            job_id: new_job_id(kind, at.parse().unwrap()),
            kind,
            trigger,
            state: JobState::Succeeded,
            queued_at: at.parse().unwrap(),
            started_at: Some(at.parse().unwrap()),
            finished_at: None,
            duration_ms: None,
            result: None,
            error: None,
            note: None,
        };
        let jobs = Jobs::new(vec![
            record(JobKind::Drill, Trigger::Schedule, "2026-11-29T04:00:00Z"),
            record(JobKind::Drill, Trigger::Api, "2026-11-30T09:00:00Z"),
            record(JobKind::Point, Trigger::Schedule, "2026-11-30T10:00:00Z"),
        ]);
        assert_eq!(
            jobs.last_scheduled_start(JobKind::Drill),
            Some("2026-11-29T04:00:00Z".parse().unwrap())
        );
        assert_eq!(jobs.last_scheduled_start(JobKind::Prune), None);
    }
}
