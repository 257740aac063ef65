//! A PostgreSQL standby server: its data directory made from a point's base backup
//! (extracted as a point restore extracts it: `points::restore::extract_base`), a
//! server on it in standby mode (`standby.signal`, hot standby, so its replay
//! position and rows can be read) whose `restore_command` is `stillpoint wal-fetch`
//! from the primary's archive, stopped at the point's named restore point
//! (`recovery_target_action = pause`). A newer point is a new target and a restart
//! (PostgreSQL reads recovery targets only at start). Promotion is `pg_promote()`
//! while it is paused at its point.
//!
//! The server outlives the `stillpoint standby` process that started it (its own
//! process group, not our child to kill on exit): a standby keeps its state while
//! the follower is restarted, and `promote` runs in another process. It is stopped
//! with `pg_ctl stop` on its data directory. Its settings go on its command line,
//! where neither the base's postgresql.conf nor postgresql.auto.conf override them:
//! archiving off (it must never archive into the primary's archive), no streaming
//! from the primary, its own port and socket directory.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{Moved, Standby, StandbyError};
use crate::adapters::PostgresConfig;
use crate::adapters::postgres::conninfo::ConnString;
use crate::archive::{Lsn, Position};
use crate::pitr;
use crate::points::PointManifest;
use crate::points::restore::{self as point_restore, Checked, Needed};
use crate::runbook::StandbyPostgres;

/// The server's log, in its data directory.
const LOG_FILE: &str = "stillpoint-standby.log";
/// How long replay position must stay still to count as the archive's end (the
/// negative control's promotion).
const STILL_FOR: Duration = Duration::from_secs(3);

fn run_as(server: &StandbyPostgres) -> Option<String> {
    server
        .run_as
        .clone()
        .or_else(|| pitr::running_as_root().then(|| "postgres".to_owned()))
}

fn fail(name: &str, message: String) -> StandbyError {
    StandbyError::Database {
        database: name.to_owned(),
        message,
    }
}

/// Makes the standby of `name` at `point`: the base extracted into the (new, empty)
/// data directory, the server started with the point as its target, and waited for
/// until it has stopped there. Anything failing stops the server and removes the
/// directory: the database has no standby yet, as before.
pub(crate) async fn seed(
    standby: &Standby,
    name: &str,
    config: &PostgresConfig,
    server: &StandbyPostgres,
    point: &PointManifest,
    needed: &Needed,
) -> Result<(), Moved> {
    let untouched = |message: String| Moved::Untouched(fail(name, message));
    let data_dir = &server.data_dir;
    if data_dir
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        return Err(untouched(format!(
            "its data directory {} is not empty, and the state file {} has no entry for it: \
             stop any server there and remove the directory, or give another data_dir",
            data_dir.display(),
            standby.state_path().display()
        )));
    }
    point_restore::check(&standby.storage, point, needed, &mut Checked::new())
        .await
        .map_err(|error| untouched(error.to_string()))?;
    let made = make(standby, name, config, server, point, needed).await;
    if let Err(message) = made {
        stop(config, server).await.ok();
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(untouched(format!(
            "making its standby at point {}: {message}; {} was removed",
            point.point_id,
            data_dir.display()
        )));
    }
    Ok(())
}

