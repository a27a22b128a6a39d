//! A Nacos gRPC request body, read in one pass into the fields the
//! handlers use and borrowing its strings from the payload. Reading is
//! tolerant as clients differ: absent and `null` are the same, and a field
//! takes whatever JSON type is sent (numbers and booleans also as strings).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use roster_core::{Instance, Metadata, ServiceKey, ValidationError};
use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::wire;

/// One field as sent.
#[derive(Debug, Default, Clone, PartialEq)]
pub enum Field<'a> {
    /// Absent or `null`.
    #[default]
    Absent,
    Text(Cow<'a, str>),
    Bool(bool),
    Int(i64),
    Float(f64),
    /// An object or an array.
    Other,
}

impl Field<'_> {
    /// A string; anything else is `None`.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Text(t) => Some(t),
            _ => None,
        }
    }

    /// A boolean, also as a string in any case.
    pub fn flag(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            Self::Text(t) => t.to_ascii_lowercase().parse().ok(),
            _ => None,
        }
    }

    /// An integer (a fraction is cut), also as a string.
    pub fn integer(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            Self::Float(f) => Some(*f as i64),
            Self::Text(t) => t.trim().parse().ok(),
            _ => None,
        }
    }

    /// A number, also as a string.
    pub fn number(&self) -> Option<f64> {
        match self {
            Self::Int(i) => Some(*i as f64),
            Self::Float(f) => Some(*f),
            Self::Text(t) => t.trim().parse().ok(),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for FieldVisitor<'a> {
    type Value = Field<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Field::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Field::Float(v as f64), Field::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Field::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Absent)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Absent)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Field::deserialize(d)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
}

/// An object field read as `T` (or, for a list `T`, an array); absent or
/// `null` is `Absent`, any other value `Not`.
#[derive(Debug, Default)]
pub enum Loose<T> {
    #[default]
    Absent,
    Is(T),
    Not,
}

/// Whether a type is read from a JSON array (else from an object).
pub trait Shape {
    const LIST: bool = false;
}

impl<T> Shape for Vec<T> {
    const LIST: bool = true;
}
impl Shape for Body<'_> {}
impl Shape for NacosInstance<'_> {}
impl Shape for Meta {}

impl<'de, T: Deserialize<'de> + Shape> Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor(PhantomData))
    }
}

struct LooseVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de> + Shape> Visitor<'de> for LooseVisitor<T> {
    type Value = Loose<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object, an array or null")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if T::LIST {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Loose::Not);
        }
        T::deserialize(MapAccessDeserializer::new(map)).map(Loose::Is)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        if !T::LIST {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Loose::Not);
        }
        T::deserialize(SeqAccessDeserializer::new(seq)).map(Loose::Is)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Loose::Absent)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Loose::Absent)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Loose::deserialize(d)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Loose::Not)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Loose::Not)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Loose::Not)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Loose::Not)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Loose::Not)
    }
}

/// The fields of every request the gRPC front-end answers.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Body<'a> {
    #[serde(borrow)]
    pub request_id: Field<'a>,
    #[serde(borrow)]
    pub namespace: Field<'a>,
    #[serde(borrow)]
    pub group_name: Field<'a>,
    #[serde(borrow)]
    pub service_name: Field<'a>,
    /// `registerInstance`, `deregisterInstance`, `batchRegisterInstance`.
    #[serde(borrow, rename = "type")]
    pub action: Field<'a>,
    #[serde(borrow)]
    pub instance: Loose<NacosInstance<'a>>,
    #[serde(borrow)]
    pub instances: Loose<Vec<Loose<NacosInstance<'a>>>>,
    #[serde(borrow)]
    pub cluster: Field<'a>,
    #[serde(borrow)]
    pub clusters: Field<'a>,
    #[serde(borrow)]
    pub subscribe: Field<'a>,
    #[serde(borrow)]
    pub healthy_only: Field<'a>,
    #[serde(borrow)]
    pub health_only: Field<'a>,
    #[serde(borrow)]
    pub page_no: Field<'a>,
    #[serde(borrow)]
    pub page_size: Field<'a>,
    #[serde(borrow)]
    pub result_code: Field<'a>,
    #[serde(borrow)]
    pub client_version: Field<'a>,
}

impl Body<'_> {
    /// Reads a payload's JSON body (empty: `{}`); it must be an object.
    pub fn parse(bytes: &[u8]) -> Result<Body<'_>, String> {
        let bytes = if bytes.is_empty() { b"{}" } else { bytes };
        match serde_json::from_slice::<Loose<Body<'_>>>(bytes) {
            Ok(Loose::Is(body)) => Ok(body),
            Ok(_) => Err("the body is not a JSON object".into()),
            Err(e) => Err(format!("unparseable body: {e}")),
        }
    }

    /// The service the request names: `namespace`, `groupName` and
    /// `serviceName` (which may carry the group).
    pub fn key(&self) -> Result<ServiceKey, ValidationError> {
        wire::service_key(
            self.namespace.text(),
            self.group_name.text(),
            self.service_name.text(),
        )
    }
}

/// A Nacos instance object.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct NacosInstance<'a> {
    #[serde(borrow)]
    pub ip: Field<'a>,
    #[serde(borrow)]
    pub port: Field<'a>,
    #[serde(borrow)]
    pub instance_id: Field<'a>,
    #[serde(borrow)]
    pub weight: Field<'a>,
    #[serde(borrow)]
    pub healthy: Field<'a>,
    #[serde(borrow)]
    pub enabled: Field<'a>,
    #[serde(borrow)]
    pub ephemeral: Field<'a>,
    #[serde(borrow)]
    pub cluster_name: Field<'a>,
    /// Entries with values that are not strings kept as their JSON text.
    pub metadata: Loose<Meta>,
}

