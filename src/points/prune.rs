//! `stillpoint prune` for points: the runbook's `[retention]` over the points' times
//! (the same rules as for backups, [`crate::catalog::plan_retention`]), then what no
//! kept point needs any more:
//!
//! - a base backup goes when no kept point restores from it *and* it is not the
//!   newest base of its database (the next point will need that one);
//! - a chunk goes when it ends at or before the *floor* of its archive: the oldest
//!   position a base that stays replays from ([`base::replay_from`]: its start for
//!   PostgreSQL, the beginning of its binlog file for MariaDB). Every kept point replays from its base's start, so
//!   nothing at or after the floor is touched, and a kept point is never orphaned.
//!
//! - a change stream chunk (`changes = true`) goes when it ends at or before the
//!   oldest kept point's marker of its database: it holds only transactions committed
//!   before every kept point, which no `changes --from` a kept point reads.
//!
//! Removal order is what makes a crash mid-prune harmless: point manifests first
//! (from then on the point is not listed), then base backups (record first, then the
//! tar), then chunks, oldest first (record first, [`Archive::remove`]): at every step
//! each listed point still has what it needs, and the archive only starts later,
//! without a gap.
//!
//! A point manifest that cannot be read may need any base or chunk: with one in the
//! storage, only points are pruned, never bases or chunks.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use super::{PointManifest, PointsError};
use crate::archive::base::{self, BaseRecord};
use crate::archive::{self, Archive, ChunkRecord, Position};
use crate::catalog::{self, CatalogError, PrunePlan, Retained, Retention};
use crate::pipeline::PipelineSettings;
use crate::storage::Storage;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Retention(#[from] CatalogError),
    #[error(transparent)]
    Points(#[from] PointsError),
    #[error("the archive of {database}: {source}")]
    Archive {
        database: String,
        // Boxed: an archive error is large, and this enum is every prune's result.
        source: Box<archive::ArchiveError>,
    },
    #[error(
        "prune stopped at {what} after removing {removed} object(s): {source}; what was \
         removed is no longer listed, and a later prune carries on"
    )]
    Apply {
        what: String,
        removed: usize,
        source: crate::storage::StorageError,
    },
}

/// What the storage holds that a points prune plans over.
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    pub points: Vec<PointManifest>,
    /// Point manifests that cannot be read (path, problem).
    pub damaged_points: Vec<(String, String)>,
    /// Per database, oldest first.
    pub bases: BTreeMap<String, Vec<BaseRecord>>,
    pub archives: BTreeMap<String, archive::Catalog>,
    /// PostgreSQL change streams.
    pub change_streams: BTreeMap<String, archive::Catalog>,
}

/// A base backup a prune removes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BaseRemoval {
    pub database: String,
    pub id: String,
}

/// The chunks of one archive a prune removes: every one that ends at or before
/// `floor`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChunkRemoval {
    pub database: String,
    /// Chunks of the database's change stream, not of its archive.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub change_stream: bool,
    pub floor: Position,
    /// Names, oldest first.
    pub chunks: Vec<String>,
    #[serde(skip)]
    pub records: Vec<ChunkRecord>,
}

/// What a points prune keeps and removes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PointsPrunePlan {
    /// The points kept (with why) and deleted, newest first.
    pub points: PrunePlan,
    /// Base backups that stay, with why ("point X", "newest").
    pub keep_bases: Vec<(BaseRemoval, Vec<String>)>,
    pub delete_bases: Vec<BaseRemoval>,
    pub delete_chunks: Vec<ChunkRemoval>,
    /// Why something was left alone (a damaged manifest, an archive without a base).
    pub notes: Vec<String>,
}

impl PointsPrunePlan {
    pub fn is_empty(&self) -> bool {
        self.points.delete.is_empty()
            && self.delete_bases.is_empty()
            && self.delete_chunks.iter().all(|c| c.chunks.is_empty())
    }
}

/// Reads every point, base record and archive catalog in `storage`.
pub async fn holdings(
    storage: &Storage,
    settings: &PipelineSettings,
) -> Result<Holdings, PruneError> {
    let (points, damaged_points) = super::list_points(storage).await?;
    let mut bases = BTreeMap::new();
    for database in base::databases(storage).await.map_err(PointsError::from)? {
        let (found, _) = base::list(storage, &database)
            .await
            .map_err(PointsError::from)?;
        bases.insert(database, found);
    }
    let archives = catalogs(
        storage,
        settings,
        archive::archived_databases(storage).await,
        Archive::new,
    )
    .await?;
    let change_streams = catalogs(
        storage,
        settings,
        archive::change_stream_databases(storage).await,
        Archive::change_stream,
    )
    .await?;
    Ok(Holdings {
        points,
        damaged_points,
        bases,
        archives,
        change_streams,
    })
}

