//! Roster's protobuf schema (`proto/roster/v1/registry.proto`), the Nacos
//! gRPC envelope, and the code generated from them: messages, the gRPC
//! clients and the server traits.
//! No logic lives here beyond the conversions between wire and model types.

/// The generated code, nested as the protobuf packages are (so that the
/// cluster protocol's references to `roster.v1` resolve).
#[allow(missing_docs, clippy::all)]
mod generated {
    pub mod roster {
        pub mod v1 {
            tonic::include_proto!("roster.v1");
        }
        pub mod cluster {
            pub mod v1 {
                tonic::include_proto!("roster.cluster.v1");
            }
        }
    }
}

/// Version 1 of the native API.
pub use generated::roster::v1;

/// The Nacos 2.x gRPC envelope (`Payload` with a JSON body), for the Nacos
/// compatibility layer. The protobuf has no package, hence the file name.
#[allow(missing_docs, non_camel_case_types, clippy::all)]
pub mod nacos {
    tonic::include_proto!("_");
}

/// The cluster protocol between members (`proto/roster/cluster/v1`).
pub use generated::roster::cluster::v1 as cluster_v1;

pub mod cluster;
pub mod codec;
pub mod convert;

/// The gRPC metadata key (and HTTP header) carrying a session's token: a
/// unary call acting for that session from elsewhere than its connection.
pub const SESSION_TOKEN_HEADER: &str = "x-roster-session-token";
/// The gRPC metadata key (and HTTP header) carrying the node's admin token
/// (operator calls).
pub const ADMIN_TOKEN_HEADER: &str = "x-roster-admin-token";
