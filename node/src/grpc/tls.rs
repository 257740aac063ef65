//! The node's side of its admin port's TLS: the rustls server configuration, and
//! [`accept_tls`], which accepts TLS connections itself (rather than through tonic's
//! `tls_config`, which logs a failed handshake at debug without the peer), so every
//! refused handshake — a client certificate from another CA, a plaintext client, a
//! client that refused the node's certificate — is logged at `warn` with the peer's
//! address and why.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::TcpIncoming;

use super::auth::install_crypto_provider;

/// How long a client may take over its handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; beyond it, new connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// The admin TLS settings could not be turned into a TLS configuration: which file,
/// and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsConfigError(String);

/// The node's rustls configuration: its identity, and with a client CA, certificates
/// verified whenever presented but *required* by `auth::Guarded` (see
/// `ServerTls::config` for why), HTTP/2 by ALPN.
pub(crate) fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    install_crypto_provider();
    let error =
        |what: &str, error: &dyn std::fmt::Display| TlsConfigError(format!("{what}: {error}"));
    let certs = certificates(cert_pem).map_err(|e| error("the TLS certificate", &e))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| error("the TLS key", &e))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca).map_err(|e| error("the client CA", &e))? {
                roots.add(cert).map_err(|e| error("the client CA", &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
                .allow_unauthenticated()
                .build()
                .map_err(|e| error("the client CA", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| error("the TLS certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The certificates of a PEM text, in order (the coordinator's TLS probes read them too).
pub fn certificates(
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
}

/// TLS connections of an admin port: each accepted TCP connection is handshaken
/// (several at once, each within a timeout); a failed handshake is logged at `warn`
/// with the peer's address and the reason, and skipped. The streams carry the client
/// certificate to `auth::Guarded` as tonic's own TLS does.
pub(crate) fn accept_tls(
    config: Arc<rustls::ServerConfig>,
    incoming: TcpIncoming,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    incoming
        .map(move |accepted| {
            let acceptor = acceptor.clone();
            async move {
                // Accept errors go to tonic, which knows which of them end the server.
                let tcp = match accepted {
                    Ok(tcp) => tcp,
                    Err(error) => return Some(Err(error)),
                };
                let peer = tcp
                    .peer_addr()
                    .map_or_else(|_| "unknown".to_owned(), |peer| peer.to_string());
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => Some(Ok(stream)),
                    Ok(Err(error)) => {
                        tracing::warn!(%peer, reason = %refusal_reason(&error), "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(
                            %peer,
                            reason = "no handshake within 10s",
                            "TLS handshake failed"
                        );
                        None
                    }
                }
            }
        })
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(std::future::ready)
}

/// Says which side refused, for the node's log.
fn refusal_reason(error: &io::Error) -> String {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(_)) => format!(
            "the client certificate was refused: {error} (not signed by this node's client \
             CA, expired, or not for client authentication)"
        ),
        Some(rustls::Error::NoCertificatesPresented) => {
            format!("the client presented no certificate: {error}")
        }
        Some(rustls::Error::AlertReceived(_)) => format!(
            "the client ended the handshake: {error} (does it trust this node's certificate \
             and name?)"
        ),
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            format!("not a TLS client (plaintext?): {error}")
        }
        _ => error.to_string(),
    }
}
