//! The Syncer over the memory backend, beside the raw client doing the same work:
//!
//! - initial sync of N keys to InSync with the consumer's map filled, vs a raw `list` into a map;
//! - steady-state updates/s through the Syncer into the map, vs a raw `watch` into a map.
//!
//! Run with `cargo bench -p kvsync-syncer --bench syncer` (N = 100,000; set KVSYNC_BENCH_KEYS
//! to change it). Figures are recorded in BENCHMARKS.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvsync_backend::{Client, MemoryBackend, WatchEvent};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};
use serde_json::{Value, json};

type Map = HashMap<ResourceKey, kvsync_model::Json>;

fn value(i: usize, generation: usize) -> Value {
    // About 200 bytes of JSON, like a small Calico resource.
    json!({
        "cidr": format!("10.{}.{}.0/24", (i / 256) % 256, i % 256),
        "blockSize": 26,
        "natOutgoing": generation % 2 == 0,
        "disabled": false,
    })
}

fn key(i: usize) -> ResourceKey {
    ResourceKey::cluster("IPPool", format!("pool-{i:07}"))
}

async fn fill(store: &MemoryBackend, n: usize) {
    for i in 0..n {
        store
            .apply(KVPair::new(key(i), value(i, 0)))
            .await
            .expect("write");
    }
}

fn apply_event(map: &mut Map, ev: SyncerEvent) -> bool {
    match ev {
        SyncerEvent::Updates(batch) => {
            for u in batch {
                match u.update_type {
                    UpdateType::Deleted => {
                        map.remove(&u.kvp.key);
                    }
                    _ => {
                        map.insert(u.kvp.key, u.kvp.value);
                    }
                }
            }
            false
        }
        SyncerEvent::Status(SyncStatus::InSync) => true,
        _ => false,
    }
}

async fn initial_sync(store: &MemoryBackend, n: usize) -> Duration {
    let t = Instant::now();
    let batch = std::env::var("KVSYNC_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut events = Syncer::new(Arc::new(store.clone()))
        .with_max_batch(batch)
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .stream();
    let mut map = Map::with_capacity(n);
    while let Some(ev) = events.next().await {
        if apply_event(&mut map, ev) {
            break;
        }
    }
    let d = t.elapsed();
    assert_eq!(map.len(), n);
    events.stop().await;
    d
}

async fn raw_list(store: &MemoryBackend, n: usize) -> Duration {
    let t = Instant::now();
    let list = store.list(&ListOptions::new("IPPool")).await.expect("list");
    let mut map = Map::with_capacity(n);
    for kvp in list.items {
        map.insert(kvp.key, kvp.value);
    }
    let d = t.elapsed();
    assert_eq!(map.len(), n);
    d
}

/// Writes `n` updates from a second task and measures until the consumer applied the last.
async fn steady_syncer(store: &MemoryBackend, n: usize, keys: usize) -> Duration {
    let mut events = Syncer::new(Arc::new(store.clone()))
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .stream();
    let mut map = Map::with_capacity(keys);
    while let Some(ev) = events.next().await {
        if apply_event(&mut map, ev) {
            break;
        }
    }
    let target = store.revision() + n as u64;
    let t = Instant::now();
    let writer = tokio::spawn(write_updates(store.clone(), n, keys));
    let mut last = 0;
    while last < target {
        if let Some(SyncerEvent::Updates(batch)) = events.next().await {
            last = batch
                .last()
                .and_then(|u| u.kvp.revision.as_ref())
                .and_then(|r| r.as_u64())
                .unwrap_or(last);
            apply_event(&mut map, SyncerEvent::Updates(batch));
        }
    }
    let d = t.elapsed();
    writer.await.expect("writer");
    events.stop().await;
    d
}

async fn steady_raw(store: &MemoryBackend, n: usize, keys: usize) -> Duration {
    let list = store.list(&ListOptions::new("IPPool")).await.expect("list");
    let mut map: Map = list.items.into_iter().map(|k| (k.key, k.value)).collect();
    let mut w = store
        .watch(&ListOptions::new("IPPool").with_revision(list.revision.clone()))
        .await
        .expect("watch");
    let target = store.revision() + n as u64;
    let t = Instant::now();
    let writer = tokio::spawn(write_updates(store.clone(), n, keys));
    let mut last = 0;
    while last < target {
        match w.next().await {
            Some(Ok(WatchEvent::Added(kvp) | WatchEvent::Modified { new: kvp, .. })) => {
                last = kvp
                    .revision
                    .as_ref()
                    .and_then(|r| r.as_u64())
                    .unwrap_or(last);
                map.insert(kvp.key, kvp.value);
            }
            Some(Ok(_)) => {}
            other => panic!("raw watch: {other:?}"),
        }
    }
    let d = t.elapsed();
    writer.await.expect("writer");
    d
}

async fn write_updates(store: MemoryBackend, n: usize, keys: usize) {
    for i in 0..n {
        store
            .apply(KVPair::new(key(i % keys), value(i, i / keys + 1)))
            .await
            .expect("update");
    }
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let n: usize = std::env::var("KVSYNC_BENCH_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let rt = if std::env::var("KVSYNC_BENCH_CURRENT_THREAD").is_ok() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    }
    .enable_all()
    .build()
    .expect("runtime");
    rt.block_on(async {
        let store = MemoryBackend::builder(kvsync_model::demo::registry())
            .history_limit(4 * n)
            .build()
            .expect("store");
        fill(&store, n).await;
        println!("kvsync Syncer over the memory backend, {n} keys of ~200 bytes");
        println!("rss after fill: {} KiB", rss_kib().unwrap_or(0));

        let runs = 5;
        let mut sync = Vec::new();
        let mut raw = Vec::new();
        for _ in 0..runs {
            raw.push(raw_list(&store, n).await);
            sync.push(initial_sync(&store, n).await);
        }
        println!("runs: syncer {sync:?}, raw {raw:?}");
        let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let (s, r) = (best(&sync), best(&raw));
        println!(
            "initial sync to InSync + map (best of {runs}):  syncer {:>8.1} ms   raw list + map {:>8.1} ms   ratio {:.2}x",
            s.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            s.as_secs_f64() / r.as_secs_f64()
        );
        let (s, r) = (median(&mut sync), median(&mut raw));
        println!(
            "initial sync to InSync + map (median):     syncer {:>8.1} ms   raw list + map {:>8.1} ms   ratio {:.2}x",
            s.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            s.as_secs_f64() / r.as_secs_f64()
        );

        let updates = n;
        let s = steady_syncer(&store, updates, n).await;
        let r = steady_raw(&store, updates, n).await;
        let ups = |d: Duration| updates as f64 / d.as_secs_f64();
        println!(
            "steady state, {updates} updates:  syncer {:>9.0} updates/s   raw watch {:>9.0} updates/s   ratio {:.2}x",
            ups(s),
            ups(r),
            ups(s) / ups(r)
        );
        println!("rss at end: {} KiB", rss_kib().unwrap_or(0));
    });
}
