//! Exec adapter tests: real `sh` commands for the cut, copy and restore, including a
//! cut that hangs (killed with its children) and a copy that fails.

use std::time::{Duration, Instant};

use super::*;
use crate::adapters::testing::read_to_end;

fn exec(cut: &str, copy: Option<&str>, restore: Option<&str>) -> std::sync::Arc<dyn Adapter> {
    std::sync::Arc::new(Exec::new(
        "ledger-files",
        ExecConfig {
            cut: cut.to_owned(),
            cut_timeout: Duration::from_secs(10),
            copy: copy.map(str::to_owned),
            restore: restore.map(str::to_owned),
            env: Default::default(),
            pass_env: Vec::new(),
        },
    ))
}

#[tokio::test]
async fn cut_sees_backup_id_and_database_and_its_stdout_is_the_marker() {
    let adapter = exec(
        "echo \"  id=$STILLPOINT_BACKUP_ID db=$STILLPOINT_DATABASE  \"",
        None,
        None,
    );
    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-42").await.unwrap();
    assert_eq!(marker.kind, "exec");
    assert_eq!(marker.details["output"], "id=b-42 db=ledger-files");
    assert!(!marker.details.contains_key("output_truncated_at_bytes"));
}

#[tokio::test]
async fn failing_cut_reports_status_and_stderr() {
    let adapter = exec("echo 'replica is not in sync' >&2; exit 3", None, None);
    let mut prepared = adapter.prepare().await.unwrap();
    let err = prepared.cut("b-1").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Cut { .. }), "{msg}");
    assert!(msg.contains("database ledger-files"), "{msg}");
    assert!(msg.contains("status 3"), "{msg}");
    assert!(msg.contains("replica is not in sync"), "{msg}");
}

#[tokio::test]
async fn hanging_cut_is_killed_with_its_children_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    // `sleep` runs as a grandchild of our process: killing only `sh` would leave it.
    let adapter = Exec::new(
        "ledger-files",
        ExecConfig {
            cut: format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
            cut_timeout: Duration::from_millis(500),
            copy: None,
            restore: None,
            env: Default::default(),
            pass_env: Vec::new(),
        },
    );
    let mut prepared = adapter.prepare().await.unwrap();
    let started = Instant::now();
    let err = prepared.cut("b-1").await.unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Cut { .. }), "{msg}");
    assert!(msg.contains("timed out after 500ms"), "{msg}");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // The grandchild existed (so the check below can fail) and is now gone.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match process_state(pid) {
            None | Some('Z') => break,
            Some(state) => assert!(
                Instant::now() < deadline,
                "grandchild {pid} still alive (state {state}) after the cut timed out"
            ),
        }
        tokio::task::yield_now().await;
    }
}

/// The state letter from /proc/<pid>/stat, or None if there is no such process.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; the state follows.
    stat.rsplit_once(") ")?.1.chars().next()
}

#[tokio::test]
async fn chatty_cut_keeps_a_bounded_marker_and_does_not_block() {
    // 1 MiB of output: far more than a pipe holds, so this only finishes if we keep
    // reading past the marker's limit.
    let adapter = exec("head -c 1048576 /dev/zero | tr '\\0' x", None, None);
    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-1").await.unwrap();
    assert_eq!(marker.details["output"].len(), OUTPUT_LIMIT);
    assert_eq!(
        marker.details["output_truncated_at_bytes"],
        OUTPUT_LIMIT.to_string()
    );
}

#[tokio::test]
async fn copy_streams_stdout_and_restore_feeds_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("restored");
    let adapter = exec(
        "true",
        Some(
            "printf 'backup %s of %s\\n' \"$STILLPOINT_BACKUP_ID\" \"$STILLPOINT_DATABASE\"; seq 1 100000",
        ),
        Some("cat > \"$STILLPOINT_RESTORE_TARGET\""),
    );
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-7").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    let summary = copy.finished.await.unwrap();
    assert_eq!(summary.row_counts, None);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(text.starts_with("backup b-7 of ledger-files\n1\n2\n"));
    assert!(text.ends_with("\n100000\n"));

    adapter
        .restore(
            Box::pin(std::io::Cursor::new(bytes.clone())),
            target.to_str().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), bytes);
}

#[tokio::test]
async fn failing_copy_fails_finished_naming_the_database() {
    let adapter = exec(
        "true",
        Some("echo partial; echo 'disk snapshot vanished' >&2; exit 1"),
        None,
    );
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    assert_eq!(read_to_end(&mut copy).await, b"partial\n");
    let err = copy.finished.await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Copy { .. }), "{msg}");
    assert!(msg.contains("database ledger-files"), "{msg}");
    assert!(msg.contains("status 1"), "{msg}");
    assert!(msg.contains("disk snapshot vanished"), "{msg}");
}

