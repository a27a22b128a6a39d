//! The data model: service keys, instances, record versions, and the
//! validation every write goes through before it touches stored state.
//! Owns normalisation (defaults, derived ids); must not know about wire
//! formats or storage.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use thiserror::Error;

/// Namespace used when a request names none (as in Nacos).
pub const DEFAULT_NAMESPACE: &str = "public";
/// Group used when a request names none (as in Nacos).
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
/// Cluster used when an instance names none (as in Nacos).
pub const DEFAULT_CLUSTER: &str = "DEFAULT";
/// Network name used when an address names none.
pub const DEFAULT_NETWORK: &str = "default";
/// Longest accepted name, in bytes.
pub const MAX_NAME_BYTES: usize = 512;
/// Largest accepted metadata per instance (keys plus values), in bytes.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Highest accepted weight.
pub const MAX_WEIGHT: f64 = 10_000.0;

/// A rejected input, naming the offending field. Nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The field as the caller spelled it, e.g. `instance.port`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    /// A validation error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks a name: not empty, at most [`MAX_NAME_BYTES`], no control characters.
pub fn validate_name(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    check_text(field, value)
}

/// Checks text that may be empty: at most [`MAX_NAME_BYTES`], no control characters.
fn check_text(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() > MAX_NAME_BYTES {
        return Err(ValidationError::new(
            field,
            format!("is {} bytes, more than {MAX_NAME_BYTES}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// `namespace / group / service`: the identity of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Tenant boundary; default [`DEFAULT_NAMESPACE`].
    pub namespace: String,
    /// Grouping inside a namespace; default [`DEFAULT_GROUP`].
    pub group: String,
    /// The service name.
    pub service: String,
}

impl ServiceKey {
    /// Builds a key, filling empty namespace and group with the defaults,
    /// and validates it.
    pub fn new(
        namespace: impl Into<String>,
        group: impl Into<String>,
        service: impl Into<String>,
    ) -> Result<Self, ValidationError> {
        let mut namespace = namespace.into();
        let mut group = group.into();
        if namespace.is_empty() {
            namespace = DEFAULT_NAMESPACE.to_owned();
        }
        if group.is_empty() {
            group = DEFAULT_GROUP.to_owned();
        }
        let key = Self {
            namespace,
            group,
            service: service.into(),
        };
        validate_name("namespace", &key.namespace)?;
        validate_name("group", &key.group)?;
        validate_name("service", &key.service)?;
        // `@@` separates group and service in Nacos' grouped names.
        for (field, value) in [("group", &key.group), ("service", &key.service)] {
            if value.contains("@@") {
                return Err(ValidationError::new(field, "must not contain \"@@\""));
            }
        }
        Ok(key)
    }

    /// A key in the default namespace and group.
    pub fn simple(service: impl Into<String>) -> Result<Self, ValidationError> {
        Self::new("", "", service)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.group, self.service)
    }
}

/// One address of an instance, on one named network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// Network name; default [`DEFAULT_NETWORK`].
    pub network: String,
    /// The address on that network.
    pub ip: IpAddr,
}

impl Address {
    /// An address on the default network.
    pub fn new(ip: IpAddr) -> Self {
        Self {
            network: DEFAULT_NETWORK.to_owned(),
            ip,
        }
    }
}

/// The version of a session's data: `(incarnation, sequence)` of its
/// origin node. Versions of one origin are totally ordered, incarnation
/// first, so a restarted node's writes win over its previous life's. The
/// sequence is also a Lamport clock: a node moves its counter past every
/// sequence it applies, so a write made after another was seen has a
/// higher sequence wherever it was made (this ranks two sessions that hold
/// the same instance id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Version {
    /// Which life of the origin node wrote the record.
    pub incarnation: u64,
    /// Write counter within that life.
    pub sequence: u64,
}

pub use crate::metadata::Metadata;

/// An instance of a service, as registered (validated and normalised).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Unique within its service; default `<ip>#<port>#<cluster>`.
    pub id: String,
    /// One address per network the host is on; at least one.
    pub addresses: Vec<Address>,
    /// The port served on, on every address.
    pub port: u16,
    /// 0..=10000; 0 drains traffic without deregistering.
    pub weight: f64,
    /// Whether the instance reports itself (or was found) healthy.
    pub healthy: bool,
    /// Whether an operator allows traffic to it.
    pub enabled: bool,
    /// Lives only as long as its owner's session.
    pub ephemeral: bool,
    /// Cluster name; default [`DEFAULT_CLUSTER`].
    pub cluster: String,
    /// Free key/value pairs, at most [`MAX_METADATA_BYTES`] in all.
    pub metadata: Metadata,
    /// The host the instance runs on (may be empty).
    pub node_name: String,
}

