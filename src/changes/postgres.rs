//! The change records of a PostgreSQL database between two points, from its change
//! stream (`crate::archive::pg_changes`): the chunks that overlap the range, each
//! read whole (a chunk holds at most `MAX_CHANGES` rows, or one larger transaction),
//! and every row of a transaction whose commit record ends in `(from, to]` made a
//! [`Change`]. A first pass over a chunk finds each transaction's commit (its end and
//! time), so records stream out in the second without holding a transaction.
//!
//! The rows are `test_decoding`'s text: `BEGIN 728`, `table public.t: INSERT:
//! id[integer]:1 name[text]:'a''b'`, `table public.t: UPDATE: old-key: … new-tuple:
//! …`, `table public.t: DELETE: id[integer]:1`, `table public.a, public.b: TRUNCATE:
//! (no-flags)`, `COMMIT 728 (at 2026-12-01 04:32:10.748047+00)`. Values are printed
//! by each type's output function: numbers and booleans bare, everything else quoted
//! with `'` doubled, `null`, or `unchanged-toast-datum` (an update that left a large
//! value as it was: the column is left out of `after`).

use std::collections::HashMap;

use super::binlog_rows::{Kind, Value};
use super::{Change, ChangesError, DecodeStats};
use crate::archive::pg_changes::{StreamHeader, StreamRow};
use crate::archive::{Archive, Lsn};
use crate::pipeline::Decryption;

/// How long an export waits for the stream to reach `--to`'s marker.
const REACH_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// What to export: the stream and the two points' markers.
pub struct Range<'a> {
    pub stream: &'a Archive,
    pub decryption: &'a Decryption,
    pub from: Lsn,
    pub to: Lsn,
    /// The runbook's name for the database (what records carry).
    pub database: &'a str,
    pub table: Option<&'a str>,
}

/// A row of the stream that cannot be read: the chunk and what is wrong.
fn bad(chunk: &str, problem: String) -> ChangesError {
    ChangesError::Stream {
        chunk: chunk.to_owned(),
        problem,
    }
}

/// What an export of one database read.
pub struct Exported {
    pub stats: DecodeStats,
    pub chunks: usize,
    /// Time spent fetching chunks (the rest is decoding and writing).
    pub fetch_ms: u64,
}

/// Writes every change of a transaction committed in the range, in commit order.
pub async fn export(
    range: &Range<'_>,
    write: &mut dyn FnMut(Change) -> std::io::Result<()>,
) -> Result<Exported, ChangesError> {
    let (from, to) = (
        crate::archive::Position::Lsn(range.from),
        crate::archive::Position::Lsn(range.to),
    );
    // The stream trails the server by about the capture's interval: a point just
    // taken is waited for, briefly.
    let waiting = std::time::Instant::now();
    let catalog = loop {
        let catalog = range.stream.catalog().await?;
        match catalog.covers(&from, &to) {
            Ok(()) => break catalog,
            Err(crate::archive::NotReached::EndsBefore { .. })
                if waiting.elapsed() < REACH_WAIT =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(not_reached) => {
                return Err(ChangesError::NotCovered(stream_not_covering(
                    range,
                    &not_reached,
                )));
            }
        }
    };
    let mut stats = DecodeStats::default();
    let (mut chunks, mut fetching) = (0, std::time::Duration::ZERO);
    for chunk in &catalog.chunks {
        let (start, end) = chunk.range().expect("catalog chunks have ranges");
        if end <= &from || start >= &to {
            continue;
        }
        chunks += 1;
        let fetch = std::time::Instant::now();
        let bytes = range.stream.read(chunk, range.decryption).await?;
        fetching += fetch.elapsed();
        stats.log_bytes += bytes.len() as u64;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| bad(&chunk.name, format!("it is not UTF-8: {e}")))?;
        let mut lines = text.lines();
        let header: StreamHeader = lines
            .next()
            .and_then(|line| serde_json::from_str(line).ok())
            .ok_or_else(|| bad(&chunk.name, "its first line is not the tables".to_owned()))?;
        let rows = || {
            text.lines().skip(1).map(|line| {
                serde_json::from_str::<StreamRow>(line)
                    .map_err(|e| bad(&chunk.name, format!("a row is not JSON: {e}")))
            })
        };
        // First pass: each transaction's commit (end, time); those in the range count.
        let mut commits: HashMap<u64, i64> = HashMap::new();
        for row in rows() {
            let row = row?;
            stats.events += 1;
            if let Some((xid, commit_ms)) = parse_commit(&row.data) {
                let end: Lsn = row.lsn.parse().map_err(|e: String| bad(&chunk.name, e))?;
                if range.from < end && end <= range.to {
                    stats.transactions += 1;
                    commits.insert(xid, commit_ms);
                }
            }
        }
        for row in rows() {
            let row = row?;
            let Some(&commit_ms) = commits.get(&row.xid) else {
                continue;
            };
            let Some(rest) = row.data.strip_prefix("table ") else {
                continue;
            };
            let changes = parse_change(rest, &header)
                .map_err(|problem| bad(&chunk.name, format!("{problem}: {}", row.data)))?;
            for parsed in changes {
                if let Some(only) = range.table
                    && only != parsed.table
                    && Some(only) != parsed.table.split_once('.').map(|(_, name)| name)
                {
                    continue;
                }
                stats.records += 1;
                write(Change {
                    commit_ms,
                    transaction: row.xid.to_string(),
                    kind: parsed.kind,
                    database: range.database.to_owned(),
                    table: parsed.table,
                    key: parsed.key,
                    after: parsed.after,
                    before: parsed.before,
                })
                .map_err(ChangesError::Output)?;
            }
        }
    }
    Ok(Exported {
        stats,
        chunks,
        fetch_ms: fetching.as_millis() as u64,
    })
}

