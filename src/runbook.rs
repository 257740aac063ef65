//! The runbook file (TOML): which cluster to pause and how, which databases to cut
//! (and which to archive continuously), how to process copies, where to store them,
//! how long to keep them, and what a drill checks in a restored backup. Parsed and
//! validated here, before anything is contacted; every unknown key is an error that
//! names it. `[schedule]` (the jobs `stillpoint serve` runs) is in `schedule.rs`.
//! docs/runbook.md documents the format with a commented example.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod schedule;

use schedule::RawSchedule;
pub use schedule::{JobKind, ScheduleConfig, ScheduleEntry};

use crate::adapters::AdapterConfig;
use crate::resolve::{AddressError, NodeAddress, ensure_unique};
use crate::storage::redact_url;
use crate::time::{deserialize_duration, format_duration};
use stillpoint_node::pause::MAX_LEASE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runbook {
    /// Recorded in every manifest, to tell clusters apart in one storage.
    pub cluster: String,
    pub pause: PauseConfig,
    pub databases: Vec<DatabaseConfig>,
    pub pipeline: PipelineConfig,
    pub storage: StorageConfig,
    pub retention: RetentionConfig,
    pub drill: DrillConfig,
    pub archive: ArchiveConfig,
    /// `[schedule]`: the jobs `stillpoint serve` runs by itself.
    pub schedule: ScheduleConfig,
    /// `[standby]`: this runbook's databases as a standby of another cluster's
    /// archives (`stillpoint standby`, docs/runbooks/dr.md).
    pub standby: Option<StandbyConfig>,
}

/// `[standby]`: where `stillpoint standby` keeps its state and how it runs each
/// PostgreSQL standby server. The databases are the runbook's own, by the same names
/// as the primary's; the storage is the primary's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyConfig {
    /// Where the state file (`standby.json`) and its lock live.
    pub dir: PathBuf,
    /// How often the follower looks for a newer point.
    #[serde(
        default = "default_standby_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub interval: Duration,
    /// `[standby.postgres.<database>]`: the standby server of each PostgreSQL database.
    #[serde(default)]
    pub postgres: std::collections::BTreeMap<String, StandbyPostgres>,
}

/// A PostgreSQL database's standby server: a data directory stillpoint makes from
/// the point's base backup, and the port the server listens on (the database's `url`
/// in this runbook is how clients reach it once promoted).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyPostgres {
    pub data_dir: PathBuf,
    pub port: u16,
    /// Addresses it listens on (PostgreSQL's `listen_addresses`).
    #[serde(default = "default_standby_listen")]
    pub listen_addresses: String,
    /// The system user the server runs as when stillpoint runs as root (PostgreSQL
    /// refuses root). Default: `postgres` as root, else stillpoint's own user.
    #[serde(default)]
    pub run_as: Option<String>,
}

fn default_standby_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_standby_listen() -> String {
    "127.0.0.1".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseConfig {
    /// Paused in order, released in reverse (callers before the services they call).
    pub tiers: Vec<TierConfig>,
    #[serde(default = "default_lease", deserialize_with = "deserialize_duration")]
    pub lease: Duration,
    #[serde(
        default = "default_max_wait",
        deserialize_with = "deserialize_duration"
    )]
    pub max_wait: Duration,
    /// Every database's cut must finish within this, or the backup fails (and the
    /// cluster is released at once).
    #[serde(
        default = "default_cut_deadline",
        deserialize_with = "deserialize_duration"
    )]
    pub cut_deadline: Duration,
    /// The shortest acceptable window; the pause is held at least this long.
    #[serde(default, deserialize_with = "deserialize_duration_opt")]
    pub min_window: Option<Duration>,
    #[serde(default)]
    pub dns_server: Option<SocketAddr>,
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "deserialize_duration"
    )]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A file holding the nodes' admin bearer token (docs/security.md).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the nodes' admin bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Send the token without TLS to nodes that are not on loopback: only on a network
    /// you trust (docs/security.md). Without it, such a runbook is refused.
    #[serde(default)]
    pub allow_plaintext_token: bool,
}

