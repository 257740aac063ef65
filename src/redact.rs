//! `Debug` for configuration that holds secrets: database URLs with passwords, storage
//! credentials, the environment given to hooks and command checks. The config types
//! (`runbook`, `adapters`) print their fields through these wrappers, so `{:?}` and
//! `{:#?}` of a runbook, of any part of it, or of anything that holds one (a tracing
//! field, a panic message, an `assert_eq!`) never show a secret.
//!
//! URLs are shown as [`redact_url`] shows them (`postgres://***@host/db`, a `key=value`
//! string with `password=***`); values that are secrets as a whole as `<redacted>`.

use std::collections::BTreeMap;
use std::fmt;

use crate::storage::redact_url;

/// What stands for a value that is hidden as a whole.
pub const REDACTED: &str = "<redacted>";

/// A URL or connection string, shown without its password.
pub struct Url<'a>(pub &'a str);

impl fmt::Debug for Url<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(self.0), f)
    }
}

/// An optional URL, shown without its password.
pub struct OptionalUrl<'a>(pub Option<&'a str>);

impl fmt::Debug for OptionalUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(url) => f.debug_tuple("Some").field(&Url(url)).finish(),
            None => f.write_str("None"),
        }
    }
}

/// Environment variables: their names, never their values (`PGPASSWORD`, a token).
pub struct Environment<'a>(pub &'a BTreeMap<String, String>);

impl fmt::Debug for Environment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|name| (name, Hidden)))
            .finish()
    }
}

/// Storage options: settings such as `endpoint` or `region` shown, anything that may
/// be a credential (`secret_access_key`, `access_key_id`, `session_token`, …) hidden,
/// and a URL among them without its password.
pub struct StorageOptions<'a>(pub &'a BTreeMap<String, String>);

/// Option names shown with their values; every other value is hidden. An allowlist,
/// so that a credential option this list does not know is hidden too.
const PLAIN_OPTIONS: &[&str] = &[
    "allow_http",
    "allow_invalid_certificates",
    "aws_allow_http",
    "aws_default_region",
    "aws_endpoint",
    "aws_endpoint_url",
    "aws_region",
    "aws_virtual_hosted_style_request",
    "bucket",
    "endpoint",
    "endpoint_url",
    "region",
    "virtual_hosted_style_request",
];

impl fmt::Debug for StorageOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in self.0 {
            if PLAIN_OPTIONS.contains(&key.to_ascii_lowercase().as_str()) {
                map.entry(key, &Url(value));
            } else {
                map.entry(key, &Hidden);
            }
        }
        map.finish()
    }
}

struct Hidden;

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests;
