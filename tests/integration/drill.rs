//! Restores and drills of real backups: the reference ledger's own runbook drilled on
//! a PostgreSQL ledger and a MariaDB auditor; the negative control (copies taken
//! without a pause fail the drill, copies taken with one pass); PostgreSQL
//! point-in-time recovery to a backup's restore point, LSN and mid-time; and damaged
//! artifacts that must stop a restore before it writes anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use stillpoint_testkit::{MariaDb, Postgres, PostgresOptions};

use crate::cluster::{Cluster, Load};
use crate::util::{Database, Runbook, bin, run, run_json, run_json_with_env, stderr, wait_until};

/// The reference cluster on PostgreSQL + MariaDB under load, with the shipped
/// `ledger/runbook.toml` pointed at it.
struct LedgerExample {
    postgres: Postgres,
    mariadb: MariaDb,
    cluster: Cluster,
    load: Option<Load>,
    dir: tempfile::TempDir,
    runbook: PathBuf,
}

impl LedgerExample {
    fn start(postgres: Postgres) -> LedgerExample {
        postgres.create_database("ledger");
        let mariadb = MariaDb::start();
        mariadb.create_database("auditor");
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
        let dir = tempfile::tempdir().unwrap();
        let runbook = shipped_runbook_for(dir.path(), &cluster, &postgres, &mariadb);
        LedgerExample {
            postgres,
            mariadb,
            cluster,
            load: Some(load),
            dir,
            runbook,
        }
    }

    fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    fn backup(&self, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["backup", "--config", self.config(), "--output", "json"];
        args.extend(extra);
        run_json("stillpoint", &args)
    }

    fn stop_load(&mut self) -> Value {
        self.load.take().expect("load running").stop()
    }

    /// `stillpoint drill BACKUP --output json` with the runbook, and `ledger-node` on
    /// PATH for the runbook's command check.
    fn drill(&self, backup: &str) -> (i32, Value) {
        let (code, report) = run_json_with_env(
            "stillpoint",
            &[
                "drill",
                backup,
                "--config",
                self.config(),
                "--output",
                "json",
            ],
            &[("PATH", &path_with_our_binaries())],
        );
        (code, report)
    }
}

/// PATH with the directory of our binaries (`ledger-node`, `stillpoint`) first, as an
/// installed system would have them.
fn path_with_our_binaries() -> String {
    let ours = bin("ledger-node").parent().unwrap().display().to_string();
    match std::env::var("PATH") {
        Ok(path) => format!("{ours}:{path}"),
        Err(_) => ours,
    }
}

/// `ledger/runbook.toml` as shipped, with its example addresses, URLs, key and storage
/// replaced by the test's. Each replaced value must be in the file, so the test breaks
/// if the shipped runbook drifts from what it runs.
fn shipped_runbook_for(
    dir: &Path,
    cluster: &Cluster,
    postgres: &Postgres,
    mariadb: &MariaDb,
) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("ledger/runbook.toml");
    let mut text = std::fs::read_to_string(&shipped).unwrap();
    let (recipient, key) = age_key(dir);
    let storage = dir.join("backups");
    std::fs::create_dir_all(&storage).unwrap();
    let mut replace = |from: &str, to: &str| {
        assert!(
            text.contains(from),
            "ledger/runbook.toml no longer has {from:?}"
        );
        text = text.replace(from, to);
    };
    for (index, node) in cluster.ledgers.iter().enumerate() {
        replace(&format!("127.0.0.1:5005{}", index + 1), &node.address);
    }
    replace("127.0.0.1:50061", &cluster.auditor.address);
    replace(
        "postgres://postgres@127.0.0.1:5432/ledger",
        &postgres.url("ledger"),
    );
    replace(
        "mysql://root@127.0.0.1:3306/auditor",
        &mariadb.url("auditor"),
    );
    replace(
        "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p",
        &recipient,
    );
    replace("/etc/stillpoint/age-key.txt", key.to_str().unwrap());
    replace(
        "file:///var/backups/reference-ledger",
        &format!("file://{}", storage.display()),
    );
    // The adapters find pg_dump, pg_restore and the mariadb client where the test
    // servers' binaries are.
    replace(
        "adapter = \"postgres\"\n",
        &format!(
            "adapter = \"postgres\"\nbin_dir = \"{}\"\n",
            postgres.bin_dir().display()
        ),
    );
    replace(
        "adapter = \"mariadb\"\n",
        &format!(
            "adapter = \"mariadb\"\nbin_dir = \"{}\"\n",
            mariadb.bin_dir().display()
        ),
    );
    let path = dir.join("runbook.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A new age key pair: (recipient, identity file).
fn age_key(dir: &Path) -> (String, PathBuf) {
    let key = dir.join("age-key.txt");
    let output = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (scripts/test installs age)");
    assert!(output.status.success(), "{}", stderr(&output));
    let recipient = String::from_utf8_lossy(&output.stderr)
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned();
    (recipient, key)
}

fn check_names(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["name"].as_str().unwrap().to_owned())
        .collect()
}

