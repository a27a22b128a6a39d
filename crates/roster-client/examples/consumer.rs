//! A consumer: subscribes to a service, prints every change as it is
//! pushed, and once a second picks an instance to "call" by weight.
//!
//! ```text
//! cargo run -p roster-client --example consumer -- SERVICE [REGISTRY]...
//! cargo run -p roster-client --example consumer -- orders 127.0.0.1:9848
//! ```

use std::time::Duration;

use roster_client::{Change, Client};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [service, registries @ ..] = args.as_slice() else {
        eprintln!("usage: consumer SERVICE [REGISTRY]...");
        std::process::exit(2);
    };
    let registries = if registries.is_empty() {
        vec!["127.0.0.1:9848".to_owned()]
    } else {
        registries.to_vec()
    };
    let cache_dir = std::env::temp_dir().join("roster-consumer-example");
    let client = Client::builder()
        .addresses(registries)
        .client_name(format!("consumer {service}"))
        .cache_dir(&cache_dir)
        .build()
        .await?;
    println!(
        "status: {:?} (disk cache in {})",
        client.status(),
        cache_dir.display()
    );
    let mut updates = client.subscribe(service.as_str()).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            update = updates.next() => {
                let Some(u) = update else { break };
                match u.change {
                    Change::Reset(all) => println!("r{} reset: {} instance(s)", u.revision, all.len()),
                    Change::Added(i) => println!("r{} added {}", u.revision, i.id),
                    Change::Changed(i) => println!("r{} changed {} (weight {})", u.revision, i.id, i.weight),
                    Change::Removed(id) => println!("r{} removed {id}", u.revision),
                }
            }
            _ = tick.tick() => match client.select(service.as_str()) {
                Some(chosen) => {
                    // A real consumer would call it and report the outcome.
                    client.report_success(chosen.address);
                    println!("  would call {} ({:?})", chosen.address, client.status());
                }
                None => println!("  no instance to call ({:?})", client.status()),
            },
        }
    }
    client.shutdown().await;
    Ok(())
}
