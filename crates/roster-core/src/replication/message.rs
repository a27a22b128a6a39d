//! The messages cluster members exchange, as plain values: what each one
//! says is in `docs/replication.md`. Encoding them is `roster-proto`'s
//! (`roster_proto::cluster`); nothing here knows a wire format.

use crate::held::{SessionDelta, SessionState};
use std::time::Duration;

use crate::model::{NodeName, Owner, SessionId, Version};

/// One message from one member to another.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The sending member's name.
    pub from: NodeName,
    /// The sender's life: a greater one than last seen means it restarted.
    pub incarnation: u64,
    /// What it says.
    pub body: Message,
}

/// What one member tells another.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The current state of sessions the sender is responsible for.
    Sync {
        /// Numbers the batch, for its acknowledgement.
        batch: u64,
        /// Whole states of sessions (new to the receiver, or ended, or
        /// asked for whole).
        sessions: Vec<(Owner, SessionState)>,
        /// What changed in sessions since the version the receiver last
        /// acknowledged.
        deltas: Vec<(Owner, SessionDelta)>,
    },
    /// A [`Message::Sync`] batch was applied.
    SyncAck {
        /// The batch.
        batch: u64,
        /// Sessions of the batch whose delta could not be applied (the
        /// receiver does not hold them at its base): the sender sends them
        /// whole.
        wanted: Vec<SessionId>,
    },
    /// Part of the digest of the sessions the sender is responsible for
    /// (every one of its live sessions, in one or more messages per round):
    /// each listed session is still alive at that version.
    Verify {
        /// (session, version) of the sender's live sessions.
        sessions: Vec<(SessionId, Version)>,
    },
    /// The sessions of a [`Message::Verify`] the receiver lacks or holds
    /// older: the sender of the verify sends them.
    VerifyAnswer {
        /// Sessions of the verify's sender to send.
        wanted: Vec<SessionId>,
    },
    /// Asks for the next chunk of the receiver's snapshot: the sessions it
    /// holds (any origin), in owner order, after `after`.
    SnapshotRequest {
        /// The last session of the previous chunk; none for the first.
        after: Option<Owner>,
    },
    /// A chunk of a snapshot.
    SnapshotChunk {
        /// The sessions, in owner order, each with how long its origin has
        /// not vouched for it (zero for the sender's own), so that loading
        /// a snapshot does not lengthen the life of a dead node's data.
        sessions: Vec<(Owner, SessionState, Duration)>,
        /// The cursor to ask the next chunk with; none: this was the last.
        next: Option<Owner>,
        /// The cursor of the request this answers.
        after: Option<Owner>,
    },
    /// The receiver of a [`Message::SnapshotRequest`] is loading itself and
    /// has no snapshot to give.
    Loading,
}

impl Message {
    /// A short name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Sync { .. } => "sync",
            Message::SyncAck { .. } => "sync_ack",
            Message::Verify { .. } => "verify",
            Message::VerifyAnswer { .. } => "verify_answer",
            Message::SnapshotRequest { .. } => "snapshot_request",
            Message::SnapshotChunk { .. } => "snapshot_chunk",
            Message::Loading => "loading",
        }
    }
}
