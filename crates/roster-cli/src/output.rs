//! How the CLI prints results: aligned tables for people, JSON for scripts.

use roster_client::{Change, Instance, Update, proto};
use roster_core::ServiceKey;
use serde_json::{Value, json};

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// `address:port`, and `[id]` when the id is not the default one.
fn shown(i: &proto::Instance) -> String {
    let mut out = format!("{}:{}", address(i), i.port);
    let first = i.addresses.first().and_then(|a| a.ip.parse().ok());
    let default = first.map(|ip| {
        let port = u16::try_from(i.port).unwrap_or_default();
        Instance::default_id(&ip, port, &i.cluster)
    });
    if default.as_deref() != Some(i.id.as_str()) {
        out.push_str(&format!(" [{}]", i.id));
    }
    out
}

fn address(i: &proto::Instance) -> String {
    let addrs: Vec<String> = i
        .addresses
        .iter()
        .map(|a| {
            if a.network == roster_core::DEFAULT_NETWORK {
                a.ip.clone()
            } else {
                format!("{}={}", a.network, a.ip)
            }
        })
        .collect();
    addrs.join(",")
}

fn instance_json(i: &proto::Instance) -> Value {
    json!({
        "id": i.id,
        "addresses": i.addresses.iter().map(|a| json!({"network": a.network, "ip": a.ip})).collect::<Vec<_>>(),
        "port": i.port,
        "weight": i.weight.unwrap_or(1.0),
        "healthy": i.healthy.unwrap_or(true),
        "enabled": i.enabled.unwrap_or(true),
        "ephemeral": i.ephemeral.unwrap_or(true),
        "cluster": i.cluster,
        "metadata": i.metadata,
        "node_name": i.node_name,
    })
}

pub fn registered(json: bool, key: &ServiceKey, id: &str, server: &str) {
    if json {
        println!(
            "{}",
            json!({"service": key.to_string(), "instance_id": id, "server": server})
        );
    } else {
        println!("registered {id} in {key} at {server}; Ctrl-C deregisters");
    }
}

pub fn deregistered(json: bool, id: &str) {
    if json {
        println!("{}", json!({ "result": "deregistered", "instance_id": id }));
    } else {
        println!("deregistered {id}");
    }
}

pub fn revision(json: bool, what: &str, revision: u64) {
    if json {
        println!("{}", json!({ "result": what, "revision": revision }));
    } else {
        println!("{what} (revision {revision})");
    }
}

pub fn instances(json: bool, key: &ServiceKey, revision: u64, list: &[proto::Instance]) {
    if json {
        let items: Vec<Value> = list.iter().map(instance_json).collect();
        println!(
            "{}",
            json!({"service": key.to_string(), "revision": revision, "instances": items})
        );
        return;
    }
    if list.is_empty() {
        println!("{key}: no instances (revision {revision})");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let meta: Vec<String> = i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                address(i),
                i.port.to_string(),
                i.weight.unwrap_or(1.0).to_string(),
                i.healthy.unwrap_or(true).to_string(),
                i.enabled.unwrap_or(true).to_string(),
                i.cluster.clone(),
                meta.join(","),
            ]
        })
        .collect();
    table(
        &[
            "ADDRESS", "PORT", "WEIGHT", "HEALTHY", "ENABLED", "CLUSTER", "METADATA",
        ],
        &rows,
    );
}

pub fn services(json: bool, list: &[proto::ServiceSummary]) {
    if json {
        let items: Vec<Value> = list
            .iter()
            .map(|s| {
                let k = s.service.clone().unwrap_or_default();
                json!({
                    "namespace": k.namespace, "group": k.group, "service": k.service,
                    "instances": s.instance_count, "healthy": s.healthy_count,
                    "revision": s.revision, "subscribers": s.subscriber_count,
                })
            })
            .collect();
        println!("{}", json!({ "services": items }));
        return;
    }
    if list.is_empty() {
        println!("no services");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let k = s.service.clone().unwrap_or_default();
            vec![
                k.namespace,
                k.group,
                k.service,
                s.instance_count.to_string(),
                s.healthy_count.to_string(),
                s.subscriber_count.to_string(),
                s.revision.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "GROUP",
            "SERVICE",
            "INSTANCES",
            "HEALTHY",
            "SUBSCRIBERS",
            "REVISION",
        ],
        &rows,
    );
}

