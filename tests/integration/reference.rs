//! The reference cluster on real database servers, archived: 3 ledger nodes on
//! PostgreSQL (the `ledger` database, WAL archiving on) and the auditor on MariaDB (the
//! `auditor` database), with a runbook that archives both into file storage. What the
//! clone, standby and points-scenario tests start from.

use std::path::{Path, PathBuf};

use stillpoint_testkit::{MariaDb, Postgres, PostgresOptions};

use crate::cluster::Cluster;
use crate::util::{Database, Runbook};

pub(crate) struct Reference {
    pub(crate) postgres: Postgres,
    pub(crate) mariadb: MariaDb,
    pub(crate) cluster: Cluster,
    /// Holds the storage (`storage/`), the archiver's spool (`spool/`) and the runbook.
    pub(crate) dir: tempfile::TempDir,
    pub(crate) runbook: PathBuf,
}

/// Starts the servers and the cluster and writes the runbook `name`: both databases
/// archived (chunks and partial segments every 200 ms), storage in `dir/storage`.
/// `auditor_base_method` is the auditor's `base_method` when not the default
/// (mariadb-backup); `finish` adds what only its caller needs (a scratch dir, drill
/// checks), given the temp dir.
pub(crate) fn reference_cluster(
    name: &str,
    auditor_base_method: Option<&str>,
    finish: impl FnOnce(Runbook, &Path) -> Runbook,
) -> Reference {
    let postgres = Postgres::start_with(PostgresOptions { wal_archive: true });
    postgres.create_database("ledger");
    let mariadb = MariaDb::start();
    mariadb.create_database("auditor");
    let cluster = Cluster::start_on(
        3,
        postgres.url("ledger"),
        mariadb.url("auditor"),
        &[],
        tempfile::tempdir().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    // Servers the tests start as `postgres` (scratch and standby servers) read what is
    // staged here and keep their data directories under it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut auditor = Database::mariadb("auditor", &mariadb.url("auditor"))
        .role("auditor")
        .bin_dir(mariadb.bin_dir());
    if let Some(method) = auditor_base_method {
        auditor = auditor.set("base_method", method);
    }
    let runbook = Runbook::for_cluster(name, &cluster)
        .timeouts()
        .database(
            Database::postgres("ledger", &postgres.url("ledger"))
                .role("ledger")
                .bin_dir(postgres.bin_dir())
                .archived(),
        )
        .database(auditor.archived())
        .storage_url(&format!("file://{}", dir.path().join("storage").display()))
        .archive("partial_interval", "200ms")
        .archive("chunk_interval", "200ms")
        .archive_spool_dir(&dir.path().join("spool"));
    let runbook = finish(runbook, dir.path()).write_in(dir.path());
    Reference {
        postgres,
        mariadb,
        cluster,
        dir,
        runbook,
    }
}