async fn make(
    standby: &Standby,
    name: &str,
    config: &PostgresConfig,
    server: &StandbyPostgres,
    point: &PointManifest,
    needed: &Needed,
) -> Result<(), String> {
    let data_dir = &server.data_dir;
    std::fs::create_dir_all(data_dir)
        .map_err(|error| format!("creating {}: {error}", data_dir.display()))?;
    point_restore::extract_base(
        &standby.storage,
        &standby.decryption,
        &needed.base,
        data_dir,
    )
    .await
    .map_err(|why| format!("extracting base backup {}: {why}", needed.base.id))?;
    pitr::set_private(data_dir).map_err(|error| error.to_string())?;
    std::fs::create_dir_all(data_dir.join("pg_wal"))
        .map_err(|error| format!("creating pg_wal: {error}"))?;
    // The source's lock file would stop the server starting (and name the source's
    // postmaster); a recovery.signal would end recovery at the archive's end.
    for file in [
        "postmaster.pid",
        "postmaster.opts",
        "recovery.signal",
        "standby.signal",
    ] {
        let _ = std::fs::remove_file(data_dir.join(file));
    }
    std::fs::write(data_dir.join("standby.signal"), b"")
        .map_err(|error| format!("writing standby.signal: {error}"))?;
    // A Debian cluster keeps its configuration in /etc: its base has none, and the
    // server needs a file (the settings that matter are on the command line).
    let conf = data_dir.join("postgresql.conf");
    if !conf.exists() {
        std::fs::write(&conf, b"# Written by stillpoint standby.\n")
            .map_err(|error| format!("writing {}: {error}", conf.display()))?;
    }
    if !data_dir.join("pg_hba.conf").exists() {
        return Err(format!(
            "base backup {} has no pg_hba.conf (the primary keeps it outside its data \
             directory): the standby answers clients as the primary did only with its \
             rules; copy the primary's pg_hba.conf into the base's data directory",
            needed.base.id
        ));
    }
    if let Some(user) = run_as(server) {
        pitr::chown(&user, data_dir)
            .await
            .map_err(|error| error.to_string())?;
    }
    start(standby, name, config, server, Some(&restore_point(needed)?)).await?;
    wait_at(standby, config, server, point, needed).await
}

/// Moves the standby of `name` to `point`: a new target, a restart, a wait until it
/// stopped there. A failure after the restart leaves it somewhere between its old
/// point and the new one: broken.
pub(crate) async fn advance(
    standby: &Standby,
    name: &str,
    config: &PostgresConfig,
    server: &StandbyPostgres,
    point: &PointManifest,
    needed: &Needed,
) -> Result<(), Moved> {
    let target = restore_point(needed).map_err(|m| Moved::Untouched(fail(name, m)))?;
    stop(config, server)
        .await
        .map_err(|m| Moved::Untouched(fail(name, m)))?;
    let moved = async {
        start(standby, name, config, server, Some(&target)).await?;
        wait_at(standby, config, server, point, needed).await
    };
    moved
        .await
        .map_err(|message| Moved::Broken(fail(name, message)))
}

fn restore_point(needed: &Needed) -> Result<String, String> {
    needed.restore_point.clone().ok_or_else(|| {
        format!(
            "the point has no restore point name for {}",
            needed.database
        )
    })
}

/// Promotes the server, which is paused at its point: recovery ends there.
pub(crate) async fn promote(
    _standby: &Standby,
    name: &str,
    config: &PostgresConfig,
    server: &StandbyPostgres,
) -> Result<(), String> {
    let client = connect(config, server).await?;
    let (in_recovery, _, _) = replay_state(&client).await?;
    if in_recovery {
        let promoted: bool = client
            .query_one("SELECT pg_promote(true, 120)", &[])
            .await
            .map_err(|error| format!("pg_promote(): {error}"))?
            .get(0);
        if !promoted {
            return Err(format!(
                "pg_promote() on {name}'s server did not finish within 120 s; {}",
                log_tail(server)
            ));
        }
    }
    let (in_recovery, _, _) = replay_state(&client).await?;
    if in_recovery {
        return Err(format!(
            "{name}'s server is still in recovery after pg_promote(); {}",
            log_tail(server)
        ));
    }
    Ok(())
}

