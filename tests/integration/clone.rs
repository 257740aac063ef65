//! `stillpoint clone` (issue 14): a point of the reference cluster under load (ledger
//! on PostgreSQL, auditor on MariaDB, both archived) cloned into new databases that a
//! second runbook names, on another PostgreSQL server and the same MariaDB server.
//! The clone passes `ledger-node check` and each database carries a note of where it
//! came from. A clone whose second database fails to restore (the point's auditor
//! counts altered, so its restore fails at the end, after the ledger's clone is
//! whole) leaves nothing behind; a clone into databases that exist is refused and
//! touches nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use stillpoint_testkit::{MariaDb, Postgres};

use crate::cluster::{self, Load};
use crate::points::{start_archiver, stillpoint_json, stop_archiver, take_point};
use crate::reference::{Reference, reference_cluster};
use crate::util::{Database, Runbook, run, spawn_reading_stderr, stderr, wait_until};

/// The clone's runbook: the point's two databases by name, on the clone's servers.
pub(crate) fn clone_runbook(
    dir: &Path,
    file: &str,
    ledger_url: &str,
    auditor_url: &str,
) -> PathBuf {
    Runbook::standalone("clone")
        .database(Database::postgres("ledger", ledger_url))
        .database(Database::mariadb("auditor", auditor_url))
        // The clone cluster's own storage, for its own backups later; a clone reads
        // the point from the source runbook's.
        .storage_url(&format!("file://{}", dir.join("clone-storage").display()))
        .write(&dir.join(file))
}

fn clone_args<'a>(source: &'a Path, target: &'a Path, point: &'a str) -> Vec<&'a str> {
    vec![
        "clone",
        "--point",
        point,
        "--source",
        source.to_str().unwrap(),
        "--config",
        target.to_str().unwrap(),
        "--output",
        "json",
    ]
}

fn clone(source: &Path, target: &Path, point: &str) -> (i32, Value) {
    stillpoint_json(&clone_args(source, target, point))
}

/// A clone expected to fail: its exit code and what it said on stderr.
fn failing_clone(source: &Path, target: &Path, point: &str) -> (i32, String) {
    let output = run("stillpoint", &clone_args(source, target, point));
    (output.status.code().unwrap_or(-1), stderr(&output))
}

/// A database name for a point's clone: it says which point it holds.
fn named_for(database: &str, point_id: &str) -> String {
    format!("{database}_{}", point_id.to_lowercase().replace('-', "_"))
}

fn postgres_has(server: &Postgres, database: &str) -> bool {
    server.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'"),
    ) == "1"
}

fn mariadb_has(server: &MariaDb, database: &str) -> bool {
    server.sql(
        "",
        &format!(
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{database}'"
        ),
    ) == "1"
}