/// One tier: either a list of addresses or a DNS SRV name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub srv: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the nodes' certificates; system roots if absent.
    #[serde(default)]
    pub ca_root_cert_path: Option<PathBuf>,
    #[serde(default)]
    pub override_authority: Option<String>,
    /// PEM certificate and key presented to nodes that require mutual TLS.
    #[serde(default)]
    pub client_cert_path: Option<PathBuf>,
    #[serde(default)]
    pub client_key_path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub name: String,
    /// Free text such as "ledger" or "auditor", recorded in the manifest.
    pub role: Option<String>,
    pub adapter: AdapterConfig,
    /// `archive = true`: the database's log is archived continuously into the
    /// storage (`stillpoint archive`; PostgreSQL and MariaDB).
    pub archive: bool,
    /// `changes = true` (PostgreSQL, with `archive = true`): its archiver also records
    /// a logical change stream beside the WAL, which `stillpoint changes` exports
    /// (docs/runbooks/changes.md). MariaDB's changes come from its binlog archive.
    pub changes: bool,
}

/// `[archive]`: how the databases with `archive = true` are archived.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// How often the WAL segment still being written is pushed: about how far the
    /// archive trails the server.
    #[serde(
        default = "default_partial_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub partial_interval: Duration,
    /// How often a MariaDB binlog file still being written is cut into a chunk, and
    /// how often SQLite's log is read: about how far the archive trails the server.
    #[serde(
        default = "default_chunk_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub chunk_interval: Duration,
    /// How often the SQLite archiver stores a new snapshot of the database while its
    /// log goes on: a point's restore replays at most this much log.
    #[serde(
        default = "default_snapshot_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub snapshot_interval: Duration,
    /// Where pg_receivewal or mariadb-binlog writes before a chunk is pushed (one directory per
    /// database under it). Default: `stillpoint-archive/<cluster>` in the system's
    /// temporary directory. Losing it loses nothing archived; it only saves
    /// streaming a segment again.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            partial_interval: default_partial_interval(),
            chunk_interval: default_chunk_interval(),
            snapshot_interval: default_snapshot_interval(),
            spool_dir: None,
        }
    }
}

impl Runbook {
    /// The message for a database name the runbook does not have, listing those it has.
    pub fn unknown_database(&self, name: &str) -> String {
        let names: Vec<&str> = self.databases.iter().map(|db| db.name.as_str()).collect();
        format!(
            "the runbook has no database {name:?}; it has: {}",
            names.join(", ")
        )
    }

    /// The databases base backups are taken of: PostgreSQL and MariaDB with
    /// `archive = true`.
    pub fn base_backup_databases(&self) -> Vec<String> {
        self.databases
            .iter()
            .filter(|db| db.archive)
            .filter(|db| {
                matches!(
                    db.adapter,
                    AdapterConfig::Postgres(_) | AdapterConfig::Mariadb(_)
                )
            })
            .map(|db| db.name.clone())
            .collect()
    }

    /// The directory an archiver of this runbook spools into, per database under it.
    pub fn spool_root(&self) -> PathBuf {
        self.archive.spool_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir()
                .join("stillpoint-archive")
                .join(&self.cluster)
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// zstd level 1–22; absent: no compression.
    #[serde(default)]
    pub zstd_level: Option<i32>,
    /// age X25519 recipients (`age1…`) to encrypt to.
    #[serde(default)]
    pub age_recipients: Vec<String>,
    /// A file holding an age passphrase to encrypt with (instead of recipients).
    #[serde(default)]
    pub age_passphrase_file: Option<PathBuf>,
    /// A file of age identities (`AGE-SECRET-KEY-1…`), for verify, restore and drill.
    #[serde(default)]
    pub age_identity_file: Option<PathBuf>,
}

/// `Debug` by hand: the URL without a password, and option values that may be
/// credentials (`secret_access_key`, …) hidden.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `file:///var/backups/stillpoint` or `s3://bucket/prefix`.
    pub url: String,
    /// Passed to object_store, e.g. endpoint, region, allow_http. Credentials come
    /// from the environment (AWS_ACCESS_KEY_ID, …), never from the runbook.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("url", &crate::redact::Url(&self.url))
            .field("options", &crate::redact::StorageOptions(&self.options))
            .finish()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub keep_daily: Option<u32>,
    #[serde(default)]
    pub keep_weekly: Option<u32>,
}

