//! `build`: every runbook config becomes the adapter of its kind.

use super::*;

#[test]
fn build_turns_each_config_into_its_adapter() {
    let configs = [
        (
            "files",
            r#"adapter = "sqlite"
path = "/var/lib/app/ledger.sqlite""#,
            "sqlite",
            "sqlite",
        ),
        (
            "pg",
            r#"adapter = "postgres"
url = "postgres://backup@db/ledger"
require_archiving = true"#,
            "postgres",
            "pgdump",
        ),
        (
            "maria",
            r#"adapter = "mariadb"
url = "mysql://backup@db/auditor""#,
            "mariadb",
            "sql",
        ),
        (
            "hook",
            r#"adapter = "exec"
cut = "echo cut"
cut_timeout = "2s""#,
            "exec",
            "bin",
        ),
    ];
    for (name, toml_text, kind, extension) in configs {
        let config: AdapterConfig = toml::from_str(toml_text).unwrap();
        let adapter = build(name, &config);
        assert_eq!(adapter.name(), name);
        assert_eq!(adapter.kind(), kind);
        assert_eq!(adapter.artifact_extension(), extension);
    }
}

/// A database server that accepts connections and never answers (stopped with
/// SIGSTOP, hung, its backlog full): every connection of the drill and of a backup's
/// prepare gives up within the connect timeout, naming the server, instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_the_connection_in_bounded_time() {
    // Listening but never accepting: the kernel completes each TCP handshake, and
    // nothing ever speaks.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hung.local_addr().unwrap().port();
    let configs = [
        format!(
            "adapter = \"postgres\"\nurl = \"postgres://backup@127.0.0.1:{port}/ledger\"\n\
             drill_server_url = \"postgres://backup@127.0.0.1:{port}/postgres\""
        ),
        format!(
            "adapter = \"mariadb\"\nurl = \"mysql://backup@127.0.0.1:{port}/auditor\"\n\
             drill_server_url = \"mysql://backup@127.0.0.1:{port}/mysql\""
        ),
    ];
    let scratch = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let bound = std::time::Duration::from_secs(30);
    let tries = configs.iter().map(|config| {
        let adapter = build("db", &toml::from_str(config).unwrap());
        let dir = scratch.path().to_owned();
        async move {
            let cut = CutMarker {
                kind: String::new(),
                details: BTreeMap::new(),
            };
            let (created, prepared) = tokio::join!(
                adapter.create_scratch("scratch", &dir, &cut),
                adapter.prepare()
            );
            [created.err(), prepared.err()]
        }
    });
    let errors = tokio::time::timeout(bound, futures::future::join_all(tries))
        .await
        .unwrap_or_else(|_| panic!("still connecting after {bound:?}"));
    let took = started.elapsed();
    for error in errors.into_iter().flatten() {
        let msg = error
            .expect("connecting to nothing cannot succeed")
            .to_string();
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("did not answer within 10s"), "{msg}");
    }
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
}
