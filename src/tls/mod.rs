//! Mutual TLS against the cluster's own CA: PEM files into rustls configurations, and
//! the peer's role and name read from its verified certificate.
//!
//! A certificate carries its holder's role as one subject organisational unit (OU):
//! `agent`, `gateway`, or a client's role `reader` / `submitter` / `operator`; its name
//! is the subject common name (CN). The OU, rather than a private extended-key-usage
//! OID, because it is the one field every PKI tool sets and shows
//! (`openssl req -subj "/OU=agent/CN=agent-1"`, `openssl x509 -subject`), so an
//! operator can replace `arpcp ca` with their own PKI. The standard EKUs still say what
//! a certificate may do in TLS (`serverAuth`, `clientAuth`) and rustls checks them.
//!
//! The crypto provider is rustls' `ring` one, passed explicitly to every builder so
//! nothing depends on a process-wide default being installed.

pub mod ca;
pub mod crl;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Largest PEM file read: a certificate chain of a few certificates or one key fits
/// many times over; anything larger is not one of ours and is refused unread.
pub const MAX_PEM_FILE_BYTES: u64 = 64 * 1024;

/// Most certificates taken from one PEM file (the CA bundle or a chain).
pub const MAX_PEM_CERTS: usize = 16;

/// Where the CA certificate is kept in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// Where the CA's private key is kept in a certificate directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// What a certificate allows its holder to be in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Gateway,
    /// A client that may read tasks (get, list, watch, describe).
    Reader,
    /// A reader that may also submit and cancel its own tasks.
    Submitter,
    /// A submitter that may also cancel any task and change the blacklist.
    Operator,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Agent,
        Role::Gateway,
        Role::Reader,
        Role::Submitter,
        Role::Operator,
    ];

    /// The subject OU that carries this role.
    pub fn as_ou(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Gateway => "gateway",
            Role::Reader => "reader",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
        }
    }

    pub fn from_ou(ou: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_ou() == ou)
    }

    /// A client's role, as opposed to a daemon's.
    pub fn is_client(self) -> bool {
        matches!(self, Role::Reader | Role::Submitter | Role::Operator)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_ou())
    }
}

/// Who the peer of a verified TLS connection is, by its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

/// The three files one party needs: the CA to trust, its own certificate and key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `arpcp ca` writes for NAME in DIR: `ca.pem`, `NAME.pem`, `NAME-key.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }

    /// The CA's revocation list: `crl.pem` beside `ca.pem` (read when present).
    pub fn crl(&self) -> PathBuf {
        crl::crl_path_beside(&self.ca)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_PEM_FILE_BYTES} bytes: not a PEM certificate or key")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no PEM {what}")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("{path} holds more than {MAX_PEM_CERTS} certificates")]
    TooManyCerts { path: PathBuf },
    #[error("{path}: malformed PEM {what}: {source}")]
    BadPem {
        path: PathBuf,
        what: &'static str,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: the CA certificate is not usable as a trust anchor: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{path} is larger than {limit} bytes: refused unread")]
    TooLargeFile { path: PathBuf, limit: u64 },
    #[error("{path} holds more than {} revocation lists", crl::MAX_CRLS)]
    TooManyCrls { path: PathBuf },
    #[error("the revocation list {path} is not usable: {reason}")]
    BadCrl { path: PathBuf, reason: String },
    #[error("cannot build the certificate verifier for the CA in {path}: {reason}")]
    Verifier { path: PathBuf, reason: String },
    #[error("{cert} and {key} do not make a usable certificate and key: {source}")]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate does not parse as X.509: {0}")]
    Unparsable(String),
    #[error("the peer's certificate has no subject common name (CN): its name is expected there")]
    NoName,
    #[error("the peer's certificate subject CN is not UTF-8 text")]
    NameNotText,
    #[error("the certificate of {name:?} names no role: a subject OU of agent, gateway, reader, submitter or operator is expected")]
    NoRole { name: String },
    #[error("the certificate of {name:?} names two roles ({first} and {second}): exactly one subject OU role is expected")]
    TwoRoles {
        name: String,
        first: Role,
        second: Role,
    },
}

/// The crypto provider every configuration here is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration that requires a client certificate signed by the CA in
/// `files.ca`, not revoked by `files.crl()`, and presents `files.cert`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(files, client_verifier(files)?)
}

/// A server configuration that presents `files.cert` and checks clients with `verifier`.
pub fn server_config_with(
    files: &TlsFiles,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = load_cert_and_key(files)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| cert_key_error(files, source))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| cert_key_error(files, source))?;
    // A resumed session skips the client certificate's verification: a peer revoked
    // since its first handshake would be let back in by its session ticket.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A server configuration for a listener where a client certificate is optional:
