//! A standby cluster that follows the primary's archives point by point, and its
//! promotion with every database stopped at the same point (docs/runbooks/dr.md).
//!
//! A server cannot go back: once it replayed past a point it cannot stop there. So a
//! standby database never replays beyond the newest *listed* point: each round
//! ([`Standby::follow_once`]) moves every database to the newest point in the
//! storage, and no further. PostgreSQL (`postgres.rs`): a data directory made from
//! the point's base backup, a standby server on it whose `restore_command` is
//! `stillpoint wal-fetch`, `recovery_target_name` the point's restore point and
//! `recovery_target_action = pause`; a newer point = a new target and a restart.
//! MariaDB (`mariadb.rs`): the point's dump base loaded into the runbook's database,
//! then the archived binlog applied from the applied position to each new point's
//! marker.
//!
//! - `mod.rs` (here): the state file (`<[standby] dir>/standby.json`, each
//!   database's applied point and position, written atomically under a lock the
//!   follower and `promote` share), rounds, lag, choosing the point of a promotion,
//!   and the negative control's promotion at each archive's own end.
//! - `postgres.rs`: the standby server's data directory, configuration, start, stop,
//!   replay position and promotion.
//! - `mariadb.rs`: the standby database's base and binlog applies.
//!
//! SQLite and exec databases have no standby here: a runbook that names one is
//! refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::adapters::{AdapterConfig, MariadbConfig, PostgresConfig};
use crate::archive::{Archive, Position};
use crate::pipeline::{Decryption, PipelineSettings};
use crate::points::restore::{self as point_restore, PointRestoreError};
use crate::points::{self, PointManifest, PointsError};
use crate::runbook::{Runbook, StandbyConfig, StandbyPostgres};
use crate::storage::{Storage, StorageError};

pub mod mariadb;
pub mod postgres;

/// The state file, in `[standby] dir`.
pub const STATE_FILE: &str = "standby.json";
const LOCK_FILE: &str = "standby.lock";
/// The version of the state file this code writes.
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    /// The runbook, the flags or the state do not fit; nothing was changed.
    #[error("{0}")]
    Setup(String),
    /// A promotion that would not be consistent; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// One database failed; the message says the state of each.
    #[error("standby database {database}: {message}")]
    Database { database: String, message: String },
    #[error(transparent)]
    Points(#[from] PointsError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<PointRestoreError> for StandbyError {
    fn from(error: PointRestoreError) -> Self {
        StandbyError::Setup(error.to_string())
    }
}

/// What `standby.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub format: u32,
    pub databases: BTreeMap<String, DatabaseState>,
    /// Set once `promote` ended: the follower stops, nothing is applied again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<Promoted>,
}

/// One standby database: the newest point it passed, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseState {
    pub adapter: String,
    pub point_id: String,
    pub point_time_ms: Option<i64>,
    /// The position applied: the point's marker (or, after the negative control's
    /// promotion, the archive's end).
    pub position: Position,
    pub base_id: String,
    pub updated_at_ms: i64,
    pub phase: Phase,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase", content = "problem")]
pub enum Phase {
    /// Stopped at `point_id`, following.
    Following,
    /// Promoted: a primary now, nothing is applied to it.
    Promoted,
    /// An apply or a restart failed part way: its position is not known. The
    /// problem says what happened; `[standby] dir` and the database must be made
    /// again (docs/runbooks/dr.md).
    Broken(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Promoted {
    /// The point every database was promoted at; none for the negative control's
    /// promotion at each archive's end (not consistent).
    pub point_id: Option<String>,
    pub point_time_ms: Option<i64>,
    pub at_ms: i64,
    pub consistent: bool,
}

/// A standby of the primary whose storage this runbook names, its databases by the
/// same names.
pub struct Standby {
    runbook: Runbook,
    /// The runbook file, which `restore_command` (`stillpoint wal-fetch`) reads.
    runbook_path: PathBuf,
    config: StandbyConfig,
    storage: Storage,
    settings: PipelineSettings,
    decryption: Decryption,
    /// The stillpoint binary `restore_command` runs.
    executable: PathBuf,
    /// How long a server may take to reach a point.
    pub timeout: Duration,
}

/// One database of the standby, by kind.
pub(crate) enum Member<'a> {
    Postgres {
        name: &'a str,
        config: &'a PostgresConfig,
        server: &'a StandbyPostgres,
    },
    Mariadb {
        name: &'a str,
        config: &'a MariadbConfig,
    },
}

impl Member<'_> {
    fn name(&self) -> &str {
        match self {
            Member::Postgres { name, .. } | Member::Mariadb { name, .. } => name,
        }
    }

