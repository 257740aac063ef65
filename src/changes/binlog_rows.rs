//! Decoding MariaDB's row-based binlog events into rows of named columns: the format
//! description (post-header lengths, CRC32), GTID, XID, QUERY, TABLE_MAP (with its
//! optional metadata: column names, primary key, signedness, charsets, enum and set
//! values) and WRITE/UPDATE/DELETE_ROWS (v1, and v2's layout). What
//! [`super::mariadb`] walks the archived binlog with.
//!
//! Why not `mysql_common`'s binlog module: it needs a feature (and crates) this
//! workspace does not build, and it knows MySQL's event types, not MariaDB's GTID
//! events (160–163); the row format itself is small and fixed, and decoding it here
//! keeps what a value becomes (the JSON of a change record) in one place.
//!
//! Column types decoded: TINYINT…BIGINT (signed and unsigned), DECIMAL, FLOAT,
//! DOUBLE, BIT, YEAR, DATE, DATETIME, TIMESTAMP, TIME (old and fractional formats),
//! CHAR, VARCHAR, BINARY, VARBINARY, TEXT and BLOB (all sizes), ENUM, SET. Anything
//! else (GEOMETRY, …) is an error naming the table and column, never a guess.
//! Temporal values print as MariaDB prints them; TIMESTAMP in UTC.

use std::fmt::Write as _;

/// Event types this module reads (MariaDB's numbering).
pub const QUERY_EVENT: u8 = 2;
pub const FORMAT_DESCRIPTION_EVENT: u8 = 15;
pub const XID_EVENT: u8 = 16;
pub const TABLE_MAP_EVENT: u8 = 19;
pub const WRITE_ROWS_V1: u8 = 23;
pub const UPDATE_ROWS_V1: u8 = 24;
pub const DELETE_ROWS_V1: u8 = 25;
pub const WRITE_ROWS_V2: u8 = 30;
pub const UPDATE_ROWS_V2: u8 = 31;
pub const DELETE_ROWS_V2: u8 = 32;
pub const ANNOTATE_ROWS_EVENT: u8 = 160;
pub const GTID_EVENT: u8 = 162;
/// MariaDB's compressed row events (`log_bin_compress = ON`): 166–171.
const COMPRESSED_EVENTS: std::ops::RangeInclusive<u8> = 165..=171;

/// GTID event flag: a transaction of one statement without XID or COMMIT (DDL).
pub const GTID_STANDALONE: u8 = 1;

const HEADER_LEN: usize = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not a binlog this code reads (cut short, a bad checksum).
    #[error("{0}")]
    Damaged(String),
    /// A column type the decoder does not know.
    #[error(
        "table {table}, column {column}: binlog column type {kind} is not supported by \
         `stillpoint changes` (supported: integers, DECIMAL, FLOAT, DOUBLE, BIT, YEAR, \
         DATE, DATETIME, TIMESTAMP, TIME, CHAR, VARCHAR, BINARY, TEXT, BLOB, ENUM, SET)"
    )]
    Unsupported {
        table: String,
        column: String,
        kind: u8,
    },
    /// The server wrote no column names.
    #[error(
        "table {table}: the binlog has no column names for it; set binlog_row_metadata = \
         FULL on the server (changes written before that cannot be exported with names)"
    )]
    NoColumnNames { table: String },
    /// Compressed events, which this code does not read.
    #[error(
        "the binlog holds compressed row events (log_bin_compress = ON); set \
         log_bin_compress = OFF for `stillpoint changes`"
    )]
    Compressed,
}

fn damaged(what: impl std::fmt::Display) -> DecodeError {
    DecodeError::Damaged(what.to_string())
}

