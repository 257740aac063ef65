//! The backup manifest: the versioned JSON document written last, whose presence is
//! the commit point of a backup. A backup exists iff `backups/<id>/manifest.json`
//! exists (docs/manifest.md documents every field).
//!
//! This module owns the schema, the storage layout (where a backup's manifest and
//! artifacts live), backup ids, and reading and writing manifests. Listing, verifying
//! and pruning many backups is `catalog`'s job.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::adapters::CutMarker;
use crate::coordinator::PauseReport;
use crate::pipeline::{ArtifactInfo, PipelineSettings};
use crate::storage::{Storage, StorageError};

/// The schema version this stillpoint writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// The only status a written manifest has: it is written after everything else.
pub const STATUS_COMMITTED: &str = "committed";
/// Every backup lives under this directory of the storage.
pub const BACKUPS_DIR: &str = "backups";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Written by a backup before anything else (after the storage probe) and rewritten
/// while it runs, so that its directory's newest object is never older than the
/// heartbeat: an orphan cleanup then never mistakes a running backup for a dead one,
/// even while its big artifact is still an invisible, unfinished upload. Deleted
/// after the commit.
pub const MARKER_FILE: &str = "in-progress.json";
/// Written by an orphan removal before it deletes anything: a backup that commits
/// meanwhile finds it and withdraws its manifest (see `write`).
pub const CLAIM_FILE: &str = "removing";
/// What the storage probe writes and deletes again, before the pause.
pub const PROBE_FILE: &str = "probe";
/// Files of a backup's directory that are not artifacts.
const RESERVED_FILES: [&str; 4] = [MANIFEST_FILE, MARKER_FILE, CLAIM_FILE, PROBE_FILE];

/// `YYYYMMDDTHHMMSSZ`, the time part of a backup id.
const ID_TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";
const ID_LEN: usize = "20240501T120000Z-a1b2c3".len();

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    /// `YYYYMMDDTHHMMSSZ-<6 hex>`: sorts by time.
    pub backup_id: String,
    /// The cluster's name from the runbook (free text).
    pub cluster: String,
    pub pause_id: String,
    /// When the manifest was written, Unix ms on the coordinator's clock.
    pub created_at_ms: i64,
    /// The pause window, exactly as `stillpoint unpause` prints it: its
    /// `restore_point_timestamp_ms` is the point-in-time-restore target.
    pub window: PauseReport,
    pub databases: Vec<DatabaseEntry>,
    /// The stillpoint version that wrote the manifest.
    pub tool_version: String,
    /// Always "committed".
    pub status: String,
    pub timings: Timings,
    /// Taken with `backup --no-pause --i-know-this-is-unsafe`: the copies were cut
    /// without pausing the cluster and are not a consistent restore point. Absent
    /// (false) in every normal backup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsafe_no_pause: bool,
}

/// One database of the cluster in one backup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseEntry {
    /// The database's name in the runbook.
    pub name: String,
    /// e.g. "ledger", "auditor": what the database is to the application.
    pub role: Option<String>,
    /// The adapter kind: "sqlite", "postgres", "mariadb", "exec".
    pub adapter: String,
    /// What fixed its consistent state inside the pause.
    pub cut: CutMarker,
    /// The copy, if the adapter made one (an `exec` cut may not).
    pub artifact: Option<ArtifactInfo>,
    /// Rows per table at the cut, where the adapter counted them.
    pub row_counts: Option<BTreeMap<String, u64>>,
}

