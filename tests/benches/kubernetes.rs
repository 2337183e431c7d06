//! The Kubernetes backend's decoding and initial sync against kube's own, through the API
//! server double (real HTTP on loopback), in one run.
//!
//! - **decoding**: one list page of `KVSYNC_BENCH_PAGE` IPPools (2,000 by default) as the
//!   double sends it (metadata with managedFields, an ~80-byte spec), decoded by the backend
//!   (slim types, the spec kept as text) and by kube's `Api::list` (`ObjectList<DynamicObject>`
//!   through serde_json, what `Api::list` does with the same text): time, allocations and
//!   bytes allocated per object, and the bytes the decoded page keeps per object.
//! - **initial sync** of `KVSYNC_BENCH_OBJECTS` IPPools (50,000 by default), each mode in a
//!   process of its own (this binary again) so that its peak resident set is its own: the
//!   kvsync Syncer to InSync with every update applied to a map (watch-list, and paged lists
//!   of several page sizes), and kube's `Api::list` paging through the same objects into a
//!   Vec (pages of 500 and of 5,000) and kube's streaming list (`Api::watch` with
//!   `sendInitialEvents`, to its initial-events-end bookmark). Rounds alternate modes;
//!   medians of `KVSYNC_BENCH_ROUNDS` (3).
//!
//! Run with `cargo bench -p kvsync-tests --bench kubernetes`.

