//! Unit tests of recovery's own logic: LSNs, quoting for the configuration file and
//! for `sh`, reading restore_command failures out of the server log, and comparing
//! the reached state with the cut. `tests/integration/pitr.rs` runs real recoveries.

use super::*;

#[test]
fn recovery_time_is_utc_with_milliseconds() {
    assert_eq!(
        postgres_time(1_700_000_000_123),
        "2023-11-14 22:13:20.123+00"
    );
}

#[test]
fn lsns_compare_as_numbers() {
    assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
    assert_eq!(parse_lsn("1/0"), Some(1 << 32));
    assert!(parse_lsn("0/A").unwrap() < parse_lsn("0/1A").unwrap());
    assert_eq!(format_lsn(parse_lsn("A/16B3748").unwrap()), "A/16B3748");
    assert_eq!(parse_lsn("16B3748"), None);
}

#[test]
fn configuration_values_are_quoted_for_the_file_parser() {
    assert_eq!(config_quote("plain"), "'plain'");
    assert_eq!(config_quote(r"it's a\b"), r"'it''s a\\b'");
}

/// The restore_command, with %f and %p replaced as PostgreSQL does (%% is a `%`), run
/// by `sh`: it copies the segment from an archive whose path has `'`, `%`, `"` and
/// spaces in it.
#[tokio::test]
async fn restore_command_survives_quotes_and_percent_signs_in_the_archive_path() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join(r#"it's "100%f" $HOME `x`"#);
    std::fs::create_dir(&archive).unwrap();
    std::fs::write(archive.join("000000010000000000000003"), b"segment").unwrap();
    let command = restore_command(&archive);
    let mut expanded = String::new();
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            expanded.push(c);
            continue;
        }
        match chars.next() {
            Some('f') => expanded.push_str("000000010000000000000003"),
            Some('p') => expanded.push_str("pg_wal/RECOVERYXLOG"),
            Some('%') => expanded.push('%'),
            other => panic!("unexpected %{other:?} in {command}"),
        }
    }
    std::fs::create_dir(dir.path().join("pg_wal")).unwrap();
    let status = Command::new("sh")
        .args(["-c", &expanded])
        .current_dir(dir.path())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "{command}");
    assert_eq!(
        std::fs::read(dir.path().join("pg_wal/RECOVERYXLOG")).unwrap(),
        b"segment"
    );
}

#[test]
fn failed_segments_are_read_from_cp_messages() {
    let log = "\
2026-01-01 LOG:  starting point-in-time recovery\n\
cp: cannot stat '/arch/it''s/000000010000000000000004': No such file or directory\n\
cp: cannot open '/arch/000000010000000000000005' for reading: Permission denied\n\
cp: cannot stat '/arch/00000002.history': No such file or directory\n\
2026-01-01 FATAL:  recovery ended before configured recovery target was reached\n";
    assert_eq!(
        failed_segments(log),
        vec![
            ("000000010000000000000004".to_owned(), false),
            ("000000010000000000000005".to_owned(), true),
        ]
    );
}

fn explain_with(archive: &Path, log: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    std::fs::write(&log_path, log).unwrap();
    Explain {
        log_path: &log_path,
        kept: false,
        port: 5999,
        archive,
        run_as: Some("postgres"),
    }
    .archive_ended(log)
}

/// A missing segment with later ones in the archive is a gap; with none after it, the
/// archive has not caught up yet; an unreadable one is a permission problem.
#[test]
fn a_gap_is_told_apart_from_an_archive_that_has_not_caught_up() {
    let archive = tempfile::tempdir().unwrap();
    for name in ["000000010000000000000003", "000000010000000000000006"] {
        std::fs::write(archive.path().join(name), b"").unwrap();
    }
    let missing = |segment: &str| {
        format!(
            "cp: cannot stat '{}/{segment}': No such file or directory\n",
            archive.path().display()
        )
    };
    let gap = explain_with(archive.path(), &missing("000000010000000000000004"));
    assert!(
        gap.contains("gap") && gap.contains("000000010000000000000004"),
        "{gap}"
    );
    assert!(!gap.contains("not been archived"), "{gap}");
    let behind = explain_with(archive.path(), &missing("000000010000000000000007"));
    assert!(behind.contains("has not been archived yet"), "{behind}");
    // Another timeline's later segment does not make a gap on this one.
    let other_timeline = explain_with(archive.path(), &missing("000000000000000000000007"));
    assert!(other_timeline.contains("has not been archived yet"));
    let denied = explain_with(
        archive.path(),
        &format!(
            "cp: cannot open '{}/000000010000000000000006' for reading: Permission denied\n",
            archive.path().display()
        ),
    );
    assert!(
        denied.contains("permission denied") && denied.contains("the user postgres"),
        "{denied}"
    );
}

#[test]
fn a_timeout_carries_the_log_tail_and_names_the_file_only_when_kept() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    std::fs::write(
        &log_path,
        "LOG:  starting point-in-time recovery\n\
         FATAL:  the database system is starting up\n\
         LOG:  restored log file \"000000010000000000000003\" from archive\n",
    )
    .unwrap();
    let explain = |kept| Explain {
        log_path: &log_path,
        kept,
        port: 5999,
        archive: dir.path(),
        run_as: None,
    };
    let gone = explain(false).log_tail();
    assert!(gone.contains("restored log file"), "{gone}");
    assert!(!gone.contains("starting up"), "our probes' noise: {gone}");
    assert!(!gone.contains(&log_path.display().to_string()), "{gone}");
    assert!(
        explain(true)
            .log_tail()
            .contains(&log_path.display().to_string())
    );
}

