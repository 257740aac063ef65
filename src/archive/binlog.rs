//! MariaDB binlog files as the archive sees them: names and their order, chunk names,
//! and walking a file's events to find where the last whole one ends.
//!
//! A binlog file is the 4-byte magic `\xfebin` followed by events. Every event
//! starts with a 19-byte (v4) header: timestamp (4), type (1), server id (4), event
//! length (4, little-endian, header included), the position of the event's end in
//! its file (4) and flags (2). Chunks hold events only: a file's first chunk starts
//! at offset 4 (its format description event), and the magic, the same for every
//! file, is written back when replay reassembles the file. So a chunk's bytes are
//! exactly the file's bytes `[start, end)` and offsets in the archive are the
//! server's offsets.

/// The first bytes of every binlog file.
pub const MAGIC: [u8; 4] = [0xfe, b'b', b'i', b'n'];
/// Where a file's first event starts.
pub const FIRST_EVENT: u64 = MAGIC.len() as u64;
/// The v4 event header.
pub const HEADER_LEN: usize = 19;
/// `STOP_EVENT`: the server shut down cleanly; the next file follows.
pub const STOP_EVENT: u8 = 3;
/// `ROTATE_EVENT`: the server moved on to the next file.
pub const ROTATE_EVENT: u8 = 4;

