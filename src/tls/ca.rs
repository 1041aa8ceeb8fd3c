//! The cluster CA: create one (ECDSA P-256) and issue certificates that carry a role,
//! all as PEM files in one directory an operator can read, copy and replace.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use super::{Role, TlsFiles, CA_CERT_FILE, CA_KEY_FILE};

/// The directory `arpcp ca` uses when given none.
pub const DEFAULT_DIR: &str = "arpcp-tls";
/// How long the CA is valid: long, since replacing it means reissuing every certificate.
pub const CA_DAYS: i64 = 3650;
/// How long an issued certificate is valid unless told otherwise.
pub const DEFAULT_DAYS: u32 = 365;
/// Longest validity `--days` may ask for: the CA's own.
pub const MAX_DAYS: u32 = 3650;
/// A certificate is valid from a little before it was made, so a peer whose clock is
/// slightly behind does not refuse it as not yet valid.
pub const CLOCK_SKEW_MINUTES: i64 = 5;
/// Longest NAME: the X.520 upper bound of a common name.
pub const MAX_NAME_CHARS: usize = 64;
/// Most `--san` entries on one certificate.
pub const MAX_SANS: usize = 16;
/// Longest `--san` host name (the DNS limit).
pub const MAX_SAN_CHARS: usize = 253;
/// How long a revocation list says it is current. The daemons re-read the file when
/// it changes rather than fetch a fresh one when this runs out, so it is long; every
/// `revoke` writes a new list anyway.
pub const CRL_DAYS: i64 = 3650;
/// Most certificates one revocation list names (it must stay under
/// `crl::MAX_CRL_FILE_BYTES`, which the daemons read).
pub const MAX_REVOKED: usize = 10_000;
/// Every certificate the CA issued, a line each, `SERIAL NAME` (the serial in hex):
/// `revoke NAME` revokes them all, so a name issued again after its files were
/// removed still shuts out the certificates handed out before.
pub const ISSUED_FILE: &str = "issued.txt";
/// The most `ISSUED_FILE` is read to (about 200,000 lines).
const MAX_ISSUED_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// The name a gateway certificate gets when none is given.
pub const DEFAULT_GATEWAY_NAME: &str = "gateway";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("a CA already exists in {dir} ({CA_CERT_FILE}); to start over, remove {CA_CERT_FILE} and {CA_KEY_FILE} there (certificates it issued will then no longer be trusted) or choose another --dir")]
    CaExists { dir: PathBuf },
    #[error("no CA in {dir} ({CA_CERT_FILE} and {CA_KEY_FILE} expected): run `arpcp ca init --dir {dir}` first")]
    NoCa { dir: PathBuf },
    #[error("{path} already exists: to issue a new certificate under that name, revoke this one first if it was handed out (`arpcp ca revoke NAME`), then remove NAME.pem and NAME-key.pem")]
    Exists { path: PathBuf },
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("invalid --san {value:?}: {reason}")]
    BadSan { value: String, reason: String },
    #[error("too many --san values: {count}, at most {MAX_SANS}")]
    TooManySans { count: usize },
    #[error("--days must be 1 to {MAX_DAYS}, got {days}")]
    BadDays { days: u32 },
    #[error("cannot read the CA's {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA's {path} is not usable: {source}")]
    BadCa { path: PathBuf, source: rcgen::Error },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no certificate to revoke: {path} is missing (a certificate issued as {name:?} is kept there) and {ISSUED_FILE} records none under that name")]
    NoCertificate { path: PathBuf, name: String },
    #[error("the record of issued certificates {path} cannot be read: {reason}")]
    BadIssued { path: PathBuf, reason: String },
    #[error("the certificate {path} cannot be read: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{name:?} (serial {serial}) is already revoked in {path}")]
    AlreadyRevoked {
        name: String,
        serial: String,
        path: PathBuf,
    },
    #[error("the revocation list {path} cannot be read: {reason}")]
    BadCrl { path: PathBuf, reason: String },
    #[error(
        "the revocation list {path} already names {MAX_REVOKED} certificates, the most it may"
    )]
    TooManyRevoked { path: PathBuf },
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// When an issued certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a few minutes ago for `days` days.
    pub fn days(days: u32) -> Result<Validity, CaError> {
        if days == 0 || days > MAX_DAYS {
            return Err(CaError::BadDays { days });
        }
        let now = OffsetDateTime::now_utc();
        Ok(Validity {
            not_before: now - Duration::minutes(CLOCK_SKEW_MINUTES),
            not_after: now + Duration::days(i64::from(days)),
        })
    }
}

