//! The service's Prometheus metrics (prometheus-client, served at `/metrics` in the
//! OpenMetrics text format). The names are a contract: docs/alerts/ and operators'
//! dashboards use them, so they change only with those. Named after Velero's, which
//! operators already alert on: attempts, successes and failures per job kind and
//! schedule, durations, the time of the last success.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use stillpoint::runbook::JobKind;

use crate::jobs::Trigger;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    schedule: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatabaseLabel {
    database: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the service exports, registered once.
pub struct Metrics {
    attempts: Family<JobLabels, Counter>,
    successes: Family<JobLabels, Counter>,
    failures: Family<JobLabels, Counter>,
    skipped: Family<JobLabels, Counter>,
    duration: Family<KindLabel, Histogram>,
    last_success: Family<KindLabel, FloatGauge>,
    pause_window: Histogram,
    lag_seconds: Family<DatabaseLabel, FloatGauge>,
    lag_bytes: Family<DatabaseLabel, Gauge>,
    archiver_up: Family<DatabaseLabel, Gauge>,
    archiver_restarts: Family<DatabaseLabel, Counter>,
    points_restorable: Gauge,
    newest_point: FloatGauge,
    drill_result: Gauge,
    drill_time: FloatGauge,
    stored_bytes: Family<KindLabel, Gauge>,
    node_paused: Family<NodeLabel, FloatGauge>,
    node_lease: Family<NodeLabel, FloatGauge>,
    /// Whether a drill has finished yet: before, its gauges are left out rather than
    /// read as "failed".
    drilled: std::sync::atomic::AtomicBool,
}

fn seconds_since_epoch(time: DateTime<Utc>) -> f64 {
    time.timestamp_millis() as f64 / 1000.0
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let job_durations = || Histogram::new(exponential_buckets(0.05, 2.0, 16));
        Metrics {
            attempts: Family::default(),
            successes: Family::default(),
            failures: Family::default(),
            skipped: Family::default(),
            duration: Family::new_with_constructor(job_durations),
            last_success: Family::default(),
            pause_window: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            lag_seconds: Family::default(),
            lag_bytes: Family::default(),
            archiver_up: Family::default(),
            archiver_restarts: Family::default(),
            points_restorable: Gauge::default(),
            newest_point: FloatGauge::default(),
            drill_result: Gauge::default(),
            drill_time: FloatGauge::default(),
            stored_bytes: Family::default(),
            node_paused: Family::default(),
            node_lease: Family::default(),
            drilled: false.into(),
        }
    }

    /// The registry with every metric that has a value to show.
    fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        let r = &mut registry;
        r.register(
            "stillpoint_job_attempts",
            "Jobs started or skipped, by kind and schedule (api: asked through the API)",
            self.attempts.clone(),
        );
        r.register(
            "stillpoint_job_successes",
            "Jobs that succeeded",
            self.successes.clone(),
        );
        r.register(
            "stillpoint_job_failures",
            "Jobs that failed",
            self.failures.clone(),
        );
        r.register(
            "stillpoint_job_skipped",
            "Scheduled jobs not run because they would have overlapped another",
            self.skipped.clone(),
        );
        r.register(
            "stillpoint_job_duration_seconds",
            "How long finished jobs ran",
            self.duration.clone(),
        );
        r.register(
            "stillpoint_job_last_success_timestamp_seconds",
            "When the last job of each kind succeeded (unix time)",
            self.last_success.clone(),
        );
        r.register(
            "stillpoint_pause_window_seconds",
            "Pause windows of points taken by the service",
            self.pause_window.clone(),
        );
        r.register(
            "stillpoint_archive_lag_seconds",
            "How long the oldest log byte the archive does not hold yet has been on the server",
            self.lag_seconds.clone(),
        );
        r.register(
            "stillpoint_archive_lag_bytes",
            "Log bytes the server has that the archive does not",
            self.lag_bytes.clone(),
        );
        r.register(
            "stillpoint_archiver_up",
            "1 while the database's archiver streams its log, 0 otherwise",
            self.archiver_up.clone(),
        );
        r.register(
            "stillpoint_archiver_restarts",
            "Times the archiver's log client was started again",
            self.archiver_restarts.clone(),
        );
        r.register(
            "stillpoint_points_restorable",
            "Points the catalog lists (each written only once restorable)",
            self.points_restorable.clone(),
        );
        r.register(
            "stillpoint_newest_point_timestamp_seconds",
            "The restore time of the newest listed point (unix time)",
            self.newest_point.clone(),
        );
        if self.drilled.load(std::sync::atomic::Ordering::Relaxed) {
            r.register(
                "stillpoint_drill_last_result",
                "1 if the last drill passed, 0 if it failed",
                self.drill_result.clone(),
            );
            r.register(
                "stillpoint_drill_last_timestamp_seconds",
                "When the last drill finished (unix time)",
                self.drill_time.clone(),
            );
        }
        r.register(
            "stillpoint_stored_bytes",
            "Bytes stored, by kind (backups, bases, archive)",
            self.stored_bytes.clone(),
        );
        r.register(
            "stillpoint_node_paused_seconds",
            "How long the node has been paused (0 when it is not)",
            self.node_paused.clone(),
        );
        r.register(
            "stillpoint_node_lease_seconds",
            "The lease the runbook gives each node's pause",
            self.node_lease.clone(),
        );
        registry
    }

    /// The OpenMetrics text `/metrics` answers with.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry())
            .expect("writing to a String cannot fail");
        text
    }

    fn job(kind: JobKind, trigger: Trigger) -> JobLabels {
        JobLabels {
            kind: kind.as_str().to_owned(),
            schedule: trigger.label(kind).to_owned(),
        }
    }

    fn kind(kind: JobKind) -> KindLabel {
        KindLabel {
            kind: kind.as_str().to_owned(),
        }
    }

    /// Shows a scheduled kind's counters at 0 from the start: Prometheus' `increase()`
    /// does not see the first failure of a series that appears already at 1.
    pub fn declare_scheduled(&self, kind: JobKind) {
        let labels = Self::job(kind, Trigger::Schedule);
        for family in [
            &self.attempts,
            &self.successes,
            &self.failures,
            &self.skipped,
        ] {
            let _ = family.get_or_create(&labels);
        }
    }

    pub fn job_attempted(&self, kind: JobKind, trigger: Trigger) {
        self.attempts.get_or_create(&Self::job(kind, trigger)).inc();
    }

    pub fn job_skipped(&self, kind: JobKind, trigger: Trigger) {
        self.skipped.get_or_create(&Self::job(kind, trigger)).inc();
    }

    pub fn job_succeeded(&self, kind: JobKind, trigger: Trigger, took: Duration) {
        self.successes
            .get_or_create(&Self::job(kind, trigger))
            .inc();
        self.duration
            .get_or_create(&Self::kind(kind))
            .observe(took.as_secs_f64());
        self.last_success
            .get_or_create(&Self::kind(kind))
            .set(seconds_since_epoch(Utc::now()));
    }

    pub fn job_failed(&self, kind: JobKind, trigger: Trigger, took: Duration) {
        self.failures.get_or_create(&Self::job(kind, trigger)).inc();
        self.duration
            .get_or_create(&Self::kind(kind))
            .observe(took.as_secs_f64());
    }

    pub fn pause_window(&self, seconds: f64) {
        self.pause_window.observe(seconds);
    }

    pub fn drill_finished(&self, passed: bool, at: DateTime<Utc>) {
        self.drill_result.set(i64::from(passed));
        self.drill_time.set(seconds_since_epoch(at));
        self.drilled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn archive(
        &self,
        database: &str,
        lag: Option<Duration>,
        lag_bytes: Option<u64>,
        up: bool,
        restarts: u32,
    ) {
        let label = DatabaseLabel {
            database: database.to_owned(),
        };
        if let Some(lag) = lag {
            self.lag_seconds
                .get_or_create(&label)
                .set(lag.as_secs_f64());
        }
        if let Some(bytes) = lag_bytes {
            self.lag_bytes
                .get_or_create(&label)
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        self.archiver_up.get_or_create(&label).set(i64::from(up));
        let counter = self.archiver_restarts.get_or_create(&label);
        let seen = counter.get();
        if u64::from(restarts) > seen {
            counter.inc_by(u64::from(restarts) - seen);
        }
    }

    pub fn points(&self, count: usize, newest: Option<DateTime<Utc>>) {
        self.points_restorable
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        if let Some(newest) = newest {
            self.newest_point.set(seconds_since_epoch(newest));
        }
    }

    pub fn stored(&self, kind: &str, bytes: u64) {
        self.stored_bytes
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn node(&self, node: &str, paused_for: Duration, lease: Duration) {
        let label = NodeLabel {
            node: node.to_owned(),
        };
        self.node_paused
            .get_or_create(&label)
            .set(paused_for.as_secs_f64());
        self.node_lease
            .get_or_create(&label)
            .set(lease.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_metrics_carry_kind_and_schedule_and_drill_gauges_wait_for_a_drill() {
        let metrics = Metrics::new();
        metrics.job_attempted(JobKind::Point, Trigger::Schedule);
        metrics.job_succeeded(
            JobKind::Point,
            Trigger::Schedule,
            Duration::from_millis(300),
        );
        metrics.job_attempted(JobKind::Drill, Trigger::Api);
        let text = metrics.encode();
        assert!(
            text.contains("stillpoint_job_attempts_total{kind=\"point\",schedule=\"point\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stillpoint_job_attempts_total{kind=\"drill\",schedule=\"api\"} 1"),
            "{text}"
        );
        assert!(!text.contains("stillpoint_drill_last_result"), "{text}");
        metrics.drill_finished(false, Utc::now());
        let text = metrics.encode();
        assert!(text.contains("stillpoint_drill_last_result 0"), "{text}");
    }
}