/// `[drill]`: where a drill puts its scratch copies and what it checks in them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrillConfig {
    /// Where scratch SQLite files and exec targets go; default: a new temporary
    /// directory. PostgreSQL and MariaDB scratch databases are made on a server (see
    /// the adapters' `drill_server_url`).
    pub scratch_dir: Option<PathBuf>,
    pub checks: Vec<DrillCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillCheck {
    pub name: String,
    pub kind: CheckKind,
    /// How long the check may run: a query is abandoned (its scratch database is
    /// dropped with its sessions afterwards), a command killed with everything it
    /// started. A hung server or a runaway query must not hang the drill.
    pub timeout: Duration,
}

/// `Debug` by hand: a command check's `env` may carry a password (target URLs with
/// one must go there, not on the command line), so only its names are shown.
#[derive(Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// One query on one restored database; its result must equal `expect`, value for
    /// value, as typed values.
    Expect { query: CheckQuery, expect: Expected },
    /// Two queries, usually on two databases, must return the same rows in any
    /// order (compared as multisets of typed values): e.g. the (tx id, hash) pairs of
    /// the ledger and of the auditor. Two empty results prove nothing and fail, unless
    /// `allow_empty` says they are expected.
    Equal {
        left: CheckQuery,
        right: CheckQuery,
        allow_empty: bool,
    },
    /// A program run on the restored targets, its exit status the verdict (0 passes):
    /// e.g. `ledger-node check`, which recomputes every hash. `{name}` in an argument or
    /// an `env` value becomes the scratch target of database `name` (its URL, or its
    /// file path); `{{` and `}}` are literal braces. No shell is involved.
    Command {
        argv: Vec<String>,
        env: BTreeMap<String, String>,
    },
}

impl std::fmt::Debug for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckKind::Expect { query, expect } => f
                .debug_struct("Expect")
                .field("query", query)
                .field("expect", expect)
                .finish(),
            CheckKind::Equal {
                left,
                right,
                allow_empty,
            } => f
                .debug_struct("Equal")
                .field("left", left)
                .field("right", right)
                .field("allow_empty", allow_empty)
                .finish(),
            CheckKind::Command { argv, env } => f
                .debug_struct("Command")
                .field("argv", argv)
                .field("env", &crate::redact::Environment(env))
                .finish(),
        }
    }
}

/// The `{name}` placeholders of a command check's argument or environment value, in
/// order; `{{` and `}}` stand for literal braces.
pub fn placeholders(template: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        let (brace, after) = (&rest[at..at + 1], &rest[at + 1..]);
        if let Some(escaped) = after.strip_prefix(brace) {
            rest = escaped;
            continue;
        }
        if brace == "}" {
            return Err(format!(
                "{template:?} has a lone '}}' (write '}}}}' for a brace)"
            ));
        }
        let Some(end) = after.find('}') else {
            return Err(format!(
                "{template:?} has an unclosed '{{' (write '{{{{' for a brace)"
            ));
        };
        let name = &after[..end];
        if name.is_empty() || name.contains('{') {
            return Err(format!("{template:?} has an empty or nested placeholder"));
        }
        names.push(name);
        rest = &after[end + 1..];
    }
    Ok(names)
}

/// `template` with each `{name}` replaced by `value(name)` and `{{`/`}}` by braces.
pub fn substitute<'a>(
    template: &str,
    value: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        out.push_str(&rest[..at]);
        let (brace, after) = (&rest[at..at + 1], &rest[at + 1..]);
        if let Some(escaped) = after.strip_prefix(brace) {
            out.push_str(brace);
            rest = escaped;
            continue;
        }
        let end = after
            .find('}')
            .filter(|_| brace == "{")
            .ok_or_else(|| format!("{template:?} is not a valid template"))?;
        let name = &after[..end];
        out.push_str(value(name).ok_or_else(|| format!("{{{name}}} has no value"))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// What an `expect` check wants back: `expect = 0` (one row of one value), `expect =
/// [1, "a"]` (one row of these values), `expect = [[1], [2]]` (these rows, in order),
/// or `expect = []` (no rows). TOML has no NULL, and the text "NULL" is only ever the
/// text: to expect a NULL, select `x IS NULL` and expect `true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub rows: Vec<Vec<ExpectedValue>>,
    /// Written as one value (`expect = 0`) rather than as rows: shown the same way.
    pub scalar: bool,
}