use std::alloc::System;
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, ObjectList, WatchEvent, WatchParams};
use kvsync_backend::{Client, KubernetesBackend, KubernetesConfig};
use kvsync_model::{Json, ListOptions, Registry, ResourceKey};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};
use kvsync_tests::kube_double::ApiServerDouble;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// (allocations, bytes allocated, bytes live) now.
fn alloc_stats() -> (usize, usize, usize) {
    let s = GLOBAL.stats();
    (
        s.allocations + s.reallocations,
        s.bytes_allocated,
        s.bytes_allocated.saturating_sub(s.bytes_deallocated),
    )
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ippools() -> ApiResource {
    ApiResource {
        group: "kvsync.dev".into(),
        version: "v1".into(),
        api_version: "kvsync.dev/v1".into(),
        kind: "IPPool".into(),
        plural: "ippools".into(),
    }
}

async fn backend(
    kubeconfig: &str,
    configure: impl FnOnce(KubernetesConfig) -> KubernetesConfig,
) -> KubernetesBackend {
    KubernetesBackend::connect(configure(
        KubernetesConfig::new(kvsync_model::demo::registry()).with_kubeconfig(kubeconfig),
    ))
    .await
    .expect("connect")
}

async fn kube_client(kubeconfig: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

/// One initial sync in this process; returns how many objects it holds at the end.
async fn child(mode: &str, kubeconfig: &str) -> usize {
    match mode {
        m if m.starts_with("syncer-") => {
            let client: Arc<dyn Client> = match m.strip_prefix("syncer-paged-") {
                Some(size) => {
                    let size: u32 = size.parse().expect("page size");
                    Arc::new(
                        backend(kubeconfig, |c| {
                            c.with_watch_list(false).with_page_size(size)
                        })
                        .await,
                    )
                }
                None => Arc::new(backend(kubeconfig, |c| c).await),
            };
            let mut events = Syncer::new(client)
                .with_resource(ResourceType::new(ListOptions::new("IPPool")))
                .stream();
            let mut map: HashMap<ResourceKey, Json> = HashMap::new();
            while let Some(ev) = events.next().await {
                match ev {
                    SyncerEvent::Updates(batch) => {
                        for u in batch {
                            if u.update_type == UpdateType::Deleted {
                                map.remove(&u.kvp.key);
                            } else {
                                map.insert(u.kvp.key, u.kvp.value);
                            }
                        }
                    }
                    SyncerEvent::Status(SyncStatus::InSync) => break,
                    _ => {}
                }
            }
            let n = map.len();
            events.stop().await;
            n
        }
        m if m.starts_with("kube-list-") => {
            let size: u32 = m["kube-list-".len()..].parse().expect("page size");
            let api: Api<DynamicObject> = Api::all_with(kube_client(kubeconfig).await, &ippools());
            let mut kept: Vec<DynamicObject> = Vec::new();
            let mut lp = ListParams::default().limit(size);
            loop {
                let page: ObjectList<DynamicObject> = api.list(&lp).await.expect("list");
                kept.extend(page.items);
                match page.metadata.continue_.filter(|t| !t.is_empty()) {
                    Some(t) => lp = lp.continue_token(&t),
                    None => break,
                }
            }
            kept.len()
        }
        "kube-watch-list" => {
            let api: Api<DynamicObject> = Api::all_with(kube_client(kubeconfig).await, &ippools());
            let wp = WatchParams::streaming_lists();
            let mut stream = api.watch(&wp, "").await.expect("watch").boxed();
            let mut kept: Vec<DynamicObject> = Vec::new();
            while let Some(ev) = stream.next().await {
                match ev.expect("event") {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => kept.push(o),
                    WatchEvent::Bookmark(b)
                        if b.metadata
                            .annotations
                            .contains_key("k8s.io/initial-events-end") =>
                    {
                        break;
                    }
                    _ => {}
                }
            }
            kept.len()
        }
        other => panic!("unknown mode {other}"),
    }
}

/// What one initial sync in a child process measured.
struct Run {
    secs: f64,
    allocs: f64,
    peak_mib: f64,
    start_mib: f64,
}

fn run_child(mode: &str, kubeconfig: &str, n: usize) -> Run {
    let out = Command::new(std::env::current_exe().expect("this binary"))
        .env("KVSYNC_BENCH_CHILD", mode)
        .env("KVSYNC_BENCH_KUBECONFIG", kubeconfig)
        .env("KVSYNC_BENCH_OBJECTS", n.to_string())
        .output()
        .expect("run a child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "{mode}: no result: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().expect("a number"))
        .collect();
    Run {
        secs: f[0],
        allocs: f[1],
        peak_mib: f[2],
        start_mib: f[3],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The decoding comparison on one page's text.
fn decoding(backend: &KubernetesBackend, text: &str, objects: usize) {
    let reps = env_or("KVSYNC_BENCH_DECODE_REPS", 20);
    let per = |d: Duration, x: usize| d.as_secs_f64() * 1e9 / (x * reps) as f64;
    println!(
        "decoding one page of {objects} IPPools ({} bytes, {} bytes an object), {reps} times:",
        text.len(),
        text.len() / objects
    );
    for name in ["kvsync slim decode", "kube ObjectList<DynamicObject>"] {
        let (a0, b0, _) = alloc_stats();
        let t = Instant::now();
        let mut kept = 0usize;
        for _ in 0..reps {
            let (_, _, live0) = alloc_stats();
            if name.starts_with("kvsync") {
                let list = backend.decode_list_text("IPPool", text).expect("decode");
                assert_eq!(list.items.len(), objects);
                kept = alloc_stats().2 - live0;
                std::hint::black_box(list);
            } else {
                let list: ObjectList<DynamicObject> = serde_json::from_str(text).expect("decode");
                assert_eq!(list.items.len(), objects);
                kept = alloc_stats().2 - live0;
                std::hint::black_box(list);
            }
        }
        let took = t.elapsed();
        let (a1, b1, _) = alloc_stats();
        println!(
            "   {name:<32} {:>7.0} ns/object  {:>6.1} allocations/object  {:>6.0} bytes allocated/object  {:>6.0} bytes kept/object",
            per(took, objects),
            (a1 - a0) as f64 / (objects * reps) as f64,
            (b1 - b0) as f64 / (objects * reps) as f64,
            kept as f64 / objects as f64
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(mode) = std::env::var("KVSYNC_BENCH_CHILD") {
        let kubeconfig = std::env::var("KVSYNC_BENCH_KUBECONFIG").expect("kubeconfig");
        let n = env_or("KVSYNC_BENCH_OBJECTS", 50_000);
        let start_mib = kvsync_tests::process::rss_mib(None);
        let (a0, _, _) = alloc_stats();
        let t = Instant::now();
        let got = rt.block_on(child(&mode, &kubeconfig));
        let secs = t.elapsed().as_secs_f64();
        let (a1, _, _) = alloc_stats();
        assert_eq!(got, n, "{mode}: every object");
        println!(
            "RESULT {secs} {} {} {start_mib}",
            a1 - a0,
            kvsync_tests::process::peak_rss_mib(None)
        );
        return;
    }
    let n = env_or("KVSYNC_BENCH_OBJECTS", 50_000);
    let page = env_or("KVSYNC_BENCH_PAGE", 2_000);
    let rounds = env_or("KVSYNC_BENCH_ROUNDS", 3);
    rt.block_on(async {
        let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1_000).await;
        double.put_ippools(n);
        let kubeconfig = double.kubeconfig().display().to_string();
        let addr = double.url().trim_start_matches("http://").to_owned();
        let text = tokio::task::spawn_blocking(move || {
            kvsync_tests::http::request(
                &addr,
                "GET",
                &format!("/apis/kvsync.dev/v1/ippools?limit={page}"),
                &[],
                None,
            )
            .body
        })
        .await
        .expect("page");
        let be = backend(&kubeconfig, |c| c).await;
        decoding(&be, &text, page.min(n));

        let modes = [
            "syncer-watch-list",
            "syncer-paged-500",
            "syncer-paged-2000",
            "syncer-paged-5000",
            "kube-watch-list",
            "kube-list-500",
            "kube-list-5000",
        ];
        println!(
            "\ninitial sync of {n} IPPools through the double, each mode in its own process, median of {rounds} alternating rounds:"
        );
        let mut runs: HashMap<&str, Vec<Run>> = HashMap::new();
        for _ in 0..rounds {
            for mode in modes {
                let kc = kubeconfig.clone();
                let r = tokio::task::spawn_blocking(move || run_child(mode, &kc, n))
                    .await
                    .expect("child");
                runs.entry(mode).or_default().push(r);
            }
        }
        for mode in modes {
            let r = &runs[mode];
            let secs = median(r.iter().map(|r| r.secs).collect());
            let allocs = median(r.iter().map(|r| r.allocs).collect());
            let peak = median(r.iter().map(|r| r.peak_mib).collect());
            let start = median(r.iter().map(|r| r.start_mib).collect());
            println!(
                "   {mode:<20} {secs:>6.2} s  {:>6.1} allocations/object  peak RSS {peak:>5.0} MiB ({:>5.0} bytes/object over the {start:.0} MiB at start)",
                allocs / n as f64,
                (peak - start) * 1024.0 * 1024.0 / n as f64
            );
        }
    });
}
