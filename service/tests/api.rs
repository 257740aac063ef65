//! The HTTP API of `stillpoint serve` as a client sees it: the real binary started on
//! a free port with operator and observer tokens, over a runbook whose pause tier is a
//! closed port and whose storage is a temporary directory (jobs that pause fail fast,
//! which is all the API's shape needs). Owns the checks that the service keeps to
//! docs/api/openapi.json (schemathesis, with a lying copy as the negative control),
//! the auth and error contract, HTTPS, a restart over the same storage, the CLI's
//! `--server` mode against the service, flags refused before it listens, clients that
//! send too much or never finish, and SIGTERM while storage keeps it starting.
//!
//! The binary is the one next to this test (`cargo build --workspace --bins` first, as
//! scripts/test does); the check that it serves the committed document catches a stale one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stillpoint_testkit::workspace_binary as bin;

/// The document as committed; the service must serve exactly this.
const OPENAPI: &str = include_str!("../../docs/api/openapi.json");
const OPERATOR_TOKEN: &str = "operator-token-5b1e0c7d9a2f";
const OBSERVER_TOKEN: &str = "observer-token-8c3f2a6e1d4b";

/// A running `stillpoint serve`, stopped (killed) when dropped.
struct Served {
    /// `http://127.0.0.1:PORT` or `https://…`, as the service printed it.
    url: String,
    dir: tempfile::TempDir,
    process: Child,
    /// Everything the service wrote on stderr, for failure messages.
    log: Arc<Mutex<String>>,
    /// The CA (PEM) that signed the service's certificate, when it serves HTTPS.
    ca: Option<Vec<u8>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Served {
    /// Starts the service over a fresh runbook and waits until /readyz says ready.
    /// `tls` is the CA, certificate and key to serve HTTPS with.
    async fn start(tls: Option<(&Path, &Path, &Path)>) -> Served {
        Served::start_in(tempfile::tempdir().unwrap(), tls).await
    }

    /// Stops the service (SIGKILL) and starts another over the same runbook and storage.
    async fn restart(mut self) -> Served {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Served::start_in(dir, None).await
    }

    async fn start_in(dir: tempfile::TempDir, tls: Option<(&Path, &Path, &Path)>) -> Served {
        let runbook = dir.path().join("runbook.toml");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        // Nothing listens there once the listener is dropped: the pause fails fast.
        drop(closed);
        std::fs::write(
            &runbook,
            format!(
                "cluster = \"api-test\"\n\
                 [pause]\n\
                 tiers = [{{ addresses = [\"127.0.0.1:{closed_port}\"] }}]\n\
                 [[databases]]\n\
                 name = \"app\"\n\
                 adapter = \"exec\"\n\
                 cut = \"true\"\n\
                 [storage]\n\
                 url = \"file://{}\"\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        for (name, token) in [("operator", OPERATOR_TOKEN), ("observer", OBSERVER_TOKEN)] {
            let path = dir.path().join(format!("{name}.token"));
            std::fs::write(&path, format!("{token}\n")).unwrap();
            let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
            std::fs::set_permissions(&path, owner_only).unwrap();
        }
        let mut command = Command::new(bin("stillpoint"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&runbook)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--token-file")
            .arg(dir.path().join("operator.token"))
            .arg("--observer-token-file")
            .arg(dir.path().join("observer.token"))
            .env_remove("STILLPOINT_LISTEN")
            .env_remove("STILLPOINT_API_TOKEN_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((_, cert, key)) = tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let mut process = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (url_sender, url_receiver) = std::sync::mpsc::channel();
        let stderr = BufReader::new(process.stderr.take().unwrap());
        let kept = log.clone();
        // Drains stderr for as long as the process runs, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("stillpoint serve: ")
                    && let Some((_, after)) = rest.split_once(" on ")
                    && let Some(url) = after.split_whitespace().next()
                {
                    let _ = url_sender.send(url.to_owned());
                }
                kept.lock().unwrap().push_str(&line);
                kept.lock().unwrap().push('\n');
            }
        });
        let url = url_receiver
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "the service printed no address (it exited, or took over 30 s):\n{}",
                    log.lock().unwrap()
                )
            });
        let served = Served {
            url,
            dir,
            process,
            log,
            ca: tls.map(|(ca, _, _)| std::fs::read(ca).unwrap()),
        };
        let client = served.client();
        served
            .poll("/readyz to answer 200", || async {
                let answer = client.get(served.at("/readyz")).send().await.ok()?;
                (answer.status() == StatusCode::OK).then_some(())
            })
            .await;
        served
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// A client that trusts the service's CA (and only it), if it has one.
    fn client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(ca) = &self.ca {
            builder = builder.tls_certs_only([reqwest::Certificate::from_pem(ca).unwrap()]);
        }
        builder.build().unwrap()
    }

    /// Polls `probe` until it gives a value (30 s at most).
    async fn poll<T, F: Future<Output = Option<T>>>(
        &self,
        what: &str,
        mut probe: impl FnMut() -> F,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "waited 30 s for {what}; the service's log:\n{}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GETs `path` with `token` (if any): the status, the headers and the body as JSON.
    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self.client().get(self.at(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        answer(request).await
    }

    async fn trigger(
        &self,
        body: &str,
        token: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let request = self
            .client()
            .post(self.at("/api/v1/jobs"))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned());
        answer(request).await
    }

    /// Takes a backup into the service's storage with the one-shot CLI (`--no-pause`:
    /// the pause tier is a closed port) and waits until the API lists it; its id.
    async fn seed_backup(&self) -> String {
        let output = Command::new(bin("stillpoint"))
            .args([
                "backup",
                "--no-pause",
                "--i-know-this-is-unsafe",
                "--config",
            ])
            .arg(self.dir.path().join("runbook.toml"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "the seed backup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.poll("the service to list the seed backup", || async {
            let (_, _, listed) = self.get("/api/v1/backups", Some(OBSERVER_TOKEN)).await;
            listed["backups"][0]["backup_id"]
                .as_str()
                .map(str::to_owned)
        })
        .await
    }

    /// Runs `stillpoint ARGS --server URL` with `token` in STILLPOINT_API_TOKEN: its
    /// exit code, stdout and stderr.
    fn cli(&self, args: &[&str], token: &str) -> (i32, String, String) {
        let output = Command::new(bin("stillpoint"))
            .args(args)
            .args(["--server", &self.url])
            .env("STILLPOINT_API_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            output.status.code().expect("stillpoint exited, not killed"),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs `schemathesis run LOCATION [--url URL]` with every check, as the operator.
    fn schemathesis(&self, location: &str, base_url: Option<&str>) -> (bool, String) {
        let mut command = Command::new("schemathesis");
        command
            .current_dir(self.dir.path())
            .arg("run")
            .arg(location)
            // Every check, none excluded: not_a_server_error, the status codes, content
            // types, headers and bodies the document names, negative data rejected,
            // positive data accepted, 405 with Allow for methods a path does not list,
            // 401 without the token, and the stateful links (POST a job, then GET it).
            .args(["--checks", "all"])
            .args([
                "--header",
                &format!("Authorization: Bearer {OPERATOR_TOKEN}"),
            ])
            // Bounded: the whole run takes seconds; the coverage phase still walks
            // every operation's boundaries deterministically.
            .args(["--max-examples", "30", "--request-timeout", "10"])
            .arg("--no-color")
            .stdin(Stdio::null());
        if let Some(url) = base_url {
            command.args(["--url", url]);
        }
        let output = command
            .output()
            .expect("schemathesis runs (scripts/install-packages installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }
}

async fn answer(
    request: reqwest::RequestBuilder,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("a {status} answer that is not JSON ({error}): {text}"));
    (status, headers, body)
}

/// The error answer's message; panics unless the body is exactly `{"error": "…"}`.
fn error_message(body: &Value) -> &str {
    let object = body.as_object().expect("an error body is an object");
    assert_eq!(object.len(), 1, "an error body has only `error`: {body}");
    let message = object["error"].as_str().expect("`error` is a string");
    assert!(!message.is_empty(), "{body}");
    message
}

#[tokio::test]
async fn tokens_roles_jobs_and_errors_keep_to_the_contract() {
    let served = Served::start(None).await;

    for token in [None, Some("a-token-nobody-was-given-0000")] {
        let (status, headers, body) = served.get("/api/v1/jobs", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert_eq!(headers["www-authenticate"], "Bearer", "{token:?}");
        error_message(&body);
    }
    let (status, _, _) = served.get("/api/v1/jobs", Some(OBSERVER_TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "the observer reads");

    let (status, _, body) = served
        .trigger(r#"{"kind": "verify"}"#, OBSERVER_TOKEN)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(error_message(&body).contains("operator token"), "{body}");

    let (status, headers, queued) = served
        .trigger(r#"{"kind": "verify"}"#, OPERATOR_TOKEN)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let job_id = queued["job_id"].as_str().expect("a job id").to_owned();
    assert_eq!(queued["kind"], "verify");
    assert_eq!(queued["trigger"], "api");
    let location = headers["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/jobs/{job_id}"));
    // Verify over empty storage has nothing to find damaged: it succeeds.
    let job = served
        .poll("the verify job to end", || async {
            let (status, _, job) = served.get(&location, Some(OBSERVER_TOKEN)).await;
            assert_eq!(status, StatusCode::OK, "{job}");
            (job["state"] != "queued" && job["state"] != "running").then_some(job)
        })
        .await;
    assert_eq!(job["job_id"], job_id.as_str());
    assert_eq!(job["state"], "succeeded", "{job}");
    let (_, _, listed) = served.get("/api/v1/jobs", Some(OPERATOR_TOKEN)).await;
    assert!(
        listed["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|listed| listed["job_id"] == job_id.as_str()),
        "{listed}"
    );

    for body in [
        "",
        "not json",
        r#"{"kind": "restore"}"#,
        r#"{"kind": "point", "when": "now"}"#,
        r#"["point"]"#,
    ] {
        let (status, _, answer) = served.trigger(body, OPERATOR_TOKEN).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {answer}");
        error_message(&answer);
    }
    let (_, _, answer) = served
        .trigger(r#"{"kind": "restore"}"#, OPERATOR_TOKEN)
        .await;
    assert!(
        error_message(&answer).contains("base_backup"),
        "names the kinds: {answer}"
    );

    for path in [
        "/api/v1/nothing-here",
        "/api/v1/jobs/no-such-job",
        "/api/v1/backups/no-such-backup",
        "/api/v1/points/no-such-point",
    ] {
        let (status, _, body) = served.get(path, Some(OPERATOR_TOKEN)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        error_message(&body);
    }
    let (status, _, body) = served
        .get("/api/v1/jobs?limit=many", Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    error_message(&body);
}

#[tokio::test]
async fn schemathesis_finds_the_service_keeps_to_its_document_and_a_lie_fails() {
    let served = Served::start(None).await;
    let served_document = served
        .client()
        .get(served.at("/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        served_document, OPENAPI,
        "the binary serves another document than docs/api/openapi.json: rebuild it \
         (`cargo build --workspace --bins`)"
    );

    // A backup to list and show, so those answers are checked against their schemas
    // too (the document links the list to GET /api/v1/backups/{id}).
    served.seed_backup().await;
    let (passed, output) = served.schemathesis(&served.at("/openapi.json"), None);
    assert!(
        passed,
        "schemathesis found the service breaking its document:\n{output}"
    );
    assert!(
        !output.contains("- GET /api/v1/backups/{id}"),
        "schemathesis never reached a listed backup:\n{output}"
    );

    // The negative control: the same service, a document that says a job's state is a
    // number. Every job answer then contradicts it, and schemathesis must say so.
    let mut lie: Value = serde_json::from_str(OPENAPI).unwrap();
    lie["components"]["schemas"]["Job"]["properties"]["state"] = json!({ "type": "integer" });
    let lie_path = served.dir.path().join("lying-openapi.json");
    std::fs::write(&lie_path, lie.to_string()).unwrap();
    let (passed, output) = served.schemathesis(lie_path.to_str().unwrap(), Some(&served.url));
    assert!(
        !passed,
        "schemathesis passed a document that lies:\n{output}"
    );
    assert!(
        output.contains("is not of type \"integer\""),
        "schemathesis failed for another reason than the lie:\n{output}"
    );
}

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stillpoint serve test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let ca = Issuer::new(ca_params, ca_key);
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_pem = server.signed_by(&server_key, &ca).unwrap().pem();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_pem).unwrap();
    std::fs::write(&paths.1, server_pem).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn https_answers_a_client_that_trusts_the_ca_and_refuses_plain_http() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(pki.path());
    let served = Served::start(Some((&ca, &cert, &key))).await;
    let plain_url = served.url.replacen("https://", "http://", 1);
    assert!(
        served.url.starts_with("https://127.0.0.1:"),
        "{}",
        served.url
    );

    let (status, _, body) = answer(
        served
            .client()
            .get(served.at("/api/v1/schedule"))
            .bearer_auth(OBSERVER_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "entries": [] }));

    // Served::start's readiness poll went through HTTPS too; plain HTTP gets no answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("{plain_url}/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP was answered on the HTTPS port: {plain:?}"
    );

    // Without the CA, the certificate is not trusted.
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let refused = untrusting.get(served.at("/healthz")).send().await;
    assert!(
        refused.is_err(),
        "a client without the CA trusted the service: {refused:?}"
    );

    // The CLI trusts the service with --server-ca, and not without it.
    let ca = ca.to_str().unwrap();
    let (code, stdout, stderr) = served.cli(&["list", "--server-ca", ca], OBSERVER_TOKEN);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("no backups on https://127.0.0.1:"),
        "{stdout}"
    );
    let (code, _, stderr) = served.cli(&["list"], OBSERVER_TOKEN);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot reach the service"), "{stderr}");
}

#[tokio::test]
async fn a_restarted_service_reads_back_the_jobs_that_ended() {
    let served = Served::start(None).await;
    let (status, _, queued) = served
        .trigger(r#"{"kind": "verify"}"#, OPERATOR_TOKEN)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let job_id = queued["job_id"].as_str().unwrap().to_owned();
    served
        .poll("the verify job's record to be stored", || async {
            let stored = served
                .dir
                .path()
                .join(format!("storage/service/jobs/{job_id}.json"));
            stored.exists().then_some(())
        })
        .await;

    let served = served.restart().await;
    let (status, _, job) = served
        .get(&format!("/api/v1/jobs/{job_id}"), Some(OBSERVER_TOKEN))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["state"], "succeeded", "{job}");
}

#[tokio::test]
async fn the_cli_lists_and_triggers_through_the_service() {
    let served = Served::start(None).await;

    let (code, stdout, stderr) = served.cli(&["list", "--output", "json"], OBSERVER_TOKEN);
    assert_eq!(code, 0, "{stderr}");
    let listing: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listing["backups"], json!([]), "{listing}");
    assert_eq!(listing["points"], json!([]), "{listing}");
    let (code, stdout, stderr) = served.cli(&["list"], OBSERVER_TOKEN);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("no backups on http://127.0.0.1:"),
        "{stdout}"
    );

    let backup_id = served.seed_backup().await;
    let (code, stdout, stderr) = served.cli(&["list"], OBSERVER_TOKEN);
    assert_eq!(code, 0, "{stderr}");
    let row = stdout
        .lines()
        .find(|line| line.starts_with(&backup_id))
        .unwrap_or_else(|| panic!("{backup_id} is not listed:\n{stdout}"));
    // An unsafe --no-pause copy is no restore point, and the table says so.
    assert!(row.contains("BROKEN") || row.contains("NO"), "{row}");
    let (code, stdout, stderr) =
        served.cli(&["show", &backup_id, "--output", "json"], OBSERVER_TOKEN);
    assert_eq!(code, 0, "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        shown["manifest"]["backup_id"],
        backup_id.as_str(),
        "{shown}"
    );
    assert_eq!(shown["manifest"]["unsafe_no_pause"], true, "{shown}");

    // Verify over empty storage succeeds; its report is printed.
    let (code, stdout, stderr) = served.cli(&["verify", "--output", "json"], OPERATOR_TOKEN);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let job: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["kind"], "verify");
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["result"]["ok"], true, "{job}");

    // The pause tier is a closed port: the backup fails, exit 6 as `stillpoint backup`
    // exits, with the job's error on stderr.
    let (code, stdout, stderr) = served.cli(&["backup"], OPERATOR_TOKEN);
    assert_eq!(code, 6, "{stdout}{stderr}");
    assert!(stdout.contains("backup failed"), "{stdout}");
    let (_, _, jobs) = served
        .get("/api/v1/jobs?limit=1", Some(OBSERVER_TOKEN))
        .await;
    let error = jobs["jobs"][0]["error"]
        .as_str()
        .expect("the failed job's error");
    assert!(
        stderr.contains(error),
        "the job's error {error:?} is not in:\n{stderr}"
    );

    // The observer token may not trigger: bad usage, the service's reason on stderr.
    let (code, _, stderr) = served.cli(&["point", "--no-wait"], OBSERVER_TOKEN);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("operator token"), "{stderr}");
}

#[tokio::test]
async fn a_job_request_body_is_read_only_after_its_token_and_a_huge_one_is_refused_in_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = Served::start(None).await;
    let address = served.url.trim_start_matches("http://").to_owned();
    // A request announcing 3 MB of body and sending none of it: without a token it is
    // answered at once (401, JSON), its body never awaited. (Before, the body was read
    // first: the answer waited for bytes that never came.) No body is sent at all, so
    // the server never closes on unread data, which would reset the connection under
    // the answer.
    for token in [None, Some("a-token-nobody-was-given-0000")] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let auth = token.map_or(String::new(), |token| {
            format!("Authorization: Bearer {token}\r\n")
        });
        let head = format!(
            "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n{auth}\r\n",
            3 << 20
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        let whole = |answer: &[u8]| {
            let text = String::from_utf8_lossy(answer);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let length = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|n| n.trim().to_owned())
                })
                .and_then(|n| n.parse::<usize>().ok());
            length.is_some_and(|length| body.len() >= length)
        };
        while !whole(&answer) {
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{token:?}: no whole answer within 10 s; the body was awaited: {}",
                        String::from_utf8_lossy(&answer)
                    )
                })
                .unwrap();
            assert!(
                read > 0,
                "{token:?}: closed: {}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buffer[..read]);
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(text.starts_with("HTTP/1.1 401"), "{token:?}: {text}");
        let body: Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
        error_message(&body);
    }
    // With the operator token a job request is a few bytes; 8 KB of padding around one
    // is refused (413, JSON) and starts nothing.
    let padded = format!(r#"{{"kind": "verify"}}{}"#, " ".repeat(8 << 10));
    let (status, _, body) = served.trigger(&padded, OPERATOR_TOKEN).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    error_message(&body);
    let (_, _, listed) = served.get("/api/v1/jobs", Some(OPERATOR_TOKEN)).await;
    assert_eq!(listed["jobs"], json!([]), "{listed}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = Served::start(None).await;
    let address = served.url.trim_start_matches("http://").to_owned();
    // Half a request, then silence: the slowloris client. The server closes it (the
    // idle limit is 30 s); before, it held the socket for as long as the client did.
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    // Others are answered meanwhile.
    let (status, _, _) = served.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    let started = Instant::now();
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(45), stalled.read(&mut buffer)).await;
    match read {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(read)) => panic!(
            "the server answered half a request: {:?}",
            String::from_utf8_lossy(&buffer[..read])
        ),
        Err(_) => panic!("the stalled connection was still open after 45 s"),
    }
    eprintln!("stalled connection closed after {:?}", started.elapsed());
    let mut silent = silent;
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buffer)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a connection that never sent a byte was still open: {read:?}"
    );
}

