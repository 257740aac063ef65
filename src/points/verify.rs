//! `stillpoint verify` for points: for each database of a point, what it needs (its
//! base backup and the chunks from the base's start to the marker, without a gap) is
//! found and every stored artifact re-read against its checksum, by the same code a
//! restore runs before it writes anything ([`super::restore::needs`] and
//! [`super::restore::check`]): a point that verifies here is one a restore will not
//! refuse, and a gap, a missing or a damaged chunk or base is named the same way.

use super::PointManifest;
use super::restore::{self, PointRestoreError};
use crate::pipeline::PipelineSettings;
use crate::storage::Storage;

/// A point, verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PointVerdict {
    pub point_id: String,
    pub ok: bool,
    pub databases: Vec<DatabaseVerdict>,
}

/// One database of a point, verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DatabaseVerdict {
    pub database: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_id: Option<String>,
    /// Chunks re-read (timeline history files included).
    pub chunks: usize,
    pub stored_bytes: u64,
    /// What is missing, damaged or broken in the chain, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Why nothing was checked (a database a point restores by time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Verifies every database of `point`; it does not stop at the first database with a
/// problem (within one database, the first problem is named, as a restore would).
/// Artifacts in `checked` were verified earlier in the same run and are not read
/// again (points share bases and chunks); the ones verified here are added.
pub async fn verify_point(
    storage: &Storage,
    settings: &PipelineSettings,
    point: &PointManifest,
    checked: &mut restore::Checked,
) -> PointVerdict {
    let mut databases = Vec::with_capacity(point.databases.len());
    for entry in &point.databases {
        let mut verdict = DatabaseVerdict {
            database: entry.name.clone(),
            ok: true,
            base_id: entry.base.as_ref().map(|base| base.id.clone()),
            chunks: 0,
            stored_bytes: 0,
            problem: None,
            skipped: None,
        };
        if !restore::restores_from_base(&entry.adapter) {
            // Not a base + archive: an exec database restores by time.
            verdict.skipped = Some(format!(
                "a {} database restores by time, not from a base and an archive",
                entry.adapter
            ));
            databases.push(verdict);
            continue;
        }
        let result = async {
            let needed = restore::needs(storage, settings, point, &entry.name).await?;
            restore::check(storage, point, &needed, checked).await?;
            Ok::<_, PointRestoreError>(needed)
        }
        .await;
        match result {
            Ok(needed) => {
                verdict.chunks = needed.chunks.len() + needed.others.len();
                verdict.stored_bytes = needed.stored_bytes();
            }
            Err(error) => {
                verdict.ok = false;
                verdict.problem = Some(match error {
                    PointRestoreError::Missing { problem, .. } => problem,
                    other => other.to_string(),
                });
            }
        }
        databases.push(verdict);
    }
    PointVerdict {
        point_id: point.point_id.clone(),
        ok: databases.iter().all(|database| database.ok),
        databases,
    }
}
