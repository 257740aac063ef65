//! The embedding example (`node/examples/pausable_service.rs`), run as a real process:
//! an axum counter made pausable in a few lines, paused by our CLI and by the upstream
//! client, its requests held or refused meanwhile and served again afterwards.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    Process, bin, example, paused_flags, paused_flags_as, run, run_json, spawn_listening_with_env,
    wait_until,
};

/// A running `pausable_service`: its app and admin addresses.
struct ExampleService {
    _process: Process,
    app: String,
    admin: String,
}

impl ExampleService {
    fn start(env: &[(&str, &str)]) -> Self {
        let (process, addresses) =
            spawn_listening_with_env(&example("pausable_service"), &[], env, 2, Stdio::inherit());
        let [app, admin] = <[String; 2]>::try_from(addresses).expect("two addresses");
        Self {
            _process: process,
            app,
            admin,
        }
    }

    /// One HTTP/1.1 request on a connection of its own.
    fn request(&self, method: &str, path: &str) -> Response {
        let mut stream = TcpStream::connect(&self.app).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            self.app
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole HTTP response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"));
        Response {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    /// Status line and headers, lower-cased.
    head: String,
    body: String,
}

/// `stillpoint pause --hold-for` pauses the example (which requires a token here): a
/// request sent while it is paused waits at the gate and is answered only after the
/// release, with the counter it moved; the window is a valid restore point.
#[test]
fn the_cli_pauses_the_example_service_and_its_requests_wait_for_the_release() {
    let token = "example-operator-token-0123456789";
    let service =
        ExampleService::start(&[("PAUSABLE_HOLD", "60s"), ("STILLPOINT_ADMIN_TOKEN", token)]);
    let first = service.request("POST", "/increment");
    assert_eq!((first.status, first.body.as_str()), (200, "1"), "{first:?}");
    // The admin services refuse a caller without the token (the upstream client sends
    // none) and leave the node as it was.
    let refused = run("scalar-admin", &["-c", "PAUSE", "-a", &service.admin]);
    assert!(
        !refused.status.success(),
        "a pause without the token worked"
    );
    assert_eq!(paused_flags_as(&service.admin, Some(token)), [false]);

    let pause = Command::new(bin("stillpoint"))
        .args(["pause", "--addresses", &service.admin])
        .args(["--hold-for", "2s", "--output", "json"])
        .env("STILLPOINT_ADMIN_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pause = Process::new(pause, "stillpoint pause --hold-for 2s".to_owned());
    wait_until(Duration::from_secs(20), "the service to be paused", || {
        paused_flags_as(&service.admin, Some(token)) == [true]
    });

    let held = std::thread::scope(|scope| {
        let held = scope.spawn(|| {
            let response = service.request("POST", "/increment");
            (response, Instant::now())
        });
        // The last moment the node was seen paused: a check sent then was answered
        // "paused", so the node was paused from before the request until that moment.
        let mut last_seen_paused = Instant::now();
        wait_until(Duration::from_secs(20), "the release", || {
            let asked = Instant::now();
            let paused = paused_flags_as(&service.admin, Some(token)) == [true];
            if paused {
                last_seen_paused = asked;
            }
            !paused
        });
        let (response, answered) = held.join().unwrap();
        assert!(
            answered > last_seen_paused,
            "the request was answered while the service was still paused"
        );
        response
    });
    assert_eq!((held.status, held.body.as_str()), (200, "2"), "{held:?}");

    let output = pause.wait_output(Duration::from_secs(30));
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let window: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(window["window_valid"], true, "{window:#}");
    assert_eq!(window["nodes"][0]["stayed_paused"], true, "{window:#}");
    let count = service.request("GET", "/count");
    assert_eq!((count.status, count.body.as_str()), (200, "2"), "{count:?}");
}

/// The upstream client (`scalar-admin`, upstream `rpc.Admin` only) pauses, checks and
/// unpauses the example; while it is paused, requests are refused at once with 503 and
/// `Retry-After` and change nothing, and after the unpause they are served.
#[test]
fn the_upstream_client_pauses_the_example_service_and_its_requests_are_refused_meanwhile() {
    let service = ExampleService::start(&[]);
    let before = service.request("POST", "/increment");
    assert_eq!(
        (before.status, before.body.as_str()),
        (200, "1"),
        "{before:?}"
    );

    let (code, paused) = run_json("scalar-admin", &["-c", "PAUSE", "-a", &service.admin]);
    assert_eq!(code, 0, "{paused:#}");
    let (code, checked) = run_json(
        "scalar-admin",
        &["-c", "CHECK_PAUSED", "-a", &service.admin],
    );
    assert_eq!(code, 0, "{checked:#}");
    assert_eq!(checked["paused"], true, "{checked:#}");
    for (method, path) in [("POST", "/increment"), ("GET", "/count")] {
        let refused = service.request(method, path);
        assert_eq!(
            refused.status, 503,
            "{method} {path} while paused: {refused:?}"
        );
        assert!(refused.head.contains("retry-after: 1"), "{refused:?}");
    }

    let (code, unpaused) = run_json("scalar-admin", &["-c", "UNPAUSE", "-a", &service.admin]);
    assert_eq!(code, 0, "{unpaused:#}");
    let (_, checked) = run_json(
        "scalar-admin",
        &["-c", "CHECK_PAUSED", "-a", &service.admin],
    );
    assert_eq!(checked["paused"], false, "{checked:#}");
    assert_eq!(paused_flags(&service.admin), [false]);
    let after = service.request("POST", "/increment");
    assert_eq!(
        (after.status, after.body.as_str()),
        (200, "2"),
        "the refused increment changed the counter: {after:?}"
    );
}

/// The example refuses bad settings in words and exits 1, without listening first: a
/// port already taken (named), an address that is not one, a bad `PAUSABLE_HOLD`, a
/// token too short. Before, `main` returned its error, which Rust prints with `Debug`
/// (`Error: Os { code: 98, kind: AddrInUse, … }`, `Error: TooShort { len: 9 }`), and
/// the hold and the token were read only after both ports were bound and announced.
/// Arguments, environment, and what stderr must say.
type BadSetting<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_settings_are_said_in_words_and_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let cases: [BadSetting<'_>; 4] = [
        (&["127.0.0.1:0", &taken], &[], "cannot listen on"),
        (&["not-an-address"], &[], "not-an-address"),
        (&[], &[("PAUSABLE_HOLD", "soon")], "PAUSABLE_HOLD"),
        (&[], &[("STILLPOINT_ADMIN_TOKEN", "short")], "at least"),
    ];
    for (args, env, expected) in cases {
        let child = Command::new(example("pausable_service"))
            .args(args)
            .env_remove("PAUSABLE_HOLD")
            .env_remove("STILLPOINT_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Process::new(child, format!("pausable_service {args:?} {env:?}"))
            .wait_output(Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "{args:?} {env:?}: {stderr}");
        assert!(stderr.starts_with("pausable_service: "), "{stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert!(
            !stderr.contains("Error: "),
            "a Debug-printed error: {stderr}"
        );
        assert!(!stdout.contains("admin listening"), "{stdout}");
    }
}
