//! Who may call a node's admin services. These services can stop a production cluster,
//! so whoever embeds them chooses, through [`AdminSecurity`]:
//!
//! - **TLS** ([`ServerTls`]): the node proves who it is; with a client CA it also asks
//!   every caller for a certificate signed by that CA (mutual TLS).
//! - **Bearer tokens** ([`AdminToken`]): every admin call must carry
//!   `authorization: Bearer <token>`. An *operator* token may do everything; an
//!   *observer* token may only read state (CheckPaused, Stats, Status, reflection).
//!
//! [`Guarded`] wraps each admin service and refuses a call before it reaches the
//! service: UNAUTHENTICATED when the token or the client certificate is missing or
//! wrong, PERMISSION_DENIED when an observer asks to change state. Refusals are logged
//! at `warn` with the peer address, the method and the reason, never with the token:
//! the first of a peer for a reason at once, then a count at most every 10 s
//! (`refusals.rs`), so a client hammering with a wrong token cannot flood the log.
//!
//! Health stays outside the guard: it says only which services are up, and probes and
//! load balancers carry no credentials. Reflection is guarded like a read call.
//!
//! The client side ([`AdminToken`] in `ConnectOptions`, [`ClientIdentity`] in
//! `TlsOptions`) lives in the coordinator's `stillpoint::grpc::client`; the token and
//! identity types and their redaction are here so that both sides share one notion of
//! a secret, and the refusal texts below are what that client recognises.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use refusals::RefusalLog;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Makes ring the process's rustls provider, once, before any TLS configuration is
/// built. When aws-lc-rs is compiled in too (the coordinator's object_store brings
/// it, and so may an embedder's HTTP client), rustls panics rather than choose; an
/// embedder that installed a provider of its own keeps it.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Text that must never be printed: `Debug` shows `<redacted>`, there is no `Display`,
/// and the only way to the value is [`Secret::expose`], which greps well in review.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Shortest token a node accepts. 16 printable characters are ~100 bits when random;
/// anything shorter is likely a placeholder such as "changeme".
pub const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 4096;

/// A bearer token for the admin API. Tokens come from files or environment variables,
/// never from a command-line value, which `ps` and shell history would show.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Secret);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Why a token could not be read. Messages name where the token came from, never it.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    // In the message, not chained as a source, so it is not said twice.
    #[error("cannot read the admin token file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the admin token from {origin} is empty")]
    Empty { origin: String },
    #[error(
        "the admin token from {origin} has a character that cannot go in an HTTP header \
         (use printable ASCII without spaces, e.g. `openssl rand -hex 32`)"
    )]
    BadCharacter { origin: String },
    #[error("the admin token from {origin} is longer than {MAX_TOKEN_LEN} characters")]
    TooLong { origin: String },
    #[error(
        "the admin token is {len} characters; a node needs at least {MIN_TOKEN_LEN} \
         (generate one with `openssl rand -hex 32`)"
    )]
    TooShort { len: usize },
}

impl AdminToken {
    /// Checks a token's text. Surrounding whitespace (a file's final newline) is
    /// dropped; `origin` says where it came from, for messages.
    pub fn parse(text: &str, origin: &str) -> Result<AdminToken, TokenError> {
        let origin = || origin.to_owned();
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty { origin: origin() });
        }
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong { origin: origin() });
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadCharacter { origin: origin() });
        }
        Ok(AdminToken(Secret::new(text)))
    }

    /// Reads a token file. A file others can read is accepted but warned about: the
    /// token is as secret as the cluster is important.
    pub fn from_file(path: &Path) -> Result<AdminToken, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokenError::Read {
            path: path.to_owned(),
            error,
        })?;
        warn_if_shared(path);
        AdminToken::parse(&text, &format!("file {}", path.display()))
    }

    /// The token in environment variable `name`, if it is set.
    pub fn from_env(name: &str) -> Result<Option<AdminToken>, TokenError> {
        match std::env::var(name) {
            Ok(text) => AdminToken::parse(&text, &format!("environment variable {name}")).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(TokenError::BadCharacter {
                origin: format!("environment variable {name}"),
            }),
        }
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    fn digest(&self) -> blake3::Hash {
        blake3::hash(self.expose().as_bytes())
    }
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(metadata) = std::fs::metadata(path)
        && metadata.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", metadata.permissions().mode() & 0o777),
            "the admin token file can be read by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_: &Path) {}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Pause, unpause, renew, and everything an observer may do.
    Operator,
    /// Read state only: CheckPaused, Stats, Status and reflection. For monitoring,
    /// which should be able to see a pause but never cause one.
    Observer,
}

