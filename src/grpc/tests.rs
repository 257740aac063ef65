//! The admin guard over the wire: an in-process node on port 0 that refuses, answers
//! and leaves health open exactly as docs/security.md says, called through
//! `NodeClient`, whose options never show a secret in `Debug`. The guard's own rules
//! are tested in `stillpoint_node::grpc::auth`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::grpc::client::{CallError, ConnectOptions, NodeClient, TlsOptions};
use crate::resolve::NodeAddress;
use stillpoint_node::gate::{ClosedPolicy, Gate};
use stillpoint_node::grpc::auth::{
    AdminSecurity, AdminToken, ClientIdentity, NO_TOKEN, Role, Secret, WRONG_TOKEN,
};
use stillpoint_node::grpc::server::admin_routes_with;
use stillpoint_node::pause::NodeAdmin;
use stillpoint_node::pause::PauseOwner;

const OPERATOR: &str = "op-0123456789abcdef-secret";
const OBSERVER: &str = "obs-0123456789abcdef-secret";

fn token(text: &str) -> AdminToken {
    AdminToken::parse(text, "test").unwrap()
}

fn security() -> AdminSecurity {
    AdminSecurity::default()
        .with_token(&token(OPERATOR), Role::Operator)
        .unwrap()
        .with_token(&token(OBSERVER), Role::Observer)
        .unwrap()
}

/// The client's options carry the token and the client key: neither may show.
#[test]
fn connect_options_never_show_secrets_in_debug() {
    let options = ConnectOptions {
        tls: Some(TlsOptions {
            ca_pem: None,
            override_authority: None,
            client_identity: Some(ClientIdentity {
                cert_pem: "CERT".to_owned(),
                key_pem: Secret::new("KEY-MATERIAL"),
            }),
        }),
        token: Some(token(OPERATOR)),
        ..ConnectOptions::default()
    };
    for printed in [format!("{options:?}"), format!("{options:#?}")] {
        for secret in [OPERATOR, "KEY-MATERIAL"] {
            assert!(!printed.contains(secret), "{secret} leaked in {printed}");
        }
    }
    // And the redaction is visible, so nobody mistakes it for an empty value.
    assert!(format!("{options:?}").contains("redacted"));
}
/// A node served in-process; `stop` cancels it and waits for the server to end.
struct Served {
    address: NodeAddress,
    admin: Arc<NodeAdmin>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap();
    }
}

/// Serves `admin_routes_with(security)` on a free port.
async fn serve(security: AdminSecurity) -> Served {
    let admin = Arc::new(NodeAdmin::new(
        Arc::new(Gate::new(ClosedPolicy::Reject)),
        None,
    ));
    let routes = admin_routes_with(admin.clone(), &security).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = NodeAddress::new("127.0.0.1", listener.local_addr().unwrap().port());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.cancelled_owned())
            .await
            .unwrap();
    });
    Served {
        address,
        admin,
        shutdown,
        server,
    }
}

fn with_token(text: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        token: text.map(token),
        connect_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    }
}

#[tokio::test]
async fn a_node_refuses_calls_without_the_token_and_says_how_to_fix_it() {
    let node = serve(security()).await;
    let (address, admin) = (&node.address, &node.admin);

    let refused = NodeClient::connect(address, &with_token(None))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, CallError::Unauthenticated { message } if message.starts_with(NO_TOKEN)),
        "{refused:?}"
    );
    let text = refused.to_string();
    assert!(text.contains("UNAUTHENTICATED"), "{text}");
    assert!(text.contains("--token-file"), "{text}");
    assert!(text.contains("STILLPOINT_ADMIN_TOKEN"), "{text}");

    let wrong = NodeClient::connect(address, &with_token(Some("a-wrong-token-of-length")))
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains(WRONG_TOKEN), "{wrong}");
    assert!(!wrong.to_string().contains(OPERATOR), "{wrong}");

    // An observer reads, and may not pause.
    let mut observer = NodeClient::connect(address, &with_token(Some(OBSERVER)))
        .await
        .unwrap();
    assert!(!observer.status().await.unwrap().paused);
    let denied = observer
        .pause_leased(
            &PauseOwner::new("p1", ""),
            Duration::from_secs(10),
            Duration::from_secs(1),
            true,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(denied, CallError::PermissionDenied(_)),
        "{denied:?}"
    );
    assert!(!admin.status().paused, "a refused pause paused the node");

    let mut operator = NodeClient::connect(address, &with_token(Some(OPERATOR)))
        .await
        .unwrap();
    let paused = operator
        .pause_leased(
            &PauseOwner::new("p1", ""),
            Duration::from_secs(10),
            Duration::from_secs(1),
            true,
        )
        .await
        .unwrap();
    assert!(paused.paused && admin.gate().is_closed());
    assert!(
        operator
            .unpause_leased(Some(&PauseOwner::new("p1", "")))
            .await
            .unwrap()
            .was_paused
    );
    node.stop().await;
}

#[tokio::test]
async fn health_stays_open_and_reflection_is_guarded() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let node = serve(security()).await;
    let address = &node.address;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "rpc.Admin".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let refused = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    node.stop().await;
}