fn content(tables: &[(&str, u64)]) -> BTreeMap<String, u64> {
    tables
        .iter()
        .map(|(name, rows)| ((*name).to_owned(), *rows))
        .collect()
}

/// The reached state must have exactly the cut's rows per table; the negative
/// controls: one row more, a table missing, a table the cut did not have.
#[test]
fn the_reached_state_is_compared_with_the_cut() {
    let cut = BTreeMap::from([("public.items".to_owned(), 20), ("public.t".to_owned(), 0)]);
    assert!(compare_with_cut(&content(&[("public.items", 20), ("public.t", 0)]), &cut).is_ok());
    let more = compare_with_cut(&content(&[("public.items", 21), ("public.t", 0)]), &cut);
    assert!(
        more.unwrap_err()
            .contains("public.items has 21 rows, the cut had 20")
    );
    assert!(compare_with_cut(&content(&[("public.items", 20)]), &cut).is_err());
    let extra = content(&[("public.items", 20), ("public.t", 0), ("public.new", 1)]);
    assert!(compare_with_cut(&extra, &cut).is_err());
}

#[test]
fn the_scratch_configuration_file_parses_back_and_keeps_the_source_apart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("da'ta");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::write(data_dir.join("PG_VERSION"), "15\n").unwrap();
    let config = PostgresConfig {
        url: "postgres://app@db/ledger".to_owned(),
        require_archiving: false,
        bin_dir: None,
        drill_server_url: None,
    };
    let entry = DatabaseEntry {
        name: "app".to_owned(),
        role: None,
        adapter: "postgres".to_owned(),
        cut: crate::adapters::CutMarker {
            kind: "postgres-snapshot".to_owned(),
            details: BTreeMap::new(),
        },
        artifact: None,
        row_counts: None,
    };
    let request = Recovery {
        config: &config,
        entry: &entry,
        base_backup: BaseBackup::Dir(dir.path()),
        wal_archive: WalArchive::Dir(dir.path()),
        data_dir: &data_dir,
        target: Target::Lsn("0/3000000".to_owned()),
        port: 6543,
        timeout: Duration::from_secs(1),
        keep: false,
        keep_unfinished: false,
        run_as: None,
        content_hash: true,
    };
    let scratch = ScratchConfig::new(&request, &data_dir);
    scratch.write().unwrap();
    let text = std::fs::read_to_string(data_dir.join(CONFIG_FILE)).unwrap();
    assert!(text.starts_with("# Written by stillpoint"), "{text}");
    assert!(text.contains("include_if_exists = 'postgresql.conf'"));
    assert!(text.contains("archive_mode = 'off'"));
    assert!(text.contains(&format!(
        "unix_socket_directories = '\"{}\"'",
        data_dir.display().to_string().replace('\'', "''")
    )));
    let hba = std::fs::read_to_string(data_dir.join(HBA_FILE)).unwrap();
    assert_eq!(
        hba.lines()
            .filter(|line| !line.starts_with('#'))
            .collect::<Vec<_>>(),
        ["local all all trust"]
    );
    let args = scratch.args(&request, &restore_command(dir.path()));
    assert!(args.contains(&"archive_mode=off".to_owned()));
    assert!(args.contains(&"recovery_target_lsn=0/3000000".to_owned()));
    assert!(args.contains(&format!(
        "config_file={}",
        data_dir.join(CONFIG_FILE).display()
    )));
}

/// Two recoveries cannot claim one scratch directory: the second is refused while the
/// first holds it, even while it is still empty (before either copied anything).
#[test]
fn a_scratch_directory_is_claimed_by_one_recovery_at_a_time() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("scratch");
    let first = ClaimedDir::claim(&dir, false).unwrap();
    let error = ClaimedDir::claim(&dir, false).err().unwrap().to_string();
    assert!(error.contains("in use by another"), "{error}");
    drop(first);
    assert!(
        !dir.exists(),
        "the directory the first claim made was not removed"
    );
    // Once released, it can be claimed again.
    let again = ClaimedDir::claim(&dir, true).unwrap();
    drop(again);
    assert!(dir.is_dir(), "a kept directory was removed");
}

/// A claim makes missing parents (as pg_basebackup and `mkdir -p` do) and refuses a
/// path that is a file.
#[test]
fn a_claim_makes_missing_parents_and_refuses_a_file() {
    let parent = tempfile::tempdir().unwrap();
    let nested = parent.path().join("a").join("b").join("scratch");
    let claim = ClaimedDir::claim(&nested, false).unwrap();
    assert!(nested.is_dir());
    drop(claim);
    assert!(!nested.exists() && parent.path().join("a").join("b").is_dir());

    let file = parent.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let error = ClaimedDir::claim(&file, false).err().unwrap().to_string();
    assert!(error.contains("is not a directory"), "{error}");
    assert!(file.is_file(), "the file was removed");
}
