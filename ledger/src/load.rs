//! The load generator: concurrent workers sending random transfers round-robin across
//! ledger nodes, counting how each ended, until a duration or a count runs out or
//! shutdown is signalled. On shutdown, workers stop starting transfers and finish the
//! ones in flight, so every counted transfer has a known outcome. On request it also
//! keeps every transfer's start time, latency and outcome ([`Sample`]), so a benchmark
//! can tell the transfers that met a pause from those that did not.
//!
//! It drives ledger nodes through [`LedgerClient`] and counts the client's
//! [`TransferOutcome`]s; the client knows nothing of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::grpc::client::{ClientError, LedgerClient, TransferOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    For(Duration),
    Count(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    pub targets: Vec<String>,
    pub concurrency: usize,
    pub bound: Bound,
    pub seed: u64,
    /// Accounts 1..=accounts, as seeded on the ledger.
    pub accounts: u32,
    /// Amounts are drawn from 1..=max_amount.
    pub max_amount: i64,
    /// Test-only: ask each ledger node to hold the transfer this long inside its gate
    /// (nodes refuse unless started with --allow-slow-transfers).
    pub hold_inside_gate: Duration,
    /// Keep a [`Sample`] of every transfer in the report.
    pub keep_samples: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoadReport {
    pub ok: u64,
    pub rejected: u64,
    pub declined: u64,
    pub failed: u64,
    pub total: u64,
    pub elapsed_ms: u64,
    /// Transfers of any outcome per second.
    pub throughput_per_s: f64,
    /// Of committed transfers only: rejections and declines return at once and would
    /// hide the latency a pause adds.
    pub latency_ms: Latency,
    /// True when a signal stopped the run before its bound.
    pub stopped_early: bool,
    pub seed: u64,
    /// Distinct failure messages, most frequent first (at most [`MAX_ERROR_KINDS`]).
    pub errors: Vec<ErrorCount>,
    /// Every transfer, in no particular order, when `keep_samples` was set. Not part
    /// of the JSON report: `ledger-node load --latency-log` writes them to a file.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// One transfer as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// When it was sent, in microseconds since the Unix epoch (the wall clock, so it
    /// can be compared with pause windows recorded by another process on this host).
    pub started_unix_us: u64,
    pub latency_us: u64,
    pub outcome: OutcomeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Committed,
    Rejected,
    Declined,
    Failed,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Committed => "ok",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::Declined => "declined",
            OutcomeKind::Failed => "failed",
        }
    }
}

