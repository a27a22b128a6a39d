//! Cluster messages carrying session states (sync, snapshot chunk) written
//! straight to protobuf bytes from the model, without first copying their
//! instances (shared with the registry's records) into `prost` structs.
//! Owns byte layout only: the bytes decode to exactly what
//! [`super::to_wire`] builds (the tests hold them to it).

use std::io::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use roster_core::model::{Instance, Owner, Version};
use roster_core::replication::{Envelope, Message};
use roster_core::{ServiceKey, SessionState};

/// The bytes of `envelope`'s protobuf form (`cluster_v1::Envelope`).
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let (tag, body) = match &envelope.body {
        Message::Sync {
            batch,
            sessions,
            deltas,
        } => {
            let states: Vec<Planned> = sessions
                .iter()
                .map(|(o, s)| Planned::new(o, s, Duration::ZERO))
                .collect();
            let deltas: Vec<_> = deltas
                .iter()
                .map(|(o, d)| super::delta_to_wire(o, d))
                .collect();
            (3, Body::Sync(*batch, states, deltas))
        }
        Message::SnapshotChunk {
            sessions,
            next,
            after,
        } => {
            let states = sessions
                .iter()
                .map(|(o, s, age)| Planned::new(o, s, *age))
                .collect();
            (8, Body::Chunk(states, next.as_ref(), after.as_ref()))
        }
        _ => return super::to_wire(envelope).encode_to_vec(),
    };
    let body_len = body.len();
    let len =
        str_len(1, &envelope.from) + u64_len(2, envelope.incarnation) + msg_len(tag, body_len);
    let mut buf = Vec::with_capacity(len);
    put_str(&mut buf, 1, &envelope.from);
    put_u64(&mut buf, 2, envelope.incarnation);
    put_header(&mut buf, tag, body_len);
    body.put(&mut buf);
    debug_assert_eq!(buf.len(), len, "planned and written lengths differ");
    buf
}

/// A message body made of session states.
enum Body<'a> {
    /// `Sync`: batch, whole states, deltas.
    Sync(u64, Vec<Planned<'a>>, Vec<crate::cluster_v1::SessionDelta>),
    /// `SnapshotChunk`: states, next, after.
    Chunk(Vec<Planned<'a>>, Option<&'a Owner>, Option<&'a Owner>),
}

impl Body<'_> {
    fn len(&self) -> usize {
        let states = |s: &[Planned], tag| s.iter().map(|p| msg_len(tag, p.len)).sum::<usize>();
        match self {
            Body::Sync(batch, states_, deltas) => {
                u64_len(1, *batch)
                    + states(states_, 2)
                    + deltas
                        .iter()
                        .map(|d| prost::encoding::message::encoded_len(3, d))
                        .sum::<usize>()
            }
            Body::Chunk(states_, next, after) => {
                let owner = |tag, o: &Option<&Owner>| o.map_or(0, |o| msg_len(tag, owner_len(o)));
                states(states_, 1) + owner(2, next) + owner(3, after)
            }
        }
    }

    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Body::Sync(batch, states, deltas) => {
                put_u64(buf, 1, *batch);
                for s in states {
                    s.put(buf, 2);
                }
                for d in deltas {
                    prost::encoding::message::encode(3, d, buf);
                }
            }
            Body::Chunk(states, next, after) => {
                for s in states {
                    s.put(buf, 1);
                }
                for (tag, owner) in [(2, next), (3, after)] {
                    if let Some(o) = owner {
                        put_header(buf, tag, owner_len(o));
                        put_owner(buf, o);
                    }
                }
            }
        }
    }
}

/// A `SessionState` with the lengths of its parts worked out, so that each
/// is computed once and the bytes are written in one pass.
struct Planned<'a> {
    owner: &'a Owner,
    version: Version,
    gone: bool,
    unverified_ms: u64,
    /// Its instances, those of one service next to each other.
    items: Vec<(&'a ServiceKey, &'a Instance, Version)>,
    /// Each service's group, in service order: where it starts and ends
    /// in `items`, its body's length.
    groups: Vec<(usize, usize, usize)>,
    /// Each instance's body length, as in `items`.
    lens: Vec<usize>,
    /// The state's body length.
    len: usize,
}

