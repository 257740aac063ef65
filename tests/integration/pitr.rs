//! PostgreSQL point-in-time recovery tried as an operator would, adversarially: a base
//! backup that is a file copy of the running server, a port another server holds, a
//! base backup newer than the cut, a password only in PGPASSWORD or a password file,
//! `--keep`, SIGTERM mid-recovery, a Debian-style data directory without its
//! configuration files, an archive path with `'` and `%` in it, gaps and unreadable
//! segments in the archive, and a timeout. Each test runs the real `stillpoint` binary
//! against a throwaway PostgreSQL that archives WAL and a real `ledger-node` cluster.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use stillpoint_testkit::{Postgres, PostgresOptions};

use crate::cluster::Cluster;
use crate::util::{Process, bin, run_json, run_with_env, stderr, wait_until};

/// A PostgreSQL database `app` with one table, archiving WAL, a cluster to pause, and a
/// runbook that backs the database up.
pub struct Source {
    pub postgres: Postgres,
    cluster: Cluster,
    pub dir: tempfile::TempDir,
    runbook: PathBuf,
}

impl Source {
    pub fn start() -> Source {
        let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
        postgres.create_database("app");
        postgres.psql(
            "app",
            "CREATE TABLE items (id serial PRIMARY KEY, note text NOT NULL)",
        );
        let cluster = Cluster::start(1);
        let dir = tempfile::tempdir().unwrap();
        // The scratch server's user reaches base backups, archives and data
        // directories the tests make in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let source = Source {
            runbook: dir.path().join("runbook.toml"),
            postgres,
            cluster,
            dir,
        };
        source.write_runbook(&source.postgres.url("app"));
        source
    }

    /// (Re)writes the runbook with `url` for the database.
    pub fn write_runbook(&self, url: &str) {
        self.write_runbook_with(url, self.postgres.bin_dir());
    }

    /// (Re)writes the runbook with `url` for the database and its tools in `bin_dir`.
    /// A runbook whose pg_basebackup copies at 32 kB/s (the real one, wrapped), so that
    /// a signal or a second command lands while it copies.
    pub fn write_runbook_with_a_slow_pg_basebackup(&self) {
        let slow = self.dir.path().join("slow-bin");
        std::fs::create_dir(&slow).unwrap();
        let wrapper = slow.join("pg_basebackup");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} --max-rate=32k \"$@\"\n",
                self.postgres.bin_dir().join("pg_basebackup").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.write_runbook_with(&self.postgres.url("app"), &slow);
    }

    pub fn write_runbook_with(&self, url: &str, bin_dir: &Path) {
        let storage = self.dir.path().join("backups");
        std::fs::create_dir_all(&storage).unwrap();
        let text = format!(
            r#"
cluster = "pitr"
[pause]
tiers = [{{ addresses = ["{ledger}"] }}, {{ addresses = ["{auditor}"] }}]
lease = "30s"
max_wait = "10s"
cut_deadline = "10s"
[[databases]]
name = "app"
adapter = "postgres"
url = "{url}"
bin_dir = "{bin_dir}"
require_archiving = true
[pipeline]
[storage]
url = "file://{storage}"
"#,
            ledger = self.cluster.ledgers[0].address,
            auditor = self.cluster.auditor.address,
            bin_dir = bin_dir.display(),
            storage = storage.display(),
        );
        std::fs::write(&self.runbook, text).unwrap();
    }

    pub fn config(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    pub fn insert(&self, rows: u32) {
        self.postgres.psql(
            "app",
            &format!(
                "INSERT INTO items (note) SELECT 'row ' || g FROM generate_series(1, {rows}) g"
            ),
        );
    }

    /// `stillpoint base-backup` into `dir/<name>`.
    fn base_backup(&self, name: &str) -> PathBuf {
        let base = self.dir.path().join(name);
        let (code, report) = run_json(
            "stillpoint",
            &[
                "base-backup",
                "--config",
                self.config(),
                "--database",
                "app",
                "--to",
                base.to_str().unwrap(),
                "--output",
                "json",
            ],
        );
        assert_eq!(code, 0, "{report:#}");
        base
    }

    /// `stillpoint backup`; returns the backup id and the rows of `items` at its cut.
    fn backup(&self) -> (String, u64) {
        let (code, report) = run_json(
            "stillpoint",
            &["backup", "--config", self.config(), "--output", "json"],
        );
        assert_eq!(code, 0, "{report:#}");
        let rows = report["manifest"]["databases"][0]["row_counts"]["public.items"]
            .as_u64()
            .unwrap_or_else(|| panic!("no row count for items: {report:#}"));
        (report["backup_id"].as_str().unwrap().to_owned(), rows)
    }

    /// Starts a new WAL segment (after a write, so there is one to finish) and waits
    /// until the finished one is archived.
    pub fn switch_wal(&self) {
        self.insert(1);
        let segment = self
            .postgres
            .psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
        self.postgres.psql("postgres", "SELECT pg_switch_wal()");
        let archived = self.archive().join(segment.trim());
        wait_until(
            Duration::from_secs(30),
            "the WAL segment to be archived",
            || archived.exists(),
        );
    }

    pub fn archive(&self) -> &Path {
        self.postgres.wal_archive_dir().unwrap()
    }

    /// `stillpoint pitr BACKUP --database app --base-backup BASE --wal-archive ARCHIVE
    /// --output json` plus `extra`.
    fn pitr(&self, backup: &str, base: &Path, archive: &Path, extra: &[&str]) -> Output {
        self.pitr_with_env(backup, base, archive, extra, &[])
    }

    pub fn pitr_with_env(
        &self,
        backup: &str,
        base: &Path,
        archive: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Output {
        run_with_env(
            "stillpoint",
            &self.pitr_args(backup, base, archive, extra),
            env,
        )
    }

    fn pitr_args<'a>(
        &'a self,
        backup: &'a str,
        base: &'a Path,
        archive: &'a Path,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec![
            "pitr",
            backup,
            "--config",
            self.config(),
            "--database",
            "app",
            "--base-backup",
            base.to_str().unwrap(),
            "--wal-archive",
            archive.to_str().unwrap(),
            "--output",
            "json",
        ];
        if !extra.contains(&"--timeout") {
            args.extend(["--timeout", "2m"]);
        }
        args.extend(extra);
        args
    }
}

