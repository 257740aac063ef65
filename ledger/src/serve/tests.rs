//! In-process nodes on port 0: the application service really is behind the gate, the
//! admin service is not, a call runs to completion inside the gate even when its client
//! goes away, and a cluster whose ledger lives on PostgreSQL and whose auditor lives on
//! MariaDB stays consistent under load.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use stillpoint_node::grpc::wire::lease;
use stillpoint_node::grpc::wire::lease::lease_admin_client::LeaseAdminClient;
use stillpoint_node::grpc::wire::rpc::admin_client::AdminClient;
use stillpoint_node::pause::NodeStatus;
use stillpoint_node::pause::PauseOwner;
use tonic::Code;
use tonic::transport::Channel;

use super::*;
use crate::check::check;
use crate::grpc::client::{LedgerClient, TransferOutcome};
use crate::grpc::wire;

struct Cluster {
    _dir: tempfile::TempDir,
    ledger_db: DbUrl,
    auditor_db: DbUrl,
    ledger: SocketAddr,
    ledger_admin: String,
    auditor_admin: String,
    shutdown: CancellationToken,
}

/// Starts an auditor and a ledger node (admin on its own port); the returned future
/// serves both until `cluster.shutdown` is cancelled.
async fn start(
    policy: ClosedPolicy,
    options: LedgerOptions,
) -> (Cluster, impl Future<Output = ()>) {
    let dir = tempfile::tempdir().unwrap();
    let ledger_db = DbUrl::Sqlite(dir.path().join("ledger.db"));
    let auditor_db = DbUrl::Sqlite(dir.path().join("auditor.db"));
    let bind = || TcpListener::bind("127.0.0.1:0");
    let auditor_listener = bind().await.unwrap();
    let ledger_listener = bind().await.unwrap();
    let admin_listener = bind().await.unwrap();
    let auditor = Node::open(ServeConfig {
        role: Role::Auditor,
        db: auditor_db.clone(),
        closed_policy: ClosedPolicy::Reject,
        upstream_pause_lease: None,
    })
    .await
    .unwrap();
    let ledger = Node::open(ServeConfig {
        role: Role::Ledger {
            auditor: auditor_listener.local_addr().unwrap().to_string(),
            seed: Seed::default(),
            options,
        },
        db: ledger_db.clone(),
        closed_policy: policy,
        upstream_pause_lease: None,
    })
    .await
    .unwrap();
    let admin_port = admin_listener.local_addr().unwrap().port();
    let auditor_port = auditor_listener.local_addr().unwrap().port();
    let cluster = Cluster {
        _dir: dir,
        ledger_db,
        auditor_db,
        ledger: ledger_listener.local_addr().unwrap(),
        ledger_admin: format!("http://127.0.0.1:{admin_port}"),
        // The auditor serves its admin services on its application port.
        auditor_admin: format!("http://127.0.0.1:{auditor_port}"),
        shutdown: CancellationToken::new(),
    };
    let shutdown = cluster.shutdown.clone();
    let servers = async move {
        let (auditor, ledger) = tokio::join!(
            run(auditor, auditor_listener, None, shutdown.clone()),
            run(ledger, ledger_listener, Some(admin_listener), shutdown),
        );
        auditor.unwrap();
        ledger.unwrap();
    };
    (cluster, servers)
}

impl Cluster {
    async fn admin(&self) -> Admin {
        Admin::connect(&self.ledger_admin).await
    }

    async fn auditor_admin(&self) -> Admin {
        Admin::connect(&self.auditor_admin).await
    }

    async fn check(&self) -> crate::check::CheckReport {
        check_databases(&self.ledger_db, &self.auditor_db).await
    }
}

async fn check_databases(ledger_db: &DbUrl, auditor_db: &DbUrl) -> crate::check::CheckReport {
    let ledger = store::read_ledger(ledger_db).await.unwrap();
    let audit = store::read_auditor(auditor_db).await.unwrap();
    check(&ledger, &audit, None)
}

/// Polls `probe` until it holds, failing after a deadline.
async fn wait_for(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_ledger_rejects_transfers_and_serves_again_after_unpause() {
    let (cluster, servers) = start(ClosedPolicy::Reject, LedgerOptions::default()).await;
    let test = async {
        let client = LedgerClient::connect(&cluster.ledger.to_string())
            .await
            .unwrap();
        assert_eq!(
            client.transfer(1, 2, 5, 0).await,
            TransferOutcome::Committed
        );
        assert_eq!(
            client.transfer(3, 4, 1_000_000, 0).await,
            TransferOutcome::Declined
        );

        let mut admin = cluster.admin().await;
        let lease = Duration::from_secs(30);
        admin
            .pause_leased(
                &PauseOwner::new("test", ""),
                lease,
                Duration::from_secs(5),
                true,
            )
            .await
            .unwrap();
        assert!(
            matches!(
                client.transfer(1, 2, 5, 0).await,
                TransferOutcome::Rejected(_)
            ),
            "a paused node must refuse"
        );
        // The admin service is not behind the gate.
        assert!(admin.status().await.unwrap().paused);
        admin
            .unpause_leased(Some(&PauseOwner::new("test", "")))
            .await
            .unwrap();
        assert_eq!(
            client.transfer(2, 1, 5, 0).await,
            TransferOutcome::Committed
        );

        // The test-only hold is refused unless the node allows it.
        let mut wire_client =
            wire::ledger_client::LedgerClient::connect(format!("http://{}", cluster.ledger))
                .await
                .unwrap();
        let slow = wire::TransferRequest {
            from_account: 1,
            to_account: 2,
            amount: 1,
            hold_inside_gate_ms: 10,
        };
        let refused = wire_client.transfer(slow).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);

        let report = cluster.check().await;
        assert!(report.ok, "{report}");
        assert_eq!(report.transactions, 2);
        cluster.shutdown.cancel();
    };
    tokio::join!(servers, test);
}

