//! ARPCP over mutual TLS: the configurations one party uses to serve and to call,
//! both against the cluster CA, and the handshakes on either side.
//!
//! The client does not match the server's certificate against the address it dialled:
//! agents are reached at addresses the gateway learns by scan or announcement
//! (IP:port), which a certificate issued by name does not list. Who the server is
//! is judged by what its verified certificate says instead: its role (the OU), which
//! the client checks right after the handshake.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::tls::crl::{self, Revocations};
use crate::tls::{self, IdentityError, PeerIdentity, Role, TlsError, TlsFiles};

/// A TLS handshake (server or client side) not finished within this long fails: a
/// peer that opens a socket and says nothing holds a connection slot no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a daemon started with `--tls-dir` uses on ARPCP: a server configuration
/// that requires a client certificate of the cluster CA, and a client configuration
/// that presents the same certificate. Both check peers against the CA's revocation
/// list (`DIR/crl.pem`), re-read when it changes.
#[derive(Clone, Debug)]
pub struct ArpcpTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    pub revocations: Arc<Revocations>,
    /// The verifier `server` checks client certificates with, kept to check the
    /// peers of open connections again when the revocation list changes.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
}

impl ArpcpTls {
    /// From `DIR/ca.pem`, `DIR/NAME.pem`, `DIR/NAME-key.pem` and, when present,
    /// `DIR/crl.pem`.
    pub fn load(dir: &Path, name: &str) -> Result<ArpcpTls, TlsError> {
        let files = TlsFiles::in_dir(dir, name);
        let revocations = Revocations::load(&files.crl())?;
        let verifier = tls::client_verifier_with(&files, revocations.clone(), true)?;
        Ok(ArpcpTls {
            server: tls::server_config_with(&files, verifier.clone())?,
            client: client_config(&files, revocations.clone())?,
            revocations,
            client_verifier: verifier,
        })
    }

    /// The server side: its configuration, and what re-checks open connections.
    pub fn serving(&self) -> ServerTls {
        ServerTls {
            config: self.server.clone(),
            verifier: self.client_verifier.clone(),
            revocations: self.revocations.clone(),
        }
    }

    /// The server side of the gateway's gRPC API with the same certificate and
    /// revocation list: a client certificate is optional there (bearer tokens are the
    /// other way in) but checked when presented, and ALPN offers `h2`.
    pub fn grpc_serving(&self, dir: &Path, name: &str) -> Result<ServerTls, TlsError> {
        let files = TlsFiles::in_dir(dir, name);
        let verifier = tls::client_verifier_with(&files, self.revocations.clone(), false)?;
        let mut config = Arc::unwrap_or_clone(tls::server_config_with(&files, verifier.clone())?);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            verifier,
            revocations: self.revocations.clone(),
        })
    }

    /// The client side for calling peers that must hold `peer_role`.
    pub fn calling(&self, peer_role: Role) -> ClientTls {
        ClientTls {
            config: self.client.clone(),
            peer_role,
            revocations: Some(self.revocations.clone()),
        }
    }
}

/// How an ARPCP server takes TLS connections: its configuration, and the verifier
/// and revocation list an open connection's peer is checked against again each time
/// the list changes (a peer revoked since its handshake is disconnected).
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub verifier: Arc<dyn ClientCertVerifier>,
    pub revocations: Arc<Revocations>,
}

/// A verified peer's certificate chain and the revocation list generation it was
/// last checked under.
#[derive(Debug)]
pub struct Standing {
    chain: Vec<CertificateDer<'static>>,
    generation: u64,
    verifier: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl Standing {
    /// The chain the peer of `conn` presented, as checked under the list in force.
    pub fn of(conn: &rustls::CommonState, tls: &ServerTls, generation: u64) -> Option<Standing> {
        let chain = conn
            .peer_certificates()?
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        Some(Standing {
            chain,
            generation,
            verifier: tls.verifier.clone(),
            revocations: tls.revocations.clone(),
        })
    }

    /// Checks the peer's certificate again when the revocation list changed since
    /// it was last checked; `Err` says why it is no longer good (a plain phrase).
    pub fn recheck(&mut self) -> Result<(), String> {
        let generation = self.revocations.generation();
        if generation == self.generation {
            return Ok(());
        }
        let Some((end_entity, intermediates)) = self.chain.split_first() else {
            return Err("no certificate".into());
        };
        match self
            .verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
        {
            Ok(_) => {
                self.generation = generation;
                Ok(())
            }
            Err(e) => {
                let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
                Err(failure(&io))
            }
        }
    }
}

/// How an ARPCP client calls over TLS: its configuration, and the role a server's
/// certificate must carry.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub peer_role: Role,
    /// The list the configuration's verifier checks against: a connection opened
    /// under an older generation of it is not reused (its peer may be revoked since).
    pub revocations: Option<Arc<Revocations>>,
}

impl ClientTls {
    /// The generation of the revocation list in force (0 without one).
    pub fn revocation_generation(&self) -> u64 {
        self.revocations.as_ref().map_or(0, |r| r.generation())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {}", failure(.0))]
    Failed(std::io::Error),
    #[error("TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("the peer's certificate is {} {:?}; a certificate of role {expected} is expected", .got.role, .got.name)]
    WrongRole { expected: Role, got: PeerIdentity },
}

/// rustls' error, led by a plain phrase when it is about a certificate's standing.
fn failure(e: &std::io::Error) -> String {
    match crl::certificate_verdict(e) {
        Some(verdict) => format!("{verdict} ({e})"),
        None => e.to_string(),
    }
}

/// Accepts a TLS session on `stream` and reads who the peer is from its verified
/// client certificate.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerIdentity), HandshakeError> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::Failed)?;
    let who = tls::peer_identity(tls.get_ref().1)?;
    Ok((tls, who))
}

/// Opens a TLS session to the server at `addr` on `stream`, checks that its
/// certificate carries the role expected, and says who the server is.
pub async fn connect(
    client: &ClientTls,
    addr: &str,
    stream: TcpStream,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, PeerIdentity), HandshakeError> {
    let connector = TlsConnector::from(client.config.clone());
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connector.connect(server_name(addr), stream),
    )
    .await
    .map_err(|_| HandshakeError::Timeout)?
    .map_err(HandshakeError::Failed)?;
    let who = tls::peer_identity(tls.get_ref().1)?;
    if who.role != client.peer_role {
        return Err(HandshakeError::WrongRole {
            expected: client.peer_role,
            got: who,
        });
    }
    Ok((tls, who))
}

/// The name sent in the handshake (SNI): the address's host. It is not checked
/// against the certificate (see the module's comment).
fn server_name(addr: &str) -> ServerName<'static> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return ServerName::IpAddress(sa.ip().into());
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// `tls::client_config` with a verifier that checks the chain, validity, usage and
/// revocation of the server's certificate against the CA, but not the name dialled.
fn client_config(
    files: &TlsFiles,
    revocations: Arc<Revocations>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let base = tls::client_config(files)?;
    let verifier = tls::server_verifier(files, revocations)?.any_name();
    let mut config = Arc::unwrap_or_clone(base);
    config.dangerous().set_certificate_verifier(verifier);
    Ok(Arc::new(config))
}
