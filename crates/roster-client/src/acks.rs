//! Acknowledgements held back briefly and sent together: the highest
//! revision per service, [`ACK_DELAY`] after the first one was held, in one
//! `Acks` message. Holds and numbers them; the session tasks send them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use roster_core::ServiceKey;
use roster_proto::v1;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::ClientError;

/// How long an acknowledgement is held back. Acks only feed the
/// registry's drain tracking, so a few milliseconds cost nothing there,
/// while sending them at once would put a thousand subscribers' acks on
/// the registry's cores in the middle of fanning a change out to them.
pub const ACK_DELAY: Duration = Duration::from_millis(20);

/// Acknowledgements not sent yet.
#[derive(Debug, Default)]
pub(crate) struct HeldAcks {
    held: HashMap<ServiceKey, u64>,
    since: Option<Instant>,
}

impl HeldAcks {
    /// Holds `revision` of `key` (acks are cumulative: the highest wins).
    /// True if nothing was held before it.
    pub(crate) fn hold(&mut self, key: &ServiceKey, revision: u64) -> bool {
        match self.held.get_mut(key) {
            Some(r) => *r = (*r).max(revision),
            None => {
                self.held.insert(key.clone(), revision);
            }
        }
        if self.since.is_some() {
            return false;
        }
        self.since = Some(Instant::now());
        true
    }

    /// When what is held should be sent; `None` if nothing is.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.since.map(|t| t + ACK_DELAY)
    }

    /// The message carrying everything held, which is then no longer held.
    pub(crate) fn take(&mut self) -> Option<v1::ClientMessage> {
        self.since = None;
        if self.held.is_empty() {
            return None;
        }
        let acks = self
            .held
            .drain()
            .map(|(key, revision)| v1::Ack {
                service: Some((&key).into()),
                revision,
            })
            .collect();
        Some(v1::ClientMessage {
            channel: 0,
            kind: Some(v1::client_message::Kind::Acks(v1::Acks { acks })),
        })
    }
}

/// A raw session's held acks, shared by its handle (which holds them) and
/// its task (which sends them). Messages are numbered from 1 so that each
/// ack can learn when the message carrying it went out.
pub(crate) struct AckQueue {
    /// The acks and the number of the message that will carry them.
    held: Mutex<(HeldAcks, u64)>,
    /// Wakes the task when the first ack is held.
    pub(crate) first_held: Notify,
    /// Messages sent so far, and whether the session has ended.
    sent: watch::Sender<(u64, bool)>,
}

impl AckQueue {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::new((HeldAcks::default(), 1)),
            first_held: Notify::new(),
            sent: watch::Sender::new((0, false)),
        })
    }

    /// Holds an ack; the future resolves once it has been sent.
    pub(crate) fn hold(&self, key: &ServiceKey, revision: u64) -> AckSent {
        let mut sent = self.sent.subscribe();
        let message = {
            let mut held = self.lock();
            if held.0.hold(key, revision) {
                self.first_held.notify_one();
            }
            held.1
        };
        AckSent(Box::pin(async move {
            match sent.wait_for(|&(n, ended)| n >= message || ended).await {
                Ok(s) if s.0 >= message => Ok(()),
                _ => Err(ClientError::SessionClosed),
            }
        }))
    }

    /// When the held acks should be sent; `None` if none are held.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.lock().0.due()
    }

    /// Takes what is held, as a message and its number.
    pub(crate) fn take(&self) -> Option<(v1::ClientMessage, u64)> {
        let mut held = self.lock();
        let message = held.0.take()?;
        let number = held.1;
        held.1 += 1;
        Some((message, number))
    }

    /// The message `number` is on its way.
    pub(crate) fn sent(&self, number: u64) {
        self.sent.send_modify(|s| s.0 = s.0.max(number));
    }

    /// The session ended: acks not sent yet never will be.
    pub(crate) fn end(&self) {
        self.sent.send_modify(|s| s.1 = true);
    }

    fn lock(&self) -> MutexGuard<'_, (HeldAcks, u64)> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolves once a held acknowledgement has been handed to the session
/// stream, or fails if the session ended first. Dropping it does not
/// withdraw the acknowledgement.
pub struct AckSent(Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>);

impl Future for AckSent {
    type Output = Result<(), ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("public", "DEFAULT_GROUP", name).unwrap()
    }

    #[tokio::test]
    async fn held_acks_keep_the_highest_revision_per_service_and_go_out_together() {
        let mut held = HeldAcks::default();
        assert!(held.due().is_none());
        assert!(held.take().is_none());
        assert!(held.hold(&key("a"), 5));
        assert!(!held.hold(&key("a"), 3));
        assert!(!held.hold(&key("b"), 7));
        assert!(held.due().is_some());
        let Some(v1::client_message::Kind::Acks(acks)) = held.take().and_then(|m| m.kind) else {
            panic!("expected one Acks message");
        };
        let mut got: Vec<_> = acks
            .acks
            .iter()
            .map(|a| (a.service.as_ref().unwrap().service.clone(), a.revision))
            .collect();
        got.sort();
        assert_eq!(got, [("a".to_owned(), 5), ("b".to_owned(), 7)]);
        assert!(held.due().is_none(), "nothing is held after take");
        assert!(held.hold(&key("a"), 6), "a new round starts");
    }

    #[tokio::test]
    async fn an_ack_resolves_when_its_message_is_sent_and_fails_when_the_session_ends() {
        let q = AckQueue::new();
        let first = q.hold(&key("a"), 1);
        let (_, number) = q.take().unwrap();
        let second = q.hold(&key("a"), 2);
        q.sent(number);
        first.await.unwrap();
        let pending = tokio::time::timeout(Duration::from_millis(50), second).await;
        assert!(pending.is_err(), "the second ack's message was not sent");
        let third = q.hold(&key("b"), 1);
        q.end();
        assert!(matches!(third.await, Err(ClientError::SessionClosed)));
    }
}
