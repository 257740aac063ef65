//! Unit tests of the archive core against `file://` storage: a chunk is listed only
//! once its record is written, pushes are idempotent by plaintext, a conflicting push
//! names both versions, and the catalog orders chunks, sets superseded partials
//! aside and names gaps by the positions on each side. `tests/integration/archive.rs`
//! archives a real server.

use super::*;
use crate::pipeline::Encryption;

const SEGMENT: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    storage: Storage,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
    Fixture { _dir: dir, storage }
}

/// Compressed and encrypted, as a real runbook would have it: age output differs on
/// every push, which is what makes idempotence compare plaintext.
fn settings() -> PipelineSettings {
    PipelineSettings {
        zstd_level: Some(3),
        encryption: Encryption::Recipients(vec![
            age::x25519::Identity::generate().to_public().to_string(),
        ]),
    }
}

fn lsn(value: u64) -> Position {
    Position::Lsn(Lsn(value))
}

/// Segment `number` of timeline 1, 1 MiB segments.
fn segment(number: u64) -> NewChunk {
    let segment = wal::Segment {
        timeline: 1,
        number,
    };
    NewChunk {
        name: segment.name(SEGMENT),
        kind: ChunkKind::PgWalSegment,
        timeline: Some(1),
        start: Some(lsn(number * SEGMENT)),
        end: Some(lsn((number + 1) * SEGMENT)),
        segment_size: Some(SEGMENT),
        details: BTreeMap::new(),
    }
}

fn partial(number: u64, covered: u64) -> NewChunk {
    piece(number, 0, covered)
}

/// The bytes `[from, to)` of segment `number`, as a partial chunk.
fn piece(number: u64, from: u64, to: u64) -> NewChunk {
    let whole = segment(number);
    NewChunk {
        name: wal::partial_chunk_name(&whole.name, from, to),
        kind: ChunkKind::PgWalPartial,
        start: Some(lsn(number * SEGMENT + from)),
        end: Some(lsn(number * SEGMENT + to)),
        ..whole
    }
}

fn bytes(seed: u8, len: usize) -> ChunkContent {
    ChunkContent::Bytes(Bytes::from(vec![seed; len]))
}

#[tokio::test]
async fn a_chunk_is_listed_only_once_its_record_is_written() {
    let fixture = fixture();
    let archive = Archive::new(fixture.storage.clone(), settings(), "app").unwrap();
    let pushed = archive.push(segment(3), bytes(7, 1000)).await.unwrap();
    let PushOutcome::Stored(record) = pushed else {
        panic!("a new chunk is stored: {pushed:?}");
    };
    assert_eq!(
        archive.catalog().await.unwrap().chunks,
        vec![record.clone()]
    );

    // An artifact stored whole but without its record (a push killed between the
    // two) is not a chunk: nothing lists it, and it is found as unrecorded.
    let orphan = format!(
        "{}/{}.deadbeef0000.zst.age",
        archive.prefix(),
        segment(4).name
    );
    fixture
        .storage
        .put_atomic(&orphan, Bytes::from_static(b"whole, but unrecorded"))
        .await
        .unwrap();
    let catalog = archive.catalog().await.unwrap();
    assert_eq!(catalog.chunks.len(), 1, "{catalog:#?}");
    assert_eq!(catalog.chunks[0].name, record.name);
    assert_eq!(archive.record(&segment(4).name).await.unwrap(), None);
    assert_eq!(archive.unrecorded_artifacts().await.unwrap(), vec![orphan]);

    // The record names the stored artifact and both hashes; the plaintext reads back.
    assert_eq!(record.size, 1000);
    assert_eq!(
        record.plaintext_blake3,
        blake3::hash(&[7u8; 1000]).to_hex().to_string()
    );
    assert_ne!(record.artifact.blake3, record.plaintext_blake3);
    assert!(record.artifact.path.ends_with(".zst.age"), "{record:?}");
    let decryption = Decryption::None;
    // Encrypted: without the identity it cannot be read, which proves it is.
    assert!(archive.read(&record, &decryption).await.is_err());
}

