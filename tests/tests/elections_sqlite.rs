//! Leader election with real candidate processes on one SQLite database: a leader killed
//! with SIGKILL is replaced within lease + retry + 1 s; a leader stopped with SIGSTOP past
//! twice its lease learns it lost, and none of its writes lands after its successor's.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvsync_backend::sqlite::SqliteBackend;
use kvsync_backend::{Client, WatchEvent};
use kvsync_model::{ListOptions, Revision};
use kvsync_tests::sqlite::test_config;

const ELECTOR: &str = env!("CARGO_BIN_EXE_kvsync-elector");

/// The two tests run one after the other: each measures time with processes of its own, and
/// the failover bound should not depend on the other's load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A candidate process whose lines arrive on a channel as (identity, line).
struct Candidate {
    child: Child,
}

impl Candidate {
    fn start(
        db: &std::path::Path,
        prefix: &str,
        who: &'static str,
        tx: mpsc::Sender<(&'static str, String)>,
    ) -> Self {
        let mut child = Command::new(ELECTOR)
            .args([db.to_str().expect("utf-8 path"), prefix, "leader", who])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a candidate");
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((who, line)).is_err() {
                    return;
                }
            }
        });
        Candidate { child }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Every write of the `term` Node, in revision order: its fence. One leader at a time means
/// fences never go down.
async fn term_history(db: &std::path::Path, prefix: &str) -> Vec<u64> {
    let backend =
        SqliteBackend::open(test_config(db).with_prefix(prefix.to_owned())).expect("open");
    let now = backend.current_revision().await.expect("revision");
    let mut w = backend
        .watch(&ListOptions::new("Node").with_revision(Revision::from(0u64)))
        .await
        .expect("watch from the start");
    let mut fences = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("history")
            .expect("open")
            .expect("event");
        let rev = match ev {
            WatchEvent::Added(k) | WatchEvent::Modified { new: k, .. } => {
                fences.push(
                    k.value.as_value().expect("json")["asn"]
                        .as_u64()
                        .expect("asn"),
                );
                k.revision
            }
            WatchEvent::Bookmark(r) => Some(r),
            WatchEvent::Deleted { revision, .. } => Some(revision),
            _ => None,
        };
        if rev.and_then(|r| r.as_u64()) >= now.as_u64() {
            return fences;
        }
    }
}

fn assert_one_leader_at_a_time(fences: &[u64]) {
    assert!(!fences.is_empty());
    assert!(
        fences.windows(2).all(|w| w[0] <= w[1]),
        "a write of an older term landed after a newer term's: {fences:?}"
    );
}

/// Two candidates on a new database, once one of them leads and has written.
struct TwoCandidates {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    prefix: String,
    rx: mpsc::Receiver<(&'static str, String)>,
    a: Candidate,
    b: Candidate,
    /// Who leads, and its term's fence.
    leader: &'static str,
    first: u64,
}

impl TwoCandidates {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("election.db");
        let prefix = test_config(&db).prefix.clone();
        let (tx, rx) = mpsc::channel();
        let a = Candidate::start(&db, &prefix, "a", tx.clone());
        let b = Candidate::start(&db, &prefix, "b", tx);
        let (leader, line, _) = wait_for(&rx, None, "leading", Duration::from_secs(15));
        wait_for(&rx, Some(leader), "wrote", Duration::from_secs(5));
        TwoCandidates {
            _dir: dir,
            db,
            prefix,
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
            db,
            prefix,
            _dir,
            ..
        } = self;
        drop((a, b));
        assert_one_leader_at_a_time(&term_history(&db, &prefix).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_lease_plus_retry() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut run = TwoCandidates::start();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_learns_it_lost_and_none_of_its_writes_lands_late() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut run = TwoCandidates::start();
    let (leader, first) = (run.leader, run.first);
    let (paused, other) = run.leader_and_other();
    paused.signal("-STOP");
    // Twice the lease: the other takes over and writes.
    let (_, line, _) = wait_for(&run.rx, Some(other), "leading", Duration::from_secs(10));
    assert!(fence_of(&line) > first);
    wait_for(&run.rx, Some(other), "wrote", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(4));
    run.leader_and_other().0.signal("-CONT");
    // Woken, it learns that it lost (its renew deadline passed long ago).
    let (_, line, _) = wait_for(&run.rx, Some(leader), "stopped", Duration::from_secs(5));
    assert_eq!(fence_of(&line), first);
    std::thread::sleep(Duration::from_millis(500));
    run.finish().await;
}
