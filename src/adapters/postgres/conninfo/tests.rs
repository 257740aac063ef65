//! Connection strings against libpq's and tokio-postgres's rules: passwords with the
//! characters URLs give meaning to, `key=value` quoting, and the password sources
//! (`PGPASSWORD`, the password file) with their precedence and libpq's file rules.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use super::*;

/// Every fragment of these passwords contains one of the words below.
const WORDS: [&str; 4] = ["Zebra", "Quokka", "Okapi", "Tapir"];

fn assert_hidden(text: &str) {
    for word in WORDS {
        assert!(!text.contains(word), "{word} leaked: {text}");
    }
}

struct Env(HashMap<&'static str, String>);

impl Environment for Env {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn no_env() -> Env {
    Env(HashMap::new())
}

#[test]
fn a_percent_encoded_password_is_taken_out_and_decoded() {
    let parsed = ConnString::parse_in(
        "postgres://app:Zebra%2FQuokka%3FOkapi%40Tapir%23x%2541@db.example:5433/ledger?sslmode=disable",
        &no_env(),
    )
    .unwrap();
    assert_eq!(
        parsed.shown(),
        "postgres://app@db.example:5433/ledger?sslmode=disable"
    );
    assert_eq!(
        parsed.config.get_password(),
        Some("Zebra/Quokka?Okapi@Tapir#x%41".as_bytes())
    );
    assert_eq!(parsed.password_source, "the connection string");
    assert_hidden(&format!("{parsed:?}"));
}

#[test]
fn a_password_in_the_query_is_taken_out_too() {
    let parsed = ConnString::parse_in(
        "postgresql://app@db.example/ledger?password=Zebra%2F1&application_name=x",
        &no_env(),
    )
    .unwrap();
    assert_eq!(
        parsed.shown(),
        "postgresql://app@db.example/ledger?application_name=x"
    );
    assert_eq!(parsed.config.get_password(), Some("Zebra/1".as_bytes()));
}

/// A raw `/`, `?`, `#` or `@` in the password: the parsers disagree, so the URL is
/// refused, and the error quotes none of it.
#[test]
fn a_raw_special_character_in_a_password_is_refused_without_quoting_it() {
    for url in [
        "postgres://app:Zebra/Quokka@db.example/ledger",
        "postgres://app:12/Zebra@db.example/ledger",
        "postgres://app:Zebra?Quokka@db.example/ledger",
        "postgres://app:Zebra#Quokka@db.example/ledger",
        "postgres://app:Zebra@Quokka@db.example/ledger",
        "postgres://app@db.example/ledger#Zebra",
    ] {
        let error = ConnString::parse_in(url, &no_env()).unwrap_err();
        assert_hidden(&error);
        assert!(error.contains("percent-encode"), "{url}: {error}");
        assert_hidden(&shown(url));
    }
}

#[test]
fn key_value_strings_keep_their_password_apart() {
    let parsed = ConnString::parse_in(
        r"host=db.example port = 5433 user=app dbname='my db' password='Zebra \'Quokka\' \\Okapi'",
        &no_env(),
    )
    .unwrap();
    assert_eq!(
        parsed.shown(),
        "host='db.example' port='5433' user='app' dbname='my db'"
    );
    assert_eq!(
        parsed.config.get_password(),
        Some(r"Zebra 'Quokka' \Okapi".as_bytes())
    );
    assert_eq!(parsed.config.get_dbname(), Some("my db"));
    // What is shown parses back to the same settings.
    let again = ConnString::parse_in(parsed.shown(), &no_env()).unwrap();
    assert_eq!(again.config.get_dbname(), Some("my db"));
    assert_eq!(again.config.get_ports(), &[5433]);
}

#[test]
fn a_key_value_string_that_does_not_parse_is_never_shown() {
    for text in [
        "host=db password='Zebra Quokka",
        "host=db password Zebra",
        "host=db =Zebra",
        "host=db password=Zebra\\",
    ] {
        let error = ConnString::parse_in(text, &no_env()).unwrap_err();
        assert_hidden(&error);
        assert_hidden(&shown(text));
    }
}

#[test]
fn pgpassword_fills_in_a_missing_password_but_never_overrides_one() {
    let env = Env(HashMap::from([("PGPASSWORD", "Zebra".to_owned())]));
    let parsed = ConnString::parse_in("postgres://app@db/ledger", &env).unwrap();
    assert_eq!(parsed.config.get_password(), Some("Zebra".as_bytes()));
    assert_eq!(parsed.password_source, "PGPASSWORD");
    let parsed = ConnString::parse_in("postgres://app:own@db/ledger", &env).unwrap();
    assert_eq!(parsed.config.get_password(), Some("own".as_bytes()));
}

#[test]
fn the_password_file_follows_libpq_rules() {
    let text = "# host:port:database:user:password\n\
                db:5432:other:app:wrong\n\
                db:*:ledger:app:pa\\:ss\\\\word:with:colons\n\
                *:*:*:*:fallback\n";
    let wanted =
        |host: &str, port: &str, db: &str, user: &str| [host, port, db, user].map(str::to_owned);
    assert_eq!(
        password_file_lookup(text, &wanted("db", "6000", "ledger", "app")).as_deref(),
        Some("pa:ss\\word:with:colons")
    );
    assert_eq!(
        password_file_lookup(text, &wanted("db", "5432", "other", "app")).as_deref(),
        Some("wrong")
    );
    assert_eq!(
        password_file_lookup(text, &wanted("elsewhere", "1", "x", "y")).as_deref(),
        Some("fallback")
    );
    assert_eq!(
        password_file_lookup(
            "db:5432:ledger:app\n",
            &wanted("db", "5432", "ledger", "app")
        ),
        None,
        "a line with four fields has no password"
    );
}

#[test]
fn the_password_file_is_found_through_pgpassfile_or_home_and_must_be_private() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(".pgpass");
    std::fs::write(&file, "127.0.0.1:5433:ledger:app:Zebra\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = "postgres://app@127.0.0.1:5433/ledger";
    for env in [
        Env(HashMap::from([("HOME", dir.path().display().to_string())])),
        Env(HashMap::from([("PGPASSFILE", file.display().to_string())])),
    ] {
        let parsed = ConnString::parse_in(url, &env).unwrap();
        assert_eq!(parsed.config.get_password(), Some("Zebra".as_bytes()));
        assert!(parsed.password_source.contains(".pgpass"));
    }
    // No line for another port: no password, and the reason names the file and line.
    let env = Env(HashMap::from([("PGPASSFILE", file.display().to_string())]));
    let parsed = ConnString::parse_in("postgres://app@127.0.0.1:5434/ledger", &env).unwrap();
    assert_eq!(parsed.config.get_password(), None);
    assert!(
        parsed.password_source.contains("127.0.0.1:5434:ledger:app"),
        "{}",
        parsed.password_source
    );
    // Readable by others: ignored, as libpq ignores it, and the reason says so.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let parsed = ConnString::parse_in(url, &env).unwrap();
    assert_eq!(parsed.config.get_password(), None);
    assert!(
        parsed.password_source.contains("0600") && parsed.password_source.contains("644"),
        "{}",
        parsed.password_source
    );
}

#[tokio::test]
async fn child_tools_get_the_password_in_the_environment_only() {
    let parsed = ConnString::parse_in(
        "postgres://app:Zebra%2FQuokka@127.0.0.1:5433/ledger",
        &no_env(),
    )
    .unwrap();
    let mut command = Command::new("sh");
    command.args(["-c", "printf '%s|%s' \"$PGPASSWORD\" \"$*\"", "sh"]);
    parsed.libpq_args(&mut command);
    let output = command.output().await.unwrap();
    let (password, args) = std::str::from_utf8(&output.stdout)
        .unwrap()
        .split_once('|')
        .unwrap();
    assert_eq!(password, "Zebra/Quokka");
    assert_eq!(args, "--dbname=postgres://app@127.0.0.1:5433/ledger");
}