#[tokio::test]
async fn pushing_the_same_chunk_twice_is_a_no_op() {
    let fixture = fixture();
    let identity = age::x25519::Identity::generate();
    let settings = PipelineSettings {
        zstd_level: Some(3),
        encryption: Encryption::Recipients(vec![identity.to_public().to_string()]),
    };
    let archive = Archive::new(fixture.storage.clone(), settings, "app").unwrap();
    let first = archive.push(segment(3), bytes(1, 4096)).await.unwrap();
    let objects_after_first = fixture.storage.list("archive").await.unwrap().len();
    let second = archive.push(segment(3), bytes(1, 4096)).await.unwrap();
    assert_eq!(second, PushOutcome::AlreadyArchived(first.record().clone()));
    assert_eq!(
        fixture.storage.list("archive").await.unwrap().len(),
        objects_after_first,
        "a repeated push wrote nothing"
    );
    // And the chunk reads back with the identity.
    let decryption = Decryption::Identities(vec![
        age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_owned(),
    ]);
    let read = archive.read(first.record(), &decryption).await.unwrap();
    assert_eq!(read, vec![1u8; 4096]);
}

#[tokio::test]
async fn the_same_name_with_other_content_is_refused_naming_both() {
    let fixture = fixture();
    let archive = Archive::new(fixture.storage.clone(), settings(), "app").unwrap();
    let first = archive.push(segment(3), bytes(1, 4096)).await.unwrap();
    let error = archive
        .push(segment(3), bytes(2, 4000))
        .await
        .expect_err("other content under an archived name must be refused");
    let text = error.to_string();
    let other = blake3::hash(&[2u8; 4000]).to_hex().to_string();
    for needle in [
        "000000010000000000000003",
        "4096 bytes",
        first.record().plaintext_blake3.as_str(),
        "4000 bytes",
        other.as_str(),
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    assert!(matches!(error, ArchiveError::Conflict { .. }));
    // The archived chunk is untouched.
    assert_eq!(
        archive.record("000000010000000000000003").await.unwrap(),
        Some(first.record().clone())
    );
}

/// A growing segment archived as pieces reads back as one segment (each piece at
/// its place, zeros after the last); a chunk of the segment's beginning that reaches
/// further holds them all, and is what replaces one removed under a reader.
#[tokio::test]
async fn pieces_of_a_growing_segment_chain_and_read_back_as_one_segment() {
    let fixture = fixture();
    let archive =
        Archive::new(fixture.storage.clone(), PipelineSettings::default(), "app").unwrap();
    let name = segment(5).name;
    let mut pieces = Vec::new();
    for (chunk, content) in [
        (segment(4), bytes(4, SEGMENT as usize)),
        (piece(5, 0, 100), bytes(1, 100)),
        (piece(5, 100, 250), bytes(2, 150)),
        (piece(5, 250, 260), bytes(3, 10)),
    ] {
        pieces.push(archive.push(chunk, content).await.unwrap().record().clone());
    }
    let catalog = archive.catalog().await.unwrap();
    assert!(catalog.gaps().is_empty(), "{:?}", catalog.gaps());
    assert!(catalog.superseded.is_empty(), "{:?}", catalog.superseded);
    catalog
        .covers(&lsn(4 * SEGMENT), &lsn(5 * SEGMENT + 260))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join(&name);
    let fetched = postgres::wal_fetch(&archive, &Decryption::None, &name, &dest)
        .await
        .unwrap();
    assert_eq!(fetched, postgres::Fetched::Partial(pieces[1..].to_vec()));
    let mut expected = vec![1u8; 100];
    expected.extend([2u8; 150]);
    expected.extend([3u8; 10]);
    expected.resize(SEGMENT as usize, 0);
    assert!(
        std::fs::read(&dest).unwrap() == expected,
        "pieces at their places, then zeros"
    );

    // A piece that does not continue the others is not served past the gap.
    archive
        .push(piece(5, 300, 400), bytes(9, 100))
        .await
        .unwrap();
    postgres::wal_fetch(&archive, &Decryption::None, &name, &dest)
        .await
        .unwrap();
    assert!(
        std::fs::read(&dest).unwrap() == expected,
        "nothing after the gap"
    );

    // The beginning up to 400 holds every piece: the catalog sets them aside, and a
    // reader of a removed piece is pointed to it.
    let beginning = archive
        .push(piece(5, 0, 400), bytes(7, 400))
        .await
        .unwrap()
        .record()
        .clone();
    let catalog = archive.catalog().await.unwrap();
    assert_eq!(catalog.chunks.last(), Some(&beginning));
    assert_eq!(catalog.superseded.len(), 4, "{:?}", catalog.superseded);
    archive.remove(&pieces[2]).await.unwrap();
    assert_eq!(
        postgres::superseding(&archive, &pieces[2]).await,
        Some(beginning)
    );
}

#[tokio::test]
async fn the_catalog_orders_chunks_and_sets_superseded_partials_aside() {
    let fixture = fixture();
    let archive =
        Archive::new(fixture.storage.clone(), PipelineSettings::default(), "app").unwrap();
    // Pushed out of order; segment 4 also has two partials, segment 5 only partials.
    for (chunk, content) in [
        (segment(4), bytes(4, 10)),
        (partial(4, 100), bytes(4, 100)),
        (segment(2), bytes(2, 10)),
        (partial(5, 300), bytes(5, 300)),
        (segment(3), bytes(3, 10)),
        (partial(5, 200), bytes(5, 200)),
    ] {
        archive.push(chunk, content).await.unwrap();
    }
    let catalog = archive.catalog().await.unwrap();
    let names: Vec<&str> = catalog.chunks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005.0000012C.partial",
        ]
    );
    let mut superseded: Vec<&str> = catalog.superseded.iter().map(|c| c.name.as_str()).collect();
    superseded.sort();
    assert_eq!(
        superseded,
        [
            "000000010000000000000004.00000064.partial",
            "000000010000000000000005.000000C8.partial",
        ]
    );
    assert_eq!(
        catalog.coverage(),
        Some(Coverage {
            from: lsn(2 * SEGMENT),
            to: lsn(5 * SEGMENT + 300),
        })
    );
    assert!(catalog.gaps().is_empty());
    catalog
        .covers(&lsn(2 * SEGMENT + 5), &lsn(5 * SEGMENT + 300))
        .unwrap();
    // Not yet reached: the archive ends 1 byte short.
    let short = catalog
        .covers(&lsn(2 * SEGMENT), &lsn(5 * SEGMENT + 301))
        .unwrap_err();
    assert!(
        matches!(&short, NotReached::EndsBefore { end, .. } if *end == lsn(5 * SEGMENT + 300)),
        "{short}"
    );
    // Before the first chunk: never archived.
    let early = catalog
        .covers(&lsn(SEGMENT), &lsn(3 * SEGMENT))
        .unwrap_err();
    assert!(matches!(early, NotReached::StartsAfter { .. }), "{early}");
}

