//! The change records of a MariaDB database between two binlog positions, from its
//! archive: [`crate::archive::mariadb::fetch_range`] reads and checks the chunks and
//! reassembles the binlog files on disk (the same fetch a restore replays), then the
//! files are read event by event ([`super::binlog_rows`]) and every row of a
//! committed transaction of the source schema becomes a [`Change`].
//!
//! Memory stays bounded by one event (a rows event is at most
//! `binlog_row_event_max_size`, 8 KiB by default): nothing of a transaction is held.
//! At its GTID event a second read of the same file looks ahead for its end (XID, or a
//! QUERY `COMMIT`; a standalone GTID's one statement) without decoding, which gives the
//! commit time before the first row is written; a transaction whose end lies past
//! the range (or a `ROLLBACK`) is not written.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use super::binlog_rows::{self as rows, DecodeError, Event, Format, Gtid, Kind, TableMap, Value};
use super::{Change, ChangesError, DecodeStats};
use crate::archive::binlog::{self, HEADER_LEN};

/// What to decode: the reassembled files and where in them the range is.
pub struct Range<'a> {
    /// (file name, path), in order; the first holds `from`, the last `to`.
    pub files: &'a [(String, PathBuf)],
    pub from: (&'a str, u64),
    pub to: (&'a str, u64),
    /// The runbook's name for the database (what records carry).
    pub database: &'a str,
    /// The schema the source server wrote it as.
    pub schema: &'a str,
    pub table: Option<&'a str>,
}

/// Reads events of one file in order.
struct Events {
    reader: BufReader<File>,
    offset: u64,
    buf: Vec<u8>,
}

impl Events {
    fn open(path: &Path) -> std::io::Result<Events> {
        let mut reader = BufReader::with_capacity(256 * 1024, File::open(path)?);
        let mut magic = [0u8; 4];
        reader.read_exact(&mut magic)?;
        if magic != binlog::MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a binlog file (no magic)",
            ));
        }
        Ok(Events {
            reader,
            offset: binlog::FIRST_EVENT,
            buf: Vec::new(),
        })
    }

    /// The next whole event (its offset and bytes), or none at the end of the file.
    fn next(&mut self) -> std::io::Result<Option<(u64, &[u8])>> {
        let mut header = [0u8; HEADER_LEN];
        if !read_or_end(&mut self.reader, &mut header)? {
            return Ok(None);
        }
        let length = u32::from_le_bytes(header[9..13].try_into().expect("4")) as usize;
        if length < HEADER_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("an event of {length} bytes at {}", self.offset),
            ));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&header);
        self.buf.resize(length, 0);
        self.reader.read_exact(&mut self.buf[HEADER_LEN..])?;
        let at = self.offset;
        self.offset += length as u64;
        Ok(Some((at, &self.buf)))
    }

    /// The header of the next event, its body skipped unless it is one that can end
    /// a transaction (XID, QUERY), which is read whole.
    fn next_header(&mut self) -> std::io::Result<Option<Header<'_>>> {
        let mut header = [0u8; HEADER_LEN];
        if !read_or_end(&mut self.reader, &mut header)? {
            return Ok(None);
        }
        let length = u32::from_le_bytes(header[9..13].try_into().expect("4")) as usize;
        if length < HEADER_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("an event of {length} bytes at {}", self.offset),
            ));
        }
        let at = self.offset;
        self.offset += length as u64;
        if matches!(header[4], rows::XID_EVENT | rows::QUERY_EVENT) {
            self.buf.clear();
            self.buf.extend_from_slice(&header);
            self.buf.resize(length, 0);
            self.reader.read_exact(&mut self.buf[HEADER_LEN..])?;
            Ok(Some((at, header[4], Some(&self.buf))))
        } else {
            self.reader.seek_relative((length - HEADER_LEN) as i64)?;
            Ok(Some((at, header[4], None)))
        }
    }
}

/// An event's offset, type, and its bytes when they were read.
type Header<'a> = (u64, u8, Option<&'a [u8]>);

/// Fills `buf`, or says the file ended cleanly before it (false); a file that ends
/// inside it is an error.
fn read_or_end(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 if filled == 0 => return Ok(false),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    Ok(true)
}

