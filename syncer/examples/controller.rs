//! A tiny controller: follows IPPools and NetworkPolicies through the Syncer over the memory
//! backend while another task writes to it, keeps a cache, and prints the cache on InSync.
//!
//! Run with `cargo run --release --example controller`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvsync_backend::{Client, FaultyClient, MemoryBackend};
use kvsync_model::demo::{IPPool, NetworkPolicy};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};
use serde_json::json;

#[tokio::main]
async fn main() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    // Faults are injected into the controller's view of the datastore to show recovery.
    let client = Arc::new(FaultyClient::new(store.clone()));
    let faults = client.faults();

    // Some state before the controller starts.
    for i in 0..3 {
        let key = ResourceKey::cluster("IPPool", format!("pool-{i}"));
        store
            .create(KVPair::new(key, json!({"cidr": format!("10.{i}.0.0/16")})))
            .await
            .expect("seed pools");
    }

    // The writer: another task changing things while the controller runs.
    let writer_store = store.clone();
    let writer = tokio::spawn(async move {
        for i in 0..20u32 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let ns = if i % 2 == 0 { "prod" } else { "dev" };
            let key = ResourceKey::namespaced("NetworkPolicy", ns, format!("policy-{}", i % 5));
            let value = json!({"order": f64::from(i), "selector": format!("app == 'web-{i}'")});
            writer_store
                .apply(KVPair::new(key, value))
                .await
                .expect("write policy");
            if i == 10 {
                writer_store
                    .delete(
                        &ResourceKey::cluster("IPPool", "pool-1"),
                        &kvsync_model::DeleteOptions::new(),
                    )
                    .await
                    .expect("delete pool");
                faults.break_watches();
                println!("[writer] deleted pool-1 and broke the controller's watches");
            }
        }
    });

    let mut events = Syncer::new(client)
        .with_resource(ResourceType::of::<IPPool>())
        .with_resource(ResourceType::of::<NetworkPolicy>())
        .stream();

    let mut cache: BTreeMap<ResourceKey, kvsync_model::Json> = BTreeMap::new();
    let mut writer_done = false;
    // An example must end: give up loudly rather than wait forever.
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(writer, deadline);
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            res = &mut writer, if !writer_done => {
                res.expect("writer");
                writer_done = true;
                continue;
            }
            // Once the writer is done and the cache has caught up, stop.
            () = tokio::time::sleep(Duration::from_millis(200)), if writer_done => {
                let mut truth = BTreeMap::new();
                for kind in ["IPPool", "NetworkPolicy"] {
                    let list = store.list(&ListOptions::new(kind)).await.expect("list");
                    truth.extend(list.items.into_iter().map(|k| (k.key, k.value)));
                }
                if truth == cache {
                    println!("[controller] cache equals the datastore");
                    break;
                }
                continue;
            }
            () = &mut deadline => {
                eprintln!("[controller] the cache did not catch up with the datastore within 60 s");
                std::process::exit(1);
            }
        };
        let Some(ev) = ev else { break };
        match ev {
            SyncerEvent::Status(status) => {
                println!("[controller] status: {status}");
                if status == SyncStatus::InSync {
                    print_cache(&cache);
                }
            }
            SyncerEvent::Updates(batch) => {
                println!("[controller] batch of {}", batch.len());
                for u in batch {
                    println!("    {:<8} {}", u.update_type.to_string(), u.kvp.key);
                    match u.update_type {
                        UpdateType::Deleted => {
                            cache.remove(&u.kvp.key);
                        }
                        UpdateType::New | UpdateType::Updated => {
                            cache.insert(u.kvp.key, u.kvp.value);
                        }
                    }
                }
            }
            SyncerEvent::ParseFailed(f) => println!("[controller] cannot decode {}", f.raw_key),
            SyncerEvent::Error(e) => println!("[controller] recovering from: {e}"),
        }
    }
    println!("[controller] final cache:");
    print_cache(&cache);
    events.stop().await;
}

fn print_cache(cache: &BTreeMap<ResourceKey, kvsync_model::Json>) {
    println!("  cache holds {} resources:", cache.len());
    for (k, v) in cache {
        println!("    {k} = {v}");
    }
}