#[tokio::test]
async fn a_gap_is_named_with_the_positions_on_each_side() {
    let fixture = fixture();
    let archive =
        Archive::new(fixture.storage.clone(), PipelineSettings::default(), "app").unwrap();
    for number in [2, 3, 4, 5] {
        archive.push(segment(number), bytes(1, 10)).await.unwrap();
    }
    let catalog = archive.catalog().await.unwrap();
    assert!(catalog.gaps().is_empty());
    catalog
        .covers(&lsn(2 * SEGMENT), &lsn(6 * SEGMENT))
        .unwrap();

    // Negative control: the same archive with segments 3 and 4 gone.
    for number in [3, 4] {
        let record = archive
            .record(&segment(number).name)
            .await
            .unwrap()
            .unwrap();
        archive.remove(&record).await.unwrap();
    }
    let catalog = archive.catalog().await.unwrap();
    let gaps = catalog.gaps();
    assert_eq!(
        gaps,
        vec![Gap {
            database: "app".to_owned(),
            after: "000000010000000000000002".to_owned(),
            from: lsn(3 * SEGMENT),
            before: "000000010000000000000005".to_owned(),
            to: lsn(5 * SEGMENT),
        }]
    );
    let text = gaps[0].to_string();
    assert!(
        text.contains("0/300000 (the end of 000000010000000000000002)")
            && text.contains("0/500000 (the start of 000000010000000000000005)"),
        "{text}"
    );
    let error = catalog
        .covers(&lsn(2 * SEGMENT), &lsn(6 * SEGMENT))
        .unwrap_err();
    assert_eq!(error, NotReached::Gap(gaps[0].clone()));
    // A range that does not cross the gap is still covered.
    catalog
        .covers(&lsn(5 * SEGMENT), &lsn(6 * SEGMENT))
        .unwrap();
}

#[tokio::test]
async fn names_that_are_not_plain_are_refused() {
    let fixture = fixture();
    for bad in ["", "../x", "a/b", ".hidden"] {
        assert!(
            Archive::new(fixture.storage.clone(), PipelineSettings::default(), bad).is_err(),
            "{bad:?}"
        );
    }
    let archive =
        Archive::new(fixture.storage.clone(), PipelineSettings::default(), "app").unwrap();
    let mut chunk = segment(1);
    chunk.name = "x.json".to_owned();
    assert!(matches!(
        archive.push(chunk, bytes(1, 1)).await,
        Err(ArchiveError::InvalidName(_))
    ));
}

