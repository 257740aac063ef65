//! Backups of real clusters: a PostgreSQL ledger and a MariaDB auditor under load,
//! restored with the standard tools; failures that must leave nothing listed; and the
//! catalog commands (list, show, verify, prune).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use stillpoint_testkit::{MariaDb, Postgres};

use crate::cluster::{Cluster, Load};
use crate::util::{Database, Runbook, run, run_json, run_json_with_env, stderr, wait_until};

/// The runbook most of these tests start from: `cluster` in its two tiers, with room
/// for a loaded machine. Each test adds its databases, pipeline and storage.
fn cluster_runbook(cluster: &Cluster) -> Runbook {
    Runbook::for_cluster("test", cluster).timeouts()
}

/// `cluster`'s own SQLite databases, stored in `dir/backups`.
fn sqlite_runbook(cluster: &Cluster, dir: &Path) -> Runbook {
    cluster_runbook(cluster)
        .cluster_sqlite(cluster)
        .file_storage(dir)
}

/// A runbook whose pause names a node nobody listens on: for `--no-pause` copies and
/// for the catalog commands, which never contact the cluster.
fn standalone_runbook() -> Runbook {
    Runbook::standalone("test").timeouts()
}

fn shell(script: &str) -> std::process::Output {
    let output = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn nobody_paused(cluster: &Cluster) -> bool {
    let nodes = format!("{},{}", cluster.ledger_tier(), cluster.auditor.address);
    let (_, report) = run_json(
        "stillpoint",
        &["check-paused", "-a", &nodes, "--output", "json"],
    );
    report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|node| node["paused"] == false)
}

