//! Real TLS handshakes over loopback TCP between configurations loaded from the
//! files `ca::init` and `ca::issue` write.

use std::path::Path;

use rustls_pki_types::ServerName;
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::ca::{self, IssueRequest, Validity};
use super::*;

fn issue(dir: &Path, role: Role, name: &str, validity: Validity) {
    ca::issue(
        dir,
        &IssueRequest {
            role,
            name: name.to_string(),
            sans: vec![],
            validity,
        },
    )
    .unwrap();
}

/// A directory with a CA, a gateway certificate and an agent certificate.
fn cluster_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ca::init(dir.path()).unwrap();
    issue(
        dir.path(),
        Role::Gateway,
        "gateway",
        Validity::days(1).unwrap(),
    );
    issue(
        dir.path(),
        Role::Agent,
        "agent-1",
        Validity::days(1).unwrap(),
    );
    dir
}

/// What each side saw of one handshake: the server's view of its peer, and whether
/// the client could exchange a byte over the connection.
struct Outcome {
    server: Result<PeerIdentity, String>,
    client_echo: Result<u8, String>,
}

/// The gateway config serves one connection on loopback; a client with `client_files`
/// connects to it as "gateway", sends a byte and reads it back.
async fn handshake(server_files: &TlsFiles, client_files: &TlsFiles) -> Outcome {
    handshake_with(
        server_config(server_files).unwrap(),
        client_config(client_files).unwrap(),
    )
    .await
}

/// `handshake` with configurations made beforehand (and kept across handshakes).
async fn handshake_with(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Outcome {
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let who = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(&byte).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(who)
    });
    let client_echo = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("gateway").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(&[42]).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(byte[0])
    }
    .await;
    let server = tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the server side ends within 10 s")
        .unwrap();
    Outcome {
        server,
        client_echo,
    }
}

/// A certificate of another CA fails verification: as `BadSignature` when that CA
/// copied our CA's name (as `ca init` elsewhere does), `UnknownIssuer` otherwise.
fn refused_as_foreign(err: &str) -> bool {
    err.contains("invalid peer certificate")
        && (err.contains("BadSignature") || err.contains("UnknownIssuer"))
}

#[tokio::test]
async fn agent_certificate_is_accepted_and_identified() {
    let dir = cluster_dir();
    let out = handshake(
        &TlsFiles::in_dir(dir.path(), "gateway"),
        &TlsFiles::in_dir(dir.path(), "agent-1"),
    )
    .await;
    assert_eq!(
        out.server,
        Ok(PeerIdentity {
            role: Role::Agent,
            name: "agent-1".into()
        })
    );
    assert_eq!(out.client_echo, Ok(42));
}

#[tokio::test]
async fn client_role_is_read_back() {
    let dir = cluster_dir();
    issue(
        dir.path(),
        Role::Submitter,
        "alice",
        Validity::days(1).unwrap(),
    );
    let out = handshake(
        &TlsFiles::in_dir(dir.path(), "gateway"),
        &TlsFiles::in_dir(dir.path(), "alice"),
    )
    .await;
    assert_eq!(
        out.server,
        Ok(PeerIdentity {
            role: Role::Submitter,
            name: "alice".into()
        })
    );
}

#[tokio::test]
async fn certificate_of_another_ca_is_refused() {
    let dir = cluster_dir();
    // An impostor with a CA of its own, issuing itself the same agent name.
    let other = tempfile::tempdir().unwrap();
    ca::init(other.path()).unwrap();
    issue(
        other.path(),
        Role::Agent,
        "agent-1",
        Validity::days(1).unwrap(),
    );
    let impostor = TlsFiles {
        // It trusts the real CA, so only the server's check of it can refuse it.
        ca: dir.path().join(CA_CERT_FILE),
        ..TlsFiles::in_dir(other.path(), "agent-1")
    };
    let out = handshake(&TlsFiles::in_dir(dir.path(), "gateway"), &impostor).await;
    let err = out.server.expect_err("the impostor is refused");
    assert!(refused_as_foreign(&err), "server error: {err}");
    assert!(out.client_echo.is_err(), "the impostor exchanged data");
}

#[tokio::test]
async fn server_of_another_ca_is_refused_by_the_client() {
    let dir = cluster_dir();
    let other = tempfile::tempdir().unwrap();
    ca::init(other.path()).unwrap();
    issue(
        other.path(),
        Role::Gateway,
        "gateway",
        Validity::days(1).unwrap(),
    );
    let fake_gateway = TlsFiles {
        ca: dir.path().join(CA_CERT_FILE),
        ..TlsFiles::in_dir(other.path(), "gateway")
    };
    let out = handshake(&fake_gateway, &TlsFiles::in_dir(dir.path(), "agent-1")).await;
    let err = out.client_echo.expect_err("the fake gateway is refused");
    assert!(refused_as_foreign(&err), "client error: {err}");
    assert!(out.server.is_err());
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let dir = cluster_dir();
    let now = OffsetDateTime::now_utc();
    issue(
        dir.path(),
        Role::Agent,
        "old-agent",
        Validity {
            not_before: now - Duration::days(2),
            not_after: now - Duration::days(1),
        },
    );
    let out = handshake(
        &TlsFiles::in_dir(dir.path(), "gateway"),
        &TlsFiles::in_dir(dir.path(), "old-agent"),
    )
    .await;
    let err = out.server.expect_err("the expired certificate is refused");
    assert!(err.contains("certificate expired"), "server error: {err}");
    assert!(out.client_echo.is_err());
}