/// A read position over an event's bytes; every read says what was cut short.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, at: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() - self.at < n {
            return Err(damaged(format!(
                "the event is cut short reading {what} ({n} bytes at {}, {} left)",
                self.at,
                self.bytes.len() - self.at
            )));
        }
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn rest(&mut self) -> &'a [u8] {
        let slice = &self.bytes[self.at..];
        self.at = self.bytes.len();
        slice
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    /// `n` bytes, little-endian.
    fn le(&mut self, n: usize, what: &str) -> Result<u64, DecodeError> {
        Ok(self
            .take(n, what)?
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// `n` bytes, big-endian.
    fn be(&mut self, n: usize, what: &str) -> Result<u64, DecodeError> {
        Ok(self
            .take(n, what)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// A length-encoded integer (the client protocol's).
    fn lenenc(&mut self, what: &str) -> Result<u64, DecodeError> {
        match self.u8(what)? {
            small @ 0..=0xfa => Ok(u64::from(small)),
            0xfc => self.le(2, what),
            0xfd => self.le(3, what),
            0xfe => self.le(8, what),
            other => Err(damaged(format!("{what}: {other:#x} starts no length"))),
        }
    }
}

/// One event: its header fields and its body (the checksum, if any, removed).
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub kind: u8,
    /// Seconds since the epoch: when the server wrote it (whole seconds only).
    pub timestamp: u32,
    pub server_id: u32,
    pub body: &'a [u8],
}

/// What a file's format description says about every later event: the post-header
/// length per type and whether events end with a CRC32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    checksum: bool,
    post_header: Vec<u8>,
}

impl Format {
    /// The format a FORMAT_DESCRIPTION event (`bytes`, header included) describes.
    /// Its own checksum is checked when it has one.
    pub fn from_description(bytes: &[u8]) -> Result<Format, DecodeError> {
        if bytes.len() < HEADER_LEN + 57 + 5 || bytes[4] != FORMAT_DESCRIPTION_EVENT {
            return Err(damaged(
                "the file does not start with a format description event",
            ));
        }
        let body = &bytes[HEADER_LEN..];
        // Since MySQL 5.6.1 / MariaDB 5.3 the description ends with the checksum
        // algorithm (1 byte) and a 4-byte checksum, whatever the algorithm.
        let algorithm = body[body.len() - 5];
        let checksum = match algorithm {
            0 => false,
            1 => true,
            other => {
                return Err(damaged(format!(
                    "binlog_checksum algorithm {other} is not CRC32 or NONE"
                )));
            }
        };
        let format = Format {
            checksum,
            post_header: body[57..body.len() - 5].to_vec(),
        };
        if checksum {
            format.check(bytes)?;
        }
        Ok(format)
    }

    fn check(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        let (data, stored) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
        let computed = if data[4] == FORMAT_DESCRIPTION_EVENT {
            // The server sets LOG_EVENT_BINLOG_IN_USE_F in a file's description while
            // it writes the file, after the checksum was taken without it.
            let mut copy = data.to_vec();
            copy[17] &= !1;
            crc32fast::hash(&copy)
        } else {
            crc32fast::hash(data)
        };
        if stored != computed {
            return Err(damaged(format!(
                "its CRC32 is {stored:08x} but its bytes give {computed:08x}: the binlog is \
                 damaged"
            )));
        }
        Ok(())
    }

    fn post_header_len(&self, kind: u8) -> usize {
        self.post_header
            .get(usize::from(kind).wrapping_sub(1))
            .copied()
            .map_or(0, usize::from)
    }

    /// One whole event (header included), its checksum checked.
    pub fn event<'a>(&self, bytes: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        if bytes.len() < HEADER_LEN + if self.checksum { 4 } else { 0 } {
            return Err(damaged("an event shorter than its header"));
        }
        let end = if self.checksum && bytes[4] != FORMAT_DESCRIPTION_EVENT {
            self.check(bytes)?;
            bytes.len() - 4
        } else {
            bytes.len()
        };
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        Ok(Event {
            kind: bytes[4],
            timestamp: u32_at(0),
            server_id: u32_at(5),
            body: &bytes[HEADER_LEN..end],
        })
    }

    /// Whether events of this kind are MariaDB's compressed ones.
    pub fn is_compressed(kind: u8) -> bool {
        COMPRESSED_EVENTS.contains(&kind) && kind != 165
    }
}

/// A GTID event: the transaction's id and whether it stands alone (no XID/COMMIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub sequence: u64,
    pub standalone: bool,
}

impl Gtid {
    pub fn parse(event: &Event<'_>) -> Result<Gtid, DecodeError> {
        let mut cursor = Cursor::new(event.body);
        let sequence = cursor.le(8, "the GTID's sequence number")?;
        let domain = cursor.le(4, "the GTID's domain")? as u32;
        let flags = cursor.u8("the GTID's flags")?;
        Ok(Gtid {
            domain,
            server: event.server_id,
            sequence,
            standalone: flags & GTID_STANDALONE != 0,
        })
    }
}

impl std::fmt::Display for Gtid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.sequence)
    }
}

/// The statement of a QUERY event (for `COMMIT` / `ROLLBACK`, which end a
/// transaction of non-transactional tables).
pub fn query_text<'a>(format: &Format, event: &Event<'a>) -> Result<&'a [u8], DecodeError> {
    let post = format.post_header_len(QUERY_EVENT).max(13);
    let mut cursor = Cursor::new(event.body);
    let header = cursor.take(post, "the query's post-header")?;
    let schema_len = usize::from(header[8]);
    let status_len = u16::from_le_bytes([header[11], header[12]]) as usize;
    cursor.take(status_len, "the query's status variables")?;
    cursor.take(schema_len + 1, "the query's schema")?;
    Ok(cursor.rest())
}

/// A column of a mapped table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: Option<String>,
    /// The binlog type (for CHAR, ENUM and SET: the real type from its metadata).
    pub kind: u8,
    pub meta: u16,
    pub unsigned: bool,
    /// Bytes, not text (BINARY, VARBINARY, BLOB: collation 63).
    pub binary: bool,
    /// ENUM or SET member names, in order.
    pub members: Vec<String>,
}