fn failed_checks(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|check| check["ok"] == false)
        .map(|check| check["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The issue's scenario: `stillpoint drill latest` with the ledger's own runbook exits
/// 0 and writes one JUnit test case per check; the scratch databases are gone after;
/// `restore` puts the ledger into an empty database, refuses a non-empty one, and
/// overwrites it only with --force.
#[test]
fn the_ledger_runbook_drills_a_postgres_ledger_and_mariadb_auditor() {
    let mut example = LedgerExample::start(Postgres::start());
    let (code, backup) = example.backup(&[]);
    assert_eq!(code, 0, "{backup:#}");
    let load = example.stop_load();
    assert_eq!(load["failed"], 0, "{load:#}");

    let junit = example.dir.path().join("drill.xml");
    let (code, report) = run_json_with_env(
        "stillpoint",
        &[
            "drill",
            "latest",
            "--config",
            example.config(),
            "--junit",
            junit.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[("PATH", &path_with_our_binaries())],
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["backup_id"], backup["backup_id"]);
    let names = check_names(&report);
    for expected in [
        "window",
        "checksum:ledger",
        "restore:ledger",
        "row_counts:ledger",
        "checksum:auditor",
        "restore:auditor",
        "row_counts:auditor",
        "ledger_node_check",
        "balances_conserved",
        "no_negative_balance",
        "hash_chain_links",
        "ledger_matches_auditor",
    ] {
        assert!(names.contains(&expected.to_owned()), "{names:?}");
    }
    assert!(report["rto_ms"].as_u64().is_some());
    assert!(report["rpo_ms"].as_i64().unwrap() > 0);

    let xml = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<testcase ").count(), names.len(), "{xml}");
    for name in &names {
        assert!(
            xml.contains(&format!("name=\"{name}\"")),
            "{name} not in {xml}"
        );
    }
    assert!(xml.contains("failures=\"0\""), "{xml}");

    // The scratch databases were dropped.
    let left = example.postgres.psql(
        "postgres",
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'stillpoint_drill_%'",
    );
    assert_eq!(left.trim(), "0");
    let left = example
        .mariadb
        .sql("auditor", "SHOW DATABASES LIKE 'stillpoint_drill_%'");
    assert!(left.trim().is_empty(), "{left}");

    // restore: into an empty database, then refused there, then --force.
    example.postgres.create_database("restored");
    let target = example.postgres.url("restored");
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "latest",
            "--config",
            example.config(),
            "--database",
            "ledger",
            "--to",
            &target,
            "--output",
            "json",
        ];
        args.extend(extra);
        run("stillpoint", &args)
    };
    let first = restore(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let restored_rows = example
        .postgres
        .psql("restored", "SELECT count(*) FROM ledger");
    let expected_rows = backup["manifest"]["databases"][0]["row_counts"]["public.ledger"]
        .as_u64()
        .unwrap();
    assert_eq!(restored_rows.trim(), expected_rows.to_string());
    let again = restore(&[]);
    assert_eq!(again.status.code(), Some(6));
    assert!(stderr(&again).contains("not empty"), "{}", stderr(&again));
    let forced = restore(&["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    let restored_rows = example
        .postgres
        .psql("restored", "SELECT count(*) FROM ledger");
    assert_eq!(restored_rows.trim(), expected_rows.to_string());
}

/// The negative control: copies of the ledger and the auditor cut without a pause,
/// under load, fail the drill's cross-database check in most runs, naming it; copies
/// taken inside a pause pass in every run. The counts are printed (and recorded in
/// docs/runbooks/ledger-drill.md).
#[test]
fn unpaused_copies_fail_the_drill_and_paused_copies_pass() {
    const RUNS: usize = 5;
    let example = LedgerExample::start(Postgres::start());

    let refused = run(
        "stillpoint",
        &["backup", "--config", example.config(), "--no-pause"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("--i-know-this-is-unsafe"));

    let drill = |backup_id: &str| example.drill(backup_id);
    let mut unpaused_inconsistent = 0;
    let mut paused_consistent = 0;
    let mut sample_failure = None;
    for _ in 0..RUNS {
        let (code, unpaused) = example.backup(&["--no-pause", "--i-know-this-is-unsafe"]);
        assert_eq!(code, 0, "{unpaused:#}");
        assert_eq!(unpaused["manifest"]["unsafe_no_pause"], true);
        let (code, report) = drill(unpaused["backup_id"].as_str().unwrap());
        assert_eq!(code, 7, "an unpaused copy's drill must fail: {report:#}");
        // The window check always fails for such a copy; the data checks show
        // whether the copies actually disagree.
        let failed = failed_checks(&report);
        assert!(failed.contains(&"window".to_owned()), "{failed:?}");
        if failed.contains(&"ledger_matches_auditor".to_owned()) {
            unpaused_inconsistent += 1;
            sample_failure.get_or_insert_with(|| report["checks"].clone());
        }

        let (code, paused) = example.backup(&[]);
        assert_eq!(code, 0, "{paused:#}");
        let (code, report) = drill(paused["backup_id"].as_str().unwrap());
        assert_eq!(code, 0, "a paused copy's drill must pass: {report:#}");
        paused_consistent += 1;
    }
    println!(
        "negative control over {RUNS} runs under load: unpaused copies inconsistent in \
         {unpaused_inconsistent}/{RUNS}, paused copies consistent in {paused_consistent}/{RUNS}"
    );
    if let Some(checks) = &sample_failure {
        let failing = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|check| check["name"] == "ledger_matches_auditor")
            .unwrap();
        println!("sample failure: {}", failing["detail"]);
        assert!(
            failing["detail"].as_str().unwrap().contains("only in"),
            "{failing:#}"
        );
    }
    assert_eq!(paused_consistent, RUNS);
    assert!(
        unpaused_inconsistent * 2 > RUNS,
        "unpaused copies were inconsistent in only {unpaused_inconsistent} of {RUNS} runs"
    );
    // `latest` never picks an unsafe copy.
    let (_, listed) = run_json(
        "stillpoint",
        &[
            "show",
            "latest",
            "--config",
            example.config(),
            "--output",
            "json",
        ],
    );
    assert!(listed.get("unsafe_no_pause").is_none(), "{listed:#}");
}

/// Point-in-time recovery from a base backup and the WAL archive to the backup's
/// named restore point, its LSN and its mid-time reaches the same content, and that
/// content is the logical copy's; the live database, which went on changing, differs.
#[test]
fn pitr_to_the_restore_point_lsn_and_mid_time_reach_the_cut() {
    let mut example =
        LedgerExample::start(Postgres::start_with(PostgresOptions { wal_archive: true }));
    let base = example.dir.path().join("base");
    let (code, base_report) = run_json(
        "stillpoint",
        &[
            "base-backup",
            "--config",
            example.config(),
            "--database",
            "ledger",
            "--to",
            base.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{base_report:#}");
    let (code, backup) = example.backup(&[]);
    assert_eq!(code, 0, "{backup:#}");
    let backup_id = backup["backup_id"].as_str().unwrap().to_owned();
    assert!(
        backup["manifest"]["databases"][0]["cut"]["details"]["restore_point"].is_string(),
        "{backup:#}"
    );
    // Commits after the window give time-based recovery a commit to stop before.
    let committed = example.cluster.transactions();
    wait_until(Duration::from_secs(30), "more commits", || {
        example.cluster.transactions() > committed + 20
    });
    example.stop_load();
    archive_current_wal(&example.postgres);

    let recover = |target: &str| {
        let (code, report) = run_json(
            "stillpoint",
            &[
                "pitr",
                &backup_id,
                "--config",
                example.config(),
                "--database",
                "ledger",
                "--base-backup",
                base.to_str().unwrap(),
                "--wal-archive",
                example
                    .postgres
                    .wal_archive_dir()
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "--target",
                target,
                "--timeout",
                "2m",
                "--output",
                "json",
            ],
        );
        assert_eq!(code, 0, "pitr --target {target}: {report:#}");
        report["recovery"]["content"].clone()
    };
    let by_name = recover("name");
    let by_time = recover("time");
    let by_lsn = recover("lsn");
    assert_eq!(
        by_name["digest"], by_time["digest"],
        "{by_name:#}\n{by_time:#}"
    );
    assert_eq!(by_name["digest"], by_lsn["digest"]);
    let ledger_rows = by_name["tables"]["public.ledger"]["rows"].as_u64().unwrap();
    assert_eq!(
        Some(ledger_rows),
        backup["manifest"]["databases"][0]["row_counts"]["public.ledger"].as_u64()
    );

    // The logical copy of the same backup holds the same content ...
    example.postgres.create_database("logical");
    let restored = run(
        "stillpoint",
        &[
            "restore",
            &backup_id,
            "--config",
            example.config(),
            "--database",
            "ledger",
            "--to",
            &example.postgres.url("logical"),
        ],
    );
    assert!(restored.status.success(), "{}", stderr(&restored));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let logical = runtime
        .block_on(stillpoint::pitr::content_hash(
            &example.postgres.url("logical"),
        ))
        .unwrap();
    assert_eq!(by_name["digest"], logical.digest);
    // ... and the live database, which kept changing after the backup, does not: the
    // hash tells states apart.
    let live = runtime
        .block_on(stillpoint::pitr::content_hash(
            &example.postgres.url("ledger"),
        ))
        .unwrap();
    assert_ne!(live.digest, logical.digest);
}

/// Switches to a new WAL segment and waits until the finished one is archived, so the
/// archive holds everything committed so far.
fn archive_current_wal(postgres: &Postgres) {
    let segment = postgres.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    postgres.psql("postgres", "SELECT pg_switch_wal()");
    let archived = postgres.wal_archive_dir().unwrap().join(segment.trim());
    wait_until(
        Duration::from_secs(30),
        "the WAL segment to be archived",
        || archived.exists(),
    );
}

/// A flipped byte in an artifact: `restore` names it and exits 6 before creating the
/// target; a drill fails its checksum check (exit 7) and says so in JUnit.
#[test]
fn a_damaged_artifact_stops_restore_and_drill_before_the_target_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(1);
    let storage = dir.path().join("backups");
    let runbook = Runbook::for_cluster("test", &cluster)
        .cluster_sqlite(&cluster)
        .zstd_level(3)
        .file_storage(dir.path())
        .write_in(dir.path());
    let config = runbook.to_str().unwrap();
    let (code, backup) = run_json("stillpoint", &["backup", "-c", config, "--output", "json"]);
    assert_eq!(code, 0, "{backup:#}");

    // A sound restore first: into a new file, then refused over it.
    let target = dir.path().join("restored-ledger.db");
    let restore = |target: &Path, extra: &[&str]| {
        let mut args = vec![
            "restore",
            "latest",
            "-c",
            config,
            "--database",
            "ledger",
            "--to",
            target.to_str().unwrap(),
        ];
        args.extend(extra);
        run("stillpoint", &args)
    };
    let sound = restore(&target, &[]);
    assert!(sound.status.success(), "{}", stderr(&sound));
    let refused = restore(&target, &[]);
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("not empty"),
        "{}",
        stderr(&refused)
    );

    let artifact_path = backup["manifest"]["databases"][0]["artifact"]["path"]
        .as_str()
        .unwrap();
    let artifact = storage.join(artifact_path);
    let mut bytes = std::fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&artifact, bytes).unwrap();

    let fresh = dir.path().join("never-written.db");
    let damaged = restore(&fresh, &[]);
    assert_eq!(damaged.status.code(), Some(6), "{}", stderr(&damaged));
    assert!(
        stderr(&damaged).contains(artifact_path),
        "{}",
        stderr(&damaged)
    );
    assert!(!fresh.exists(), "a damaged restore wrote its target");
    // --force must not empty the target of a restore that cannot go ahead.
    let forced = restore(&target, &["--force"]);
    assert_eq!(forced.status.code(), Some(6));
    assert!(target.metadata().unwrap().len() > 0);

    let junit = dir.path().join("drill.xml");
    let (code, report) = run_json(
        "stillpoint",
        &[
            "drill",
            "latest",
            "-c",
            config,
            "--junit",
            junit.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 7, "{report:#}");
    let failed = failed_checks(&report);
    assert!(failed.contains(&"checksum:ledger".to_owned()), "{failed:?}");
    assert!(
        !failed.contains(&"checksum:auditor".to_owned()),
        "{failed:?}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("<failure message="), "{xml}");
}

pub(crate) fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report:#}"))
}

/// Issue 20.4 and its "done when": the reference runbook's drill recomputes every hash
/// (through `ledger-node check` on the scratch targets) and fails on each tampering the
/// review tried: an amount changed; a hash rewritten to match, with its successor's link
/// and the auditor's copy; a duplicate audit row; a truncated table. An untampered
/// backup passes (the negative control).
#[test]
fn the_ledger_runbook_fails_on_each_tampering() {
    let mut example = LedgerExample::start(Postgres::start());
    let load = example.stop_load();
    assert_eq!(load["failed"], 0, "{load:#}");
    let pg = |sql: &str| example.postgres.psql("ledger", sql);
    let maria = |sql: &str| example.mariadb.sql("auditor", sql);
    let backup_and_drill = |what: &str| {
        let (code, backup) = example.backup(&[]);
        assert_eq!(code, 0, "{what}: {backup:#}");
        let (code, report) = example.drill(backup["backup_id"].as_str().unwrap());
        (code, report)
    };

    let (code, report) = backup_and_drill("untampered");
    assert_eq!(code, 0, "an untampered backup must pass: {report:#}");

    // One amount changed: no link or pair changes, only a recomputed hash shows it.
    let (tx, amount, hash, next_prev) = {
        let row = pg("SELECT tx_id, amount, hash FROM ledger WHERE seq = 5");
        let next = pg("SELECT prev_hash FROM ledger WHERE seq = 6");
        let fields: Vec<&str> = row.split('|').collect();
        (
            fields[0].to_owned(),
            fields[1].to_owned(),
            fields[2].to_owned(),
            next,
        )
    };
    pg("UPDATE ledger SET amount = amount + 1 WHERE seq = 5");
    let (code, report) = backup_and_drill("amount changed");
    assert_eq!(code, 7, "an edited amount must fail the drill: {report:#}");
    let detail = check(&report, "ledger_node_check")["detail"]
        .as_str()
        .unwrap();
    assert!(detail.contains("seq 5"), "{detail}");

    // The forger recomputes that row's hash (ledger-node check names it) and rewrites
    // the next row's link and the auditor's copy to match.
    let (_, live) = example.cluster.check(None);
    let forged = live["checks"][1]["detail"]
        .as_str()
        .unwrap()
        .split("recomputed ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_owned();
    assert_eq!(forged.len(), 64, "{live:#}");
    pg(&format!(
        "UPDATE ledger SET hash = '{forged}' WHERE seq = 5"
    ));
    pg(&format!(
        "UPDATE ledger SET prev_hash = '{forged}' WHERE seq = 6"
    ));
    maria(&format!(
        "UPDATE audit SET hash = '{forged}' WHERE tx_id = '{tx}'"
    ));
    let (code, report) = backup_and_drill("hash rewritten");
    assert_eq!(code, 7, "a rewritten hash must fail the drill: {report:#}");
    let failed = failed_checks(&report);
    assert_eq!(failed, ["ledger_node_check"], "{report:#}");
    let detail = check(&report, "ledger_node_check")["detail"]
        .as_str()
        .unwrap();
    assert!(detail.contains("seq 6"), "{detail}");

    // Undone: the live pair checks clean again.
    pg(&format!(
        "UPDATE ledger SET amount = {amount}, hash = '{hash}' WHERE seq = 5;
         UPDATE ledger SET prev_hash = '{next_prev}' WHERE seq = 6"
    ));
    maria(&format!(
        "UPDATE audit SET hash = '{hash}' WHERE tx_id = '{tx}'"
    ));
    let (code, live) = example.cluster.check(None);
    assert_eq!(code, 0, "{live:#}");

    // A duplicate audit row (the primary key dropped first, as a careless restore can).
    maria(&format!(
        "ALTER TABLE audit DROP PRIMARY KEY;
         INSERT INTO audit SELECT * FROM audit WHERE tx_id = '{tx}'"
    ));
    let (code, report) = backup_and_drill("duplicate audit row");
    assert_eq!(
        code, 7,
        "a duplicate audit row must fail the drill: {report:#}"
    );
    let detail = check(&report, "ledger_node_check")["detail"]
        .as_str()
        .unwrap();
    assert!(detail.contains(&tx), "{detail}");
    maria(&format!("DELETE FROM audit WHERE tx_id = '{tx}' LIMIT 1"));

    // A truncated table.
    maria("TRUNCATE audit");
    let (code, report) = backup_and_drill("truncated table");
    assert_eq!(code, 7, "a truncated table must fail the drill: {report:#}");
    let failed = failed_checks(&report);
    assert!(
        failed.contains(&"ledger_matches_auditor".to_owned()),
        "{failed:?}"
    );
    assert!(
        failed.contains(&"ledger_node_check".to_owned()),
        "{failed:?}"
    );
}

/// A small cluster of SQLite ledger nodes to pause, and a runbook whose databases are
/// its two SQLite files plus, when asked, a PostgreSQL and a MariaDB database of their
/// own (cut inside the same pause): enough to drill every adapter cheaply.
struct MixedExample {
    cluster: Cluster,
    postgres: Option<Postgres>,
    mariadb: Option<MariaDb>,
    config: String,
    dir: tempfile::TempDir,
}

impl MixedExample {
    fn start(with_servers: bool) -> MixedExample {
        let cluster = Cluster::start(1);
        let load = Load::start(&cluster.ledger_tier(), 2, &[]);
        wait_until(Duration::from_secs(60), "a few transfers", || {
            cluster.transactions() >= 10
        });
        let report = load.stop();
        assert_eq!(report["failed"], 0, "{report:#}");
        let (postgres, mariadb) = if with_servers {
            let postgres = Postgres::start();
            postgres.create_database("pg");
            postgres.psql(
                "pg",
                "CREATE TABLE t (id int PRIMARY KEY, b bytea);
                                 INSERT INTO t VALUES (1, '\\xff00112233'), (2, '\\xfe00112233');",
            );
            let mariadb = MariaDb::start();
            mariadb.create_database("maria");
            mariadb.sql(
                "maria",
                "CREATE TABLE t (id INT PRIMARY KEY, b VARBINARY(8)) ENGINE=InnoDB;
                                  INSERT INTO t VALUES (1, x'FF00112233'), (2, x'FE00112233');",
            );
            (Some(postgres), Some(mariadb))
        } else {
            (None, None)
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("backups")).unwrap();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        let example = MixedExample {
            cluster,
            postgres,
            mariadb,
            config: dir.path().join("runbook.toml").display().to_string(),
            dir,
        };
        example.write_runbook("");
        example
    }

    fn config(&self) -> &str {
        &self.config
    }

    fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    /// (Re)writes the runbook with `drill` as its `[[drill.checks]]`.
    fn write_runbook(&self, drill: &str) {
        let mut runbook =
            Runbook::for_cluster("mixed", &self.cluster).cluster_sqlite(&self.cluster);
        if let (Some(postgres), Some(mariadb)) = (&self.postgres, &self.mariadb) {
            runbook = runbook
                .database(Database::postgres("pg", &postgres.url("pg")).bin_dir(postgres.bin_dir()))
                .database(
                    Database::mariadb("maria", &mariadb.url("maria")).bin_dir(mariadb.bin_dir()),
                );
        }
        runbook
            .file_storage(self.dir.path())
            .scratch_dir(&self.scratch())
            .drill_checks(drill)
            .write(Path::new(&self.config));
    }

    fn backup(&self, extra: &[&str]) -> String {
        let mut args = vec!["backup", "--config", self.config(), "--output", "json"];
        args.extend(extra);
        let (code, backup) = run_json("stillpoint", &args);
        assert_eq!(code, 0, "{backup:#}");
        backup["backup_id"].as_str().unwrap().to_owned()
    }

    fn drill(&self, backup: &str) -> (i32, Value) {
        run_json_with_env(
            "stillpoint",
            &[
                "drill",
                backup,
                "--config",
                self.config(),
                "--output",
                "json",
            ],
            &[("PATH", &path_with_our_binaries())],
        )
    }

    fn manifest_path(&self, backup: &str) -> PathBuf {
        self.dir
            .path()
            .join("backups/backups")
            .join(backup)
            .join("manifest.json")
    }

    /// Scratch databases and files left on the servers and in the scratch directory.
    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(self.scratch())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if let Some(postgres) = &self.postgres {
            let names = postgres.psql(
                "postgres",
                "SELECT datname FROM pg_database WHERE datname LIKE 'stillpoint%'",
            );
            left.extend(names.lines().map(str::to_owned));
        }
        if let Some(mariadb) = &self.mariadb {
            let names = mariadb.sql("", "SHOW DATABASES LIKE 'stillpoint%'");
            left.extend(names.lines().map(str::to_owned));
        }
        left
    }
}

/// Issue 20.6: the window check read one boolean, so a `--no-pause` manifest edited to
/// say `window_valid: true` was certified "cut inside one valid pause window". The check
/// re-derives validity from the recorded facts and refuses unsafe copies.
#[test]
fn a_hand_edited_unsafe_manifest_fails_the_window_check() {
    let example = MixedExample::start(false);
    let paused = example.backup(&[]);
    let (code, report) = example.drill(&paused);
    assert_eq!(code, 0, "a paused backup's drill must pass: {report:#}");
    assert_eq!(check(&report, "window")["ok"], true);

    let unsafe_copy = example.backup(&["--no-pause", "--i-know-this-is-unsafe"]);
    let path = example.manifest_path(&unsafe_copy);
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["window"]["window_valid"] = Value::Bool(true);
    manifest["window"]["invalid_reasons"] = Value::Array(Vec::new());
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let (code, report) = example.drill(&unsafe_copy);
    assert_eq!(code, 7, "{report:#}");
    let window = check(&report, "window");
    assert_eq!(window["ok"], false, "{window:#}");
    assert!(
        window["detail"].as_str().unwrap().contains("--no-pause"),
        "{window:#}"
    );
    assert_eq!(report["window_valid"], false);

    // Without the unsafe flag too: no pause id, no node proved it stayed paused.
    manifest.as_object_mut().unwrap().remove("unsafe_no_pause");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let (code, report) = example.drill(&unsafe_copy);
    assert_eq!(code, 7, "{report:#}");
    let window = check(&report, "window");
    assert_eq!(window["ok"], false, "{window:#}");
    assert!(
        window["detail"].as_str().unwrap().contains("no node"),
        "{window:#}"
    );
}

/// Issue 20.7: checks that prove nothing passed silently: two empty result sets
/// compared equal, and `expect = "NULL"` matched a NULL. Now an empty comparison fails
/// unless the check says it is expected, and NULL is never the text "NULL".
#[test]
fn checks_that_prove_nothing_fail_unless_they_say_so() {
    let example = MixedExample::start(false);
    let backup = example.backup(&[]);
    example.write_runbook(
        r#"
[[drill.checks]]
name = "same_rows"
left = { database = "ledger", sql = "SELECT tx_id, hash FROM ledger" }
right = { database = "auditor", sql = "SELECT tx_id, hash FROM audit" }

[[drill.checks]]
name = "both_empty"
left = { database = "ledger", sql = "SELECT tx_id FROM ledger WHERE 0" }
right = { database = "auditor", sql = "SELECT tx_id FROM audit WHERE 0" }

[[drill.checks]]
name = "null_is_not_text"
database = "ledger"
sql = "SELECT NULL"
expect = "NULL"

[[drill.checks]]
name = "text_null_is_text"
database = "ledger"
sql = "SELECT 'NULL'"
expect = "NULL"

[[drill.checks]]
name = "no_rows_for_one_value"
database = "ledger"
sql = "SELECT 1 WHERE 0"
expect = 1
"#,
    );
    let (code, report) = example.drill(&backup);
    assert_eq!(code, 7, "{report:#}");
    let failed = failed_checks(&report);
    assert_eq!(
        failed,
        ["both_empty", "null_is_not_text", "no_rows_for_one_value"],
        "{report:#}"
    );
    let detail = check(&report, "both_empty")["detail"].as_str().unwrap();
    assert!(detail.contains("allow_empty"), "{detail}");

    // Said to be expected, an empty comparison passes.
    example.write_runbook(
        r#"
[[drill.checks]]
name = "both_empty"
left = { database = "ledger", sql = "SELECT tx_id FROM ledger WHERE 0" }
right = { database = "auditor", sql = "SELECT tx_id FROM audit WHERE 0" }
allow_empty = true
"#,
    );
    let (code, report) = example.drill(&backup);
    assert_eq!(code, 0, "{report:#}");
}

/// Issues 20.10 and 20.2 through a drill: `expect` is a typed value, so `true`, `0.0`
/// and `1e16` match on PostgreSQL, MariaDB and SQLite alike (they print "t"/"1",
/// "0"/"0.0", "1e+16"/"1e16"); the negative controls fail; and bytes that differ in
/// their first byte are different rows.
#[test]
fn typed_expect_values_match_on_every_adapter() {
    let example = MixedExample::start(true);
    let mut checks = String::new();
    for (database, sql_bool, sql_zero, sql_big) in [
        (
            "pg",
            "SELECT true",
            "SELECT 0.0::float8",
            "SELECT 1e16::float8",
        ),
        (
            "maria",
            "SELECT 1 = 1",
            "SELECT CAST(0 AS DOUBLE)",
            "SELECT 1e16",
        ),
        ("ledger", "SELECT 1 = 1", "SELECT 0.0", "SELECT 1e16"),
    ] {
        for (what, sql, expect) in [
            ("true", sql_bool, "true"),
            ("zero", sql_zero, "0.0"),
            ("big", sql_big, "1e16"),
            ("zero_int", sql_zero, "0"),
        ] {
            checks.push_str(&format!(
                "[[drill.checks]]\nname = \"{database}_{what}\"\ndatabase = \"{database}\"\n\
                 sql = \"{sql}\"\nexpect = {expect}\n"
            ));
        }
    }
    checks.push_str(
        r#"
[[drill.checks]]
name = "pg_false_is_not_true"
database = "pg"
sql = "SELECT false"
expect = true

[[drill.checks]]
name = "half_is_not_zero"
database = "ledger"
sql = "SELECT 0.5"
expect = 0.0

[[drill.checks]]
name = "maria_bytes_differ"
left = { database = "maria", sql = "SELECT b FROM t WHERE id = 1" }
right = { database = "maria", sql = "SELECT b FROM t WHERE id = 2" }

[[drill.checks]]
name = "pg_bytes_are_not_text"
left = { database = "pg", sql = "SELECT b FROM t WHERE id = 1" }
right = { database = "pg", sql = "SELECT '\\xff00112233'::text" }
"#,
    );
    example.write_runbook(&checks);
    let backup = example.backup(&[]);
    let (code, report) = example.drill(&backup);
    assert_eq!(code, 7, "{report:#}");
    assert_eq!(
        failed_checks(&report),
        [
            "pg_false_is_not_true",
            "half_is_not_zero",
            "maria_bytes_differ",
            "pg_bytes_are_not_text"
        ],
        "{report:#}"
    );
}

/// Issue 18.6: a drill stopped by SIGTERM (or Ctrl-C) drops its scratch databases and
/// files before it exits, instead of leaving full copies of production data behind.
#[test]
fn a_drill_stopped_by_sigterm_drops_its_scratch_targets() {
    let example = MixedExample::start(true);
    example.write_runbook(
        r#"
[[drill.checks]]
name = "slow"
database = "pg"
sql = "SELECT 1 FROM pg_sleep(600)"
expect = 1
"#,
    );
    let backup = example.backup(&[]);
    let drill = slow_drill(&example, &backup);
    assert!(
        !example.leftovers().is_empty(),
        "the drill made no scratch targets"
    );
    drill.signal("TERM");
    let output = drill.wait_output(Duration::from_secs(60));
    assert_eq!(
        example.leftovers(),
        Vec::<String>::new(),
        "{}",
        stderr(&output)
    );
    assert!(!output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("interrupted"),
        "{}",
        stderr(&output)
    );
}

/// Issue 18.6: a drill killed outright (SIGKILL) cannot clean up; its scratch targets
/// carry a marker, the next drill reports them, and `stillpoint drill --cleanup` finds
/// and removes them.
#[test]
fn drill_cleanup_removes_what_a_killed_drill_left() {
    let example = MixedExample::start(true);
    example.write_runbook(
        r#"
[[drill.checks]]
name = "slow"
database = "pg"
sql = "SELECT 1 FROM pg_sleep(600)"
expect = 1
"#,
    );
    let backup = example.backup(&[]);
    let drill = slow_drill(&example, &backup);
    drill.signal("KILL");
    drop(drill.wait_output(Duration::from_secs(60)));
    // The SQLite scratch directory, the PostgreSQL and the MariaDB scratch databases.
    let left = example.leftovers();
    assert_eq!(left.len(), 3, "{left:?}");

    example.write_runbook("");
    let (code, report) = example.drill(&backup);
    assert_eq!(code, 0, "{report:#}");
    let reported = report["leftovers"].as_array().unwrap();
    assert_eq!(reported.len(), 3, "{report:#}");

    let (code, cleaned) = run_json(
        "stillpoint",
        &[
            "drill",
            "--cleanup",
            "--config",
            example.config(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{cleaned:#}");
    assert_eq!(
        cleaned["removed"].as_array().unwrap().len(),
        3,
        "{cleaned:#}"
    );
    assert_eq!(example.leftovers(), Vec::<String>::new());
}

/// Starts `stillpoint drill` and returns once its slow check runs on the scratch copy.
fn slow_drill(example: &MixedExample, backup: &str) -> crate::util::Process {
    let child = std::process::Command::new(bin("stillpoint"))
        .args(["drill", backup, "--config", example.config()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut drill = crate::util::Process::new(child, "stillpoint drill".to_owned());
    let postgres = example.postgres.as_ref().unwrap();
    wait_until(Duration::from_secs(60), "the slow check to start", || {
        assert!(!drill.has_exited(), "the drill ended early");
        postgres.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE '%pg_sleep(600)%' AND pid <> pg_backend_pid()",
        ) == "1"
    });
    drill
}

/// Two operators: one drill runs (its slow check on the scratch copies) while another
/// operator runs `drill --cleanup` and a drill of their own. The running drill holds
/// its scratch targets (an advisory lock, a named lock, a locked file), so the
/// clean-up leaves all three alone and says so, the other drill does not report them
/// as leftovers, and the running drill still removes them itself.
#[test]
fn drill_cleanup_leaves_a_running_drills_scratch_targets_alone() {
    let example = MixedExample::start(true);
    example.write_runbook(
        r#"
[[drill.checks]]
name = "slow"
database = "pg"
sql = "SELECT 1 FROM pg_sleep(600)"
expect = 1
"#,
    );
    let backup = example.backup(&[]);
    let drill = slow_drill(&example, &backup);
    let running = example.leftovers();
    assert_eq!(running.len(), 3, "{running:?}");

    let (code, cleaned) = run_json(
        "stillpoint",
        &[
            "drill",
            "--cleanup",
            "--config",
            example.config(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{cleaned:#}");
    assert_eq!(cleaned["removed"], serde_json::json!([]), "{cleaned:#}");
    let in_use = cleaned["in_use"].as_array().unwrap();
    assert_eq!(in_use.len(), 3, "{cleaned:#}");
    assert!(
        in_use
            .iter()
            .all(|why| why.as_str().unwrap().contains("a running drill holds it")),
        "{cleaned:#}"
    );
    assert_eq!(example.leftovers(), running);

    // A second drill at the same time: the first one's targets are not leftovers.
    example.write_runbook("");
    let (code, report) = example.drill(&backup);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["leftovers"], serde_json::json!([]), "{report:#}");

    drill.signal("TERM");
    let output = drill.wait_output(Duration::from_secs(60));
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(example.leftovers(), Vec::<String>::new());
}

/// A SQL check that never finishes (a runaway query, a server stopped mid-check) hung
/// the drill, and a CI job with it, forever: SQL checks had no timeout. Every check
/// now has one (`timeout`, default 10m): the check fails saying so, the other checks
/// run, the scratch targets are removed and the drill exits 7.
#[test]
fn a_sql_check_that_never_finishes_fails_at_its_timeout() {
    let example = MixedExample::start(true);
    example.write_runbook(
        r#"
[[drill.checks]]
name = "runaway"
database = "pg"
sql = "SELECT 1 FROM pg_sleep(600)"
expect = 1
timeout = "2s"

[[drill.checks]]
name = "runaway_pair"
left = { database = "maria", sql = "SELECT SLEEP(600)" }
right = { database = "pg", sql = "SELECT 0" }
timeout = "2s"
"#,
    );
    let backup = example.backup(&[]);
    let started = std::time::Instant::now();
    let (code, report) = example.drill(&backup);
    assert_eq!(code, 7, "{report:#}");
    assert!(started.elapsed() < Duration::from_secs(60), "{report:#}");
    for name in ["runaway", "runaway_pair"] {
        let check = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|check| check["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {report:#}"));
        assert_eq!(check["ok"], false, "{report:#}");
        let detail = check["detail"].as_str().unwrap();
        assert!(detail.contains("did not finish within 2s"), "{detail}");
    }
    assert_eq!(example.leftovers(), Vec::<String>::new());
}

/// `--junit` into a directory that does not exist (a CI path mistyped): the drill
/// restored and checked everything (hours, on a large backup), then failed writing
/// the file and printed no report at all. The file is now opened before anything is
/// restored, and a JUnit file that cannot be written after the drill still leaves
/// the report on stdout.
#[test]
fn an_unwritable_junit_path_fails_before_the_drill_restores_anything() {
    let example = MixedExample::start(false);
    example.write_runbook("");
    let backup = example.backup(&[]);
    let junit = example.dir.path().join("no-such-dir").join("drill.xml");
    let output = run(
        "stillpoint",
        &[
            "drill",
            &backup,
            "--config",
            example.config(),
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("no-such-dir/drill.xml"), "{err}");
    assert!(err.contains("nothing was restored"), "{err}");
    assert!(!err.contains("restoring"), "{err}");
    assert_eq!(example.leftovers(), Vec::<String>::new());
}