/// What to issue: a role, a name, more host names or addresses to put in the SAN.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    pub role: Role,
    pub name: String,
    pub sans: Vec<String>,
    pub validity: Validity,
}

/// The files written by `init` or `issue`.
#[derive(Clone, Debug)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a CA in `dir` (made 0700 if missing); refuses if one is there.
pub fn init(dir: &Path) -> Result<Written, CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if cert_path.exists() || key_path.exists() {
        return Err(CaError::CaExists {
            dir: dir.to_path_buf(),
        });
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "arpcp cluster CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "arpcp");
    // Path length 0: the CA signs leaf certificates only, so a stolen leaf key can
    // never mint further certificates that chain to it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(CLOCK_SKEW_MINUTES);
    params.not_after = now + Duration::days(CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
    })
}

/// Issues a certificate signed by the CA in `dir`, written as `NAME.pem` and
/// `NAME-key.pem` there; refuses to replace either.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<Written, CaError> {
    check_name(&req.name)?;
    if req.sans.len() > MAX_SANS {
        return Err(CaError::TooManySans {
            count: req.sans.len(),
        });
    }
    let files = TlsFiles::in_dir(dir, &req.name);
    let ca_key_path = dir.join(CA_KEY_FILE);
    if !files.ca.exists() || !ca_key_path.exists() {
        return Err(CaError::NoCa {
            dir: dir.to_path_buf(),
        });
    }
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(CaError::Exists { path: path.clone() });
        }
    }
    let ca_key = KeyPair::from_pem(&read_ca(&ca_key_path)?).map_err(|source| CaError::BadCa {
        path: ca_key_path.clone(),
        source,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&read_ca(&files.ca)?, ca_key).map_err(|source| {
        CaError::BadCa {
            path: files.ca.clone(),
            source,
        }
    })?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, &req.name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, req.role.as_ou());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "arpcp");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Agents and the gateway each serve one socket and dial another (the gateway
    // dials agents, agents announce themselves to the gateway), so both need both.
    params.extended_key_usages = if req.role.is_client() {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = req.validity.not_before;
    params.not_after = req.validity.not_after;
    if !req.role.is_client() {
        if let Some(san) = san_of(&req.name) {
            params.subject_alt_names.push(san);
        }
    }
    for value in &req.sans {
        let san = parse_san(value)?;
        if !params.subject_alt_names.contains(&san) {
            params.subject_alt_names.push(san);
        }
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    write_pair(&files.cert, &cert.pem(), &files.key, &key.serialize_pem())?;
    record_issued(dir, &req.name, &serial_of(&files.cert)?)?;
    Ok(Written {
        cert: files.cert,
        key: files.key,
    })
}

/// Names become file names and CNs: letters, digits, `.`, `-`, `_`, starting with a
/// letter or digit, so no name can reach outside the directory or shadow the CA.
pub fn check_name(name: &str) -> Result<(), CaError> {
    let bad = |reason: String| CaError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(bad(format!("longer than {MAX_NAME_CHARS} characters")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(bad(format!(
            "{c:?} is not allowed (letters, digits, '.', '-', '_')"
        )));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("it must start with a letter or a digit".into()));
    }
    if name == "ca" || name.ends_with("-key") {
        return Err(bad(
            "it would collide with the CA's or a key's file name".into()
        ));
    }
    if format!("{name}.pem") == super::crl::CRL_FILE {
        return Err(bad(format!(
            "it would collide with the revocation list's file name ({})",
            super::crl::CRL_FILE
        )));
    }
    Ok(())
}

/// The SAN a NAME gives: an IP address, or a host name if it is a valid one (a name
/// with `_` is not, and is then only the CN).
fn san_of(name: &str) -> Option<SanType> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(SanType::IpAddress(ip));
    }
    rustls_pki_types::DnsName::try_from(name).ok()?;
    name.try_into().ok().map(SanType::DnsName)
}

