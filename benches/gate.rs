//! Gate enter/exit cost per operation at 1 and 2 threads, against two baselines
//! measured in the same run: a bare atomic counter (the floor: one RMW in, one out)
//! and a mutex + condvar gate (the design of the upstream servers' gate keeper).
//!
//! Run: `scripts/bench gate` (which also writes the ratios into docs/performance.md),
//! or `cargo bench --bench gate` for criterion's own report.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use stillpoint_node::gate::{ClosedPolicy, Gate};

/// The floor: count in, count out, nothing else.
struct BareCounter(AtomicU64);

impl BareCounter {
    fn enter_exit(&self) {
        black_box(self.0.fetch_add(1, Ordering::Acquire));
        black_box(self.0.fetch_sub(1, Ordering::Release));
    }
}

/// The baseline design: a lock around "paused" and "in flight", a condvar to drain.
struct MutexGate {
    state: Mutex<(bool, u64)>,
    drained: Condvar,
    reopened: Condvar,
}

impl MutexGate {
    fn enter_exit(&self) {
        {
            let mut state = self.state.lock().unwrap();
            while state.0 {
                state = self.reopened.wait(state).unwrap();
            }
            state.1 += 1;
        }
        black_box(());
        let mut state = self.state.lock().unwrap();
        state.1 -= 1;
        if state.1 == 0 {
            self.drained.notify_all();
        }
    }
}

/// Each of `threads` threads runs `iters` enter/exit pairs at once; the result is the
/// wall time, so "per iteration" means "per operation on every thread concurrently".
fn run_concurrently(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..iters {
                    op();
                }
            });
        }
    });
    start.elapsed()
}

fn gate_enter_exit(c: &mut Criterion) {
    let bare = BareCounter(AtomicU64::new(0));
    let gate = Gate::new(ClosedPolicy::Reject);
    let mutex = MutexGate {
        state: Mutex::new((false, 0)),
        drained: Condvar::new(),
        reopened: Condvar::new(),
    };
    for threads in [1, 2] {
        let mut group = c.benchmark_group(format!("enter_exit_{threads}_threads"));
        group.bench_function("bare_atomic", |b| {
            b.iter_custom(|iters| run_concurrently(threads, iters, &|| bare.enter_exit()))
        });
        group.bench_function("stillpoint_gate", |b| {
            b.iter_custom(|iters| {
                run_concurrently(threads, iters, &|| {
                    drop(black_box(gate.try_enter().expect("gate is open")));
                })
            })
        });
        group.bench_function("mutex_condvar_gate", |b| {
            b.iter_custom(|iters| run_concurrently(threads, iters, &|| mutex.enter_exit()))
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = gate_enter_exit
}
criterion_main!(benches);
