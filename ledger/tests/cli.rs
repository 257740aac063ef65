//! `ledger-node` run the way a runbook runs it, with the databases on real servers: an
//! auditor on MariaDB and two ledger nodes sharing one PostgreSQL database, `load`, then
//! `check` on the two URLs — which passes, and fails naming the account once a balance
//! is edited with psql.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use stillpoint_testkit::{MariaDb, Postgres};

const LEDGER_NODE: &str = env!("CARGO_BIN_EXE_ledger-node");

/// A `ledger-node serve` process, killed when dropped.
struct Served {
    child: Child,
    address: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ledger-node serve ARGS --listen 127.0.0.1:0` and waits (at most 30 s) for the
/// `listening on ADDR` line, which it prints once its database is open.
fn serve(log: &Path, args: &[&str]) -> Served {
    let mut child = Command::new(LEDGER_NODE)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, first_line) = mpsc::channel();
    // Ends when the line arrives or the pipe closes (the process exited or was killed).
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });
    // Owned from here on, so that a failed start still kills the process.
    let mut served = Served {
        child,
        address: String::new(),
    };
    let line = first_line
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("serve {args:?} printed nothing in 30s"));
    let Some(address) = line.trim().strip_prefix("listening on ") else {
        panic!(
            "serve {args:?} did not start: {line:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    };
    served.address = address.to_owned();
    served
}

fn ledger_node(args: &[&str]) -> Output {
    Command::new(LEDGER_NODE)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_cluster_on_postgres_and_mariadb_checks_clean_until_a_balance_is_edited() {
    let (postgres, mariadb) = std::thread::scope(|scope| {
        let postgres = scope.spawn(Postgres::start);
        let mariadb = scope.spawn(MariaDb::start);
        (postgres.join().unwrap(), mariadb.join().unwrap())
    });
    let logs = tempfile::tempdir().unwrap();
    let log = |name: &str| -> PathBuf { logs.path().join(name) };
    let ledger_db = postgres.url("ledger");
    let auditor_db = mariadb.url("auditor");

    let auditor = serve(
        &log("auditor.log"),
        &["--role", "auditor", "--db", &auditor_db],
    );
    let ledger_args = [
        "--role",
        "ledger",
        "--db",
        &ledger_db,
        "--auditor",
        &auditor.address,
    ];
    let first = serve(&log("ledger-1.log"), &ledger_args);
    let second = serve(&log("ledger-2.log"), &ledger_args);

    let targets = format!("{},{}", first.address, second.address);
    let load = ledger_node(&[
        "load",
        "--targets",
        &targets,
        "--count",
        "200",
        "--seed",
        "3",
        "--output",
        "json",
    ]);
    assert!(
        load.status.success(),
        "load: {}{}",
        text(&load.stdout),
        text(&load.stderr)
    );
    let load: serde_json::Value = serde_json::from_slice(&load.stdout).unwrap();
    assert_eq!(load["failed"], 0, "{load}");
    let committed = load["ok"].as_u64().unwrap();
    assert!(committed > 0, "{load}");

    let check_args = [
        "check",
        "--ledger-db",
        &ledger_db,
        "--auditor-db",
        &auditor_db,
        "--output",
        "json",
    ];
    let check = ledger_node(&check_args);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["transactions"].as_u64(), Some(committed), "{report}");

    // The negative control: one balance edited behind the ledger's back.
    postgres.psql("ledger", "UPDATE accounts SET balance = -5 WHERE id = 7");
    let check = ledger_node(&check_args[..5]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    let stdout = text(&check.stdout);
    assert!(stdout.contains("FAIL balances"), "{stdout}");
    assert!(stdout.contains("account 7 holds -5"), "{stdout}");
    assert!(stdout.contains("INCONSISTENT"), "{stdout}");

    // A check of a database that is not there says so, and does not create it.
    let missing = postgres.url("no_such_ledger");
    let check = ledger_node(&[
        "check",
        "--ledger-db",
        &missing,
        "--auditor-db",
        &auditor_db,
    ]);
    assert_eq!(check.status.code(), Some(2));
    assert!(
        text(&check.stderr).contains("does not exist"),
        "{}",
        text(&check.stderr)
    );
    assert_eq!(
        postgres.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'no_such_ledger'"
        ),
        "0"
    );
    drop((first, second, auditor));
}

#[test]
fn help_names_the_server_url_forms() {
    for command in ["serve", "check"] {
        let help = ledger_node(&[command, "--help"]);
        assert!(help.status.success());
        let help = text(&help.stdout);
        for form in ["sqlite:PATH", "postgres://", "mysql://"] {
            assert!(
                help.contains(form),
                "{command} --help lacks {form}:\n{help}"
            );
        }
    }
    let bad = ledger_node(&[
        "check",
        "--ledger-db",
        "mysql://root@127.0.0.1:1",
        "--auditor-db",
        "sqlite:a.db",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("no database name"),
        "{}",
        text(&bad.stderr)
    );
}

/// Issue 20.11: `check`'s window had two rules (help: [start, end]; code: edges
/// outside), a window shorter than 2 ms could never fail, and a window given in seconds
/// by mistake (in 1970) passed. One documented rule now, and absurd windows refused.
#[test]
fn check_windows_have_one_rule_and_absurd_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite:{}", dir.path().join("ledger.db").display());
    let auditor = format!("sqlite:{}", dir.path().join("auditor.db").display());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use stillpoint_ledger::store;
        store::open_ledger(&ledger.parse().unwrap(), store::Seed::default())
            .await
            .unwrap();
        store::open_auditor(&auditor.parse().unwrap())
            .await
            .unwrap();
    });
    let check = |start: i64, end: i64| {
        ledger_node(&[
            "check",
            "--ledger-db",
            &ledger,
            "--auditor-db",
            &auditor,
            "--window-start-ms",
            &start.to_string(),
            "--window-end-ms",
            &end.to_string(),
        ])
    };
    let now = stillpoint_node::time::unix_ms(std::time::SystemTime::now());
    let sound = check(now - 5_000, now - 4_000);
    assert!(sound.status.success(), "{}", text(&sound.stderr));

    for (start, end, needle) in [
        // Seconds, not milliseconds: a window in January 1970.
        (1_700_000_000, 1_700_000_005, "Unix milliseconds"),
        // No millisecond lies strictly between the edges: nothing could ever fail it.
        (now, now + 1, "at least 2 ms"),
        (now, now, "at least 2 ms"),
        (now, now - 10, "is after"),
        // Longer than any pause can be (a lease is at most 24 h).
        (now - 3 * 86_400_000, now, "longer than"),
    ] {
        let refused = check(start, end);
        assert_eq!(
            refused.status.code(),
            Some(2),
            "window ({start}, {end}) was not refused: {}",
            text(&refused.stdout)
        );
        assert!(
            text(&refused.stderr).contains(needle),
            "({start}, {end}): {}",
            text(&refused.stderr)
        );
    }

    let help = text(&ledger_node(&["check", "--help"]).stdout);
    assert!(
        help.contains("(start, end)") && !help.contains("[start, end]"),
        "{help}"
    );
}
