//! Continuous archiving of a real PostgreSQL server, as an operator runs it: `stillpoint
//! archive` in the foreground (pg_receivewal under it), the archive read back through
//! the library's catalog, the archiver killed mid-load and started again (with its
//! spool kept, then with it lost), and `stillpoint wal-fetch` as the restore_command
//! of a scratch server recovering to a named restore point. Also `wal-push` as an
//! archive_command would call it, and the server checks archiving needs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use stillpoint::archive::{Archive, Catalog, ChunkKind, ChunkRecord, Lsn, Position};
use stillpoint::pipeline::PipelineSettings;
use stillpoint::storage::Storage;
use stillpoint_testkit::{Postgres, PostgresOptions, free_port};

use crate::util::{Process, bin, run, stderr, wait_until};

/// A PostgreSQL database `app` with a table, and a runbook that archives it into a
/// `file://` storage.
struct Source {
    postgres: Postgres,
    dir: tempfile::TempDir,
    runbook: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Source {
    fn start() -> Source {
        let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
        postgres.create_database("app");
        postgres.psql(
            "app",
            "CREATE TABLE items (id bigserial PRIMARY KEY, note text NOT NULL)",
        );
        let dir = tempfile::tempdir().unwrap();
        // The scratch server runs as `postgres` and reads the runbook and storage.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let source = Source {
            runbook: dir.path().join("runbook.toml"),
            postgres,
            dir,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        source.write_runbook(&source.postgres.url("app"));
        source
    }

    fn write_runbook(&self, url: &str) {
        let text = format!(
            r#"
cluster = "archive-test"
[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]
[[databases]]
name = "app"
adapter = "postgres"
url = "{url}"
bin_dir = "{bin_dir}"
archive = true
[storage]
url = "file://{storage}"
[archive]
partial_interval = "200ms"
spool_dir = "{spool}"
"#,
            bin_dir = self.postgres.bin_dir().display(),
            storage = self.storage_dir().display(),
            spool = self.spool_root().display(),
        );
        std::fs::write(&self.runbook, text).unwrap();
        std::fs::set_permissions(&self.runbook, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn spool_root(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    fn archive(&self) -> Archive {
        let storage = Storage::open(&format!("file://{}", self.storage_dir().display())).unwrap();
        Archive::new(storage, PipelineSettings::default(), "app").unwrap()
    }

    fn catalog(&self) -> Catalog {
        self.runtime.block_on(self.archive().catalog()).unwrap()
    }

    fn archived_to(&self) -> Option<Lsn> {
        self.catalog().end().and_then(|end| end.lsn())
    }

    fn current_lsn(&self) -> Lsn {
        self.postgres
            .psql("app", "SELECT pg_current_wal_lsn()")
            .parse()
            .unwrap()
    }

    fn start_archiver(&self) -> Process {
        let child = Command::new(bin("stillpoint"))
            .args(["archive", "--config", self.config(), "--output", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Process::new(child, "stillpoint archive".to_owned())
    }

    fn rows(&self) -> u64 {
        self.postgres
            .psql("app", "SELECT count(*) FROM items")
            .parse()
            .unwrap()
    }
}

/// The children of `pid` (any of its threads may have started them).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            found.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

/// SIGKILLs the archiver, and its pg_receivewal too unless `orphan`: nothing gets to
/// clean up. Returns the pg_receivewal's pid.
fn kill_hard(archiver: Process, orphan: bool) -> u32 {
    let receivers = children(archiver.pid());
    assert_eq!(receivers.len(), 1, "the archiver runs one pg_receivewal");
    archiver.signal("KILL");
    if !orphan {
        let _ = Command::new("kill")
            .args(["-KILL", &receivers[0].to_string()])
            .status();
    }
    drop(archiver);
    receivers[0]
}

/// Kills a process we left running when dropped (a failing test must not leak it).
pub(crate) struct Orphan(pub u32);

impl Drop for Orphan {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

pub(crate) fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Every chunk that counts follows the one before it exactly: no gap, no overlap,
/// nothing superseded left behind, and each WAL segment once.
fn assert_seamless(catalog: &Catalog) {
    assert!(catalog.gaps().is_empty(), "gaps: {:?}", catalog.gaps());
    assert!(
        catalog.superseded.is_empty(),
        "superseded chunks left behind: {:?}",
        catalog
            .superseded
            .iter()
            .map(|c| &c.name)
            .collect::<Vec<_>>()
    );
    assert!(catalog.unreadable.is_empty(), "{:?}", catalog.unreadable);
    for pair in catalog.chunks.windows(2) {
        assert_eq!(
            pair[0].end, pair[1].start,
            "{} and {} do not follow each other",
            pair[0].name, pair[1].name
        );
    }
    // Each whole segment once. The growing segment may be in several pieces (each
    // continuing the one before, as checked above); no other segment is.
    let segment = |chunk: &ChunkRecord| chunk.name[..24].to_owned();
    let mut whole: Vec<String> = catalog
        .chunks
        .iter()
        .filter(|chunk| chunk.kind == ChunkKind::PgWalSegment)
        .map(segment)
        .collect();
    let count = whole.len();
    whole.dedup();
    assert_eq!(whole.len(), count, "a segment is archived twice");
    let newest = catalog.chunks.last().map(segment);
    for chunk in &catalog.chunks {
        if chunk.kind == ChunkKind::PgWalPartial {
            assert_eq!(
                Some(segment(chunk)),
                newest,
                "{} is a piece of a segment before the newest",
                chunk.name
            );
            assert!(
                !whole.contains(&segment(chunk)),
                "{} is also whole",
                chunk.name
            );
        }
    }
}

/// A load of about 1 MiB of WAL per statement, `statements` of them, committed one by
/// one with a short sleep between: it crosses several 16 MiB segments.
fn start_load(source: &Source, statements: u32) -> std::process::Child {
    let sql = format!(
        "DO $$ BEGIN FOR i IN 1..{statements} LOOP \
           INSERT INTO items (note) SELECT repeat('x', 1000) FROM generate_series(1, 1000); \
           COMMIT; PERFORM pg_sleep(0.03); END LOOP; END $$"
    );
    Command::new(source.postgres.bin_dir().join("psql"))
        .args(["--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1"])
        .args([
            "--host",
            "127.0.0.1",
            "--username",
            "postgres",
            "--dbname",
            "app",
        ])
        .arg("--port")
        .arg(source.postgres.port().to_string())
        .args(["--command", &sql])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn the_archive_trails_the_server_survives_kills_and_replays_through_wal_fetch() {
    let source = Source::start();
    let archiver = source.start_archiver();

    // Rows written, then the archive passes the server's WAL position within a few
    // seconds, with no segment switch: the growing segment is pushed as it is.
    source.postgres.psql(
        "app",
        "INSERT INTO items (note) SELECT 'row ' || g FROM generate_series(1, 100) g",
    );
    let written = source.current_lsn();
    let took = wait_until(
        Duration::from_secs(10),
        "the archive to reach pg_current_wal_lsn()",
        || source.archived_to().is_some_and(|to| to >= written),
    );
    let catalog = source.catalog();
    let last = catalog.chunks.last().unwrap();
    assert_eq!(
        last.kind,
        ChunkKind::PgWalPartial,
        "reached through a partial segment: {}",
        last.name
    );
    eprintln!("the archive reached {written} after {took:?}");

    // A base backup to replay from, taken while the archiver runs.
    let base = source.dir.path().join("base");
    let output = run(
        "stillpoint",
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
    let label = std::fs::read_to_string(base.join("backup_label")).unwrap();
    let base_start: Lsn = label
        .lines()
        .find_map(|line| line.strip_prefix("START WAL LOCATION: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();

    // Under load, killed outright and started again: first the archiver alone (its
    // pg_receivewal keeps streaming into the spool, holding the slot, until the next
    // run ends it), then both, with the spool lost.
    let mut load = start_load(&source, 60);
    let mut archiver = Some(archiver);
    let mut orphan = None;
    for round in 0..2 {
        let before = source.archived_to().unwrap();
        wait_until(
            Duration::from_secs(20),
            "the archive to move on under load",
            || {
                source
                    .archived_to()
                    .is_some_and(|to| to.0 > before.0 + (4 << 20))
            },
        );
        let receiver = kill_hard(archiver.take().unwrap(), round == 0);
        if round == 0 {
            assert!(is_running(receiver), "the orphaned pg_receivewal runs on");
            orphan = Some(Orphan(receiver));
        } else {
            std::fs::remove_dir_all(source.spool_root()).unwrap();
        }
        archiver = Some(source.start_archiver());
        if let Some(Orphan(pid)) = &orphan {
            wait_until(
                Duration::from_secs(20),
                "the next run to end the orphaned pg_receivewal",
                || !is_running(*pid),
            );
        }
    }
    assert!(load.wait().unwrap().success(), "the load failed");

    // A named restore point after the restarts, then rows it must not include.
    let rows_at_point = source.rows();
    let point: Lsn = source
        .postgres
        .psql("app", "SELECT pg_create_restore_point('after-restarts')")
        .parse()
        .unwrap();
    source.postgres.psql(
        "app",
        "INSERT INTO items (note) SELECT 'late' FROM generate_series(1, 10)",
    );
    wait_until(
        Duration::from_secs(20),
        "the archive to reach the restore point",
        || source.archived_to().is_some_and(|to| to >= point),
    );
    // Stopped cleanly: SIGTERM, and it exits 0 after pushing what it received.
    let archiver = archiver.take().unwrap();
    archiver.signal("TERM");
    let output = archiver.wait_output(Duration::from_secs(20));
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("\"last_chunk\""),
        "no progress printed: {printed}"
    );

    let catalog = source.catalog();
    assert_seamless(&catalog);
    let whole = catalog
        .chunks
        .iter()
        .filter(|c| c.kind == ChunkKind::PgWalSegment)
        .count();
    assert!(whole >= 3, "the load should have filled segments: {whole}");
    catalog
        .covers(&Position::Lsn(base_start), &Position::Lsn(point))
        .unwrap();

    // Replay: base backup + `wal-fetch` as restore_command, to the restore point.
    let recovered = recover_with_wal_fetch(&source, &base, "after-restarts");
    assert_eq!(recovered, rows_at_point, "rows at the restore point");
    assert!(source.rows() > rows_at_point);

    let list = |source: &Source| run("stillpoint", &["archive-list", "--config", source.config()]);
    let listed = list(&source);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        text.starts_with("app: ") && text.contains("no gaps"),
        "{text}"
    );

    // Negative control: a segment deleted from the archive is a gap, named by the
    // chunks and positions on each side, and the range is no longer covered.
    let archive = source.archive();
    let middle = catalog
        .chunks
        .iter()
        .position(|c| {
            c.kind == ChunkKind::PgWalSegment && c.start > Some(Position::Lsn(base_start))
        })
        .unwrap();
    let (before, deleted, after) = (
        &catalog.chunks[middle - 1],
        &catalog.chunks[middle],
        &catalog.chunks[middle + 1],
    );
    source.runtime.block_on(archive.remove(deleted)).unwrap();
    let damaged = source.catalog();
    let gaps = damaged.gaps();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].after, before.name);
    assert_eq!(Some(&gaps[0].from), deleted.start.as_ref());
    assert_eq!(gaps[0].before, after.name);
    assert_eq!(Some(&gaps[0].to), after.start.as_ref());
    let error = damaged
        .covers(&Position::Lsn(base_start), &Position::Lsn(point))
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains(&before.name) && text.contains(&after.name),
        "{text}"
    );
    let listed = list(&source);
    assert_eq!(listed.status.code(), Some(6), "{}", stderr(&listed));
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        text.contains("1 gap(s)") && text.contains(&gaps[0].to_string()),
        "{text}"
    );
    // And wal-fetch says it is not there, with restore_command's exit status 1.
    let dest = source.dir.path().join("fetched");
    let output = run(
        "stillpoint",
        &[
            "wal-fetch",
            "--config",
            source.config(),
            "--database",
            "app",
            &deleted.name,
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(!dest.exists());
}

/// Copies the base backup into a scratch directory, starts a server there (as the
/// `postgres` user when running as root) with `stillpoint wal-fetch` as its
/// restore_command, waits for it to reach `restore_point` and promote, and returns
/// the rows of `items` it holds.
fn recover_with_wal_fetch(source: &Source, base: &Path, restore_point: &str) -> u64 {
    let scratch = source.dir.path().join("scratch");
    let status = Command::new("cp")
        .arg("-a")
        .arg(base)
        .arg(&scratch)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700)).unwrap();
    for file in ["postmaster.pid", "postmaster.opts", "standby.signal"] {
        let _ = std::fs::remove_file(scratch.join(file));
    }
    std::fs::write(scratch.join("recovery.signal"), b"").unwrap();
    let root = stillpoint_testkit::running_as_root();
    // The test binaries live under the target directory, readable by others.
    let restore_command = format!(
        "{} wal-fetch --config {} --database app %f %p",
        bin("stillpoint").display(),
        source.config()
    );
    if root {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&scratch)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let log_path = source.dir.path().join("scratch.log");
    // The port free_port picked can be taken by another test's process before the
    // server binds it; the server then exits before recovery began, and starts again
    // on another port.
    let mut attempts = 0;
    let (server, port) = loop {
        attempts += 1;
        let port = free_port();
        let mut server =
            start_scratch_server(source, &scratch, &restore_command, restore_point, port);
        let promoted = |server: &mut ScratchServer| -> Result<bool, String> {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert!(
                !log.contains("FATAL:  recovery ended before"),
                "recovery failed:\n{log}"
            );
            if server.process.has_exited() {
                return Err(log);
            }
            Ok(scratch_psql(source, port, "SELECT pg_is_in_recovery()").as_deref() == Some("f"))
        };
        let mut exited = None;
        wait_until(
            Duration::from_secs(60),
            "the scratch server to promote",
            || match promoted(&mut server) {
                Ok(promoted) => promoted,
                Err(log) => {
                    exited = Some(log);
                    true
                }
            },
        );
        match exited {
            None => break (server, port),
            Some(log) if log.contains("could not bind") && attempts < 3 => {
                eprintln!("scratch server: port {port} was taken; starting again");
            }
            Some(log) => panic!("the scratch server exited before it promoted:\n{log}"),
        }
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains(&format!(
            "recovery stopping at restore point \"{restore_point}\""
        )),
        "{log}"
    );
    // The restore point lies in the segment still being written: replay read it from
    // the newest partial chunk, padded (wal-fetch says so on its stderr, in this log).
    assert!(log.contains("served padded"), "{log}");
    let rows = scratch_psql(source, port, "SELECT count(*) FROM items")
        .unwrap()
        .parse()
        .unwrap();
    drop(server);
    rows
}

/// The scratch server on `scratch`, replaying with `restore_command` to
/// `restore_point`, its stderr in `scratch.log`.
fn start_scratch_server(
    source: &Source,
    scratch: &Path,
    restore_command: &str,
    restore_point: &str,
    port: u16,
) -> ScratchServer {
    let root = stillpoint_testkit::running_as_root();
    let settings = [
        format!("port={port}"),
        "listen_addresses=127.0.0.1".to_owned(),
        format!("unix_socket_directories={}", scratch.display()),
        "archive_mode=off".to_owned(),
        format!("restore_command={restore_command}"),
        format!("recovery_target_name={restore_point}"),
        "recovery_target_action=promote".to_owned(),
        "hot_standby=off".to_owned(),
        "logging_collector=off".to_owned(),
    ];
    let log = std::fs::File::create(source.dir.path().join("scratch.log")).unwrap();
    let postgres = source.postgres.bin_dir().join("postgres");
    let mut command = if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(&postgres);
        command
    } else {
        Command::new(&postgres)
    };
    command.arg("-D").arg(scratch);
    for setting in &settings {
        command.arg("-c").arg(setting);
    }
    let child = command
        .current_dir(scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    ScratchServer {
        process: Process::new(child, "scratch postgres".to_owned()),
        pg_ctl: source.postgres.bin_dir().join("pg_ctl"),
        data_dir: scratch.to_owned(),
        root,
    }
}

/// A query on the scratch server; `None` until it answers.
fn scratch_psql(source: &Source, port: u16, sql: &str) -> Option<String> {
    let output = Command::new(source.postgres.bin_dir().join("psql"))
        .args(["--no-psqlrc", "--tuples-only", "--no-align"])
        .args([
            "--host",
            "127.0.0.1",
            "--username",
            "postgres",
            "--dbname",
            "app",
        ])
        .arg("--port")
        .arg(port.to_string())
        .args(["--command", sql])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

struct ScratchServer {
    process: Process,
    pg_ctl: PathBuf,
    data_dir: PathBuf,
    root: bool,
}

impl Drop for ScratchServer {
    fn drop(&mut self) {
        let mut command = if self.root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            command
        } else {
            Command::new(&self.pg_ctl)
        };
        let _ = command
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["--mode=immediate", "--wait", "--silent"])
            .current_dir("/")
            .status();
    }
}

/// `wal-push` as an archive_command calls it: a file archived once, again as a no-op,
/// refused with other content under the same name (naming both), and fetched back;
/// damaged, `wal-fetch` exits 126 (abort recovery), not 1 (end of archive).
#[test]
fn wal_push_is_idempotent_and_refuses_other_content() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let runbook = dir.path().join("runbook.toml");
    std::fs::write(
        &runbook,
        format!(
            r#"
cluster = "c"
[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]
[[databases]]
name = "app"
adapter = "postgres"
url = "postgres://postgres@127.0.0.1:1/app"
[pipeline]
zstd_level = 3
[storage]
url = "file://{}"
"#,
            storage.display()
        ),
    )
    .unwrap();
    let config = runbook.to_str().unwrap();
    let pg_wal = dir.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).unwrap();
    let segment = pg_wal.join("000000010000000000000007");
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&segment, &content).unwrap();
    let push = |path: &Path| {
        run(
            "stillpoint",
            &[
                "wal-push",
                "--config",
                config,
                "--database",
                "app",
                path.to_str().unwrap(),
            ],
        )
    };
    let first = push(&segment);
    assert!(first.status.success(), "{}", stderr(&first));
    let second = push(&segment);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("already archived with the same content"),
        "{}",
        stderr(&second)
    );