    fn adapter(&self) -> &'static str {
        match self {
            Member::Postgres { .. } => "postgres",
            Member::Mariadb { .. } => "mariadb",
        }
    }
}

impl Standby {
    /// The standby the runbook at `runbook_path` describes; its `[standby]` table is
    /// required, and each PostgreSQL database needs its `[standby.postgres.<name>]`.
    pub fn new(
        runbook: Runbook,
        runbook_path: &Path,
        settings: PipelineSettings,
        decryption: Decryption,
    ) -> Result<Standby, StandbyError> {
        let Some(config) = runbook.standby.clone() else {
            return Err(StandbyError::Setup(format!(
                "the runbook {} has no [standby] table: it names where the standby keeps \
                 its state (dir) and, per PostgreSQL database, its data directory and port \
                 ([standby.postgres.<name>]); see docs/runbook.md",
                runbook_path.display()
            )));
        };
        let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)?;
        let runbook_path = std::path::absolute(runbook_path).map_err(|error| {
            StandbyError::Setup(format!("resolving {}: {error}", runbook_path.display()))
        })?;
        let executable = std::env::current_exe().map_err(|error| {
            StandbyError::Setup(format!("finding the stillpoint binary: {error}"))
        })?;
        let standby = Standby {
            runbook,
            runbook_path,
            config,
            storage,
            settings,
            decryption,
            executable,
            timeout: Duration::from_secs(600),
        };
        standby.members()?;
        for name in standby.config.postgres.keys() {
            if !standby
                .runbook
                .databases
                .iter()
                .any(|db| db.name == *name && matches!(db.adapter, AdapterConfig::Postgres(_)))
            {
                return Err(StandbyError::Setup(format!(
                    "[standby.postgres.{name}] names no PostgreSQL database of the runbook"
                )));
            }
        }
        Ok(standby)
    }

    /// The stillpoint binary `restore_command` runs (default: this one).
    pub fn set_executable(&mut self, path: PathBuf) {
        self.executable = path;
    }

    fn members(&self) -> Result<Vec<Member<'_>>, StandbyError> {
        let mut members = Vec::new();
        for db in &self.runbook.databases {
            match &db.adapter {
                AdapterConfig::Postgres(config) => {
                    let server = self.config.postgres.get(&db.name).ok_or_else(|| {
                        StandbyError::Setup(format!(
                            "PostgreSQL database {} has no [standby.postgres.{}] table: it \
                             names the standby server's data_dir and port",
                            db.name, db.name
                        ))
                    })?;
                    members.push(Member::Postgres {
                        name: &db.name,
                        config,
                        server,
                    });
                }
                AdapterConfig::Mariadb(config) => members.push(Member::Mariadb {
                    name: &db.name,
                    config,
                }),
                _ => {
                    return Err(StandbyError::Setup(format!(
                        "database {} is neither PostgreSQL nor MariaDB: a standby follows \
                         those only (SQLite and exec databases have none); remove it from \
                         the standby's runbook",
                        db.name
                    )));
                }
            }
        }
        if members.is_empty() {
            return Err(StandbyError::Setup(
                "the runbook names no database to keep a standby of".to_owned(),
            ));
        }
        Ok(members)
    }

    pub fn state_path(&self) -> PathBuf {
        self.config.dir.join(STATE_FILE)
    }

    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    /// The state file, or an empty state before the first round.
    pub fn read_state(&self) -> Result<State, StandbyError> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes).map_err(|error| {
                    StandbyError::Setup(format!("{} cannot be read: {error}", path.display()))
                })?;
                if state.format != FORMAT {
                    return Err(StandbyError::Setup(format!(
                        "{} is format {}, this stillpoint reads format {FORMAT}",
                        path.display(),
                        state.format
                    )));
                }
                Ok(state)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(State {
                format: FORMAT,
                ..State::default()
            }),
            Err(error) => Err(StandbyError::Setup(format!(
                "reading {}: {error}",
                path.display()
            ))),
        }
    }

    /// Writes the state beside the file, then renames it over: a crash leaves the old
    /// state or the new, never half of one.
    fn write_state(&self, state: &State) -> Result<(), StandbyError> {
        let path = self.state_path();
        let beside = path.with_extension("json.new");
        let json = serde_json::to_vec_pretty(state).expect("the state serializes");
        std::fs::write(&beside, json)
            .and_then(|()| std::fs::File::open(&beside)?.sync_all())
            .and_then(|()| std::fs::rename(&beside, &path))
            .map_err(|error| StandbyError::Setup(format!("writing {}: {error}", path.display())))
    }

    /// The standby's lock: one round or one promotion at a time. Waits for it.
    async fn lock(&self) -> Result<std::fs::File, StandbyError> {
        std::fs::create_dir_all(&self.config.dir).map_err(|error| {
            StandbyError::Setup(format!(
                "creating [standby] dir {}: {error}",
                self.config.dir.display()
            ))
        })?;
        let path = self.config.dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| StandbyError::Setup(format!("opening {}: {error}", path.display())))?;
        tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .map_err(|error| StandbyError::Setup(error.to_string()))?
            .map_err(|error| StandbyError::Setup(format!("locking {}: {error}", path.display())))
    }

    /// One round of following: every database moved to the newest listed point (the
    /// first round seeds each from the point's base backup). Returns the state after
    /// it; a promoted standby is left alone.
    pub async fn follow_once(&self) -> Result<State, StandbyError> {
        let _lock = self.lock().await?;
        let mut state = self.read_state()?;
        if state.promoted.is_some() {
            return Ok(state);
        }
        // A promotion that failed part way leaves some databases promoted (primaries
        // now) and the standby not marked promoted: moving any of them on to a newer
        // point would take the promoted ones past the point the others stop at.
        if let Some((name, _)) = state
            .databases
            .iter()
            .find(|(_, database)| database.phase == Phase::Promoted)
        {
            return Err(StandbyError::Refused(format!(
                "database {name} was promoted by a promotion that did not finish: nothing \
                 is moved on any more; run `stillpoint standby promote --config {}` again \
                 (it promotes the rest at the same point)",
                self.runbook_path.display()
            )));
        }
        let (points, _bad) = points::list_points(&self.storage).await?;
        let Some(newest) = points.last() else {
            return Ok(state);
        };
        for member in self.members()? {
            let name = member.name().to_owned();
            let current = state.databases.get(&name).cloned();
            if let Some(current) = &current {
                if let Phase::Broken(problem) = &current.phase {
                    return Err(StandbyError::Database {
                        database: name,
                        message: format!(
                            "it is broken ({problem}); make it again: stop its server, \
                             remove its data (data_dir or the database's tables) and its \
                             entry in {}",
                            self.state_path().display()
                        ),
                    });
                }
                if !is_newer(newest, current) {
                    continue;
                }
            }
            let moved = self
                .move_to(&member, current.as_ref(), newest, &state)
                .await;
            match moved {
                Ok(database) => {
                    state.databases.insert(name, database);
                    self.write_state(&state)?;
                }
                Err(Moved::Untouched(error)) => return Err(error),
                Err(Moved::Broken(error)) => {
                    if let Some(current) = current {
                        state.databases.insert(
                            name,
                            DatabaseState {
                                phase: Phase::Broken(error.to_string()),
                                updated_at_ms: now_ms(),
                                ..current
                            },
                        );
                        self.write_state(&state)?;
                    }
                    return Err(error);
                }
            }
        }
        Ok(state)
    }

    /// Moves one database to `point`: seeds it when it has no state, advances it
    /// otherwise.
    ///
    /// `state` is the state before the move: a MariaDB apply writes it with this
    /// database marked unfinished just before it starts (see [`unfinished_apply`]).
    async fn move_to(
        &self,
        member: &Member<'_>,
        current: Option<&DatabaseState>,
        point: &PointManifest,
        state: &State,
    ) -> Result<DatabaseState, Moved> {
        let name = member.name();
        let needed = point_restore::needs(&self.storage, &self.settings, point, name)
            .await
            .map_err(|error| Moved::Untouched(error.into()))?;
        let position = match (member, current) {
            (Member::Postgres { config, server, .. }, None) => {
                postgres::seed(self, name, config, server, point, &needed).await?;
                needed.target.clone()
            }
            (Member::Postgres { config, server, .. }, Some(_)) => {
                postgres::advance(self, name, config, server, point, &needed).await?;
                needed.target.clone()
            }
            (Member::Mariadb { config, .. }, None) => {
                mariadb::seed(self, name, config, point, &needed).await?;
                needed.target.clone()
            }
            (Member::Mariadb { config, .. }, Some(current)) => {
                let (from, to) = (&current.position, &needed.target);
                let mark = || {
                    let mut marked = state.clone();
                    marked.databases.insert(
                        name.to_owned(),
                        DatabaseState {
                            phase: Phase::Broken(unfinished_apply(from, to, &point.point_id)),
                            updated_at_ms: now_ms(),
                            ..current.clone()
                        },
                    );
                    self.write_state(&marked)
                };
                mariadb::apply(self, name, config, &needed, from, to, &mark).await?;
                needed.target.clone()
            }
        };
        Ok(DatabaseState {
            adapter: member.adapter().to_owned(),
            point_id: point.point_id.clone(),
            point_time_ms: point.time_ms(),
            position,
            base_id: needed.base.id.clone(),
            updated_at_ms: now_ms(),
            phase: Phase::Following,
        })
    }

    /// How far behind each database is, and the newest point all of them passed.
    pub async fn status(&self) -> Result<StatusReport, StandbyError> {
        let state = self.read_state()?;
        let (points, _bad) = points::list_points(&self.storage).await?;
        let now = now_ms();
        let mut databases = Vec::new();
        for member in self.members()? {
            let name = member.name();
            let archive = Archive::new(self.storage.clone(), self.settings.clone(), name)
                .map_err(|error| StandbyError::Setup(error.to_string()))?;
            let catalog = archive
                .catalog()
                .await
                .map_err(|error| StandbyError::Setup(error.to_string()))?;
            let archive_end = catalog.end();
            let entry = state.databases.get(name);
            let lag_bytes = match (entry, &archive_end) {
                (Some(entry), Some(_)) => Some(lag_bytes(&catalog, &entry.position)),
                _ => None,
            };
            let server_replayed = match &member {
                Member::Postgres { config, server, .. } => {
                    postgres::replayed(config, server).await.map(Position::Lsn)
                }
                Member::Mariadb { .. } => None,
            };
            databases.push(DatabaseStatus {
                server_replayed,
                name: name.to_owned(),
                adapter: member.adapter().to_owned(),
                point_id: entry.map(|e| e.point_id.clone()),
                point_time_ms: entry.and_then(|e| e.point_time_ms),
                applied: entry.map(|e| e.position.clone()),
                archive_end,
                lag_bytes,
                lag_ms: entry
                    .and_then(|e| e.point_time_ms)
                    .map(|time| (now - time).max(0)),
                phase: entry.map(|e| e.phase.clone()),
            });
        }
        let common = common_point(&state, &points, databases.len());
        Ok(StatusReport {
            databases,
            common_point: common.map(PointRef::of),
            newest_point: points.last().map(PointRef::of),
            promoted: state.promoted,
            at_ms: now,
        })
    }

    /// Promotes every database at one point: `which` (an id, `latest`, a time) or,
    /// without it, the newest point every database reached. A point older than what
    /// a database already passed is refused (no server can go back). Each database
    /// behind it is moved to it first; then PostgreSQL is promoted and MariaDB's
    /// applying stops. If one fails, the error names the state of every database.
    pub async fn promote(&self, which: Option<&str>) -> Result<PromoteReport, StandbyError> {
        let _lock = self.lock().await?;
        let mut state = self.read_state()?;
        if let Some(promoted) = &state.promoted {
            return Err(StandbyError::Refused(format!(
                "the standby was promoted already (at {}, point {}); a promoted standby is \
                 a primary now",
                crate::time::Zone::UTC.format_ms(promoted.at_ms),
                promoted.point_id.as_deref().unwrap_or("none")
            )));
        }
        let members = self.members()?;
        for member in &members {
            if !state.databases.contains_key(member.name()) {
                return Err(StandbyError::Refused(format!(
                    "database {} has not been seeded yet (no point applied): run `stillpoint \
                     standby --config {}` until every database has passed a point",
                    member.name(),
                    self.runbook_path.display()
                )));
            }
        }
        let (points, _bad) = points::list_points(&self.storage).await?;
        let point = match which {
            Some(which) => points::resolve(&points, which)?.clone(),
            None => common_point(&state, &points, members.len())
                .cloned()
                .ok_or_else(|| {
                    StandbyError::Refused(
                        "no listed point is one every standby database reached (was a point \
                         pruned?); give --point"
                            .to_owned(),
                    )
                })?,
        };
        for (name, database) in &state.databases {
            if let Phase::Broken(problem) = &database.phase {
                return Err(StandbyError::Refused(format!(
                    "database {name} is broken ({problem}): it cannot be promoted at a known \
                     point; nothing was promoted"
                )));
            }
            if database.point_time_ms > point.time_ms() && database.point_id != point.point_id {
                return Err(StandbyError::Refused(format!(
                    "point {} is older than point {} which database {name} already replayed \
                     past: a server cannot go back; promote at {} or newer (nothing was \
                     promoted)",
                    point.point_id, database.point_id, database.point_id
                )));
            }
        }
        // Every database to the point first: nothing is promoted until all are there.
        for member in &members {
            let current = state.databases.get(member.name()).cloned();
            if current
                .as_ref()
                .is_some_and(|current| current.point_id == point.point_id)
            {
                continue;
            }
            match self.move_to(member, current.as_ref(), &point, &state).await {
                Ok(database) => {
                    state.databases.insert(member.name().to_owned(), database);
                    self.write_state(&state)?;
                }
                Err(moved) => {
                    let error = match moved {
                        Moved::Untouched(error) => error,
                        Moved::Broken(error) => {
                            // Replaces the mark of an apply under way with what failed.
                            if let Some(current) = current {
                                state.databases.insert(
                                    member.name().to_owned(),
                                    DatabaseState {
                                        phase: Phase::Broken(error.to_string()),
                                        updated_at_ms: now_ms(),
                                        ..current
                                    },
                                );
                                self.write_state(&state)?;
                            }
                            error
                        }
                    };
                    return Err(StandbyError::Database {
                        database: member.name().to_owned(),
                        message: format!(
                            "moving it to point {}: {error}; nothing was promoted ({}); fix \
                             the cause and run promote again",
                            point.point_id,
                            describe(&state)
                        ),
                    });
                }
            }
        }
        let promoted_at = self.promote_members(&members, &mut state).await?;
        let promoted = Promoted {
            point_id: Some(point.point_id.clone()),
            point_time_ms: point.time_ms(),
            at_ms: promoted_at,
            consistent: true,
        };
        state.promoted = Some(promoted.clone());
        self.write_state(&state)?;
        Ok(PromoteReport {
            point: Some(PointRef::of(&point)),
            promoted,
            databases: state.databases.clone(),
        })
    }

    /// Promotes each member where it now is; on a failure, names the state of each.
    async fn promote_members(
        &self,
        members: &[Member<'_>],
        state: &mut State,
    ) -> Result<i64, StandbyError> {
        for member in members {
            let name = member.name().to_owned();
            let result = match member {
                Member::Postgres { config, server, .. } => {
                    postgres::promote(self, &name, config, server).await
                }
                // Nothing applies to it any more once the state says promoted.
                Member::Mariadb { .. } => Ok(()),
            };
            match result {
                Ok(()) => {
                    if let Some(database) = state.databases.get_mut(&name) {
                        database.phase = Phase::Promoted;
                        database.updated_at_ms = now_ms();
                    }
                    self.write_state(state)?;
                }
                Err(message) => {
                    return Err(StandbyError::Database {
                        database: name.clone(),
                        message: format!(
                            "promoting it failed: {message}. State of each database: {}. \
                             The databases are all at the same point: promote {name} by \
                             hand (`SELECT pg_promote()` on its server) or run promote again",
                            describe(state)
                        ),
                    });
                }
            }
        }
        Ok(now_ms())
    }

    /// **Not consistent; for the negative control only.** Promotes each database at
    /// its own archive's newest position (PostgreSQL: replay without a target up to
    /// the archive's end, then promote; MariaDB: the binlog applied to the archive's
    /// end): what a standby without a common point would do, and what `ledger-node
    /// check` finds inconsistent.
    pub async fn promote_unsafe_each_at_archive_end(&self) -> Result<State, StandbyError> {
        let _lock = self.lock().await?;
        let mut state = self.read_state()?;
        let members = self.members()?;
        for member in &members {
            let name = member.name().to_owned();
            let Some(current) = state.databases.get(&name).cloned() else {
                return Err(StandbyError::Refused(format!(
                    "database {name} has not been seeded yet"
                )));
            };
            let archive = Archive::new(self.storage.clone(), self.settings.clone(), &name)
                .map_err(|error| StandbyError::Setup(error.to_string()))?;
            let end = archive
                .catalog()
                .await
                .map_err(|error| StandbyError::Setup(error.to_string()))?
                .end()
                .unwrap_or_else(|| current.position.clone());
            let position = match member {
                Member::Postgres { config, server, .. } => {
                    postgres::promote_at_archive_end(self, &name, config, server)
                        .await
                        .map_err(|message| StandbyError::Database {
                            database: name.clone(),
                            message,
                        })?
                }
                Member::Mariadb { config, .. } => {
                    mariadb::apply_to(self, &name, config, &current, &end, &|| Ok(()))
                        .await
                        .map_err(|error| match error {
                            Moved::Untouched(error) | Moved::Broken(error) => error,
                        })?;
                    end
                }
            };
            state.databases.insert(
                name,
                DatabaseState {
                    position,
                    phase: Phase::Promoted,
                    updated_at_ms: now_ms(),
                    ..current
                },
            );
            self.write_state(&state)?;
        }
        state.promoted = Some(Promoted {
            point_id: None,
            point_time_ms: None,
            at_ms: now_ms(),
            consistent: false,
        });
        self.write_state(&state)?;
        Ok(state)
    }
}

