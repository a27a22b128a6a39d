//! Nacos JSON shapes: reading fields of a JSON value tolerantly (absent
//! and `null` are the same), service keys, metadata objects as strings,
//! and building `ServiceInfo` and replies that never contain `null`. (gRPC
//! request bodies are read in one pass in `request`.)

use roster_core::{DEFAULT_GROUP, Instance, Metadata, ServiceKey, ServiceView, ValidationError};
use serde_json::{Map, Value, json};

/// Separates group and service in Nacos' grouped names.
pub const GROUP_SEPARATOR: &str = "@@";

/// `cacheMillis` sent to clients (Java's default push cache time).
pub const CACHE_MILLIS: i64 = 10_000;

/// A string field; absent, `null` and non-strings are `None`.
pub fn text<'a>(body: &'a Value, field: &str) -> Option<&'a str> {
    body.get(field)?.as_str()
}

/// A boolean field, also accepted as a string in any case.
pub fn flag(body: &Value, field: &str) -> Option<bool> {
    match body.get(field)? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.to_ascii_lowercase().parse().ok(),
        _ => None,
    }
}

/// An integer field, also accepted as a string.
pub fn integer(body: &Value, field: &str) -> Option<i64> {
    match body.get(field)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A float field, also accepted as a string.
pub fn number(body: &Value, field: &str) -> Option<f64> {
    match body.get(field)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The service key of a request: `namespace` (or `namespaceId`),
/// `groupName` and `serviceName`; a grouped `serviceName` carries its group.
pub fn service_key(
    namespace: Option<&str>,
    group: Option<&str>,
    service: Option<&str>,
) -> Result<ServiceKey, ValidationError> {
    let service = service.unwrap_or_default();
    let (group, service) = match service.split_once(GROUP_SEPARATOR) {
        Some((g, s)) if g.is_empty() => {
            return Err(ValidationError::new(
                "serviceName",
                format!("service name filter error: empty group in {g}@@{s}"),
            ));
        }
        Some((g, s)) => (g, s),
        None => (group.unwrap_or_default(), service),
    };
    ServiceKey::new(namespace.unwrap_or_default(), group, service)
}

/// `group@@service`.
pub fn grouped(key: &ServiceKey) -> String {
    format!("{}{GROUP_SEPARATOR}{}", key.group, key.service)
}

/// A JSON object's entries as strings (non-string values as their JSON).
pub fn string_map(m: &Map<String, Value>) -> Metadata {
    m.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// The clusters a client asked for: a comma list, empty for all.
pub fn clusters(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// How a `ServiceInfo` is asked for.
pub struct InfoRequest<'a> {
    /// The requester's cluster list, echoed and used as a filter.
    pub clusters: &'a str,
    /// Only healthy instances.
    pub healthy_only: bool,
    /// `name` is `group@@service` (HTTP, UDP) rather than bare (gRPC).
    pub grouped_name: bool,
}

/// The `hosts` entries of one instance: one per address (Nacos knows one
/// address per instance), the network and node name in metadata when the
/// instance has several.
pub fn hosts(key: &ServiceKey, i: &Instance) -> Vec<Value> {
    let several = i.addresses.len() > 1;
    i.addresses
        .iter()
        .enumerate()
        .map(|(n, a)| {
            let mut metadata: Map<String, Value> = i
                .metadata
                .iter()
                .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
                .collect();
            if several {
                metadata.insert("roster.network".into(), a.network.clone().into());
                if !i.node_name.is_empty() {
                    metadata.insert("roster.node".into(), i.node_name.clone().into());
                }
            }
            let id = if n == 0 {
                i.id.clone()
            } else {
                format!("{}@{}", i.id, a.network)
            };
            json!({
                "instanceId": id,
                "ip": a.ip.to_string(),
                "port": i.port,
                "weight": i.weight,
                "healthy": i.healthy,
                "enabled": i.enabled,
                "ephemeral": i.ephemeral,
                "clusterName": i.cluster,
                "serviceName": grouped(key),
                "metadata": metadata,
                "instanceHeartBeatInterval": 5000,
                "instanceHeartBeatTimeOut": 15000,
                "ipDeleteTimeout": 30000,
                "instanceIdGenerator": "simple",
            })
        })
        .collect()
}

/// A `ServiceInfo` of `view` (absent: no instances), as Java Nacos 2.x
/// lists it: instances of the clusters asked for that are enabled; only
/// healthy ones if asked, unless `protection` (the service's protect
/// threshold, when it has settings) is reached: when the healthy share of
/// those instances is at or below it, every one is listed, as healthy, and
/// `reachProtectionThreshold` is set.
pub fn service_info(
    key: &ServiceKey,
    view: Option<&ServiceView>,
    last_ref_time: i64,
    req: &InfoRequest<'_>,
    protection: Option<f64>,
) -> Value {
    let wanted = clusters(req.clusters);
    let listed: Vec<&Instance> = view
        .into_iter()
        .flat_map(|v| v.instances.values())
        .map(|r| &r.instance)
        .filter(|i| i.enabled && (wanted.is_empty() || wanted.contains(&i.cluster.as_str())))
        .collect();
    let healthy = listed.iter().filter(|i| i.healthy).count();
    let reached = match protection {
        Some(threshold) if !listed.is_empty() => {
            (healthy as f64) / (listed.len() as f64) <= threshold.max(0.0)
        }
        _ => false,
    };
    let mut list = Vec::new();
    for i in listed {
        if reached && !i.healthy {
            let mut shown = i.clone();
            shown.healthy = true;
            list.extend(hosts(key, &shown));
        } else if reached || !req.healthy_only || i.healthy {
            list.extend(hosts(key, i));
        }
    }
    json!({
        "name": if req.grouped_name { grouped(key) } else { key.service.clone() },
        "groupName": key.group,
        "clusters": req.clusters,
        "cacheMillis": CACHE_MILLIS,
        "hosts": list,
        "lastRefTime": last_ref_time,
        "checksum": "",
        "allIPs": false,
        "allIps": false,
        "reachProtectionThreshold": reached,
        "valid": true,
    })
}

/// The default group when a request names none.
pub fn group_or_default(group: Option<&str>) -> &str {
    match group {
        Some(g) if !g.is_empty() => g,
        _ => DEFAULT_GROUP,
    }
}
