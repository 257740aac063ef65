//! `archive::sqlite_wal` on any bytes as a SQLite WAL file (a log the archiver reads
//! while SQLite writes it, torn or damaged): `WalHeader::parse`, then
//! `committed_frames` from frame 1 chained from the header's checksum, as the archiver
//! reads a cycle from its start.
//!
//! Besides "never panics": the committed bytes are exactly `count` whole frames, the
//! file's own; walking them again with `frame_checksum` from the header's checksum
//! validates every frame and ends at `committed.chain`; the last committed frame is a
//! commit frame (bytes 4..8 non-zero); and `parse_checksum(&checksum_text(c))` gives
//! back `c` for the checksums found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint::archive::sqlite_wal::{
    Checksum, HEADER_SIZE, WalHeader, checksum_text, committed_frames, frame_checksum,
    parse_checksum,
};

fn round_trips(checksum: Checksum) {
    let text = checksum_text(checksum);
    assert_eq!(parse_checksum(&text), Some(checksum), "{text:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some(header) = WalHeader::parse(data) else {
        return;
    };
    round_trips(header.checksum);
    let frames = &data[HEADER_SIZE..];
    let committed = committed_frames(&header, 1, header.checksum, frames);
    let size = header.frame_size();

    assert_eq!(committed.first, 1);
    assert_eq!(committed.bytes.len(), committed.count as usize * size);
    assert_eq!(committed.bytes[..], frames[..committed.bytes.len()]);
    assert_eq!(committed.last(), committed.count);

    let mut chain = header.checksum;
    for (i, frame) in committed.bytes.chunks_exact(size).enumerate() {
        chain = frame_checksum(&header, chain, frame)
            .unwrap_or_else(|| panic!("committed frame {} does not validate", i + 1));
    }
    assert_eq!(chain, committed.chain, "the chain of the committed frames");
    match committed.bytes.rchunks_exact(size).next() {
        Some(last) => assert_ne!(last[4..8], [0; 4], "the last frame is not a commit"),
        None => assert_eq!(committed.chain, header.checksum),
    }
    round_trips(committed.chain);
});