/// How a transaction ends.
enum End {
    /// Committed at this time (seconds).
    Committed(u32),
    RolledBack,
    /// Its end is not in the range.
    Unfinished,
}

/// Decodes `range`, calling `emit` for each change in commit order.
pub fn decode(
    range: &Range<'_>,
    emit: &mut dyn FnMut(Change) -> std::io::Result<()>,
) -> Result<DecodeStats, ChangesError> {
    let mut stats = DecodeStats::default();
    for (name, path) in range.files {
        decode_file(range, name, path, &mut stats, emit)?;
        if name == range.to.0 {
            break;
        }
    }
    Ok(stats)
}

struct Transaction {
    gtid: String,
    commit_ms: i64,
    /// Rows are written (committed within the range).
    emit: bool,
    standalone: bool,
}

fn decode_file(
    range: &Range<'_>,
    name: &str,
    path: &Path,
    stats: &mut DecodeStats,
    emit: &mut dyn FnMut(Change) -> std::io::Result<()>,
) -> Result<(), ChangesError> {
    let damaged = |offset: u64, error: DecodeError| ChangesError::Decode {
        database: range.database.to_owned(),
        at: format!("{name}:{offset}"),
        source: error,
    };
    let io = |error: std::io::Error| ChangesError::Io {
        path: path.display().to_string(),
        source: error,
    };
    let stop = (name == range.to.0).then_some(range.to.1);
    let start = (name == range.from.0).then_some(range.from.1);
    let mut events = Events::open(path).map_err(io)?;
    let mut format: Option<Format> = None;
    let mut tables: std::collections::HashMap<u64, TableMap> = Default::default();
    let mut current: Option<Transaction> = None;
    // The look-ahead's reader, kept: each transaction starts after the last one's
    // end, where it stopped, so it only moves forward.
    let mut ahead = Events::open(path).map_err(io)?;
    loop {
        let Some((offset, bytes)) = events.next().map_err(io)? else {
            break;
        };
        if stop.is_some_and(|stop| offset >= stop) {
            break;
        }
        stats.events += 1;
        stats.log_bytes += bytes.len() as u64;
        if bytes[4] == rows::FORMAT_DESCRIPTION_EVENT {
            format = Some(Format::from_description(bytes).map_err(|e| damaged(offset, e))?);
            continue;
        }
        let Some(format) = &format else {
            return Err(damaged(
                offset,
                DecodeError::Damaged("an event before the format description".to_owned()),
            ));
        };
        let event = format.event(bytes).map_err(|e| damaged(offset, e))?;
        match event.kind {
            rows::GTID_EVENT => {
                tables.clear();
                let gtid = Gtid::parse(&event).map_err(|e| damaged(offset, e))?;
                if start.is_some_and(|start| offset < start) {
                    // Before the range: its rows are in the restore of the first point.
                    current = None;
                    continue;
                }
                let next = offset + bytes.len() as u64;
                let end = look_ahead(&mut ahead, next, stop, gtid.standalone, format).map_err(
                    |e| match e {
                        LookAhead::Io(e) => io(e),
                        LookAhead::Decode(at, e) => damaged(at, e),
                    },
                )?;
                let (emit, commit_ms) = match end {
                    End::Committed(seconds) => {
                        stats.transactions += 1;
                        (true, i64::from(seconds) * 1000)
                    }
                    End::RolledBack | End::Unfinished => {
                        stats.not_committed += 1;
                        (false, 0)
                    }
                };
                current = Some(Transaction {
                    gtid: gtid.to_string(),
                    commit_ms,
                    emit,
                    standalone: gtid.standalone,
                });
            }
            rows::TABLE_MAP_EVENT if current.is_some() => {
                let map = TableMap::parse(format, &event).map_err(|e| damaged(offset, e))?;
                tables.insert(map.table_id, map);
            }
            kind if rows::Kind::of(kind).is_some() => {
                let Some(transaction) = current.as_ref().filter(|t| t.emit) else {
                    continue;
                };
                write_rows(range, format, &event, &tables, transaction, stats, emit).map_err(
                    |e| match e {
                        Emit::Decode(e) => damaged(offset, e),
                        Emit::Output(e) => ChangesError::Output(e),
                    },
                )?;
            }
            rows::XID_EVENT => current = None,
            rows::QUERY_EVENT => {
                if current.as_ref().is_some_and(|t| t.standalone) {
                    current = None;
                } else if current.is_some() {
                    let text = rows::query_text(format, &event).map_err(|e| damaged(offset, e))?;
                    if ends_transaction(text).is_some() {
                        current = None;
                    }
                }
            }
            kind if Format::is_compressed(kind) => {
                return Err(damaged(offset, DecodeError::Compressed));
            }
            _ => {}
        }
    }
    Ok(())
}

