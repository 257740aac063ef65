//! A value of a query result, with its type kept: what drill checks compare. Every
//! adapter turns its driver's values into these (PostgreSQL by column type, MariaDB by
//! column type and character set, SQLite by storage class), never through a lossy text
//! form, so that bytes are compared as bytes, a BLOB is never equal to the text of its
//! hex digits, NULL is never the text "NULL", and numbers are compared as numbers
//! whatever each server prints for them.

use std::cmp::Ordering;
use std::fmt;

/// One value of a query result.
#[derive(Debug, Clone)]
pub enum Value {
    Null,
    /// PostgreSQL's `boolean`. (MariaDB and SQLite have none: their `TRUE` is 1.)
    Bool(bool),
    /// An exact number (an integer, or a DECIMAL/NUMERIC), as canonical decimal text
    /// (see [`Value::number`]), so that `10.50` and `10.5` are one value.
    Number(String),
    /// A binary floating-point number (FLOAT, DOUBLE, REAL).
    Float(f64),
    Text(String),
    /// Text that is not valid UTF-8 (SQLite stores whatever it is given), byte for byte.
    RawText(Vec<u8>),
    /// Binary data: `bytea`, `BLOB`, `VARBINARY`, `BIT`, …
    Bytes(Vec<u8>),
}

impl Value {
    /// An exact number from its decimal text (`-12`, `+0012.500`, `.5`), in canonical
    /// form: no sign for zero, no leading zeros, no trailing fractional zeros. `None` if
    /// `text` is not a plain decimal number.
    pub fn number(text: &str) -> Option<Value> {
        let text = text.trim();
        let (negative, digits) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction)
        {
            return None;
        }
        let whole = whole.trim_start_matches('0');
        let fraction = fraction.trim_end_matches('0');
        let mut canonical = String::new();
        if negative && !(whole.is_empty() && fraction.is_empty()) {
            canonical.push('-');
        }
        canonical.push_str(if whole.is_empty() { "0" } else { whole });
        if !fraction.is_empty() {
            canonical.push('.');
            canonical.push_str(fraction);
        }
        Some(Value::Number(canonical))
    }

    /// Text if `bytes` are UTF-8, else [`Value::RawText`]: never a lossy conversion.
    pub fn text(bytes: Vec<u8>) -> Value {
        match String::from_utf8(bytes) {
            Ok(text) => Value::Text(text),
            Err(error) => Value::RawText(error.into_bytes()),
        }
    }

    /// The number this value holds, for comparisons with an expected number: exact
    /// numbers and floats; not text, however numeric it looks.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(text) => text.parse().ok(),
            Value::Float(float) => Some(*float),
            _ => None,
        }
    }

    /// What kind of value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::RawText(_) => "text (not UTF-8)",
            Value::Bytes(_) => "bytes",
        }
    }

    /// Feeds the value, with its type, into a digest: values that differ, or differ
    /// only in type, hash differently.
    pub fn hash_into(&self, hasher: &mut blake3::Hasher) {
        let (tag, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Value::Null => (0, (&[][..]).into()),
            Value::Bool(b) => (1, vec![u8::from(*b)].into()),
            Value::Number(text) => (2, text.as_bytes().into()),
            Value::Float(float) => (
                3,
                normalized(*float).to_bits().to_le_bytes().to_vec().into(),
            ),
            Value::Text(text) => (4, text.as_bytes().into()),
            Value::RawText(bytes) => (5, bytes.as_slice().into()),
            Value::Bytes(bytes) => (6, bytes.as_slice().into()),
        };
        hasher.update(&[tag]);
        hasher.update(&(payload.len() as u64).to_le_bytes());
        hasher.update(&payload);
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::Float(_) => 3,
            Value::Text(_) => 4,
            Value::RawText(_) => 5,
            Value::Bytes(_) => 6,
        }
    }
}

/// One zero and one NaN: `-0.0 == 0.0`, and a NaN is equal to a NaN, so that a
/// result set compares equal to itself.
fn normalized(float: f64) -> f64 {
    if float == 0.0 {
        0.0
    } else if float.is_nan() {
        f64::NAN
    } else {
        float
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A total order, so that result sets can be counted as multisets: by type first,
/// then by value (floats by `total_cmp` after [`normalized`]).
impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Number(a), Value::Number(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => normalized(*a).total_cmp(&normalized(*b)),
            (Value::Text(a), Value::Text(b)) => a.cmp(b),
            (Value::RawText(a), Value::RawText(b)) | (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

/// How values appear in reports: NULL as `NULL`, bytes as `x'…'` (so they never read
/// as text), text that is not UTF-8 with its odd bytes escaped.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Number(text) | Value::Text(text) => f.write_str(text),
            Value::Float(float) => write!(f, "{float:?}"),
            Value::RawText(bytes) => write!(f, "{}", bytes.escape_ascii()),
            Value::Bytes(bytes) => {
                f.write_str("x'")?;
                for byte in bytes {
                    write!(f, "{byte:02x}")?;
                }
                f.write_str("'")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_numbers_are_canonical() {
        for (text, canonical) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.000", "0"),
            ("+0012.500", "12.5"),
            (".5", "0.5"),
            ("10.", "10"),
            ("-3", "-3"),
            (
                "123456789012345678901234567890.10",
                "123456789012345678901234567890.1",
            ),
        ] {
            assert_eq!(
                Value::number(text),
                Some(Value::Number(canonical.to_owned())),
                "{text}"
            );
        }
        for text in ["", "-", ".", "1e5", "NaN", "1.2.3", "0x10", " - 1"] {
            assert_eq!(Value::number(text), None, "{text:?}");
        }
    }

    #[test]
    fn values_differ_by_type_and_bytes() {
        let distinct = [
            Value::Null,
            Value::Text("NULL".to_owned()),
            Value::Bool(true),
            Value::Number("1".to_owned()),
            Value::Float(1.0),
            Value::Text("1".to_owned()),
            Value::Text("ab".to_owned()),
            Value::Bytes(b"ab".to_vec()),
            Value::Text("6162".to_owned()),
            Value::RawText(b"\xffa".to_vec()),
            Value::RawText(b"\xfea".to_vec()),
            Value::Bytes(vec![0xff, 0, 0x11]),
            Value::Bytes(vec![0xfe, 0, 0x11]),
        ];
        for (i, a) in distinct.iter().enumerate() {
            for (j, b) in distinct.iter().enumerate() {
                assert_eq!(a == b, i == j, "{a:?} vs {b:?}");
                let digest = |v: &Value| {
                    let mut hasher = blake3::Hasher::new();
                    v.hash_into(&mut hasher);
                    hasher.finalize()
                };
                assert_eq!(digest(a) == digest(b), i == j, "{a:?} vs {b:?}");
            }
        }
        assert_eq!(Value::Float(-0.0), Value::Float(0.0));
        assert_eq!(Value::Float(f64::NAN), Value::Float(-f64::NAN));
        assert_eq!(
            Value::text(vec![0xff, b'a']),
            Value::RawText(vec![0xff, b'a'])
        );
        assert_eq!(Value::text(b"ab".to_vec()), Value::Text("ab".to_owned()));
    }

    #[test]
    fn values_display_without_ambiguity() {
        assert_eq!(Value::Null.to_string(), "NULL");
        assert_eq!(Value::Bytes(vec![0x61, 0xff]).to_string(), "x'61ff'");
        assert_eq!(Value::RawText(b"\xffa".to_vec()).to_string(), "\\xffa");
        assert_eq!(Value::Float(1e16).to_string(), "1e16");
        assert_eq!(Value::Float(0.5).to_string(), "0.5");
    }
}
