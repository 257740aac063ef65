//! MariaDB base restore: which base format to keep (issue 11, "Base backups in
//! storage"). On one throwaway MariaDB holding a ledger table, alternating:
//!
//! - ours: the consistent dump `archive::mariadb::base_backup` stores (zstd 3 → age →
//!   BLAKE3), restored by `archive::mariadb::restore_base` (checksum, then the dump
//!   into the `mariadb` client) into a new, empty database of the running server;
//! - `mariadb-backup --backup --stream=xbstream | zstd -3 | age`, restored by
//!   `age -d | zstd -d | mbstream -x`, `mariadb-backup --prepare`, and a server
//!   started on the result, until it accepts connections.
//!
//! Both end with the table's rows readable, checked. Both backups are timed too.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint::adapters::MariadbConfig;
use stillpoint::archive::base::BaseRecord;
use stillpoint::archive::mariadb;
use stillpoint::pipeline::{Decryption, Encryption, PipelineSettings};
use stillpoint::storage::Storage;
use stillpoint_testkit::MariaDb;

use crate::support::{self, Process, Row, Target, median};

const DATABASE: &str = "auditor";

#[derive(Default)]
pub struct MariadbRuns {
    pub rows: u64,
    /// Bytes of the table's data and indexes, as the server counts them.
    pub bytes: u64,
    pub dump_backup: Vec<Duration>,
    pub dump_restore: Vec<Duration>,
    pub dump_stored: u64,
    pub physical_backup: Vec<Duration>,
    pub physical_restore: Vec<Duration>,
    pub physical_stored: u64,
}

pub fn compare(runtime: &tokio::runtime::Runtime, rows: u64, runs: usize) -> MariadbRuns {
    let server = MariaDb::start();
    server.create_database(DATABASE);
    let started = Instant::now();
    // The ledger table of the PostgreSQL parts, from MariaDB's sequence engine.
    server.sql(
        DATABASE,
        &format!(
            "CREATE TABLE ledger (
                 seq bigint NOT NULL PRIMARY KEY, tx_id varchar(32) NOT NULL UNIQUE,
                 from_account bigint NOT NULL, to_account bigint NOT NULL,
                 amount bigint NOT NULL, prev_hash varchar(64) NOT NULL,
                 hash varchar(64) NOT NULL, committed_at_ms bigint NOT NULL)
                 ENGINE=InnoDB;
             INSERT INTO ledger
             SELECT seq, md5(concat('tx', seq)), 1 + (seq * 7919) % 1000,
                    1 + (seq * 104729) % 1000, 1 + seq % 100,
                    concat(md5(seq - 1), md5(concat('p', seq - 1))),
                    concat(md5(seq), md5(concat('p', seq))), 1700000000000 + seq * 7
             FROM seq_1_to_{rows};
             ANALYZE TABLE ledger;"
        ),
    );
    let bytes: u64 = server
        .sql(
            DATABASE,
            "SELECT data_length + index_length FROM information_schema.tables \
             WHERE table_schema = 'auditor' AND table_name = 'ledger'",
        )
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "generated {:.0} MiB of MariaDB in {:.0?}",
        support::mib(bytes),
        started.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    let key = age::x25519::Identity::generate();
    let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_owned();
    let identity_file = dir.path().join("key.txt");
    std::fs::write(&identity_file, format!("{identity}\n")).unwrap();
    let recipient = key.to_public().to_string();
    let storage =
        Storage::open(&format!("file://{}", dir.path().join("storage").display())).unwrap();
    let settings = PipelineSettings {
        zstd_level: Some(crate::ZSTD_LEVEL as i32),
        encryption: Encryption::Recipients(vec![recipient.clone()]),
    };
    let decryption = Decryption::Identities(vec![identity]);
    let config = MariadbConfig {
        url: server.url(DATABASE),
        bin_dir: Some(server.bin_dir().to_owned()),
        drill_server_url: None,
    };
    let stream = dir.path().join("physical.xbstream.zst.age");

    let mut result = MariadbRuns {
        rows,
        bytes,
        ..MariadbRuns::default()
    };
    let mut record: Option<BaseRecord> = None;
    for run in 0..runs {
        eprintln!("MariaDB bases, round {} of {runs}", run + 1);
        for ours in [run % 2 == 0, run % 2 == 1] {
            if ours {
                let started = Instant::now();
                let base = runtime
                    .block_on(mariadb::base_backup(&storage, &settings, DATABASE, &config))
                    .expect("MariaDB base backup");
                result.dump_backup.push(started.elapsed());
                result.dump_stored = base.artifact.stored_size;
                record = Some(base);
            } else {
                let script = format!(
                    "set -o pipefail; mariadb-backup --backup --stream=xbstream --user=root \
                     --host=127.0.0.1 --port={port} --target-dir='{tmp}' 2>/dev/null \
                     | zstd -{level} -q | age -r {recipient} > '{stream}'",
                    port = server.port(),
                    tmp = dir.path().display(),
                    level = crate::ZSTD_LEVEL,
                    stream = stream.display(),
                );
                let started = Instant::now();
                crate::run(Command::new("bash").args(["-c", &script]));
                std::fs::File::open(&stream).unwrap().sync_all().unwrap();
                result.physical_backup.push(started.elapsed());
                result.physical_stored = std::fs::metadata(&stream).unwrap().len();
            }
        }
    }
    let record = record.expect("at least one round");

    for run in 0..runs {
        eprintln!("MariaDB restores, round {} of {runs}", run + 1);
        for ours in [run % 2 == 0, run % 2 == 1] {
            if ours {
                let target = "restored";
                server.create_database(target);
                let started = Instant::now();
                runtime
                    .block_on(mariadb::restore_base(
                        &storage,
                        &decryption,
                        &record,
                        &server.url(target),
                        Some(server.bin_dir()),
                    ))
                    .expect("MariaDB base restore");
                result.dump_restore.push(started.elapsed());
                let count = server.sql(target, "SELECT count(*) FROM ledger");
                assert_eq!(count.trim(), rows.to_string(), "the dump restore lost rows");
                server.sql("", &format!("DROP DATABASE {target}"));
            } else {
                let data_dir = dir.path().join("physical-restored");
                let started = Instant::now();
                std::fs::create_dir(&data_dir).unwrap();
                let script = format!(
                    "set -o pipefail; age -d -i '{key}' '{stream}' | zstd -d -q \
                     | mbstream -x -C '{data}' && mariadb-backup --prepare \
                     --target-dir='{data}' 2>/dev/null",
                    key = identity_file.display(),
                    stream = stream.display(),
                    data = data_dir.display(),
                );
                crate::run(Command::new("bash").args(["-c", &script]));
                let restored = RestoredMariaDb::start(&data_dir, server.bin_dir());
                result.physical_restore.push(started.elapsed());
                let count = restored.sql("SELECT count(*) FROM auditor.ledger");
                assert_eq!(
                    count.trim(),
                    rows.to_string(),
                    "the physical restore lost rows"
                );
                drop(restored);
                std::fs::remove_dir_all(&data_dir).unwrap();
            }
        }
    }
    result
}

