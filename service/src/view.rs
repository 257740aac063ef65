//! What the runbook's storage holds, as the API, the status page and the metrics show
//! it: points, backups, base backups and each archive's coverage. Read again after
//! every job and every few seconds; the storage is the only truth, so a restarted
//! service shows the same.

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use stillpoint::archive::{self, Archive};
use stillpoint::catalog;
use stillpoint::manifest::Manifest;
use stillpoint::points::{self, PointManifest};

use crate::Service;

#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub read_at: Option<DateTime<Utc>>,
    /// Oldest first.
    pub points: Vec<PointSummary>,
    /// Oldest first.
    pub backups: Vec<BackupSummary>,
    pub databases: Vec<DatabaseArchive>,
    /// What could not be read, named (a damaged manifest, a storage error).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointSummary {
    pub point_id: String,
    pub restore_time: Option<DateTime<Utc>>,
    pub window_ms: Option<i64>,
    pub exact: bool,
    pub databases: Vec<String>,
    #[serde(skip)]
    pub manifest: Box<PointManifest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    pub backup_id: String,
    pub created_at: Option<DateTime<Utc>>,
    pub restore_time: Option<DateTime<Utc>>,
    pub window_valid: bool,
    pub restorable: bool,
    pub databases: Vec<String>,
    pub stored_bytes: u64,
    #[serde(skip)]
    pub manifest: Box<Manifest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseArchive {
    pub database: String,
    pub chunks: usize,
    pub from: Option<String>,
    pub to: Option<String>,
    pub gaps: Vec<String>,
    pub bases: Vec<BaseSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaseSummary {
    pub id: String,
    pub start: String,
    pub end: String,
    pub finished_at: Option<DateTime<Utc>>,
    pub stored_bytes: u64,
}

fn from_ms(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

impl View {
    pub fn point(&self, id: &str) -> Option<&PointSummary> {
        self.points.iter().find(|point| point.point_id == id)
    }

    pub fn backup(&self, id: &str) -> Option<&BackupSummary> {
        self.backups.iter().find(|backup| backup.backup_id == id)
    }
}

impl Service {
    /// Reads the storage again and publishes what it holds (and its metrics).
    pub(crate) async fn refresh_view(&self) {
        let view = read(self).await;
        self.metrics.points(
            view.points.len(),
            view.points.last().and_then(|point| point.restore_time),
        );
        *self.view.write().await = view;
        self.refresh_stored_bytes().await;
    }

    async fn refresh_stored_bytes(&self) {
        for (kind, prefix) in [
            ("backups", "backups/"),
            ("bases", "bases/"),
            ("archive", "archive/"),
        ] {
            if let Ok(entries) = self.storage.list(prefix).await {
                self.metrics
                    .stored(kind, entries.iter().map(|entry| entry.size).sum());
            }
        }
    }
}

async fn read(service: &Service) -> View {
    let storage = &service.storage;
    let mut view = View {
        read_at: Some(Utc::now()),
        ..View::default()
    };
    match points::list_points(storage).await {
        Ok((found, damaged)) => {
            view.points = found
                .into_iter()
                .map(|point| PointSummary {
                    point_id: point.point_id.clone(),
                    restore_time: point.time_ms().and_then(from_ms),
                    window_ms: point.window.window_ms,
                    exact: point.exact,
                    databases: point.databases.iter().map(|db| db.name.clone()).collect(),
                    manifest: Box::new(point),
                })
                .collect();
            view.problems.extend(
                damaged
                    .into_iter()
                    .map(|(path, error)| format!("damaged point manifest {path}: {error}")),
            );
        }
        Err(error) => view.problems.push(format!("cannot list points: {error}")),
    }
    match catalog::list(storage).await {
        Ok(listing) => {
            let mut backups: Vec<BackupSummary> = listing
                .backups
                .iter()
                .map(|manifest| BackupSummary {
                    backup_id: manifest.backup_id.clone(),
                    created_at: from_ms(manifest.created_at_ms),
                    restore_time: manifest.window.restore_point_timestamp_ms.and_then(from_ms),
                    window_valid: manifest.window.window_valid,
                    restorable: listing.is_restorable(manifest),
                    databases: manifest
                        .databases
                        .iter()
                        .map(|db| db.name.clone())
                        .collect(),
                    stored_bytes: manifest
                        .databases
                        .iter()
                        .filter_map(|db| db.artifact.as_ref())
                        .map(|artifact| artifact.stored_size)
                        .sum(),
                    manifest: Box::new(manifest.clone()),
                })
                .collect();
            backups.sort_by_key(|backup| backup.created_at);
            view.backups = backups;
        }
        Err(error) => view.problems.push(format!("cannot list backups: {error}")),
    }
    let mut names: Vec<String> = service
        .runbook
        .databases
        .iter()
        .filter(|db| db.archive)
        .map(|db| db.name.clone())
        .collect();
    names.extend(
        archive::archived_databases(storage)
            .await
            .unwrap_or_default(),
    );
    names.sort();
    names.dedup();
    for name in names {
        let bases = match archive::base::list(storage, &name).await {
            Ok((bases, _)) => bases,
            Err(error) => {
                view.problems
                    .push(format!("cannot list the base backups of {name}: {error}"));
                Vec::new()
            }
        };
        let catalog = match Archive::new(storage.clone(), service.settings.clone(), &name) {
            Ok(archive) => archive.catalog().await.map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let catalog = match catalog {
            Ok(catalog) => catalog,
            Err(error) => {
                view.problems
                    .push(format!("cannot read the archive of {name}: {error}"));
                continue;
            }
        };
        let coverage = catalog.coverage();
        view.databases.push(DatabaseArchive {
            database: name,
            chunks: catalog.chunks.len(),
            from: coverage.as_ref().map(|c| c.from.to_string()),
            to: coverage.as_ref().map(|c| c.to.to_string()),
            gaps: catalog
                .gaps()
                .iter()
                .map(|gap| format!("after {} ({}) before {}", gap.after, gap.from, gap.before))
                .collect(),
            bases: bases
                .iter()
                .map(|base| BaseSummary {
                    id: base.id.clone(),
                    start: base.start.to_string(),
                    end: base.end.to_string(),
                    finished_at: from_ms(base.finished_at_ms),
                    stored_bytes: base.artifact.stored_size,
                })
                .collect(),
        });
    }
    view
}
