//! A counter incremented under a lock by three worker processes on a 3-member etcd cluster,
//! while the cluster's leader member is killed and one worker is paused (SIGSTOP) inside its
//! critical section for longer than twice its lock's TTL:
//!
//! - with guarded writes, the final count equals the increments acknowledged: the paused
//!   worker's late write is refused;
//! - without guards (the control run, so that the check can fail), the paused worker's late
//!   write lands over its successors' and increments are lost.

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvsync_backend::{Client, EtcdBackend};
use kvsync_model::{KVPair, ResourceKey};
use kvsync_tests::etcd::EtcdCluster;
use kvsync_tests::harness::unique_prefix;
use kvsync_tests::process::Spawned;
use serde_json::json;

const WORKER: &str = env!("CARGO_BIN_EXE_kvsync-elector");

/// The two runs one after the other: each kills a member of its own cluster and pauses a
/// process, and timing matters to both.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a run saw.
#[derive(Debug)]
struct Outcome {
    final_count: u64,
    acked: u64,
    ambiguous: u64,
    refused_after_pause: u64,
}

async fn leader_index(cluster: &EtcdCluster) -> Option<usize> {
    for (i, m) in cluster.members.iter().enumerate() {
        if !m.is_running() {
            continue;
        }
        let Ok(mut c) = etcd_client::Client::connect([m.endpoint()], None).await else {
            continue;
        };
        if let Ok(status) = c.status().await
            && status.leader() == status.header().map(|h| h.member_id()).unwrap_or(0)
        {
            return Some(i);
        }
    }
    None
}

/// The workers' lines, as (worker, line), and every line seen so far.
struct Lines {
    rx: mpsc::Receiver<(usize, String)>,
    seen: Vec<(usize, String)>,
}

impl Lines {
    fn next(&mut self, within: Duration) -> Option<(usize, String)> {
        let got = self.rx.recv_timeout(within).ok();
        if let Some(l) = &got {
            self.seen.push(l.clone());
        }
        got
    }
}

async fn run(guarded: bool) -> Outcome {
    let mut cluster = tokio::task::spawn_blocking(|| EtcdCluster::start_n(3, None))
        .await
        .expect("start etcd");
    let prefix = unique_prefix();
    let client = EtcdBackend::connect(cluster.config(&prefix))
        .await
        .expect("connect");
    let key = ResourceKey::cluster("Node", "counter");
    client
        .create(KVPair::new(key.clone(), json!({"labels": {"by": "start"}})))
        .await
        .expect("the counter");
    let dir = tempfile::tempdir().expect("temp dir");
    let stop = dir.path().join("stop");
    let spec = format!("etcd:{}#{prefix}", cluster.endpoints().join(","));
    let mode = if guarded { "guarded" } else { "unguarded" };
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let workers: Vec<Spawned> = (0..3)
        .map(|i| {
            let mut cmd = Command::new(WORKER);
            cmd.args([
                spec.as_str(),
                "counter",
                &format!("w{i}"),
                "count",
                mode,
                stop.to_str().expect("utf-8 path"),
            ]);
            Spawned::start(cmd, i, tx.clone())
        })
        .collect();
    drop(tx);
    let mut out = Lines {
        rx,
        seen: Vec::new(),
    };

    // Some increments first.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acked = 0;
    while acked < 6 {
        assert!(Instant::now() < deadline, "no progress: {:?}", out.seen);
        if let Some((_, l)) = out.next(Duration::from_secs(1))
            && l.starts_with("acked")
        {
            acked += 1;
        }
    }
    // Kill the leader member while the workers run.
    let leader = leader_index(&cluster).await.expect("a leader");
    cluster.members[leader].kill();
    // Pause worker 0 inside its critical section (after it read, before it writes).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "w0 never read: {:?}", out.seen);
        if let Some((0, l)) = out.next(Duration::from_secs(1))
            && l.starts_with("read")
        {
            break;
        }
    }
    workers[0].signal("-STOP");
    let paused_at = out.seen.len();
    // Past twice the lock's TTL (2 s), while the others go on.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        out.next(Duration::from_millis(100));
    }
    cluster.members[leader].restart();
    workers[0].signal("-CONT");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        out.next(Duration::from_millis(100));
    }
    std::fs::write(&stop, b"").expect("stop file");
    // Every worker finishes its round and exits.
    for mut w in workers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "a worker did not stop");
            out.next(Duration::from_millis(50));
        }
        let _ = w.child.wait();
    }
    while out.next(Duration::from_millis(200)).is_some() {}

    let stored = client.get(&key, &Default::default()).await.expect("get");
    let final_count = stored.value.as_value().expect("json")["asn"]
        .as_u64()
        .unwrap_or(0);
    let lines = out.seen;
    let count =
        |pred: &dyn Fn(&(usize, String)) -> bool| lines.iter().filter(|l| pred(l)).count() as u64;
    Outcome {
        final_count,
        acked: count(&|(_, l)| l.starts_with("acked")),
        ambiguous: count(&|(_, l)| l == "ambiguous"),
        refused_after_pause: lines[paused_at..]
            .iter()
            .filter(|(w, l)| *w == 0 && l == "refused")
            .count() as u64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_increments_survive_a_leader_kill_and_a_paused_holder() {
    let _one = ONE_AT_A_TIME.lock().await;
    let o = run(true).await;
    eprintln!("guarded: {o:?}");
    assert!(o.acked >= 10, "progress: {o:?}");
    assert_eq!(o.ambiguous, 0, "every write's fate is known: {o:?}");
    assert_eq!(
        o.final_count, o.acked,
        "every acknowledged increment counted, nothing else: {o:?}"
    );
    assert!(
        o.refused_after_pause >= 1,
        "the paused worker's late write was refused: {o:?}"
    );
}

/// The control run: the same faults without guards lose increments, so the check above can
/// fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unguarded_increments_are_lost_to_a_paused_holder() {
    let _one = ONE_AT_A_TIME.lock().await;
    let o = run(false).await;
    eprintln!("unguarded: {o:?}");
    assert!(
        o.final_count < o.acked,
        "the paused worker's late write overwrote its successors' increments: {o:?}"
    );
}