/// The phase a MariaDB database is written with just before the binlog from `from`
/// to `to` is applied to it, replaced once the apply ends. A follower killed part way
/// (SIGKILL, a second signal, the machine down) leaves it: the database then holds an
/// unknown part of the range (each transaction whole or not at all), and applying the
/// range again would repeat what it holds, so the next round refuses instead of
/// guessing.
fn unfinished_apply(from: &Position, to: &Position, point_id: &str) -> String {
    format!(
        "an apply of the binlog from {from} to {to} (to point {point_id}) started at {} and \
         did not finish: the follower was stopped part way (killed, or its machine went \
         down), so the database holds an unknown part of that range",
        crate::time::Zone::UTC.format_ms(now_ms())
    )
}

/// Now, Unix ms.
fn now_ms() -> i64 {
    crate::time::unix_ms(std::time::SystemTime::now())
}

/// A failed move: whether the database was left as it was or in an unknown state.
pub(crate) enum Moved {
    Untouched(StandbyError),
    Broken(StandbyError),
}

/// Whether `point` is newer than the one `current` passed.
fn is_newer(point: &PointManifest, current: &DatabaseState) -> bool {
    point.point_id != current.point_id && point.time_ms() > current.point_time_ms
}

/// The newest listed point every one of `count` databases passed: the oldest of their
/// points (each database stops exactly at its point), if it is still listed.
fn common_point<'a>(
    state: &State,
    points: &'a [PointManifest],
    count: usize,
) -> Option<&'a PointManifest> {
    if state.databases.len() < count {
        return None;
    }
    let oldest = state
        .databases
        .values()
        .min_by_key(|database| database.point_time_ms)?;
    points
        .iter()
        .find(|point| point.point_id == oldest.point_id)
}

