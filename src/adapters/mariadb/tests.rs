//! MariaDB adapter tests against a real server (stillpoint-testkit): writes after the
//! cut stay out of the dump, awkward values round-trip through the `mariadb` client,
//! a non-empty target is refused, and a dump that breaks fails the copy.

use std::sync::{Mutex, Weak};
use std::time::Instant;

use stillpoint_testkit::MariaDb as Server;

use super::*;
use crate::adapters::testing::{
    self, Copied, copy_of, cut_and_copy, pairs_read_back_differently, read_to_end,
    restore_into_new, scratch_database_round_trip, shared, unique_name,
};

static SERVER: Mutex<Weak<Server>> = Mutex::new(Weak::new());

fn server() -> Arc<Server> {
    shared(&SERVER, Server::start)
}

fn adapter(db: &Server, name: &str) -> Mariadb {
    Mariadb::new(
        "ledger-maria",
        MariadbConfig {
            url: db.url(name),
            bin_dir: Some(db.bin_dir().to_owned()),
            drill_server_url: None,
            base_method: Default::default(),
        },
    )
}

/// A database with owners, 1000 accounts of 100 (one with every awkward value we
/// know of), a generated column, a foreign key, 10 audit rows and a view.
fn ledger_db(db: &Server, prefix: &str) -> String {
    let name = unique_name(prefix);
    db.create_database(&name);
    db.sql(
        &name,
        r#"
        SET NAMES utf8mb4;
        CREATE TABLE owners (id INT PRIMARY KEY, name VARCHAR(100) NOT NULL) ENGINE=InnoDB;
        CREATE TABLE accounts (
          id INT AUTO_INCREMENT PRIMARY KEY,
          owner INT NOT NULL,
          balance BIGINT NOT NULL,
          note TEXT,
          data VARBINARY(16),
          amount DECIMAL(20,6),
          ratio DOUBLE,
          flag BIT(3),
          created DATETIME(6),
          ts TIMESTAMP NULL,
          doc JSON,
          kind ENUM('a','b'),
          legacy VARCHAR(20) CHARACTER SET latin1,
          twice BIGINT AS (balance * 2) VIRTUAL,
          FOREIGN KEY (owner) REFERENCES owners (id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
        CREATE TABLE audit (id INT PRIMARY KEY, note VARCHAR(100)) ENGINE=InnoDB;
        CREATE VIEW per_owner AS SELECT owner, SUM(balance) AS total FROM accounts GROUP BY owner;
        INSERT INTO owners SELECT seq, CONCAT('owner ', seq) FROM seq_1_to_100;
        INSERT INTO accounts (owner, balance, note, data, amount, ratio, flag, created, ts, doc, kind, legacy)
          VALUES (1, 100, 'it\'s "q" \\ back\nslash\r\0 nul \Z ctrl-z ünïcödé 😀',
                  X'00FF275C0A', -12345.678901, 0.1, b'101', '2024-02-29 12:34:56.789012',
                  '2024-01-01 00:00:00', '{"a": [1, "x\\"y"]}', 'b', 'café'),
                 (2, 100, '', X'', 0, -1.5e-300, b'000', NULL, NULL, NULL, NULL, NULL);
        INSERT INTO accounts (owner, balance, note, amount, ratio)
          SELECT 1 + seq % 100, 100, CONCAT('row ', seq), seq / 7, seq / 3 FROM seq_3_to_1000;
        INSERT INTO audit SELECT seq, CONCAT('note ', seq) FROM seq_1_to_10;
        "#,
    );
    name
}

/// What the application does after the cut, on its own connection.
fn write_after_cut(db: &Server, name: &str) {
    db.sql(
        name,
        "INSERT INTO accounts (owner, balance) SELECT 1, 1 FROM seq_1_to_500;
         UPDATE accounts SET balance = 0 WHERE id = 1;
         DELETE FROM audit WHERE id <= 5;
         CREATE TABLE late (x INT) ENGINE=InnoDB;
         INSERT INTO late VALUES (1);",
    );
}

/// Rows, balance sum, a checksum over every column of every account, audit rows,
/// whether `late` exists, and the view's total for owner 1.
fn ledger_facts(db: &Server, name: &str) -> String {
    db.sql(
        name,
        "SELECT (SELECT COUNT(*) FROM accounts), (SELECT SUM(balance) FROM accounts),
                (SELECT SUM(CRC32(CONCAT_WS('|', id, owner, balance, IFNULL(HEX(note), 'N'),
                   IFNULL(HEX(data), 'N'), IFNULL(amount, 'N'), IFNULL(ratio, 'N'),
                   IFNULL(flag + 0, 'N'), IFNULL(created, 'N'), IFNULL(ts, 'N'),
                   IFNULL(doc, 'N'), IFNULL(kind, 'N'), IFNULL(HEX(legacy), 'N'), twice))) FROM accounts),
                (SELECT COUNT(*) FROM audit),
                (SELECT COUNT(*) FROM information_schema.TABLES
                   WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'late'),
                (SELECT total FROM per_owner WHERE owner = 1)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_holds_the_cut_snapshot_not_later_writes() {
    let db = server();
    let name = ledger_db(&db, "consistency");
    let before = ledger_facts(&db, &name);
    let adapter = adapter(&db, &name);

    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-1").await.unwrap();
    assert_eq!(marker.kind, "mariadb-snapshot");
    assert_eq!(marker.details["database"], name);
    assert_eq!(marker.details["log_bin"], "ON");
    assert!(
        marker.details["binlog_file"].starts_with("binlog."),
        "{marker:?}"
    );
    assert!(marker.details["binlog_position"].parse::<u64>().unwrap() > 0);
    assert!(
        marker.details["gtid_binlog_pos"].starts_with("0-1-"),
        "{marker:?}"
    );
    assert_eq!(marker.details["tables"], "3");
    assert_eq!(marker.details["views"], "1");
    assert!(!marker.details.contains_key("non_transactional_tables"));

    write_after_cut(&db, &name);
    let after = ledger_facts(&db, &name);
    assert_ne!(before, after, "the later writes happened");

    let (bytes, row_counts) = copy_of(prepared).await;
    assert_eq!(
        row_counts,
        BTreeMap::from([
            ("accounts".to_owned(), 1000),
            ("audit".to_owned(), 10),
            ("owners".to_owned(), 100),
        ])
    );

    let restored = restore_into_new(&adapter, &*db, "restored", bytes).await;
    assert_eq!(ledger_facts(&db, &restored), before);
    // The awkward row, read back column by column.
    assert_eq!(
        db.sql(
            &restored,
            "SELECT HEX(note), HEX(data), amount, ratio, flag + 0, created, doc, kind, HEX(legacy), twice
             FROM accounts WHERE id = 1"
        ),
        db.sql(
            &name,
            "SELECT HEX(note), HEX(data), amount, ratio, flag + 0, created, doc, kind, HEX(legacy), 200
             FROM accounts WHERE id = 1"
        )
    );
}

/// Negative control for the test above: the same dump code on a connection without the
/// cut's snapshot transaction sees the later writes, so the comparison above can fail
/// and what keeps them out is the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_outside_the_snapshot_has_the_later_writes() {
    let db = server();
    let name = ledger_db(&db, "control");
    let before = ledger_facts(&db, &name);
    let adapter = adapter(&db, &name);
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    write_after_cut(&db, &name);
    let after = ledger_facts(&db, &name);

    let conn = Conn::new(Opts::from_url(&db.url(&name)).unwrap())
        .await
        .unwrap();
    let objects = Objects {
        tables: ["accounts", "audit", "owners"]
            .map(|name| Table {
                name: name.to_owned(),
                versioned: false,
            })
            .into(),
        views: vec!["per_owner".into()],
    };
    let mut unbound = Vec::new();
    dump(conn, objects, &mut unbound, String::new())
        .await
        .unwrap();
    let restored = restore_into_new(&adapter, &*db, "control_restored", unbound).await;
    // Rows, balance, checksum and audit rows show the later writes (`late` itself is
    // not in the hand-made table list).
    let first_four = |facts: &str| facts.split('\t').take(4).collect::<Vec<_>>().join("\t");
    let facts = ledger_facts(&db, &restored);
    assert_eq!(first_four(&facts), first_four(&after));
    assert_ne!(first_four(&facts), first_four(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_time_does_not_grow_with_size() {
    let db = server();
    let mut report = Vec::new();
    for rows in [50_000u64, 500_000] {
        let name = unique_name("size");
        db.create_database(&name);
        db.sql(
            &name,
            &format!(
                "CREATE TABLE t (id INT PRIMARY KEY, payload VARCHAR(200)) ENGINE=InnoDB;
                 INSERT INTO t SELECT seq, REPEAT(MD5(seq), 3) FROM seq_1_to_{rows};"
            ),
        );
        let adapter = adapter(&db, &name);
        let mut prepared = adapter.prepare().await.unwrap();
        let started = Instant::now();
        prepared.cut("b-1").await.unwrap();
        let took = started.elapsed();
        let (bytes, counts) = copy_of(prepared).await;
        assert_eq!(counts["t"], rows);
        report.push(format!(
            "{rows} rows ({} MiB dumped): {took:?}",
            bytes.len() / (1024 * 1024)
        ));
    }
    println!("mariadb cut time: {}", report.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_non_empty_target() {
    let db = server();
    let name = ledger_db(&db, "nonempty");
    testing::restore_refuses_a_non_empty_target(
        &adapter(&db, &name),
        &*db,
        &name,
        "accounts",
        ("SELECT COUNT(*) FROM accounts", "1000"),
    )
    .await;
}

/// A target database that does not exist is named with the fix, not only the server's
/// "Unknown database".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_target_database_is_named_with_the_fix() {
    let db = server();
    let missing = unique_name("missing");
    let msg = adapter(&db, "mysql")
        .restore(
            Box::pin(std::io::Cursor::new(b"CREATE TABLE t (x INT);\n".to_vec())),
            &db.url(&missing),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("Unknown database"), "{msg}");
    assert!(
        msg.contains(&format!("create it first (CREATE DATABASE `{missing}`)")),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_dump_fails_finished_and_its_truncated_copy_is_refused() {
    let db = server();
    let name = ledger_db(&db, "broken");
    let adapter = adapter(&db, &name);
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    // The dump's connection is killed after the cut (DDL cannot break it: it waits for
    // the copy's metadata locks).
    let ids = db.sql(
        "",
        &format!("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = '{name}'"),
    );
    for id in ids.lines() {
        db.sql("", &format!("KILL {id}"));
    }

    let mut copy = prepared.copy().await.unwrap();
    let partial = read_to_end(&mut copy).await;
    let err = copy.finished.await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Copy { .. }), "{msg}");
    assert!(msg.contains("database ledger-maria"), "{msg}");

    // The stream ended early; restoring it is refused as truncated, not taken as whole.
    assert!(!partial.is_empty());
    let restored = unique_name("partial");
    db.create_database(&restored);
    let msg = adapter
        .restore(Box::pin(std::io::Cursor::new(partial)), &db.url(&restored))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("truncated"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_client_fails_the_restore_with_its_message() {
    let db = server();
    let adapter = adapter(&db, "mysql");
    let restored = unique_name("bad_sql");
    db.create_database(&restored);
    let err = adapter
        .restore(
            Box::pin(std::io::Cursor::new(
                b"CREATE TABLE t (x INT);\nNOT SQL;\n".to_vec(),
            )),
            &db.url(&restored),
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Restore { .. }), "{msg}");
    assert!(
        msg.contains("the mariadb client exited with status 1"),
        "{msg}"
    );
    assert!(msg.contains("ERROR 1064"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_needs_a_database_and_keeps_passwords_out_of_messages() {
    let db = server();
    let refusal = |url: String| async move {
        let config = MariadbConfig {
            url,
            bin_dir: None,
            drill_server_url: None,
            base_method: Default::default(),
        };
        let prepared = Mariadb::new("ledger-maria", config).prepare().await;
        prepared.err().unwrap().to_string()
    };
    let msg = refusal(db.url("")).await;
    assert!(msg.contains("names no database"), "{msg}");

    // A refused login names the server, never the password.
    let msg = refusal(format!(
        "mysql://root:hunter2@127.0.0.1:{}/mysql",
        db.port()
    ))
    .await;
    assert!(msg.contains("database ledger-maria"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", db.port())), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[test]
fn values_are_written_as_literals_that_read_back_the_same() {
    let mut sql = Vec::new();
    push_value(
        &mut sql,
        ColumnType::MYSQL_TYPE_VAR_STRING,
        45,
        Some(Value::Bytes(b"a'b\"c\\d\ne\rf\0g\x1ah".to_vec())),
    );
    assert_eq!(sql, br#"'a\'b\"c\\d\ne\rf\0g\Zh'"#);

    let cases: [(ColumnType, u16, Option<Value>, &str); 7] = [
        (
            ColumnType::MYSQL_TYPE_LONGLONG,
            63,
            Some(Value::Bytes(b"-42".to_vec())),
            "-42",
        ),
        (
            ColumnType::MYSQL_TYPE_DOUBLE,
            63,
            Some(Value::Bytes(b"1.5e-300".to_vec())),
            "1.5e-300",
        ),
        (
            ColumnType::MYSQL_TYPE_BLOB,
            63,
            Some(Value::Bytes(vec![0, b'\'', b'a'])),
            r"_binary'\0\'a'",
        ),
        (
            ColumnType::MYSQL_TYPE_VAR_STRING,
            63,
            Some(Value::Bytes(vec![])),
            "_binary''",
        ),
        (
            ColumnType::MYSQL_TYPE_BIT,
            63,
            Some(Value::Bytes(vec![5])),
            "X'05'",
        ),
        (
            ColumnType::MYSQL_TYPE_DATETIME,
            63,
            Some(Value::Bytes(b"2024-02-29 12:00:00".to_vec())),
            "'2024-02-29 12:00:00'",
        ),
        (ColumnType::MYSQL_TYPE_LONG, 63, None, "NULL"),
    ];
    for (ty, charset, value, want) in cases {
        let mut sql = Vec::new();
        push_value(&mut sql, ty, charset, value);
        assert_eq!(String::from_utf8(sql).unwrap(), want, "{ty:?}");
    }
}

#[test]
fn view_definitions_lose_their_definer() {
    assert_eq!(
        without_definer(
            "CREATE ALGORITHM=UNDEFINED DEFINER=`root`@`localhost` SQL SECURITY DEFINER VIEW `v` AS select 1"
        ),
        "CREATE ALGORITHM=UNDEFINED SQL SECURITY DEFINER VIEW `v` AS select 1"
    );
    assert_eq!(
        without_definer("CREATE VIEW `v` AS select 1"),
        "CREATE VIEW `v` AS select 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scratch_database_is_restored_read_back_emptied_and_dropped() {
    let db = server();
    let name = ledger_db(&db, "scratch_src");
    scratch_database_round_trip(
        &adapter(&db, &name),
        &*db,
        "SELECT COUNT(*), SUM(balance), NULL, x'00FF', CAST(0.5 AS DOUBLE), 'it''s' FROM accounts",
        &[&[
            crate::adapters::Value::Number("1000".to_owned()),
            crate::adapters::Value::Number("100000".to_owned()),
            crate::adapters::Value::Null,
            crate::adapters::Value::Bytes(vec![0, 0xff]),
            crate::adapters::Value::Float(0.5),
            crate::adapters::Value::Text("it's".to_owned()),
        ]],
    )
    .await;
}

/// Issue 18 defect 3: a password with a raw `/`, `?`, `@` or `#` is refused before
/// anything connects, and neither the error nor what messages show of the URL holds
/// any part of it; percent-encoded, it reaches the driver decoded.
#[test]
fn urls_with_raw_password_characters_are_refused_without_showing_them() {
    for url in [
        "mysql://root:12/Zebra@127.0.0.1:3306/auditor",
        "mysql://root:Zebra/Quokka@127.0.0.1:3306/auditor",
        "mysql://root:Zebra?Quokka@127.0.0.1:3306/auditor",
        "mysql://root:Zebra#Quokka@127.0.0.1:3306/auditor",
        "mysql://root:Zebra@Quokka@127.0.0.1:3306/auditor",
    ] {
        match parse_url(url) {
            Err(error) => assert!(
                !error.contains("Zebra") && !error.contains("Quokka"),
                "{url}: {error}"
            ),
            // `Zebra@Quokka`: the last `@` ends the user info, so the parse is sound.
            Ok(opts) => {
                assert_eq!(opts.pass(), Some("Zebra@Quokka"), "{url}");
                assert!(!shown(&opts).contains("Zebra"), "{url}");
            }
        }
    }
    let opts = parse_url("mysql://root:Zebra%2FQuokka%23x%2541@127.0.0.1:3306/auditor").unwrap();
    assert_eq!(opts.pass(), Some("Zebra/Quokka#x%41"));
    assert_eq!(shown(&opts), "mysql://root@127.0.0.1:3306/auditor");
}

/// Issue 18.1: emptying a restore target (`restore --force`) refuses a database
/// another connection uses; past that check it waits for its table locks at most its
/// timeout, and a client that goes away while it waits drops nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptying_a_target_refuses_other_connections_and_never_drops_after_its_client_left() {
    let db = server();
    let name = unique_name("clear_target");
    db.create_database(&name);
    db.sql(
        &name,
        "CREATE TABLE keep_me (x INT) ENGINE=InnoDB; INSERT INTO keep_me VALUES (1); \
         CREATE VIEW v AS SELECT x FROM keep_me;",
    );
    let target = db.url(&name);
    let adapter = adapter(&db, &name);
    let tables = || {
        db.sql(
            "",
            &format!(
                "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{name}'"
            ),
        )
    };

    let mut holder = connect(&parse_url(&target).unwrap()).await.unwrap();
    holder
        .query_drop("START TRANSACTION; SELECT * FROM keep_me")
        .await
        .unwrap();
    let err = adapter.clear(&target).await.unwrap_err().to_string();
    assert!(err.contains("in use by 1 other connection"), "{err}");
    assert!(err.contains("nothing was dropped"), "{err}");
    assert_eq!(tables(), "2");

    // A connection made after that check: the table locks are not had in time.
    let mut conn = connect(&parse_url(&target).unwrap()).await.unwrap();
    let err = drop_everything(&mut conn, std::time::Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Lock wait timeout"), "{err}");
    drop(conn);
    assert_eq!(tables(), "2");

    // The client goes away while it waits for the locks: nothing is dropped.
    let mut conn = connect(&parse_url(&target).unwrap()).await.unwrap();
    {
        let dropping = drop_everything(&mut conn, std::time::Duration::from_secs(120));
        tokio::pin!(dropping);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let waiting = async {
            while db.sql(
                "",
                &format!(
                    "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = '{name}' \
                     AND STATE LIKE 'Waiting for table metadata lock%'"
                ),
            ) != "1"
            {
                assert!(Instant::now() < deadline, "the locks were never awaited");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            result = &mut dropping => panic!("the locks were not awaited: {result:?}"),
            () = waiting => {}
        }
    }
    drop(conn);
    holder.query_drop("COMMIT").await.unwrap();
    let _ = holder.disconnect().await;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while db.sql(
        "",
        &format!("SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = '{name}'"),
    ) != "0"
    {
        assert!(
            Instant::now() < deadline,
            "connections stayed on the target"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(tables(), "2", "tables were dropped after the client left");

    adapter.clear(&target).await.unwrap();
    assert_eq!(tables(), "0");
}

/// A restore user without the PROCESS privilege sees only its own connections in
/// PROCESSLIST: `restore --force` found nobody using a live database (the
/// application connects as another user) and dropped its tables under it. Such a
/// user is now refused before anything is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptying_a_target_needs_a_user_that_sees_every_connection() {
    let db = server();
    let name = unique_name("clear_unseen");
    db.create_database(&name);
    db.sql(
        &name,
        "CREATE TABLE keep_me (x INT) ENGINE=InnoDB; INSERT INTO keep_me VALUES (1);",
    );
    let user = unique_name("restorer");
    db.sql(
        "",
        &format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'; \
             GRANT ALL ON `{name}`.* TO '{user}'@'%';"
        ),
    );
    let as_restorer = db.url(&name).replace("root@", &format!("{user}:pw@"));
    assert_ne!(as_restorer, db.url(&name));
    let adapter = adapter(&db, &name);
    let tables = || {
        db.sql(
            "",
            &format!(
                "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{name}'"
            ),
        )
    };

    // The application, connected as another user, idle between transactions.
    let mut application = connect(&parse_url(&db.url(&name)).unwrap()).await.unwrap();
    application.query_drop("SELECT 1").await.unwrap();
    let err = adapter.clear(&as_restorer).await.unwrap_err().to_string();
    assert!(err.contains("lacks the PROCESS privilege"), "{err}");
    assert!(err.contains("nothing was dropped"), "{err}");
    assert_eq!(tables(), "1");

    // With the privilege it sees the application, and refuses for that reason.
    db.sql("", &format!("GRANT PROCESS ON *.* TO '{user}'@'%'"));
    let err = adapter.clear(&as_restorer).await.unwrap_err().to_string();
    assert!(err.contains("in use by 1 other connection"), "{err}");
    assert_eq!(tables(), "1");

    let _ = application.disconnect().await;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match adapter.clear(&as_restorer).await {
            Ok(()) => break,
            Err(err) => assert!(Instant::now() < deadline, "{err}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(tables(), "0");
}

/// Issue 20.2: binary values were decoded as lossy UTF-8, so bytes that differ read
/// back equal (and bytes equal to a string's). Values now keep their type and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_different_types_or_bytes_stay_different() {
    let db = server();
    let name = ledger_db(&db, "typed");
    pairs_read_back_differently(
        &adapter(&db, &name),
        &db.url(&name),
        &[
            ("SELECT x'FF00112233'", "SELECT x'FE00112233'"),
            ("SELECT CAST(x'6162' AS BINARY)", "SELECT 'ab'"),
            ("SELECT 1", "SELECT '1'"),
            ("SELECT NULL", "SELECT 'NULL'"),
        ],
    )
    .await;
}

/// Issue 20.3: a consistent snapshot does not cover MyISAM or Aria tables, so a backup
/// with one is refused before anything is paused, naming the table and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_refuses_non_transactional_tables() {
    let db = server();
    let name = ledger_db(&db, "myisam");
    db.sql(
        &name,
        "CREATE TABLE legacy_log (id INT PRIMARY KEY) ENGINE=MyISAM;
         CREATE TABLE legacy_aria (id INT PRIMARY KEY) ENGINE=Aria;",
    );
    let msg = adapter(&db, &name)
        .prepare()
        .await
        .err()
        .expect("prepare must refuse tables a snapshot cannot cover")
        .to_string();
    assert!(msg.contains("legacy_log (MyISAM)"), "{msg}");
    assert!(msg.contains("legacy_aria (Aria)"), "{msg}");
    assert!(msg.contains("ENGINE=InnoDB"), "{msg}");
}

/// Issue 20.8: drill checks are read-only. A statement that writes fails, and so does
/// more than one statement (a second one could end the read-only transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_cannot_write() {
    let db = server();
    let name = ledger_db(&db, "readonly");
    testing::checks_cannot_write(
        &adapter(&db, &name),
        &*db,
        &name,
        &[
            "DELETE FROM audit; SELECT 0",
            "COMMIT; DELETE FROM audit; SELECT 0",
            "DELETE FROM audit",
        ],
        ("SELECT COUNT(*) FROM audit", "10"),
    )
    .await;
}

/// Issue 20.9: a system-versioned table was counted at the cut but not on the restored
/// side (BASE TABLE only), and its history was not copied. Both are kept now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_versioned_tables_are_counted_and_keep_their_history() {
    let db = server();
    let name = ledger_db(&db, "versioned");
    db.sql(
        &name,
        "CREATE TABLE prices (id INT PRIMARY KEY, price INT) WITH SYSTEM VERSIONING;
         INSERT INTO prices VALUES (1, 10), (2, 20), (3, 30);
         UPDATE prices SET price = 11 WHERE id = 1;
         DELETE FROM prices WHERE id = 2;
         CREATE TABLE rates (id INT PRIMARY KEY, rate INT,
           valid_from TIMESTAMP(6) GENERATED ALWAYS AS ROW START INVISIBLE,
           valid_to TIMESTAMP(6) GENERATED ALWAYS AS ROW END INVISIBLE,
           PERIOD FOR SYSTEM_TIME (valid_from, valid_to)) WITH SYSTEM VERSIONING;
         INSERT INTO rates (id, rate) VALUES (1, 5);
         UPDATE rates SET rate = 6 WHERE id = 1;",
    );
    let history = |database: &str| {
        db.sql(
            database,
            "SELECT id, price, row_start, row_end FROM prices FOR SYSTEM_TIME ALL ORDER BY 1, 3;
             SELECT id, rate, valid_from, valid_to FROM rates FOR SYSTEM_TIME ALL ORDER BY 1, 3;",
        )
    };
    let adapter = adapter(&db, &name);
    let Copied {
        bytes,
        row_counts: at_cut,
        ..
    } = cut_and_copy(&adapter).await;
    assert_eq!(at_cut["prices"], 2);
    assert_eq!(at_cut["rates"], 1);

    let restored = restore_into_new(&adapter, &*db, "versioned_restored", bytes).await;
    assert_eq!(
        adapter.row_counts(&db.url(&restored)).await.unwrap(),
        at_cut
    );
    assert_eq!(history(&restored), history(&name));
    assert_eq!(
        db.sql(&restored, "SELECT COUNT(*) FROM prices FOR SYSTEM_TIME ALL"),
        "4"
    );
}

/// DDL the application sends as soon as it is released, before the copy has read the
/// table: a TRUNCATE would empty the table in the snapshot's view (its copy and its
/// row count alike), an ALTER would fail the copy ("Table definition has changed").
/// Both wait for the copy, which holds the rows at the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_right_after_the_release_waits_for_the_copy() {
    let db = server();
    let name = ledger_db(&db, "ddl");
    let adapter = adapter(&db, &name);
    let before = ledger_facts(&db, &name);

    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    let ddl = |sql: &'static str| {
        let (db, name) = (db.clone(), name.clone());
        std::thread::spawn(move || db.sql(&name, sql))
    };
    let truncate = ddl("TRUNCATE audit");
    let alter = ddl("ALTER TABLE owners ADD COLUMN extra INT");
    // Until each has run or waits for a lock.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: usize = db
            .sql(
                "",
                &format!(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{name}' \
                     AND STATE = 'Waiting for table metadata lock'"
                ),
            )
            .parse()
            .unwrap();
        let finished = usize::from(truncate.is_finished()) + usize::from(alter.is_finished());
        if waiting + finished == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the DDL neither ran nor waited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    let finished = copy.finished.await;
    // Joined before any assertion: the threads hold the shared server.
    truncate.join().unwrap();
    alter.join().unwrap();
    assert_eq!(
        db.sql(&name, "SELECT COUNT(*) FROM audit"),
        "0",
        "TRUNCATE ran"
    );
    let counts = finished.unwrap().row_counts.unwrap();
    assert_eq!(counts["audit"], 10, "{counts:?}");
    assert_eq!(counts["owners"], 100, "{counts:?}");
    let restored = restore_into_new(&adapter, &*db, "ddl_restored", bytes).await;
    assert_eq!(ledger_facts(&db, &restored), before);
}

/// Someone else's DDL holding a table during the cut: the cut gives up after its
/// bounded lock wait (inside the pause), naming why, instead of holding the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_by_other_ddl_fails_the_cut_in_bounded_time() {
    let db = server();
    let name = ledger_db(&db, "ddl_held");
    let adapter = adapter(&db, &name);
    let mut prepared = adapter.prepare().await.unwrap();
    let mut other = Conn::new(Opts::from_url(&db.url(&name)).unwrap())
        .await
        .unwrap();
    other.query_drop("LOCK TABLES audit WRITE").await.unwrap();
    let started = Instant::now();
    let msg = prepared.cut("b-1").await.unwrap_err().to_string();
    let took = started.elapsed();
    other.query_drop("UNLOCK TABLES").await.unwrap();
    let _ = other.disconnect().await;
    assert!(msg.contains("locking the 3 tables to copy"), "{msg}");
    assert!(msg.contains("Lock wait timeout"), "{msg}");
    assert!(
        took < CUT_LOCK_TIMEOUT + std::time::Duration::from_secs(2),
        "{took:?}"
    );
}

/// FLOAT columns: the server prints them with 6 significant digits (16777216 as
/// 16777200), so a dump of that text restored other floats; and a FLOAT widened bit
/// for bit compared as 0.10000000149011612, equal to no expected 0.1 and to no
/// PostgreSQL `real` holding the same float. The copy keeps every float, and a
/// check reads each as the shortest decimal that reads back as it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floats_are_copied_exactly_and_compare_by_their_shortest_decimal() {
    let db = server();
    let name = unique_name("floats");
    db.create_database(&name);
    db.sql(
        &name,
        "CREATE TABLE f (id INT PRIMARY KEY, x FLOAT, u FLOAT UNSIGNED, d DOUBLE) ENGINE=InnoDB;
         INSERT INTO f VALUES (1, 1/3, 0.1, 0.1), (2, 16777217, 3.14159265, 1e300),
                              (3, -1.17549435e-38, 3.4028234e38, -2.2250738585072014e-308),
                              (4, NULL, 0, 0);",
    );
    let exact = "SELECT id, HEX(CAST(x AS DOUBLE)), CAST(x AS DOUBLE), CAST(u AS DOUBLE), d \
                 FROM f ORDER BY id";
    let adapter = adapter(&db, &name);
    let Copied { bytes, .. } = cut_and_copy(&adapter).await;
    let restored = restore_into_new(&adapter, &*db, "floats_restored", bytes).await;
    assert_eq!(db.sql(&restored, exact), db.sql(&name, exact));

    let rows = adapter
        .query(&db.url(&restored), "SELECT x, u, d FROM f WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![vec![
            super::super::Value::Float(0.33333334),
            super::super::Value::Float(0.1),
            super::super::Value::Float(0.1),
        ]]
    );
    let rows = adapter
        .query(&db.url(&restored), "SELECT x FROM f WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![super::super::Value::Float(16777216.0)]]);
}

/// A BLOB of 9 MiB, well within the server's 16 MiB max_allowed_packet, in a table
/// with awkward names: the dump wrote binary values as hex, twice their size, so its
/// INSERT was larger than the target server takes and the restore (every drill of
/// the backup) failed. Binary values are now written as escaped `_binary` strings,
/// about their own size; NULL, '' and 'NULL' stay apart, names round-trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_and_awkward_names_are_restored() {
    let db = server();
    let name = unique_name("large");
    db.create_database(&name);
    db.sql(
        &name,
        "SET NAMES utf8mb4;
         CREATE TABLE `order` (`select` INT PRIMARY KEY, `we``ird \"col\"` TEXT, `ü é` VARBINARY(10)) ENGINE=InnoDB;
         CREATE TABLE `a'b\"c``d üé` (id INT PRIMARY KEY, b LONGBLOB) ENGINE=InnoDB;
         INSERT INTO `order` VALUES (1, NULL, ''), (2, '', NULL), (3, 'NULL', X'00FF5C27');
         INSERT INTO `a'b\"c``d üé` SELECT seq, REPEAT(CONCAT(X'41FF', CHAR(seq), X'E227'), 9 * 256 * 1024) FROM seq_1_to_2;",
    );
    let facts = "SELECT (SELECT GROUP_CONCAT(CONCAT_WS('|', `select`, IFNULL(`we``ird \"col\"`, 'N'), \
                   IFNULL(HEX(`ü é`), 'N')) ORDER BY 1) FROM `order`), \
                 (SELECT GROUP_CONCAT(CONCAT(id, ':', LENGTH(b), ':', MD5(b)) ORDER BY id) FROM `a'b\"c``d üé`)";
    let adapter = adapter(&db, &name);
    let Copied {
        bytes,
        row_counts: at_cut,
        ..
    } = cut_and_copy(&adapter).await;
    let restored = restore_into_new(&adapter, &*db, "large_restored", bytes).await;
    assert_eq!(db.sql(&restored, facts), db.sql(&name, facts));
    assert_eq!(
        adapter.row_counts(&db.url(&restored)).await.unwrap(),
        at_cut
    );
}

/// A view built on another view whose name sorts after it: the dump wrote views in
/// name order, so restoring `a_totals` (which reads `b_rows`) failed, and with it
/// every drill of the backup. Views are now written after the views they read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_on_views_are_restored_in_dependency_order() {
    let db = server();
    let name = unique_name("views");
    db.create_database(&name);
    db.sql(
        &name,
        "CREATE TABLE t (x INT) ENGINE=InnoDB;
         INSERT INTO t VALUES (1), (2), (3);
         CREATE VIEW c_rows AS SELECT x FROM t WHERE x > 1;
         CREATE VIEW b_rows AS SELECT x FROM c_rows;
         CREATE VIEW a_totals AS SELECT SUM(x) AS total FROM b_rows;",
    );
    let adapter = adapter(&db, &name);
    let Copied { bytes, .. } = cut_and_copy(&adapter).await;
    let restored = restore_into_new(&adapter, &*db, "views_restored", bytes).await;
    assert_eq!(db.sql(&restored, "SELECT total FROM a_totals"), "5");
}

/// A row larger than the server's max_allowed_packet (two BLOBs of 9 MiB: each value
/// fits, the row does not), which the server stores and sends: our connection
/// refused to read it ("Packet is larger than max_allowed_packet"), so no backup of
/// the database could be made. The copy now reads it; restoring it needs a server
/// that takes statements that large (here the test server is raised to 64 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_larger_than_max_allowed_packet_is_copied() {
    let db = server();
    let name = unique_name("wide");
    db.create_database(&name);
    db.sql(
        &name,
        "CREATE TABLE w (id INT PRIMARY KEY, a LONGBLOB, b LONGBLOB) ENGINE=InnoDB;
         INSERT INTO w VALUES (1, REPEAT('a', 9 * 1024 * 1024), NULL);
         UPDATE w SET b = REPEAT('b', 9 * 1024 * 1024) WHERE id = 1;",
    );
    let facts = "SELECT id, LENGTH(a), MD5(a), LENGTH(b), MD5(b) FROM w";
    let adapter = adapter(&db, &name);
    let Copied {
        bytes,
        row_counts: at_cut,
        ..
    } = cut_and_copy(&adapter).await;
    assert_eq!(at_cut["w"], 1);
    db.sql("", "SET GLOBAL max_allowed_packet = 64 * 1024 * 1024");
    let restored = restore_into_new(&adapter, &*db, "wide_restored", bytes).await;
    assert_eq!(db.sql(&restored, facts), db.sql(&name, facts));
}