/// Methods that only read state. Everything else on a guarded service needs an
/// operator: a method added later is refused to observers until it is listed here.
const READ_ONLY_METHODS: &[&str] = &[
    "/rpc.Admin/CheckPaused",
    "/rpc.Admin/Stats",
    "/stillpoint.admin.v1.LeaseAdmin/Status",
];
const READ_ONLY_SERVICES: &[&str] = &[
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

impl Role {
    fn may_call(self, path: &str) -> bool {
        match self {
            Role::Operator => true,
            Role::Observer => {
                READ_ONLY_METHODS.contains(&path)
                    || READ_ONLY_SERVICES
                        .iter()
                        .any(|prefix| path.starts_with(prefix))
            }
        }
    }
}

/// Why a TLS file could not be used. `what` names the file's role, and the flag or
/// setting that gave it where the caller knows (e.g. "CA certificate
/// (--ca-root-cert-path)").
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    // The I/O error is in the message, not chained as a source: printed with its
    // chain, it would otherwise say the same thing twice.
    #[error("cannot read the {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the {what} {path} cannot be used: {problem}")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
}

/// Why `text` is not a PEM certificate (or CA bundle) that TLS can use, if it is not:
/// checked when the file is read, so that a wrong or damaged file is named then, not
/// reported later as a "transport error" of the TLS library.
pub fn certificate_pem_problem(text: &str) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    if !text.contains("-----BEGIN ") || !text.contains("CERTIFICATE-----") {
        return Some("it holds no PEM certificate block".to_owned());
    }
    match CertificateDer::pem_slice_iter(text.as_bytes()).collect::<Result<Vec<_>, _>>() {
        Ok(certificates) if certificates.is_empty() => {
            Some("it holds no PEM certificate block".to_owned())
        }
        Ok(_) => None,
        Err(error) => Some(format!("its PEM does not decode ({error})")),
    }
}

/// Why `text` is not a PEM private key that TLS can use, if it is not.
pub fn private_key_pem_problem(text: &str) -> Option<String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject as _;
    if !text.contains("-----BEGIN ") || !text.contains("PRIVATE KEY-----") {
        return Some("it holds no PEM private key block".to_owned());
    }
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .err()
        .map(|error| format!("its PEM does not decode ({error})"))
}

fn read_pem(
    what: &'static str,
    path: &Path,
    problem: fn(&str) -> Option<String>,
) -> Result<String, TlsFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| TlsFileError::Read {
        what,
        path: path.to_owned(),
        error,
    })?;
    match problem(&text) {
        Some(problem) => Err(TlsFileError::NotPem {
            what,
            path: path.to_owned(),
            problem,
        }),
        None => Ok(text),
    }
}

/// Reads a PEM certificate (or CA bundle) file, checking it holds certificates that
/// decode.
pub fn read_certificate_pem(what: &'static str, path: &Path) -> Result<String, TlsFileError> {
    read_pem(what, path, certificate_pem_problem)
}

/// Reads a PEM private key file, checking it holds a private key that decodes.
pub fn read_private_key_pem(what: &'static str, path: &Path) -> Result<Secret, TlsFileError> {
    read_pem(what, path, private_key_pem_problem).map(Secret::new)
}

/// A node's TLS identity, and the CA its callers' certificates must chain to when
/// mutual TLS is on.
#[derive(Debug, Clone)]
pub struct ServerTls {
    cert_pem: String,
    key_pem: Secret,
    client_ca_pem: Option<String>,
}

