//! Base backup throughput: `stillpoint base-backup` (pg_basebackup's tar through
//! zstd 3 → age → BLAKE3 into local file storage) against `pgbackrest backup
//! --type=full` (zstd 3, one process, AES-256 repository encryption, its repository on
//! the same disk), alternating, on the same server while both archive its WAL.

use std::time::{Duration, Instant};

use crate::support::{self, Row, Target, median};
use crate::{DATABASE, Fixture, stillpoint};

const SECTION: &str = crate::SECTION;

#[derive(Default)]
pub struct Bases {
    pub stillpoint: Vec<Duration>,
    pub pgbackrest: Vec<Duration>,
    /// Bytes of pg_basebackup's tar (the server's files, what both copy).
    pub raw: u64,
    pub stored: u64,
    /// What pgBackRest's last backup occupies in its repository, when `info` says.
    pub pgbackrest_stored: Option<u64>,
}

pub fn compare(fixture: &Fixture, rounds: usize) -> Bases {
    let mut bases = Bases::default();
    for round in 0..rounds {
        eprintln!("base backups, round {} of {rounds}", round + 1);
        // Alternate which goes first, so neither always meets a colder cache.
        for ours in [round % 2 == 0, round % 2 == 1] {
            let started = Instant::now();
            if ours {
                let records = stillpoint(&[
                    "base-backup",
                    "--config",
                    fixture.config(),
                    "--database",
                    DATABASE,
                ]);
                bases.stillpoint.push(started.elapsed());
                let artifact = &records[0]["artifact"];
                bases.raw = artifact["size"].as_u64().unwrap();
                bases.stored = artifact["stored_size"].as_u64().unwrap();
            } else {
                fixture.pgbackrest.run(&["backup", "--type=full"]);
                bases.pgbackrest.push(started.elapsed());
            }
        }
    }
    let info: serde_json::Value =
        serde_json::from_str(&fixture.pgbackrest.run(&["info", "--output=json"])).unwrap();
    bases.pgbackrest_stored = info[0]["backup"]
        .as_array()
        .and_then(|backups| backups.last())
        .and_then(|backup| backup["info"]["repository"]["size"].as_u64());
    bases
}

impl Bases {
    pub fn report(&self, fixture: &Fixture) -> (String, Row) {
        let seconds = |values: &[Duration]| {
            median(&values.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
        };
        let (ours, theirs) = (seconds(&self.stillpoint), seconds(&self.pgbackrest));
        let rate = |seconds: f64| self.raw as f64 / 1e6 / seconds;
        let ratio = theirs / ours;
        let body = format!(
            "{measured} {runs} base backups of each, alternating which goes first; medians. \
             The server holds the {db_mib:.0} MiB ledger database ({rows} rows); \
             pg_basebackup's tar of it is {raw_mib:.0} MiB. Throughput is those bytes per \
             second for both.\n\n\
             | | time | throughput | stored |\n|---|---|---|---|\n\
             | `stillpoint base-backup` (pg_basebackup tar → zstd {level} → age → BLAKE3 → \
             file storage) | {ours:.2} s | {ours_rate:.0} MB/s | {stored_mib:.0} MiB |\n\
             | `pgbackrest backup --type=full` (zstd {level}, `process-max=1`, aes-256-cbc) \
             | {theirs:.2} s | {theirs_rate:.0} MB/s | {theirs_stored} |\n\n\
             **Base backup throughput stillpoint / pgBackRest: {ratio:.2}×** (target ≥ \
             1.0×). Both start with a fast checkpoint; pgBackRest's time includes waiting \
             for the backup's last WAL segment to reach its archive, ours does not (the \
             continuous archive holds it).",
            measured = support::measured_line(crate::COMMAND),
            runs = self.stillpoint.len(),
            db_mib = support::mib(fixture.bytes),
            rows = fixture.rows,
            raw_mib = support::mib(self.raw),
            level = crate::ZSTD_LEVEL,
            ours_rate = rate(ours),
            stored_mib = support::mib(self.stored),
            theirs_rate = rate(theirs),
            theirs_stored = self
                .pgbackrest_stored
                .map_or("?".to_owned(), |bytes| format!(
                    "{:.0} MiB",
                    support::mib(bytes)
                )),
        );
        let row = Row::new(
            SECTION,
            &format!(
                "base backup throughput, {:.0} MiB server, vs `pgbackrest backup --type=full`",
                support::mib(self.raw)
            ),
            format!("{:.0} MB/s ({ours:.1} s)", rate(ours)),
            format!("{:.0} MB/s ({theirs:.1} s)", rate(theirs)),
            Some(ratio),
            Target::AtLeast(1.0),
        );
        (body, row)
    }
}
