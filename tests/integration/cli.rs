//! The command line itself: help that teaches, and bad input refused with exit code 2
//! and a message naming the value, before anything is contacted.

use crate::util::{run, stderr};

#[test]
fn help_explains_commands_tiers_and_exit_codes() {
    let top = run("stillpoint", &["--help"]);
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    for needle in [
        "pause",
        "unpause",
        "check-paused",
        "restore point",
        "Exit codes",
        "lease",
    ] {
        assert!(
            text.contains(needle),
            "stillpoint --help lacks {needle:?}:\n{text}"
        );
    }
    let pause = run("stillpoint", &["pause", "--help"]);
    let text = String::from_utf8_lossy(&pause.stdout);
    for needle in [
        "--hold-for",
        "--lease",
        "--keep-alive",
        "tier",
        "--time-zone",
        "--min-window",
    ] {
        assert!(
            text.contains(needle),
            "stillpoint pause --help lacks {needle:?}:\n{text}"
        );
    }
    for (command, needles) in [
        ("drill", &["--junit", "--keep", "RTO", "7  drill"][..]),
        ("restore", &["--force", "--database", "--to"][..]),
        (
            "pitr",
            &["--target", "--base-backup", "--wal-archive", "--run-as"][..],
        ),
        ("backup", &["--no-pause", "--i-know-this-is-unsafe"][..]),
    ] {
        let help = run("stillpoint", &[command, "--help"]);
        let text = String::from_utf8_lossy(&help.stdout);
        for needle in needles {
            assert!(
                text.contains(needle),
                "stillpoint {command} --help lacks {needle:?}:\n{text}"
            );
        }
    }
    let scalar = run("scalar-admin", &["--help"]);
    let text = String::from_utf8_lossy(&scalar.stdout);
    for needle in [
        "PAUSE",
        "CHECK_PAUSED",
        "--max-pause-wait-time",
        "--srv-service-url",
    ] {
        assert!(
            text.contains(needle),
            "scalar-admin --help lacks {needle:?}:\n{text}"
        );
    }
}

#[test]
fn bad_input_is_a_usage_error_that_names_the_value() {
    let cases: &[(&[&str], &str)] = &[
        (&["pause", "-a", "127.0.0.1:1,,127.0.0.1:2"], "empty entry"),
        (
            &["pause", "-a", "127.0.0.1:1", "-a", "127.0.0.1:1"],
            "127.0.0.1:1 is listed twice",
        ),
        (&["pause", "-a", "node-without-port"], "node-without-port"),
        (
            &[
                "pause",
                "-a",
                "127.0.0.1:1",
                "--lease",
                "1s",
                "--max-pause-wait",
                "5s",
            ],
            "shorter than the lease",
        ),
        (&["pause", "-a", "127.0.0.1:1", "--lease", "10"], "\"10\""),
        (
            &["pause", "-a", "127.0.0.1:1", "--time-zone", "Mars/Olympus"],
            "Mars/Olympus",
        ),
        (&["pause"], "-a HOST:PORT"),
    ];
    for (args, needle) in cases {
        let output = run("stillpoint", args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(needle),
            "{args:?}: expected {needle:?} in {}",
            stderr(&output)
        );
    }
}

#[test]
fn unreachable_node_fails_the_pause_cleanly() {
    // Nothing listens on port 1.
    let output = run(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "10ms",
            "-a",
            "127.0.0.1:1",
            "--connect-timeout",
            "500ms",
            "--output",
            "json",
        ],
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["nodes"][0]["outcome"], "failed");
    assert!(stderr(&output).contains("127.0.0.1:1"));
}