fn parse_san(value: &str) -> Result<SanType, CaError> {
    let bad = |reason: &str| CaError::BadSan {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    if value.len() > MAX_SAN_CHARS {
        return Err(bad(&format!("longer than {MAX_SAN_CHARS} characters")));
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    rustls_pki_types::DnsName::try_from(value)
        .map_err(|_| bad("neither an IP address nor a valid host name"))?;
    value
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| bad("not ASCII"))
}

fn read_ca(path: &Path) -> Result<String, CaError> {
    let bytes = super::read_bounded(path).map_err(|e| match e {
        super::TlsError::Read { source, .. } => CaError::ReadCa {
            path: path.to_path_buf(),
            source,
        },
        other => CaError::ReadCa {
            path: path.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    String::from_utf8(bytes).map_err(|_| CaError::ReadCa {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not PEM text"),
    })
}

/// Writes the key (0600) and then the certificate, each only if absent; on failure
/// removes what it wrote, so a retry is not refused by a half-written pair.
fn write_pair(cert: &Path, cert_pem: &str, key: &Path, key_pem: &str) -> Result<(), CaError> {
    write_new(key, key_pem, 0o600)?;
    if let Err(e) = write_new(cert, cert_pem, 0o644) {
        let _ = std::fs::remove_file(key);
        return Err(e);
    }
    Ok(())
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let write_err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CaError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                write_err(source)
            }
        })?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        let _ = std::fs::remove_file(path);
        return Err(write_err(source));
    }
    Ok(())
}

/// What `revoke` did.
#[derive(Clone, Debug)]
pub struct Revoked {
    pub crl: PathBuf,
    /// The serial numbers revoked now, hex, comma-separated.
    pub serial: String,
    /// The new list's number (one more than the list it replaced).
    pub crl_number: u64,
}

/// One entry of an existing list, kept in the next one.
struct Entry {
    serial: Vec<u8>,
    at: OffsetDateTime,
}