impl Instance {
    /// A healthy, enabled, ephemeral instance of weight 1 on one address.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            id: String::new(),
            addresses: vec![Address::new(ip)],
            port,
            weight: 1.0,
            healthy: true,
            enabled: true,
            ephemeral: true,
            cluster: String::new(),
            metadata: Metadata::new(),
            node_name: String::new(),
        }
    }

    /// About how many bytes the instance takes on the wire (an upper
    /// bound of its protobuf form, give or take framing): what replication
    /// sizes its messages by.
    pub fn wire_size(&self) -> usize {
        let addresses: usize = self.addresses.iter().map(|a| a.network.len() + 48).sum();
        let metadata: usize = self
            .metadata
            .iter()
            .map(|(k, v)| k.len() + v.len() + 12)
            .sum();
        self.id.len() + self.cluster.len() + self.node_name.len() + addresses + metadata + 64
    }

    /// The id an instance gets when it names none.
    pub fn default_id(ip: &IpAddr, port: u16, cluster: &str) -> String {
        format!("{ip}#{port}#{cluster}")
    }

    /// Fills defaults (cluster, network names, id) and validates every
    /// field. Field names in errors are prefixed with `instance.`.
    pub fn normalize(mut self) -> Result<Self, ValidationError> {
        if self.cluster.is_empty() {
            self.cluster = DEFAULT_CLUSTER.to_owned();
        }
        validate_name("instance.cluster", &self.cluster)?;
        if self.addresses.is_empty() {
            return Err(ValidationError::new(
                "instance.addresses",
                "at least one address is required",
            ));
        }
        for (i, address) in self.addresses.iter_mut().enumerate() {
            if address.network.is_empty() {
                address.network = DEFAULT_NETWORK.to_owned();
            }
            // The field name is only formatted on failure.
            validate_name("network", &address.network).map_err(|e| {
                ValidationError::new(format!("instance.addresses[{i}].network"), e.reason)
            })?;
        }
        if self.port == 0 {
            return Err(ValidationError::new("instance.port", "must be 1..=65535"));
        }
        if !(0.0..=MAX_WEIGHT).contains(&self.weight) {
            return Err(ValidationError::new(
                "instance.weight",
                format!("{} is outside 0..=10000", self.weight),
            ));
        }
        check_text("instance.node_name", &self.node_name)?;
        let mut metadata_bytes = 0;
        for (k, v) in &self.metadata {
            validate_name("instance.metadata key", k)?;
            metadata_bytes += k.len() + v.len();
        }
        if metadata_bytes > MAX_METADATA_BYTES {
            return Err(ValidationError::new(
                "instance.metadata",
                format!("is {metadata_bytes} bytes, more than {MAX_METADATA_BYTES}"),
            ));
        }
        if self.id.is_empty() {
            self.id = Self::default_id(&self.addresses[0].ip, self.port, &self.cluster);
        }
        validate_name("instance.id", &self.id)?;
        // Stored for as long as the instance lives: drop what decoding and
        // collecting over-allocated (a `Vec` collected through a `Result`
        // starts at four addresses).
        self.addresses.shrink_to_fit();
        self.id.shrink_to_fit();
        Ok(self)
    }

    /// The address on `network`, if the instance has one there.
    pub fn address_on(&self, network: &str) -> Option<&Address> {
        self.addresses.iter().find(|a| a.network == network)
    }

    /// Healthy, enabled and with weight above 0: eligible for traffic.
    pub fn is_serving(&self) -> bool {
        self.healthy && self.enabled && self.weight > 0.0
    }
}