impl ServerTls {
    pub fn new(cert_pem: impl Into<String>, key_pem: Secret) -> Self {
        ServerTls {
            cert_pem: cert_pem.into(),
            key_pem,
            client_ca_pem: None,
        }
    }

    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsFileError> {
        Ok(ServerTls::new(
            read_certificate_pem("TLS certificate", cert)?,
            read_private_key_pem("TLS key", key)?,
        ))
    }

    /// Turns on mutual TLS: every admin call must come with a client certificate
    /// signed by this CA.
    pub fn with_client_ca(mut self, ca_pem: impl Into<String>) -> Self {
        self.client_ca_pem = Some(ca_pem.into());
        self
    }

    pub fn requires_client_cert(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// Fails when the certificate, key or client CA cannot be used: for checking them
    /// before anything listens.
    pub fn check(&self) -> Result<(), super::tls::TlsConfigError> {
        super::tls::server_config(
            &self.cert_pem,
            self.key_pem.expose(),
            self.client_ca_pem.as_deref(),
        )
        .map(drop)
    }

    /// The admin port's TLS connections from `incoming`, each refused handshake logged
    /// at `warn` with the peer's address and the reason. Serve the admin routes on it
    /// (`serve_with_incoming_shutdown`) instead of setting [`Self::config`] on the
    /// tonic server, whose own TLS logs a refused handshake only at debug, without the
    /// peer. Fails when the certificate, key or client CA cannot be used.
    pub fn incoming(
        &self,
        incoming: tonic::transport::server::TcpIncoming,
    ) -> Result<
        impl futures::Stream<
            Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
        > + Send
        + 'static,
        super::tls::TlsConfigError,
    > {
        let config = super::tls::server_config(
            &self.cert_pem,
            self.key_pem.expose(),
            self.client_ca_pem.as_deref(),
        )?;
        Ok(super::tls::accept_tls(config, incoming))
    }

    /// The tonic server configuration. Client certificates are verified whenever they
    /// are presented, but *required* by [`Guarded`] rather than by the handshake: a
    /// handshake failure reaches the caller as a bare connection reset and the node's
    /// log not at all, while a refused call is an UNAUTHENTICATED status that says
    /// what is missing, and a `warn` line with the peer's address. It also keeps health
    /// reachable without a client certificate.
    pub fn config(&self) -> ServerTlsConfig {
        install_crypto_provider();
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, self.key_pem.expose()));
        if let Some(ca) = &self.client_ca_pem {
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        config
    }
}

/// Everything an embedder decides about who may call the admin services. The default
/// is open (no TLS, no token): right for a loopback-only test, wrong for production.
#[derive(Debug, Clone, Default)]
pub struct AdminSecurity {
    tls: Option<ServerTls>,
    tokens: Vec<(blake3::Hash, Role)>,
}

impl AdminSecurity {
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Accepts `token` for `role`. Only a digest is kept; comparing digests is constant
    /// time (blake3's `Hash` equality), so response times do not leak how much of a
    /// guess was right.
    pub fn with_token(mut self, token: &AdminToken, role: Role) -> Result<Self, TokenError> {
        let len = token.expose().len();
        if len < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort { len });
        }
        self.tokens.push((token.digest(), role));
        Ok(self)
    }

    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// The TLS configuration for a tonic server that serves the admin routes with its
    /// own TLS. Prefer serving them on [`ServerTls::incoming`], which logs refused
    /// handshakes at warn.
    pub fn server_tls_config(&self) -> Option<ServerTlsConfig> {
        self.tls.as_ref().map(ServerTls::config)
    }

    /// True when calls are checked at all (a token or a client certificate).
    pub fn checks_calls(&self) -> bool {
        !self.tokens.is_empty()
            || self
                .tls
                .as_ref()
                .is_some_and(ServerTls::requires_client_cert)
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        Arc::new(Policy {
            refusals: RefusalLog::default(),
            tokens: self.tokens.clone(),
            require_client_cert: self
                .tls
                .as_ref()
                .is_some_and(ServerTls::requires_client_cert),
        })
    }
}

