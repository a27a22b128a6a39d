//! Generates the protobuf and gRPC code with `protox` (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/roster/v1/registry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