/// The cluster's members as a node knows them.
pub fn members(json: bool, list: &[proto::Member]) {
    if json {
        let items: Vec<Value> = list
            .iter()
            .map(|m| {
                json!({
                    "name": m.name, "addresses": m.addresses, "in_use": m.in_use,
                    "state": m.state, "since_verify_ms": m.since_verify_ms,
                    "incarnation": m.incarnation, "sessions": m.sessions,
                    "instances": m.instances, "pending": m.pending,
                })
            })
            .collect();
        println!("{}", json!({ "members": items }));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            let addresses = m
                .addresses
                .iter()
                .map(|a| match *a == m.in_use {
                    true if m.addresses.len() > 1 => format!("{a}*"),
                    _ => a.clone(),
                })
                .collect::<Vec<_>>()
                .join(",");
            vec![
                m.name.clone(),
                if addresses.is_empty() {
                    "-".into()
                } else {
                    addresses
                },
                m.state.clone(),
                m.since_verify_ms
                    .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                m.sessions.to_string(),
                m.instances.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ADDRESSES (* in use)",
            "STATE",
            "LAST VERIFY",
            "SESSIONS",
            "INSTANCES",
        ],
        &rows,
    );
}

/// One line per change of a watched service; `count` is the number of
/// instances after it.
/// One line per change: `+` added, `~` changed, `-` removed, each as
/// `address:port`, with `[id]` where the id is not the default one
/// (`ip#port#cluster`). `removed` is the instance a removal removed, when
/// the watcher knew it.
pub fn watched(json: bool, update: &Update, count: usize, removed_instance: Option<&Instance>) {
    let wire = |i: &Instance| proto::Instance::from_model(i);
    let (kind, added, changed, removed): (
        _,
        Vec<proto::Instance>,
        Vec<proto::Instance>,
        Vec<&str>,
    ) = match &update.change {
        Change::Reset(all) => (
            "reset",
            all.iter().map(|i| wire(i)).collect(),
            vec![],
            vec![],
        ),
        Change::Added(i) => ("added", vec![wire(i)], vec![], vec![]),
        Change::Changed(i) => ("changed", vec![], vec![wire(i)], vec![]),
        Change::Removed(id) => ("removed", vec![], vec![], vec![id.as_str()]),
    };
    if json {
        println!(
            "{}",
            json!({
                "service": update.service.to_string(),
                "revision": update.revision,
                "kind": kind,
                "added": added.iter().map(instance_json).collect::<Vec<_>>(),
                "changed": changed.iter().map(instance_json).collect::<Vec<_>>(),
                "removed": removed,
                "instances": count,
            })
        );
        return;
    }
    let mut parts = Vec::new();
    if kind == "reset" {
        parts.push("reset".to_owned());
    }
    parts.extend(added.iter().map(|i| format!("+{}", shown(i))));
    parts.extend(
        changed
            .iter()
            .map(|i| format!("~{} weight={}", shown(i), i.weight.unwrap_or(1.0))),
    );
    parts.extend(removed.iter().map(|id| match removed_instance {
        Some(i) => format!("-{}", shown(&wire(i))),
        None => format!("-[{id}]"),
    }));
    println!(
        "revision {} {} ({count} instances)",
        update.revision,
        parts.join(" "),
    );
}

pub fn drained(json: bool, r: &proto::DrainResponse) {
    if json {
        println!(
            "{}",
            json!({
                "revision": r.revision, "complete": r.complete,
                "acknowledged": r.acknowledged, "pending": r.pending,
            })
        );
        return;
    }
    println!(
        "drained at revision {}: {} subscriber(s) acknowledged",
        r.revision,
        r.acknowledged.len()
    );
    for p in &r.pending {
        println!("  not acknowledged: {p}");
    }
}
