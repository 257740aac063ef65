//! `stillpoint changes`: every committed change between two points, in commit order,
//! as records (docs/runbooks/changes.md). A record is one changed row: commit time,
//! transaction id, kind (insert, update, delete), database, table, primary key,
//! column values after and before.
//!
//! - `mod.rs` (here): the record ([`Change`]), its JSON Lines and CSV writers, and
//!   [`export`], which checks the two points and picks each database's adapter.
//! - `mariadb.rs`: MariaDB, from the archived binlog chunks between the two points'
//!   markers (ROW format, FULL images, `binlog_row_metadata = FULL` for the names).
//! - `binlog_rows.rs`: the binlog row events decoded.
//! - `postgres.rs`: PostgreSQL, from the change stream its archiver records beside
//!   the WAL (`crate::archive::pg_changes`, `changes = true`).
//!
//! Output streams: each record is written as it is decoded, so memory holds one
//! binlog event or one change stream chunk, whatever the range's size. A binlog is
//! reassembled on disk in `work_dir` (removed at the end), as a restore does.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::ser::SerializeMap as _;

use crate::archive::mariadb as binlog_archive;
use crate::archive::{Archive, ArchiveError, Position, base};
use crate::pipeline::{Decryption, PipelineSettings};
use crate::points::PointManifest;
use crate::storage::Storage;

pub mod binlog_rows;
pub mod mariadb;
pub mod postgres;

pub use binlog_rows::{DecodeError, Kind, Value};

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    /// The points, the database or the flags do not fit; nothing was written.
    #[error("{0}")]
    Setup(String),
    /// The archive lacks or cannot give what the range needs.
    #[error(transparent)]
    Archive(Box<ArchiveError>),
    /// The binlog cannot be decoded at `at` (file:offset).
    #[error("database {database}, binlog {at}: {source}")]
    Decode {
        database: String,
        at: String,
        #[source]
        source: DecodeError,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The change stream does not hold the range (none, a gap, not reached).
    #[error("{0}")]
    NotCovered(String),
    /// A change stream chunk that cannot be read.
    #[error("change stream chunk {chunk}: {problem}")]
    Stream { chunk: String, problem: String },
    /// Writing the records failed (a closed pipe, a full disk).
    #[error("writing the change records: {0}")]
    Output(#[source] std::io::Error),
}

/// What one database's export read and wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeStats {
    /// Binlog events, or change stream rows, read.
    pub events: u64,
    /// Bytes of log read: the reassembled binlog files from the range's first file on,
    /// or the change stream chunks.
    pub log_bytes: u64,
    /// Committed transactions in the range (MariaDB: with or without rows of the
    /// database).
    pub transactions: u64,
    pub records: u64,
    /// MariaDB: transactions begun in the range whose end is past it, or rolled back:
    /// not written.
    pub not_committed: u64,
}

impl From<ArchiveError> for ChangesError {
    fn from(error: ArchiveError) -> Self {
        ChangesError::Archive(Box::new(error))
    }
}

/// One changed row.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The transaction's commit, ms since the epoch (MariaDB: whole seconds, the
    /// binlog's resolution; PostgreSQL: ms).
    pub commit_ms: i64,
    /// MariaDB: the GTID, `domain-server-sequence`; PostgreSQL: the xid.
    pub transaction: String,
    pub kind: Kind,
    /// The runbook's name of the database.
    pub database: String,
    /// MariaDB: the table; PostgreSQL: `schema.table`.
    pub table: String,
    /// The primary key's columns (of the row before, for an update or delete); none
    /// when the table has no primary key.
    pub key: Option<Vec<(String, Value)>>,
    /// Insert and update: every column after.
    pub after: Option<Vec<(String, Value)>>,
    /// Update and delete: every column before.
    pub before: Option<Vec<(String, Value)>>,
}

