//! Conversions between wire messages and the core model. Wire input is
//! untrusted: every conversion from it is fallible and names the field.

use roster_core::model::{
    Address, Instance, InstanceRecord, ServiceKey, ValidationError, parse_ip,
};
use roster_core::service::{Delta, ServiceView};

use crate::v1;

impl v1::ServiceKey {
    /// Converts to the model (defaults filled, validated).
    pub fn to_model(&self) -> Result<ServiceKey, ValidationError> {
        ServiceKey::new(&self.namespace, &self.group, &self.service)
    }
}

impl From<&ServiceKey> for v1::ServiceKey {
    fn from(k: &ServiceKey) -> Self {
        Self {
            namespace: k.namespace.clone(),
            group: k.group.clone(),
            service: k.service.clone(),
        }
    }
}

/// The IP of address `i` of an instance; the field is named only when
/// wrong (a snapshot parses millions).
fn address_ip(i: usize, text: &str) -> Result<std::net::IpAddr, ValidationError> {
    text.trim()
        .parse()
        .or_else(|_| parse_ip(&format!("instance.addresses[{i}].ip"), text))
}

/// The service key of a request, which must be present.
pub fn required_key(key: Option<&v1::ServiceKey>) -> Result<ServiceKey, ValidationError> {
    key.ok_or_else(|| ValidationError::new("service", "is required"))?
        .to_model()
}

impl v1::Instance {
    /// Converts to the model, applying defaults for absent optional fields.
    /// The result still needs [`Instance::normalize`] (the registry does it).
    pub fn to_model(&self) -> Result<Instance, ValidationError> {
        let addresses = self
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Ok(Address {
                    network: a.network.clone(),
                    ip: address_ip(i, &a.ip)?,
                })
            })
            .collect::<Result<Vec<_>, ValidationError>>()?;
        Ok(Instance {
            id: self.id.clone(),
            addresses,
            port: self.model_port()?,
            weight: self.weight.unwrap_or(1.0),
            healthy: self.healthy.unwrap_or(true),
            enabled: self.enabled.unwrap_or(true),
            ephemeral: self.ephemeral.unwrap_or(true),
            cluster: self.cluster.clone(),
            metadata: self.metadata.iter().collect(),
            node_name: self.node_name.clone(),
        })
    }

    /// [`Self::to_model`], taking its strings instead of copying them.
    pub fn into_model(self) -> Result<Instance, ValidationError> {
        let port = self.model_port()?;
        let addresses = self
            .addresses
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                Ok(Address {
                    ip: address_ip(i, &a.ip)?,
                    network: a.network,
                })
            })
            .collect::<Result<Vec<_>, ValidationError>>()?;
        Ok(Instance {
            id: self.id,
            addresses,
            port,
            weight: self.weight.unwrap_or(1.0),
            healthy: self.healthy.unwrap_or(true),
            enabled: self.enabled.unwrap_or(true),
            ephemeral: self.ephemeral.unwrap_or(true),
            cluster: self.cluster,
            metadata: self.metadata.iter().collect(),
            node_name: self.node_name,
        })
    }

    fn model_port(&self) -> Result<u16, ValidationError> {
        u16::try_from(self.port)
            .map_err(|_| ValidationError::new("instance.port", "must be 1..=65535"))
    }

    /// The wire form of a model instance (no owner or version).
    pub fn from_model(i: &Instance) -> Self {
        Self {
            id: i.id.clone(),
            addresses: i
                .addresses
                .iter()
                .map(|a| v1::Address {
                    network: a.network.clone(),
                    ip: a.ip.to_string(),
                })
                .collect(),
            port: u32::from(i.port),
            weight: Some(i.weight),
            healthy: Some(i.healthy),
            enabled: Some(i.enabled),
            ephemeral: Some(i.ephemeral),
            cluster: i.cluster.clone(),
            metadata: i
                .metadata
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            node_name: i.node_name.clone(),
            owner: String::new(),
            version: None,
        }
    }
}

impl From<&InstanceRecord> for v1::Instance {
    fn from(r: &InstanceRecord) -> Self {
        let mut out = Self::from_model(&r.instance);
        out.owner = r.owner.session.to_string();
        out.version = Some(v1::Version {
            incarnation: r.version.incarnation,
            sequence: r.version.sequence,
        });
        out
    }
}

/// The full view as an update message, numbered by `epoch`.
pub fn full_update(view: &ServiceView, epoch: &v1::NodeEpoch) -> v1::ServiceUpdate {
    v1::ServiceUpdate {
        service: Some(view.key.as_ref().into()),
        revision: view.revision,
        checksum: view.checksum,
        kind: Some(v1::service_update::Kind::Full(v1::FullView {
            instances: view.instances.values().map(|r| r.as_ref().into()).collect(),
        })),
        epoch: Some(epoch.clone()),
    }
}

/// An empty full view of a service nobody registered in, numbered by `epoch`.
pub fn empty_update(key: &ServiceKey, epoch: &v1::NodeEpoch) -> v1::ServiceUpdate {
    v1::ServiceUpdate {
        service: Some(key.into()),
        kind: Some(v1::service_update::Kind::Full(v1::FullView::default())),
        epoch: Some(epoch.clone()),
        ..Default::default()
    }
}

/// A delta as an update message; `checksum` is the view's at `delta.to`.
pub fn delta_update(
    key: &ServiceKey,
    delta: &Delta,
    checksum: u64,
    epoch: &v1::NodeEpoch,
) -> v1::ServiceUpdate {
    v1::ServiceUpdate {
        service: Some(key.into()),
        revision: delta.to,
        checksum,
        kind: Some(v1::service_update::Kind::Delta(v1::Delta {
            from_revision: delta.from,
            upserted: delta.upserted.iter().map(|r| r.as_ref().into()).collect(),
            removed: delta.removed.iter().map(|id| id.to_string()).collect(),
        })),
        epoch: Some(epoch.clone()),
    }
}
