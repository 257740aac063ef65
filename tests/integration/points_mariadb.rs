//! Points across both adapters, as an operator runs them: a ledger cluster whose
//! ledger database is on PostgreSQL and whose auditor database is on MariaDB, both
//! archived by one `stillpoint archive` (WAL and binlog), a base backup of each
//! into the storage (the auditor's by mariadb-backup, the default), points under
//! load, then points drilled into fresh scratch servers (a PostgreSQL one and a
//! MariaDB one on the restored data directory) that must pass `ledger-node check`
//! (ledger = auditor across the two) and hold exactly the rows counted inside each
//! point's pause. Both restored with `restore --point` into data directories; the
//! auditor's is started and its rows counted again.
//! Negative controls: a database URL for a mariadb-backup base, a damaged base, and
//! a binlog chunk the newest point needs deleted each make `restore --point` refuse
//! before writing anything, naming what is wrong (the chunk also for `drill --point`
//! and `verify`); an interrupted restore removes its directory.
//! `Setup` is shared with `changes.rs`.
//! The dump base (`base_method = "dump"`) restores into a new database; a data
//! directory the host cannot read makes `base-backup` name both fixes.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use stillpoint::archive::mariadb_backup::ScratchServer;
use stillpoint::archive::{Archive, Position};
use stillpoint::pipeline::PipelineSettings;
use stillpoint::storage::Storage;
use stillpoint_testkit::{MariaDb, Postgres, PostgresOptions};

use crate::cluster::{Cluster, Load};
use crate::util::{Process, bin, run_json_with_env, run_with_env, stderr, wait_until};

pub(crate) struct Setup {
    /// The ledger's server.
    pub(crate) postgres: Postgres,
    pub(crate) mariadb: MariaDb,
    pub(crate) cluster: Cluster,
    pub(crate) dir: tempfile::TempDir,
    runbook: PathBuf,
    archiver: Option<Process>,
    pub(crate) runtime: tokio::runtime::Runtime,
}

