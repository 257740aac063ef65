//! [`NodeClient`]: one connection to one node's admin services, in domain types.
//!
//! A node either serves our `LeaseAdmin` extension ([`Protocol::Lease`]) or only the
//! upstream `rpc.Admin` ([`Protocol::Upstream`]); [`NodeClient::connect`] finds out
//! which, so callers branch on a value instead of on error codes.
//!
//! Every call carries the admin token when one is configured (as a sensitive header,
//! which HPACK never indexes), and TLS may add a client certificate for mutual TLS.
//! Without TLS the token goes only to loopback addresses, unless the operator allows
//! it ([`ConnectOptions::allow_plaintext_token`]), and only to a port that does not
//! speak TLS: a plaintext client asks first (`handshake::what_port_speaks`).

use std::time::{Duration, Instant, SystemTime};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::probe::{PortSpeaks, client_certificate_refusal, what_port_speaks};
use crate::resolve::NodeAddress;
use stillpoint_node::grpc::auth::{
    AdminToken, ClientIdentity, MALFORMED_TOKEN, NO_CLIENT_CERT, NO_TOKEN, WRONG_TOKEN,
};
use stillpoint_node::grpc::wire::lease::lease_admin_client::LeaseAdminClient;
use stillpoint_node::grpc::wire::rpc::admin_client::AdminClient;
use stillpoint_node::grpc::wire::{lease, rpc};
use stillpoint_node::pause::{NodeStatus, PauseOwner, Released};

/// How to reach nodes. TLS verifies the server certificate against the given CA (or the
/// system roots) and the node's host name, or `override_authority` when set.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub tls: Option<TlsOptions>,
    pub connect_timeout: Duration,
    /// Sent as `authorization: Bearer …` on every call when set.
    pub token: Option<AdminToken>,
    /// Send the token without TLS to addresses that are not loopback: only for a
    /// network the operator trusts (`--allow-plaintext-token`).
    pub allow_plaintext_token: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            tls: None,
            connect_timeout: Duration::from_secs(5),
            token: None,
            allow_plaintext_token: false,
        }
    }
}

impl ConnectOptions {
    /// Why the admin token must not be sent to `address` with these options: no TLS,
    /// an address that is not loopback, and no permission to send it in cleartext.
    pub fn cleartext_token_refusal(&self, address: &NodeAddress) -> Option<CallError> {
        (self.token.is_some()
            && self.tls.is_none()
            && !self.allow_plaintext_token
            && !is_loopback(address))
        .then(|| CallError::CleartextToken {
            address: address.to_string(),
        })
    }
}

/// Loopback by address (127.0.0.0/8, ::1, also IPv4-mapped) or by the name localhost.
fn is_loopback(address: &NodeAddress) -> bool {
    let host = address.host();
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM of the CA that signed the nodes' certificates; `None` uses the system roots.
    pub ca_pem: Option<String>,
    /// The name to expect in the node's certificate instead of its address's host.
    pub override_authority: Option<String>,
    /// Our certificate and key, for nodes that require mutual TLS.
    pub client_identity: Option<ClientIdentity>,
}

/// Which admin API a node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Upstream `rpc.Admin` plus stillpoint's `LeaseAdmin`.
    Lease,
    /// Only upstream `rpc.Admin`: no lease, no pause id, no clock or boot id.
    Upstream,
}

