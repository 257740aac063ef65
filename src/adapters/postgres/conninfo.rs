//! PostgreSQL connection strings and their passwords: parsed once, shown without the
//! password, handed to libpq tools without it, and connected with it.
//!
//! - A `postgres://` URL is read by the `url` crate and by tokio-postgres, and refused
//!   when the two disagree about the user, password or database. They disagree exactly
//!   when a password holds a raw `/`, `?`, `#` or `@` (tokio-postgres reads credentials
//!   up to the first `@`, a URL parser stops the authority at the first `/`), and such
//!   a string, shown or forwarded, would carry part of the password with it.
//! - A `key=value` string is tokenized by libpq's rules (single quotes, `\` escapes), so
//!   its password can be taken out and the rest shown or forwarded.
//! - The password is the string's own, else `PGPASSWORD`, else the password file
//!   (`PGPASSFILE`, default `~/.pgpass`) read by libpq's rules. tokio-postgres reads
//!   neither, and libpq tools would; both must see the same password.
//!
//! Nothing here returns an error that quotes the string: a string that cannot be
//! parsed may hold a password anywhere in it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::process::Command;
use tokio_postgres::{Client, NoTls};

/// The task that drives a connection: spawn it, or the client never gets an answer.
pub(crate) type Driver =
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>;

/// A parsed connection string. Its `Debug` shows only [`ConnString::shown`].
#[derive(Clone)]
pub(crate) struct ConnString {
    /// What tokio-postgres connects with, the password filled in from its source.
    config: tokio_postgres::Config,
    /// The string without its password, for messages and libpq tools' command lines.
    shown: String,
    password: Option<String>,
    /// Where the password came from, or why none was found: for connect errors.
    password_source: String,
}

impl fmt::Debug for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnString").field(&self.shown).finish()
    }
}

/// Where the process environment is read from: the real one, or a test's.
pub(crate) trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process's own environment.
pub(crate) struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

const URL_HINT: &str = "percent-encode a password's /, ?, #, @, : and % (e.g. / as %2F, @ as \
     %40, % as %25), or leave the password out of the URL and give it in PGPASSWORD or a \
     password file (~/.pgpass)";

impl ConnString {
    /// Parses `text` and finds its password (the string's, `PGPASSWORD`, the password
    /// file). Errors never quote `text`.
    pub fn parse(text: &str) -> Result<ConnString, String> {
        Self::parse_in(text, &ProcessEnvironment)
    }

    pub fn parse_in(text: &str, env: &dyn Environment) -> Result<ConnString, String> {
        let (mut config, shown, password) = if is_url(text) {
            parse_url(text)?
        } else {
            parse_key_values(text)?
        };
        let (password, password_source) = match password {
            Some(password) => (Some(password), "the connection string".to_owned()),
            None => find_password(&config, env),
        };
        if let Some(password) = &password {
            config.password(password.as_bytes());
        }
        Ok(ConnString {
            config,
            shown,
            password,
            password_source,
        })
    }