/// A TABLE_MAP event: the table a table id stands for in the rows events after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMap {
    pub table_id: u64,
    pub schema: String,
    pub table: String,
    pub columns: Vec<Column>,
    /// Column indexes of the primary key (none logged: no primary key, or no FULL
    /// metadata).
    pub primary_key: Vec<usize>,
}

mod types {
    pub const DECIMAL: u8 = 0;
    pub const TINY: u8 = 1;
    pub const SHORT: u8 = 2;
    pub const LONG: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const DOUBLE: u8 = 5;
    pub const TIMESTAMP: u8 = 7;
    pub const LONGLONG: u8 = 8;
    pub const INT24: u8 = 9;
    pub const DATE: u8 = 10;
    pub const TIME: u8 = 11;
    pub const DATETIME: u8 = 12;
    pub const YEAR: u8 = 13;
    pub const NEWDATE: u8 = 14;
    pub const VARCHAR: u8 = 15;
    pub const BIT: u8 = 16;
    pub const TIMESTAMP2: u8 = 17;
    pub const DATETIME2: u8 = 18;
    pub const TIME2: u8 = 19;
    pub const JSON: u8 = 245;
    pub const NEWDECIMAL: u8 = 246;
    pub const ENUM: u8 = 247;
    pub const SET: u8 = 248;
    pub const TINY_BLOB: u8 = 249;
    pub const MEDIUM_BLOB: u8 = 250;
    pub const LONG_BLOB: u8 = 251;
    pub const BLOB: u8 = 252;
    pub const VAR_STRING: u8 = 253;
    pub const STRING: u8 = 254;
    pub const GEOMETRY: u8 = 255;
}
use types::*;

/// Bytes of per-column metadata in a TABLE_MAP for each type.
fn meta_len(kind: u8) -> usize {
    match kind {
        FLOAT | DOUBLE | BLOB | TINY_BLOB | MEDIUM_BLOB | LONG_BLOB | GEOMETRY | JSON
        | TIMESTAMP2 | DATETIME2 | TIME2 => 1,
        VARCHAR | VAR_STRING | BIT | NEWDECIMAL | STRING | ENUM | SET | DECIMAL => 2,
        _ => 0,
    }
}

/// Types the SIGNEDNESS metadata has a bit for. MariaDB counts YEAR (a kind of
/// TINYINT there, always unsigned); a real server's binlog in the tests shows it.
fn is_numeric(kind: u8) -> bool {
    matches!(
        kind,
        TINY | SHORT | INT24 | LONG | LONGLONG | FLOAT | DOUBLE | NEWDECIMAL | YEAR
    )
}

/// Types the charset metadata has an entry for (ENUM and SET have their own).
fn is_character(kind: u8) -> bool {
    matches!(
        kind,
        STRING | VARCHAR | VAR_STRING | BLOB | TINY_BLOB | MEDIUM_BLOB | LONG_BLOB
    )
}

/// The binary collation: the column holds bytes.
const BINARY_COLLATION: u64 = 63;

impl TableMap {
    pub fn parse(format: &Format, event: &Event<'_>) -> Result<TableMap, DecodeError> {
        let mut cursor = Cursor::new(event.body);
        let table_id = table_id(&mut cursor, format.post_header_len(TABLE_MAP_EVENT))?;
        cursor.take(2, "the table map's flags")?;
        let schema_len = usize::from(cursor.u8("the schema name's length")?);
        let schema = text(cursor.take(schema_len, "the schema name")?);
        cursor.take(1, "the schema name's NUL")?;
        let table_len = usize::from(cursor.u8("the table name's length")?);
        let table = text(cursor.take(table_len, "the table name")?);
        cursor.take(1, "the table name's NUL")?;
        let count = cursor.lenenc("the column count")? as usize;
        let kinds = cursor.take(count, "the column types")?.to_vec();
        let meta_size = cursor.lenenc("the metadata length")? as usize;
        let mut meta = Cursor::new(cursor.take(meta_size, "the column metadata")?);
        let mut columns = Vec::with_capacity(count);
        for &kind in &kinds {
            let raw = meta.take(meta_len(kind), "a column's metadata")?;
            let (kind, value) = match (kind, raw) {
                // CHAR/ENUM/SET: the real type and the length, with the length's high
                // bits folded into the type byte.
                (STRING, [real, length]) => {
                    let (mut real, mut length) = (*real, u16::from(*length));
                    if real & 0x30 != 0x30 {
                        length += u16::from((real & 0x30) ^ 0x30) << 4;
                        real |= 0x30;
                    }
                    (real, length)
                }
                (NEWDECIMAL | BIT, [a, b]) => (kind, (u16::from(*a) << 8) | u16::from(*b)),
                (_, [a, b]) => (kind, u16::from_le_bytes([*a, *b])),
                (_, [a]) => (kind, u16::from(*a)),
                _ => (kind, 0),
            };
            columns.push(Column {
                name: None,
                kind,
                meta: value,
                unsigned: false,
                binary: false,
                members: Vec::new(),
            });
        }
        cursor.take(count.div_ceil(8), "the nullable bitmap")?;
        let mut map = TableMap {
            table_id,
            schema,
            table,
            columns,
            primary_key: Vec::new(),
        };
        map.optional_metadata(cursor.rest())?;
        Ok(map)
    }