/// The checks [`Guarded`] runs on every call, shared by every guarded service.
#[derive(Debug)]
pub(crate) struct Policy {
    /// Shared by every service the policy guards: one count per peer and reason.
    refusals: RefusalLog,
    tokens: Vec<(blake3::Hash, Role)>,
    require_client_cert: bool,
}

/// Messages of refusals, which the coordinator's client (`stillpoint::grpc::client`) recognises to add the matching CLI hint.
pub const NO_TOKEN: &str = "no bearer token";
pub const WRONG_TOKEN: &str = "wrong bearer token";
pub const MALFORMED_TOKEN: &str = "malformed authorization header";
pub const NO_CLIENT_CERT: &str = "no client certificate";

impl Policy {
    /// `Ok` or the status to answer with; notes every refusal in the refusal log.
    pub(crate) fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        ext: &http::Extensions,
    ) -> Result<(), Status> {
        let refuse = |status: Status, reason: &'static str| {
            self.refusals.refused(peer_address(ext), path, reason);
            Err(status)
        };
        if self.require_client_cert && !has_client_certificate(ext) {
            return refuse(
                Status::unauthenticated(format!(
                    "{NO_CLIENT_CERT}: this admin service requires mutual TLS with a \
                     certificate signed by its client CA"
                )),
                NO_CLIENT_CERT,
            );
        }
        if self.tokens.is_empty() {
            return Ok(());
        }
        let role = match bearer(headers) {
            Bearer::Missing => {
                return refuse(
                    Status::unauthenticated(format!(
                        "{NO_TOKEN}: this admin service requires `authorization: Bearer <token>`"
                    )),
                    NO_TOKEN,
                );
            }
            Bearer::Malformed => {
                return refuse(
                    Status::unauthenticated(format!(
                        "{MALFORMED_TOKEN}: expected `Bearer <token>`"
                    )),
                    MALFORMED_TOKEN,
                );
            }
            Bearer::Token(presented) => {
                let presented = blake3::hash(presented);
                // Look at every entry, so the time taken does not say which matched.
                let mut role = None;
                for (digest, candidate) in &self.tokens {
                    if *digest == presented {
                        role = Some(*candidate);
                    }
                }
                match role {
                    Some(role) => role,
                    None => {
                        return refuse(
                            Status::unauthenticated(format!(
                                "{WRONG_TOKEN}: the token is not one this node accepts"
                            )),
                            WRONG_TOKEN,
                        );
                    }
                }
            }
        };
        if !role.may_call(path) {
            return refuse(
                Status::permission_denied(format!(
                    "an observer token may only read state; {path} needs the operator token"
                )),
                "observer token on an operator method",
            );
        }
        Ok(())
    }
}

enum Bearer<'a> {
    Missing,
    Malformed,
    Token(&'a [u8]),
}

fn bearer(headers: &http::HeaderMap) -> Bearer<'_> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        // None, or two headers: which one would count is exactly the ambiguity an
        // attacker wants, so two count as malformed.
        return if headers.contains_key(http::header::AUTHORIZATION) {
            Bearer::Malformed
        } else {
            Bearer::Missing
        };
    };
    let bytes = value.as_bytes();
    match bytes.split_at_checked(7) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty() => {
            Bearer::Token(token)
        }
        _ => Bearer::Malformed,
    }
}

fn peer_address(ext: &http::Extensions) -> Option<SocketAddr> {
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

fn has_client_certificate(ext: &http::Extensions) -> bool {
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .is_some_and(|certs| !certs.is_empty())
}

/// An admin service behind the [`AdminSecurity`] checks. Same name as the service it
/// wraps, so it routes exactly like it.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S, policy: Arc<Policy>) -> Self {
        Guarded { inner, policy }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Guarded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.policy.check(
            request.uri().path(),
            request.headers(),
            request.extensions(),
        ) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

/// A client's certificate and key, for nodes that require mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: Secret,
}

impl ClientIdentity {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsFileError> {
        Ok(ClientIdentity {
            cert_pem: read_certificate_pem("client certificate", cert)?,
            key_pem: read_private_key_pem("client key", key)?,
        })
    }
}

mod refusals;
#[cfg(test)]
mod tests;
