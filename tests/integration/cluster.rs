//! A reference cluster of real `ledger-node` processes: N ledger nodes sharing one
//! SQLite ledger database, one auditor with its own, each on a free port; plus the
//! load generator. Everything is killed and deleted on drop.

use std::time::Duration;

use serde_json::Value;

use crate::util::{Process, bin, run_json, spawn_listening, wait_until};

pub struct Node {
    pub address: String,
    args: Vec<String>,
    process: Process,
}

impl Node {
    fn start(args: Vec<String>) -> Node {
        let (process, addresses) = spawn_listening(&bin("ledger-node"), &args, 1);
        Node {
            address: addresses[0].clone(),
            args,
            process,
        }
    }

    /// Sends the node a signal (`STOP`, `CONT`, …) by name.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    /// Kills the node (SIGKILL) and starts a new process on the same address.
    pub fn restart(&mut self) {
        self.process.signal("KILL");
        // SIGKILL is delivered asynchronously: until the old process is gone, it still
        // holds the port the new one must bind.
        wait_until(Duration::from_secs(10), "the killed node to exit", || {
            self.process.has_exited()
        });
        let mut args = self.args.clone();
        let listen = args.iter().position(|arg| arg == "--listen").unwrap() + 1;
        args[listen] = self.address.clone();
        let (process, _) = spawn_listening(&bin("ledger-node"), &args, 1);
        self.process = process;
    }
}

pub struct Cluster {
    pub ledgers: Vec<Node>,
    pub auditor: Node,
    pub ledger_db: String,
    pub auditor_db: String,
    // Declared last: dropped after the nodes that use its files.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Ledger nodes hold requests during a pause (the reference default).
    pub fn start(ledgers: usize) -> Cluster {
        Cluster::start_with(ledgers, &[])
    }

    pub fn start_with(ledgers: usize, extra_ledger_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ledger_db = format!("sqlite:{}", dir.path().join("ledger.db").display());
        let auditor_db = format!("sqlite:{}", dir.path().join("auditor.db").display());
        Cluster::start_on(ledgers, ledger_db, auditor_db, extra_ledger_args, dir)
    }

    /// A cluster on given databases (`sqlite:PATH`, `postgres://…`, `mysql://…`).
    pub fn start_on(
        ledgers: usize,
        ledger_db: String,
        auditor_db: String,
        extra_ledger_args: &[&str],
        dir: tempfile::TempDir,
    ) -> Cluster {
        let auditor = Node::start(strings(&[
            "serve",
            "--role",
            "auditor",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &auditor_db,
        ]));
        let ledgers = (0..ledgers)
            .map(|_| {
                let mut args = strings(&[
                    "serve",
                    "--role",
                    "ledger",
                    "--listen",
                    "127.0.0.1:0",
                    "--db",
                    &ledger_db,
                    "--auditor",
                    &auditor.address,
                ]);
                args.extend(strings(extra_ledger_args));
                Node::start(args)
            })
            .collect();
        Cluster {
            ledgers,
            auditor,
            ledger_db,
            auditor_db,
            _dir: dir,
        }
    }

    /// `a,b,c`: the ledger nodes as one tier.
    pub fn ledger_tier(&self) -> String {
        self.ledgers
            .iter()
            .map(|node| node.address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `ledger-node check`, optionally asserting nothing committed inside a window.
    pub fn check(&self, window: Option<(i64, i64)>) -> (i32, Value) {
        check(&self.ledger_db, &self.auditor_db, window)
    }

    pub fn transactions(&self) -> u64 {
        self.check(None).1["transactions"].as_u64().unwrap()
    }
}

/// `ledger-node check` of a ledger and an auditor database (the cluster's own, or
/// restored copies), optionally asserting nothing committed inside a window.
pub fn check(ledger_db: &str, auditor_db: &str, window: Option<(i64, i64)>) -> (i32, Value) {
    let mut args = strings(&[
        "check",
        "--ledger-db",
        ledger_db,
        "--auditor-db",
        auditor_db,
        "--output",
        "json",
    ]);
    if let Some((start, end)) = window {
        args.extend([
            "--window-start-ms".to_owned(),
            start.to_string(),
            "--window-end-ms".to_owned(),
            end.to_string(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_json("ledger-node", &args)
}

/// A `ledger-node load` running in the background until stopped.
pub struct Load {
    process: Process,
}

impl Load {
    pub fn start(targets: &str, concurrency: usize, extra: &[&str]) -> Load {
        let mut args = strings(&[
            "load",
            "--targets",
            targets,
            "--concurrency",
            &concurrency.to_string(),
            "--duration",
            "10m",
            "--output",
            "json",
        ]);
        args.extend(strings(extra));
        let child = std::process::Command::new(bin("ledger-node"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Load {
            process: Process::new(child, format!("ledger-node {}", args.join(" "))),
        }
    }

    /// Stops the generator (SIGTERM: it finishes the transfers in flight) and returns
    /// its report.
    pub fn stop(self) -> Value {
        self.process.signal("TERM");
        let output = self.process.wait_output(Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|error| panic!("load report: {error}: {stdout}"))
    }
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// The ledger's `TransferRequest` (proto/ledger.proto), declared here because the
/// reference ledger's generated types live in its own crate.
#[derive(Clone, PartialEq, prost::Message)]
struct TransferRequest {
    #[prost(int64, tag = "1")]
    from_account: i64,
    #[prost(int64, tag = "2")]
    to_account: i64,
    #[prost(int64, tag = "3")]
    amount: i64,
    #[prost(uint64, tag = "4")]
    hold_inside_gate_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TransferReply {
    #[prost(string, tag = "1")]
    tx_id: String,
}

/// Moves 1 from account 1 to account 2 through the ledger node at `address`, as a
/// client that gives up after `deadline` (sent as `grpc-timeout`, as gRPC clients do).
pub async fn transfer(address: &str, deadline: Duration) -> Result<(), tonic::Status> {
    let unavailable = |error: &dyn std::fmt::Display| tonic::Status::unavailable(error.to_string());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|error| unavailable(&error))?
        .connect()
        .await
        .map_err(|error| unavailable(&error))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|error| unavailable(&error))?;
    let mut request = tonic::Request::new(TransferRequest {
        from_account: 1,
        to_account: 2,
        amount: 1,
        hold_inside_gate_ms: 0,
    });
    request.set_timeout(deadline);
    let path = http::uri::PathAndQuery::from_static("/stillpoint.ledger.v1.Ledger/Transfer");
    let codec = tonic_prost::ProstCodec::<TransferRequest, TransferReply>::default();
    // The client gives up too, in case the node never answers at all.
    match tokio::time::timeout(
        deadline + Duration::from_secs(5),
        grpc.unary(request, path, codec),
    )
    .await
    {
        Ok(reply) => reply.map(|_| ()),
        Err(_) => Err(tonic::Status::deadline_exceeded("the client gave up")),
    }
}
