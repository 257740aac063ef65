//! Points, as an operator runs them: a ledger cluster on PostgreSQL (its ledger and
//! auditor databases, each archived by `stillpoint archive`) under load, a base
//! backup of each into the storage, points every second or so, then several points
//! chosen at random drilled into fresh scratch servers that must pass `ledger-node
//! check` and hold exactly the rows counted inside each point's pause. Negative
//! controls: a chunk a point needs deleted (or damaged) makes `restore` and `drill`
//! refuse before writing anything, naming it; a point in a storage without base
//! backups is refused before anything is paused. Catalog: `prune` by the runbook's
//! retention removes old points, the base and the chunks only they needed, and the
//! point kept still drills; `verify` passes on a whole chain and names a gap.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use stillpoint::archive::{Archive, Catalog, ChunkRecord, Position};
use stillpoint::pipeline::PipelineSettings;
use stillpoint::storage::Storage;
use stillpoint_testkit::{Postgres, PostgresOptions};

use crate::cluster::{Cluster, Load};
use crate::util::{Process, bin, run_json, run_json_with_env, stderr, wait_until};

struct Setup {
    postgres: Postgres,
    cluster: Cluster,
    dir: tempfile::TempDir,
    runbook: PathBuf,
    archiver: Option<Process>,
    runtime: tokio::runtime::Runtime,
}

