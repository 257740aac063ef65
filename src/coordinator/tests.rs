//! `PausePlan::validate`: the plan a CLI or a runbook builds is checked, value by
//! value, before any node is contacted; and the order a tier is paused in.

use std::time::Duration;

use super::{PausePlan, PausedNode, PlanError, batches, clock_moved, same_pause};
use crate::resolve::NodeAddress;

fn plan(tiers: &[&[&str]], lease: &str, max_wait: &str) -> PausePlan {
    let tiers = tiers
        .iter()
        .map(|tier| {
            tier.iter()
                .map(|a| a.parse::<NodeAddress>().unwrap())
                .collect()
        })
        .collect();
    let duration = |text| crate::time::parse_duration(text).unwrap();
    PausePlan::new(tiers, duration(lease), duration(max_wait))
}

#[test]
fn a_sound_plan_passes() {
    assert_eq!(
        plan(&[&["a:1", "b:1"], &["c:1"]], "60s", "10s").validate(),
        Ok(())
    );
}

#[test]
fn each_bad_value_is_refused_by_name() {
    let cases: Vec<(PausePlan, &str)> = vec![
        (plan(&[], "60s", "10s"), "no nodes to pause"),
        (plan(&[&["a:1"], &[]], "60s", "10s"), "tier 2 has no nodes"),
        (
            plan(&[&["a:1"], &["a:1"]], "60s", "10s"),
            "address a:1 is listed twice",
        ),
        (plan(&[&["a:1"]], "0s", "0s"), "max pause wait is 0ms"),
        (
            plan(&[&["a:1"]], "25h", "10s"),
            "lease must be between 1ms and 24h, got 90000000ms",
        ),
        (
            plan(&[&["a:1"]], "10s", "10s"),
            "max pause wait (10000ms) must be shorter than the lease (10000ms)",
        ),
        (plan(&[&["a:1"]], "1s", "5s"), "shorter than the lease"),
        (plan(&[&["a:1"]], "60s", "0ms"), "max pause wait is 0ms"),
        (
            plan(&[&["a:1"]], "0s", "10s"),
            "lease must be between 1ms and 24h, got 0ms",
        ),
    ];
    for (plan, needle) in cases {
        let error = plan.validate().unwrap_err().to_string();
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    }
    // scalar-admin -m 18446744073709551615: upstream plans skip the lease checks, but
    // a wait that wraps to a negative number on the wire is refused before sending.
    let mut huge_upstream_wait = plan(&[&["a:1"]], "60s", "10s");
    huge_upstream_wait.upstream_only = true;
    huge_upstream_wait.max_wait = Duration::from_millis(u64::MAX);
    assert_eq!(
        huge_upstream_wait.validate(),
        Err(PlanError::WaitTooLong(Duration::from_millis(u64::MAX)))
    );
    let mut zero_connect = plan(&[&["a:1"]], "60s", "10s");
    zero_connect.connect.connect_timeout = Duration::ZERO;
    assert_eq!(zero_connect.validate(), Err(PlanError::ZeroConnectTimeout));
}

#[test]
fn zero_waits_keep_their_meaning_where_they_have_one() {
    // Not draining at all: a zero wait is no wait, not a mistake.
    let mut no_wait = plan(&[&["a:1"]], "60s", "0ms");
    no_wait.wait_outstanding = false;
    assert_eq!(no_wait.validate(), Ok(()));
    // scalar-admin -m 0 passes upstream's meaning through.
    let mut upstream = plan(&[&["a:1"]], "60s", "0ms");
    upstream.upstream_only = true;
    assert_eq!(upstream.validate(), Ok(()));
}

fn addresses(list: &str) -> Vec<NodeAddress> {
    crate::resolve::parse_address_list(list).unwrap()
}