#[test]
fn lsns_print_and_parse_as_postgres_does() {
    assert_eq!(Lsn((1 << 32) | 0x16B_3748).to_string(), "1/16B3748");
    assert_eq!("0/16B3748".parse::<Lsn>(), Ok(Lsn(0x16B3748)));
    assert!("16B3748".parse::<Lsn>().is_err());
    let json = serde_json::to_string(&Position::Lsn(Lsn(0x3000000))).unwrap();
    assert_eq!(json, r#"{"lsn":"0/3000000"}"#);
}

/// A binlog chunk of `file` holding bytes `[start, end_in_file)`, ending at `end`.
fn binlog_chunk(file: &str, start: u64, end_in_file: u64, end: Position) -> NewChunk {
    NewChunk {
        name: binlog::chunk_name(file, start, end_in_file),
        kind: ChunkKind::MariadbBinlog,
        timeline: None,
        start: Some(Position::binlog(file, start)),
        end: Some(end),
        segment_size: None,
        details: BTreeMap::new(),
    }
}

/// Binlog chunks are ordered by the file's number (past six digits too), a file
/// closed by a ROTATE ends where the next file's first chunk starts, and a file
/// whose end is not known closed leaves a gap, named, until its end chunk says so.
#[tokio::test]
async fn binlog_files_follow_each_other_only_when_the_first_is_closed() {
    let fixture = fixture();
    let archive =
        Archive::new(fixture.storage.clone(), PipelineSettings::default(), "app").unwrap();
    let at = Position::binlog;
    for chunk in [
        binlog_chunk("binlog.999999", 4, 500, at("binlog.999999", 500)),
        // Its last event is the ROTATE: it ends at the next file's start.
        binlog_chunk("binlog.999999", 500, 900, at("binlog.1000000", 4)),
        binlog_chunk("binlog.1000000", 4, 300, at("binlog.1000000", 300)),
        // The server crashed: binlog.1000001 follows, but nothing closed 1000000.
        binlog_chunk("binlog.1000001", 4, 200, at("binlog.1000001", 200)),
    ] {
        archive.push(chunk, bytes(1, 10)).await.unwrap();
    }
    let catalog = archive.catalog().await.unwrap();
    let names: Vec<&str> = catalog.chunks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "binlog.999999.000000000004-0000000001F4",
            "binlog.999999.0000000001F4-000000000384",
            "binlog.1000000.000000000004-00000000012C",
            "binlog.1000001.000000000004-0000000000C8",
        ]
    );
    catalog
        .covers(&at("binlog.999999", 4), &at("binlog.1000000", 300))
        .unwrap();
    let gaps = catalog.gaps();
    assert_eq!(
        gaps,
        vec![Gap {
            database: "app".to_owned(),
            after: "binlog.1000000.000000000004-00000000012C".to_owned(),
            from: at("binlog.1000000", 300),
            before: "binlog.1000001.000000000004-0000000000C8".to_owned(),
            to: at("binlog.1000001", 4),
        }]
    );
    assert!(
        gaps[0].to_string().contains("binlog.1000000:300"),
        "{}",
        gaps[0]
    );
    assert!(matches!(
        catalog.covers(&at("binlog.999999", 4), &at("binlog.1000001", 100)),
        Err(NotReached::Gap(_))
    ));

    // The end chunk (empty) closes the file: one continuous log.
    let mut end = binlog_chunk("binlog.1000000", 300, 300, at("binlog.1000001", 4));
    end.name = binlog::end_chunk_name("binlog.1000000", 300);
    archive
        .push(end, ChunkContent::Bytes(Bytes::new()))
        .await
        .unwrap();
    let catalog = archive.catalog().await.unwrap();
    assert!(catalog.gaps().is_empty(), "{:?}", catalog.gaps());
    assert!(catalog.superseded.is_empty());
    catalog
        .covers(&at("binlog.999999", 4), &at("binlog.1000001", 200))
        .unwrap();
    assert_eq!(catalog.coverage().unwrap().to, at("binlog.1000001", 200));
    let json = serde_json::to_string(&at("binlog.000003", 4)).unwrap();
    assert_eq!(json, r#"{"binlog":{"file":"binlog.000003","offset":4}}"#);
}

