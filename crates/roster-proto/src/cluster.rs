//! The cluster protocol's codec: core replication messages
//! ([`roster_core::replication::Envelope`]) to and from their protobuf form
//! ([`crate::cluster_v1`]), and to and from bytes. Input from the wire is
//! untrusted: decoding is fallible and names what is wrong; it validates
//! shape only (names, ids, versions present), while instances are
//! validated when the registry applies them.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use roster_core::model::{Owner, ValidationError, Version};
use roster_core::replication::{Envelope, Message};
use roster_core::{ServiceKey, SessionData, SessionDelta, SessionState};

use crate::{cluster_v1 as pb, v1};

mod encode;

/// Why a cluster message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a protobuf `Envelope`.
    #[error("not a cluster message: {0}")]
    Bytes(#[from] prost::DecodeError),
    /// A protobuf `Envelope` that breaks the protocol.
    #[error("invalid cluster message: {0}")]
    Invalid(#[from] ValidationError),
}

/// The protobuf form of a message.
pub fn to_wire(envelope: &Envelope) -> pb::Envelope {
    use pb::envelope::Body;
    let body = match &envelope.body {
        Message::Sync {
            batch,
            sessions,
            deltas,
        } => Body::Sync(pb::Sync {
            batch: *batch,
            sessions: sessions
                .iter()
                .map(|(o, s)| state_to_wire(o, s, Duration::ZERO))
                .collect(),
            deltas: deltas.iter().map(|(o, d)| delta_to_wire(o, d)).collect(),
        }),
        Message::SyncAck { batch, wanted } => Body::SyncAck(pb::SyncAck {
            batch: *batch,
            wanted: wanted.iter().map(|s| s.to_string()).collect(),
        }),
        Message::Verify { sessions } => Body::Verify(pb::Verify {
            sessions: sessions
                .iter()
                .map(|(s, v)| pb::VerifiedSession {
                    session: s.to_string(),
                    version: Some(version_to_wire(*v)),
                })
                .collect(),
        }),
        Message::VerifyAnswer { wanted } => Body::VerifyAnswer(pb::VerifyAnswer {
            wanted: wanted.iter().map(|s| s.to_string()).collect(),
        }),
        Message::SnapshotRequest { after } => Body::SnapshotRequest(pb::SnapshotRequest {
            after: after.as_ref().map(owner_to_wire),
        }),
        Message::SnapshotChunk {
            sessions,
            next,
            after,
        } => Body::SnapshotChunk(pb::SnapshotChunk {
            after: after.as_ref().map(owner_to_wire),
            sessions: sessions
                .iter()
                .map(|(o, s, age)| state_to_wire(o, s, *age))
                .collect(),
            next: next.as_ref().map(owner_to_wire),
        }),
        Message::Loading => Body::Loading(pb::Loading {}),
    };
    pb::Envelope {
        from: envelope.from.to_string(),
        incarnation: envelope.incarnation,
        body: Some(body),
    }
}

/// The message a protobuf `Envelope` carries, and why each session state
/// in it that could not be read was left out (one bad session, say from a
/// newer version of Roster, does not cost the others of its batch).
pub fn from_wire(
    envelope: pb::Envelope,
) -> Result<(Envelope, Vec<ValidationError>), ValidationError> {
    use pb::envelope::Body;
    let from = name("from", &envelope.from)?;
    let mut skipped = Vec::new();
    let body = match envelope.body {
        None => return Err(ValidationError::new("body", "is required")),
        Some(Body::Sync(m)) => Message::Sync {
            batch: m.batch,
            sessions: states_from_wire(m.sessions, &mut skipped)
                .into_iter()
                .map(|(o, s, _)| (o, s))
                .collect(),
            deltas: m
                .deltas
                .into_iter()
                .filter_map(|d| delta_from_wire(d).map_err(|e| skipped.push(e)).ok())
                .collect(),
        },
        Some(Body::SyncAck(m)) => Message::SyncAck {
            batch: m.batch,
            wanted: m
                .wanted
                .into_iter()
                .map(|s| session_id("wanted", s))
                .collect::<Result<_, _>>()?,
        },
        Some(Body::Verify(m)) => Message::Verify {
            sessions: m
                .sessions
                .into_iter()
                .map(|s| {
                    let version = version_from_wire("verify.version", s.version)?;
                    Ok((session_id("verify.session", s.session)?, version))
                })
                .collect::<Result<_, ValidationError>>()?,
        },
        Some(Body::VerifyAnswer(m)) => Message::VerifyAnswer {
            wanted: m
                .wanted
                .into_iter()
                .map(|s| session_id("wanted", s))
                .collect::<Result<_, _>>()?,
        },
        Some(Body::SnapshotRequest(m)) => Message::SnapshotRequest {
            after: m.after.map(owner_from_wire).transpose()?,
        },
        Some(Body::SnapshotChunk(m)) => Message::SnapshotChunk {
            sessions: states_from_wire(m.sessions, &mut skipped),
            next: m.next.map(owner_from_wire).transpose()?,
            after: m.after.map(owner_from_wire).transpose()?,
        },
        Some(Body::Loading(_)) => Message::Loading,
    };
    let envelope = Envelope {
        from,
        incarnation: envelope.incarnation,
        body,
    };
    Ok((envelope, skipped))
}

/// A message as the bytes of its protobuf form (what the cluster port and
/// the simulation's in-memory transport carry). Session states are written
/// from the model without copying their instances first.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    encode::encode(envelope)
}

