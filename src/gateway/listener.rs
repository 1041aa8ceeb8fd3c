//! The gateway's ARPCP side: where agents send SIGNALs and announce themselves.

use std::sync::Arc;

use serde_json::json;

use super::membership::Membership;
use super::scheduler::{Scheduler, SignalSender};
use crate::arpcp::server::{Handler, PeerInfo};
use crate::arpcp::{ProtocolError, Request, Response, VERSION};
use crate::tls::Role;

pub struct ControllerService {
    pub scheduler: Arc<Scheduler>,
    pub membership: Arc<Membership>,
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
                if let Some(port) = port {
                    // An agent announcing itself: probe it back on its own port.
                    let addr = std::net::SocketAddr::new(peer.peer.ip(), port).to_string();
                    let membership = self.membership.clone();
                    tokio::spawn(async move { membership.announced(addr).await });
                }
                Ok(Response::ok(
                    json!({"role": "controller", "version": VERSION}),
                ))
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