/// A binlog file name split as `<base>.<number>`: the number (what orders files),
/// for names that end in digits after a dot.
pub fn sequence(file: &str) -> Option<u64> {
    let (_, digits) = file.rsplit_once('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The file the server writes after `file`: the same base, the number plus one, at
/// least as many digits (`binlog.000009` → `binlog.000010`).
pub fn next_file(file: &str) -> Option<String> {
    let (base, digits) = file.rsplit_once('.')?;
    let number = sequence(file)?;
    Some(format!(
        "{base}.{:0width$}",
        number + 1,
        width = digits.len()
    ))
}

/// The chunk holding bytes `[start, end)` of `file`:
/// `<file>.<start, 12 hex digits>-<end, 12 hex digits>`. The range in the name makes
/// a name's content fixed.
pub fn chunk_name(file: &str, start: u64, end: u64) -> String {
    format!("{file}.{start:012X}-{end:012X}")
}

/// The empty chunk that says `file` ends at `end` and the next file follows (for a
/// file whose last event is neither ROTATE nor STOP: the server crashed, or its
/// end was archived before the server moved on).
pub fn end_chunk_name(file: &str, end: u64) -> String {
    format!("{file}.{end:012X}.end")
}

/// Where the whole events of a stretch of a file end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// The offset just past the last whole event (the start if there is none).
    pub end: u64,
    /// The type of the last whole event.
    pub last_type: Option<u8>,
    pub events: u64,
}

impl Walk {
    /// Whether the last whole event ends the file (ROTATE or STOP).
    pub fn closes_file(&self) -> bool {
        matches!(self.last_type, Some(ROTATE_EVENT | STOP_EVENT))
    }
}

/// Walks the events in `bytes`, the file's content from offset `start` (an event
/// boundary), up to the last one that is whole. At most `limit` bytes of events are
/// taken (at least one event, however long). Each event's end position must match
/// its header: a mismatch means the bytes are not the server's file.
pub fn walk(bytes: &[u8], start: u64, limit: u64) -> Result<Walk, String> {
    let mut at = 0usize;
    let mut walk = Walk {
        end: start,
        last_type: None,
        events: 0,
    };
    while bytes.len() - at >= HEADER_LEN {
        let header = &bytes[at..at + HEADER_LEN];
        let length = u32::from_le_bytes(header[9..13].try_into().expect("4 bytes")) as usize;
        let end_position = u32::from_le_bytes(header[13..17].try_into().expect("4 bytes"));
        let offset = start + at as u64;
        if length < HEADER_LEN {
            return Err(format!(
                "the event at offset {offset} claims a length of {length} bytes, less than \
                 its header"
            ));
        }
        if bytes.len() - at < length {
            break;
        }
        let event_end = offset + length as u64;
        // Positions are 32 bits in the header: past 4 GiB they wrap.
        if u64::from(end_position) != event_end & 0xFFFF_FFFF {
            return Err(format!(
                "the event at offset {offset} is {length} bytes long but says it ends at \
                 {end_position}: the bytes are not a copy of the server's binlog"
            ));
        }
        if walk.events > 0 && event_end - start > limit {
            break;
        }
        walk.end = event_end;
        walk.last_type = Some(header[4]);
        walk.events += 1;
        at += length;
    }
    Ok(walk)
}

/// `GTID_EVENT`: the start of a transaction, with its GTID.
pub const GTID_EVENT: u8 = 162;
/// `GTID_LIST_EVENT`: the GTID state at the start of a file.
pub const GTID_LIST_EVENT: u8 = 163;

/// A GTID state: per replication domain, the server id and sequence number of its
/// last transaction.
pub type GtidState = std::collections::BTreeMap<u32, (u32, u64)>;

/// Follows the GTID state through the whole events of `bytes` (from an event
/// boundary): a file's GTID list sets it, each transaction's GTID event moves it.
pub fn track_gtids(bytes: &[u8], state: &mut GtidState) {
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let mut at = 0usize;
    while bytes.len() - at >= HEADER_LEN {
        let length = u32_at(bytes, at + 9) as usize;
        if length < HEADER_LEN || bytes.len() - at < length {
            break;
        }
        let event = &bytes[at..at + length];
        let body = &event[HEADER_LEN..];
        match event[4] {
            GTID_EVENT if body.len() >= 12 => {
                let server = u32_at(event, 5);
                state.insert(u32_at(body, 8), (server, u64_at(body, 0)));
            }
            GTID_LIST_EVENT if body.len() >= 4 => {
                let count = (u32_at(body, 0) & 0x0FFF_FFFF) as usize;
                if body.len() >= 4 + count * 16 {
                    state.clear();
                    for entry in body[4..4 + count * 16].chunks_exact(16) {
                        state.insert(u32_at(entry, 0), (u32_at(entry, 4), u64_at(entry, 8)));
                    }
                }
            }
            _ => {}
        }
        at += length;
    }
}

/// A GTID state as MariaDB prints it (`0-1-42,1-2-7`), domains in order.
pub fn gtid_text(state: &GtidState) -> String {
    state
        .iter()
        .map(|(domain, (server, seq))| format!("{domain}-{server}-{seq}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Position;

    /// An event of `length` bytes of type `kind` at `offset`.
    fn event(offset: u64, kind: u8, length: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; length];
        bytes[4] = kind;
        bytes[9..13].copy_from_slice(&(length as u32).to_le_bytes());
        bytes[13..17].copy_from_slice(&((offset + length as u64) as u32).to_le_bytes());
        bytes
    }

    #[test]
    fn files_are_ordered_by_their_number_past_six_digits() {
        let at = |file: &str, offset| Position::binlog(file, offset);
        assert!(at("binlog.000009", 900) < at("binlog.000010", 4));
        assert!(at("binlog.999999", 900) < at("binlog.1000000", 4));
        assert!(at("binlog.000010", 4) < at("binlog.000010", 5));
        assert_eq!(next_file("binlog.000009").as_deref(), Some("binlog.000010"));
        assert_eq!(
            next_file("binlog.999999").as_deref(),
            Some("binlog.1000000")
        );
        assert_eq!(next_file("my-bin.12").as_deref(), Some("my-bin.13"));
        assert_eq!(next_file("binlog"), None);
        assert_eq!(sequence("binlog.x1"), None);
    }

    #[test]
    fn the_walk_stops_at_the_last_whole_event() {
        let mut file = Vec::new();
        file.extend(event(4, 15, 100));
        file.extend(event(104, 2, 50));
        file.extend(event(154, 16, 31));
        let whole = walk(&file, 4, u64::MAX).unwrap();
        assert_eq!(whole.end, 185);
        assert_eq!(whole.events, 3);
        assert!(!whole.closes_file());
        // Cut mid-event (header whole, body not; then header not whole either).
        for cut in [170, 160, 154 + 10] {
            let part = walk(&file[..cut - 4], 4, u64::MAX).unwrap();
            assert_eq!(part.end, 154, "cut at {cut}");
        }
        // Within a limit, but never less than one event.
        assert_eq!(walk(&file, 4, 120).unwrap().end, 104);
        assert_eq!(walk(&file, 4, 1).unwrap().end, 104);
        // From a later boundary.
        assert_eq!(walk(&file[100..], 104, u64::MAX).unwrap().end, 185);
        // A rotate at the end closes the file.
        file.extend(event(185, ROTATE_EVENT, 40));
        assert!(walk(&file, 4, u64::MAX).unwrap().closes_file());
    }

    #[test]
    fn gtids_follow_the_list_then_each_transaction() {
        let mut list = event(4, GTID_LIST_EVENT, HEADER_LEN + 4 + 32);
        list[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&2u32.to_le_bytes());
        for (index, (domain, server, seq)) in [(0u32, 1u32, 41u64), (3, 2, 7)].iter().enumerate() {
            let at = HEADER_LEN + 4 + index * 16;
            list[at..at + 4].copy_from_slice(&domain.to_le_bytes());
            list[at + 4..at + 8].copy_from_slice(&server.to_le_bytes());
            list[at + 8..at + 16].copy_from_slice(&seq.to_le_bytes());
        }
        let mut gtid = event(4 + list.len() as u64, GTID_EVENT, HEADER_LEN + 13);
        gtid[5..9].copy_from_slice(&1u32.to_le_bytes());
        gtid[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&42u64.to_le_bytes());
        let mut bytes = list;
        bytes.extend(gtid);
        let mut state = GtidState::new();
        track_gtids(&bytes, &mut state);
        assert_eq!(gtid_text(&state), "0-1-42,3-2-7");
    }

    #[test]
    fn bytes_that_are_not_the_servers_file_are_refused() {
        let mut file = event(4, 15, 100);
        // Its end position says 105, the length says 100.
        file[13..17].copy_from_slice(&105u32.to_le_bytes());
        assert!(
            walk(&file, 4, u64::MAX)
                .unwrap_err()
                .contains("ends at 105")
        );
        let mut short = event(4, 15, 100);
        short[9..13].copy_from_slice(&5u32.to_le_bytes());
        assert!(walk(&short, 4, u64::MAX).is_err());
    }
}
