//! Restoring a point: after ≥ 500 MB of WAL written since the base backups, one point
//! (`stillpoint point`: a pause, `pg_create_restore_point`, the archive waited for),
//! then, alternating:
//!
//! - `stillpoint restore --point ID --to DIR` (base + archived WAL replayed to the
//!   point in a scratch server, promoted, stopped), then the data directory started;
//! - `pgbackrest restore --type=name --target=<the same restore point>
//!   --target-action=promote`, then the data directory started (it fetches the WAL
//!   with `archive-get` while it replays);
//! - today's logical restore: `stillpoint restore BACKUP --to postgres://…` of a
//!   `stillpoint backup` of the same database, into an empty database of a running
//!   server.
//!
//! The two point restores are timed to the same end: the server has finished
//! recovery (promoted) and accepts connections. Each restore is checked against the
//! sum of the ledger's amounts at the point; an update committed just after the point
//! would change it, so a restore that replayed past the point would fail the check.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{self, Row, Target, median};
use crate::{DATABASE, Fixture, Server, chown_to_postgres, lsn, set_mode, stillpoint};

/// Rows per batch of the updates that write the WAL, at most.
const BATCH: u64 = 250_000;

pub struct Prepared {
    pub point_id: String,
    pub restore_point: String,
    /// WAL written between the bases and the point.
    pub wal_bytes: u64,
    /// `sum(amount)` at the point, and after the update that follows it.
    pub sum_at_point: String,
    pub sum_after: String,
    /// The logical backup of the same database, taken after the point.
    pub backup_id: String,
    pub backup_stored: u64,
    /// `stillpoint point`'s wait for the archive to reach the marker.
    pub point_wait_ms: u64,
}

/// Writes the WAL, takes the point, makes sure pgBackRest's archive has it too, and
/// takes the logical backup.
pub fn prepare(fixture: &Fixture, wal_bytes: u64) -> Prepared {
    let postgres = &fixture.postgres;
    let from = lsn(&postgres.psql(DATABASE, "SELECT pg_current_wal_lsn()"));
    let mut next = 0;
    // Small batches on a small table, so --quick writes about what it asks.
    let batch = (fixture.rows / 8).clamp(1, BATCH);
    let started = Instant::now();
    loop {
        let written = lsn(&postgres.psql(DATABASE, "SELECT pg_current_wal_lsn()")) - from;
        if written >= wal_bytes {
            break;
        }
        // Updates over the whole table in turn: new row versions and their index
        // entries, full-page images after each checkpoint, as a busy ledger writes.
        postgres.psql(
            DATABASE,
            &format!(
                "UPDATE ledger SET amount = amount + 1 WHERE seq > {next} AND seq <= {}",
                next + batch
            ),
        );
        next = (next + batch) % fixture.rows;
    }
    eprintln!("wrote the WAL in {:.0?}", started.elapsed());
    let sum = || postgres.psql(DATABASE, "SELECT sum(amount) FROM ledger");
    let sum_at_point = sum();
    let point = stillpoint(&["point", "--config", fixture.config(), "--wait", "30m"]);
    let marker = &point["databases"][0]["marker"]["details"];
    let wal_bytes = lsn(marker["lsn"].as_str().unwrap()) - from;
    // Past the point: a restore that replays beyond it fails the sum check.
    postgres.psql(
        DATABASE,
        "UPDATE ledger SET amount = amount + 1000000 WHERE seq = 1",
    );
    let sum_after = sum();
    assert_ne!(sum_at_point, sum_after);
    // `check` switches to a new WAL segment and waits until pgBackRest has archived the
    // last one, which holds the restore point.
    fixture.pgbackrest.run(&["check"]);
    let manifest = stillpoint(&["backup", "--config", fixture.config()]);
    Prepared {
        point_id: point["point_id"].as_str().unwrap().to_owned(),
        restore_point: marker["restore_point"].as_str().unwrap().to_owned(),
        wal_bytes,
        sum_at_point,
        sum_after,
        backup_id: manifest["backup_id"].as_str().unwrap().to_owned(),
        backup_stored: manifest["manifest"]["databases"][0]["artifact"]["stored_size"]
            .as_u64()
            .unwrap_or_default(),
        point_wait_ms: point["timings"]["wait_ms"].as_u64().unwrap_or_default(),
    }
}