/// How long each phase took, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    pub prepare_ms: u64,
    /// Pausing every node (drain included).
    pub pause_ms: u64,
    /// The cuts, inside the pause.
    pub cut_ms: u64,
    /// Streaming every copy to storage, after unpause.
    pub copy_ms: u64,
    pub total_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "{id:?} is not a backup id; backup ids look like 20240501T120000Z-a1b2c3 (`stillpoint list` shows them)"
    )]
    InvalidBackupId { id: String },
    #[error(
        "database name {name:?} cannot be part of an artifact path; use letters, digits, '.', '_' and '-', not starting with '.'"
    )]
    InvalidDatabaseName { name: String },
    #[error("backup {backup_id} does not exist: there is no {path}")]
    NotFound { backup_id: String, path: String },
    #[error("manifest {path} is not a valid version-{MANIFEST_VERSION} manifest: {error}")]
    Parse {
        path: String,
        #[source]
        error: serde_json::Error,
    },
    #[error("manifest {path} has manifest_version {version}, but this stillpoint ({}) reads version {MANIFEST_VERSION}; use a newer stillpoint", env!("CARGO_PKG_VERSION"))]
    UnsupportedVersion { path: String, version: u64 },
    #[error(
        "manifest {path} says backup_id {found:?}; a manifest must live under its own backup's directory"
    )]
    WrongBackup { path: String, found: String },
    #[error("manifest {path} has status {status:?}, not \"committed\"")]
    NotCommitted { path: String, status: String },
    #[error(
        "manifest {path}: database {database}'s artifact {artifact} is not a file of this backup's directory {prefix}; the manifest was edited or belongs elsewhere"
    )]
    ArtifactOutside {
        path: String,
        database: String,
        artifact: String,
        prefix: String,
    },
    #[error(
        "manifest {path} lists database {database:?} twice; a backup has one entry per database (the runbook refuses duplicates), so the manifest was edited"
    )]
    DuplicateDatabase { path: String, database: String },
    #[error(
        "backup {backup_id}: {problem} after its manifest was written: an orphan cleanup (`stillpoint prune`) removed the backup while it committed; {withdrawn}"
    )]
    Withdrawn {
        backup_id: String,
        problem: String,
        withdrawn: String,
    },
    #[error(
        "backup {backup_id}: not committing, the pause window is not a valid restore point: {reasons}"
    )]
    InvalidWindow { backup_id: String, reasons: String },
    #[error("backup {backup_id}: not committing, database {database}'s artifact {path} {problem}")]
    BadArtifact {
        backup_id: String,
        database: String,
        path: String,
        problem: String,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A new backup id for a backup starting now.
pub fn new_backup_id() -> String {
    backup_id_at(Utc::now())
}

/// A backup id for a backup started at `at`: the UTC second, then 6 random hex
/// digits so two backups in the same second do not collide.
pub fn backup_id_at(at: DateTime<Utc>) -> String {
    let random = uuid::Uuid::new_v4();
    let suffix: String = random.as_bytes()[..3]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}-{suffix}", at.format(ID_TIME_FORMAT))
}

/// The time a backup id was made, or an error if `id` is not a backup id. Ids are
/// checked before they become storage paths, so no id can reach outside its backup.
pub fn parse_backup_id(id: &str) -> Result<DateTime<Utc>, ManifestError> {
    let invalid = || ManifestError::InvalidBackupId { id: id.to_owned() };
    if id.len() != ID_LEN || !id.is_ascii() {
        return Err(invalid());
    }
    let (time, suffix) = id.split_at(ID_LEN - 7);
    let suffix = suffix.strip_prefix('-').ok_or_else(invalid)?;
    if !suffix
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid());
    }
    NaiveDateTime::parse_from_str(time, ID_TIME_FORMAT)
        .map(|t| t.and_utc())
        .map_err(|_| invalid())
}

/// `backups/<id>`: everything of one backup is under it.
pub fn backup_prefix(backup_id: &str) -> Result<String, ManifestError> {
    parse_backup_id(backup_id)?;
    Ok(format!("{BACKUPS_DIR}/{backup_id}"))
}

/// `backups/<id>/manifest.json`
pub fn manifest_path(backup_id: &str) -> Result<String, ManifestError> {
    Ok(format!("{}/{MANIFEST_FILE}", backup_prefix(backup_id)?))
}

/// `backups/<id>/in-progress.json`: see [`MARKER_FILE`].
pub fn marker_path(backup_id: &str) -> Result<String, ManifestError> {
    Ok(format!("{}/{MARKER_FILE}", backup_prefix(backup_id)?))
}

