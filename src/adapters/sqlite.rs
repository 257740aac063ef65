//! SQLite adapter: a live WAL-mode database file that other processes keep writing.
//!
//! - prepare: opens the file read-only and requires `journal_mode=wal`; in rollback-
//!   journal mode a reader holding a snapshot would block every writer for the whole
//!   copy, which is exactly what a backup after unpause must not do.
//! - cut: `BEGIN` and one read, on the prepared connection. That pins a WAL snapshot:
//!   writers go on appending to the WAL, and checkpoints stop short of the frames this
//!   reader still needs, so the snapshot survives until the copy ends. Its cost is one
//!   page read, whatever the database's size.
//! - copy: the online backup API run *from that same connection*, which reuses its
//!   open read transaction, so the copy is the cut's snapshot page for page (the tests
//!   prove later writes are absent). SQLite has no way to stream pages out of a pinned
//!   snapshot in this build (`sqlite3_serialize` needs a rusqlite feature we do not
//!   enable and holds the whole database in memory; `VACUUM INTO` refuses to run inside
//!   a transaction), so the backup goes to an unlinked temporary file that is then
//!   streamed. Row counts come from the same read transaction.
//! - restore: writes the stream to a new file beside the target (refusing a non-empty
//!   target or a leftover `-wal` beside it), runs `PRAGMA integrity_check` on it, and
//!   only then renames it into place, so the target path never holds half a copy.
//!   Drills restore into a file in their scratch directory and read it back read-only.
//! - clear (`restore --force`): refuses a target another process has open (in WAL
//!   mode every open connection holds a shared lock on the file, which an exclusive
//!   lock attempt meets), then removes the file, its `-wal`, `-shm` and `-journal`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::FutureExt;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use tokio::io::AsyncWriteExt;

use super::{
    Adapter, AdapterError, ByteStream, Copy, CopySummary, CutMarker, Prepared, Rows, SqliteConfig,
    Value,
};

pub struct Sqlite {
    name: String,
    config: SqliteConfig,
}

impl Sqlite {
    pub fn new(name: &str, config: SqliteConfig) -> Self {
        Sqlite {
            name: name.to_owned(),
            config,
        }
    }
}

