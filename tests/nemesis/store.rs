//! The run's storage as the nemesis itself reads it, through stillpoint's library
//! (not the service): the watcher's look at each new point, the chunk a `lose_chunk`
//! fault deletes, and which points a lost chunk breaks.

use std::path::Path;
use std::time::Duration;

use stillpoint::archive::{Archive, ChunkKind, ChunkRecord, Position, base};
use stillpoint::pipeline::PipelineSettings;
use stillpoint::points::PointManifest;
use stillpoint::storage::Storage;

/// Every storage call gives up after this: a stopped storage (a fault) must not hang
/// the nemesis.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The storage and pipeline settings of the runbook at `runbook`.
pub fn open(runbook: &Path) -> (Storage, PipelineSettings) {
    let runbook = stillpoint::runbook::Runbook::load(runbook).unwrap();
    let storage = Storage::open_with_options(&runbook.storage.url, &runbook.storage.options)
        .unwrap_or_else(|error| panic!("the run's storage: {error}"));
    let settings = stillpoint::backup::pipeline_settings(&runbook).unwrap();
    (storage, settings)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A lost chunk: what a `lose_chunk` fault deleted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Lost {
    pub database: String,
    pub chunk: String,
    pub start: Position,
    pub end: Position,
}

/// Deletes one whole chunk of `database`'s archive that the next points need: past
/// where the newest base backup's replay starts, and not among the newest few (the
/// archiver is done with it). Its record first, so that no listing shows a chunk
/// whose artifact is gone. None when there is no such chunk yet.
pub async fn lose_chunk(
    storage: &Storage,
    settings: &PipelineSettings,
    database: &str,
    pick: u64,
) -> Result<Option<Lost>, String> {
    let (bases, _) = base::list(storage, database)
        .await
        .map_err(|error| error.to_string())?;
    let Some(newest) = bases.last() else {
        return Ok(None);
    };
    let from = base::replay_from(&newest.start);
    let archive = Archive::new(storage.clone(), settings.clone(), database)
        .map_err(|error| error.to_string())?;
    let catalog = archive.catalog().await.map_err(|error| error.to_string())?;
    let whole = |chunk: &&ChunkRecord| {
        matches!(
            chunk.kind,
            ChunkKind::PgWalSegment | ChunkKind::MariadbBinlog
        ) && chunk.start.as_ref().is_some_and(|start| *start >= from)
    };
    let candidates: Vec<&ChunkRecord> = catalog.chunks.iter().filter(whole).collect();
    let Some(candidates) = candidates.get(..candidates.len().saturating_sub(3)) else {
        return Ok(None);
    };
    if candidates.is_empty() {
        return Ok(None);
    }
    let chunk = candidates[(pick % candidates.len() as u64) as usize];
    archive
        .remove(chunk)
        .await
        .map_err(|error| format!("deleting chunk {}: {error}", chunk.name))?;
    Ok(Some(Lost {
        database: database.to_owned(),
        chunk: chunk.name.clone(),
        start: chunk.start.clone().expect("a whole chunk has a start"),
        end: chunk.end.clone().expect("a whole chunk has an end"),
    }))
}

/// Whether restoring `point` replays `lost`: the chunk lies between where its
/// database's base backup starts replaying and its marker.
pub fn needs_lost(point: &PointManifest, lost: &Lost) -> bool {
    let Some(entry) = point.database(&lost.database) else {
        return false;
    };
    let (Some(base), Some(target)) = (&entry.base, &entry.target) else {
        return false;
    };
    base::replay_from(&base.start) < lost.end && lost.start < *target
}