/// The common story: 10 rows, a base backup, 10 more rows over three WAL segments, a
/// backup (its cut), 10 rows after the cut, everything archived. Returns the source,
/// the base backup, the backup id and the rows at the cut.
fn prepared() -> (Source, PathBuf, String, u64) {
    let source = Source::start();
    source.insert(10);
    let base = source.base_backup("base");
    for _ in 0..3 {
        source.insert(3);
        source.switch_wal();
    }
    let (backup_id, rows) = source.backup();
    source.insert(10);
    source.switch_wal();
    (source, base, backup_id, rows)
}

/// The JSON report of a pitr that must have succeeded.
fn succeeded(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "pitr failed:\nstdout: {stdout}\nstderr: {}",
        stderr(output)
    );
    serde_json::from_str(&stdout).unwrap()
}

fn recovered_rows(report: &Value) -> u64 {
    report["recovery"]["content"]["tables"]["public.items"]["rows"]
        .as_u64()
        .unwrap_or_else(|| panic!("no items table in {report:#}"))
}

/// A failed pitr's exit code and stderr.
fn failed(output: &Output) -> String {
    let text = stderr(output);
    assert_ne!(
        output.status.code(),
        Some(0),
        "pitr succeeded but must not have:\nstdout: {}\nstderr: {text}",
        String::from_utf8_lossy(&output.stdout)
    );
    text
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The first line of a `postmaster.pid`: the postmaster's process id.
fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Copies a WAL archive (a directory of segments) to `to`, for tests that damage it.
fn copy_archive(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let copy = to.join(entry.file_name());
        std::fs::copy(entry.path(), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // The scratch server's user reads it.
    for path in [to.parent().unwrap(), to] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// The WAL segment names (24 hex digits) in an archive, sorted.
fn segments(archive: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(archive)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    names.sort();
    names
}

/// The base backup's first WAL segment, from its backup_label.
fn start_segment(base: &Path) -> String {
    let label = std::fs::read_to_string(base.join("backup_label")).unwrap();
    let line = label
        .lines()
        .find(|line| line.starts_with("START WAL LOCATION"))
        .unwrap();
    line.rsplit("file ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .to_owned()
}

/// `mkfifo`: an archive segment that is a FIFO makes `cp` in restore_command block, so
/// the scratch server stays in recovery for as long as a test needs it to.
fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
}

/// Releases a `cp` blocked on the FIFO (it reads an empty segment and exits); a no-op
/// when nothing reads it.
fn release_fifo(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening for writing fails at once instead of waiting for a reader.
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(0o4000)
        .open(path);
}

/// Issue 19 defect 1: a file-level copy of the running data directory (postmaster.pid
/// and all) is a valid base backup; recovering from it must neither fail on the copied
/// lock file nor stop the source server through it.
#[test]
fn pitr_from_a_file_copy_of_the_running_server_leaves_the_source_running() {
    let source = Source::start();
    source.insert(10);
    source.postgres.psql("postgres", "CHECKPOINT");
    let copy = source.dir.path().join("copy");
    let status = Command::new("cp")
        .arg("-a")
        .arg(source.postgres.data_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        copy.join("postmaster.pid").exists(),
        "the copy must carry the lock file"
    );
    let source_pid = postmaster_pid(source.postgres.data_dir()).unwrap();
    source.insert(5);
    let (backup_id, rows) = source.backup();
    source.insert(5);
    source.switch_wal();

    let output = source.pitr(&backup_id, &copy, source.archive(), &["--target", "lsn"]);
    assert!(
        process_alive(source_pid),
        "the source postmaster ({source_pid}) was stopped by pitr: {}",
        stderr(&output)
    );
    assert_eq!(source.postgres.psql("app", "SELECT 1"), "1");
    assert_eq!(recovered_rows(&succeeded(&output)), rows);
}

/// Issue 19 defect 2: another server listening on the chosen port is not taken for the
/// recovered one; the failed start is reported as such.
#[test]
fn pitr_on_a_port_another_server_holds_reports_the_failed_start() {
    let (source, base, backup_id, _) = prepared();
    let bystander = Postgres::start();
    bystander.create_database("app");
    bystander.psql(
        "app",
        "CREATE TABLE items (id int); INSERT INTO items VALUES (1)",
    );
    let port = bystander.port().to_string();
    let output = source.pitr(
        &backup_id,
        &base,
        source.archive(),
        &["--target", "lsn", "--port", &port],
    );
    let text = failed(&output);
    assert!(
        text.contains(&port) && text.contains("in use"),
        "the error must say the port is taken: {text}"
    );
}

/// Issue 19 defect 3: a base backup taken after the cut holds rows committed after it;
/// every target kind refuses it before recovering (a time target used to "succeed").
#[test]
fn pitr_refuses_a_base_backup_newer_than_the_cut_for_every_target() {
    let (source, _, backup_id, _) = prepared();
    let late = source.base_backup("late");
    // Commits after the late base backup: a time target stops before the first of them,
    // which used to pass for "reached the target".
    source.insert(5);
    source.switch_wal();
    for target in ["time", "name", "lsn"] {
        let output = source.pitr(&backup_id, &late, source.archive(), &["--target", target]);
        let text = failed(&output);
        assert!(
            text.contains("base backup") && text.contains("after the backup's cut"),
            "--target {target}: {text}"
        );
    }
}

/// Issue 19 defect 4: a password given only through PGPASSWORD or a password file
/// works for backup, base-backup and pitr; a password file others can read is refused
/// with a message that says so.
#[test]
fn passwords_from_pgpassword_and_the_password_file_work_everywhere() {
    let source = Source::start();
    let password = "pa:ss\\word";
    source.postgres.add_password_role("app_user", password);
    source.write_runbook(&format!(
        "postgres://app_user@127.0.0.1:{}/app",
        source.postgres.port()
    ));
    source.insert(10);
    let no_passfile = source.dir.path().join("no-such-passfile");
    let no_passfile = no_passfile.to_str().unwrap();
    let env = [("PGPASSWORD", password), ("PGPASSFILE", no_passfile)];
    let base = source.dir.path().join("base");
    let output = run_with_env(
        "stillpoint",
        &[
            "base-backup",
            "--config",
            source.config(),
            "--database",
            "app",
            "--to",
            base.to_str().unwrap(),
        ],
        &env,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let backup = |env: &[(&str, &str)]| {
        run_with_env(
            "stillpoint",
            &["backup", "--config", source.config(), "--output", "json"],
            env,
        )
    };
    let output = backup(&env);
    assert!(output.status.success(), "PGPASSWORD: {}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let backup_id = report["backup_id"].as_str().unwrap().to_owned();

    // A password file in libpq's format: `*` wildcards, `\:` and `\\` escapes.
    let passfile = source.dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!(
            "# comment\nother.host:*:*:*:wrong\n127.0.0.1:{}:*:app_user:pa\\:ss\\\\word\n",
            source.postgres.port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let passfile_env = [("PGPASSFILE", passfile.to_str().unwrap())];
    let output = backup(&passfile_env);
    assert!(output.status.success(), "PGPASSFILE: {}", stderr(&output));
    // libpq ignores a password file that group or others can read; so do we, and say so.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = backup(&passfile_env);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains(passfile.to_str().unwrap()) && text.contains("0600"),
        "{text}"
    );
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();

    source.insert(5);
    source.switch_wal();
    for env in [&env[..], &passfile_env[..]] {
        let output = source.pitr_with_env(
            &backup_id,
            &base,
            source.archive(),
            &["--target", "lsn", "--timeout", "60s"],
            env,
        );
        assert_eq!(recovered_rows(&succeeded(&output)), 10);
    }
}

/// Issue 19 defect 5: `--keep` without `--data-dir` keeps the directory it reports.
#[test]
fn pitr_keep_without_a_data_dir_keeps_the_directory_it_reports() {
    let (source, base, backup_id, rows) = prepared();
    let output = source.pitr(&backup_id, &base, source.archive(), &["--keep"]);
    let report = succeeded(&output);
    assert_eq!(recovered_rows(&report), rows);
    let kept = PathBuf::from(report["recovery"]["data_dir"].as_str().unwrap());
    let exists = kept.join("PG_VERSION").is_file();
    // Ours to remove: the directory holding it is the temporary one pitr made.
    let _ = std::fs::remove_dir_all(kept.parent().unwrap());
    assert!(exists, "{} was not kept", kept.display());
}

/// Issue 19 defect 6: SIGTERM while the scratch server replays stops that server and
/// removes its directory before pitr exits.
#[test]
fn sigterm_to_pitr_stops_the_scratch_server_and_removes_its_directory() {
    let (source, base, backup_id, _) = prepared();
    // The base backup's first segment is a FIFO: replay waits on it indefinitely.
    let archive = source.dir.path().join("stuck").join("archive");
    copy_archive(source.archive(), &archive);
    let fifo = archive.join(start_segment(&base));
    std::fs::remove_file(&fifo).unwrap();
    mkfifo(&fifo);
    let data_dir = source.dir.path().join("scratch");
    let args = source.pitr_args(
        &backup_id,
        &base,
        &archive,
        &["--data-dir", data_dir.to_str().unwrap()],
    );
    let child = Command::new(bin("stillpoint"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pitr = Process::new(child, "stillpoint pitr".to_owned());
    let mut server = None;
    wait_until(
        Duration::from_secs(60),
        "the scratch server to start",
        || {
            server = postmaster_pid(&data_dir);
            server.is_some()
        },
    );
    let server = server.unwrap();
    pitr.signal("TERM");
    let output = pitr.wait_output(Duration::from_secs(60));
    release_fifo(&fifo);
    let alive = process_alive(server);
    let dir_left = data_dir.exists();
    if alive {
        // Left by a pitr that did not clean up: stop it so the test leaves nothing.
        let _ = Command::new("kill")
            .args(["-QUIT", &server.to_string()])
            .status();
    }
    assert!(
        !alive,
        "the scratch server {server} still runs: {}",
        stderr(&output)
    );
    assert!(!dir_left, "{} was left behind", data_dir.display());
}

/// Issue 19 defect 8: a Debian/Ubuntu cluster keeps postgresql.conf, pg_hba.conf and
/// pg_ident.conf in /etc, so its base backups have none; the scratch server must run
/// on a configuration of its own.
#[test]
fn a_base_backup_without_configuration_files_is_recovered() {
    let (source, base, backup_id, rows) = prepared();
    for file in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        std::fs::remove_file(base.join(file)).unwrap();
    }
    let output = source.pitr(&backup_id, &base, source.archive(), &["--target", "lsn"]);
    assert_eq!(recovered_rows(&succeeded(&output)), rows);
}

/// Issue 19 defect 12: the archive path goes to `sh` through restore_command, where a
/// `'` and a `%` in it must survive.
#[test]
fn an_archive_path_with_quotes_and_percent_signs_is_replayed() {
    let (source, base, backup_id, rows) = prepared();
    let archive = source.dir.path().join("odd").join("it's 100%f");
    copy_archive(source.archive(), &archive);
    let output = source.pitr(&backup_id, &base, &archive, &["--target", "name"]);
    assert_eq!(recovered_rows(&succeeded(&output)), rows);
}

/// Issue 19 defect 12: a segment missing in the middle of the archive is a gap, and an
/// unreadable one a permission problem; only a segment past the archive's end is "not
/// archived yet" (the negative control).
#[test]
fn gaps_and_unreadable_segments_are_told_apart_from_not_archived_yet() {
    let (source, base, backup_id, _) = prepared();
    let start = start_segment(&base);
    let all = segments(source.archive());
    let after_start: Vec<&String> = all.iter().filter(|name| **name > start).collect();
    assert!(after_start.len() >= 3, "{all:?}");
    // Not the first one after the start: the base backup's own pg_wal may hold it.
    let middle = after_start[1].clone();

    let gap = source.dir.path().join("gap").join("archive");
    copy_archive(source.archive(), &gap);
    std::fs::remove_file(gap.join(&middle)).unwrap();
    let text = failed(&source.pitr(&backup_id, &base, &gap, &["--target", "lsn"]));
    assert!(
        text.contains(&middle) && text.contains("gap") && !text.contains("not been archived"),
        "{text}"
    );

    let unreadable = source.dir.path().join("unreadable").join("archive");
    copy_archive(source.archive(), &unreadable);
    std::fs::set_permissions(
        unreadable.join(&middle),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let text = failed(&source.pitr(&backup_id, &base, &unreadable, &["--target", "lsn"]));
    assert!(
        text.contains(&middle)
            && text.contains("ermission denied")
            && !text.contains("not been archived"),
        "{text}"
    );

    // Everything from the middle segment on is missing: that is an archive that has
    // not caught up yet.
    let behind = source.dir.path().join("behind").join("archive");
    copy_archive(source.archive(), &behind);
    for name in &after_start[1..] {
        std::fs::remove_file(behind.join(name)).unwrap();
    }
    let text = failed(&source.pitr(&backup_id, &base, &behind, &["--target", "lsn"]));
    assert!(text.contains("not been archived yet"), "{text}");
}

/// Issue 19 defect 12: a timeout's error must not send the operator to a log that was
/// deleted with the scratch directory; it carries what the log said.
#[test]
fn a_timeout_error_carries_the_server_log_instead_of_a_deleted_path() {
    let (source, base, backup_id, _) = prepared();
    let archive = source.dir.path().join("stuck").join("archive");
    copy_archive(source.archive(), &archive);
    let fifo = archive.join(start_segment(&base));
    std::fs::remove_file(&fifo).unwrap();
    mkfifo(&fifo);
    let output = source.pitr(
        &backup_id,
        &base,
        &archive,
        &["--target", "lsn", "--timeout", "3s"],
    );
    release_fifo(&fifo);
    let text = failed(&output);
    assert!(text.contains("within 3s"), "{text}");
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c: char| c == ',' || c == ';' || c == ')');
        if word.ends_with(".log") {
            assert!(
                Path::new(word).exists(),
                "the error points to {word}, which does not exist: {text}"
            );
        }
    }
    assert!(text.contains("server log"), "{text}");
}

/// The scratch server writes only inside its own directory: the base backup's
/// configuration (here its postgresql.auto.conf, as a source set up for warm standbys
/// has it) may name commands recovery runs (`recovery_end_command` at the end of
/// recovery, `archive_cleanup_command` at restartpoints, typically `pg_archivecleanup`
/// on the source's own archive) and a log destination elsewhere (syslog), and none of
/// them may take effect: the log must stay in the scratch directory, where it is read
/// back to explain a failure.
#[test]
fn the_scratch_server_ignores_commands_and_log_destinations_of_the_base_backup() {
    let (source, base, backup_id, rows) = prepared();
    let outside = source.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // The scratch server's user must be able to write here for the negative to mean
    // anything.
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ran = outside.join("recovery-end-ran");
    let cleaned = outside.join("archive-cleanup-ran");
    let mut auto = std::fs::read_to_string(base.join("postgresql.auto.conf")).unwrap_or_default();
    auto.push_str(&format!(
        "recovery_end_command = 'touch {}'\narchive_cleanup_command = 'touch {}'\n\
         log_destination = 'syslog'\nrecovery_target_xid = '3'\n",
        ran.display(),
        cleaned.display()
    ));
    std::fs::write(base.join("postgresql.auto.conf"), auto).unwrap();

    let output = source.pitr(&backup_id, &base, source.archive(), &["--target", "lsn"]);
    assert_eq!(recovered_rows(&succeeded(&output)), rows);
    assert!(
        !ran.exists() && !cleaned.exists(),
        "the scratch server ran the base backup's recovery commands"
    );

    // The log is still ours: a port another server holds is explained from it.
    let bystander = Postgres::start();
    let port = bystander.port().to_string();
    let text = failed(&source.pitr(
        &backup_id,
        &base,
        source.archive(),
        &["--target", "lsn", "--port", &port],
    ));
    assert!(
        text.contains(&port) && text.contains("in use"),
        "the server log did not reach the scratch directory: {text}"
    );
}

/// `base-backup` stopped by SIGTERM or SIGINT while pg_basebackup copies: it must
/// stop pg_basebackup (and the WAL streamer it forked), remove the partial base backup
/// and exit non-zero. It used to die at once and leave pg_basebackup writing into the
/// directory, then a half-written base backup behind. pg_basebackup is the real one,
/// slowed down with --max-rate so that the signal lands mid-copy.
#[test]
fn an_interrupted_base_backup_stops_pg_basebackup_and_removes_what_it_wrote() {
    let source = Source::start();
    source.insert(10);
    source.write_runbook_with_a_slow_pg_basebackup();
    for signal in ["TERM", "INT"] {
        let to = source.dir.path().join(format!("base-{signal}"));
        let child = Command::new(bin("stillpoint"))
            .args([
                "base-backup",
                "--config",
                source.config(),
                "--database",
                "app",
                "--to",
                to.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let run = Process::new(child, "stillpoint base-backup".to_owned());
        let mut copiers = Vec::new();
        wait_until(
            Duration::from_secs(60),
            "pg_basebackup to write into the directory",
            || {
                copiers = processes_naming(&to);
                !copiers.is_empty()
                    && std::fs::read_dir(&to).is_ok_and(|mut entries| entries.next().is_some())
            },
        );
        run.signal(signal);
        let output = run.wait_output(Duration::from_secs(60));
        let left: Vec<u32> = copiers
            .iter()
            .copied()
            .filter(|pid| process_running(*pid))
            .collect();
        for pid in &left {
            // Left by a base-backup that did not stop it: stop it so the test leaves
            // nothing running.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        assert!(
            left.is_empty(),
            "SIGINT/TERM: pg_basebackup ({left:?}) still runs after base-backup exited: {}",
            stderr(&output)
        );
        assert_ne!(
            output.status.code(),
            Some(0),
            "{signal}: {}",
            stderr(&output)
        );
        assert!(
            !to.exists(),
            "{signal}: the partial base backup {} was left behind",
            to.display()
        );
        assert!(
            stderr(&output).contains("interrupted"),
            "{}",
            stderr(&output)
        );
    }
}

/// The processes whose command line names `path` (a pg_basebackup writing there).
fn processes_naming(path: &Path) -> Vec<u32> {
    let needle = path.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let text = String::from_utf8_lossy(&cmdline);
                text.contains("pg_basebackup") && text.contains(needle)
            })
        })
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie waiting for its parent).
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// `--data-dir` given relative to the working directory is resolved to an absolute
/// path before anything uses it: the socket-length check measures the path the
/// server will really use, and a kept directory is reported absolute (its
/// configuration names absolute paths, and the operator may start it from anywhere).
/// A directory the operator made for it (empty) is left in place, empty, after a
/// failed recovery: it used to be deleted with everything else.
#[test]
fn a_relative_or_existing_data_dir_is_resolved_and_left_as_found() {
    let (source, base, backup_id, rows) = prepared();
    let run_in = |cwd: &Path, extra: &[&str]| {
        Command::new(bin("stillpoint"))
            .args(source.pitr_args(&backup_id, &base, source.archive(), extra))
            .current_dir(cwd)
            .output()
            .unwrap()
    };

    // A short relative path in a long working directory: the socket would be too long.
    let deep = source.dir.path().join("w".repeat(100));
    std::fs::create_dir(&deep).unwrap();
    let text = failed(&run_in(&deep, &["--target", "lsn", "--data-dir", "d"]));
    assert!(text.contains("shorter --data-dir"), "{text}");
    assert!(!deep.join("d").exists(), "the refused directory was made");

    // Relative and kept: reported (and kept) at its absolute path.
    let report = succeeded(&run_in(
        source.dir.path(),
        &["--target", "lsn", "--data-dir", "rel", "--keep"],
    ));
    assert_eq!(recovered_rows(&report), rows);
    let kept = source.dir.path().join("rel");
    assert_eq!(
        report["recovery"]["data_dir"].as_str(),
        kept.to_str(),
        "{report:#}"
    );
    assert!(kept.join("PG_VERSION").exists());

    // An empty directory the operator made, and a recovery that fails after the copy.
    let made = source.dir.path().join("made");
    std::fs::create_dir(&made).unwrap();
    let bystander = Postgres::start();
    let port = bystander.port().to_string();
    let text = failed(&source.pitr(
        &backup_id,
        &base,
        source.archive(),
        &[
            "--target",
            "lsn",
            "--port",
            &port,
            "--data-dir",
            made.to_str().unwrap(),
        ],
    ));
    assert!(text.contains("in use"), "{text}");
    assert!(made.is_dir(), "the operator's directory was removed");
    assert_eq!(std::fs::read_dir(&made).unwrap().count(), 0, "not emptied");
}

/// A database with a tablespace outside its data directory. `base-backup` must write
/// the tablespace inside its own directory (pg_basebackup would otherwise write it at
/// the source's own location: refused on the same host, "not empty", and on another
/// host a write outside `--to`), and `pitr` must recover it inside its scratch
/// directory, never through the base backup's tablespace link (which would write into
/// the base backup, or with a file-level copy into the source's live tablespace).
#[test]
fn tablespaces_are_backed_up_and_recovered_inside_their_own_directories() {
    let source = Source::start();
    let space = source.dir.path().join("space");
    std::fs::create_dir(&space).unwrap();
    let status = Command::new("chown")
        .arg("postgres:")
        .arg(&space)
        .status()
        .unwrap();
    assert!(status.success());
    source.postgres.psql(
        "app",
        &format!("CREATE TABLESPACE extra LOCATION '{}'", space.display()),
    );
    source.postgres.psql(
        "app",
        "CREATE TABLE spaced (id int) TABLESPACE extra; \
         INSERT INTO spaced SELECT generate_series(1, 10)",
    );
    source.insert(10);
    let base = source.base_backup("base");
    let link = std::fs::read_dir(base.join("pg_tblspc"))
        .unwrap()
        .next()
        .expect("the base backup has the tablespace")
        .unwrap()
        .path();
    let target = std::fs::canonicalize(&link).unwrap();
    assert!(
        target.starts_with(std::fs::canonicalize(&base).unwrap()),
        "the base backup's tablespace is at {}, outside it",
        target.display()
    );
    let before = tree_digest(&base);
    source
        .postgres
        .psql("app", "INSERT INTO spaced SELECT generate_series(11, 15)");
    source.switch_wal();
    let (backup_id, _) = source.backup();
    source
        .postgres
        .psql("app", "INSERT INTO spaced SELECT generate_series(16, 20)");
    source.switch_wal();

    let report = succeeded(&source.pitr(&backup_id, &base, source.archive(), &["--target", "lsn"]));
    assert_eq!(
        report["recovery"]["content"]["tables"]["public.spaced"]["rows"].as_u64(),
        Some(15),
        "{report:#}"
    );
    assert_eq!(
        tree_digest(&base),
        before,
        "the scratch server wrote into the base backup's tablespace"
    );
}

/// Every file under `dir` (links not followed) with its length and content, as one
/// string to compare.
fn tree_digest(dir: &Path) -> String {
    let mut entries = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                let sum = blake3::hash(&bytes).to_hex();
                entries.push(format!("{} {} {sum}", path.display(), bytes.len()));
            }
        }
    }
    entries.sort();
    entries.join("\n")
}

