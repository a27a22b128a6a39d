//! Generates the protobuf and gRPC code with `protox` (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/roster/v1/registry.proto",
        "proto/roster/cluster/v1/cluster.proto",
        "proto/nacos/nacos_grpc_service.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        // A handful of entries each, a million instances in a snapshot:
        // sorted maps decode without hashing and are already in the order
        // the model keeps.
        .btree_map(".roster.v1.Instance.metadata")
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
