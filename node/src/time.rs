//! Time helpers shared by nodes, coordinator and CLI: Unix milliseconds and human
//! durations (`500ms`, `10s`, `2m`). Printing in a time zone is the coordinator's
//! (`stillpoint::time`), so a node does not carry the zone database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn unix_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    }
}

pub fn from_unix_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (examples: 500ms, 10s, 2m, 1h)")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

/// The longest duration any stillpoint setting takes. Nothing it waits for (a lease,
/// a drain, a hold, a load run) is meant to last a week; a larger value is a unit
/// mistake, and refusing it also keeps `Instant + duration` far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Parses `500ms`, `10s`, `2m`, `1h` (a whole number and a unit), at most
/// [`MAX_DURATION`]. A bare number is refused: whether `500` means milliseconds or
/// seconds is exactly the mistake to avoid.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let error = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    let text = input.trim();
    if text.starts_with('-') {
        return Err(error("durations cannot be negative"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| error("missing unit"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(error("missing number"));
    }
    let value: u64 = number.parse().map_err(|_| error("number too large"))?;
    let millis_per_unit = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(error("unknown unit; use ms, s, m or h")),
    };
    let duration = value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| error("number too large"))?;
    if duration > MAX_DURATION {
        return Err(error("longer than a week (168h); is the unit right?"));
    }
    Ok(duration)
}

/// The inverse of [`parse_duration`] for display: the largest unit that is exact.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    match ms {
        0 => "0ms".to_owned(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "500",
            "ms",
            "-1s",
            "1.5s",
            "3d",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn negative_and_absurd_durations_are_refused_by_value() {
        let negative = parse_duration("-5s").unwrap_err();
        assert_eq!(negative.reason, "durations cannot be negative");
        assert!(negative.to_string().contains("\"-5s\""), "{negative}");
        assert_eq!(parse_duration("168h"), Ok(MAX_DURATION));
        let absurd = parse_duration("169h").unwrap_err();
        assert!(absurd.to_string().contains("\"169h\""), "{absurd}");
        assert!(absurd.reason.contains("longer than a week"), "{absurd}");
        // Overflowing u64 milliseconds is refused too, not wrapped.
        assert!(parse_duration("18446744073709551615h").is_err());
        // Zero parses: whether zero makes sense is the setting's call (lease: no).
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(
            parse_duration("10x")
                .unwrap_err()
                .to_string()
                .contains("10x")
        );
    }

    #[test]
    fn durations_round_trip_for_display() {
        for text in ["0ms", "250ms", "10s", "2m", "3h", "1500ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn unix_ms_round_trips() {
        for ms in [-5_000, 0, 1_732_000_000_123] {
            assert_eq!(unix_ms(from_unix_ms(ms)), ms);
        }
    }
}