#[test]
fn the_first_tiers_lowest_address_is_paused_alone_first() {
    let tier = addresses("10.0.0.3:1,10.0.0.1:1,10.0.0.2:1");
    let shown = |batches: Vec<Vec<&NodeAddress>>| {
        batches
            .into_iter()
            .map(|batch| batch.iter().map(ToString::to_string).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shown(batches(0, &tier)),
        [vec!["10.0.0.1:1"], vec!["10.0.0.3:1", "10.0.0.2:1"]]
    );
    assert_eq!(
        shown(batches(1, &tier)),
        [vec!["10.0.0.3:1", "10.0.0.1:1", "10.0.0.2:1"]]
    );
    assert_eq!(shown(batches(0, &tier[..1])), [vec!["10.0.0.3:1"]]);
}

/// An in-process node (`NodeAdmin` behind the real admin routes) on a free loopback
/// port, whose answers to LeaseAdmin/Pause can be lost on the way back.
struct TestNode {
    address: NodeAddress,
    admin: std::sync::Arc<stillpoint_node::pause::NodeAdmin>,
    shutdown: tokio_util::sync::CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

impl TestNode {
    async fn start(lose_pause_answers: bool) -> TestNode {
        use std::sync::Arc;

        let gate = Arc::new(stillpoint_node::gate::Gate::new(
            stillpoint_node::gate::ClosedPolicy::Reject,
        ));
        let admin = Arc::new(stillpoint_node::pause::NodeAdmin::new(gate, None));
        let routes = stillpoint_node::grpc::server::admin_routes(admin.clone()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let served = tokio::spawn({
            let admin = admin.clone();
            let shutdown = shutdown.clone();
            async move {
                let server = tonic::transport::Server::builder()
                    .layer(tower::layer::layer_fn(move |inner| LoseAnswers {
                        inner,
                        lose: lose_pause_answers,
                    }))
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        shutdown.clone().cancelled_owned(),
                    );
                let (served, ()) = tokio::join!(server, admin.run_lease_watchdog(shutdown));
                served.unwrap();
            }
        });
        TestNode {
            address: NodeAddress::new("127.0.0.1", port),
            admin,
            shutdown,
            served,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.served.await.unwrap();
    }
}

/// Runs every call to the end, then, for LeaseAdmin/Pause when `lose` is set, answers
/// 502 instead: the node paused, and its answer was lost, as when a proxy or the
/// connection fails on the way back.
#[derive(Clone)]
struct LoseAnswers<S> {
    inner: S,
    lose: bool,
}

type Reply = http::Response<tonic::body::Body>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for LoseAnswers<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = Reply,
            Error = std::convert::Infallible,
        > + Send,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Reply, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let lose = self.lose && request.uri().path() == "/stillpoint.admin.v1.LeaseAdmin/Pause";
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            if !lose {
                return Ok(answer);
            }
            drop(answer);
            Ok(http::Response::builder()
                .status(http::StatusCode::BAD_GATEWAY)
                .body(tonic::body::Body::empty())
                .unwrap())
        })
    }
}