#[tokio::test]
async fn without_a_copy_command_the_copy_is_empty() {
    let adapter = exec("true", None, None);
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    assert!(read_to_end(&mut copy).await.is_empty());
    assert_eq!(copy.finished.await.unwrap(), CopySummary::default());
}

#[tokio::test]
async fn copy_before_cut_is_refused() {
    let adapter = exec("true", Some("echo hi"), None);
    let prepared = adapter.prepare().await.unwrap();
    let err = prepared.copy().await.err().unwrap().to_string();
    assert!(err.contains("before a successful cut"), "{err}");
}

#[tokio::test]
async fn restore_needs_a_command_and_reports_its_failure() {
    let none = exec("true", None, None);
    let err = none
        .restore(Box::pin(tokio::io::empty()), "/nowhere")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no restore command"), "{err}");

    // A command that quits without reading: the large input must not hang us, and the
    // error is the command's, not a broken pipe.
    let failing = exec(
        "true",
        None,
        Some("echo \"cannot reach $STILLPOINT_RESTORE_TARGET\" >&2; exit 4"),
    );
    let input = vec![7u8; 4 * 1024 * 1024];
    let err = failing
        .restore(Box::pin(std::io::Cursor::new(input)), "scratch-1")
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Restore { .. }), "{msg}");
    assert!(msg.contains("status 4"), "{msg}");
    assert!(msg.contains("cannot reach scratch-1"), "{msg}");

    // Exit 0 without reading everything is not a successful restore either.
    let lazy = exec("true", None, Some("head -c 10 > /dev/null"));
    let err = lazy
        .restore(
            Box::pin(std::io::Cursor::new(vec![0u8; 4 * 1024 * 1024])),
            "scratch-2",
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("stopped reading its input early"), "{err}");
}

/// Issue 19 defect 12: a cut that starts a background helper, which inherits and keeps
/// the cut's stdout and stderr open, is done when the cut command itself exits (with
/// everything it printed), not when the helper lets go of the pipes.
#[tokio::test]
async fn a_cut_whose_helper_keeps_its_output_open_finishes_when_the_command_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("helper.pid");
    let adapter = Exec::new(
        "ledger-files",
        ExecConfig {
            cut: format!(
                "echo position=42; echo noted >&2; sleep 60 & echo $! > {}",
                pidfile.display()
            ),
            cut_timeout: Duration::from_secs(5),
            copy: None,
            restore: None,
            env: Default::default(),
            pass_env: Vec::new(),
        },
    );
    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-1").await;
    // The helper is deliberately left running by the cut; the test stops it.
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
    let marker = marker.unwrap();
    assert_eq!(marker.details["output"], "position=42");
}

/// Issue 19 defect 11: hooks do not inherit stillpoint's environment (in production it
/// holds AWS keys, PGPASSWORD and the admin token; here cargo's CARGO_* variables are
/// the canary), only a documented minimal one, what stillpoint sets, and what the
/// runbook passes.
#[tokio::test]
async fn hooks_do_not_inherit_the_environment() {
    assert!(
        std::env::var_os("CARGO_MANIFEST_DIR").is_some()
            && std::env::var_os("CARGO_PKG_NAME").is_some(),
        "the canary variables must be set for this test to mean anything"
    );
    let adapter = std::sync::Arc::new(Exec::new(
        "ledger-files",
        ExecConfig {
            cut: "env".to_owned(),
            cut_timeout: Duration::from_secs(10),
            copy: Some("env".to_owned()),
            restore: None,
            env: [("GREETING".to_owned(), "hello there".to_owned())].into(),
            pass_env: vec!["CARGO_PKG_NAME".to_owned()],
        },
    ));
    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-1").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let copied = String::from_utf8(read_to_end(&mut copy).await).unwrap();
    copy.finished.await.unwrap();
    for (hook, output) in [
        ("cut", marker.details["output"].as_str()),
        ("copy", &copied),
    ] {
        assert!(
            !output.contains("CARGO_MANIFEST_DIR"),
            "the {hook} command inherited the environment:\n{output}"
        );
        for expected in [
            "STILLPOINT_BACKUP_ID=b-1",
            "STILLPOINT_DATABASE=ledger-files",
            "GREETING=hello there",
            "CARGO_PKG_NAME=stillpoint",
        ] {
            assert!(
                output.lines().any(|line| line == expected),
                "{hook} lacks {expected}:\n{output}"
            );
        }
        assert!(output.contains("PATH="), "{hook}:\n{output}");
        // Nothing but the documented names (and what sh adds itself).
        for line in output.lines() {
            let name = line.split('=').next().unwrap();
            assert!(
                MINIMAL_ENVIRONMENT.contains(&name)
                    || name.starts_with("LC_")
                    || name.starts_with("STILLPOINT_")
                    || ["GREETING", "CARGO_PKG_NAME", "PWD", "SHLVL", "_", "OLDPWD"]
                        .contains(&name),
                "{hook} got {name}:\n{output}"
            );
        }
    }
}