/// `backups/<id>/removing`: see [`CLAIM_FILE`].
pub fn claim_path(backup_id: &str) -> Result<String, ManifestError> {
    Ok(format!("{}/{CLAIM_FILE}", backup_prefix(backup_id)?))
}

/// `backups/<id>/probe`: see [`PROBE_FILE`].
pub fn probe_path(backup_id: &str) -> Result<String, ManifestError> {
    Ok(format!("{}/{PROBE_FILE}", backup_prefix(backup_id)?))
}

/// What a running backup's marker says, for people looking at the storage; only the
/// object's time matters to stillpoint.
pub fn marker_json(backup_id: &str, started_at_ms: i64) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(&serde_json::json!({
        "backup_id": backup_id,
        "started_at_ms": started_at_ms,
        "pid": std::process::id(),
        "note": "a backup is writing this directory; it deletes this file after its manifest",
    }))
    .unwrap_or_default();
    json.push(b'\n');
    json
}

/// `backups/<id>/<database>.<extension>[.zst][.age]`, where `extension` is the
/// adapter's (`Adapter::artifact_extension`) and the suffixes follow the stages.
pub fn artifact_path(
    backup_id: &str,
    database: &str,
    extension: &str,
    settings: &PipelineSettings,
) -> Result<String, ManifestError> {
    let name = format!("{database}.{extension}{}", settings.suffix());
    let valid = !database.is_empty()
        && !database.starts_with('.')
        && database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        // e.g. "manifest" would make the artifact of a `json` adapter the manifest.
        && !RESERVED_FILES.contains(&name.as_str());
    if !valid {
        return Err(ManifestError::InvalidDatabaseName {
            name: database.to_owned(),
        });
    }
    Ok(format!("{}/{name}", backup_prefix(backup_id)?))
}

/// Whether `artifact` names a file directly inside its backup's directory, and not
/// one of the directory's own files: prune deletes a backup by its directory, so an
/// artifact anywhere else would be shared or leak.
fn is_own_artifact(backup_id: &str, artifact: &str) -> bool {
    artifact
        .strip_prefix(BACKUPS_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_prefix(backup_id))
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|name| {
            !name.is_empty() && !name.contains('/') && !RESERVED_FILES.contains(&name)
        })
}

impl Manifest {
    /// The point-in-time-restore target: the mid-time of the pause window.
    pub fn restore_point_ms(&self) -> Option<i64> {
        self.window.restore_point_timestamp_ms
    }

    /// The artifacts, with the database each belongs to.
    pub fn artifacts(&self) -> impl Iterator<Item = (&DatabaseEntry, &ArtifactInfo)> {
        self.databases
            .iter()
            .filter_map(|db| db.artifact.as_ref().map(|a| (db, a)))
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs with string keys cannot fail.
        let mut json = serde_json::to_vec_pretty(self).unwrap_or_default();
        json.push(b'\n');
        json
    }
}

