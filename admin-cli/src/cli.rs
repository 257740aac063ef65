//! The `stillpoint` command tree and its dispatch.

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::archive::{self, ArchiveArgs, ArchiveListArgs, WalFetchArgs, WalPushArgs};
use crate::backup::{self, BackupArgs};
use crate::catalog::{self, CatalogArgs, PruneArgs, ShowArgs, VerifyArgs};
use crate::changes::{self, ChangesArgs};
use crate::demo::{self, DemoArgs};
use crate::docs::{self, CompletionsArgs, ManArgs};
use crate::drill::{self, DrillArgs};
use crate::exit::{self, Failure};
use crate::pause::{self, InspectArgs, PauseArgs, UnpauseArgs};
use crate::points::{self, PointArgs};
use crate::restore::{self, BaseBackupArgs, PitrArgs, RestoreArgs};
use crate::serve::{self, ServeArgs};
use crate::standby::{self, StandbyArgs};

const ABOUT: &str = "Transactionally-consistent backups of a paused application cluster.";

const LONG_ABOUT: &str = "\
Transactionally-consistent backups of a paused application cluster.

stillpoint pauses every node of a cluster through its gRPC admin service (the
ScalarDL/ScalarDB `rpc.Admin` API, plus stillpoint's lease extension), so that no
transaction is in flight anywhere, and reports the paused window and its mid-time:
the point-in-time-restore target for every database of the cluster.

Typical runbook, ledger nodes first, auditors second (each -a is one tier):

  stillpoint pause -a ledger-1:50051,ledger-2:50051 -a auditor-1:50051 --output json
  # ... create restore points / snapshots in every database ...
  stillpoint unpause --output json       # prints the window and the restore point

or in one command, holding the pause for 200 ms:

  stillpoint pause --hold-for 200ms -a ledger-1:50051,ledger-2:50051 -a auditor-1:50051

Backups, restores and drills run from a runbook (docs/runbook.md):

  stillpoint backup -c runbook.toml
  stillpoint drill latest -c runbook.toml --junit drill.xml
  stillpoint restore latest -c runbook.toml --database ledger --to postgres://…/new_db

Nodes reopen by themselves when the lease runs out, so a coordinator that dies never
leaves the cluster paused.";

#[derive(Debug, Parser)]
#[command(name = "stillpoint", version, about = ABOUT, long_about = LONG_ABOUT, after_help = exit::HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drain and pause every node; leave it paused (recording the window for
    /// `unpause`), or hold for a while and unpause (--hold-for).
    #[command(after_help = exit::HELP)]
    Pause(PauseArgs),
    /// Close the window opened by `pause`: release every node (last tier first), check
    /// that each stayed paused the whole time, print the window and restore point.
    #[command(after_help = exit::HELP)]
    Unpause(UnpauseArgs),
    /// Show whether each node is paused, by whom, and how long its lease has left.
    CheckPaused(InspectArgs),
    /// Print each node's Stats JSON (gate counters, pause state).
    Stats(InspectArgs),
    /// Back up every database of a runbook's cluster inside one pause: prepare, pause,
    /// cut, unpause, copy (zstd → age → BLAKE3) to storage, commit the manifest.
    #[command(after_help = exit::HELP)]
    Backup(BackupArgs),
    /// List the committed backups in a runbook's storage (newest first).
    List(CatalogArgs),
    /// Show one backup's manifest: window, restore point, cuts, artifacts.
    Show(ShowArgs),
    /// Re-read every artifact of a backup: its checksum always; decryption and
    /// decompression only when the runbook gives a key (`age_identity_file` or
    /// `age_passphrase_file`) or the artifacts are not encrypted. Points too: each base
    /// backup and chunk a point needs, re-read, and its archive without a gap from the
    /// base to the marker.
    Verify(VerifyArgs),
    /// Delete backups the retention policy does not keep (manifest first).
    Prune(PruneArgs),
    /// Restore one database of a backup into a new SQLite file or an empty PostgreSQL
    /// or MariaDB database (checksum checked before anything is written).
    #[command(after_help = exit::HELP)]
    Restore(RestoreArgs),
    /// Prove a backup: restore every database into scratch targets, check checksums,
    /// row counts and the runbook's [drill] checks, report RTO and RPO (table, JSON,
    /// JUnit), and remove the scratch targets.
    #[command(after_help = exit::HELP)]
    Drill(DrillArgs),
    /// Take a base backup: into the storage for points, of every archived database
    /// (PostgreSQL: pg_basebackup; MariaDB: a consistent dump and its binlog
    /// position), or with --to DIR a PostgreSQL one into a local directory.
    #[command(after_help = exit::HELP)]
    BaseBackup(BaseBackupArgs),
    /// Take a point: pause, mark every database (PostgreSQL: a named restore point
    /// and LSN; MariaDB: its GTID and binlog position), unpause, wait until every
    /// archive has reached its marker, commit the point
    /// (only when restorable: a base backup before it, an archive without gaps).
    #[command(after_help = exit::HELP)]
    Point(PointArgs),
    /// Clone a point: restore every database of it into the new databases another
    /// runbook names (another cluster), all of them or none, each marked with where it
    /// came from (a table stillpoint_clone).
    #[command(after_help = crate::clone::EXAMPLE)]
    Clone(crate::clone::CloneArgs),
    /// Every committed change between two points (their markers), in commit order, as
    /// JSON Lines or CSV records: commit time, transaction id, kind, table, primary
    /// key, columns after and before. MariaDB databases, from their archived binlog
    /// (binlog_row_metadata = FULL).
    #[command(after_help = exit::HELP)]
    Changes(ChangesArgs),
    /// PostgreSQL point-in-time recovery into a scratch server: base backup + WAL
    /// archive replayed to a backup's restore point, LSN or mid-time.
    #[command(after_help = exit::HELP)]
    Pitr(PitrArgs),
    /// Stream the log of the runbook's databases with `archive = true` (or
    /// --database) into the storage, continuously, until SIGINT/SIGTERM: PostgreSQL's
    /// WAL, MariaDB's binlog, SQLite's WAL frames (and its snapshots).
    #[command(after_help = exit::HELP)]
    Archive(ArchiveArgs),
    /// Show each archive's chunks, coverage (from, to) and gaps; exit 6 if one has a
    /// gap.
    ArchiveList(ArchiveListArgs),
    /// PostgreSQL's archive_command: store one WAL file in a database's archive
    /// (`archive_command = 'stillpoint wal-push -c RUNBOOK --database NAME %p'`).
    WalPush(WalPushArgs),
    /// PostgreSQL's restore_command: fetch one WAL file from a database's archive; exit
    /// 1 when it is not there, 126 when the archive cannot be read (`restore_command =
    /// 'stillpoint wal-fetch -c RUNBOOK --database NAME %f %p'`).
    WalFetch(WalFetchArgs),
    /// Run as a service for one runbook: its archivers, its [schedule] (points, base
    /// backups, backups, drills, verify, prune), an HTTP API with bearer tokens,
    /// Prometheus metrics at /metrics and a status page at /, until SIGINT/SIGTERM
    /// (which releases any pause in progress and flushes the archives first).
    #[command(after_help = serve::EXAMPLE)]
    Serve(ServeArgs),
    /// Keep a standby set of databases (another runbook's, by the same names) following
    /// the primary's archives point by point, never past the newest point; `standby
    /// status` shows each one's lag and the newest point all passed; `standby promote`
    /// stops every one at the same point and promotes them (docs/runbooks/dr.md).
    #[command(after_help = exit::HELP)]
    Standby(StandbyArgs),
    /// Start a local reference cluster (3 ledger nodes + 1 auditor on SQLite) under
    /// load, back it up and drill the backup; then, under the same load, archive both
    /// SQLite logs, take a point every 2 s for 15 s, restore a point picked at random
    /// and the newest into scratch files and check them (`ledger-node check`, row
    /// counts); print a report with the points' timeline (or JSON) and clean up.
    /// About half a minute; exits non-zero if any step fails.
    Demo(DemoArgs),
    /// Print a shell completion script (bash, zsh or fish) on stdout. Load it for this
    /// shell with `source <(stillpoint completions bash)`, or install it, e.g.
    /// `stillpoint completions bash > /etc/bash_completion.d/stillpoint`,
    /// `stillpoint completions zsh > ~/.zfunc/_stillpoint`,
    /// `stillpoint completions fish > ~/.config/fish/completions/stillpoint.fish`.
    Completions(CompletionsArgs),
    /// Print the stillpoint(1) man page (roff) on stdout, e.g. `stillpoint man | man -l -`,
    /// or with --dir write one page per command (stillpoint-pause.1, …) into a directory.
    Man(ManArgs),
}

