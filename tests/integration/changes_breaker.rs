//! PostgreSQL's change stream broken as an operator would: a second `stillpoint
//! archive` of the ledger (the same runbook with its own spool, as a second host
//! has) running beside the first, and the table's primary key changed while both
//! run. Each insert between two points must be exported exactly once (two captures
//! of one slot stored chunks claiming what the other read: changes duplicated and
//! lost, exit 0), and a change after the key moved must carry the new key's columns
//! (the capture kept each table's key for its whole session). Negative control: the
//! once-each check reports a record left out and a record twice.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::points_mariadb::Setup;
use crate::util::{Process, bin, stderr, wait_until};

/// Rows inserted between the points, one transaction each.
const ROWS: i64 = 600;

/// Whether the insert records of `seq` hold each id of 1..=ROWS exactly once: the
/// first id that is not, or none.
fn not_once_each(records: &[Value]) -> Option<String> {
    let mut seen = vec![0u32; ROWS as usize + 1];
    for record in records.iter().filter(|r| r["kind"] == "insert") {
        let id = record["after"]["id"].as_i64().unwrap();
        seen[id as usize] += 1;
    }
    (1..=ROWS as usize)
        .find(|&id| seen[id] != 1)
        .map(|id| format!("id {id} was exported {} times", seen[id]))
}

#[test]
fn a_second_archiver_of_a_database_waits_and_each_change_is_exported_once_with_its_key() {
    let mut setup = Setup::start(Some("dump"));
    setup.record_ledger_changes();
    setup.postgres.psql(
        "ledger",
        "CREATE TABLE seq (id INT PRIMARY KEY, code INT NOT NULL)",
    );
    setup.start_archiver();
    // The base backup needs the WAL archive begun before it.
    wait_until(
        Duration::from_secs(30),
        "the ledger's WAL archive to hold a chunk",
        || {
            let (code, list) = setup.stillpoint(&[
                "archive-list",
                "--config",
                setup.config(),
                "--output",
                "json",
            ]);
            code == 0
                && list.as_array().is_some_and(|dbs| {
                    dbs.iter()
                        .any(|db| db["database"] == "ledger" && db["chunks"].as_u64() > Some(0))
                })
        },
    );
    setup.base_backup();
    // The same runbook on a second host, started once the archive has begun: its
    // own spool; only the ledger archived.
    let text = std::fs::read_to_string(setup.config()).unwrap();
    let spool = setup.dir.path().join("spool");
    let (ledger_part, auditor_part) = text.rsplit_once("archive = true\n").unwrap();
    let second = format!("{ledger_part}archive = false\n{auditor_part}").replace(
        &format!("\"{}\"", spool.display()),
        &format!("\"{}-second\"", spool.display()),
    );
    let second_runbook = setup.dir.path().join("second.toml");
    std::fs::write(&second_runbook, second).unwrap();
    let mut second_archiver = Process::new(
        Command::new(bin("stillpoint"))
            .args(["archive", "--config", second_runbook.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        "the second stillpoint archive".to_owned(),
    );
    let a = setup.take_point();
    // One transaction per row, in rounds that span many capture intervals; half way,
    // the primary key moves from id to code, and a row's id changes under it.
    let insert = |from: i64, to: i64| {
        setup.postgres.psql(
            "ledger",
            &format!(
                "DO $$ BEGIN FOR i IN {from}..{to} LOOP \
                 INSERT INTO seq VALUES (i, 1000 + i); COMMIT; END LOOP; END $$;"
            ),
        );
    };
    let half = ROWS / 2;
    for round in 0..3 {
        insert(round * half / 3 + 1, (round + 1) * half / 3);
    }
    setup.postgres.psql(
        "ledger",
        "ALTER TABLE seq DROP CONSTRAINT seq_pkey, ADD PRIMARY KEY (code)",
    );
    for round in 0..3 {
        insert(half + round * half / 3 + 1, half + (round + 1) * half / 3);
    }
    setup
        .postgres
        .psql("ledger", "UPDATE seq SET id = -id WHERE code = 1001");
    let b = setup.take_point();
    // Not vacuous: the second archiver ran all along, kept off the slot.
    assert!(
        !second_archiver.has_exited(),
        "the second archiver stopped early"
    );
    second_archiver.signal("TERM");
    let said = stderr(&second_archiver.wait_output(Duration::from_secs(30)));
    assert!(
        said.contains("another capture holds the change stream"),
        "{said}"
    );

    let output = setup.stillpoint_output(&[
        "changes",
        "--config",
        setup.config(),
        "--from",
        &a,
        "--to",
        &b,
        "--table",
        "seq",
        "--format",
        "jsonl",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let records: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(not_once_each(&records), None);
    let moved = records
        .iter()
        .find(|r| r["kind"] == "update")
        .expect("the update of code 1001");
    assert_eq!(moved["key"], serde_json::json!({"code": 1001}), "{moved}");
    assert_eq!(moved["after"]["id"], -1, "{moved}");

    // Negative control: a record left out, and one twice, are each reported.
    let first_insert = records.iter().position(|r| r["kind"] == "insert").unwrap();
    let mut dropped = records.clone();
    dropped.remove(first_insert);
    assert!(not_once_each(&dropped).is_some());
    let mut doubled = records.clone();
    doubled.push(records[first_insert].clone());
    assert!(not_once_each(&doubled).is_some());
}