/// A message from bytes, and why each session state left out of it could
/// not be read (see [`from_wire`]).
pub fn decode(bytes: &[u8]) -> Result<(Envelope, Vec<ValidationError>), DecodeError> {
    Ok(from_wire(pb::Envelope::decode(bytes)?)?)
}

fn name(field: &str, value: &str) -> Result<roster_core::NodeName, ValidationError> {
    roster_core::model::validate_name(field, value)?;
    Ok(value.into())
}

fn session_id(field: &str, value: String) -> Result<roster_core::SessionId, ValidationError> {
    if value.is_empty() || value.len() > 256 {
        return Err(ValidationError::new(field, "must be 1..=256 bytes"));
    }
    Ok(value.into())
}

fn version_to_wire(v: Version) -> v1::Version {
    v1::Version {
        incarnation: v.incarnation,
        sequence: v.sequence,
    }
}

fn version_from_wire(field: &str, v: Option<v1::Version>) -> Result<Version, ValidationError> {
    let v = v.ok_or_else(|| ValidationError::new(field, "is required"))?;
    Ok(Version {
        incarnation: v.incarnation,
        sequence: v.sequence,
    })
}

fn owner_to_wire(o: &Owner) -> pb::Owner {
    pb::Owner {
        origin: o.origin.to_string(),
        session: o.session.to_string(),
    }
}

fn owner_from_wire(o: pb::Owner) -> Result<Owner, ValidationError> {
    Ok(Owner {
        origin: name("owner.origin", &o.origin)?,
        session: session_id("owner.session", o.session)?,
    })
}

/// Instances grouped by service, each with the version that set it.
fn services_to_wire<'a>(
    instances: impl IntoIterator<Item = (&'a ServiceKey, &'a roster_core::Instance, Version)>,
) -> Vec<pb::ServiceInstances> {
    let mut by_service: BTreeMap<&ServiceKey, Vec<v1::Instance>> = BTreeMap::new();
    for (key, instance, version) in instances {
        let mut i = v1::Instance::from_model(instance);
        i.version = Some(version_to_wire(version));
        by_service.entry(key).or_default().push(i);
    }
    by_service
        .into_iter()
        .map(|(k, instances)| pb::ServiceInstances {
            service: Some(k.into()),
            instances,
        })
        .collect()
}

fn services_from_wire(
    services: Vec<pb::ServiceInstances>,
) -> Result<Vec<(ServiceKey, roster_core::Instance, Version)>, ValidationError> {
    let mut instances = Vec::with_capacity(services.iter().map(|g| g.instances.len()).sum());
    for group in services {
        let key = crate::convert::required_key(group.service.as_ref())?;
        for i in group.instances {
            let v = version_from_wire("instance.version", i.version)?;
            instances.push((key.clone(), i.into_model()?, v));
        }
    }
    Ok(instances)
}

fn delta_to_wire(owner: &Owner, d: &SessionDelta) -> pb::SessionDelta {
    let mut removed: BTreeMap<&ServiceKey, Vec<String>> = BTreeMap::new();
    for (key, id) in &d.removed {
        removed.entry(key).or_default().push(id.clone());
    }
    pb::SessionDelta {
        owner: Some(owner_to_wire(owner)),
        base: Some(version_to_wire(d.base)),
        version: Some(version_to_wire(d.version)),
        upserts: services_to_wire(d.upserts.iter().map(|(k, i, v)| (k, i, *v))),
        removed: removed
            .into_iter()
            .map(|(k, ids)| pb::ServiceIds {
                service: Some(k.into()),
                ids,
            })
            .collect(),
    }
}

fn delta_from_wire(d: pb::SessionDelta) -> Result<(Owner, SessionDelta), ValidationError> {
    let owner = owner_from_wire(
        d.owner
            .ok_or_else(|| ValidationError::new("delta.owner", "is required"))?,
    )?;
    let mut removed = Vec::new();
    for group in d.removed {
        let key = crate::convert::required_key(group.service.as_ref())?;
        for id in group.ids {
            roster_core::model::validate_name("delta.removed", &id)?;
            removed.push((key.clone(), id));
        }
    }
    let delta = SessionDelta {
        base: version_from_wire("delta.base", d.base)?,
        version: version_from_wire("delta.version", d.version)?,
        upserts: services_from_wire(d.upserts)?,
        removed,
    };
    Ok((owner, delta))
}

fn state_to_wire(owner: &Owner, state: &SessionState, age: Duration) -> pb::SessionState {
    let unverified_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    match state {
        SessionState::Gone(v) => pb::SessionState {
            owner: Some(owner_to_wire(owner)),
            version: Some(version_to_wire(*v)),
            gone: true,
            services: Vec::new(),
            unverified_ms,
        },
        SessionState::Live(data) => pb::SessionState {
            owner: Some(owner_to_wire(owner)),
            version: Some(version_to_wire(data.version)),
            gone: false,
            unverified_ms,
            services: services_to_wire(data.instances.iter()),
        },
    }
}

