//! The ordered view of one database's archive: which chunks count (a whole segment
//! supersedes the partial copies of its beginning; a longer partial a shorter one),
//! where the archive starts and ends, where it has gaps, and whether it covers a
//! range of the log without one: the question a point asks ("has the archive of X
//! reached its marker?").

use std::fmt;

use super::{ARCHIVE_DIR, ChunkRecord, Position, RECORD_SUFFIX};

/// One database's archive, ordered. Built by [`super::Archive::catalog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub database: String,
    /// The chunks that count, in log order (by start): none holds a range another
    /// one covers.
    pub chunks: Vec<ChunkRecord>,
    /// Chunks whose whole range a chunk in `chunks` covers (an older partial
    /// segment): left by an archiver stopped between storing a newer chunk and
    /// removing the old one, and safe to remove.
    pub superseded: Vec<ChunkRecord>,
    /// Chunks outside the log order (timeline history files and the like).
    pub others: Vec<ChunkRecord>,
    /// Records that could not be read: (path, problem).
    pub unreadable: Vec<(String, String)>,
}

/// Where the archive starts and ends (it may have gaps in between).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    pub from: Position,
    pub to: Position,
}

/// A stretch of the log no chunk holds, between two chunks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub database: String,
    /// The chunk before the gap, and where it ends.
    pub after: String,
    pub from: Position,
    /// The chunk after the gap, and where it starts.
    pub before: String,
    pub to: Position,
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the archive of {} has a gap from {} (the end of {}) to {} (the start of {})",
            self.database, self.from, self.after, self.to, self.before
        )
    }
}

/// Why an archive does not cover a range of the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReached {
    #[error("the archive of {database} is empty")]
    Empty { database: String },
    #[error(
        "the archive of {database} starts at {first_start} ({first}), after {from}: the log \
         before it was never archived"
    )]
    StartsAfter {
        database: String,
        first: String,
        first_start: Position,
        from: Position,
    },
    #[error("{0}")]
    Gap(Gap),
    #[error(
        "the archive of {database} ends at {end} ({last}), before {target}: it has not \
         reached it yet"
    )]
    EndsBefore {
        database: String,
        last: String,
        end: Position,
        target: Position,
    },
}

impl Catalog {
    /// Orders `records` and sets superseded ones aside. A record whose range is not
    /// one (it ends before it starts, or its ends are different kinds of position)
    /// never counts: it joins `unreadable`.
    pub fn new(
        database: &str,
        records: Vec<ChunkRecord>,
        mut unreadable: Vec<(String, String)>,
    ) -> Catalog {
        let (mut ranged, others): (Vec<ChunkRecord>, Vec<ChunkRecord>) =
            records.into_iter().partition(|r| r.range().is_some());
        // Counted, an inverted range made the coverage end before it starts, and
        // `covers` of it held despite a gap (found by the archive_catalog fuzz target).
        ranged.retain(|record| {
            let (start, end) = record.range().expect("partitioned on range");
            if start.kind_rank() == end.kind_rank() && start <= end {
                return true;
            }
            unreadable.push((
                format!("{ARCHIVE_DIR}/{database}/{}{RECORD_SUFFIX}", record.name),
                format!(
                    "its range [{start}, {end}) is not a stretch of the log (it ends before \
                     it starts, or mixes kinds of position), so the chunk does not count; \
                     stillpoint never writes such a record: it is damaged, remove it"
                ),
            ));
            false
        });
        let mut others = others;
        others.sort_by(|a, b| a.name.cmp(&b.name));
        // By start; for one start the longest first, and of equal ranges the whole
        // chunk (a segment) before a partial, then by name for a stable order.
        ranged.sort_by(|a, b| {
            let (a_start, a_end) = a.range().expect("partitioned on range");
            let (b_start, b_end) = b.range().expect("partitioned on range");
            a_start
                .cmp(b_start)
                .then(b_end.cmp(a_end))
                .then(b.kind.is_whole().cmp(&a.kind.is_whole()))
                .then(a.name.cmp(&b.name))
        });
        let mut chunks: Vec<ChunkRecord> = Vec::new();
        let mut superseded = Vec::new();
        let mut reach: Option<Position> = None;
        for record in ranged {
            let (_, end) = record.range().expect("partitioned on range");
            // Sorted by start, so every chunk before it starts no later: it is covered
            // exactly when one of them reaches as far.
            if reach.as_ref().is_some_and(|reach| end <= reach) {
                superseded.push(record);
                continue;
            }
            reach = Some(end.clone());
            chunks.push(record);
        }
        Catalog {
            database: database.to_owned(),
            chunks,
            superseded,
            others,
            unreadable,
        }
    }

    /// From the start of the first chunk to the end of the last.
    pub fn coverage(&self) -> Option<Coverage> {
        let first = self.chunks.first()?.range()?.0.clone();
        let last = self.chunks.last()?.range()?.1.clone();
        Some(Coverage {
            from: first,
            to: last,
        })
    }