/// The main scenario: ledger on PostgreSQL, auditor on MariaDB, under load;
/// one backup; the artifacts decrypt and decompress with `age` and `zstd`, restore with
/// `pg_restore` and `mariadb`, and the restored pair passes `ledger-node check`.
#[test]
fn postgres_ledger_and_mariadb_auditor_back_up_consistently_under_load() {
    let postgres = Postgres::start();
    postgres.create_database("ledger");
    let mariadb = MariaDb::start();
    mariadb.create_database("auditor");
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_on(
        3,
        postgres.url("ledger"),
        mariadb.url("auditor"),
        &[],
        tempfile::tempdir().unwrap(),
    );
    let load = Load::start(&cluster.ledger_tier(), 8, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || cluster.transactions() >= 50,
    );

    let key = dir.path().join("age-key.txt");
    let keygen = shell(&format!("age-keygen -o {} 2>&1", key.display()));
    let recipient = String::from_utf8_lossy(&keygen.stdout)
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned();
    let runbook = cluster_runbook(&cluster)
        .database(Database::postgres("ledger", &postgres.url("ledger")).role("ledger"))
        .database(Database::mariadb("auditor", &mariadb.url("auditor")).role("auditor"))
        .zstd_level(3)
        .age_recipient(&recipient)
        .age_identity_file(&key)
        .file_storage(dir.path())
        .write_in(dir.path());
    let (code, report) = run_json(
        "stillpoint",
        &[
            "backup",
            "--config",
            runbook.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    let committed_before_stop = cluster.transactions();
    wait_until(
        Duration::from_secs(30),
        "the load to go on after the backup",
        || cluster.transactions() > committed_before_stop + 20,
    );
    let load = load.stop();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(load["failed"], 0, "{load:#}");
    let manifest = &report["manifest"];
    assert_eq!(manifest["window"]["window_valid"], true);
    assert!(
        manifest["databases"][0]["cut"]["details"]["lsn"].is_string(),
        "{manifest:#}"
    );
    assert!(manifest["databases"][1]["cut"]["details"]["gtid_binlog_pos"].is_string());

    // Restore with the standard tools, as an operator without stillpoint could.
    let storage = dir.path().join("backups");
    let artifact = |index: usize| {
        storage.join(
            manifest["databases"][index]["artifact"]["path"]
                .as_str()
                .unwrap(),
        )
    };
    let ledger_dump = dir.path().join("ledger.pgdump");
    shell(&format!(
        "age -d -i {} {} | zstd -d -q -o {}",
        key.display(),
        artifact(0).display(),
        ledger_dump.display()
    ));
    let listing = shell(&format!(
        "{}/pg_restore --list {}",
        postgres.bin_dir().display(),
        ledger_dump.display()
    ));
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains("TABLE"),
        "pg_restore --list shows no table"
    );
    postgres.create_database("restored_ledger");
    shell(&format!(
        "{}/pg_restore --no-owner --exit-on-error -d {} {}",
        postgres.bin_dir().display(),
        postgres.url("restored_ledger"),
        ledger_dump.display()
    ));
    mariadb.create_database("restored_auditor");
    shell(&format!(
        "age -d -i {} {} | zstd -d -q | {}/mariadb -h 127.0.0.1 -P {} -u root restored_auditor",
        key.display(),
        artifact(1).display(),
        mariadb.bin_dir().display(),
        mariadb.port()
    ));

    let (code, check) = run_json(
        "ledger-node",
        &[
            "check",
            "--ledger-db",
            &postgres.url("restored_ledger"),
            "--auditor-db",
            &mariadb.url("restored_auditor"),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "restored copies are inconsistent: {check:#}");
    let restored = check["transactions"].as_u64().unwrap();
    assert!(restored >= 50, "the backup holds {restored} transactions");
    assert!(
        restored < cluster.transactions(),
        "the backup cannot hold transfers made after it"
    );
}

/// A cut that fails on one database: the cluster is released, the command fails, and
/// nothing is listed.
#[test]
fn a_failed_cut_releases_the_cluster_and_lists_nothing() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let runbook = cluster_runbook(&cluster)
        .cluster_sqlite(&cluster)
        .database(Database::exec(
            "broken",
            "echo no snapshot today >&2; exit 3",
        ))
        .file_storage(dir.path())
        .write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let output = run(
        "stillpoint",
        &["backup", "--config", config, "--output", "json"],
    );
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("broken"),
        "the failing database is named: {}",
        stderr(&output)
    );
    assert!(nobody_paused(&cluster));
    let (code, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    assert_eq!(code, 0);
    assert_eq!(listed["backups"].as_array().unwrap().len(), 0, "{listed:#}");
    let (_, orphans) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    assert_eq!(
        orphans["incomplete"].as_array().map_or(0, Vec::len),
        0,
        "artifacts were left behind"
    );
}

/// Backups of a live SQLite cluster; list, show, verify (and a flipped byte), prune.
#[test]
fn catalog_commands_list_show_verify_and_prune() {
    let cluster = Cluster::start(2);
    let load = Load::start(&cluster.ledger_tier(), 4, &[]);
    let dir = tempfile::tempdir().unwrap();
    let runbook = sqlite_runbook(&cluster, dir.path())
        .zstd_level(3)
        .write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (code, report) = run_json(
            "stillpoint",
            &["backup", "--config", config, "--output", "json"],
        );
        assert_eq!(code, 0, "{report:#}");
        ids.push(report["backup_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(load.stop()["failed"], 0);

    let (code, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    assert_eq!(code, 0);
    let listed_ids: Vec<&str> = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backup_id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed_ids, newest_first);
    let table = run("stillpoint", &["list", "--config", config]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&ids[0]));

    let (code, shown) = run_json(
        "stillpoint",
        &["show", &ids[1], "--config", config, "--output", "json"],
    );
    assert_eq!(code, 0);
    assert_eq!(shown["backup_id"], ids[1].as_str());

    let (code, verified) = run_json(
        "stillpoint",
        &["verify", "latest", "--config", config, "--output", "json"],
    );
    assert_eq!(code, 0, "{verified:#}");
    assert_eq!(verified["ok"], true);

    // Flip one byte of the newest ledger artifact: verify must fail and name it.
    let artifact = shown["databases"][0]["artifact"]["path"]
        .as_str()
        .unwrap()
        .replace(&ids[1], &ids[2]);
    let file = dir.path().join("backups").join(&artifact);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let output = run(
        "stillpoint",
        &["verify", "latest", "--config", config, "--output", "json"],
    );
    assert_eq!(output.status.code(), Some(6));
    let verified: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verified["ok"], false);
    assert!(verified.to_string().contains(&artifact), "{verified:#}");

    let (code, plan) = run_json(
        "stillpoint",
        &[
            "prune",
            "--config",
            config,
            "--keep-last",
            "1",
            "--dry-run",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{plan:#}");
    assert_eq!(plan["delete"].as_array().unwrap().len(), 2);
    let (_, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    assert_eq!(
        listed["backups"].as_array().unwrap().len(),
        3,
        "a dry run deleted something"
    );
    let (code, _) = run_json(
        "stillpoint",
        &[
            "prune",
            "--config",
            config,
            "--keep-last",
            "1",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0);
    let (_, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    assert_eq!(listed["backups"][0]["backup_id"], ids[2].as_str());
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1);
}

/// The S3 endpoint dies while an artifact is being uploaded: the backup fails, the
/// cluster is not paused, nothing is listed, and the next backup succeeds.
#[test]
fn a_storage_failure_mid_copy_lists_nothing_and_the_next_backup_succeeds() {
    use crate::s3_test_server::{ACCESS_KEY, S3TestServer, SECRET_KEY};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s3_root = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("copy-started");
    let runbook_for = |server: &S3TestServer, name: &str, copy: &str| {
        cluster_runbook(&cluster)
            .cluster_sqlite(&cluster)
            .database(Database::exec("blobs", "echo cut").set("copy", copy))
            .s3_storage(&server.url("backups"), &server.endpoint(), &[])
            .write(&dir.path().join(name))
    };
    let stillpoint = |args: &[&str]| {
        Command::new(crate::util::bin("stillpoint"))
            .args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    // More than one 16 MiB part, then a signal, then a slow tail the dead server never gets.
    let first = runtime.block_on(S3TestServer::start_in(s3_root.path()));
    let slow_copy = format!(
        "head -c 20000000 /dev/urandom; touch {}; for i in $(seq 1 100); do head -c 1048576 /dev/urandom; sleep 0.1; done",
        started.display()
    );
    let runbook = runbook_for(&first, "failing.toml", &slow_copy);
    let backup = crate::util::Process::new(
        stillpoint(&[
            "backup",
            "--config",
            runbook.to_str().unwrap(),
            "--output",
            "json",
        ]),
        "stillpoint backup".to_owned(),
    );
    wait_until(Duration::from_secs(60), "the copy to be uploading", || {
        started.exists()
    });
    runtime.block_on(first.shutdown());
    let output = backup.wait_output(Duration::from_secs(60));
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("blobs"),
        "the failing copy is named: {}",
        stderr(&output)
    );
    assert!(nobody_paused(&cluster));

    let second = runtime.block_on(S3TestServer::start_in(s3_root.path()));
    let runbook = runbook_for(&second, "working.toml", "head -c 1000 /dev/urandom");
    let config = runbook.to_str().unwrap();
    let listed = stillpoint(&["list", "--config", config, "--output", "json"])
        .wait_with_output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["backups"].as_array().unwrap().len(), 0, "{listed:#}");

    let next = stillpoint(&["backup", "--config", config, "--output", "json"])
        .wait_with_output()
        .unwrap();
    assert!(
        next.status.success(),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
    let listed = stillpoint(&["list", "--config", config, "--output", "json"])
        .wait_with_output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1, "{listed:#}");
    runtime.block_on(second.shutdown());
}

// ---------------------------------------------------------------------------------
// Regression tests for the backup, catalog, storage and restore defects of issues 18
// and 19. Each one failed on the code before its fix.
// ---------------------------------------------------------------------------------

/// Every node's pause sequence, asked in-process: it grows by one with every pause, so
/// an unchanged sequence proves nothing was paused.
fn pause_sequences(cluster: &Cluster) -> Vec<u64> {
    let nodes = format!("{},{}", cluster.ledger_tier(), cluster.auditor.address);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut sequences = Vec::new();
        for address in stillpoint::resolve::parse_address_list(&nodes).unwrap() {
            let options = stillpoint::grpc::client::ConnectOptions::default();
            let mut client = stillpoint::grpc::client::NodeClient::connect(&address, &options)
                .await
                .unwrap_or_else(|error| panic!("{address}: {error}"));
            sequences.push(client.status().await.unwrap().pause_seq);
        }
        sequences
    })
}

/// `age-keygen` into `path`; returns the public key.
fn age_keygen(path: &Path) -> String {
    let keygen = shell(&format!("age-keygen -o {} 2>&1", path.display()));
    String::from_utf8_lossy(&keygen.stdout)
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned()
}

/// A WAL-mode SQLite database with one table of `rows` rows, written by Python's
/// sqlite3 (another process, as an application would).
fn sqlite_db(path: &Path, table: &str, rows: usize) {
    shell(&format!(
        "python3 -c \"import sqlite3; c = sqlite3.connect('{}'); \
         c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE {table} (x INTEGER)'); \
         c.executemany('INSERT INTO {table} VALUES (?)', [(i,) for i in range({rows})]); \
         c.commit(); c.close()\"",
        path.display()
    ));
}

fn sqlite_rows(path: &Path, table: &str) -> String {
    let output = shell(&format!(
        "python3 -c \"import sqlite3; c = sqlite3.connect('file:{}?mode=ro', uri=True); \
         print(c.execute('SELECT count(*) FROM {table}').fetchone()[0])\"",
        path.display()
    ));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs `stillpoint backup` and returns the new backup's id.
fn backup_id(config: &str, extra: &[&str]) -> String {
    let mut args = vec!["backup", "--config", config, "--output", "json"];
    args.extend_from_slice(extra);
    let (code, report) = run_json("stillpoint", &args);
    assert_eq!(code, 0, "{report:#}");
    report["backup_id"].as_str().unwrap().to_owned()
}

/// Issue 18.2: `prune --keep-last 1` with two valid backups and a newer `--no-pause`
/// copy kept the unsafe copy and deleted both restore points.
#[test]
fn prune_never_counts_unsafe_copies_and_keeps_a_restore_point() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let runbook = sqlite_runbook(&cluster, dir.path()).write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let _first = backup_id(config, &[]);
    let second = backup_id(config, &[]);
    let unsafe_copy = backup_id(config, &["--no-pause", "--i-know-this-is-unsafe"]);

    let (code, plan) = run_json(
        "stillpoint",
        &[
            "prune",
            "--config",
            config,
            "--keep-last",
            "1",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{plan:#}");
    let (_, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    let ids: Vec<&str> = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backup_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second.as_str()], "{plan:#}");
    let (code, shown) = run_json(
        "stillpoint",
        &["show", "latest", "--config", config, "--output", "json"],
    );
    assert_eq!(code, 0, "{shown:#}");
    assert_eq!(shown["backup_id"], second.as_str());
    assert!(
        plan["delete"]
            .as_array()
            .unwrap()
            .iter()
            .any(|id| id == unsafe_copy.as_str()),
        "{plan:#}"
    );

    // With only an unsafe copy left, a plan that keeps no restore point is refused
    // unless asked for explicitly.
    let _unsafe = backup_id(config, &["--no-pause", "--i-know-this-is-unsafe"]);
    std::fs::remove_dir_all(dir.path().join("backups").join("backups").join(&second)).unwrap();
    let output = run(
        "stillpoint",
        &["prune", "--config", config, "--keep-last", "1"],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--allow-no-restore-point"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        listed_count(config),
        1,
        "the refused prune deleted something"
    );
    let output = run(
        "stillpoint",
        &[
            "prune",
            "--config",
            config,
            "--keep-last",
            "1",
            "--allow-no-restore-point",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(listed_count(config), 0);
}

fn listed_count(config: &str) -> usize {
    let (_, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    listed["backups"].as_array().unwrap().len()
}

/// Issue 18.5: without a key, `verify` printed "checksum, decryption and
/// decompression ok … verified" when only the checksum had been checked.
#[test]
fn verify_without_a_key_says_it_checked_only_the_checksum() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("age-key.txt");
    let recipient = age_keygen(&key);
    let without_key = sqlite_runbook(&cluster, dir.path())
        .zstd_level(3)
        .age_recipient(&recipient);
    let with_key = without_key
        .clone()
        .age_identity_file(&key)
        .write(&dir.path().join("with-key.toml"));
    let without_key = without_key.write_in(dir.path());
    let config = without_key.to_str().unwrap();
    backup_id(config, &[]);

    let output = run("stillpoint", &["verify", "latest", "--config", config]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!text.contains("decryption and decompression ok"), "{text}");
    assert!(text.contains("checksum only"), "{text}");
    assert!(text.contains("not decrypted"), "{text}");

    // Negative control: with the identity, the text says everything was checked.
    let output = run(
        "stillpoint",
        &["verify", "latest", "--config", with_key.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(text.contains("decryption and decompression ok"), "{text}");
    assert!(!text.contains("checksum only"), "{text}");
}

/// Issue 18.9: after deleting one artifact and appending to another, `list` showed
/// the backup as valid with the manifest's sizes, and `latest` picked it.
#[test]
fn list_and_latest_compare_artifacts_with_the_storage_listing() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let runbook = sqlite_runbook(&cluster, dir.path()).write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let older = backup_id(config, &[]);
    let newer = backup_id(config, &[]);
    let artifacts = dir.path().join("backups/backups").join(&newer);
    std::fs::remove_file(artifacts.join("ledger.sqlite")).unwrap();
    let mut appended = std::fs::OpenOptions::new()
        .append(true)
        .open(artifacts.join("auditor.sqlite"))
        .unwrap();
    std::io::Write::write_all(&mut appended, b"junk").unwrap();
    drop(appended);

    let (code, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    assert_eq!(code, 0);
    let entry = |id: &str| {
        listed["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["backup_id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {listed:#}"))
            .clone()
    };
    let broken = entry(&newer);
    assert_eq!(broken["restorable"], false, "{listed:#}");
    let problems = broken["problems"].to_string();
    assert!(problems.contains("ledger.sqlite"), "{problems}");
    assert!(problems.contains("missing"), "{problems}");
    assert!(problems.contains("auditor.sqlite"), "{problems}");
    assert_eq!(entry(&older)["restorable"], true, "{listed:#}");
    let table = run("stillpoint", &["list", "--config", config]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|line| line.starts_with(&newer) && line.contains("BROKEN")),
        "{table}"
    );

    // `latest` skips the broken backup and says so; restoring it works.
    let output = run(
        "stillpoint",
        &["show", "latest", "--config", config, "--output", "json"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["backup_id"], older.as_str());
    assert!(stderr(&output).contains(&newer), "{}", stderr(&output));
    let target = dir.path().join("restored-ledger.sqlite");
    let output = run(
        "stillpoint",
        &[
            "restore",
            "latest",
            "--config",
            config,
            "--database",
            "ledger",
            "--to",
            target.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
}

/// Issue 18.4: a mistyped recipient, an empty passphrase file or storage that cannot
/// be written were found only in the copy, after a valid window had been taken.
#[test]
fn bad_pipeline_settings_and_unwritable_storage_fail_before_anything_is_paused() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-passphrase");
    std::fs::write(&empty, "\n").unwrap();
    // `backups` is a file, so nothing can be stored under it (a read-only directory
    // would not stop root, which the tests may run as).
    let blocked = dir.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("backups"), "not a directory").unwrap();
    let runbook = cluster_runbook(&cluster).cluster_sqlite(&cluster);
    let cases = [
        (
            "typo.toml",
            runbook
                .clone()
                .age_recipient("age1typo")
                .file_storage(dir.path()),
            "age1typo",
        ),
        (
            "empty.toml",
            runbook
                .clone()
                .age_passphrase_file(&empty)
                .file_storage(dir.path()),
            "passphrase",
        ),
        (
            "blocked.toml",
            runbook.storage_url(&format!("file://{}", blocked.display())),
            "blocked",
        ),
    ];
    for (name, runbook, named) in cases {
        let before = pause_sequences(&cluster);
        let runbook = runbook.write(&dir.path().join(name));
        let output = run(
            "stillpoint",
            &["backup", "--config", runbook.to_str().unwrap()],
        );
        assert!(!output.status.success(), "{name}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(named),
            "{name}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("nothing was paused"),
            "{name}: {}",
            stderr(&output)
        );
        assert_eq!(
            pause_sequences(&cluster),
            before,
            "{name}: the cluster was paused"
        );
    }
    // Negative control: a good runbook does pause.
    let before = pause_sequences(&cluster);
    let good = sqlite_runbook(&cluster, dir.path()).write_in(dir.path());
    backup_id(good.to_str().unwrap(), &[]);
    assert!(pause_sequences(&cluster) > before);
}

/// Issue 19.10: a missing bucket or bad credentials surfaced only after the cluster
/// had been paused and released.
#[test]
fn unusable_s3_storage_fails_before_anything_is_paused() {
    use crate::s3_test_server::{ACCESS_KEY, S3TestServer};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    // s3s-fs checks signatures; moto_server knows which buckets exist.
    let s3s = runtime.block_on(S3TestServer::start());
    let moto = Moto::start();
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let runbook = cluster_runbook(&cluster).cluster_sqlite(&cluster);
    let cases = [
        (
            "no-bucket.toml",
            moto.storage(runbook.clone(), "no-such-bucket", "p"),
        ),
        (
            "bad-key.toml",
            runbook.s3_storage(
                &s3s.url("p"),
                &s3s.endpoint(),
                &[
                    ("access_key_id", ACCESS_KEY),
                    ("secret_access_key", "not-the-secret"),
                ],
            ),
        ),
    ];
    for (name, runbook) in cases {
        let runbook = runbook.write(&dir.path().join(name));
        let before = pause_sequences(&cluster);
        let output = run(
            "stillpoint",
            &["backup", "--config", runbook.to_str().unwrap()],
        );
        assert_eq!(
            pause_sequences(&cluster),
            before,
            "{name}: the cluster was paused: {}",
            stderr(&output)
        );
        assert_eq!(output.status.code(), Some(6), "{name}: {}", stderr(&output));
        assert!(
            stderr(&output).contains("nothing was paused"),
            "{name}: {}",
            stderr(&output)
        );
        assert!(
            !stderr(&output).contains("not-the-secret"),
            "{}",
            stderr(&output)
        );
    }
    runtime.block_on(s3s.shutdown());
}

/// Issue 19.12: a copy failure said "the partial backup … was deleted" even when
/// deleting it failed too (here: the S3 server is gone).
#[test]
fn a_failed_copy_whose_cleanup_fails_does_not_claim_the_backup_was_deleted() {
    use crate::s3_test_server::{ACCESS_KEY, S3TestServer, SECRET_KEY};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(S3TestServer::start());
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let go = dir.path().join("go");
    let copy = format!(
        "echo partial; touch {}; while [ ! -e {} ]; do sleep 0.05; done; exit 1",
        started.display(),
        go.display()
    );
    let runbook = cluster_runbook(&cluster)
        .database(Database::exec("blobs", "echo cut").set("copy", &copy))
        .s3_storage(&server.url("p"), &server.endpoint(), &[])
        .write(&dir.path().join("r.toml"));
    let child = Command::new(crate::util::bin("stillpoint"))
        .args(["backup", "--config", runbook.to_str().unwrap()])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let backup = crate::util::Process::new(child, "stillpoint backup".to_owned());
    wait_until(Duration::from_secs(60), "the copy to start", || {
        started.exists()
    });
    runtime.block_on(server.shutdown());
    std::fs::write(&go, "").unwrap();
    let output = backup.wait_output(Duration::from_secs(120));
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(6), "{message}");
    assert!(message.contains("blobs"), "{message}");
    assert!(!message.contains("was deleted"), "{message}");
    assert!(message.contains("could not be deleted"), "{message}");
    assert!(nobody_paused(&cluster));
}

/// Issue 18.8: the one-hour orphan grace looked only at visible objects, so a running
/// backup whose small artifacts had finished long ago (its big one still uploading,
/// invisible) was pruned as an orphan and then failed at commit.
#[test]
fn a_running_backups_finished_artifacts_are_never_pruned_as_an_orphan() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let go = dir.path().join("go");
    let copy = format!(
        "head -c 1000 /dev/urandom; touch {}; while [ ! -e {} ]; do sleep 0.05; done; \
         head -c 1000 /dev/urandom",
        started.display(),
        go.display()
    );
    let runbook = sqlite_runbook(&cluster, dir.path())
        .database(Database::exec("blobs", "echo cut").set("copy", &copy))
        .write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let backup = crate::util::Process::new(
        Command::new(crate::util::bin("stillpoint"))
            .args(["backup", "--config", config, "--output", "json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        "stillpoint backup".to_owned(),
    );
    let backups = dir.path().join("backups/backups");
    wait_until(
        Duration::from_secs(60),
        "the SQLite artifacts to be stored while the slow copy runs",
        || {
            started.exists()
                && std::fs::read_dir(&backups).is_ok_and(|mut dirs| {
                    dirs.next().is_some_and(|d| {
                        let d = d.unwrap().path();
                        d.join("ledger.sqlite").exists() && d.join("auditor.sqlite").exists()
                    })
                })
        },
    );
    // The finished artifacts were stored two hours ago, as far as the storage knows
    // (the backup's own marker, refreshed while it runs, is left as it is).
    let id_dir = std::fs::read_dir(&backups)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for artifact in ["ledger.sqlite", "auditor.sqlite"] {
        shell(&format!(
            "touch -d '2 hours ago' {}",
            id_dir.join(artifact).display()
        ));
    }
    let (code, pruned) = run_json(
        "stillpoint",
        &[
            "prune",
            "--config",
            config,
            "--keep-last",
            "5",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{pruned:#}");
    std::fs::write(&go, "").unwrap();
    let output = backup.wait_output(Duration::from_secs(120));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(listed_count(config), 1, "{pruned:#}");
}

/// Every file under `dir`, object_store's hidden in-progress files (`name#N`) too.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Issue 18.7: a backup SIGKILLed mid-upload left object_store's in-progress file
/// (`name#N`, 32 MiB) on `file://`, invisible to `list`, `prune` and orphan removal.
#[test]
fn a_copy_killed_mid_upload_leaves_nothing_that_list_and_prune_do_not_find() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let copy = format!(
        "head -c 40000000 /dev/urandom; touch {}; sleep 60",
        started.display()
    );
    let runbook = cluster_runbook(&cluster)
        .database(Database::exec("blobs", "echo cut").set("copy", &copy))
        .file_storage(dir.path())
        .write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let backup = crate::util::Process::new(
        Command::new(crate::util::bin("stillpoint"))
            .args(["backup", "--config", config])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        "stillpoint backup".to_owned(),
    );
    let storage = dir.path().join("backups");
    let hidden = || {
        files_under(&storage)
            .into_iter()
            .filter(|f| f.to_string_lossy().contains('#'))
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(60), "the copy to be uploading", || {
        started.exists() && !hidden().is_empty()
    });
    backup.signal("KILL");
    backup.wait_output(Duration::from_secs(30));
    assert!(nobody_paused(&cluster));

    let (_, listed) = run_json(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
    );
    let incomplete = listed["incomplete"].as_array().unwrap();
    assert_eq!(incomplete.len(), 1, "{listed:#}");
    assert!(
        incomplete[0]["hidden_bytes"].as_u64().unwrap() >= 16 * 1024 * 1024,
        "{listed:#}"
    );

    // Two hours later, as far as the files' times say, prune removes all of it.
    for file in files_under(&storage) {
        shell(&format!("touch -d '2 hours ago' '{}'", file.display()));
    }
    let (code, pruned) = run_json(
        "stillpoint",
        &[
            "prune",
            "--config",
            config,
            "--keep-last",
            "1",
            "--allow-no-restore-point",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{pruned:#}");
    assert_eq!(files_under(&storage), Vec::<PathBuf>::new(), "{pruned:#}");
}

/// Issue 18.1: `restore --force` emptied the target before it knew it could decrypt
/// the artifact: without the key (or with a wrong one) a PostgreSQL target lost its
/// tables and a SQLite target was removed, and then the restore failed.
#[test]
fn restore_force_checks_the_key_before_it_empties_the_target() {
    let postgres = Postgres::start();
    postgres.create_database("source");
    postgres.psql(
        "source",
        "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100)",
    );
    postgres.create_database("target");
    postgres.psql(
        "target",
        "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1), (2), (3)",
    );
    let dir = tempfile::tempdir().unwrap();
    let source_sqlite = dir.path().join("source.sqlite");
    sqlite_db(&source_sqlite, "t", 100);
    let target_sqlite = dir.path().join("target.sqlite");
    sqlite_db(&target_sqlite, "keep_me", 3);
    let target_bytes = std::fs::read(&target_sqlite).unwrap();

    let key = dir.path().join("key.txt");
    let recipient = age_keygen(&key);
    let wrong_key = dir.path().join("wrong-key.txt");
    age_keygen(&wrong_key);
    let no_key = standalone_runbook()
        .database(Database::postgres("pg", &postgres.url("source")))
        .database(Database::sqlite("lite", &source_sqlite))
        .zstd_level(3)
        .age_recipient(&recipient)
        .file_storage(dir.path());
    let wrong = no_key
        .clone()
        .age_identity_file(&wrong_key)
        .write(&dir.path().join("wrong.toml"));
    let right = no_key
        .clone()
        .age_identity_file(&key)
        .write(&dir.path().join("right.toml"));
    let no_key = no_key.write(&dir.path().join("no-key.toml"));
    let id = backup_id(
        no_key.to_str().unwrap(),
        &["--no-pause", "--i-know-this-is-unsafe"],
    );

    let pg_target = postgres.url("target");
    let sqlite_target = target_sqlite.display().to_string();
    for runbook in [&no_key, &wrong] {
        for (database, target) in [("pg", pg_target.as_str()), ("lite", sqlite_target.as_str())] {
            let output = run(
                "stillpoint",
                &[
                    "restore",
                    &id,
                    "--config",
                    runbook.to_str().unwrap(),
                    "--database",
                    database,
                    "--to",
                    target,
                    "--force",
                ],
            );
            assert_eq!(
                output.status.code(),
                Some(6),
                "{database} with {}: {}",
                runbook.display(),
                stderr(&output)
            );
            assert_eq!(
                postgres.psql(
                    "target",
                    "SELECT count(*) FROM pg_tables WHERE tablename = 'keep_me'"
                ),
                "1",
                "{database} with {}: the PostgreSQL target lost its table",
                runbook.display()
            );
            assert_eq!(postgres.psql("target", "SELECT count(*) FROM keep_me"), "3");
            assert!(
                std::fs::read(&target_sqlite).is_ok_and(|bytes| bytes == target_bytes),
                "{database} with {}: the SQLite target changed",
                runbook.display()
            );
            assert!(
                stderr(&output).contains("not touched"),
                "{database}: {}",
                stderr(&output)
            );
        }
    }

    // Negative control: with the right key the same restores replace the targets.
    for (database, target) in [("pg", pg_target.as_str()), ("lite", sqlite_target.as_str())] {
        let output = run(
            "stillpoint",
            &[
                "restore",
                &id,
                "--config",
                right.to_str().unwrap(),
                "--database",
                database,
                "--to",
                target,
                "--force",
            ],
        );
        assert!(output.status.success(), "{database}: {}", stderr(&output));
    }
    assert_eq!(postgres.psql("target", "SELECT count(*) FROM t"), "100");
    assert_eq!(
        postgres.psql(
            "target",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'keep_me'"
        ),
        "0"
    );
    assert_eq!(sqlite_rows(&target_sqlite, "t"), "100");
}

/// Issue 18.1: clearing a PostgreSQL target waited forever behind another session's
/// lock, and committed the DROP after the command had been killed. Now a target other
/// sessions use is refused before anything is dropped.
#[test]
fn restore_force_never_drops_a_target_in_use_even_when_killed() {
    let postgres = Postgres::start();
    postgres.create_database("source");
    postgres.psql("source", "CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    postgres.create_database("target");
    postgres.psql(
        "target",
        "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1)",
    );
    let dir = tempfile::tempdir().unwrap();
    let runbook = standalone_runbook()
        .database(Database::postgres("pg", &postgres.url("source")))
        .file_storage(dir.path())
        .write(&dir.path().join("r.toml"));
    let config = runbook.to_str().unwrap();
    let id = backup_id(config, &["--no-pause", "--i-know-this-is-unsafe"]);

    // Another session holds a lock on the target's table, in an open transaction.
    let mut holder = Command::new(postgres.bin_dir().join("psql"))
        .args(["--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1"])
        .args(["--dbname", &postgres.url("target")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut holder_input = holder.stdin.take().unwrap();
    std::io::Write::write_all(
        &mut holder_input,
        b"BEGIN; LOCK TABLE keep_me IN ACCESS SHARE MODE; SELECT 1;\n",
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "the lock to be held", || {
        postgres.psql(
            "target",
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = 'keep_me' AND l.granted",
        ) != "0"
    });

    let mut restore = crate::util::Process::new(
        Command::new(crate::util::bin("stillpoint"))
            .args(["restore", &id, "--config", config, "--database", "pg"])
            .args(["--to", &postgres.url("target"), "--force"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        "stillpoint restore".to_owned(),
    );
    // Either the restore refuses the target, or it blocks behind the lock; then it is
    // killed, as an operator would kill a command that hangs.
    let waiting_on_lock = || {
        postgres.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'target' \
             AND wait_event_type = 'Lock'",
        ) != "0"
    };
    wait_until(
        Duration::from_secs(60),
        "the restore to end or block",
        || restore.has_exited() || waiting_on_lock(),
    );
    let refused = restore.has_exited();
    if !refused {
        restore.signal("KILL");
    }
    let output = restore.wait_output(Duration::from_secs(30));
    // The lock holder finishes; whatever the killed command left waiting goes on.
    std::io::Write::write_all(&mut holder_input, b"COMMIT;\n").unwrap();
    drop(holder_input);
    holder.wait().unwrap();
    wait_until(
        Duration::from_secs(30),
        "the target to have no other session",
        || {
            postgres.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'target' \
             AND pid <> pg_backend_pid()",
            ) == "0"
        },
    );
    assert_eq!(
        postgres.psql(
            "target",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'keep_me'"
        ),
        "1",
        "the target's table was dropped (refused: {refused}; {})",
        stderr(&output)
    );
    assert!(
        refused,
        "the restore blocked behind the lock instead of refusing"
    );
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(stderr(&output).contains("in use"), "{}", stderr(&output));
}

/// Issue 18.10: `restore --force` over a SQLite database a running process had open
/// removed the file and its `-wal` (not its `-shm`) without asking whether it was in
/// use; the restore failed, and the process went on committing into the deleted file.
#[test]
fn restore_force_refuses_a_live_sqlite_target_and_replaces_a_dead_one() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let runbook = sqlite_runbook(&cluster, dir.path()).write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let load = Load::start(&cluster.ledger_tier(), 2, &[]);
    wait_until(Duration::from_secs(60), "some transfers", || {
        cluster.transactions() >= 10
    });
    let id = backup_id(config, &[]);
    let live = cluster
        .auditor_db
        .strip_prefix("sqlite:")
        .unwrap()
        .to_owned();

    let output = run(
        "stillpoint",
        &[
            "restore",
            &id,
            "--config",
            config,
            "--database",
            "auditor",
            "--to",
            &live,
            "--force",
        ],
    );
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(stderr(&output).contains("in use"), "{}", stderr(&output));
    // The live database was not touched: the cluster goes on and stays consistent.
    let before = cluster.transactions();
    wait_until(Duration::from_secs(60), "more transfers", || {
        cluster.transactions() > before + 10
    });
    assert_eq!(load.stop()["failed"], 0);
    let (code, check) = cluster.check(None);
    assert_eq!(code, 0, "{check:#}");

    // A database whose process died, leaving its -wal and -shm behind, is replaced.
    let dead = dir.path().join("dead.sqlite");
    shell(&format!(
        "python3 -c \"import sqlite3, os; c = sqlite3.connect('{}'); \
         c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE old (x)'); \
         c.execute('INSERT INTO old VALUES (1)'); c.commit(); os._exit(0)\"",
        dead.display()
    ));
    assert!(Path::new(&format!("{}-shm", dead.display())).exists());
    let output = run(
        "stillpoint",
        &[
            "restore",
            &id,
            "--config",
            config,
            "--database",
            "auditor",
            "--to",
            dead.to_str().unwrap(),
            "--force",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    // The backup's ledger beside it: the restored pair is the backup's, whole.
    let ledger = dir.path().join("ledger.sqlite");
    let output = run(
        "stillpoint",
        &[
            "restore",
            &id,
            "--config",
            config,
            "--database",
            "ledger",
            "--to",
            ledger.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let (code, check) = run_json(
        "ledger-node",
        &[
            "check",
            "--ledger-db",
            &format!("sqlite:{}", ledger.display()),
            "--auditor-db",
            &format!("sqlite:{}", dead.display()),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{check:#}");
    assert!(check["transactions"].as_u64().unwrap() >= 10, "{check:#}");
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("restoring"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Issue 18 (settled): `stillpoint list | head -1` panicked on the closed pipe.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let runbook = standalone_runbook()
        .database(Database::exec("x", "true"))
        .file_storage(dir.path())
        .write(&dir.path().join("r.toml"));
    for format in ["text", "json"] {
        let mut child = Command::new(crate::util::bin("stillpoint"))
            .args([
                "list",
                "--config",
                runbook.to_str().unwrap(),
                "--output",
                format,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written, as `head` does.
        drop(child.stdout.take());
        let output = crate::util::Process::new(child, "stillpoint list".to_owned())
            .wait_output(Duration::from_secs(60));
        assert_eq!(
            output.status.code(),
            Some(0),
            "{format}: {}",
            stderr(&output)
        );
        assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    }
}

/// moto_server (the Python S3 emulator), which unlike the in-process s3s server keeps
/// multipart uploads that were started and never completed. Killed on drop.
struct Moto {
    _process: crate::util::Process,
    endpoint: String,
}

impl Moto {
    fn start() -> Moto {
        let port = stillpoint_testkit::free_port();
        let child = Command::new("moto_server")
            .args(["-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server (scripts/install-packages installs it)");
        let process = crate::util::Process::new(child, "moto_server".to_owned());
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until(Duration::from_secs(60), "moto_server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let moto = Moto {
            _process: process,
            endpoint,
        };
        moto.python("s3.create_bucket(Bucket='bucket')");
        moto
    }

    /// Runs Python with `s3`, a boto3 client of this server.
    fn python(&self, code: &str) -> String {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='k', \
             aws_secret_access_key='s', region_name='us-east-1')\n{code}\n",
            self.endpoint
        );
        let output = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{code}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A standalone runbook with one exec database, storing into
    /// `s3://bucket/prefix` on this server.
    fn standalone_runbook(&self, bucket: &str, prefix: &str) -> Runbook {
        self.storage(
            standalone_runbook().database(Database::exec("x", "true")),
            bucket,
            prefix,
        )
    }

    /// `runbook` storing into `s3://bucket/prefix` on this server.
    fn storage(&self, runbook: Runbook, bucket: &str, prefix: &str) -> Runbook {
        runbook.s3_storage(
            &format!("s3://{bucket}/{prefix}"),
            &self.endpoint,
            &[("access_key_id", "k"), ("secret_access_key", "s")],
        )
    }
}

/// Issue 19.9: a backup killed during an S3 multipart upload left the upload (its
/// parts billed, invisible to every listing) behind; `list`, `prune` and orphan
/// cleanup saw only finished objects.
#[test]
fn incomplete_s3_multipart_uploads_under_the_backups_are_listed() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let runbook = moto
        .standalone_runbook("bucket", "team")
        .write(&dir.path().join("r.toml"));
    let id = "20240101T000000Z-abcdef";
    moto.python(&format!(
        "u = s3.create_multipart_upload(Bucket='bucket', Key='team/backups/{id}/blobs.bin')\n\
         s3.upload_part(Bucket='bucket', Key='team/backups/{id}/blobs.bin', \
         UploadId=u['UploadId'], PartNumber=1, Body=b'x' * (5 * 1024 * 1024))"
    ));
    let (code, listed) = run_json(
        "stillpoint",
        &[
            "list",
            "--config",
            runbook.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{listed:#}");
    let incomplete = listed["incomplete"].as_array().unwrap();
    assert_eq!(incomplete.len(), 1, "{listed:#}");
    assert_eq!(incomplete[0]["backup_id"], id, "{listed:#}");
    assert_eq!(incomplete[0]["incomplete_uploads"], 1, "{listed:#}");
    let table = run(
        "stillpoint",
        &["list", "--config", runbook.to_str().unwrap()],
    );
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains(id) && table.contains("upload"), "{table}");
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Starts `stillpoint backup` on `config`, waits until `pid_file` (written by an exec
/// hook that then sleeps) exists and the cluster is in the state `paused` says, sends
/// `signal`, and returns the pid of the hook and what the backup printed.
fn interrupt_backup(
    cluster: &Cluster,
    config: &str,
    pid_file: &Path,
    paused: bool,
    signal: &str,
) -> (String, std::process::Output) {
    let child = Command::new(crate::util::bin("stillpoint"))
        .args(["backup", "--config", config, "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let backup = crate::util::Process::new(child, format!("stillpoint backup {config}"));
    let nodes = format!("{},{}", cluster.ledger_tier(), cluster.auditor.address);
    wait_until(
        Duration::from_secs(60),
        "the hook to start with the cluster in the expected state",
        || {
            std::fs::read_to_string(pid_file).is_ok_and(|pid| !pid.trim().is_empty())
                && crate::util::paused_flags(&nodes)
                    .iter()
                    .all(|flag| *flag == paused)
        },
    );
    let hook = std::fs::read_to_string(pid_file).unwrap().trim().to_owned();
    assert!(!process_gone(&hook), "the hook {hook} is not running");
    backup.signal(signal);
    // Far less than the 2-minute lease and the hooks' 100 s sleep.
    let output = backup.wait_output(Duration::from_secs(20));
    (hook, output)
}

/// SIGTERM (systemd, Kubernetes, `timeout`) or Ctrl-C during `stillpoint backup`
/// killed it on the spot: the cluster stayed paused until its lease ran out (the
/// whole lease, minutes in production), the exec cut's command went on running, and
/// the partial backup stayed in storage for an hour. Now the signal stops the backup:
/// the cluster is released at once, the hook killed, the partial backup removed.
#[test]
fn a_signal_during_a_backup_releases_the_cluster_at_once_and_removes_the_partial_backup() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let nodes = format!("{},{}", cluster.ledger_tier(), cluster.auditor.address);
    let runbook_with = |name: &str, hook: Option<Database>| {
        // A lease far longer than the test waits: only a release can reopen the nodes.
        let mut runbook = Runbook::for_cluster("test", &cluster)
            .pause("lease", "2m")
            .pause("max_wait", "10s")
            .pause("cut_deadline", "110s")
            .cluster_sqlite(&cluster);
        if let Some(hook) = hook {
            runbook = runbook.database(hook);
        }
        let path = runbook
            .zstd_level(3)
            .file_storage(dir.path())
            .write(&dir.path().join(name));
        path.to_str().unwrap().to_owned()
    };
    let no_incomplete_backup = |config: &str| {
        let (code, listed) = run_json(
            "stillpoint",
            &["list", "--config", config, "--output", "json"],
        );
        assert_eq!(code, 0, "{listed:#}");
        assert_eq!(listed["backups"].as_array().unwrap().len(), 0, "{listed:#}");
        assert_eq!(
            listed["incomplete"].as_array().unwrap().len(),
            0,
            "the partial backup was left behind: {listed:#}"
        );
    };

    // Inside the pause: an exec cut that takes its time.
    let cut_pid = dir.path().join("cut.pid");
    let config = runbook_with(
        "cut.toml",
        Some(
            Database::exec(
                "slow_cut",
                &format!("echo $$ > {}; exec sleep 100", cut_pid.display()),
            )
            .set("cut_timeout", "100s"),
        ),
    );
    let (hook, output) = interrupt_backup(&cluster, &config, &cut_pid, true, "TERM");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("interrupted during the cut") && text.contains("every node was released"),
        "{text}"
    );
    assert!(text.contains("was deleted"), "{text}");
    assert!(
        crate::util::paused_flags(&nodes).iter().all(|flag| !flag),
        "a node is still paused after the backup exited"
    );
    wait_until(
        Duration::from_secs(5),
        "the cut command to be killed",
        || process_gone(&hook),
    );
    no_incomplete_backup(&config);

    // After the release: a copy that takes its time, Ctrl-C.
    let copy_pid = dir.path().join("copy.pid");
    let config = runbook_with(
        "copy.toml",
        Some(Database::exec("slow_copy", "echo cut").set(
            "copy",
            &format!(
                "echo $$ > {}; head -c 100000 /dev/zero; exec sleep 100",
                copy_pid.display()
            ),
        )),
    );
    let (hook, output) = interrupt_backup(&cluster, &config, &copy_pid, false, "INT");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("interrupted during the copy"), "{text}");
    wait_until(
        Duration::from_secs(5),
        "the copy command to be killed",
        || process_gone(&hook),
    );
    no_incomplete_backup(&config);

    // The cluster and the storage are fine: the next backup works.
    let config = runbook_with("plain.toml", None);
    let id = backup_id(&config, &[]);
    assert_eq!(listed_count(&config), 1, "{id}");
}

/// In one CI run (load average 9) the test above failed: after SIGINT, a 1148-byte
/// partial backup stayed listed as incomplete. A copy was dropped on the signal while
/// its artifact's PUT was under way (the local store writes in `spawn_blocking`, and
/// dropping the future does not stop it), the clean-up deleted the backup's
/// directory, and the PUT landed after the delete. Here the storage holds the
/// artifact's PUT, whole, until the backup has been interrupted and has either
/// exited or said it waits for its writes: whatever the timing, the clean-up must
/// come after the last write of the backup, and nothing may be left.
#[test]
fn a_signal_while_an_artifact_is_being_stored_leaves_nothing_behind() {
    use crate::s3_test_server::{ACCESS_KEY, S3TestServer, SECRET_KEY};
    use std::sync::mpsc::RecvTimeoutError;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, held) = runtime.block_on(S3TestServer::start_holding(".sqlite.zst"));
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.sqlite");
    sqlite_db(&db, "t", 1000);
    let runbook = cluster_runbook(&cluster)
        .database(Database::sqlite("app", &db))
        .zstd_level(3)
        .s3_storage(&server.url("team"), &server.endpoint(), &[])
        .write(&dir.path().join("held.toml"));
    let config = runbook.to_str().unwrap();
    let credentials = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ];

    let (backup, lines) = crate::util::spawn_reading_stderr(
        "stillpoint",
        &["backup", "--config", config, "--output", "json"],
        &credentials,
    );
    // The artifact has reached the storage whole, and is held there: the copy is
    // under way, the cluster already released.
    runtime.block_on(held.received(1, Duration::from_secs(60)));
    backup.signal("INT");
    // Either the backup exits without waiting for its write (the defect: the write
    // then lands after its clean-up), or it says it waits for it.
    let mut seen = Vec::new();
    let waited = loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let waits = line.contains("storage write(s) of the stopped backup to finish");
                seen.push(line);
                if waits {
                    break true;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break false,
            Err(RecvTimeoutError::Timeout) => panic!(
                "the interrupted backup neither exited nor waited for its write:\n{}",
                seen.join("\n")
            ),
        }
    };
    held.release();
    runtime.block_on(held.stored(1, Duration::from_secs(60)));
    let output = backup.wait_output(Duration::from_secs(60));
    // What the backup printed after the line it waited on.
    seen.extend(lines.iter());
    let text = seen.join("\n");
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("interrupted during the copy"), "{text}");
    assert!(nobody_paused(&cluster));

    let (code, listed) = run_json_with_env(
        "stillpoint",
        &["list", "--config", config, "--output", "json"],
        &credentials,
    );
    assert_eq!(code, 0, "{listed:#}");
    assert_eq!(listed["backups"].as_array().unwrap().len(), 0, "{listed:#}");
    assert_eq!(
        listed["incomplete"].as_array().unwrap().len(),
        0,
        "the partial backup was left behind (the backup {} for its write): {listed:#}\n{text}",
        if waited { "waited" } else { "did not wait" }
    );
    assert!(waited, "{text}");
    assert!(text.contains("was deleted"), "{text}");
    runtime.block_on(server.shutdown());
}

/// Runs `stillpoint ARGS` with its stdout closed before it prints anything, as
/// `| head -0` or a log shipper that died would leave it.
fn run_with_closed_stdout(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(crate::util::bin("stillpoint"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    crate::util::Process::new(child, format!("stillpoint {}", args.join(" ")))
        .wait_output(Duration::from_secs(60))
}

/// A closed stdout ended every command with exit 0, after the fix for its panic: a
/// failed backup or a damaged `verify` (`stillpoint verify latest | head -1` in a
/// `pipefail` script) looked like a success. And `verify` with a key that does not
/// open the backup called the backup DAMAGED, when nothing was wrong with it.
#[test]
fn a_closed_stdout_keeps_the_exit_code_and_a_wrong_key_is_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("age-key.txt");
    let recipient = age_keygen(&key);
    let other_key = dir.path().join("other-key.txt");
    age_keygen(&other_key);
    let db = dir.path().join("app.sqlite");
    sqlite_db(&db, "t", 100);
    let runbook = |name: &str, identity: &Path| {
        standalone_runbook()
            .database(Database::sqlite("app", &db))
            .zstd_level(3)
            .age_recipient(&recipient)
            .age_identity_file(identity)
            .file_storage(dir.path())
            .write(&dir.path().join(name))
    };
    let right = runbook("right.toml", &key);
    let right = right.to_str().unwrap();
    let wrong = runbook("wrong.toml", &other_key);
    let wrong = wrong.to_str().unwrap();
    let id = backup_id(right, &["--no-pause", "--i-know-this-is-unsafe"]);

    // A key that does not open the backup: not verified, and not called damaged.
    let output = run("stillpoint", &["verify", &id, "--config", wrong]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        text.contains("none of the given identities opens it"),
        "{text}"
    );
    assert!(text.contains("NOT VERIFIED"), "{text}");
    assert!(!text.contains("DAMAGED"), "{text}");
    assert!(
        stderr(&output).contains("could not be verified")
            && !stderr(&output).contains("damaged artifacts"),
        "{}",
        stderr(&output)
    );
    let (code, report) = run_json(
        "stillpoint",
        &["verify", &id, "--config", wrong, "--output", "json"],
    );
    assert_eq!(code, 6, "{report:#}");
    assert_eq!(report["ok"], false, "{report:#}");
    assert_eq!(report["damaged"], false, "{report:#}");
    assert_eq!(report["artifacts"][0]["damaged"], false, "{report:#}");

    // A damaged artifact, its verdict printed into a closed pipe: still exit 6.
    let artifact = files_under(&dir.path().join("backups"))
        .into_iter()
        .find(|path| path.to_string_lossy().ends_with(".sqlite.zst.age"))
        .unwrap();
    let mut bytes = std::fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&artifact, bytes).unwrap();
    for format in ["text", "json"] {
        let output =
            run_with_closed_stdout(&["verify", &id, "--config", right, "--output", format]);
        assert_eq!(
            output.status.code(),
            Some(6),
            "{format}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("damaged artifacts"),
            "{format}: {}",
            stderr(&output)
        );
        assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    }

    // A backup that fails (nothing listens on the runbook's node), reporting its
    // error as JSON into a closed pipe: still exit 3, not a success.
    let output = run_with_closed_stdout(&["backup", "--config", right, "--output", "json"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}

/// `restore --force` over a SQLite database deleted the old database before the new
/// one was even read: a restore that then failed or was stopped (Ctrl-C, SIGTERM)
/// left no database at all, and a signal also left the half-written copy
/// (`.NAME.XXXX.restoring`, as big as the database) beside it. Now the old database
/// stays, whole, until the new one is written and checked, and a signal removes the
/// copy being written.
#[test]
fn an_interrupted_restore_force_leaves_the_old_sqlite_database_and_no_partial_copy() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("age-key.txt");
    let recipient = age_keygen(&key);
    // Big enough (random, so it neither compresses nor restores in an instant) that
    // the restore is still writing when the signal comes.
    let db = dir.path().join("app.sqlite");
    shell(&format!(
        "python3 -c \"import sqlite3, os; c = sqlite3.connect('{}'); \
         c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE blobs (b BLOB)'); \
         c.executemany('INSERT INTO blobs VALUES (?)', [(os.urandom(100000),) for _ in range(400)]); \
         c.commit(); c.close()\"",
        db.display()
    ));
    let runbook = standalone_runbook()
        .database(Database::sqlite("app", &db))
        .age_recipient(&recipient)
        .age_identity_file(&key)
        .file_storage(dir.path())
        .write(&dir.path().join("r.toml"));
    let config = runbook.to_str().unwrap();
    let id = backup_id(config, &["--no-pause", "--i-know-this-is-unsafe"]);

    // The database to be replaced: the application that wrote it has stopped.
    let target_dir = dir.path().join("target");
    std::fs::create_dir(&target_dir).unwrap();
    let target = target_dir.join("app.sqlite");
    sqlite_db(&target, "old", 42);
    let staged = || {
        std::fs::read_dir(&target_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".restoring"))
            .collect::<Vec<_>>()
    };
    let args = [
        "restore",
        &id,
        "--config",
        config,
        "--database",
        "app",
        "--to",
        target.to_str().unwrap(),
        "--force",
    ];

    let child = Command::new(crate::util::bin("stillpoint"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut restore = crate::util::Process::new(child, "stillpoint restore --force".to_owned());
    wait_until(
        Duration::from_secs(60),
        "the new copy to be written beside the target",
        || !staged().is_empty(),
    );
    assert!(
        !restore.has_exited(),
        "the restore finished before the signal"
    );
    restore.signal("TERM");
    let output = restore.wait_output(Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("interrupted"),
        "{}",
        stderr(&output)
    );
    assert!(
        target.exists(),
        "the old database is gone: {:?}",
        std::fs::read_dir(&target_dir).unwrap().collect::<Vec<_>>()
    );
    assert_eq!(sqlite_rows(&target, "old"), "42");
    assert!(staged().is_empty(), "left behind: {:?}", staged());

    // Run to its end, it replaces the old database whole.
    let output = run("stillpoint", &args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(sqlite_rows(&target, "blobs"), "400");
    assert!(staged().is_empty(), "left behind: {:?}", staged());
}

/// A missing S3 bucket: `backup` said "backups/…/probe does not exist" (as if the
/// probe object were the problem), and `list` printed S3's error answer five times
/// over (each cause in the chain repeated the ones below it).
#[test]
fn a_missing_s3_bucket_is_named_once() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let runbook = moto
        .standalone_runbook("no-such-bucket", "prefix")
        .write(&dir.path().join("r.toml"));
    let config = runbook.to_str().unwrap();

    let output = run("stillpoint", &["backup", "--config", config]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("the bucket does not exist"), "{text}");
    assert!(!text.contains("probe does not exist"), "{text}");
    assert!(text.contains("nothing was paused"), "{text}");

    let output = run("stillpoint", &["list", "--config", config]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("the bucket does not exist"), "{text}");
    assert_eq!(text.matches("NoSuchBucket").count(), 1, "{text}");
}

/// A runbook whose `age_identity_file` belongs to none of its `age_recipients` (a
/// recipient pasted from another key) backed up happily: every backup was encrypted
/// to keys the runbook's own identity cannot open, found out only when `verify`,
/// `restore` or `drill` was needed. Refused in prepare now, before anything is
/// paused or written.
#[test]
fn a_backup_whose_identity_opens_none_of_its_recipients_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("age-key.txt");
    age_keygen(&key);
    let other = dir.path().join("other-key.txt");
    let other_recipient = age_keygen(&other);
    let db = dir.path().join("app.sqlite");
    sqlite_db(&db, "t", 10);
    let runbook = |name: &str, identity: &Path| {
        let path = standalone_runbook()
            .database(Database::sqlite("app", &db))
            .age_recipient(&other_recipient)
            .age_identity_file(identity)
            .file_storage(dir.path())
            .write(&dir.path().join(name));
        path.to_str().unwrap().to_owned()
    };

    let mismatched = runbook("mismatched.toml", &key);
    let output = run(
        "stillpoint",
        &[
            "backup",
            "--config",
            &mismatched,
            "--no-pause",
            "--i-know-this-is-unsafe",
        ],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("no identity in age_identity_file") && text.contains("Nothing was paused"),
        "{text}"
    );
    assert!(
        files_under(&dir.path().join("backups")).is_empty(),
        "something was written: {:?}",
        files_under(&dir.path().join("backups"))
    );

    // The matching identity, or one this host does not hold (kept on the restore
    // hosts), is fine.
    for identity in [other.clone(), dir.path().join("not-on-this-host.txt")] {
        let config = runbook("fine.toml", &identity);
        backup_id(&config, &["--no-pause", "--i-know-this-is-unsafe"]);
    }
}
