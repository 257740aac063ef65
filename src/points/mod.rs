//! Points: restore points without copies (../shared/PRODUCT.md, "Points"). A *base
//! backup* of each database in the storage, its log archived continuously
//! ([`crate::archive`]), and a *point*: a pause that marks every database. A point is
//! restorable when every database has a base backup from before its marker and an
//! archive without gaps from that base to the marker; only then is it written.
//!
//! Storage layout (`docs/runbooks/points.md`):
//!
//! ```text
//! bases/<database>/<base id>/<artifact>        the base backup, pipelined
//! bases/<database>/<base id>/base.json          its record, written last
//! points/<point id>/point.json                  a restorable point, written last
//! ```
//!
//! A base backup exists if and only if its record exists (one record type for every
//! adapter: [`crate::archive::base`]); a point if and only if its manifest exists, and
//! it is written only once the point is restorable.
//!
//! - `mod.rs` (here): the point manifest, its layout, reading it back, resolving
//!   `--point ID|latest|TIME`.
//! - `base.rs`: `stillpoint base-backup` into the storage (PostgreSQL here, MariaDB
//!   through [`crate::archive::mariadb::base_backup`]).
//! - `take.rs`: `stillpoint point`: prepare → pause → markers → unpause → wait for the
//!   archives → commit.
//! - `restore.rs`: what a point needs (checked before anything is written), and a
//!   database of a point restored from its base and archive; drills of a point.
//! - `verify.rs`: `stillpoint verify` of a point: what it needs, re-read (the checks
//!   a restore runs first).
//! - `prune.rs`: `stillpoint prune` of points, then of the bases and chunks no kept
//!   point needs.
//!
//! How a kind of database takes part is one match on its adapter
//! ([`take::Member`], [`restore`]): PostgreSQL is complete; MariaDB records its marker
//! but is refused until the binlog archive lands; exec contributes its cut command's
//! marker and restores by time (so it keeps the clock-skew floor).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{LazyLock, Mutex};

use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::adapters::CutMarker;
use crate::archive::{ArchiveError, Position};
use crate::coordinator::PauseReport;
use crate::storage::{ObjectEntry, Storage, StorageError};

pub mod base;
pub mod clone;
pub mod prune;
pub mod restore;
pub mod take;
pub mod verify;

/// The top directory of every point in a storage.
pub const POINTS_DIR: &str = "points";
pub const POINT_MANIFEST: &str = "point.json";
/// The version of the point manifest format this code writes.
pub const FORMAT: u32 = 1;
/// Records read at once.
const READS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PointsError {
    /// Wrong runbook, flags or environment; nothing was paused or written.
    #[error("{0}")]
    Setup(String),
    /// A record that cannot be read.
    #[error("{path} cannot be read: {problem}")]
    BadRecord { path: String, problem: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    // Boxed: an archive error is large, and this is every points call's result.
    #[error(transparent)]
    Archive(Box<ArchiveError>),
}

impl From<ArchiveError> for PointsError {
    fn from(error: ArchiveError) -> Self {
        PointsError::Archive(Box::new(error))
    }
}

/// The manifest that makes a point exist: `points/<id>/point.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointManifest {
    pub format: u32,
    pub point_id: String,
    pub cluster: String,
    /// The pause window that proved the point.
    pub window: PauseReport,
    /// Every database has an exact marker (a restore point, a log position), so the
    /// window was not held open to the clock-skew floor: its mid-time is not what
    /// restores.
    pub exact: bool,
    pub databases: Vec<PointDatabase>,
    pub timings: PointTimings,
    pub committed_at_ms: i64,
}

/// One database of a point.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointDatabase {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub adapter: String,
    /// What the pause fixed: for PostgreSQL `restore_point` (its name), `lsn` (the
    /// insert position after it) and `restore_point_lsn`.
    pub marker: CutMarker,
    /// How far the archive must reach for the point to restore (exact markers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Position>,
    /// The base backup it restores from (none for a database restored by time, exec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
    /// Rows per table in the marker's snapshot (`point --count-rows`): what a restore
    /// of the point must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_counts: Option<BTreeMap<String, u64>>,
}

