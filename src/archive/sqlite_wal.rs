//! SQLite's write-ahead log, read from its file: the header, the frames, and the rule
//! SQLite itself uses to tell a valid frame from a stale one (its recovery does the
//! same). Nothing here opens the database; `sqlite.rs` decides what to read and when.
//!
//! A WAL file (<https://www.sqlite.org/fileformat2.html#the_write_ahead_log>) is a
//! 32-byte header and then frames, each a 24-byte header and one page. A frame is
//! valid when its salts equal the header's and its checksum equals the running
//! checksum over every frame before it (seeded by the header's). A *commit* frame
//! carries the database's size in pages after its transaction; the frames after the
//! last valid commit belong to no committed transaction and are never used.
//!
//! Every restart of the log (a checkpoint that got everything into the database and a
//! writer that began again from frame 1) adds one to the header's first salt and draws
//! a new second one: a *cycle* of the log is named by its salts, and a frame by its
//! cycle and index (from 1). (The header's checkpoint sequence is the restarting
//! connection's own count, so several writers write different ones.)

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

pub const HEADER_SIZE: usize = 32;
pub const FRAME_HEADER_SIZE: usize = 24;
const MAGIC_LITTLE: u32 = 0x377f_0682;
const MAGIC_BIG: u32 = 0x377f_0683;
const VERSION: u32 = 3_007_000;

/// A checksum pair, as SQLite keeps it.
pub type Checksum = [u32; 2];

/// The header of a WAL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// The checksums' words are big-endian (magic `0x377f0683`).
    pub big_endian: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salts: [u32; 2],
    /// The header's own checksum: what the first frame's chains from.
    pub checksum: Checksum,
}

impl WalHeader {
    /// The header at the start of `bytes`, if it is one SQLite would accept.
    pub fn parse(bytes: &[u8]) -> Option<WalHeader> {
        let bytes = bytes.get(..HEADER_SIZE)?;
        let magic = be(bytes, 0);
        if magic != MAGIC_LITTLE && magic != MAGIC_BIG {
            return None;
        }
        let big_endian = magic == MAGIC_BIG;
        let page_size = be(bytes, 8);
        let valid_size = page_size.is_power_of_two() && (512..=65_536).contains(&page_size);
        if be(bytes, 4) != VERSION || !valid_size {
            return None;
        }
        let checksum = [be(bytes, 24), be(bytes, 28)];
        if checksum != chain(big_endian, [0, 0], &bytes[..24]) {
            return None;
        }
        Some(WalHeader {
            big_endian,
            page_size,
            checkpoint_seq: be(bytes, 12),
            salts: [be(bytes, 16), be(bytes, 20)],
            checksum,
        })
    }

    /// Bytes of one frame.
    pub fn frame_size(&self) -> usize {
        FRAME_HEADER_SIZE + self.page_size as usize
    }

    /// Where frame `index` (from 1) starts in the file.
    pub fn frame_offset(&self, index: u32) -> u64 {
        HEADER_SIZE as u64 + u64::from(index - 1) * self.frame_size() as u64
    }

    /// Whether two headers name the same cycle of the log.
    pub fn same_cycle(&self, other: &WalHeader) -> bool {
        self.salts == other.salts
    }
}

/// The committed frames found after a given frame: `frames` holds frames `first ..
/// first + count` (whole, headers included), the last of them a commit frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Committed {
    pub first: u32,
    pub count: u32,
    pub bytes: Vec<u8>,
    /// The checksum of the last frame: what the next frame chains from.
    pub chain: Checksum,
}

impl Committed {
    /// The index of the last frame (the commit), or `first - 1` when there is none.
    pub fn last(&self) -> u32 {
        (self.first + self.count).saturating_sub(1)
    }
}

/// The valid frames of `frames` (the bytes of a WAL file from frame `first` on), read
/// while they chain from `chain` and carry `header`'s salts, up to the last commit
/// among them. Anything after that last commit is left out.
pub fn committed_frames(
    header: &WalHeader,
    first: u32,
    previous: Checksum,
    frames: &[u8],
) -> Committed {
    let size = header.frame_size();
    let mut running = previous;
    let mut committed = Committed {
        first,
        count: 0,
        bytes: Vec::new(),
        chain: previous,
    };
    for (i, frame) in frames.chunks_exact(size).enumerate() {
        let Some(next) = frame_checksum(header, running, frame) else {
            break;
        };
        running = next;
        if be(frame, 4) != 0 {
            committed.count = i as u32 + 1;
            committed.chain = running;
        }
    }
    committed.bytes = frames[..committed.count as usize * size].to_vec();
    committed
}

