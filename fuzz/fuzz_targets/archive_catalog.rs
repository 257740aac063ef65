//! `archive::Catalog` built from any bytes read as a JSON array of chunk records (the
//! records of a damaged or hostile archive in storage): `Catalog::new`, then `gaps`,
//! `coverage`, `end`, and `covers` for the coverage's ends and for every record's
//! start and end.
//!
//! Besides "never panics": the chunks that count are ordered by start with strictly
//! increasing ends (none holds a range another one covers), every record lands in
//! exactly one of chunks, superseded, others and unreadable (a range that is not one),
//! `end()` is the coverage's end, and an archive with a gap never claims to cover its
//! whole coverage.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint::archive::{Catalog, ChunkRecord};

fuzz_target!(|data: &[u8]| {
    let Ok(records) = serde_json::from_slice::<Vec<ChunkRecord>>(data) else {
        return;
    };
    let total = records.len();
    let catalog = Catalog::new("db", records.clone(), vec![]);
    assert_eq!(
        catalog.chunks.len()
            + catalog.superseded.len()
            + catalog.others.len()
            + catalog.unreadable.len(),
        total
    );

    for pair in catalog.chunks.windows(2) {
        let (a_start, a_end) = pair[0].range().expect("a chunk that counts has a range");
        let (b_start, b_end) = pair[1].range().expect("a chunk that counts has a range");
        assert!(
            a_start <= b_start,
            "{} after {}",
            pair[0].name,
            pair[1].name
        );
        assert!(a_end < b_end, "{} covers {}", pair[0].name, pair[1].name);
    }

    let gaps = catalog.gaps();
    let coverage = catalog.coverage();
    assert_eq!(catalog.end(), coverage.as_ref().map(|c| c.to.clone()));
    assert_eq!(coverage.is_some(), !catalog.chunks.is_empty());
    if let Some(coverage) = &coverage {
        let covered = catalog.covers(&coverage.from, &coverage.to);
        if !gaps.is_empty() {
            assert!(
                covered.is_err(),
                "{} gaps ({}), but covers({}, {}) holds",
                gaps.len(),
                gaps[0],
                coverage.from,
                coverage.to
            );
        }
    } else {
        assert!(gaps.is_empty());
    }
    for record in &records {
        if let Some((start, end)) = record.range() {
            let _ = catalog.covers(start, end);
            let _ = catalog.covers(end, start);
        }
    }
});