/// Two `base-backup` runs given one directory at once: one is refused before it
/// touches anything, and the other's base backup stays whole. The directory was
/// checked for emptiness but not claimed, so both could pass the check; the one whose
/// pg_basebackup then found the directory taken removed what was in it, which was the
/// other's finished base backup. pg_basebackup of the first run starts late (its
/// wrapper waits) to make the interleaving certain.
#[test]
fn two_base_backups_into_one_directory_leave_one_whole_base_backup() {
    let source = Source::start();
    source.insert(10);
    let late = source.dir.path().join("late-bin");
    std::fs::create_dir(&late).unwrap();
    let started = source.dir.path().join("late-started");
    let wrapper = late.join("pg_basebackup");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ntouch {}\nsleep 3\nexec {} \"$@\"\n",
            started.display(),
            source.postgres.bin_dir().join("pg_basebackup").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    source.write_runbook_with(&source.postgres.url("app"), &late);
    let to = source.dir.path().join("base");
    let args = [
        "base-backup",
        "--config",
        source.config(),
        "--database",
        "app",
        "--to",
        to.to_str().unwrap(),
    ];
    let first = Process::new(
        Command::new(bin("stillpoint"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        "the first stillpoint base-backup".to_owned(),
    );
    wait_until(
        Duration::from_secs(30),
        "the first pg_basebackup to be about to start",
        || started.exists(),
    );
    // The second run, with the real pg_basebackup, while the first holds the directory.
    source.write_runbook(&source.postgres.url("app"));
    let second = crate::util::run("stillpoint", &args);
    let first = first.wait_output(Duration::from_secs(60));
    let outcomes = [first.status.success(), second.status.success()];
    assert_eq!(
        outcomes,
        [true, false],
        "first: {}\nsecond: {}",
        stderr(&first),
        stderr(&second)
    );
    assert!(
        stderr(&second).contains("in use by another"),
        "{}",
        stderr(&second)
    );
    assert!(
        to.join("PG_VERSION").exists() && to.join("backup_label").exists(),
        "no whole base backup is left in {}",
        to.display()
    );
}

/// A scratch directory inside the base backup (or the WAL archive) is refused before
/// anything is written: recovery would copy the base backup into itself, and a
/// recovery killed mid-copy left its half-copy inside the base backup.
#[test]
fn a_data_dir_inside_the_base_backup_or_the_archive_is_refused() {
    let (source, base, backup_id, _) = prepared();
    let before = tree_digest(&base);
    let archive = source.archive().to_owned();
    for inside in [base.join("recovered"), archive.join("scratch").join("data")] {
        let text = failed(&source.pitr(
            &backup_id,
            &base,
            &archive,
            &["--target", "lsn", "--data-dir", inside.to_str().unwrap()],
        ));
        assert!(text.contains("overlaps"), "{text}");
        assert!(!inside.exists(), "{} was made", inside.display());
    }
    assert_eq!(tree_digest(&base), before, "the base backup changed");
}

/// Paths PostgreSQL is given in its configuration (the scratch data directory, the WAL
/// archive in restore_command) must be text it can read back: a newline broke the
/// configuration file's quoting and bytes that are not UTF-8 were replaced, so the
/// server looked for another directory. Both are refused up front, naming the path.
#[test]
fn paths_postgresql_cannot_be_given_are_refused_up_front() {
    use std::os::unix::ffi::OsStrExt;
    let (source, base, backup_id, _) = prepared();
    let newline = source.dir.path().join("new\nline");
    let not_utf8 = source
        .dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    for data_dir in [&newline, &not_utf8] {
        let output = Command::new(bin("stillpoint"))
            .args(source.pitr_args(&backup_id, &base, source.archive(), &["--target", "lsn"]))
            .arg("--data-dir")
            .arg(data_dir)
            .output()
            .unwrap();
        let text = failed(&output);
        assert!(
            text.contains("control character") || text.contains("UTF-8"),
            "{text}"
        );
        assert!(!data_dir.exists(), "{} was made", data_dir.display());
    }
    let archive = source.dir.path().join("arch\nive");
    copy_archive(source.archive(), &archive);
    let text = failed(&source.pitr(&backup_id, &base, &archive, &["--target", "lsn"]));
    assert!(text.contains("control character"), "{text}");
}

/// `base-backup` against a source that accepted the connection but does not answer
/// (its postmaster stopped with SIGSTOP, as a hung host would be): SIGTERM must still
/// end it at once, and what it made be removed. Listing the source's tablespaces
/// (before pg_basebackup starts) did not watch for the signal, so the command hung.
#[test]
fn sigterm_ends_a_base_backup_stuck_on_a_source_that_does_not_answer() {
    let source = Source::start();
    let postmaster = postmaster_pid(source.postgres.data_dir()).unwrap();
    let _resume = Resume(postmaster);
    let status = Command::new("kill")
        .args(["-STOP", &postmaster.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let to = source.dir.path().join("base");
    let child = Command::new(bin("stillpoint"))
        .args([
            "base-backup",
            "--config",
            source.config(),
            "--database",
            "app",
            "--to",
            to.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = Process::new(child, "stillpoint base-backup".to_owned());
    let port = source.postgres.port();
    wait_until(
        Duration::from_secs(30),
        "base-backup to be connected to the stopped source",
        || connected_to(run.pid(), port),
    );
    run.signal("TERM");
    let output = run.wait_output(Duration::from_secs(20));
    assert_ne!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("interrupted"),
        "{}",
        stderr(&output)
    );
    assert!(!to.exists(), "{} was left behind", to.display());
}

/// SIGCONTs a stopped postmaster when dropped, and its parent (testkit's `runuser`,
/// which stops itself when its child stops), so no test leaves the source stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let parent = std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().nth(1).map(str::to_owned)
            });
        for pid in [Some(self.0.to_string()), parent].into_iter().flatten() {
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
    }
}

/// Whether process `pid` has an established TCP connection to 127.0.0.1:`port`
/// (its socket inodes looked up in /proc/net/tcp).
fn connected_to(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: Vec<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 9
            && fields[2] == remote
            && fields[3] == "01"
            && inodes.iter().any(|inode| inode == fields[9])
    })
}