/// The running checksum after `frame`, when it is valid after `chain` in `header`'s
/// cycle.
pub fn frame_checksum(header: &WalHeader, previous: Checksum, frame: &[u8]) -> Option<Checksum> {
    if frame.len() != header.frame_size() || [be(frame, 8), be(frame, 12)] != header.salts {
        return None;
    }
    let running = chain(header.big_endian, previous, &frame[..8]);
    let running = chain(header.big_endian, running, &frame[FRAME_HEADER_SIZE..]);
    (running == [be(frame, 16), be(frame, 20)]).then_some(running)
}

/// A WAL file as it is now: its header, and every committed frame of its cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalNow {
    pub header: WalHeader,
    pub committed: Committed,
}

/// Reads the WAL beside database `db` from frame `from` (1 for all of it), chaining
/// from `chain` (the header's checksum for frame 1). `None` when there is no WAL or
/// its header is not valid (never written, or truncated to nothing).
pub fn read_wal(db: &Path, from: Option<(u32, Checksum)>) -> std::io::Result<Option<WalNow>> {
    let path = wal_path(db);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut head = [0u8; HEADER_SIZE];
    if read_full(&mut file, &mut head)? < HEADER_SIZE {
        return Ok(None);
    }
    let Some(header) = WalHeader::parse(&head) else {
        return Ok(None);
    };
    let (first, chain) = from.unwrap_or((1, header.checksum));
    file.seek(SeekFrom::Start(header.frame_offset(first)))?;
    let mut frames = Vec::new();
    file.read_to_end(&mut frames)?;
    let committed = committed_frames(&header, first, chain, &frames);
    Ok(Some(WalNow { header, committed }))
}