impl Setup {
    fn start() -> Setup {
        let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
        postgres.create_database("ledger");
        postgres.create_database("auditor");
        let cluster = Cluster::start_on(
            2,
            postgres.url("ledger"),
            postgres.url("auditor"),
            &[],
            tempfile::tempdir().unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        // The scratch servers run as `postgres` and read what is staged under it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let runbook = dir.path().join("runbook.toml");
        let setup = Setup {
            postgres,
            cluster,
            runbook,
            dir,
            archiver: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        setup.write_runbook(&setup.storage_dir(), &setup.runbook);
        setup
    }

    fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn write_runbook(&self, storage: &Path, path: &Path) {
        let text = format!(
            r#"
cluster = "points-test"
[pause]
tiers = [{{ addresses = [{ledgers}] }}, {{ addresses = ["{auditor}"] }}]
[[databases]]
name = "ledger"
adapter = "postgres"
url = "{ledger}"
bin_dir = "{bin_dir}"
archive = true
[[databases]]
name = "auditor"
adapter = "postgres"
url = "{auditor_db}"
bin_dir = "{bin_dir}"
archive = true
[storage]
url = "file://{storage}"
[archive]
partial_interval = "200ms"
spool_dir = "{spool}"
[drill]
scratch_dir = "{scratch}"
[[drill.checks]]
name = "ledger_node_check"
command = ["ledger-node", "check", "--ledger-db", "{{ledger}}", "--auditor-db", "{{auditor}}"]
"#,
            ledgers = self
                .cluster
                .ledgers
                .iter()
                .map(|node| format!("\"{}\"", node.address))
                .collect::<Vec<_>>()
                .join(", "),
            auditor = self.cluster.auditor.address,
            ledger = self.postgres.url("ledger"),
            auditor_db = self.postgres.url("auditor"),
            bin_dir = self.postgres.bin_dir().display(),
            storage = storage.display(),
            spool = self.dir.path().join("spool").display(),
            scratch = self.dir.path().display(),
        );
        std::fs::write(path, text).unwrap();
    }

    fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    fn start_archiver(&mut self) {
        self.archiver = Some(start_archiver(self.config()));
    }

    fn archive(&self, database: &str) -> Archive {
        let storage = Storage::open(&format!("file://{}", self.storage_dir().display())).unwrap();
        Archive::new(storage, PipelineSettings::default(), database).unwrap()
    }

    fn stillpoint(&self, args: &[&str]) -> (i32, Value) {
        stillpoint_json(args)
    }

    fn point(&self) -> Value {
        take_point(self.config())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        stop_archiver(self.archiver.take());
    }
}

/// `stillpoint archive --config CONFIG`, in the background (its log on the test's
/// stderr).
pub(crate) fn start_archiver(config: &str) -> Process {
    let child = Command::new(bin("stillpoint"))
        .args(["archive", "--config", config])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Process::new(child, "stillpoint archive".to_owned())
}

/// Stops an archiver as its supervisor would (SIGTERM: it pushes what it has first).
pub(crate) fn stop_archiver(archiver: Option<Process>) {
    if let Some(archiver) = archiver {
        archiver.signal("TERM");
        let _ = archiver.wait_output(Duration::from_secs(30));
    }
}

/// `stillpoint ARGS` printing JSON, with our binaries on PATH (for the drill's
/// `ledger-node check`).
pub(crate) fn stillpoint_json(args: &[&str]) -> (i32, Value) {
    run_json_with_env("stillpoint", args, &[("PATH", &path_with_our_binaries())])
}

/// Deletes a chunk from the storage (record and artifact, as a careless clean-up
/// would), and any shorter partial copy of it an archiver left behind, which would
/// otherwise fill part of the hole.
pub(crate) async fn remove_chunk(archive: &Archive, catalog: &Catalog, victim: &ChunkRecord) {
    archive.remove(victim).await.unwrap();
    let (victim_start, victim_end) = victim.range().unwrap();
    for leftover in catalog.superseded.iter().filter(|chunk| {
        chunk
            .range()
            .is_some_and(|(start, end)| start >= victim_start && end <= victim_end)
    }) {
        archive.remove(leftover).await.unwrap();
    }
}

/// The chunks of `catalog` a replay from `from` to `target` reads, in order.
pub(crate) fn chain(catalog: &Catalog, from: &Position, target: &Position) -> Vec<ChunkRecord> {
    catalog
        .chunks
        .iter()
        .filter(|chunk| {
            chunk
                .range()
                .is_some_and(|(start, end)| end > from && start < target)
        })
        .cloned()
        .collect()
}

/// `verify`'s JSON reports, for `database` of its first point, a gap between
/// `before` and `after`, naming both chunks and the positions on each side.
pub(crate) fn assert_gap_named(
    verified: &Value,
    database: &str,
    before: &ChunkRecord,
    after: &ChunkRecord,
) {
    let problem = verified["points"][0]["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["database"] == database)
        .unwrap()["problem"]
        .as_str()
        .unwrap_or_else(|| panic!("no problem named for {database}: {verified}"))
        .to_owned();
    let (_, before_end) = before.range().unwrap();
    let (after_start, _) = after.range().unwrap();
    for named in [
        "has a gap".to_owned(),
        before.name.clone(),
        after.name.clone(),
        before_end.to_string(),
        after_start.to_string(),
    ] {
        assert!(problem.contains(&named), "{named} must be named: {problem}");
    }
}

/// `stillpoint point --count-rows`, which must succeed.
pub(crate) fn take_point(config: &str) -> Value {
    let (code, point) = run_json(
        "stillpoint",
        &[
            "point",
            "--config",
            config,
            "--count-rows",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "point: {point}");
    point
}

/// PATH with the directory of our binaries first, for the drill's command check.
fn path_with_our_binaries() -> String {
    let ours = bin("ledger-node").parent().unwrap().display().to_string();
    match std::env::var("PATH") {
        Ok(path) => format!("{ours}:{path}"),
        Err(_) => ours,
    }
}

/// Several points under load, each drilled into fresh servers: every one passes
/// `ledger-node check` and holds exactly the rows counted inside its pause (a state
/// from even one transfer later or earlier would differ in `ledger` rows). Then a
/// deleted chunk and a damaged one make restore and drill refuse, naming them, with
/// nothing written.
#[test]
fn points_under_load_restore_exactly_their_cut_and_refuse_missing_chunks() {
    let mut setup = Setup::start();
    setup.start_archiver();
    let load = Load::start(&setup.cluster.ledger_tier(), 4, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || setup.cluster.transactions() >= 20,
    );

    // A point before any base backup is refused, before anything is paused.
    let output = crate::util::run("stillpoint", &["point", "--config", setup.config()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("database ledger has no base backup")
            && stderr(&output).contains("nothing was paused"),
        "{}",
        stderr(&output)
    );

    let (code, bases) = setup.stillpoint(&[
        "base-backup",
        "--config",
        setup.config(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "base-backup: {bases}");
    assert_eq!(bases.as_array().unwrap().len(), 2, "{bases}");

    let mut points = Vec::new();
    for _ in 0..4 {
        let point = setup.point();
        assert!(point["exact"].as_bool().unwrap(), "{point}");
        for database in point["databases"].as_array().unwrap() {
            assert!(database["base"]["id"].is_string(), "{point}");
            assert!(database["row_counts"].is_object(), "{point}");
        }
        points.push(point);
        // Spaced under load as a schedule would take them, so each point holds other rows.
        std::thread::sleep(Duration::from_millis(700));
    }
    load.stop();

    let (code, listing) = run_json(
        "stillpoint",
        &["list", "--config", setup.config(), "--output", "json"],
    );
    assert_eq!(code, 0);
    assert_eq!(
        listing["points"]["points"].as_array().unwrap().len(),
        4,
        "{listing}"
    );

    // Two points at random (and always the first, whose ledger is the smallest).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let chosen = [0, 1 + seed % 3];
    let mut ledger_rows = Vec::new();
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
        for database in drill["databases"].as_array().unwrap() {
            assert_eq!(
                database["recovery"]["row_counts_match_cut"], true,
                "{database}"
            );
            // A drill reads every table back: its report has the content hash.
            assert!(
                database["recovery"]["content"]["digest"].is_string(),
                "{database}"
            );
        }
        ledger_rows.push(
            points[index]["databases"][0]["row_counts"]["public.ledger"]
                .as_u64()
                .unwrap(),
        );
    }
    // Under load, two points hold different states: the row check is not vacuous.
    assert!(
        ledger_rows[0] < ledger_rows[1],
        "points under load should differ: {ledger_rows:?}"
    );

    // `restore --point` of one database into a new data directory.
    let restored = setup.dir.path().join("restored");
    let (code, restore) = setup.stillpoint(&[
        "restore",
        "--point",
        points[1]["point_id"].as_str().unwrap(),
        "--database",
        "ledger",
        "--config",
        setup.config(),
        "--to",
        restored.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "restore: {restore}");
    assert_eq!(
        restore["databases"][0]["recovery"]["row_counts_match_cut"], true,
        "{restore}"
    );
    // A restore counts rows but does not hash the content, and says so (no zeros).
    assert!(
        restore["databases"][0]["recovery"]["content"].is_null(),
        "{restore}"
    );
    assert!(restored.join("PG_VERSION").exists());

    // Negative control: delete a chunk the newest point needs (record and artifact, as
    // a careless clean-up would). Stop the archiver first, so nothing re-pushes it.
    stop_archiver(setup.archiver.take());
    let newest = points[3]["point_id"].as_str().unwrap();
    let base_start: Position =
        serde_json::from_value(points[3]["databases"][0]["base"]["start"].clone()).unwrap();
    let archive = setup.archive("ledger");
    let catalog = setup.runtime.block_on(archive.catalog()).unwrap();
    // The chunk that holds the base's start: replay cannot begin without it.
    let victim = catalog
        .chunks
        .iter()
        .find(|chunk| chunk.range().is_some_and(|(_, end)| *end > base_start))
        .unwrap()
        .clone();
    let victim_segment = victim.name.split('.').next().unwrap().to_owned();
    // Damaged first: the artifact's bytes changed, the record kept.
    let artifact = setup.storage_dir().join(&victim.artifact.path);
    let original = std::fs::read(&artifact).unwrap();
    let mut damaged = original.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    std::fs::write(&artifact, &damaged).unwrap();
    let target = setup.dir.path().join("refused");
    for args in [
        vec![
            "restore",
            "--point",
            newest,
            "--database",
            "ledger",
            "--to",
            target.to_str().unwrap(),
        ],
        vec!["drill", "--point", newest],
    ] {
        let mut args = args;
        args.extend(["--config", setup.config()]);
        let output = crate::util::run("stillpoint", &args);
        assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
        assert!(
            stderr(&output).contains(&victim.name),
            "the damaged chunk {} must be named: {}",
            victim.name,
            stderr(&output)
        );
        assert!(
            !target.exists(),
            "nothing may be written before the checks pass"
        );
    }
    // Then deleted outright.
    std::fs::write(&artifact, &original).unwrap();
    setup.runtime.block_on(archive.remove(&victim)).unwrap();
    for args in [
        vec![
            "restore",
            "--point",
            newest,
            "--database",
            "ledger",
            "--to",
            target.to_str().unwrap(),
        ],
        vec!["drill", "--point", newest],
    ] {
        let mut args = args;
        args.extend(["--config", setup.config()]);
        let output = crate::util::run("stillpoint", &args);
        assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
        assert!(
            stderr(&output).contains(&victim_segment),
            "the deleted chunk's segment {victim_segment} must be named: {}",
            stderr(&output)
        );
        assert!(
            !target.exists(),
            "nothing may be written before the checks pass"
        );
    }
}

/// Points on two base backups; `prune` with `keep_last = 1` keeps the newest point,
/// the base it restores from and the chunks from that base's start, removes the
/// older points, the older base and the chunks before the kept base, and the kept
/// point still drills (ledger-node check and row counts). `verify` passes on every
/// point while the chain is whole; a chunk the kept point needs deleted from the
/// middle of its chain makes `verify` fail and name the gap by the chunks and
/// positions on each side (the negative control).
#[test]
fn prune_keeps_what_the_kept_point_needs_and_verify_names_a_gap() {
    let mut setup = Setup::start();
    let mut runbook = std::fs::read_to_string(&setup.runbook).unwrap();
    runbook.push_str("[retention]\nkeep_last = 1\n");
    std::fs::write(&setup.runbook, runbook).unwrap();
    setup.start_archiver();
    let load = Load::start(&setup.cluster.ledger_tier(), 2, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || setup.cluster.transactions() >= 10,
    );
    let base_backup = |setup: &Setup| {
        let (code, bases) = setup.stillpoint(&[
            "base-backup",
            "--config",
            setup.config(),
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "base-backup: {bases}");
    };
    base_backup(&setup);
    let old = [setup.point(), setup.point()];
    base_backup(&setup);
    // WAL over several segments between the new base and the kept point, so that a
    // chunk from the middle of its chain can go missing.
    for _ in 0..3 {
        let before = setup.cluster.transactions();
        wait_until(Duration::from_secs(30), "more transfers", || {
            setup.cluster.transactions() > before
        });
        setup.postgres.psql("ledger", "SELECT pg_switch_wal()");
        // Each switch archived before the next, so that a stalled archiver fails here,
        // by name, rather than as a point that timed out. (On feat/points-catalog this
        // wait timed out in about half the runs, for minutes: the archiver stalls at a
        // segment boundary after pg_switch_wal. An archiver bug, not prune's.)
        let switched: stillpoint::archive::Lsn = setup
            .postgres
            .psql("ledger", "SELECT pg_current_wal_lsn()")
            .parse()
            .unwrap();
        wait_until(
            Duration::from_secs(60),
            "both archives to hold the switched WAL",
            || {
                ["ledger", "auditor"].iter().all(|database| {
                    let catalog = setup.runtime.block_on(setup.archive(database).catalog());
                    catalog
                        .ok()
                        .and_then(|catalog| catalog.end())
                        .is_some_and(|end| end >= Position::Lsn(switched))
                })
            },
        );
    }
    let kept = setup.point();
    load.stop();
    let kept_id = kept["point_id"].as_str().unwrap();
    let old_base = old[0]["databases"][0]["base"]["id"].as_str().unwrap();
    let kept_base = kept["databases"][0]["base"]["id"].as_str().unwrap();
    assert_ne!(old_base, kept_base);
    assert_eq!(old[1]["databases"][0]["base"]["id"], old_base);
    let kept_start: Position =
        serde_json::from_value(kept["databases"][0]["base"]["start"].clone()).unwrap();

    // Whole: every point verifies.
    let (code, verified) =
        setup.stillpoint(&["verify", "--config", setup.config(), "--output", "json"]);
    assert_eq!(code, 0, "verify: {verified}");
    assert_eq!(
        verified["points"].as_array().unwrap().len(),
        3,
        "{verified}"
    );
    assert_eq!(verified["ok"], true, "{verified}");

    // A dry run shows the plan and removes nothing.
    let (code, plan) = setup.stillpoint(&[
        "prune",
        "--config",
        setup.config(),
        "--dry-run",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "prune --dry-run: {plan}");
    let deleted: Vec<&str> = plan["points"]["delete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let mut expected = vec![
        old[0]["point_id"].as_str().unwrap(),
        old[1]["point_id"].as_str().unwrap(),
    ];
    expected.sort();
    let mut sorted = deleted.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "{plan}");
    let bases_dir = |database: &str| -> Vec<String> {
        let mut ids: Vec<String> =
            std::fs::read_dir(setup.storage_dir().join("bases").join(database))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
        ids.sort();
        ids
    };
    assert_eq!(bases_dir("ledger").len(), 2);
    assert!(setup.storage_dir().join("points").join(deleted[0]).exists());

    let (code, pruned) =
        setup.stillpoint(&["prune", "--config", setup.config(), "--output", "json"]);
    assert_eq!(code, 0, "prune: {pruned}");
    assert_eq!(
        pruned["points"]["delete_bases"].as_array().unwrap().len(),
        2,
        "{pruned}"
    );
    let ledger_chunks = pruned["points"]["delete_chunks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|chunks| chunks["database"] == "ledger")
        .unwrap_or_else(|| panic!("no ledger chunk pruned: {pruned}"));
    assert!(
        !ledger_chunks["chunks"].as_array().unwrap().is_empty(),
        "{pruned}"
    );

    let (code, listing) = run_json(
        "stillpoint",
        &["list", "--config", setup.config(), "--output", "json"],
    );
    assert_eq!(code, 0);
    let listed: Vec<&str> = listing["points"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| point["point_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![kept_id], "{listing}");
    for database in ["ledger", "auditor"] {
        let base = kept["databases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == database)
            .unwrap()["base"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(bases_dir(database), vec![base], "{database}");
    }
    // No ledger chunk ends at or before the kept base's start; the one holding it stays.
    let archive = setup.archive("ledger");
    let catalog = setup.runtime.block_on(archive.catalog()).unwrap();
    assert!(
        catalog
            .chunks
            .iter()
            .all(|chunk| chunk.range().is_some_and(|(_, end)| *end > kept_start)),
        "a chunk before the kept base's start survived"
    );
    assert!(catalog.covers(&kept_start, &kept_start).is_ok());

    // The kept point still restores, and verifies.
    stop_archiver(setup.archiver.take());
    let (code, drill) = setup.stillpoint(&[
        "drill",
        "--point",
        "latest",
        "--config",
        setup.config(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "drill of the kept point: {drill}");
    let (code, verified) = setup.stillpoint(&[
        "verify",
        "--point",
        "latest",
        "--config",
        setup.config(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "verify: {verified}");

    // Negative control: a chunk from the middle of the kept point's chain deleted.
    let target: Position = serde_json::from_value(kept["databases"][0]["target"].clone()).unwrap();
    let chain = chain(&catalog, &kept_start, &target);
    assert!(
        chain.len() >= 3,
        "the chain should span several chunks: {}",
        chain.len()
    );
    let victim = &chain[1];
    setup
        .runtime
        .block_on(remove_chunk(&archive, &catalog, victim));
    let (code, verified) =
        setup.stillpoint(&["verify", "--config", setup.config(), "--output", "json"]);
    assert_eq!(code, 6, "verify with a chunk gone: {verified}");
    assert_eq!(verified["ok"], false, "{verified}");
    assert_gap_named(&verified, "ledger", &chain[0], &chain[2]);
    // The text form names it too; the other database still verifies.
    let output = crate::util::run_with_env(
        "stillpoint",
        &["verify", "--point", kept_id, "--config", setup.config()],
        &[("PATH", &path_with_our_binaries())],
    );
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("FAIL ledger") && text.contains(&chain[2].name),
        "{text}"
    );
    assert!(text.contains("ok   auditor"), "{text}");
}
