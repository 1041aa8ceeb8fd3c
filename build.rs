//! Compiles `proto/` into Rust with a pure-Rust protobuf compiler (no `protoc` needed)
//! and writes the descriptor set that server reflection serves.
use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/arpcp/v1/gateway.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("arpcp_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // prost's codec answers a request that does not decode with INTERNAL; ours
        // with INVALID_ARGUMENT (src/pb/codec.rs).
        .codec_path("crate::pb::codec::ArpcpCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
