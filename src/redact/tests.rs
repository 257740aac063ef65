//! Every config type that can hold a secret, formatted with `{:?}` and `{:#?}`: no
//! secret in either, and a redaction marker where it was.

use std::collections::BTreeMap;
use std::path::Path;

use crate::adapters::{AdapterConfig, ExecConfig, MariadbConfig, PostgresConfig};
use crate::runbook::{CheckKind, Runbook, StorageConfig};

const PG_PASSWORD: &str = "pg-S3cret-a1";
const PG_DRILL_PASSWORD: &str = "pg-drill-S3cret-b2";
const PG_KV_PASSWORD: &str = "pg-kv-S3cret-c3";
const MARIADB_PASSWORD: &str = "maria-S3cret-d4";
const MARIADB_DRILL_PASSWORD: &str = "maria-drill-S3cret-e5";
const HOOK_SECRET: &str = "hook-S3cret-f6";
const CHECK_SECRET: &str = "check-S3cret-g7";
const S3_SECRET_KEY: &str = "s3-secret-key-h8";
const S3_KEY_ID: &str = "AKIA-key-id-i9";
const S3_SESSION: &str = "s3-session-token-j0";
const ENDPOINT_PASSWORD: &str = "endpoint-S3cret-k1";

const SECRETS: &[&str] = &[
    PG_PASSWORD,
    PG_DRILL_PASSWORD,
    PG_KV_PASSWORD,
    MARIADB_PASSWORD,
    MARIADB_DRILL_PASSWORD,
    HOOK_SECRET,
    CHECK_SECRET,
    S3_SECRET_KEY,
    S3_KEY_ID,
    S3_SESSION,
    ENDPOINT_PASSWORD,
];

/// `{:?}` and `{:#?}` of `value` hold no secret, and do hold a redaction marker.
fn assert_redacted(what: &str, value: &impl std::fmt::Debug) {
    for shown in [format!("{value:?}"), format!("{value:#?}")] {
        for secret in SECRETS {
            assert!(
                !shown.contains(secret),
                "{what} shows {secret:?} in Debug:\n{shown}"
            );
        }
        assert!(
            shown.contains("***") || shown.contains(super::REDACTED),
            "{what} shows no redaction marker:\n{shown}"
        );
    }
}

fn runbook() -> Runbook {
    let text = format!(
        r#"
cluster = "secrets"
[pause]
tiers = [{{ addresses = ["127.0.0.1:50051"] }}]

[[databases]]
name = "ledger"
adapter = "postgres"
url = "postgres://backup:{PG_PASSWORD}@db.internal:5432/ledger"
drill_server_url = "postgres://drill:{PG_DRILL_PASSWORD}@drill.internal/postgres"

[[databases]]
name = "ledger_kv"
adapter = "postgres"
url = "host=db.internal dbname=ledger user=backup password={PG_KV_PASSWORD}"

[[databases]]
name = "auditor"
adapter = "mariadb"
url = "mysql://root:{MARIADB_PASSWORD}@auditor.internal:3306/auditor"
drill_server_url = "mysql://root:{MARIADB_DRILL_PASSWORD}@drill.internal/mysql"

[[databases]]
name = "files"
adapter = "exec"
cut = "snapshot-tool mark"
env = {{ SNAPSHOT_TOKEN = "{HOOK_SECRET}" }}

[storage]
url = "s3://backups/prod"
options = {{ endpoint = "http://minio:{ENDPOINT_PASSWORD}@minio.internal:9000", region = "eu-west-1", secret_access_key = "{S3_SECRET_KEY}", access_key_id = "{S3_KEY_ID}", session_token = "{S3_SESSION}" }}

[drill]
[[drill.checks]]
name = "ledger_node_check"
command = ["ledger-node", "check", "--ledger-db", "{{ledger}}"]
env = {{ PGPASSWORD = "{CHECK_SECRET}", LEDGER = "{{ledger}}" }}
"#
    );
    Runbook::parse(&text, Path::new("/etc/stillpoint")).unwrap()
}

#[test]
fn every_config_that_holds_a_secret_prints_redacted() {
    let runbook = runbook();
    // The secrets are really in there: the test would pass on an empty runbook.
    let ledger = &runbook.databases[0].adapter;
    let AdapterConfig::Postgres(postgres) = ledger else {
        panic!("{ledger:?}")
    };
    assert!(postgres.url.contains(PG_PASSWORD));

    assert_redacted("Runbook", &runbook);
    assert_redacted("StorageConfig", &runbook.storage);
    for database in &runbook.databases {
        assert_redacted(&database.name, database);
        assert_redacted(&database.name, &database.adapter);
        match &database.adapter {
            AdapterConfig::Postgres(config) => assert_redacted("PostgresConfig", config),
            AdapterConfig::Mariadb(config) => assert_redacted("MariadbConfig", config),
            AdapterConfig::Exec(config) => assert_redacted("ExecConfig", config),
            AdapterConfig::Sqlite(_) => {}
        }
    }
    assert_redacted("[drill]", &runbook.drill);
    let check = &runbook.drill.checks[0];
    assert!(matches!(check.kind, CheckKind::Command { .. }));
    assert_redacted("a command check", check);
    assert_redacted("a command check's kind", &check.kind);

    // What stays readable: hosts, option names and safe values, variable names.
    let shown = format!("{runbook:?}");
    for readable in [
        "db.internal",
        "drill.internal",
        "auditor.internal",
        "minio.internal:9000",
        "eu-west-1",
        "secret_access_key",
        "SNAPSHOT_TOKEN",
        "PGPASSWORD",
        "snapshot-tool mark",
    ] {
        assert!(
            shown.contains(readable),
            "{readable:?} hidden too:\n{shown}"
        );
    }
}

/// The config types built directly (as a library user or a test would), with URLs a
/// runbook would refuse (raw `@` and `/` in the password) among them.
#[test]
fn config_types_built_by_hand_print_redacted() {
    let postgres = PostgresConfig {
        url: format!("postgres://backup:{PG_PASSWORD}/x@y@db.internal/ledger"),
        require_archiving: true,
        bin_dir: None,
        drill_server_url: Some(format!(
            "postgresql://drill:{PG_DRILL_PASSWORD}@drill.internal/postgres?sslmode=require"
        )),
    };
    assert_redacted("PostgresConfig", &postgres);
    let mariadb = MariadbConfig {
        url: format!("mysql://root:{MARIADB_PASSWORD}@auditor.internal/auditor"),
        bin_dir: None,
        drill_server_url: Some(format!(
            "mysql://root:{MARIADB_DRILL_PASSWORD}@drill.internal/mysql"
        )),
        base_method: Default::default(),
    };
    assert_redacted("MariadbConfig", &mariadb);
    let exec = ExecConfig {
        cut: "true".to_owned(),
        cut_timeout: std::time::Duration::from_secs(1),
        copy: None,
        restore: None,
        env: BTreeMap::from([("TOKEN".to_owned(), HOOK_SECRET.to_owned())]),
        pass_env: Vec::new(),
    };
    assert_redacted("ExecConfig", &exec);
    let storage = StorageConfig {
        url: format!("s3://{S3_KEY_ID}:{S3_SECRET_KEY}@backups/prod"),
        options: BTreeMap::from([
            ("aws_secret_access_key".to_owned(), S3_SECRET_KEY.to_owned()),
            ("some_future_credential".to_owned(), S3_SESSION.to_owned()),
        ]),
    };
    assert_redacted("StorageConfig", &storage);
    assert_redacted("AdapterConfig", &AdapterConfig::Postgres(postgres));
}
