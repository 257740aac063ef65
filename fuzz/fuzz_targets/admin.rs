//! The admin request handling, end to end below the socket: arbitrary bytes become
//! gRPC requests (method, authorization header, frame, protobuf payload) that go
//! through `admin_routes_with` — the token guard, prost decoding, the wire-to-domain
//! conversion in `grpc::server` — into a real `NodeAdmin`.
//!
//! Besides "never panics", it checks the properties the security model promises:
//! a call without the operator token never changes the node's pause state, and after
//! every call the gate is closed exactly when the node says it is paused. It also
//! feeds the payload to the client-side conversion of a (hostile) node's answer.
//!
//! Input: a sequence of calls, each `[method][auth][len][len bytes of payload]`.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http_body_util::BodyExt as _;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use stillpoint_node::gate::{ClosedPolicy, Gate};
use stillpoint_node::grpc::auth::{AdminSecurity, AdminToken, Role};
use stillpoint_node::grpc::server::admin_routes_with;
use stillpoint_node::grpc::wire::lease;
use stillpoint_node::pause::{NodeAdmin, NodeStatus};
use tower::ServiceExt as _;

const METHODS: &[&str] = &[
    "/rpc.Admin/Pause",
    "/rpc.Admin/Unpause",
    "/rpc.Admin/CheckPaused",
    "/rpc.Admin/Stats",
    "/stillpoint.admin.v1.LeaseAdmin/Pause",
    "/stillpoint.admin.v1.LeaseAdmin/Renew",
    "/stillpoint.admin.v1.LeaseAdmin/Unpause",
    "/stillpoint.admin.v1.LeaseAdmin/Status",
];
const OPERATOR: &str = "operator-token-0123456789";
const OBSERVER: &str = "observer-token-0123456789";

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
});

static SECURITY: LazyLock<AdminSecurity> = LazyLock::new(|| {
    let token = |text| AdminToken::parse(text, "fuzz").expect("valid token");
    AdminSecurity::default()
        .with_token(&token(OPERATOR), Role::Operator)
        .and_then(|s| s.with_token(&token(OBSERVER), Role::Observer))
        .expect("tokens")
});

/// What must not change without the operator token.
fn pause_state(admin: &NodeAdmin) -> (bool, u64, Option<String>) {
    let status = admin.status();
    (
        status.paused,
        status.pause_seq,
        status.holder.map(|holder| holder.to_string()),
    )
}

fuzz_target!(|data: &[u8]| {
    // The client side first: a node's answer, decoded and converted as NodeClient does.
    if let Ok(wire) = lease::NodeStatus::decode(data) {
        let _status: NodeStatus = wire.into();
    }

    RUNTIME.block_on(async {
        let admin = Arc::new(NodeAdmin::new(
            Arc::new(Gate::new(ClosedPolicy::Reject)),
            Some(Duration::from_secs(60)),
        ));
        let routes = admin_routes_with(admin.clone(), &SECURITY).await;
        let mut rest = data;
        while let [method, auth, len, tail @ ..] = rest {
            let len = usize::from(*len).min(tail.len());
            let (payload, next) = tail.split_at(len);
            rest = next;

            let path = METHODS[usize::from(*method) % METHODS.len()];
            let mut request = http::Request::builder()
                .method("POST")
                .uri(format!("http://node{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            let operator = match auth % 4 {
                0 => false,
                1 => {
                    request = request.header("authorization", format!("Bearer {OPERATOR}"));
                    true
                }
                2 => {
                    request = request.header("authorization", format!("Bearer {OBSERVER}"));
                    false
                }
                _ => {
                    // Whatever header bytes the input holds, if HTTP allows them.
                    if let Ok(value) = http::HeaderValue::from_bytes(payload) {
                        request = request.header("authorization", value);
                    }
                    false
                }
            };
            // A gRPC frame: uncompressed flag, big-endian length, the message.
            let mut body = vec![0u8];
            body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            body.extend_from_slice(payload);
            let request = request
                .body(tonic::body::Body::new(http_body_util::Full::new(bytes_of(
                    body,
                ))))
                .expect("request");

            let before = pause_state(&admin);
            let response = routes.clone().oneshot(request).await.expect("infallible");
            // Drain the body so the handler has fully run.
            let _ = response.into_body().collect().await;
            let after = pause_state(&admin);
            if !operator {
                assert_eq!(
                    before, after,
                    "{path} changed the pause without the operator token"
                );
            }
            let status = admin.status();
            assert_eq!(
                status.paused,
                admin.gate().is_closed(),
                "gate and pause state disagree after {path}: {status:?}"
            );
        }
    });
});

fn bytes_of(body: Vec<u8>) -> tonic::codegen::Bytes {
    tonic::codegen::Bytes::from(body)
}
