//! Everything measured on one throwaway PostgreSQL holding a small and a large ledger
//! database (the large one ≥ 10× the small, ≥ 1 GB at default sizes), so the data is
//! generated once:
//!
//! - `window.rs` (3): the pause window of whole backups of each, as a ratio.
//! - `backup.rs` (5): backup throughput of the large database through zstd 3 + age +
//!   BLAKE3 into local storage, vs the shell pipeline `pg_dump | zstd | age > file`;
//!   and the pipeline alone on an in-memory stream vs its stages one by one.
//! - `restore.rs` (6): restoring the large database's artifact as `stillpoint restore`
//!   does, vs `age -d | zstd -d | pg_restore`.
//!
//! Backups of the small and the large database and runs of the shell pipeline
//! alternate in one loop, so slow spells on the machine (other builds run beside
//! this) hit stillpoint and its baselines alike.
//!
//! Run: `scripts/bench postgres`, or `cargo bench --bench postgres [-- --quick]`.

#[path = "../support/mod.rs"]
mod support;

mod backup;
mod restore;
mod window;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use stillpoint::manifest::Manifest;
use stillpoint::runbook::Runbook;
use stillpoint_testkit::Postgres;
use support::Flags;
use tokio_util::sync::CancellationToken;

/// Admin nodes the backups pause (lightweight, in-process).
const NODES: usize = 4;

/// What every part shares: the server, the two databases, the key, where artifacts go.
pub struct Fixture {
    pub postgres: Postgres,
    pub small: Database,
    pub large: Database,
    /// An age X25519 key pair; the identity is also in `identity_file` for the CLI.
    pub recipient: String,
    pub identity: String,
    pub identity_file: PathBuf,
    /// Scratch space on the same disk as the storage: artifacts, shell outputs.
    pub dir: tempfile::TempDir,
    pub storage_url: String,
}

pub struct Database {
    pub name: &'static str,
    pub rows: u64,
    /// `pg_database_size` after generation.
    pub bytes: u64,
}

fn main() {
    let flags = Flags::parse();
    // Large: about 1.2 GB with its indexes; small: a fifteenth of the rows, which with
    // a database's fixed overhead (about 8 MB) is still more than ten times smaller.
    let (large_rows, rounds, restores) = if flags.quick {
        (200_000, 2, 1)
    } else {
        (3_500_000, 5, 3)
    };
    let small_rows = large_rows / 15;
    let fixture = Fixture::create(small_rows, large_rows);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shutdown = CancellationToken::new();
    let (nodes, servers) = runtime.block_on(support::start_admin_nodes(NODES, shutdown.clone()));

    // One loop: small backup, large backup, shell pipeline on the large database.
    let mut windows = window::Windows::default();
    let mut backups = backup::Backups::default();
    let mut last_large: Option<Manifest> = None;
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        let small = runtime.block_on(fixture.backup(&fixture.small, &nodes));
        windows.small.push(small);
        let large = runtime.block_on(fixture.backup(&fixture.large, &nodes));
        windows.large.push(large.clone());
        backups.stillpoint.push(large.clone());
        backups
            .shell
            .push(runtime.block_on(backup::shell_pipeline(&fixture)));
        last_large = Some(large);
    }
    let stages = runtime.block_on(backup::in_memory(&fixture, flags.quick));
    let artifact = last_large.expect("at least one round").databases[0]
        .artifact
        .clone()
        .expect("the postgres adapter writes an artifact");
    let restored = runtime.block_on(restore::compare(&fixture, &artifact, restores));

    shutdown.cancel();
    runtime.block_on(async {
        for server in servers {
            server.await.unwrap();
        }
    });

    let mut rows = Vec::new();
    let (body, row) = windows.report(&fixture, rounds);
    flags.section("pause-window", &body);
    rows.push(row);
    let (body, mut row) = backups.report(&fixture, &stages);
    flags.section("pipeline", &body);
    rows.append(&mut row);
    let (body, row) = restored.report(&fixture, &artifact);
    flags.section("restore", &body);
    rows.push(row);
    flags.rows(&rows);
}

impl Fixture {
    fn create(small_rows: u64, large_rows: u64) -> Fixture {
        let postgres = Postgres::start();
        let started = std::time::Instant::now();
        let small = create_ledger(&postgres, "small", small_rows);
        let large = create_ledger(&postgres, "large", large_rows);
        eprintln!(
            "generated {:.0} MiB and {:.0} MiB in {:.0?}",
            support::mib(small.bytes),
            support::mib(large.bytes),
            started.elapsed()
        );
        let key = age::x25519::Identity::generate();
        let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_owned();
        let dir = tempfile::tempdir().unwrap();
        let identity_file = dir.path().join("key.txt");
        std::fs::write(&identity_file, format!("{identity}\n")).unwrap();
        let storage_url = format!("file://{}", dir.path().join("storage").display());
        Fixture {
            postgres,
            small,
            large,
            recipient: key.to_public().to_string(),
            identity,
            identity_file,
            dir,
            storage_url,
        }
    }

    /// One whole backup (pause → cut → unpause → copy → manifest) of `database`.
    async fn backup(&self, database: &Database, nodes: &[String]) -> Manifest {
        let runbook = self.runbook(database, nodes);
        stillpoint::backup::run(&runbook, Arc::new(|_| {}))
            .await
            .expect("backup")
    }

    fn runbook(&self, database: &Database, nodes: &[String]) -> Runbook {
        let text = format!(
            r#"
cluster = "bench"
[pause]
tiers = [{{ addresses = [{nodes}] }}]
lease = "30s"
max_wait = "5s"
[[databases]]
name = "ledger"
adapter = "postgres"
url = "{url}"
bin_dir = "{bin_dir}"
[pipeline]
zstd_level = 3
age_recipients = ["{recipient}"]
[storage]
url = "{storage}"
"#,
            nodes = nodes
                .iter()
                .map(|node| format!("\"{node}\""))
                .collect::<Vec<_>>()
                .join(", "),
            url = self.postgres.url(database.name),
            bin_dir = self.postgres.bin_dir().display(),
            recipient = self.recipient,
            storage = self.storage_url,
        );
        Runbook::parse(&text, Path::new(".")).unwrap()
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        self.postgres.bin_dir().join(name)
    }
}

/// The ledger table of [`support::create_ledger_table`] in a new database.
fn create_ledger(postgres: &Postgres, name: &'static str, rows: u64) -> Database {
    postgres.create_database(name);
    let bytes = support::create_ledger_table(|db, sql| postgres.psql(db, sql), name, rows);
    Database { name, rows, bytes }
}