/// The negative control's promotion: the server restarted without a target, left to
/// replay everything the archive holds (until its replay position stays still),
/// then promoted. Returns where it ended.
pub(crate) async fn promote_at_archive_end(
    standby: &Standby,
    name: &str,
    config: &PostgresConfig,
    server: &StandbyPostgres,
) -> Result<Position, String> {
    stop(config, server).await?;
    start(standby, name, config, server, None).await?;
    let deadline = Instant::now() + standby.timeout;
    let mut last = None;
    let mut since = Instant::now();
    let reached = loop {
        if Instant::now() > deadline {
            return Err(format!(
                "{name}'s server did not reach the archive's end within {:?}; {}",
                standby.timeout,
                log_tail(server)
            ));
        }
        if let Ok(client) = connect(config, server).await
            && let Ok((_, _, lsn)) = replay_state(&client).await
        {
            if lsn != last {
                last = lsn;
                since = Instant::now();
            } else if last.is_some() && since.elapsed() >= STILL_FOR {
                break last.expect("checked");
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    promote(standby, name, config, server).await?;
    Ok(Position::Lsn(reached))
}

/// Starts the standby server (in its own process group, so a signal to the
/// follower's group does not reach it) with `target` as its recovery target name,
/// or none.
async fn start(
    standby: &Standby,
    name: &str,
    config: &PostgresConfig,
    server: &StandbyPostgres,
    target: Option<&str>,
) -> Result<(), String> {
    let data_dir = &server.data_dir;
    let log_path = data_dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|error| format!("opening {}: {error}", log_path.display()))?;
    let user = run_as(server);
    if let Some(user) = &user {
        pitr::chown(user, &log_path)
            .await
            .map_err(|error| error.to_string())?;
    }
    let mut command = pitr::tool_command(config, user.as_deref(), "postgres", data_dir).await?;
    command.arg("-D").arg(data_dir);
    for setting in settings(standby, name, server, target) {
        command.arg("-c").arg(setting);
    }
    command
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .process_group(0)
        .kill_on_drop(false);
    let mut child = command.spawn().map_err(|error| {
        format!(
            "cannot start {}: {error}",
            pitr::tool(config, "postgres").display()
        )
    })?;
    // Up when it writes its lock file; an exit before then is a failed start.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the standby server of {name} exited ({status}) while starting; {}",
                log_tail(server)
            ));
        }
        if std::fs::read_to_string(data_dir.join("postmaster.pid"))
            .is_ok_and(|pid| pid.lines().count() >= 8)
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the standby server of {name} did not start within 60 s; {}",
                log_tail(server)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not waited for: the server outlives this process (see the module header);
    // tokio reaps it should it exit while we run.
    drop(child);
    Ok(())
}

/// The command-line settings of the standby server.
fn settings(
    standby: &Standby,
    name: &str,
    server: &StandbyPostgres,
    target: Option<&str>,
) -> Vec<String> {
    let quote = |text: &str| format!("'{}'", text.replace('\'', "'\\''").replace('%', "%%"));
    let restore_command = format!(
        "{} wal-fetch --config {} --database {} %f \"%p\"",
        quote(&standby.executable.display().to_string()),
        quote(&standby.runbook_path.display().to_string()),
        quote(name)
    );
    let mut settings = vec![
        format!("port={}", server.port),
        format!("listen_addresses={}", server.listen_addresses),
        format!("unix_socket_directories={}", server.data_dir.display()),
        "archive_mode=off".to_owned(),
        "hot_standby=on".to_owned(),
        "primary_conninfo=".to_owned(),
        "primary_slot_name=".to_owned(),
        "external_pid_file=".to_owned(),
        "recovery_end_command=".to_owned(),
        "archive_cleanup_command=".to_owned(),
        "recovery_min_apply_delay=0".to_owned(),
        "log_destination=stderr".to_owned(),
        "logging_collector=off".to_owned(),
        "lc_messages=C".to_owned(),
        "cluster_name=stillpoint-standby".to_owned(),
        format!("restore_command={restore_command}"),
        "recovery_target_action=pause".to_owned(),
        "recovery_target=".to_owned(),
        "recovery_target_lsn=".to_owned(),
        "recovery_target_time=".to_owned(),
        "recovery_target_xid=".to_owned(),
    ];
    settings.push(format!("recovery_target_name={}", target.unwrap_or("")));
    settings
}

