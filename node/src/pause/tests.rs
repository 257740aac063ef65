//! Tests of the node-side pause state machine: ids, leases, drain failure, cancellation.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{AdminError, Holder, NodeAdmin, PauseCommand, PauseOwner};
use crate::gate::{ClosedPolicy, Gate};

fn admin() -> Arc<NodeAdmin> {
    Arc::new(NodeAdmin::new(
        Arc::new(Gate::new(ClosedPolicy::Reject)),
        None,
    ))
}

/// A coordinator that pauses under `id`; all tests' coordinators share one instance.
fn owner(id: &str) -> PauseOwner {
    PauseOwner::new(id, "c-1")
}

fn by(id: &str, lease_ms: u64) -> PauseCommand {
    PauseCommand {
        holder: Holder::Coordinator(owner(id)),
        lease: Some(Duration::from_millis(lease_ms)),
        max_wait: Duration::from_secs(1),
        wait_outstanding: true,
    }
}

#[tokio::test(start_paused = true)]
async fn pause_then_unpause_with_the_same_id() {
    let admin = admin();
    let status = admin.pause(by("a", 10_000)).await.unwrap();
    assert!(status.paused && admin.gate().is_closed());
    assert_eq!(status.pause_seq, 1);
    let released = admin.unpause(Some(&owner("a"))).unwrap();
    assert!(released.was_paused);
    assert_eq!(
        released.status.holder,
        Some(Holder::Coordinator(owner("a")))
    );
    assert!(!admin.gate().is_closed());
}

#[tokio::test(start_paused = true)]
async fn same_id_renews_and_other_id_is_refused() {
    let admin = admin();
    admin.pause(by("a", 1_000)).await.unwrap();
    let renewed = admin.pause(by("a", 60_000)).await.unwrap();
    assert_eq!(renewed.pause_seq, 1, "a renewal is not a new pause");
    assert!(renewed.lease_remaining.unwrap() > Duration::from_secs(59));
    let refused = admin.pause(by("b", 1_000)).await.unwrap_err();
    assert!(
        matches!(refused, AdminError::HeldByOther { .. }),
        "{refused}"
    );
    let refused = admin.unpause(Some(&owner("b"))).unwrap_err();
    assert!(
        matches!(refused, AdminError::HeldByOther { .. }),
        "{refused}"
    );
    assert!(
        admin.gate().is_closed(),
        "a refused unpause must not open the gate"
    );
    assert!(
        admin.unpause(None).unwrap().was_paused,
        "upstream unpause always works"
    );
}