/// Bytes of the archive after `applied`: what the database has yet to replay.
fn lag_bytes(catalog: &crate::archive::Catalog, applied: &Position) -> u64 {
    catalog
        .chunks
        .iter()
        .filter_map(|chunk| chunk.range().map(|range| (chunk, range)))
        .map(|(chunk, (start, end))| {
            if end <= applied {
                0
            } else if start >= applied {
                match (start.lsn(), end.lsn()) {
                    (Some(start), Some(end)) => end.0 - start.0,
                    _ => chunk.size,
                }
            } else {
                match (
                    applied.lsn(),
                    end.lsn(),
                    applied.as_binlog(),
                    end.as_binlog(),
                ) {
                    (Some(applied), Some(end), _, _) => end.0 - applied.0,
                    (_, _, Some((_, at)), Some((_, to))) if to > at => to - at,
                    _ => chunk.size,
                }
            }
        })
        .sum()
}

/// Each database's phase and point, for messages.
fn describe(state: &State) -> String {
    state
        .databases
        .iter()
        .map(|(name, database)| {
            let phase = match &database.phase {
                Phase::Following => "not promoted, stopped at",
                Phase::Promoted => "promoted at",
                Phase::Broken(_) => "broken after",
            };
            format!("{name}: {phase} point {}", database.point_id)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A point, as reports name it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PointRef {
    pub point_id: String,
    pub time_ms: Option<i64>,
    pub date_time: Option<String>,
}

impl PointRef {
    fn of(point: &PointManifest) -> PointRef {
        PointRef {
            point_id: point.point_id.clone(),
            time_ms: point.time_ms(),
            date_time: point.window.restore_point_date_time.clone(),
        }
    }
}

/// `stillpoint standby status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    pub databases: Vec<DatabaseStatus>,
    /// The newest point every standby database has passed: what `promote` picks.
    pub common_point: Option<PointRef>,
    /// The newest point in the storage.
    pub newest_point: Option<PointRef>,
    pub promoted: Option<Promoted>,
    pub at_ms: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DatabaseStatus {
    pub name: String,
    pub adapter: String,
    pub point_id: Option<String>,
    pub point_time_ms: Option<i64>,
    pub applied: Option<Position>,
    /// PostgreSQL: where its running server has replayed to (`null` when it does not
    /// answer).
    pub server_replayed: Option<Position>,
    pub archive_end: Option<Position>,
    /// Archive bytes after the applied position.
    pub lag_bytes: Option<u64>,
    /// Time since the newest point it passed.
    pub lag_ms: Option<i64>,
    pub phase: Option<Phase>,
}

/// `stillpoint standby promote`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromoteReport {
    pub point: Option<PointRef>,
    pub promoted: Promoted,
    pub databases: BTreeMap<String, DatabaseState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(point: &str, time: i64) -> DatabaseState {
        DatabaseState {
            adapter: "postgres".to_owned(),
            point_id: point.to_owned(),
            point_time_ms: Some(time),
            position: Position::Lsn(crate::archive::Lsn(time as u64)),
            base_id: "b".to_owned(),
            updated_at_ms: 0,
            phase: Phase::Following,
        }
    }

    fn point(id: &str, time: i64) -> PointManifest {
        let mut window =
            crate::coordinator::PauseReport::unpaused(time, time, crate::time::Zone::UTC);
        window.restore_point_timestamp_ms = Some(time);
        PointManifest {
            format: points::FORMAT,
            point_id: id.to_owned(),
            cluster: "c".to_owned(),
            window,
            exact: true,
            databases: Vec::new(),
            timings: Default::default(),
            committed_at_ms: time,
        }
    }

    /// The common point is the oldest any database stopped at; until every database
    /// has one, there is none. Control: a database further ahead does not move it.
    /// A promotion that failed part way (one database promoted, the standby not
    /// marked promoted) is not followed: the follower would move the promoted
    /// database past the point. Control: the same state, following, is followed.
    #[tokio::test]
    async fn a_standby_promoted_part_way_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("standby.toml");
        std::fs::write(
            &path,
            format!(
                "cluster = \"dr\"\n[pause]\ntiers = [ {{ addresses = [\"127.0.0.1:1\"] }} ]\n\
                 [[databases]]\nname = \"auditor\"\nadapter = \"mariadb\"\n\
                 url = \"mysql://root@127.0.0.1:1/auditor\"\n\
                 [storage]\nurl = \"file://{0}/storage\"\n[standby]\ndir = \"{0}/state\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("storage")).unwrap();
        let standby = Standby::new(
            Runbook::load(&path).unwrap(),
            &path,
            PipelineSettings::default(),
            Decryption::None,
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let mut state = State {
            format: FORMAT,
            ..State::default()
        };
        state.databases.insert(
            "auditor".to_owned(),
            DatabaseState {
                phase: Phase::Promoted,
                ..database("p1", 1_000)
            },
        );
        standby.write_state(&state).unwrap();
        match standby.follow_once().await {
            Err(StandbyError::Refused(message)) => {
                assert!(message.contains("auditor"), "{message}");
                assert!(message.contains("standby promote"), "{message}");
            }
            other => panic!("a standby promoted part way was followed: {other:?}"),
        }
        state.databases.get_mut("auditor").unwrap().phase = Phase::Following;
        standby.write_state(&state).unwrap();
        standby.follow_once().await.unwrap();
    }

    #[test]
    fn the_common_point_is_the_oldest_any_database_passed() {
        let points = vec![point("a", 1), point("b", 2), point("c", 3)];
        let mut state = State::default();
        state.databases.insert("ledger".into(), database("c", 3));
        assert!(common_point(&state, &points, 2).is_none());
        state.databases.insert("auditor".into(), database("b", 2));
        assert_eq!(common_point(&state, &points, 2).unwrap().point_id, "b");
        state.databases.insert("auditor".into(), database("c", 3));
        assert_eq!(common_point(&state, &points, 2).unwrap().point_id, "c");
    }

    #[test]
    fn lag_counts_the_archive_after_the_applied_position() {
        use crate::archive::Lsn;
        let mut catalog = crate::archive::Catalog {
            database: "ledger".into(),
            chunks: Vec::new(),
            superseded: Vec::new(),
            others: Vec::new(),
            unreadable: Vec::new(),
        };
        let chunk = crate::archive::ChunkRecord {
            format: 1,
            database: "ledger".into(),
            name: "x".into(),
            kind: crate::archive::ChunkKind::PgWalSegment,
            timeline: Some(1),
            start: Some(Position::Lsn(Lsn(0))),
            end: Some(Position::Lsn(Lsn(100))),
            segment_size: None,
            size: 100,
            plaintext_blake3: String::new(),
            artifact: crate::pipeline::ArtifactInfo {
                path: "p".into(),
                size: 100,
                stored_size: 1,
                blake3: String::new(),
                compression: None,
                encryption: None,
            },
            archived_at_ms: 0,
            details: Default::default(),
        };
        catalog.chunks.push(chunk);
        assert_eq!(lag_bytes(&catalog, &Position::Lsn(Lsn(40))), 60);
        assert_eq!(lag_bytes(&catalog, &Position::Lsn(Lsn(100))), 0);
    }
}