/// mariadbd on a restored data directory, with the testkit's settings; killed when
/// dropped (its data is about to be deleted).
struct RestoredMariaDb {
    _process: Process,
    port: u16,
    bin_dir: std::path::PathBuf,
}

impl RestoredMariaDb {
    /// Returns once it accepts connections.
    fn start(data_dir: &Path, bin_dir: &Path) -> RestoredMariaDb {
        let port = stillpoint_testkit::free_port();
        let parent = data_dir.parent().unwrap();
        let mut command = Command::new("/usr/sbin/mariadbd");
        command.arg("--no-defaults");
        if stillpoint::pitr::running_as_root() {
            command.arg("--user=root");
        }
        command
            .arg(format!("--datadir={}", data_dir.display()))
            .arg(format!(
                "--socket={}",
                parent.join("restored.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                parent.join("restored.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                parent.join("restored.log").display()
            ))
            .arg(format!("--port={port}"))
            .args(["--bind-address=127.0.0.1", "--skip-log-bin"])
            // As the testkit's server (testkit/src/mariadb.rs), so both restores meet
            // the same settings.
            .args([
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=16M",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-doublewrite=0",
                "--innodb-use-native-aio=0",
                "--skip-name-resolve",
            ])
            .stderr(Stdio::null());
        let process = Process::spawn(&mut command);
        let restored = RestoredMariaDb {
            _process: process,
            port,
            bin_dir: bin_dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        while restored.try_sql("SELECT 1").is_none() {
            assert!(
                Instant::now() < deadline,
                "the restored MariaDB did not start: {}",
                std::fs::read_to_string(parent.join("restored.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        restored
    }

    fn try_sql(&self, sql: &str) -> Option<String> {
        let output = Command::new(self.bin_dir.join("mariadb"))
            .args([
                "--batch",
                "--skip-column-names",
                "--user=root",
                "--host=127.0.0.1",
            ])
            .arg(format!("--port={}", self.port))
            .args(["-e", sql])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|| panic!("{sql} failed on the restored MariaDB"))
    }
}

impl MariadbRuns {
    pub fn report(&self) -> (String, Row) {
        let seconds = |values: &[Duration]| {
            median(&values.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
        };
        let (dump, physical) = (seconds(&self.dump_restore), seconds(&self.physical_restore));
        let ratio = dump / physical;
        let body = format!(
            "{measured} {runs} backups and {runs} restores of each, alternating; medians. \
             A MariaDB ledger table of {rows} rows, {mib:.0} MiB of data and indexes.\n\n\
             | | backup | stored | restore |\n|---|---|---|---|\n\
             | ours: the consistent dump (`archive::mariadb::base_backup`, zstd {level} → \
             age), restored into a new database of the running server \
             (`restore_base`) | {dump_backup:.2} s | {dump_stored:.0} MiB | {dump:.2} s |\n\
             | `mariadb-backup --backup --stream=xbstream \\| zstd -{level} \\| age`, \
             restored by `age -d \\| zstd -d \\| mbstream -x`, `--prepare`, a server \
             started on it | {physical_backup:.2} s | {physical_stored:.0} MiB | \
             {physical:.2} s |\n\n\
             **Base restore dump / mariadb-backup: {ratio:.2}×** (the lower restores \
             faster). The dump restores one database into any server under any name; \
             mariadb-backup restores a whole server.",
            measured = support::measured_line(crate::COMMAND),
            runs = self.dump_restore.len(),
            rows = self.rows,
            mib = support::mib(self.bytes),
            level = crate::ZSTD_LEVEL,
            dump_backup = seconds(&self.dump_backup),
            dump_stored = support::mib(self.dump_stored),
            physical_backup = seconds(&self.physical_backup),
            physical_stored = support::mib(self.physical_stored),
        );
        let row = Row::new(
            crate::SECTION,
            &format!(
                "MariaDB base restore, {:.0} MiB table: our consistent dump vs \
                 `mariadb-backup --stream`",
                support::mib(self.bytes)
            ),
            format!("{dump:.1} s"),
            format!("{physical:.1} s"),
            Some(ratio),
            Target::None,
        );
        (body, row)
    }
}
