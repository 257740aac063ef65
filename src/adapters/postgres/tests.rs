//! PostgreSQL adapter tests against real servers (stillpoint-testkit): writes after the
//! cut stay out of the copy, the restore point lands in the WAL, a non-empty target is
//! refused, and a failing pg_dump fails the copy.

use std::sync::{Mutex, Weak};
use std::time::Instant;

use stillpoint_testkit::{Postgres as Server, PostgresOptions};

use super::*;
use crate::adapters::testing::{
    self, Copied, copy_of, cut_and_copy, pairs_read_back_differently, read_to_end,
    restore_into_new, scratch_database_round_trip, shared, unique_name,
};

static PLAIN: Mutex<Weak<Server>> = Mutex::new(Weak::new());
static ARCHIVING: Mutex<Weak<Server>> = Mutex::new(Weak::new());

fn plain() -> std::sync::Arc<Server> {
    shared(&PLAIN, Server::start)
}

fn archiving() -> std::sync::Arc<Server> {
    shared(&ARCHIVING, || {
        Server::start_with(PostgresOptions { wal_archive: true })
    })
}

fn adapter(pg: &Server, db: &str, require_archiving: bool) -> Postgres {
    Postgres::new(
        "ledger-pg",
        PostgresConfig {
            url: pg.url(db),
            require_archiving,
            bin_dir: Some(pg.bin_dir().to_owned()),
            drill_server_url: None,
        },
    )
}

/// A database with owners, accounts (1000 rows of 100, with quoting and bytes to
/// round-trip) and 10 audit rows.
fn ledger_db(pg: &Server, prefix: &str) -> String {
    let db = unique_name(prefix);
    pg.create_database(&db);
    pg.psql(
        &db,
        "CREATE TABLE owners (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE accounts (id serial PRIMARY KEY, owner int NOT NULL REFERENCES owners,
                                balance bigint NOT NULL, note text, data bytea);
         CREATE TABLE audit (id int PRIMARY KEY, note text);
         INSERT INTO owners SELECT g, 'owner ' || g FROM generate_series(1, 100) g;
         INSERT INTO accounts (owner, balance, note, data)
           SELECT 1 + g % 100, 100, 'it''s row ' || g, '\\x00ff'::bytea FROM generate_series(1, 1000) g;
         INSERT INTO audit SELECT g, 'note ' || g FROM generate_series(1, 10) g;",
    );
    db
}

/// What the application does after the cut, from its own connection.
fn write_after_cut(pg: &Server, db: &str) {
    pg.psql(
        db,
        "INSERT INTO accounts (owner, balance) SELECT 1, 1 FROM generate_series(1, 500);
         UPDATE accounts SET balance = 0 WHERE id = 1;
         DELETE FROM audit WHERE id <= 5;
         CREATE TABLE late (x int);
         INSERT INTO late VALUES (1);",
    );
}

