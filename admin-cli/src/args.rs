//! Flags shared by the cluster commands, and their conversion into library values:
//! tiers of node addresses (from `-a` lists and `-s` SRV names, in the order given),
//! connection options (TLS, client certificate, admin token), output format and time
//! zone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use stillpoint::grpc::client::{ConnectOptions, TlsOptions};
use stillpoint::resolve::{NodeAddress, ensure_unique, parse_address_list, resolve_srv};
use stillpoint::time::{Zone, parse_duration};
use stillpoint_node::grpc::auth::{
    AdminToken, ClientIdentity, certificate_pem_problem, read_certificate_pem, read_private_key_pem,
};

use crate::exit::{Failure, USAGE};

/// Where the nodes are. Each `-a` or `-s` is one tier.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Comma-separated host:port admin endpoints. Give it once per tier: tiers pause in
    /// the order given, each after the previous one has drained, and are released in
    /// reverse. Put callers (ledger nodes) before the services they call (auditors).
    #[arg(short = 'a', long = "addresses", value_name = "HOST:PORT,…", action = clap::ArgAction::Append)]
    pub addresses: Vec<String>,

    /// A DNS SRV name whose targets are one tier, e.g.
    /// _admin._tcp.ledger.default.svc.cluster.local. May be repeated, like -a.
    #[arg(short = 's', long = "srv", value_name = "NAME", action = clap::ArgAction::Append)]
    pub srv: Vec<String>,

    /// Ask this DNS server (ip:port) for SRV records instead of the system resolver.
    #[arg(long, value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Connect with TLS, verifying each node's certificate.
    #[arg(long)]
    pub tls: bool,
    /// PEM file of the CA that signed the nodes' certificates (implies --tls).
    #[arg(long, value_name = "PATH")]
    pub ca_root_cert_path: Option<PathBuf>,
    /// The CA certificate itself, as PEM text (implies --tls).
    #[arg(long, value_name = "PEM")]
    pub ca_root_cert_pem: Option<String>,
    /// Expect this name in the nodes' certificates instead of the host in the address.
    #[arg(long, value_name = "NAME")]
    pub override_authority: Option<String>,
    /// PEM certificate to present to nodes that require mutual TLS (implies --tls;
    /// needs --tls-client-key).
    #[arg(long, value_name = "PATH", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, value_name = "PATH", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// File holding the nodes' admin bearer token (one line). Without it, the token is
    /// taken from $STILLPOINT_ADMIN_TOKEN when set. There is deliberately no flag that
    /// takes the token itself: every user of the host can read a command line (`ps`,
    /// /proc/PID/cmdline), and shells keep it in their history.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Send the admin token without TLS to nodes that are not on loopback. Anyone on
    /// the network path can read it then: only for a network you trust. Without this
    /// flag, a token meant for a remote node without --tls is refused.
    #[arg(long)]
    pub allow_plaintext_token: bool,
    /// Give up connecting to a node (or waiting for its answer to a renew or an
    /// unpause) after this long.
    #[arg(long, default_value = "5s", value_parser = duration, value_name = "DURATION")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// `text` for people, `json` (one object on stdout) for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// IANA time zone for the *_date_time fields, e.g. Asia/Tokyo.
    #[arg(long, default_value = "UTC", value_parser = zone_arg, value_name = "ZONE")]
    pub time_zone: Zone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Clap value parser for `500ms`, `10s`, `2m`.
pub fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|error| error.to_string())
}

pub fn zone_arg(text: &str) -> Result<Zone, String> {
    text.parse()
}