/// One expected value, compared with a result's typed value by
/// [`ExpectedValue::matches`].
#[derive(Debug, Clone)]
pub enum ExpectedValue {
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(String),
}

impl PartialEq for ExpectedValue {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ExpectedValue::Bool(a), ExpectedValue::Bool(b)) => a == b,
            (ExpectedValue::Integer(a), ExpectedValue::Integer(b)) => a == b,
            (ExpectedValue::Float(a), ExpectedValue::Float(b)) => a.to_bits() == b.to_bits(),
            (ExpectedValue::Text(a), ExpectedValue::Text(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for ExpectedValue {}

impl ExpectedValue {
    /// Whether a result's value is this one. Numbers match by value whatever each
    /// server calls them (PostgreSQL prints a float8 zero as `0`, SQLite as `0.0`;
    /// `1e16` as `1e+16` or `1e16`); `true`/`false` also match 1/0, which is what
    /// MariaDB and SQLite return for a boolean; text matches text only; NULL matches
    /// nothing.
    pub fn matches(&self, value: &crate::adapters::Value) -> bool {
        use crate::adapters::Value;
        match (self, value) {
            (ExpectedValue::Bool(want), Value::Bool(got)) => want == got,
            (ExpectedValue::Bool(want), Value::Number(got)) => got == if *want { "1" } else { "0" },
            (ExpectedValue::Integer(want), Value::Number(got)) => *got == want.to_string(),
            (ExpectedValue::Integer(want), Value::Float(got)) => {
                // Only an integer a float holds exactly can be equal to one.
                let near = *want as f64;
                near as i128 == i128::from(*want) && *got == near
            }
            (ExpectedValue::Float(want), got @ (Value::Number(_) | Value::Float(_))) => {
                got.as_f64() == Some(*want)
            }
            (ExpectedValue::Text(want), Value::Text(got)) => want == got,
            _ => false,
        }
    }
}

impl std::fmt::Display for ExpectedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedValue::Bool(b) => write!(f, "{b}"),
            ExpectedValue::Integer(i) => write!(f, "{i}"),
            ExpectedValue::Float(x) => write!(f, "{x:?}"),
            ExpectedValue::Text(text) => write!(f, "{text:?}"),
        }
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let row = |row: &Vec<ExpectedValue>| {
            row.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (self.scalar, self.rows.as_slice()) {
            (true, [only]) => f.write_str(&row(only)),
            (_, []) => f.write_str("no rows"),
            (_, rows) => {
                let rows: Vec<String> = rows.iter().map(|r| format!("[{}]", row(r))).collect();
                write!(f, "[{}]", rows.join(", "))
            }
        }
    }
}

