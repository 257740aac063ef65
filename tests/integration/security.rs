//! The admin API's security with real processes (docs/security.md): a `ledger-node`
//! serving its admin services over mutual TLS with operator and observer tokens, and
//! the `stillpoint` CLI calling it with and without the right CA, client certificate
//! and token. Certificates are made at test time (rcgen), so none can expire in the
//! repository. Secrets are checked for in every output, log and file the run leaves.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::Value;

use crate::upstream_server::UpstreamOnlyServer;
use crate::util::{Process, bin, run_with_env, spawn_listening_logged, stderr};

/// The name in the node's certificate (besides 127.0.0.1); `localhost` is not in it.
const NODE_NAME: &str = "ledger-1.stillpoint.test";
const OPERATOR_TOKEN: &str = "operator-7c1d0b6e9f2a4c58a1e3";
const OBSERVER_TOKEN: &str = "observer-5b2e8d1f0a9c4e67b3d2";
const PASSPHRASE: &str = "age-passphrase-91f3c0d7e2b4";
const DB_PASSWORD: &str = "db-password-4e8a1c9f0b3d";

/// A CA, the node's certificate, a client certificate, and the same from a CA the
/// node does not trust; plus token files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_params, ca_key) = new_ca("stillpoint test CA");
        std::fs::write(
            dir.path().join("ca.pem"),
            ca_params.self_signed(&ca_key).unwrap().pem(),
        )
        .unwrap();
        let ca = Issuer::new(ca_params, ca_key);
        let (other_params, other_key) = new_ca("a CA nobody trusts");
        std::fs::write(
            dir.path().join("other-ca.pem"),
            other_params.self_signed(&other_key).unwrap().pem(),
        )
        .unwrap();
        let other = Issuer::new(other_params, other_key);

        let mut server = CertificateParams::new(vec![NODE_NAME.to_owned()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf(dir.path(), "node", server, &ca);

        let client = || {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "backup operator");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params
        };
        leaf(dir.path(), "client", client(), &ca);
        leaf(dir.path(), "stranger", client(), &other);

        for (name, token) in [("operator", OPERATOR_TOKEN), ("observer", OBSERVER_TOKEN)] {
            std::fs::write(
                dir.path().join(format!("{name}.token")),
                format!("{token}\n"),
            )
            .unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn new_ca(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params, KeyPair::generate().unwrap())
}

/// Writes `<name>.pem` and `<name>.key` signed by `issuer`.
fn leaf(dir: &Path, name: &str, params: CertificateParams, issuer: &Issuer<'_, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

/// One ledger node whose admin services need mutual TLS and a token; its log (at
/// debug level) goes to a file the tests read.
struct SecureNode {
    /// `127.0.0.1:PORT` of the admin services.
    admin: String,
    port: u16,
    log: PathBuf,
    db: PathBuf,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl SecureNode {
    fn start(pki: &Pki) -> SecureNode {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        let db = dir.path().join("ledger.db");
        let args: Vec<String> = [
            "serve",
            "--role",
            "ledger",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--db",
            &format!("sqlite:{}", db.display()),
            // Never called: these tests send no transfers.
            "--auditor",
            "127.0.0.1:1",
            "--tls-cert",
            &pki.path("node.pem"),
            "--tls-key",
            &pki.path("node.key"),
            "--client-ca",
            &pki.path("ca.pem"),
            "--admin-token-file",
            &pki.path("operator.token"),
            "--admin-observer-token-file",
            &pki.path("observer.token"),
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let file = std::fs::File::create(&log).unwrap();
        let (process, addresses) =
            spawn_listening_logged(&bin("ledger-node"), &args, 2, "debug", Stdio::from(file));
        let admin = addresses[1].clone();
        let port = admin.rsplit_once(':').unwrap().1.parse().unwrap();
        SecureNode {
            admin,
            port,
            log,
            db,
            _process: process,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// SIGTERM, and waits for the node to exit.
    fn stop(&mut self) {
        self._process.signal("TERM");
        crate::util::wait_until(
            std::time::Duration::from_secs(20),
            "the node to exit after SIGTERM",
            || self._process.has_exited(),
        );
    }

    /// The node's Stats, read with the observer token.
    fn stats(&self, pki: &Pki) -> Value {
        let mut args = vec!["stats", "-a", &self.admin, "--output", "json"];
        let flags = tls_flags(pki);
        args.extend(flags.iter().map(String::as_str));
        let output = stillpoint(&args, &[("STILLPOINT_ADMIN_TOKEN", OBSERVER_TOKEN)]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        report["nodes"][0]["stats"]["node"].clone()
    }

    fn never_paused(&self, pki: &Pki) -> bool {
        let node = self.stats(pki);
        node["paused"] == false && node["pause_seq"] == 0
    }
}

/// The CA and client certificate flags that reach the node.
fn tls_flags(pki: &Pki) -> Vec<String> {
    vec![
        "--ca-root-cert-path".to_owned(),
        pki.path("ca.pem"),
        "--tls-client-cert".to_owned(),
        pki.path("client.pem"),
        "--tls-client-key".to_owned(),
        pki.path("client.key"),
    ]
}

/// Runs `stillpoint` with debug logs on, and checks no secret reached its output.
fn stillpoint(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut env = env.to_vec();
    env.push(("STILLPOINT_LOG", "debug"));
    let output = run_with_env("stillpoint", args, &env);
    assert_no_secret(&format!("stillpoint {}", args.join(" ")), &output);
    output
}

fn assert_no_secret(what: &str, output: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_secret_free(what, &text);
}

fn assert_secret_free(what: &str, text: &str) {
    for secret in [OPERATOR_TOKEN, OBSERVER_TOKEN, PASSPHRASE, DB_PASSWORD] {
        assert!(!text.contains(secret), "{what} printed a secret:\n{text}");
    }
    assert!(
        !text.contains("PRIVATE KEY"),
        "{what} printed a key:\n{text}"
    );
}

/// A one-shot pause (hold 100ms) with the given extra flags; returns its output.
fn hold_pause(node: &SecureNode, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "pause",
        "--hold-for",
        "100ms",
        "-a",
        &node.admin,
        "--connect-timeout",
        "3s",
    ];
    args.extend_from_slice(extra);
    stillpoint(&args, env)
}

#[test]
fn the_cli_pauses_and_unpauses_a_mutual_tls_node_with_ca_certificate_and_token() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let state = pki.dir.path().join("pause.json");
    let state = state.to_str().unwrap();
    let flags = tls_flags(&pki);
    let connect: Vec<&str> = flags.iter().map(String::as_str).collect();
    let token_file = pki.path("operator.token");

    let mut pause = vec![
        "pause",
        "-a",
        &node.admin,
        "--state-file",
        state,
        "--output",
        "json",
    ];
    pause.extend(&connect);
    pause.extend(["--token-file", &token_file]);
    let output = stillpoint(&pause, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["nodes"][0]["outcome"], "paused", "{report:#}");
    let recorded = std::fs::read_to_string(state).unwrap();
    assert_secret_free("the state file", &recorded);

    // The token from the environment works as well as from a file.
    let mut check = vec!["check-paused", "-a", &node.admin, "--output", "json"];
    check.extend(&connect);
    let output = stillpoint(&check, &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let checked: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(checked["paused"], true, "{checked:#}");

    let mut unpause = vec!["unpause", "--state-file", state, "--output", "json"];
    unpause.extend(&connect);
    unpause.extend(["--token-file", &token_file]);
    let output = stillpoint(&unpause, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let window: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(window["window_valid"], true, "{window:#}");
    assert_eq!(window["nodes"][0]["outcome"], "released", "{window:#}");

    // The observer token reads the node's state, which shows the one pause.
    let stats = node.stats(&pki);
    assert_eq!(stats["paused"], false, "{stats:#}");
    assert_eq!(stats["pause_seq"], 1, "{stats:#}");
    assert_secret_free("the node's log", &node.log());
}

#[test]
fn calls_without_the_token_or_the_client_certificate_are_refused_and_logged() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let ca = pki.path("ca.pem");
    let client_cert = pki.path("client.pem");
    let client_key = pki.path("client.key");
    let operator_file = pki.path("operator.token");
    let observer_file = pki.path("observer.token");
    let wrong_file = pki.dir.path().join("wrong.token");
    std::fs::write(&wrong_file, "not-the-operator-token-at-all\n").unwrap();
    let wrong_file = wrong_file.display().to_string();
    let client = [
        "--ca-root-cert-path",
        &ca,
        "--tls-client-cert",
        &client_cert,
        "--tls-client-key",
        &client_key,
    ];

    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        // TLS and a client certificate, but no token.
        (
            client.to_vec(),
            &["UNAUTHENTICATED", "no bearer token", "--token-file"],
        ),
        (
            [&client[..], &["--token-file", &wrong_file]].concat(),
            &["UNAUTHENTICATED", "wrong bearer token"],
        ),
        // The right token, but no client certificate.
        (
            vec!["--ca-root-cert-path", &ca, "--token-file", &operator_file],
            &[
                "UNAUTHENTICATED",
                "no client certificate",
                "--tls-client-cert",
            ],
        ),
        // Authenticated, not allowed: monitoring cannot pause.
        (
            [&client[..], &["--token-file", &observer_file]].concat(),
            &["PERMISSION_DENIED"],
        ),
    ];
    for (flags, needles) in &cases {
        let output = hold_pause(&node, flags, &[]);
        assert_eq!(
            output.status.code(),
            Some(3),
            "{flags:?}: {}",
            stderr(&output)
        );
        for needle in *needles {
            assert!(
                stderr(&output).contains(needle),
                "{flags:?}: expected {needle:?} in {}",
                stderr(&output)
            );
        }
        assert!(stderr(&output).contains(&node.admin), "{}", stderr(&output));
    }
    assert!(node.never_paused(&pki), "a refused call paused the node");

    let log = node.log();
    for reason in [
        "no bearer token",
        "wrong bearer token",
        "no client certificate",
        "observer token on an operator method",
    ] {
        let line = log
            .lines()
            .find(|line| line.contains("refused an admin call") && line.contains(reason))
            .unwrap_or_else(|| panic!("no refusal logged for {reason:?}:\n{log}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }
    assert_secret_free("the node's log", &log);
}

/// Issue 13.5: a client hammering a node with a wrong token does not flood its log.
/// 100 refused calls from one address make one line at once; the node counts the rest
/// and, when it stops, logs how many it refused since, in one line.
#[test]
fn a_hundred_refused_calls_make_a_bounded_number_of_log_lines_with_the_count() {
    let pki = Pki::generate();
    let mut node = SecureNode::start(&pki);
    let wrong = pki.dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-operator-token-at-all\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = wrong.display().to_string();
    let flags = tls_flags(&pki);
    let mut args = vec!["check-paused", "-a", &node.admin, "--token-file", &wrong];
    args.extend(flags.iter().map(String::as_str));
    let calls = 100;
    for _ in 0..calls {
        let output = run_with_env("stillpoint", &args, &[]);
        assert_ne!(output.status.code(), Some(0), "{}", stderr(&output));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("wrong bearer token"), "{stdout}");
    }
    let refusals = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("refused") && line.contains("wrong bearer token"))
            .map(str::to_owned)
            .collect()
    };
    let lines = refusals(&node.log());
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("refused an admin call"), "{lines:#?}");

    // Stopped as an operator would: the count not logged yet is.
    node.stop();
    let lines = refusals(&node.log());
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let counted: u64 = lines[1]
        .split("refused=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", lines[1]));
    assert!(
        counted >= calls - 1,
        "{counted} counted for {calls} calls: {lines:#?}"
    );
    assert!(lines[1].contains("from 127.0.0.1"), "{lines:#?}");
    assert_secret_free("the node's log", &node.log());
}

#[test]
fn a_wrong_ca_or_host_name_fails_the_handshake_with_a_clear_error() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let token = [("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)];
    let other_ca = pki.path("other-ca.pem");
    let client_cert = pki.path("client.pem");
    let client_key = pki.path("client.key");
    let client = [
        "--tls-client-cert",
        &client_cert,
        "--tls-client-key",
        &client_key,
    ];

    let output = hold_pause(
        &node,
        &[&["--ca-root-cert-path", &other_ca][..], &client].concat(),
        &token,
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    for needle in [
        "TLS handshake failed",
        "UnknownIssuer",
        "--ca-root-cert-path",
        &node.admin,
    ] {
        assert!(
            stderr(&output).contains(needle),
            "expected {needle:?} in {}",
            stderr(&output)
        );
    }

    // `localhost` is not in the node's certificate: refused, unless the name to
    // expect is given.
    let ca = pki.path("ca.pem");
    let by_name = format!("localhost:{}", node.port);
    let check = |extra: &[&str]| {
        let mut args = vec!["check-paused", "-a", &by_name, "--ca-root-cert-path", &ca];
        args.extend_from_slice(&client);
        args.extend_from_slice(extra);
        stillpoint(&args, &token)
    };
    let output = check(&[]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("TLS handshake failed"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let output = check(&["--override-authority", NODE_NAME]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    // A client certificate from a CA the node does not trust, and a plaintext client:
    // neither gets through.
    let stranger_cert = pki.path("stranger.pem");
    let stranger_key = pki.path("stranger.key");
    let stranger = [
        "--ca-root-cert-path",
        &ca,
        "--tls-client-cert",
        &stranger_cert,
        "--tls-client-key",
        &stranger_key,
    ];
    let output = hold_pause(&node, &stranger, &token);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let output = hold_pause(&node, &[], &token);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("speaks TLS, but this client connected in plaintext"),
        "{}",
        stderr(&output)
    );
    assert!(node.never_paused(&pki), "a refused client paused the node");
}

#[test]
fn a_runbook_backup_reaches_a_secured_node_and_prints_no_secret() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let dir = pki.dir.path();
    std::fs::write(dir.join("passphrase"), format!("{PASSPHRASE}\n")).unwrap();
    let storage = dir.join("backups");
    let runbook = |databases: &str| {
        let text = format!(
            r#"
cluster = "secure"
[pause]
tiers = [{{ addresses = ["{admin}"] }}]
lease = "30s"
max_wait = "5s"
cut_deadline = "5s"
token_file = "operator.token"
[pause.tls]
ca_root_cert_path = "ca.pem"
client_cert_path = "client.pem"
client_key_path = "client.key"
[[databases]]
name = "ledger"
adapter = "sqlite"
path = "{db}"
{databases}
[pipeline]
zstd_level = 3
age_passphrase_file = "passphrase"
[storage]
url = "file://{storage}"
"#,
            admin = node.admin,
            db = node.db.display(),
            storage = storage.display(),
        );
        let path = dir.join("runbook.toml");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };

    let config = runbook("");
    let output = stillpoint(&["backup", "--config", &config, "--output", "json"], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let id = report["backup_id"].as_str().unwrap();
    let manifest =
        std::fs::read_to_string(storage.join(format!("backups/{id}/manifest.json"))).unwrap();
    assert_secret_free("the manifest", &manifest);
    assert!(
        !node.never_paused(&pki),
        "the backup did not pause the node"
    );

    // Database passwords in URLs: the prepare step fails (nothing listens on port 1),
    // and neither the error nor the JSON nor the debug log shows the password.
    let config = runbook(&format!(
        "[[databases]]\nname = \"pg\"\nadapter = \"postgres\"\n\
         url = \"postgres://app:{DB_PASSWORD}@127.0.0.1:1/ledger\"\n\
         [[databases]]\nname = \"maria\"\nadapter = \"mariadb\"\n\
         url = \"mysql://app:{DB_PASSWORD}@127.0.0.1:1/auditor\""
    ));
    let output = stillpoint(&["backup", "--config", &config, "--output", "json"], &[]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("127.0.0.1:1"),
        "the error should still name the database: {}",
        stderr(&output)
    );
}

/// Issue 19.7: a token is never sent without TLS to an address that is not loopback,
/// unless the operator says the network is trusted; the refusal says why and what to do.
#[test]
fn an_admin_token_is_not_sent_in_cleartext_to_a_remote_address() {
    let pki = Pki::generate();
    let token_file = pki.path("operator.token");
    // TEST-NET-3: nothing answers there, and nothing must be tried.
    let remote = "203.0.113.7:50051";
    let output = stillpoint(
        &[
            "pause",
            "--hold-for",
            "50ms",
            "-a",
            remote,
            "--token-file",
            &token_file,
            "--connect-timeout",
            "2s",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    for needle in ["cleartext", remote, "--tls", "--allow-plaintext-token"] {
        assert!(
            stderr(&output).contains(needle),
            "expected {needle:?} in {}",
            stderr(&output)
        );
    }
    // Every command that sends the token keeps the rule (here from the environment).
    let output = stillpoint(
        &["check-paused", "-a", remote, "--connect-timeout", "2s"],
        &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)],
    );
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("cleartext"), "{said}");
}

/// Issue 19.7: a client without TLS meeting a TLS port, and a TLS client meeting a
/// plaintext port, are told which of the two happened.
#[test]
fn tls_and_plaintext_mismatches_are_named() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let output = hold_pause(&node, &[], &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    for needle in [
        "speaks TLS",
        "plaintext",
        "--ca-root-cert-path",
        &node.admin,
    ] {
        assert!(
            stderr(&output).contains(needle),
            "expected {needle:?} in {}",
            stderr(&output)
        );
    }

    let plain = UpstreamOnlyServer::start();
    let plain = plain.address.to_string();
    let ca = pki.path("ca.pem");
    let output = stillpoint(
        &["check-paused", "-a", &plain, "--ca-root-cert-path", &ca],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("speaks plaintext"), "{said}");
    assert!(said.contains("not TLS"), "{said}");
}

/// A port that looks like a TLS server to a plaintext client: it keeps what it reads,
/// and after 300 ms of silence answers with a TLS alert record and closes.
struct FakeTlsPort {
    address: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl FakeTlsPort {
    fn start() -> FakeTlsPort {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = received.clone();
        // Blocks in accept until the test process exits; it owns no other resource.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let keep = keep.clone();
                std::thread::spawn(move || {
                    stream
                        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
                        .unwrap();
                    let mut bytes = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while let Ok(read @ 1..) = stream.read(&mut buffer) {
                        bytes.extend_from_slice(&buffer[..read]);
                    }
                    // alert, TLS 1.2 record, length 2: fatal decode_error.
                    let _ = stream.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]);
                    keep.lock().unwrap().push(bytes);
                });
            }
        });
        FakeTlsPort { address, received }
    }

    /// Frame types of the HTTP/2 frames each connection carried after the preface.
    fn frame_types(&self) -> Vec<Vec<u8>> {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|bytes| {
                let mut types = Vec::new();
                let mut rest = bytes.strip_prefix(PREFACE).unwrap_or(&[]);
                while rest.len() >= 9 {
                    let length = usize::from(rest[0]) << 16
                        | usize::from(rest[1]) << 8
                        | usize::from(rest[2]);
                    types.push(rest[3]);
                    rest = &rest[(9 + length).min(rest.len())..];
                }
                types
            })
            .collect()
    }
}

/// Issue 19.7: a plaintext client with a token, pointed at a TLS port on loopback, must
/// find out it is TLS before the token goes out: no HEADERS frame reaches the port.
#[test]
fn a_plaintext_client_learns_a_port_speaks_tls_before_sending_its_token() {
    let port = FakeTlsPort::start();
    let output = stillpoint(
        &[
            "check-paused",
            "-a",
            &port.address,
            "--connect-timeout",
            "3s",
        ],
        &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)],
    );
    assert_eq!(output.status.code(), Some(1));
    let connections = port.frame_types();
    assert!(!connections.is_empty(), "the client never connected");
    const HEADERS: u8 = 0x1;
    assert!(
        connections.iter().all(|types| !types.contains(&HEADERS)),
        "a request (and its token) went out in cleartext to a TLS port: {connections:?}"
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("speaks TLS"), "{said}");
}