#[async_trait::async_trait]
impl Adapter for Sqlite {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn artifact_extension(&self) -> &'static str {
        "sqlite"
    }

    async fn prepare(&self) -> Result<Box<dyn Prepared>, AdapterError> {
        let path = self.config.path.clone();
        let conn = blocking(move || open_checked(&path))
            .await
            .map_err(|message| AdapterError::Prepare {
                database: self.name.clone(),
                message,
            })?;
        Ok(Box::new(SqlitePrepared {
            name: self.name.clone(),
            path: self.config.path.clone(),
            conn: Some(conn),
            cut: false,
        }))
    }

    async fn restore(&self, copy: ByteStream, target: &str) -> Result<(), AdapterError> {
        self.write_beside_and_rename(copy, target, false).await
    }

    /// `restore --force`: the old database stays in place, whole, until the new one
    /// is written beside it and checked; then, if nobody has opened the old one
    /// meanwhile, its `-wal`, `-shm` and `-journal` are removed and the new file is
    /// renamed over it. A restore that fails or is interrupted leaves the old one as
    /// it was.
    async fn restore_replacing(&self, copy: ByteStream, target: &str) -> Result<(), AdapterError> {
        let checked = PathBuf::from(target);
        blocking(move || refuse_in_use(&checked))
            .await
            .map_err(|message| AdapterError::Restore {
                database: self.name.clone(),
                message,
            })?;
        self.write_beside_and_rename(copy, target, true).await
    }

    async fn clear(&self, target: &str) -> Result<(), AdapterError> {
        let err = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        let path = PathBuf::from(target);
        let checked = path.clone();
        blocking(move || refuse_in_use(&checked))
            .await
            .map_err(err)?;
        remove_files(&[
            path.clone(),
            with_suffix(&path, "-wal"),
            with_suffix(&path, "-shm"),
            with_suffix(&path, "-journal"),
        ])
        .await
        .map_err(err)
    }

    async fn create_scratch(
        &self,
        label: &str,
        dir: &Path,
        _cut: &CutMarker,
    ) -> Result<String, AdapterError> {
        Ok(dir.join(format!("{label}.sqlite")).display().to_string())
    }

    async fn drop_scratch(&self, target: &str) -> Result<(), AdapterError> {
        self.clear(target).await
    }

    async fn query(&self, target: &str, sql: &str) -> Result<Rows, AdapterError> {
        let (path, sql) = (PathBuf::from(target), sql.to_owned());
        blocking(move || {
            let conn = open_read_only(&path)?;
            let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
            let columns = stmt.column_count();
            let mut rows = stmt.query([]).map_err(|e| e.to_string())?;
            let mut out = Rows::new();
            while let Some(row) = rows.next().map_err(|e| e.to_string())? {
                let values = (0..columns)
                    .map(|i| row.get_ref(i).map(typed))
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(|e| e.to_string())?;
                out.push(values);
            }
            Ok(out)
        })
        .await
        .map_err(|message| self.read_error(target, message))
    }

    async fn row_counts(&self, target: &str) -> Result<BTreeMap<String, u64>, AdapterError> {
        let path = PathBuf::from(target);
        blocking(move || row_counts(&open_read_only(&path)?).map_err(|e| e.to_string()))
            .await
            .map_err(|message| self.read_error(target, message))
    }

    async fn write_note(
        &self,
        target: &str,
        table: &str,
        fields: &[(String, String)],
    ) -> Result<(), AdapterError> {
        let path = PathBuf::from(target);
        let quoted = table.replace('"', "\"\"");
        let fields = fields.to_vec();
        blocking(move || {
            let mut conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            let tx = conn.transaction().map_err(|e| e.to_string())?;
            tx.execute(
                &format!("CREATE TABLE \"{quoted}\" (field TEXT PRIMARY KEY, value TEXT NOT NULL)"),
                [],
            )
            .map_err(|e| e.to_string())?;
            for (field, value) in &fields {
                tx.execute(
                    &format!("INSERT INTO \"{quoted}\" VALUES (?1, ?2)"),
                    [field, value],
                )
                .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
        .map_err(|message| AdapterError::Restore {
            database: self.name.clone(),
            message: format!("writing table {table} into {target}: {message}"),
        })
    }
}

impl Sqlite {
    /// Writes `copy` to a new file beside `target`, checks it, and renames it into
    /// place, so `target` never holds half a copy. Without `replace`, a non-empty
    /// target (or a leftover `-wal` beside it) is refused; with it, the target is
    /// checked again for other users right before it is replaced.
    async fn write_beside_and_rename(
        &self,
        mut copy: ByteStream,
        target: &str,
        replace: bool,
    ) -> Result<(), AdapterError> {
        let err = |message: String| AdapterError::Restore {
            database: self.name.clone(),
            message,
        };
        let path = PathBuf::from(target);
        if !replace {
            refuse_non_empty(&path).await.map_err(err)?;
        }

        // Written beside the target (same directory, so the rename is atomic) and
        // renamed into place only once whole and checked; removed on any failure.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staged = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".restoring")
            // What a new file gets under the usual umask (tempfile's own is 0600): the
            // application that opens the restored database may run as another user.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(&dir)
            .map_err(|e| err(format!("creating a file beside {target}: {e}")))?;
        let staged_path = staged.path().to_path_buf();
        let mut file = tokio::fs::File::from_std(
            staged
                .reopen()
                .map_err(|e| err(format!("opening {}: {e}", staged_path.display())))?,
        );
        let shown = staged_path.display().to_string();
        tokio::io::copy(&mut copy, &mut file)
            .await
            .map_err(|e| err(format!("writing {shown}: {e}")))?;
        file.flush()
            .await
            .and(file.sync_all().await)
            .map_err(|e| err(format!("writing {shown}: {e}")))?;
        drop(file);

        let checked = staged_path.clone();
        blocking(move || integrity_check(&checked))
            .await
            .map_err(err)?;
        if replace {
            // The restore took a while: someone may have opened the old one since.
            let checked = path.clone();
            blocking(move || refuse_in_use(&checked))
                .await
                .map_err(err)?;
            // The old database's journals would be read as the new file's.
            remove_files(&[
                with_suffix(&path, "-wal"),
                with_suffix(&path, "-shm"),
                with_suffix(&path, "-journal"),
            ])
            .await
            .map_err(err)?;
        } else {
            // A -wal or -shm left beside the target would be read as the restored
            // file's.
            refuse_non_empty(&path).await.map_err(err)?;
            remove_files(&[with_suffix(&path, "-shm"), with_suffix(&path, "-journal")])
                .await
                .map_err(err)?;
        }
        staged
            .persist(&path)
            .map_err(|e| err(format!("renaming {shown} to {target}: {}", e.error)))?;
        // The rename is durable once the directory is.
        if let Ok(dir) = tokio::fs::File::open(&dir).await {
            let _ = dir.sync_all().await;
        }
        Ok(())
    }

    fn read_error(&self, target: &str, message: String) -> AdapterError {
        AdapterError::Restore {
            database: self.name.clone(),
            message: format!("reading {target}: {message}"),
        }
    }
}

fn open_read_only(path: &Path) -> Result<Connection, String> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// A value by its storage class. TEXT that is not UTF-8 (SQLite stores what it is
/// given) stays bytes rather than being decoded lossily.
fn typed(value: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Number(i.to_string()),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::text(t.to_vec()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

struct SqlitePrepared {
    name: String,
    path: PathBuf,
    /// Taken out while blocking work runs on a blocking thread; the read transaction
    /// that pins the snapshot lives on this connection from the cut to the copy's end.
    conn: Option<Connection>,
    cut: bool,
}

#[async_trait::async_trait]
impl Prepared for SqlitePrepared {
    async fn cut(&mut self, _backup_id: &str) -> Result<CutMarker, AdapterError> {
        let err = |message: String| AdapterError::Cut {
            database: self.name.clone(),
            message,
        };
        if self.cut {
            return Err(err("the snapshot was already cut".to_owned()));
        }
        let conn = self
            .conn
            .take()
            .ok_or_else(|| err("the connection was lost by an earlier failure".to_owned()))?;
        let (conn, result) = blocking(move || {
            let result = pin_snapshot(&conn);
            Ok((conn, result))
        })
        .await
        .map_err(err)?;
        self.conn = Some(conn);
        let mut details = result.map_err(err)?;
        self.cut = true;
        details.insert("path".to_owned(), self.path.display().to_string());
        Ok(CutMarker {
            kind: "sqlite-snapshot".to_owned(),
            details,
        })
    }

    async fn copy(mut self: Box<Self>) -> Result<Copy, AdapterError> {
        let name = self.name.clone();
        let err = |message: String| AdapterError::Copy {
            database: name.clone(),
            message,
        };
        let conn = match (self.cut, self.conn.take()) {
            (true, Some(conn)) => conn,
            _ => return Err(err("copy was called before a successful cut".to_owned())),
        };
        let temp = std::env::temp_dir().join(format!("stillpoint-{}.sqlite", uuid::Uuid::new_v4()));
        let (file, row_counts) = blocking(move || copy_snapshot(conn, &temp))
            .await
            .map_err(err)?;
        Ok(Copy {
            stream: Box::pin(tokio::fs::File::from_std(file)),
            finished: futures::future::ready(Ok(CopySummary {
                row_counts: Some(row_counts),
            }))
            .boxed(),
        })
    }
}

/// Runs SQLite work on a blocking thread; errors are messages for an [`AdapterError`].
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("the SQLite worker thread failed: {e}"))?
}

pub(crate) fn open_checked(path: &Path) -> Result<Connection, String> {
    let shown = path.display();
    if !path.is_file() {
        return Err(format!("{shown} does not exist or is not a file"));
    }
    // Read-only: a backup must never write to the application's database. SQLite
    // (3.22+) reads a WAL database read-only as long as it can use the -shm file.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("opening {shown}: {e}"))?;
    // Starting a read transaction can meet SQLITE_BUSY briefly while a writer
    // recovers or restarts the WAL; wait a little rather than fail the cut.
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| format!("opening {shown}: {e}"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(|e| format!("reading {shown}: {e}"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "{shown} is in journal_mode={mode}, not WAL: a consistent copy would block the \
             application's writers until it finished. Switch the database to WAL once with \
             `sqlite3 '{shown}' 'PRAGMA journal_mode=WAL'` (the setting persists in the file)"
        ));
    }
    Ok(conn)
}

/// Opens a read transaction and reads from it, which is what makes SQLite take the
/// snapshot (`BEGIN` alone is deferred). Returns facts for the marker.
pub(crate) fn pin_snapshot(conn: &Connection) -> Result<BTreeMap<String, String>, String> {
    let read = || -> rusqlite::Result<(i64, i64, i64)> {
        conn.execute_batch("BEGIN DEFERRED")?;
        let objects: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok((objects, pages, page_size))
    };
    match read() {
        Ok((objects, pages, page_size)) => Ok(BTreeMap::from([
            ("schema_objects".to_owned(), objects.to_string()),
            ("page_count".to_owned(), pages.to_string()),
            ("page_size".to_owned(), page_size.to_string()),
        ])),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(format!("pinning a read snapshot: {e}"))
        }
    }
}

/// Backs the pinned snapshot up into `temp`, counts rows in the same snapshot, ends the
/// read transaction, and returns `temp` opened for reading and already unlinked (so
/// nothing is left behind however the stream ends).
fn copy_snapshot(
    conn: Connection,
    temp: &Path,
) -> Result<(std::fs::File, BTreeMap<String, u64>), String> {
    let result = (|| {
        backup_into(&conn, temp)?;
        let counts = row_counts(&conn).map_err(|e| format!("counting rows: {e}"))?;
        conn.execute_batch("COMMIT")
            .map_err(|e| format!("ending the read transaction: {e}"))?;
        let file = std::fs::File::open(temp)
            .map_err(|e| format!("reopening the copy {}: {e}", temp.display()))?;
        Ok((file, counts))
    })();
    // Unlinked whether or not the copy succeeded: an open handle keeps the bytes
    // readable on Unix, and a failed copy must not leave a file in the temp directory.
    let _ = std::fs::remove_file(temp);
    let _ = std::fs::remove_file(with_suffix(temp, "-journal"));
    result
}

/// The backup API from `src` into a new file. When `src` has an open read transaction
/// the backup reads through it (it only starts its own when none is open), so it
/// copies exactly that snapshot.
fn backup_into(src: &Connection, dest: &Path) -> Result<(), String> {
    let mut dst = Connection::open(dest)
        .map_err(|e| format!("creating the temporary copy {}: {e}", dest.display()))?;
    let backup = Backup::new(src, &mut dst).map_err(|e| format!("starting the backup: {e}"))?;
    // One step of all pages: nothing is gained by stepping, since our read transaction
    // keeps the source stable for as long as we take.
    match backup.step(-1) {
        Ok(StepResult::Done) => {}
        Ok(other) => return Err(format!("the backup did not finish in one step ({other:?})")),
        Err(e) => return Err(format!("backing up the snapshot: {e}")),
    }
    drop(backup);
    dst.close()
        .map_err(|(_, e)| format!("closing the temporary copy: {e}"))
}

/// Rows in every ordinary table, read in `conn`'s current transaction. Virtual tables
/// are skipped: their modules may not be loaded here, and their shadow tables (which
/// hold the data) are counted anyway.
pub(crate) fn row_counts(conn: &Connection) -> rusqlite::Result<BTreeMap<String, u64>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' \
         ESCAPE '\\' AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name",
    )?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut counts = BTreeMap::new();
    for name in names {
        let n: i64 = conn.query_row(
            &format!("SELECT count(*) FROM \"{}\"", name.replace('"', "\"\"")),
            [],
            |r| r.get(0),
        )?;
        counts.insert(name, n as u64);
    }
    Ok(counts)
}