/// Why a call to a node failed, in terms a coordinator can act on.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("cannot connect: {0}")]
    Unreachable(String),
    /// The TLS handshake failed: most often a certificate signed by another CA, or one
    /// that does not name the host we dialled.
    #[error(
        "TLS handshake failed: {0}; check that the CA given (--ca-root-cert-path, or \
         ca_root_cert_path in the runbook's [pause.tls]) signed the node's certificate and \
         that the certificate names the address's host (else use --override-authority)"
    )]
    Tls(String),
    /// The node does not know who we are: no token, a wrong one, or no client
    /// certificate where mutual TLS is on (UNAUTHENTICATED).
    #[error("refused the call: UNAUTHENTICATED ({message}){}", unauthenticated_hint(.message))]
    Unauthenticated { message: String },
    /// The node knows who we are, and we may not do this (PERMISSION_DENIED).
    #[error("refused the call: PERMISSION_DENIED ({0})")]
    PermissionDenied(String),
    #[error("no answer within {}ms", .0.as_millis())]
    TimedOut(Duration),
    /// The token would have gone out unencrypted to a host that is not this one.
    #[error(
        "refusing to send the admin token in cleartext to {address}, which is not a \
         loopback address: connect with TLS (--tls or --ca-root-cert-path; runbook: \
         [pause.tls]), or, on a network you trust, allow it with --allow-plaintext-token \
         (runbook: allow_plaintext_token = true in [pause])"
    )]
    CleartextToken { address: String },
    /// One side speaks TLS and the other does not.
    #[error("{0}")]
    ProtocolMismatch(String),
    /// The node's TLS refused the client certificate we presented.
    #[error(
        "the node refused our client certificate ({0}); check that --tls-client-cert \
         (runbook: client_cert_path in [pause.tls]) is signed by the CA the node trusts \
         for clients (its --client-ca), is meant for client authentication, and has not \
         expired"
    )]
    ClientCertRefused(String),
    /// The node refused because of its state: requests did not drain (upstream's
    /// FAILED_PRECONDITION), or it is not paused under our id.
    #[error("{0}")]
    Precondition(String),
    /// Another holder owns the node's pause (ABORTED).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("gRPC {code}: {message}")]
    Other { code: String, message: String },
    /// The caller gave up on the call (SIGINT/SIGTERM) before it was answered.
    #[error("interrupted (SIGINT/SIGTERM) before it answered")]
    Interrupted,
}

impl From<Status> for CallError {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::FailedPrecondition => CallError::Precondition(message),
            Code::Aborted => CallError::Conflict(message),
            Code::InvalidArgument => CallError::Invalid(message),
            Code::Unavailable => CallError::Unavailable(status_chain(&status)),
            Code::Unauthenticated => CallError::Unauthenticated { message },
            Code::PermissionDenied => CallError::PermissionDenied(message),
            Code::DeadlineExceeded => CallError::TimedOut(Duration::ZERO),
            code => CallError::Other {
                code: format!("{code:?}"),
                message: status_chain(&status),
            },
        }
    }
}

/// A status's message and then its causes (a transport failure carries them as its
/// source), each said once. Not `Status`'s own `Display`, which prints the code, the
/// message and the source's `Debug` form in one line, and then its source chain said
/// everything a second time.
fn status_chain(status: &Status) -> String {
    let mut text = status.message().to_owned();
    if let Some(source) = std::error::Error::source(status) {
        for cause in crate::error_chain(source).split(": ") {
            if cause.is_empty() || text.contains(cause) {
                continue;
            }
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(cause);
        }
    }
    dedupe_chain(&text)
}

/// What to tell a person about an UNAUTHENTICATED answer, from the node's reason.
fn unauthenticated_hint(message: &str) -> &'static str {
    if message.starts_with(NO_TOKEN) || message.starts_with(MALFORMED_TOKEN) {
        "; pass --token-file or set STILLPOINT_ADMIN_TOKEN (runbook: token_file or \
         token_env in [pause])"
    } else if message.starts_with(WRONG_TOKEN) {
        "; the token given is not the node's: check --token-file / STILLPOINT_ADMIN_TOKEN"
    } else if message.starts_with(NO_CLIENT_CERT) {
        "; pass --tls-client-cert and --tls-client-key (runbook: client_cert_path and \
         client_key_path in [pause.tls])"
    } else {
        ""
    }
}

/// Adds the bearer token to every call. Debug never shows it.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "BearerToken(<redacted>)",
            None => "BearerToken(None)",
        })
    }
}

