//! Continuous archiving of a real MariaDB server's binlog, as an operator runs it:
//! `stillpoint archive` in the foreground (mariadb-binlog under it) with a role that
//! logs in with a password, the archive read back through the library's catalog, the
//! archiver killed under load (with and without its mariadb-binlog) and started
//! again, a `FLUSH BINARY LOGS` in the middle; then a base backup in storage and a
//! replay to a position read mid-load into a second server, and the negative
//! controls: a missing chunk and a damaged one refuse the replay before it writes.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use stillpoint::adapters::{MariadbBaseMethod, MariadbConfig};
use stillpoint::archive::mariadb::{self, ReplayTarget};
use stillpoint::archive::{Archive, ArchiveError, Catalog, ChunkKind, Position, binlog};
use stillpoint::pipeline::{Decryption, PipelineSettings};
use stillpoint::storage::Storage;
use stillpoint_testkit::MariaDb;

use crate::archive::{Orphan, children, is_running};
use crate::util::{Process, bin, run, stderr, wait_until};

struct Source {
    server: MariaDb,
    dir: tempfile::TempDir,
    runbook: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Source {
    fn start() -> Source {
        let server = MariaDb::start();
        server.create_database("app");
        server.sql(
            "app",
            "CREATE TABLE items (id BIGINT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(200) NOT NULL) \
             ENGINE=InnoDB;
             DELIMITER //
             CREATE PROCEDURE load_rows(rounds INT) BEGIN
               DECLARE i INT DEFAULT 0;
               WHILE i < rounds DO
                 INSERT INTO items (note) SELECT CONCAT('load ', i, ' ', seq) FROM seq_1_to_50;
                 DO SLEEP(0.02);
                 SET i = i + 1;
               END WHILE;
             END //
             DELIMITER ;",
        );
        // The archiver's own role, with a password (which must travel by MYSQL_PWD)
        // and, at first, without REPLICATION SLAVE.
        server.sql(
            "",
            "CREATE USER 'archiver'@'%' IDENTIFIED BY 's3cret pass'; \
             GRANT BINLOG MONITOR ON *.* TO 'archiver'@'%'",
        );
        let dir = tempfile::tempdir().unwrap();
        let source = Source {
            runbook: dir.path().join("runbook.toml"),
            server,
            dir,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        let text = format!(
            r#"
cluster = "binlog-test"
[pause]
tiers = [{{ addresses = ["127.0.0.1:1"] }}]
[[databases]]
name = "app"
adapter = "mariadb"
url = "mysql://archiver:s3cret%20pass@127.0.0.1:{port}/app"
bin_dir = "{bin_dir}"
archive = true
[storage]
url = "file://{storage}"
[archive]
chunk_interval = "200ms"
spool_dir = "{spool}"
"#,
            port = source.server.port(),
            bin_dir = source.server.bin_dir().display(),
            storage = source.storage_dir().display(),
            spool = source.dir.path().join("spool").display(),
        );
        std::fs::write(&source.runbook, text).unwrap();
        source
    }

    fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn storage(&self) -> Storage {
        Storage::open(&format!("file://{}", self.storage_dir().display())).unwrap()
    }

    fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    fn archive(&self) -> Archive {
        Archive::new(self.storage(), PipelineSettings::default(), "app").unwrap()
    }

    fn catalog(&self) -> Catalog {
        self.runtime.block_on(self.archive().catalog()).unwrap()
    }

    fn archived_to(&self) -> Option<Position> {
        self.catalog().end()
    }

    fn server_position(&self) -> Position {
        let status = self.server.sql("", "SHOW MASTER STATUS");
        let mut fields = status.split('\t');
        let file = fields.next().unwrap();
        let offset = fields.next().unwrap().parse().unwrap();
        Position::binlog(file, offset)
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

    /// The server's binlog position and the table's rows and id sum, read in one
    /// consistent snapshot: MariaDB reports the binlog position of exactly that
    /// snapshot, so these are the rows a replay to the position must give.
    fn rows_at_a_position(&self) -> (Position, String) {
        let out = self.server.sql(
            "app",
            "START TRANSACTION WITH CONSISTENT SNAPSHOT; \
             SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS \
               WHERE VARIABLE_NAME = 'BINLOG_SNAPSHOT_FILE'; \
             SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS \
               WHERE VARIABLE_NAME = 'BINLOG_SNAPSHOT_POSITION'; \
             SELECT CONCAT(COUNT(*), ' rows, id sum ', COALESCE(SUM(id), 0)) FROM items; \
             COMMIT",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        (
            Position::binlog(lines[0], lines[1].parse().unwrap()),
            lines[2].to_owned(),
        )
    }
}

fn rows(server: &MariaDb, database: &str) -> String {
    server.sql(
        database,
        "SELECT CONCAT(COUNT(*), ' rows, id sum ', COALESCE(SUM(id), 0)) FROM items",
    )
}

/// SIGKILLs the archiver, and its mariadb-binlog too unless `orphan`. Returns the
/// mariadb-binlog's pid.
fn kill_hard(archiver: Process, orphan: bool) -> u32 {
    let streamers = children(archiver.pid());
    assert_eq!(streamers.len(), 1, "the archiver runs one mariadb-binlog");
    archiver.signal("KILL");
    if !orphan {
        let _ = Command::new("kill")
            .args(["-KILL", &streamers[0].to_string()])
            .status();
    }
    drop(archiver);
    streamers[0]
}

/// Every chunk follows the one before it exactly (across files too), and each byte
/// range of a file is archived once.
fn assert_seamless(catalog: &Catalog) {
    assert!(catalog.gaps().is_empty(), "gaps: {:?}", catalog.gaps());
    assert!(catalog.superseded.is_empty(), "{:?}", catalog.superseded);
    assert!(catalog.unreadable.is_empty(), "{:?}", catalog.unreadable);
    for pair in catalog.chunks.windows(2) {
        assert_eq!(
            pair[0].end, pair[1].start,
            "{} and {} do not follow each other",
            pair[0].name, pair[1].name
        );
    }
    assert!(
        catalog
            .chunks
            .iter()
            .all(|c| c.kind == ChunkKind::MariadbBinlog)
    );
}

/// The archive's bytes of `file`: the magic, then its chunks in order.
fn reassembled(source: &Source, catalog: &Catalog, file: &str) -> Vec<u8> {
    let archive = source.archive();
    let mut bytes = binlog::MAGIC.to_vec();
    for chunk in &catalog.chunks {
        if chunk
            .start
            .as_ref()
            .and_then(Position::as_binlog)
            .map(|(f, _)| f)
            == Some(file)
        {
            let (_, offset) = chunk.start.as_ref().unwrap().as_binlog().unwrap();
            assert_eq!(offset, bytes.len() as u64, "{}", chunk.name);
            bytes.extend(
                source
                    .runtime
                    .block_on(archive.read(chunk, &Decryption::None))
                    .unwrap(),
            );
        }
    }
    bytes
}

#[test]
fn the_binlog_archive_trails_the_server_survives_kills_and_replays_to_a_position() {
    let source = Source::start();

    // Without REPLICATION SLAVE, nothing starts, and the grant to add is named.
    let refused = run("stillpoint", &["archive", "--config", source.config()]);
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    let text = stderr(&refused);
    assert!(
        text.contains("GRANT REPLICATION SLAVE ON *.* TO 'archiver'@'%'")
            && !text.contains("s3cret"),
        "{text}"
    );
    assert!(source.catalog().chunks.is_empty());
    source
        .server
        .sql("", "GRANT REPLICATION SLAVE ON *.* TO 'archiver'@'%'");

    // Rows written, then the archive reaches the server's position within seconds,
    // with no FLUSH BINARY LOGS: the file being written is cut into chunks.
    let archiver = source.start_archiver();
    source.server.sql(
        "app",
        "INSERT INTO items (note) SELECT CONCAT('row ', seq) FROM seq_1_to_100",
    );
    let written = source.server_position();
    let took = wait_until(
        Duration::from_secs(10),
        "the archive to reach the server's binlog position",
        || source.archived_to().is_some_and(|to| to >= written),
    );
    eprintln!("the archive reached {written} after {took:?}");
    assert_eq!(
        source.server_position().as_binlog().unwrap().0,
        written.as_binlog().unwrap().0,
        "no rotation happened"
    );

    // A base backup in storage while the archiver runs (as root: it reads the rows).
    let root = MariadbConfig {
        url: source.server.url("app"),
        bin_dir: Some(source.server.bin_dir().to_owned()),
        drill_server_url: None,
        // This test is about the dump base and its replay into a database.
        base_method: MariadbBaseMethod::Dump,
    };
    let base = source
        .runtime
        .block_on(mariadb::base_backup(
            &source.storage(),
            &PipelineSettings::default(),
            "app",
            &root,
        ))
        .unwrap();
    assert_eq!(
        base.details.get("rows.items").map(String::as_str),
        Some("100")
    );
    let listed = source
        .runtime
        .block_on(stillpoint::archive::base::list(&source.storage(), "app"))
        .unwrap()
        .0;
    assert_eq!(listed, vec![base.clone()]);

    // Under load: killed outright with its mariadb-binlog, then a rotation, then the
    // archiver alone (its mariadb-binlog orphaned: the next run's connection, with
    // the same replica id, ends it), a position read mid-load in between.
    let mut load = Command::new(source.server.bin_dir().join("mariadb"))
        .args([
            "--no-defaults",
            "--protocol=TCP",
            "--host=127.0.0.1",
            "--user=root",
        ])
        .arg(format!("--port={}", source.server.port()))
        .args(["--database=app", "--execute", "CALL load_rows(150)"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut archiver = Some(archiver);
    let mut point = None;
    for round in 0..2 {
        let before = source.archived_to().unwrap();
        wait_until(
            Duration::from_secs(20),
            "the archive to move on under load",
            || source.archived_to().is_some_and(|to| to > before),
        );
        let streamer = kill_hard(archiver.take().unwrap(), round == 1);
        if round == 0 {
            source.server.sql("", "FLUSH BINARY LOGS");
            point = Some(source.rows_at_a_position());
        }
        archiver = Some(source.start_archiver());
        if round == 1 {
            let _orphan = Orphan(streamer);
            wait_until(
                Duration::from_secs(20),
                "the orphaned mariadb-binlog to be ended",
                || !is_running(streamer),
            );
        }
    }
    assert!(load.wait().unwrap().success(), "the load failed");
    let (point, rows_at_point) = point.unwrap();
    assert_ne!(
        point.as_binlog().unwrap().0,
        base.start.as_binlog().unwrap().0,
        "the replay crosses the rotation"
    );
    assert_ne!(
        rows_at_point, "100 rows, id sum 5050",
        "the position is mid-load"
    );
    source.server.sql(
        "app",
        "INSERT INTO items (note) SELECT 'late' FROM seq_1_to_10",
    );
    let end = source.server_position();
    wait_until(
        Duration::from_secs(20),
        "the archive to reach the server's position",
        || source.archived_to().is_some_and(|to| to >= end),
    );
    let archiver = archiver.take().unwrap();
    archiver.signal("TERM");
    let output = archiver.wait_output(Duration::from_secs(20));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"last_chunk\""));

    // Seamless across the kills and the rotation, and byte for byte the server's
    // closed files: nothing lost, nothing twice.
    let catalog = source.catalog();
    assert_seamless(&catalog);
    let rotated = catalog
        .chunks
        .iter()
        .find(|c| c.details.get("closed_by").map(String::as_str) == Some("rotate"))
        .expect("the rotation ends a file");
    let closed = rotated
        .start
        .as_ref()
        .unwrap()
        .as_binlog()
        .unwrap()
        .0
        .to_owned();
    let server_file = std::fs::read(source.server.data_dir().join(&closed)).unwrap();
    assert!(
        reassembled(&source, &catalog, &closed) == server_file,
        "the archive's {closed} differs from the server's"
    );
    assert_eq!(
        rotated.end,
        Some(Position::binlog(&binlog::next_file(&closed).unwrap(), 4))
    );
    // The file still being written (the second kill fell in it) matches too, up to
    // where the archive ends, but for the flag the server sets in its own copy's
    // first event while the file is open (bytes 21-22: LOG_EVENT_BINLOG_IN_USE_F).
    let (open_file, archived) = catalog
        .end()
        .unwrap()
        .as_binlog()
        .map(|(f, o)| (f.to_owned(), o))
        .unwrap();
    assert_eq!(open_file, binlog::next_file(&closed).unwrap());
    let mut ours = reassembled(&source, &catalog, &open_file);
    let mut theirs = std::fs::read(source.server.data_dir().join(&open_file)).unwrap();
    assert_eq!(ours.len() as u64, archived);
    theirs.truncate(ours.len());
    for bytes in [&mut ours, &mut theirs] {
        bytes[21..23].fill(0);
    }
    assert!(
        ours == theirs,
        "the archive's {open_file} differs from the server's"
    );
    catalog
        .covers(&mariadb::replay_from(&base.start), &point)
        .unwrap();
    // The GTID state at the archive's end, followed through the GTID list and
    // events (across a restart mid-file and the rotation), is the server's.
    assert_eq!(
        catalog
            .chunks
            .last()
            .unwrap()
            .details
            .get("gtid_binlog_pos"),
        Some(&source.server.sql("", "SELECT @@gtid_binlog_pos")),
    );

    // Base + replay to the position read mid-load, on another server: exactly the
    // rows of that position.
    let target = MariaDb::start();
    target.create_database("restored");
    let work = source.dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let replay_target = |database: &str| ReplayTarget {
        url: target.url(database),
        source_database: "app".to_owned(),
        bin_dir: Some(target.bin_dir().to_owned()),
        work_dir: work.clone(),
    };
    source
        .runtime
        .block_on(mariadb::restore_base(
            &source.storage(),
            &Decryption::None,
            &base,
            &target.url("restored"),
            Some(target.bin_dir()),
        ))
        .unwrap();
    assert_eq!(rows(&target, "restored"), "100 rows, id sum 5050");
    let report = source
        .runtime
        .block_on(mariadb::replay(
            &source.archive(),
            &Decryption::None,
            &base.start,
            &point,
            &replay_target("restored"),
        ))
        .unwrap();
    assert_eq!(rows(&target, "restored"), rows_at_point, "{report:?}");
    assert_ne!(rows(&source.server, "app"), rows_at_point);
    assert!(
        std::fs::read_dir(&work).unwrap().next().is_none(),
        "work files left"
    );

    // Negative controls, each on a fresh copy of the base (100 rows), which must
    // stay as it is.
    let restore_fresh = |database: &str| {
        target.create_database(database);
        source
            .runtime
            .block_on(mariadb::restore_base(
                &source.storage(),
                &Decryption::None,
                &base,
                &target.url(database),
                Some(target.bin_dir()),
            ))
            .unwrap();
    };
    let replay_into = |database: &str| {
        source.runtime.block_on(mariadb::replay(
            &source.archive(),
            &Decryption::None,
            &base.start,
            &point,
            &replay_target(database),
        ))
    };
    let middle = catalog
        .chunks
        .iter()
        .position(|c| c.start.as_ref() > Some(&base.start) && c.end.as_ref() < Some(&point))
        .expect("a chunk between the base and the position");
    let (before, chosen, after) = (
        &catalog.chunks[middle - 1],
        &catalog.chunks[middle],
        &catalog.chunks[middle + 1],
    );

    // A chunk damaged in storage: a point restore (base + replay) into an empty
    // database is refused, naming its artifact, and writes nothing, not even the base.
    let path = source.storage_dir().join(&chosen.artifact.path);
    let intact = std::fs::read(&path).unwrap();
    let mut bytes = intact.clone();
    bytes[intact.len() / 2] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    target.create_database("damaged");
    let error = source
        .runtime
        .block_on(mariadb::restore_point(
            &source.archive(),
            &Decryption::None,
            &base,
            &point,
            &replay_target("damaged"),
        ))
        .unwrap_err();
    assert!(error.to_string().contains(&chosen.artifact.path), "{error}");
    assert_eq!(
        target.sql(
            "",
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'damaged'"
        ),
        "0",
        "nothing written"
    );
    std::fs::write(&path, intact).unwrap();
    let report = source
        .runtime
        .block_on(mariadb::restore_point(
            &source.archive(),
            &Decryption::None,
            &base,
            &point,
            &replay_target("damaged"),
        ))
        .unwrap();
    assert_eq!(rows(&target, "damaged"), rows_at_point, "{report:?}");

    // The same chunk missing: a gap named by its neighbours, listed by archive-list
    // (exit 6), and the replay refused.
    source
        .runtime
        .block_on(source.archive().remove(chosen))
        .unwrap();
    let gaps = source.catalog().gaps();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(
        (&gaps[0].after, &gaps[0].before),
        (&before.name, &after.name)
    );
    let listed = run("stillpoint", &["archive-list", "--config", source.config()]);
    assert_eq!(listed.status.code(), Some(6), "{}", stderr(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&gaps[0].to_string()));
    restore_fresh("gap");
    let error = replay_into("gap").unwrap_err();
    assert!(matches!(error, ArchiveError::NotCovered(_)), "{error}");
    let text = error.to_string();
    assert!(
        text.contains(&before.name) && text.contains(&after.name),
        "{text}"
    );
    assert_eq!(
        rows(&target, "gap"),
        "100 rows, id sum 5050",
        "nothing written"
    );
}
