//! Roster's protobuf schema (`proto/roster/v1/registry.proto`), the Nacos
//! gRPC envelope, and the code generated from them: messages, the gRPC
//! clients and the server traits.
//! No logic lives here beyond the conversions between wire and model types.

/// Version 1 of the native API.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("roster.v1");
}

/// The Nacos 2.x gRPC envelope (`Payload` with a JSON body), for the Nacos
/// compatibility layer. The protobuf has no package, hence the file name.
#[allow(missing_docs, non_camel_case_types, clippy::all)]
pub mod nacos {
    tonic::include_proto!("_");
}

pub mod convert;

/// The gRPC metadata key (and HTTP header) carrying a session's token: a
/// unary call acting for that session from elsewhere than its connection.
pub const SESSION_TOKEN_HEADER: &str = "x-roster-session-token";
/// The gRPC metadata key (and HTTP header) carrying the node's admin token
/// (operator calls).
pub const ADMIN_TOKEN_HEADER: &str = "x-roster-admin-token";
