//! `runbook::schedule::parse_cron` on any text (the runbook's `[schedule]`), and for an
//! accepted expression `ScheduleEntry::next_after` and `last_due` at a time and in a
//! zone taken from the input.
//!
//! Input: `[zone][8 bytes: Unix seconds, little-endian][expression]`; the zone is one of
//! UTC, Europe/Berlin (DST at 02:00/03:00), America/New_York, Australia/Lord_Howe (a
//! 30-minute DST shift) and Asia/Kathmandu (+05:45); the time is brought into
//! 1970..2200.
//!
//! Besides "never panics": the next run is strictly after the time, the last due run
//! at or before it. A hang is a finding too (libFuzzer's `-timeout=10`): an expression
//! that never fires must be refused when parsed, not spin in the scheduler.
#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use stillpoint::runbook::JobKind;
use stillpoint::runbook::schedule::{ScheduleEntry, parse_cron};

const ZONES: [chrono_tz::Tz; 5] = [
    chrono_tz::UTC,
    chrono_tz::Europe::Berlin,
    chrono_tz::America::New_York,
    chrono_tz::Australia::Lord_Howe,
    chrono_tz::Asia::Kathmandu,
];
/// 2200-01-01T00:00:00Z.
const LAST: i64 = 7_258_118_400;

fuzz_target!(|data: &[u8]| {
    let [zone, t0, t1, t2, t3, t4, t5, t6, t7, rest @ ..] = data else {
        return;
    };
    let Ok(pattern) = std::str::from_utf8(rest) else {
        return;
    };
    let zone = ZONES[usize::from(*zone) % ZONES.len()];
    let seconds = i64::from_le_bytes([*t0, *t1, *t2, *t3, *t4, *t5, *t6, *t7]).rem_euclid(LAST);
    let now: DateTime<Utc> = DateTime::from_timestamp(seconds, 0).expect("in range");

    let Ok(cron) = parse_cron(pattern) else {
        return;
    };
    let entry = ScheduleEntry {
        kind: JobKind::Point,
        pattern: pattern.to_owned(),
        cron,
    };
    if let Some(next) = entry.next_after(zone, now) {
        assert!(
            next > now,
            "{pattern:?} in {zone}: next {next} is not after {now}"
        );
    }
    if let Some(last) = entry.last_due(zone, now) {
        assert!(
            last <= now,
            "{pattern:?} in {zone}: last due {last} is after {now}"
        );
    }
});
