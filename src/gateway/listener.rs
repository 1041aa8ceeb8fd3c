//! The gateway's ARPCP side: where agents send SIGNALs and announce themselves.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::membership::Membership;
use super::scheduler::{Scheduler, SignalSender};
use crate::arpcp::server::{Handler, PeerInfo};
use crate::arpcp::{ProtocolError, Request, Response, VERSION};
use crate::tls::Role;

/// Probes started by announcements (`ID` with a `port`) in flight at once, over all
/// connections and peers. Each holds a connection and a task until the agent
/// answers or the probe times out, and anyone who reaches the listener can
/// announce, so without a bound a peer's IDs would start as many probes as it sends.
pub const MAX_ANNOUNCE_PROBES: usize = 64;

pub struct ControllerService {
    pub scheduler: Arc<Scheduler>,
    pub membership: Arc<Membership>,
    pub announcements: AnnounceProbes,
}

/// The probes that announcements started and that have not ended.
pub struct AnnounceProbes {
    permits: Arc<Semaphore>,
    /// Addresses being probed; at most `MAX_ANNOUNCE_PROBES`, one per permit.
    probing: Arc<Mutex<HashSet<String>>>,
}

impl Default for AnnounceProbes {
    fn default() -> Self {
        AnnounceProbes {
            permits: Arc::new(Semaphore::new(MAX_ANNOUNCE_PROBES)),
            probing: Arc::new(Mutex::new(HashSet::new())),
        }
    }
}

/// An address's place among the probes in flight, given back when its probe ends
/// (or its task is dropped at shutdown).
struct Probing {
    addr: String,
    probing: Arc<Mutex<HashSet<String>>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Probing {
    fn drop(&mut self) {
        self.probing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.addr);
    }
}

impl AnnounceProbes {
    /// Probes `addr` back unless it is being probed already. With
    /// `MAX_ANNOUNCE_PROBES` probes in flight the announcement is refused (300, which
    /// an agent's announce loop retries with backoff) rather than accepted and
    /// forgotten: an agent told 100 stops announcing.
    fn start(&self, addr: String, membership: &Arc<Membership>) -> Result<(), ProtocolError> {
        let place = {
            let mut probing = self.probing.lock().unwrap_or_else(|p| p.into_inner());
            if probing.contains(&addr) {
                debug!(%addr, "announced again while its probe runs; not probing twice");
                return Ok(());
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                debug!(%addr, "announcement refused: {MAX_ANNOUNCE_PROBES} probes in flight");
                return Err(ProtocolError::Busy {
                    what: "announcement not probed now",
                    work: "probes of announced addresses",
                    name: "MAX_ANNOUNCE_PROBES",
                    limit: MAX_ANNOUNCE_PROBES,
                    retry: "announce again later",
                });
            };
            probing.insert(addr.clone());
            Probing {
                addr: addr.clone(),
                probing: self.probing.clone(),
                _permit: permit,
            }
        };
        let membership = membership.clone();
        tokio::spawn(async move {
            membership.announced(addr).await;
            drop(place);
        });
        Ok(())
    }
}

impl Handler for ControllerService {
    async fn handle(&self, req: Request, peer: PeerInfo) -> Response {
        if let Err(e) = peer.require(req.method(), Role::Agent) {
            return Response::error(&e);
        }
        let answer = match req {
            Request::Signal(sig) => {
                let agent_id = peer
                    .identity
                    .as_ref()
                    .and_then(|who| self.membership.agent_of_certificate(&who.name));
                let sender = match &peer.identity {
                    None => SignalSender::Anyone,
                    Some(who) => SignalSender::Certified {
                        name: &who.name,
                        agent_id: agent_id.as_deref(),
                    },
                };
                self.scheduler.on_signal(sig, sender).await
            }
            Request::Id { port, .. } => {
                // An agent announcing itself: probe it back on its own port.
                port.map(|port| std::net::SocketAddr::new(peer.peer.ip(), port).to_string())
                    .map_or(Ok(()), |addr| {
                        self.announcements.start(addr, &self.membership)
                    })
                    .map(|()| Response::ok(json!({"role": "controller", "version": VERSION})))
            }
            other => Err(ProtocolError::MethodNotServed {
                method: other.method().as_str(),
                served: "SIGNAL and ID (a controller)",
            }),
        };
        answer.unwrap_or_else(|e| Response::error(&e))
    }

    fn server_name(&self) -> &'static str {
        "gateway"
    }
}
