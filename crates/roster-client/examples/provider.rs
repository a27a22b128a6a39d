//! A provider: registers one instance and keeps it registered (across
//! registry restarts and failovers) until Ctrl-C, then deregisters.
//!
//! ```text
//! cargo run -p roster-client --example provider -- SERVICE IP PORT [REGISTRY]...
//! cargo run -p roster-client --example provider -- orders 10.0.0.1 8080 127.0.0.1:9848
//! ```

use std::time::Duration;

use roster_client::{Client, Instance, Status};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [service, ip, port, registries @ ..] = args.as_slice() else {
        eprintln!("usage: provider SERVICE IP PORT [REGISTRY]...");
        std::process::exit(2);
    };
    let registries = if registries.is_empty() {
        vec!["127.0.0.1:9848".to_owned()]
    } else {
        registries.to_vec()
    };
    let client = Client::builder()
        .addresses(registries)
        .client_name(format!("provider {service}"))
        .build()
        .await?;
    let mut instance = Instance::new(ip.parse()?, port.parse()?);
    instance.metadata.insert("version", "1.0.0");
    let registration = client.register(service.as_str(), instance).await?;
    println!(
        "registered {} in {} ({:?}); Ctrl-C to stop",
        registration.instance_id(),
        registration.service(),
        client.status()
    );
    let mut last = client.status();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                // The client reconnects and registers again by itself;
                // this only reports it.
                let now = client.status();
                if now != last {
                    println!("status: {now:?} {}", client.server().unwrap_or_default());
                    last = now;
                }
                if now == Status::Disconnected {
                    println!("  ({})", client.last_error().unwrap_or_default());
                }
            }
        }
    }
    registration.deregister().await?;
    client.shutdown().await;
    println!("deregistered");
    Ok(())
}