/// Values as JSON: integers and floats as numbers, DECIMAL as a string (exact),
/// text and temporal values as strings, binary as `{"hex": "…"}`, NULL as null.
impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Int(v) => serializer.serialize_i64(*v),
            Value::Bool(v) => serializer.serialize_bool(*v),
            Value::UInt(v) => serializer.serialize_u64(*v),
            Value::Float(v) => serializer.serialize_f64(*v),
            Value::Decimal(v) | Value::Text(v) => serializer.serialize_str(v),
            Value::Bytes(bytes) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("hex", &hex(bytes))?;
                map.end()
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Columns in table order, as a JSON object.
struct Columns<'a>(&'a [(String, Value)]);

impl serde::Serialize for Columns<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl serde::Serialize for Change {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(8))?;
        map.serialize_entry("commit_ms", &self.commit_ms)?;
        map.serialize_entry("transaction", &self.transaction)?;
        map.serialize_entry("kind", &self.kind)?;
        map.serialize_entry("database", &self.database)?;
        map.serialize_entry("table", &self.table)?;
        map.serialize_entry("key", &self.key.as_deref().map(Columns))?;
        map.serialize_entry("after", &self.after.as_deref().map(Columns))?;
        map.serialize_entry("before", &self.before.as_deref().map(Columns))?;
        map.end()
    }
}

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header; `key`, `after` and `before` hold JSON objects.
    Csv,
}

/// The CSV header.
pub const CSV_HEADER: &str = "commit_ms,transaction,kind,database,table,key,after,before";

/// Writes records in a format to `out`.
pub struct RecordWriter<W: Write> {
    out: W,
    format: OutputFormat,
    started: bool,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(out: W, format: OutputFormat) -> Self {
        RecordWriter {
            out,
            format,
            started: false,
        }
    }

    pub fn write(&mut self, change: &Change) -> std::io::Result<()> {
        match self.format {
            OutputFormat::Jsonl => {
                serde_json::to_writer(&mut self.out, change)?;
                self.out.write_all(b"\n")
            }
            OutputFormat::Csv => {
                self.header()?;
                let json = |columns: &Option<Vec<(String, Value)>>| {
                    columns
                        .as_deref()
                        .map(|c| serde_json::to_string(&Columns(c)).expect("JSON of values"))
                        .unwrap_or_default()
                };
                let fields = [
                    change.commit_ms.to_string(),
                    change.transaction.clone(),
                    change.kind.as_str().to_owned(),
                    change.database.clone(),
                    change.table.clone(),
                    json(&change.key),
                    json(&change.after),
                    json(&change.before),
                ];
                let line = fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>();
                self.out.write_all(line.join(",").as_bytes())?;
                self.out.write_all(b"\r\n")
            }
        }
    }

    fn header(&mut self) -> std::io::Result<()> {
        if !self.started {
            self.started = true;
            if self.format == OutputFormat::Csv {
                self.out.write_all(CSV_HEADER.as_bytes())?;
                self.out.write_all(b"\r\n")?;
            }
        }
        Ok(())
    }

    /// Writes what is left (a CSV's header, when there was no record) and flushes.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.header()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// A CSV field, quoted when it must be.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// What to export.
pub struct ExportRequest<'a> {
    pub storage: &'a Storage,
    pub settings: &'a PipelineSettings,
    pub decryption: &'a Decryption,
    pub from: &'a PointManifest,
    pub to: &'a PointManifest,
    /// One database (by its runbook name), or every one of the points.
    pub database: Option<&'a str>,
    pub table: Option<&'a str>,
    /// Where the binlog is reassembled while it is decoded.
    pub work_dir: &'a Path,
}

/// What an export read and wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub from_point: String,
    pub to_point: String,
    pub databases: Vec<DatabaseReport>,
    pub records: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DatabaseReport {
    pub database: String,
    pub adapter: String,
    pub from: Position,
    pub to: Position,
    pub chunks: usize,
    #[serde(flatten)]
    pub stats: DecodeStats,
    pub fetch_ms: u64,
    pub decode_ms: u64,
}

