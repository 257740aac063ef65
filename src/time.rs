//! Time on the coordinator side: the node crate's Unix milliseconds and human
//! durations, plus formatting a timestamp in a chosen zone and reading durations from
//! a runbook.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
pub use stillpoint_node::time::{
    DurationError, MAX_DURATION, format_duration, from_unix_ms, parse_duration, unix_ms,
};

/// A time zone for printing: an IANA name, or UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone(chrono_tz::Tz);

impl Zone {
    pub const UTC: Zone = Zone(chrono_tz::UTC);

    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    /// `2026-11-21T10:15:00.123+09:00`: RFC 3339 with milliseconds, in this zone.
    pub fn format_ms(&self, unix_ms: i64) -> String {
        let utc: DateTime<Utc> = DateTime::from_timestamp_millis(unix_ms).unwrap_or_default();
        self.0
            .from_utc_datetime(&utc.naive_utc())
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
    }
}

impl std::str::FromStr for Zone {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        name.parse::<chrono_tz::Tz>().map(Zone).map_err(|_| {
            format!("unknown time zone {name:?}; use an IANA name such as UTC or Asia/Tokyo")
        })
    }
}

/// Serde helper: a duration written as `"10s"` in a runbook.
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_format_with_offsets() {
        let tokyo: Zone = "Asia/Tokyo".parse().unwrap();
        assert_eq!(tokyo.format_ms(0), "1970-01-01T09:00:00.000+09:00");
        assert_eq!(Zone::UTC.format_ms(1_500), "1970-01-01T00:00:01.500+00:00");
        assert!("Mars/Olympus".parse::<Zone>().is_err());
    }
}