/// `Some(true)` for COMMIT, `Some(false)` for ROLLBACK, none for other statements.
fn ends_transaction(text: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(text).ok()?.trim();
    if text.eq_ignore_ascii_case("COMMIT") {
        Some(true)
    } else if text.eq_ignore_ascii_case("ROLLBACK") {
        Some(false)
    } else {
        None
    }
}

enum LookAhead {
    Io(std::io::Error),
    Decode(u64, DecodeError),
}

/// How the transaction whose events start at `from` ends: a second reader of the file
/// that skips every body but a terminator's.
fn look_ahead(
    events: &mut Events,
    from: u64,
    stop: Option<u64>,
    standalone: bool,
    format: &Format,
) -> Result<End, LookAhead> {
    if events.offset <= from {
        // Forward within its buffer: no system call.
        events
            .reader
            .seek_relative((from - events.offset) as i64)
            .map_err(LookAhead::Io)?;
    } else {
        events
            .reader
            .seek(std::io::SeekFrom::Start(from))
            .map_err(LookAhead::Io)?;
    }
    events.offset = from;
    while let Some((offset, kind, bytes)) = events.next_header().map_err(LookAhead::Io)? {
        if stop.is_some_and(|stop| offset >= stop) {
            return Ok(End::Unfinished);
        }
        let Some(bytes) = bytes else {
            continue;
        };
        let event = format
            .event(bytes)
            .map_err(|e| LookAhead::Decode(offset, e))?;
        if standalone || kind == rows::XID_EVENT {
            return Ok(End::Committed(event.timestamp));
        }
        let text = rows::query_text(format, &event).map_err(|e| LookAhead::Decode(offset, e))?;
        match ends_transaction(text) {
            Some(true) => return Ok(End::Committed(event.timestamp)),
            Some(false) => return Ok(End::RolledBack),
            None => {}
        }
    }
    Ok(End::Unfinished)
}

enum Emit {
    Decode(DecodeError),
    Output(std::io::Error),
}

