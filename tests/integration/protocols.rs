//! Talking to other kinds of node and other callers: a node that only implements the
//! upstream API, DNS SRV discovery, and the `scalar-admin` drop-in binary.

use std::sync::atomic::Ordering::SeqCst;

use crate::cluster::Cluster;
use crate::dns::SrvServer;
use crate::upstream_server::UpstreamOnlyServer;
use crate::util::{run, run_json, stderr};

/// A node with only Pause/Unpause/CheckPaused: the CLI still pauses and releases it,
/// and says what it cannot prove.
#[test]
fn pauses_a_node_that_implements_only_the_upstream_methods() {
    let node = UpstreamOnlyServer::start();
    let address = node.address.to_string();
    let (code, window) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "-a",
            &address,
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{window:#}");
    assert_eq!(window["nodes"][0]["protocol"], "upstream");
    assert_eq!(window["nodes"][0]["outcome"], "released");
    assert!(window["skew_bound_ms"].is_null());
    let warnings = window["warnings"].to_string();
    assert!(
        warnings.contains("only the upstream admin API"),
        "{warnings}"
    );
    assert_eq!(node.calls.pauses.load(SeqCst), 1);
    assert!(node.calls.waited.load(SeqCst), "the CLI waits by default");
    assert_eq!(node.calls.unpauses.load(SeqCst), 1);
    assert!(!node.calls.paused.load(SeqCst));

    let (code, checked) = run_json(
        "stillpoint",
        &["check-paused", "-a", &address, "--output", "json"],
    );
    assert_eq!(code, 0);
    assert_eq!(checked["nodes"][0]["paused"], false);
    // Stats is not implemented there: a clear error, not a crash.
    let output = run("stillpoint", &["stats", "-a", &address]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stdout).contains("predates Stats"));
}

/// `-s` resolves a real SRV record from a DNS server on loopback; SRV and address tiers
/// mix in the order given.
#[test]
fn resolves_nodes_from_a_dns_srv_record() {
    let cluster = Cluster::start(2);
    let ports: Vec<u16> = cluster
        .ledgers
        .iter()
        .map(|node| node.address.rsplit_once(':').unwrap().1.parse().unwrap())
        .collect();
    let dns = SrvServer::start("_admin._tcp.ledger.test.", &ports);
    let dns_server = dns.address.to_string();

    let (code, checked) = run_json(
        "stillpoint",
        &[
            "check-paused",
            "-s",
            "_admin._tcp.ledger.test.",
            "--dns-server",
            &dns_server,
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{checked:#}");
    let found: Vec<String> = checked["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["address"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = ports
        .iter()
        .map(|port| format!("localhost:{port}"))
        .collect();
    assert_eq!(found, expected);

    let (code, window) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "-s",
            "_admin._tcp.ledger.test.",
            "--dns-server",
            &dns_server,
            "-a",
            &cluster.auditor.address,
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{window:#}");
    let tiers: Vec<u64> = window["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["tier"].as_u64().unwrap())
        .collect();
    assert_eq!(
        tiers,
        [1, 1, 2],
        "the SRV tier came first on the command line"
    );

    let output = run(
        "stillpoint",
        &[
            "check-paused",
            "-s",
            "_nothing._tcp.ledger.test.",
            "--dns-server",
            &dns_server,
        ],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("_nothing._tcp.ledger.test."),
        "{}",
        stderr(&output)
    );
}

/// Existing runbooks call `scalar-admin -c PAUSE …`: the flags and the case-insensitive
/// command work against our nodes.
#[test]
fn scalar_admin_binary_pauses_checks_and_unpauses() {
    let cluster = Cluster::start(1);
    let nodes = format!("{},{}", cluster.ledger_tier(), cluster.auditor.address);

    let (code, paused) = run_json("scalar-admin", &["-c", "pause", "-a", &nodes, "-m", "5000"]);
    assert_eq!(code, 0, "{paused:#}");
    assert!(paused["pause_start_timestamp_ms"].is_i64());
    let (code, checked) = run_json("scalar-admin", &["-c", "CHECK_PAUSED", "-a", &nodes]);
    assert_eq!(code, 0);
    assert_eq!(checked["paused"], true, "{checked:#}");
    // Paused through the upstream API, so no pause id holds it.
    let holder = checked["nodes"][0]["holder"].as_str().unwrap();
    assert!(holder.contains("upstream"), "{holder}");

    let (code, _) = run_json(
        "scalar-admin",
        &["--command", "Unpause", "--addresses", &nodes],
    );
    assert_eq!(code, 0);
    let (_, checked) = run_json("scalar-admin", &["-c", "check_paused", "-a", &nodes]);
    assert_eq!(checked["paused"], false);

    let output = run("scalar-admin", &["-c", "STOP", "-a", &nodes]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("PAUSE, UNPAUSE or CHECK_PAUSED"));
}

/// Every node serves gRPC health for both admin services and reflection that lists
/// them, so standard tools (grpcurl, grpc-health-probe, Kubernetes probes) work.
#[test]
fn nodes_serve_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::start(1);
    let url = format!("http://{}", cluster.auditor.address);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        for service in ["rpc.Admin", "stillpoint.admin.v1.LeaseAdmin"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service}");
        }

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("unexpected reflection answer {answer:?}");
        };
        let names: Vec<String> = list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect();
        for expected in [
            "rpc.Admin",
            "stillpoint.admin.v1.LeaseAdmin",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|name| name == expected),
                "{expected} not in {names:?}"
            );
        }
    });
}

