//! Points attacked as an operator would (issue 11's breaker): each test is a defect
//! found by running the built binaries against real servers, kept as a regression
//! test. A small ledger cluster on one throwaway PostgreSQL server, its two databases
//! archived by `stillpoint archive` into file:// storage.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use stillpoint_testkit::{MariaDb, Postgres, PostgresOptions};

use crate::cluster::Cluster;
use crate::util::{Process, bin, run, stderr, wait_until};

struct Setup {
    _postgres: Postgres,
    _cluster: Cluster,
    dir: tempfile::TempDir,
    runbook: PathBuf,
    archiver: Option<Process>,
}

impl Setup {
    /// The cluster, its archiver running, a base backup of each database.
    fn start() -> Setup {
        Setup::start_with("")
    }

    /// [`Setup::start`], with more lines in the runbook's `[pause]`.
    fn start_with(pause: &str) -> Setup {
        let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
        postgres.create_database("ledger");
        postgres.create_database("auditor");
        let cluster = Cluster::start_on(
            1,
            postgres.url("ledger"),
            postgres.url("auditor"),
            &[],
            tempfile::tempdir().unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        // The scratch servers run as `postgres` and read what is staged under it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let runbook = dir.path().join("runbook.toml");
        let text = format!(
            r#"
cluster = "points-breaker-test"
[pause]
tiers = [{{ addresses = ["{ledger_node}"] }}, {{ addresses = ["{auditor_node}"] }}]
{pause}
[[databases]]
name = "ledger"
adapter = "postgres"
url = "{ledger}"
bin_dir = "{bin_dir}"
archive = true
[[databases]]
name = "auditor"
adapter = "postgres"
url = "{auditor}"
bin_dir = "{bin_dir}"
archive = true
[storage]
url = "file://{storage}"
[archive]
partial_interval = "200ms"
spool_dir = "{spool}"
"#,
            ledger_node = cluster.ledgers[0].address,
            auditor_node = cluster.auditor.address,
            ledger = postgres.url("ledger"),
            auditor = postgres.url("auditor"),
            bin_dir = postgres.bin_dir().display(),
            storage = dir.path().join("storage").display(),
            spool = dir.path().join("spool").display(),
        );
        std::fs::write(&runbook, text).unwrap();
        let mut setup = Setup {
            _postgres: postgres,
            _cluster: cluster,
            dir,
            runbook,
            archiver: None,
        };
        let child = Command::new(bin("stillpoint"))
            .args(["archive", "--config", setup.config()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        setup.archiver = Some(Process::new(child, "stillpoint archive".to_owned()));
        // A base is usable once the archive holds the WAL from its start: wait for
        // the archiver's first chunks.
        for database in ["ledger", "auditor"] {
            let archive = setup.path("storage").join("archive").join(database);
            wait_until(
                Duration::from_secs(60),
                "the archiver's first chunk",
                || {
                    std::fs::read_dir(&archive).is_ok_and(|entries| {
                        entries
                            .flatten()
                            .any(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
                    })
                },
            );
        }
        let output = setup.stillpoint(&["base-backup", "--config", setup.config()]);
        assert!(output.status.success(), "base-backup: {}", stderr(&output));
        setup
    }

    fn nodes(&self) -> String {
        format!(
            "{},{}",
            self._cluster.ledgers[0].address, self._cluster.auditor.address
        )
    }

    fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn stillpoint(&self, args: &[&str]) -> std::process::Output {
        run("stillpoint", args)
    }

    fn point(&self) {
        let output = self.stillpoint(&["point", "--config", self.config(), "--wait", "60s"]);
        assert!(output.status.success(), "point: {}", stderr(&output));
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(archiver) = self.archiver.take() {
            archiver.signal("TERM");
            let _ = archiver.wait_output(Duration::from_secs(30));
        }
    }
}

fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// `restore --point` stopped by SIGINT while the base is extracted into the target,
/// and again while the scratch server replays there (its restore_command waiting on
/// the WAL spool): the half-written data directory is removed, not left at `--to`
/// looking like a restore, and so is the staging directory (the WAL spool) under
/// TMPDIR. Defect: it was kept ("the scratch server was stopped; … was kept"),
/// holding part of the base. Control: the same restore left alone keeps a whole data
/// directory, and its staging goes too.
#[test]
fn an_interrupted_point_restore_leaves_no_half_written_target() {
    let setup = Setup::start();
    setup.point();
    let staging = setup.path("tmp");
    std::fs::create_dir(&staging).unwrap();
    let restore = |target: &Path| {
        Command::new(bin("stillpoint"))
            .args(["restore", "--point", "latest", "--config", setup.config()])
            .args(["--database", "ledger", "--to", target.to_str().unwrap()])
            .env("TMPDIR", &staging)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let phases = [
        "the base to be extracted into the target",
        "the scratch server to replay",
    ];
    for (index, phase) in phases.into_iter().enumerate() {
        let target = setup.path(&format!("interrupted-{index}"));
        let mut restore = Process::new(restore(&target), "stillpoint restore --point".to_owned());
        wait_until(Duration::from_secs(120), phase, || {
            assert!(
                !restore.has_exited(),
                "the restore ended before it was interrupted ({phase})"
            );
            if index == 0 {
                has_entries(&target)
            } else {
                // The server's log is made just before it starts on the data directory.
                target.join("stillpoint-recovery.log").exists()
            }
        });
        restore.signal("INT");
        let output = restore.wait_output(Duration::from_secs(60));
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{phase}: {message}");
        assert!(message.contains("interrupted"), "{phase}: {message}");
        assert!(
            message.contains(&format!("{} removed", target.display())),
            "the message says the target went ({phase}): {message}"
        );
        assert!(
            !target.exists(),
            "an interrupted restore ({phase}) left {} behind: {:?}",
            target.display(),
            std::fs::read_dir(&target).map(|entries| entries.count())
        );
        assert!(
            !has_entries(&staging),
            "an interrupted restore ({phase}) left its staging behind: {:?}",
            std::fs::read_dir(&staging)
                .map(|entries| entries.flatten().map(|e| e.path()).collect::<Vec<_>>())
        );
    }

    // Control: uninterrupted, the same restore keeps its target, whole.
    let whole = setup.path("whole");
    let output = Process::new(restore(&whole), "stillpoint restore --point".to_owned())
        .wait_output(Duration::from_secs(120));
    assert!(output.status.success(), "restore: {}", stderr(&output));
    assert!(whole.join("PG_VERSION").exists());
    assert!(whole.join("stillpoint-pitr.conf").exists());
    assert!(!has_entries(&staging), "a restore left its staging behind");
}

/// `base-backup` while the archive holds no WAL (no archiver, or one started a moment
/// ago, as a script running the runbook's steps 1 and 2 would): the base's record is
/// written only once the archive holds the WAL from its start; with no archiver it
/// is refused (exit 2) after a bounded wait, naming the archive and the fix, with no
/// base listed. Defect: the base was stored and listed though the archive could start
/// after it (it starts where the archiver's slot was made), so every point on it
/// failed ("the log before it was never archived") until another base was taken.
/// Control: with the archiver running, the same command takes a base.
#[test]
fn a_base_backup_before_the_archive_holds_wal_is_refused() {
    let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
    postgres.create_database("ledger");
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"
cluster = "points-breaker-base"
[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]
[[databases]]
name = "ledger"
adapter = "postgres"
url = "{url}"
bin_dir = "{bin_dir}"
archive = true
[storage]
url = "file://{storage}"
[archive]
spool_dir = "{spool}"
"#,
            url = postgres.url("ledger"),
            bin_dir = postgres.bin_dir().display(),
            storage = storage.display(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let config = runbook.to_str().unwrap();

    // No archiver yet: the archive is empty.
    let output = run("stillpoint", &["base-backup", "--config", config]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("the archive of ledger"), "{message}");
    assert!(message.contains("stillpoint archive"), "{message}");
    assert!(
        !storage.join("bases").join("ledger").exists()
            || std::fs::read_dir(storage.join("bases").join("ledger"))
                .unwrap()
                .next()
                .is_none(),
        "a refused base backup stored something"
    );

    // Control: with the archiver running and a chunk stored, a base is taken.
    let child = Command::new(bin("stillpoint"))
        .args(["archive", "--config", config])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let archiver = Process::new(child, "stillpoint archive".to_owned());
    let archive = storage.join("archive").join("ledger");
    wait_until(
        Duration::from_secs(60),
        "the archiver's first chunk",
        || {
            std::fs::read_dir(&archive).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
            })
        },
    );
    let output = run("stillpoint", &["base-backup", "--config", config]);
    archiver.signal("TERM");
    let _ = archiver.wait_output(Duration::from_secs(30));
    assert!(output.status.success(), "base-backup: {}", stderr(&output));
}

/// The MariaDB server hangs (SIGSTOP) after `point` marked it inside the pause but
/// before it closed the marker's snapshot: `point` gives up within `--wait`, naming
/// the database, writes no point, and the cluster is not left paused. Defect: it
/// waited on the hung server forever (no deadline after the release). Control: the
/// same point with the server running is written.
#[test]
fn a_point_whose_database_hangs_after_its_mark_gives_up_within_its_wait() {
    let mariadb = MariaDb::start();
    mariadb.create_database("app");
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"
cluster = "points-breaker-hang"
[pause]
tiers = [{{ addresses = ["{ledger}"] }}, {{ addresses = ["{auditor}"] }}]
# Held open long enough for the test to stop the server between the mark and the
# release.
min_window = "2s"
[[databases]]
name = "app"
adapter = "mariadb"
url = "{url}"
bin_dir = "{bin_dir}"
archive = true
[storage]
url = "file://{storage}"
[archive]
chunk_interval = "200ms"
spool_dir = "{spool}"
"#,
            ledger = cluster.ledgers[0].address,
            auditor = cluster.auditor.address,
            url = mariadb.url("app"),
            bin_dir = mariadb.bin_dir().display(),
            storage = storage.display(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let config = runbook.to_str().unwrap();
    let child = Command::new(bin("stillpoint"))
        .args(["archive", "--config", config])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let archiver = Process::new(child, "stillpoint archive".to_owned());
    let archive = storage.join("archive").join("app");
    wait_until(
        Duration::from_secs(60),
        "the archiver's first chunk",
        || {
            std::fs::read_dir(&archive).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
            })
        },
    );
    let output = run("stillpoint", &["base-backup", "--config", config]);
    assert!(output.status.success(), "base-backup: {}", stderr(&output));
    let nodes = format!("{},{}", cluster.ledgers[0].address, cluster.auditor.address);
    let server = mariadb_server_pid(&mariadb);

    let child = Command::new(bin("stillpoint"))
        .args(["point", "--config", config, "--wait", "5s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let point = Process::new(child, "stillpoint point".to_owned());
    wait_until(Duration::from_secs(30), "the point's pause", || {
        crate::util::paused_flags(&nodes)
            .iter()
            .all(|paused| *paused)
    });
    // The marks are taken right after the pause; the window is held 2 s.
    std::thread::sleep(Duration::from_millis(500));
    signal(server, "STOP");
    let output = point.wait_output(Duration::from_secs(60));
    signal(server, "CONT");
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(6), "{message}");
    assert!(message.contains("database app"), "{message}");
    assert!(message.contains("no point was written"), "{message}");
    assert!(
        crate::util::paused_flags(&nodes)
            .iter()
            .all(|paused| !paused),
        "the cluster was left paused"
    );
    assert!(
        std::fs::read_dir(storage.join("points"))
            .map_or(true, |mut entries| entries.next().is_none()),
        "a point was written"
    );

    // Control: the server answering, the same point is written.
    let output = run(
        "stillpoint",
        &["point", "--config", config, "--wait", "30s"],
    );
    archiver.signal("TERM");
    let _ = archiver.wait_output(Duration::from_secs(30));
    assert!(output.status.success(), "point: {}", stderr(&output));
}

/// The pid of the test's mariadbd: the one whose command line names its data
/// directory.
fn mariadb_server_pid(mariadb: &MariaDb) -> u32 {
    let output = Command::new("pgrep")
        .args(["-f", &format!("mariadbd.*{}", mariadb.data_dir().display())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mariadbd for {}", mariadb.data_dir().display()))
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// `wal-fetch` as restore_command with `--database` naming a MariaDB database (a
/// runbook slip): exit 126, so PostgreSQL aborts recovery, naming the database and
/// its adapter. Defect: it answered "not in the archive" (exit 1), which PostgreSQL
/// reads as the archive's end and promotes early. `wal-push` refuses it too. Control:
/// a PostgreSQL database's archive without the segment still exits 1.
#[test]
fn wal_fetch_for_a_database_that_is_not_postgres_aborts_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"
cluster = "points-breaker-wal-fetch"
[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]
[[databases]]
name = "ledger"
adapter = "postgres"
url = "postgres://postgres@127.0.0.1:1/ledger"
archive = true
[[databases]]
name = "auditor"
adapter = "mariadb"
url = "mysql://root@127.0.0.1:1/auditor"
archive = true
[storage]
url = "file://{storage}"
"#,
            storage = dir.path().join("storage").display(),
        ),
    )
    .unwrap();
    let config = runbook.to_str().unwrap();
    let segment = "000000010000000000000001";
    let dest = dir.path().join("fetched");
    let dest = dest.to_str().unwrap();

    let output = run(
        "stillpoint",
        &[
            "wal-fetch",
            "--config",
            config,
            "--database",
            "auditor",
            segment,
            dest,
        ],
    );
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(126), "{message}");
    assert!(message.contains("auditor"), "{message}");
    assert!(message.contains("MariaDB"), "{message}");

    let wal = dir.path().join(segment);
    std::fs::write(&wal, vec![0u8; 16 * 1024 * 1024]).unwrap();
    let output = run(
        "stillpoint",
        &[
            "wal-push",
            "--config",
            config,
            "--database",
            "auditor",
            wal.to_str().unwrap(),
        ],
    );
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("MariaDB"), "{message}");
    assert!(
        !dir.path()
            .join("storage")
            .join("archive")
            .join("auditor")
            .exists(),
        "wal-push wrote into a MariaDB archive"
    );

    // Control: a PostgreSQL archive without the segment is "not there" (exit 1).
    let output = run(
        "stillpoint",
        &[
            "wal-fetch",
            "--config",
            config,
            "--database",
            "ledger",
            segment,
            dest,
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
}

/// The newest point's manifest damaged: `restore --point latest` still restores the
/// newest readable point, but says which newer one it passed over; `restore --point`
/// of the damaged point's id names the damage (exit 6) instead of "no point".
/// Defect: `latest` silently restored an older point (the operator loses data without
/// a word) and the damaged id was "no point". Control: the readable point restores.
#[test]
fn a_damaged_newest_point_is_named_not_silently_skipped() {
    let setup = Setup::start();
    setup.point();
    // Ids start with the second: a second apart, their order is the points' order.
    std::thread::sleep(Duration::from_millis(1100));
    setup.point();
    let points = setup.path("storage").join("points");
    let mut ids: Vec<String> = std::fs::read_dir(&points)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    let (older, newest) = (&ids[0], &ids[1]);
    std::fs::write(
        points.join(newest).join("point.json"),
        "{\"format\": 1, \"poi",
    )
    .unwrap();

    let output = setup.stillpoint(&[
        "restore",
        "--point",
        newest,
        "--config",
        setup.config(),
        "--database",
        "ledger",
        "--to",
        setup.path("damaged").to_str().unwrap(),
    ]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(6), "{message}");
    assert!(
        message.contains(&format!("points/{newest}/point.json")),
        "{message}"
    );
    assert!(message.contains("cannot be read"), "{message}");
    assert!(!setup.path("damaged").exists());

    let target = setup.path("latest");
    let output = setup.stillpoint(&[
        "restore",
        "--point",
        "latest",
        "--config",
        setup.config(),
        "--database",
        "ledger",
        "--to",
        target.to_str().unwrap(),
    ]);
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert!(message.contains(older.as_str()), "{message}");
    assert!(
        message.contains(&format!("points/{newest}/point.json")),
        "latest passed over the damaged newer point without a word: {message}"
    );
    assert!(target.join("PG_VERSION").exists());
}

/// `point` stopped by SIGTERM (systemd, `timeout`) inside its pause: it releases the
/// cluster, says so, exits 1 as `--help` says for other errors, and writes no point.
/// Defect: it had no signal handling and died of the signal (exit 143, no word).
/// Control: the same point left alone is written.
#[test]
fn a_point_stopped_by_sigterm_in_its_pause_releases_and_says_so() {
    let setup = Setup::start_with("min_window = \"2s\"");
    let nodes = setup.nodes();
    let child = Command::new(bin("stillpoint"))
        .args(["point", "--config", setup.config()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let point = Process::new(child, "stillpoint point".to_owned());
    wait_until(Duration::from_secs(30), "the point's pause", || {
        crate::util::paused_flags(&nodes)
            .iter()
            .all(|paused| *paused)
    });
    point.signal("TERM");
    let output = point.wait_output(Duration::from_secs(30));
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("interrupted"), "{message}");
    assert!(message.contains("no point was written"), "{message}");
    assert!(
        crate::util::paused_flags(&nodes)
            .iter()
            .all(|paused| !paused),
        "the cluster was left paused"
    );
    let points = setup.path("storage").join("points");
    assert!(
        std::fs::read_dir(&points).map_or(true, |mut entries| entries.next().is_none()),
        "a point was written"
    );

    setup.point();
}

/// Two operators take a point of one cluster at the same moment (two `stillpoint
/// point` processes, each holding its pause 300 ms so they overlap). A node takes a
/// pause from one coordinator at a time, so each point either commits or fails as a
/// pause failure (exit 3) naming the pause that holds the node; none leaves the
/// cluster paused, and every point listed afterwards verifies.
#[test]
fn two_points_at_once_commit_or_name_the_other_pause_and_leave_the_cluster_running() {
    let setup = Setup::start_with("min_window = \"300ms\"");
    let nodes = setup.nodes();
    let spawn = || {
        Command::new(bin("stillpoint"))
            .args(["point", "--config", setup.config(), "--wait", "60s"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let outputs = [
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    ];
    let committed = outputs
        .iter()
        .filter(|output| output.status.success())
        .count();
    assert!(
        committed >= 1,
        "neither point committed: {} / {}",
        stderr(&outputs[0]),
        stderr(&outputs[1])
    );
    for failed in outputs.iter().filter(|output| !output.status.success()) {
        let message = stderr(failed);
        assert_eq!(failed.status.code(), Some(3), "{message}");
        assert!(
            message.contains("paused by"),
            "the other pause is named: {message}"
        );
    }
    assert!(
        crate::util::paused_flags(&nodes)
            .iter()
            .all(|paused| !paused),
        "the cluster was left paused"
    );
    let output = setup.stillpoint(&["verify", "--config", setup.config(), "--output", "json"]);
    assert!(output.status.success(), "verify: {}", stderr(&output));
    let verified: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        verified["points"].as_array().map(Vec::len),
        Some(committed),
        "every committed point is listed and verifies: {verified}"
    );
    for output in &outputs {
        eprintln!("{}", stderr(output));
    }
    eprintln!("{committed} of 2 points committed");
}