impl PointDatabase {
    /// Where a PostgreSQL point's change range starts or ends (none for other
    /// adapters): where its restore point record ends (a transaction is after the point exactly when its commit
    /// record ends after that), else the insert position read after it.
    pub fn change_marker(&self) -> Option<Position> {
        if self.adapter != "postgres" {
            return None;
        }
        self.marker
            .details
            .get("restore_point_lsn")
            .and_then(|lsn| lsn.parse().ok())
            .map(Position::Lsn)
            .or_else(|| self.target.clone())
    }
}

/// A point's reference to the base backup a database restores from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseRef {
    pub id: String,
    pub start: Position,
    pub end: Position,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointTimings {
    pub prepare_ms: u64,
    /// From asking the first node to pause to every node released.
    pub pause_ms: u64,
    /// The markers, inside the pause.
    pub marker_ms: u64,
    /// Waiting for every archive to reach its marker.
    pub wait_ms: u64,
    /// From asking the first node to pause to the manifest written.
    pub pause_to_commit_ms: u64,
}

impl PointManifest {
    /// The point's time: the window's mid-time.
    pub fn time_ms(&self) -> Option<i64> {
        self.window.restore_point_timestamp_ms
    }

    pub fn database(&self, name: &str) -> Option<&PointDatabase> {
        self.databases.iter().find(|database| database.name == name)
    }
}

pub fn point_path(id: &str) -> String {
    format!("{POINTS_DIR}/{id}/{POINT_MANIFEST}")
}

/// A new id, `20261122T010203Z-a1b2c3`: sorts by time, like backup ids.
pub fn new_id() -> String {
    crate::manifest::new_backup_id()
}

/// Every point whose manifest exists, oldest (mid-time) first, and manifests that cannot be
/// read (path, problem).
pub async fn list_points(
    storage: &Storage,
) -> Result<(Vec<PointManifest>, Vec<(String, String)>), PointsError> {
    let (mut found, bad) = read_all(storage, POINTS_DIR, POINT_MANIFEST).await?;
    // By mid-time: ids carry only the second (then a random suffix), so two points of
    // one second would otherwise sort by chance, and `latest` be the older.
    found.sort_by(|a, b| (a.time_ms(), &a.point_id).cmp(&(b.time_ms(), &b.point_id)));
    Ok((found, bad))
}

pub async fn read_point(storage: &Storage, id: &str) -> Result<PointManifest, PointsError> {
    let path = point_path(id);
    let bytes = storage.get_bytes(&path).await?;
    parse_point(&path, &bytes)
}

/// A point manifest read from `bytes` (stored at `path`, which errors name), with the
/// checks [`read_point`] applies. Public for the `point_manifest` fuzz target.
pub fn parse_point(path: &str, bytes: &[u8]) -> Result<PointManifest, PointsError> {
    parse(path, bytes)
}

trait Formatted {
    fn format(&self) -> u32;
}

impl Formatted for PointManifest {
    fn format(&self) -> u32 {
        self.format
    }
}

fn parse<T: serde::de::DeserializeOwned + Formatted>(
    path: &str,
    bytes: &[u8],
) -> Result<T, PointsError> {
    let bad = |problem: String| PointsError::BadRecord {
        path: path.to_owned(),
        problem,
    };
    let record: T = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if record.format() != FORMAT {
        return Err(bad(format!(
            "it is format {}, this stillpoint reads format {FORMAT}; use a newer stillpoint",
            record.format()
        )));
    }
    Ok(record)
}

/// Point manifests this process has read, by storage and path, with the size and
/// time they were listed with. A manifest is written once and never changed, so a
/// listing that shows it as it was needs no GET: `stillpoint serve`, a standby
/// follower and the status page list the points again and again, and the points
/// grow by one a minute.
static MANIFESTS_READ: LazyLock<Mutex<HashMap<String, ManifestRead>>> =
    LazyLock::new(Default::default);

struct ManifestRead {
    size: u64,
    last_modified: DateTime<Utc>,
    manifest: PointManifest,
}

