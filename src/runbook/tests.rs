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
            "ledger_node_check",
            "balances_conserved",
            "no_negative_balance",
            "hash_chain_links",
            "ledger_matches_auditor"
        ]
    );
    assert_eq!(runbook.drill.checks[0].databases(), ["auditor", "ledger"]);
    assert!(matches!(
        &runbook.drill.checks[0].kind,
        super::CheckKind::Command { argv, .. } if argv[..2] == ["ledger-node", "check"]
    ));
    assert!(matches!(
        &runbook.drill.checks[1].kind,
        super::CheckKind::Expect { expect, .. }
            if expect.rows == [[super::ExpectedValue::Integer(0)]] && expect.scalar
    ));
    assert!(matches!(
        &runbook.drill.checks[4].kind,
        super::CheckKind::Equal { left, right, allow_empty: false } if left.database == "ledger" && right.database == "auditor"
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

#[test]
fn boundary_values_are_refused_before_anything_is_contacted() {
    let pause = |keys: &str| minimal("").replace("[pause]", &format!("[pause]\n{keys}"));
    let tiers = |tiers: &str| {
        minimal("").replace(
            "tiers = [{ addresses = [\"127.0.0.1:5000\"] }]",
            &format!("tiers = {tiers}"),
        )
    };
    let cases = [
        // Empty and duplicate addresses, within a tier and across tiers.
        (tiers("[{ addresses = [\"\"] }]"), "empty address"),
        (tiers("[{ addresses = [] }]"), "neither addresses nor srv"),
        (tiers("[{ srv = \" \" }]"), "empty srv name"),
        (
            tiers("[{ addresses = [\"a:1\", \"a:1\"] }]"),
            "address a:1 is listed twice",
        ),
        (
            tiers("[{ addresses = [\"a:1\"] }, { addresses = [\"b:2\", \"a:1\"] }]"),
            "address a:1 is listed twice",
        ),
        // Zero, negative and absurd durations, named by key or value.
        (pause("lease = \"0s\""), "[pause] lease is 0ms"),
        (pause("max_wait = \"0ms\""), "[pause] max_wait is 0ms"),
        (
            pause("cut_deadline = \"0s\""),
            "[pause] cut_deadline is 0ms",
        ),
        (
            pause("connect_timeout = \"0s\""),
            "[pause] connect_timeout is 0ms",
        ),
        (pause("lease = \"-5s\""), "\"-5s\""),
        (pause("lease = \"100000h\""), "\"100000h\""),
        (
            pause("lease = \"48h\""),
            "lease (48h) is longer than the 24h",
        ),
        // A max wait as long as the lease.
        (
            pause("lease = \"10s\"\nmax_wait = \"10s\""),
            "max_wait (10000ms) must be shorter than lease (10000ms)",
        ),
        // Auth settings that cannot work together.
        (
            pause("token_file = \"t\"\ntoken_env = \"T\""),
            "token_file or token_env",
        ),
        (
            minimal("").replace(
                "[[databases]]",
                "[pause.tls]\nclient_cert_path = \"c.pem\"\n[[databases]]",
            ),
            "client_cert_path and client_key_path together",
        ),
    ];
    for (text, needle) in cases {
        let error = parse(&text).unwrap_err();
        assert!(error.contains(needle), "{needle:?} not in: {error}");
    }
}

#[test]
fn unsupported_storage_schemes_are_named_without_their_credentials() {
    for (url, shown) in [
        ("ftp://host/x", "ftp://host/x"),
        ("gs://bucket/prefix", "gs://bucket/prefix"),
        ("/var/backups", "/var/backups"),
        ("ftp://user:hunter2-secret@host/x", "ftp://***@host/x"),
    ] {
        let text = minimal("").replace("file:///tmp/backups", url);
        let error = parse(&text).unwrap_err();
        assert!(error.contains(shown), "{shown:?} not in: {error}");
        assert!(!error.contains("hunter2"), "a credential leaked: {error}");
    }
}

#[test]
fn syntax_errors_give_the_line_but_never_quote_it() {
    // A missing quote on the line that holds a password.
    let text = minimal("").replace(
        "[storage]",
        "[[databases]]\nname = \"pg\"\nadapter = \"postgres\"\nurl = \"postgres://app:hunter2-secret@db/ledger\n[storage]",
    );
    let error = parse(&text).unwrap_err();
    assert!(error.starts_with("line "), "{error}");
    assert!(!error.contains("hunter2"), "a password leaked: {error}");
    // A database's adapter config errors say what is wrong, not the value.
    let text = minimal("").replace(
        "[storage]",
        "[[databases]]\nname = \"pg\"\nadapter = \"postgres\"\nurl = \"postgres://app:hunter2-secret@db/ledger\"\nrequire_archiving = \"hunter2-secret\"\n[storage]",
    );
    let error = parse(&text).unwrap_err();
    assert!(
        error.contains("invalid type: a string, expected a boolean"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "a password leaked: {error}");
}

#[test]
fn quoted_values_are_hidden_in_type_errors() {
    use super::hide_strings;
    assert_eq!(
        hide_strings(r#"invalid type: string "s\"e:cret", expected a boolean"#),
        "invalid type: a string, expected a boolean"
    );
    assert_eq!(
        hide_strings("unknown variant `oracle`"),
        "unknown variant `oracle`"
    );
    assert_eq!(hide_strings(r#"string "unterminated"#), "a string");
}

/// Issue 20.7: a check whose SQL is empty (or only comments and semicolons) ran nothing
/// and passed. It is a runbook error, named, before anything runs.
#[test]
fn checks_with_no_statement_are_refused() {
    let with_check = |check: &str| format!("{}\n[[drill.checks]]\n{check}\n", minimal(""));
    for sql in ["", "   ", ";", " ; ;", "-- nothing\\n", "/* nothing */ ;"] {
        for check in [
            format!("name = \"c\"\ndatabase = \"db\"\nsql = \"{sql}\"\nexpect = \"\""),
            format!(
                "name = \"c\"\nleft = {{ database = \"db\", sql = \"{sql}\" }}\n\
                 right = {{ database = \"db\", sql = \"SELECT 1\" }}"
            ),
            format!(
                "name = \"c\"\nleft = {{ database = \"db\", sql = \"SELECT 1\" }}\n\
                 right = {{ database = \"db\", sql = \"{sql}\" }}"
            ),
        ] {
            let error = parse(&with_check(&check))
                .err()
                .unwrap_or_else(|| panic!("accepted a check with sql {sql:?}: {check}"));
            assert!(
                error.contains("check \"c\"") && error.contains("no SQL statement"),
                "{sql:?}: {error}"
            );
        }
    }
}

/// Issue 20.4: a command check names its program and the databases whose scratch
/// targets it gets; placeholders must name databases; braces can be escaped.
#[test]
fn command_checks_are_checked_before_anything_runs() {
    let with_check = |check: &str| format!("{}\n[[drill.checks]]\n{check}\n", minimal(""));
    let ok = parse(&with_check(
        "name = \"c\"\ncommand = [\"check\", \"--db={db}\", \"{{literal}}\"]\n\
         env = { URL = \"{db}\" }\ntimeout = \"30s\"",
    ))
    .unwrap();
    assert_eq!(ok.drill.checks[0].databases(), ["db"]);
    assert!(matches!(
        &ok.drill.checks[0].kind,
        super::CheckKind::Command { .. } if ok.drill.checks[0].timeout == Duration::from_secs(30)
    ));
    for (check, needle) in [
        ("command = []", "command is empty"),
        ("command = [\"\"]", "command is empty"),
        ("command = [\"x\", \"{nope}\"]", "reads database \"nope\""),
        ("command = [\"x\", \"{db\"]", "unclosed"),
        ("command = [\"x\", \"db}\"]", "lone"),
        (
            "command = [\"x\"]\nsql = \"SELECT 1\"",
            "command check takes command",
        ),
        (
            "command = [\"x\"]\ntimeout = \"0ms\"",
            "timeout must be positive",
        ),
        (
            "database = \"db\"\nsql = \"SELECT 1\"\nexpect = 1\nenv = { A = \"b\" }",
            "belongs to command",
        ),
    ] {
        let error = parse(&with_check(&format!("name = \"c\"\n{check}")))
            .err()
            .unwrap_or_else(|| panic!("accepted {check}"));
        assert!(error.contains(needle), "{check}: {error}");
    }
    assert_eq!(
        super::substitute("a={db} {{x}}", |name| (name == "db").then_some("URL")).unwrap(),
        "a=URL {x}"
    );
}

#[test]
fn archive_keys_are_parsed_and_checked() {
    let postgres = r#"
cluster = "c"
[pause]
tiers = [{ addresses = ["127.0.0.1:5000"] }]
[[databases]]
name = "db"
adapter = "postgres"
url = "postgres://u@127.0.0.1/db"
archive = true
[storage]
url = "file:///tmp/backups"
"#;
    let runbook = parse(postgres).unwrap();
    assert!(runbook.databases[0].archive);
    assert_eq!(runbook.archive.partial_interval, Duration::from_millis(200));
    assert!(runbook.spool_root().ends_with("stillpoint-archive/c"));

    let tuned =
        format!("{postgres}[archive]\npartial_interval = \"250ms\"\nspool_dir = \"spool\"\n");
    let runbook = parse(&tuned).unwrap();
    assert_eq!(runbook.archive.partial_interval, Duration::from_millis(250));
    assert_eq!(runbook.spool_root(), Path::new("/etc/stillpoint/spool"));

    let unknown = format!("{postgres}[archive]\npartial_intervall = \"1s\"\n");
    let error = parse(&unknown).unwrap_err();
    assert!(error.contains("partial_intervall"), "{error}");
    let zero = format!("{postgres}[archive]\npartial_interval = \"0s\"\n");
    assert!(parse(&zero).unwrap_err().contains("partial_interval"));
    // SQLite is archived (its WAL, frame by frame); an exec database has no log.
    assert!(parse(&minimal("archive = true")).unwrap().databases[0].archive);
    let exec = minimal("archive = true").replace(
        "adapter = \"sqlite\"\npath = \"data/app.db\"",
        "adapter = \"exec\"\ncut = \"true\"",
    );
    let error = parse(&exec).unwrap_err();
    assert!(
        error.contains("postgres, mariadb and sqlite adapters only"),
        "{error}"
    );
    let zero = format!("{postgres}[archive]\nsnapshot_interval = \"0s\"\n");
    assert!(parse(&zero).unwrap_err().contains("snapshot_interval"));
    // MariaDB binlogs: archive = true, and the chunk interval.
    let mariadb = postgres
        .replace("adapter = \"postgres\"", "adapter = \"mariadb\"")
        .replace("postgres://u@127.0.0.1/db", "mysql://u@127.0.0.1/db");
    let runbook = parse(&mariadb).unwrap();
    assert!(runbook.databases[0].archive);
    assert_eq!(runbook.archive.chunk_interval, Duration::from_secs(1));
    let tuned = format!("{mariadb}[archive]\nchunk_interval = \"500ms\"\n");
    assert_eq!(
        parse(&tuned).unwrap().archive.chunk_interval,
        Duration::from_millis(500)
    );
    let zero = format!("{mariadb}[archive]\nchunk_interval = \"0s\"\n");
    assert!(parse(&zero).unwrap_err().contains("chunk_interval"));
    let error = parse(&minimal("archive = \"yes\"")).unwrap_err();
    assert!(error.contains("archive must be true or false"), "{error}");
    assert!(!parse(&minimal("")).unwrap().databases[0].archive);
}

/// The documented standby runbook parses: its `[standby]` table, paths taken from the
/// runbook's directory, defaults for what it leaves out.
#[test]
fn the_documented_standby_example_parses() {
    let text = include_str!("../../docs/standby.example.toml");
    let runbook = parse(text).unwrap();
    let standby = runbook.standby.expect("a [standby] table");
    assert_eq!(standby.dir, Path::new("/var/lib/stillpoint/standby"));
    assert_eq!(standby.interval, Duration::from_secs(2));
    let ledger = &standby.postgres["ledger"];
    assert_eq!(ledger.port, 5433);
    assert_eq!(ledger.listen_addresses, "127.0.0.1");
    // Control: an unknown key in it is refused, as everywhere in a runbook.
    let typo = text.replace("port = 5433", "prot = 5433");
    let error = parse(&typo).unwrap_err();
    assert!(error.contains("prot"), "{error}");
    // A relative dir is taken from the runbook's directory.
    let relative = text.replace("/var/lib/stillpoint/standby\"", "state\"");
    let standby = parse(&relative).unwrap().standby.unwrap();
    assert_eq!(standby.dir, Path::new("/etc/stillpoint/state"));
}