/// one presented must chain to the CA in `files.ca` and not be revoked, and none is
/// refused only later, by what the caller asks for. For the gRPC API, where bearer
/// tokens are the other way in. Offers `alpn` (gRPC clients such as Go's require `h2`).
pub fn server_config_optional_client(
    files: &TlsFiles,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = client_verifier_with(files, crl::Revocations::load(&files.crl())?, false)?;
    let mut config = Arc::unwrap_or_clone(server_config_with(files, verifier)?);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Requires a client certificate of the CA in `files.ca` that the revocation list
/// `files.crl()` does not revoke; the list is re-read when it changes.
pub fn client_verifier(files: &TlsFiles) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    client_verifier_with(files, crl::Revocations::load(&files.crl())?, true)
}

/// As `client_verifier`, with a revocation list shared with other verifiers, and
/// `mandatory: false` for a server that also takes clients without a certificate
/// (a certificate presented is still checked).
pub fn client_verifier_with(
    files: &TlsFiles,
    revocations: Arc<crl::Revocations>,
    mandatory: bool,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots = Arc::new(load_roots(&files.ca)?);
    Ok(crl::RevocationAwareClientVerifier::new(
        roots,
        revocations,
        mandatory,
    )?)
}

/// Checks a server's certificate against the CA in `files.ca` and the revocation
/// list `revocations`.
pub fn server_verifier(
    files: &TlsFiles,
    revocations: Arc<crl::Revocations>,
) -> Result<Arc<crl::RevocationAwareServerVerifier>, TlsError> {
    let roots = Arc::new(load_roots(&files.ca)?);
    crl::RevocationAwareServerVerifier::new(roots, revocations)
}

/// A client configuration that trusts only the CA in `files.ca` (minus what
/// `files.crl()` revokes) and presents `files.cert` when the server asks for it.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = server_verifier(files, crl::Revocations::load(&files.crl())?)?;
    let (chain, key) = load_cert_and_key(files)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| cert_key_error(files, source))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|source| cert_key_error(files, source))?;
    // Resuming would skip the server certificate's verification (and revocation).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn cert_key_error(files: &TlsFiles, source: rustls::Error) -> TlsError {
    TlsError::CertKey {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    }
}

/// The role and name of the peer of a connection whose handshake finished, from the
/// certificate rustls verified against the CA.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<PeerIdentity, IdentityError> {
    let cert = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(IdentityError::NoCertificate)?;
    identity_of(cert)
}

/// The role (subject OU) and name (subject CN) a certificate carries. It does not
/// verify the certificate: call it on one the TLS handshake verified.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let subject = parsed.subject();
    let name = subject
        .iter_common_name()
        .next()
        .ok_or(IdentityError::NoName)?
        .as_str()
        .map_err(|_| IdentityError::NameNotText)?
        .to_string();
    let mut role = None;
    // Other OUs an operator's own PKI may set are not ours to judge; two of our
    // roles in one certificate would make its holder's rights a guess.
    for ou in subject.iter_organizational_unit() {
        let Some(found) = ou.as_str().ok().and_then(Role::from_ou) else {
            continue;
        };
        match role {
            None => role = Some(found),
            Some(first) if first != found => {
                return Err(IdentityError::TwoRoles {
                    name,
                    first,
                    second: found,
                })
            }
            Some(_) => {}
        }
    }
    let role = role.ok_or_else(|| IdentityError::NoRole { name: name.clone() })?;
    Ok(PeerIdentity { role, name })
}

/// A file's bytes, refusing one larger than `MAX_PEM_FILE_BYTES` without reading it all.
fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_limited(path, MAX_PEM_FILE_BYTES).map_err(|e| match e {
        TlsError::TooLargeFile { path, .. } => TlsError::TooLarge { path },
        other => other,
    })
}

/// A file's bytes, refusing one larger than `limit` without reading it all.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(TlsError::TooLargeFile {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

/// Every certificate in a PEM file, at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        let cert = item.map_err(|source| TlsError::BadPem {
            path: path.to_path_buf(),
            what: "certificate",
            source,
        })?;
        if certs.len() == MAX_PEM_CERTS {
            return Err(TlsError::TooManyCerts {
                path: path.to_path_buf(),
            });
        }
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPem {
            path: path.to_path_buf(),
            what: "private key",
        },
        source => TlsError::BadPem {
            path: path.to_path_buf(),
            what: "private key",
            source,
        },
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

fn load_cert_and_key(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    Ok((load_certs(&files.cert)?, load_key(&files.key)?))
}

#[cfg(test)]
mod tests;