impl Expected {
    fn from_toml(value: toml::Value) -> Result<Expected, String> {
        fn scalar(value: toml::Value) -> Result<ExpectedValue, String> {
            Ok(match value {
                toml::Value::Boolean(b) => ExpectedValue::Bool(b),
                toml::Value::Integer(i) => ExpectedValue::Integer(i),
                toml::Value::Float(x) => ExpectedValue::Float(x),
                toml::Value::String(text) => ExpectedValue::Text(text),
                other => {
                    return Err(format!(
                        "{} is not a value (give a string, a number or a boolean)",
                        other.type_str()
                    ));
                }
            })
        }
        match value {
            toml::Value::Array(items) => {
                let nested = items.iter().any(toml::Value::is_array);
                if nested && !items.iter().all(toml::Value::is_array) {
                    return Err("mixes rows (arrays) and values; give [[row], [row], …] or \
                                [value, value, …]"
                        .to_owned());
                }
                let rows = if nested {
                    items
                        .into_iter()
                        .map(|row| match row {
                            toml::Value::Array(values) => values.into_iter().map(scalar).collect(),
                            _ => unreachable!("checked: every item is an array"),
                        })
                        .collect::<Result<_, _>>()?
                } else if items.is_empty() {
                    Vec::new()
                } else {
                    vec![items.into_iter().map(scalar).collect::<Result<_, _>>()?]
                };
                Ok(Expected {
                    rows,
                    scalar: false,
                })
            }
            other => Ok(Expected {
                rows: vec![vec![scalar(other)?]],
                scalar: true,
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckQuery {
    pub database: String,
    pub sql: String,
}

// The raw shapes have no `Debug`: they hold URLs and environment values as written.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrill {
    #[serde(default)]
    scratch_dir: Option<PathBuf>,
    #[serde(default)]
    checks: Vec<RawCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: String,
    #[serde(default)]
    database: Option<String>,
    #[serde(default)]
    sql: Option<String>,
    #[serde(default)]
    expect: Option<toml::Value>,
    #[serde(default)]
    left: Option<CheckQuery>,
    #[serde(default)]
    right: Option<CheckQuery>,
    #[serde(default)]
    allow_empty: Option<bool>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "deserialize_duration_opt")]
    timeout: Option<Duration>,
}

/// How long a check may run unless the runbook says otherwise.
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(600);

impl RawCheck {
    fn into_check(self) -> Result<DrillCheck, String> {
        let name = self.name;
        let timeout = self.timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT);
        if timeout.is_zero() {
            return Err(format!("[drill] check {name:?}: timeout must be positive"));
        }
        if let Some(argv) = self.command {
            let queries = [
                self.database.is_some(),
                self.sql.is_some(),
                self.expect.is_some(),
            ];
            if queries.into_iter().any(|given| given)
                || self.left.is_some()
                || self.right.is_some()
                || self.allow_empty.is_some()
            {
                return Err(format!(
                    "[drill] check {name:?}: a command check takes command (and env, timeout) \
                     only, not database, sql, expect, left, right or allow_empty"
                ));
            }
            if argv.first().is_none_or(|program| program.trim().is_empty()) {
                return Err(format!(
                    "[drill] check {name:?}: command is empty; give the program and its \
                     arguments, e.g. [\"ledger-node\", \"check\", \"--ledger-db\", \"{{ledger}}\"]"
                ));
            }
            let env = self.env.unwrap_or_default();
            for template in argv.iter().chain(env.values()) {
                placeholders(template).map_err(|why| format!("[drill] check {name:?}: {why}"))?;
            }
            return Ok(DrillCheck {
                name,
                kind: CheckKind::Command { argv, env },
                timeout,
            });
        }
        if self.env.is_some() {
            return Err(format!(
                "[drill] check {name:?}: env belongs to command checks"
            ));
        }
        let kind = match (self.database, self.sql, self.expect, self.left, self.right) {
            (Some(database), Some(sql), Some(expect), None, None) => {
                if self.allow_empty.is_some() {
                    return Err(format!(
                        "[drill] check {name:?}: allow_empty is for left + right checks; to \
                         expect no rows, write expect = []"
                    ));
                }
                CheckKind::Expect {
                    query: CheckQuery { database, sql },
                    expect: Expected::from_toml(expect)
                        .map_err(|why| format!("[drill] check {name:?}: expect {why}"))?,
                }
            }
            (None, None, None, Some(left), Some(right)) => CheckKind::Equal {
                left,
                right,
                allow_empty: self.allow_empty.unwrap_or(false),
            },
            _ => {
                return Err(format!(
                    "[drill] check {name:?}: give either database + sql + expect, or left + \
                     right (each {{ database = \"…\", sql = \"…\" }}), or command"
                ));
            }
        };
        let check = DrillCheck {
            name,
            kind,
            timeout,
        };
        for query in check.queries() {
            if !has_statement(&query.sql) {
                return Err(format!(
                    "[drill] check {:?}: the sql for database {:?} has no SQL statement (only \
                     whitespace, comments or semicolons), so the check would prove nothing",
                    check.name, query.database
                ));
            }
        }
        Ok(check)
    }
}

/// Whether `sql` holds anything but whitespace, `--` and `/* */` comments and `;`.
/// Coarse on purpose: it only has to tell an empty check from a real one.
fn has_statement(sql: &str) -> bool {
    let mut rest = sql;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if let Some(comment) = rest.strip_prefix("--") {
            rest = comment.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = comment.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return !rest.is_empty();
        }
    }
}

