//! The Syncer over a local etcd (started by the test fixture) against raw `etcd-client`
//! baselines measured in the same run, for 100,000 keys of about 200 bytes:
//!
//! 1. initial sync (to InSync, consumer map filled) vs the best raw paged range;
//! 2. steady-state updates/s with a writer keeping 16 puts in flight, vs a raw watch, with
//!    the lag from put response to delivery;
//! 3. recovery after a compaction while disconnected (1% changed) vs a raw relist;
//! 4. live heap of the Syncer plus a typed consumer map vs a `BTreeMap<String, Vec<u8>>`.
//!
//! Run with `cargo bench -p kvsync-tests --bench etcd`. Settings: `KVSYNC_BENCH_KEYS=N` changes
//! N; `KVSYNC_BENCH_PARTS=1,3` runs only some of the measures; `KVSYNC_BENCH_REPEAT=N` sets
//! measure 1's rounds (5); `KVSYNC_BENCH_DEBUG=1` prints page timings and decode costs;
//! `KVSYNC_BENCH_SETTLE_MS=N` sets the pause between a side's list and the writer in measure 2
//! (1,000 ms).

use std::alloc::System;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvsync_backend::etcd::EtcdBackend;
use kvsync_backend::{Client, FaultyClient};
use kvsync_model::demo::IPPool;
use kvsync_model::{KVPair, ListOptions, ResourceKey, Revision};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};
use kvsync_tests::etcd::EtcdCluster;

use serde_json::json;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

/// Counts live heap bytes, to compare data structures' footprints exactly.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn live_bytes() -> usize {
    // stats_alloc already folds reallocations into these two.
    let s = GLOBAL.stats();
    s.bytes_allocated.saturating_sub(s.bytes_deallocated)
}

const PREFIX: &str = "/bench/v1";
const POOLS: &str = "/bench/v1/ippools/";

fn name(i: usize) -> String {
    format!("pool-{i:07}")
}

fn spec(i: usize, generation: usize) -> serde_json::Value {
    json!({
        "cidr": format!("10.{}.{}.0/24", (i / 256) % 256, i % 256),
        "blockSize": 26 + (generation % 3) as u8,
        "natOutgoing": generation % 2 == 0,
        "disabled": false,
    })
}

/// A typed consumer map, as a controller keeps: key -> IPPool.
type Typed = HashMap<ResourceKey, IPPool>;

fn apply(map: &mut Typed, batch: Vec<kvsync_syncer::Update>) -> Option<Revision> {
    let mut last = None;
    for u in batch {
        last = u.kvp.revision.clone();
        match u.update_type {
            UpdateType::Deleted => {
                map.remove(&u.kvp.key);
            }
            _ => {
                if let Ok(v) = u.decode::<IPPool>() {
                    map.insert(u.kvp.key, v);
                }
            }
        }
    }
    last
}

fn syncer(client: Arc<dyn Client>) -> Syncer {
    Syncer::new(client)
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .with_retry_policy(Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(10),
        ))
}

async fn sync_to_in_sync(events: &mut kvsync_syncer::SyncerStream, map: &mut Typed) {
    while let Some(ev) = events.next().await {
        match ev {
            SyncerEvent::Updates(b) => {
                apply(map, b);
            }
            SyncerEvent::Status(SyncStatus::InSync) => return,
            _ => {}
        }
    }
}

