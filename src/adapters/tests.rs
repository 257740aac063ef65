//! `build`: every runbook config becomes the adapter of its kind.

use super::*;

#[test]
fn build_turns_each_config_into_its_adapter() {
    let configs = [
        (
            "files",
            r#"adapter = "sqlite"
path = "/var/lib/app/ledger.sqlite""#,
            "sqlite",
            "sqlite",
        ),
        (
            "pg",
            r#"adapter = "postgres"
url = "postgres://backup@db/ledger"
require_archiving = true"#,
            "postgres",
            "pgdump",
        ),
        (
            "maria",
            r#"adapter = "mariadb"
url = "mysql://backup@db/auditor""#,
            "mariadb",
            "sql",
        ),
        (
            "hook",
            r#"adapter = "exec"
cut = "echo cut"
cut_timeout = "2s""#,
            "exec",
            "bin",
        ),
    ];
    for (name, toml_text, kind, extension) in configs {
        let config: AdapterConfig = toml::from_str(toml_text).unwrap();
        let adapter = build(name, &config);
        assert_eq!(adapter.name(), name);
        assert_eq!(adapter.kind(), kind);
        assert_eq!(adapter.artifact_extension(), extension);
    }
}