/// A base backup with a tablespace, moved (renamed) after `base-backup` wrote it, as
/// an operator moves base backups to other disks: its tablespace links must still
/// lead to its own tablespace copy. They pointed at the absolute path the base backup
/// was written to, so recovery from the moved copy could not find the tablespace.
#[test]
fn a_moved_base_backup_with_a_tablespace_is_recovered() {
    let source = Source::start();
    let space = source.dir.path().join("space");
    std::fs::create_dir(&space).unwrap();
    let status = Command::new("chown")
        .arg("postgres:")
        .arg(&space)
        .status()
        .unwrap();
    assert!(status.success());
    source.postgres.psql(
        "app",
        &format!("CREATE TABLESPACE extra LOCATION '{}'", space.display()),
    );
    source.postgres.psql(
        "app",
        "CREATE TABLE spaced (id int) TABLESPACE extra; \
         INSERT INTO spaced SELECT generate_series(1, 10)",
    );
    let written = source.base_backup("written");
    let moved = source.dir.path().join("moved");
    std::fs::rename(&written, &moved).unwrap();
    source
        .postgres
        .psql("app", "INSERT INTO spaced SELECT generate_series(11, 15)");
    source.switch_wal();
    let (backup_id, _) = source.backup();
    source.switch_wal();

    let report =
        succeeded(&source.pitr(&backup_id, &moved, source.archive(), &["--target", "lsn"]));
    assert_eq!(
        report["recovery"]["content"]["tables"]["public.spaced"]["rows"].as_u64(),
        Some(15),
        "{report:#}"
    );
}