    fn optional_metadata(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let mut cursor = Cursor::new(bytes);
        while cursor.remaining() > 0 {
            let kind = cursor.u8("an optional metadata field's type")?;
            let length = cursor.lenenc("an optional metadata field's length")? as usize;
            let mut field = Cursor::new(cursor.take(length, "an optional metadata field")?);
            match kind {
                // SIGNEDNESS: one bit per numeric column, most significant first.
                1 => {
                    let bits = field.rest();
                    let numeric = self.columns.iter_mut().filter(|c| is_numeric(c.kind));
                    for (index, column) in numeric.enumerate() {
                        column.unsigned = bits
                            .get(index / 8)
                            .is_some_and(|byte| byte & (0x80 >> (index % 8)) != 0);
                    }
                }
                // DEFAULT_CHARSET: a default, then (character column index, collation)
                // for those that differ.
                2 => {
                    let default = field.lenenc("the default charset")?;
                    let mut collations = vec![default; self.character_count()];
                    while field.remaining() > 0 {
                        let index = field.lenenc("a charset's column")? as usize;
                        let collation = field.lenenc("a column's charset")?;
                        if let Some(slot) = collations.get_mut(index) {
                            *slot = collation;
                        }
                    }
                    self.set_collations(&collations);
                }
                // COLUMN_CHARSET: one collation per character column.
                3 => {
                    let mut collations = Vec::new();
                    while field.remaining() > 0 {
                        collations.push(field.lenenc("a column's charset")?);
                    }
                    self.set_collations(&collations);
                }
                // COLUMN_NAME
                4 => {
                    for column in &mut self.columns {
                        let length = field.lenenc("a column name's length")? as usize;
                        column.name = Some(text(field.take(length, "a column name")?));
                    }
                }
                // SET_STR_VALUE, ENUM_STR_VALUE: per set (enum) column, its members.
                5 | 6 => {
                    let wanted = if kind == 5 { SET } else { ENUM };
                    for column in self.columns.iter_mut().filter(|c| c.kind == wanted) {
                        let members = field.lenenc("a member count")?;
                        for _ in 0..members {
                            let length = field.lenenc("a member's length")? as usize;
                            column.members.push(text(field.take(length, "a member")?));
                        }
                    }
                }
                // SIMPLE_PRIMARY_KEY: column indexes.
                8 => {
                    while field.remaining() > 0 {
                        self.primary_key
                            .push(field.lenenc("a primary key column")? as usize);
                    }
                }
                // PRIMARY_KEY_WITH_PREFIX: (column index, prefix length) pairs.
                9 => {
                    while field.remaining() > 0 {
                        self.primary_key
                            .push(field.lenenc("a primary key column")? as usize);
                        field.lenenc("a primary key prefix")?;
                    }
                }
                _ => {}
            }
        }
        if self.primary_key.iter().any(|&i| i >= self.columns.len()) {
            return Err(damaged(format!(
                "table {}: a primary key column index is past its {} columns",
                self.name(),
                self.columns.len()
            )));
        }
        Ok(())
    }

    fn character_count(&self) -> usize {
        self.columns.iter().filter(|c| is_character(c.kind)).count()
    }

    fn set_collations(&mut self, collations: &[u64]) {
        let characters = self.columns.iter_mut().filter(|c| is_character(c.kind));
        for (column, collation) in characters.zip(collations) {
            column.binary = *collation == BINARY_COLLATION;
        }
    }

    /// `schema.table`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The column names, or the error that says how to get them.
    pub fn column_names(&self) -> Result<Vec<&str>, DecodeError> {
        self.columns
            .iter()
            .map(|c| c.name.as_deref())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| DecodeError::NoColumnNames { table: self.name() })
    }
}

fn table_id(cursor: &mut Cursor<'_>, post_header: usize) -> Result<u64, DecodeError> {
    // A 6-byte table id since MySQL 5.1.4; a post-header of 6 bytes means 4.
    if post_header == 6 {
        cursor.le(4, "the table id")
    } else {
        cursor.le(6, "the table id")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A column's value as the change record carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    /// DECIMAL, exact, as text.
    Decimal(String),
    /// Text, and dates and times as MariaDB prints them.
    Text(String),
    /// Binary strings and BLOBs.
    Bytes(Vec<u8>),
    /// PostgreSQL's boolean (MariaDB's BOOLEAN is a TINYINT).
    Bool(bool),
}

/// What a rows event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Insert,
    Update,
    Delete,
    /// PostgreSQL's TRUNCATE of a table (no key, no columns).
    Truncate,
}