/// Issue 19.12: a client certificate signed by a CA the node does not trust: the CLI
/// says the node refused the client certificate and what to check, and the node logs
/// the refused handshake at warn with the peer's address and the reason.
#[test]
fn a_client_certificate_from_another_ca_is_named_and_the_node_logs_the_refusal() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let ca = pki.path("ca.pem");
    let stranger_cert = pki.path("stranger.pem");
    let stranger_key = pki.path("stranger.key");
    let output = hold_pause(
        &node,
        &[
            "--ca-root-cert-path",
            &ca,
            "--tls-client-cert",
            &stranger_cert,
            "--tls-client-key",
            &stranger_key,
        ],
        &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)],
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    for needle in [
        "refused our client certificate",
        "--tls-client-cert",
        &node.admin,
    ] {
        assert!(
            stderr(&output).contains(needle),
            "expected {needle:?} in {}",
            stderr(&output)
        );
    }
    let log = node.log();
    let line = log
        .lines()
        .find(|line| line.contains("TLS handshake failed") && line.contains("client certificate"))
        .unwrap_or_else(|| panic!("no refused handshake logged:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(node.never_paused(&pki));
}

/// TLS files given to the CLI that are missing, a directory, not PEM, PEM that does not
/// decode, or the wrong kind (a certificate as the key) are refused as bad usage before
/// any node is contacted, naming the file and the flag that gave it. Before, a CA file
/// that was not PEM was silently ignored (the node was then said to "speak plaintext"),
/// a damaged PEM gave "TLS settings for …: transport error", and read errors named
/// neither the flag nor said it once.
#[test]
fn unusable_tls_files_are_named_with_their_flag() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let dir = pki.dir.path();
    std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
    std::fs::write(
        dir.join("damaged.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let (junk, damaged, missing) = (
        pki.path("junk.pem"),
        pki.path("damaged.pem"),
        pki.path("missing.pem"),
    );
    let directory = dir.display().to_string();
    let cases: Vec<(&str, [&str; 3])> = vec![
        ("--ca-root-cert-path", [&missing, &cert, &key]),
        ("--ca-root-cert-path", [&directory, &cert, &key]),
        ("--ca-root-cert-path", [&junk, &cert, &key]),
        ("--ca-root-cert-path", [&damaged, &cert, &key]),
        ("--tls-client-cert", [&ca, &missing, &key]),
        ("--tls-client-cert", [&ca, &damaged, &key]),
        ("--tls-client-key", [&ca, &cert, &cert]),
        ("--tls-client-key", [&ca, &cert, &junk]),
    ];
    for (flag, [ca, cert, key]) in cases {
        let output = stillpoint(
            &[
                "pause",
                "--hold-for",
                "10ms",
                "-a",
                &node.admin,
                "--ca-root-cert-path",
                ca,
                "--tls-client-cert",
                cert,
                "--tls-client-key",
                key,
            ],
            &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)],
        );
        let said = stderr(&output);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{flag} {ca} {cert} {key}: {said}"
        );
        let file = match flag {
            "--ca-root-cert-path" => ca,
            "--tls-client-cert" => cert,
            _ => key,
        };
        assert!(
            said.contains(flag) && said.contains(file),
            "{flag} {file}: {said}"
        );
        assert!(!said.contains("transport error"), "{said}");
        assert_eq!(
            said.matches("os error").count(),
            said.contains("os error") as usize,
            "said twice: {said}"
        );
    }
    let inline = stillpoint(
        &[
            "check-paused",
            "-a",
            &node.admin,
            "--ca-root-cert-pem",
            "not a certificate",
        ],
        &[],
    );
    assert_eq!(inline.status.code(), Some(2), "{}", stderr(&inline));
    assert!(
        stderr(&inline).contains("--ca-root-cert-pem"),
        "{}",
        stderr(&inline)
    );
    assert!(node.never_paused(&pki));
}

