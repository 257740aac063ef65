//! The runbook's `[schedule]`: which jobs `stillpoint serve` runs by itself, as cron
//! expressions (5 fields, or 6 with seconds first; parsed by croner) read in one time
//! zone. Only parsed and checked here; the service decides when to run them.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Year};
use serde::Deserialize;

/// A job the service runs: by its schedule, or when the API asks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A point: the cluster paused, every database marked (`stillpoint point`).
    Point,
    /// A base backup of every archived database (`stillpoint base-backup`).
    BaseBackup,
    /// A full backup: the cluster paused, every database copied (`stillpoint backup`).
    Backup,
    /// The newest point (else the newest backup) restored into scratch and checked.
    Drill,
    /// Every backup's and point's artifacts read back and checked (`stillpoint verify`).
    Verify,
    /// What `[retention]` no longer keeps, removed (`stillpoint prune`).
    Prune,
}

impl JobKind {
    pub const ALL: [JobKind; 6] = [
        JobKind::Point,
        JobKind::BaseBackup,
        JobKind::Backup,
        JobKind::Drill,
        JobKind::Verify,
        JobKind::Prune,
    ];

    /// The name used in the runbook, the API and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Point => "point",
            JobKind::BaseBackup => "base_backup",
            JobKind::Backup => "backup",
            JobKind::Drill => "drill",
            JobKind::Verify => "verify",
            JobKind::Prune => "prune",
        }
    }

    /// Whether the job pauses the cluster: two of those never run at once.
    pub fn pauses(self) -> bool {
        matches!(self, JobKind::Point | JobKind::Backup)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        JobKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown job kind {text:?}; the kinds are {}",
                    JobKind::ALL.map(JobKind::as_str).join(", ")
                )
            })
    }
}

/// One scheduled job.
#[derive(Debug, Clone)]
pub struct ScheduleEntry {
    pub kind: JobKind,
    /// As written in the runbook.
    pub pattern: String,
    pub cron: Cron,
}

impl PartialEq for ScheduleEntry {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.pattern == other.pattern
    }
}

impl Eq for ScheduleEntry {}

/// `[schedule]`: the jobs and the zone their times are read in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    pub time_zone: chrono_tz::Tz,
    pub entries: Vec<ScheduleEntry>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            time_zone: chrono_tz::UTC,
            entries: Vec::new(),
        }
    }
}

impl ScheduleEntry {
    /// The first run strictly after `after`, in UTC.
    pub fn next_after(&self, zone: chrono_tz::Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&zone), false)
            .ok()
            .map(|time| time.with_timezone(&Utc))
    }

    /// The last run due at or before `now`, in UTC.
    pub fn last_due(&self, zone: chrono_tz::Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&now.with_timezone(&zone), true)
            .ok()
            .map(|time| time.with_timezone(&Utc))
    }
}

/// The table as written: `time_zone` and one cron expression per job kind. (No
/// `deny_unknown_fields`: serde does not support it beside `flatten`; every other key
/// must name a job kind, which `into_config` checks.)
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawSchedule {
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(flatten)]
    jobs: BTreeMap<String, String>,
}

/// Parses a cron expression as the schedule accepts it: 5 fields, or 6 with seconds
/// first (no year field).
///
/// A field that selects nothing (`,` parses as an empty list) is refused: such an
/// expression never runs, and croner's search for its next run did not end within
/// 10 s (the cron fuzz target's timeout, on `* , * * * *` in America/New_York).
pub fn parse_cron(pattern: &str) -> Result<Cron, String> {
    let cron = CronParser::builder()
        .year(Year::Disallowed)
        .build()
        .parse(pattern)
        .map_err(|error| {
            format!(
                "{pattern:?} is not a cron expression ({error}); write 5 fields (minute hour \
                 day-of-month month day-of-week, e.g. \"0 3 * * *\") or 6 with seconds first \
                 (e.g. \"*/5 * * * * *\")"
            )
        })?;
    let fields = &cron.pattern;
    for (name, field) in [
        ("second", &fields.seconds),
        ("minute", &fields.minutes),
        ("hour", &fields.hours),
        ("day-of-month", &fields.days),
        ("month", &fields.months),
        ("day-of-week", &fields.days_of_week),
    ] {
        // Any kind of bit (a value, `#n`, `W`) at any position, or a feature the field
        // turned on (`L`), selects something.
        let selects = (0..8).any(|bit| {
            !field.get_set_values(1 << bit).is_empty() || field.is_feature_enabled(1 << bit)
        });
        if !selects {
            return Err(format!(
                "{pattern:?} selects no {name} (an empty list), so it would never run; \
                 write a value, a range or `*` there (e.g. \"0 3 * * *\")"
            ));
        }
    }
    Ok(cron)
}