/// The databases of an export and their two markers, checked before anything is
/// read: both points have them, the adapter can be exported, `from` is not after
/// `to`.
fn plan<'a>(
    request: &ExportRequest<'a>,
) -> Result<Vec<(&'a crate::points::PointDatabase, Position, Position)>, ChangesError> {
    let setup = |message: String| ChangesError::Setup(message);
    let (from, to) = (request.from, request.to);
    if from.time_ms() > to.time_ms() {
        return Err(setup(format!(
            "--from {} (mid-time {}) is after --to {} ({}); give the older point as --from",
            from.point_id,
            from.window
                .restore_point_date_time
                .as_deref()
                .unwrap_or("-"),
            to.point_id,
            to.window.restore_point_date_time.as_deref().unwrap_or("-"),
        )));
    }
    let names: Vec<&str> = match request.database {
        Some(name) => vec![name],
        None => to.databases.iter().map(|db| db.name.as_str()).collect(),
    };
    let mut planned = Vec::new();
    for name in names {
        let (Some(a), Some(b)) = (from.database(name), to.database(name)) else {
            return Err(setup(format!(
                "database {name:?} is not in both points {} and {}; they have: {}",
                from.point_id,
                to.point_id,
                to.databases
                    .iter()
                    .map(|db| db.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let (start, end) = match b.adapter.as_str() {
            "mariadb" => (a.target.clone(), b.target.clone()),
            "postgres" => (a.change_marker(), b.change_marker()),
            adapter => {
                return Err(setup(format!(
                    "database {name} is {adapter}: `stillpoint changes` exports MariaDB and \
                     PostgreSQL databases{}",
                    if request.database.is_none() {
                        "; name one with --database"
                    } else {
                        ""
                    }
                )));
            }
        };
        let (Some(start), Some(end)) = (start, end) else {
            return Err(setup(format!(
                "database {name} has no log marker in point {}",
                if a.target.is_none() {
                    &from.point_id
                } else {
                    &to.point_id
                }
            )));
        };
        if start > end {
            return Err(setup(format!(
                "database {name}: point {}'s marker {start} is after point {}'s {end}; give \
                 the older point as --from",
                from.point_id, to.point_id
            )));
        }
        planned.push((b, start, end));
    }
    Ok(planned)
}

/// Writes every committed change between the two points' markers to `out`, database
/// by database, each in commit order.
pub async fn export<W: Write>(
    request: &ExportRequest<'_>,
    out: &mut RecordWriter<W>,
) -> Result<ExportReport, ChangesError> {
    let started = Instant::now();
    let planned = plan(request)?;
    let mut report = ExportReport {
        from_point: request.from.point_id.clone(),
        to_point: request.to.point_id.clone(),
        databases: Vec::new(),
        records: 0,
        elapsed_ms: 0,
    };
    for (database, from, to) in planned {
        let name = database.name.as_str();
        if let (Some(start), Some(end)) = (from.lsn(), to.lsn()) {
            let stream =
                Archive::change_stream(request.storage.clone(), request.settings.clone(), name)?;
            let range = postgres::Range {
                stream: &stream,
                decryption: request.decryption,
                from: start,
                to: end,
                database: name,
                table: request.table,
            };
            let started = Instant::now();
            let exported = postgres::export(&range, &mut |change| out.write(&change)).await?;
            report.records += exported.stats.records;
            report.databases.push(DatabaseReport {
                database: name.to_owned(),
                adapter: database.adapter.clone(),
                from,
                to,
                chunks: exported.chunks,
                stats: exported.stats,
                fetch_ms: exported.fetch_ms,
                decode_ms: (started.elapsed().as_millis() as u64).saturating_sub(exported.fetch_ms),
            });
            continue;
        }
        let schema = source_schema(request.storage, database).await?;
        let archive = Archive::new(request.storage.clone(), request.settings.clone(), name)?;
        let fetching = Instant::now();
        let fetched =
            binlog_archive::fetch_range(&archive, request.decryption, &from, &to, request.work_dir)
                .await?;
        let fetch_ms = fetching.elapsed().as_millis() as u64;
        let files = fetched.paths();
        let (Some(start), Some(end)) = (from.as_binlog(), to.as_binlog()) else {
            unreachable!("plan() keeps binlog positions for MariaDB");
        };
        let range = mariadb::Range {
            files: &files,
            from: start,
            to: end,
            database: name,
            schema: &schema,
            table: request.table,
        };
        let decoding = Instant::now();
        // Synchronous: file reads and the writer's; the command runs nothing else
        // meanwhile.
        let stats = mariadb::decode(&range, &mut |change| out.write(&change))?;
        report.records += stats.records;
        report.databases.push(DatabaseReport {
            database: name.to_owned(),
            adapter: database.adapter.clone(),
            from,
            to,
            chunks: fetched.report().chunks.len(),
            stats,
            fetch_ms,
            decode_ms: decoding.elapsed().as_millis() as u64,
        });
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The schema the source server wrote the database's events in: the one its base
/// backup records (as a restore replays it), else the runbook's name.
async fn source_schema(
    storage: &Storage,
    database: &crate::points::PointDatabase,
) -> Result<String, ChangesError> {
    let Some(base_ref) = &database.base else {
        return Ok(database.name.clone());
    };
    let record = base::read_record(storage, &database.name, &base_ref.id)
        .await
        .map_err(|error| {
            ChangesError::Setup(format!(
                "base backup {} of {}: {error}",
                base_ref.id, database.name
            ))
        })?;
    Ok(record
        .and_then(|record| record.details.get("database").cloned())
        .unwrap_or_else(|| database.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        Change {
            commit_ms: 1_764_547_200_000,
            transaction: "0-1-42".to_owned(),
            kind: Kind::Update,
            database: "auditor".to_owned(),
            table: "audit".to_owned(),
            key: Some(vec![("tx_id".to_owned(), Value::Text("t,1".to_owned()))]),
            after: Some(vec![
                ("tx_id".to_owned(), Value::Text("t,1".to_owned())),
                ("n".to_owned(), Value::Int(-3)),
                ("price".to_owned(), Value::Decimal("12.50".to_owned())),
                ("raw".to_owned(), Value::Bytes(vec![0, 0xff])),
                ("note".to_owned(), Value::Null),
            ]),
            before: Some(vec![("tx_id".to_owned(), Value::Text("t,1".to_owned()))]),
        }
    }

    #[test]
    fn jsonl_is_one_object_per_line_with_columns_in_order() {
        let mut writer = RecordWriter::new(Vec::new(), OutputFormat::Jsonl);
        writer.write(&change()).unwrap();
        writer.write(&change()).unwrap();
        let bytes = writer.finish().unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            r#"{"commit_ms":1764547200000,"transaction":"0-1-42","kind":"update","database":"auditor","table":"audit","key":{"tx_id":"t,1"},"after":{"tx_id":"t,1","n":-3,"price":"12.50","raw":{"hex":"00ff"},"note":null},"before":{"tx_id":"t,1"}}"#
        );
    }

    #[test]
    fn csv_quotes_the_json_columns_and_has_a_header_even_when_empty() {
        let mut writer = RecordWriter::new(Vec::new(), OutputFormat::Csv);
        let mut insert = change();
        insert.kind = Kind::Insert;
        insert.before = None;
        writer.write(&insert).unwrap();
        let text = String::from_utf8(writer.finish().unwrap()).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(
            lines[1],
            r#"1764547200000,0-1-42,insert,auditor,audit,"{""tx_id"":""t,1""}","{""tx_id"":""t,1"",""n"":-3,""price"":""12.50"",""raw"":{""hex"":""00ff""},""note"":null}","#
        );
        let empty = RecordWriter::new(Vec::new(), OutputFormat::Csv)
            .finish()
            .unwrap();
        assert_eq!(
            String::from_utf8(empty).unwrap(),
            format!("{CSV_HEADER}\r\n")
        );
    }
}