/// The same rule on stillpoint's environment as production has it: secrets stay out
/// unless the runbook passes them by name; the runbook's values win.
#[test]
fn the_hook_environment_keeps_secrets_out_unless_passed_by_name() {
    let parent = [
        ("PATH", "/usr/bin"),
        ("HOME", "/root"),
        ("LC_ALL", "C.UTF-8"),
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "hunter2"),
        ("PGPASSWORD", "hunter3"),
        ("STILLPOINT_ADMIN_TOKEN", "hunter4"),
        ("AWS_PROFILE", "backup"),
    ]
    .map(|(name, value)| (OsString::from(name), OsString::from(value)));
    let config = ExecConfig {
        cut: "true".to_owned(),
        cut_timeout: Duration::from_secs(1),
        copy: None,
        restore: None,
        env: [("HOME".to_owned(), "/var/lib/hooks".to_owned())].into(),
        pass_env: vec!["AWS_PROFILE".to_owned()],
    };
    let env = hook_environment(parent, &config);
    let names: Vec<String> = env
        .keys()
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["AWS_PROFILE", "HOME", "LC_ALL", "PATH"]);
    assert_eq!(env[&OsString::from("HOME")], "/var/lib/hooks");
}

#[test]
fn the_runbook_passes_variables_by_name_and_by_value() {
    let config: crate::adapters::AdapterConfig = toml::from_str(
        r#"adapter = "exec"
cut = "true"
pass_env = ["AWS_PROFILE"]
env = { REGION = "eu-west-1" }"#,
    )
    .unwrap();
    let crate::adapters::AdapterConfig::Exec(exec) = config else {
        panic!("not an exec config: {config:?}");
    };
    assert_eq!(exec.pass_env, ["AWS_PROFILE"]);
    assert_eq!(exec.env["REGION"], "eu-west-1");
}

/// A copy or restore command that starts a background helper, which inherits and
/// keeps the command's stderr open (stdout/stdin are its own), is done when the
/// command exits: waiting for stderr to close used to hang the backup or the drill for
/// as long as the helper ran.
#[tokio::test]
async fn copy_and_restore_whose_helper_keeps_stderr_open_finish_when_the_command_exits() {
    let dir = tempfile::tempdir().unwrap();
    let copy_pid = dir.path().join("copy-helper.pid");
    let restore_pid = dir.path().join("restore-helper.pid");
    let adapter = exec(
        "true",
        Some(&format!(
            "printf data; echo copied >&2; sleep 60 >/dev/null </dev/null & echo $! > {}",
            copy_pid.display()
        )),
        Some(&format!(
            "cat >/dev/null; sleep 60 >/dev/null </dev/null & echo $! > {}",
            restore_pid.display()
        )),
    );
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let copied = tokio::time::timeout(Duration::from_secs(10), async move {
        let data = read_to_end(&mut copy).await;
        copy.finished.await.map(|_| data)
    })
    .await;
    let restored = tokio::time::timeout(
        Duration::from_secs(10),
        adapter.restore(Box::pin(std::io::Cursor::new(b"data".to_vec())), "t"),
    )
    .await;
    // The helpers are deliberately left running by the hooks; the test stops them.
    for pidfile in [&copy_pid, &restore_pid] {
        if let Ok(pid) = std::fs::read_to_string(pidfile) {
            let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        }
    }
    let copied = copied.expect("the copy waited for its helper's stderr");
    assert_eq!(copied.unwrap(), b"data");
    restored
        .expect("the restore waited for its helper's stderr")
        .unwrap();
}

/// A copy command that exits while a helper it started in the background still holds
/// its stdout: the end of the copy cannot be told (the helper may write more, or
/// never close it), so the copy fails soon after the command exits, naming the cause.
/// It used to hang the backup for as long as the helper ran.
#[tokio::test]
async fn a_copy_whose_helper_keeps_its_stdout_open_fails_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("helper.pid");
    let adapter = exec(
        "true",
        Some(&format!(
            "printf data; sleep 60 & echo $! > {}",
            pidfile.display()
        )),
        None,
    );
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(30), async move {
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut copy.stream, &mut bytes)
            .await
            .map(|_| bytes)
    })
    .await;
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
    let error = read
        .expect("the copy waited for its helper's stdout")
        .expect_err("a copy whose end cannot be told must fail")
        .to_string();
    assert!(error.contains("background"), "{error}");
    assert!(error.contains("stdout"), "{error}");
}
