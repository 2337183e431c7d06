//! Leader election with real candidate processes, on one SQLite database, on etcd and on the
//! Kubernetes API server double (Leases): a leader killed with SIGKILL is replaced within
//! lease + retry + 1 s; a leader stopped with SIGSTOP past twice its lease learns it lost, and
//! none of its writes lands after its successor's.

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kvsync_backend::EtcdBackend;
use kvsync_backend::sqlite::SqliteBackend;
use kvsync_backend::{Client, WatchEvent};
use kvsync_model::{ListOptions, Registry};
use kvsync_tests::etcd::{EtcdCluster, EtcdTestBackend};
use kvsync_tests::harness::unique_prefix;
use kvsync_tests::kube_double::ApiServerDouble;
use kvsync_tests::process::Spawned;
use kvsync_tests::sqlite::test_config;

const ELECTOR: &str = env!("CARGO_BIN_EXE_kvsync-elector");

/// The two tests run one after the other: each measures time with processes of its own, and
/// the failover bound should not depend on the other's load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A candidate process whose lines arrive on a channel as (identity, line).
type Candidate = Spawned;

fn candidate(spec: &str, who: &'static str, tx: mpsc::Sender<(&'static str, String)>) -> Candidate {
    let mut cmd = Command::new(ELECTOR);
    cmd.args([spec, "leader", who]);
    Spawned::start(cmd, who, tx)
}

/// Waits for a line starting with `prefix` from `who` (any candidate when `None`).
fn wait_for(
    rx: &mpsc::Receiver<(&'static str, String)>,
    who: Option<&str>,
    prefix: &str,
    within: Duration,
) -> (&'static str, String, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((w, line)) if line.starts_with(prefix) && who.is_none_or(|x| x == w) => {
                return (w, line, Instant::now());
            }
            Ok(_) => {}
            Err(_) => panic!("no {prefix:?} from {who:?} within {within:?}"),
        }
    }
}

fn fence_of(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("a fence")
}

/// Where the candidates meet.
enum Datastore {
    Sqlite {
        _dir: tempfile::TempDir,
        db: std::path::PathBuf,
        prefix: String,
    },
    Kubernetes(ApiServerDouble),
    Etcd {
        cluster: Arc<EtcdCluster>,
        prefix: String,
    },
}

impl Datastore {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("election.db");
        let prefix = test_config(&db).prefix.clone();
        Datastore::Sqlite {
            _dir: dir,
            db,
            prefix,
        }
    }

    async fn kubernetes() -> Self {
        Datastore::Kubernetes(ApiServerDouble::start(&Registry::with_demo_kinds(), 100_000).await)
    }

    async fn etcd() -> Self {
        let cluster = tokio::task::spawn_blocking(|| EtcdTestBackend::shared().cluster().clone())
            .await
            .expect("start etcd");
        Datastore::Etcd {
            cluster,
            prefix: unique_prefix(),
        }
    }

    /// The candidates' DATASTORE argument.
    fn spec(&self) -> String {
        match self {
            Datastore::Sqlite { db, prefix, .. } => format!("sqlite:{}#{prefix}", db.display()),
            Datastore::Kubernetes(double) => {
                format!("kubernetes:{}", double.kubeconfig().display())
            }
            Datastore::Etcd { cluster, prefix } => {
                format!("etcd:{}#{prefix}", cluster.endpoints().join(","))
            }
        }
    }

    async fn client(&self) -> Arc<dyn Client> {
        match self {
            Datastore::Sqlite { db, prefix, .. } => Arc::new(
                SqliteBackend::open(test_config(db).with_prefix(prefix.clone())).expect("open"),
            ),
            Datastore::Kubernetes(double) => {
                Arc::new(kvsync_tests::kubernetes::connect(double).await)
            }
            Datastore::Etcd { cluster, prefix } => Arc::new(
                EtcdBackend::connect(cluster.config(prefix))
                    .await
                    .expect("connect"),
            ),
        }
    }
}

/// Follows every write of the `term` Node from now on: its fence, in the datastore's order.
struct TermHistory {
    fences: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TermHistory {
    async fn start(client: Arc<dyn Client>) -> Self {
        let opts = ListOptions::new("Node");
        let list = client.list(&opts).await.expect("list");
        let mut w = client
            .watch(&opts.with_revision(list.revision))
            .await
            .expect("watch");
        let fences = Arc::new(Mutex::new(Vec::new()));
        let seen = fences.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = w.next().await {
                if let Ok(WatchEvent::Added(k) | WatchEvent::Modified { new: k, .. }) = ev
                    && k.key.name == "term"
                {
                    let fence = k.value.as_value().expect("json")["asn"]
                        .as_u64()
                        .expect("asn");
                    seen.lock().expect("fences").push(fence);
                }
            }
        });
        TermHistory { fences, task }
    }

    /// The fences written, once the last writes had time to arrive.
    async fn finish(self) -> Vec<u64> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.task.abort();
        self.fences.lock().expect("fences").clone()
    }
}

