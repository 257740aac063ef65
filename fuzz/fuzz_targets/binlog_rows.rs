//! `changes::binlog_rows` on any bytes as a binlog file's events (what `stillpoint
//! changes` reads from archived chunks, damaged or not): the first event is taken as
//! the format description (`Format::from_description`), then every later event as its
//! header's length says, decoded as `stillpoint changes` does: GTIDs, queries, table
//! maps, and rows events of a mapped table.
//!
//! Besides "never panics": every decoded row has the image its kind says (an insert
//! only an after, a delete only a before, an update both), and each image holds one
//! value per column of its table map.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use stillpoint::changes::binlog_rows::{
    self, Format, GTID_EVENT, Gtid, Kind, QUERY_EVENT, TABLE_MAP_EVENT, TableMap,
};

/// An event's length, from its v4 header (bytes 9..13).
fn event_len(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(9..13)?.try_into().ok()?) as usize;
    (len >= 19 && len <= bytes.len()).then_some(len)
}

fuzz_target!(|data: &[u8]| {
    let Some(first) = event_len(data) else {
        return;
    };
    let Ok(format) = Format::from_description(&data[..first]) else {
        return;
    };
    let mut maps: HashMap<u64, TableMap> = HashMap::new();
    let mut rest = &data[first..];
    while let Some(len) = event_len(rest) {
        let (bytes, next) = rest.split_at(len);
        rest = next;
        let Ok(event) = format.event(bytes) else {
            continue;
        };
        match event.kind {
            GTID_EVENT => {
                let _ = Gtid::parse(&event);
            }
            QUERY_EVENT => {
                let _ = binlog_rows::query_text(&format, &event);
            }
            TABLE_MAP_EVENT => {
                if let Ok(map) = TableMap::parse(&format, &event) {
                    let _ = map.column_names();
                    maps.insert(map.table_id, map);
                }
            }
            kind if Kind::of(kind).is_some() => {
                let Ok(id) = binlog_rows::rows_table_id(&format, &event) else {
                    continue;
                };
                let Some(map) = maps.get(&id) else { continue };
                let Ok((kind, rows)) = binlog_rows::rows(&format, &event, map) else {
                    continue;
                };
                for row in rows {
                    let (before, after) = (row.before.is_some(), row.after.is_some());
                    match kind {
                        Kind::Insert => assert!(!before && after, "{kind:?}"),
                        Kind::Delete => assert!(before && !after, "{kind:?}"),
                        Kind::Update => assert!(before && after, "{kind:?}"),
                    }
                    for image in [row.before, row.after].into_iter().flatten() {
                        assert_eq!(image.len(), map.columns.len(), "{}", map.name());
                    }
                }
            }
            _ => {}
        }
    }
});
