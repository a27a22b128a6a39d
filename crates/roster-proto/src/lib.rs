//! Roster's protobuf schema (`proto/roster/v1/registry.proto`) and the code
//! generated from it: messages, the gRPC client and the server trait.
//! No logic lives here beyond the conversions between wire and model types.

/// Version 1 of the native API.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("roster.v1");
}

pub mod convert;
