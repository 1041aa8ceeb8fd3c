//! arpcp: run remote procedures on a cluster of machines. A gateway exposes a typed
//! gRPC API and drives agents over ARPCP, a line-delimited JSON protocol over TCP.

pub mod agent;
pub mod arpcp;
pub mod cli;
pub mod durable;
pub mod duration;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod opal;
pub mod retry;
pub mod size;
pub mod store;
pub mod tls;

/// Code generated from `proto/arpcp/v1/gateway.proto`.
pub mod pb {
    tonic::include_proto!("arpcp.v1");

    pub mod api;
    pub mod codec;
    pub mod json;

    /// The descriptor set that server reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/arpcp_descriptor.bin"));
}
