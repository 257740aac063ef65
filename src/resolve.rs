//! Step 1 of the protocol, resolve: turn `host:port,…` lists and DNS SRV names into
//! node addresses, refusing empty and duplicate entries before anything is paused.

use std::collections::HashSet;
use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// A node's admin endpoint.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct NodeAddress {
    host: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("empty address list; give host:port[,host:port…]")]
    Empty,
    #[error("empty entry in address list {0:?} (stray comma?)")]
    EmptyEntry(String),
    #[error("address {0:?} has no port; write it as host:port, e.g. 10.0.0.3:50053")]
    MissingPort(String),
    #[error("address {0:?} has an invalid port; ports are 1 to 65535")]
    BadPort(String),
    #[error("address {0:?} has an invalid host; use a DNS name, an IPv4 address or [IPv6]:port")]
    BadHost(String),
    #[error("address {0} is listed twice")]
    Duplicate(NodeAddress),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("DNS SRV lookup of {name} failed: {reason}")]
    Lookup { name: String, reason: String },
    #[error("DNS SRV record {0} lists no targets")]
    NoTargets(String),
    /// RFC 2782: a target of "." means the service is decidedly not available there.
    #[error(
        "DNS SRV record {0}: service not available (its target is \".\", which RFC 2782 \
         uses to say so); check the service name, or give the nodes with -a"
    )]
    ServiceNotAvailable(String),
    #[error(transparent)]
    Address(#[from] AddressError),
}

impl NodeAddress {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for NodeAddress {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, AddressError> {
        let text = text.trim();
        let missing_port = || AddressError::MissingPort(text.to_owned());
        // `[v6]:port`, or `host:port` where host has no colon (an unbracketed IPv6
        // address cannot be told from its port).
        let (host, port) = match text.strip_prefix('[') {
            Some(rest) => {
                let (host, after) = rest.split_once(']').ok_or_else(missing_port)?;
                let port = after.strip_prefix(':').ok_or_else(missing_port)?;
                if !host.contains(':') {
                    return Err(AddressError::BadHost(text.to_owned()));
                }
                (host, port)
            }
            None => {
                let (host, port) = text.rsplit_once(':').ok_or_else(missing_port)?;
                if host.contains(':') {
                    return Err(missing_port());
                }
                (host, port)
            }
        };
        if host.is_empty() {
            return Err(missing_port());
        }
        // Names, IPv4 and IPv6 (with a zone id) only. Whitespace and control
        // characters would not survive printing and parsing again (found by fuzzing),
        // and the state file stores addresses as text.
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '%');
        if !host.chars().all(valid) {
            return Err(AddressError::BadHost(text.to_owned()));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| AddressError::BadPort(text.to_owned()))?;
        Ok(NodeAddress::new(host, port))
    }
}

impl TryFrom<String> for NodeAddress {
    type Error = AddressError;
    fn try_from(text: String) -> Result<Self, AddressError> {
        text.parse()
    }
}

impl From<NodeAddress> for String {
    fn from(address: NodeAddress) -> String {
        address.to_string()
    }
}

/// Parses `host:port,host:port`: no empty entries, no duplicates.
pub fn parse_address_list(list: &str) -> Result<Vec<NodeAddress>, AddressError> {
    if list.trim().is_empty() {
        return Err(AddressError::Empty);
    }
    let addresses = list
        .split(',')
        .map(|entry| {
            if entry.trim().is_empty() {
                Err(AddressError::EmptyEntry(list.to_owned()))
            } else {
                entry.parse()
            }
        })
        .collect::<Result<Vec<NodeAddress>, _>>()?;
    ensure_unique(addresses.iter())?;
    Ok(addresses)
}

/// Refuses a node that appears twice anywhere (across tiers too): pausing it twice
/// under one pause id would hide a mistake in the operator's list.
pub fn ensure_unique<'a>(
    addresses: impl Iterator<Item = &'a NodeAddress>,
) -> Result<(), AddressError> {
    let mut seen = HashSet::new();
    for address in addresses {
        if !seen.insert(address) {
            return Err(AddressError::Duplicate(address.clone()));
        }
    }
    Ok(())
}