/// The negative control is built in: if a call stopped when its client left, the pause
/// would find the gate empty at once and the transfer would not be in either database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_waits_for_a_transfer_whose_client_went_away() {
    let options = LedgerOptions {
        allow_slow_transfers: true,
        ..LedgerOptions::default()
    };
    let (cluster, servers) = start(ClosedPolicy::Reject, options).await;
    let test = async {
        let mut admin = cluster.admin().await;
        let mut client =
            wire::ledger_client::LedgerClient::connect(format!("http://{}", cluster.ledger))
                .await
                .unwrap();
        let slow = client.transfer(wire::TransferRequest {
            from_account: 1,
            to_account: 2,
            amount: 7,
            hold_inside_gate_ms: 500,
        });
        // Drive the call until the node has it inside the gate, then drop it.
        tokio::select! {
            reply = slow => panic!("the slow transfer answered before it was abandoned: {reply:?}"),
            () = wait_for("the transfer to enter the gate", async || {
                admin.status().await.unwrap().in_flight == 1
            }) => {}
        }
        let mut admin = cluster.admin().await;
        let paused = admin
            .pause_leased(
                &PauseOwner::new("test", ""),
                Duration::from_secs(30),
                Duration::from_secs(10),
                true,
            )
            .await
            .unwrap();
        assert_eq!(paused.drained_in_flight, 1, "{paused:?}");

        let ledger = store::read_ledger(&cluster.ledger_db).await.unwrap();
        assert_eq!(
            ledger.rows.len(),
            1,
            "the abandoned transfer must commit before the pause"
        );
        assert!(ledger.rows[0].committed_at_ms <= paused.paused_since_ms.unwrap());
        let report = cluster.check().await;
        assert!(report.ok, "{report}");

        admin
            .unpause_leased(Some(&PauseOwner::new("test", "")))
            .await
            .unwrap();
        cluster.shutdown.cancel();
    };
    tokio::join!(servers, test);
}

/// The ledger row is committed before the auditor is called, so a ledger node must ride
/// out a paused auditor instead of giving up on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_node_retries_a_paused_auditor() {
    let (cluster, servers) = start(ClosedPolicy::Reject, LedgerOptions::default()).await;
    let test = async {
        let client = LedgerClient::connect(&cluster.ledger.to_string())
            .await
            .unwrap();
        let mut auditor = cluster.auditor_admin().await;
        auditor
            .pause_leased(
                &PauseOwner::new("test", ""),
                Duration::from_secs(30),
                Duration::from_secs(5),
                true,
            )
            .await
            .unwrap();
        let transfer = client.transfer(1, 2, 3, 0);
        tokio::pin!(transfer);
        // Unpause only after the auditor has refused the ledger node at least once.
        tokio::select! {
            outcome = &mut transfer => panic!("answered while the auditor was paused: {outcome:?}"),
            () = wait_for("the auditor to refuse a Record", async || {
                let stats = auditor.stats().await.unwrap();
                stats["gate"]["rejected_total"].as_u64().unwrap() >= 1
            }) => {}
        }
        auditor
            .unpause_leased(Some(&PauseOwner::new("test", "")))
            .await
            .unwrap();
        assert_eq!(transfer.await, TransferOutcome::Committed);
        let report = cluster.check().await;
        assert!(report.ok, "{report}");
        assert_eq!(report.transactions, 1);
        cluster.shutdown.cancel();
    };
    tokio::join!(servers, test);
}