/// Issue 17.4: an upstream-only node cannot say how many requests were inside when it
/// paused; with `--no-wait` nothing waited for them either, so the window is not valid.
#[test]
fn no_wait_on_a_node_that_cannot_count_requests_in_flight_is_not_a_valid_window() {
    let node = UpstreamOnlyServer::start();
    let address = node.address.to_string();
    let (code, window) = run_json(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "--no-wait",
            "-a",
            &address,
            "--output",
            "json",
        ],
    );
    assert!(
        !node.calls.waited.load(SeqCst),
        "--no-wait was not passed on"
    );
    assert_eq!(window["window_valid"], false, "{window:#}");
    assert_eq!(code, 5, "{window:#}");
    let reasons = window["invalid_reasons"].to_string();
    assert!(
        reasons.contains(&address) && reasons.contains("in flight"),
        "{reasons}"
    );
    assert!(!node.calls.paused.load(SeqCst), "the node was not released");
}

/// Issue 20.12: an SRV record whose target is "." says the service is not available
/// (RFC 2782); that is what the operator must read, not an empty host name.
#[test]
fn an_srv_target_of_dot_says_the_service_is_not_available() {
    let dns = SrvServer::start_with_target("_admin._tcp.gone.test.", &[50051], ".");
    let output = run(
        "stillpoint",
        &[
            "check-paused",
            "-s",
            "_admin._tcp.gone.test.",
            "--dns-server",
            &dns.address.to_string(),
        ],
    );
    assert_ne!(output.status.code(), Some(0));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    assert!(
        said.contains("_admin._tcp.gone.test.") && said.contains("service not available"),
        "{said}"
    );
}

/// Issue 13.4: `scalar-admin` chose the upstream API itself, so it does not warn that a
/// node "speaks only the upstream admin API", neither for a node that also offers
/// leases nor for one that offers nothing else; `stillpoint pause`, which would have
/// used leases, still warns about the upstream-only node when it pauses and releases.
#[test]
fn scalar_admin_does_not_warn_about_the_protocol_it_chose() {
    const WARNING: &str = "speaks only the upstream admin API";
    let cluster = Cluster::start(1);
    let upstream = UpstreamOnlyServer::start();
    for node in [
        cluster.auditor.address.clone(),
        upstream.address.to_string(),
    ] {
        let paused = run("scalar-admin", &["-c", "PAUSE", "-a", &node]);
        assert_eq!(paused.status.code(), Some(0), "{}", stderr(&paused));
        let report: serde_json::Value = serde_json::from_slice(&paused.stdout).unwrap();
        assert_eq!(report["nodes"][0]["protocol"], "upstream", "{report:#}");
        assert_eq!(report["warnings"], serde_json::json!([]), "{report:#}");
        assert!(!stderr(&paused).contains(WARNING), "{}", stderr(&paused));
        let unpaused = run("scalar-admin", &["-c", "UNPAUSE", "-a", &node]);
        assert_eq!(unpaused.status.code(), Some(0), "{}", stderr(&unpaused));
        assert!(
            !String::from_utf8_lossy(&unpaused.stdout).contains(WARNING)
                && !stderr(&unpaused).contains(WARNING),
            "{}",
            stderr(&unpaused)
        );
    }
    assert_eq!(upstream.calls.pauses.load(SeqCst), 1);
    assert_eq!(upstream.calls.unpauses.load(SeqCst), 1);

    // The same upstream-only node, paused by `stillpoint pause` and left open, then
    // closed by `stillpoint unpause`: both reports warn.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("pause.json");
    let state = state.to_str().unwrap();
    let address = upstream.address.to_string();
    let (code, open) = run_json(
        "stillpoint",
        &[
            "pause",
            "-a",
            &address,
            "--state-file",
            state,
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{open:#}");
    let warning = format!("{address} {WARNING}");
    assert!(open["warnings"].to_string().contains(&warning), "{open:#}");
    let (code, closed) = run_json(
        "stillpoint",
        &["unpause", "--state-file", state, "--output", "json"],
    );
    assert_eq!(code, 0, "{closed:#}");
    assert!(
        closed["warnings"].to_string().contains(&warning),
        "{closed:#}"
    );
}