/// Looks up an SRV record (e.g. `_admin._tcp.ledger.svc.cluster.local`) and returns its
/// targets, sorted by priority then name. `dns_server` replaces the system resolver.
pub async fn resolve_srv(
    name: &str,
    dns_server: Option<SocketAddr>,
) -> Result<Vec<NodeAddress>, ResolveError> {
    let lookup_error = |reason: String| ResolveError::Lookup {
        name: name.to_owned(),
        reason,
    };
    let resolver = match dns_server {
        Some(server) => {
            let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut name_server.connections {
                connection.port = server.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                TokioRuntimeProvider::default(),
            )
            .build()
        }
        None => TokioResolver::builder_tokio()
            .map_err(|error| {
                lookup_error(format!("reading the system DNS configuration: {error}"))
            })?
            .build(),
    }
    .map_err(|error| lookup_error(error.to_string()))?;
    let lookup = resolver
        .srv_lookup(name)
        .await
        .map_err(|error| lookup_error(error.to_string()))?;
    let records: Vec<_> = lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            RData::SRV(srv) => Some(srv),
            _ => None,
        })
        .collect();
    // A "." target is not an empty host name: it says there is nothing to pause here,
    // which a partial list of nodes must not hide.
    if records.iter().any(|srv| srv.target.is_root()) {
        return Err(ResolveError::ServiceNotAvailable(name.to_owned()));
    }
    let mut targets: Vec<(u16, NodeAddress)> = records
        .iter()
        .map(|srv| {
            let host = srv.target.to_utf8();
            let host = host.trim_end_matches('.').to_owned();
            (srv.priority, NodeAddress::new(host, srv.port))
        })
        .collect();
    if targets.is_empty() {
        return Err(ResolveError::NoTargets(name.to_owned()));
    }
    targets.sort();
    let addresses: Vec<NodeAddress> = targets.into_iter().map(|(_, address)| address).collect();
    ensure_unique(addresses.iter())?;
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        let list = parse_address_list("10.0.0.1:50051, node-b:50052,[::1]:7").unwrap();
        assert_eq!(list[0], NodeAddress::new("10.0.0.1", 50051));
        assert_eq!(list[1].to_string(), "node-b:50052");
        assert_eq!(list[2].to_string(), "[::1]:7");
    }

    #[test]
    fn refuses_bad_lists_by_name() {
        assert_eq!(parse_address_list(" "), Err(AddressError::Empty));
        assert!(matches!(
            parse_address_list("a:1,,b:2"),
            Err(AddressError::EmptyEntry(_))
        ));
        assert!(matches!(
            parse_address_list("a"),
            Err(AddressError::MissingPort(_))
        ));
        assert!(matches!(
            parse_address_list("a:0"),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            parse_address_list("a:99999"),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            parse_address_list("::1:5"),
            Err(AddressError::MissingPort(_))
        ));
        let duplicate = parse_address_list("a:1,b:2,a:1").unwrap_err();
        assert_eq!(duplicate.to_string(), "address a:1 is listed twice");
        for bad_host in ["[ no\u{12}e]:50052", "a b:1", "[node]:1", "hé:1", "a/b:1"] {
            assert!(
                matches!(parse_address_list(bad_host), Err(AddressError::BadHost(_))),
                "{bad_host:?}"
            );
        }
        assert!(matches!(
            parse_address_list("[::1]"),
            Err(AddressError::MissingPort(_))
        ));
    }

    /// Regression (fuzz/artifacts/address, crash-4c1388cd…): a bracketed host with a
    /// leading space and a control character was accepted, printed without its
    /// brackets and parsed back as another host.
    #[test]
    fn accepted_addresses_round_trip_through_text() {
        let crash = "101:52,[ no\u{12}e:50052,[ no\u{12}e-\u{1a}:1]:7";
        assert!(parse_address_list(crash).is_err());
        for text in [
            "10.0.0.1:1",
            "node-b.svc_x:50052",
            "[::1]:7",
            "[fe80::1%eth0]:5",
        ] {
            let address: NodeAddress = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
            assert_eq!(address.to_string().parse::<NodeAddress>().unwrap(), address);
        }
    }
}