impl Kind {
    pub fn of(event_kind: u8) -> Option<Kind> {
        match event_kind {
            WRITE_ROWS_V1 | WRITE_ROWS_V2 => Some(Kind::Insert),
            UPDATE_ROWS_V1 | UPDATE_ROWS_V2 => Some(Kind::Update),
            DELETE_ROWS_V1 | DELETE_ROWS_V2 => Some(Kind::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Insert => "insert",
            Kind::Update => "update",
            Kind::Delete => "delete",
            Kind::Truncate => "truncate",
        }
    }
}

/// One row image: a value for each column the image holds (`None`: not in it).
pub type Image = Vec<Option<Value>>;

/// One changed row: the image before (update, delete) and after (insert, update).
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    pub before: Option<Image>,
    pub after: Option<Image>,
}

/// The table id a rows event is for, read before the table is looked up.
pub fn rows_table_id(format: &Format, event: &Event<'_>) -> Result<u64, DecodeError> {
    let mut cursor = Cursor::new(event.body);
    table_id(&mut cursor, format.post_header_len(event.kind))
}

/// The rows of a WRITE/UPDATE/DELETE_ROWS event of the table `map`.
pub fn rows(
    format: &Format,
    event: &Event<'_>,
    map: &TableMap,
) -> Result<(Kind, Vec<RowChange>), DecodeError> {
    let kind = Kind::of(event.kind).ok_or_else(|| damaged("not a rows event"))?;
    let post_header = format.post_header_len(event.kind);
    let mut cursor = Cursor::new(event.body);
    table_id(&mut cursor, post_header)?;
    cursor.take(2, "the rows event's flags")?;
    if post_header == 10 {
        // v2: extra data, its length counting its own two bytes.
        let extra = cursor.le(2, "the extra data's length")? as usize;
        cursor.take(extra.saturating_sub(2), "the extra data")?;
    }
    let count = cursor.lenenc("the column count")? as usize;
    if count != map.columns.len() {
        return Err(damaged(format!(
            "a rows event of {} has {count} columns, its table map {}",
            map.name(),
            map.columns.len()
        )));
    }
    let present = bitmap(cursor.take(count.div_ceil(8), "the columns bitmap")?, count);
    let present_after = if kind == Kind::Update {
        bitmap(
            cursor.take(count.div_ceil(8), "the after columns bitmap")?,
            count,
        )
    } else {
        present.clone()
    };
    let mut changes = Vec::new();
    while cursor.remaining() > 0 {
        let before_row = cursor.remaining();
        let change = match kind {
            Kind::Insert => RowChange {
                before: None,
                after: Some(image(&mut cursor, map, &present)?),
            },
            Kind::Delete => RowChange {
                before: Some(image(&mut cursor, map, &present)?),
                after: None,
            },
            Kind::Update => RowChange {
                before: Some(image(&mut cursor, map, &present)?),
                after: Some(image(&mut cursor, map, &present_after)?),
            },
            // `Kind::of` gives none: a TRUNCATE is PostgreSQL's.
            Kind::Truncate => return Err(damaged("a rows event of no kind".to_owned())),
        };
        // An image of no columns takes no bytes: the same bytes would make rows
        // forever (a damaged event, never one a server writes).
        if cursor.remaining() == before_row {
            return Err(damaged(format!(
                "a rows event of {} holds a row of no columns",
                map.name()
            )));
        }
        changes.push(change);
    }
    Ok((kind, changes))
}

/// A bitmap's first `count` bits, least significant first.
fn bitmap(bytes: &[u8], count: usize) -> Vec<bool> {
    (0..count)
        .map(|i| bytes[i / 8] & (1 << (i % 8)) != 0)
        .collect()
}

fn image(cursor: &mut Cursor<'_>, map: &TableMap, present: &[bool]) -> Result<Image, DecodeError> {
    let in_image = present.iter().filter(|p| **p).count();
    let nulls = bitmap(
        cursor.take(in_image.div_ceil(8), "a row's null bitmap")?,
        in_image,
    );
    let mut values = Vec::with_capacity(present.len());
    let mut nth = 0;
    for (column, present) in map.columns.iter().zip(present) {
        if !present {
            values.push(None);
            continue;
        }
        let null = nulls[nth];
        nth += 1;
        values.push(Some(if null {
            Value::Null
        } else {
            value(cursor, column).map_err(|error| match error {
                DecodeError::Unsupported { kind, .. } => DecodeError::Unsupported {
                    table: map.name(),
                    column: column.name.clone().unwrap_or_else(|| "?".to_owned()),
                    kind,
                },
                other => other,
            })?
        }));
    }
    Ok(values)
}