impl BearerToken {
    fn new(token: Option<&AdminToken>) -> Result<Self, CallError> {
        let value = match token {
            None => None,
            Some(token) => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {}", token.expose()).parse().map_err(|_| {
                        CallError::Invalid(
                            "the admin token cannot be sent as an HTTP header".to_owned(),
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(BearerToken(value))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authorized = InterceptedService<Channel, BearerToken>;

/// One `Status` call, timed: the probe of [`NodeClient::connect_sampled`] and every
/// [`NodeClient::read_clock`].
async fn timed_status(lease: &mut LeaseAdminClient<Authorized>) -> Result<ClockReading, Status> {
    let sent_at = SystemTime::now();
    let started = Instant::now();
    let status = lease.status(lease::StatusRequest {}).await?.into_inner();
    Ok(ClockReading {
        sent_at,
        rtt: started.elapsed(),
        node_time_ms: status.node_time_ms,
    })
}

/// A node's clock as one call saw it: the node read `node_time_ms` at some moment
/// between `sent_at` and `sent_at + rtt` on the caller's clock.
#[derive(Debug, Clone, Copy)]
pub struct ClockReading {
    pub sent_at: SystemTime,
    pub rtt: Duration,
    pub node_time_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NodeClient {
    address: NodeAddress,
    protocol: Protocol,
    upstream: AdminClient<Authorized>,
    lease: LeaseAdminClient<Authorized>,
}

impl NodeClient {
    /// Connects and probes for the `LeaseAdmin` extension.
    pub async fn connect(
        address: &NodeAddress,
        options: &ConnectOptions,
    ) -> Result<Self, CallError> {
        Ok(Self::connect_sampled(address, options).await?.0)
    }

    /// [`Self::connect`], also returning the probe as a clock reading when the node
    /// speaks `LeaseAdmin` (the probe is a `Status` call): the coordinator counts it as
    /// its first clock sample instead of paying for one more call.
    pub async fn connect_sampled(
        address: &NodeAddress,
        options: &ConnectOptions,
    ) -> Result<(Self, Option<ClockReading>), CallError> {
        if let Some(refusal) = options.cleartext_token_refusal(address) {
            return Err(refusal);
        }
        // The first request carries the token: a plaintext client makes sure first that
        // the port does not speak TLS, where anyone on the path could read it.
        if options.tls.is_none()
            && options.token.is_some()
            && port_speaks(address, options).await? == Some(PortSpeaks::Tls)
        {
            return Err(speaks_tls(address, "; the admin token was not sent"));
        }
        let channel = match channel(address, options).await {
            Ok(channel) => channel,
            Err(error @ (CallError::Tls(_) | CallError::Unreachable(_)))
                if options.tls.is_some() =>
            {
                return Err(match port_speaks(address, options).await {
                    Ok(Some(PortSpeaks::Http2)) => speaks_plaintext(address),
                    _ => error,
                });
            }
            Err(error) => return Err(error),
        };
        let bearer = BearerToken::new(options.token.as_ref())?;
        let mut lease = LeaseAdminClient::with_interceptor(channel.clone(), bearer.clone());
        let probe = tokio::time::timeout(options.connect_timeout, timed_status(&mut lease))
            .await
            .map_err(|_| CallError::TimedOut(options.connect_timeout))?;
        let (protocol, reading) = match probe {
            Ok(reading) => (Protocol::Lease, Some(reading)),
            Err(status) if status.code() == Code::Unimplemented => (Protocol::Upstream, None),
            // The connection failed mid-call ("transport error", "operation was
            // canceled", a GOAWAY): a TLS mismatch, or a refused client certificate,
            // shows this way and never says so. Find out which.
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unknown | Code::Cancelled | Code::Unavailable | Code::Internal
                ) =>
            {
                return Err(explain_broken_call(address, options, status_chain(&status)).await);
            }
            Err(status) => return Err(status.into()),
        };
        let client = Self {
            address: address.clone(),
            protocol,
            upstream: AdminClient::with_interceptor(channel, bearer),
            lease,
        };
        Ok((client, reading))
    }

    pub fn address(&self) -> &NodeAddress {
        &self.address
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub async fn status(&mut self) -> Result<NodeStatus, CallError> {
        let status = self.lease.status(lease::StatusRequest {}).await?;
        Ok(status.into_inner().into())
    }

    /// A `Status` call timed on this process's clock.
    pub async fn read_clock(&mut self) -> Result<ClockReading, CallError> {
        Ok(timed_status(&mut self.lease).await?)
    }

    pub async fn pause_leased(
        &mut self,
        owner: &PauseOwner,
        lease: Duration,
        max_wait: Duration,
        wait_outstanding: bool,
    ) -> Result<NodeStatus, CallError> {
        let request = lease::LeasedPauseRequest {
            pause_id: owner.pause_id.clone(),
            lease_ms: lease.as_millis() as u64,
            max_pause_wait_ms: max_wait.as_millis() as u64,
            wait_outstanding,
            coordinator_id: owner.coordinator_id.clone(),
        };
        Ok(self.lease.pause(request).await?.into_inner().into())
    }

    pub async fn renew(
        &mut self,
        owner: &PauseOwner,
        lease: Duration,
    ) -> Result<NodeStatus, CallError> {
        let request = lease::RenewRequest {
            pause_id: owner.pause_id.clone(),
            lease_ms: lease.as_millis() as u64,
            coordinator_id: owner.coordinator_id.clone(),
        };
        Ok(self.lease.renew(request).await?.into_inner().into())
    }

    /// Releases the pause `owner` holds; `None` releases whoever holds the node.
    pub async fn unpause_leased(
        &mut self,
        owner: Option<&PauseOwner>,
    ) -> Result<Released, CallError> {
        let request = lease::UnpauseRequest {
            pause_id: owner
                .map(|owner| owner.pause_id.clone())
                .unwrap_or_default(),
            coordinator_id: owner
                .map(|owner| owner.coordinator_id.clone())
                .unwrap_or_default(),
        };
        let response = self.lease.unpause(request).await?.into_inner();
        let status = response.released.ok_or_else(|| CallError::Other {
            code: "Internal".to_owned(),
            message: "unpause answer carried no node status".to_owned(),
        })?;
        Ok(Released {
            was_paused: response.was_paused,
            status: status.into(),
        })
    }

    pub async fn pause_upstream(
        &mut self,
        max_wait: Duration,
        wait_outstanding: bool,
    ) -> Result<(), CallError> {
        let request = rpc::PauseRequest {
            wait_outstanding,
            max_pause_wait_time: Some(max_wait.as_millis() as i64),
        };
        self.upstream.pause(request).await?;
        Ok(())
    }

    pub async fn unpause_upstream(&mut self) -> Result<(), CallError> {
        self.upstream.unpause(()).await?;
        Ok(())
    }

    pub async fn check_paused_upstream(&mut self) -> Result<bool, CallError> {
        Ok(self.upstream.check_paused(()).await?.into_inner().paused)
    }

    /// The node's `Stats` JSON, parsed; non-JSON text is returned as a JSON string.
    pub async fn stats(&mut self) -> Result<serde_json::Value, CallError> {
        let text = self.upstream.stats(()).await?.into_inner().stats;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}

/// What the port answers to a TLS ClientHello; `None` when that says nothing.
async fn port_speaks(
    address: &NodeAddress,
    options: &ConnectOptions,
) -> Result<Option<PortSpeaks>, CallError> {
    match what_port_speaks(address, options.connect_timeout).await {
        Ok(PortSpeaks::Unknown(_)) => Ok(None),
        Ok(speaks) => Ok(Some(speaks)),
        Err(error) => Err(CallError::Unreachable(error.to_string())),
    }
}

fn speaks_tls(address: &NodeAddress, note: &str) -> CallError {
    CallError::ProtocolMismatch(format!(
        "{address} speaks TLS, but this client connected in plaintext{note}: pass --tls or \
         --ca-root-cert-path (runbook: [pause.tls])"
    ))
}

fn speaks_plaintext(address: &NodeAddress) -> CallError {
    CallError::ProtocolMismatch(format!(
        "{address} speaks plaintext gRPC, not TLS, but this client connected with TLS: \
         drop --tls and --ca-root-cert-path (runbook: [pause.tls]) for it, or serve its \
         admin port with TLS"
    ))
}

/// The first call on a fresh connection failed at the transport: says why, when a
/// probe of the port can tell.
async fn explain_broken_call(
    address: &NodeAddress,
    options: &ConnectOptions,
    chain: String,
) -> CallError {
    match &options.tls {
        None => match port_speaks(address, options).await {
            Ok(Some(PortSpeaks::Tls)) => speaks_tls(address, ""),
            _ => CallError::Unreachable(format!(
                "{chain}; if the node serves TLS, pass --tls or --ca-root-cert-path"
            )),
        },
        Some(tls) => {
            if let Some(identity) = &tls.client_identity {
                if let Some(alert) = client_certificate_refusal(
                    address,
                    tls.ca_pem.as_deref(),
                    tls.override_authority.as_deref(),
                    identity,
                    options.connect_timeout,
                )
                .await
                {
                    return CallError::ClientCertRefused(alert);
                }
                return CallError::Unreachable(format!(
                    "{chain}; the node closed the connection after the TLS handshake: if it \
                     requires mutual TLS, check that --tls-client-cert is signed by the CA \
                     it trusts for clients"
                ));
            }
            CallError::Unreachable(chain)
        }
    }
}

async fn channel(address: &NodeAddress, options: &ConnectOptions) -> Result<Channel, CallError> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|error| CallError::Invalid(format!("bad address {address}: {error}")))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if let Some(tls) = &options.tls {
        stillpoint_node::grpc::auth::install_crypto_provider();
        let mut config = ClientTlsConfig::new();
        config = match &tls.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some(authority) = &tls.override_authority {
            config = config.domain_name(authority.clone());
        }
        if let Some(identity) = &tls.client_identity {
            config = config.identity(Identity::from_pem(
                &identity.cert_pem,
                identity.key_pem.expose(),
            ));
        }
        endpoint = endpoint.tls_config(config).map_err(|error| {
            // The cause is in the chain: tonic's own message is "transport error".
            let chain = dedupe_chain(&crate::error_chain(&error));
            CallError::Invalid(format!("TLS settings for {address}: {chain}"))
        })?;
    }
    tokio::time::timeout(options.connect_timeout, endpoint.connect())
        .await
        .map_err(|_| CallError::TimedOut(options.connect_timeout))?
        .map_err(|error| connect_error(&crate::error_chain(&error)))
}

/// Drops a repeated tail from an error chain: transports often show their source in
/// their own message too, so the chain says everything twice.
fn dedupe_chain(chain: &str) -> String {
    let mut parts: Vec<&str> = chain.split(": ").collect();
    let mut length = 1;
    while length * 2 <= parts.len() {
        let end = parts.len();
        if parts[end - length..] == parts[end - 2 * length..end - length] {
            parts.truncate(end - length);
        } else {
            length += 1;
        }
    }
    parts.join(": ")
}

/// Tells a failed TLS handshake from a node that is not there: the fixes differ.
fn connect_error(chain: &str) -> CallError {
    let chain = &dedupe_chain(chain);
    const TLS_SIGNS: &[&str] = &[
        "certificate",
        "tls handshake",
        "HandshakeFailure",
        "received fatal alert",
        "InvalidContentType",
        "CorruptMessage",
    ];
    if TLS_SIGNS.iter().any(|sign| {
        chain
            .to_ascii_lowercase()
            .contains(&sign.to_ascii_lowercase())
    }) {
        CallError::Tls(chain.to_owned())
    } else {
        CallError::Unreachable(chain.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_error_chains_are_said_once() {
        assert_eq!(
            dedupe_chain(
                "transport error: invalid peer certificate: X: invalid peer certificate: X"
            ),
            "transport error: invalid peer certificate: X"
        );
        assert_eq!(dedupe_chain("a: b: b: b"), "a: b");
        assert_eq!(dedupe_chain("a: b: a: c"), "a: b: a: c");
        assert_eq!(dedupe_chain(""), "");
    }

    /// Issue 19.7: the token goes out without TLS only to loopback, or when allowed.
    #[test]
    fn a_token_goes_out_in_cleartext_only_to_loopback_unless_allowed() {
        let token = AdminToken::parse("0123456789abcdef-token", "test").unwrap();
        let with_token = ConnectOptions {
            token: Some(token),
            ..ConnectOptions::default()
        };
        let refused = |options: &ConnectOptions, address: &str| {
            options
                .cleartext_token_refusal(&address.parse().unwrap())
                .is_some()
        };
        for loopback in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "localhost:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(!refused(&with_token, loopback), "{loopback}");
        }
        for remote in [
            "10.0.0.3:1",
            "node-1.internal:1",
            "[fe80::1]:1",
            "0.0.0.0:1",
        ] {
            assert!(refused(&with_token, remote), "{remote}");
        }
        let message = with_token
            .cleartext_token_refusal(&"10.0.0.3:1".parse().unwrap())
            .unwrap()
            .to_string();
        assert!(message.contains("10.0.0.3:1") && message.contains("--allow-plaintext-token"));
        let allowed = ConnectOptions {
            allow_plaintext_token: true,
            ..with_token.clone()
        };
        assert!(!refused(&allowed, "10.0.0.3:1"));
        let with_tls = ConnectOptions {
            tls: Some(TlsOptions::default()),
            ..with_token
        };
        assert!(!refused(&with_tls, "10.0.0.3:1"));
        assert!(
            !refused(&ConnectOptions::default(), "10.0.0.3:1"),
            "no token, nothing to protect"
        );
    }

    #[test]
    fn handshake_failures_are_told_from_absent_nodes() {
        let tls = connect_error("transport error: invalid peer certificate: UnknownIssuer");
        assert!(matches!(tls, CallError::Tls(_)), "{tls:?}");
        assert!(tls.to_string().contains("--ca-root-cert-path"), "{tls}");
        let absent = connect_error("transport error: tcp connect error: Connection refused");
        assert!(matches!(absent, CallError::Unreachable(_)), "{absent:?}");
    }
}
