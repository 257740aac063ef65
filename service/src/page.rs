//! The status page at `/`: one server-rendered HTML page, no JavaScript, no external
//! assets (inline CSS and SVG), refreshed by the browser every few seconds. It shows,
//! from the service's view of storage, its archivers, job table and schedule: each
//! database's archive (streaming, lag, chunks, gaps, base backups), the last day's
//! points and backups as an inline SVG timeline, the last drill, the schedule, the
//! recent jobs and the problems the view found.
//!
//! The ids and classes (`#databases`, `#timeline`, `circle.point`, `.backup`,
//! `#last-drill`, `#schedule`, `#jobs`, `#problems`) are kept stable: tests and
//! operators' scrapers find things by them. Everything that comes from storage or the
//! runbook goes through [`escape`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, DurationRound, TimeDelta, Timelike, Utc};
use stillpoint::runbook::JobKind;

use crate::Service;
use crate::archiving::ArchiveState;
use crate::jobs::{JobRecord, JobState};
use crate::schedule::Planned;
use crate::view::{DatabaseArchive, View};

/// How far back the timeline reaches.
const TIMELINE_SPAN: TimeDelta = TimeDelta::hours(24);
/// The timeline's drawing area in SVG units (= CSS pixels at its natural size). One
/// mark per column of this width at most: a point a minute (or every 5 s) still
/// draws at most this many circles, so the page stays small and quick.
const PLOT_WIDTH: f64 = 960.0;
/// Room left of the plot for row labels, and right of it for the "now" label.
const PLOT_LEFT: f64 = 64.0;
const PLOT_RIGHT_MARGIN: f64 = 40.0;
const SVG_HEIGHT: f64 = 110.0;
const POINT_ROW_Y: f64 = 30.0;
const BACKUP_ROW_Y: f64 = 58.0;
const AXIS_Y: f64 = 80.0;
/// How many jobs the page lists.
const RECENT_JOBS: usize = 20;
/// The browser reloads the page this often (seconds): an open page stays current.
const REFRESH_SECONDS: u32 = 10;

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d8dde6;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600}
td.number{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#6b7385}.ok{color:#17803d}.bad{color:#c62828;font-weight:600}
.badge{display:inline-block;padding:0 .5em;border-radius:.6em;color:#fff;font-size:.9em}
.badge.ok{background:#17803d}.badge.bad{background:#c62828}.badge.idle{background:#8a93a5}
#timeline{background:#fff;border:1px solid #d8dde6;max-width:100%;height:auto}
#timeline .point{fill:#2962ff}#timeline .point.merged{fill:#0039cb}
#timeline .backup{fill:#ef6c00}
#timeline .axis{stroke:#6b7385}#timeline .tick{stroke:#b0b7c5}
#timeline text{font-size:11px;fill:#4a5263}#timeline .now{stroke:#c62828}
#problems li{color:#c62828}
";

/// Escapes text for HTML, in element content and in quoted attributes alike.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A time as people read it on the page, in UTC.
fn when(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `<time>` with the machine-readable form in `datetime` (for tests and scrapers).
fn time_element(time: Option<DateTime<Utc>>) -> String {
    match time {
        Some(time) => format!(
            "<time datetime=\"{}\">{}</time>",
            time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            when(time)
        ),
        None => "<span class=\"muted\">never</span>".to_owned(),
    }
}

fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Skipped => "skipped",
        JobState::Cancelled => "cancelled",
    }
}

/// Where a time falls on the timeline, from the plot's left edge (24 h ago) to its
/// right edge (now); `None` for a time older than the span. A time after `now` (a
/// coordinator clock a little ahead) is drawn at "now" rather than dropped.
fn x_of(time: DateTime<Utc>, now: DateTime<Utc>) -> Option<f64> {
    let age = now - time;
    if age > TIMELINE_SPAN {
        return None;
    }
    let age_ms = age.num_milliseconds().max(0) as f64;
    let span_ms = TIMELINE_SPAN.num_milliseconds() as f64;
    Some(PLOT_LEFT + PLOT_WIDTH * (1.0 - age_ms / span_ms))
}

/// One mark on the timeline: the newest of the items that fall in one pixel column.
#[derive(Debug, Clone, PartialEq)]
struct Mark {
    x: f64,
    id: String,
    time: DateTime<Utc>,
    /// Items drawn by this mark, itself included.
    count: usize,
}

/// The marks for items (id, time) in the last 24 h, at most one per pixel column, and
/// how many items were merged into another's mark. Items older than the span are left
/// out (and not counted as merged).
fn marks<'a>(
    items: impl IntoIterator<Item = (&'a str, DateTime<Utc>)>,
    now: DateTime<Utc>,
) -> (Vec<Mark>, usize) {
    let mut columns: BTreeMap<i64, Mark> = BTreeMap::new();
    let mut merged = 0;
    for (id, time) in items {
        let Some(x) = x_of(time, now) else { continue };
        let column = x.floor() as i64;
        match columns.get_mut(&column) {
            Some(mark) => {
                merged += 1;
                mark.count += 1;
                if time > mark.time {
                    mark.id = id.to_owned();
                    mark.time = time;
                    mark.x = x;
                }
            }
            None => {
                columns.insert(
                    column,
                    Mark {
                        x,
                        id: id.to_owned(),
                        time,
                        count: 1,
                    },
                );
            }
        }
    }
    (columns.into_values().collect(), merged)
}

/// A mark's tooltip: its id and time, and how many more it stands for.
fn mark_title(what: &str, mark: &Mark) -> String {
    let more = match mark.count {
        1 => String::new(),
        count => format!(" (+{} more in this column)", count - 1),
    };
    escape(&format!("{what} {} at {}{more}", mark.id, when(mark.time)))
}

/// The inline SVG timeline of the last 24 h, and the sentence under it.
fn timeline(view: &View, now: DateTime<Utc>) -> String {
    let points = view
        .points
        .iter()
        .filter_map(|point| Some((point.point_id.as_str(), point.restore_time?)));
    let (point_marks, points_merged) = marks(points, now);
    let backups = view.backups.iter().filter_map(|backup| {
        Some((
            backup.backup_id.as_str(),
            backup.restore_time.or(backup.created_at)?,
        ))
    });
    let (backup_marks, backups_merged) = marks(backups, now);
    let width = PLOT_LEFT + PLOT_WIDTH + PLOT_RIGHT_MARGIN;
    let right = PLOT_LEFT + PLOT_WIDTH;
    let mut svg = String::new();
    // Writing into a String cannot fail: the results of write! are ignored below.
    let _ = write!(
        svg,
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" \
         height=\"{SVG_HEIGHT}\" viewBox=\"0 0 {width} {SVG_HEIGHT}\" role=\"img\" \
         aria-label=\"points and backups of the last 24 hours\">\
         <text x=\"4\" y=\"{}\">points</text><text x=\"4\" y=\"{}\">backups</text>\
         <line class=\"axis\" x1=\"{PLOT_LEFT}\" y1=\"{AXIS_Y}\" x2=\"{right}\" y2=\"{AXIS_Y}\"/>",
        POINT_ROW_Y + 4.0,
        BACKUP_ROW_Y + 4.0,
    );
    // Hour ticks, labelled every third hour, at whole UTC hours.
    let first_hour = (now - TIMELINE_SPAN)
        .duration_trunc(TimeDelta::hours(1))
        .unwrap_or(now - TIMELINE_SPAN)
        + TimeDelta::hours(1);
    let mut hour = first_hour;
    while hour <= now {
        if let Some(x) = x_of(hour, now) {
            let _ = write!(
                svg,
                "<line class=\"tick\" x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{}\"/>",
                AXIS_Y - 3.0,
                AXIS_Y + 3.0
            );
            if hour.hour().is_multiple_of(3) {
                let _ = write!(
                    svg,
                    "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    AXIS_Y + 16.0,
                    hour.format("%H:%M")
                );
            }
        }
        hour += TimeDelta::hours(1);
    }
    let _ = write!(
        svg,
        "<line class=\"now\" x1=\"{right}\" y1=\"8\" x2=\"{right}\" y2=\"{}\"/>\
         <text x=\"{right}\" y=\"{}\" text-anchor=\"middle\" class=\"now-label\">now</text>",
        AXIS_Y + 3.0,
        AXIS_Y + 28.0,
    );
    for mark in &point_marks {
        let merged = if mark.count > 1 { " merged" } else { "" };
        let _ = write!(
            svg,
            "<circle class=\"point{merged}\" data-point-id=\"{}\" data-count=\"{}\" cx=\"{:.1}\" \
             cy=\"{POINT_ROW_Y}\" r=\"5\"><title>{}</title></circle>",
            escape(&mark.id),
            mark.count,
            mark.x,
            mark_title("point", mark),
        );
    }
    for mark in &backup_marks {
        // A diamond: told apart from points by shape, not only by colour.
        let (x, y) = (mark.x, BACKUP_ROW_Y);
        let _ = write!(
            svg,
            "<polygon class=\"backup\" data-backup-id=\"{}\" data-count=\"{}\" \
             points=\"{x:.1},{:.1} {:.1},{y:.1} {x:.1},{:.1} {:.1},{y:.1}\"><title>{}</title></polygon>",
            escape(&mark.id),
            mark.count,
            y - 6.0,
            x + 6.0,
            y + 6.0,
            x - 6.0,
            mark_title("backup", mark),
        );
    }
    svg.push_str("</svg>");
    let in_span = |marks: &[Mark]| marks.iter().map(|mark| mark.count).sum::<usize>();
    let _ = write!(
        svg,
        "<p id=\"timeline-note\" class=\"muted\">Last 24 h to {}: \
         <span id=\"timeline-points\">{}</span> points (<span id=\"timeline-points-merged\">{points_merged}</span> \
         drawn in a shared mark, one mark per {}), \
         <span id=\"timeline-backups\">{}</span> backups ({backups_merged} in a shared mark).</p>",
        when(now),
        in_span(&point_marks),
        column_span(),
        in_span(&backup_marks),
    );
    svg
}

/// How much time one pixel column of the timeline covers, for people.
fn column_span() -> String {
    let seconds = TIMELINE_SPAN.num_seconds() as f64 / PLOT_WIDTH;
    format!("{seconds:.0} s")
}

/// One row per database the archivers or the storage know of.
fn databases(states: &[ArchiveState], stored: &[DatabaseArchive]) -> String {
    let mut names: Vec<&str> = states
        .iter()
        .map(|state| state.database.as_str())
        .chain(stored.iter().map(|db| db.database.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return "<p id=\"databases\" class=\"muted\">No database is archived \
                (no <code>archive = true</code> in the runbook, nothing under archive/).</p>"
            .to_owned();
    }
    let mut html = String::from(
        "<table id=\"databases\"><tr><th>database</th><th>archiver</th><th>archived to</th>\
         <th>lag</th><th>lag bytes</th><th>chunks</th><th>gaps</th><th>base backups</th>\
         <th>newest base</th></tr>",
    );
    for name in names {
        let state = states.iter().find(|state| state.database == name);
        let archive = stored.iter().find(|db| db.database == name);
        let streaming = state.is_some_and(|state| state.streaming);
        let archiver = match state {
            Some(state) if state.streaming => {
                "<span class=\"badge ok\">streaming</span>".to_owned()
            }
            Some(state) => format!(
                "<span class=\"badge bad\">not streaming</span>{}",
                state
                    .last_error
                    .as_deref()
                    .map_or(String::new(), |error| format!(
                        "<div class=\"last-error bad\">{}</div>",
                        escape(error)
                    ))
            ),
            None => "<span class=\"badge idle\">no archiver</span>".to_owned(),
        };
        let archived_to = state
            .and_then(|state| state.archived_to.clone())
            .or_else(|| archive.and_then(|archive| archive.to.clone()));
        let lag_seconds = state
            .and_then(|state| state.lag_seconds)
            .map_or("–".to_owned(), |lag| format!("{lag:.1} s"));
        let lag_bytes = state
            .and_then(|state| state.lag_bytes)
            .map_or("–".to_owned(), bytes);
        let chunks = archive.map_or(0, |archive| archive.chunks);
        let gaps = archive.map_or(&[][..], |archive| &archive.gaps[..]);
        let gaps_cell = if gaps.is_empty() {
            "<td class=\"gaps ok\" data-gaps=\"0\">none</td>".to_owned()
        } else {
            format!(
                "<td class=\"gaps bad\" data-gaps=\"{}\">{}<ul>{}</ul></td>",
                gaps.len(),
                gaps.len(),
                gaps.iter()
                    .map(|gap| format!("<li>{}</li>", escape(gap)))
                    .collect::<String>()
            )
        };
        let bases = archive.map_or(&[][..], |archive| &archive.bases[..]);
        let newest_base =
            bases
                .last()
                .map_or("<span class=\"muted\">none</span>".to_owned(), |base| {
                    format!(
                        "{} <span class=\"muted\">({}, {})</span>",
                        escape(&base.id),
                        base.finished_at.map_or("unfinished".to_owned(), when),
                        bytes(base.stored_bytes)
                    )
                });
        let _ = write!(
            html,
            "<tr class=\"database\" data-database=\"{name}\" data-streaming=\"{streaming}\">\
             <td class=\"name\">{name}</td><td class=\"archiver\">{archiver}</td>\
             <td class=\"archived-to\">{}</td><td class=\"lag-seconds number\">{lag_seconds}</td>\
             <td class=\"lag-bytes number\">{lag_bytes}</td><td class=\"chunks number\">{chunks}</td>\
             {gaps_cell}<td class=\"bases number\">{}</td><td class=\"newest-base\">{newest_base}</td></tr>",
            archived_to.map_or("–".to_owned(), |to| escape(&to)),
            bases.len(),
            name = escape(name),
        );
    }
    html.push_str("</table>");
    html
}

/// The newest drill that ended (passed or failed), and one running now if any.
fn last_drill(jobs: &[JobRecord]) -> String {
    let drills = || jobs.iter().filter(|job| job.kind == JobKind::Drill);
    let running = drills()
        .find(|job| !job.state.is_final())
        .map_or(String::new(), |job| {
            format!(
                "<p class=\"muted\">A drill is {} now: <a href=\"/api/v1/jobs/{id}\">{id}</a>.</p>",
                state_name(job.state),
                id = escape(&job.job_id)
            )
        });
    let Some(job) =
        drills().find(|job| matches!(job.state, JobState::Succeeded | JobState::Failed))
    else {
        return format!(
            "<div id=\"last-drill\" class=\"none\"><p class=\"muted\">No drill has run yet.</p>{running}</div>"
        );
    };
    let result = job.result.as_ref();
    // The report's own verdict when there is one: a job can fail before checking.
    let passed = result
        .and_then(|result| result.get("ok"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(job.state == JobState::Succeeded)
        && job.state == JobState::Succeeded;
    let text = |key: &str| {
        result
            .and_then(|result| result.get(key))
            .and_then(serde_json::Value::as_str)
    };
    let drilled = match (text("point_id"), text("backup_id")) {
        (Some(point), _) => format!("point <span class=\"drilled\">{}</span>", escape(point)),
        (None, Some(backup)) => format!("backup <span class=\"drilled\">{}</span>", escape(backup)),
        (None, None) => {
            "<span class=\"muted\">nothing (it failed before choosing)</span>".to_owned()
        }
    };
    let (class, verdict) = if passed {
        ("passed", "<span class=\"badge ok\">passed</span>")
    } else {
        ("failed", "<span class=\"badge bad\">failed</span>")
    };
    let error = job.error.as_deref().map_or(String::new(), |error| {
        format!("<p class=\"bad\">{}</p>", escape(error))
    });
    format!(
        "<div id=\"last-drill\" class=\"{class}\" data-job-id=\"{id}\"><p>{verdict} {} — drilled {drilled} — \
         <a href=\"/api/v1/jobs/{id}\">job {id}</a></p>{error}{running}</div>",
        time_element(job.finished_at.or(job.started_at)),
        id = escape(&job.job_id),
    )
}

fn schedule(planned: &[Planned]) -> String {
    if planned.is_empty() {
        return "<p id=\"schedule\" class=\"muted\">Nothing is scheduled: the runbook has no \
                [schedule] entries.</p>"
            .to_owned();
    }
    let mut html = String::from(
        "<table id=\"schedule\"><tr><th>kind</th><th>cron</th><th>time zone</th>\
         <th>next run</th><th>last scheduled run</th></tr>",
    );
    for entry in planned {
        let _ = write!(
            html,
            "<tr class=\"entry\" data-kind=\"{kind}\"><td class=\"kind\">{kind}</td>\
             <td class=\"cron\"><code>{}</code></td><td>{}</td>\
             <td class=\"next-run\">{}</td><td class=\"last-run\">{}</td></tr>",
            escape(&entry.cron),
            escape(&entry.time_zone),
            time_element(entry.next_run),
            time_element(entry.last_scheduled_run),
            kind = entry.kind.as_str(),
        );
    }
    html.push_str("</table>");
    html
}

fn recent_jobs(jobs: &[JobRecord]) -> String {
    if jobs.is_empty() {
        return "<p id=\"jobs\" class=\"muted\">No job has run yet.</p>".to_owned();
    }
    let mut html = String::from(
        "<table id=\"jobs\"><tr><th>job</th><th>kind</th><th>by</th><th>state</th>\
         <th>queued</th><th>took</th><th>error or note</th></tr>",
    );
    for job in jobs.iter().take(RECENT_JOBS) {
        let state = state_name(job.state);
        let class = match job.state {
            JobState::Succeeded => "ok",
            JobState::Failed => "bad",
            _ => "muted",
        };
        let trigger = match job.trigger {
            crate::Trigger::Schedule => "schedule",
            crate::Trigger::Api => "api",
        };
        let said = job
            .error
            .as_deref()
            .or(job.note.as_deref())
            .map_or(String::new(), escape);
        let _ = write!(
            html,
            "<tr class=\"job\" data-job-id=\"{id}\" data-state=\"{state}\">\
             <td><a href=\"/api/v1/jobs/{id}\">{id}</a></td><td>{}</td><td>{trigger}</td>\
             <td class=\"state {class}\">{state}</td><td>{}</td><td class=\"number\">{}</td>\
             <td>{said}</td></tr>",
            job.kind.as_str(),
            time_element(Some(job.queued_at)),
            job.duration_ms.map_or("–".to_owned(), |ms| format!(
                "{:.1} s",
                ms as f64 / 1000.0
            )),
            id = escape(&job.job_id),
        );
    }
    html.push_str("</table>");
    html
}

fn problems(view: &View) -> String {
    if view.problems.is_empty() {
        return "<p id=\"problems\" class=\"ok\">None: everything in storage could be read.</p>"
            .to_owned();
    }
    let items: String = view
        .problems
        .iter()
        .map(|problem| format!("<li class=\"problem\">{}</li>", escape(problem)))
        .collect();
    format!("<ul id=\"problems\">{items}</ul>")
}

pub async fn render(service: &Service) -> String {
    let view = service.view.read().await;
    let now = Utc::now();
    // Every record in memory (at most a few hundred): the last drill may be older than
    // the recent jobs.
    let jobs = service.jobs.list(usize::MAX);
    let cluster = escape(&service.runbook.cluster);
    let newest = view.points.last().and_then(|point| point.restore_time);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>stillpoint: {cluster}</title><style>{STYLE}</style></head><body>\
         <h1>stillpoint: {cluster}</h1>\
         <p class=\"muted\">Storage read at {}; page made at {}; it reloads every {REFRESH_SECONDS} s.</p>\
         <p id=\"summary\"><span id=\"points-count\">{}</span> restorable points, newest {}; \
         <span id=\"backups-count\">{}</span> backups.</p>",
        view.read_at.map_or("never".to_owned(), when),
        when(now),
        view.points.len(),
        time_element(newest),
        view.backups.len(),
    );
    let _ = write!(
        html,
        "<h2>Problems</h2>{}\
         <h2>Databases</h2>{}\
         <h2>Last 24 hours</h2>{}\
         <h2>Last drill</h2>{}\
         <h2>Schedule</h2>{}\
         <h2>Recent jobs</h2>{}",
        problems(&view),
        databases(&service.archives.all(), &view.databases),
        timeline(&view, now),
        last_drill(&jobs),
        schedule(&service.planned()),
        recent_jobs(&jobs),
    );
    html.push_str("</body></html>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn time_maps_from_24_hours_ago_at_the_left_to_now_at_the_right() {
        let now = at("2026-11-30T12:00:00Z");
        assert_eq!(x_of(now, now), Some(PLOT_LEFT + PLOT_WIDTH));
        assert_eq!(x_of(at("2026-11-29T12:00:00Z"), now), Some(PLOT_LEFT));
        assert_eq!(
            x_of(at("2026-11-30T00:00:00Z"), now),
            Some(PLOT_LEFT + PLOT_WIDTH / 2.0)
        );
        // A clock a little ahead: drawn at now, not off the plot.
        assert_eq!(
            x_of(at("2026-11-30T12:00:05Z"), now),
            Some(PLOT_LEFT + PLOT_WIDTH)
        );
    }

    #[test]
    fn points_older_than_24_hours_are_left_out() {
        let now = at("2026-11-30T12:00:00Z");
        assert_eq!(x_of(at("2026-11-29T11:59:59Z"), now), None);
        let (drawn, merged) = marks(
            [
                ("old", at("2026-11-29T11:00:00Z")),
                ("new", at("2026-11-30T11:00:00Z")),
            ],
            now,
        );
        assert_eq!(drawn.len(), 1);
        assert_eq!(drawn[0].id, "new");
        assert_eq!(merged, 0, "a point left out is not counted as merged");
    }

    #[test]
    fn dense_points_merge_into_one_mark_per_pixel_column_showing_the_newest() {
        let now = at("2026-11-30T12:00:00Z");
        // A point every 5 s for 24 h: 17 280 points, at most one mark per column.
        let ids: Vec<(String, DateTime<Utc>)> = (0..17_280)
            .map(|i| (format!("p{i}"), now - TimeDelta::seconds(5 * i)))
            .collect();
        let (drawn, merged) = marks(ids.iter().map(|(id, time)| (id.as_str(), *time)), now);
        assert!(
            drawn.len() <= PLOT_WIDTH as usize + 1,
            "{} marks",
            drawn.len()
        );
        assert!(
            drawn.len() >= PLOT_WIDTH as usize - 1,
            "{} marks",
            drawn.len()
        );
        assert_eq!(drawn.len() + merged, ids.len());
        assert_eq!(
            drawn.iter().map(|mark| mark.count).sum::<usize>(),
            ids.len()
        );
        // The rightmost mark stands for the newest point.
        assert_eq!(drawn.last().unwrap().id, "p0");
        // Points a column apart stay apart.
        let column = TimeDelta::seconds(TIMELINE_SPAN.num_seconds() / PLOT_WIDTH as i64 + 1);
        let (apart, merged) = marks(
            [
                ("a", now - column * 3),
                ("b", now - column * 2),
                ("c", now - column),
            ],
            now,
        );
        assert_eq!((apart.len(), merged), (3, 0));
    }

    #[test]
    fn markup_in_text_and_attributes_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        // A stored id that tries to close the attribute and open a tag stays text.
        let mark = Mark {
            x: 1.0,
            id: "\"><script>".to_owned(),
            time: at("2026-11-30T12:00:00Z"),
            count: 2,
        };
        let title = mark_title("point", &mark);
        assert!(!title.contains('<') && !title.contains('"'), "{title}");
        assert!(title.contains("+1 more"), "{title}");
    }

    fn archive(gaps: &[&str]) -> DatabaseArchive {
        DatabaseArchive {
            database: "ledger".to_owned(),
            chunks: 3,
            from: Some("0/1000000".to_owned()),
            to: Some("0/4000000".to_owned()),
            gaps: gaps.iter().map(|gap| (*gap).to_owned()).collect(),
            bases: Vec::new(),
        }
    }

    #[test]
    fn a_database_with_gaps_is_marked_bad_and_its_gap_text_escaped() {
        let clean = databases(&[], &[archive(&[])]);
        assert!(
            clean.contains("class=\"gaps ok\" data-gaps=\"0\""),
            "{clean}"
        );
        let broken = databases(&[], &[archive(&["after <b>x</b>"])]);
        assert!(
            broken.contains("class=\"gaps bad\" data-gaps=\"1\""),
            "{broken}"
        );
        assert!(broken.contains("after &lt;b&gt;x&lt;/b&gt;"), "{broken}");
        assert!(!broken.contains("<b>"), "{broken}");
    }

    fn drill(state: JobState, result: serde_json::Value) -> JobRecord {
        JobRecord {
            job_id: "20261130T040000.000Z-drill-1".to_owned(),
            kind: JobKind::Drill,
            trigger: crate::Trigger::Schedule,
            state,
            queued_at: at("2026-11-30T04:00:00Z"),
            started_at: Some(at("2026-11-30T04:00:00Z")),
            finished_at: Some(at("2026-11-30T04:01:00Z")),
            duration_ms: Some(60_000),
            result: Some(result),
            error: None,
            note: None,
        }
    }

    #[test]
    fn the_last_drill_says_passed_or_failed_and_what_it_drilled() {
        let passed = last_drill(&[drill(
            JobState::Succeeded,
            serde_json::json!({ "point_id": "p1", "ok": true }),
        )]);
        assert!(passed.contains("class=\"passed\""), "{passed}");
        assert!(
            passed.contains("point <span class=\"drilled\">p1</span>"),
            "{passed}"
        );
        assert!(passed.contains("href=\"/api/v1/jobs/20261130T040000.000Z-drill-1\""));
        let failed = last_drill(&[drill(
            JobState::Failed,
            serde_json::json!({ "backup_id": "b1", "ok": false }),
        )]);
        assert!(failed.contains("class=\"failed\""), "{failed}");
        assert!(
            failed.contains("backup <span class=\"drilled\">b1</span>"),
            "{failed}"
        );
        // A drill still running does not hide the last one that ended.
        let mut running = drill(JobState::Running, serde_json::Value::Null);
        running.job_id = "20261130T050000.000Z-drill-2".to_owned();
        let both = last_drill(&[
            running,
            drill(
                JobState::Succeeded,
                serde_json::json!({ "point_id": "p1", "ok": true }),
            ),
        ]);
        assert!(both.contains("class=\"passed\""), "{both}");
        assert!(both.contains("A drill is running now"), "{both}");
        assert!(last_drill(&[]).contains("No drill has run yet"));
    }
}