impl Setup {
    /// `base_method`: the auditor's, when not the default (mariadb-backup).
    pub(crate) fn start(base_method: Option<&str>) -> Setup {
        let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
        postgres.create_database("ledger");
        let mariadb = MariaDb::start();
        mariadb.create_database("auditor");
        let cluster = Cluster::start_on(
            2,
            postgres.url("ledger"),
            mariadb.url("auditor"),
            &[],
            tempfile::tempdir().unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        // The scratch servers run as `postgres` and read what is staged under it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let runbook = dir.path().join("runbook.toml");
        let text = format!(
            r#"
cluster = "points-mariadb-test"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
[[databases]]
name = "ledger"
adapter = "postgres"
url = "{ledger_db}"
bin_dir = "{pg_bin}"
archive = true
[[databases]]
name = "auditor"
adapter = "mariadb"
url = "{auditor_db}"
bin_dir = "{mariadb_bin}"
archive = true
{base_method}
[storage]
url = "file://{storage}"
[archive]
partial_interval = "200ms"
chunk_interval = "200ms"
spool_dir = "{spool}"
[drill]
scratch_dir = "{scratch}"
[[drill.checks]]
name = "ledger_node_check"
command = ["ledger-node", "check", "--ledger-db", "{{ledger}}", "--auditor-db", "{{auditor}}"]
"#,
            ledgers = cluster
                .ledgers
                .iter()
                .map(|node| format!("\"{}\"", node.address))
                .collect::<Vec<_>>()
                .join(", "),
            auditor = cluster.auditor.address,
            ledger_db = postgres.url("ledger"),
            pg_bin = postgres.bin_dir().display(),
            auditor_db = mariadb.url("auditor"),
            mariadb_bin = mariadb.bin_dir().display(),
            base_method = base_method
                .map(|method| format!("base_method = \"{method}\""))
                .unwrap_or_default(),
            storage = dir.path().join("storage").display(),
            spool = dir.path().join("spool").display(),
            scratch = dir.path().display(),
        );
        std::fs::write(&runbook, text).unwrap();
        Setup {
            postgres,
            mariadb,
            cluster,
            dir,
            runbook,
            archiver: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// `changes = true` on the ledger: its archiver records a change stream.
    pub(crate) fn record_ledger_changes(&self) {
        let text = std::fs::read_to_string(&self.runbook).unwrap();
        let text = text.replacen("archive = true\n", "archive = true\nchanges = true\n", 1);
        std::fs::write(&self.runbook, text).unwrap();
    }

    pub(crate) fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    pub(crate) fn start_archiver(&mut self) {
        let child = Command::new(bin("stillpoint"))
            .args(["archive", "--config", self.config()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.archiver = Some(Process::new(child, "stillpoint archive".to_owned()));
    }

    pub(crate) fn stop_archiver(&mut self) {
        if let Some(archiver) = self.archiver.take() {
            archiver.signal("TERM");
            let _ = archiver.wait_output(Duration::from_secs(30));
        }
    }

    fn archive(&self, database: &str) -> Archive {
        let storage = Storage::open(&format!(
            "file://{}",
            self.dir.path().join("storage").display()
        ))
        .unwrap();
        Archive::new(storage, PipelineSettings::default(), database).unwrap()
    }

    fn env(&self) -> [(&'static str, String); 1] {
        [("PATH", path_with_our_binaries())]
    }

    pub(crate) fn stillpoint(&self, args: &[&str]) -> (i32, Value) {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_json_with_env("stillpoint", args, &env)
    }

    /// `base-backup` of every archived database; panics unless it succeeds.
    pub(crate) fn base_backup(&self) -> Value {
        let (code, bases) =
            self.stillpoint(&["base-backup", "--config", self.config(), "--output", "json"]);
        assert_eq!(code, 0, "base-backup: {bases}");
        bases
    }

    /// `point`: its id; panics unless it succeeds.
    pub(crate) fn take_point(&self) -> String {
        let (code, point) =
            self.stillpoint(&["point", "--config", self.config(), "--output", "json"]);
        assert_eq!(code, 0, "point: {point}");
        point["point_id"].as_str().unwrap().to_owned()
    }

    pub(crate) fn stillpoint_output(&self, args: &[&str]) -> std::process::Output {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_with_env("stillpoint", args, &env)
    }

    /// The tables of a MariaDB database.
    fn tables(&self, database: &str) -> String {
        self.mariadb.sql(
            "information_schema",
            &format!(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = \
                 '{database}'"
            ),
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop_archiver();
    }
}

/// PATH with the directory of our binaries first, for the drill's command check.
fn path_with_our_binaries() -> String {
    let ours = bin("ledger-node").parent().unwrap().display().to_string();
    match std::env::var("PATH") {
        Ok(path) => format!("{ours}:{path}"),
        Err(_) => ours,
    }
}

fn total_rows(database: &Value) -> u64 {
    database["row_counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|count| count.as_u64().unwrap())
        .sum()
}

#[test]
fn points_of_postgres_and_mariadb_restore_exactly_their_cut_and_refuse_a_missing_binlog_chunk() {
    let mut setup = Setup::start(None);
    setup.start_archiver();
    let load = Load::start(&setup.cluster.ledger_tier(), 4, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || setup.cluster.transactions() >= 20,
    );

    let bases = setup.base_backup();
    let bases = bases.as_array().unwrap();
    assert_eq!(bases.len(), 2, "{bases:?}");
    let auditor_base = bases.iter().find(|b| b["database"] == "auditor").unwrap();
    assert_eq!(auditor_base["adapter"], "mariadb", "{auditor_base}");
    // The default base of a MariaDB database: mariadb-backup's copy of the server.
    assert_eq!(auditor_base["kind"], "mariadb_backup", "{auditor_base}");
    assert!(
        auditor_base["details"]["gtid_binlog_pos"]
            .as_str()
            .is_some_and(|gtid| gtid.starts_with("0-")),
        "{auditor_base}"
    );
    assert!(
        auditor_base["start"]["binlog"]["file"].is_string(),
        "{auditor_base}"
    );

    let mut points = Vec::new();
    for _ in 0..3 {
        let (code, point) = setup.stillpoint(&[
            "point",
            "--config",
            setup.config(),
            "--count-rows",
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "point: {point}");
        // Both markers are exact positions: no clock-skew floor.
        assert_eq!(point["exact"], true, "{point}");
        let auditor = &point["databases"][1];
        assert_eq!(auditor["name"], "auditor", "{point}");
        assert_eq!(
            auditor["marker"]["kind"], "mariadb-binlog-position",
            "{point}"
        );
        assert!(
            auditor["marker"]["details"]["gtid_binlog_pos"]
                .as_str()
                .is_some_and(|gtid| gtid.starts_with("0-")),
            "{point}"
        );
        assert!(auditor["base"]["id"].is_string(), "{point}");
        assert!(auditor["row_counts"].is_object(), "{point}");
        points.push(point);
        // Spaced under load as a schedule would take them, so each holds other rows.
        std::thread::sleep(Duration::from_millis(700));
    }
    load.stop();

    // What an operator reads: the markers of both adapters, and the bases and
    // archives of both in `list`.
    let output = setup.stillpoint_output(&["point", "--config", setup.config()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("ledger: restore point stillpoint-point-")
            && text.contains("auditor: binlog binlog.")
            && text.contains("(GTID 0-"),
        "{text}"
    );
    let output = setup.stillpoint_output(&["list", "--config", setup.config()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("auditor: archive") && text.contains("from binlog."),
        "{text}"
    );

    // The first point and one other at random, drilled across both adapters.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let chosen = [0, 1 + seed % 2];
    for index in chosen {
        let id = points[index]["point_id"].as_str().unwrap();
        let (code, drill) = setup.stillpoint(&[
            "drill",
            "--point",
            id,
            "--config",
            setup.config(),
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "drill of point {id}: {drill}");
        let checks = drill["checks"].as_array().unwrap();
        for name in [
            "ledger_node_check",
            "row_counts:ledger",
            "row_counts:auditor",
        ] {
            let check = checks.iter().find(|c| c["name"] == name).unwrap();
            assert_eq!(check["ok"], true, "{check}");
        }
        let auditor = drill["databases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["database"] == "auditor")
            .unwrap();
        assert_eq!(
            auditor["binlog"]["row_counts_match_point"], true,
            "{auditor}"
        );
        // The base was loaded and the binlog replayed from it, not a copy made at
        // the point.
        assert!(
            !auditor["binlog"]["replay"]["chunks"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{auditor}"
        );
        assert!(drill["rto_ms"].as_u64().is_some(), "{drill}");
    }
    // Under load, the points hold different auditor states: the replay stopped at
    // each one's own marker, and the row check is not vacuous.
    let first = total_rows(&points[0]["databases"][1]);
    let other = total_rows(&points[chosen[1]]["databases"][1]);
    assert!(
        first < other,
        "points under load should differ: {first} vs {other}"
    );
    // The drills left no scratch database, server or directory behind.
    let leftovers = setup.mariadb.sql(
        "information_schema",
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE \
         'stillpoint_drill_%'",
    );
    assert_eq!(leftovers.trim(), "0");
    let scratch: Vec<_> = std::fs::read_dir(setup.dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("stillpoint-"))
        .collect();
    assert!(scratch.is_empty(), "left behind: {scratch:?}");

    // A database URL is no place for a mariadb-backup base (a whole server's files):
    // refused before anything is written, saying what to give.
    setup.mariadb.create_database("auditor_refused_url");
    let ledger_unwritten = setup.dir.path().join("ledger-unwritten");
    let output = setup.stillpoint_output(&[
        "restore",
        "--point",
        points[1]["point_id"].as_str().unwrap(),
        "--config",
        setup.config(),
        "--to",
        ledger_unwritten.to_str().unwrap(),
        "--to",
        &setup.mariadb.url("auditor_refused_url"),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("mariadb-backup") && stderr(&output).contains("--to auditor=DIR"),
        "{}",
        stderr(&output)
    );
    assert!(!ledger_unwritten.exists(), "nothing may be written");
    assert_eq!(setup.tables("auditor_refused_url").trim(), "0");

    // Interrupted (SIGINT) once the auditor's data directory is being written, the
    // restore stops its scratch server and removes the directory.
    let interrupted = setup.dir.path().join("interrupted");
    let child = Command::new(bin("stillpoint"))
        .args([
            "restore",
            "--point",
            points[1]["point_id"].as_str().unwrap(),
        ])
        .args(["--config", setup.config(), "--database", "auditor"])
        .args(["--to", interrupted.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut restore = Process::new(child, "stillpoint restore --point".to_owned());
    wait_until(
        Duration::from_secs(120),
        "the data directory to be written",
        || {
            assert!(
                !restore.has_exited(),
                "the restore ended before it was interrupted"
            );
            std::fs::read_dir(&interrupted).is_ok_and(|mut entries| entries.next().is_some())
        },
    );
    restore.signal("INT");
    let output = restore.wait_output(Duration::from_secs(60));
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(
        message.contains("interrupted")
            && message.contains(&format!("{} removed", interrupted.display())),
        "{message}"
    );
    assert!(
        !interrupted.exists(),
        "an interrupted restore left its directory"
    );

    // `restore --point` of both databases into new data directories (one plain --to:
    // DIR/<database> each): the auditor's base extracted and prepared, a server
    // started on it, the binlog replayed to the marker, the server stopped.
    let restored = setup.dir.path().join("restored");
    let (code, restore) = setup.stillpoint(&[
        "restore",
        "--point",
        points[1]["point_id"].as_str().unwrap(),
        "--config",
        setup.config(),
        "--to",
        restored.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "restore: {restore}");
    let databases = restore["databases"].as_array().unwrap();
    let of = |name: &str| databases.iter().find(|d| d["database"] == name).unwrap();
    assert_eq!(
        of("ledger")["recovery"]["row_counts_match_cut"],
        true,
        "{restore}"
    );
    assert!(restored.join("ledger").join("PG_VERSION").exists());
    assert_eq!(
        of("auditor")["binlog"]["row_counts_match_point"],
        true,
        "{restore}"
    );
    // The auditor's data directory starts (it was shut down cleanly) and holds
    // exactly the rows the point counted inside its pause.
    let auditor_dir = restored.join("auditor");
    assert!(auditor_dir.join("ibdata1").exists(), "{restore}");
    let server = setup
        .runtime
        .block_on(ScratchServer::start(
            &auditor_dir,
            Some(setup.mariadb.bin_dir()),
        ))
        .unwrap();
    let expected = points[1]["databases"][1]["row_counts"].as_object().unwrap();
    for (table, rows) in expected {
        let counted = setup
            .runtime
            .block_on(count_rows(&server.url("auditor"), table));
        assert_eq!(
            counted,
            rows.as_u64().unwrap(),
            "{table} in the restored auditor"
        );
    }
    setup.runtime.block_on(server.stop()).unwrap();

    // Negative control: the auditor's base damaged (one byte of its stored artifact):
    // the restore is refused naming the base, before anything is written.
    let auditor_base_id = points[2]["databases"][1]["base"]["id"].as_str().unwrap();
    let artifact = setup
        .dir
        .path()
        .join("storage")
        .join(auditor_base["artifact"]["path"].as_str().unwrap());
    assert_eq!(auditor_base["id"], auditor_base_id);
    let original = std::fs::read(&artifact).unwrap();
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&artifact, &damaged).unwrap();
    let damaged_dir = setup.dir.path().join("damaged");
    let output = setup.stillpoint_output(&[
        "restore",
        "--point",
        points[2]["point_id"].as_str().unwrap(),
        "--config",
        setup.config(),
        "--database",
        "auditor",
        "--to",
        damaged_dir.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(auditor_base_id),
        "the damaged base {auditor_base_id} must be named: {}",
        stderr(&output)
    );
    assert!(!damaged_dir.exists(), "nothing may be written");
    std::fs::write(&artifact, &original).unwrap();

    // Negative control: a binlog chunk inside the newest point's replay deleted
    // (record and artifact). The archiver is stopped first, so nothing re-pushes it.
    setup.stop_archiver();
    let newest = &points[2];
    let newest_id = newest["point_id"].as_str().unwrap();
    let auditor = &newest["databases"][1];
    let base_start: Position = serde_json::from_value(auditor["base"]["start"].clone()).unwrap();
    let target: Position = serde_json::from_value(auditor["target"].clone()).unwrap();
    let archive = setup.archive("auditor");
    let catalog = setup.runtime.block_on(archive.catalog()).unwrap();
    let victim = catalog
        .chunks
        .iter()
        .rev()
        .find(|chunk| {
            chunk.range().is_some_and(|(start, end)| {
                *end > base_start
                    && *end <= target
                    && start.as_binlog().map(|(file, _)| file)
                        == end.as_binlog().map(|(file, _)| file)
            })
        })
        .expect("a chunk inside the replay")
        .clone();
    setup.runtime.block_on(archive.remove(&victim)).unwrap();
    let data_dir = setup.dir.path().join("refused");
    let auditor_dir = setup.dir.path().join("auditor-refused");
    let output = setup.stillpoint_output(&[
        "restore",
        "--point",
        newest_id,
        "--config",
        setup.config(),
        "--to",
        &format!("ledger={}", data_dir.display()),
        "--to",
        &format!("auditor={}", auditor_dir.display()),
    ]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&victim.name),
        "the deleted chunk {} must be named: {}",
        victim.name,
        stderr(&output)
    );
    assert!(
        !data_dir.exists() && !auditor_dir.exists(),
        "nothing may be written before the checks pass"
    );

    // A drill of that point refuses the same way, before any scratch target exists.
    let output =
        setup.stillpoint_output(&["drill", "--point", newest_id, "--config", setup.config()]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&victim.name),
        "the deleted chunk {} must be named: {}",
        victim.name,
        stderr(&output)
    );

    let (code, verified) = setup.stillpoint(&[
        "verify",
        "--point",
        newest_id,
        "--config",
        setup.config(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 6, "verify with a chunk gone: {verified}");
    let databases = verified["points"][0]["databases"].as_array().unwrap();
    let of = |name: &str| databases.iter().find(|d| d["database"] == name).unwrap();
    assert_eq!(of("ledger")["ok"], true, "{verified}");
    let problem = of("auditor")["problem"].as_str().unwrap();
    assert!(
        problem.contains("gap") && problem.contains(&victim.name),
        "verify must name the gap and the chunk: {problem}"
    );
}

/// Rows of `table` in the database at `url`.
async fn count_rows(url: &str, table: &str) -> u64 {
    use mysql_async::prelude::Queryable;
    let mut conn = mysql_async::Conn::from_url(url).await.unwrap();
    let count: Option<u64> = conn
        .query_first(format!("SELECT COUNT(*) FROM `{table}`"))
        .await
        .unwrap();
    drop(conn);
    count.unwrap()
}

/// The dump stays a choice (`base_method = "dump"`, for servers whose files
/// stillpoint cannot read): its base loads into a new database, by `restore --point`
/// and by a drill's scratch database, to exactly the point's rows; a data directory
/// is refused for it, naming what to give.
#[test]
fn a_point_restores_mariadb_from_a_dump_base_into_a_new_database() {
    let mut setup = Setup::start(Some("dump"));
    setup.start_archiver();
    let load = Load::start(&setup.cluster.ledger_tier(), 2, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || setup.cluster.transactions() >= 10,
    );
    let (code, bases) = setup.stillpoint(&[
        "base-backup",
        "--config",
        setup.config(),
        "--database",
        "auditor",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "base-backup: {bases}");
    assert_eq!(bases[0]["kind"], "mariadb_dump", "{bases}");
    let (code, bases) = setup.stillpoint(&[
        "base-backup",
        "--config",
        setup.config(),
        "--database",
        "ledger",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "base-backup: {bases}");
    let (code, point) = setup.stillpoint(&[
        "point",
        "--config",
        setup.config(),
        "--count-rows",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "point: {point}");
    load.stop();
    let id = point["point_id"].as_str().unwrap();

    let (code, drill) = setup.stillpoint(&[
        "drill",
        "--point",
        id,
        "--config",
        setup.config(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "drill: {drill}");
    for name in ["ledger_node_check", "row_counts:auditor"] {
        let check = drill["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        assert_eq!(check["ok"], true, "{check}");
    }

    // A data directory is no place for a dump: refused, naming what to give.
    let unwritten = setup.dir.path().join("auditor-dir");
    let output = setup.stillpoint_output(&[
        "restore",
        "--point",
        id,
        "--config",
        setup.config(),
        "--database",
        "auditor",
        "--to",
        unwritten.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--to auditor=mysql://"),
        "{}",
        stderr(&output)
    );
    assert!(!unwritten.exists(), "nothing may be written");

    setup.mariadb.create_database("auditor_restored");
    let (code, restore) = setup.stillpoint(&[
        "restore",
        "--point",
        id,
        "--config",
        setup.config(),
        "--database",
        "auditor",
        "--to",
        &setup.mariadb.url("auditor_restored"),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "restore: {restore}");
    assert_eq!(
        restore["databases"][0]["binlog"]["row_counts_match_point"], true,
        "{restore}"
    );
    assert_ne!(setup.tables("auditor_restored").trim(), "0");
}

/// mariadb-backup reads the server's files: where this host cannot read the data
/// directory (here: the server's directory moved away under it, as a remote
/// server's path is absent here), base-backup says so and names both fixes, and
/// keeps nothing. Control: the same command with the directory back takes a base,
/// as a user with only mariadb-backup's privileges and a password that quoting
/// would break (it reaches mariadb-backup in a defaults file).
#[test]
fn a_mariadb_base_backup_names_a_data_directory_it_cannot_read() {
    let mariadb = MariaDb::start();
    mariadb.create_database("auditor");
    // In SQL, \\ is one backslash: the password is p"w\d #1.
    mariadb.sql(
        "",
        r#"CREATE USER 'backup'@'%' IDENTIFIED BY 'p"w\\d #1';
           GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO 'backup'@'%';
           GRANT SELECT ON auditor.* TO 'backup'@'%';"#,
    );
    let url = format!(
        "mysql://backup:p%22w%5Cd%20%231@127.0.0.1:{}/auditor",
        mariadb.port()
    );
    let dir = tempfile::tempdir().unwrap();
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"
cluster = "unreadable"
[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]
[[databases]]
name = "auditor"
adapter = "mariadb"
url = "{url}"
bin_dir = "{bin}"
archive = true
[storage]
url = "file://{storage}"
"#,
            bin = mariadb.bin_dir().display(),
            storage = dir.path().join("storage").display(),
        ),
    )
    .unwrap();
    let config = runbook.to_str().unwrap();
    let data_dir = mariadb.data_dir().to_owned();
    let moved = data_dir.with_extension("moved");
    std::fs::rename(&data_dir, &moved).unwrap();
    let output = crate::util::run("stillpoint", &["base-backup", "--config", config]);
    std::fs::rename(&moved, &data_dir).unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let said = stderr(&output);
    assert!(
        said.contains(&data_dir.display().to_string())
            && said.contains("on the database host")
            && said.contains("base_method = \"dump\""),
        "{said}"
    );
    assert!(
        !dir.path().join("storage").join("bases").exists()
            || std::fs::read_dir(dir.path().join("storage").join("bases"))
                .unwrap()
                .next()
                .is_none(),
        "nothing may be kept"
    );

    let (code, bases) = crate::util::run_json(
        "stillpoint",
        &["base-backup", "--config", config, "--output", "json"],
    );
    assert_eq!(code, 0, "base-backup: {bases}");
    assert_eq!(bases[0]["kind"], "mariadb_backup", "{bases}");
}
