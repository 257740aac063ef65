//! The read side of a backup storage, for `stillpoint list | show | verify | prune`:
//! which backups exist, which directories are leftovers, whether a backup's artifacts
//! are sound, and which backups a retention policy keeps.
//!
//! A backup exists iff its manifest exists and parses ([`crate::manifest`] writes it
//! last). A directory under `backups/` without a manifest is an *orphan*: a backup
//! that failed, or one still being written. Pruning deletes a manifest before its
//! artifacts, so a half-deleted backup is an orphan too, never a listed backup.
//!
//! An orphan's age is that of its newest object or unfinished upload. A running
//! backup rewrites its marker object every [`crate::backup::HEARTBEAT`], so its
//! directory always looks recent, even while its only other content is an upload
//! too big to have finished; [`stale_orphans`] picks only directories quiet for
//! longer than a grace far above the heartbeat. [`remove_orphan`] and
//! [`manifest::write`] follow a small protocol so that a commit racing a removal is
//! either withdrawn or left whole, never half-deleted.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use crate::manifest::{self, BACKUPS_DIR, MANIFEST_FILE, Manifest, ManifestError};
use crate::pipeline::{self, Decryption, PipelineError, VerifyReport};
use crate::storage::{Storage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "no backup in {storage} is a restore point; `stillpoint list` shows what is there, `stillpoint backup` makes one"
    )]
    NoBackups { storage: String },
    #[error("no backup {id:?} in {storage}{}; `stillpoint list` shows them all", newest_hint(.newest))]
    UnknownBackup {
        id: String,
        storage: String,
        newest: Vec<String>,
    },
    #[error(
        "backup {id} in {storage} cannot be used: its manifest is damaged ({error}); it is not a backup until the manifest is repaired"
    )]
    DamagedBackup {
        id: String,
        storage: String,
        error: String,
    },
    #[error(
        "backup {id} in {storage} is incomplete: its directory has no manifest (the backup failed, was interrupted, or is still running), so it is not a backup; `stillpoint prune` removes it once nothing has written to it for an hour"
    )]
    IncompleteBackup { id: String, storage: String },
    #[error(
        "keep_last, keep_daily and keep_weekly are all 0, which would delete every backup; set at least one"
    )]
    NoRetentionRule,
    #[error(
        "this prune would delete {deleting} backup(s) and leave no restore point in {storage} (what is left is unsafe --no-pause copies or broken backups, or nothing); pass --allow-no-restore-point to prune anyway"
    )]
    NoRestorePointLeft { storage: String, deleting: usize },
    #[error("{prefix} has a manifest now (a backup finished there); it was not deleted")]
    NotAnOrphan { prefix: String },
    #[error("prune stopped at backup {backup_id} ({deleted} backups already deleted): {source}")]
    Prune {
        backup_id: String,
        deleted: usize,
        #[source]
        source: StorageError,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn newest_hint(newest: &[String]) -> String {
    if newest.is_empty() {
        String::new()
    } else {
        format!(" (newest: {})", newest.join(", "))
    }
}

/// Everything under `backups/`.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Newest first.
    pub backups: Vec<Manifest>,
    /// What the storage listing says is wrong with a listed backup's artifacts
    /// (missing, or another size than the manifest records), by backup id. A backup
    /// with problems is listed but is not a restore point.
    pub problems: BTreeMap<String, Vec<String>>,
    /// Manifests that exist but cannot be read: not backups, and never pruned.
    pub damaged: Vec<DamagedManifest>,
    /// Backup directories without a manifest, oldest first.
    pub orphans: Vec<Orphan>,
    /// The storage, redacted, for messages.
    pub storage: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedManifest {
    pub path: String,
    pub error: String,
}

/// A backup directory without a manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Orphan {
    pub backup_id: String,
    /// `backups/<id>`
    pub prefix: String,
    /// Finished objects (a marker, artifacts).
    pub objects: usize,
    pub bytes: u64,
    /// Unfinished uploads, invisible to a plain listing (see `crate::storage`).
    pub incomplete_uploads: usize,
    /// Bytes those uploads hold, where the storage tells (local files).
    pub hidden_bytes: u64,
    /// It holds the marker a backup writes first and refreshes while it runs.
    pub marker: bool,
    /// The newest object's or unfinished upload's time: while a backup runs, never
    /// older than its heartbeat. See [`stale_orphans`].
    pub last_modified: DateTime<Utc>,
}

impl Catalog {
    /// The newest backup that is a restore point ([`Catalog::is_restorable`]):
    /// `latest` never means a copy taken with `--no-pause`, nor a backup whose
    /// manifest says its window is not a valid restore point, nor one whose artifacts
    /// are not all in storage with their recorded sizes.
    pub fn latest(&self) -> Option<&Manifest> {
        self.backups
            .iter()
            .find(|backup| self.is_restorable(backup))
    }

    /// The backups newer than [`Catalog::latest`] that it passed over (unsafe copies
    /// aside, which are never candidates), with why: what `latest` must say it
    /// skipped.
    pub fn skipped_for_latest(&self) -> Vec<(&Manifest, Vec<String>)> {
        self.backups
            .iter()
            .take_while(|backup| !self.is_restorable(backup))
            .filter(|backup| !backup.unsafe_no_pause)
            .map(|backup| {
                let mut why = self.problems_of(&backup.backup_id).to_vec();
                if !backup.window.window_valid {
                    why.insert(0, invalid_window(backup));
                }
                (backup, why)
            })
            .collect()
    }

    /// A restore point: taken inside a pause (not `--no-pause`), its manifest says the
    /// window is valid, and every artifact is in storage with the size its manifest
    /// records. (`manifest::write` never commits an invalid window; a manifest that
    /// says one anyway was edited or written by something else, and is not trusted
    /// as a restore point.)
    pub fn is_restorable(&self, manifest: &Manifest) -> bool {
        !manifest.unsafe_no_pause
            && manifest.window.window_valid
            && self.problems_of(&manifest.backup_id).is_empty()
    }

    /// What is wrong with a listed backup's artifacts; empty when nothing is.
    pub fn problems_of(&self, backup_id: &str) -> &[String] {
        self.problems.get(backup_id).map_or(&[], Vec::as_slice)
    }

    pub fn orphans(&self) -> &[Orphan] {
        &self.orphans
    }
}