fn value(cursor: &mut Cursor<'_>, column: &Column) -> Result<Value, DecodeError> {
    let meta = column.meta;
    let int = |cursor: &mut Cursor<'_>, n: usize| -> Result<Value, DecodeError> {
        let raw = cursor.le(n, "an integer")?;
        Ok(if column.unsigned {
            Value::UInt(raw)
        } else {
            let shift = 64 - 8 * n as u32;
            Value::Int(((raw << shift) as i64) >> shift)
        })
    };
    Ok(match column.kind {
        TINY => int(cursor, 1)?,
        SHORT => int(cursor, 2)?,
        INT24 => int(cursor, 3)?,
        LONG => int(cursor, 4)?,
        LONGLONG => int(cursor, 8)?,
        FLOAT => Value::Float(f64::from(f32::from_bits(cursor.le(4, "a float")? as u32))),
        DOUBLE => Value::Float(f64::from_bits(cursor.le(8, "a double")?)),
        NEWDECIMAL => Value::Decimal(decimal(
            cursor,
            usize::from(meta >> 8),
            usize::from(meta & 0xff),
        )?),
        YEAR => {
            let year = cursor.u8("a year")?;
            Value::UInt(if year == 0 { 0 } else { 1900 + u64::from(year) })
        }
        DATE | NEWDATE => {
            let packed = cursor.le(3, "a date")?;
            Value::Text(format!(
                "{:04}-{:02}-{:02}",
                packed >> 9,
                (packed >> 5) & 15,
                packed & 31
            ))
        }
        DATETIME2 => Value::Text(datetime2(cursor, meta)?),
        TIMESTAMP2 => {
            let seconds = cursor.be(4, "a timestamp")?;
            let micros = fraction(cursor, meta)?;
            Value::Text(timestamp(seconds, micros, meta))
        }
        TIME2 => Value::Text(time2(cursor, meta)?),
        DATETIME => {
            // The old format: YYYYMMDDhhmmss as one integer.
            let v = cursor.le(8, "a datetime")?;
            let (date, time) = (v / 1_000_000, v % 1_000_000);
            Value::Text(format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                date / 10_000,
                date / 100 % 100,
                date % 100,
                time / 10_000,
                time / 100 % 100,
                time % 100
            ))
        }
        TIMESTAMP => Value::Text(timestamp(cursor.le(4, "a timestamp")?, 0, 0)),
        TIME => {
            let v = cursor.le(3, "a time")?;
            let v = ((v << 40) as i64) >> 40;
            let (sign, v) = (if v < 0 { "-" } else { "" }, v.unsigned_abs());
            Value::Text(format!(
                "{sign}{:02}:{:02}:{:02}",
                v / 10_000,
                v / 100 % 100,
                v % 100
            ))
        }
        BIT => {
            let (bits, bytes) = (meta >> 8, meta & 0xff);
            let n = usize::from(bytes) + usize::from(bits > 0);
            Value::UInt(cursor.be(n.min(8), "a bit value")?)
        }
        VARCHAR | VAR_STRING => {
            let prefix = if meta < 256 { 1 } else { 2 };
            let length = cursor.le(prefix, "a string's length")? as usize;
            string(cursor.take(length, "a string")?, column.binary)
        }
        STRING => {
            let prefix = if meta < 256 { 1 } else { 2 };
            let length = cursor.le(prefix, "a string's length")? as usize;
            string(cursor.take(length, "a string")?, column.binary)
        }
        ENUM => {
            let index = cursor.le(usize::from(meta & 0xff), "an enum")? as usize;
            match index.checked_sub(1).and_then(|i| column.members.get(i)) {
                Some(member) => Value::Text(member.clone()),
                // The empty string an invalid value becomes, or no member names.
                None if index == 0 => Value::Text(String::new()),
                None => Value::UInt(index as u64),
            }
        }
        SET => {
            let bits = cursor.le(usize::from(meta & 0xff), "a set")?;
            if column.members.is_empty() {
                Value::UInt(bits)
            } else {
                let members: Vec<&str> = column
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i < 64 && bits & (1 << i) != 0)
                    .map(|(_, m)| m.as_str())
                    .collect();
                Value::Text(members.join(","))
            }
        }
        BLOB | TINY_BLOB | MEDIUM_BLOB | LONG_BLOB | JSON => {
            let length = cursor.le(usize::from(meta).clamp(1, 4), "a blob's length")? as usize;
            string(cursor.take(length, "a blob")?, column.binary)
        }
        kind => {
            return Err(DecodeError::Unsupported {
                table: String::new(),
                column: String::new(),
                kind,
            });
        }
    })
}

fn string(bytes: &[u8], binary: bool) -> Value {
    match (binary, std::str::from_utf8(bytes)) {
        (false, Ok(text)) => Value::Text(text.to_owned()),
        _ => Value::Bytes(bytes.to_vec()),
    }
}