/// Appends `SERIAL NAME` to `DIR/ISSUED_FILE`, on disk before `issue` returns.
fn record_issued(dir: &Path, name: &str, serial: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    let path = dir.join(ISSUED_FILE);
    let write = |source| CaError::Write {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(write)?;
    writeln!(f, "{} {name}", hex(serial)).map_err(write)?;
    f.sync_all().map_err(write)
}

/// The serials `DIR/ISSUED_FILE` records under `name` (none when there is no file:
/// a CA made before it was kept).
fn issued_serials(dir: &Path, name: &str) -> Result<Vec<Vec<u8>>, CaError> {
    use std::io::Read;
    let path = dir.join(ISSUED_FILE);
    let bad = |reason: String| CaError::BadIssued {
        path: path.clone(),
        reason,
    };
    let mut text = String::new();
    match std::fs::File::open(&path) {
        Ok(f) => f
            .take(MAX_ISSUED_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(bad(e.to_string())),
    };
    if text.len() as u64 > MAX_ISSUED_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_ISSUED_FILE_BYTES} bytes")));
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some((serial, who)) = line.trim().split_once(' ') else {
            continue;
        };
        if who != name {
            continue;
        }
        out.push(
            unhex(serial)
                .ok_or_else(|| bad(format!("line {}: {serial:?} is not a hex serial", i + 1)))?,
        );
    }
    Ok(out)
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Adds every certificate issued as NAME (`DIR/NAME.pem` and those `ISSUED_FILE`
/// records) to the CA's revocation list `DIR/crl.pem`, signed by the CA, with a CRL
/// number one more than the list it replaces. The new list replaces the old by a
/// rename, so a daemon never reads half of one.
pub fn revoke(dir: &Path, name: &str) -> Result<Revoked, CaError> {
    check_name(name)?;
    let files = TlsFiles::in_dir(dir, name);
    let ca_key_path = dir.join(CA_KEY_FILE);
    if !files.ca.exists() || !ca_key_path.exists() {
        return Err(CaError::NoCa {
            dir: dir.to_path_buf(),
        });
    }
    let mut serials = issued_serials(dir, name)?;
    if files.cert.exists() {
        serials.push(serial_of(&files.cert)?);
    }
    if serials.is_empty() {
        return Err(CaError::NoCertificate {
            path: files.cert.clone(),
            name: name.to_string(),
        });
    }
    let crl_path = files.crl();
    let (mut entries, number) = read_crl_entries(&crl_path)?;
    let mut new: Vec<Vec<u8>> = Vec::new();
    for serial in serials {
        if !entries.iter().any(|e| e.serial == serial) && !new.contains(&serial) {
            new.push(serial);
        }
    }
    if new.is_empty() {
        return Err(CaError::AlreadyRevoked {
            name: name.to_string(),
            serial: serial_of(&files.cert).map(|s| hex(&s)).unwrap_or_default(),
            path: crl_path,
        });
    }
    if entries.len() + new.len() > MAX_REVOKED {
        return Err(CaError::TooManyRevoked { path: crl_path });
    }
    let now = OffsetDateTime::now_utc();
    let serial_hex = new.iter().map(|s| hex(s)).collect::<Vec<_>>().join(", ");
    entries.extend(new.into_iter().map(|serial| Entry { serial, at: now }));
    let ca_key = KeyPair::from_pem(&read_ca(&ca_key_path)?).map_err(|source| CaError::BadCa {
        path: ca_key_path.clone(),
        source,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&read_ca(&files.ca)?, ca_key).map_err(|source| {
        CaError::BadCa {
            path: files.ca.clone(),
            source,
        }
    })?;
    let crl_number = number + 1;
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CRL_DAYS),
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs: entries
            .into_iter()
            .map(|e| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&e.serial),
                revocation_time: e.at,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    replace_file(&crl_path, &crl.pem()?)?;
    Ok(Revoked {
        crl: crl_path,
        serial: serial_hex,
        crl_number,
    })
}

/// The serial number of the certificate in `path`, without the sign padding.
fn serial_of(path: &Path) -> Result<Vec<u8>, CaError> {
    let bad = |reason: String| CaError::BadCertificate {
        path: path.to_path_buf(),
        reason,
    };
    let certs = super::load_certs(path).map_err(|e| bad(e.to_string()))?;
    let first = certs.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| bad(format!("not X.509: {e}")))?;
    Ok(strip_sign(cert.raw_serial()))
}

fn strip_sign(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The entries and number of the list at `path`, or none and 0 when it is absent.
fn read_crl_entries(path: &Path) -> Result<(Vec<Entry>, u64), CaError> {
    if !path.exists() {
        return Ok((Vec::new(), 0));
    }
    let bad = |reason: String| CaError::BadCrl {
        path: path.to_path_buf(),
        reason,
    };
    let crls = super::crl::read_crls(path).map_err(|e| bad(e.to_string()))?;
    let [der] = crls.as_slice() else {
        return Err(bad(format!(
            "it holds {} lists; `arpcp ca revoke` keeps one",
            crls.len()
        )));
    };
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let number = match crl.crl_number() {
        None => 0,
        Some(n) => {
            let bytes = n.to_bytes_be();
            if bytes.len() > 8 {
                return Err(bad("its CRL number is larger than 64 bits".into()));
            }
            bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
    };
    let entries = crl
        .iter_revoked_certificates()
        .map(|r| Entry {
            serial: strip_sign(r.raw_serial()),
            at: r.revocation_date.to_datetime(),
        })
        .collect();
    Ok((entries, number))
}

/// Writes `text` to a temporary file beside `path` and renames it over `path`.
fn replace_file(path: &Path, text: &str) -> Result<(), CaError> {
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, text, 0o644)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        CaError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}
