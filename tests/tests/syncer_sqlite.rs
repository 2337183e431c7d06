//! The Syncer against the SQLite backend: the randomized model test, a writer in another
//! process, and a writer killed with SIGKILL mid-stream.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::Client;
use kvsync_backend::sqlite::SqliteBackend;
use kvsync_model::ListOptions;
use kvsync_syncer::{ResourceType, SyncStatus, Syncer};
use kvsync_tests::checker::{CheckingConsumer, datastore_state, diff};
use kvsync_tests::sqlite::{SqliteTestBackend, test_config};
use kvsync_tests::syncer_model::{self, ModelConfig};

const WRITER: &str = env!("CARGO_BIN_EXE_kvsync-sqlite-writer");

/// Starts the writer process on `db` under `prefix` with `args` (COUNT and a mode), its
/// standard output piped.
fn start_writer(
    db: &std::path::Path,
    prefix: &str,
    args: &[&str],
) -> (std::process::Child, std::process::ChildStdout) {
    let mut child = Command::new(WRITER)
        .arg(db.to_str().expect("utf-8 path"))
        .arg(prefix)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the writer");
    let stdout = child.stdout.take().expect("stdout");
    (child, stdout)
}

fn seq_of(value: &serde_json::Value) -> Option<u64> {
    let cidr = value["cidr"].as_str()?;
    let mut parts = cidr.split('.');
    parts.next()?;
    let a: u64 = parts.next()?.parse().ok()?;
    let b: u64 = parts.next()?.parse().ok()?;
    Some(a * 256 + b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_model_holds_the_consumer_invariant_on_sqlite() {
    let cases = std::env::var("KVSYNC_SQLITE_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    syncer_model::run(&SqliteTestBackend, ModelConfig::new(cases)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_recovery_resumes_short_gaps_and_relists_long_ones_on_sqlite() {
    kvsync_tests::scenarios::outage_recovery_resumes_short_gaps_and_relists_long_ones(
        &SqliteTestBackend,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syncer_follows_writes_made_by_another_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("shared.db");
    let config = test_config(&db);
    let prefix = config.prefix.clone();
    let client: Arc<dyn Client> = Arc::new(SqliteBackend::open(config).expect("open"));
    let consumer = CheckingConsumer::start(
        Syncer::new(client.clone())
            .with_resource(ResourceType::new(ListOptions::new("IPPool")))
            .stream(),
    );
    assert!(
        consumer
            .wait_for(Duration::from_secs(10), |s| s.status()
                == Some(SyncStatus::InSync))
            .await
    );

    let status = tokio::task::spawn_blocking(move || {
        Command::new(WRITER)
            .args([db.to_str().expect("utf-8 path"), prefix.as_str(), "300"])
            .stdout(Stdio::null())
            .status()
            .expect("run the writer")
    })
    .await
    .expect("writer task");
    assert!(status.success(), "writer failed: {status}");

    let expected = datastore_state(client.as_ref(), &[ListOptions::new("IPPool")]).await;
    assert_eq!(expected.len(), 50);
    let ok = consumer
        .wait_for(Duration::from_secs(10), |s| s.cache == expected)
        .await;
    let seen = consumer.stop().await;
    assert!(
        ok,
        "consumer did not see the other process's writes: {}",
        diff(&expected, &seen.cache)
    );
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert!(seen.counts.get("Updated").copied().unwrap_or(0) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_kill_9_of_the_writer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("crash.db");
    let config = test_config(&db);
    let prefix = config.prefix.clone();
    let writer_prefix = prefix.clone();
    let db2 = db.clone();
    let acked: BTreeMap<String, u64> = tokio::task::spawn_blocking(move || {
        let (mut child, stdout) = start_writer(&db2, &prefix, &["1000000"]);
        let mut lines = BufReader::new(stdout).lines();
        let mut acked = BTreeMap::new();
        let mut n = 0;
        // Let it write a while, then SIGKILL it (by pid) mid-stream.
        while let Some(Ok(line)) = lines.next() {
            let mut parts = line.split_whitespace().skip(1);
            let seq: u64 = parts.next().and_then(|s| s.parse().ok()).expect("ack line");
            acked.insert(format!("w-{}", seq % 50), seq);
            n += 1;
            if n == 500 {
                child.kill().expect("kill -9 the writer");
            }
        }
        let status = child.wait().expect("reap");
        assert!(!status.success(), "the writer was killed, not finished");
        acked
    })
    .await
    .expect("writer task");
    assert!(
        acked.len() == 50,
        "the writer acknowledged writes to every key"
    );

    let backend = SqliteBackend::open(test_config(&db).with_prefix(writer_prefix))
        .expect("reopen after the crash");
    let list = backend
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("list");
    assert!(list.parse_failures.is_empty());
    let stored: BTreeMap<String, u64> = list
        .items
        .iter()
        .map(|k| {
            (
                k.key.name.clone(),
                seq_of(k.value.as_value().expect("readable")).expect("a writer value"),
            )
        })
        .collect();
    for (name, seq) in &acked {
        let found = stored.get(name).copied();
        assert!(
            found.is_some_and(|f| f >= *seq),
            "{name}: acknowledged write {seq} lost (found {found:?})"
        );
    }
    let integrity = integrity_check(&db);
    assert_eq!(
        integrity, "ok",
        "the database file is consistent after the crash"
    );
}

fn integrity_check(db: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check")
}

/// A writer applying 50-key transactions is killed with SIGKILL: every key holds the same
/// transaction's value afterwards (all of one, none of the next), at least the last one
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_killed_midway_is_kept_whole_or_not_at_all() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("txn-crash.db");
    let config = test_config(&db);
    let prefix = config.prefix.clone();
    let db2 = db.clone();
    let last_acked: u64 = tokio::task::spawn_blocking(move || {
        let (mut child, stdout) = start_writer(&db2, &prefix, &["1000000", "txn"]);
        let mut last = None;
        // Let it commit a while, then SIGKILL it (by pid), most likely inside a transaction.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let seq: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("ack line");
            last = Some(seq);
            if seq == 100 {
                child.kill().expect("kill -9 the writer");
            }
        }
        let status = child.wait().expect("reap");
        assert!(!status.success(), "the writer was killed, not finished");
        last.expect("the writer acknowledged transactions")
    })
    .await
    .expect("writer task");

    let backend = SqliteBackend::open(test_config(&db).with_prefix(config.prefix.clone()))
        .expect("reopen after the crash");
    let list = backend
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("list");
    assert!(list.parse_failures.is_empty());
    assert_eq!(list.items.len(), 50, "every key of the transactions exists");
    let seqs: std::collections::BTreeSet<u64> = list
        .items
        .iter()
        .map(|k| seq_of(k.value.as_value().expect("readable")).expect("a writer value"))
        .collect();
    assert_eq!(
        seqs.len(),
        1,
        "all keys hold one transaction's value: {seqs:?}"
    );
    let seq = *seqs.first().expect("one value");
    assert!(
        seq == last_acked || seq == last_acked + 1,
        "the last acknowledged transaction ({last_acked}) is kept, and at most the one in flight \
         after it (found {seq})"
    );
    assert_eq!(integrity_check(&db), "ok");
}

/// The owner of a lease is killed with SIGKILL: its keys go (with a Deleted event to a
/// watcher in another process) once the lease runs out, swept by whoever uses the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_killed_lease_owner_expire() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("lease.db");
    let config = test_config(&db);
    let prefix = config.prefix.clone();
    let (mut child, stdout) = start_writer(&db, &prefix, &["5", "lease"]);
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().next().and_then(Result::ok)
    })
    .await
    .expect("reader");
    assert_eq!(line.as_deref(), Some("ack lease"));
    let backend = SqliteBackend::open(config).expect("open");
    let list = backend
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("list");
    assert_eq!(list.items.len(), 5, "the holder's keys are there");
    let mut w = backend
        .watch(&ListOptions::new("IPPool").with_revision(list.revision))
        .await
        .expect("watch");
    // Alive past its TTL: kept alive by the holder.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        backend
            .list(&ListOptions::new("IPPool"))
            .await
            .expect("list")
            .items
            .len(),
        5
    );
    child.kill().expect("kill -9 the holder");
    child.wait().expect("reap");
    let mut gone = 0;
    while gone < 5 {
        match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
            Ok(Some(Ok(kvsync_backend::WatchEvent::Deleted { .. }))) => gone += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected the lease's deletions, got {other:?}"),
        }
    }
    assert!(
        backend
            .list(&ListOptions::new("IPPool"))
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

/// Several processes (here: connections on threads) opening one new database file at the
/// same moment all succeed: switching it to WAL and making its schema do not race.
#[test]
fn many_openers_of_a_new_file_at_once_all_succeed() {
    for round in 0..10 {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join(format!("race-{round}.db"));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (db, barrier) = (db.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    SqliteBackend::open(test_config(&db)).map(|_| ())
                })
            })
            .collect();
        for t in threads {
            t.join()
                .expect("opener")
                .expect("every opener of a new file succeeds");
        }
    }
}