#[derive(Default)]
pub struct Restores {
    /// `stillpoint restore --point` and the server started, to accepting connections.
    pub point: Vec<Duration>,
    /// Of which `stillpoint restore --point` alone.
    pub point_command: Vec<Duration>,
    /// Of which, from the command's report: finding and checking what the point
    /// needs; the recovery (the base extracted into the data directory, replay with
    /// the WAL fed alongside, the server stopped), and of that the base's extraction.
    pub point_check: Vec<Duration>,
    pub point_replay: Vec<Duration>,
    pub point_base: Vec<Duration>,
    /// Redo alone, as each server logs it ("redo done at … elapsed: N s").
    pub point_redo: Vec<Duration>,
    pub pgbackrest_redo: Vec<Duration>,
    pub pgbackrest: Vec<Duration>,
    /// Of which `pgbackrest restore` alone (the files; replay is in the start).
    pub pgbackrest_command: Vec<Duration>,
    pub logical: Vec<Duration>,
}

pub fn compare(fixture: &Fixture, prepared: &Prepared, runs: usize) -> Restores {
    // Today's logical restore goes into a running server of its own, with the settings
    // of the restored ones (durable, archiving nothing).
    let servers = fixture.dir.path().join("pg");
    let logical_server = Server::init(&servers, "logical", &[]);
    let bin_dir = &fixture.postgres.bin_dir;
    // The restored servers must not archive into pgBackRest's repository as the
    // original did (its configuration came with the data directory).
    let restored_settings = ["archive_mode=off".to_owned()];
    let mut restores = Restores::default();
    for run in 0..runs {
        eprintln!("restores, round {} of {runs}", run + 1);
        // Each kind goes first in turn, so none always meets a colder cache.
        for turn in 0..3 {
            match (turn + run) % 3 {
                0 => {
                    let target = servers.join("point-restored");
                    let started = Instant::now();
                    let report = stillpoint(&[
                        "restore",
                        "--point",
                        &prepared.point_id,
                        "--config",
                        fixture.config(),
                        "--database",
                        DATABASE,
                        "--to",
                        target.to_str().unwrap(),
                    ]);
                    restores.point_command.push(started.elapsed());
                    let server = Server::start(bin_dir, &target, &restored_settings);
                    restores.point.push(started.elapsed());
                    let report = &report["databases"][0];
                    let ms = |value: &serde_json::Value| {
                        Duration::from_millis(value.as_u64().unwrap_or_default())
                    };
                    restores.point_check.push(ms(&report["check_ms"]));
                    restores.point_base.push(ms(&report["recovery"]["base_ms"]));
                    restores
                        .point_replay
                        .push(ms(&report["recovery"]["recovery_ms"]));
                    restores
                        .point_redo
                        .push(redo_time(&target.join("stillpoint-recovery.log")));
                    check_sum(
                        &server.psql(DATABASE, "SELECT sum(amount) FROM ledger"),
                        prepared,
                    );
                }
                1 => {
                    let target = servers.join("pgbackrest-restored");
                    new_data_dir(&target);
                    let started = Instant::now();
                    fixture.pgbackrest.run(&[
                        "restore",
                        "--type=name",
                        &format!("--target={}", prepared.restore_point),
                        "--target-action=promote",
                        &format!("--pg1-path={}", target.display()),
                    ]);
                    restores.pgbackrest_command.push(started.elapsed());
                    let server = Server::start(bin_dir, &target, &restored_settings);
                    restores.pgbackrest.push(started.elapsed());
                    restores
                        .pgbackrest_redo
                        .push(redo_time(&target.with_extension("log")));
                    check_sum(
                        &server.psql(DATABASE, "SELECT sum(amount) FROM ledger"),
                        prepared,
                    );
                }
                _ => {
                    let name = "logical_restored";
                    logical_server.create_database(name);
                    let started = Instant::now();
                    stillpoint(&[
                        "restore",
                        &prepared.backup_id,
                        "--config",
                        fixture.config(),
                        "--database",
                        DATABASE,
                        "--to",
                        &logical_server.url(name),
                    ]);
                    restores.logical.push(started.elapsed());
                    let sum = logical_server.psql(name, "SELECT sum(amount) FROM ledger");
                    assert_eq!(sum, prepared.sum_after, "the logical restore differs");
                    logical_server.psql("postgres", &format!("DROP DATABASE {name}"));
                }
            }
        }
    }
    restores
}

