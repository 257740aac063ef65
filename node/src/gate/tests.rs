//! Unit tests of the gate, plus a stress test that races real threads against a pauser.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use super::{ClosedPolicy, Gate, Refused};

fn hold(ms: u64) -> ClosedPolicy {
    ClosedPolicy::Hold {
        timeout: Duration::from_millis(ms),
    }
}

#[test]
fn permit_counts_while_alive() {
    let gate = Gate::new(ClosedPolicy::Reject);
    let first = gate.try_enter().expect("open gate admits");
    let second = gate.try_enter().expect("open gate admits");
    assert_eq!(gate.in_flight(), 2);
    drop(first);
    assert_eq!(gate.in_flight(), 1);
    drop(second);
    assert_eq!(gate.in_flight(), 0);
}

#[test]
fn closed_gate_refuses_without_counting() {
    let gate = Gate::new(ClosedPolicy::Reject);
    assert_eq!(gate.close(), 0);
    assert!(gate.try_enter().is_none());
    assert_eq!(gate.in_flight(), 0);
    gate.open();
    assert!(gate.try_enter().is_some());
}

#[tokio::test]
async fn reject_policy_refuses_at_once() {
    let gate = Gate::new(ClosedPolicy::Reject);
    gate.close();
    assert_eq!(gate.enter().await.unwrap_err(), Refused::Paused);
    assert_eq!(gate.stats().rejected_total, 1);
}

#[tokio::test(start_paused = true)]
async fn hold_policy_admits_after_reopen() {
    let gate = Arc::new(Gate::new(hold(60_000)));
    gate.close();
    let waiter = {
        let gate = gate.clone();
        tokio::spawn(async move { gate.enter_owned().await.map(drop) })
    };
    // Let the waiter reach the closed gate.
    while gate.stats().held_now == 0 {
        tokio::task::yield_now().await;
    }
    gate.open();
    waiter
        .await
        .unwrap()
        .expect("held request enters after reopen");
    let stats = gate.stats();
    assert_eq!(
        (stats.held_now, stats.held_total, stats.rejected_total),
        (0, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn hold_policy_gives_up_after_timeout() {
    let gate = Gate::new(hold(500));
    gate.close();
    let refused = gate.enter().await.unwrap_err();
    assert_eq!(refused, Refused::HoldTimedOut(Duration::from_millis(500)));
    assert_eq!(gate.stats().rejected_total, 1);
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_requests_inside() {
    let gate = Arc::new(Gate::new(ClosedPolicy::Reject));
    let permit = gate.clone().enter_owned().await.unwrap();
    assert_eq!(gate.close(), 1);
    let drainer = {
        let gate = gate.clone();
        tokio::spawn(async move { gate.wait_drained(Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !drainer.is_finished(),
        "drained while a request was still inside"
    );
    drop(permit);
    assert_eq!(drainer.await.unwrap(), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_reports_requests_still_inside() {
    let gate = Gate::new(ClosedPolicy::Reject);
    let _one = gate.try_enter().unwrap();
    let _two = gate.try_enter().unwrap();
    gate.close();
    assert_eq!(gate.wait_drained(Duration::from_millis(100)).await, Err(2));
    assert!(
        gate.is_closed(),
        "the caller, not the gate, decides to reopen"
    );
}

/// Real threads enter and leave as fast as they can while a pauser closes, drains and
/// reopens the gate over and over. Inside every drained window no request may be inside
/// or start; at the end every admission must have been matched by exactly one leave.
#[test]
fn stress_no_request_escapes_the_drain() {
    const WORKERS: usize = 4;
    const PAUSES: usize = 300;

    let gate = Arc::new(Gate::new(ClosedPolicy::Reject));
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicU64::new(0));
    let escaped = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));

    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (gate, paused, stop, inside, escaped, admitted) = (
                gate.clone(),
                paused.clone(),
                stop.clone(),
                inside.clone(),
                escaped.clone(),
                admitted.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    if let Some(permit) = gate.try_enter() {
                        admitted.fetch_add(1, SeqCst);
                        inside.fetch_add(1, SeqCst);
                        if paused.load(SeqCst) {
                            escaped.fetch_add(1, SeqCst);
                        }
                        std::hint::spin_loop();
                        if paused.load(SeqCst) {
                            escaped.fetch_add(1, SeqCst);
                        }
                        inside.fetch_sub(1, SeqCst);
                        drop(permit);
                    }
                }
            })
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut drained_with_work_inside = 0;
    runtime.block_on(async {
        for _ in 0..PAUSES {
            // Race live traffic: wait until the workers got in again since the last
            // pause (threads may start late on a busy machine).
            let seen = admitted.load(SeqCst);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while admitted.load(SeqCst) == seen {
                assert!(
                    std::time::Instant::now() < deadline,
                    "workers stopped entering"
                );
                std::thread::yield_now();
            }
            gate.close();
            gate.wait_drained(Duration::from_secs(10))
                .await
                .expect("workers never hold the gate for long");
            if inside.load(SeqCst) != 0 {
                drained_with_work_inside += 1;
            }
            paused.store(true, SeqCst);
            for _ in 0..50 {
                std::hint::spin_loop();
            }
            paused.store(false, SeqCst);
            gate.open();
        }
    });
    stop.store(true, SeqCst);
    for worker in workers {
        worker.join().unwrap();
    }

    assert_eq!(
        drained_with_work_inside, 0,
        "drain reported done with work inside"
    );
    assert_eq!(
        escaped.load(SeqCst),
        0,
        "a request ran inside a drained window"
    );
    assert_eq!(gate.in_flight(), 0, "admissions and leaves do not match");
    assert!(
        admitted.load(SeqCst) > 0,
        "the workers never got in: the test proved nothing"
    );
}

/// The same race with held requests: every request is eventually admitted exactly once
/// and none runs inside a paused window.
#[test]
fn stress_held_requests_are_admitted_exactly_once() {
    const REQUESTS: u64 = 4_000;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let gate = Arc::new(Gate::new(hold(30_000)));
    let paused = Arc::new(AtomicBool::new(false));
    let escaped = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));

    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..REQUESTS {
            let (gate, paused, escaped, done) =
                (gate.clone(), paused.clone(), escaped.clone(), done.clone());
            tasks.spawn(async move {
                let permit = gate.enter_owned().await.expect("held, not refused");
                if paused.load(SeqCst) {
                    escaped.fetch_add(1, SeqCst);
                }
                tokio::task::yield_now().await;
                drop(permit);
                done.fetch_add(1, SeqCst);
            });
        }
        let mut pauses = 0;
        while done.load(SeqCst) < REQUESTS {
            gate.close();
            gate.wait_drained(Duration::from_secs(10)).await.unwrap();
            paused.store(true, SeqCst);
            // Give the other worker thread time to try (and fail) to get in.
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            paused.store(false, SeqCst);
            gate.open();
            pauses += 1;
            tokio::task::yield_now().await;
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        assert!(pauses > 0);
    });

    assert_eq!(escaped.load(SeqCst), 0);
    assert_eq!(done.load(SeqCst), REQUESTS);
    assert_eq!(gate.in_flight(), 0);
    assert_eq!(gate.stats().held_now, 0);
}