fn stream_not_covering(range: &Range<'_>, not_reached: &crate::archive::NotReached) -> String {
    use crate::archive::NotReached;
    let database = range.database;
    match not_reached {
        NotReached::Empty { .. } => format!(
            "database {database} has no change stream: set changes = true on it in the \
             runbook (with wal_level = logical) and run `stillpoint archive`; changes are \
             recorded from then on, so only points taken after that can be given"
        ),
        NotReached::StartsAfter { first_start, .. } => format!(
            "the change stream of {database} starts at {first_start}, after --from's marker \
             {}: changes before it were never recorded; give a later --from point",
            range.from
        ),
        NotReached::EndsBefore { end, .. } => format!(
            "the change stream of {database} has reached {end}, not yet --to's marker {} \
             (waited {}s): is `stillpoint archive` (or serve) running with changes = true?",
            range.to,
            REACH_WAIT.as_secs()
        ),
        NotReached::Gap(gap) => format!(
            "the change stream of {database} has a gap from {} to {} (its capture stopped \
             and its slot was made again): changes in it were never recorded; give points \
             on one side of it",
            gap.from, gap.to
        ),
    }
}

/// `COMMIT 728 (at 2026-12-01 04:32:10.748047+00)`: the xid and the time in ms.
fn parse_commit(data: &str) -> Option<(u64, i64)> {
    let rest = data.strip_prefix("COMMIT ")?;
    let (xid, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let xid = xid.parse().ok()?;
    let at = rest
        .strip_prefix("(at ")
        .and_then(|at| at.strip_suffix(')'))
        .and_then(|at| chrono::DateTime::parse_from_str(at, "%Y-%m-%d %H:%M:%S%.f%#z").ok())
        .map_or(0, |at| at.timestamp_millis());
    Some((xid, at))
}

/// One record of a change row (a TRUNCATE of several tables makes one each).
#[derive(Debug, PartialEq)]
struct Parsed {
    kind: Kind,
    table: String,
    key: Option<Vec<(String, Value)>>,
    after: Option<Vec<(String, Value)>>,
    before: Option<Vec<(String, Value)>>,
}

/// `public.t: INSERT: id[integer]:1 …` (after `table `).
fn parse_change(rest: &str, header: &StreamHeader) -> Result<Vec<Parsed>, String> {
    let mut lexer = Lexer { text: rest, at: 0 };
    let mut names = vec![lexer.qualified_name()?];
    while lexer.eat(", ") {
        names.push(lexer.qualified_name()?);
    }
    if !lexer.eat(": ") {
        return Err("no ': ' after the table".to_owned());
    }
    let action = lexer.word(':')?;
    lexer.eat(":");
    lexer.eat(" ");
    if action == "TRUNCATE" {
        return Ok(names
            .into_iter()
            .map(|(_, table)| Parsed {
                kind: Kind::Truncate,
                table,
                key: None,
                after: None,
                before: None,
            })
            .collect());
    }
    let [(printed, table)] =
        <[_; 1]>::try_from(names).map_err(|_| format!("{action} of more than one table"))?;
    let (before, after) = match action {
        "INSERT" => (None, lexer.tuple()?),
        "DELETE" => (lexer.tuple()?, None),
        "UPDATE" => {
            let before = if lexer.eat("old-key: ") {
                lexer.tuple()?
            } else {
                None
            };
            lexer.eat("new-tuple: ");
            (before, lexer.tuple()?)
        }
        other => return Err(format!("action {other:?} is not one a change row has")),
    };
    let kind = match action {
        "INSERT" => Kind::Insert,
        "UPDATE" => Kind::Update,
        _ => Kind::Delete,
    };
    // The key of the row before where it was logged whole, else of the row after.
    let key = header
        .tables
        .get(&printed)
        .cloned()
        .flatten()
        .and_then(|columns| {
            let pick = |tuple: &Option<Vec<(String, Value)>>| -> Option<Vec<(String, Value)>> {
                let tuple = tuple.as_ref()?;
                columns
                    .iter()
                    .map(|name| tuple.iter().find(|(n, _)| n == name).cloned())
                    .collect()
            };
            pick(&before).or_else(|| pick(&after))
        });
    Ok(vec![Parsed {
        kind,
        table,
        key,
        after,
        before,
    }])
}

/// Reads `test_decoding`'s text.
struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn eat(&mut self, what: &str) -> bool {
        if self.rest().starts_with(what) {
            self.at += what.len();
            true
        } else {
            false
        }
    }

    /// Up to (not including) `end`.
    fn word(&mut self, end: char) -> Result<&'a str, String> {
        let rest = self.rest();
        let length = rest
            .find(end)
            .ok_or_else(|| format!("no {end:?} after {rest:?}"))?;
        self.at += length;
        Ok(&rest[..length])
    }

    /// What follows an opening `quote`, up to the closing one (a doubled quote stands
    /// for itself).
    fn quoted(&mut self, quote: char, what: &str) -> Result<String, String> {
        let mut text = String::new();
        loop {
            let rest = self.rest();
            let close = rest
                .find(quote)
                .ok_or_else(|| format!("{what}'s quote is not closed"))?;
            text.push_str(&rest[..close]);
            self.at += close + 1;
            if self.rest().starts_with(quote) {
                self.at += 1;
                text.push(quote);
            } else {
                return Ok(text);
            }
        }
    }

    /// An identifier, `"quoted"` (with `""` for `"`) or bare, ending at `stop`.
    fn identifier(&mut self, stop: &[char]) -> Result<String, String> {
        if self.eat("\"") {
            return self.quoted('"', "an identifier");
        }
        let rest = self.rest();
        let length = rest.find(stop).unwrap_or(rest.len());
        if length == 0 {
            return Err(format!("no identifier at {rest:?}"));
        }
        self.at += length;
        Ok(rest[..length].to_owned())
    }

    /// `schema.table` as printed (for the header's keys) and as a record's name.
    fn qualified_name(&mut self) -> Result<(String, String), String> {
        let start = self.at;
        let schema = self.identifier(&['.', ':', ','])?;
        let table = if self.eat(".") {
            format!("{schema}.{}", self.identifier(&[':', ','])?)
        } else {
            schema
        };
        Ok((self.text[start..self.at].to_owned(), table))
    }

    /// `name[type]:value …` up to the end or `new-tuple: `; `(no-tuple-data)` is none.
    fn tuple(&mut self) -> Result<Option<Vec<(String, Value)>>, String> {
        if self.eat("(no-tuple-data)") {
            return Ok(None);
        }
        let mut columns = Vec::new();
        loop {
            self.eat(" ");
            let rest = self.rest();
            if rest.is_empty() || rest.starts_with("new-tuple: ") {
                break;
            }
            let name = self.identifier(&['['])?;
            if !self.eat("[") {
                return Err(format!("column {name} has no [type]"));
            }
            let rest = self.rest();
            let close = rest
                .find("]:")
                .ok_or_else(|| format!("column {name}'s type is not closed"))?;
            let type_name = &rest[..close];
            self.at += close + 2;
            let value = self.value()?;
            if let Some(value) = value {
                columns.push((name, convert(type_name, value)?));
            }
        }
        Ok(Some(columns))
    }

    /// A value as printed: `'quoted'`, `B'0101'`, or bare to the next space. None
    /// for `unchanged-toast-datum`.
    fn value(&mut self) -> Result<Option<Printed>, String> {
        if self.eat("B'") {
            let bits = self.word('\'')?;
            self.at += 1;
            return Ok(Some(Printed::Quoted(bits.to_owned())));
        }
        if self.eat("'") {
            return Ok(Some(Printed::Quoted(self.quoted('\'', "a value")?)));
        }
        let rest = self.rest();
        let length = rest.find(' ').unwrap_or(rest.len());
        self.at += length;
        Ok(match &rest[..length] {
            "unchanged-toast-datum" => None,
            "null" => Some(Printed::Null),
            bare => Some(Printed::Bare(bare.to_owned())),
        })
    }
}