#[test]
fn a_clone_of_a_point_under_load_is_consistent_marked_and_all_or_nothing() {
    let Reference {
        // The source's ledger server: it must run to the end, but nothing here asks it.
        postgres: _postgres,
        mariadb,
        cluster,
        dir,
        runbook: source,
    } = reference_cluster("clone-source", None, |runbook, dir| {
        runbook.scratch_dir(dir)
    });
    let config = source.to_str().unwrap();
    let archiver = start_archiver(config);
    let load = Load::start(&cluster.ledger_tier(), 8, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || cluster.transactions() >= 20,
    );
    let (code, bases) = stillpoint_json(&["base-backup", "--config", config, "--output", "json"]);
    assert_eq!(code, 0, "base-backup: {bases}");
    let first = take_point(config);
    std::thread::sleep(Duration::from_secs(2));
    let second = take_point(config);
    let second_id = second["point_id"].as_str().unwrap().to_owned();

    // The clone's servers: a PostgreSQL of its own (without the source's roles), and
    // new databases on the MariaDB server. Cloned while the load goes on.
    let clone_pg = Postgres::start();
    let ledger_name = named_for("ledger", &second_id);
    let auditor_name = named_for("auditor", &second_id);
    let target = clone_runbook(
        dir.path(),
        "clone.toml",
        &clone_pg.url(&ledger_name),
        &mariadb.url(&auditor_name),
    );
    let (code, report) = clone(&source, &target, &second_id);
    assert_eq!(code, 0, "clone: {report}");
    assert_eq!(report["point_id"], second_id.as_str(), "{report}");
    eprintln!("clone: {report}");
    for database in report["databases"].as_array().unwrap() {
        assert_eq!(database["row_counts_match_point"], true, "{report}");
    }
    let (code, checked) = cluster::check(
        &clone_pg.url(&ledger_name),
        &mariadb.url(&auditor_name),
        None,
    );
    assert_eq!(code, 0, "ledger-node check of the clone: {checked}");
    assert!(
        checked["transactions"].as_u64().unwrap() >= 20,
        "the clone holds the point's transfers: {checked}"
    );
    // Each database says where it came from.
    let ledger_note = clone_pg.psql(
        &ledger_name,
        "SELECT field || '=' || value FROM stillpoint_clone ORDER BY field",
    );
    let auditor_note = mariadb.sql(
        &auditor_name,
        "SELECT CONCAT(field, '=', value) FROM stillpoint_clone ORDER BY field",
    );
    for (note, database) in [(&ledger_note, "ledger"), (&auditor_note, "auditor")] {
        for expected in [
            format!("point_id={second_id}"),
            "source_cluster=clone-source".to_owned(),
            format!("source_database={database}"),
            format!(
                "point_time={}",
                second["window"]["restore_point_date_time"]
                    .as_str()
                    .unwrap()
            ),
        ] {
            assert!(
                note.lines().any(|line| line == expected),
                "{database}'s note lacks {expected}: {note}"
            );
        }
    }

    // A second clone into the same databases is refused, and leaves the first whole.
    let (code, refused) = failing_clone(&source, &target, &second_id);
    assert_eq!(code, 2, "a clone into databases that exist: {refused}");
    assert!(refused.contains("already exists"), "{refused}");
    assert!(refused.contains("name another"), "{refused}");
    let (code, checked) = cluster::check(
        &clone_pg.url(&ledger_name),
        &mariadb.url(&auditor_name),
        None,
    );
    assert_eq!(code, 0, "the first clone after the refused one: {checked}");

    // All or nothing: the first point's auditor counts altered, so the auditor's
    // restore fails at its end, after the ledger's clone is whole.
    let first_id = first["point_id"].as_str().unwrap();
    let manifest = dir
        .path()
        .join("storage/points")
        .join(first_id)
        .join("point.json");
    let mut altered: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for database in altered["databases"].as_array_mut().unwrap() {
        if database["name"] == "auditor" {
            for count in database["row_counts"].as_object_mut().unwrap().values_mut() {
                *count = Value::from(count.as_u64().unwrap() + 1);
            }
        }
    }
    std::fs::write(&manifest, serde_json::to_vec(&altered).unwrap()).unwrap();
    let (failed_ledger, failed_auditor) = (
        named_for("ledger", first_id),
        named_for("auditor", first_id),
    );
    let failing = clone_runbook(
        dir.path(),
        "failing.toml",
        &clone_pg.url(&failed_ledger),
        &mariadb.url(&failed_auditor),
    );
    let (code, failure) = failing_clone(&source, &failing, first_id);
    assert_ne!(code, 0, "a clone whose auditor cannot restore: {failure}");
    eprintln!("the failing clone: {failure}");
    assert!(failure.contains("auditor"), "{failure}");
    assert!(failure.contains("the clone was undone"), "{failure}");
    assert!(!failure.contains("COULD NOT DROP"), "{failure}");
    assert!(
        !postgres_has(&clone_pg, &failed_ledger),
        "the ledger's clone was left behind: {failure}"
    );
    assert!(
        !mariadb_has(&mariadb, &failed_auditor),
        "the auditor's clone was left behind: {failure}"
    );
    // The control: the same check finds what the first clone made.
    assert!(postgres_has(&clone_pg, &ledger_name));
    assert!(mariadb_has(&mariadb, &auditor_name));

    // An operator who gives up: SIGINT once the clone's databases exist (the ledger
    // is being restored then) undoes it too.
    let (interrupted_ledger, interrupted_auditor) =
        (format!("{ledger_name}_i"), format!("{auditor_name}_i"));
    let interrupted = clone_runbook(
        dir.path(),
        "interrupted.toml",
        &clone_pg.url(&interrupted_ledger),
        &mariadb.url(&interrupted_auditor),
    );
    let (process, lines) = spawn_reading_stderr(
        "stillpoint",
        &clone_args(&source, &interrupted, &second_id),
        &[],
    );
    wait_until(
        Duration::from_secs(60),
        "the interrupted clone to create its databases",
        || mariadb_has(&mariadb, &interrupted_auditor),
    );
    process.signal("INT");
    let output = process.wait_output(Duration::from_secs(60));
    // Until the reader sees stderr close.
    let said: Vec<String> = lines.iter().collect();
    let said = said.join("\n");
    eprintln!("the interrupted clone: {said}");
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("the clone was undone"), "{said}");
    assert!(!postgres_has(&clone_pg, &interrupted_ledger));
    assert!(!mariadb_has(&mariadb, &interrupted_auditor));

    // A clone's runbook without one of the point's databases is refused before
    // anything is created.
    let partial = Runbook::standalone("clone")
        .database(Database::postgres(
            "ledger",
            &clone_pg.url("ledger_partial"),
        ))
        .storage_url(&format!(
            "file://{}",
            dir.path().join("clone-storage").display()
        ))
        .write(&dir.path().join("partial.toml"));
    let (code, refused) = failing_clone(&source, &partial, &second_id);
    assert_eq!(code, 2, "{refused}");
    assert!(refused.contains("has no database \"auditor\""), "{refused}");
    assert!(!postgres_has(&clone_pg, "ledger_partial"));

    eprintln!("load: {}", load.stop());
    stop_archiver(Some(archiver));
}