/// Lists the backups in `storage`. Unreadable manifests are reported in
/// [`Catalog::damaged`], not as errors; storage errors fail the listing.
pub async fn list(storage: &Storage) -> Result<Catalog, CatalogError> {
    #[derive(Default)]
    struct Dir {
        manifest: bool,
        marker: bool,
        objects: usize,
        bytes: u64,
        uploads: usize,
        hidden_bytes: u64,
        last_modified: Option<DateTime<Utc>>,
    }
    /// The backup id of a path under `backups/`, if it is in a backup's directory
    /// (anything else is not ours to list or clean up), and the rest of the path.
    fn in_backup(path: &str) -> Option<(&str, &str)> {
        let mut parts = path.splitn(3, '/');
        let (Some(_), Some(id), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        manifest::parse_backup_id(id).ok().map(|_| (id, rest))
    }
    let mut dirs: BTreeMap<String, Dir> = BTreeMap::new();
    let listing = storage.list(BACKUPS_DIR).await?;
    for upload in storage.list_incomplete(BACKUPS_DIR).await? {
        let Some((id, _)) = in_backup(&upload.path) else {
            continue;
        };
        let dir = dirs.entry(id.to_owned()).or_default();
        dir.uploads += 1;
        dir.hidden_bytes += upload.bytes.unwrap_or(0);
        dir.last_modified = dir.last_modified.max(Some(upload.last_modified));
    }
    // What the storage holds, to compare each manifest's artifacts with.
    let sizes: BTreeMap<&str, u64> = listing
        .iter()
        .map(|entry| (entry.path.as_str(), entry.size))
        .collect();
    for entry in &listing {
        let Some((id, rest)) = in_backup(&entry.path) else {
            continue;
        };
        let dir = dirs.entry(id.to_owned()).or_default();
        dir.manifest |= rest == MANIFEST_FILE;
        dir.marker |= rest == manifest::MARKER_FILE;
        dir.objects += 1;
        dir.bytes += entry.size;
        dir.last_modified = dir.last_modified.max(Some(entry.last_modified));
    }

    let mut catalog = Catalog {
        storage: storage.to_string(),
        ..Catalog::default()
    };
    for (id, dir) in dirs {
        let prefix = format!("{BACKUPS_DIR}/{id}");
        if !dir.manifest {
            catalog.orphans.push(Orphan {
                backup_id: id,
                prefix,
                objects: dir.objects,
                bytes: dir.bytes,
                incomplete_uploads: dir.uploads,
                hidden_bytes: dir.hidden_bytes,
                marker: dir.marker,
                last_modified: dir.last_modified.unwrap_or_default(),
            });
            continue;
        }
        let path = format!("{prefix}/{MANIFEST_FILE}");
        let bytes = match storage.get_bytes(&path).await {
            Ok(bytes) => bytes,
            // Pruned between the listing and now.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        match manifest::parse_for(&id, &path, &bytes) {
            Ok(manifest) => {
                let problems = artifact_problems(&manifest, &sizes);
                if !problems.is_empty() {
                    catalog
                        .problems
                        .insert(manifest.backup_id.clone(), problems);
                }
                catalog.backups.push(manifest);
            }
            Err(error) => catalog.damaged.push(DamagedManifest {
                path,
                error: error.to_string(),
            }),
        }
    }
    catalog
        .backups
        .sort_by(|a, b| (b.created_at_ms, &b.backup_id).cmp(&(a.created_at_ms, &a.backup_id)));
    catalog.orphans.sort_by_key(|o| o.last_modified);
    Ok(catalog)
}

/// Each artifact of `manifest` that the listing does not hold with its recorded size.
fn artifact_problems(manifest: &Manifest, sizes: &BTreeMap<&str, u64>) -> Vec<String> {
    manifest
        .artifacts()
        .filter_map(|(db, artifact)| match sizes.get(artifact.path.as_str()) {
            None => Some(format!(
                "database {}'s artifact {} is missing",
                db.name, artifact.path
            )),
            Some(&size) if size != artifact.stored_size => Some(format!(
                "database {}'s artifact {} has {size} bytes in storage, the manifest says {}",
                db.name, artifact.path, artifact.stored_size
            )),
            Some(_) => None,
        })
        .collect()
}

/// Why a manifest's window is not a restore point, as its manifest says.
fn invalid_window(manifest: &Manifest) -> String {
    let reasons = &manifest.window.invalid_reasons;
    format!(
        "its manifest says the pause window is not a valid restore point{}",
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join("; "))
        }
    )
}

/// `"latest"` or a backup id. `latest` passes over broken backups, and says so in a
/// warning for each one it skipped (on stderr, through the log).
pub fn resolve<'a>(catalog: &'a Catalog, which: &str) -> Result<&'a Manifest, CatalogError> {
    if which == "latest" {
        for (skipped, why) in catalog.skipped_for_latest() {
            tracing::warn!(
                "`latest` skips backup {}: {}",
                skipped.backup_id,
                why.join("; ")
            );
        }
        return catalog.latest().ok_or_else(|| CatalogError::NoBackups {
            storage: catalog.storage.clone(),
        });
    }
    catalog
        .backups
        .iter()
        .find(|m| m.backup_id == which)
        .ok_or_else(|| {
            let prefix = format!("{BACKUPS_DIR}/{which}/");
            if let Some(damaged) = catalog
                .damaged
                .iter()
                .find(|damaged| damaged.path.starts_with(&prefix))
            {
                return CatalogError::DamagedBackup {
                    id: which.to_owned(),
                    storage: catalog.storage.clone(),
                    error: damaged.error.clone(),
                };
            }
            if catalog
                .orphans
                .iter()
                .any(|orphan| orphan.backup_id == which)
            {
                return CatalogError::IncompleteBackup {
                    id: which.to_owned(),
                    storage: catalog.storage.clone(),
                };
            }
            CatalogError::UnknownBackup {
                id: which.to_owned(),
                storage: catalog.storage.clone(),
                newest: catalog
                    .backups
                    .iter()
                    .take(3)
                    .map(|m| m.backup_id.clone())
                    .collect(),
            }
        })
}

/// The orphans nothing has written to for longer than `grace` (newest object and
/// unfinished upload alike): dead backups, never running ones, as long as `grace` is
/// well above [`crate::backup::HEARTBEAT`].
pub fn stale_orphans(
    catalog: &Catalog,
    now: DateTime<Utc>,
    grace: chrono::TimeDelta,
) -> Vec<&Orphan> {
    catalog
        .orphans
        .iter()
        .filter(|orphan| now - orphan.last_modified > grace)
        .collect()
}