/// Every `<prefix>/<id>/<file>` manifest: those listed as already read come from
/// [`MANIFESTS_READ`], the others are fetched (several at once) and remembered.
async fn read_all(
    storage: &Storage,
    prefix: &str,
    file: &str,
) -> Result<(Vec<PointManifest>, Vec<(String, String)>), PointsError> {
    let suffix = format!("/{file}");
    let listed: Vec<ObjectEntry> = storage
        .list(prefix)
        .await?
        .into_iter()
        .filter(|entry| entry.path.ends_with(&suffix))
        .collect();
    let key = |path: &str| format!("{storage}\n{path}");
    let scope = key(&format!("{prefix}/"));
    let mut found = Vec::new();
    let mut unread = Vec::new();
    {
        let mut read = MANIFESTS_READ.lock().unwrap_or_else(|p| p.into_inner());
        // Manifests no longer listed (pruned points) are forgotten.
        let keys: BTreeSet<String> = listed.iter().map(|entry| key(&entry.path)).collect();
        read.retain(|cached, _| !cached.starts_with(&scope) || keys.contains(cached));
        for entry in listed {
            match read.get(&key(&entry.path)) {
                Some(known)
                    if known.size == entry.size && known.last_modified == entry.last_modified =>
                {
                    found.push(known.manifest.clone());
                }
                _ => unread.push(entry),
            }
        }
    }
    let read: Vec<(ObjectEntry, Result<PointManifest, PointsError>)> =
        futures::stream::iter(unread)
            .map(|entry| async move {
                let result = match storage.get_bytes(&entry.path).await {
                    Ok(bytes) => parse(&entry.path, &bytes),
                    Err(error) => Err(error.into()),
                };
                (entry, result)
            })
            .buffer_unordered(READS)
            .collect()
            .await;
    let mut bad = Vec::new();
    for (entry, result) in read {
        match result {
            Ok(manifest) => {
                MANIFESTS_READ
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        key(&entry.path),
                        ManifestRead {
                            size: entry.size,
                            last_modified: entry.last_modified,
                            manifest: manifest.clone(),
                        },
                    );
                found.push(manifest);
            }
            // Removed between the listing and the read (a prune).
            Err(PointsError::Storage(error)) if error.is_not_found() => {}
            Err(PointsError::Storage(error)) => return Err(error.into()),
            Err(error) => bad.push((entry.path, error.to_string())),
        }
    }
    Ok((found, bad))
}