/// The facts the consistency tests compare: accounts, their balance sum, audit rows,
/// and whether the table created after the cut exists.
fn ledger_facts(pg: &Server, db: &str) -> String {
    pg.psql(
        db,
        "SELECT (SELECT count(*) FROM accounts), (SELECT sum(balance) FROM accounts),
                (SELECT count(*) FROM audit), to_regclass('public.late') IS NOT NULL,
                (SELECT note FROM accounts WHERE id = 2), (SELECT encode(data, 'hex') FROM accounts WHERE id = 2)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_holds_the_cut_snapshot_not_later_writes() {
    let pg = plain();
    let db = ledger_db(&pg, "consistency");
    let adapter = adapter(&pg, &db, false);

    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-1").await.unwrap();
    assert_eq!(marker.kind, "postgres-snapshot");
    assert_eq!(marker.details["database"], db);
    assert!(!marker.details["snapshot"].is_empty());
    assert!(marker.details["lsn"].contains('/'), "{marker:?}");
    assert!(marker.details["server_version"].starts_with(char::is_numeric));
    // No archiving on this server, so no restore point is attempted.
    assert!(!marker.details.contains_key("restore_point"));

    write_after_cut(&pg, &db);
    assert_eq!(
        ledger_facts(&pg, &db),
        "1500|100400|5|t|it's row 2|00ff",
        "the later writes happened"
    );

    let (bytes, row_counts) = copy_of(prepared).await;
    assert_eq!(
        row_counts,
        BTreeMap::from([
            ("public.accounts".to_owned(), 1000),
            ("public.audit".to_owned(), 10),
            ("public.owners".to_owned(), 100),
        ])
    );

    let restored = restore_into_new(&adapter, &*pg, "restored", bytes).await;
    assert_eq!(
        ledger_facts(&pg, &restored),
        "1000|100000|10|f|it's row 2|00ff"
    );
}

/// Negative control for the test above: a dump of the same database that is not bound
/// to the cut's snapshot, restored the same way, has the later writes. So the checks
/// above can fail, and what keeps them out is the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_without_the_snapshot_has_the_later_writes() {
    let pg = plain();
    let db = ledger_db(&pg, "control");
    let adapter = adapter(&pg, &db, false);
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    write_after_cut(&pg, &db);

    let unbound = std::process::Command::new(pg.bin_dir().join("pg_dump"))
        .args(["--format=custom", "--dbname"])
        .arg(pg.url(&db))
        .output()
        .unwrap();
    assert!(unbound.status.success(), "{unbound:?}");
    let restored = restore_into_new(&adapter, &*pg, "control_restored", unbound.stdout).await;
    assert_eq!(
        ledger_facts(&pg, &restored),
        "1500|100400|5|t|it's row 2|00ff"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_time_does_not_grow_with_size() {
    let pg = plain();
    let mut report = Vec::new();
    for rows in [50_000, 500_000] {
        let db = unique_name("size");
        pg.create_database(&db);
        pg.psql(
            &db,
            &format!(
                "CREATE TABLE t (id int PRIMARY KEY, payload text);
                 INSERT INTO t SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, {rows}) g;"
            ),
        );
        let size = pg.psql(
            &db,
            "SELECT pg_size_pretty(pg_database_size(current_database()))",
        );
        let adapter = adapter(&pg, &db, false);
        let mut prepared = adapter.prepare().await.unwrap();
        let started = Instant::now();
        prepared.cut("b-1").await.unwrap();
        let took = started.elapsed();
        report.push(format!("{rows} rows ({size}): {took:?}"));
        let (_, counts) = copy_of(prepared).await;
        assert_eq!(counts["public.t"], rows);
    }
    println!("postgres cut time: {}", report.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_non_empty_target() {
    let pg = plain();
    let db = ledger_db(&pg, "nonempty");
    testing::restore_refuses_a_non_empty_target(
        &adapter(&pg, &db, false),
        &*pg,
        &db,
        "public.accounts",
        ("SELECT count(*) FROM accounts", "1000"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pg_dump_fails_finished_naming_the_database() {
    let pg = plain();
    let db = ledger_db(&pg, "dropped");
    let adapter = adapter(&pg, &db, false);
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    // FORCE also ends our snapshot session: pg_dump then has nothing to connect to.
    pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"));

    let mut copy = prepared.copy().await.unwrap();
    let bytes = read_to_end(&mut copy).await;
    assert!(bytes.is_empty());
    let err = copy.finished.await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Copy { .. }), "{msg}");
    assert!(msg.contains("database ledger-pg"), "{msg}");
    assert!(msg.contains("pg_dump exited with status 1"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_archiving_refuses_a_server_without_it() {
    let pg = plain();
    let err = adapter(&pg, "postgres", true)
        .prepare()
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Prepare { .. }), "{msg}");
    assert!(msg.contains("archive_mode = off"), "{msg}");
    assert!(msg.contains("archive_command"), "{msg}");
    // The message names the server but never a password.
    assert!(msg.contains(&pg.url("postgres")), "{msg}");

    // Control: the same database is fine when archiving is not required.
    adapter(&pg, "postgres", false).prepare().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_with_archiving_creates_a_named_restore_point_in_the_wal() {
    let pg = archiving();
    let db = ledger_db(&pg, "pitr");
    let adapter = adapter(&pg, &db, true);
    let mut prepared = adapter.prepare().await.unwrap();
    let marker = prepared.cut("b-rp-1").await.unwrap();
    assert_eq!(marker.details["restore_point"], "stillpoint-b-rp-1");
    assert_eq!(marker.details["archive_mode"], "on");

    // The restore point is a WAL record that reaches the archive. The cut does not
    // flush it (the next commit or the WAL writer does); switching segments here makes
    // the server flush and archive the segment holding it.
    let segment = pg.psql(&db, "SELECT pg_walfile_name(pg_switch_wal())");
    let archive = pg.wal_archive_dir().unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while !archive.join(&segment).is_file() {
        assert!(
            Instant::now() < deadline,
            "{segment} was not archived within 30s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // In the archived WAL, between the cut's position and the restore point's end, is
    // the named record.
    let waldump = std::process::Command::new(pg.bin_dir().join("pg_waldump"))
        .arg("--path")
        .arg(archive)
        .arg("--start")
        .arg(&marker.details["lsn"])
        .arg("--end")
        .arg(&marker.details["restore_point_lsn"])
        .output()
        .unwrap();
    let records = String::from_utf8_lossy(&waldump.stdout);
    assert!(
        records.contains("desc: RESTORE_POINT stillpoint-b-rp-1"),
        "pg_waldump found no restore point: {records}\n{}",
        String::from_utf8_lossy(&waldump.stderr)
    );

    copy_of(prepared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_restore_point_fails_the_cut_only_when_archiving_is_required() {
    let pg = archiving();
    let db = ledger_db(&pg, "norp");
    let role = unique_name("backup");
    pg.psql(&db, &format!("CREATE ROLE {role} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}; GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"));
    let url = format!("postgres://{role}@127.0.0.1:{}/{db}", pg.port());
    let config = |require_archiving| PostgresConfig {
        url: url.clone(),
        require_archiving,
        bin_dir: Some(pg.bin_dir().to_owned()),
        drill_server_url: None,
    };

    let required = Postgres::new("ledger-pg", config(true));
    let mut prepared = required.prepare().await.unwrap();
    let err = prepared.cut("b-1").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::Cut { .. }), "{msg}");
    assert!(msg.contains("pg_create_restore_point was refused"), "{msg}");
    assert!(msg.contains("GRANT EXECUTE"), "{msg}");

    // Not required: the refusal is recorded and the snapshot still copies.
    let optional = Postgres::new("ledger-pg", config(false));
    let mut prepared = optional.prepare().await.unwrap();
    let marker = prepared.cut("b-2").await.unwrap();
    assert!(!marker.details.contains_key("restore_point"));
    assert!(
        marker.details["restore_point_error"].contains("permission denied"),
        "{marker:?}"
    );
    let (bytes, counts) = copy_of(prepared).await;
    assert!(!bytes.is_empty());
    assert_eq!(counts["public.accounts"], 1000);
}

#[test]
fn messages_show_connection_strings_without_their_password() {
    assert_eq!(
        redact("postgres://app:s%40cret@db.example:5433/ledger?sslmode=disable&password=x").url,
        "postgres://app@db.example:5433/ledger?sslmode=disable"
    );
    assert_eq!(
        redact("host=db user=app password=secret dbname=ledger").url,
        "host='db' user='app' dbname='ledger'"
    );
    // Unparsable: nothing of it is shown.
    let shown = redact("postgres://app:Zebra/Quokka@db.example/ledger").url;
    assert!(
        !shown.contains("Zebra") && !shown.contains("Quokka"),
        "{shown}"
    );
    let shown = redact("host=db password='Zebra").url;
    assert!(!shown.contains("Zebra"), "{shown}");
}

#[test]
fn restore_point_names_fit_postgres_limit() {
    assert_eq!(restore_point_name("b-1"), "stillpoint-b-1");
    assert_eq!(restore_point_name(&"x".repeat(100)).len(), 63);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scratch_database_is_restored_read_back_emptied_and_dropped() {
    let pg = plain();
    let db = ledger_db(&pg, "scratch_src");
    scratch_database_round_trip(
        &adapter(&pg, &db, false),
        &*pg,
        "SELECT count(*), sum(balance), NULL, '\\x00ff'::bytea, 0.5::float8 FROM accounts",
        &[&[
            Value::Number("1000".to_owned()),
            Value::Number("100000".to_owned()),
            Value::Null,
            Value::Bytes(vec![0, 0xff]),
            Value::Float(0.5),
        ]],
    )
    .await;
}

/// Polls `query` (run on the `postgres` database) until it prints `expected`.
async fn until_psql(pg: &Server, query: &str, expected: &str, what: &str) {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while pg.psql("postgres", query) != expected {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Issue 18.1: emptying a restore target (`restore --force`) refuses a database
/// another session uses; past that check it waits for a lock at most its timeout,
/// and a client that goes away while the DROP waits leaves everything in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptying_a_target_refuses_other_sessions_and_never_drops_after_its_client_left() {
    let pg = plain();
    let db = unique_name("clear_target");
    pg.create_database(&db);
    pg.psql(
        &db,
        "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1)",
    );
    let target = pg.url(&db);
    let adapter = adapter(&pg, &db, false);
    let exists = || {
        pg.psql(
            &db,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'keep_me'",
        )
    };

    // Another session holds a lock on the table, in an open transaction.
    let holder = connect(&target).await.unwrap();
    holder
        .client
        .batch_execute("BEGIN; LOCK TABLE keep_me IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let err = adapter.clear(&target).await.unwrap_err().to_string();
    assert!(err.contains("in use by 1 other session"), "{err}");
    assert!(err.contains("nothing was dropped"), "{err}");
    assert_eq!(exists(), "1");

    // A session that connected after that check: the DROP gives up on its lock.
    let conn = connect(&target).await.unwrap();
    let err = drop_everything(&conn.client, std::time::Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        error_text(&err).contains("lock timeout"),
        "{}",
        error_text(&err)
    );
    conn.close().await;
    assert_eq!(exists(), "1");

    // The client goes away while its DROP waits for the lock (a killed command):
    // when the lock comes, nothing is dropped.
    let conn = connect(&target).await.unwrap();
    {
        let dropping = drop_everything(&conn.client, std::time::Duration::from_secs(120));
        tokio::pin!(dropping);
        let waiting_query = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
             AND wait_event_type = 'Lock'"
        );
        let waiting = until_psql(&pg, &waiting_query, "1", "the DROP to wait for the lock");
        tokio::select! {
            result = &mut dropping => panic!("the DROP did not wait for the lock: {result:?}"),
            () = waiting => {}
        }
    }
    drop(conn);
    holder.client.batch_execute("COMMIT").await.unwrap();
    holder.close().await;
    until_psql(
        &pg,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"),
        "0",
        "every session to leave the target",
    )
    .await;
    assert_eq!(
        exists(),
        "1",
        "the DROP was committed after its client left"
    );

    // Nobody else there: it is emptied.
    adapter.clear(&target).await.unwrap();
    assert_eq!(exists(), "0");
}

/// A restore user that is not a superuser sees another role's sessions with a NULL
/// `backend_type`, which the in-use check filtered out: `restore --force` as the
/// database's owner emptied it under an application connected as another role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptying_a_target_sees_sessions_of_other_roles() {
    let pg = plain();
    let db = unique_name("clear_other_role");
    let owner = unique_name("owner");
    let reader = unique_name("reader");
    pg.psql(
        "postgres",
        &format!("CREATE ROLE {owner} LOGIN; CREATE ROLE {reader} LOGIN"),
    );
    pg.psql("postgres", &format!("CREATE DATABASE {db} OWNER {owner}"));
    let as_owner = pg.url(&db).replace("postgres@", &format!("{owner}@"));
    let as_reader = pg.url(&db).replace("postgres@", &format!("{reader}@"));
    assert_ne!(as_owner, pg.url(&db));
    let setup = connect(&as_owner).await.unwrap();
    setup
        .client
        .batch_execute(&format!(
            "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1); \
             GRANT SELECT ON keep_me TO {reader}"
        ))
        .await
        .unwrap();
    setup.close().await;
    let adapter = adapter(&pg, &db, false);
    let exists = || {
        pg.psql(
            &db,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'keep_me'",
        )
    };

    // The application, connected as the other role, idle between queries.
    let application = connect(&as_reader).await.unwrap();
    application
        .client
        .batch_execute("SELECT x FROM keep_me")
        .await
        .unwrap();
    let err = adapter.clear(&as_owner).await.unwrap_err().to_string();
    assert!(err.contains("in use by 1 other session"), "{err}");
    assert!(err.contains(&reader), "{err}");
    assert!(err.contains("nothing was dropped"), "{err}");
    assert_eq!(exists(), "1");

    application.close().await;
    until_psql(
        &pg,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"),
        "0",
        "the application to leave the target",
    )
    .await;
    adapter.clear(&as_owner).await.unwrap();
    assert_eq!(exists(), "0");
}

/// Issue 20.1: TRUNCATE is not MVCC-safe, so a table truncated after the release but
/// before pg_dump locked it was dumped empty, and the row counts, read in the same
/// snapshot, agreed. The cut's transaction now holds ACCESS SHARE on every table it
/// copies (taken before the snapshot): a TRUNCATE queued before pg_dump locked the
/// table fails the copy loudly (PostgreSQL queues pg_dump behind it); one queued after
/// waits for the copy, which keeps the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_right_after_the_release_fails_the_copy_or_waits_for_it() {
    let pg = plain();
    let db = ledger_db(&pg, "truncate");
    let adapter = adapter(&pg, &db, false);
    let truncate_audit = |pg: &std::sync::Arc<Server>, db: &str| {
        let (pg, db) = (pg.clone(), db.to_owned());
        std::thread::spawn(move || {
            pg.psql(&db, "SET lock_timeout = '60s'; TRUNCATE audit");
        })
    };
    // Until the TRUNCATE has either run or queued behind a lock.
    let wait_for = |truncate: &std::thread::JoinHandle<()>| {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let waiting = pg.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query LIKE '%TRUNCATE audit%' AND wait_event_type = 'Lock'",
            );
            if truncate.is_finished() || waiting == "1" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the TRUNCATE neither ran nor waited"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };

    // Right after the release, before the copy starts.
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-1").await.unwrap();
    let truncate = truncate_audit(&pg, &db);
    wait_for(&truncate);
    let mut copy = prepared.copy().await.unwrap();
    read_to_end(&mut copy).await;
    let finished = copy.finished.await;
    // Joined before any assertion: the thread holds the shared server, which must not
    // outlive the test binary (it ends once the copy's transaction has).
    truncate.join().unwrap();
    match finished {
        Ok(summary) => panic!(
            "the copy succeeded although a TRUNCATE ran after the cut: {:?}",
            summary.row_counts
        ),
        Err(error) => {
            let msg = error.to_string();
            assert!(msg.contains("LOCK TABLE public.audit"), "{msg}");
            assert!(msg.contains("TRUNCATE, ALTER TABLE"), "{msg}");
        }
    }
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM audit"),
        "0",
        "the TRUNCATE ran"
    );

    // Once pg_dump holds its locks, a TRUNCATE waits for the copy, which has the rows.
    // More rows than a pipe holds: pg_dump blocks on its output, still holding its
    // locks, until the copy is read (with 10 rows it could finish and let them go
    // between two looks at pg_locks, and the wait below never saw them).
    pg.psql(
        &db,
        "INSERT INTO audit SELECT g, 'note ' || g FROM generate_series(1, 20000) g",
    );
    let mut prepared = adapter.prepare().await.unwrap();
    prepared.cut("b-2").await.unwrap();
    let mut copy = prepared.copy().await.unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while pg.psql(
        &db,
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'pg_dump' AND a.datname = current_database() \
           AND l.granted AND l.relation = 'public.audit'::regclass",
    ) != "1"
    {
        assert!(Instant::now() < deadline, "pg_dump never locked audit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let truncate = truncate_audit(&pg, &db);
    wait_for(&truncate);
    let bytes = read_to_end(&mut copy).await;
    let finished = copy.finished.await;
    truncate.join().unwrap();
    let counts = finished.unwrap().row_counts.unwrap();
    assert_eq!(counts["public.audit"], 20000, "{counts:?}");
    let restored = restore_into_new(&adapter, &*pg, "truncate_restored", bytes).await;
    assert_eq!(pg.psql(&restored, "SELECT count(*) FROM audit"), "20000");
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM audit"),
        "0",
        "the TRUNCATE ran"
    );
}

/// Issue 20.2: query results were text, so bytes and the text of their hex escape were
/// the same value. Values now keep their type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_different_types_or_bytes_stay_different() {
    let pg = plain();
    let db = ledger_db(&pg, "typed");
    let adapter = adapter(&pg, &db, false);
    pairs_read_back_differently(
        &adapter,
        &pg.url(&db),
        &[
            ("SELECT '\\xff00'::bytea", "SELECT '\\xff00'::text"),
            (
                "SELECT '\\xff00112233'::bytea",
                "SELECT '\\xfe00112233'::bytea",
            ),
            ("SELECT 1", "SELECT '1'::text"),
            ("SELECT NULL::text", "SELECT 'NULL'::text"),
        ],
    )
    .await;
}

/// Issue 20.8: drill checks are read-only. A statement that writes fails, and so does
/// more than one statement (a second one could end the read-only transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_cannot_write() {
    let pg = plain();
    let db = ledger_db(&pg, "readonly");
    testing::checks_cannot_write(
        &adapter(&pg, &db, false),
        &*pg,
        &db,
        &[
            "DELETE FROM audit; SELECT 0",
            "COMMIT; DELETE FROM audit; SELECT 0",
            "DELETE FROM audit",
            "WITH gone AS (DELETE FROM audit RETURNING 1) SELECT count(*) FROM gone",
        ],
        ("SELECT count(*) FROM audit", "10"),
    )
    .await;
}

/// Scratch databases were created from template1 in the drill server's default
/// encoding (UTF8 here): a SQL_ASCII source's bytes that are not UTF-8 failed the
/// restore, and a LATIN1 source's text was converted to another encoding. They are
/// now made from template0 with the source's encoding and locale, as the backup's
/// cut recorded them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scratch_database_has_the_source_encoding_and_locale() {
    let pg = plain();
    let dir = tempfile::tempdir().unwrap();
    for encoding in ["SQL_ASCII", "LATIN1"] {
        let source = unique_name("encoding_src");
        pg.psql(
            "postgres",
            &format!(
                "CREATE DATABASE {source} TEMPLATE template0 ENCODING '{encoding}' \
                 LC_COLLATE 'C' LC_CTYPE 'C'"
            ),
        );
        pg.psql(
            &source,
            "CREATE TABLE t (id int PRIMARY KEY, x text); \
             INSERT INTO t VALUES (1, E'caf\\xe9 \\xff\\xfe'), (2, 'plain')",
        );
        let adapter = std::sync::Arc::new(adapter(&pg, &source, false));
        let Copied {
            marker: cut, bytes, ..
        } = cut_and_copy(&*adapter).await;
        assert_eq!(cut.details["encoding"], encoding, "{cut:?}");

        let label = unique_name("encoding_scratch");
        let target = adapter
            .create_scratch(&label, dir.path(), &cut)
            .await
            .unwrap();
        let restored = adapter
            .restore(Box::pin(std::io::Cursor::new(bytes)), &target)
            .await;
        let facts = |db: &str| {
            pg.psql(
                db,
                &format!(
                    "SELECT d.datcollate, d.datctype, pg_encoding_to_char(d.encoding), \
                       (SELECT string_agg(encode(convert_to(x, '{encoding}'), 'hex'), ',' \
                        ORDER BY id) FROM t) \
                     FROM pg_database d WHERE d.datname = current_database()"
                ),
            )
        };
        let outcome = restored.map(|()| facts(&label));
        // A drill check reading that text (tokio-postgres's rows are UTF-8 only): the
        // server refuses to send it as UTF-8, an error, never a panic.
        let checked = tokio::spawn({
            let (adapter, target) = (adapter.clone(), target.clone());
            async move {
                adapter
                    .query(&target, "SELECT id, x FROM t ORDER BY id")
                    .await
            }
        })
        .await;
        adapter.drop_scratch(&target).await.unwrap();
        assert_eq!(outcome.unwrap(), facts(&source), "{encoding}");
        let checked = checked.expect("the check panicked");
        if encoding == "SQL_ASCII" {
            let msg = checked.unwrap_err().to_string();
            assert!(msg.contains("invalid byte sequence"), "{msg}");
        } else {
            assert_eq!(checked.unwrap().len(), 2);
        }
    }
}

/// A drill on a server of its own (`drill_server_url`) of a database that GRANTs to
/// an application role: the drill server has no such role, and pg_restore failed on
/// the GRANT, so every drill failed to restore. Scratch copies are restored without
/// the source's privileges (`--no-acl`); a real restore keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_on_another_server_restores_without_the_source_roles() {
    let source_server = archiving();
    let drill_server = plain();
    let db = ledger_db(&source_server, "grants_src");
    let role = unique_name("app_reader");
    source_server.psql(
        &db,
        &format!("CREATE ROLE {role}; GRANT SELECT ON accounts TO {role}"),
    );
    let adapter = Postgres::new(
        "ledger-pg",
        PostgresConfig {
            url: source_server.url(&db),
            require_archiving: false,
            bin_dir: Some(source_server.bin_dir().to_owned()),
            drill_server_url: Some(drill_server.url("postgres")),
        },
    );
    let Copied {
        marker: cut, bytes, ..
    } = cut_and_copy(&adapter).await;
    let dir = tempfile::tempdir().unwrap();
    let label = unique_name("grants_scratch");
    let target = adapter
        .create_scratch(&label, dir.path(), &cut)
        .await
        .unwrap();
    let restored = adapter
        .restore(Box::pin(std::io::Cursor::new(bytes.clone())), &target)
        .await;
    let rows = restored
        .as_ref()
        .ok()
        .map(|()| drill_server.psql(&label, "SELECT count(*) FROM accounts"));
    adapter.drop_scratch(&target).await.unwrap();
    restored.unwrap();
    assert_eq!(rows.as_deref(), Some("1000"));

    // A restore that is not a drill's keeps the grants (here, on the source's server).
    let kept = unique_name("grants_kept");
    source_server.create_database(&kept);
    adapter
        .restore(
            Box::pin(std::io::Cursor::new(bytes)),
            &source_server.url(&kept),
        )
        .await
        .unwrap();
    assert_eq!(
        source_server.psql(
            &kept,
            &format!("SELECT has_table_privilege('{role}', 'accounts', 'SELECT')")
        ),
        "t"
    );
}

/// The advisory lock a drill takes for a scratch database is tried, not awaited: a
/// key someone else holds (another drill's name hashing alike) fails the creation at
/// once, naming the lock, instead of waiting for the other drill to end; nothing is
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scratch_lock_held_elsewhere_fails_at_once() {
    let pg = plain();
    let db = ledger_db(&pg, "scratch_lock");
    let adapter = adapter(&pg, &db, false);
    let label = unique_name("held");
    let (other, connection) = tokio_postgres::connect(&pg.url(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    other
        .execute(
            "SELECT pg_advisory_lock($1, hashtext($2))",
            &[&SCRATCH_LOCK_CLASS, &label],
        )
        .await
        .unwrap();
    let cut = CutMarker {
        kind: String::new(),
        details: BTreeMap::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let created = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        adapter.create_scratch(&label, dir.path(), &cut),
    )
    .await;
    drop(other);
    let _ = driver.await;
    let msg = created
        .expect("waited for the other session's lock")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("advisory lock"), "{msg}");
    assert_eq!(
        pg.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{label}'")
        ),
        "0"
    );
}
