//! Create, update, list, watch and delete demo resources on the memory backend, printing each
//! step.
//!
//! Run with `cargo run --release --example quickstart`.

use std::sync::Arc;

use futures::StreamExt;
use kvsync_backend::{Api, Client, Error, MemoryBackend, WatchEvent};
use kvsync_model::demo::{Action, IPPool, NetworkPolicy, Protocol, Rule};
use kvsync_model::{KVPair, ListOptions, ResourceKey};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    println!(
        "backend: {} (prefix {})",
        client.backend_name(),
        client.codec().prefix()
    );

    // Follow every change to IPPools from the start.
    let mut watch = client.watch(&ListOptions::new("IPPool")).await?;

    // Typed access: create two pools.
    let pools = Api::<IPPool>::all(client.clone());
    let a = pools
        .create(
            "pool-a",
            IPPool {
                cidr: "10.0.0.0/16".into(),
                block_size: 26,
                nat_outgoing: true,
                disabled: false,
            },
        )
        .await?;
    println!(
        "created {} at revision {}",
        a.key,
        a.revision
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    pools
        .create(
            "pool-b",
            IPPool {
                cidr: "10.1.0.0/16".into(),
                block_size: 28,
                nat_outgoing: false,
                disabled: false,
            },
        )
        .await?;

    // Update with the revision we read: optimistic concurrency.
    let mut next = a.clone();
    next.value.disabled = true;
    let updated = pools.update(next).await?;
    println!(
        "updated {}: disabled={} revision {}",
        updated.key,
        updated.value.disabled,
        updated
            .revision
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    match pools.update(a).await {
        Err(e @ Error::Conflict { .. }) => println!("stale update refused: {e}"),
        other => println!("unexpected: {other:?}"),
    }

    // A namespaced kind.
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), "prod");
    policies
        .apply(
            "allow-dns",
            NetworkPolicy {
                order: Some(100.0),
                selector: "all()".into(),
                ingress: vec![],
                egress: vec![Rule {
                    action: Action::Allow,
                    protocol: Some(Protocol::Udp),
                    ports: vec![53],
                    nets: vec![],
                }],
            },
        )
        .await?;

    // Bad input is refused with the field and the rule, and nothing is written.
    let bad = KVPair::new(
        ResourceKey::cluster("IPPool", "pool-c"),
        serde_json::json!({"cidr": "10.2.0.1/16"}),
    );
    if let Err(e) = client.create(bad).await {
        println!("refused: {e}");
    }

    // List.
    let list = pools.list().await?;
    println!("{} pools at revision {}:", list.items.len(), list.revision);
    for p in &list.items {
        println!(
            "  {:<8} {:<14} disabled={}",
            p.key.name, p.value.cidr, p.value.disabled
        );
    }
    let all_policies = client.list(&ListOptions::new("NetworkPolicy")).await?;
    println!("{} network policies", all_policies.items.len());

    // Delete.
    let gone = pools.delete("pool-b").await?;
    println!("deleted {} (last cidr {})", gone.key, gone.value.cidr);

    // The watch saw it all, in revision order.
    for _ in 0..4 {
        match watch.next().await {
            Some(Ok(WatchEvent::Added(k))) => println!(
                "watch: Added    {} @{}",
                k.key,
                k.revision.map(|r| r.to_string()).unwrap_or_default()
            ),
            Some(Ok(WatchEvent::Modified { new, .. })) => println!(
                "watch: Modified {} @{}",
                new.key,
                new.revision.map(|r| r.to_string()).unwrap_or_default()
            ),
            Some(Ok(WatchEvent::Deleted { key, revision, .. })) => {
                println!("watch: Deleted  {key} @{revision}")
            }
            Some(Ok(other)) => println!("watch: {other:?}"),
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    Ok(())
}