#[test]
fn short_or_shared_tokens_and_a_key_not_the_certificates_are_refused_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            "cluster = \"flags-test\"\n[pause]\ntiers = [{{ addresses = [\"127.0.0.1:1\"] }}]\n\
             [[databases]]\nname = \"app\"\nadapter = \"exec\"\ncut = \"true\"\n\
             [storage]\nurl = \"file://{}\"\n",
            dir.path().join("storage").display()
        ),
    )
    .unwrap();
    let token_file = |name: &str, token: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, token).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    };
    let operator = token_file("operator.token", &format!("{OPERATOR_TOKEN}\n"));
    let short = token_file("short.token", "short\n");
    // The operator's token with Windows line ends is still the operator's token.
    let shared = token_file("shared.token", &format!("{OPERATOR_TOKEN}\r\n"));
    let (_, cert, _) = certificates(dir.path());
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let run = |extra: &[&std::ffi::OsStr]| {
        Command::new(bin("stillpoint"))
            .arg("serve")
            .arg("--config")
            .arg(&runbook)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("STILLPOINT_LISTEN")
            .env_remove("STILLPOINT_API_TOKEN_FILE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let cases: [(Vec<&std::ffi::OsStr>, &str); 3] = [
        (
            vec!["--token-file".as_ref(), short.as_os_str()],
            "at least 16",
        ),
        (
            vec![
                "--token-file".as_ref(),
                operator.as_os_str(),
                "--observer-token-file".as_ref(),
                shared.as_os_str(),
            ],
            "the observer token is the operator token",
        ),
        (
            vec![
                "--token-file".as_ref(),
                operator.as_os_str(),
                "--tls-cert".as_ref(),
                cert.as_os_str(),
                "--tls-key".as_ref(),
                other_key.as_os_str(),
            ],
            "other.key",
        ),
    ];
    for (flags, says) in cases {
        let output = run(&flags);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{flags:?} should say {says:?}: {stderr}"
        );
        assert!(
            !stderr.contains("://"),
            "{flags:?}: it announced an address before refusing: {stderr}"
        );
    }
}

