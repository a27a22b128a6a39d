//! How the CLI prints results: aligned tables for people, JSON for scripts.

use roster_client::cache::{Applied, ServiceCache};
use roster_client::proto;
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

pub fn registered(json: bool, key: &ServiceKey, id: &str, session: &str) {
    if json {
        println!(
            "{}",
            json!({"service": key.to_string(), "instance_id": id, "session_id": session})
        );
    } else {
        println!("registered {id} in {key} (session {session}); Ctrl-C deregisters");
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

pub fn watched(json: bool, key: &ServiceKey, cache: &ServiceCache, applied: &Applied) {
    if json {
        println!(
            "{}",
            json!({
                "service": key.to_string(),
                "revision": cache.revision,
                "kind": if applied.reset { "reset" } else { "delta" },
                "added": applied.added.iter().map(instance_json).collect::<Vec<_>>(),
                "changed": applied.changed.iter().map(instance_json).collect::<Vec<_>>(),
                "removed": applied.removed,
                "instances": cache.instances.len(),
            })
        );
        return;
    }
    let mut parts = Vec::new();
    if applied.reset {
        parts.push("reset".to_owned());
    }
    parts.extend(
        applied
            .added
            .iter()
            .map(|i| format!("+{}:{}", address(i), i.port)),
    );
    parts.extend(applied.changed.iter().map(|i| {
        format!(
            "~{}:{} weight={}",
            address(i),
            i.port,
            i.weight.unwrap_or(1.0)
        )
    }));
    parts.extend(applied.removed.iter().map(|id| format!("-{id}")));
    println!(
        "revision {} {} ({} instances)",
        cache.revision,
        parts.join(" "),
        cache.instances.len()
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