enum Printed {
    Null,
    Bare(String),
    Quoted(String),
}

/// A value of type `type_name` as a record carries it: integers as integers, floats
/// as floats (±Infinity and NaN, which JSON lacks, as text), numeric exactly as
/// text, booleans, bytea as bytes; every other type as its text.
fn convert(type_name: &str, printed: Printed) -> Result<Value, String> {
    let text = match printed {
        Printed::Null => return Ok(Value::Null),
        Printed::Bare(text) | Printed::Quoted(text) => text,
    };
    Ok(match type_name {
        "smallint" | "integer" | "bigint" | "oid" => Value::Int(
            text.parse()
                .map_err(|e| format!("{type_name} value {text:?}: {e}"))?,
        ),
        "real" | "double precision" => match text.parse::<f64>() {
            Ok(number) if number.is_finite() => Value::Float(number),
            _ => Value::Text(text),
        },
        "numeric" => Value::Decimal(text),
        "boolean" => Value::Bool(text == "true"),
        "bytea" => {
            let hex = text
                .strip_prefix("\\x")
                .filter(|hex| hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| format!("bytea value {text:?} is not \\x hex"))?;
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| format!("bytea value {text:?}: {e}"))?;
            Value::Bytes(bytes)
        }
        _ => Value::Text(text),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn header(tables: &[(&str, Option<&[&str]>)]) -> StreamHeader {
        StreamHeader {
            tables: tables
                .iter()
                .map(|(name, key)| {
                    (
                        (*name).to_owned(),
                        key.map(|k| k.iter().map(|c| (*c).to_owned()).collect()),
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn col(name: &str, value: Value) -> (String, Value) {
        (name.to_owned(), value)
    }

    /// Rows as a real server's test_decoding printed them (see the module header).
    #[test]
    fn an_insert_of_every_printed_form_is_read() {
        let row = "public.t: INSERT: id[text]:'a' n[bigint]:9223372036854775807 \
                   price[numeric]:-1.00 ok[boolean]:true raw[bytea]:'\\x00ff' \
                   at[timestamp with time zone]:'2026-12-01 00:00:00+00' f[double precision]:Infinity \
                   note[text]:'x''y\nz' gone[text]:null";
        let parsed = parse_change(row, &header(&[("public.t", Some(&["id"]))])).unwrap();
        assert_eq!(
            parsed,
            vec![Parsed {
                kind: Kind::Insert,
                table: "public.t".to_owned(),
                key: Some(vec![col("id", Value::Text("a".into()))]),
                after: Some(vec![
                    col("id", Value::Text("a".into())),
                    col("n", Value::Int(i64::MAX)),
                    col("price", Value::Decimal("-1.00".into())),
                    col("ok", Value::Bool(true)),
                    col("raw", Value::Bytes(vec![0, 0xff])),
                    col("at", Value::Text("2026-12-01 00:00:00+00".into())),
                    col("f", Value::Text("Infinity".into())),
                    col("note", Value::Text("x'y\nz".into())),
                    col("gone", Value::Null),
                ]),
                before: None,
            }]
        );
    }

    #[test]
    fn quoted_names_arrays_and_bits_are_read() {
        let row = "public.\"we ird\": INSERT: \"a b\"[integer]:1 \"c[d\"[integer[]]:'{1,2}' \
                   bits[bit]:B'0101'";
        let parsed = parse_change(row, &header(&[("public.\"we ird\"", Some(&["a b"]))])).unwrap();
        assert_eq!(parsed[0].table, "public.we ird");
        assert_eq!(parsed[0].key, Some(vec![col("a b", Value::Int(1))]));
        assert_eq!(
            parsed[0].after.as_ref().unwrap()[1..],
            [
                col("c[d", Value::Text("{1,2}".into())),
                col("bits", Value::Text("0101".into()))
            ]
        );
    }

    /// Names and values that look like the format's own words, as PostgreSQL 15
    /// printed them: a schema and table with spaces and `: `, a key column named
    /// `new-tuple`, a value holding ` new-tuple: ` and a newline, a TRUNCATE of
    /// quoted tables.
    #[test]
    fn names_and_values_that_look_like_the_format_are_read_as_data() {
        let keys = header(&[("\"Odd Schema\".\"Mixed: Tbl\"", Some(&["new-tuple"]))]);
        let row = "\"Odd Schema\".\"Mixed: Tbl\": UPDATE: old-key: \"new-tuple\"[integer]:1 \
                   new-tuple: \"new-tuple\"[integer]:2 \"a: b\"[text]:'x'' new-tuple: \
                   y[int]:2 \"q\"' \"ünï\"[text]:'line1\nline2' arr[integer[]]:'{1,NULL,3}'";
        let parsed = parse_change(row, &keys).unwrap();
        assert_eq!(parsed[0].table, "Odd Schema.Mixed: Tbl");
        assert_eq!(parsed[0].key, Some(vec![col("new-tuple", Value::Int(1))]));
        assert_eq!(
            parsed[0].after,
            Some(vec![
                col("new-tuple", Value::Int(2)),
                col("a: b", Value::Text("x' new-tuple: y[int]:2 \"q\"".into())),
                col("ünï", Value::Text("line1\nline2".into())),
                col("arr", Value::Text("{1,NULL,3}".into())),
            ])
        );
        let truncated = parse_change(
            "public.k, public.\"tab.dot\", \"Odd Schema\".\"Mixed: Tbl\": TRUNCATE: (no-flags)",
            &keys,
        )
        .unwrap();
        let tables: Vec<_> = truncated.iter().map(|p| p.table.as_str()).collect();
        assert_eq!(
            tables,
            ["public.k", "public.tab.dot", "Odd Schema.Mixed: Tbl"]
        );
    }

    #[test]
    fn updates_take_their_key_from_the_old_row_when_it_was_logged() {
        let keys = header(&[("public.t", Some(&["id"]))]);
        let moved = parse_change(
            "public.t: UPDATE: old-key: id[text]:'c' new-tuple: id[text]:'d' n[bigint]:2",
            &keys,
        )
        .unwrap();
        assert_eq!(moved[0].key, Some(vec![col("id", Value::Text("c".into()))]));
        assert_eq!(
            moved[0].before,
            Some(vec![col("id", Value::Text("c".into()))])
        );
        assert_eq!(
            moved[0].after,
            Some(vec![
                col("id", Value::Text("d".into())),
                col("n", Value::Int(2))
            ])
        );
        // Not logged (the key did not change): the row after's; a large value left as
        // it was is not in `after`.
        let kept = parse_change(
            "public.t: UPDATE: id[text]:'a' big[text]:unchanged-toast-datum n[bigint]:3",
            &keys,
        )
        .unwrap();
        assert_eq!(kept[0].key, Some(vec![col("id", Value::Text("a".into()))]));
        assert_eq!(kept[0].before, None);
        assert_eq!(kept[0].after.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn deletes_truncates_and_tables_without_a_key() {
        let keys = header(&[("public.t", Some(&["id"])), ("public.nopk", None)]);
        let deleted = parse_change("public.t: DELETE: id[text]:'a'", &keys).unwrap();
        assert_eq!(deleted[0].kind, Kind::Delete);
        assert_eq!(
            deleted[0].key,
            Some(vec![col("id", Value::Text("a".into()))])
        );
        assert_eq!(deleted[0].after, None);
        let unknown = parse_change("public.nopk: DELETE: (no-tuple-data)", &keys).unwrap();
        assert_eq!((&unknown[0].key, &unknown[0].before), (&None, &None));
        let truncated = parse_change("public.nopk, public.t: TRUNCATE: (no-flags)", &keys).unwrap();
        let tables: Vec<_> = truncated
            .iter()
            .map(|p| (p.kind, p.table.as_str()))
            .collect();
        assert_eq!(
            tables,
            [
                (Kind::Truncate, "public.nopk"),
                (Kind::Truncate, "public.t")
            ]
        );
    }

    #[test]
    fn damaged_rows_are_refused_naming_what_is_wrong() {
        let keys = header(&[]);
        for (row, says) in [
            ("public.t INSERT", "no ': '"),
            ("public.t: INSERT: id[text]:'open", "not closed"),
            ("public.t: INSERT: n[bigint]:x1", "bigint value"),
            ("public.t: INSERT: b[bytea]:'00'", "not \\x hex"),
            ("public.t: INSERT: b[bytea]:'\\x0é0'", "not \\x hex"),
            ("public.t: INSERT: b[bytea]:'\\x0'", "not \\x hex"),
            ("public.t: MERGE: a[int]:1", "not one a change row has"),
            ("public.t: INSERT: id", "no [type]"),
        ] {
            let error = parse_change(row, &keys).unwrap_err();
            assert!(error.contains(says), "{row}: {error}");
        }
    }

    #[test]
    fn a_commit_gives_its_xid_and_time() {
        assert_eq!(
            parse_commit("COMMIT 728 (at 2026-12-01 04:32:10.748047+00)"),
            Some((728, 1_796_099_530_748))
        );
        assert_eq!(parse_commit("BEGIN 728"), None);
    }

    /// Rows a damaged chunk could hold: real rows with characters inserted, removed
    /// and replaced (quotes, brackets, colons, a two-byte letter) are read or refused,
    /// never a panic, and whatever is read has the images its kind says. It found a
    /// bytea value with a two-byte letter sliced inside the letter.
    #[test]
    fn mangled_rows_are_refused_or_read_never_a_panic() {
        let rows = [
            "public.t: INSERT: id[text]:'a''b' n[bigint]:1 raw[bytea]:'\\x00ff' ok[boolean]:true",
            "public.t: UPDATE: old-key: id[text]:'c' new-tuple: id[text]:'d' big[text]:unchanged-toast-datum",
            "public.\"we ird\": DELETE: \"a b\"[integer]:1 \"c[d\"[integer[]]:'{1,2}' bits[bit]:B'0101'",
            "public.a, \"s\".\"b\": TRUNCATE: (no-flags)",
            "public.t: DELETE: (no-tuple-data)",
        ];
        let keys = header(&[
            ("public.t", Some(&["id"])),
            ("public.\"we ird\"", Some(&["a b"])),
        ]);
        let alphabet: Vec<char> = "'\"[]:., -\\xé0a(".chars().collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        let mut read = 0;
        for round in 0..20_000 {
            let mut row: Vec<char> = rows[round % rows.len()].chars().collect();
            for _ in 0..1 + next(3) {
                let at = next(row.len() + 1);
                match next(3) {
                    0 => row.insert(at, alphabet[next(alphabet.len())]),
                    1 if at < row.len() => {
                        row.remove(at);
                    }
                    _ if at < row.len() => row[at] = alphabet[next(alphabet.len())],
                    _ => {}
                }
            }
            let row: String = row.into_iter().collect();
            let _ = parse_commit(&format!("COMMIT {row}"));
            let Ok(parsed) = parse_change(&row, &keys) else {
                continue;
            };
            read += 1;
            for record in parsed {
                let images = (record.before.is_some(), record.after.is_some());
                match record.kind {
                    Kind::Insert => assert!(!images.0, "{row}"),
                    Kind::Delete => assert!(!images.1, "{row}"),
                    Kind::Truncate => assert_eq!(images, (false, false), "{row}"),
                    Kind::Update => {}
                }
            }
        }
        // Not vacuous: many mangled rows still read (a changed value, say).
        assert!(read > 1_000, "{read}");
    }
}
