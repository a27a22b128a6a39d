//! The Rust SDK of the Roster service registry.
//!
//! A [`Client`] holds one session with one of several registry nodes and
//! turns the registry's promises into behaviour an application can rely on:
//!
//! - **Registration** survives reconnects and failover: what you register
//!   (and subscribe to) is redone on the new session without your code
//!   noticing. [`Registration::deregister`] or [`Client::shutdown`] removes it.
//! - **Subscriptions** keep a local cache per service, merged from pushed
//!   deltas (applied only on the matching revision and verified by checksum;
//!   a gap or mismatch reloads the full view) with a periodic pull as the
//!   safety net. [`Client::instances`] answers from memory.
//! - **Empty-push protection** (on by default) holds back an update that
//!   would empty a service that had instances until a pull confirms it.
//! - **Disk failover cache**: with [`ClientBuilder::cache_dir`], last good
//!   views are written atomically; a client started while no registry is
//!   reachable serves them and reports [`Status::Degraded`].
//! - **Choosing an instance**: [`Client::select`] is weighted random over
//!   serving instances; [`Client::report_failure`] shields an address after
//!   repeated failures, and a multi-network instance sticks to the address
//!   that last worked.
//! - **Observability**: counters and gauges through the `metrics` facade
//!   (see [`metric_names`]) and [`Client::status`].
//!
//! ```no_run
//! use std::net::{IpAddr, Ipv4Addr};
//! use roster_client::{Change, Client, Instance};
//!
//! # async fn demo() -> Result<(), roster_client::ClientError> {
//! let client = Client::builder()
//!     .addresses(["127.0.0.1:9848", "127.0.0.1:19848"])
//!     .namespace("public")
//!     .client_name("orders-api")
//!     .cache_dir("/var/cache/orders-api/roster")
//!     .build()
//!     .await?;
//!
//! // Provider side: stays registered across reconnects until deregistered.
//! let me = Instance::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)), 8080);
//! let registration = client.register("orders", me).await?;
//!
//! // Consumer side: a live, cached view of another service.
//! let mut payments = client.subscribe("payments").await?;
//! if let Some(chosen) = client.select("payments") {
//!     println!("calling {}", chosen.address);
//!     // ... after the call:
//!     client.report_success(chosen.address);
//! }
//! while let Some(update) = payments.next().await {
//!     match update.change {
//!         Change::Reset(all) => println!("r{} reset: {} instances", update.revision, all.len()),
//!         Change::Added(i) => println!("r{} + {}", update.revision, i.id),
//!         Change::Changed(i) => println!("r{} ~ {}", update.revision, i.id),
//!         Change::Removed(id) => println!("r{} - {id}", update.revision),
//!     }
//! #   break;
//! }
//!
//! registration.deregister().await?;
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod acks;
pub mod balance;
pub mod cache;
mod client;
pub mod disk;
mod driver;
pub mod raw;
mod state;
mod stream;

pub use acks::{ACK_DELAY, AckSent};
pub use client::{Client, ClientBuilder, Registration, Selected, ServiceName, Subscription};
pub use raw::{Connection, Session};
pub use roster_core::{Address, Instance, ServiceKey, ValidationError};
pub use roster_proto::v1 as proto;
pub use state::{Change, Status, Update};

use thiserror::Error;

/// Largest message accepted from the registry: a full view of a very large
/// service (tens of thousands of instances with metadata) must fit.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The names of the metrics the client records through the `metrics`
/// facade (install any `metrics` recorder to collect them).
pub mod metric_names {
    /// Counter: sessions opened again after one broke.
    pub const RECONNECTS: &str = "roster_client_reconnects_total";
    /// Counter: reconnects that landed on a different registry address.
    pub const FAILOVERS: &str = "roster_client_failovers_total";
    /// Counter: pushed updates applied to a cache.
    pub const PUSHES_APPLIED: &str = "roster_client_pushes_applied_total";
    /// Counter: full views reloaded after a gap or checksum mismatch.
    pub const FULL_RELOADS: &str = "roster_client_full_reloads_total";
    /// Counter: updates held back by empty-push protection.
    pub const EMPTY_PUSHES_HELD: &str = "roster_client_empty_pushes_held_total";
    /// Gauge: addresses currently shielded after repeated failures.
    pub const SHIELDED_ADDRESSES: &str = "roster_client_shielded_addresses";
}

/// What went wrong talking to the registry, or with what the application
/// asked for.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The address is not usable.
    #[error("invalid server address {0:?}")]
    Address(String),
    /// The application's input is invalid (nothing was sent or stored).
    #[error(transparent)]
    Invalid(#[from] roster_core::ValidationError),
    /// The disk cache directory cannot be used.
    #[error("cannot use the cache directory {dir}: {reason}")]
    Cache {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// The registry could not be reached.
    #[error("cannot reach the registry at {addr}: {reason}")]
    Connect {
        /// Where we tried.
        addr: String,
        /// The innermost cause (transport errors repeat their sources).
        reason: String,
    },
    /// The registry refused or failed the call (its message is the whole
    /// text: the status is not repeated as a source).
    #[error("{}", status_text(.0))]
    Status(tonic::Status),
    /// The session ended (server gone or session expired), or the client
    /// was shut down.
    #[error("the session has ended")]
    SessionClosed,
    /// The server sent something that cannot be decoded.
    #[error("malformed message from the registry: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

/// What a status says; an HTTP answer where gRPC was expected is named as
/// such (a client pointed at the HTTP port).
fn status_text(s: &tonic::Status) -> String {
    let message = s.message();
    match message.strip_prefix("grpc-status header missing, mapped from HTTP status code ") {
        Some(code) => format!(
            "the server answered plain HTTP ({code}), not gRPC: this looks like the HTTP port; \
             give the gRPC port (by default the HTTP port + 1000, 9848)"
        ),
        None if message.is_empty() => format!("{:?}", s.code()),
        None => message.to_owned(),
    }
}
