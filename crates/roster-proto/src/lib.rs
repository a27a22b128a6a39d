//! Roster's protobuf schema (`proto/roster/v1/registry.proto`) and the code
//! generated from it: messages, the gRPC client and the server trait.
//! No logic lives here; conversions to the model are in `roster-core`'s users.
#![allow(missing_docs, clippy::all)]

/// Version 1 of the native API.
pub mod v1 {
    tonic::include_proto!("roster.v1");
}