/// `<db>-wal`.
pub fn wal_path(db: &Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

/// Writes `frames` (whole frames of a cycle with `page_size`) into the database file
/// `file`, in order: each page at its place, and the file cut or grown to the size a
/// commit frame gives. Returns the pages the database has after the last commit.
pub fn apply_frames(file: &mut File, page_size: u32, frames: &[u8]) -> std::io::Result<u32> {
    let size = FRAME_HEADER_SIZE + page_size as usize;
    let mut pages = 0;
    for frame in frames.chunks_exact(size) {
        let page = be(frame, 0);
        if page == 0 {
            return Err(std::io::Error::other("a WAL frame names page 0"));
        }
        file.seek(SeekFrom::Start(u64::from(page - 1) * u64::from(page_size)))?;
        file.write_all(&frame[FRAME_HEADER_SIZE..])?;
        let commit = be(frame, 4);
        if commit != 0 {
            file.set_len(u64::from(commit) * u64::from(page_size))?;
            pages = commit;
        }
    }
    Ok(pages)
}

/// SQLite's WAL checksum: over 32-bit words in pairs, in the byte order the magic
/// names.
fn chain(big_endian: bool, start: Checksum, data: &[u8]) -> Checksum {
    let [mut s0, mut s1] = start;
    for pair in data.chunks_exact(8) {
        let word = |at: usize| {
            let bytes = [pair[at], pair[at + 1], pair[at + 2], pair[at + 3]];
            if big_endian {
                u32::from_be_bytes(bytes)
            } else {
                u32::from_le_bytes(bytes)
            }
        };
        s0 = s0.wrapping_add(word(0)).wrapping_add(s1);
        s1 = s1.wrapping_add(word(4)).wrapping_add(s0);
    }
    [s0, s1]
}

fn be(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut read = 0;
    while read < buf.len() {
        match file.read(&mut buf[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(read)
}

/// A checksum as text, `hex:hex` (chunk records and markers carry it).
pub fn checksum_text(checksum: Checksum) -> String {
    format!("{:08x}:{:08x}", checksum[0], checksum[1])
}

pub fn parse_checksum(text: &str) -> Option<Checksum> {
    let (a, b) = text.split_once(':')?;
    Some([
        u32::from_str_radix(a, 16).ok()?,
        u32::from_str_radix(b, 16).ok()?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// A WAL-mode database that never checkpoints on its own, with `rows` rows.
    fn database(dir: &Path, rows: u32) -> (Connection, std::path::PathBuf) {
        let path = dir.join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        for i in 0..rows {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])
                .unwrap();
        }
        (conn, path)
    }

    /// The frames SQLite wrote read back valid, each transaction ending on a commit,
    /// and the chain continued from where a first read stopped.
    #[test]
    fn frames_sqlite_wrote_are_valid_and_the_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, path) = database(dir.path(), 3);
        let all = read_wal(&path, None).unwrap().unwrap();
        assert_eq!(all.committed.first, 1);
        assert!(all.committed.count >= 4, "{:?}", all.committed.count);
        conn.execute("INSERT INTO t (v) VALUES ('more')", [])
            .unwrap();
        let next = read_wal(&path, Some((all.committed.last() + 1, all.committed.chain)))
            .unwrap()
            .unwrap();
        assert_eq!(next.committed.first, all.committed.last() + 1);
        assert!(next.committed.count >= 1);
        let whole = read_wal(&path, None).unwrap().unwrap();
        assert_eq!(whole.committed.last(), next.committed.last());
        assert_eq!(whole.committed.chain, next.committed.chain);
        // Negative control: a wrong chain start makes the first frame invalid.
        let wrong = read_wal(&path, Some((all.committed.last() + 1, [1, 2])))
            .unwrap()
            .unwrap();
        assert_eq!(wrong.committed.count, 0);
    }

    /// Frames after the last commit are never taken, and a damaged frame ends the
    /// valid ones where SQLite's recovery would.
    #[test]
    fn a_damaged_frame_ends_the_valid_frames() {
        let dir = tempfile::tempdir().unwrap();
        let (_conn, path) = database(dir.path(), 5);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let header = WalHeader::parse(&wal).unwrap();
        let whole = committed_frames(&header, 1, header.checksum, &wal[HEADER_SIZE..]);
        let mut damaged = wal.clone();
        let third = header.frame_offset(3) as usize + FRAME_HEADER_SIZE + 100;
        damaged[third] ^= 0xff;
        let cut = committed_frames(&header, 1, header.checksum, &damaged[HEADER_SIZE..]);
        assert!(
            cut.count < 3 && cut.count < whole.count,
            "{} of {}",
            cut.count,
            whole.count
        );
        let mut bad_header = wal.clone();
        bad_header[13] ^= 1;
        assert_eq!(WalHeader::parse(&bad_header), None);
    }

    /// The database file as it was before the WAL, with the committed frames applied,
    /// is the database: the same rows as SQLite reads.
    #[test]
    fn applying_the_frames_to_the_file_gives_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, path) = database(dir.path(), 0);
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        for i in 0..200 {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("{i:0>300}")])
                .unwrap();
        }
        conn.execute("DELETE FROM t WHERE id % 3 = 0", []).unwrap();
        let wal = read_wal(&path, None).unwrap().unwrap();
        let copy = dir.path().join("copy.db");
        std::fs::write(&copy, &before).unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        apply_frames(&mut file, wal.header.page_size, &wal.committed.bytes).unwrap();
        drop(file);
        let restored = Connection::open(&copy).unwrap();
        let count = |c: &Connection| -> (i64, String) {
            c.query_row("SELECT count(*), group_concat(id) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap()
        };
        assert_eq!(count(&restored), count(&conn));
        let check: String = restored
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        // Negative control: without the last transaction (the DELETE), the rows differ.
        let last_commit_start = wal.committed.bytes.len() - wal.header.frame_size();
        let earlier = committed_frames(
            &wal.header,
            1,
            wal.header.checksum,
            &wal.committed.bytes[..last_commit_start],
        );
        std::fs::write(&copy, &before).unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        apply_frames(&mut file, wal.header.page_size, &earlier.bytes).unwrap();
        drop(file);
        let partial = Connection::open(&copy).unwrap();
        assert_ne!(count(&partial), count(&conn));
    }
}
