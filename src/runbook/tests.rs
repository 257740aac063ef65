//! Runbook parsing: the documented example parses, and every kind of mistake is
//! refused with a message naming the key or value.

use std::path::Path;
use std::time::Duration;

use super::Runbook;
use crate::adapters::AdapterConfig;

const EXAMPLE: &str = include_str!("../../docs/runbook.example.toml");

fn parse(text: &str) -> Result<Runbook, String> {
    Runbook::parse(text, Path::new("/etc/stillpoint"))
}

fn minimal(extra_database_keys: &str) -> String {
    format!(
        r#"
cluster = "c"
[pause]
tiers = [{{ addresses = ["127.0.0.1:5000"] }}]
[[databases]]
name = "db"
adapter = "sqlite"
path = "data/app.db"
{extra_database_keys}
[storage]
url = "file:///tmp/backups"
"#
    )
}

#[test]
fn the_documented_example_parses() {
    let runbook = parse(EXAMPLE).unwrap();
    assert_eq!(runbook.cluster, "ledger-prod");
    assert_eq!(runbook.pause.tiers.len(), 2);
    assert_eq!(runbook.pause.cut_deadline, Duration::from_secs(5));
    assert_eq!(runbook.databases.len(), 2);
    assert_eq!(runbook.databases[1].role.as_deref(), Some("auditor"));
    assert!(matches!(
        runbook.databases[0].adapter,
        AdapterConfig::Postgres(_)
    ));
    assert!(matches!(
        runbook.databases[1].adapter,
        AdapterConfig::Mariadb(_)
    ));
    assert_eq!(runbook.pipeline.zstd_level, Some(3));
    assert_eq!(runbook.retention.keep_daily, Some(14));
}

#[test]
fn defaults_and_relative_paths() {
    let runbook = parse(&minimal("")).unwrap();
    assert_eq!(runbook.pause.lease, Duration::from_secs(60));
    let AdapterConfig::Sqlite(sqlite) = &runbook.databases[0].adapter else {
        panic!("sqlite expected");
    };
    assert_eq!(sqlite.path, Path::new("/etc/stillpoint/data/app.db"));
    assert_eq!(runbook.pipeline.zstd_level, None);
}

#[test]
fn unknown_keys_are_named() {
    let cases = [
        (
            minimal("").replace("cluster = \"c\"", "cluster = \"c\"\nclustr = 1"),
            "clustr",
        ),
        (
            minimal("").replace("[pause]", "[pause]\nleese = \"1s\""),
            "leese",
        ),
        (minimal("pth = \"x\""), "pth"),
        (
            minimal("").replace("url = \"file", "bucket = \"x\"\nurl = \"file"),
            "bucket",
        ),
    ];
    for (text, key) in cases {
        let error = parse(&text).unwrap_err();
        assert!(error.contains(key), "{key:?} not named in: {error}");
    }
}

#[test]
fn mistakes_are_refused_with_the_value() {
    let two_dbs = minimal("").replace(
        "[storage]",
        "[[databases]]\nname = \"db\"\nadapter = \"sqlite\"\npath = \"b.db\"\n[storage]",
    );
    let cases = [
        (two_dbs, "two databases are named \"db\""),
        (
            minimal("").replace("file:///tmp/backups", "ftp://host/x"),
            "ftp://host/x",
        ),
        (
            minimal("").replace("[pause]", "[pause]\nlease = \"5s\"\nmax_wait = \"10s\""),
            "max_wait",
        ),
        (
            minimal("").replace("[pause]", "[pause]\nlease = \"ten\""),
            "ten",
        ),
        (minimal("").replace("127.0.0.1:5000", "no-port"), "no-port"),
        (
            minimal("").replace("adapter = \"sqlite\"", "adapter = \"oracle\""),
            "oracle",
        ),
        (
            minimal("").replace("[storage]", "[pipeline]\nzstd_level = 40\n[storage]"),
            "zstd_level 40",
        ),
        (
            minimal("").replace(
                "tiers = [{ addresses = [\"127.0.0.1:5000\"] }]",
                "tiers = []",
            ),
            "tiers",
        ),
    ];
    for (text, needle) in cases {
        let error = parse(&text).unwrap_err();
        assert!(error.contains(needle), "{needle:?} not in: {error}");
    }
}

const LEDGER_RUNBOOK: &str = include_str!("../../ledger/runbook.toml");

#[test]
fn the_ledger_runbook_parses_with_its_drill_checks() {
    let runbook = parse(LEDGER_RUNBOOK).unwrap();
    let names: Vec<&str> = runbook
        .drill
        .checks
        .iter()
        .map(|check| check.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "balances_conserved",
            "no_negative_balance",
            "hash_chain_links",
            "ledger_matches_auditor"
        ]
    );
    assert!(matches!(
        &runbook.drill.checks[0].kind,
        super::CheckKind::Expect { expect, .. } if expect == "0"
    ));
    assert!(matches!(
        &runbook.drill.checks[3].kind,
        super::CheckKind::Equal { left, right } if left.database == "ledger" && right.database == "auditor"
    ));
}

#[test]
fn drill_checks_are_checked_before_anything_runs() {
    let with_check = |check: &str| format!("{}\n[[drill.checks]]\n{check}\n", minimal(""));
    let error = parse(&with_check(
        "name = \"c\"\ndatabase = \"nope\"\nsql = \"SELECT 1\"\nexpect = 1",
    ))
    .unwrap_err();
    assert!(error.contains("reads database \"nope\""), "{error}");

    let error = parse(&with_check(
        "name = \"c\"\ndatabase = \"db\"\nsql = \"SELECT 1\"",
    ))
    .unwrap_err();
    assert!(
        error.contains("give either database + sql + expect, or left + right"),
        "{error}"
    );

    let error = parse(&with_check(
        "name = \"c\"\ndatabase = \"db\"\nsql = \"SELECT 1\"\nexpect = 1\nexpected = 2",
    ))
    .unwrap_err();
    assert!(error.contains("expected"), "{error}");

    let twice = format!(
        "{}\n[[drill.checks]]\nname = \"c\"\ndatabase = \"db\"\nsql = \"SELECT 1\"\nexpect = 1\n",
        with_check("name = \"c\"\ndatabase = \"db\"\nsql = \"SELECT 1\"\nexpect = 1")
    );
    let error = parse(&twice).unwrap_err();
    assert!(error.contains("two checks are named \"c\""), "{error}");

    let ok = parse(&format!(
        "{}\n[drill]\nscratch_dir = \"scratch\"\n",
        minimal("")
    ))
    .unwrap();
    assert_eq!(
        ok.drill.scratch_dir.as_deref(),
        Some(Path::new("/etc/stillpoint/scratch"))
    );
}
