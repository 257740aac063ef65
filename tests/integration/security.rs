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
        stderr(&output).contains("if the node serves TLS, pass --tls"),
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