/// Settles issue 17's first "also" item: a node that paused but whose answer was lost
/// (a transport error, not a timeout) may be paused; the rollback must release it.
#[tokio::test]
async fn a_node_whose_pause_answer_was_lost_is_rolled_back_too() {
    let node = TestNode::start(true).await;
    let plan = PausePlan::new(
        vec![vec![node.address.clone()]],
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    let failure = super::pause(&plan).await.unwrap_err();
    assert!(
        !node.admin.status().paused,
        "the node paused, its answer was lost, and the rollback left it paused: {}",
        failure.summary
    );
    assert!(failure.rolled_back, "{}", failure.summary);
    node.stop().await;
}

/// Settles issue 17's second "also" item: the window's edges are wall-clock times,
/// the hold is timed on the monotonic clock. Here an hour passes on the monotonic clock
/// and not on the wall clock, as when the wall clock is stepped back an hour inside
/// the window: the window cannot be trusted and must not be called valid.
#[tokio::test]
async fn a_clock_step_on_the_coordinator_inside_the_window_invalidates_it() {
    let node = TestNode::start(false).await;
    let plan = PausePlan::new(
        vec![vec![node.address.clone()]],
        stillpoint_node::pause::MAX_LEASE,
        Duration::from_secs(5),
    );
    let paused = super::pause(&plan).await.unwrap();
    // Long enough to beat the clock-skew floor on loopback.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3600)).await;
    tokio::time::resume();
    let released = paused.release().await;
    assert!(released.all_released());
    assert!(
        !released.window_valid(),
        "a window over a clock step was called valid"
    );
    assert!(
        released
            .invalid_reasons
            .iter()
            .any(|reason| reason.contains("clock")),
        "{:?}",
        released.invalid_reasons
    );
    node.stop().await;
}

/// The node half of the clock-step check: an offset that moved more than the two
/// readings' uncertainty (half their round trips), the margin and normal drift.
#[test]
fn a_node_clock_that_moved_during_the_window_is_caught() {
    // 2ms round trips, 1s window: up to 2ms + 10ms + 1ms is noise.
    assert_eq!(clock_moved((5, 2), (17, 2), 1_000), None);
    assert_eq!(clock_moved((5, 2), (-10, 2), 1_000), Some(-15));
    // Stepped an hour forward.
    assert_eq!(clock_moved((5, 2), (3_600_005, 2), 1_000), Some(3_600_000));
    // Over an hour-long window, 3.6s of drift is allowed (1000 ppm) and 4s is not.
    assert_eq!(clock_moved((0, 2), (3_600, 2), 3_600_000), None);
    assert_eq!(clock_moved((0, 2), (4_000, 2), 3_600_000), Some(4_000));
}

/// The proof a node stayed under our pause: same boot id, same pause sequence. A node
/// that restarted (new boot id) or was released and paused again (new sequence) under
/// the same owner is caught.
#[test]
fn a_restart_is_caught_by_the_boot_id() {
    let node = PausedNode {
        address: NodeAddress::new("127.0.0.1", 1),
        protocol: crate::grpc::client::Protocol::Lease,
        boot_id: Some("boot-1".to_owned()),
        pause_seq: Some(1),
        drained_in_flight: Some(0),
        in_flight_at_pause: Some(0),
        clock_offset_ms: Some(0),
        rtt_ms: Some(1),
    };
    let status = |boot_id: &str, pause_seq: u64| stillpoint_node::pause::NodeStatus {
        paused: true,
        holder: None,
        boot_id: boot_id.to_owned(),
        node_time_ms: 0,
        paused_since_ms: None,
        pause_seq,
        in_flight: 0,
        drained_in_flight: 0,
        in_flight_at_pause: 0,
        lease_remaining: None,
        held_now: 0,
    };
    assert_eq!(same_pause(&node, &status("boot-1", 1)), Ok(()));
    let restarted = same_pause(&node, &status("boot-2", 1)).unwrap_err();
    assert!(restarted.contains("restarted"), "{restarted}");
    let repaused = same_pause(&node, &status("boot-1", 2)).unwrap_err();
    assert!(repaused.contains("paused again"), "{repaused}");
}

/// The last resort: a `PausedCluster` dropped without `release` (an early return, a
/// panic) releases its nodes at once. Before, the release thread built the timeout
/// outside its runtime, which panicked ("no reactor running") and released nothing:
/// the nodes stayed paused until their lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_cluster_dropped_without_release_releases_its_nodes() {
    let node = TestNode::start(false).await;
    let plan = PausePlan::new(
        vec![vec![node.address.clone()]],
        Duration::from_secs(600),
        Duration::from_secs(5),
    );
    let paused = super::pause(&plan).await.unwrap();
    assert!(node.admin.status().paused);
    // Dropped where an async caller would drop it: on a runtime thread.
    tokio::task::block_in_place(|| drop(paused));
    assert!(
        !node.admin.status().paused,
        "the dropped pause was left to its 10-minute lease"
    );
    node.stop().await;
}