impl ConnectArgs {
    pub fn options(&self) -> Result<ConnectOptions, Failure> {
        let ca_pem = match (&self.ca_root_cert_path, &self.ca_root_cert_pem) {
            (Some(_), Some(_)) => {
                return Err(Failure::new(
                    USAGE,
                    anyhow::anyhow!("give --ca-root-cert-path or --ca-root-cert-pem, not both"),
                ));
            }
            (Some(path), None) => Some(
                read_certificate_pem("CA certificate (--ca-root-cert-path)", path)
                    .map_err(|error| Failure::new(USAGE, error))?,
            ),
            (None, Some(pem)) => {
                if let Some(problem) = certificate_pem_problem(pem) {
                    return Err(Failure::new(
                        USAGE,
                        anyhow::anyhow!("--ca-root-cert-pem cannot be used: {problem}"),
                    ));
                }
                Some(pem.clone())
            }
            (None, None) => None,
        };
        let client_identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_pem: read_certificate_pem("client certificate (--tls-client-cert)", cert)
                    .map_err(|error| Failure::new(USAGE, error))?,
                key_pem: read_private_key_pem("client key (--tls-client-key)", key)
                    .map_err(|error| Failure::new(USAGE, error))?,
            }),
            _ => None,
        };
        if let Some(problem) = client_identity
            .as_ref()
            .and_then(stillpoint::grpc::probe::client_identity_problem)
        {
            return Err(Failure::new(
                USAGE,
                anyhow::anyhow!(
                    "--tls-client-cert and --tls-client-key cannot be used together: \
                     {problem}; give the key that belongs to the certificate"
                ),
            ));
        }
        let tls = (self.tls || ca_pem.is_some() || client_identity.is_some()).then(|| TlsOptions {
            ca_pem,
            override_authority: self.override_authority.clone(),
            client_identity,
        });
        if let Some(problem) = self
            .override_authority
            .as_deref()
            .and_then(stillpoint::grpc::probe::server_name_problem)
        {
            return Err(Failure::new(
                USAGE,
                anyhow::anyhow!("--override-authority cannot be used: {problem}"),
            ));
        }
        if tls.is_none() && self.override_authority.is_some() {
            return Err(Failure::new(
                USAGE,
                anyhow::anyhow!("--override-authority only applies with --tls"),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Failure::new(
                USAGE,
                anyhow::anyhow!("--connect-timeout 0ms would fail every connection; give e.g. 5s"),
            ));
        }
        Ok(ConnectOptions {
            tls,
            connect_timeout: self.connect_timeout,
            token: self.token()?,
            allow_plaintext_token: self.allow_plaintext_token,
        })
    }

    /// `--token-file`, else `$STILLPOINT_ADMIN_TOKEN`, else none.
    fn token(&self) -> Result<Option<AdminToken>, Failure> {
        let token = match &self.token_file {
            Some(path) => AdminToken::from_file(path).map(Some),
            None => AdminToken::from_env(TOKEN_ENV),
        };
        token.map_err(|error| Failure::new(USAGE, error))
    }
}

/// Where the CLI looks for the admin token when no --token-file is given.
pub const TOKEN_ENV: &str = "STILLPOINT_ADMIN_TOKEN";

/// Where each tier came from on the command line, to keep `-a` and `-s` in order.
#[derive(Debug, Clone)]
pub enum TierSource {
    Addresses(String),
    Srv(String),
}

/// Puts `-a` and `-s` occurrences back in command-line order using clap's indices.
pub fn tier_sources(matches: &clap::ArgMatches, targets: &TargetArgs) -> Vec<TierSource> {
    let indices = |id: &str| -> Vec<usize> {
        matches
            .try_get_raw_occurrences(id)
            .ok()
            .flatten()
            .map(|_| {
                matches
                    .indices_of(id)
                    .map(Iterator::collect)
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    };
    let mut sources: Vec<(usize, TierSource)> = indices("addresses")
        .into_iter()
        .zip(&targets.addresses)
        .map(|(index, list)| (index, TierSource::Addresses(list.clone())))
        .chain(
            indices("srv")
                .into_iter()
                .zip(&targets.srv)
                .map(|(index, name)| (index, TierSource::Srv(name.clone()))),
        )
        .collect();
    sources.sort_by_key(|(index, _)| *index);
    sources.into_iter().map(|(_, source)| source).collect()
}

/// Resolves every tier; bad input is a usage error that names the value.
pub async fn resolve_tiers(
    sources: &[TierSource],
    dns_server: Option<SocketAddr>,
) -> Result<Vec<Vec<NodeAddress>>, Failure> {
    let mut tiers = Vec::new();
    for source in sources {
        let tier = match source {
            TierSource::Addresses(list) => {
                parse_address_list(list).map_err(|error| Failure::new(USAGE, error))?
            }
            TierSource::Srv(name) => resolve_srv(name, dns_server).await?,
        };
        tiers.push(tier);
    }
    ensure_unique(tiers.iter().flatten()).map_err(|error| Failure::new(USAGE, error))?;
    Ok(tiers)
}