/// The point `which` names among `points` (oldest first): an id, `latest`, or a time
/// (RFC 3339, e.g. `2026-11-22T01:02:03Z`), which picks the newest point whose
/// mid-time is at or before it: never an instant no pause proved.
pub fn resolve<'a>(
    points: &'a [PointManifest],
    which: &str,
) -> Result<&'a PointManifest, PointsError> {
    let newest = || {
        points
            .iter()
            .rev()
            .take(3)
            .map(|point| point.point_id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if points.is_empty() {
        return Err(PointsError::Setup(
            "the storage holds no restorable point; `stillpoint point` takes one (it needs a \
             base backup and an archive of every database)"
                .to_owned(),
        ));
    }
    if which == "latest" {
        return Ok(points.last().expect("not empty"));
    }
    if let Some(point) = points.iter().find(|point| point.point_id == which) {
        return Ok(point);
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(which) {
        let at_ms = at.with_timezone(&Utc).timestamp_millis();
        return points
            .iter()
            .rev()
            .find(|point| point.time_ms().is_some_and(|ms| ms <= at_ms))
            .ok_or_else(|| {
                PointsError::Setup(format!(
                    "no point at or before {which}; the oldest is {} (`stillpoint list` shows \
                     them)",
                    points[0].point_id
                ))
            });
    }
    Err(PointsError::Setup(format!(
        "no point {which:?} (an id, `latest`, or a time like 2026-11-22T01:02:03Z); the \
         newest: {}",
        newest()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: &str, mid_ms: i64) -> PointManifest {
        let mut window = PauseReport::unpaused(mid_ms, mid_ms, crate::time::Zone::UTC);
        window.restore_point_timestamp_ms = Some(mid_ms);
        PointManifest {
            format: FORMAT,
            point_id: id.to_owned(),
            cluster: "c".to_owned(),
            window,
            exact: true,
            databases: Vec::new(),
            timings: PointTimings::default(),
            committed_at_ms: mid_ms,
        }
    }

    /// A time picks the newest point at or before it, never one after; before the
    /// first point there is nothing to restore.
    #[test]
    fn a_time_resolves_to_the_newest_point_at_or_before_it() {
        let at = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .timestamp_millis()
        };
        let points = vec![
            point("a", at("2026-01-01T00:00:00Z")),
            point("b", at("2026-01-01T00:01:00Z")),
            point("c", at("2026-01-01T00:02:00Z")),
        ];
        assert_eq!(
            resolve(&points, "2026-01-01T00:01:30Z").unwrap().point_id,
            "b"
        );
        assert_eq!(
            resolve(&points, "2026-01-01T00:01:00Z").unwrap().point_id,
            "b"
        );
        assert_eq!(resolve(&points, "latest").unwrap().point_id, "c");
        assert_eq!(resolve(&points, "a").unwrap().point_id, "a");
        assert!(resolve(&points, "2025-12-31T23:59:59Z").is_err());
        assert!(resolve(&points, "nonsense").is_err());
        assert!(resolve(&[], "latest").is_err());
    }

    /// A manifest listed as it was when read is not fetched again; one changed (a new
    /// time) is, and one removed is forgotten.
    #[tokio::test]
    async fn points_listed_again_fetch_only_new_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
        for (index, id) in ["20260101T000001Z-aaaaaa", "20260101T000002Z-bbbbbb"]
            .iter()
            .enumerate()
        {
            let json = serde_json::to_vec(&point(id, 1_767_225_601_000 + index as i64)).unwrap();
            storage
                .put_atomic(&point_path(id), json.into())
                .await
                .unwrap();
        }
        let ids = |found: &[PointManifest]| -> Vec<String> {
            found.iter().map(|point| point.point_id.clone()).collect()
        };
        assert_eq!(list_points(&storage).await.unwrap().0.len(), 2);

        // The first manifest damaged in place, its size and time kept: not read again.
        let first = dir.path().join(point_path("20260101T000001Z-aaaaaa"));
        let modified = std::fs::metadata(&first).unwrap().modified().unwrap();
        let text = std::fs::read_to_string(&first).unwrap();
        std::fs::write(&first, text.replacen('{', "[", 1)).unwrap();
        let file = std::fs::File::options().write(true).open(&first).unwrap();
        file.set_modified(modified).unwrap();
        let (found, bad) = list_points(&storage).await.unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(found.len(), 2);
        // Control: with a new time it is read, and found damaged.
        file.set_modified(modified + std::time::Duration::from_secs(1))
            .unwrap();
        let (found, bad) = list_points(&storage).await.unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(ids(&found), ["20260101T000002Z-bbbbbb"]);

        // A removed manifest is gone from the next listing.
        storage
            .delete(&point_path("20260101T000002Z-bbbbbb"))
            .await
            .unwrap();
        assert!(list_points(&storage).await.unwrap().0.is_empty());
    }

    /// Ids start with the second the point was taken, then a random suffix: two points
    /// in one second (two operators, a script) sort by chance. The list, and so
    /// `latest` and a time, go by the points' mid-times. Defect: sorted by id,
    /// `latest` could be the older of the two.
    #[test]
    fn points_of_one_second_are_ordered_by_their_mid_time() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
        let older = point("20260101T000000Z-ffffff", 1_767_225_600_100);
        let newer = point("20260101T000000Z-000000", 1_767_225_600_900);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (found, bad) = runtime.block_on(async {
            for manifest in [&older, &newer] {
                let json = serde_json::to_vec_pretty(manifest).unwrap();
                storage
                    .put_atomic(&point_path(&manifest.point_id), json.into())
                    .await
                    .unwrap();
            }
            list_points(&storage).await.unwrap()
        });
        assert!(bad.is_empty(), "{bad:?}");
        let ids: Vec<&str> = found.iter().map(|point| point.point_id.as_str()).collect();
        assert_eq!(ids, [older.point_id.as_str(), newer.point_id.as_str()]);
        assert_eq!(resolve(&found, "latest").unwrap().point_id, newer.point_id);
        // Control: a time between them picks the older.
        assert_eq!(
            resolve(&found, "2026-01-01T00:00:00.500Z")
                .unwrap()
                .point_id,
            older.point_id
        );
    }
}