async fn raw_paged_range(raw: &etcd_client::Client, page: i64) -> (Duration, usize) {
    let mut kv = raw.kv_client().max_decoding_message_size(256 << 20);
    let t = Instant::now();
    let end = b"/bench/v1/ippools0".to_vec();
    let mut start = POOLS.as_bytes().to_vec();
    let mut rev = 0;
    let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    loop {
        let mut opts = etcd_client::GetOptions::new()
            .with_range(end.clone())
            .with_limit(page);
        if rev > 0 {
            opts = opts.with_revision(rev);
        }
        let mut resp = kv.get(start.clone(), Some(opts)).await.expect("range");
        if rev == 0 {
            rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        if let Some(last) = kvs.last() {
            start = last.key().to_vec();
            start.push(0);
        }
        for kv in kvs {
            let (k, v) = kv.into_key_value();
            map.insert(String::from_utf8(k).unwrap_or_default(), v);
        }
        if !more {
            break;
        }
    }
    (t.elapsed(), map.len())
}

/// Whether measure `n` is to run (`KVSYNC_BENCH_PARTS`, all by default).
fn part(n: u32) -> bool {
    std::env::var("KVSYNC_BENCH_PARTS")
        .map(|p| p.split(',').any(|s| s.trim() == n.to_string()))
        .unwrap_or(true)
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`, in ms.
fn cpu_ms(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 * 10.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

fn main() {
    let n: usize = std::env::var("KVSYNC_BENCH_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let cluster = EtcdCluster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(&cluster, n));
}

async fn run(cluster: &EtcdCluster, n: usize) {
    let backend = EtcdBackend::connect(cluster.config(PREFIX))
        .await
        .expect("connect");
    let raw = backend.etcd_client().clone();
    let client: Arc<dyn Client> = Arc::new(backend.clone());

    // Fill: 100,000 keys through the backend's envelope, 64 writes in flight.
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let c = client.clone();
            async move {
                c.apply(KVPair::new(
                    ResourceKey::cluster("IPPool", name(i)),
                    spec(i, 0),
                ))
                .await
                .expect("fill")
            }
        })
        .buffer_unordered(64)
        .for_each(|_| async {})
        .await;
    let sample = raw
        .kv_client()
        .get(format!("{POOLS}{}", name(0)), None)
        .await
        .expect("get");
    let bytes = sample
        .kvs()
        .first()
        .map(|kv| kv.key().len() + kv.value().len())
        .unwrap_or(0);
    println!(
        "kvsync Syncer over etcd {} vs raw etcd-client, {n} keys of {bytes} bytes (key + stored value)",
        cluster.endpoints()[0]
    );
    println!("fill: {:.1} s", t.elapsed().as_secs_f64());

    if part(1) {
        // 1. Initial sync vs the best raw paged range.
        let (mut raw_best, mut best_page) = (Duration::MAX, 0);
        for page in [500, 2_000, 5_000, 10_000, 50_000] {
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let (d, count) = raw_paged_range(&raw, page).await;
                assert_eq!(count, n);
                best = best.min(d);
            }
            println!(
                "  raw paged range, pages of {page:>6}: {:>8.1} ms",
                ms(best)
            );
            if best < raw_best {
                (raw_best, best_page) = (best, page);
            }
        }
        let mut list_best = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let list = client
                .list(&ListOptions::new("IPPool"))
                .await
                .expect("list");
            list_best = list_best.min(t.elapsed());
            assert_eq!(list.items.len(), n);
        }
        println!(
            "  the backend's list alone (pages decoded into KVPairs): {:>8.1} ms",
            ms(list_best)
        );
        if std::env::var_os("KVSYNC_BENCH_DEBUG").is_some() {
            for _ in 0..2 {
                let t = Instant::now();
                let mut pages = client
                    .list_pages(&ListOptions::new("IPPool"))
                    .await
                    .expect("pages");
                while let Some(p) = pages.next().await {
                    let p = p.expect("page");
                    println!("    page of {} at {:.1} ms", p.items.len(), ms(t.elapsed()));
                }
            }
            let mut kv = raw.kv_client().max_decoding_message_size(256 << 20);
            let all = kv
                .get(POOLS, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .expect("all");
            let t = Instant::now();
            let values: Vec<serde_json::Value> = all
                .kvs()
                .iter()
                .map(|kv| serde_json::from_slice(kv.value()).expect("json"))
                .collect();
            println!(
                "    JSON decode of every value into Value: {:.1} ms",
                ms(t.elapsed())
            );
            let t = Instant::now();
            let pools: Vec<IPPool> = values
                .iter()
                .filter_map(|v| serde_json::from_value::<IPPool>(v["spec"].clone()).ok())
                .collect();
            println!(
                "    Value -> IPPool: {:.1} ms ({})",
                ms(t.elapsed()),
                pools.len()
            );
            #[derive(serde::Deserialize)]
            struct Env<'a> {
                #[allow(dead_code)]
                metadata: serde_json::Value,
                #[serde(borrow)]
                spec: &'a serde_json::value::RawValue,
            }
            let t = Instant::now();
            let raws: Vec<Box<serde_json::value::RawValue>> = all
                .kvs()
                .iter()
                .map(|kv| {
                    serde_json::from_slice::<Env>(kv.value())
                        .expect("env")
                        .spec
                        .to_owned()
                })
                .collect();
            println!("    envelope with a raw spec: {:.1} ms", ms(t.elapsed()));
            let t = Instant::now();
            let pools: Vec<IPPool> = raws
                .iter()
                .filter_map(|r| serde_json::from_str(r.get()).ok())
                .collect();
            println!(
                "    raw -> IPPool: {:.1} ms ({})",
                ms(t.elapsed()),
                pools.len()
            );
            let t = Instant::now();
            let codec = client.codec();
            let keys: Vec<_> = all
                .kvs()
                .iter()
                .filter_map(|kv| codec.from_path(std::str::from_utf8(kv.key()).ok()?).ok())
                .collect();
            println!(
                "    key parsing: {:.1} ms ({})",
                ms(t.elapsed()),
                keys.len()
            );
        }
        // The Syncer's runs alternate with raw runs at the best page size, so that both see
        // the same machine (this VM's speed drifts by up to 2x within a minute).
        let etcd_pid = cluster.members[0].pid().map(|p| p.to_string());
        let cpu = || {
            (
                cpu_ms("self"),
                etcd_pid.as_deref().map(cpu_ms).unwrap_or_default(),
            )
        };
        // KVSYNC_BENCH_REPEAT=N sets the number of rounds (5), e.g. more to profile them.
        let rounds: usize = std::env::var("KVSYNC_BENCH_REPEAT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        let (mut raw_runs, mut sync_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut raw_cpu, mut sync_cpu) = ((0.0, 0.0), (0.0, 0.0));
        for _ in 0..rounds {
            let c0 = cpu();
            let (raw_d, count) = raw_paged_range(&raw, best_page).await;
            let c1 = cpu();
            assert_eq!(count, n);
            let t = Instant::now();
            let mut events = syncer(client.clone()).stream();
            let mut map = Typed::with_capacity(n);
            sync_to_in_sync(&mut events, &mut map).await;
            let d = t.elapsed();
            let c2 = cpu();
            assert_eq!(map.len(), n);
            events.stop().await;
            raw_cpu = (raw_cpu.0 + c1.0 - c0.0, raw_cpu.1 + c1.1 - c0.1);
            sync_cpu = (sync_cpu.0 + c2.0 - c1.0, sync_cpu.1 + c2.1 - c1.1);
            raw_runs.push(raw_d);
            sync_runs.push(d);
            ratios.push(d.as_secs_f64() / raw_d.as_secs_f64());
        }
        let per = |total: f64| total / rounds.max(1) as f64;
        println!(
            "  CPU per run: Syncer: this process {:.0} ms, etcd {:.0} ms; raw range: this process {:.0} ms, etcd {:.0} ms",
            per(sync_cpu.0),
            per(sync_cpu.1),
            per(raw_cpu.0),
            per(raw_cpu.1)
        );
        let sync_best = sync_runs.iter().copied().min().unwrap_or_default();
        let raw_best = raw_best.min(raw_runs.iter().copied().min().unwrap_or(Duration::MAX));
        println!(
            "1. initial sync: Syncer {:.1} ms vs best raw paged range {:.1} ms: {:.2}x (target <= 1.25x); median of {rounds} alternating rounds {:.2}x",
            ms(sync_best),
            ms(raw_best),
            sync_best.as_secs_f64() / raw_best.as_secs_f64(),
            percentile(&mut ratios, 0.5)
        );
    }
    if part(2) {
        // 2. Steady state: a writer with 16 puts in flight.
        let updates = n.min(50_000);
        // Two rounds, alternating which side goes first, so that both see the same machine.
        let (mut syncer_secs, mut raw_secs) = (0.0, 0.0);
        let (mut syncer_lags, mut raw_lags) = (Vec::new(), Vec::new());
        let (mut syncer_cpu, mut raw_cpu) = (0.0, 0.0);
        for round in 0..2 {
            for through_syncer in [round == 0, round != 0] {
                let c0 = cpu_ms("self");
                let (rate, lags) = steady(client.clone(), &raw, updates, through_syncer).await;
                let c = cpu_ms("self") - c0;
                if through_syncer {
                    syncer_secs += updates as f64 / rate;
                    syncer_lags.extend(lags);
                    syncer_cpu += c;
                } else {
                    raw_secs += updates as f64 / rate;
                    raw_lags.extend(lags);
                    raw_cpu += c;
                }
            }
        }
        let (syncer_rate, raw_rate) = (
            2.0 * updates as f64 / syncer_secs,
            2.0 * updates as f64 / raw_secs,
        );
        println!(
            "  CPU of this process (writer included) per 1,000 updates: Syncer {:.1} ms, raw watch {:.1} ms",
            syncer_cpu / (2.0 * updates as f64 / 1000.0),
            raw_cpu / (2.0 * updates as f64 / 1000.0)
        );
        println!(
            "2. steady state, 2 x {updates} updates with 16 in flight: Syncer {syncer_rate:.0}/s vs raw watch {raw_rate:.0}/s: {:.2}x (target >= 0.95x)",
            syncer_rate / raw_rate
        );
        println!(
            "   lag from put response to delivery: Syncer p50 {:.2} ms p99 {:.2} ms; raw watch p50 {:.2} ms p99 {:.2} ms (target p99 <= 5 ms)",
            percentile(&mut syncer_lags, 0.5),
            percentile(&mut syncer_lags, 0.99),
            percentile(&mut raw_lags, 0.5),
            percentile(&mut raw_lags, 0.99)
        );
    }
    if part(3) {
        // 3. Recovery after compaction while disconnected, 1% changed.
        let faulty = Arc::new(FaultyClient::new(client.clone()));
        let faults = faulty.faults();
        let mut events = syncer(faulty.clone()).stream();
        let mut map = Typed::with_capacity(n);
        sync_to_in_sync(&mut events, &mut map).await;
        faults.set_unavailable(true);
        let changed = n / 100;
        for i in 0..changed {
            client
                .apply(KVPair::new(
                    ResourceKey::cluster("IPPool", name(i * 100)),
                    spec(i * 100, 7),
                ))
                .await
                .expect("change");
        }
        let rev = backend.current_revision().await.expect("revision");
        backend.compact_at(rev).await.expect("compact");
        let t = Instant::now();
        faults.set_unavailable(false);
        sync_to_in_sync(&mut events, &mut map).await;
        let recovery = t.elapsed();
        events.stop().await;
        let mut relist_best = Duration::MAX;
        for _ in 0..3 {
            relist_best = relist_best.min(raw_paged_range(&raw, 5_000).await.0);
        }
        println!(
            "3. recovery after compaction while disconnected ({changed} changed): Syncer {:.1} ms vs raw relist {:.1} ms: {:.2}x (target <= 1.25x)",
            ms(recovery),
            ms(relist_best),
            recovery.as_secs_f64() / relist_best.as_secs_f64()
        );
    }
    if part(4) {
        // 4. Live heap: Syncer state + typed consumer map vs BTreeMap<String, Vec<u8>>. Each is
        // measured in a window of its own, after a full list has grown the connection's buffers,
        // so only the structures themselves are counted.
        drop(
            client
                .list(&ListOptions::new("IPPool"))
                .await
                .expect("warm up"),
        );
        let fetched = {
            let mut kv = raw.kv_client().max_decoding_message_size(256 << 20);
            kv.get(POOLS, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .expect("get all")
        };
        let before = live_bytes();
        let plain: BTreeMap<String, Vec<u8>> = fetched
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        let plain_bytes = live_bytes().saturating_sub(before);
        drop(fetched);
        let before = live_bytes();
        let mut events = syncer(client.clone()).stream();
        let mut map = Typed::new();
        sync_to_in_sync(&mut events, &mut map).await;
        // Let the buffers of the initial list (freed by other tasks) go first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let syncer_bytes = live_bytes().saturating_sub(before);
        let before = live_bytes();
        let map_copy: Typed = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let map_bytes = live_bytes().saturating_sub(before);
        drop(map_copy);
        println!(
            "4. live heap: Syncer + typed consumer map {:.1} MiB (of which the map {:.1} MiB) vs BTreeMap<String, Vec<u8>> {:.1} MiB: {:.2}x (target <= 1.3x)",
            syncer_bytes as f64 / 1048576.0,
            map_bytes as f64 / 1048576.0,
            plain_bytes as f64 / 1048576.0,
            syncer_bytes as f64 / plain_bytes as f64
        );
        assert_eq!(map.len(), plain.len());
        events.stop().await;
    }
}

/// Writes `updates` puts with 16 in flight and measures the delivery rate and lag, through
/// the Syncer (`through_syncer`) or a raw watch.
async fn steady(
    client: Arc<dyn Client>,
    raw: &etcd_client::Client,
    updates: usize,
    through_syncer: bool,
) -> (f64, Vec<f64>) {
    let keys = 10_000usize;
    let acked: Arc<Vec<AtomicI64>> = Arc::new((0..updates).map(|_| AtomicI64::new(0)).collect());
    let epoch = Instant::now();
    let start_rev = raw
        .kv_client()
        .get(
            POOLS,
            Some(etcd_client::GetOptions::new().with_count_only()),
        )
        .await
        .expect("rev")
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);

    // The consumer side.
    let mut lags = Vec::with_capacity(updates);
    let mut received = 0usize;
    let on_rev = |rev: i64, lags: &mut Vec<f64>| {
        let seq = (rev - start_rev - 1) as usize;
        if let Some(a) = acked.get(seq) {
            let now = epoch.elapsed().as_nanos() as i64;
            let at = a.load(Ordering::Acquire);
            if at > 0 {
                lags.push(((now - at).max(0)) as f64 / 1e6);
            }
        }
    };
    let mut syncer_events = None;
    let mut raw_watch = None;
    if through_syncer {
        let mut events = syncer(client.clone()).stream();
        let mut map = Typed::new();
        sync_to_in_sync(&mut events, &mut map).await;
        syncer_events = Some((events, map));
    } else {
        // A raw list-then-watch client: the same paged list first, then the watch.
        raw_paged_range(raw, 50_000).await;
        let mut wc = raw.watch_client();
        let w = wc
            .watch(
                POOLS,
                Some(
                    etcd_client::WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start_rev + 1)
                        .with_prev_key(),
                ),
            )
            .await
            .expect("watch");
        raw_watch = Some(w);
    }

    // Steady state: both sides start writing once their initial list is a second behind.
    // KVSYNC_BENCH_SETTLE_MS changes the pause (1,000 ms), e.g. 0 to see the first writes
    // right after the list.
    let settle = std::env::var("KVSYNC_BENCH_SETTLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    tokio::time::sleep(Duration::from_millis(settle)).await;

    // The writer: raw puts of valid envelopes, 16 in flight, recording when each was acked.
    let writer = {
        let raw = raw.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..updates)
                .map(|seq| {
                    let mut kv = raw.kv_client();
                    let acked = acked.clone();
                    async move {
                        let i = seq % keys;
                        let value = serde_json::to_vec(&json!({
                            "metadata": {"uid": format!("uid-{i}")},
                            "spec": spec(i, seq),
                        }))
                        .unwrap_or_default();
                        let resp = kv
                            .put(format!("{POOLS}{}", name(i)), value, None)
                            .await
                            .expect("put");
                        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                        let seq_of_rev = (rev - start_rev - 1) as usize;
                        if let Some(a) = acked.get(seq_of_rev) {
                            a.store(epoch.elapsed().as_nanos() as i64, Ordering::Release);
                        }
                    }
                })
                .buffer_unordered(16)
                .for_each(|_| async {})
                .await;
        })
    };
    let t = Instant::now();
    let target = start_rev + updates as i64;
    if let Some((events, map)) = syncer_events.as_mut() {
        while received < updates {
            match events.next().await {
                Some(SyncerEvent::Updates(b)) => {
                    for u in &b {
                        if let Some(r) = u.kvp.revision.as_ref().and_then(Revision::as_u64) {
                            on_rev(r as i64, &mut lags);
                        }
                    }
                    received += b.len();
                    let last = apply(map, b);
                    if last
                        .and_then(|r| r.as_u64())
                        .is_some_and(|r| r as i64 >= target)
                    {
                        break;
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
    } else if let Some(w) = raw_watch.as_mut() {
        let mut map: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        'outer: while let Some(Ok(resp)) = w.next().await {
            for ev in resp.events() {
                if let Some(kv) = ev.kv() {
                    on_rev(kv.mod_revision(), &mut lags);
                    map.insert(kv.key().to_vec(), kv.value().to_vec());
                    if kv.mod_revision() >= target {
                        break 'outer;
                    }
                }
            }
        }
    }
    let elapsed = t.elapsed();
    writer.await.expect("writer");
    if let Some((events, _)) = syncer_events {
        events.stop().await;
    }
    (updates as f64 / elapsed.as_secs_f64(), lags)
}
