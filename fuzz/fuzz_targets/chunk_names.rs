//! The archive's name parsers on any text (names listed in a storage, positions in
//! records): `wal::Segment::parse` for every valid segment size (each power of two
//! from 1 MiB to 1 GiB), `wal::is_segment_name`, `wal::parse_partial_chunk_name`,
//! `Lsn::from_str` and `sqlite_wal::parse_checksum`.
//!
//! Besides "never panics", what parses prints back as follows:
//! - a segment name: `Segment::name` prints the input in upper case (the parser takes
//!   either case), and that parses to the same segment; `Segment::parse` accepts only
//!   what `is_segment_name` accepts;
//! - a partial chunk name: `partial_chunk_name` of its parts is exactly the input
//!   (one name per range: offsets in upper case, `<from>-<to>` only when `from > 0`;
//!   the segment part comes back as written), and parses back to the same parts;
//! - an LSN: its `Display` (upper-case hex, no leading zeros) parses back to the same
//!   LSN and is the canonical form: printing that again gives the same text (the input
//!   itself may differ: lower case, leading zeros, a `+`, surrounding blanks);
//! - a checksum: `checksum_text` (8 lower-case hex digits each) parses back to the same
//!   checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint::archive::Lsn;
use stillpoint::archive::sqlite_wal::{checksum_text, parse_checksum};
use stillpoint::archive::wal::{
    Segment, is_segment_name, parse_partial_chunk_name, partial_chunk_name, valid_segment_size,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    let looks_like_segment = is_segment_name(text);
    for shift in 20..=30 {
        let size = 1u64 << shift;
        assert!(valid_segment_size(size));
        if let Some(segment) = Segment::parse(text, size) {
            assert!(looks_like_segment, "{text:?} parsed but is no segment name");
            let printed = segment.name(size);
            assert_eq!(printed, text.to_ascii_uppercase(), "segment size {size}");
            assert_eq!(Segment::parse(&printed, size), Some(segment));
            assert!(segment.start(size) < segment.end(size));
        }
    }

    if let Some((segment, from, to)) = parse_partial_chunk_name(text) {
        assert!(is_segment_name(segment));
        assert!(from < to);
        let printed = partial_chunk_name(segment, from, to);
        assert_eq!(printed, text, "{text:?} prints differently");
        assert_eq!(
            parse_partial_chunk_name(&printed),
            Some((segment, from, to))
        );
    }

    if let Ok(lsn) = text.parse::<Lsn>() {
        let printed = lsn.to_string();
        let again: Lsn = printed
            .parse()
            .unwrap_or_else(|error| panic!("{printed:?} does not parse back: {error}"));
        assert_eq!(again, lsn);
        assert_eq!(again.to_string(), printed);
    }

    if let Some(checksum) = parse_checksum(text) {
        let printed = checksum_text(checksum);
        assert_eq!(parse_checksum(&printed), Some(checksum), "{printed:?}");
    }
});