impl DrillCheck {
    /// The databases the check reads: those its queries run on, or those whose
    /// targets its command is given.
    pub fn databases(&self) -> Vec<&str> {
        match &self.kind {
            CheckKind::Command { argv, env, .. } => {
                let mut names: Vec<&str> = argv
                    .iter()
                    .chain(env.values())
                    .flat_map(|template| placeholders(template).unwrap_or_default())
                    .collect();
                names.sort_unstable();
                names.dedup();
                names
            }
            _ => self
                .queries()
                .into_iter()
                .map(|query| query.database.as_str())
                .collect(),
        }
    }

    /// The queries the check runs.
    pub fn queries(&self) -> Vec<&CheckQuery> {
        match &self.kind {
            CheckKind::Expect { query, .. } => vec![query],
            CheckKind::Equal { left, right, .. } => vec![left, right],
            CheckKind::Command { .. } => Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunbookError {
    #[error("cannot read runbook {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("runbook {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file's shape before the databases are split into name/role and adapter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRunbook {
    cluster: String,
    pause: PauseConfig,
    databases: Vec<toml::Table>,
    #[serde(default)]
    pipeline: PipelineConfig,
    storage: StorageConfig,
    #[serde(default)]
    retention: RetentionConfig,
    #[serde(default)]
    drill: RawDrill,
    #[serde(default)]
    archive: ArchiveConfig,
    #[serde(default)]
    schedule: RawSchedule,
    #[serde(default)]
    standby: Option<StandbyConfig>,
}

impl Runbook {
    pub fn load(path: &Path) -> Result<Runbook, RunbookError> {
        let text = std::fs::read_to_string(path).map_err(|source| RunbookError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Runbook::parse(&text, base).map_err(|message| RunbookError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses and validates; relative file paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Runbook, String> {
        let raw: RawRunbook = toml::from_str(text).map_err(|error| located(text, &error))?;
        let mut databases = Vec::new();
        for (index, table) in raw.databases.into_iter().enumerate() {
            databases.push(database(index, table, base)?);
        }
        let mut pipeline = raw.pipeline;
        for path in [
            &mut pipeline.age_passphrase_file,
            &mut pipeline.age_identity_file,
        ]
        .into_iter()
        .flatten()
        {
            *path = base.join(&*path);
        }
        let mut pause = raw.pause;
        if let Some(tls) = pause.tls.as_mut() {
            for path in [
                &mut tls.ca_root_cert_path,
                &mut tls.client_cert_path,
                &mut tls.client_key_path,
            ]
            .into_iter()
            .flatten()
            {
                *path = base.join(&*path);
            }
        }
        if let Some(path) = pause.token_file.as_mut() {
            *path = base.join(&*path);
        }
        let drill = DrillConfig {
            scratch_dir: raw.drill.scratch_dir.map(|dir| base.join(dir)),
            checks: raw
                .drill
                .checks
                .into_iter()
                .map(RawCheck::into_check)
                .collect::<Result<_, _>>()?,
        };
        let mut archive = raw.archive;
        if let Some(dir) = archive.spool_dir.as_mut() {
            *dir = base.join(&*dir);
        }
        let mut standby = raw.standby;
        if let Some(standby) = standby.as_mut() {
            standby.dir = base.join(&standby.dir);
            for server in standby.postgres.values_mut() {
                server.data_dir = base.join(&server.data_dir);
            }
        }
        let runbook = Runbook {
            standby,
            cluster: raw.cluster,
            pause,
            databases,
            pipeline,
            storage: raw.storage,
            retention: raw.retention,
            drill,
            archive,
            schedule: raw.schedule.into_config()?,
        };
        runbook.validate()?;
        Ok(runbook)
    }

    fn validate(&self) -> Result<(), String> {
        if self.pause.tiers.is_empty() {
            return Err("[pause] tiers is empty: list at least one tier of nodes".to_owned());
        }
        for (index, tier) in self.pause.tiers.iter().enumerate() {
            match (tier.addresses.is_empty(), &tier.srv) {
                (true, None) => {
                    return Err(format!(
                        "[pause] tiers[{index}] has neither addresses nor srv"
                    ));
                }
                (false, Some(_)) => {
                    return Err(format!(
                        "[pause] tiers[{index}] has both addresses and srv; give one per tier"
                    ));
                }
                _ => {}
            }
            if tier.srv.as_deref().is_some_and(|srv| srv.trim().is_empty()) {
                return Err(format!("[pause] tiers[{index}] has an empty srv name"));
            }
            for address in &tier.addresses {
                if address.trim().is_empty() {
                    return Err(format!(
                        "[pause] tiers[{index}] has an empty address \"\"; write host:port"
                    ));
                }
                address
                    .parse::<NodeAddress>()
                    .map_err(|error: AddressError| format!("[pause] tiers[{index}]: {error}"))?;
            }
        }
        // Across tiers too: a node listed twice would be paused twice under one id.
        let addresses: Vec<NodeAddress> = self
            .pause
            .tiers
            .iter()
            .flat_map(|tier| &tier.addresses)
            .filter_map(|address| address.parse().ok())
            .collect();
        ensure_unique(addresses.iter()).map_err(|error| format!("[pause] tiers: {error}"))?;
        for (key, value) in [
            ("lease", self.pause.lease),
            ("max_wait", self.pause.max_wait),
            ("cut_deadline", self.pause.cut_deadline),
            ("connect_timeout", self.pause.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(format!(
                    "[pause] {key} is 0ms; it must be positive (e.g. {})",
                    match key {
                        "lease" => "60s",
                        "connect_timeout" => "5s",
                        _ => "10s",
                    }
                ));
            }
        }
        if self.pause.lease > MAX_LEASE {
            return Err(format!(
                "[pause] lease ({}) is longer than the {} a node accepts",
                format_duration(self.pause.lease),
                format_duration(MAX_LEASE)
            ));
        }
        if let Some(tls) = &self.pause.tls
            && tls.client_cert_path.is_some() != tls.client_key_path.is_some()
        {
            return Err(
                "[pause.tls] give client_cert_path and client_key_path together".to_owned(),
            );
        }
        if self.pause.token_file.is_some() && self.pause.token_env.is_some() {
            return Err("[pause] give token_file or token_env, not both".to_owned());
        }
        if self.pause.max_wait >= self.pause.lease {
            return Err(format!(
                "[pause] max_wait ({}ms) must be shorter than lease ({}ms)",
                self.pause.max_wait.as_millis(),
                self.pause.lease.as_millis()
            ));
        }
        if self.pause.cut_deadline >= self.pause.lease {
            return Err(format!(
                "[pause] cut_deadline ({}ms) must be shorter than lease ({}ms)",
                self.pause.cut_deadline.as_millis(),
                self.pause.lease.as_millis()
            ));
        }
        if self.databases.is_empty() {
            return Err("no [[databases]]: list every database of the cluster".to_owned());
        }
        let mut names = HashSet::new();
        for database in &self.databases {
            if !names.insert(database.name.as_str()) {
                return Err(format!(
                    "two databases are named {:?}; names must be unique",
                    database.name
                ));
            }
            if database.archive && matches!(database.adapter, AdapterConfig::Exec(_)) {
                return Err(format!(
                    "database {:?}: archive = true is supported for the postgres, mariadb and \
                     sqlite adapters only (an exec database has no log to archive); remove it",
                    database.name
                ));
            }
            if database.changes
                && !(database.archive && matches!(database.adapter, AdapterConfig::Postgres(_)))
            {
                return Err(format!(
                    "database {:?}: changes = true is for PostgreSQL databases with archive = \
                     true (their change stream is recorded beside the WAL); a MariaDB \
                     database's changes come from its binlog archive without it",
                    database.name
                ));
            }
        }
        if self.archive.chunk_interval.is_zero() {
            return Err(
                "[archive] chunk_interval is 0ms; it must be positive (e.g. 1s)".to_owned(),
            );
        }
        if self.archive.snapshot_interval.is_zero() {
            return Err(
                "[archive] snapshot_interval is 0ms; it must be positive (e.g. 1h)".to_owned(),
            );
        }
        if self.archive.partial_interval.is_zero() {
            return Err(
                "[archive] partial_interval is 0ms; it must be positive (e.g. 1s)".to_owned(),
            );
        }
        let mut check_names = HashSet::new();
        for check in &self.drill.checks {
            if !check_names.insert(check.name.as_str()) {
                return Err(format!(
                    "[drill] two checks are named {:?}; names must be unique",
                    check.name
                ));
            }
            for database in check.databases() {
                if !names.contains(database) {
                    return Err(format!(
                        "[drill] check {:?} reads database {database:?}, which is not one of \
                         the [[databases]]",
                        check.name
                    ));
                }
            }
        }
        if let Some(level) = self.pipeline.zstd_level
            && !(1..=22).contains(&level)
        {
            return Err(format!(
                "[pipeline] zstd_level {level} is out of range; use 1 to 22"
            ));
        }
        if !self.pipeline.age_recipients.is_empty() && self.pipeline.age_passphrase_file.is_some() {
            return Err(
                "[pipeline] give age_recipients or age_passphrase_file, not both".to_owned(),
            );
        }
        let scheme = self.storage.url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("file" | "s3")) {
            // Redacted: a URL with a scheme we do not know may still carry credentials.
            return Err(format!(
                "[storage] url {:?} is not supported; use file:///absolute/dir or s3://bucket/prefix",
                redact_url(&self.storage.url)
            ));
        }
        Ok(())
    }
}

fn database(index: usize, mut table: toml::Table, base: &Path) -> Result<DatabaseConfig, String> {
    let name = match table.remove("name") {
        Some(toml::Value::String(name)) if !name.is_empty() => name,
        _ => return Err(format!("databases[{index}] needs a name = \"…\"")),
    };
    let role = match table.remove("role") {
        None => None,
        Some(toml::Value::String(role)) => Some(role),
        Some(_) => return Err(format!("database {name:?}: role must be a string")),
    };
    let archive = match table.remove("archive") {
        None => false,
        Some(toml::Value::Boolean(archive)) => archive,
        Some(_) => return Err(format!("database {name:?}: archive must be true or false")),
    };
    let changes = match table.remove("changes") {
        None => false,
        Some(toml::Value::Boolean(changes)) => changes,
        Some(_) => return Err(format!("database {name:?}: changes must be true or false")),
    };
    let mut adapter: AdapterConfig =
        toml::Value::Table(table)
            .try_into()
            .map_err(|error: toml::de::Error| {
                format!("database {name:?}: {}", hide_strings(error.message()))
            })?;
    if let AdapterConfig::Sqlite(sqlite) = &mut adapter {
        sqlite.path = base.join(&sqlite.path);
    }
    Ok(DatabaseConfig {
        name,
        role,
        adapter,
        archive,
        changes,
    })
}

/// A TOML error as "line L, column C: message". toml's own Display quotes the source
/// line, and the line with a mistake may be the one with a database password.
fn located(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!(
                "line {line}, column {column}: {}",
                hide_strings(error.message())
            )
        }
        None => hide_strings(error.message()),
    }
}

/// serde says `invalid type: string "…", expected …`: the string may be a secret put
/// under the wrong key, so keep the shape of the mistake and drop the value.
fn hide_strings(message: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::new();
    let mut rest = message;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let mut chars = rest[at + MARK.len()..].char_indices();
        let mut end = None;
        while let Some((index, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(at + MARK.len() + index + 1);
                    break;
                }
                _ => {}
            }
        }
        match end {
            Some(end) => rest = &rest[end..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

fn default_lease() -> Duration {
    Duration::from_secs(60)
}

fn default_max_wait() -> Duration {
    Duration::from_secs(10)
}

fn default_cut_deadline() -> Duration {
    Duration::from_secs(10)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_partial_interval() -> Duration {
    // A push stores only what the segment gained since the one before, so a short
    // interval costs little: the archive's lag under load stays well under a second.
    Duration::from_millis(200)
}

fn default_chunk_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_snapshot_interval() -> Duration {
    Duration::from_secs(3600)
}

fn deserialize_duration_opt<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(deserializer).map(Some)
}

#[cfg(test)]
mod tests;