/// The README's first command, run as a user would (JSON, to read the verdict): a
/// backup of a live cluster, then a drill of it whose checks all pass; then, under the
/// same load, points every 2 s on the archived SQLite files, two of them drilled.
#[test]
fn demo_backs_up_and_drills_a_local_cluster() {
    let (code, report) = crate::util::run_json("stillpoint", &["demo", "--output", "json"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["window"]["window_valid"], true);
    assert_eq!(report["load"]["failed"], 0);
    assert!(report["load"]["ok"].as_u64().unwrap() > 0);
    // The demo ends with a drill: both databases restored and every check passed,
    // the ledger's invariants among them.
    let drill = &report["drill"];
    assert_eq!(drill["ok"], true, "{drill:#}");
    let checks: Vec<&str> = drill["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    for expected in [
        "checksum:ledger",
        "restore:auditor",
        "row_counts:ledger",
        "balances_conserved",
        "hash_chain_links",
        "ledger_matches_auditor",
    ] {
        assert!(checks.contains(&expected), "{checks:?}");
    }
    assert!(
        drill["databases"][0]["restore"]["stored_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        report["live_check"]["ok"], true,
        "something committed inside the window"
    );
    assert!(report["stored_bytes"].as_u64().unwrap() > 0);

    // Then the same cluster goes continuous: both SQLite logs archived, a point every
    // 2 s under load, every one taken, and two of them (one at random, the newest)
    // rebuilt into scratch files where `ledger-node check` passes and the rows equal
    // those counted inside each point's pause.
    let points = &report["points"];
    assert_eq!(points["ok"], true, "{points:#}");
    assert_eq!(points["failed"], 0, "{points:#}");
    let timeline = points["timeline"].as_array().unwrap();
    let taken: Vec<&str> = timeline
        .iter()
        .filter(|point| point["ok"] == true)
        .map(|point| point["point_id"].as_str().unwrap())
        .collect();
    assert!(taken.len() >= 5, "{points:#}");
    assert_eq!(points["taken"], taken.len());
    for point in timeline {
        assert!(point["window_ms"].as_i64().unwrap() > 0, "{point}");
        assert!(point["wait_ms"].is_u64(), "{point}");
    }
    // Each archiver's backlog when a point was asked for (none before its first look).
    assert!(
        timeline
            .iter()
            .any(|point| point["lag_bytes"]["ledger"].is_u64()
                && point["lag_bytes"]["auditor"].is_u64()),
        "{points:#}"
    );
    let drills = points["drills"].as_array().unwrap();
    let picks: Vec<&str> = drills.iter().map(|d| d["pick"].as_str().unwrap()).collect();
    assert_eq!(picks, ["random", "newest"]);
    assert_eq!(drills[1]["point_id"], *taken.last().unwrap());
    assert!(taken[..taken.len() - 1].contains(&drills[0]["point_id"].as_str().unwrap()));
    for drill in drills {
        assert_eq!(drill["ok"], true, "{drill:#}");
        assert_eq!(drill["row_counts_compared"], true, "{drill:#}");
        assert!(drill["restore_ms"].is_u64(), "{drill:#}");
        let checks = drill["checks"].as_array().unwrap();
        for name in [
            "ledger_node_check",
            "restore:ledger",
            "restore:auditor",
            "row_counts:ledger",
            "row_counts:auditor",
        ] {
            let check = checks.iter().find(|c| c["name"] == name);
            assert!(
                check.is_some_and(|c| c["ok"] == true),
                "{name} in {drill:#}"
            );
        }
    }
    for archiver in points["archivers"].as_array().unwrap() {
        assert!(archiver["error"].is_null(), "{archiver}");
        assert!(
            archiver["chunks_stored"].as_u64().unwrap() > 0,
            "{archiver}"
        );
    }
}

/// SIGTERM to the demo (a closed terminal, `timeout`) while its cluster serves load:
/// every process it started (3 ledger nodes, the auditor, the load generator) is stopped
/// and reaped, and its scratch directory removed, before it exits 1.
#[test]
fn a_demo_stopped_by_sigterm_leaves_no_process_and_no_directory() {
    // Printed once the load generator runs.
    stop_demo_with_sigterm_at("backing up");
}

/// The same while its archivers (tasks in the demo's process) write into its scratch
/// directory and points are taken: they are stopped before the directory is removed.
#[test]
fn a_demo_stopped_by_sigterm_while_taking_points_leaves_nothing() {
    stop_demo_with_sigterm_at("taking a point every");
}

/// Starts `stillpoint demo`, sends it SIGTERM once it prints `line`, and checks that
/// no process it started and nothing in its temporary directory is left.
fn stop_demo_with_sigterm_at(line: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let tmp = scratch.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // stderr to a file: processes the demo leaves behind would hold a pipe open.
    let stderr_path = scratch.path().join("stderr");
    let mut child = std::process::Command::new(crate::util::bin("stillpoint"))
        .arg("demo")
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let mut demo = crate::util::Process::new(child, "stillpoint demo".to_owned());
    crate::util::wait_for_line(&lines, line, std::time::Duration::from_secs(60));
    // A process's children are listed per thread that started them.
    let children: std::collections::BTreeSet<u32> =
        std::fs::read_dir(format!("/proc/{}/task", demo.pid()))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("children")).ok())
            .collect::<String>()
            .split_whitespace()
            .map(|pid| pid.parse().unwrap())
            .collect();
    assert_eq!(
        children.len(),
        5,
        "4 nodes and the load generator: {children:?}"
    );

    demo.signal("TERM");
    crate::util::wait_until(
        std::time::Duration::from_secs(30),
        "the demo to exit",
        || demo.has_exited(),
    );
    let status = demo.wait_output(std::time::Duration::from_secs(1)).status;
    let left: Vec<u32> = children
        .into_iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    for pid in &left {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert!(left.is_empty(), "the demo left processes running: {left:?}");
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let files: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(
        files.is_empty(),
        "the demo left its scratch directory: {files:?}"
    );
}

/// Bad input next to a real, reachable node: every case exits 2 with the value named,
/// and the node was never paused, not even briefly (its pause sequence stays 0).
#[test]
fn usage_errors_exit_2_before_any_node_is_paused() {
    let cluster = crate::cluster::Cluster::start(1);
    let node = cluster.ledgers[0].address.clone();
    let twice = format!("{node},{node}");
    let stray = format!("{node},");
    let cases: &[(&[&str], &str)] = &[
        (&["-a", &twice], "is listed twice"),
        (&["-a", &stray], "empty entry"),
        (
            &["-a", &node, "--lease", "1s", "--max-pause-wait", "5s"],
            "shorter than the lease",
        ),
        (
            &["-a", &node, "--max-pause-wait", "0s"],
            "max pause wait is 0ms",
        ),
        (
            &["-a", &node, "--lease", "0s"],
            "lease must be between 1ms and 24h",
        ),
        (&["-a", &node, "--lease", "100000h"], "\"100000h\""),
        (&["-a", &node, "--lease=-5s"], "cannot be negative"),
        (
            &["-a", &node, "--connect-timeout", "0s"],
            "--connect-timeout 0ms",
        ),
        (
            &["-a", &node, "--token-file", "/nonexistent/token"],
            "/nonexistent/token",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["pause", "--hold-for", "50ms"];
        args.extend_from_slice(extra);
        let output = run("stillpoint", &args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(needle),
            "{args:?}: expected {needle:?} in {}",
            stderr(&output)
        );
    }

    // The same for a runbook: two databases with one name, an unsupported storage.
    let dir = tempfile::tempdir().unwrap();
    let database = |name: &str| {
        format!("[[databases]]\nname = \"{name}\"\nadapter = \"sqlite\"\npath = \"x.db\"\n")
    };
    for (databases, storage, needle) in [
        (
            format!("{}{}", database("ledger"), database("ledger")),
            "file:///tmp/sp-backups".to_owned(),
            "two databases are named \"ledger\"",
        ),
        (
            database("ledger"),
            "ftp://host/backups".to_owned(),
            "\"ftp://host/backups\" is not supported",
        ),
    ] {
        let runbook = dir.path().join("runbook.toml");
        std::fs::write(
            &runbook,
            format!(
                "cluster = \"c\"\n[pause]\ntiers = [{{ addresses = [\"{node}\"] }}]\n\
                 {databases}[storage]\nurl = \"{storage}\"\n"
            ),
        )
        .unwrap();
        let output = run(
            "stillpoint",
            &["backup", "--config", runbook.to_str().unwrap()],
        );
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(
            stderr(&output).contains(needle),
            "expected {needle:?} in {}",
            stderr(&output)
        );
    }

    let (code, stats) =
        crate::util::run_json("stillpoint", &["stats", "-a", &node, "--output", "json"]);
    assert_eq!(code, 0, "{stats:#}");
    assert_eq!(
        stats["nodes"][0]["stats"]["node"]["pause_seq"], 0,
        "{stats:#}"
    );
    assert_eq!(
        stats["nodes"][0]["stats"]["node"]["paused"], false,
        "{stats:#}"
    );
}

/// A pause id with control characters, or too long, is refused as bad usage before
/// any node is contacted: it would be written to logs, the state file and every node.
/// Before, `--pause-id $'a\nb\e[31m'` paused the cluster under it, and an over-long
/// one failed only at the node, as a failed pause.
#[test]
fn a_pause_id_with_control_characters_or_too_long_is_refused_up_front() {
    let cluster = crate::cluster::Cluster::start(1);
    let ledger = cluster.ledgers[0].address.clone();
    let long = "x".repeat(129);
    for id in ["a\nb\u{1b}[31m", "tab\there", &long] {
        let output = crate::util::run(
            "stillpoint",
            &[
                "pause",
                "--hold-for",
                "10ms",
                "-a",
                &ledger,
                "--pause-id",
                id,
            ],
        );
        let said = crate::util::stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{id:?}: {said}");
        assert!(said.contains("pause id"), "{said}");
        assert!(
            !said.contains('\u{1b}'),
            "the escape reached the terminal: {said}"
        );
        let stats =
            crate::util::run_json("stillpoint", &["stats", "-a", &ledger, "--output", "json"]).1;
        assert_eq!(
            stats["nodes"][0]["stats"]["node"]["pause_seq"], 0,
            "{id:?}: the node was paused: {stats:#}"
        );
    }
}

/// `check-paused`, `stats` and `unpause -a` keep their exit code when whoever reads
/// their stdout has gone (`| grep -q …`, `| head -1`): a node that could not be checked
/// or released is still a failure. Before, their text lines went through `println!`,
/// whose panic on the closed pipe ended the command with exit 0.
#[test]
fn node_commands_keep_their_exit_code_with_stdout_closed() {
    for (args, code) in [
        (&["check-paused", "-a", "127.0.0.1:1"][..], 1),
        (&["stats", "-a", "127.0.0.1:1"][..], 1),
        (
            &[
                "unpause",
                "-a",
                "127.0.0.1:1",
                "--state-file",
                "/nonexistent/pause.json",
            ][..],
            4,
        ),
    ] {
        let mut child = std::process::Command::new(crate::util::bin("stillpoint"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let output = crate::util::Process::new(child, format!("stillpoint {}", args.join(" ")))
            .wait_output(std::time::Duration::from_secs(30));
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("127.0.0.1:1"),
            "{}",
            stderr(&output)
        );
    }
}

/// A stdout that refuses the write for another reason than a closed pipe (a full disk
/// behind `> window.json`, here /dev/full) loses the output: the command says so on
/// stderr and exits 1. Before, `completions` and `man` ended in a panic with its
/// backtrace and exit 101.
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    for args in [&["completions", "bash"][..], &["man"][..]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let child = std::process::Command::new(crate::util::bin("stillpoint"))
            .args(args)
            .stdout(full)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let output = crate::util::Process::new(child, format!("stillpoint {}", args.join(" ")))
            .wait_output(std::time::Duration::from_secs(30));
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {text}");
        assert!(text.contains("cannot write the output to stdout"), "{text}");
        assert!(text.contains("No space left on device"), "{text}");
        assert!(!text.contains("panicked"), "{text}");
    }
}

/// The subcommands `stillpoint --help` lists, read from its "Commands:" section (so a
/// new command is checked without editing this test).
fn subcommands() -> Vec<String> {
    let help = run("stillpoint", &["--help"]);
    let text = String::from_utf8_lossy(&help.stdout).into_owned();
    let commands: Vec<String> = text
        .split("Commands:")
        .nth(1)
        .expect("stillpoint --help has a Commands: section")
        .lines()
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .filter(|name| name != "help")
        .collect();
    assert!(
        commands.len() >= 10 && commands.iter().any(|name| name == "check-paused"),
        "cannot read the commands from stillpoint --help: {commands:?}\n{text}"
    );
    commands
}

/// What bash's completion for `stillpoint` offers for `words` (the last one being
/// completed), through the function the script registers with `complete -F`.
fn bash_completes(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|word| format!("'{word}'")).collect();
    let line = words.join(" ");
    let program = format!(
        r#"source '{script}' || exit 90
function=$(complete -p stillpoint | sed -n 's/.*-F \([^ ]*\) .*/\1/p')
[ -n "$function" ] || {{ echo "no completion function registered" >&2; exit 91; }}
COMP_WORDS=({words})
COMP_CWORD={cword}
COMP_LINE='{line}'
COMP_POINT=${{#COMP_LINE}}
"$function" stillpoint '{current}' '{previous}'
printf '%s\n' "${{COMPREPLY[@]}}""#,
        script = script.display(),
        words = quoted.join(" "),
        cword = words.len() - 1,
        current = words[words.len() - 1],
        previous = words[words.len() - 2],
    );
    let output = std::process::Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "completing {words:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|word| word.trim().to_owned())
        .filter(|word| !word.is_empty())
        .collect()
}

/// Issue 13.4: `stillpoint completions bash` is a script bash accepts, and once
/// sourced it completes subcommand names and a subcommand's flags; zsh and fish
/// scripts name every subcommand.
#[test]
fn completions_complete_subcommands_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let commands = subcommands();

    let bash = run("stillpoint", &["completions", "bash"]);
    assert!(bash.status.success(), "{}", stderr(&bash));
    let script = dir.path().join("stillpoint.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "bash -n rejects the completion script: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    assert_eq!(bash_completes(&script, &["stillpoint", "pa"]), ["pause"]);
    assert_eq!(
        bash_completes(&script, &["stillpoint", "check"]),
        ["check-paused"]
    );
    let all = bash_completes(&script, &["stillpoint", ""]);
    for command in &commands {
        assert!(
            all.contains(command),
            "bash does not offer {command}: {all:?}"
        );
    }
    assert_eq!(
        bash_completes(&script, &["stillpoint", "pause", "--hold"]),
        ["--hold-for"]
    );
    assert_eq!(
        bash_completes(&script, &["stillpoint", "completions", "f"]),
        ["fish"]
    );

    let zsh = run("stillpoint", &["completions", "zsh"]);
    assert!(zsh.status.success(), "{}", stderr(&zsh));
    let zsh = String::from_utf8_lossy(&zsh.stdout);
    assert!(zsh.starts_with("#compdef stillpoint"), "{zsh}");
    let fish = run("stillpoint", &["completions", "fish"]);
    assert!(fish.status.success(), "{}", stderr(&fish));
    let fish = String::from_utf8_lossy(&fish.stdout);
    for command in &commands {
        assert!(
            zsh.contains(&format!("'{command}:")),
            "the zsh script lacks {command}"
        );
        assert!(
            fish.contains(&format!("-a \"{command}\"")),
            "the fish script lacks {command}:\n{fish}"
        );
    }

    let unknown = run("stillpoint", &["completions", "tcsh"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", stderr(&unknown));
}

/// Renders a man page with groff (as `man` does, UTF-8 input through preconv) and
/// fails on any warning.
fn render_man(page: &std::path::Path) -> String {
    let output = std::process::Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww"])
        .arg(page)
        .env("GROFF_NO_SGR", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "groff cannot render {}: {}",
        page.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    // Strip the overstrike groff uses for bold and underline (`c\bc`, `_\bc`).
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut plain = String::new();
    for c in text.chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    plain
}

/// Issue 13.4: `stillpoint man` prints a page that `man -l` and groff render without
/// a warning and that lists every subcommand; `--dir` writes one page per command,
/// each with its own flags.
#[test]
fn man_pages_render_and_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let commands = subcommands();

    let man = run("stillpoint", &["man"]);
    assert!(man.status.success(), "{}", stderr(&man));
    let page = dir.path().join("stillpoint.1");
    std::fs::write(&page, &man.stdout).unwrap();
    let rendered = render_man(&page);
    for command in &commands {
        assert!(
            rendered.contains(&format!("stillpoint-{command}(1)")),
            "the man page lacks {command}:\n{rendered}"
        );
    }
    let viewed = std::process::Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(&page)
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    assert!(viewed.status.success(), "man -l: {}", stderr(&viewed));
    let viewed = String::from_utf8_lossy(&viewed.stdout).replace(['\u{8}'], "");
    assert!(viewed.contains("SUBCOMMANDS"), "{viewed}");

    let pages = dir.path().join("man1");
    let output = run("stillpoint", &["man", "--dir", pages.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(render_man(&pages.join("stillpoint.1")).contains("SUBCOMMANDS"));
    for command in &commands {
        let page = pages.join(format!("stillpoint-{command}.1"));
        assert!(
            page.exists(),
            "no page for {command} in {}",
            pages.display()
        );
        let rendered = render_man(&page);
        assert!(
            rendered.contains(&format!("stillpoint-{command}")),
            "{}:\n{rendered}",
            page.display()
        );
    }
    let pause = render_man(&pages.join("stillpoint-pause.1"));
    for flag in ["--hold-for", "--lease", "--max-pause-wait"] {
        assert!(
            pause.contains(flag),
            "stillpoint-pause(1) lacks {flag}:\n{pause}"
        );
    }
}

/// Issue 13.4: a `--lease` not longer than the default max wait (30s) no longer makes
/// `pause` refuse: it gives the nodes half the lease to drain and says so, naming both
/// values and the flag. With `--max-pause-wait` given, a wait that does not fit the
/// lease is still refused, and nothing is contacted.
#[test]
fn a_short_lease_picks_a_max_wait_that_fits_unless_one_was_given() {
    let cluster = crate::cluster::Cluster::start(1);
    let node = cluster.auditor.address.as_str();
    let output = run(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "--lease",
            "5s",
            "-a",
            node,
            "--output",
            "json",
        ],
    );
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let notes: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("--max-pause-wait"))
        .collect();
    assert_eq!(notes.len(), 1, "one line about the max wait: {text}");
    for needle in ["--lease 5s", "30s", "2500ms", "--max-pause-wait"] {
        assert!(
            notes[0].contains(needle),
            "{needle:?} not in {:?}",
            notes[0]
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["lease_ms"], 5000, "{report:#}");
    assert_eq!(report["window_valid"], true, "{report:#}");

    // A lease with room for the default max wait: nothing to say.
    let output = run(
        "stillpoint",
        &["pause", "--hold-for", "50ms", "--lease", "31s", "-a", node],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        !stderr(&output).contains("--max-pause-wait"),
        "{}",
        stderr(&output)
    );

    // Given explicitly, it is the operator's value: refused, not changed.
    let output = run(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "--lease",
            "5s",
            "--max-pause-wait",
            "30s",
            "-a",
            node,
        ],
    );
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("max pause wait (30000ms) must be shorter than the lease (5000ms)"),
        "{text}"
    );
    assert!(!text.contains("half the lease"), "{text}");
    let (_, checked) = crate::util::run_json(
        "stillpoint",
        &["check-paused", "-a", node, "--output", "json"],
    );
    assert_eq!(checked["nodes"][0]["paused"], false, "{checked:#}");
}

/// `--lease 1ms` leaves no half to give the nodes: it is refused as too short, in
/// terms of the lease the operator gave. Before, the refusal named a max wait of
/// 30000ms that nobody had given ("max pause wait (30000ms) must be shorter than the
/// lease (1ms)").
#[test]
fn a_lease_too_short_to_halve_is_refused_in_its_own_words() {
    let output = run(
        "stillpoint",
        &[
            "pause",
            "--hold-for",
            "50ms",
            "--lease",
            "1ms",
            "-a",
            "127.0.0.1:1",
        ],
    );
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("--lease 1ms is too short"), "{text}");
    assert!(!text.contains("30000ms"), "{text}");
    assert_eq!(text.matches("error:").count(), 1, "{text}");
}

/// A MariaDB server that is not there is named with the refusal said once. Before,
/// the driver's message was shown as it is, and it quotes its own I/O error:
/// "Input/output error: Input/output error: Connection refused". Nothing listens on the
/// ports used (each taken and let go), so `prepare` fails before any node is paused.
#[test]
fn a_refused_mariadb_connection_says_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let closed = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            "cluster = \"c\"\n[pause]\ntiers = [{{ addresses = [\"127.0.0.1:{}\"] }}]\n\
             [[databases]]\nname = \"aud\"\nadapter = \"mariadb\"\n\
             url = \"mysql://bob@127.0.0.1:{}/aud\"\n\
             [storage]\nurl = \"file://{}/store\"\n",
            closed(),
            closed(),
            dir.path().display()
        ),
    )
    .unwrap();
    let output = run("stillpoint", &["backup", "-c", runbook.to_str().unwrap()]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(6), "{text}");
    assert!(
        text.contains("database aud: connecting to mysql://bob@127.0.0.1:"),
        "{text}"
    );
    assert_each_cause_once("a refused MariaDB connection", &text);
    assert!(
        !text.contains("Input/output error: Input/output error"),
        "{text}"
    );
}