/// A client certificate given with another certificate's key (both valid PEM) is
/// refused up front, naming both flags and the mismatch. Before, every node failed
/// with "TLS settings for …: transport error".
#[test]
fn a_client_key_that_is_not_the_certificates_is_named() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    let output = stillpoint(
        &[
            "pause",
            "--hold-for",
            "10ms",
            "-a",
            &node.admin,
            "--ca-root-cert-path",
            &pki.path("ca.pem"),
            "--tls-client-cert",
            &pki.path("client.pem"),
            "--tls-client-key",
            &pki.path("stranger.key"),
        ],
        &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)],
    );
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--tls-client-cert")
            && said.contains("--tls-client-key")
            && said.contains("KeyMismatch"),
        "{said}"
    );
    assert!(!said.contains("transport error"), "{said}");
    assert!(node.never_paused(&pki));
}

/// An `--override-authority` that no certificate can carry (empty, a wildcard, a
/// newline) is refused up front naming the flag. Before, every node failed with
/// "TLS settings for …: transport error".
#[test]
fn an_override_authority_that_is_not_a_name_is_refused() {
    let pki = Pki::generate();
    let node = SecureNode::start(&pki);
    for name in ["", "*.example", "node\nexample"] {
        let mut args = vec!["pause", "--hold-for", "10ms", "-a", &node.admin];
        let flags = tls_flags(&pki);
        args.extend(flags.iter().map(String::as_str));
        args.extend(["--override-authority", name]);
        let output = stillpoint(&args, &[("STILLPOINT_ADMIN_TOKEN", OPERATOR_TOKEN)]);
        let said = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{name:?}: {said}");
        assert!(said.contains("--override-authority"), "{said}");
        assert!(!said.contains("transport error"), "{said}");
    }
    assert!(node.never_paused(&pki));
}
