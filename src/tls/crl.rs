//! Revocation: the CA's certificate revocation list (`crl.pem` beside `ca.pem`) as the
//! daemons see it, re-read when the file changes, and certificate verifiers that check
//! every handshake against the list in force at that moment.
//!
//! The file is looked at (one `stat`) at most once per `CRL_RECHECK`, from inside the
//! verifiers, so revoking a certificate needs no restart and no reload task: the next
//! handshake after the file changed sees it. A `crl.pem` that is present but cannot be
//! read or parsed refuses every certificate until it is fixed (failing open would let
//! a revoked holder back in without anyone noticing); an absent one revokes nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use tracing::{error, info};

use super::{provider, TlsError};

/// Where the CA's revocation list is kept in a certificate directory.
pub const CRL_FILE: &str = "crl.pem";
/// The revocation list file is looked at no more often than this: a handshake costs
/// at most one `stat` per interval, and a revocation takes effect within it.
pub const CRL_RECHECK: Duration = Duration::from_secs(1);
/// Largest `crl.pem` read: some 20,000 revoked certificates; anything larger is
/// refused unread.
pub const MAX_CRL_FILE_BYTES: u64 = 1024 * 1024;
/// Most CRLs taken from one `crl.pem`.
pub const MAX_CRLS: usize = 16;

/// What identifies one version of the file: a rewrite (a rename over it) changes the
/// inode, an edit in place the time or the length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

struct State {
    checked: Instant,
    stamp: Option<Stamp>,
    generation: u64,
    /// The lists in force, or why the file present is unusable.
    crls: Result<Arc<Vec<CertificateRevocationListDer<'static>>>, String>,
}

/// The revocation list in force for one certificate directory.
pub struct Revocations {
    path: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("path", &self.path)
            .finish()
    }
}

impl Revocations {
    /// The list at `path` (absent: nothing revoked). A file that is there but unusable
    /// is an error here, so a daemon does not start with it.
    pub fn load(path: &Path) -> Result<Arc<Revocations>, TlsError> {
        let stamp = stamp_of(path);
        let crls = match stamp {
            None => Arc::new(Vec::new()),
            Some(_) => Arc::new(read_crls(path)?),
        };
        Ok(Arc::new(Revocations {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                checked: Instant::now(),
                stamp,
                generation: 0,
                crls: Ok(crls),
            }),
        }))
    }

    /// The list in a certificate directory whose CA is `ca` (`crl.pem` beside it).
    pub fn beside(ca: &Path) -> Result<Arc<Revocations>, TlsError> {
        Revocations::load(&crl_path_beside(ca))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation of the list in force (it goes up each time the file changes)
    /// and the list, after looking at the file if `CRL_RECHECK` has passed.
    #[allow(clippy::type_complexity)]
    pub fn current(
        &self,
    ) -> (
        u64,
        Result<Arc<Vec<CertificateRevocationListDer<'static>>>, String>,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= CRL_RECHECK {
            state.checked = Instant::now();
            let stamp = stamp_of(&self.path);
            if stamp != state.stamp {
                state.stamp = stamp;
                state.generation += 1;
                state.crls = match stamp {
                    None => Ok(Arc::new(Vec::new())),
                    Some(_) => read_crls(&self.path)
                        .map(Arc::new)
                        .map_err(|e| e.to_string()),
                };
                match &state.crls {
                    Ok(list) => info!(
                        path = %self.path.display(),
                        crls = list.len(),
                        "revocation list changed; new handshakes are checked against it"
                    ),
                    Err(e) => error!(
                        path = %self.path.display(),
                        "revocation list unusable, every certificate is refused until it is fixed: {e}"
                    ),
                }
            }
        }
        (state.generation, state.crls.clone())
    }

    /// The generation of the list in force (see `current`).
    pub fn generation(&self) -> u64 {
        self.current().0
    }
}

/// `crl.pem` in the directory of the CA certificate `ca`.
pub fn crl_path_beside(ca: &Path) -> PathBuf {
    ca.parent()
        .map_or_else(|| PathBuf::from(CRL_FILE), |d| d.join(CRL_FILE))
}

fn stamp_of(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Every CRL in a PEM file, at least one.
pub fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = super::read_limited(path, MAX_CRL_FILE_BYTES)?;
    let mut crls = Vec::new();
    for item in CertificateRevocationListDer::pem_slice_iter(&bytes) {
        let crl = item.map_err(|source| TlsError::BadPem {
            path: path.to_path_buf(),
            what: "certificate revocation list",
            source,
        })?;
        if crls.len() == MAX_CRLS {
            return Err(TlsError::TooManyCrls {
                path: path.to_path_buf(),
            });
        }
        crls.push(crl);
    }
    if crls.is_empty() {
        return Err(TlsError::NoPem {
            path: path.to_path_buf(),
            what: "certificate revocation list",
        });
    }
    Ok(crls)
}

/// A verifier built for one generation of the list.
struct Built<V: ?Sized> {
    generation: u64,
    verifier: Result<Arc<V>, String>,
}

fn unusable(reason: &str) -> rustls::Error {
    rustls::Error::General(format!("the revocation list is unusable: {reason}"))
}