fn states_from_wire(
    states: Vec<pb::SessionState>,
    skipped: &mut Vec<ValidationError>,
) -> Vec<(Owner, SessionState, Duration)> {
    states
        .into_iter()
        .filter_map(|s| state_from_wire(s).map_err(|e| skipped.push(e)).ok())
        .collect()
}

fn state_from_wire(
    s: pb::SessionState,
) -> Result<(Owner, SessionState, Duration), ValidationError> {
    let age = Duration::from_millis(s.unverified_ms);
    let owner = owner_from_wire(
        s.owner
            .ok_or_else(|| ValidationError::new("session.owner", "is required"))?,
    )?;
    let version = version_from_wire("session.version", s.version)?;
    if s.gone {
        return Ok((owner, SessionState::Gone(version), age));
    }
    let instances = services_from_wire(s.services)?;
    let live = SessionState::Live(SessionData {
        version,
        instances: instances.into(),
    });
    Ok((owner, live, age))
}

#[cfg(test)]
mod tests {
    use super::*;
    use roster_core::Instance;

    /// A version (shared with the encoder's tests).
    pub(super) fn v(i: u64, s: u64) -> Version {
        Version {
            incarnation: i,
            sequence: s,
        }
    }

    #[test]
    fn every_message_comes_back_as_it_went() {
        let owner = Owner {
            origin: "n1".into(),
            session: "s-1".into(),
        };
        let key = ServiceKey::new("public", "DEFAULT_GROUP", "orders").unwrap();
        let mut instance = Instance::new(std::net::IpAddr::from([10, 0, 0, 1]), 80)
            .normalize()
            .unwrap();
        instance.metadata.insert("zone", "a");
        let live = SessionState::Live(SessionData {
            version: v(3, 9),
            instances: vec![(key.clone(), instance.clone(), v(3, 8))].into(),
        });
        let delta = SessionDelta {
            base: v(3, 7),
            version: v(3, 9),
            upserts: vec![(key.clone(), instance, v(3, 8))],
            removed: vec![(key, "10.0.0.2#80#DEFAULT".into())],
        };
        let bodies = [
            Message::Sync {
                batch: 7,
                sessions: vec![(owner.clone(), live.clone())],
                deltas: vec![(owner.clone(), delta)],
            },
            Message::SyncAck {
                batch: 7,
                wanted: vec!["s-2".into()],
            },
            Message::Verify {
                sessions: vec![("s-1".into(), v(3, 9))],
            },
            Message::VerifyAnswer {
                wanted: vec!["s-1".into()],
            },
            Message::SnapshotRequest { after: None },
            Message::SnapshotRequest {
                after: Some(owner.clone()),
            },
            Message::SnapshotChunk {
                sessions: vec![(
                    owner.clone(),
                    SessionState::Gone(v(3, 10)),
                    Duration::from_millis(1500),
                )],
                next: Some(owner.clone()),
                after: Some(owner),
            },
            Message::Loading,
        ];
        for body in bodies {
            let e = Envelope {
                from: "n2".into(),
                incarnation: 4,
                body,
            };
            assert_eq!(decode(&encode(&e)).unwrap(), (e, vec![]));
        }
    }

    #[test]
    fn a_message_that_breaks_the_protocol_is_refused_by_name() {
        let no_body = pb::Envelope {
            from: "n".into(),
            incarnation: 1,
            body: None,
        };
        let err = decode(&no_body.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("body"), "{err}");
        let bad = pb::Envelope {
            from: "n".into(),
            incarnation: 1,
            body: Some(pb::envelope::Body::VerifyAnswer(pb::VerifyAnswer {
                wanted: vec![String::new()],
            })),
        };
        let err = decode(&bad.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("wanted"), "{err}");
        assert!(decode(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn an_unreadable_session_is_left_out_and_the_rest_of_its_batch_kept() {
        let good = |session: &str| pb::SessionState {
            owner: Some(pb::Owner {
                origin: "n1".into(),
                session: session.into(),
            }),
            version: Some(version_to_wire(v(1, 1))),
            gone: true,
            services: vec![],
            unverified_ms: 0,
        };
        let mut bad = good("s-2");
        bad.version = None;
        let wire = pb::Envelope {
            from: "n1".into(),
            incarnation: 1,
            body: Some(pb::envelope::Body::Sync(pb::Sync {
                batch: 3,
                sessions: vec![good("s-1"), bad, good("s-3")],
                deltas: vec![],
            })),
        };
        let (e, skipped) = decode(&wire.encode_to_vec()).unwrap();
        let Message::Sync {
            batch: 3, sessions, ..
        } = e.body
        else {
            panic!("{e:?}")
        };
        let ids: Vec<&str> = sessions.iter().map(|(o, _)| &*o.session).collect();
        assert_eq!(ids, ["s-1", "s-3"]);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].to_string().contains("version"), "{}", skipped[0]);
    }
}