pub const MAX_ERROR_KINDS: usize = 10;

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ErrorCount {
    pub message: String,
    pub count: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no targets: give at least one ledger node address")]
    NoTargets,
    #[error("concurrency must be at least 1")]
    NoWorkers,
    #[error("transfers need at least 2 accounts, got {0}")]
    TooFewAccounts(u32),
    #[error("max amount must be at least 1, got {0}")]
    BadAmount(i64),
    #[error(transparent)]
    Connect(#[from] ClientError),
}

/// Shared by the workers: what bounds the run.
struct Plan {
    bound: Bound,
    deadline: Option<Instant>,
    started: AtomicU64,
    shutdown: CancellationToken,
    accounts: i64,
    max_amount: i64,
    hold_inside_gate_ms: u64,
    keep_samples: bool,
}

impl Plan {
    /// Claims the right to start one more transfer.
    fn claim(&self) -> bool {
        if self.shutdown.is_cancelled() {
            return false;
        }
        match (self.bound, self.deadline) {
            (Bound::Count(count), _) => self.started.fetch_add(1, Ordering::Relaxed) < count,
            (Bound::For(_), Some(deadline)) => Instant::now() < deadline,
            (Bound::For(_), None) => false,
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    rejected: u64,
    declined: u64,
    failed: u64,
    ok_latencies: Vec<Duration>,
    errors: HashMap<String, u64>,
    samples: Vec<Sample>,
}

impl Tally {
    fn add(&mut self, outcome: TransferOutcome, latency: Duration) {
        match outcome {
            TransferOutcome::Committed => {
                self.ok += 1;
                self.ok_latencies.push(latency);
            }
            TransferOutcome::Rejected(_) => self.rejected += 1,
            TransferOutcome::Declined => self.declined += 1,
            TransferOutcome::Failed(message) => {
                self.failed += 1;
                *self.errors.entry(message).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.declined += other.declined;
        self.failed += other.failed;
        self.ok_latencies.extend(other.ok_latencies);
        self.samples.extend(other.samples);
        for (message, count) in other.errors {
            *self.errors.entry(message).or_default() += count;
        }
    }
}

pub async fn run(config: LoadConfig, shutdown: CancellationToken) -> Result<LoadReport, LoadError> {
    if config.targets.is_empty() {
        return Err(LoadError::NoTargets);
    }
    if config.concurrency == 0 {
        return Err(LoadError::NoWorkers);
    }
    if config.accounts < 2 {
        return Err(LoadError::TooFewAccounts(config.accounts));
    }
    if config.max_amount < 1 {
        return Err(LoadError::BadAmount(config.max_amount));
    }
    // Connect up front so that a wrong address fails the run at once instead of being
    // counted as thousands of failed transfers.
    let mut clients = Vec::with_capacity(config.targets.len());
    for target in &config.targets {
        clients.push(LedgerClient::connect(target).await?);
    }
    let clients: Arc<[LedgerClient]> = clients.into();
    let started_at = Instant::now();
    let plan = Arc::new(Plan {
        bound: config.bound,
        deadline: match config.bound {
            Bound::For(duration) => Some(started_at + duration),
            Bound::Count(_) => None,
        },
        started: AtomicU64::new(0),
        shutdown: shutdown.clone(),
        accounts: i64::from(config.accounts),
        max_amount: config.max_amount,
        hold_inside_gate_ms: config.hold_inside_gate.as_millis() as u64,
        keep_samples: config.keep_samples,
    });
    // Workers are tasks so that they spread over all cores; the set is joined below.
    let mut workers = JoinSet::new();
    for index in 0..config.concurrency {
        let seed = config
            .seed
            .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        workers.spawn(worker(index, seed, clients.clone(), plan.clone()));
    }
    let mut tally = Tally::default();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(worker_tally) => tally.merge(worker_tally),
            // A panicking worker is a bug in this program, not in the cluster.
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    let elapsed = started_at.elapsed();
    Ok(report(tally, elapsed, shutdown.is_cancelled(), config.seed))
}

async fn worker(index: usize, seed: u64, clients: Arc<[LedgerClient]>, plan: Arc<Plan>) -> Tally {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut tally = Tally::default();
    let mut target = index % clients.len();
    while plan.claim() {
        let from = rng.i64(1..=plan.accounts);
        // Uniform over the other accounts, so `to` never equals `from`.
        let to = (from - 1 + rng.i64(1..plan.accounts)) % plan.accounts + 1;
        let amount = rng.i64(1..=plan.max_amount);
        let started = Instant::now();
        let started_wall = SystemTime::now();
        let outcome = clients[target]
            .transfer(from, to, amount, plan.hold_inside_gate_ms)
            .await;
        let latency = started.elapsed();
        if plan.keep_samples {
            tally.samples.push(Sample {
                started_unix_us: started_wall
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_micros() as u64,
                latency_us: latency.as_micros() as u64,
                outcome: match outcome {
                    TransferOutcome::Committed => OutcomeKind::Committed,
                    TransferOutcome::Rejected(_) => OutcomeKind::Rejected,
                    TransferOutcome::Declined => OutcomeKind::Declined,
                    TransferOutcome::Failed(_) => OutcomeKind::Failed,
                },
            });
        }
        tally.add(outcome, latency);
        target = (target + 1) % clients.len();
    }
    tally
}

fn report(mut tally: Tally, elapsed: Duration, stopped_early: bool, seed: u64) -> LoadReport {
    let total = tally.ok + tally.rejected + tally.declined + tally.failed;
    tally.ok_latencies.sort_unstable();
    let mut errors: Vec<ErrorCount> = tally
        .errors
        .into_iter()
        .map(|(message, count)| ErrorCount { message, count })
        .collect();
    errors.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.message.cmp(&b.message))
    });
    errors.truncate(MAX_ERROR_KINDS);
    let seconds = elapsed.as_secs_f64();
    LoadReport {
        ok: tally.ok,
        rejected: tally.rejected,
        declined: tally.declined,
        failed: tally.failed,
        total,
        elapsed_ms: elapsed.as_millis() as u64,
        throughput_per_s: if seconds > 0.0 {
            total as f64 / seconds
        } else {
            0.0
        },
        latency_ms: Latency {
            p50: percentile_ms(&tally.ok_latencies, 50.0),
            p90: percentile_ms(&tally.ok_latencies, 90.0),
            p99: percentile_ms(&tally.ok_latencies, 99.0),
            max: percentile_ms(&tally.ok_latencies, 100.0),
        },
        stopped_early,
        seed,
        errors,
        samples: tally.samples,
    }
}

/// Nearest-rank percentile of sorted samples, in milliseconds; 0 without samples.
fn percentile_ms(sorted: &[Duration], percent: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "ok {}  rejected {}  declined {}  failed {}  total {}",
            self.ok, self.rejected, self.declined, self.failed, self.total
        )?;
        writeln!(
            f,
            "elapsed {:.2}s  throughput {:.1}/s{}",
            self.elapsed_ms as f64 / 1000.0,
            self.throughput_per_s,
            if self.stopped_early {
                "  (stopped early by a signal)"
            } else {
                ""
            }
        )?;
        let latency = &self.latency_ms;
        writeln!(
            f,
            "latency of committed transfers (ms)  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            latency.p50, latency.p90, latency.p99, latency.max
        )?;
        for error in &self.errors {
            writeln!(f, "failed {}x: {}", error.count, error.message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&samples, 50.0), 50.0);
        assert_eq!(percentile_ms(&samples, 90.0), 90.0);
        assert_eq!(percentile_ms(&samples, 99.0), 99.0);
        assert_eq!(percentile_ms(&samples, 100.0), 100.0);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
        assert_eq!(percentile_ms(&[Duration::from_millis(7)], 1.0), 7.0);
    }

    #[test]
    fn reports_count_every_outcome_once() {
        let mut tally = Tally::default();
        tally.add(TransferOutcome::Committed, Duration::from_millis(2));
        tally.add(TransferOutcome::Rejected("paused".into()), Duration::ZERO);
        tally.add(TransferOutcome::Declined, Duration::ZERO);
        tally.add(TransferOutcome::Failed("boom".into()), Duration::ZERO);
        tally.add(TransferOutcome::Failed("boom".into()), Duration::ZERO);
        let report = report(tally, Duration::from_secs(1), false, 7);
        assert_eq!(
            (
                report.ok,
                report.rejected,
                report.declined,
                report.failed,
                report.total
            ),
            (1, 1, 1, 2, 5)
        );
        assert_eq!(report.latency_ms.max, 2.0);
        assert_eq!(
            report.errors,
            vec![ErrorCount {
                message: "boom".into(),
                count: 2
            }]
        );
    }
}