/// The microseconds of a fractional temporal value with `fsp` digits.
fn fraction(cursor: &mut Cursor<'_>, fsp: u16) -> Result<u64, DecodeError> {
    Ok(match fsp {
        1 | 2 => cursor.be(1, "a fraction")? * 10_000,
        3 | 4 => cursor.be(2, "a fraction")? * 100,
        5 | 6 => cursor.be(3, "a fraction")?,
        _ => 0,
    })
}

/// `.ffffff` cut to `fsp` digits (nothing for 0).
fn fraction_text(micros: u64, fsp: u16) -> String {
    if fsp == 0 {
        return String::new();
    }
    let digits = format!("{micros:06}");
    format!(".{}", &digits[..usize::from(fsp.min(6))])
}

fn datetime2(cursor: &mut Cursor<'_>, fsp: u16) -> Result<String, DecodeError> {
    let packed = cursor.be(5, "a datetime")? as i64 - 0x80_0000_0000;
    let micros = fraction(cursor, fsp)?;
    let ymd = packed >> 17;
    let (ym, day) = (ymd >> 5, ymd & 31);
    let hms = packed & 0x1FFFF;
    Ok(format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{}",
        ym / 13,
        ym % 13,
        day,
        hms >> 12,
        (hms >> 6) & 63,
        hms & 63,
        fraction_text(micros, fsp)
    ))
}

fn timestamp(seconds: u64, micros: u64, fsp: u16) -> String {
    if seconds == 0 && micros == 0 {
        return format!("0000-00-00 00:00:00{}", fraction_text(0, fsp));
    }
    let at = chrono::DateTime::from_timestamp(seconds as i64, 0).unwrap_or_default();
    format!(
        "{}{}",
        at.format("%Y-%m-%d %H:%M:%S"),
        fraction_text(micros, fsp)
    )
}

fn time2(cursor: &mut Cursor<'_>, fsp: u16) -> Result<String, DecodeError> {
    // MySQL's my_time_packed_from_binary: hours, minutes, seconds in 24 bits
    // (offset so that negative times sort), then the fraction, signed with it.
    let packed: i64 = match fsp {
        1 | 2 => {
            let mut int = cursor.be(3, "a time")? as i64 - 0x80_0000;
            let mut frac = i64::from(cursor.u8("a time's fraction")? as i8);
            if int < 0 && frac != 0 {
                int += 1;
                frac -= 0x100;
            }
            (int << 24) + frac * 10_000
        }
        3 | 4 => {
            let mut int = cursor.be(3, "a time")? as i64 - 0x80_0000;
            let mut frac = i64::from(cursor.be(2, "a time's fraction")? as u16 as i16);
            if int < 0 && frac != 0 {
                int += 1;
                frac -= 0x10000;
            }
            (int << 24) + frac * 100
        }
        5 | 6 => cursor.be(6, "a time")? as i64 - 0x8000_0000_0000,
        _ => (cursor.be(3, "a time")? as i64 - 0x80_0000) << 24,
    };
    let sign = if packed < 0 { "-" } else { "" };
    let packed = packed.unsigned_abs();
    let (hms, micros) = (packed >> 24, packed & 0xFF_FFFF);
    Ok(format!(
        "{sign}{:02}:{:02}:{:02}{}",
        (hms >> 12) % (1 << 10),
        (hms >> 6) % 64,
        hms % 64,
        fraction_text(micros, fsp)
    ))
}