#[test]
fn identity_needs_exactly_one_role() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert_with = |ous: &[&str]| {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "x");
        for ou in ous {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationalUnitName, *ou);
        }
        params.self_signed(&key).unwrap().der().clone()
    };
    assert_eq!(
        identity_of(&cert_with(&[])),
        Err(IdentityError::NoRole { name: "x".into() })
    );
    assert_eq!(
        identity_of(&cert_with(&["ops-team"])),
        Err(IdentityError::NoRole { name: "x".into() })
    );
    assert_eq!(
        identity_of(&cert_with(&["operator"])),
        Ok(PeerIdentity {
            role: Role::Operator,
            name: "x".into()
        })
    );
}

#[test]
fn missing_and_oversized_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::in_dir(dir.path(), "nobody");
    let err = server_config(&files).unwrap_err().to_string();
    assert!(err.contains("ca.pem"), "{err}");
    let big = dir.path().join("ca.pem");
    std::fs::write(&big, vec![b'A'; MAX_PEM_FILE_BYTES as usize + 1]).unwrap();
    let err = client_config(&files).unwrap_err().to_string();
    assert!(err.contains("larger than"), "{err}");
    std::fs::write(&big, "not pem").unwrap();
    let err = client_config(&files).unwrap_err().to_string();
    assert!(err.contains("holds no PEM certificate"), "{err}");
}

#[test]
fn names_that_could_escape_the_directory_are_refused() {
    for name in [
        "",
        "../x",
        "a/b",
        "ca",
        "x-key",
        ".hidden",
        "-x",
        &"a".repeat(65),
    ] {
        assert!(ca::check_name(name).is_err(), "{name:?} accepted");
    }
    for name in ["agent-1", "gw.example.org", "host_2", "10.0.0.5"] {
        assert!(ca::check_name(name).is_ok(), "{name:?} refused");
    }
}

#[tokio::test]
async fn revoked_certificate_is_refused_and_the_list_grows_by_number() {
    let dir = cluster_dir();
    issue(
        dir.path(),
        Role::Agent,
        "agent-2",
        Validity::days(1).unwrap(),
    );
    let first = ca::revoke(dir.path(), "agent-1").unwrap();
    assert_eq!(first.crl_number, 1);
    assert_eq!(first.crl, dir.path().join(crl::CRL_FILE));
    let gateway = TlsFiles::in_dir(dir.path(), "gateway");
    let out = handshake(&gateway, &TlsFiles::in_dir(dir.path(), "agent-1")).await;
    let err = out.server.expect_err("the revoked agent is refused");
    assert!(err.contains("Revoked"), "server error: {err}");
    assert!(out.client_echo.is_err());
    let out = handshake(&gateway, &TlsFiles::in_dir(dir.path(), "agent-2")).await;
    assert_eq!(out.client_echo, Ok(42), "agent-2 is not revoked");

    let second = ca::revoke(dir.path(), "agent-2").unwrap();
    assert_eq!(second.crl_number, 2);
    // The second list still names the first certificate.
    let out = handshake(&gateway, &TlsFiles::in_dir(dir.path(), "agent-1")).await;
    assert!(out.server.is_err(), "agent-1 is let in again");

    let again = ca::revoke(dir.path(), "agent-1").unwrap_err().to_string();
    assert!(again.contains("already revoked"), "{again}");
    let unknown = ca::revoke(dir.path(), "nobody").unwrap_err().to_string();
    assert!(unknown.contains("nobody.pem is missing"), "{unknown}");
}

#[tokio::test]
async fn configurations_made_before_a_revocation_enforce_it() {
    let dir = cluster_dir();
    let gateway = TlsFiles::in_dir(dir.path(), "gateway");
    let agent = TlsFiles::in_dir(dir.path(), "agent-1");
    // Both ends as a running gateway has them: made before the revocation.
    let gateway_server = server_config(&gateway).unwrap();
    let gateway_client = client_config(&gateway).unwrap();
    let agent_server = server_config(&agent).unwrap();
    let agent_client = client_config(&agent).unwrap();
    let out = handshake_with(gateway_server.clone(), agent_client.clone()).await;
    assert_eq!(out.client_echo, Ok(42));

    ca::revoke(dir.path(), "agent-1").unwrap();
    let deadline = std::time::Instant::now() + crl::CRL_RECHECK * 5;
    let refused = loop {
        let out = handshake_with(gateway_server.clone(), agent_client.clone()).await;
        if let Err(e) = out.server {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway still takes agent-1 {:?} after the revocation",
            crl::CRL_RECHECK * 5
        );
        tokio::time::sleep(crl::CRL_RECHECK / 4).await;
    };
    assert!(refused.contains("Revoked"), "{refused}");
    // Dialling the revoked agent: its certificate is refused by the gateway's client.
    let out = handshake_with(agent_server, gateway_client).await;
    let err = out
        .client_echo
        .expect_err("the gateway talks to a revoked agent");
    assert!(err.contains("Revoked"), "{err}");
}

#[test]
fn an_unusable_list_is_named() {
    let dir = cluster_dir();
    std::fs::write(dir.path().join(crl::CRL_FILE), "not a list").unwrap();
    let err = server_config(&TlsFiles::in_dir(dir.path(), "gateway"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("crl.pem") && err.contains("revocation list"),
        "{err}"
    );
}