/// Removes each file that exists.
async fn remove_files(paths: &[PathBuf]) -> Result<(), String> {
    for path in paths {
        match tokio::fs::remove_file(path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", path.display())),
        }
    }
    Ok(())
}

/// Refuses `path` if another process has it open. In WAL mode every connection that
/// has read the database holds a shared lock on the file until it closes, so an
/// exclusive lock (without waiting) fails exactly while someone has it open; in
/// rollback-journal mode only a transaction in progress shows. Not a database file
/// (or none at all): nobody can be using it as one.
fn refuse_in_use(path: &Path) -> Result<(), String> {
    use rusqlite::ErrorCode;
    let shown = path.display();
    if !path.exists() {
        return Ok(());
    }
    let in_use = |e: &rusqlite::Error| {
        matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        )
    };
    let probe = || -> rusqlite::Result<()> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(Duration::ZERO)?;
        conn.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; ROLLBACK")
    };
    match probe() {
        Ok(()) => Ok(()),
        Err(e) if in_use(&e) => Err(format!(
            "refusing to replace {shown}: it is in use, another process has it open (and \
             holds a lock on it: {e}); nothing was removed. Stop the process using it and \
             retry"
        )),
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) => Ok(()),
        Err(e) => Err(format!(
            "checking whether {shown} is in use failed: {e}; nothing was removed"
        )),
    }
}

/// Restoring over a live database would destroy it, and a stale `-wal` beside an
/// otherwise empty target would be replayed into the restored file.
async fn refuse_non_empty(path: &Path) -> Result<(), String> {
    for candidate in [path.to_path_buf(), with_suffix(path, "-wal")] {
        match tokio::fs::metadata(&candidate).await {
            Ok(m) if m.len() > 0 => {
                return Err(format!(
                    "refusing to restore over {}: it exists and is not empty",
                    candidate.display()
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("checking {}: {e}", candidate.display())),
        }
    }
    Ok(())
}

fn integrity_check(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| format!("opening the restored {shown}: {e}"))?;
    let mut stmt = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|e| format!("checking the restored {shown}: {e}"))?;
    let lines = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| format!("checking the restored {shown}: {e}"))?;
    if lines == ["ok"] {
        Ok(())
    } else {
        Err(format!(
            "the restored {shown} fails PRAGMA integrity_check (left in place for inspection): {}",
            lines
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests;