impl<'a> Planned<'a> {
    fn new(owner: &'a Owner, state: &'a SessionState, age: Duration) -> Self {
        let mut items: Vec<_> = match state {
            SessionState::Live(d) => d.instances.iter().collect(),
            SessionState::Gone(_) => Vec::new(),
        };
        // Shared instances come grouped by service; owned ones are put in
        // service order (as `to_wire` does).
        if let SessionState::Live(d) = state
            && matches!(d.instances, roster_core::Instances::Owned(_))
        {
            items.sort_by(|a, b| a.0.cmp(b.0));
        }
        let lens: Vec<usize> = items.iter().map(|(_, i, v)| instance_len(i, *v)).collect();
        let mut groups = Vec::new();
        let mut start = 0;
        while start < items.len() {
            let key = items[start].0;
            let end = start
                + items[start..]
                    .iter()
                    .take_while(|(k, _, _)| std::ptr::eq(*k, key) || *k == key)
                    .count();
            let instances: usize = lens[start..end].iter().map(|l| msg_len(2, *l)).sum();
            groups.push((start, end, msg_len(1, key_len_(key)) + instances));
            start = end;
        }
        // Shared records come in the session's map order: the groups are
        // put in service order (a handful of services per session, as a
        // rule), so the bytes are the same whatever that order.
        groups.sort_by(|a, b| items[a.0].0.cmp(items[b.0].0));
        let version = state.version();
        let gone = matches!(state, SessionState::Gone(_));
        let unverified_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let len = msg_len(1, owner_len(owner))
            + msg_len(2, version_len(version))
            + if gone { key_len(3) + 1 } else { 0 }
            + groups.iter().map(|(_, _, l)| msg_len(4, *l)).sum::<usize>()
            + u64_len(5, unverified_ms);
        Self {
            owner,
            version,
            gone,
            unverified_ms,
            items,
            groups,
            lens,
            len,
        }
    }

    /// Writes it as field `tag`.
    fn put(&self, buf: &mut Vec<u8>, tag: u32) {
        put_header(buf, tag, self.len);
        put_header(buf, 1, owner_len(self.owner));
        put_owner(buf, self.owner);
        put_version(buf, 2, self.version);
        if self.gone {
            put_bool(buf, 3, true);
        }
        for &(start, end, len) in &self.groups {
            put_header(buf, 4, len);
            let key = self.items[start].0;
            put_header(buf, 1, key_len_(key));
            put_str(buf, 1, &key.namespace);
            put_str(buf, 2, &key.group);
            put_str(buf, 3, &key.service);
            for n in start..end {
                let (_, instance, version) = self.items[n];
                put_header(buf, 2, self.lens[n]);
                put_instance(buf, instance, version);
            }
        }
        put_u64(buf, 5, self.unverified_ms);
    }
}

/// `roster.v1.Instance`'s body length (no owner; `version` set).
fn instance_len(i: &Instance, v: Version) -> usize {
    let addresses: usize = i
        .addresses
        .iter()
        .map(|a| {
            msg_len(
                2,
                str_len(1, &a.network) + msg_len_nonempty(2, ip_len(&a.ip)),
            )
        })
        .sum();
    let metadata: usize = i
        .metadata
        .iter()
        .map(|(k, v)| msg_len(9, str_len(1, k) + str_len(2, v)))
        .sum();
    str_len(1, &i.id)
        + addresses
        + u64_len(3, u64::from(i.port))
        + key_len(4)
        + 8
        + 3 * (key_len(5) + 1)
        + str_len(8, &i.cluster)
        + metadata
        + str_len(10, &i.node_name)
        + msg_len(12, version_len(v))
}

fn put_instance(buf: &mut Vec<u8>, i: &Instance, v: Version) {
    put_str(buf, 1, &i.id);
    for a in &i.addresses {
        put_header(
            buf,
            2,
            str_len(1, &a.network) + msg_len_nonempty(2, ip_len(&a.ip)),
        );
        put_str(buf, 1, &a.network);
        let mut text = [0u8; 64];
        let n = ip_text(&a.ip, &mut text);
        if n > 0 {
            put_header(buf, 2, n);
            buf.extend_from_slice(&text[..n]);
        }
    }
    put_u64(buf, 3, u64::from(i.port));
    encode_key(4, WireType::SixtyFourBit, buf);
    buf.extend_from_slice(&i.weight.to_le_bytes());
    put_bool(buf, 5, i.healthy);
    put_bool(buf, 6, i.enabled);
    put_bool(buf, 7, i.ephemeral);
    put_str(buf, 8, &i.cluster);
    for (k, value) in i.metadata.iter() {
        put_header(buf, 9, str_len(1, k) + str_len(2, value));
        put_str(buf, 1, k);
        put_str(buf, 2, value);
    }
    put_str(buf, 10, &i.node_name);
    put_version(buf, 12, v);
}

