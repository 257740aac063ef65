//! MariaDB base restore: which base format to keep (issue 11, "Base backups in
//! storage"). On one throwaway MariaDB holding a ledger table, alternating, both
//! through the library as `base-backup` and `restore --point` run them:
//!
//! - ours: what `base-backup` takes by default, `mariadb-backup --backup
//!   --stream=xbstream` (zstd 3 → age → BLAKE3, `archive::mariadb::base_backup`),
//!   restored by `archive::mariadb_backup::restore_base` (checksum, `mbstream -x`,
//!   `mariadb-backup --prepare`) and a scratch server started on the result, until it
//!   accepts connections;
//! - the dump (`base_method = "dump"`), restored by `archive::mariadb::restore_base`
//!   (checksum, then the dump into the `mariadb` client) into a new, empty database
//!   of the running server.
//!
//! Both end with the table's rows readable, checked. Both backups are timed too.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint::adapters::{MariadbBaseMethod, MariadbConfig};
use stillpoint::archive::base::BaseRecord;
use stillpoint::archive::mariadb;
use stillpoint::archive::mariadb_backup::{self, ScratchServer};
use stillpoint::pipeline::{Decryption, Encryption, PipelineSettings};
use stillpoint::storage::Storage;
use stillpoint_testkit::MariaDb;

use crate::support::{self, Row, Target, median};

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
    let recipient = key.to_public().to_string();
    let storage =
        Storage::open(&format!("file://{}", dir.path().join("storage").display())).unwrap();
    let settings = PipelineSettings {
        zstd_level: Some(crate::ZSTD_LEVEL as i32),
        encryption: Encryption::Recipients(vec![recipient]),
    };
    let decryption = Decryption::Identities(vec![identity]);
    let config = |base_method| MariadbConfig {
        url: server.url(DATABASE),
        bin_dir: Some(server.bin_dir().to_owned()),
        drill_server_url: None,
        base_method,
    };
    // Ours: what `base-backup` takes by default.
    let physical_config = config(MariadbBaseMethod::default());
    let dump_config = config(MariadbBaseMethod::Dump);

    let mut result = MariadbRuns {
        rows,
        bytes,
        ..MariadbRuns::default()
    };
    let mut physical_record: Option<BaseRecord> = None;
    let mut dump_record: Option<BaseRecord> = None;
    for run in 0..runs {
        eprintln!("MariaDB bases, round {} of {runs}", run + 1);
        for ours in [run % 2 == 0, run % 2 == 1] {
            let config = if ours { &physical_config } else { &dump_config };
            let started = Instant::now();
            let base = runtime
                .block_on(mariadb::base_backup(&storage, &settings, DATABASE, config))
                .expect("MariaDB base backup");
            let took = started.elapsed();
            if ours {
                assert_eq!(base.kind, mariadb_backup::KIND);
                result.physical_backup.push(took);
                result.physical_stored = base.artifact.stored_size;
                physical_record = Some(base);
            } else {
                result.dump_backup.push(took);
                result.dump_stored = base.artifact.stored_size;
                dump_record = Some(base);
            }
        }
    }
    let physical_record = physical_record.expect("at least one round");
    let dump_record = dump_record.expect("at least one round");

    for run in 0..runs {
        eprintln!("MariaDB restores, round {} of {runs}", run + 1);
        for ours in [run % 2 == 0, run % 2 == 1] {
            if ours {
                let data_dir = dir.path().join("physical-restored");
                let started = Instant::now();
                std::fs::create_dir(&data_dir).unwrap();
                let restored = runtime.block_on(async {
                    mariadb_backup::restore_base(
                        &storage,
                        &decryption,
                        &physical_record,
                        &data_dir,
                        Some(server.bin_dir()),
                    )
                    .await
                    .expect("MariaDB base restore");
                    ScratchServer::start(&data_dir, Some(server.bin_dir()))
                        .await
                        .expect("a server on the restored base")
                });
                result.physical_restore.push(started.elapsed());
                let count = count_rows(server.bin_dir(), &restored.socket());
                assert_eq!(count, rows.to_string(), "the physical restore lost rows");
                runtime.block_on(restored.stop()).unwrap();
                std::fs::remove_dir_all(&data_dir).unwrap();
            } else {
                let target = "restored";
                server.create_database(target);
                let started = Instant::now();
                runtime
                    .block_on(mariadb::restore_base(
                        &storage,
                        &decryption,
                        &dump_record,
                        &server.url(target),
                        Some(server.bin_dir()),
                    ))
                    .expect("MariaDB base restore");
                result.dump_restore.push(started.elapsed());
                let count = server.sql(target, "SELECT count(*) FROM ledger");
                assert_eq!(count.trim(), rows.to_string(), "the dump restore lost rows");
                server.sql("", &format!("DROP DATABASE {target}"));
            }
        }
    }
    result
}

/// Rows of the ledger table on the scratch server at `socket`.
fn count_rows(bin_dir: &Path, socket: &Path) -> String {
    let output = Command::new(bin_dir.join("mariadb"))
        .args([
            "--no-defaults",
            "--batch",
            "--skip-column-names",
            "--user=root",
        ])
        .arg(format!("--socket={}", socket.display()))
        .args(["-e", "SELECT count(*) FROM auditor.ledger"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "counting the restored rows failed");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl MariadbRuns {
    pub fn report(&self) -> (String, Row) {
        let seconds = |values: &[Duration]| {
            median(&values.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
        };
        let (dump, physical) = (seconds(&self.dump_restore), seconds(&self.physical_restore));
        // Ours over the other row, as the other parts' ratios are.
        let ratio = physical / dump;
        let body = format!(
            "{measured} {runs} backups and {runs} restores of each, alternating; medians. \
             A MariaDB ledger table of {rows} rows, {mib:.0} MiB of data and indexes.\n\n\
             | | backup | stored | restore |\n|---|---|---|---|\n\
             | ours: `base-backup`'s default, `mariadb-backup --backup --stream=xbstream` \
             (`archive::mariadb::base_backup`, zstd {level} → age), restored by \
             `archive::mariadb_backup::restore_base` (`mbstream -x`, `--prepare`) and a \
             server started on it | {physical_backup:.2} s | {physical_stored:.0} MiB | \
             {physical:.2} s |\n\
             | the consistent dump (`base_method = \"dump\"`), restored into a new \
             database of the running server (`archive::mariadb::restore_base`) | \
             {dump_backup:.2} s | {dump_stored:.0} MiB | {dump:.2} s |\n\n\
             **Base restore ours (mariadb-backup) / dump: {ratio:.2}×** (below 1: ours \
             restores faster). The dump restores one database into any server under any \
             name; mariadb-backup restores a whole server's data directory.",
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
                "MariaDB base restore, {:.0} MiB table: ours (`mariadb-backup --stream`) vs \
                 the consistent dump",
                support::mib(self.bytes)
            ),
            format!("{physical:.1} s"),
            format!("{dump:.1} s"),
            Some(ratio),
            Target::None,
        );
        (body, row)
    }
}