/// The real `serve` code with a ledger on PostgreSQL (two ledger nodes sharing one
/// database) and an auditor on MariaDB, driven by the real load generator: every
/// transfer commits, both nodes write, and the check passes on the two servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_on_postgres_and_an_auditor_on_mariadb_stay_consistent_under_load() {
    let (postgres, mariadb) = std::thread::scope(|scope| {
        let postgres = scope.spawn(stillpoint_testkit::Postgres::start);
        let mariadb = scope.spawn(stillpoint_testkit::MariaDb::start);
        (postgres.join().unwrap(), mariadb.join().unwrap())
    });
    let ledger_db: DbUrl = postgres.url("ledger").parse().unwrap();
    let auditor_db: DbUrl = mariadb.url("auditor").parse().unwrap();

    let bind = || TcpListener::bind("127.0.0.1:0");
    let auditor_listener = bind().await.unwrap();
    let auditor_address = auditor_listener.local_addr().unwrap().to_string();
    let auditor = Node::open(ServeConfig {
        role: Role::Auditor,
        db: auditor_db.clone(),
        closed_policy: ClosedPolicy::Reject,
        upstream_pause_lease: None,
    })
    .await
    .unwrap();
    let mut ledgers = Vec::new();
    for _ in 0..2 {
        let listener = bind().await.unwrap();
        let node = Node::open(ServeConfig {
            role: Role::Ledger {
                auditor: auditor_address.clone(),
                seed: Seed::default(),
                options: LedgerOptions::default(),
            },
            db: ledger_db.clone(),
            closed_policy: ClosedPolicy::Reject,
            upstream_pause_lease: None,
        })
        .await
        .unwrap();
        ledgers.push((node, listener));
    }
    let targets: Vec<String> = ledgers
        .iter()
        .map(|(_, listener)| listener.local_addr().unwrap().to_string())
        .collect();
    let boot_ids: Vec<String> = ledgers
        .iter()
        .map(|(node, _)| node.boot_id().to_owned())
        .collect();

    let shutdown = CancellationToken::new();
    let servers = async {
        let ledger_runs = ledgers
            .into_iter()
            .map(|(node, listener)| run(node, listener, None, shutdown.clone()));
        let (auditor, ledgers) = tokio::join!(
            run(auditor, auditor_listener, None, shutdown.clone()),
            futures::future::join_all(ledger_runs),
        );
        auditor.unwrap();
        for ledger in ledgers {
            ledger.unwrap();
        }
    };
    let test = async {
        let report = crate::load::run(
            crate::load::LoadConfig {
                targets,
                concurrency: 8,
                bound: crate::load::Bound::Count(300),
                seed: 7,
                accounts: Seed::default().accounts,
                max_amount: 10,
                hold_inside_gate: Duration::ZERO,
                keep_samples: false,
            },
            shutdown.child_token(),
        )
        .await
        .unwrap();
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(report.rejected, 0, "{report:?}");
        assert_eq!(report.ok + report.declined, 300, "{report:?}");

        let checked = check_databases(&ledger_db, &auditor_db).await;
        assert!(checked.ok, "{checked}");
        assert_eq!(checked.transactions as u64, report.ok);
        let ledger = store::read_ledger(&ledger_db).await.unwrap();
        for boot_id in &boot_ids {
            assert!(
                ledger
                    .rows
                    .iter()
                    .any(|row| row.tx_id.starts_with(boot_id.as_str())),
                "ledger node {boot_id} committed nothing"
            );
        }
        shutdown.cancel();
    };
    tokio::join!(servers, test);
    // Proof the data really is on the two servers, not in some default location.
    let committed = postgres.psql("ledger", "SELECT count(*) FROM ledger");
    assert_ne!(committed, "0");
    assert_eq!(
        committed,
        mariadb.sql("auditor", "SELECT COUNT(*) FROM audit")
    );
}

/// A node's admin services on the wire, as a coordinator calls them: the ledger embeds
/// only `stillpoint-node`, so its tests speak the protocol directly.
struct Admin {
    lease: LeaseAdminClient<Channel>,
    upstream: AdminClient<Channel>,
}

impl Admin {
    async fn connect(url: &str) -> Admin {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Admin {
            lease: LeaseAdminClient::new(channel.clone()),
            upstream: AdminClient::new(channel),
        }
    }

    /// The node's gate and pause counters (upstream `Stats`, JSON).
    async fn stats(&mut self) -> Result<serde_json::Value, tonic::Status> {
        let text = self.upstream.stats(()).await?.into_inner().stats;
        Ok(serde_json::from_str(&text).expect("Stats answers JSON"))
    }

    async fn pause_leased(
        &mut self,
        owner: &PauseOwner,
        lease: Duration,
        max_wait: Duration,
        wait_outstanding: bool,
    ) -> Result<NodeStatus, tonic::Status> {
        let request = lease::LeasedPauseRequest {
            pause_id: owner.pause_id.clone(),
            coordinator_id: owner.coordinator_id.clone(),
            lease_ms: lease.as_millis() as u64,
            max_pause_wait_ms: max_wait.as_millis() as u64,
            wait_outstanding,
        };
        let status = self.lease.pause(request).await?.into_inner();
        Ok(status.into())
    }

    async fn unpause_leased(&mut self, owner: Option<&PauseOwner>) -> Result<(), tonic::Status> {
        let request = lease::UnpauseRequest {
            pause_id: owner.map(|o| o.pause_id.clone()).unwrap_or_default(),
            coordinator_id: owner.map(|o| o.coordinator_id.clone()).unwrap_or_default(),
        };
        self.lease.unpause(request).await.map(drop)
    }

    async fn status(&mut self) -> Result<NodeStatus, tonic::Status> {
        let status = self
            .lease
            .status(lease::StatusRequest {})
            .await?
            .into_inner();
        Ok(status.into())
    }
}