/// `ip` as text (its `Display` form, as `to_wire` writes it) in `out`:
/// its length.
fn ip_text(ip: &IpAddr, out: &mut [u8; 64]) -> usize {
    if let IpAddr::V4(v4) = ip {
        let mut n = 0;
        for (k, octet) in v4.octets().into_iter().enumerate() {
            if k > 0 {
                out[n] = b'.';
                n += 1;
            }
            if octet >= 100 {
                out[n] = b'0' + octet / 100;
                n += 1;
            }
            if octet >= 10 {
                out[n] = b'0' + octet / 10 % 10;
                n += 1;
            }
            out[n] = b'0' + octet % 10;
            n += 1;
        }
        return n;
    }
    let mut cursor = std::io::Cursor::new(&mut out[..]);
    // An IPv6 address is at most 45 characters.
    let _ = write!(cursor, "{ip}");
    cursor.position() as usize
}

fn ip_len(ip: &IpAddr) -> usize {
    if let IpAddr::V4(v4) = ip {
        let digits = |o: u8| 1 + usize::from(o >= 10) + usize::from(o >= 100);
        return 3 + v4.octets().into_iter().map(digits).sum::<usize>();
    }
    ip_text(ip, &mut [0u8; 64])
}

fn key_len_(k: &ServiceKey) -> usize {
    str_len(1, &k.namespace) + str_len(2, &k.group) + str_len(3, &k.service)
}

fn owner_len(o: &Owner) -> usize {
    str_len(1, &o.origin) + str_len(2, &o.session)
}

fn put_owner(buf: &mut Vec<u8>, o: &Owner) {
    put_str(buf, 1, &o.origin);
    put_str(buf, 2, &o.session);
}

fn version_len(v: Version) -> usize {
    u64_len(1, v.incarnation) + u64_len(2, v.sequence)
}

fn put_version(buf: &mut Vec<u8>, tag: u32, v: Version) {
    put_header(buf, tag, version_len(v));
    put_u64(buf, 1, v.incarnation);
    put_u64(buf, 2, v.sequence);
}

