//! Coordination figures, each beside a raw baseline measured in the same run:
//!
//! 1. uncontended lock acquire + release on etcd (`kvsync_backend::lock`) against raw
//!    etcd-client (lease grant, `LockClient::lock`, unlock, lease revoke), and on SQLite;
//!    p50/p99 of `KVSYNC_BENCH_LOCKS` rounds (300);
//! 2. snapshot save and restore of `KVSYNC_BENCH_KEYS` keys (100,000) on etcd: save to a file
//!    against a raw paged range of the same keys; restore into an empty prefix; the peak
//!    resident memory of the process after each;
//! 3. leader failover after kill -9 on SQLite, etcd and Kubernetes (the API server double)
//!    (elector processes, lease 2 s): time from the kill to the new leader's first line,
//!    against the lease duration.
//!
//! Run with `cargo bench -p kvsync-tests --bench coordination`; `KVSYNC_BENCH_PARTS=1,3` runs
//! some of the measures.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvsync_backend::etcd::EtcdBackend;
use kvsync_backend::snapshot::{self, RestoreOptions};
use kvsync_backend::sqlite::{SqliteBackend, SqliteConfig};
use kvsync_backend::{Client, LockOptions, lock};
use kvsync_tests::etcd::EtcdCluster;

fn part(n: u32) -> bool {
    std::env::var("KVSYNC_BENCH_PARTS")
        .map(|v| v.split(',').any(|p| p.trim() == n.to_string()))
        .unwrap_or(true)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn report(what: &str, v: &mut [f64]) -> (f64, f64) {
    let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
    println!("   {what}: p50 {p50:.2} ms, p99 {p99:.2} ms");
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let registry = kvsync_model::demo::registry();
    let cluster = tokio::task::spawn_blocking(EtcdCluster::start)
        .await
        .expect("start etcd");
    let etcd: Arc<dyn Client> = Arc::new(
        EtcdBackend::connect(cluster.config("/bench/coordination"))
            .await
            .expect("connect"),
    );
    let raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .expect("raw client");
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    if part(1) {
        let rounds = env_usize("KVSYNC_BENCH_LOCKS", 300);
        println!("1. uncontended lock acquire + release, {rounds} rounds (alternating)");
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        let opts = LockOptions::new().with_ttl(Duration::from_secs(15));
        for _ in 0..rounds {
            let t = Instant::now();
            let g = lock(etcd.clone(), "bench", &opts).await.expect("lock");
            g.release().await.expect("release");
            ours.push(t.elapsed().as_secs_f64() * 1e3);

            let t = Instant::now();
            let mut lc = raw.lease_client();
            let lease = lc.grant(15, None).await.expect("grant").id();
            let mut locks = raw.lock_client();
            let held = locks
                .lock(
                    "/bench/raw-lock",
                    Some(etcd_client::LockOptions::new().with_lease(lease)),
                )
                .await
                .expect("raw lock");
            locks.unlock(held.key()).await.expect("raw unlock");
            lc.revoke(lease).await.expect("revoke");
            base.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (o50, o99) = report("kvsync lock on etcd", &mut ours);
        let (b50, b99) = report("raw etcd-client LockClient", &mut base);
        println!(
            "   ratio: p50 {:.2}x, p99 {:.2}x (goal <= 1.2x)",
            o50 / b50,
            o99 / b99
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let sqlite: Arc<dyn Client> = Arc::new(
            SqliteBackend::open(SqliteConfig::new(
                dir.path().join("lock.db"),
                registry.clone(),
            ))
            .expect("open"),
        );
        let mut lite = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let g = lock(sqlite.clone(), "bench", &opts).await.expect("lock");
            g.release().await.expect("release");
            lite.push(t.elapsed().as_secs_f64() * 1e3);
        }
        report("kvsync lock on SQLite", &mut lite);
    }

    if part(2) {
        let keys = env_usize("KVSYNC_BENCH_KEYS", 100_000);
        println!("2. snapshot of {keys} IPPools on etcd");
        let source: Arc<dyn Client> = Arc::new(
            EtcdBackend::connect(cluster.config("/bench/snap-src"))
                .await
                .expect("connect"),
        );
        // Written through kvsync, so that the values are in its envelope; 128 a transaction.
        for chunk in (0..keys).collect::<Vec<_>>().chunks(128) {
            let puts = chunk.iter().map(|i| {
                kvsync_backend::TxnOp::Put(kvsync_model::KVPair::new(
                    kvsync_model::ResourceKey::cluster("IPPool", format!("pool-{i:07}")),
                    serde_json::json!({
                        "cidr": format!("10.{}.{}.0/24", (i / 256) % 256, i % 256),
                        "blockSize": 26, "natOutgoing": true}),
                ))
            });
            source
                .txn(kvsync_backend::Txn::new().and_then(puts))
                .await
                .expect("seed");
        }
        let mut kv = raw.kv_client();
        let rss0 = kvsync_tests::process::peak_rss_mib(None);
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("snap.jsonl");
        let t = Instant::now();
        let out = tokio::io::BufWriter::new(tokio::fs::File::create(&file).await.expect("file"));
        let saved = snapshot::save(source.clone(), &["IPPool".to_owned()], out)
            .await
            .expect("save");
        let save_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(saved.count as usize, keys);
        let rss_save = kvsync_tests::process::peak_rss_mib(None);
        let t = Instant::now();
        let mut n = 0;
        let mut key = b"/bench/snap-src/ippools/".to_vec();
        let end = b"/bench/snap-src/ippools0".to_vec();
        let mut rev = 0;
        loop {
            let mut opts = etcd_client::GetOptions::new()
                .with_range(end.clone())
                .with_limit(5000);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let resp = kv.get(key.clone(), Some(opts)).await.expect("range");
            rev = resp.header().map_or(0, |h| h.revision());
            n += resp.kvs().len();
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    key = last.key().to_vec();
                    key.push(0);
                }
                _ => break,
            }
        }
        let range_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(n, keys);
        println!(
            "   save to a file: {save_ms:.0} ms ({} MiB); raw paged range (5,000 a page): {range_ms:.0} ms; ratio {:.2}x",
            std::fs::metadata(&file).map_or(0, |m| m.len()) / (1 << 20),
            save_ms / range_ms
        );
        let target: Arc<dyn Client> = Arc::new(
            EtcdBackend::connect(cluster.config("/bench/snap-dst"))
                .await
                .expect("connect"),
        );
        let t = Instant::now();
        let input = tokio::io::BufReader::new(tokio::fs::File::open(&file).await.expect("open"));
        let restored = snapshot::restore(&*target, snapshot::read(input), &RestoreOptions::new())
            .await
            .expect("restore");
        let restore_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(restored.written as usize, keys);
        println!(
            "   restore into an empty prefix: {restore_ms:.0} ms ({:.0} keys/s)",
            keys as f64 / (restore_ms / 1e3)
        );
        println!(
            "   peak RSS: {rss0:.0} MiB before, {rss_save:.0} MiB after the save, {:.0} MiB after the restore",
            kvsync_tests::process::peak_rss_mib(None)
        );
    }

    if part(3) {
        println!("3. leader failover after kill -9 (lease 2 s, retry 0.3 s), 3 rounds each");
        let dir = tempfile::tempdir().expect("temp dir");
        let double = kvsync_tests::kube_double::ApiServerDouble::start(
            &kvsync_model::Registry::with_demo_kinds(),
            100_000,
        )
        .await;
        for (name, spec) in [
            (
                "sqlite",
                format!("sqlite:{}#/bench", dir.path().join("election.db").display()),
            ),
            (
                "etcd",
                format!("etcd:{}#/bench-election", cluster.endpoints().join(",")),
            ),
            (
                "kubernetes (double)",
                format!("kubernetes:{}", double.kubeconfig().display()),
            ),
        ] {
            let mut times = Vec::new();
            for round in 0..3 {
                let spec = spec.clone();
                let ms = tokio::task::spawn_blocking(move || failover_ms(&spec, round))
                    .await
                    .expect("failover");
                times.push(ms);
            }
            report(&format!("failover on {name}"), &mut times);
        }
    }
}

fn failover_ms(spec: &str, round: usize) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    for who in 0..2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvsync-elector"))
            .args([spec, &format!("leader-{round}"), &format!("c{who}")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a candidate");
        let out = child.stdout.take().expect("stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((who, line)).is_err() {
                    return;
                }
            }
        });
        children.push(child);
    }
    let leader = loop {
        let (who, line) = rx.recv_timeout(Duration::from_secs(20)).expect("a leader");
        if line.starts_with("wrote") {
            break who;
        }
    };
    let t = Instant::now();
    children[leader].kill().expect("kill -9");
    let _ = children[leader].wait();
    loop {
        let (who, line) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a new leader");
        if who != leader && line.starts_with("leading") {
            break;
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    ms
}