/// MySQL's binary DECIMAL: groups of 9 digits in 4 bytes, the leftover digits in
/// fewer, big-endian; the sign in the top bit (inverted), negatives all inverted.
fn decimal(cursor: &mut Cursor<'_>, precision: usize, scale: usize) -> Result<String, DecodeError> {
    const DIG2BYTES: [usize; 10] = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4];
    if scale > precision || precision > 65 {
        return Err(damaged(format!(
            "DECIMAL({precision},{scale}) is not a decimal type"
        )));
    }
    let intg = precision - scale;
    let (intg0, intg0x) = (intg / 9, intg % 9);
    let (frac0, frac0x) = (scale / 9, scale % 9);
    let size = intg0 * 4 + DIG2BYTES[intg0x] + frac0 * 4 + DIG2BYTES[frac0x];
    let mut bytes = cursor.take(size, "a decimal")?.to_vec();
    if bytes.is_empty() {
        return Ok("0".to_owned());
    }
    let negative = bytes[0] & 0x80 == 0;
    bytes[0] ^= 0x80;
    if negative {
        for byte in &mut bytes {
            *byte = !*byte;
        }
    }
    let mut digits = Cursor::new(&bytes);
    let mut int = String::new();
    if intg0x > 0 {
        let _ = write!(int, "{}", digits.be(DIG2BYTES[intg0x], "a decimal")?);
    }
    for _ in 0..intg0 {
        let _ = write!(int, "{:09}", digits.be(4, "a decimal")?);
    }
    let int = int.trim_start_matches('0');
    let mut frac = String::new();
    for _ in 0..frac0 {
        let _ = write!(frac, "{:09}", digits.be(4, "a decimal")?);
    }
    if frac0x > 0 {
        let _ = write!(
            frac,
            "{:0width$}",
            digits.be(DIG2BYTES[frac0x], "a decimal")?,
            width = frac0x
        );
    }
    let mut text = String::new();
    if negative {
        text.push('-');
    }
    text.push_str(if int.is_empty() { "0" } else { int });
    if !frac.is_empty() {
        text.push('.');
        text.push_str(&frac);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_decode_as_mysql_writes_them() {
        // DECIMAL(10,2): 8 integer digits (4 bytes: 8 = 0*9 + 8 → 4 bytes), 2 fraction
        // (1 byte). 1234.56 → int 1234 in 4 bytes, frac 56 in 1 byte, sign bit set.
        let mut bytes = vec![0x80, 0x00, 0x04, 0xd2, 56];
        let mut cursor = Cursor::new(&bytes);
        assert_eq!(decimal(&mut cursor, 10, 2).unwrap(), "1234.56");
        // Negative: every byte inverted.
        for byte in &mut bytes {
            *byte = !*byte;
        }
        let mut cursor = Cursor::new(&bytes);
        assert_eq!(decimal(&mut cursor, 10, 2).unwrap(), "-1234.56");
        // Zero with a fraction: 0.05.
        let bytes = vec![0x80, 0, 0, 0, 5];
        let mut cursor = Cursor::new(&bytes);
        assert_eq!(decimal(&mut cursor, 10, 2).unwrap(), "0.05");
    }

    #[test]
    fn temporal_values_print_as_mariadb_prints_them() {
        // 2026-11-30 23:59:58.123 as DATETIME(3).
        let ym: i64 = 2026 * 13 + 11;
        let packed = ((ym << 5 | 30) << 17) | (23 << 12) | (59 << 6) | 58;
        let raw = (packed + 0x80_0000_0000) as u64;
        let mut bytes = raw.to_be_bytes()[3..].to_vec();
        bytes.extend(1230u16.to_be_bytes());
        let mut cursor = Cursor::new(&bytes);
        assert_eq!(
            datetime2(&mut cursor, 3).unwrap(),
            "2026-11-30 23:59:58.123"
        );
        assert_eq!(timestamp(1_764_547_200, 0, 0), "2025-12-01 00:00:00");
        // TIME(0) -01:02:03.
        let hms: i64 = (1 << 12) | (2 << 6) | 3;
        let raw = (0x80_0000 - hms) as u32;
        let bytes = raw.to_be_bytes()[1..].to_vec();
        let mut cursor = Cursor::new(&bytes);
        assert_eq!(time2(&mut cursor, 0).unwrap(), "-01:02:03");
    }

    /// Found by the `binlog_rows` fuzz target: a rows event whose column bitmap names
    /// no column made rows of no bytes until memory ran out.
    #[test]
    fn a_row_of_no_columns_is_refused_not_repeated() {
        let mut post_header = vec![0; 40];
        post_header[usize::from(WRITE_ROWS_V1) - 1] = 8;
        let format = Format {
            checksum: false,
            post_header,
        };
        let map = TableMap {
            table_id: 7,
            schema: "s".to_owned(),
            table: "t".to_owned(),
            columns: vec![Column {
                name: Some("id".to_owned()),
                kind: types::LONG,
                meta: 0,
                unsigned: false,
                binary: false,
                members: Vec::new(),
            }],
            primary_key: vec![0],
        };
        // Table id 7 (6 bytes), flags, 1 column, a bitmap naming none, then a byte.
        let body = [7, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0xaa];
        let event = Event {
            kind: WRITE_ROWS_V1,
            timestamp: 0,
            server_id: 0,
            body: &body,
        };
        let error = rows(&format, &event, &map).unwrap_err();
        assert!(error.to_string().contains("a row of no columns"), "{error}");
        // Control: the bitmap naming the column decodes the row.
        let body = [7, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 5, 0, 0, 0];
        let event = Event {
            body: &body,
            ..event
        };
        let (kind, decoded) = rows(&format, &event, &map).unwrap();
        assert_eq!(kind, Kind::Insert);
        assert_eq!(decoded.len(), 1);
    }

    #[test]
    fn a_cut_event_is_named_not_a_panic() {
        let mut cursor = Cursor::new(&[1, 2]);
        let error = cursor.le(4, "the table id").unwrap_err();
        assert!(error.to_string().contains("the table id"), "{error}");
        let mut cursor = Cursor::new(&[0xfc, 1]);
        assert!(cursor.lenenc("a length").is_err());
    }
}