    let mut other = content.clone();
    other[12345] ^= 1;
    std::fs::write(&segment, &other).unwrap();
    let refused = push(&segment);
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    let text = stderr(&refused);
    let old_hash = blake3::hash(&content).to_hex().to_string();
    let new_hash = blake3::hash(&other).to_hex().to_string();
    for needle in [
        "000000010000000000000007",
        old_hash.as_str(),
        new_hash.as_str(),
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }

    // A file that is not a whole segment is refused before anything is stored.
    let short = pg_wal.join("000000010000000000000008");
    std::fs::write(&short, b"too short").unwrap();
    let refused = push(&short);
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("not a WAL segment size"));

    // Fetched back as first archived.
    let dest = dir.path().join("RECOVERYXLOG");
    let fetched = run(
        "stillpoint",
        &[
            "wal-fetch",
            "--config",
            config,
            "--database",
            "app",
            "000000010000000000000007",
            dest.to_str().unwrap(),
        ],
    );
    assert!(fetched.status.success(), "{}", stderr(&fetched));
    assert!(std::fs::read(&dest).unwrap() == content);

    // A chunk that cannot be read is not "not in the archive": exit 126, which makes
    // PostgreSQL abort recovery rather than end it early on an archive it believed over.
    let artifact = std::fs::read_dir(storage.join("archive/app"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            let name = path.file_name().unwrap().to_str().unwrap();
            name.starts_with("000000010000000000000007.") && !name.ends_with(".json")
        })
        .expect("the stored chunk");
    let mut stored = std::fs::read(&artifact).unwrap();
    let middle = stored.len() / 2;
    stored[middle] ^= 0xff;
    std::fs::write(&artifact, stored).unwrap();
    std::fs::remove_file(&dest).unwrap();
    let damaged = run(
        "stillpoint",
        &[
            "wal-fetch",
            "--config",
            config,
            "--database",
            "app",
            "000000010000000000000007",
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(damaged.status.code(), Some(126), "{}", stderr(&damaged));
    assert!(
        stderr(&damaged).contains("000000010000000000000007"),
        "{}",
        stderr(&damaged)
    );
    assert!(!dest.exists(), "nothing is written from a damaged chunk");
}

/// The checks archiving needs name the setting and the fix: a role without
/// REPLICATION is refused before pg_receivewal starts, and passes once granted.
#[test]
fn archiving_refuses_a_role_without_replication_and_names_the_fix() {
    let source = Source::start();
    source.postgres.psql(
        "postgres",
        "CREATE ROLE plain LOGIN; GRANT ALL ON DATABASE app TO plain",
    );
    let url = format!("postgres://plain@127.0.0.1:{}/app", source.postgres.port());
    source.write_runbook(&url);
    let output = run("stillpoint", &["archive", "--config", source.config()]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("role plain has neither REPLICATION nor SUPERUSER")
            && text.contains("ALTER ROLE plain REPLICATION"),
        "{text}"
    );
    assert!(source.catalog().chunks.is_empty());

    source
        .postgres
        .psql("postgres", "ALTER ROLE plain REPLICATION");
    let config = stillpoint::adapters::PostgresConfig {
        url,
        require_archiving: false,
        bin_dir: None,
        drill_server_url: None,
    };
    source
        .runtime
        .block_on(stillpoint::archive::postgres::check_server(&config))
        .unwrap();
}