/// A port that takes connections and then misbehaves: closes each at once, or answers
/// HTTP/1.1 instead of gRPC. Stops with the test.
struct BadPort {
    address: String,
    _thread: std::thread::JoinHandle<()>,
}

impl BadPort {
    fn start(answer: &'static [u8]) -> BadPort {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                use std::io::Write as _;
                let _ = stream.write_all(answer);
                // Dropped: closed.
            }
        });
        BadPort {
            address,
            _thread: thread,
        }
    }
}

/// Every line of `text` says each cause once: no part of an error chain ("a: b: c")
/// comes twice, no transport phrase comes twice (in any spelling), and no Rust
/// `Debug` output of an error type stands in for a message.
fn assert_each_cause_once(what: &str, text: &str) {
    for line in text.lines() {
        let parts: Vec<String> = line
            .split(": ")
            .flat_map(|part| part.split(['(', ')', ';', ',']))
            .map(|part| part.trim().trim_matches('"').to_ascii_lowercase())
            .filter(|part| part.len() >= 8)
            .collect();
        for (index, part) in parts.iter().enumerate() {
            assert!(
                !parts[index + 1..].contains(part),
                "{what}: {part:?} is said twice in {line:?}"
            );
        }
        let lower = line.to_ascii_lowercase();
        for phrase in [
            "transport error",
            "tcp connect error",
            "connection refused",
            "operation was cancel",
            "connection closed",
            "dns error",
            "broken pipe",
        ] {
            assert!(
                lower.matches(phrase).count() <= 1,
                "{what}: {phrase:?} is said twice in {line:?}"
            );
        }
        // An address, then an error that begins with it again.
        for word in line.split_whitespace() {
            let address = word.trim_start_matches('(').trim_end_matches(':');
            if address.contains(':') && address.len() > 3 {
                assert!(
                    !line.contains(&format!("{address}: {address}")),
                    "{what}: {address} is said twice in {line:?}"
                );
            }
        }
        for debug in ["::Error(", "code: '", "Custom {", "kind: "] {
            assert!(
                !line.contains(debug),
                "{what}: Debug output ({debug:?}) in {line:?}"
            );
        }
    }
}