#[test]
fn sigterm_stops_a_service_still_starting_on_storage_that_does_not_answer() {
    // An S3 endpoint that takes connections and never answers (nothing accepts them
    // from the backlog): the storage probe at start-up waits on it for minutes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            "cluster = \"slow-storage\"\n[pause]\ntiers = [{{ addresses = [\"127.0.0.1:1\"] }}]\n\
             [[databases]]\nname = \"app\"\nadapter = \"exec\"\ncut = \"true\"\n\
             [storage]\nurl = \"s3://bucket/prefix\"\n\
             options = {{ endpoint = \"http://{}\", allow_http = \"true\", region = \"us-east-1\", \
             access_key_id = \"test\", secret_access_key = \"test\" }}\n",
            silent.local_addr().unwrap()
        ),
    )
    .unwrap();
    let token = dir.path().join("operator.token");
    std::fs::write(&token, OPERATOR_TOKEN).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut process = Command::new(bin("stillpoint"))
        .arg("serve")
        .arg("--config")
        .arg(&runbook)
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token)
        .env_remove("STILLPOINT_LISTEN")
        .env_remove("STILLPOINT_API_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(process.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(first.contains("http://"), "{first}");
    // Inside the probe: it has started it by the time it announced its address, and
    // it catches signals from before that line.
    let status = Command::new("kill")
        .args(["-TERM", &process.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();
    let exited = loop {
        if let Some(status) = process.try_wait().unwrap() {
            break Some(status);
        }
        if signalled.elapsed() > Duration::from_secs(15) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let Some(status) = exited else {
        let _ = process.kill();
        let _ = process.wait();
        panic!("still starting 15 s after SIGTERM");
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("stopped"), "{rest}");
}
