//! Database passwords with the characters URLs give meaning to (`/`, `?`, `@`, `#`,
//! `%`): they never appear in what stillpoint prints, in manifests, or on the command
//! line of the tools it runs (read from `/proc/PID/cmdline` of each child), on the
//! success paths and on every error path an operator can reach: a URL with the
//! password left raw, a wrong password, a target that is not empty, and `key=value`
//! strings that do or do not parse.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::pitr::Source;
use crate::util::{run, stderr};

/// Every piece of the password is one of these words, so any fragment that leaks,
/// however it was cut, contains one of them.
const PASSWORD: &str = "KIWI/MANGO?PAPAYA@GUAVA#LYCHEE%41";
const WORDS: [&str; 5] = ["KIWI", "MANGO", "PAPAYA", "GUAVA", "LYCHEE"];

/// `s` with everything but letters and digits percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A bin directory where pg_dump, pg_restore and pg_basebackup are wrappers that append
/// their own `/proc/PID/cmdline` (and whether PGPASSWORD was set) to `log`, then run
/// the real tool; every other tool is a symlink to the real one.
fn recording_bin_dir(real: &Path, dir: &Path, log: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for entry in std::fs::read_dir(real).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let target = bin.join(&name);
        if ["pg_dump", "pg_restore", "pg_basebackup"].contains(&name.as_str()) {
            std::fs::write(
                &target,
                format!(
                    "#!/bin/sh\n{{ printf '%s: ' {name}; tr '\\0' ' ' < /proc/$$/cmdline; \
                     echo \" PGPASSWORD=${{PGPASSWORD:+set}}\"; }} >> '{log}'\n\
                     exec '{real}' \"$@\"\n",
                    log = log.display(),
                    real = entry.path().display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        } else {
            std::os::unix::fs::symlink(entry.path(), &target).unwrap();
        }
    }
    bin
}

/// Panics if any password word is in `text`.
fn assert_no_password(what: &str, text: &str) {
    for word in WORDS {
        assert!(
            !text.contains(word),
            "{what} shows part of the password ({word}):\n{text}"
        );
    }
}

fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(output)
    )
}

/// The reproduction: a raw `/` in the URL's password. tokio-postgres reads the
/// password to the `@`, so the backup connected, and the URL went to pg_dump's command
/// line password and all. The recorded command lines never hold the password; with
/// the password percent-encoded the backup works and pg_dump gets it in PGPASSWORD.
#[test]
fn child_command_lines_never_carry_the_password() {
    let source = Source::start();
    source.postgres.add_password_role("app_user", "KIWI/MANGO");
    source.insert(10);
    let log = source.dir.path().join("commands.log");
    let bin = recording_bin_dir(source.postgres.bin_dir(), source.dir.path(), &log);
    let port = source.postgres.port();

    source.write_runbook_with(
        &format!("postgres://app_user:KIWI/MANGO@127.0.0.1:{port}/app"),
        &bin,
    );
    let raw = run(
        "stillpoint",
        &["backup", "--config", source.config(), "--output", "json"],
    );
    assert_no_password("backup with a raw password", &all_output(&raw));
    let commands = std::fs::read_to_string(&log).unwrap_or_default();
    assert_no_password("a child's /proc/PID/cmdline", &commands);

    source.write_runbook_with(
        &format!(
            "postgres://app_user:{}@127.0.0.1:{port}/app",
            encode("KIWI/MANGO")
        ),
        &bin,
    );
    let encoded = run(
        "stillpoint",
        &["backup", "--config", source.config(), "--output", "json"],
    );
    assert!(encoded.status.success(), "{}", stderr(&encoded));
    assert_no_password("backup", &all_output(&encoded));
    let commands = std::fs::read_to_string(&log).unwrap();
    assert_no_password("a child's /proc/PID/cmdline", &commands);
    // The wrapper saw pg_dump's real command line, and the password went by PGPASSWORD.
    assert!(
        commands.lines().any(|line| line.starts_with("pg_dump: ")
            && line.contains("--snapshot=")
            && line.ends_with("PGPASSWORD=set")),
        "{commands}"
    );
}