/// A length-delimited field of `len` bytes, written even if empty (a set
/// message field).
fn msg_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A length-delimited field of `len` bytes, left out if empty (a proto3
/// string).
fn msg_len_nonempty(tag: u32, len: usize) -> usize {
    if len == 0 { 0 } else { msg_len(tag, len) }
}

fn str_len(tag: u32, s: &str) -> usize {
    msg_len_nonempty(tag, s.len())
}

fn u64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn put_header(buf: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_str(buf: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        put_header(buf, tag, s.len());
        buf.extend_from_slice(s.as_bytes());
    }
}

fn put_u64(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

/// An `optional bool`: written whatever its value.
fn put_bool(buf: &mut Vec<u8>, tag: u32, v: bool) {
    encode_key(tag, WireType::Varint, buf);
    buf.push(u8::from(v));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use roster_core::model::{Address, InstanceRecord};
    use roster_core::{Instances, SessionData, SessionDelta};

    use super::super::tests::v;
    use super::*;
    use crate::cluster_v1 as pb;

    fn instance(ip: IpAddr, port: u16, metadata: &[(&str, &str)]) -> Instance {
        let mut i = Instance::new(ip, port).normalize().unwrap();
        for (k, value) in metadata {
            i.metadata.insert(k, value);
        }
        i
    }

    /// Instances that reach every branch of the layout: octets of one to
    /// three digits, IPv6, several networks, metadata with an empty value,
    /// weight 0, flags off, large versions.
    fn instances() -> Vec<(ServiceKey, Instance, Version)> {
        let a = ServiceKey::new("public", "DEFAULT_GROUP", "a").unwrap();
        let b = ServiceKey::new("ns-2", "g", "b").unwrap();
        let mut odd = instance(IpAddr::from([0, 9, 10, 255]), 1, &[("k", "")]);
        odd.addresses.push(Address {
            network: "storage".into(),
            ip: "fd00::1:0:0:2".parse().unwrap(),
        });
        odd.weight = 0.0;
        odd.healthy = false;
        odd.enabled = false;
        odd.node_name = "host-1".into();
        vec![
            (
                a.clone(),
                instance(
                    IpAddr::from([10, 0, 0, 1]),
                    80,
                    &[("zone", "a"), ("a", "1"), ("version", "1:2")],
                ),
                v(3, 8),
            ),
            (a.clone(), odd, v(u64::MAX, u64::MAX)),
            (
                b.clone(),
                instance("::ffff:1.2.3.4".parse().unwrap(), 65535, &[]),
                v(0, 0),
            ),
            (
                b,
                instance(IpAddr::from([100, 99, 199, 200]), 443, &[("x", "y")]),
                v(1, 300),
            ),
        ]
    }

    /// Shared instances, grouped by service (as a session's records are)
    /// but not in service order (as a session's map gives them).
    fn shared(owner: &Owner) -> Instances {
        let owner = Arc::new(owner.clone());
        let mut grouped = instances();
        grouped.sort_by(|a, b| b.0.cmp(&a.0));
        Instances::Shared(
            grouped
                .into_iter()
                .map(|(k, instance, version)| {
                    let record = InstanceRecord {
                        instance,
                        owner: owner.clone(),
                        version,
                        hash: 0,
                    };
                    (Arc::new(k), Arc::new(record))
                })
                .collect(),
        )
    }

    fn bodies() -> Vec<Message> {
        let owner = Owner {
            origin: "n1".into(),
            session: "s-1".into(),
        };
        let live = |instances: Instances| {
            SessionState::Live(SessionData {
                version: v(3, 9),
                instances,
            })
        };
        let (a, i, _) = instances().remove(0);
        let delta = SessionDelta {
            base: v(3, 7),
            version: v(3, 9),
            upserts: vec![(a.clone(), i, v(3, 8))],
            removed: vec![(a, "10.0.0.2#80#DEFAULT".into())],
        };
        // Owned instances out of service order, as a test may hold them.
        let mut reversed = instances();
        reversed.reverse();
        vec![
            Message::Sync {
                batch: 7,
                sessions: vec![
                    (owner.clone(), live(shared(&owner))),
                    (owner.clone(), live(reversed.into())),
                    (owner.clone(), SessionState::Gone(v(3, 10))),
                    (owner.clone(), live(Vec::new().into())),
                ],
                deltas: vec![(owner.clone(), delta)],
            },
            Message::Sync {
                batch: 0,
                sessions: vec![],
                deltas: vec![],
            },
            Message::SnapshotChunk {
                sessions: vec![
                    (
                        owner.clone(),
                        live(shared(&owner)),
                        Duration::from_millis(1500),
                    ),
                    (owner.clone(), SessionState::Gone(v(3, 10)), Duration::ZERO),
                ],
                next: Some(owner.clone()),
                after: None,
            },
            Message::SnapshotChunk {
                sessions: vec![],
                next: None,
                after: Some(owner),
            },
            Message::Loading,
        ]
    }

    #[test]
    fn written_bytes_decode_to_what_to_wire_builds() {
        for body in bodies() {
            let e = Envelope {
                from: "n2".into(),
                incarnation: 4,
                body,
            };
            let bytes = encode(&e);
            let decoded = pb::Envelope::decode(&bytes[..]).unwrap();
            assert_eq!(decoded, super::super::to_wire(&e), "{}", e.body.kind());
            // Fields, groups and map entries in prost's order: the bytes
            // are prost's own.
            assert_eq!(
                bytes,
                super::super::to_wire(&e).encode_to_vec(),
                "{}",
                e.body.kind()
            );
        }
    }

    #[test]
    fn an_ip_is_written_as_its_display_form() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "1.22.133.4",
            "::",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = [0u8; 64];
            let n = ip_text(&ip, &mut out);
            assert_eq!(std::str::from_utf8(&out[..n]).unwrap(), ip.to_string());
            assert_eq!(ip_len(&ip), n);
        }
    }
}