/// Deletes an orphan's objects and unfinished uploads, and returns how many objects
/// it deleted. A backup may commit into the directory meanwhile; the removal and
/// [`manifest::write`] together make sure it is then either withdrawn by its writer
/// or left whole:
///
/// 1. a manifest there now: not an orphan, stop;
/// 2. write the claim (from now on a commit withdraws itself, see `manifest::write`);
/// 3. a manifest there now: a commit landed before the claim, and may or may not
///    have seen it. Remove the claim and stop: the commit is whole either way;
/// 4. delete everything but a manifest (one written now is withdrawn by its writer,
///    which sees the claim or a missing artifact), then the claim, last.
pub async fn remove_orphan(storage: &Storage, orphan: &Orphan) -> Result<usize, CatalogError> {
    let id = &orphan.backup_id;
    let prefix = manifest::backup_prefix(id)?;
    let manifest_path = manifest::manifest_path(id)?;
    let claim = manifest::claim_path(id)?;
    let not_an_orphan = || CatalogError::NotAnOrphan {
        prefix: prefix.clone(),
    };
    if storage.head(&manifest_path).await?.is_some() {
        return Err(not_an_orphan());
    }
    storage
        .put_atomic(&claim, bytes::Bytes::from_static(b"an orphan removal\n"))
        .await?;
    if storage.head(&manifest_path).await?.is_some() {
        storage.delete(&claim).await?;
        return Err(not_an_orphan());
    }
    let mut deleted = 0;
    for object in storage.list(&prefix).await? {
        if object.path == manifest_path || object.path == claim {
            continue;
        }
        storage.delete(&object.path).await?;
        deleted += 1;
    }
    for upload in storage.list_incomplete(&prefix).await? {
        storage.abort_incomplete(&upload).await?;
    }
    storage.delete(&claim).await?;
    Ok(deleted)
}

/// One database's artifact, checked.
#[derive(Debug)]
pub struct ArtifactCheck {
    pub database: String,
    pub outcome: CheckOutcome,
}

#[derive(Debug)]
pub enum CheckOutcome {
    /// The database's cut made no copy.
    NoArtifact,
    Sound(VerifyReport),
    /// Encrypted, and no key was given: only the stored bytes' BLAKE3 and size were
    /// checked (they match). Decryption and decompression were not tried.
    ChecksumOnly {
        stored_size: u64,
    },
    Failed(PipelineError),
}

impl ArtifactCheck {
    pub fn is_sound(&self) -> bool {
        !matches!(self.outcome, CheckOutcome::Failed(_))
    }
}

/// Verifies every artifact of a backup ([`pipeline::verify`]: checksum, decryption,
/// decompression), one after another, and reports each; it does not stop at the
/// first failure. With [`Decryption::None`], encrypted artifacts get the checksum
/// check alone ([`CheckOutcome::ChecksumOnly`]), so a host without the keys can
/// still find damage.
pub async fn verify(
    storage: &Storage,
    manifest: &Manifest,
    decryption: &Decryption,
) -> Vec<ArtifactCheck> {
    let mut checks = Vec::with_capacity(manifest.databases.len());
    for db in &manifest.databases {
        let outcome = match &db.artifact {
            None => CheckOutcome::NoArtifact,
            Some(artifact) if artifact.encryption.is_some() && *decryption == Decryption::None => {
                match pipeline::verify_checksum(storage, artifact).await {
                    Ok(stored_size) => CheckOutcome::ChecksumOnly { stored_size },
                    Err(e) => CheckOutcome::Failed(e),
                }
            }
            Some(artifact) => match pipeline::verify(storage, artifact, decryption).await {
                Ok(report) => CheckOutcome::Sound(report),
                Err(e) => CheckOutcome::Failed(e),
            },
        };
        checks.push(ArtifactCheck {
            database: db.name.clone(),
            outcome,
        });
    }
    checks
}

/// What a retention policy keeps and deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrunePlan {
    /// Newest first, with why each is kept ("last 1", "daily 2024-05-01",
    /// "weekly 2024-W18", "newer than now").
    pub keep: Vec<(String, Vec<String>)>,
    /// Newest first.
    pub delete: Vec<String>,
}

/// How many backups a prune keeps, by rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
}

/// Restic-like retention over the catalog's restore points (by `created_at_ms`, in
/// UTC):
///
/// - `keep_last` N: the N newest restore points;
/// - `keep_daily` D: the newest restore point of each of the D most recent days that
///   have one;
/// - `keep_weekly` W: likewise per ISO week.
///
/// A backup kept by any rule is kept. Only restore points ([`Catalog::is_restorable`])
/// count: an unsafe `--no-pause` copy or a backup with missing artifacts never takes
/// a place a rule would give to a restore point, and no rule keeps it. Backups created
/// after `now` (a clock that was ahead) are always kept: no rule can place them.
/// Fails if every rule is 0, rather than delete everything.
pub fn plan_prune(
    catalog: &Catalog,
    retention: Retention,
    now: DateTime<Utc>,
) -> Result<PrunePlan, CatalogError> {
    plan_retention(
        catalog.backups.iter().map(|manifest| Retained {
            id: manifest.backup_id.clone(),
            at_ms: manifest.created_at_ms,
            eligible: catalog.is_restorable(manifest),
        }),
        retention,
        now,
    )
}

/// One thing a retention policy places: a backup, or a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    pub id: String,
    /// Its time, the one the rules bucket by (UTC).
    pub at_ms: i64,
    /// Whether a rule may keep it (a restore point); one that is not takes no place.
    pub eligible: bool,
}

/// The policy of [`plan_prune`] over any set of timed things (backups, points), so
/// that every kind of restore point is kept by the same rules.
pub fn plan_retention(
    items: impl IntoIterator<Item = Retained>,
    retention: Retention,
    now: DateTime<Utc>,
) -> Result<PrunePlan, CatalogError> {
    if retention == Retention::default() {
        return Err(CatalogError::NoRetentionRule);
    }
    let mut sorted: Vec<Retained> = items.into_iter().collect();
    sorted.sort_by(|a, b| (b.at_ms, &b.id).cmp(&(a.at_ms, &a.id)));

    /// A rule keeps the first item of each new bucket, newest first, while it has
    /// count left. keep-last's bucket is the item itself.
    struct Rule {
        left: usize,
        last_bucket: Option<String>,
    }
    let mut last = Rule {
        left: retention.keep_last,
        last_bucket: None,
    };
    let mut daily = Rule {
        left: retention.keep_daily,
        last_bucket: None,
    };
    let mut weekly = Rule {
        left: retention.keep_weekly,
        last_bucket: None,
    };
    let apply = |rule: &mut Rule, bucket: String, reason: String, reasons: &mut Vec<String>| {
        if rule.left > 0 && rule.last_bucket.as_ref() != Some(&bucket) {
            rule.left -= 1;
            rule.last_bucket = Some(bucket);
            reasons.push(reason);
        }
    };

    let mut plan = PrunePlan::default();
    let mut position = 0usize;
    for item in sorted {
        let created = DateTime::from_timestamp_millis(item.at_ms).unwrap_or_default();
        let mut reasons = Vec::new();
        if created > now {
            reasons.push("newer than now".to_owned());
        } else if item.eligible {
            position += 1;
            apply(
                &mut last,
                item.id.clone(),
                format!("last {position}"),
                &mut reasons,
            );
            let day: NaiveDate = created.date_naive();
            apply(
                &mut daily,
                day.to_string(),
                format!("daily {day}"),
                &mut reasons,
            );
            let week = created.iso_week();
            let week = format!("{}-W{:02}", week.year(), week.week());
            apply(
                &mut weekly,
                week.clone(),
                format!("weekly {week}"),
                &mut reasons,
            );
        }
        if reasons.is_empty() {
            plan.delete.push(item.id);
        } else {
            plan.keep.push((item.id, reasons));
        }
    }
    Ok(plan)
}

