//! TLS probes the client uses to say what went wrong instead of "transport error":
//! [`what_port_speaks`] (does this port speak TLS?) and [`client_certificate_refusal`]
//! (did the node refuse our client certificate?). Neither sends anything secret: a TLS
//! ClientHello, a handshake with our (public) certificate, nothing after it. The
//! node's side of these handshakes is `stillpoint_node::grpc::tls`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject as _;
use stillpoint_node::grpc::auth::install_crypto_provider;
use stillpoint_node::grpc::tls::certificates;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::resolve::NodeAddress;
use stillpoint_node::grpc::auth::ClientIdentity;

/// Why a client certificate and key cannot be presented together, if they cannot: a
/// key of a kind TLS cannot sign with, or one that is not the certificate's (checked
/// by the same rustls call the connection makes, which tonic reports only as
/// "transport error").
pub fn client_identity_problem(identity: &ClientIdentity) -> Option<String> {
    install_crypto_provider();
    let certs = certificates(&identity.cert_pem).ok()?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.expose().as_bytes()).ok()?;
    rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(certs, key)
        .err()
        .map(|error| error.to_string())
}

/// Why `name` cannot be the name expected in a node's certificate, if it cannot (it
/// must be a DNS name or an IP address).
pub fn server_name_problem(name: &str) -> Option<String> {
    ServerName::try_from(name.to_owned())
        .err()
        .map(|error| format!("{:?} is not a DNS name or IP address ({error})", name))
}

/// What a port answers to a TLS ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PortSpeaks {
    /// A TLS record (a ServerHello or an alert).
    Tls,
    /// An HTTP/2 frame: a plaintext gRPC server, which sends its SETTINGS first.
    Http2,
    /// Nothing we recognise (or nothing at all before the timeout).
    Unknown(String),
}

/// Sends a TLS ClientHello (nothing else) and looks at the first bytes of the answer.
/// Only connection errors are errors.
pub(crate) async fn what_port_speaks(
    address: &NodeAddress,
    timeout: Duration,
) -> Result<PortSpeaks, io::Error> {
    install_crypto_provider();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(address.host().to_owned())
        .unwrap_or_else(|_| ServerName::try_from("stillpoint.invalid").expect("a valid name"));
    let mut hello = Vec::new();
    rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(io::Error::other)?
        .write_tls(&mut hello)?;
    let probe = async {
        let mut tcp = TcpStream::connect(address.to_string()).await?;
        tcp.write_all(&hello).await?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 64];
        while answer.len() < 9 {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => answer.extend_from_slice(&buffer[..read]),
            }
        }
        Ok::<_, io::Error>(answer)
    };
    let answer = match tokio::time::timeout(timeout, probe).await {
        Ok(answer) => answer?,
        Err(_) => return Ok(PortSpeaks::Unknown("no answer".to_owned())),
    };
    Ok(match answer.as_slice() {
        // A handshake (22) or alert (21) record of TLS 1.x.
        [22 | 21, 3, ..] => PortSpeaks::Tls,
        // A frame header: 3 length bytes, then the type; SETTINGS (4) or GOAWAY (7).
        [_, _, _, 4 | 7, ..] => PortSpeaks::Http2,
        [] => PortSpeaks::Unknown("it closed the connection without answering".to_owned()),
        bytes => PortSpeaks::Unknown(format!("it answered {:02x?}", &bytes[..bytes.len().min(9)])),
    })
}

/// After a TLS connection that presented our client certificate failed on its first
/// call: connects once more, completes the handshake and reads, to catch the alert a
/// node sends when it refuses the certificate (a TLS 1.3 server checks it only after
/// the client's handshake is done, so the call itself saw just a closed connection).
/// Returns the alert, e.g. "received fatal alert: UnknownCA"; `None` when the node
/// accepted the certificate or could not be asked (no CA file to verify it with).
pub(crate) async fn client_certificate_refusal(
    address: &NodeAddress,
    ca_pem: Option<&str>,
    override_authority: Option<&str>,
    identity: &ClientIdentity,
    timeout: Duration,
) -> Option<String> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_pem?).ok()? {
        roots.add(cert).ok()?;
    }
    let certs = certificates(&identity.cert_pem).ok()?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.expose().as_bytes()).ok()?;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .ok()?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name =
        ServerName::try_from(override_authority.unwrap_or(address.host()).to_owned()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let ask = async {
        let tcp = TcpStream::connect(address.to_string()).await.ok()?;
        let error = match connector.connect(name, tcp).await {
            Ok(mut stream) => {
                let mut buffer = [0u8; 64];
                stream.read(&mut buffer).await.err()?
            }
            Err(error) => error,
        };
        let text = error.to_string();
        text.contains("fatal alert").then_some(text)
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}
