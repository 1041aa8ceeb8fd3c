//! Secure unless told otherwise: a daemon asked to listen beyond loopback without
//! TLS refuses to start, unless `--insecure` accepts plaintext, which it then logs.
//!
//! The check runs on the bound socket's address, not the text given: a host name
//! that resolves to a public address, `0.0.0.0` and `::` all count as reachable
//! from elsewhere, and only loopback (127.0.0.0/8, `::1`, also IPv4-mapped) does not.

use std::net::SocketAddr;

/// A listener a daemon opened, by where its address came from.
#[derive(Clone, Debug)]
pub struct Listening {
    /// How the user named it: `--listen`, `--grpc`, `listen in agent.toml`, …
    pub source: String,
    pub addr: SocketAddr,
    /// What a stranger who reaches it can do, for the refusal and the warning.
    pub exposes: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ExposureError {
    #[error(
        "refusing to listen on {addr} ({named_by}) without TLS: it is not a loopback address, \
         and anyone who reaches it could {exposes}; give --tls-dir DIR (certificates made \
         with `arpcp ca`) for mutual TLS, or --insecure to accept plaintext, unauthenticated \
         connections"
    )]
    Plaintext {
        named_by: String,
        addr: SocketAddr,
        exposes: &'static str,
    },
}

/// Whether only this host can reach `addr`.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The listeners that are reachable from other hosts, when they serve plaintext.
fn exposed(listeners: &[Listening], tls: bool) -> impl Iterator<Item = &Listening> {
    listeners
        .iter()
        .filter(move |l| !tls && !is_loopback(&l.addr))
}

/// Refuses the first plaintext listener beyond loopback unless `insecure`; with
/// `insecure`, logs one warning per such listener (at every start, so that a
/// restarted daemon says it again).
pub fn check(listeners: &[Listening], tls: bool, insecure: bool) -> Result<(), ExposureError> {
    for l in exposed(listeners, tls) {
        if !insecure {
            return Err(ExposureError::Plaintext {
                named_by: l.source.clone(),
                addr: l.addr,
                exposes: l.exposes,
            });
        }
        tracing::warn!(
            "--insecure: {} ({}) serves plaintext, unauthenticated connections: anyone who \
             reaches it can {}",
            l.addr,
            l.source,
            l.exposes
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: &str) -> Vec<Listening> {
        vec![Listening {
            source: "--listen".into(),
            addr: addr.parse().unwrap(),
            exposes: "run procedures",
        }]
    }

    #[test]
    fn only_loopback_is_private() {
        for a in [
            "127.0.0.1:1",
            "127.3.2.1:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(check(&at(a), false, false).is_ok(), "{a}");
        }
        for a in ["0.0.0.0:1", "[::]:1", "10.0.0.7:1", "[::ffff:10.0.0.7]:1"] {
            let e = check(&at(a), false, false).unwrap_err().to_string();
            assert!(e.contains("--listen") && e.contains("--tls-dir DIR"), "{e}");
            assert!(e.contains("--insecure"), "{e}");
            assert!(check(&at(a), true, false).is_ok(), "{a} with TLS");
            assert!(check(&at(a), false, true).is_ok(), "{a} with --insecure");
        }
    }
}