pub async fn run() -> Result<u8, Failure> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).map_err(|error| error.exit())?;
    let (_, sub) = matches.subcommand().expect("clap requires a subcommand");
    match cli.command {
        Command::Pause(args) => pause::pause(args, sub).await,
        Command::Unpause(args) => pause::unpause(args, sub).await,
        Command::CheckPaused(args) => pause::check_paused(args, sub).await,
        Command::Stats(args) => pause::stats(args, sub).await,
        Command::Backup(args) => backup::backup(args).await,
        Command::List(args) => catalog::list(args).await,
        Command::Show(args) => catalog::show(args).await,
        Command::Verify(args) => catalog::verify(args).await,
        Command::Prune(args) => catalog::prune(args).await,
        Command::Restore(args) => restore::restore(args).await,
        Command::Drill(args) => drill::drill(args).await,
        Command::BaseBackup(args) => restore::base_backup(args).await,
        Command::Point(args) => points::point(args).await,
        Command::Changes(args) => changes::changes(args).await,
        Command::Pitr(args) => restore::pitr(args).await,
        Command::Clone(args) => crate::clone::clone(args).await,
        Command::Archive(args) => archive::archive(args).await,
        Command::ArchiveList(args) => archive::archive_list(args).await,
        Command::WalPush(args) => archive::wal_push(args).await,
        Command::WalFetch(args) => archive::wal_fetch(args).await,
        Command::Serve(args) => serve::serve(args).await,
        Command::Standby(args) => standby::standby(args).await,
        Command::Demo(args) => demo::demo(args).await,
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    }
}