/// Refuses a plan that deletes something and keeps no restore point, unless
/// `allow_no_restore_point`: a prune must not turn "some restore point" into "none".
pub fn check_prune(
    catalog: &Catalog,
    plan: &PrunePlan,
    allow_no_restore_point: bool,
) -> Result<(), CatalogError> {
    let keeps_one = plan.keep.iter().any(|(id, _)| {
        catalog
            .backups
            .iter()
            .any(|m| &m.backup_id == id && catalog.is_restorable(m))
    });
    if plan.delete.is_empty() || keeps_one || allow_no_restore_point {
        Ok(())
    } else {
        Err(CatalogError::NoRestorePointLeft {
            storage: catalog.storage.clone(),
            deleting: plan.delete.len(),
        })
    }
}

/// Deletes the backups `plan` marks for deletion: each one's manifest first (from
/// then on it is no longer a backup), then its artifacts. Stops at the first storage
/// error; a backup whose manifest went but whose artifacts did not is an orphan that
/// a later prune or orphan cleanup removes. Returns (backup id, objects deleted).
pub async fn apply_prune(
    storage: &Storage,
    plan: &PrunePlan,
) -> Result<Vec<(String, usize)>, CatalogError> {
    let mut deleted = Vec::with_capacity(plan.delete.len());
    for id in &plan.delete {
        // Checked before anything is deleted: an id is about to become a prefix.
        let manifest_path = manifest::manifest_path(id)?;
        let prefix = manifest::backup_prefix(id)?;
        let stop = |source| CatalogError::Prune {
            backup_id: id.clone(),
            deleted: deleted.len(),
            source,
        };
        storage.delete(&manifest_path).await.map_err(stop)?;
        let objects = storage.delete_prefix(&prefix).await.map_err(stop)?;
        deleted.push((id.clone(), objects + 1));
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use futures::stream::BoxStream;
    use futures::{FutureExt, StreamExt};
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result as OsResult,
    };

    use super::*;
    use crate::manifest::tests::manifest_at;
    use crate::pipeline::{DamageStage, Encryption, PipelineSettings};

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn at_time(text: &str) -> DateTime<Utc> {
        at(text)
    }

    fn storage() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
        (dir, storage)
    }

    /// A committed backup with one real artifact.
    async fn backup(storage: &Storage, when: &str, content: &[u8]) -> Manifest {
        let mut manifest = manifest_at(at(when));
        let path = manifest::artifact_path(
            &manifest.backup_id,
            "ledger",
            "sqlite",
            &PipelineSettings::default(),
        )
        .unwrap();
        let input: crate::adapters::ByteStream = Box::pin(std::io::Cursor::new(content.to_vec()));
        let info = pipeline::store(input, &PipelineSettings::default(), storage, &path, |_| {})
            .await
            .unwrap();
        manifest.databases[0].artifact = Some(info);
        manifest::write(storage, &manifest).await.unwrap();
        manifest
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lists_backups_newest_first_and_sets_the_rest_aside() {
        let (dir, storage) = storage();
        let old = backup(&storage, "2024-05-01T10:00:00Z", b"old").await;
        let new = backup(&storage, "2024-05-02T10:00:00Z", b"new").await;

        // A backup that never committed: artifacts, no manifest.
        let failed_id = manifest::backup_id_at(at("2024-05-03T10:00:00Z"));
        storage
            .put_atomic(
                &format!("backups/{failed_id}/ledger.sqlite"),
                Bytes::from_static(b"xx"),
            )
            .await
            .unwrap();
        // A manifest that does not parse.
        let broken_id = manifest::backup_id_at(at("2024-05-04T10:00:00Z"));
        let broken_path = format!("backups/{broken_id}/manifest.json");
        storage
            .put_atomic(
                &broken_path,
                Bytes::from_static(b"{\"manifest_version\": 1"),
            )
            .await
            .unwrap();
        // Not ours.
        storage
            .put_atomic("backups/README", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        storage
            .put_atomic("backups/notes/x", Bytes::from_static(b"hi"))
            .await
            .unwrap();

        let catalog = list(&storage).await.unwrap();
        let ids: Vec<&str> = catalog
            .backups
            .iter()
            .map(|m| m.backup_id.as_str())
            .collect();
        assert_eq!(ids, [new.backup_id.as_str(), old.backup_id.as_str()]);
        assert_eq!(catalog.backups[0], new);

        assert_eq!(catalog.damaged.len(), 1);
        assert_eq!(catalog.damaged[0].path, broken_path);
        assert!(catalog.damaged[0].error.contains(&broken_path));

        assert_eq!(catalog.orphans().len(), 1);
        let orphan = &catalog.orphans()[0];
        assert_eq!(orphan.backup_id, failed_id);
        assert_eq!((orphan.objects, orphan.bytes), (1, 2));

        assert_eq!(
            resolve(&catalog, "latest").unwrap().backup_id,
            new.backup_id
        );
        assert_eq!(resolve(&catalog, &old.backup_id).unwrap(), &old);
        // An id that is not a backup says what it is: incomplete, damaged, or unknown
        // (with the newest backups named). It said "no backup" for all three.
        let err = resolve(&catalog, &failed_id).unwrap_err();
        assert!(
            matches!(err, CatalogError::IncompleteBackup { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&failed_id), "{err}");
        assert!(err.to_string().contains("no manifest"), "{err}");
        let err = resolve(&catalog, &broken_id).unwrap_err();
        assert!(matches!(err, CatalogError::DamagedBackup { .. }), "{err}");
        assert!(err.to_string().contains(&broken_path), "{err}");
        let unknown = manifest::backup_id_at(at("2024-05-09T10:00:00Z"));
        let err = resolve(&catalog, &unknown).unwrap_err();
        assert!(matches!(err, CatalogError::UnknownBackup { .. }), "{err}");
        assert!(err.to_string().contains(&new.backup_id), "{err}");

        // Orphan cleanup removes the orphan and nothing else, and refuses once the
        // directory has a manifest.
        assert_eq!(remove_orphan(&storage, orphan).await.unwrap(), 1);
        let catalog = list(&storage).await.unwrap();
        assert!(catalog.orphans.is_empty());
        assert_eq!(catalog.backups.len(), 2);
        let fake = Orphan {
            backup_id: new.backup_id.clone(),
            prefix: format!("backups/{}", new.backup_id),
            objects: 2,
            bytes: 0,
            incomplete_uploads: 0,
            hidden_bytes: 0,
            marker: false,
            last_modified: Utc::now(),
        };
        assert!(matches!(
            remove_orphan(&storage, &fake).await,
            Err(CatalogError::NotAnOrphan { .. })
        ));
        assert!(
            dir.path()
                .join(format!("backups/{}/ledger.sqlite", new.backup_id))
                .is_file()
        );
    }

    #[tokio::test]
    async fn an_empty_storage_has_no_latest() {
        let (_dir, storage) = storage();
        let catalog = list(&storage).await.unwrap();
        assert!(catalog.backups.is_empty());
        let err = resolve(&catalog, "latest").unwrap_err();
        assert!(matches!(err, CatalogError::NoBackups { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_reports_every_artifact() {
        let (dir, storage) = storage();
        let mut manifest = backup(&storage, "2024-05-01T10:00:00Z", b"ledger rows").await;
        // A second database whose cut made no copy, and a third whose copy is damaged.
        let mut no_copy = manifest.databases[0].clone();
        no_copy.name = "hook".into();
        no_copy.artifact = None;
        let mut damaged = manifest.databases[0].clone();
        damaged.name = "auditor".into();
        let damaged_path = format!("backups/{}/auditor.sqlite", manifest.backup_id);
        std::fs::write(dir.path().join(&damaged_path), b"ledger rowz").unwrap();
        damaged.artifact.as_mut().unwrap().path = damaged_path.clone();
        manifest.databases.push(no_copy);
        manifest.databases.push(damaged);

        let checks = verify(&storage, &manifest, &Decryption::None).await;
        assert_eq!(checks.len(), 3);
        assert!(matches!(&checks[0].outcome, CheckOutcome::Sound(r) if r.size == 11));
        assert!(matches!(checks[1].outcome, CheckOutcome::NoArtifact));
        assert!(checks[1].is_sound());
        let CheckOutcome::Failed(err) = &checks[2].outcome else {
            panic!("the damaged artifact passed")
        };
        assert_eq!(err.damage(), Some(DamageStage::Checksum));
        assert!(err.to_string().contains(&damaged_path), "{err}");
        assert!(!checks[2].is_sound());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_keys_encrypted_artifacts_get_the_checksum_check() {
        let (dir, storage) = storage();
        let identity = age::x25519::Identity::generate();
        let settings = PipelineSettings {
            zstd_level: Some(3),
            encryption: Encryption::Recipients(vec![identity.to_public().to_string()]),
        };
        let mut manifest = manifest_at(at("2024-05-01T10:00:00Z"));
        let path =
            manifest::artifact_path(&manifest.backup_id, "ledger", "sqlite", &settings).unwrap();
        let input: crate::adapters::ByteStream = Box::pin(std::io::Cursor::new(vec![7u8; 5000]));
        let info = pipeline::store(input, &settings, &storage, &path, |_| {})
            .await
            .unwrap();
        manifest.databases[0].artifact = Some(info.clone());

        let checks = verify(&storage, &manifest, &Decryption::None).await;
        assert!(
            matches!(checks[0].outcome, CheckOutcome::ChecksumOnly { stored_size } if stored_size == info.stored_size),
            "{:?}",
            checks[0].outcome
        );
        let file = dir.path().join(&path);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.pop();
        std::fs::write(&file, bytes).unwrap();
        let checks = verify(&storage, &manifest, &Decryption::None).await;
        let CheckOutcome::Failed(err) = &checks[0].outcome else {
            panic!("a truncated artifact passed: {:?}", checks[0].outcome)
        };
        assert_eq!(err.damage(), Some(DamageStage::Checksum));
    }

    fn manifests(times: &[&str]) -> Vec<Manifest> {
        times.iter().map(|t| manifest_at(at(t))).collect()
    }

    /// A catalog of these backups, newest first as `list` gives them.
    fn catalog_of(backups: &[Manifest]) -> Catalog {
        let mut backups = backups.to_vec();
        backups.sort_by_key(|b| std::cmp::Reverse(b.created_at_ms));
        Catalog {
            backups,
            ..Catalog::default()
        }
    }

    fn rules(keep_last: usize, keep_daily: usize, keep_weekly: usize) -> Retention {
        Retention {
            keep_last,
            keep_daily,
            keep_weekly,
        }
    }

    /// Runs the policy and returns the kept backups' times, newest first.
    fn kept(backups: &[Manifest], last: usize, daily: usize, weekly: usize) -> Vec<String> {
        let plan = plan_prune(
            &catalog_of(backups),
            rules(last, daily, weekly),
            at("2024-06-01T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(plan.keep.len() + plan.delete.len(), backups.len());
        plan.keep
            .iter()
            .map(|(id, _)| {
                let m = backups.iter().find(|m| &m.backup_id == id).unwrap();
                DateTime::from_timestamp_millis(m.created_at_ms)
                    .unwrap()
                    .format("%m-%d %H:%M")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn retention_table() {
        // Wed 1 May 2024 … ; ISO week 18 is 29 Apr–5 May, week 19 is 6–12 May.
        let backups = manifests(&[
            "2024-05-01T01:00:00Z",
            "2024-05-01T13:00:00Z",
            "2024-05-02T01:00:00Z",
            "2024-05-02T13:00:00Z",
            "2024-05-04T01:00:00Z",
            "2024-05-06T01:00:00Z",
            "2024-05-07T01:00:00Z",
            "2024-05-07T13:00:00Z",
            "2024-05-14T01:00:00Z",
        ]);
        type Case = (usize, usize, usize, &'static [&'static str]);
        let table: &[Case] = &[
            (1, 0, 0, &["05-14 01:00"]),
            (3, 0, 0, &["05-14 01:00", "05-07 13:00", "05-07 01:00"]),
            // Newest of each of the 3 most recent days with backups (no backups on
            // 8–13 May: those days do not count).
            (0, 3, 0, &["05-14 01:00", "05-07 13:00", "05-06 01:00"]),
            // Newest per ISO week: week 20, 19, 18.
            (0, 0, 3, &["05-14 01:00", "05-07 13:00", "05-04 01:00"]),
            // Rules overlap: here all three keep the same two backups.
            (2, 2, 2, &["05-14 01:00", "05-07 13:00"]),
            // Rules combine: a backup kept by any is kept.
            (
                3,
                0,
                3,
                &["05-14 01:00", "05-07 13:00", "05-07 01:00", "05-04 01:00"],
            ),
            (
                1,
                5,
                0,
                &[
                    "05-14 01:00",
                    "05-07 13:00",
                    "05-06 01:00",
                    "05-04 01:00",
                    "05-02 13:00",
                ],
            ),
            // More than there are: keep everything that qualifies.
            (
                0,
                100,
                0,
                &[
                    "05-14 01:00",
                    "05-07 13:00",
                    "05-06 01:00",
                    "05-04 01:00",
                    "05-02 13:00",
                    "05-01 13:00",
                ],
            ),
            (
                100,
                0,
                0,
                &[
                    "05-14 01:00",
                    "05-07 13:00",
                    "05-07 01:00",
                    "05-06 01:00",
                    "05-04 01:00",
                    "05-02 13:00",
                    "05-02 01:00",
                    "05-01 13:00",
                    "05-01 01:00",
                ],
            ),
        ];
        for &(last, daily, weekly, expected) in table {
            assert_eq!(
                kept(&backups, last, daily, weekly),
                expected,
                "keep_last {last}, keep_daily {daily}, keep_weekly {weekly}"
            );
        }
        // The order the manifests come in does not matter.
        let mut shuffled = backups.clone();
        shuffled.reverse();
        shuffled.swap(2, 5);
        assert_eq!(kept(&shuffled, 0, 3, 0), kept(&backups, 0, 3, 0));
    }

    #[test]
    fn retention_reasons_and_safety() {
        let backups = manifests(&[
            "2024-05-06T01:00:00Z",
            "2024-05-07T01:00:00Z",
            // A coordinator clock that ran ahead.
            "2024-07-01T00:00:00Z",
        ]);
        let plan = plan_prune(
            &catalog_of(&backups),
            rules(1, 2, 1),
            at("2024-06-01T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(plan.keep.len(), 3);
        assert_eq!(plan.keep[0].1, ["newer than now"]);
        assert_eq!(
            plan.keep[1].1,
            ["last 1", "daily 2024-05-07", "weekly 2024-W19"]
        );
        assert_eq!(plan.keep[2].1, ["daily 2024-05-06"]);
        assert!(plan.delete.is_empty());

        assert!(matches!(
            plan_prune(&catalog_of(&backups), rules(0, 0, 0), Utc::now()),
            Err(CatalogError::NoRetentionRule)
        ));
        // Any rule above 0 keeps at least the newest backup.
        for (l, d, w) in [(1, 0, 0), (0, 1, 0), (0, 0, 1)] {
            let plan = plan_prune(
                &catalog_of(&backups[..2]),
                rules(l, d, w),
                at("2024-06-01T00:00:00Z"),
            )
            .unwrap();
            assert_eq!(plan.keep.len(), 1);
            assert_eq!(plan.keep[0].0, backups[1].backup_id);
            assert_eq!(plan.delete, [backups[0].backup_id.clone()]);
        }
        assert_eq!(
            plan_prune(&Catalog::default(), rules(1, 1, 1), Utc::now()).unwrap(),
            PrunePlan::default()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prune_deletes_what_the_plan_says() {
        let (dir, storage) = storage();
        let a = backup(&storage, "2024-05-01T10:00:00Z", b"a").await;
        let b = backup(&storage, "2024-05-02T10:00:00Z", b"b").await;
        let c = backup(&storage, "2024-05-03T10:00:00Z", b"c").await;
        let catalog = list(&storage).await.unwrap();
        let plan = plan_prune(&catalog, rules(1, 0, 0), at("2024-06-01T00:00:00Z")).unwrap();
        assert_eq!(plan.delete, [b.backup_id.clone(), a.backup_id.clone()]);

        let deleted = apply_prune(&storage, &plan).await.unwrap();
        assert_eq!(
            deleted,
            [(b.backup_id.clone(), 2), (a.backup_id.clone(), 2)]
        );
        let catalog = list(&storage).await.unwrap();
        assert_eq!(catalog.backups, std::slice::from_ref(&c));
        assert!(catalog.orphans.is_empty());
        assert!(!dir.path().join(format!("backups/{}", a.backup_id)).exists());

        // A plan holding something that is not a backup id deletes nothing.
        let bogus = PrunePlan {
            keep: vec![],
            delete: vec!["".into()],
        };
        assert!(apply_prune(&storage, &bogus).await.is_err());
        assert_eq!(storage.list("").await.unwrap().len(), 2);
    }

    /// An in-memory store that refuses to delete artifacts (anything but manifests),
    /// as a storage outage halfway through a prune would.
    #[derive(Debug)]
    struct ArtifactsUndeletable(Arc<InMemory>);

    impl std::fmt::Display for ArtifactsUndeletable {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("ArtifactsUndeletable")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for ArtifactsUndeletable {
        async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> OsResult<PutResult> {
            self.0.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &Path,
            o: PutMultipartOptions,
        ) -> OsResult<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> OsResult<GetResult> {
            self.0.get_opts(l, o).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, OsResult<Path>>,
        ) -> BoxStream<'static, OsResult<Path>> {
            let inner = Arc::clone(&self.0);
            locations
                .then(move |location| {
                    let inner = Arc::clone(&inner);
                    async move {
                        let location = location?;
                        if !location.as_ref().ends_with(MANIFEST_FILE) {
                            return Err(object_store::Error::Generic {
                                store: "test",
                                source: "service unavailable".into(),
                            });
                        }
                        inner.delete(&location).await.map(|()| location)
                    }
                })
                .boxed()
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, OsResult<ObjectMeta>> {
            self.0.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> OsResult<ListResult> {
            self.0.list_with_delimiter(prefix).await
        }
        async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> OsResult<()> {
            self.0.copy_opts(from, to, o).await
        }
    }

    /// The manifest goes first: when deleting the artifacts fails, what remains is an
    /// orphan, never a listed backup with missing artifacts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_pruned_backup_is_not_listed() {
        let store = Arc::new(ArtifactsUndeletable(Arc::new(InMemory::new())));
        let storage = Storage::from_object_store(store, "memory://test");
        let a = backup(&storage, "2024-05-01T10:00:00Z", b"a").await;
        let b = backup(&storage, "2024-05-02T10:00:00Z", b"b").await;
        let plan = PrunePlan {
            keep: vec![(b.backup_id.clone(), vec!["last 1".into()])],
            delete: vec![a.backup_id.clone()],
        };
        let err = apply_prune(&storage, &plan).await.unwrap_err();
        assert!(err.to_string().contains(&a.backup_id), "{err}");
        assert!(err.to_string().contains("service unavailable"), "{err}");

        let catalog = list(&storage).await.unwrap();
        assert_eq!(catalog.backups, [b]);
        assert_eq!(catalog.orphans.len(), 1);
        assert_eq!(catalog.orphans[0].backup_id, a.backup_id);
    }

    /// Issue 18.2: unsafe copies and broken backups never take a place a rule gives to
    /// a restore point, and a plan that would keep no restore point is refused.
    #[test]
    fn only_restore_points_count_toward_retention() {
        let mut backups = manifests(&[
            "2024-05-06T01:00:00Z",
            "2024-05-07T01:00:00Z",
            "2024-05-08T01:00:00Z",
            "2024-05-09T01:00:00Z",
        ]);
        backups[3].unsafe_no_pause = true;
        let mut catalog = catalog_of(&backups);
        catalog.problems.insert(
            backups[2].backup_id.clone(),
            vec!["database ledger's artifact x is missing".to_owned()],
        );
        let plan = plan_prune(&catalog, rules(1, 0, 0), at("2024-06-01T00:00:00Z")).unwrap();
        assert_eq!(
            plan.keep,
            [(backups[1].backup_id.clone(), vec!["last 1".to_owned()])]
        );
        assert_eq!(plan.delete.len(), 3);
        assert!(check_prune(&catalog, &plan, false).is_ok());
        assert_eq!(catalog.latest(), Some(&backups[1]));

        // Nothing but an unsafe copy: deleting it would leave no restore point (there
        // was none either), so the plan is refused unless allowed.
        let only_unsafe = catalog_of(&backups[3..]);
        let plan = plan_prune(&only_unsafe, rules(1, 0, 0), at("2024-06-01T00:00:00Z")).unwrap();
        assert_eq!(plan.delete, [backups[3].backup_id.clone()]);
        let err = check_prune(&only_unsafe, &plan, false).unwrap_err();
        assert!(
            matches!(err, CatalogError::NoRestorePointLeft { .. }),
            "{err}"
        );
        assert!(check_prune(&only_unsafe, &plan, true).is_ok());
        // A plan that deletes nothing is never refused.
        assert!(check_prune(&Catalog::default(), &PrunePlan::default(), false).is_ok());
    }

    /// A manifest that says its window is not a valid restore point (hand-edited, or
    /// written by something other than `manifest::write`, which refuses one) was
    /// `latest`, listed as "restorable" and counted by retention as a restore point.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_manifest_whose_window_is_invalid_is_not_a_restore_point() {
        let (dir, storage) = storage();
        let old = backup(&storage, "2024-05-01T10:00:00Z", b"old").await;
        let new = backup(&storage, "2024-05-02T10:00:00Z", b"new").await;
        let path = dir
            .path()
            .join(manifest::manifest_path(&new.backup_id).unwrap());
        let mut edited: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edited["window"]["window_valid"] = false.into();
        edited["window"]["invalid_reasons"] = serde_json::json!(["node a restarted"]);
        std::fs::write(&path, serde_json::to_vec(&edited).unwrap()).unwrap();

        let catalog = list(&storage).await.unwrap();
        assert_eq!(catalog.backups.len(), 2, "it is still listed");
        assert!(!catalog.is_restorable(&catalog.backups[0]));
        assert_eq!(
            resolve(&catalog, "latest").unwrap().backup_id,
            old.backup_id
        );
        let skipped = catalog.skipped_for_latest();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0.backup_id, new.backup_id);
        assert!(
            skipped[0].1[0].contains("not a valid restore point (node a restarted)"),
            "{:?}",
            skipped[0].1
        );
        // Retention keeps the restore point, not the invalid window.
        let plan = plan_prune(&catalog, rules(1, 0, 0), at("2024-06-01T00:00:00Z")).unwrap();
        assert_eq!(
            plan.keep,
            [(old.backup_id.clone(), vec!["last 1".to_owned()])]
        );
        assert_eq!(plan.delete, std::slice::from_ref(&new.backup_id));
    }

    /// A store that runs `hook` once, just before its `at`-th operation: a backup's
    /// commit landing at that point of an orphan removal.
    struct Interleave {
        inner: Arc<InMemory>,
        at: usize,
        ops: std::sync::atomic::AtomicUsize,
        hook: std::sync::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    }

    impl std::fmt::Debug for Interleave {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Interleave")
        }
    }

    impl std::fmt::Display for Interleave {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Interleave")
        }
    }

    impl Interleave {
        fn before(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
            let n = self.ops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n == self.at {
                self.hook.lock().unwrap().take()
            } else {
                None
            }
        }

        fn fired(&self) -> bool {
            self.hook.lock().unwrap().is_none()
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Interleave {
        async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> OsResult<PutResult> {
            if let Some(hook) = self.before() {
                hook.await;
            }
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &Path,
            o: PutMultipartOptions,
        ) -> OsResult<Box<dyn MultipartUpload>> {
            if let Some(hook) = self.before() {
                hook.await;
            }
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> OsResult<GetResult> {
            if let Some(hook) = self.before() {
                hook.await;
            }
            self.inner.get_opts(l, o).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, OsResult<Path>>,
        ) -> BoxStream<'static, OsResult<Path>> {
            let hook = self.before();
            let inner = Arc::clone(&self.inner);
            futures::stream::once(async move {
                if let Some(hook) = hook {
                    hook.await;
                }
                inner.delete_stream(locations)
            })
            .flatten()
            .boxed()
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, OsResult<ObjectMeta>> {
            let hook = self.before();
            let inner = Arc::clone(&self.inner);
            let prefix = prefix.cloned();
            futures::stream::once(async move {
                if let Some(hook) = hook {
                    hook.await;
                }
                inner.list(prefix.as_ref())
            })
            .flatten()
            .boxed()
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> OsResult<ListResult> {
            if let Some(hook) = self.before() {
                hook.await;
            }
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> OsResult<()> {
            if let Some(hook) = self.before() {
                hook.await;
            }
            self.inner.copy_opts(from, to, o).await
        }
    }

    /// Settles issue 18's race: `remove_orphan` checked for a manifest, then deleted
    /// the whole directory, so a commit landing in between lost the backup (its
    /// artifacts, and its manifest too). Whichever step of the removal the commit
    /// lands before, the commit either fails (and the backup is not listed) or the
    /// backup stays listed with every artifact intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_racing_an_orphan_removal_is_never_lost() {
        let mut interleavings = 0;
        for at in 0.. {
            let inner = Arc::new(InMemory::new());
            let plain = Storage::from_object_store(inner.clone(), "memory://plain");
            // A backup about to commit: its artifact is stored, its manifest is not.
            let mut manifest = manifest_at(at_time("2024-05-01T10:00:00Z"));
            let path = manifest::artifact_path(
                &manifest.backup_id,
                "ledger",
                "sqlite",
                &PipelineSettings::default(),
            )
            .unwrap();
            let input: crate::adapters::ByteStream =
                Box::pin(std::io::Cursor::new(b"rows".to_vec()));
            let info = pipeline::store(input, &PipelineSettings::default(), &plain, &path, |_| {})
                .await
                .unwrap();
            manifest.databases[0].artifact = Some(info);
            let catalog = list(&plain).await.unwrap();
            assert_eq!(catalog.orphans.len(), 1);
            let orphan = catalog.orphans[0].clone();

            let committed = Arc::new(std::sync::Mutex::new(None));
            let hook = {
                let (plain, manifest, committed) =
                    (plain.clone(), manifest.clone(), Arc::clone(&committed));
                async move {
                    let result = manifest::write(&plain, &manifest).await;
                    *committed.lock().unwrap() = Some(result.is_ok());
                }
                .boxed()
            };
            let hooked = Arc::new(Interleave {
                inner: inner.clone(),
                at,
                ops: Default::default(),
                hook: std::sync::Mutex::new(Some(hook)),
            });
            let storage = Storage::from_object_store(hooked.clone(), "memory://hooked");
            let _ = remove_orphan(&storage, &orphan).await;
            if !hooked.fired() {
                // The removal took fewer steps than `at`: every interleaving was tried.
                break;
            }
            interleavings += 1;
            let committed = committed.lock().unwrap().expect("the commit ran");
            let after = list(&plain).await.unwrap();
            if committed {
                assert_eq!(
                    after.backups,
                    std::slice::from_ref(&manifest),
                    "commit before step {at}: the committed backup is not listed"
                );
                let checks = verify(&plain, &manifest, &Decryption::None).await;
                assert!(
                    checks.iter().all(ArtifactCheck::is_sound),
                    "commit before step {at}: the committed backup lost an artifact: {checks:?}"
                );
            } else {
                assert!(
                    after.backups.is_empty(),
                    "commit before step {at} failed, yet a backup is listed"
                );
            }
        }
        assert!(interleavings >= 2, "{interleavings}");
    }

    /// moto_server on a free port with one bucket, `bucket`; killed on drop.
    struct Moto {
        child: std::process::Child,
        endpoint: String,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Moto {
        fn start() -> Moto {
            let port = stillpoint_testkit::free_port();
            let child = std::process::Command::new("moto_server")
                .args(["-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("moto_server (scripts/install-packages installs it)");
            let moto = Moto {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "moto_server never listened"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            moto.python("s3.create_bucket(Bucket='bucket')");
            moto
        }

        /// Runs Python with `s3`, a boto3 client of this server; returns its stdout.
        fn python(&self, code: &str) -> String {
            let script = format!(
                "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', \
                 aws_access_key_id='k', aws_secret_access_key='s', region_name='us-east-1')\n\
                 {code}\n",
                self.endpoint
            );
            let output = std::process::Command::new("python3")
                .args(["-c", &script])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{code}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }

        fn storage(&self, prefix: &str) -> Storage {
            let options = BTreeMap::from(
                [
                    ("endpoint", self.endpoint.as_str()),
                    ("allow_http", "true"),
                    ("region", "us-east-1"),
                    ("access_key_id", "k"),
                    ("secret_access_key", "s"),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
            );
            Storage::open_with_options(&format!("s3://bucket/{prefix}"), &options).unwrap()
        }
    }

    /// Issue 19.9: an S3 multipart upload a killed backup left behind is found under
    /// its backup's directory, makes that directory an orphan, and is aborted with it
    /// once the orphan is stale; an upload outside the backups is not ours.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn incomplete_s3_multipart_uploads_are_aborted_with_their_orphan() {
        let moto = Moto::start();
        let storage = moto.storage("team/prod");
        let id = manifest::backup_id_at(at("2024-05-01T10:00:00Z"));
        let start_upload = |key: &str| {
            moto.python(&format!(
                "u = s3.create_multipart_upload(Bucket='bucket', Key='{key}')\n\
                 s3.upload_part(Bucket='bucket', Key='{key}', UploadId=u['UploadId'], \
                 PartNumber=1, Body=b'x' * (5 * 1024 * 1024))"
            ))
        };
        start_upload(&format!("team/prod/backups/{id}/blobs.bin"));
        start_upload("team/prod/elsewhere/other.bin");
        let count = || {
            moto.python("print(len(s3.list_multipart_uploads(Bucket='bucket').get('Uploads', [])))")
        };
        assert_eq!(count(), "2");

        let catalog = list(&storage).await.unwrap();
        assert_eq!(catalog.orphans.len(), 1, "{catalog:?}");
        let orphan = &catalog.orphans[0];
        assert_eq!(
            (orphan.backup_id.as_str(), orphan.objects),
            (id.as_str(), 0)
        );
        assert_eq!(orphan.incomplete_uploads, 1);
        let found = storage.list_incomplete("backups").await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, format!("backups/{id}/blobs.bin"));

        // Not stale yet as far as a clock before its start says; stale two hours on.
        let grace = chrono::TimeDelta::hours(1);
        let started = found[0].last_modified;
        assert!(stale_orphans(&catalog, started, grace).is_empty());
        let stale = stale_orphans(&catalog, started + chrono::TimeDelta::hours(2), grace);
        assert_eq!(stale.len(), 1);
        remove_orphan(&storage, stale[0]).await.unwrap();
        assert!(storage.list_incomplete("backups").await.unwrap().is_empty());
        assert_eq!(count(), "1", "the upload outside backups/ was touched");
        let catalog = list(&storage).await.unwrap();
        assert!(catalog.orphans.is_empty(), "{catalog:?}");
    }

    /// Issue 18.7: object_store's hidden in-progress file of a local upload (`name#N`)
    /// counts toward its directory, and goes with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_in_progress_files_are_found_and_removed_with_their_orphan() {
        let (dir, storage) = storage();
        let id = manifest::backup_id_at(at("2024-05-01T10:00:00Z"));
        let backup_dir = dir.path().join("backups").join(&id);
        std::fs::create_dir_all(&backup_dir).unwrap();
        std::fs::write(backup_dir.join("blobs.bin#1"), vec![0u8; 1000]).unwrap();
        // Not ours: outside any backup's directory, or not object_store's pattern.
        std::fs::write(dir.path().join("backups/notes#1"), b"x").unwrap();
        std::fs::write(backup_dir.join("odd#name"), b"x").unwrap();

        let catalog = list(&storage).await.unwrap();
        assert_eq!(catalog.orphans.len(), 1, "{catalog:?}");
        let orphan = &catalog.orphans[0];
        assert_eq!((orphan.incomplete_uploads, orphan.hidden_bytes), (1, 1000));
        assert_eq!(orphan.objects, 1, "odd#name is an ordinary object");
        remove_orphan(&storage, orphan).await.unwrap();
        assert!(!backup_dir.exists());
        assert!(dir.path().join("backups/notes#1").exists());
    }
}