/// An instance's metadata object as strings: a value that is not a string
/// as its JSON text, `null` as empty; a later duplicate key wins.
#[derive(Debug, Default)]
pub struct Meta(pub Metadata);

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MetaVisitor;
        impl<'de> Visitor<'de> for MetaVisitor {
            type Value = Meta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Meta, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    let v = match v {
                        Value::String(s) => s,
                        Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    entries.push((k, v));
                }
                Ok(Meta(entries.into_iter().collect()))
            }
        }
        d.deserialize_map(MetaVisitor)
    }
}

/// An instance field that is not an object reads as one with no fields
/// (and so fails on its address).
pub fn instance(raw: &Loose<NacosInstance<'_>>) -> Result<Instance, ValidationError> {
    let empty = NacosInstance::default();
    let body = match raw {
        Loose::Is(i) => i,
        _ => &empty,
    };
    let ip = roster_core::model::parse_ip("instance.ip", body.ip.text().unwrap_or_default())?;
    let port = body
        .port
        .integer()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| ValidationError::new("instance.port", "must be 1..=65535"))?;
    let mut i = Instance::new(ip, port);
    i.id = body.instance_id.text().unwrap_or_default().to_owned();
    i.weight = body.weight.number().unwrap_or(1.0);
    i.healthy = body.healthy.flag().unwrap_or(true);
    i.enabled = body.enabled.flag().unwrap_or(true);
    i.ephemeral = body.ephemeral.flag().unwrap_or(true);
    i.cluster = body.cluster_name.text().unwrap_or_default().to_owned();
    if let Loose::Is(Meta(m)) = &body.metadata {
        i.metadata = m.clone();
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_take_the_types_clients_send() {
        let b = Body::parse(
            br#"{"requestId":"7","serviceName":"a@@b","subscribe":"TRUE","pageNo":"3",
                 "pageSize":2.9,"healthyOnly":null,"clusters":["x"],"namespace":5,
                 "extra":{"deep":[1,2,{"x":null}]},"resultCode":200}"#,
        )
        .unwrap();
        assert_eq!(b.request_id.text(), Some("7"));
        assert_eq!(b.subscribe.flag(), Some(true));
        assert_eq!(b.page_no.integer(), Some(3));
        assert_eq!(b.page_size.integer(), Some(2));
        assert_eq!(b.healthy_only, Field::Absent);
        assert_eq!(b.clusters, Field::Other);
        assert_eq!(b.namespace.text(), None);
        assert_eq!(b.result_code.integer(), Some(200));
        let key = b.key().unwrap();
        assert_eq!((key.group.as_str(), key.service.as_str()), ("a", "b"));
    }

    #[test]
    fn an_instance_reads_tolerantly_and_its_metadata_as_strings() {
        let b = Body::parse(
            br#"{"instance":{"ip":"10.0.0.1","port":"8080","weight":"2.5","healthy":"false",
                 "clusterName":"c\u0031","metadata":{"a":"x","n":5,"o":{"k":[1]},"z":null}}}"#,
        )
        .unwrap();
        let i = instance(&b.instance).unwrap();
        assert_eq!(i.port, 8080);
        assert_eq!(i.weight, 2.5);
        assert!(!i.healthy && i.enabled && i.ephemeral);
        assert_eq!(i.cluster, "c1");
        let m: Vec<(&str, &str)> = i.metadata.iter().collect();
        assert_eq!(
            m,
            [("a", "x"), ("n", "5"), ("o", r#"{"k":[1]}"#), ("z", "")]
        );
    }

    #[test]
    fn what_is_not_an_object_is_refused_with_a_reason() {
        assert!(
            Body::parse(b"[1]")
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(Body::parse(b"{").unwrap_err().contains("unparseable"));
        let b = Body::parse(br#"{"instance":"10.0.0.1:80"}"#).unwrap();
        assert!(instance(&b.instance).is_err());
        let b = Body::parse(br#"{"instances":[{"ip":"10.0.0.1","port":1},7]}"#).unwrap();
        let Loose::Is(list) = &b.instances else {
            panic!("a list")
        };
        assert!(instance(&list[0]).is_ok());
        assert!(instance(&list[1]).is_err());
        let b = Body::parse(br#"{"instances":{"ip":"10.0.0.1"},"instance":[1]}"#).unwrap();
        assert!(matches!(b.instances, Loose::Not) && matches!(b.instance, Loose::Not));
        assert!(Body::parse(b"").is_ok());
    }
}

#[cfg(test)]
mod untrusted {
    use proptest::prelude::*;

    use super::*;

    /// JSON values of any shape, a few levels deep, with the field names
    /// the reader looks for among others.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-zA-Z0-9.@:# -]{0,12}".prop_map(Value::from),
        ];
        let names = prop_oneof![
            Just("ip".to_owned()),
            Just("port".to_owned()),
            Just("instance".to_owned()),
            Just("instances".to_owned()),
            Just("metadata".to_owned()),
            Just("serviceName".to_owned()),
            Just("weight".to_owned()),
            "[a-z]{1,6}",
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(names.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever a client sends, reading it answers a value or a
        /// reason, never a panic; so does making instances of it.
        #[test]
        fn any_body_reads_or_is_refused(v in json()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            if let Ok(body) = Body::parse(&bytes) {
                let _ = body.key();
                let _ = instance(&body.instance);
                if let Loose::Is(list) = &body.instances {
                    for i in list {
                        let _ = instance(i);
                    }
                }
            }
        }

        /// Bytes that are not JSON at all are refused with a reason.
        #[test]
        fn any_bytes_read_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Body::parse(&bytes);
        }
    }
}
