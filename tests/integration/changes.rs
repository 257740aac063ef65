//! `stillpoint changes` as an operator runs it: the reference cluster (ledger on
//! PostgreSQL, auditor on MariaDB, both archived) under load, points A and B with
//! load and the test's own inserts, updates and deletes between them; A and B each
//! restored into a fresh database; `stillpoint changes --from A --to B` run as a
//! process; its records applied to the restore of A by the test's own applier
//! (INSERT, UPDATE, DELETE by primary key); then every table compared row by row with
//! the restore of B: equal. Negative control: the same records with one left out,
//! applied to another restore of A, make the comparison report a difference.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use serde_json::Value;

use crate::cluster::Load;
use crate::points_mariadb::Setup;
use crate::util::{stderr, wait_until};

/// Applies change records to the database at `url`: each insert, update and delete
/// by the primary key the record carries. Returns how many statements changed no row
/// (each must change exactly one when the records are whole).
async fn apply(url: &str, records: &[Value]) -> usize {
    let mut conn = mysql_async::Conn::from_url(url).await.unwrap();
    // TIMESTAMP values are exported in UTC.
    conn.query_drop("SET time_zone = '+00:00'").await.unwrap();
    let mut missed = 0;
    for record in records {
        let table = record["table"].as_str().unwrap();
        let columns = |field: &str| -> Vec<(String, mysql_async::Value)> {
            record[field]
                .as_object()
                .map(|object| {
                    object
                        .iter()
                        .map(|(name, value)| (name.clone(), sql_value(value)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let key = columns("key");
        assert!(
            !key.is_empty(),
            "every table here has a primary key: {record}"
        );
        let quoted = |name: &str| format!("`{}`", name.replace('`', "``"));
        let where_key = key
            .iter()
            .map(|(name, _)| format!("{} = ?", quoted(name)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let (sql, params): (String, Vec<mysql_async::Value>) =
            match record["kind"].as_str().unwrap() {
                "insert" => {
                    let after = columns("after");
                    (
                        format!(
                            "INSERT INTO {} ({}) VALUES ({})",
                            quoted(table),
                            after
                                .iter()
                                .map(|(n, _)| quoted(n))
                                .collect::<Vec<_>>()
                                .join(", "),
                            vec!["?"; after.len()].join(", ")
                        ),
                        after.into_iter().map(|(_, v)| v).collect(),
                    )
                }
                "update" => {
                    let after = columns("after");
                    let sets = after
                        .iter()
                        .map(|(n, _)| format!("{} = ?", quoted(n)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let mut params: Vec<_> = after.into_iter().map(|(_, v)| v).collect();
                    params.extend(key.into_iter().map(|(_, v)| v));
                    (
                        format!("UPDATE {} SET {sets} WHERE {where_key}", quoted(table)),
                        params,
                    )
                }
                "delete" => (
                    format!("DELETE FROM {} WHERE {where_key}", quoted(table)),
                    key.into_iter().map(|(_, v)| v).collect(),
                ),
                other => panic!("kind {other}"),
            };
        match conn.exec_drop(&sql, params).await {
            Ok(()) if conn.affected_rows() == 1 => {}
            // An update that sets what is already there changes no row either; the
            // comparison decides.
            Ok(()) => missed += 1,
            // A duplicate key (an insert whose row a missing delete left): counted, the
            // comparison decides.
            Err(_) => missed += 1,
        }
    }
    drop(conn);
    missed
}

fn sql_value(value: &Value) -> mysql_async::Value {
    match value {
        Value::Null => mysql_async::Value::NULL,
        Value::Bool(b) => mysql_async::Value::Int(i64::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                mysql_async::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                mysql_async::Value::UInt(u)
            } else {
                mysql_async::Value::Double(n.as_f64().unwrap())
            }
        }
        Value::String(text) => mysql_async::Value::Bytes(text.clone().into_bytes()),
        Value::Object(object) => {
            let hex = object["hex"].as_str().unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            mysql_async::Value::Bytes(bytes)
        }
        Value::Array(_) => panic!("no arrays in records"),
    }
}

/// Every table of `a` and `b`, row by row (ordered by every column, printed by the
/// `mariadb` client): the first difference, or none.
fn difference(setup: &Setup, a: &str, b: &str) -> Option<String> {
    let tables = |db: &str| {
        setup.mariadb.sql(
            "information_schema",
            &format!(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}' \
                 ORDER BY TABLE_NAME"
            ),
        )
    };
    let (tables_a, tables_b) = (tables(a), tables(b));
    if tables_a != tables_b {
        return Some(format!("tables differ: {tables_a:?} vs {tables_b:?}"));
    }
    for table in tables_a.lines() {
        let columns: usize = setup
            .mariadb
            .sql(
                "information_schema",
                &format!(
                    "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = \
                     '{a}' AND TABLE_NAME = '{table}'"
                ),
            )
            .trim()
            .parse()
            .unwrap();
        let order = (1..=columns)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let rows = |db: &str| {
            setup.mariadb.sql(
                db,
                &format!("SET time_zone = '+00:00'; SELECT * FROM `{table}` ORDER BY {order}"),
            )
        };
        let (rows_a, rows_b) = (rows(a), rows(b));
        if rows_a != rows_b {
            let (count_a, count_b) = (rows_a.lines().count(), rows_b.lines().count());
            let first = rows_a
                .lines()
                .zip(rows_b.lines())
                .find(|(x, y)| x != y)
                .map(|(x, y)| format!("first differing row: {x:?} vs {y:?}"))
                .unwrap_or_default();
            return Some(format!(
                "table {table}: {count_a} rows vs {count_b}; {first}"
            ));
        }
    }
    None
}

#[test]
fn changes_between_two_points_applied_to_a_restore_of_the_first_give_the_second() {
    let mut setup = Setup::start(Some("dump"));
    // A table of many column types beside the auditor's, with rows before the base,
    // so that updates and deletes between the points reach rows the restore of A
    // holds.
    setup.mariadb.sql(
        "auditor",
        "CREATE TABLE kinds (
            id INT PRIMARY KEY, qty BIGINT, price DECIMAL(12,2), ratio DOUBLE,
            name VARCHAR(64), note TEXT NULL, raw VARBINARY(8), at DATETIME(3),
            day DATE, ts TIMESTAMP(3) NULL, flag TINYINT UNSIGNED
         ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
         INSERT INTO kinds (id, qty, name) VALUES (1000, 1, 'old one'), (1001, 2, 'old two'),
             (1002, 3, 'old three');",
    );
    setup.start_archiver();
    let load = Load::start(&setup.cluster.ledger_tier(), 2, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || setup.cluster.transactions() >= 10,
    );
    let (code, bases) = setup.stillpoint(&[
        "base-backup",
        "--config",
        setup.config(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "base-backup: {bases}");
    let take_point = |setup: &Setup| {
        let (code, point) =
            setup.stillpoint(&["point", "--config", setup.config(), "--output", "json"]);
        assert_eq!(code, 0, "point: {point}");
        point["point_id"].as_str().unwrap().to_owned()
    };
    let a = take_point(&setup);
    // Between the points: the load's audit rows, and inserts, updates and deletes of
    // the test's own, some in one transaction.
    let before = setup.cluster.transactions();
    for i in 0..12 {
        setup.mariadb.sql(
            "auditor",
            &format!(
                "SET time_zone = '+00:00';
                 INSERT INTO kinds VALUES ({i}, {qty}, {i}.25, {i}.5, 'name {i}, \"q\"',
                     IF({i} % 2 = 0, NULL, 'note {i}'), 0x00ff{i:02x}, '2026-11-30 12:00:0{d}.123',
                     '2026-12-1{d}', '2026-01-01 00:00:0{d}.500', {i});
                 BEGIN;
                 UPDATE kinds SET qty = qty + 1, note = 'updated' WHERE id = {prev};
                 UPDATE kinds SET id = id + 100 WHERE id = {i} AND {i} % 4 = 3;
                 COMMIT;
                 DELETE FROM kinds WHERE id = {gone};",
                qty = i64::from(i) * -1_000_000_007,
                d = i % 9,
                prev = i.max(1) - 1,
                gone = if i % 3 == 2 { i - 2 } else { 1000 + i },
            ),
        );
    }
    wait_until(
        Duration::from_secs(60),
        "more transfers between the points",
        || setup.cluster.transactions() >= before + 10,
    );
    let b = take_point(&setup);
    load.stop();

    let restore = |setup: &Setup, point: &str, database: &str| {
        setup.mariadb.create_database(database);
        let (code, report) = setup.stillpoint(&[
            "restore",
            "--point",
            point,
            "--config",
            setup.config(),
            "--database",
            "auditor",
            "--to",
            &setup.mariadb.url(database),
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "restore of {point}: {report}");
    };
    restore(&setup, &a, "restored_a");
    restore(&setup, &b, "restored_b");
    // Not vacuous: the two points hold different auditors.
    assert!(
        difference(&setup, "restored_a", "restored_b").is_some(),
        "the points should differ"
    );

    let out = setup.dir.path().join("changes.jsonl");
    let output = setup.stillpoint_output(&[
        "changes",
        "--config",
        setup.config(),
        "--from",
        &a,
        "--to",
        &b,
        "--database",
        "auditor",
        "--format",
        "jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("change record(s) from point"),
        "{}",
        stderr(&output)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let count = |table: &str, kind: &str| {
        records
            .iter()
            .filter(|r| r["table"] == table && r["kind"] == kind)
            .count()
    };
    assert!(count("audit", "insert") >= 10, "{text}");
    // Statements that change no row are not logged: 12 inserts, most updates (some
    // find their row moved or gone), 5 deletes.
    assert_eq!(count("kinds", "insert"), 12, "{text}");
    assert!(count("kinds", "update") >= 8, "{text}");
    assert_eq!(count("kinds", "delete"), 5, "{text}");
    // Commit order: commit times never go back, and each transaction's records are
    // together.
    let mut seen = std::collections::BTreeSet::new();
    for pair in records.windows(2) {
        assert!(pair[0]["commit_ms"].as_i64() <= pair[1]["commit_ms"].as_i64());
        if pair[0]["transaction"] != pair[1]["transaction"] {
            assert!(
                seen.insert(pair[0]["transaction"].as_str().unwrap().to_owned()),
                "transaction {} split",
                pair[0]["transaction"]
            );
        }
    }
    assert!(records.iter().all(
        |r| r["database"] == "auditor" && r["transaction"].as_str().unwrap().starts_with("0-")
    ));

    eprintln!(
        "changes: {} records ({} audit inserts, {} of kinds) from {a} to {b}",
        records.len(),
        count("audit", "insert"),
        records.iter().filter(|r| r["table"] == "kinds").count()
    );
    // Applied to the restore of A, the records give the restore of B, table by table.
    let missed = setup
        .runtime
        .block_on(apply(&setup.mariadb.url("restored_a"), &records));
    assert_eq!(missed, 0, "every statement changes one row");
    assert_eq!(
        difference(&setup, "restored_a", "restored_b"),
        None,
        "A + changes(A, B) must equal B"
    );

    // Negative control: one record left out (an audit row the load wrote) and applied
    // to another restore of A: the comparison names a difference.
    restore(&setup, &a, "restored_c");
    let dropped = records.iter().position(|r| r["table"] == "audit").unwrap();
    let mut partial = records.clone();
    partial.remove(dropped);
    setup
        .runtime
        .block_on(apply(&setup.mariadb.url("restored_c"), &partial));
    let found = difference(&setup, "restored_c", "restored_b");
    assert!(
        found.as_deref().is_some_and(|d| d.contains("audit")),
        "one record dropped must show: {found:?}"
    );

    // The same range as CSV on stdout: a header and one line per record; one table
    // only with --table.
    let output = setup.stillpoint_output(&[
        "changes",
        "--config",
        setup.config(),
        "--from",
        &a,
        "--to",
        &b,
        "--format",
        "csv",
        "--database",
        "auditor",
        "--table",
        "kinds",
        "--output",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let csv = String::from_utf8(output.stdout.clone()).unwrap();
    let mut lines = csv.split("\r\n").filter(|l| !l.is_empty());
    assert_eq!(
        lines.next(),
        Some("commit_ms,transaction,kind,database,table,key,after,before")
    );
    let kinds_records = records.iter().filter(|r| r["table"] == "kinds").count();
    assert_eq!(lines.count(), kinds_records);
    // The summary is the JSON object that ends stderr.
    let said = stderr(&output);
    let summary: Value = serde_json::from_str(&said[said.rfind("\n{\n").map_or(0, |at| at + 1)..])
        .unwrap_or_else(|e| panic!("{e}: {said}"));
    assert_eq!(summary["records"], kinds_records as u64, "{summary}");

    // Bad input: the points the other way round, and the PostgreSQL database, are
    // refused (exit 2) naming what to give; nothing is written.
    let refused = setup.dir.path().join("refused.jsonl");
    for args in [
        vec![
            "--from",
            b.as_str(),
            "--to",
            a.as_str(),
            "--database",
            "auditor",
        ],
        vec![
            "--from",
            a.as_str(),
            "--to",
            b.as_str(),
            "--database",
            "ledger",
        ],
    ] {
        let mut full = vec!["changes", "--config", setup.config(), "--format", "jsonl"];
        full.extend(args);
        full.extend(["--out", refused.to_str().unwrap()]);
        let output = setup.stillpoint_output(&full);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("older point") || stderr(&output).contains("MariaDB"),
            "{}",
            stderr(&output)
        );
        assert!(!refused.exists(), "nothing may be written");
    }
}