/// The catalog of each of `databases`' archives (or change streams: `open` says
/// which).
async fn catalogs(
    storage: &Storage,
    settings: &PipelineSettings,
    databases: Result<Vec<String>, archive::ArchiveError>,
    open: fn(Storage, PipelineSettings, &str) -> Result<Archive, archive::ArchiveError>,
) -> Result<BTreeMap<String, archive::Catalog>, PruneError> {
    let failed = |database: &str| {
        let database = database.to_owned();
        move |source| PruneError::Archive {
            database,
            source: Box::new(source),
        }
    };
    let mut catalogs = BTreeMap::new();
    for database in databases.map_err(failed("(all)"))? {
        let catalog = open(storage.clone(), settings.clone(), &database)
            .map_err(failed(&database))?
            .catalog()
            .await
            .map_err(failed(&database))?;
        catalogs.insert(database, catalog);
    }
    Ok(catalogs)
}

/// Plans a prune of `holdings` (pure: nothing is read or removed).
pub fn plan(
    holdings: &Holdings,
    retention: Retention,
    now: DateTime<Utc>,
) -> Result<PointsPrunePlan, PruneError> {
    let points = catalog::plan_retention(
        holdings.points.iter().map(|point| Retained {
            id: point.point_id.clone(),
            // A point is written only once restorable: every one may take a place.
            at_ms: point.time_ms().unwrap_or(point.committed_at_ms),
            eligible: true,
        }),
        retention,
        now,
    )?;
    let mut plan = PointsPrunePlan {
        points,
        ..PointsPrunePlan::default()
    };
    if !holdings.damaged_points.is_empty() {
        plan.notes.push(format!(
            "{} point manifest(s) cannot be read ({}): no base backup or chunk is removed, \
             since they may need any",
            holdings.damaged_points.len(),
            holdings
                .damaged_points
                .iter()
                .map(|(path, _)| path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return Ok(plan);
    }
    let kept: BTreeSet<&str> = plan.points.keep.iter().map(|(id, _)| id.as_str()).collect();
    let kept_points: Vec<&PointManifest> = holdings
        .points
        .iter()
        .filter(|point| kept.contains(point.point_id.as_str()))
        .collect();

    // Per database: the bases kept points restore from (id → points), and the oldest
    // position any of them replays from.
    let mut needed: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    let mut floors: BTreeMap<&str, Position> = BTreeMap::new();
    fn lower<'a>(floors: &mut BTreeMap<&'a str, Position>, database: &'a str, at: &Position) {
        let floor = floors.entry(database).or_insert_with(|| at.clone());
        if at < floor {
            *floor = at.clone();
        }
    }
    for point in &kept_points {
        for database in &point.databases {
            if let Some(base) = &database.base {
                needed
                    .entry(database.name.as_str())
                    .or_default()
                    .entry(base.id.as_str())
                    .or_default()
                    .push(point.point_id.as_str());
                lower(&mut floors, &database.name, &base::replay_from(&base.start));
            }
        }
    }
    for (database, bases) in &holdings.bases {
        let newest = bases.last().map(|base| base.id.as_str());
        for base in bases {
            let mut reasons: Vec<String> = needed
                .get(database.as_str())
                .and_then(|ids| ids.get(base.id.as_str()))
                .map(|points| points.iter().map(|id| format!("point {id}")).collect())
                .unwrap_or_default();
            if Some(base.id.as_str()) == newest {
                reasons.push("newest".to_owned());
            }
            let which = BaseRemoval {
                database: database.clone(),
                id: base.id.clone(),
            };
            if reasons.is_empty() {
                plan.delete_bases.push(which);
            } else {
                lower(&mut floors, database, &base::replay_from(&base.start));
                plan.keep_bases.push((which, reasons));
            }
        }
    }
    for (database, catalog) in &holdings.archives {
        let Some(floor) = floors.get(database.as_str()) else {
            plan.notes.push(format!(
                "the archive of {database} has no base backup and no kept point: none of \
                 its chunks is removed"
            ));
            continue;
        };
        plan.delete_chunks
            .extend(chunks_before(database, false, catalog, floor));
    }
    // A change stream's floor: the oldest kept point's marker of its database.
    let mut stream_floors: BTreeMap<&str, Position> = BTreeMap::new();
    for point in &kept_points {
        for database in &point.databases {
            if let Some(marker) = database.change_marker() {
                lower(&mut stream_floors, &database.name, &marker);
            }
        }
    }
    for (database, catalog) in &holdings.change_streams {
        let Some(floor) = stream_floors.get(database.as_str()) else {
            plan.notes.push(format!(
                "the change stream of {database} has no kept point: none of its chunks is \
                 removed"
            ));
            continue;
        };
        plan.delete_chunks
            .extend(chunks_before(database, true, catalog, floor));
    }
    Ok(plan)
}

/// Every chunk of `catalog` that ends at or before `floor`, oldest first (none: no
/// removal).
fn chunks_before(
    database: &str,
    change_stream: bool,
    catalog: &archive::Catalog,
    floor: &Position,
) -> Option<ChunkRemoval> {
    let mut records: Vec<ChunkRecord> = catalog
        .chunks
        .iter()
        .chain(&catalog.superseded)
        .filter(|chunk| chunk.range().is_some_and(|(_, end)| end <= floor))
        .cloned()
        .collect();
    records.sort_by(|a, b| a.start.cmp(&b.start).then(a.name.cmp(&b.name)));
    (!records.is_empty()).then(|| ChunkRemoval {
        database: database.to_owned(),
        change_stream,
        floor: floor.clone(),
        chunks: records.iter().map(|chunk| chunk.name.clone()).collect(),
        records,
    })
}

/// Carries out `plan`: point manifests, then base backups (record first), then chunks
/// oldest first (record first). Returns the number of objects removed.
pub async fn apply(storage: &Storage, plan: &PointsPrunePlan) -> Result<usize, PruneError> {
    let mut removed = 0usize;
    let stop = |what: String, removed: usize| {
        move |source| PruneError::Apply {
            what,
            removed,
            source,
        }
    };
    for id in &plan.points.delete {
        let what = format!("point {id}");
        storage
            .delete(&super::point_path(id))
            .await
            .map_err(stop(what.clone(), removed))?;
        removed += 1;
        removed += storage
            .delete_prefix(&format!("{}/{id}", super::POINTS_DIR))
            .await
            .map_err(stop(what, removed))?;
    }
    for base in &plan.delete_bases {
        let what = format!("base backup {} of {}", base.id, base.database);
        let paths = base::record_path(&base.database, &base.id)
            .and_then(|record| Ok((record, base::base_prefix(&base.database, &base.id)?)));
        let (record, prefix) = paths.map_err(|source| PruneError::Archive {
            database: base.database.clone(),
            source: Box::new(source),
        })?;
        storage
            .delete(&record)
            .await
            .map_err(stop(what.clone(), removed))?;
        removed += 1;
        removed += storage
            .delete_prefix(&prefix)
            .await
            .map_err(stop(what, removed))?;
    }
    for chunks in &plan.delete_chunks {
        let open = if chunks.change_stream {
            Archive::change_stream
        } else {
            Archive::new
        };
        let archive = open(
            storage.clone(),
            PipelineSettings::default(),
            &chunks.database,
        )
        .map_err(|source| PruneError::Archive {
            database: chunks.database.clone(),
            source: Box::new(source),
        })?;
        for record in &chunks.records {
            archive
                .remove(record)
                .await
                .map_err(|source| PruneError::Archive {
                    database: chunks.database.clone(),
                    source: Box::new(source),
                })?;
            removed += 2;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::CutMarker;
    use crate::archive::{ChunkKind, Lsn};
    use crate::coordinator::PauseReport;
    use crate::pipeline::ArtifactInfo;
    use crate::points::{BaseRef, FORMAT, PointDatabase, PointTimings};

    const SEGMENT: u64 = 0x100;
    const DAY_MS: i64 = 86_400_000;

    fn lsn(at: u64) -> Position {
        Position::Lsn(Lsn(at))
    }

    fn artifact(path: String) -> ArtifactInfo {
        ArtifactInfo {
            path,
            size: 1,
            stored_size: 1,
            blake3: String::new(),
            compression: None,
            encryption: None,
        }
    }

    fn base(id: &str, start: u64) -> BaseRecord {
        BaseRecord {
            format: FORMAT,
            id: id.to_owned(),
            database: "ledger".to_owned(),
            adapter: "postgres".to_owned(),
            kind: "pg_basebackup_tar".to_owned(),
            start: lsn(start),
            end: lsn(start + 0x10),
            timeline: Some(1),
            started_at_ms: 0,
            finished_at_ms: 0,
            artifact: artifact(format!("bases/ledger/{id}/base.tar")),
            details: BTreeMap::new(),
        }
    }

    /// Segment `n` of the ledger's archive: `[n * SEGMENT, (n + 1) * SEGMENT)`.
    fn chunk(n: u64) -> ChunkRecord {
        ChunkRecord {
            format: 1,
            database: "ledger".to_owned(),
            name: format!("seg{n:02}"),
            kind: ChunkKind::PgWalSegment,
            timeline: Some(1),
            start: Some(lsn(n * SEGMENT)),
            end: Some(lsn((n + 1) * SEGMENT)),
            segment_size: Some(SEGMENT),
            size: SEGMENT,
            plaintext_blake3: String::new(),
            artifact: artifact(format!("archive/ledger/seg{n:02}.x")),
            archived_at_ms: 0,
            details: BTreeMap::new(),
        }
    }

    /// A point on day `day` restoring the ledger from `base` to `target`.
    fn point(id: &str, day: i64, base: &BaseRecord, target: u64) -> PointManifest {
        let mid_ms = day * DAY_MS;
        let mut window = PauseReport::unpaused(mid_ms, mid_ms, crate::time::Zone::UTC);
        window.restore_point_timestamp_ms = Some(mid_ms);
        PointManifest {
            format: FORMAT,
            point_id: id.to_owned(),
            cluster: "c".to_owned(),
            window,
            exact: true,
            databases: vec![PointDatabase {
                name: "ledger".to_owned(),
                role: None,
                adapter: "postgres".to_owned(),
                marker: CutMarker {
                    kind: "postgres-restore-point".to_owned(),
                    details: BTreeMap::new(),
                },
                target: Some(lsn(target)),
                base: Some(BaseRef {
                    id: base.id.clone(),
                    start: base.start.clone(),
                    end: base.end.clone(),
                }),
                row_counts: None,
            }],
            timings: PointTimings::default(),
            committed_at_ms: mid_ms,
        }
    }

    /// Chunk `n` of the ledger's change stream: `(n * SEGMENT, (n + 1) * SEGMENT]`.
    fn stream_chunk(n: u64) -> ChunkRecord {
        ChunkRecord {
            name: format!("changes{n:02}"),
            kind: ChunkKind::PgChanges,
            timeline: None,
            segment_size: None,
            artifact: artifact(format!("changes/ledger/changes{n:02}.x")),
            ..chunk(n)
        }
    }

    /// Bases a (segment 1), b (segment 4), c (segment 8, newest, no point on it);
    /// points p1, p2 on a, p3 on b, p4 on b; the archive holds segments 0 to 9, the
    /// change stream the same stretch.
    fn holdings() -> Holdings {
        let (a, b, c) = (
            base("a", SEGMENT + 0x28),
            base("b", 4 * SEGMENT + 0x28),
            base("c", 8 * SEGMENT + 0x28),
        );
        let points = vec![
            point("p1", 1, &a, 2 * SEGMENT),
            point("p2", 2, &a, 3 * SEGMENT + 5),
            point("p3", 3, &b, 5 * SEGMENT + 5),
            point("p4", 4, &b, 6 * SEGMENT + 5),
        ];
        let catalog = archive::Catalog::new("ledger", (0..10).map(chunk).collect(), Vec::new());
        Holdings {
            points,
            damaged_points: Vec::new(),
            bases: BTreeMap::from([("ledger".to_owned(), vec![a, b, c])]),
            archives: BTreeMap::from([("ledger".to_owned(), catalog)]),
            change_streams: BTreeMap::from([(
                "ledger".to_owned(),
                archive::Catalog::new("ledger", (0..10).map(stream_chunk).collect(), Vec::new()),
            )]),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(10 * DAY_MS).unwrap()
    }

    fn keep_last(n: usize) -> Retention {
        Retention {
            keep_last: n,
            ..Retention::default()
        }
    }

    fn deleted_bases(plan: &PointsPrunePlan) -> Vec<&str> {
        plan.delete_bases.iter().map(|b| b.id.as_str()).collect()
    }

    fn deleted_chunks(plan: &PointsPrunePlan) -> Vec<&str> {
        deleted(plan, false)
    }

    fn deleted(plan: &PointsPrunePlan, change_stream: bool) -> Vec<&str> {
        plan.delete_chunks
            .iter()
            .filter(|c| c.change_stream == change_stream)
            .flat_map(|c| c.chunks.iter().map(String::as_str))
            .collect()
    }

    /// The change stream keeps what a `changes --from` the oldest kept point reads:
    /// keep_last 2 keeps p3 (marker 5 segments + 5) and p4, so the stream's chunks
    /// ending at or before that go (0–4) and the one holding it stays. Every point
    /// kept: only what ends before p1's marker. No kept point: nothing, with a note.
    #[test]
    fn change_stream_chunks_before_the_oldest_kept_point_go() {
        let plan = plan(&holdings(), keep_last(2), now()).unwrap();
        assert_eq!(
            deleted(&plan, true),
            [
                "changes00",
                "changes01",
                "changes02",
                "changes03",
                "changes04"
            ]
        );
        let removal = plan.delete_chunks.iter().find(|c| c.change_stream).unwrap();
        assert_eq!(removal.floor, lsn(5 * SEGMENT + 5));
        let plan_all = super::plan(&holdings(), keep_last(10), now()).unwrap();
        assert_eq!(deleted(&plan_all, true), ["changes00", "changes01"]);

        let mut none_kept = holdings();
        none_kept.points.clear();
        let plan = super::plan(&none_kept, keep_last(10), now()).unwrap();
        assert!(deleted(&plan, true).is_empty());
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("change stream of ledger has no kept point")),
            "{:?}",
            plan.notes
        );
    }

    /// keep_last 2 keeps p3 and p4 (both on b): base a goes, b stays for them, c
    /// stays as the newest; the chunks wholly before b's start (segments 0–3) go,
    /// the one holding b's start (4) and everything after stay.
    #[test]
    fn a_kept_points_base_and_chunks_stay_and_older_ones_go() {
        let plan = plan(&holdings(), keep_last(2), now()).unwrap();
        assert_eq!(plan.points.delete, vec!["p2", "p1"]);
        assert_eq!(deleted_bases(&plan), vec!["a"]);
        let kept: Vec<(&str, &Vec<String>)> = plan
            .keep_bases
            .iter()
            .map(|(base, why)| (base.id.as_str(), why))
            .collect();
        assert_eq!(kept[0].0, "b");
        assert_eq!(
            kept[0].1,
            &vec!["point p3".to_owned(), "point p4".to_owned()]
        );
        assert_eq!(kept[1], ("c", &vec!["newest".to_owned()]));
        assert_eq!(
            deleted_chunks(&plan),
            vec!["seg00", "seg01", "seg02", "seg03"]
        );
        assert_eq!(plan.delete_chunks[0].floor, lsn(4 * SEGMENT + 0x28));
    }

    /// With every point kept, base a is needed (by p1, p2) and only the chunk before
    /// a's start goes; the unneeded middle base is what goes when nothing needs it.
    #[test]
    fn every_kept_points_needs_survive_and_an_unneeded_middle_base_goes() {
        let plan = plan(&holdings(), keep_last(10), now()).unwrap();
        assert!(plan.points.delete.is_empty());
        assert!(deleted_bases(&plan).is_empty());
        assert_eq!(deleted_chunks(&plan), vec!["seg00"]);

        // Without p3 and p4, keep_last 1 keeps p2 (on a): b is neither needed nor newest.
        let mut holdings = holdings();
        holdings
            .points
            .retain(|p| p.point_id != "p3" && p.point_id != "p4");
        let plan = plan_for(&holdings, keep_last(1));
        assert_eq!(plan.points.delete, vec!["p1"]);
        assert_eq!(deleted_bases(&plan), vec!["b"]);
        assert_eq!(deleted_chunks(&plan), vec!["seg00"]);
    }

    fn plan_for(holdings: &Holdings, retention: Retention) -> PointsPrunePlan {
        plan(holdings, retention, now()).unwrap()
    }

    /// With no point at all, the newest base stays with everything from its start;
    /// the older bases and the chunks before the newest's start go.
    #[test]
    fn the_newest_base_always_stays() {
        let mut holdings = holdings();
        holdings.points.clear();
        let plan = plan_for(&holdings, keep_last(1));
        assert_eq!(deleted_bases(&plan), vec!["a", "b"]);
        assert_eq!(plan.keep_bases.len(), 1);
        assert_eq!(plan.keep_bases[0].0.id, "c");
        assert_eq!(
            deleted_chunks(&plan),
            (0..8).map(|n| format!("seg{n:02}")).collect::<Vec<_>>()
        );
    }

    /// A chunk that ends exactly at the floor goes; one that holds the floor stays;
    /// superseded partials below the floor go too, oldest first.
    #[test]
    fn chunks_before_the_oldest_needed_start_go_and_after_stay() {
        let mut holdings = holdings();
        holdings.bases.get_mut("ledger").unwrap()[1] = base("b", 4 * SEGMENT);
        for point in &mut holdings.points[2..] {
            point.databases[0].base.as_mut().unwrap().start = lsn(4 * SEGMENT);
        }
        let mut partial = chunk(2);
        partial.name = "seg02.partial".to_owned();
        partial.kind = ChunkKind::PgWalPartial;
        partial.end = Some(lsn(2 * SEGMENT + 0x10));
        let mut records: Vec<ChunkRecord> = (0..10).map(chunk).collect();
        records.push(partial);
        holdings.archives.insert(
            "ledger".to_owned(),
            archive::Catalog::new("ledger", records, Vec::new()),
        );
        let plan = plan_for(&holdings, keep_last(2));
        assert_eq!(
            deleted_chunks(&plan),
            vec!["seg00", "seg01", "seg02", "seg02.partial", "seg03"]
        );
    }

    /// A point manifest that cannot be read may need anything: points are pruned,
    /// bases and chunks are not.
    #[test]
    fn a_damaged_point_manifest_keeps_every_base_and_chunk() {
        let mut holdings = holdings();
        holdings
            .damaged_points
            .push(("points/x/point.json".to_owned(), "bad".to_owned()));
        let plan = plan_for(&holdings, keep_last(1));
        assert_eq!(plan.points.delete.len(), 3);
        assert!(plan.delete_bases.is_empty());
        assert!(plan.delete_chunks.is_empty());
        assert!(
            plan.notes[0].contains("points/x/point.json"),
            "{:?}",
            plan.notes
        );
    }

    /// A MariaDB base replays its binlog file from the start (the file's format
    /// description event first), so prune keeps the chunks of that file before the
    /// base's position: only what ends at or before the file's start goes.
    #[test]
    fn a_mariadb_bases_whole_binlog_file_stays() {
        let at = |file: &str, offset: u64| Position::binlog(file, offset);
        let binlog_chunk = |name: &str, from: Position, to: Position| ChunkRecord {
            format: 1,
            database: "auditor".to_owned(),
            name: name.to_owned(),
            kind: ChunkKind::MariadbBinlog,
            timeline: None,
            start: Some(from),
            end: Some(to),
            segment_size: None,
            size: 1,
            plaintext_blake3: String::new(),
            artifact: artifact(format!("archive/auditor/{name}.x")),
            archived_at_ms: 0,
            details: BTreeMap::new(),
        };
        let base = BaseRecord {
            database: "auditor".to_owned(),
            adapter: "mariadb".to_owned(),
            kind: "mariadb_dump".to_owned(),
            start: at("binlog.000002", 500),
            end: at("binlog.000002", 500),
            timeline: None,
            artifact: artifact("bases/auditor/m/auditor.sql".to_owned()),
            ..base("m", 0)
        };
        let mut kept = point("p", 1, &base, 0);
        kept.databases[0].name = "auditor".to_owned();
        kept.databases[0].adapter = "mariadb".to_owned();
        kept.databases[0].target = Some(at("binlog.000002", 800));
        let chunks = vec![
            binlog_chunk("one", at("binlog.000001", 4), at("binlog.000002", 4)),
            binlog_chunk("two-a", at("binlog.000002", 4), at("binlog.000002", 300)),
            binlog_chunk("two-b", at("binlog.000002", 300), at("binlog.000002", 800)),
        ];
        let holdings = Holdings {
            points: vec![kept],
            damaged_points: Vec::new(),
            bases: BTreeMap::from([("auditor".to_owned(), vec![base])]),
            archives: BTreeMap::from([(
                "auditor".to_owned(),
                archive::Catalog::new("auditor", chunks, Vec::new()),
            )]),
            change_streams: BTreeMap::new(),
        };
        let plan = plan(&holdings, keep_last(1), now()).unwrap();
        assert_eq!(deleted_chunks(&plan), ["one"]);
        assert_eq!(plan.delete_chunks[0].floor, at("binlog.000002", 4));
    }
}