/// Stops the server, if one runs on the data directory (`pg_ctl stop`, fast).
pub(crate) async fn stop(config: &PostgresConfig, server: &StandbyPostgres) -> Result<(), String> {
    if !server.data_dir.join("postmaster.pid").exists() {
        return Ok(());
    }
    let user = run_as(server);
    let mut command =
        pitr::tool_command(config, user.as_deref(), "pg_ctl", &server.data_dir).await?;
    let output = command
        .arg("stop")
        .arg("-D")
        .arg(&server.data_dir)
        .args(["-m", "fast", "-w", "-t", "120"])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| format!("running pg_ctl stop: {error}"))?;
    if output.status.success() || !server.data_dir.join("postmaster.pid").exists() {
        return Ok(());
    }
    Err(format!(
        "pg_ctl stop on {} failed: {}",
        server.data_dir.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Waits until the server is paused at the restore point `needed` names: paused,
/// having replayed the restore point's record (its LSN, from the point's marker).
async fn wait_at(
    standby: &Standby,
    config: &PostgresConfig,
    server: &StandbyPostgres,
    point: &PointManifest,
    needed: &Needed,
) -> Result<(), String> {
    let target: Option<Lsn> = point
        .database(&needed.database)
        .and_then(|db| db.marker.details.get("restore_point_lsn"))
        .and_then(|lsn| lsn.parse().ok())
        .or_else(|| needed.target.lsn());
    let deadline = Instant::now() + standby.timeout;
    let mut last;
    loop {
        if !server.data_dir.join("postmaster.pid").exists() {
            return Err(format!("the standby server stopped; {}", log_tail(server)));
        }
        match connect(config, server).await {
            Ok(client) => match replay_state(&client).await {
                Ok((true, pause, lsn)) => {
                    if pause == "paused" && lsn.zip(target).is_some_and(|(at, to)| at >= to) {
                        return Ok(());
                    }
                    last = format!(
                        "replayed to {}, {pause}",
                        lsn.map_or("-".to_owned(), |lsn| lsn.to_string())
                    );
                }
                Ok((false, _, _)) => {
                    return Err("the server is not in recovery: it was promoted".to_owned());
                }
                Err(error) => last = error,
            },
            Err(error) => last = error,
        }
        if Instant::now() > deadline {
            return Err(format!(
                "it did not stop at restore point {} within {:?} ({last}); {}",
                needed.restore_point.as_deref().unwrap_or("-"),
                standby.timeout,
                log_tail(server)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether it is in recovery, its pause state, the last WAL replayed.
async fn replay_state(
    client: &tokio_postgres::Client,
) -> Result<(bool, String, Option<Lsn>), String> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END, \
             pg_last_wal_replay_lsn()::text",
            &[],
        )
        .await
        .map_err(|error| error.to_string())?;
    let lsn: Option<String> = row.get(2);
    Ok((row.get(0), row.get(1), lsn.and_then(|lsn| lsn.parse().ok())))
}

/// A connection through the server's socket in its data directory, as the
/// runbook URL's user, to its database.
async fn connect(config: &PostgresConfig, server: &StandbyPostgres) -> Result<Connection, String> {
    let source = ConnString::parse(&config.url)?;
    let mut probe = tokio_postgres::Config::new();
    probe
        .host_path(&server.data_dir)
        .port(server.port)
        .application_name("stillpoint-standby")
        .connect_timeout(Duration::from_secs(10));
    if let Some(user) = source.user() {
        probe.user(user);
    }
    if let Some(dbname) = source.dbname() {
        probe.dbname(dbname);
    }
    let (client, connection) = probe
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|error| error.to_string())?;
    Ok(Connection {
        client,
        _driver: tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection)),
    })
}

/// A client and the task that drives its connection, which ends with it (no task
/// outlives the connection's user).
struct Connection {
    client: tokio_postgres::Client,
    _driver: tokio_util::task::AbortOnDropHandle<Result<(), tokio_postgres::Error>>,
}

impl std::ops::Deref for Connection {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

/// The replay position of the running server, when it answers.
pub(crate) async fn replayed(config: &PostgresConfig, server: &StandbyPostgres) -> Option<Lsn> {
    let client = connect(config, server).await.ok()?;
    replay_state(&client).await.ok()?.2
}

/// The server log's last lines, and where it is.
fn log_tail(server: &StandbyPostgres) -> String {
    let path = server.data_dir.join(LOG_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" / ");
    format!("its log {} ends: {tail}", path.display())
}