    /// Every gap between consecutive chunks, in log order.
    pub fn gaps(&self) -> Vec<Gap> {
        self.chunks
            .windows(2)
            .filter_map(|pair| {
                let (_, end) = pair[0].range()?;
                let (start, _) = pair[1].range()?;
                (start > end && !start.starts_generation()).then(|| Gap {
                    database: self.database.clone(),
                    after: pair[0].name.clone(),
                    from: end.clone(),
                    before: pair[1].name.clone(),
                    to: start.clone(),
                })
            })
            .collect()
    }

    /// The end of the archive's last stretch without gaps: how far a restore that
    /// starts in that stretch can replay.
    pub fn end(&self) -> Option<Position> {
        self.coverage().map(|coverage| coverage.to)
    }

    /// Whether the chunks hold every position from `from` up to `to` (the whole log
    /// before `to`), without a gap: what a point whose base backup starts at `from`
    /// and whose marker is `to` needs to be restorable.
    // A binlog position holds its file name, which makes the error large; this is
    // asked once per point or restore, never in a loop that would feel it.
    #[allow(clippy::result_large_err)]
    pub fn covers(&self, from: &Position, to: &Position) -> Result<(), NotReached> {
        // Nothing to replay (a SQLite point at its snapshot).
        if to <= from {
            return Ok(());
        }
        let Some(first) = self.chunks.first() else {
            return Err(NotReached::Empty {
                database: self.database.clone(),
            });
        };
        // The chunk that holds `from`: the last one starting at or before it.
        let holder = self
            .chunks
            .iter()
            .rposition(|chunk| chunk.range().is_some_and(|(start, _)| start <= from));
        let Some(holder) = holder else {
            let (first_start, _) = first.range().expect("chunks have ranges");
            return Err(NotReached::StartsAfter {
                database: self.database.clone(),
                first: first.name.clone(),
                first_start: first_start.clone(),
                from: from.clone(),
            });
        };
        let mut last = &self.chunks[holder];
        // When `from` lies past the holder's end, the next chunk starts after it: the
        // loop names that gap (or the archive ends before `to`).
        let (_, mut end) = last.range().expect("chunks have ranges");
        for next in &self.chunks[holder + 1..] {
            if end >= to {
                break;
            }
            let (start, next_end) = next.range().expect("chunks have ranges");
            if start > end {
                return Err(NotReached::Gap(Gap {
                    database: self.database.clone(),
                    after: last.name.clone(),
                    from: end.clone(),
                    before: next.name.clone(),
                    to: start.clone(),
                }));
            }
            last = next;
            end = next_end;
        }
        if end < to {
            return Err(NotReached::EndsBefore {
                database: self.database.clone(),
                last: last.name.clone(),
                end: end.clone(),
                target: to.clone(),
            });
        }
        Ok(())
    }

    /// The chunk named `name`, among those that count.
    pub fn chunk(&self, name: &str) -> Option<&ChunkRecord> {
        self.chunks
            .iter()
            .chain(&self.others)
            .find(|chunk| chunk.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite frames record of `notes` from `start` to `end` (generation, frame).
    fn frames(name: &str, start: (u64, u64), end: (u64, u64)) -> ChunkRecord {
        serde_json::from_value(serde_json::json!({
            "format": 1, "database": "notes", "name": name, "kind": "sqlite_frames",
            "start": {"sqlite": {"generation": start.0, "frame": start.1}},
            "end": {"sqlite": {"generation": end.0, "frame": end.1}},
            "size": 1, "plaintext_blake3": "00",
            "artifact": {"path": format!("archive/notes/{name}"), "size": 1, "stored_size": 1,
                         "blake3": "00", "compression": null, "encryption": null},
            "archived_at_ms": 0
        }))
        .unwrap()
    }

    /// The archive_catalog fuzz target's crash, reduced: two records that end before
    /// they start made a coverage from g2:0 to g1:30 with a gap inside, and
    /// `covers(g2:0, g1:30)` held (an end at or before the start is "nothing to
    /// replay").
    #[test]
    fn records_that_end_before_they_start_never_count() {
        let records = vec![
            frames("a.frames", (2, 0), (1, 12)),
            frames("b.frames", (2, 12), (1, 30)),
            frames("c.frames", (1, 0), (1, 12)),
        ];
        let catalog = Catalog::new("notes", records, vec![]);
        let names: Vec<&str> = catalog.chunks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["c.frames"]);
        let paths: Vec<&str> = catalog.unreadable.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["archive/notes/a.frames.json", "archive/notes/b.frames.json"]
        );
        let problem = &catalog.unreadable[0].1;
        assert!(problem.contains("[g2:0, g1:12)"), "{problem}");
        assert!(problem.contains("remove it"), "{problem}");
        assert!(catalog.gaps().is_empty());
        let coverage = catalog.coverage().unwrap();
        assert_eq!(
            (coverage.from.to_string(), coverage.to.to_string()),
            ("g1:0".into(), "g1:12".into())
        );
        assert!(catalog.covers(&coverage.from, &coverage.to).is_ok());
    }
}
