//! PostgreSQL WAL file names and the LSN ranges they hold. A segment file is named
//! `TTTTTTTTXXXXXXXXYYYYYYYY`: the timeline, then the segment number split into the
//! "log id" and the segment within it, each 8 hex digits. How many segments one log
//! id holds depends on the server's segment size (`wal_segment_size`, 16 MiB unless
//! initdb was told otherwise), so every conversion takes it.

use super::Lsn;

/// A WAL segment: timeline and segment number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub timeline: u32,
    pub number: u64,
}

/// Whether `size` is a segment size PostgreSQL allows: a power of two from 1 MiB to
/// 1 GiB.
pub fn valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&size)
}

fn segments_per_log_id(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

impl Segment {
    /// The segment holding `lsn` (a position exactly on a boundary starts the next
    /// segment, unlike `pg_walfile_name`, which names the one before).
    pub fn containing(timeline: u32, lsn: Lsn, segment_size: u64) -> Segment {
        Segment {
            timeline,
            number: lsn.0 / segment_size,
        }
    }

    /// Parses a segment file name (24 hex digits, nothing else).
    pub fn parse(name: &str, segment_size: u64) -> Option<Segment> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let timeline = u32::from_str_radix(&name[..8], 16).ok()?;
        let log_id = u64::from_str_radix(&name[8..16], 16).ok()?;
        let within = u64::from_str_radix(&name[16..], 16).ok()?;
        if within >= segments_per_log_id(segment_size) {
            return None;
        }
        Some(Segment {
            timeline,
            number: log_id * segments_per_log_id(segment_size) + within,
        })
    }

    pub fn name(&self, segment_size: u64) -> String {
        let per = segments_per_log_id(segment_size);
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.number / per,
            self.number % per
        )
    }

    pub fn start(&self, segment_size: u64) -> Lsn {
        Lsn(self.number * segment_size)
    }

    pub fn end(&self, segment_size: u64) -> Lsn {
        Lsn((self.number + 1) * segment_size)
    }
}

/// Whether `name` looks like a WAL segment file name (24 hex digits).
pub fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The chunk name of the bytes `[from, to)` of a segment still being written (offsets
/// within the segment): `<segment>.<to>.partial` when it holds the segment's
/// beginning, `<segment>.<from>-<to>.partial` for a later piece (each offset 8 hex
/// digits). The range in the name makes every piece a chunk of its own (same name,
/// same content).
pub fn partial_chunk_name(segment: &str, from: u64, to: u64) -> String {
    if from == 0 {
        format!("{segment}.{to:08X}.partial")
    } else {
        format!("{segment}.{from:08X}-{to:08X}.partial")
    }
}

/// The segment a partial chunk name belongs to, and the offsets `[from, to)` it holds.
/// Only names as [`partial_chunk_name`] writes them: upper-case offsets, and the
/// `<from>-<to>` form only for a piece that starts after the beginning. A range has
/// one name, so no two chunks hold the same bytes under different names (a fuzzer
/// found `<segment>.00000000-<to>.partial` accepted beside `<segment>.<to>.partial`).
pub fn parse_partial_chunk_name(name: &str) -> Option<(&str, u64, u64)> {
    let rest = name.strip_suffix(".partial")?;
    let (segment, range) = rest.split_once('.')?;
    if !is_segment_name(segment) {
        return None;
    }
    let offset = |hex: &str| {
        (hex.len() == 8 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')))
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
    };
    let (from, to) = match range.split_once('-') {
        Some((from, to)) => (offset(from).filter(|&from| from > 0)?, offset(to)?),
        None => (0, offset(range)?),
    };
    (from < to).then_some((segment, from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB16: u64 = 16 << 20;

    #[test]
    fn names_round_trip_and_match_postgres() {
        // pg_walfile_name('0/3000060') on timeline 1 with 16 MiB segments.
        let segment = Segment::containing(1, "0/3000060".parse().unwrap(), MIB16);
        assert_eq!(segment.name(MIB16), "000000010000000000000003");
        assert_eq!(
            Segment::parse("000000010000000000000003", MIB16),
            Some(segment)
        );
        // 256 segments of 16 MiB per log id: 1/0 is log id 1, segment 0.
        let high = Segment::containing(2, "1/0".parse().unwrap(), MIB16);
        assert_eq!(high.name(MIB16), "000000020000000100000000");
        assert_eq!(high.start(MIB16).to_string(), "1/0");
        assert_eq!(segment.end(MIB16).to_string(), "0/4000000");
        // Not a segment of a 16 MiB server: only 0x00..0xFF exist per log id.
        assert_eq!(Segment::parse("000000010000000000000100", MIB16), None);
        assert_eq!(Segment::parse("00000002.history", MIB16), None);
    }

    #[test]
    fn partial_names_carry_their_range() {
        let segment = "000000010000000000000003";
        let beginning = partial_chunk_name(segment, 0, 0x2A_1B2C);
        assert_eq!(beginning, "000000010000000000000003.002A1B2C.partial");
        assert_eq!(
            parse_partial_chunk_name(&beginning),
            Some((segment, 0, 0x2A_1B2C))
        );
        let piece = partial_chunk_name(segment, 0x2A_1B2C, 0x2B_0000);
        assert_eq!(piece, "000000010000000000000003.002A1B2C-002B0000.partial");
        assert_eq!(
            parse_partial_chunk_name(&piece),
            Some((segment, 0x2A_1B2C, 0x2B_0000))
        );
        for wrong in [
            "000000010000000000000003.partial",
            "000000010000000000000003.002B0000-002A1B2C.partial",
            "000000010000000000000003.00000000.partial",
            "000000010000000000000003.2A1B2C.partial",
            "000000010000000000000003.+02A1B2C.partial",
            // Another name for a range that has one (found by the chunk_names fuzz
            // target): the beginning's piece written as a range, lower-case offsets.
            "000000010000000000000301.00000000-002A1B2C.partial",
            "000000010000000000000003.002a1b2c.partial",
            "000000010000000000000003.002A1B2C-002b0000.partial",
        ] {
            assert_eq!(parse_partial_chunk_name(wrong), None, "{wrong}");
        }
    }

    #[test]
    fn segment_sizes_are_powers_of_two_in_range() {
        assert!(valid_segment_size(MIB16));
        assert!(valid_segment_size(1 << 20));
        assert!(!valid_segment_size(3 << 20));
        assert!(!valid_segment_size(1 << 31));
    }
}