impl RawSchedule {
    pub(super) fn into_config(self) -> Result<ScheduleConfig, String> {
        let time_zone = match &self.time_zone {
            None => chrono_tz::UTC,
            Some(name) => name.parse().map_err(|_| {
                format!(
                    "[schedule] time_zone {name:?} is not an IANA time zone name; write e.g. \
                     \"UTC\" or \"Europe/Berlin\""
                )
            })?,
        };
        let mut entries = Vec::new();
        for (key, pattern) in self.jobs {
            let kind: JobKind = key.parse().map_err(|why| format!("[schedule] {why}"))?;
            let cron = parse_cron(&pattern).map_err(|why| format!("[schedule] {key}: {why}"))?;
            entries.push(ScheduleEntry {
                kind,
                pattern,
                cron,
            });
        }
        entries.sort_by_key(|entry| entry.kind);
        Ok(ScheduleConfig { time_zone, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Result<ScheduleConfig, String> {
        toml::from_str::<RawSchedule>(text)
            .map_err(|error| error.to_string())?
            .into_config()
    }

    #[test]
    fn kinds_and_zone_are_read_and_times_follow_the_zone() {
        let config = raw(
            "time_zone = \"Europe/Berlin\"\npoint = \"*/5 * * * * *\"\nbase_backup = \"0 3 * * *\"",
        )
        .unwrap();
        assert_eq!(config.time_zone, chrono_tz::Europe::Berlin);
        let kinds: Vec<_> = config.entries.iter().map(|entry| entry.kind).collect();
        assert_eq!(kinds, [JobKind::Point, JobKind::BaseBackup]);
        let base = &config.entries[1];
        // 03:00 in Berlin in winter is 02:00 UTC.
        let after = "2026-11-30T12:00:00Z".parse().unwrap();
        assert_eq!(
            base.next_after(config.time_zone, after)
                .unwrap()
                .to_rfc3339(),
            "2026-12-01T02:00:00+00:00"
        );
        assert_eq!(
            base.last_due(config.time_zone, after).unwrap().to_rfc3339(),
            "2026-11-30T02:00:00+00:00"
        );
        let point = &config.entries[0];
        assert_eq!(
            point
                .next_after(config.time_zone, after)
                .unwrap()
                .to_rfc3339(),
            "2026-11-30T12:00:05+00:00"
        );
    }

    #[test]
    fn unknown_kinds_bad_patterns_and_zones_are_named() {
        let error = raw("snapshot = \"* * * * *\"").unwrap_err();
        assert!(error.contains("unknown job kind \"snapshot\""), "{error}");
        assert!(error.contains("point, base_backup"), "{error}");
        let error = raw("point = \"every minute\"").unwrap_err();
        assert!(
            error.contains("point: \"every minute\" is not a cron"),
            "{error}"
        );
        let error = raw("point = \"0 0 3 * * * 2027\"").unwrap_err();
        assert!(error.contains("not a cron"), "{error}");
        let error = raw("time_zone = \"Mars/Olympus\"").unwrap_err();
        assert!(error.contains("IANA"), "{error}");
    }

    /// The cron fuzz target's hang, reduced: an empty list in a field parsed, and the
    /// search for its next run took longer than 10 s.
    #[test]
    fn a_field_that_selects_nothing_is_refused() {
        let error = parse_cron("* , * * * *").unwrap_err();
        assert!(error.contains("selects no minute"), "{error}");
        assert!(error.contains("never run"), "{error}");
        let error = raw("point = \"0 , * * *\"").unwrap_err();
        assert!(
            error.contains("point: \"0 , * * *\" selects no hour"),
            "{error}"
        );
        // Nothing that selects something is refused, `L`, `W` and `#` included.
        for pattern in [
            "0 0 L * *",
            "0 0 15W * *",
            "0 0 * * 5#3",
            "0 0 * * 5L",
            "0 3 * * *",
        ] {
            parse_cron(pattern).unwrap_or_else(|error| panic!("{error}"));
        }
    }
}