/// How long redo took, from the server's log line `redo done at … elapsed: N s`
/// (zero when the log has none).
fn redo_time(log: &Path) -> Duration {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|line| line.contains("redo done at"))
        .filter_map(|line| line.rsplit_once("elapsed: "))
        .filter_map(|(_, rest)| rest.trim().trim_end_matches(" s").parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .next_back()
        .unwrap_or_default()
}

fn check_sum(sum: &str, prepared: &Prepared) {
    assert_eq!(
        sum, prepared.sum_at_point,
        "a restore of point {} does not hold the ledger as it was at the point \
         (after it: {})",
        prepared.point_id, prepared.sum_after
    );
}

/// An empty data directory the server's user owns, as pgBackRest restores into.
fn new_data_dir(path: &Path) {
    std::fs::create_dir(path).unwrap();
    set_mode(path, 0o700);
    chown_to_postgres(path);
}

impl Restores {
    pub fn report(&self, fixture: &Fixture, prepared: &Prepared) -> (String, Vec<Row>) {
        let seconds = |values: &[Duration]| {
            median(&values.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
        };
        let (point, pgbackrest, logical) = (
            seconds(&self.point),
            seconds(&self.pgbackrest),
            seconds(&self.logical),
        );
        let wal_mb = prepared.wal_bytes as f64 / 1e6;
        let body = format!(
            "{measured} {runs} restores of each kind, each kind first in turn; medians. \
             {wal_mb:.0} MB of WAL written after the base backups (updates across the \
             {db_mib:.0} MiB ledger database), then one point; pgBackRest restores to the \
             same restore point (`{restore_point}`). Both point restores end when the \
             server has promoted and accepts connections, and hold the ledger as it was \
             at the point (checked: an update committed just after the point is absent). \
             `stillpoint point` waited {wait:.1} s for the archive to reach the point.\n\n\
             | | time | of which |\n|---|---|---|\n\
             | `stillpoint restore --point` + server start | {point:.2} s | the command \
             {point_command:.2} s (checks {point_check:.2} s, recovery {point_replay:.2} s: \
             the base extracted into the data directory {point_base:.2} s, redo \
             {point_redo:.2} s with the WAL read from the storage alongside, stop), start \
             {point_start:.2} s |\n\
             | `pgbackrest restore --type=name` + server start | {pgbackrest:.2} s \
             | the command {pgbackrest_command:.2} s (the base into the data directory), \
             start {pgbackrest_start:.2} s (redo {pgbackrest_redo:.2} s, WAL fetched by \
             `archive-get` as it goes) |\n\
             | logical: `stillpoint restore BACKUP --to postgres://…` ({backup_mib:.0} MiB \
             stored) | {logical:.2} s | |\n\n\
             **Point restore stillpoint / pgBackRest: {ratio:.2}×** (target ≤ 1.1×). \
             **RTO point / logical restore: {rto:.2}×**.",
            measured = support::measured_line(crate::COMMAND),
            runs = self.point.len(),
            db_mib = support::mib(fixture.bytes),
            restore_point = prepared.restore_point,
            wait = prepared.point_wait_ms as f64 / 1000.0,
            point_command = seconds(&self.point_command),
            point_check = seconds(&self.point_check),
            point_base = seconds(&self.point_base),
            point_replay = seconds(&self.point_replay),
            point_redo = seconds(&self.point_redo),
            pgbackrest_redo = seconds(&self.pgbackrest_redo),
            point_start = point - seconds(&self.point_command),
            pgbackrest_command = seconds(&self.pgbackrest_command),
            pgbackrest_start = pgbackrest - seconds(&self.pgbackrest_command),
            backup_mib = support::mib(prepared.backup_stored),
            ratio = point / pgbackrest,
            rto = point / logical,
        );
        let rows = vec![
            Row::new(
                crate::SECTION,
                &format!(
                    "restore of a point after {wal_mb:.0} MB of WAL, vs `pgbackrest restore \
                     --type=name`"
                ),
                format!("{point:.1} s"),
                format!("{pgbackrest:.1} s"),
                Some(point / pgbackrest),
                Target::AtMost(1.1),
            ),
            Row::new(
                crate::SECTION,
                "RTO of that point restore vs a logical restore (`stillpoint backup` + \
                 `restore`) of the same database",
                format!("{point:.1} s"),
                format!("{logical:.1} s"),
                Some(point / logical),
                Target::None,
            ),
        ];
        (body, rows)
    }
}