fn assert_one_leader_at_a_time(fences: &[u64]) {
    assert!(!fences.is_empty());
    assert!(
        fences.windows(2).all(|w| w[0] <= w[1]),
        "a write of an older term landed after a newer term's: {fences:?}"
    );
}

/// Two candidates on a new datastore, once one of them leads and has written.
struct TwoCandidates {
    _store: Datastore,
    history: TermHistory,
    rx: mpsc::Receiver<(&'static str, String)>,
    a: Candidate,
    b: Candidate,
    /// Who leads, and its term's fence.
    leader: &'static str,
    first: u64,
}

impl TwoCandidates {
    async fn start(store: Datastore) -> Self {
        let history = TermHistory::start(store.client().await).await;
        let spec = store.spec();
        let (tx, rx) = mpsc::channel();
        let a = candidate(&spec, "a", tx.clone());
        let b = candidate(&spec, "b", tx);
        let (leader, line, _) = wait_for(&rx, None, "leading", Duration::from_secs(15));
        wait_for(&rx, Some(leader), "wrote", Duration::from_secs(5));
        TwoCandidates {
            _store: store,
            history,
            rx,
            a,
            b,
            leader,
            first: fence_of(&line),
        }
    }

    /// The leader's process, and who the other is.
    fn leader_and_other(&mut self) -> (&mut Candidate, &'static str) {
        if self.leader == "a" {
            (&mut self.a, "b")
        } else {
            (&mut self.b, "a")
        }
    }

    /// Ends both processes, then checks that no older term's write landed after a newer one's.
    async fn finish(self) {
        let TwoCandidates {
            a,
            b,
            history,
            _store,
            ..
        } = self;
        drop((a, b));
        assert_one_leader_at_a_time(&history.finish().await);
    }
}

async fn a_killed_leader_is_replaced_within_lease_plus_retry(store: Datastore) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut run = TwoCandidates::start(store).await;
    let first = run.first;
    let (killed, other) = run.leader_and_other();
    let t0 = Instant::now();
    killed.child.kill().expect("kill -9 the leader");
    killed.child.wait().expect("reap");
    let (_, line, at) = wait_for(&run.rx, Some(other), "leading", Duration::from_secs(10));
    let failover = at - t0;
    assert!(
        failover <= Duration::from_millis(2000 + 300 + 1000),
        "a new leader after {failover:?} (lease 2 s + retry 0.3 s + 1 s)"
    );
    assert!(fence_of(&line) > first, "the new term's fence is higher");
    wait_for(&run.rx, Some(other), "wrote", Duration::from_secs(5));
    run.finish().await;
}

async fn a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late(store: Datastore) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut run = TwoCandidates::start(store).await;
    let (leader, first) = (run.leader, run.first);
    let (paused, other) = run.leader_and_other();
    paused.signal("-STOP");
    // Twice the lease: the other takes over and writes.
    let (_, line, _) = wait_for(&run.rx, Some(other), "leading", Duration::from_secs(10));
    assert!(fence_of(&line) > first);
    wait_for(&run.rx, Some(other), "wrote", Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(4)).await;
    run.leader_and_other().0.signal("-CONT");
    // Woken, it learns that it lost (its renew deadline passed long ago).
    let (_, line, _) = wait_for(&run.rx, Some(leader), "stopped", Duration::from_secs(5));
    assert_eq!(fence_of(&line), first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.finish().await;
}

// The waits for lines block a thread: two more serve the double and the history's watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn sqlite_a_killed_leader_is_replaced_within_lease_plus_retry() {
    a_killed_leader_is_replaced_within_lease_plus_retry(Datastore::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn sqlite_a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late() {
    a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late(Datastore::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kubernetes_a_killed_leader_is_replaced_within_lease_plus_retry() {
    a_killed_leader_is_replaced_within_lease_plus_retry(Datastore::kubernetes().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kubernetes_a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late() {
    a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late(Datastore::kubernetes().await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn etcd_a_killed_leader_is_replaced_within_lease_plus_retry() {
    a_killed_leader_is_replaced_within_lease_plus_retry(Datastore::etcd().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn etcd_a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late() {
    a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late(Datastore::etcd().await).await;
}