/// Parses an IP literal, naming `field` on failure.
pub fn parse_ip(field: &str, text: &str) -> Result<IpAddr, ValidationError> {
    text.trim()
        .parse()
        .map_err(|_| ValidationError::new(field, format!("{text:?} is not an IP address")))
}

/// An identifier of a session, unique on the node that opened it.
pub type SessionId = Arc<str>;

/// The name of a registry node: the origin of the sessions opened on it.
pub type NodeName = Arc<str>;

/// Whose data a record is: a session and the node it was opened on (its
/// origin, which is responsible for it). Data belongs to its owner: only
/// the owner's own calls change it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// The node the session was opened on.
    pub origin: NodeName,
    /// The session.
    pub session: SessionId,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.origin, self.session)
    }
}

/// An owner, shared by every record it holds (one pointer per record).
pub type OwnerRef = Arc<Owner>;

/// A stored instance: the instance plus what replication needs.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    /// The instance as registered.
    pub instance: Instance,
    /// The session that registered it and keeps it alive.
    pub owner: OwnerRef,
    /// The version of the owner's write that last set it: bumped on every
    /// write, including identical re-registration.
    pub version: Version,
    /// [`crate::checksum::instance_hash`] of `instance`, kept so removal
    /// updates the service checksum without rehashing.
    pub hash: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance::new("10.0.0.1".parse().unwrap(), 8080)
    }

    #[test]
    fn normalize_fills_defaults_and_derives_the_id() {
        let i = instance().normalize().unwrap();
        assert_eq!(i.cluster, "DEFAULT");
        assert_eq!(i.id, "10.0.0.1#8080#DEFAULT");
        assert_eq!(i.addresses[0].network, "default");
    }

    #[test]
    fn service_key_defaults_namespace_and_group() {
        let k = ServiceKey::new("", "", "orders").unwrap();
        assert_eq!(k.to_string(), "public/DEFAULT_GROUP/orders");
    }

    #[test]
    fn validation_errors_name_the_field() {
        fn err<T: std::fmt::Debug>(r: Result<T, ValidationError>) -> String {
            r.unwrap_err().field
        }
        assert_eq!(err(ServiceKey::simple("")), "service");
        assert_eq!(err(ServiceKey::simple("x".repeat(513))), "service");
        assert!(ServiceKey::simple("x".repeat(512)).is_ok());
        assert_eq!(err(ServiceKey::simple("a\nb")), "service");
        assert_eq!(err(ServiceKey::new("", "g@@x", "s")), "group");
        assert_eq!(err(parse_ip("instance.ip", "10.0.0.300")), "instance.ip");

        let mut i = instance();
        i.port = 0;
        assert_eq!(err(i.normalize()), "instance.port");
        for w in [-0.5, 10_000.5, f64::NAN] {
            let mut i = instance();
            i.weight = w;
            assert_eq!(err(i.normalize()), "instance.weight");
        }
        let mut i = instance();
        i.weight = 10_000.0;
        assert!(i.normalize().is_ok());
        let mut i = instance();
        i.addresses.clear();
        assert_eq!(err(i.normalize()), "instance.addresses");
        let mut i = instance();
        i.metadata.insert("k", &"v".repeat(MAX_METADATA_BYTES));
        assert_eq!(err(i.normalize()), "instance.metadata");
        let mut i = instance();
        i.cluster = "c\u{7}".into();
        assert_eq!(err(i.normalize()), "instance.cluster");
        let mut i = instance();
        i.node_name = "h".repeat(600);
        assert_eq!(err(i.normalize()), "instance.node_name");
    }
}