/// Parses a manifest read from `path` (used for error messages).
pub fn parse(path: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
    // Look at the version before the schema, so a newer manifest gets "upgrade"
    // rather than a confusing missing-field error.
    #[derive(serde::Deserialize)]
    struct Version {
        manifest_version: u64,
    }
    let version: Version = serde_json::from_slice(bytes).map_err(|error| ManifestError::Parse {
        path: path.to_owned(),
        error,
    })?;
    if version.manifest_version != u64::from(MANIFEST_VERSION) {
        return Err(ManifestError::UnsupportedVersion {
            path: path.to_owned(),
            version: version.manifest_version,
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|error| ManifestError::Parse {
            path: path.to_owned(),
            error,
        })?;
    if manifest.status != STATUS_COMMITTED {
        return Err(ManifestError::NotCommitted {
            path: path.to_owned(),
            status: manifest.status,
        });
    }
    // Restores, verifies and drills find a database by its name.
    let mut names = std::collections::BTreeSet::new();
    if let Some(db) = manifest
        .databases
        .iter()
        .find(|db| !names.insert(db.name.as_str()))
    {
        return Err(ManifestError::DuplicateDatabase {
            path: path.to_owned(),
            database: db.name.clone(),
        });
    }
    // What `write` refuses, a manifest read back must not get away with either.
    for (db, artifact) in manifest.artifacts() {
        if !is_own_artifact(&manifest.backup_id, &artifact.path) {
            return Err(ManifestError::ArtifactOutside {
                path: path.to_owned(),
                database: db.name.clone(),
                artifact: artifact.path.clone(),
                prefix: format!("{BACKUPS_DIR}/{}/", manifest.backup_id),
            });
        }
    }
    Ok(manifest)
}

/// Commits a backup: checks that the window is a valid restore point and that every
/// artifact is in storage, under the backup's directory, with the size the manifest
/// records; then writes the manifest with one atomic PUT. Call it last: until it
/// returns, the backup does not exist.
///
/// An orphan removal (`catalog::remove_orphan`) may be deleting this directory at the
/// same time, if the backup's marker went stale. It writes its claim before it
/// deletes anything and deletes the claim last, so after the PUT, `write` looks again:
/// a claim, or an artifact gone, means the removal is under way, and the manifest is
/// withdrawn. Either the backup is listed whole, or it fails and is not listed.
pub async fn write(storage: &Storage, manifest: &Manifest) -> Result<(), ManifestError> {
    let id = &manifest.backup_id;
    let path = manifest_path(id)?;
    if !manifest.window.window_valid && !manifest.unsafe_no_pause {
        return Err(ManifestError::InvalidWindow {
            backup_id: id.clone(),
            reasons: manifest.window.invalid_reasons.join("; "),
        });
    }
    let prefix = format!("{}/", backup_prefix(id)?);
    for (db, artifact) in manifest.artifacts() {
        let bad = |problem: String| ManifestError::BadArtifact {
            backup_id: id.clone(),
            database: db.name.clone(),
            path: artifact.path.clone(),
            problem,
        };
        // Prune deletes a backup by its directory: an artifact elsewhere would leak.
        if !is_own_artifact(id, &artifact.path) {
            return Err(bad(format!("is not inside {prefix}")));
        }
        if let Some(problem) = artifact_in_storage(storage, artifact).await? {
            return Err(bad(problem));
        }
    }
    let committed = Manifest {
        manifest_version: MANIFEST_VERSION,
        status: STATUS_COMMITTED.to_owned(),
        ..manifest.clone()
    };
    storage
        .put_atomic(&path, committed.to_json().into())
        .await?;

    let mut problem = match storage.head(&claim_path(id)?).await {
        Ok(Some(_)) => Some("an orphan removal claimed its directory".to_owned()),
        Ok(None) => None,
        Err(e) => Some(format!("checking for an orphan removal failed ({e})")),
    };
    for (db, artifact) in manifest.artifacts() {
        if problem.is_some() {
            break;
        }
        problem = match artifact_in_storage(storage, artifact).await {
            Ok(None) => None,
            Ok(Some(found)) => Some(format!(
                "database {}'s artifact {} {found}",
                db.name, artifact.path
            )),
            Err(e) => Some(format!("checking artifact {} failed ({e})", artifact.path)),
        };
    }
    let Some(problem) = problem else {
        return Ok(());
    };
    let withdrawn = match storage.delete(&path).await {
        Ok(()) => "the manifest was withdrawn, so the backup is not listed".to_owned(),
        Err(e) => format!(
            "withdrawing the manifest {path} failed too ({e}): `stillpoint list` shows the \
             backup as BROKEN; delete its directory"
        ),
    };
    Err(ManifestError::Withdrawn {
        backup_id: id.clone(),
        problem,
        withdrawn,
    })
}

/// None if `artifact` is in storage with its recorded size, else what is wrong.
async fn artifact_in_storage(
    storage: &Storage,
    artifact: &ArtifactInfo,
) -> Result<Option<String>, StorageError> {
    Ok(match storage.head(&artifact.path).await? {
        None => Some("is not in storage".to_owned()),
        Some(found) if found.size != artifact.stored_size => Some(format!(
            "has {} bytes in storage, the manifest says {}",
            found.size, artifact.stored_size
        )),
        Some(_) => None,
    })
}

/// Reads and checks the manifest of backup `backup_id`.
pub async fn read(storage: &Storage, backup_id: &str) -> Result<Manifest, ManifestError> {
    let path = manifest_path(backup_id)?;
    let bytes = storage.get_bytes(&path).await.map_err(|e| {
        if e.is_not_found() {
            ManifestError::NotFound {
                backup_id: backup_id.to_owned(),
                path: path.clone(),
            }
        } else {
            e.into()
        }
    })?;
    parse_for(backup_id, &path, &bytes)
}

/// Parses the manifest found at `path` for backup `backup_id`.
pub(crate) fn parse_for(
    backup_id: &str,
    path: &str,
    bytes: &[u8],
) -> Result<Manifest, ManifestError> {
    let manifest = parse(path, bytes)?;
    if manifest.backup_id != backup_id {
        return Err(ManifestError::WrongBackup {
            path: path.to_owned(),
            found: manifest.backup_id,
        });
    }
    Ok(manifest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pipeline::Encryption;
    use bytes::Bytes;

    /// A closed, valid window, as `stillpoint unpause` would report it.
    pub(crate) fn window(pause_id: &str, start_ms: i64) -> PauseReport {
        PauseReport {
            pause_id: pause_id.to_owned(),
            pause_start_timestamp_ms: Some(start_ms),
            pause_end_timestamp_ms: Some(start_ms + 6000),
            pause_start_date_time: None,
            pause_end_date_time: None,
            timezone: "UTC".to_owned(),
            restore_point_timestamp_ms: Some(start_ms + 3000),
            restore_point_date_time: None,
            window_ms: Some(6000),
            skew_bound_ms: Some(4),
            window_valid: true,
            invalid_reasons: vec![],
            warnings: vec![],
            lease_ms: 30000,
            lease_expires_at_ms: None,
            nodes: vec![],
        }
    }

    /// A manifest for a backup at `at` with no artifacts.
    pub(crate) fn manifest_at(at: DateTime<Utc>) -> Manifest {
        let backup_id = backup_id_at(at);
        Manifest {
            manifest_version: MANIFEST_VERSION,
            backup_id: backup_id.clone(),
            cluster: "ledger-prod".to_owned(),
            pause_id: format!("pause-{backup_id}"),
            created_at_ms: at.timestamp_millis(),
            window: window("p", at.timestamp_millis()),
            databases: vec![DatabaseEntry {
                name: "ledger".to_owned(),
                role: Some("ledger".to_owned()),
                adapter: "exec".to_owned(),
                cut: CutMarker {
                    kind: "exec".to_owned(),
                    details: BTreeMap::from([("output".to_owned(), "ok".to_owned())]),
                },
                artifact: None,
                row_counts: None,
            }],
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            status: STATUS_COMMITTED.to_owned(),
            timings: Timings::default(),
            unsafe_no_pause: false,
        }
    }

    fn storage() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
        (dir, storage)
    }

    #[test]
    fn backup_ids_sort_by_time_and_round_trip() {
        let early = "2024-05-01T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let late = "2024-05-01T12:00:01Z".parse::<DateTime<Utc>>().unwrap();
        let a = backup_id_at(early);
        let b = backup_id_at(late);
        assert!(a.starts_with("20240501T120000Z-"), "{a}");
        assert_eq!(a.len(), ID_LEN);
        assert!(a < b);
        assert_eq!(parse_backup_id(&a).unwrap(), early);
        assert_ne!(backup_id_at(early), backup_id_at(early), "random suffix");
        assert!(parse_backup_id(&new_backup_id()).is_ok());
        for bad in [
            "",
            "latest",
            "../../etc",
            "20240501T120000Z-A1B2C3",
            "20241301T120000Z-a1b2c3",
            "20240501T120000Z_a1b2c3",
            "20240501T120000Z-a1b2c3/..",
        ] {
            assert!(parse_backup_id(bad).is_err(), "{bad:?} accepted");
            assert!(manifest_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn artifact_paths_follow_the_stages() {
        let id = "20240501T120000Z-a1b2c3";
        let plain = PipelineSettings::default();
        let both = PipelineSettings {
            zstd_level: Some(3),
            encryption: Encryption::Passphrase("x".into()),
        };
        assert_eq!(
            artifact_path(id, "ledger", "sqlite", &plain).unwrap(),
            "backups/20240501T120000Z-a1b2c3/ledger.sqlite"
        );
        assert_eq!(
            artifact_path(id, "auditor-db", "pgdump", &both).unwrap(),
            "backups/20240501T120000Z-a1b2c3/auditor-db.pgdump.zst.age"
        );
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            let err = artifact_path(id, bad, "sql", &plain).unwrap_err();
            assert!(
                matches!(err, ManifestError::InvalidDatabaseName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(artifact_path(id, "manifest", "json", &plain).is_err());
        assert_eq!(
            manifest_path(id).unwrap(),
            "backups/20240501T120000Z-a1b2c3/manifest.json"
        );
    }

    #[tokio::test]
    async fn write_then_read() {
        let (_dir, storage) = storage();
        let mut manifest = manifest_at(Utc::now());
        let artifact_at = artifact_path(
            &manifest.backup_id,
            "ledger",
            "sqlite",
            &PipelineSettings::default(),
        )
        .unwrap();
        storage
            .put_atomic(&artifact_at, Bytes::from_static(b"rows"))
            .await
            .unwrap();
        manifest.databases[0].artifact = Some(ArtifactInfo {
            path: artifact_at,
            size: 4,
            stored_size: 4,
            blake3: blake3::hash(b"rows").to_hex().to_string(),
            compression: None,
            encryption: None,
        });
        write(&storage, &manifest).await.unwrap();
        assert_eq!(read(&storage, &manifest.backup_id).await.unwrap(), manifest);

        let missing = backup_id_at(Utc::now());
        let err = read(&storage, &missing).await.unwrap_err();
        assert!(matches!(err, ManifestError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains(&missing), "{err}");
    }

    #[tokio::test]
    async fn write_refuses_what_must_not_be_committed() {
        let (_dir, storage) = storage();
        let base = manifest_at(Utc::now());
        let path_of = |m: &Manifest| manifest_path(&m.backup_id).unwrap();

        let mut invalid = base.clone();
        invalid.window.window_valid = false;
        invalid.window.invalid_reasons = vec!["node n1 restarted during the window".into()];
        let err = write(&storage, &invalid).await.unwrap_err();
        assert!(err.to_string().contains("n1 restarted"), "{err}");

        let mut missing = base.clone();
        missing.databases[0].artifact = Some(ArtifactInfo {
            path: format!("backups/{}/ledger.sqlite", base.backup_id),
            size: 1,
            stored_size: 1,
            blake3: String::new(),
            compression: None,
            encryption: None,
        });
        let err = write(&storage, &missing).await.unwrap_err();
        assert!(err.to_string().contains("is not in storage"), "{err}");
        assert!(err.to_string().contains("ledger"), "{err}");

        let mut outside = missing.clone();
        outside.databases[0].artifact.as_mut().unwrap().path = "elsewhere/ledger.sqlite".into();
        let err = write(&storage, &outside).await.unwrap_err();
        assert!(err.to_string().contains("is not inside"), "{err}");

        storage
            .put_atomic(
                &format!("backups/{}/ledger.sqlite", base.backup_id),
                Bytes::from_static(b"12"),
            )
            .await
            .unwrap();
        let err = write(&storage, &missing).await.unwrap_err();
        assert!(err.to_string().contains("has 2 bytes"), "{err}");

        // None of these left a manifest: the backup does not exist.
        assert!(storage.head(&path_of(&base)).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn unreadable_manifests_are_named() {
        let (_dir, storage) = storage();
        let manifest = manifest_at(Utc::now());
        let path = manifest_path(&manifest.backup_id).unwrap();

        storage
            .put_atomic(&path, Bytes::from_static(b"{ not json"))
            .await
            .unwrap();
        let err = read(&storage, &manifest.backup_id).await.unwrap_err();
        assert!(matches!(err, ManifestError::Parse { .. }), "{err}");
        assert!(err.to_string().contains(&path), "{err}");

        let mut json: serde_json::Value = serde_json::from_slice(&manifest.to_json()).unwrap();
        json["manifest_version"] = 2.into();
        storage
            .put_atomic(&path, serde_json::to_vec(&json).unwrap().into())
            .await
            .unwrap();
        let err = read(&storage, &manifest.backup_id).await.unwrap_err();
        assert!(
            matches!(err, ManifestError::UnsupportedVersion { version: 2, .. }),
            "{err}"
        );

        json["manifest_version"] = 1.into();
        json.as_object_mut().unwrap().remove("window");
        storage
            .put_atomic(&path, serde_json::to_vec(&json).unwrap().into())
            .await
            .unwrap();
        let err = read(&storage, &manifest.backup_id).await.unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");

        let other = manifest_at(Utc::now());
        storage
            .put_atomic(&path, other.to_json().into())
            .await
            .unwrap();
        let err = read(&storage, &manifest.backup_id).await.unwrap_err();
        assert!(matches!(err, ManifestError::WrongBackup { .. }), "{err}");
    }

    /// docs/manifest.md's example is a manifest this code reads.
    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("../docs/manifest.md");
        let start = doc.find("```json\n").expect("an example") + "```json\n".len();
        let end = start + doc[start..].find("```").expect("end of the example");
        let manifest = parse_for(
            "20240501T120000Z-a1b2c3",
            "docs/manifest.md",
            &doc.as_bytes()[start..end],
        )
        .unwrap();
        assert_eq!(manifest.databases.len(), 2);
        assert!(manifest.window.window_valid);
        // Every field of the schema appears in the example.
        let reserialized: serde_json::Value = serde_json::to_value(&manifest).unwrap();
        let example: serde_json::Value = serde_json::from_str(&doc[start..end]).unwrap();
        assert_eq!(reserialized, example);
    }

    /// A manifest edited to list a database twice was listed and verified (the
    /// report named the first entry's artifact for both), and its drill restored two
    /// copies into one scratch target. It is damaged.
    #[test]
    fn a_manifest_that_lists_a_database_twice_is_refused() {
        let mut manifest = manifest_at(Utc::now());
        let mut twice = manifest.databases[0].clone();
        twice.role = Some("auditor".to_owned());
        manifest.databases.push(twice);
        let path = manifest_path(&manifest.backup_id).unwrap();
        let err = parse_for(&manifest.backup_id, &path, &manifest.to_json()).unwrap_err();
        assert!(
            matches!(&err, ManifestError::DuplicateDatabase { database, .. } if database == "ledger"),
            "{err}"
        );
        assert!(err.to_string().contains(&path), "{err}");
    }

    /// Settles issue 18: `parse` did not enforce what `write` does, so a hand-edited
    /// manifest could point at another backup's artifact (or any object): `verify`
    /// and `restore` then read it, and pruning that other backup broke this one.
    #[test]
    fn a_manifest_whose_artifact_lies_outside_its_backup_is_refused() {
        let mut manifest = manifest_at(Utc::now());
        let other = backup_id_at(Utc::now());
        let path = manifest_path(&manifest.backup_id).unwrap();
        for outside in [
            format!("backups/{other}/ledger.sqlite"),
            "secrets/key.txt".to_owned(),
            path.clone(),
        ] {
            manifest.databases[0].artifact = Some(ArtifactInfo {
                path: outside.clone(),
                size: 1,
                stored_size: 1,
                blake3: String::new(),
                compression: None,
                encryption: None,
            });
            let err = parse_for(&manifest.backup_id, &path, &manifest.to_json()).unwrap_err();
            assert!(err.to_string().contains(&outside), "{err}");
            assert!(err.to_string().contains(&path), "{err}");
        }
    }
}
