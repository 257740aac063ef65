//! Restore: the large database's artifact restored into an empty database the way
//! `stillpoint restore` and `drill` do it per database (check the stored bytes'
//! BLAKE3, then `pipeline::open` → the adapter's `restore`, which runs `pg_restore
//! --single-transaction`), against the standard tools on the same artifact:
//!
//! ```sh
//! age -d -i key.txt ledger.pgdump.zst.age | zstd -d | pg_restore --single-transaction …
//! ```
//!
//! (The artifact is zstd inside age, so age comes first.) Both restores end with the
//! same row count, checked outside the timing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stillpoint::adapters::{self, AdapterConfig, PostgresConfig};
use stillpoint::pipeline::{self, ArtifactInfo, Decryption};
use stillpoint::storage::Storage;

use crate::Fixture;
use crate::support::{self, Row, Target, median};

#[derive(Default)]
pub struct Restores {
    pub stillpoint: Vec<Duration>,
    /// The checksum pass alone, part of `stillpoint`.
    pub checksum: Vec<Duration>,
    pub shell: Vec<Duration>,
}

pub async fn compare(fixture: &Fixture, artifact: &ArtifactInfo, runs: usize) -> Restores {
    let storage = Storage::open(&fixture.storage_url).unwrap();
    let adapter = adapters::build(
        "ledger",
        &AdapterConfig::Postgres(PostgresConfig {
            url: fixture.postgres.url(fixture.large.name),
            require_archiving: false,
            bin_dir: Some(fixture.postgres.bin_dir().to_owned()),
            drill_server_url: None,
        }),
    );
    let decryption = Decryption::Identities(vec![fixture.identity.clone()]);
    let stored: PathBuf = fixture.dir.path().join("storage").join(&artifact.path);
    let mut restores = Restores::default();
    for run in 0..runs {
        // Alternate which goes first, so neither always meets a colder cache.
        for stillpoint_turn in [run % 2 == 0, run % 2 == 1] {
            let target = "restored";
            fixture.postgres.create_database(target);
            let url = fixture.postgres.url(target);
            let started = Instant::now();
            if stillpoint_turn {
                pipeline::verify_checksum(&storage, artifact).await.unwrap();
                restores.checksum.push(started.elapsed());
                let stream = pipeline::open(&storage, artifact, &decryption)
                    .await
                    .unwrap();
                adapter.restore(stream, &url).await.unwrap();
                restores.stillpoint.push(started.elapsed());
            } else {
                let script = format!(
                    "set -o pipefail; age -d -i '{key}' '{stored}' | zstd -d -q | \
                     '{pg_restore}' --no-owner --exit-on-error --single-transaction \
                     --no-password --dbname='{url}'",
                    key = fixture.identity_file.display(),
                    stored = stored.display(),
                    pg_restore = fixture.tool("pg_restore").display(),
                );
                let status = tokio::process::Command::new("bash")
                    .args(["-c", &script])
                    .status()
                    .await
                    .unwrap();
                assert!(status.success(), "the shell restore failed: {script}");
                restores.shell.push(started.elapsed());
            }
            let rows: u64 = fixture
                .postgres
                .psql(target, "SELECT count(*) FROM ledger")
                .trim()
                .parse()
                .unwrap();
            assert_eq!(rows, fixture.large.rows, "the restore lost rows");
            fixture
                .postgres
                .psql("postgres", &format!("DROP DATABASE {target}"));
        }
    }
    restores
}

impl Restores {
    pub fn report(&self, fixture: &Fixture, artifact: &ArtifactInfo) -> (String, Row) {
        let seconds = |values: &[Duration]| {
            median(&values.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
        };
        let (stillpoint, shell) = (seconds(&self.stillpoint), seconds(&self.shell));
        let ratio = stillpoint / shell;
        let body = format!(
            "{} {} restores of each, alternating which goes first; medians. The artifact: \
             {:.0} MiB stored, {:.0} MiB raw, of the {:.0} MiB database.\n\n\
             | | time |\n|---|---|\n\
             | stillpoint: checksum, then `pipeline::open` → `pg_restore` | {stillpoint:.2} s |\n\
             | of which the checksum pass | {:.2} s |\n\
             | `age -d \\| zstd -d \\| pg_restore` | {shell:.2} s |\n\n\
             **Restore time stillpoint / shell: {ratio:.2}×** (target ≤ 1.2×).",
            support::measured_line("scripts/bench postgres"),
            self.stillpoint.len(),
            support::mib(artifact.stored_size),
            support::mib(artifact.size),
            support::mib(fixture.large.bytes),
            seconds(&self.checksum),
        );
        let row = Row::new(
            "6. restore",
            &format!(
                "restore time, {:.0} MiB database, vs `age -d \\| zstd -d \\| pg_restore`",
                support::mib(fixture.large.bytes)
            ),
            format!("{stillpoint:.1} s"),
            format!("{shell:.1} s"),
            Some(ratio),
            Target::AtMost(1.2),
        );
        (body, row)
    }
}
