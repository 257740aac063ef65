//! `stillpoint changes` as an operator runs it: the reference cluster (ledger on
//! PostgreSQL with its change stream, auditor on MariaDB, both archived) under load,
//! points A and B with load and the test's own inserts, updates, deletes and a
//! TRUNCATE between them, in both databases; the whole cluster cloned at A and at B
//! (`stillpoint clone`); `stillpoint changes --from A --to B` run as a process; its
//! records applied to the clone of A by the test's own appliers (INSERT, UPDATE,
//! DELETE by primary key, TRUNCATE); then every table of both databases compared row
//! by row with the clone of B: equal. Negative control: the same records with one
//! ledger record and one auditor record left out, applied to another clone of A,
//! make the comparison report a difference in each database.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use serde_json::Value;

use crate::clone::clone_runbook;
use crate::cluster::Load;
use crate::points_mariadb::Setup;
use crate::util::{stderr, wait_until};

/// Applies change records to the MariaDB database at `url`: each insert, update and
/// delete by the primary key the record carries. Returns how many statements changed
/// no row (each must change exactly one when the records are whole).
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

/// Every table of MariaDB databases `a` and `b` but the clone's note, row by row
/// (ordered by every column, printed by the `mariadb` client): the first difference,
/// or none.
fn difference(setup: &Setup, a: &str, b: &str) -> Option<String> {
    let tables = |db: &str| {
        setup.mariadb.sql(
            "information_schema",
            &format!(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}' \
                 AND TABLE_NAME <> 'stillpoint_clone' ORDER BY TABLE_NAME"
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

/// `stillpoint changes` on the setup's runbook with `args`.
fn changes(setup: &Setup, args: &[&str]) -> std::process::Output {
    let mut all = vec!["changes", "--config", setup.config()];
    all.extend(args);
    setup.stillpoint_output(&all)
}

/// A record's value as a PostgreSQL literal: the server casts it to the column's
/// type (numbers, text, dates, arrays and JSON as their text; bytea as `\x` hex).
fn pg_literal(value: &Value) -> String {
    let quote = |text: &str| format!("'{}'", text.replace('\'', "''"));
    match value {
        Value::Null => "NULL".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => quote(&n.to_string()),
        Value::String(text) => quote(text),
        Value::Object(object) => quote(&format!("\\x{}", object["hex"].as_str().unwrap())),
        Value::Array(_) => panic!("no arrays in records"),
    }
}

/// Applies change records to the PostgreSQL database at `url`, as [`apply`] does for
/// MariaDB (and TRUNCATE). Returns how many statements changed no row.
async fn apply_pg(url: &str, records: &[Value]) -> usize {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let quoted = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let mut missed = 0;
    for record in records {
        let (schema, name) = record["table"].as_str().unwrap().split_once('.').unwrap();
        let table = format!("{}.{}", quoted(schema), quoted(name));
        let columns = |field: &str| -> Vec<(String, String)> {
            record[field]
                .as_object()
                .map(|object| {
                    object
                        .iter()
                        .map(|(name, value)| (quoted(name), pg_literal(value)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let where_key = || {
            let key = columns("key");
            assert!(
                !key.is_empty(),
                "every table here has a primary key: {record}"
            );
            key.iter()
                .map(|(name, value)| format!("{name} = {value}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let sql = match record["kind"].as_str().unwrap() {
            "insert" => {
                let after = columns("after");
                format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    after
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    after
                        .iter()
                        .map(|(_, v)| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            "update" => format!(
                "UPDATE {table} SET {} WHERE {}",
                columns("after")
                    .iter()
                    .map(|(n, v)| format!("{n} = {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                where_key()
            ),
            "delete" => format!("DELETE FROM {table} WHERE {}", where_key()),
            "truncate" => {
                client
                    .batch_execute(&format!("TRUNCATE {table}"))
                    .await
                    .unwrap();
                continue;
            }
            other => panic!("kind {other}"),
        };
        match client.execute(sql.as_str(), &[]).await {
            Ok(1) => {}
            // As in `apply`: the comparison decides.
            Ok(_) | Err(_) => missed += 1,
        }
    }
    drop(client);
    let _ = driver.await;
    missed
}

/// Every table of PostgreSQL databases `a` and `b` but the clone's note, row by row
/// (ordered by every column, printed by psql): the first difference, or none.
fn pg_difference(setup: &Setup, a: &str, b: &str) -> Option<String> {
    let pg = &setup.postgres;
    let tables = |db: &str| {
        pg.psql(
            db,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' \
             AND tablename <> 'stillpoint_clone' ORDER BY 1",
        )
    };
    let (tables_a, tables_b) = (tables(a), tables(b));
    if tables_a != tables_b {
        return Some(format!("tables differ: {tables_a:?} vs {tables_b:?}"));
    }
    for table in tables_a.lines() {
        let columns: usize = pg
            .psql(
                a,
                &format!(
                    "SELECT count(*) FROM information_schema.columns WHERE table_schema = \
                     'public' AND table_name = '{table}'"
                ),
            )
            .parse()
            .unwrap();
        let order = (1..=columns)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let rows = |db: &str| {
            pg.psql(
                db,
                &format!("SET TimeZone = 'UTC'; SELECT * FROM public.\"{table}\" ORDER BY {order}"),
            )
        };
        let (rows_a, rows_b) = (rows(a), rows(b));
        if rows_a != rows_b {
            let first = rows_a
                .lines()
                .zip(rows_b.lines())
                .find(|(x, y)| x != y)
                .map(|(x, y)| format!("first differing row: {x:?} vs {y:?}"))
                .unwrap_or_default();
            return Some(format!(
                "table {table}: {} rows vs {}; {first}",
                rows_a.lines().count(),
                rows_b.lines().count()
            ));
        }
    }
    None
}

/// Records of one database, in order: commit order, so each transaction's records
/// are together.
fn check_transactions_together(records: &[&Value]) {
    let mut seen = std::collections::BTreeSet::new();
    for pair in records.windows(2) {
        if pair[0]["transaction"] != pair[1]["transaction"] {
            assert!(
                seen.insert(pair[0]["transaction"].as_str().unwrap().to_owned()),
                "transaction {} split",
                pair[0]["transaction"]
            );
        }
    }
}

#[test]
fn changes_between_two_points_applied_to_a_restore_of_the_first_give_the_second() {
    let mut setup = Setup::start(Some("dump"));
    setup.record_ledger_changes();
    // Tables of many column types beside the ledger's and the auditor's, with rows
    // before the base, so that updates and deletes between the points reach rows the
    // clone of A holds; and one the test truncates.
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
    setup.postgres.psql(
        "ledger",
        "CREATE TABLE kinds (
            id INT PRIMARY KEY, qty BIGINT, price NUMERIC(12,2), ratio DOUBLE PRECISION,
            name TEXT, note TEXT, raw BYTEA, at TIMESTAMPTZ, day DATE, flag BOOLEAN,
            tags INT[], doc JSONB
         );
         INSERT INTO kinds (id, qty, name) VALUES (1000, 1, 'old one'), (1001, 2, 'old two'),
             (1002, 3, 'old three');
         CREATE TABLE scratchpad (n INT PRIMARY KEY);
         INSERT INTO scratchpad VALUES (1), (2);",
    );
    setup.start_archiver();
    let load = Load::start(&setup.cluster.ledger_tier(), 2, &[]);
    wait_until(
        Duration::from_secs(60),
        "the load to commit transfers",
        || setup.cluster.transactions() >= 10,
    );
    setup.base_backup();
    let a = setup.take_point();
    // Between the points: the load's transfers and audit rows, and inserts, updates
    // and deletes of the test's own in both databases, some in one transaction.
    let before = setup.cluster.transactions();
    for i in 0..12 {
        let (qty, d, prev) = (i64::from(i) * -1_000_000_007, i % 9, i.max(1) - 1);
        let gone = if i % 3 == 2 { i - 2 } else { 1000 + i };
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
                 DELETE FROM kinds WHERE id = {gone};"
            ),
        );
        setup.postgres.psql(
            "ledger",
            &format!(
                "INSERT INTO kinds VALUES ({i}, {qty}, {i}.25, {i}.5, 'name {i}, \"q\" ''s',
                     CASE WHEN {i} % 2 = 0 THEN NULL ELSE 'note {i}' END, '\\x00ff{i:02x}',
                     '2026-11-30 12:00:0{d}.123+00', '2026-12-1{d}', {i} % 2 = 0,
                     '{{1,{i}}}', '{{\"k\": {i}}}');
                 BEGIN;
                 UPDATE kinds SET qty = qty + 1, note = 'updated' WHERE id = {prev};
                 UPDATE kinds SET id = id + 100 WHERE id = {i} AND {i} % 4 = 3;
                 COMMIT;
                 DELETE FROM kinds WHERE id = {gone};"
            ),
        );
    }
    setup.postgres.psql(
        "ledger",
        "TRUNCATE scratchpad; INSERT INTO scratchpad VALUES (7);",
    );
    wait_until(
        Duration::from_secs(60),
        "more transfers between the points",
        || setup.cluster.transactions() >= before + 10,
    );
    let b = setup.take_point();
    load.stop();

    // Each point's whole cluster, cloned into databases named after it.
    let clone = |point: &str, suffix: &str| {
        let runbook = clone_runbook(
            setup.dir.path(),
            &format!("clone_{suffix}.toml"),
            &setup.postgres.url(&format!("ledger_{suffix}")),
            &setup.mariadb.url(&format!("auditor_{suffix}")),
        );
        let (code, report) = setup.stillpoint(&[
            "clone",
            "--point",
            point,
            "--source",
            setup.config(),
            "--config",
            runbook.to_str().unwrap(),
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "clone of {point}: {report}");
    };
    clone(&a, "a");
    clone(&b, "b");
    // Not vacuous: the two points hold different databases.
    assert!(difference(&setup, "auditor_a", "auditor_b").is_some());
    assert!(pg_difference(&setup, "ledger_a", "ledger_b").is_some());

    let out = setup.dir.path().join("changes.jsonl");
    let output = changes(
        &setup,
        &[
            "--from",
            &a,
            "--to",
            &b,
            "--format",
            "jsonl",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let said = stderr(&output);
    assert!(said.contains("change record(s) from point"), "{said}");
    assert!(said.contains("ledger: change stream"), "{said}");
    let text = std::fs::read_to_string(&out).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let of = |database: &str| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["database"] == database)
            .cloned()
            .collect()
    };
    let (ledger, auditor) = (of("ledger"), of("auditor"));
    assert_eq!(ledger.len() + auditor.len(), records.len());
    let count = |records: &[Value], table: &str, kind: &str| {
        records
            .iter()
            .filter(|r| r["table"] == table && r["kind"] == kind)
            .count()
    };
    assert!(count(&auditor, "audit", "insert") >= 10, "{text}");
    assert!(count(&ledger, "public.ledger", "insert") >= 10, "{text}");
    assert!(count(&ledger, "public.accounts", "update") >= 20, "{text}");
    // Statements that change no row are not logged: 12 inserts, most updates (some
    // find their row moved or gone), 5 deletes; in both databases alike.
    for (records, table) in [(&auditor, "kinds"), (&ledger, "public.kinds")] {
        assert_eq!(count(records, table, "insert"), 12, "{text}");
        assert!(count(records, table, "update") >= 8, "{text}");
        assert_eq!(count(records, table, "delete"), 5, "{text}");
    }
    assert_eq!(count(&ledger, "public.scratchpad", "truncate"), 1, "{text}");
    // Commit order: each transaction's records are together; MariaDB's commit times
    // never go back (PostgreSQL's may, by a little, between concurrent commits: it
    // stamps the time before the commit record takes its place in the log).
    check_transactions_together(&auditor.iter().collect::<Vec<_>>());
    check_transactions_together(&ledger.iter().collect::<Vec<_>>());
    for pair in auditor.windows(2) {
        assert!(pair[0]["commit_ms"].as_i64() <= pair[1]["commit_ms"].as_i64());
    }
    assert!(
        auditor
            .iter()
            .all(|r| r["transaction"].as_str().unwrap().starts_with("0-"))
    );
    // The values arrive typed: a bigint, an exact numeric, a boolean, bytea.
    let kinds_3 = ledger
        .iter()
        .find(|r| r["table"] == "public.kinds" && r["kind"] == "insert" && r["after"]["id"] == 3)
        .unwrap();
    assert_eq!(kinds_3["after"]["qty"], -3_000_000_021i64, "{kinds_3}");
    assert_eq!(kinds_3["after"]["price"], "3.25", "{kinds_3}");
    assert_eq!(kinds_3["after"]["flag"], false, "{kinds_3}");
    assert_eq!(kinds_3["after"]["raw"]["hex"], "00ff03", "{kinds_3}");
    assert_eq!(kinds_3["key"], serde_json::json!({"id": 3}), "{kinds_3}");

    eprintln!(
        "changes: {} records ({} of the ledger, {} of the auditor) from {a} to {b}",
        records.len(),
        ledger.len(),
        auditor.len()
    );
    // Applied to the clone of A, the records give the clone of B, table by table.
    let missed = setup
        .runtime
        .block_on(apply(&setup.mariadb.url("auditor_a"), &auditor));
    assert_eq!(missed, 0, "every auditor statement changes one row");
    let missed = setup
        .runtime
        .block_on(apply_pg(&setup.postgres.url("ledger_a"), &ledger));
    assert_eq!(missed, 0, "every ledger statement changes one row");
    assert_eq!(
        difference(&setup, "auditor_a", "auditor_b"),
        None,
        "A + changes(A, B) must equal B (auditor)"
    );
    assert_eq!(
        pg_difference(&setup, "ledger_a", "ledger_b"),
        None,
        "A + changes(A, B) must equal B (ledger)"
    );

    // Negative control: one record of each database left out (a ledger row and an
    // audit row the load wrote) and applied to another clone of A: the comparison
    // names a difference in each.
    clone(&a, "c");
    let without = |records: &[Value], table: &str| {
        let mut partial = records.to_vec();
        partial.remove(records.iter().position(|r| r["table"] == table).unwrap());
        partial
    };
    setup.runtime.block_on(apply(
        &setup.mariadb.url("auditor_c"),
        &without(&auditor, "audit"),
    ));
    setup.runtime.block_on(apply_pg(
        &setup.postgres.url("ledger_c"),
        &without(&ledger, "public.ledger"),
    ));
    let found = difference(&setup, "auditor_c", "auditor_b");
    assert!(
        found.as_deref().is_some_and(|d| d.contains("audit")),
        "one auditor record dropped must show: {found:?}"
    );
    let found = pg_difference(&setup, "ledger_c", "ledger_b");
    assert!(
        found.as_deref().is_some_and(|d| d.contains("table ledger")),
        "one ledger record dropped must show: {found:?}"
    );

    // The same range as CSV on stdout: a header and one line per record; one
    // database and one table only with --database and --table (PostgreSQL's by its
    // name alone, in any schema).
    for (database, table, expected) in [
        ("auditor", "kinds", "kinds"),
        ("ledger", "kinds", "public.kinds"),
    ] {
        let output = changes(
            &setup,
            &[
                "--from",
                &a,
                "--to",
                &b,
                "--format",
                "csv",
                "--database",
                database,
                "--table",
                table,
                "--output",
                "json",
            ],
        );
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let csv = String::from_utf8(output.stdout.clone()).unwrap();
        let mut lines = csv.split("\r\n").filter(|l| !l.is_empty());
        assert_eq!(
            lines.next(),
            Some("commit_ms,transaction,kind,database,table,key,after,before")
        );
        let wanted = records
            .iter()
            .filter(|r| r["database"] == database && r["table"] == expected)
            .count();
        assert!(wanted > 0);
        assert_eq!(lines.count(), wanted);
        // The summary is the JSON object that ends stderr.
        let said = stderr(&output);
        let summary: Value =
            serde_json::from_str(&said[said.rfind("\n{\n").map_or(0, |at| at + 1)..])
                .unwrap_or_else(|e| panic!("{e}: {said}"));
        assert_eq!(summary["records"], wanted as u64, "{summary}");
    }

    // Bad input: the points the other way round are refused (exit 2) naming what to
    // give; nothing is written.
    let refused = setup.dir.path().join("refused.jsonl");
    for database in ["auditor", "ledger"] {
        let output = changes(
            &setup,
            &[
                "--format",
                "jsonl",
                "--from",
                &b,
                "--to",
                &a,
                "--database",
                database,
                "--out",
                refused.to_str().unwrap(),
            ],
        );
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("older point"),
            "{}",
            stderr(&output)
        );
        assert!(!refused.exists(), "nothing may be written");
    }

    // A table with no change in the range (a misspelt one, say) is no error, but
    // the summary says so.
    let output = changes(
        &setup,
        &[
            "--from", &a, "--to", &b, "--format", "jsonl", "--table", "kinbs",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
    assert!(
        stderr(&output).contains("no change of table \"kinbs\""),
        "{}",
        stderr(&output)
    );

    // Prune keeping B alone removes the change stream's chunks before B's marker,
    // and keeps what a range from B needs: changes from B to a new point C export.
    let (code, pruned) = setup.stillpoint(&[
        "prune",
        "--config",
        setup.config(),
        "--keep-last",
        "1",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "prune: {pruned}");
    let removed: usize = pruned["points"]["delete_chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["change_stream"] == true && c["database"] == "ledger")
        .map(|c| c["chunks"].as_array().unwrap().len())
        .sum();
    assert!(removed > 0, "stream chunks before B go: {pruned}");
    setup.postgres.psql(
        "ledger",
        "INSERT INTO kinds (id, name) VALUES (5000, 'after B')",
    );
    let c = setup.take_point();
    let output = changes(
        &setup,
        &[
            "--from",
            &b,
            "--to",
            &c,
            "--database",
            "ledger",
            "--table",
            "kinds",
            "--format",
            "jsonl",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let after_b = String::from_utf8(output.stdout).unwrap();
    assert_eq!(after_b.lines().count(), 1, "{after_b}");
    assert!(after_b.contains("after B"), "{after_b}");

    // `stillpoint archive` says how far the change stream is, beside the WAL.
    setup.stop_archiver();
    let mut archiver = std::process::Command::new(crate::util::bin("stillpoint"))
        .args([
            "archive",
            "--config",
            setup.config(),
            "--database",
            "ledger",
        ])
        .args(["--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Progress lines as they come, read beside the test.
    let stdout = archiver.stdout.take().unwrap();
    let (lines, progress) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let archiver = crate::util::Process::new(archiver, "stillpoint archive".to_owned());
    // A line comes when a chunk is stored: give it something to store (again, until
    // a line says how far the change stream is).
    let mut seen = Vec::new();
    let mut line = None;
    for round in 0..15 {
        setup.postgres.psql(
            "ledger",
            &format!(
                "INSERT INTO kinds (id, name) VALUES ({}, 'archived')",
                5001 + round
            ),
        );
        while let Ok(text) = progress.recv_timeout(Duration::from_secs(2)) {
            let parsed: Value = serde_json::from_str(&text).unwrap();
            seen.push(text);
            if !parsed["changes_to"].is_null() {
                line = Some(parsed);
                break;
            }
        }
        if line.is_some() {
            break;
        }
    }
    let line = line.unwrap_or_else(|| panic!("no progress line with changes_to: {seen:?}"));
    archiver.signal("TERM");
    let output = archiver.wait_output(Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        line["changes_to"]
            .as_str()
            .is_some_and(|to| to.contains('/')),
        "{line}"
    );
    assert_eq!(line["changes_error"], Value::Null, "{line}");
}