/// Issue 13.4: the messages of common transport failures say each cause once, in the
/// pause report and the error line, for `stillpoint` and `scalar-admin` alike: a
/// closed port, a port that closes every connection, one that answers HTTP/1.1, a
/// host name that does not resolve, and TLS to a plaintext node.
#[test]
fn transport_failures_name_each_cause_once() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let closes = BadPort::start(b"");
    let http1 = BadPort::start(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    let cluster = crate::cluster::Cluster::start(1);
    let plaintext = cluster.auditor.address.clone();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("a closed port", vec![closed.as_str()], "Connection refused"),
        ("a port that closes", vec![closes.address.as_str()], ""),
        ("a port speaking HTTP/1.1", vec![http1.address.as_str()], ""),
        (
            "a name that does not resolve",
            vec!["no-such-node.invalid:50051"],
            "",
        ),
        (
            "TLS to a plaintext node",
            vec![plaintext.as_str(), "--tls"],
            "plaintext",
        ),
    ];
    for (what, target, needle) in &cases {
        let mut commands: Vec<(&str, Vec<&str>)> = vec![
            (
                "stillpoint",
                vec![
                    "pause",
                    "--hold-for",
                    "10ms",
                    "--connect-timeout",
                    "2s",
                    "-a",
                ],
            ),
            (
                "stillpoint",
                vec!["check-paused", "--connect-timeout", "2s", "-a"],
            ),
            (
                "scalar-admin",
                vec!["-c", "PAUSE", "--connect-timeout", "2s", "-a"],
            ),
        ];
        for (program, args) in &mut commands {
            args.extend(target);
            let output = run(program, args);
            let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), stderr(&output));
            assert_ne!(output.status.code(), Some(0), "{what}: {stderr}");
            assert!(
                stderr.contains(needle) || stdout.contains(needle),
                "{what}: {needle:?} in neither {stdout} nor {stderr}"
            );
            let shown = format!("{program} {}", args.join(" "));
            println!("{shown}\n{stdout}{stderr}");
            assert_each_cause_once(&shown, &stdout);
            assert_each_cause_once(&shown, &stderr);
        }
    }
}