fn write_rows(
    range: &Range<'_>,
    format: &Format,
    event: &Event<'_>,
    tables: &std::collections::HashMap<u64, TableMap>,
    transaction: &Transaction,
    stats: &mut DecodeStats,
    emit: &mut dyn FnMut(Change) -> std::io::Result<()>,
) -> Result<(), Emit> {
    let table_id = rows::rows_table_id(format, event).map_err(Emit::Decode)?;
    let map = tables.get(&table_id).ok_or_else(|| {
        Emit::Decode(DecodeError::Damaged(format!(
            "a rows event for table id {table_id}, which no table map before it names"
        )))
    })?;
    if map.schema != range.schema || range.table.is_some_and(|table| table != map.table) {
        return Ok(());
    }
    let names = map.column_names().map_err(Emit::Decode)?;
    let (kind, changes) = rows::rows(format, event, map).map_err(Emit::Decode)?;
    let named = |image: Option<rows::Image>| {
        image.map(|values| {
            names
                .iter()
                .zip(values)
                .filter_map(|(name, value)| value.map(|value| ((*name).to_owned(), value)))
                .collect::<Vec<(String, Value)>>()
        })
    };
    for change in changes {
        // The row as it was identifies it (update, delete); an insert by its new values.
        let keyed = match kind {
            Kind::Insert => change.after.as_ref(),
            Kind::Update | Kind::Delete | Kind::Truncate => change.before.as_ref(),
        };
        let key = (!map.primary_key.is_empty()).then(|| {
            map.primary_key
                .iter()
                .map(|&index| {
                    let value = keyed
                        .and_then(|image| image.get(index).cloned().flatten())
                        .unwrap_or(Value::Null);
                    (names[index].to_owned(), value)
                })
                .collect::<Vec<_>>()
        });
        let record = Change {
            commit_ms: transaction.commit_ms,
            transaction: transaction.gtid.clone(),
            kind,
            database: range.database.to_owned(),
            table: map.table.clone(),
            key,
            after: named(change.after),
            before: named(change.before),
        };
        emit(record).map_err(Emit::Output)?;
        stats.records += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint_testkit::MariaDb;

    fn position(mariadb: &MariaDb) -> (String, u64) {
        let status = mariadb.sql("", "SHOW MASTER STATUS");
        let mut fields = status.split('\t');
        let file = fields.next().unwrap().to_owned();
        (file, fields.next().unwrap().trim().parse().unwrap())
    }

    fn column<'a>(columns: &'a Option<Vec<(String, Value)>>, name: &str) -> &'a Value {
        &columns
            .as_ref()
            .unwrap()
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .1
    }

    /// A binlog written by a real server (binlog_row_metadata = FULL, CRC32): every
    /// supported column type decodes to what was written, in commit order, with the
    /// transaction's GTID; other schemas and rolled-back work are left out, a table
    /// without a primary key has no key, and the range ends at its end position.
    #[test]
    fn a_real_servers_binlog_decodes_to_the_rows_written() {
        let mariadb = MariaDb::start();
        mariadb.create_database("shop");
        mariadb.create_database("elsewhere");
        mariadb.sql(
            "shop",
            "CREATE TABLE items (
                region CHAR(2) NOT NULL, id BIGINT NOT NULL, qty SMALLINT,
                big BIGINT UNSIGNED, price DECIMAL(12,3), ratio DOUBLE, f FLOAT,
                name VARCHAR(300), note TEXT NULL, raw VARBINARY(16), data BLOB,
                d DATE, dt DATETIME(3), ts TIMESTAMP(6) NULL, t TIME, t2 TIME(2),
                color ENUM('red','green'), tags SET('a','b','c'), y YEAR, flag BIT(3),
                tiny TINYINT UNSIGNED, m MEDIUMINT,
                PRIMARY KEY (region, id)
             ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
             CREATE TABLE nokey (n INT) ENGINE=InnoDB;",
        );
        mariadb.sql("elsewhere", "CREATE TABLE t (id INT PRIMARY KEY)");
        let from = position(&mariadb);
        mariadb.sql(
            "shop",
            "SET time_zone = '+00:00';
             BEGIN;
             INSERT INTO items VALUES ('eu', -5, -300, 18446744073709551615, -1234.567,
                 0.25, 1.5, 'naïve, \"quoted\"', NULL, 0x00ff10, 0xdeadbeef, '2026-11-30',
                 '2026-11-30 23:59:58.123', '2026-01-02 03:04:05.654321', '-01:02:03',
                 '12:34:56.78', 'green', 'a,c', 2026, b'101', 255, -8388608);
             INSERT INTO items (region, id, name) VALUES ('us', 7, 'plain');
             COMMIT;
             UPDATE items SET qty = 4, note = 'changed' WHERE region = 'us' AND id = 7;
             INSERT INTO elsewhere.t VALUES (1);
             BEGIN; INSERT INTO items (region, id) VALUES ('xx', 1); ROLLBACK;
             INSERT INTO nokey VALUES (3);
             DELETE FROM items WHERE region = 'eu';",
        );
        let to = position(&mariadb);
        // After the range: not exported.
        mariadb.sql("shop", "INSERT INTO nokey VALUES (4)");
        let files = vec![(from.0.clone(), mariadb.data_dir().join(&from.0))];
        assert_eq!(from.0, to.0, "one binlog file");
        let range = Range {
            files: &files,
            from: (&from.0, from.1),
            to: (&to.0, to.1),
            database: "shop-db",
            schema: "shop",
            table: None,
        };
        let mut changes = Vec::new();
        let stats = decode(&range, &mut |change| {
            changes.push(change);
            Ok(())
        })
        .unwrap();
        let kinds: Vec<(&str, Kind)> = changes.iter().map(|c| (c.table.as_str(), c.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("items", Kind::Insert),
                ("items", Kind::Insert),
                ("items", Kind::Update),
                ("nokey", Kind::Insert),
                ("items", Kind::Delete),
            ],
            "{changes:#?}"
        );
        // Five committed transactions: the insert pair, the update, elsewhere's, nokey's, the delete.
        assert_eq!(stats.transactions, 5, "{stats:?}");
        assert_eq!(stats.records, 5);
        let first = &changes[0];
        assert_eq!(first.database, "shop-db");
        assert!(first.transaction.starts_with("0-1-"), "{first:?}");
        assert_eq!(first.transaction, changes[1].transaction);
        assert_ne!(first.transaction, changes[2].transaction);
        assert!(first.commit_ms > 1_700_000_000_000 && first.commit_ms % 1000 == 0);
        assert_eq!(
            first.key,
            Some(vec![
                ("region".to_owned(), Value::Text("eu".to_owned())),
                ("id".to_owned(), Value::Int(-5)),
            ])
        );
        assert!(first.before.is_none());
        let after = &first.after;
        for (name, expected) in [
            ("qty", Value::Int(-300)),
            ("big", Value::UInt(u64::MAX)),
            ("price", Value::Decimal("-1234.567".to_owned())),
            ("ratio", Value::Float(0.25)),
            ("f", Value::Float(1.5)),
            ("name", Value::Text("naïve, \"quoted\"".to_owned())),
            ("note", Value::Null),
            ("raw", Value::Bytes(vec![0, 0xff, 0x10])),
            ("data", Value::Bytes(vec![0xde, 0xad, 0xbe, 0xef])),
            ("d", Value::Text("2026-11-30".to_owned())),
            ("dt", Value::Text("2026-11-30 23:59:58.123".to_owned())),
            ("ts", Value::Text("2026-01-02 03:04:05.654321".to_owned())),
            ("t", Value::Text("-01:02:03".to_owned())),
            ("t2", Value::Text("12:34:56.78".to_owned())),
            ("color", Value::Text("green".to_owned())),
            ("tags", Value::Text("a,c".to_owned())),
            ("y", Value::UInt(2026)),
            ("flag", Value::UInt(5)),
            ("tiny", Value::UInt(255)),
            ("m", Value::Int(-8_388_608)),
        ] {
            assert_eq!(column(after, name), &expected, "column {name}");
        }
        let update = &changes[2];
        assert_eq!(column(&update.before, "qty"), &Value::Null);
        assert_eq!(column(&update.after, "qty"), &Value::Int(4));
        assert_eq!(
            column(&update.after, "note"),
            &Value::Text("changed".to_owned())
        );
        assert_eq!(changes[3].key, None, "a table without a primary key");
        let delete = &changes[4];
        assert!(delete.after.is_none());
        assert_eq!(
            column(&delete.before, "price"),
            &Value::Decimal("-1234.567".to_owned())
        );

        // One table only.
        let only = Range {
            table: Some("nokey"),
            ..range
        };
        let mut count = 0;
        decode(&only, &mut |change| {
            assert_eq!(change.table, "nokey");
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 1);
    }

    /// Without `binlog_row_metadata = FULL` the table map has no names: refused,
    /// naming the table and the setting. Control: the same server with it set
    /// decodes (the test above).
    #[test]
    fn a_binlog_without_column_names_is_refused_naming_the_setting() {
        let mariadb = MariaDb::start();
        mariadb.create_database("shop");
        mariadb.sql("shop", "CREATE TABLE t (id INT PRIMARY KEY)");
        mariadb.sql("", "SET GLOBAL binlog_row_metadata = MINIMAL");
        let from = position(&mariadb);
        mariadb.sql("shop", "INSERT INTO t VALUES (1)");
        let to = position(&mariadb);
        let files = vec![(from.0.clone(), mariadb.data_dir().join(&from.0))];
        let range = Range {
            files: &files,
            from: (&from.0, from.1),
            to: (&to.0, to.1),
            database: "shop",
            schema: "shop",
            table: None,
        };
        let error = decode(&range, &mut |_| Ok(())).unwrap_err().to_string();
        assert!(
            error.contains("shop.t") && error.contains("binlog_row_metadata = FULL"),
            "{error}"
        );
    }
}