/// Every command an operator runs with the password in a URL (encoded, raw, wrong) or
/// in a `key=value` string (that parses, or not): the password shows nowhere.
#[test]
fn passwords_with_url_characters_show_on_no_path() {
    let source = Source::start();
    source.postgres.add_password_role("app_user", PASSWORD);
    source.insert(10);
    let log = source.dir.path().join("commands.log");
    let bin = recording_bin_dir(source.postgres.bin_dir(), source.dir.path(), &log);
    let port = source.postgres.port();
    let url =
        |password: &str, db: &str| format!("postgres://app_user:{password}@127.0.0.1:{port}/{db}");
    let good = url(&encode(PASSWORD), "app");
    let mut stillpoint = |what: &str, args: &[&str]| {
        let output = run("stillpoint", args);
        assert_no_password(what, &all_output(&output));
        output
    };

    // Success paths: base backup, backup, restore into an empty database.
    source.write_runbook_with(&good, &bin);
    let base = source.dir.path().join("base");
    let output = stillpoint(
        "base-backup",
        &[
            "base-backup",
            "--config",
            source.config(),
            "--database",
            "app",
            "--to",
            base.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let output = stillpoint(
        "backup",
        &["backup", "--config", source.config(), "--output", "json"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let backup_id = report["backup_id"].as_str().unwrap().to_owned();
    source.postgres.create_database("copy");
    let restore = |what: &str, to: &str, stillpoint: &mut dyn FnMut(&str, &[&str]) -> Output| {
        stillpoint(
            what,
            &[
                "restore",
                &backup_id,
                "--config",
                source.config(),
                "--database",
                "app",
                "--to",
                to,
            ],
        )
    };
    let output = restore("restore", &url(&encode(PASSWORD), "copy"), &mut stillpoint);
    assert!(output.status.success(), "{}", stderr(&output));

    // Error paths of restore: a non-empty target, a wrong password, a raw password,
    // key=value strings with the password, parsing or not.
    let output = restore(
        "restore into a non-empty database",
        &url(&encode(PASSWORD), "app"),
        &mut stillpoint,
    );
    assert!(!output.status.success());
    let wrong = url(&encode("KIWI/PAPAYA"), "copy");
    let output = restore("restore with a wrong password", &wrong, &mut stillpoint);
    assert!(!output.status.success());
    let output = restore(
        "restore with a raw password",
        &url(PASSWORD, "copy"),
        &mut stillpoint,
    );
    assert!(!output.status.success());
    let key_value = format!(
        "host=127.0.0.1 port={port} user=app_user dbname=app password='{}'",
        PASSWORD.replace('\\', "\\\\").replace('\'', "\\'")
    );
    let output = restore("restore to a key=value string", &key_value, &mut stillpoint);
    assert!(!output.status.success());
    let unterminated = format!("host=127.0.0.1 port={port} password='{PASSWORD}");
    let output = restore(
        "restore to a key=value string that does not parse",
        &unterminated,
        &mut stillpoint,
    );
    assert!(!output.status.success());

    // Error paths of the runbook's URL: raw and wrong passwords in backup, base-backup
    // and pitr.
    for (what, runbook_url) in [("raw", url(PASSWORD, "app")), ("wrong", wrong.clone())] {
        source.write_runbook_with(&runbook_url, &bin);
        let output = stillpoint(
            &format!("backup with a {what} password"),
            &["backup", "--config", source.config(), "--output", "json"],
        );
        assert!(!output.status.success());
        let other = source.dir.path().join(format!("base-{what}"));
        let output = stillpoint(
            &format!("base-backup with a {what} password"),
            &[
                "base-backup",
                "--config",
                source.config(),
                "--database",
                "app",
                "--to",
                other.to_str().unwrap(),
            ],
        );
        assert!(!output.status.success());
        stillpoint(
            &format!("pitr with a {what} password"),
            &[
                "pitr",
                &backup_id,
                "--config",
                source.config(),
                "--database",
                "app",
                "--base-backup",
                base.to_str().unwrap(),
                "--wal-archive",
                source.archive().to_str().unwrap(),
                "--target",
                "lsn",
                "--timeout",
                "60s",
            ],
        );
    }

    // Nothing stored and no child's command line holds it either.
    let backups = source.dir.path().join("backups");
    for entry in walk(&backups) {
        if entry.extension().is_some_and(|ext| ext == "json") {
            assert_no_password(
                &entry.display().to_string(),
                &std::fs::read_to_string(&entry).unwrap(),
            );
        }
    }
    let commands = std::fs::read_to_string(&log).unwrap();
    assert_no_password("a child's /proc/PID/cmdline", &commands);
    for tool in ["pg_basebackup", "pg_dump", "pg_restore"] {
        assert!(
            commands
                .lines()
                .any(|line| line.starts_with(&format!("{tool}: "))
                    && line.ends_with("PGPASSWORD=set")),
            "{tool} never ran with PGPASSWORD: {commands}"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