/// Runs `program args…` in a pseudo-terminal (`script` from util-linux), so that its
/// stderr is a terminal; returns what the terminal showed (stdout and stderr).
fn run_in_terminal(program: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut command = format!("'{}'", crate::util::bin(program).display());
    for arg in args {
        assert!(!arg.contains('\''), "{arg}");
        command.push_str(&format!(" '{arg}'"));
    }
    let output = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The progress bar lines the terminal showed for `database`: indicatif redraws a bar
/// in place (`\r`, erase line), each time with the bytes so far and the rate.
fn bar_lines<'a>(shown: &'a str, database: &str) -> Vec<&'a str> {
    shown
        .split(['\r', '\n'])
        .filter(|line| line.contains(database) && line.contains("B/s)"))
        .collect()
}

/// What a terminal's progress bar leaves in a stream: carriage returns, escape
/// sequences, rates.
fn assert_no_bar_noise(what: &str, stderr: &str) {
    for noise in ["\r", "\u{1b}[", "B/s)"] {
        assert!(
            !stderr.contains(noise),
            "{what}: progress bar noise {noise:?} in stderr without a terminal:\n{stderr:?}"
        );
    }
}

/// Issue 13.4: `restore` and `drill` show a progress bar per database on a terminal,
/// as `backup` does, and print none when stderr is not one.
#[test]
fn restore_and_drill_show_progress_on_a_terminal_only() {
    let cluster = crate::cluster::Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let path = |url: &str| url.strip_prefix("sqlite:").unwrap().to_owned();
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"cluster = "progress"
[pause]
tiers = [{{ addresses = ["{ledger}"] }}, {{ addresses = ["{auditor}"] }}]
[[databases]]
name = "ledger"
adapter = "sqlite"
path = "{ledger_db}"
[[databases]]
name = "auditor"
adapter = "sqlite"
path = "{auditor_db}"
[pipeline]
zstd_level = 3
[storage]
url = "file://{storage}"
"#,
            ledger = cluster.ledgers[0].address,
            auditor = cluster.auditor.address,
            ledger_db = path(&cluster.ledger_db),
            auditor_db = path(&cluster.auditor_db),
            storage = dir.path().join("backups").display(),
        ),
    )
    .unwrap();
    let runbook = runbook.to_str().unwrap();
    let (code, backup) =
        crate::util::run_json("stillpoint", &["backup", "-c", runbook, "--output", "json"]);
    assert_eq!(code, 0, "{backup:#}");

    // restore, on a terminal: a bar for the database, ending at the whole copy.
    let target = dir.path().join("restored-on-a-terminal.sqlite");
    let (code, shown) = run_in_terminal(
        "stillpoint",
        &[
            "restore",
            "latest",
            "-c",
            runbook,
            "--database",
            "ledger",
            "--to",
            target.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{shown}");
    let bars = bar_lines(&shown, "ledger");
    assert!(
        !bars.is_empty(),
        "no progress bar on the terminal:\n{shown:?}"
    );
    assert!(shown.contains("restored ledger"), "{shown:?}");

    // restore, without a terminal: the report and no bar.
    let target = dir.path().join("restored-in-a-pipe.sqlite");
    let output = run(
        "stillpoint",
        &[
            "restore",
            "latest",
            "-c",
            runbook,
            "--database",
            "ledger",
            "--to",
            target.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("restored ledger"));
    assert_no_bar_noise("restore", &stderr(&output));

    // drill, on a terminal: a bar per database, restored in parallel.
    let (code, shown) = run_in_terminal("stillpoint", &["drill", "latest", "-c", runbook]);
    assert_eq!(code, Some(0), "{shown}");
    for database in ["ledger", "auditor"] {
        assert!(
            !bar_lines(&shown, database).is_empty(),
            "no progress bar for {database} on the terminal:\n{shown:?}"
        );
    }
    assert!(shown.contains("PASSED"), "{shown:?}");

    // drill, without a terminal.
    let output = run("stillpoint", &["drill", "latest", "-c", runbook]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("PASSED"));
    assert_no_bar_noise("drill", &stderr(&output));
}