/// `pitr` from a base backup that `base-backup` is still writing is refused, naming
/// the cause: it holds backup_label and PG_VERSION early on, so the half-written copy
/// used to be taken for a base backup.
#[test]
fn pitr_refuses_a_base_backup_still_being_written() {
    let source = Source::start();
    source.insert(10);
    source.write_runbook_with_a_slow_pg_basebackup();
    let base = source.dir.path().join("base");
    let child = Command::new(bin("stillpoint"))
        .args([
            "base-backup",
            "--config",
            source.config(),
            "--database",
            "app",
            "--to",
            base.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writing = Process::new(child, "stillpoint base-backup".to_owned());
    wait_until(
        Duration::from_secs(60),
        "the base backup's label and version to be written",
        || base.join("backup_label").exists() && base.join("PG_VERSION").exists(),
    );
    // A backup after the base backup started: its cut is one the base backup can reach.
    source.write_runbook(&source.postgres.url("app"));
    source.insert(5);
    let (backup_id, _) = source.backup();
    source.switch_wal();
    let output = source.pitr(&backup_id, &base, source.archive(), &["--target", "lsn"]);
    writing.signal("TERM");
    let _ = writing.wait_output(Duration::from_secs(60));
    let text = failed(&output);
    assert!(text.contains("still being written"), "{text}");
}