    /// The string without its password: what messages show.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn user(&self) -> Option<&str> {
        self.config.get_user()
    }

    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// Connects (no TLS). The error names the server as [`ConnString::shown`] and,
    /// for a refused password, where the password came from.
    /// The whole of it (TCP, startup, authentication) is bounded by
    /// [`CONNECT_TIMEOUT`]: a server that accepts connections but never answers (stopped,
    /// hung, a full backlog) must not hang a backup's prepare or a drill forever.
    pub async fn connect(&self) -> Result<(Client, Driver), String> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(NoTls)).await {
            Ok(connected) => connected.map_err(|error| self.connect_error(&error)),
            Err(_) => Err(format!(
                "connecting to {}: the server did not answer within {}s (is it stopped, \
                 hung or overloaded? check that it runs and accepts connections)",
                self.shown,
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }

    /// `connecting to <shown>: <why>`, with the password's source when the server
    /// wanted a password.
    pub fn connect_error(&self, error: &tokio_postgres::Error) -> String {
        let text = super::error_text(error);
        let about_password = text.contains("password");
        format!(
            "connecting to {}: {text}{}",
            self.shown,
            if about_password {
                format!(" (password: {})", self.password_source)
            } else {
                String::new()
            }
        )
    }

    /// Points a libpq tool (pg_dump, pg_restore, pg_basebackup) at this database: the
    /// string without its password goes on the command line as `--dbname`, the
    /// password in `PGPASSWORD`, where `ps` does not show it.
    pub fn libpq_args(&self, command: &mut Command) {
        command.arg(format!("--dbname={}", self.shown));
        match &self.password {
            Some(password) => command.env("PGPASSWORD", password),
            // A PGPASSWORD of ours must not reach the tool for another server.
            None => command.env_remove("PGPASSWORD"),
        };
    }
}

/// How long connecting to a PostgreSQL server may take, handshake and authentication
/// included.
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a message may show of a connection string: the string without its password,
/// or, for one that does not parse, words that say so without quoting any of it.
pub(crate) fn shown(text: &str) -> String {
    match ConnString::parse_in(text, &NoEnvironment) {
        Ok(parsed) => parsed.shown,
        Err(_) if is_url(text) => {
            "a postgres:// URL that does not parse (not shown: it may hold a password)".to_owned()
        }
        Err(_) => {
            "a connection string that does not parse (not shown: it may hold a password)".to_owned()
        }
    }
}

/// For [`shown`]: what is shown does not depend on the environment.
struct NoEnvironment;

impl Environment for NoEnvironment {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

fn is_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

type Parsed = (tokio_postgres::Config, String, Option<String>);

fn parse_url(text: &str) -> Result<Parsed, String> {
    let url = url::Url::parse(text)
        .map_err(|error| format!("the postgres:// URL does not parse ({error}); {URL_HINT}"))?;
    let config = tokio_postgres::Config::from_str(text).map_err(|error| {
        format!(
            "the postgres:// URL is not one tokio-postgres can use ({}); {URL_HINT}",
            super::error_text(&error)
        )
    })?;
    if url.fragment().is_some() {
        return Err(format!("the postgres:// URL has a `#` in it; {URL_HINT}"));
    }
    let decode = |s: &str| {
        percent_decode(s).ok_or_else(|| {
            format!("the postgres:// URL has a percent-escape that is not UTF-8; {URL_HINT}")
        })
    };
    let mut password = url.password().map(decode).transpose()?;
    for (key, value) in url.query_pairs() {
        if key == "password" {
            password = Some(value.into_owned());
        }
    }
    let user = Some(decode(url.username())?).filter(|user| !user.is_empty());
    let dbname = url
        .path()
        .strip_prefix('/')
        .filter(|path| !path.is_empty())
        .map(decode)
        .transpose()?;
    let tokio_password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    if user.as_deref() != config.get_user()
        || password != tokio_password
        || dbname.as_deref() != config.get_dbname()
    {
        return Err(format!(
            "the postgres:// URL reads differently to different parsers (its user, password \
             or database is ambiguous); {URL_HINT}"
        ));
    }
    let mut shown = url.clone();
    let _ = shown.set_password(None);
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(key, _)| key != "password")
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    if kept.is_empty() {
        shown.set_query(None);
    } else {
        shown.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok((config, shown.to_string(), password))
}

/// Percent-decodes a URL component (userinfo or path: no `+` for space) to UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

fn parse_key_values(text: &str) -> Result<Parsed, String> {
    let pairs = key_values(text).ok_or_else(|| {
        "the connection string is neither a postgres:// URL nor a key=value string that \
         parses (values with spaces or quotes go in single quotes, with \\' and \\\\ \
         inside)"
            .to_owned()
    })?;
    let password = pairs
        .iter()
        .rev()
        .find(|(key, _)| key == "password")
        .map(|(_, value)| value.clone());
    let shown = pairs
        .iter()
        .filter(|(key, _)| key != "password")
        .map(|(key, value)| format!("{key}={}", quote_value(value)))
        .collect::<Vec<_>>()
        .join(" ");
    let config = tokio_postgres::Config::from_str(text).map_err(|error| {
        format!(
            "the connection string {shown} is not one tokio-postgres can use ({})",
            super::error_text(&error)
        )
    })?;
    Ok((config, shown, password))
}

/// libpq's `key = value` syntax: keys and values separated by `=` (spaces allowed
/// around it), pairs by whitespace; a value in single quotes may hold spaces; `\`
/// escapes the next character, quoted or not. `None` if it does not parse.
pub(crate) fn key_values(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// A value in single quotes, as libpq reads it back.
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The password from `PGPASSWORD`, else from the password file, with where it came
/// from (or why there is none) for messages.
fn find_password(
    config: &tokio_postgres::Config,
    env: &dyn Environment,
) -> (Option<String>, String) {
    if let Some(password) = env.var("PGPASSWORD").filter(|p| !p.is_empty()) {
        return (Some(password), "PGPASSWORD".to_owned());
    }
    let Some(file) = env
        .var("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| env.var("HOME").map(|home| Path::new(&home).join(".pgpass")))
    else {
        return (
            None,
            "none in the URL, PGPASSWORD is not set, and there is no HOME for ~/.pgpass".to_owned(),
        );
    };
    let user = config
        .get_user()
        .map(str::to_owned)
        .or_else(|| env.var("USER"))
        .unwrap_or_default();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => {
            // libpq matches its default socket directory as `localhost`.
            if path == Path::new("/var/run/postgresql") || path == Path::new("/tmp") {
                "localhost".to_owned()
            } else {
                path.display().to_string()
            }
        }
        None => "localhost".to_owned(),
    };
    let dbname = config.get_dbname().unwrap_or(&user).to_owned();
    let wanted = [host, port.to_string(), dbname, user];
    match read_password_file(&file) {
        Err(why) => (None, why),
        Ok(text) => match password_file_lookup(&text, &wanted) {
            Some(password) => (
                Some(password),
                format!("the password file {}", file.display()),
            ),
            None => (
                None,
                format!(
                    "none in the URL, PGPASSWORD is not set, and the password file {} has no \
                     line for {}",
                    file.display(),
                    wanted.join(":")
                ),
            ),
        },
    }
}

/// The password file's text, unless libpq would ignore the file: not a plain file, or
/// readable by group or others.
fn read_password_file(file: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = match std::fs::metadata(file) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "none in the URL, PGPASSWORD is not set, and there is no password file {}",
                file.display()
            ));
        }
        Err(error) => {
            return Err(format!(
                "the password file {} cannot be read: {error}",
                file.display()
            ));
        }
    };
    if !metadata.is_file() {
        return Err(format!(
            "the password file {} is not a plain file, so it is ignored",
            file.display()
        ));
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "the password file {} is ignored because group or others can access it (mode \
             {:o}); chmod 0600 it, as libpq requires",
            file.display(),
            metadata.permissions().mode() & 0o777
        ));
    }
    std::fs::read_to_string(file).map_err(|error| {
        format!(
            "the password file {} cannot be read: {error}",
            file.display()
        )
    })
}

/// The first line of a password file (`host:port:database:user:password`, `*`
/// matching anything in the first four fields, `\:` and `\\` escapes, `#` comments)
/// that matches `wanted`'s four fields.
pub(crate) fn password_file_lookup(text: &str, wanted: &[String; 4]) -> Option<String> {
    text.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .find_map(|line| {
            let fields = split_password_line(line)?;
            let matches = fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, wanted)| field == "*" || field == wanted);
            matches.then(|| fields[4].clone())
        })
}

/// A password file line's five fields, unescaped; `None` for a line with fewer.
fn split_password_line(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.trim_end_matches('\r').chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next().unwrap_or('\\')),
            // The password is the rest of the line, colons and all (libpq).
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

#[cfg(test)]
mod tests;
