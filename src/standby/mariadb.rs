//! A MariaDB standby database: the point's dump base loaded into the runbook's
//! database (a new, empty one on the standby's server), then the archived binlog
//! applied from the applied position to each newer point's marker
//! (`archive::mariadb::fetch_range` + `apply`: every chunk read and checked before
//! anything is applied). The applied position is the state file's. Promotion is
//! nothing but no further apply: the database is a plain database on a running
//! server all along.
//!
//! A `mariadb-backup` base (the default `base_method`) is a whole server's files, not
//! a database: a standby of it would need a server of its own on that data
//! directory. It is refused, naming `base_method = "dump"`.

use super::{DatabaseState, Moved, Standby, StandbyError};
use crate::adapters::MariadbConfig;
use crate::archive::mariadb::{self as binlog_archive, ReplayTarget};
use crate::archive::{Archive, Position, base, mariadb_backup};
use crate::points::PointManifest;
use crate::points::restore::{self as point_restore, Checked, Needed};

fn fail(name: &str, message: String) -> StandbyError {
    StandbyError::Database {
        database: name.to_owned(),
        message,
    }
}

fn archive(standby: &Standby, name: &str) -> Result<Archive, StandbyError> {
    Archive::new(standby.storage.clone(), standby.settings.clone(), name)
        .map_err(|error| StandbyError::Setup(error.to_string()))
}

fn target(standby: &Standby, config: &MariadbConfig, source_database: String) -> ReplayTarget {
    ReplayTarget {
        url: config.url.clone(),
        source_database,
        bin_dir: config.bin_dir.clone(),
        work_dir: standby.config.dir.clone(),
    }
}

/// Loads the point's base into the database and applies the binlog to its marker.
pub(crate) async fn seed(
    standby: &Standby,
    name: &str,
    config: &MariadbConfig,
    point: &PointManifest,
    needed: &Needed,
) -> Result<(), Moved> {
    let untouched = |message: String| Moved::Untouched(fail(name, message));
    if needed.base.kind == mariadb_backup::KIND {
        return Err(untouched(format!(
            "base backup {} of point {} is a mariadb-backup copy of the whole server: a \
             standby loads a dump into its database; set base_method = \"dump\" on {name} in \
             the primary's runbook and take a base backup (`stillpoint base-backup`), then \
             wait for a point after it",
            needed.base.id, point.point_id
        )));
    }
    point_restore::check(&standby.storage, point, needed, &mut Checked::new())
        .await
        .map_err(|error| untouched(error.to_string()))?;
    let archive = archive(standby, name).map_err(Moved::Untouched)?;
    let target = target(
        standby,
        config,
        point_restore::source_database(needed, name),
    );
    binlog_archive::restore_point(
        &archive,
        &standby.decryption,
        &needed.base,
        &needed.target,
        &target,
    )
    .await
    .map_err(|error| {
        untouched(format!(
            "loading base backup {} and the binlog to point {}: {error}; its database may \
             hold part of it: drop and create it empty before the next round",
            needed.base.id, point.point_id
        ))
    })?;
    Ok(())
}

/// Applies the archived binlog `[from, to)` to the database. A failure before the
/// apply starts leaves it as it was; one during it, in an unknown state (broken).
/// `mark` runs once the range is fetched and checked, just before anything is
/// applied: it records in the state that an apply is under way, so a follower killed
/// during it is found out by the next one.
pub(crate) async fn apply(
    standby: &Standby,
    name: &str,
    config: &MariadbConfig,
    needed: &Needed,
    from: &Position,
    to: &Position,
    mark: &dyn Fn() -> Result<(), StandbyError>,
) -> Result<(), Moved> {
    let target = target(
        standby,
        config,
        point_restore::source_database(needed, name),
    );
    apply_range(standby, name, &target, from, to, mark).await
}

/// [`apply`] from the database's state up to `to` (the negative control's archive
/// end), the source database read from its base's record.
pub(crate) async fn apply_to(
    standby: &Standby,
    name: &str,
    config: &MariadbConfig,
    current: &DatabaseState,
    to: &Position,
    mark: &dyn Fn() -> Result<(), StandbyError>,
) -> Result<(), Moved> {
    let record = base::read_record(&standby.storage, name, &current.base_id)
        .await
        .map_err(|error| Moved::Untouched(fail(name, error.to_string())))?
        .ok_or_else(|| {
            Moved::Untouched(fail(
                name,
                format!("its base backup {} is gone", current.base_id),
            ))
        })?;
    let source = record
        .details
        .get("database")
        .cloned()
        .unwrap_or_else(|| name.to_owned());
    let target = target(standby, config, source);
    apply_range(standby, name, &target, &current.position, to, mark).await
}

async fn apply_range(
    standby: &Standby,
    name: &str,
    target: &ReplayTarget,
    from: &Position,
    to: &Position,
    mark: &dyn Fn() -> Result<(), StandbyError>,
) -> Result<(), Moved> {
    if from >= to {
        return Ok(());
    }
    let archive = archive(standby, name).map_err(Moved::Untouched)?;
    let fetched =
        binlog_archive::fetch_range(&archive, &standby.decryption, from, to, &target.work_dir)
            .await
            .map_err(|error| Moved::Untouched(fail(name, error.to_string())))?;
    mark().map_err(Moved::Untouched)?;
    fetched.apply(target).await.map_err(|error| {
        Moved::Broken(fail(
            name,
            format!("applying the binlog from {from} to {to} failed part way: {error}"),
        ))
    })?;
    Ok(())
}