/// Checks client certificates against the CA and the revocation list in force.
pub struct RevocationAwareClientVerifier {
    roots: Arc<RootCertStore>,
    mandatory: bool,
    revocations: Arc<Revocations>,
    hints: Vec<DistinguishedName>,
    built: Mutex<Built<dyn ClientCertVerifier>>,
}

impl std::fmt::Debug for RevocationAwareClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationAwareClientVerifier")
            .field("mandatory", &self.mandatory)
            .field("revocations", &self.revocations)
            .finish()
    }
}

fn build_client(
    roots: &Arc<RootCertStore>,
    mandatory: bool,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().cloned())
        .only_check_end_entity_revocation();
    if !mandatory {
        b = b.allow_unauthenticated();
    }
    b.build().map_err(|e| e.to_string())
}

impl RevocationAwareClientVerifier {
    /// `mandatory`: a client must present a certificate (else one is asked for and
    /// checked when presented).
    pub fn new(
        roots: Arc<RootCertStore>,
        revocations: Arc<Revocations>,
        mandatory: bool,
    ) -> Result<Arc<Self>, TlsError> {
        let (generation, crls) = revocations.current();
        let path = revocations.path().to_path_buf();
        let crls = crls.map_err(|reason| TlsError::BadCrl {
            path: path.clone(),
            reason,
        })?;
        let first = build_client(&roots, mandatory, &crls)
            .map_err(|reason| TlsError::BadCrl { path, reason })?;
        let hints = first.root_hint_subjects().to_vec();
        Ok(Arc::new(RevocationAwareClientVerifier {
            roots,
            mandatory,
            revocations,
            hints,
            built: Mutex::new(Built {
                generation,
                verifier: Ok(first),
            }),
        }))
    }

    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let (generation, crls) = self.revocations.current();
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if built.generation != generation {
            built.generation = generation;
            built.verifier = crls.and_then(|c| build_client(&self.roots, self.mandatory, &c));
        }
        built.verifier.clone().map_err(|e| unusable(&e))
    }
}

impl ClientCertVerifier for RevocationAwareClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks server certificates against the CA and the revocation list in force.
pub struct RevocationAwareServerVerifier {
    roots: Arc<RootCertStore>,
    revocations: Arc<Revocations>,
    /// Whether the certificate must name the host dialled. ARPCP peers are
    /// reached at addresses learnt by scan or announcement, which no certificate
    /// lists: there the role and name in the certificate are checked instead.
    check_name: bool,
    built: Mutex<Built<WebPkiServerVerifier>>,
}

impl std::fmt::Debug for RevocationAwareServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationAwareServerVerifier")
            .field("revocations", &self.revocations)
            .finish()
    }
}

fn build_server(
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| e.to_string())
}

impl RevocationAwareServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        revocations: Arc<Revocations>,
    ) -> Result<Arc<Self>, TlsError> {
        let (generation, crls) = revocations.current();
        let path = revocations.path().to_path_buf();
        let crls = crls.map_err(|reason| TlsError::BadCrl {
            path: path.clone(),
            reason,
        })?;
        let first =
            build_server(&roots, &crls).map_err(|reason| TlsError::BadCrl { path, reason })?;
        Ok(Arc::new(RevocationAwareServerVerifier {
            roots,
            revocations,
            check_name: true,
            built: Mutex::new(Built {
                generation,
                verifier: Ok(first),
            }),
        }))
    }

    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The same checks (chain, validity, usage, revocation) without matching the
    /// certificate to the name dialled.
    pub fn any_name(&self) -> Arc<Self> {
        let built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        Arc::new(RevocationAwareServerVerifier {
            roots: self.roots.clone(),
            revocations: self.revocations.clone(),
            check_name: false,
            built: Mutex::new(Built {
                generation: built.generation,
                verifier: built.verifier.clone(),
            }),
        })
    }

    fn inner(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let (generation, crls) = self.revocations.current();
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if built.generation != generation {
            built.generation = generation;
            built.verifier = crls.and_then(|c| build_server(&self.roots, &c));
        }
        built.verifier.clone().map_err(|e| unusable(&e))
    }
}

impl ServerCertVerifier for RevocationAwareServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            // Name checks come last in webpki: the chain, validity, usage and
            // revocation have all passed when this is the only complaint.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A clear phrase for why a TLS session failed when it is about a certificate's
/// standing (revoked, expired, unknown to the list), from rustls' error inside `e`.
pub fn certificate_verdict(e: &std::io::Error) -> Option<&'static str> {
    use rustls::{AlertDescription, CertificateError, Error};
    let inner = e.get_ref()?.downcast_ref::<Error>()?;
    Some(match inner {
        Error::InvalidCertificate(CertificateError::Revoked) => "certificate revoked",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "certificate expired",
        Error::InvalidCertificate(CertificateError::UnknownRevocationStatus) => {
            "certificate not covered by the revocation list"
        }
        Error::AlertReceived(AlertDescription::CertificateRevoked) => {
            "our certificate revoked, says the peer"
        }
        Error::AlertReceived(AlertDescription::CertificateExpired) => {
            "our certificate expired, says the peer"
        }
        _ => return None,
    })
}
