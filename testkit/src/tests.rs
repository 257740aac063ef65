//! The servers against their contract: they start, serve SQL, keep apart from each other
//! and from the machine's own servers, and leave nothing behind when dropped.

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

/// Whether a process exists, from `/proc`.
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn accepts_tcp(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

#[test]
fn free_ports_are_distinct_and_not_the_system_servers() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ports.len(),
        "a port was handed out twice: {ports:?}"
    );
    assert!(!ports.contains(&5432) && !ports.contains(&3306));
}

#[test]
fn postgres_serves_sql_in_a_new_database() {
    let started = Instant::now();
    let pg = Postgres::start();
    eprintln!("PostgreSQL started in {:?}", started.elapsed());
    assert_ne!(pg.port(), 5432, "must not be the system server");
    assert_eq!(
        pg.url("app"),
        format!("postgres://postgres@127.0.0.1:{}/app", pg.port())
    );

    pg.create_database("app");
    let sum = pg.psql(
        "app",
        "CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2); SELECT sum(a) FROM t;",
    );
    assert_eq!(sum, "3");
    // It is our server: our port, our data directory, tuned for speed.
    let settings = pg.psql(
        "app",
        "SELECT current_setting('port'), current_setting('data_directory'), current_setting('fsync');",
    );
    assert_eq!(
        settings,
        format!("{}|{}|off", pg.port(), pg.data_dir().display())
    );
    assert!(pg.bin_dir().join("pg_dump").is_file());
    assert!(pg.bin_dir().join("pg_restore").is_file());
    assert_eq!(pg.wal_archive_dir(), None);
}

#[test]
#[should_panic(expected = "relation \"missing\" does not exist")]
fn psql_panics_with_the_servers_error() {
    let pg = Postgres::start();
    pg.psql("postgres", "SELECT * FROM missing");
}

#[test]
fn two_postgres_servers_run_side_by_side() {
    // Started at the same moment, as parallel tests would.
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(Postgres::start);
        let b = scope.spawn(Postgres::start);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    a.psql(
        "postgres",
        "CREATE TABLE which (name text); INSERT INTO which VALUES ('a');",
    );
    b.psql(
        "postgres",
        "CREATE TABLE which (name text); INSERT INTO which VALUES ('b');",
    );
    assert_eq!(a.psql("postgres", "SELECT name FROM which"), "a");
    assert_eq!(b.psql("postgres", "SELECT name FROM which"), "b");
}

#[test]
fn dropping_postgres_stops_it_and_removes_its_directory() {
    let pg = Postgres::start();
    let pid = pg.postmaster_pid();
    let port = pg.port();
    let data_dir = pg.data_dir().to_path_buf();
    assert!(process_exists(pid) && accepts_tcp(port) && data_dir.exists());

    drop(pg);
    // Drop waits for the postmaster to exit, so no polling is needed here.
    assert!(!process_exists(pid), "postmaster {pid} still running");
    assert!(!accepts_tcp(port), "port {port} still accepts connections");
    assert!(!data_dir.exists(), "{} still exists", data_dir.display());
    assert!(!data_dir.parent().unwrap().exists());
}

#[test]
fn postgres_archives_wal_when_asked() {
    let pg = Postgres::start_with(PostgresOptions { wal_archive: true });
    let archive = pg
        .wal_archive_dir()
        .expect("wal_archive was requested")
        .to_path_buf();
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT current_setting('archive_mode'), current_setting('wal_level'), current_setting('fsync'), current_setting('full_page_writes');",
        ),
        "on|logical|on|on"
    );
    pg.psql(
        "postgres",
        "CREATE TABLE t (a int); INSERT INTO t VALUES (1); SELECT pg_switch_wal();",
    );
    // The archiver copies the switched segment in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let segments = std::fs::read_dir(&archive).unwrap().count();
        if segments > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no WAL segment archived within 30s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mariadb_serves_sql_in_a_new_database_with_the_binlog_on() {
    let started = Instant::now();
    let db = MariaDb::start();
    eprintln!("MariaDB started in {:?}", started.elapsed());
    assert_ne!(db.port(), 3306, "must not be the system server");
    assert_eq!(
        db.url("app"),
        format!("mysql://root@127.0.0.1:{}/app", db.port())
    );

    db.create_database("app");
    let rows = db.sql(
        "app",
        "CREATE TABLE t (a INT PRIMARY KEY, b VARCHAR(10)) ENGINE=InnoDB;
         INSERT INTO t VALUES (1, 'x'), (2, 'y');
         SELECT a, b FROM t ORDER BY a;",
    );
    assert_eq!(rows, "1\tx\n2\ty");
    let status = db.sql("", "SELECT @@port, @@log_bin, @@gtid_binlog_pos <> '';");
    assert_eq!(status, format!("{}\t1\t1", db.port()));
    assert!(db.bin_dir().join("mariadb-dump").is_file());
    assert!(db.data_dir().join("binlog.index").is_file());
}

#[test]
fn dropping_mariadb_stops_it_and_removes_its_directory() {
    let db = MariaDb::start();
    let pid = db.pid();
    let port = db.port();
    let data_dir = db.data_dir().to_path_buf();
    assert!(process_exists(pid) && accepts_tcp(port) && data_dir.exists());

    drop(db);
    assert!(!process_exists(pid), "mariadbd {pid} still running");
    assert!(!accepts_tcp(port), "port {port} still accepts connections");
    assert!(!data_dir.parent().unwrap().exists());
}

#[test]
fn a_killed_postgres_restarts_on_its_port_with_what_it_committed() {
    let mut pg = Postgres::start_with(PostgresOptions { wal_archive: true });
    pg.create_database("app");
    pg.psql(
        "app",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (1), (2)",
    );
    let killed = pg.postmaster_pid();
    pg.kill();
    assert!(!process_exists(killed), "the postmaster survived SIGKILL");
    assert!(!accepts_tcp(pg.port()));
    pg.restart();
    assert_ne!(pg.postmaster_pid(), killed);
    assert_eq!(pg.psql("app", "SELECT count(*) FROM t"), "2");
}

#[test]
fn a_killed_crash_safe_mariadb_restarts_on_its_port_with_what_it_committed() {
    let mut db = MariaDb::start_with(MariaDbOptions { crash_safe: true });
    db.create_database("app");
    db.sql(
        "app",
        "CREATE TABLE t (v int) ENGINE=InnoDB; INSERT INTO t VALUES (1), (2)",
    );
    let killed = db.pid();
    db.kill();
    assert!(!process_exists(killed), "mariadbd survived SIGKILL");
    assert!(!accepts_tcp(db.port()));
    db.restart();
    assert_eq!(db.sql("app", "SELECT count(*) FROM t"), "2");
}
