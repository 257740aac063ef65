//! Pause window vs database size: the window each backup's manifest records, for the
//! small and the large database. Only the cut (an exported snapshot and an LSN) happens
//! inside the pause, so the window must not grow with the data.

use stillpoint::manifest::Manifest;

use crate::Fixture;
use crate::support::{self, Row, Target, median};

#[derive(Default)]
pub struct Windows {
    pub small: Vec<Manifest>,
    pub large: Vec<Manifest>,
}

impl Windows {
    pub fn report(&self, fixture: &Fixture, rounds: usize) -> (String, Row) {
        let window = |backups: &[Manifest]| {
            median(
                &backups
                    .iter()
                    .map(|m| m.window.window_ms.unwrap() as f64)
                    .collect::<Vec<_>>(),
            )
        };
        let cut = |backups: &[Manifest]| {
            median(
                &backups
                    .iter()
                    .map(|m| m.timings.cut_ms as f64)
                    .collect::<Vec<_>>(),
            )
        };
        let (small, large) = (window(&self.small), window(&self.large));
        let ratio = large / small;
        let size_ratio = fixture.large.bytes as f64 / fixture.small.bytes as f64;
        let body = format!(
            "{} {rounds} backups of each database, alternating, {} admin nodes; medians.\n\n\
             | database | size | pause window | cut |\n|---|---|---|---|\n\
             | small ({} rows) | {:.0} MiB | {small:.0} ms | {:.0} ms |\n\
             | large ({} rows) | {:.0} MiB | {large:.0} ms | {:.0} ms |\n\n\
             **Window ratio large / small: {ratio:.2}×** (target ≤ 1.2×) for a database \
             {size_ratio:.1}× larger.",
            support::measured_line("scripts/bench postgres"),
            crate::NODES,
            fixture.small.rows,
            support::mib(fixture.small.bytes),
            cut(&self.small),
            fixture.large.rows,
            support::mib(fixture.large.bytes),
            cut(&self.large),
        );
        let row = Row::new(
            "3. window vs database size",
            &format!("pause window, {size_ratio:.1}× larger database"),
            format!(
                "{large:.0} ms ({:.0} MiB)",
                support::mib(fixture.large.bytes)
            ),
            format!(
                "{small:.0} ms ({:.0} MiB)",
                support::mib(fixture.small.bytes)
            ),
            Some(ratio),
            Target::AtMost(1.2),
        );
        (body, row)
    }
}
