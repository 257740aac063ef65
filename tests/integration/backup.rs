//! Backups of real clusters: a PostgreSQL ledger and a MariaDB auditor under load,
//! restored with the standard tools; failures that must leave nothing listed; and the
//! catalog commands (list, show, verify, prune).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use stillpoint_testkit::{MariaDb, Postgres};

use crate::cluster::{Cluster, Load};
use crate::util::{run, run_json, stderr, wait_until};

/// A runbook for `cluster` with the given `[[databases]]` and `[pipeline]` sections,
/// storing into `dir/backups`.
fn write_runbook(dir: &Path, cluster: &Cluster, databases: &str, pipeline: &str) -> PathBuf {
    let storage = dir.join("backups");
    std::fs::create_dir_all(&storage).unwrap();
    let storage = format!("url = \"file://{}\"", storage.display());
    write_runbook_to(dir, "runbook.toml", cluster, databases, pipeline, &storage)
}

fn write_runbook_to(
    dir: &Path,
    name: &str,
    cluster: &Cluster,
    databases: &str,
    pipeline: &str,
    storage: &str,
) -> PathBuf {
    let text = format!(
        r#"
cluster = "test"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
lease = "30s"
max_wait = "10s"
cut_deadline = "10s"
{databases}
[pipeline]
{pipeline}
[storage]
{storage}
"#,
        ledgers = cluster
            .ledgers
            .iter()
            .map(|node| format!("\"{}\"", node.address))
            .collect::<Vec<_>>()
            .join(", "),
        auditor = cluster.auditor.address,
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn sqlite_databases(cluster: &Cluster) -> String {
    let path = |url: &str| url.strip_prefix("sqlite:").unwrap().to_owned();
    format!(
        "[[databases]]\nname = \"ledger\"\nrole = \"ledger\"\nadapter = \"sqlite\"\npath = \"{}\"\n\
         [[databases]]\nname = \"auditor\"\nrole = \"auditor\"\nadapter = \"sqlite\"\npath = \"{}\"\n",
        path(&cluster.ledger_db),
        path(&cluster.auditor_db)
    )
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

/// The issue's main scenario: ledger on PostgreSQL, auditor on MariaDB, under load;
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
    let runbook = write_runbook(
        dir.path(),
        &cluster,
        &format!(
            "[[databases]]\nname = \"ledger\"\nrole = \"ledger\"\nadapter = \"postgres\"\nurl = \"{}\"\n\
             [[databases]]\nname = \"auditor\"\nrole = \"auditor\"\nadapter = \"mariadb\"\nurl = \"{}\"\n",
            postgres.url("ledger"),
            mariadb.url("auditor")
        ),
        &format!(
            "zstd_level = 3\nage_recipients = [\"{recipient}\"]\nage_identity_file = \"{}\"",
            key.display()
        ),
    );
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
    let databases = format!(
        "{}[[databases]]\nname = \"broken\"\nadapter = \"exec\"\ncut = \"echo no snapshot today >&2; exit 3\"\n",
        sqlite_databases(&cluster)
    );
    let runbook = write_runbook(dir.path(), &cluster, &databases, "");
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
    let runbook = write_runbook(
        dir.path(),
        &cluster,
        &sqlite_databases(&cluster),
        "zstd_level = 3",
    );
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
        let databases = format!(
            "{}[[databases]]\nname = \"blobs\"\nadapter = \"exec\"\ncut = \"echo cut\"\ncopy = \"{copy}\"\n",
            sqlite_databases(&cluster)
        );
        let storage = format!(
            "url = \"{}\"\noptions = {{ endpoint = \"{}\", allow_http = \"true\", region = \"us-east-1\" }}",
            server.url("backups"),
            server.endpoint()
        );
        write_runbook_to(dir.path(), name, &cluster, &databases, "", &storage)
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
