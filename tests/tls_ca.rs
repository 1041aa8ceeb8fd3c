//! `arpcp ca init` and `arpcp ca issue` as an operator runs them: the real binary,
//! the files it leaves, their modes, and its refusals.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use arpcp::tls::{self, PeerIdentity, Role, TlsFiles};
use common::{run_to_exit, tempdir, WAIT};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Runs `arpcp ARGS` in `dir`; (success, stdout, stderr).
fn arpcp(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let (status, out, err) = run_to_exit(dir, args, WAIT);
    (status.success(), out, err)
}

/// The identity and DNS/IP SANs a certificate file carries.
fn read_cert(path: &Path) -> (PeerIdentity, Vec<String>) {
    let certs = tls::load_certs(path).unwrap();
    let identity = tls::identity_of(&certs[0]).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
    let sans = parsed
        .subject_alternative_name()
        .unwrap()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(s) => s.to_string(),
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        let octets: [u8; 4] = (*b).try_into().unwrap();
                        std::net::Ipv4Addr::from(octets).to_string()
                    }
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    (identity, sans)
}

#[test]
fn init_writes_the_ca_with_a_private_key_only_its_owner_reads() {
    let work = tempdir();
    let (ok, out, err) = arpcp(work.path(), &["ca", "init"]);
    assert!(ok, "ca init failed: {err}");
    // The default directory is ./arpcp-tls.
    let dir = work.path().join("arpcp-tls");
    assert!(out.contains("arpcp-tls/ca.pem"), "stdout: {out}");
    assert!(out.contains("arpcp-tls/ca-key.pem"), "stdout: {out}");
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(tls::load_certs(&dir.join("ca.pem")).unwrap().len(), 1);
    tls::load_key(&dir.join("ca-key.pem")).unwrap();
}

#[test]
fn init_refuses_to_overwrite_a_ca() {
    let work = tempdir();
    let (ok, _, err) = arpcp(work.path(), &["ca", "init", "--dir", "{dir}/pki"]);
    assert!(ok, "{err}");
    let ca = work.path().join("pki/ca.pem");
    let before = std::fs::read(&ca).unwrap();
    let key_before = std::fs::read(work.path().join("pki/ca-key.pem")).unwrap();

    let (ok, _, err) = arpcp(work.path(), &["ca", "init", "--dir", "{dir}/pki"]);
    assert!(!ok, "a second ca init succeeded");
    assert!(err.contains("a CA already exists"), "stderr: {err}");
    assert!(
        err.contains("to start over, remove ca.pem and ca-key.pem"),
        "stderr: {err}"
    );
    assert_eq!(std::fs::read(&ca).unwrap(), before);
    assert_eq!(
        std::fs::read(work.path().join("pki/ca-key.pem")).unwrap(),
        key_before
    );
}

#[test]
fn issue_without_a_ca_says_to_run_ca_init() {
    let work = tempdir();
    let (ok, _, err) = arpcp(
        work.path(),
        &["ca", "issue", "agent", "agent-1", "--dir", "{dir}/empty"],
    );
    assert!(!ok, "issued without a CA");
    assert!(err.contains("no CA in"), "stderr: {err}");
    assert!(err.contains("run `arpcp ca init"), "stderr: {err}");
    assert!(!work.path().join("empty/agent-1.pem").exists());
}

#[test]
fn issue_writes_certificates_that_carry_role_and_name() {
    let work = tempdir();
    let dir = work.path().join("arpcp-tls");
    assert!(arpcp(work.path(), &["ca", "init"]).0);

    let (ok, out, err) = arpcp(
        work.path(),
        &["ca", "issue", "agent", "agent-1", "--san", "10.0.0.7"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("agent-1.pem") && out.contains("agent-1-key.pem"),
        "{out}"
    );
    let (ok, _, err) = arpcp(work.path(), &["ca", "issue", "gateway", "--days", "30"]);
    assert!(ok, "{err}");
    let (ok, _, err) = arpcp(
        work.path(),
        &["ca", "issue", "client", "alice", "--role", "operator"],
    );
    assert!(ok, "{err}");

    for name in ["agent-1", "gateway", "alice"] {
        assert_eq!(mode(&dir.join(format!("{name}-key.pem"))), 0o600, "{name}");
        // Each pair loads as a mutual-TLS configuration against the CA.
        let files = TlsFiles::in_dir(&dir, name);
        tls::server_config(&files).unwrap();
        tls::client_config(&files).unwrap();
    }
    let agent = read_cert(&dir.join("agent-1.pem"));
    assert_eq!(
        agent.0,
        PeerIdentity {
            role: Role::Agent,
            name: "agent-1".into()
        }
    );
    assert_eq!(agent.1, ["agent-1", "10.0.0.7"]);
    let gateway = read_cert(&dir.join("gateway.pem"));
    assert_eq!(gateway.0.role, Role::Gateway);
    assert_eq!(gateway.0.name, "gateway");
    assert_eq!(gateway.1, ["gateway"]);
    let alice = read_cert(&dir.join("alice.pem"));
    assert_eq!(
        alice.0,
        PeerIdentity {
            role: Role::Operator,
            name: "alice".into()
        }
    );
}

#[test]
fn issue_refuses_what_it_cannot_do_and_says_why() {
    let work = tempdir();
    assert!(arpcp(work.path(), &["ca", "init"]).0);
    assert!(arpcp(work.path(), &["ca", "issue", "agent", "agent-1"]).0);
    let cert = work.path().join("arpcp-tls/agent-1.pem");
    let before = std::fs::read(&cert).unwrap();

    let cases: [(&[&str], &str); 6] = [
        (
            &["ca", "issue", "agent", "agent-1"],
            "agent-1.pem already exists",
        ),
        // crl.pem is the revocation list's file: a certificate there breaks `revoke`.
        (
            &["ca", "issue", "agent", "crl"],
            "collide with the revocation list",
        ),
        (
            &["ca", "issue", "agent", "../escape"],
            "invalid name \"../escape\"",
        ),
        (&["ca", "issue", "agent", "ca"], "collide with the CA"),
        (
            &["ca", "issue", "gateway", "--days", "0"],
            "--days must be 1 to 3650, got 0",
        ),
        (
            &["ca", "issue", "gateway", "--san", "not a host"],
            "invalid --san \"not a host\"",
        ),
    ];
    for (args, expected) in cases {
        let (ok, _, err) = arpcp(work.path(), args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: stderr: {err}");
    }
    let (ok, _, err) = arpcp(work.path(), &["ca", "issue", "client", "bob"]);
    assert!(!ok, "a client certificate without a role was issued");
    assert!(err.contains("--role"), "stderr: {err}");
    assert_eq!(std::fs::read(&cert).unwrap(), before, "agent-1.pem changed");
    assert!(!work.path().join("escape.pem").exists());
    assert!(!work.path().join("arpcp-tls/gateway.pem").exists());
}