/// A catalog read while an archiver pushes chunk after chunk never shows a gap: a
/// directory listing can miss a record stored just before one it shows (the newest
/// chunk then seems to follow a hole), so a gap is confirmed by a second listing.
/// Before that, this saw phantom gaps within a few hundred pushes on ext4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_read_during_pushes_shows_no_phantom_gap() {
    let f = fixture();
    let archive =
        Arc::new(Archive::new(f.storage.clone(), PipelineSettings::default(), "app").unwrap());
    let pusher = {
        let archive = archive.clone();
        tokio::spawn(async move {
            for number in 0..600 {
                archive
                    .push(segment(number), bytes(number as u8, 64))
                    .await
                    .unwrap();
            }
        })
    };
    let mut reads = 0;
    while !pusher.is_finished() {
        let catalog = archive.catalog().await.unwrap();
        assert!(
            catalog.gaps().is_empty(),
            "read {reads}: {:?}",
            catalog.gaps()
        );
        reads += 1;
    }
    pusher.await.unwrap();
    assert!(
        reads > 10,
        "the catalog was read only {reads} times during the pushes"
    );
}

/// A catalog read again fetches only the records it has not read (the others are
/// taken as read, by path, size and time), and still sees records removed or written
/// again.
#[tokio::test]
async fn a_catalog_read_again_fetches_only_new_records() {
    let fixture = fixture();
    let dir = fixture.storage.to_string().replacen("file://", "", 1);
    let archive = Archive::new(fixture.storage.clone(), settings(), "app").unwrap();
    for number in 1..=3 {
        archive.push(segment(number), bytes(1, 100)).await.unwrap();
    }
    let names = |catalog: Catalog| -> Vec<String> {
        catalog.chunks.into_iter().map(|chunk| chunk.name).collect()
    };
    assert_eq!(names(archive.catalog().await.unwrap()).len(), 3);

    // Segment 1's record damaged in place with its size and time kept: it is not
    // read again. The same damage with a new time is.
    let first = std::path::Path::new(&dir).join(archive.record_path(&segment(1).name));
    let modified = std::fs::metadata(&first).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&first).unwrap();
    std::fs::write(&first, text.replacen("{", "[", 1)).unwrap();
    let file = std::fs::File::options().write(true).open(&first).unwrap();
    file.set_modified(modified).unwrap();
    let catalog = archive.catalog().await.unwrap();
    assert!(catalog.unreadable.is_empty(), "{catalog:#?}");
    assert_eq!(names(catalog).len(), 3);
    file.set_modified(modified + std::time::Duration::from_secs(1))
        .unwrap();
    let catalog = archive.catalog().await.unwrap();
    assert_eq!(catalog.unreadable.len(), 1, "{catalog:#?}");
    assert_eq!(names(catalog), [segment(2).name, segment(3).name]);

    // A removed record is gone from the next read.
    let third = archive.record_path(&segment(3).name);
    fixture.storage.delete(&third).await.unwrap();
    assert_eq!(names(archive.catalog().await.unwrap()), [segment(2).name]);
}

/// A catalog read from a binlog position lists only the chunks of that file and
/// later ones, and still sees a gap among them.
#[tokio::test]
async fn a_binlog_catalog_from_a_position_lists_from_its_file() {
    let fixture = fixture();
    let archive =
        Archive::new(fixture.storage.clone(), PipelineSettings::default(), "app").unwrap();
    let at = Position::binlog;
    let chunks = [
        binlog_chunk("binlog.000001", 4, 500, at("binlog.000002", 4)),
        binlog_chunk("binlog.000002", 4, 300, at("binlog.000002", 300)),
        binlog_chunk("binlog.000002", 300, 700, at("binlog.000002", 700)),
        binlog_chunk("binlog.000002", 700, 900, at("binlog.000002", 900)),
    ];
    for chunk in chunks.clone() {
        archive.push(chunk, bytes(1, 10)).await.unwrap();
    }
    let from = at("binlog.000002", 4);
    let catalog = archive.catalog_from(&from).await.unwrap();
    let names: Vec<&str> = catalog.chunks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [&chunks[1].name, &chunks[2].name, &chunks[3].name]);
    catalog.covers(&from, &at("binlog.000002", 900)).unwrap();

    let middle = archive.record_path(&chunks[2].name);
    fixture.storage.delete(&middle).await.unwrap();
    let catalog = archive.catalog_from(&from).await.unwrap();
    assert!(matches!(
        catalog.covers(&from, &at("binlog.000002", 900)),
        Err(NotReached::Gap(_))
    ));
    // The records before the file, not listed then, are still known to a whole read.
    assert_eq!(archive.catalog().await.unwrap().chunks.len(), 3);
}
