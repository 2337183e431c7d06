//! The resident memory and sync time of `kvsync controller` following `KVSYNC_BENCH_OBJECTS`
//! IPPools (50,000 by default, an ~80-byte spec each) on the Kubernetes API server double:
//! the figures behind the Deployment's memory request and limit (deploy/README.md).
//!
//! Run with `cargo bench -p kvsync-cli --bench controller`. Prints the time from start to
//! `/readyz` answering 200 and the controller's peak resident set (VmHWM) then, for the
//! default mode (watch-list reads) and for `--kube-paged-lists`. Then the same for
//! `kvsync serve` (the fan-out server, plain TCP) with `KVSYNC_BENCH_FOLLOWERS` followers
//! (200 by default, `RemoteSyncer`s in this process) brought in sync: the figures behind the
//! server Deployment's memory (deploy/README.md).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvsync_model::Registry;
use kvsync_tests::kube_double::ApiServerDouble;

/// `kvsync serve` on the double with `followers` RemoteSyncers: the time until every one is
/// in sync, and the server's peak RSS then.
async fn run_server(double: &ApiServerDouble, n: usize, followers: usize) -> (Duration, f64) {
    use futures::StreamExt;
    use kvsync_syncer::{SyncStatus, SyncerEvent};
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvsync"))
        .args(["--datastore", "kubernetes", "--kubeconfig"])
        .arg(double.kubeconfig())
        .args([
            "serve",
            "--kinds",
            "ippools",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("KVSYNC_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = tokio::task::block_in_place(|| {
        loop {
            let line = lines.next().expect("a line").expect("stderr");
            if let Some(a) = line.strip_prefix("serving on ") {
                break a.to_owned();
            }
        }
    });
    std::thread::spawn(move || for _ in lines {});
    let tasks: Vec<_> = (0..followers)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut events = kvsync_server::RemoteSyncer::new(addr).stream();
                let mut held = std::collections::HashSet::new();
                while let Some(ev) = events.next().await {
                    match ev {
                        SyncerEvent::Updates(batch) => {
                            for u in batch {
                                held.insert(u.kvp.key);
                            }
                        }
                        SyncerEvent::Status(SyncStatus::InSync) if held.len() == n => break,
                        _ => {}
                    }
                }
                drop(events);
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a follower");
    }
    let took = t0.elapsed();
    let rss = kvsync_tests::process::peak_rss_mib(Some(child.id()));
    let _ = child.kill();
    let _ = child.wait();
    (took, rss)
}

fn run(double: &ApiServerDouble, extra: &[&str]) -> (Duration, f64) {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvsync"))
        .args(["--datastore", "kubernetes", "--kubeconfig"])
        .arg(double.kubeconfig())
        .args(extra)
        .args([
            "controller",
            "--kinds",
            "ippools",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("KVSYNC_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the controller");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines.next().expect("a line").expect("stderr");
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    while kvsync_tests::http::request(&addr, "GET", "/readyz", &[], None).code != 200 {
        assert!(t0.elapsed() < Duration::from_secs(300), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    let rss = kvsync_tests::process::peak_rss_mib(Some(child.id()));
    let _ = child.kill();
    let _ = child.wait();
    (took, rss)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("KVSYNC_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1_000).await;
    double.put_ippools(n);
    println!("kvsync controller following {n} IPPools on the API server double");
    for (name, extra) in [
        ("watch-list (default)", &[][..]),
        ("paged lists", &["--kube-paged-lists"][..]),
    ] {
        for round in 1..=2 {
            let (took, rss) = tokio::task::block_in_place(|| run(&double, extra));
            println!(
                "   {name}, round {round}: ready after {:.2} s, peak RSS {rss:.0} MiB ({:.0} bytes an object)",
                took.as_secs_f64(),
                rss * 1024.0 * 1024.0 / n as f64
            );
        }
    }
    let followers: usize = std::env::var("KVSYNC_BENCH_FOLLOWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    println!("kvsync serve following {n} IPPools, {followers} followers in this process");
    for round in 1..=2 {
        let (took, rss) = run_server(&double, n, followers).await;
        println!(
            "   round {round}: every follower in sync after {:.2} s, server peak RSS {rss:.0} MiB",
            took.as_secs_f64()
        );
    }
}