#[tokio::test(start_paused = true)]
async fn upstream_pause_does_not_merge_with_an_id() {
    let admin = admin();
    let upstream = PauseCommand {
        holder: Holder::Upstream,
        lease: None,
        ..by("x", 1)
    };
    admin.pause(upstream.clone()).await.unwrap();
    admin
        .pause(upstream)
        .await
        .expect("upstream pause is idempotent");
    assert!(admin.pause(by("a", 1_000)).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_reopens_the_gate() {
    let admin = admin();
    let shutdown = CancellationToken::new();
    let watchdog = {
        let (admin, shutdown) = (admin.clone(), shutdown.clone());
        tokio::spawn(async move { admin.run_lease_watchdog(shutdown).await })
    };
    admin.pause(by("a", 2_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    admin
        .renew(&owner("a"), Duration::from_millis(2_000))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(admin.status().paused, "renewed lease expired early");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !admin.status().paused,
        "lease expired but the node stayed paused"
    );
    assert!(!admin.gate().is_closed());
    let renew = admin
        .renew(&owner("a"), Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(renew, AdminError::NotPausedBy { .. }));
    let released = admin.unpause(Some(&owner("a"))).unwrap();
    assert!(
        !released.was_paused,
        "unpause after expiry must say it was not paused"
    );
    shutdown.cancel();
    watchdog.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_reopens_and_reports_in_flight() {
    let admin = admin();
    let permit = admin.gate().try_enter().unwrap();
    let error = admin.pause(by("a", 10_000)).await.unwrap_err();
    assert_eq!(
        error,
        AdminError::DrainTimeout {
            in_flight: 1,
            max_wait: Duration::from_secs(1)
        }
    );
    assert!(
        !admin.gate().is_closed(),
        "failed pause must reopen the gate"
    );
    assert!(!admin.status().paused);
    drop(permit);
}

#[tokio::test(start_paused = true)]
async fn dropped_pause_call_reopens_the_gate() {
    let admin = admin();
    let permit = admin.gate().try_enter().unwrap();
    let pause = admin.pause(by("a", 10_000));
    // The caller gives up after 100ms, long before the 1s max wait.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), pause).await;
    assert!(gave_up.is_err());
    assert!(
        !admin.gate().is_closed(),
        "an abandoned drain left the gate closed"
    );
    drop(permit);
}

#[tokio::test(start_paused = true)]
async fn unpause_while_draining_cancels_the_pause() {
    let admin = admin();
    let permit = admin.gate().try_enter().unwrap();
    let pausing = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.pause(by("a", 10_000)).await })
    };
    while !admin.gate().is_closed() {
        tokio::task::yield_now().await;
    }
    admin.unpause(Some(&owner("a"))).unwrap();
    assert_eq!(
        pausing.await.unwrap().unwrap_err(),
        AdminError::CancelledWhileDraining
    );
    drop(permit);
    assert!(!admin.status().paused);
}

#[tokio::test]
async fn rejects_absurd_values() {
    let admin = admin();
    assert!(matches!(
        admin.pause(by("", 1_000)).await,
        Err(AdminError::InvalidArgument(_))
    ));
    assert!(matches!(
        admin.pause(by("a", 0)).await,
        Err(AdminError::InvalidArgument(_))
    ));
    assert!(!admin.gate().is_closed());
}

/// A pause id is written to logs and state files: a newline or an escape sequence in
/// it is refused before the gate closes (before, any bytes up to 128 were taken).
#[tokio::test]
async fn refuses_pause_ids_with_control_characters() {
    let admin = admin();
    for id in [
        "nightly\nFAKE LOG LINE",
        "a\u{1b}[31mred",
        "tab\there",
        "del\u{7f}",
    ] {
        match admin.pause(by(id, 1_000)).await {
            Err(AdminError::InvalidArgument(message)) => {
                assert!(message.contains("control character"), "{message}")
            }
            other => panic!("{id:?} was accepted: {other:?}"),
        }
    }
    assert!(!admin.gate().is_closed());
    admin
        .pause(by("nightly-2026-11-29 ü", 1_000))
        .await
        .unwrap();
}

/// Issue 17.8: a second coordinator given the same pause id is another holder: it can
/// neither take over (renew by pausing), renew, nor release the first one's pause.
#[tokio::test(start_paused = true)]
async fn another_coordinator_with_the_same_pause_id_is_another_holder() {
    let admin = admin();
    admin.pause(by("nightly", 10_000)).await.unwrap();
    let intruder = PauseOwner::new("nightly", "c-2");
    let refused = admin
        .pause(PauseCommand {
            holder: Holder::Coordinator(intruder.clone()),
            ..by("nightly", 10_000)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(refused, AdminError::HeldByOther { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("coordinator c-1"), "{refused}");
    let refused = admin.renew(&intruder, Duration::from_secs(1)).unwrap_err();
    assert!(
        matches!(refused, AdminError::NotPausedBy { .. }),
        "{refused}"
    );
    let refused = admin.unpause(Some(&intruder)).unwrap_err();
    assert!(
        matches!(refused, AdminError::HeldByOther { .. }),
        "{refused}"
    );
    assert!(admin.gate().is_closed());
    assert!(admin.unpause(Some(&owner("nightly"))).unwrap().was_paused);
}
