//! The Syncer against the memory backend: fault scenarios and the randomized model test.

use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::{Client, FaultyClient, MemoryBackend};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus, Syncer, UpdateType};
use kvsync_tests::MemoryTestBackend;
use kvsync_tests::checker::{CheckingConsumer, datastore_state};
use kvsync_tests::syncer_model::{self, ModelConfig};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn pool(name: &str, cidr: &str) -> KVPair {
    KVPair::new(ResourceKey::cluster("IPPool", name), json!({"cidr": cidr}))
}

fn fast_syncer(client: Arc<dyn Client>) -> Syncer {
    Syncer::new(client)
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .with_resource(ResourceType::new(ListOptions::new("NetworkPolicy")))
        .with_retry_policy(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(50),
        ))
}

fn kinds() -> Vec<ListOptions> {
    vec![
        ListOptions::new("IPPool"),
        ListOptions::new("NetworkPolicy"),
    ]
}

async fn in_sync_with(consumer: &CheckingConsumer, store: &dyn Client) -> bool {
    let expected = datastore_state(store, &kinds()).await;
    consumer
        .wait_for(WAIT, |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await
}

#[tokio::test(start_paused = true)]
async fn initial_sync_goes_wait_resync_in_sync_with_every_key_new() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    for i in 0..50 {
        store
            .create(pool(&format!("p{i}"), "10.0.0.0/16"))
            .await
            .unwrap();
    }
    let consumer = CheckingConsumer::start(
        fast_syncer(Arc::new(store.clone()))
            .with_max_batch(7)
            .stream(),
    );
    assert!(in_sync_with(&consumer, &store).await);
    let seen = consumer.stop().await;
    assert_eq!(
        seen.statuses,
        [
            SyncStatus::WaitForDatastore,
            SyncStatus::ResyncInProgress,
            SyncStatus::InSync
        ]
    );
    assert_eq!(seen.counts.get("New"), Some(&50));
    assert!(
        seen.batch_sizes.iter().all(|n| *n <= 7),
        "batches are bounded: {:?}",
        seen.batch_sizes
    );
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

#[tokio::test(start_paused = true)]
async fn watch_broken_mid_stream_resumes_without_a_resync() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    let faulty = Arc::new(FaultyClient::new(store.clone()));
    let faults = faulty.faults();
    let consumer = CheckingConsumer::start(fast_syncer(faulty).stream());
    assert!(in_sync_with(&consumer, &store).await);
    for round in 0..5 {
        store
            .apply(pool(&format!("p{round}"), "10.0.0.0/16"))
            .await
            .unwrap();
        faults.break_watches();
        store
            .apply(pool("shared", &format!("10.{round}.0.0/16")))
            .await
            .unwrap();
        if round % 2 == 0 {
            store
                .delete(
                    &ResourceKey::cluster("IPPool", "shared"),
                    &kvsync_model::DeleteOptions::new(),
                )
                .await
                .unwrap();
        }
    }
    assert!(in_sync_with(&consumer, &store).await);
    let seen = consumer.stop().await;
    assert_eq!(
        seen.statuses,
        [
            SyncStatus::WaitForDatastore,
            SyncStatus::ResyncInProgress,
            SyncStatus::InSync
        ],
        "a resumed watch needs no resync"
    );
    assert!(seen.errors >= 1, "broken watches are reported");
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

// A current-thread runtime: the gap's writes and the compaction happen before the watcher
// task runs again, so its resume point is compacted for sure.
#[tokio::test(flavor = "current_thread")]
async fn compaction_during_a_gap_relists_and_sends_exactly_the_difference() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    for name in ["a", "b", "c"] {
        store.create(pool(name, "10.0.0.0/16")).await.unwrap();
    }
    // One type, so that only its watch falls behind the compaction.
    let syncer = Syncer::new(Arc::new(store.clone()))
        .with_resource(ResourceType::new(ListOptions::new("IPPool")));
    let consumer = CheckingConsumer::start(syncer.stream());
    assert!(in_sync_with(&consumer, &store).await);
    let before = consumer.with(|s| s.counts.clone());

    // The gap: b updated, c deleted, d created, e created and deleted; then compaction.
    store.apply(pool("b", "10.1.0.0/16")).await.unwrap();
    store
        .delete(
            &ResourceKey::cluster("IPPool", "c"),
            &kvsync_model::DeleteOptions::new(),
        )
        .await
        .unwrap();
    store.create(pool("d", "10.2.0.0/16")).await.unwrap();
    store.create(pool("e", "10.3.0.0/16")).await.unwrap();
    store
        .delete(
            &ResourceKey::cluster("IPPool", "e"),
            &kvsync_model::DeleteOptions::new(),
        )
        .await
        .unwrap();
    store.compact(&store.revision().into()).await.unwrap();

    assert!(in_sync_with(&consumer, &store).await);
    let seen = consumer.stop().await;
    let delta =
        |t: &str| seen.counts.get(t).copied().unwrap_or(0) - before.get(t).copied().unwrap_or(0);
    assert_eq!(
        (delta("New"), delta("Updated"), delta("Deleted")),
        (1, 1, 1),
        "exactly the difference: {:?}",
        seen.counts
    );
    assert_eq!(
        seen.statuses,
        [
            SyncStatus::WaitForDatastore,
            SyncStatus::ResyncInProgress,
            SyncStatus::InSync,
            SyncStatus::ResyncInProgress,
            SyncStatus::InSync
        ]
    );
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

#[tokio::test(start_paused = true)]
async fn outage_returns_to_wait_for_datastore_then_resyncs_the_gap() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    store.create(pool("a", "10.0.0.0/16")).await.unwrap();
    store.create(pool("b", "10.0.0.0/16")).await.unwrap();
    let faulty = Arc::new(FaultyClient::new(store.clone()));
    let faults = faulty.faults();
    let consumer = CheckingConsumer::start(fast_syncer(faulty).stream());
    assert!(in_sync_with(&consumer, &store).await);

    faults.set_unavailable(true);
    assert!(
        consumer
            .wait_for(WAIT, |s| s.status() == Some(SyncStatus::WaitForDatastore))
            .await
    );
    store.apply(pool("a", "10.9.0.0/16")).await.unwrap();
    store
        .delete(
            &ResourceKey::cluster("IPPool", "b"),
            &kvsync_model::DeleteOptions::new(),
        )
        .await
        .unwrap();
    store.create(pool("c", "10.0.0.0/16")).await.unwrap();
    // The history of the gap is compacted away while the Syncer is disconnected.
    store.compact(&store.revision().into()).await.unwrap();
    // It keeps retrying, with backoff, while the datastore is down.
    assert!(consumer.wait_for(WAIT, |s| s.errors >= 4).await);
    faults.set_unavailable(false);
    assert!(in_sync_with(&consumer, &store).await);
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert_eq!(
        &seen.statuses[seen.statuses.len() - 3..],
        [
            SyncStatus::WaitForDatastore,
            SyncStatus::ResyncInProgress,
            SyncStatus::InSync
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn datastore_unavailable_at_start_waits_then_syncs() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    store.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let faulty = Arc::new(FaultyClient::new(store.clone()));
    let faults = faulty.faults();
    faults.set_unavailable(true);
    let consumer = CheckingConsumer::start(fast_syncer(faulty).stream());
    assert!(consumer.wait_for(WAIT, |s| s.errors >= 3).await);
    assert_eq!(
        consumer.with(|s| s.statuses.clone()),
        [SyncStatus::WaitForDatastore]
    );
    assert!(consumer.with(|s| s.cache.is_empty()));
    faults.set_unavailable(false);
    assert!(in_sync_with(&consumer, &store).await);
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

#[tokio::test(start_paused = true)]
async fn parse_failures_are_reported_and_the_syncer_keeps_going() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    store.create(pool("a", "10.0.0.0/16")).await.unwrap();
    store.put_raw("/kvsync/v1/ippools/broken-at-start", b"nope");
    let consumer = CheckingConsumer::start(fast_syncer(Arc::new(store.clone())).stream());
    assert!(in_sync_with(&consumer, &store).await);
    store.put_raw("/kvsync/v1/ippools/a", b"{");
    store.create(pool("b", "10.0.0.0/16")).await.unwrap();
    assert!(in_sync_with(&consumer, &store).await);
    let seen = consumer.stop().await;
    assert_eq!(seen.parse_failures, 2);
    assert!(
        !seen
            .cache
            .contains_key(&ResourceKey::cluster("IPPool", "a")),
        "a garbled key is gone"
    );
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

#[tokio::test(start_paused = true)]
async fn stop_during_resync_returns_and_leaves_no_task() {
    use futures::StreamExt;
    let store = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    for i in 0..5000 {
        store
            .create(pool(&format!("p{i}"), "10.0.0.0/16"))
            .await
            .unwrap();
    }
    let mut stream = fast_syncer(store.clone())
        .with_max_batch(10)
        .with_channel_capacity(1)
        .stream();
    // Read three batches of the resync, then stop while it is still going (a consumer that
    // reads no more keeps the Syncer waiting on the bounded channel).
    let mut delivered = 0;
    let mut batches = 0;
    while batches < 3 {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("an event")
        {
            Some(kvsync_syncer::SyncerEvent::Updates(b)) => {
                delivered += b.len();
                batches += 1;
            }
            Some(kvsync_syncer::SyncerEvent::Status(s)) => {
                assert_ne!(s, SyncStatus::InSync, "the resync cannot be over yet");
            }
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
    assert_eq!(delivered, 30, "batches hold at most 10 updates");
    tokio::time::timeout(WAIT, stream.stop())
        .await
        .expect("stop returns promptly");
    // Every task is gone: only this test's handles to the store remain.
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "no Syncer task holds the client"
    );
}

#[tokio::test(start_paused = true)]
async fn callbacks_receive_statuses_and_updates_and_stop_ends_them() {
    use kvsync_syncer::{SyncerCallbacks, Update};
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(Vec<SyncStatus>, Vec<Update>)>>);
    impl SyncerCallbacks for Recorder {
        fn on_status_updated(&mut self, status: SyncStatus) {
            self.0.lock().unwrap().0.push(status);
        }
        fn on_updates(&mut self, updates: Vec<Update>) {
            self.0.lock().unwrap().1.extend(updates);
        }
    }

    let store = MemoryBackend::new(kvsync_model::demo::registry());
    store.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let rec = Recorder::default();
    let handle = fast_syncer(Arc::new(store.clone())).start(rec.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    while rec.0.lock().unwrap().0.last() != Some(&SyncStatus::InSync) {
        assert!(tokio::time::Instant::now() < deadline, "no InSync");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store
        .delete(
            &ResourceKey::cluster("IPPool", "a"),
            &kvsync_model::DeleteOptions::new(),
        )
        .await
        .unwrap();
    while rec.0.lock().unwrap().1.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no Deleted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    handle.stop().await;
    let (_, updates) = &*rec.0.lock().unwrap();
    assert_eq!(updates[0].update_type, UpdateType::New);
    assert_eq!(updates[1].update_type, UpdateType::Deleted);
    assert_eq!(
        updates[1].kvp.value.as_value().unwrap()["cidr"],
        "10.0.0.0/16",
        "Deleted carries the last value"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_or_the_stream_ends_every_task() {
    let store = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    store.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let client: Arc<dyn Client> = store.clone();

    struct Nop;
    impl kvsync_syncer::SyncerCallbacks for Nop {
        fn on_status_updated(&mut self, _: SyncStatus) {}
        fn on_updates(&mut self, _: Vec<kvsync_syncer::Update>) {}
    }
    let handle = fast_syncer(client.clone()).start(Nop);
    let stream = fast_syncer(client.clone()).stream();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        Arc::strong_count(&store) > 2,
        "the Syncers hold the client while they run"
    );
    drop(handle);
    drop(stream);
    let deadline = tokio::time::Instant::now() + WAIT;
    // Only `store` and `client` remain once every task is gone.
    while Arc::strong_count(&store) > 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a Syncer task outlived its handle"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn outage_recovery_resumes_short_gaps_and_relists_long_ones() {
    kvsync_tests::scenarios::outage_recovery_resumes_short_gaps_and_relists_long_ones(
        &MemoryTestBackend,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_model_holds_the_consumer_invariant() {
    let cases = std::env::var("KVSYNC_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    syncer_model::run(&MemoryTestBackend, ModelConfig::new(cases)).await;
}

/// The watch that follows a list is opened while the list is still being read (from the
/// list's revision), is the one used once the list is done, and delivers what was written
/// during the list.
#[tokio::test(start_paused = true)]
async fn the_watch_after_a_list_is_opened_while_the_list_is_read() {
    use futures::StreamExt;
    use kvsync_syncer::SyncerEvent;
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    for i in 0..100 {
        store
            .create(pool(&format!("p{i:03}"), "10.0.0.0/16"))
            .await
            .unwrap();
    }
    let faulty = Arc::new(FaultyClient::new(store.clone()));
    let faults = faulty.faults();
    faults.set_list_page_size(10);
    // Pages that take a moment to come, as from a server: the Syncer hands on each page's
    // updates while it waits for the next.
    faults.set_list_page_delay(Duration::from_millis(5));
    let mut events = Syncer::new(faulty.clone())
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .stream();
    let mut cache = std::collections::BTreeMap::new();
    let apply = |cache: &mut std::collections::BTreeMap<_, _>,
                 batch: Vec<kvsync_syncer::Update>| {
        for u in batch {
            match u.update_type {
                UpdateType::Deleted => cache.remove(&u.kvp.key),
                _ => cache.insert(u.kvp.key.clone(), u.kvp.value),
            };
        }
    };
    let mut pages = 0;
    let mut watch_calls_during_list = Vec::new();
    loop {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event")
            .expect("the stream goes on");
        match ev {
            SyncerEvent::Updates(batch) => {
                pages += 1;
                watch_calls_during_list.push(faults.calls("watch"));
                if pages == 1 {
                    // Written during the list, after its revision: must come by the watch.
                    store.create(pool("late", "10.9.0.0/16")).await.unwrap();
                    store
                        .delete(
                            &ResourceKey::cluster("IPPool", "p099"),
                            &kvsync_model::DeleteOptions::new(),
                        )
                        .await
                        .unwrap();
                }
                apply(&mut cache, batch);
            }
            SyncerEvent::Status(SyncStatus::InSync) => break,
            _ => {}
        }
    }
    assert_eq!(pages, 10, "one batch per page of 10");
    // The opening starts while the Syncer waits for the second page, before the first
    // page's batch is handed on.
    assert!(
        watch_calls_during_list.iter().all(|&n| n == 1),
        "the watch is opened while the pages come in: {watch_calls_during_list:?}"
    );
    assert!(!cache.contains_key(&ResourceKey::cluster("IPPool", "late")));
    // Now the watch brings what was written during the list.
    while cache.len() != 100 || !cache.contains_key(&ResourceKey::cluster("IPPool", "late")) {
        match tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the writes come")
        {
            Some(SyncerEvent::Updates(batch)) => apply(&mut cache, batch),
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
    assert!(!cache.contains_key(&ResourceKey::cluster("IPPool", "p099")));
    assert_eq!(faults.calls("watch"), 1, "the early watch is the one used");
    events.stop().await;
}

/// The Syncer's and the client's metrics count what happened: statuses, updates by type,
/// batches, a relist after compaction (and the initial lists), a watch restart, and calls by
/// operation and outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_updates_relists_restarts_and_calls() {
    use kvsync_backend::{ClientMetrics, instrumented};
    use kvsync_syncer::SyncerMetrics;
    let mut registry = prometheus_client::registry::Registry::default();
    let memory = Arc::new(FaultyClient::new(MemoryBackend::new(
        kvsync_model::demo::registry(),
    )));
    let faults = memory.faults();
    let client = instrumented(memory.clone(), Some(ClientMetrics::new(&mut registry)));
    client.create(pool("a", "10.0.0.0/16")).await.expect("a");
    client.create(pool("b", "10.1.0.0/16")).await.expect("b");
    let metrics = SyncerMetrics::new(&mut registry);
    let consumer =
        CheckingConsumer::start(fast_syncer(client.clone()).with_metrics(metrics).stream());
    assert!(in_sync_with(&consumer, &*client).await);
    let a = client
        .get(&ResourceKey::cluster("IPPool", "a"), &Default::default())
        .await
        .expect("get");
    let mut a2 = a.clone();
    a2.value = json!({"cidr": "10.9.0.0/16"}).into();
    client.update(a2).await.expect("update");
    client
        .delete(&ResourceKey::cluster("IPPool", "b"), &Default::default())
        .await
        .expect("delete");
    assert!(in_sync_with(&consumer, &*client).await);
    faults.break_watches();
    client.create(pool("c", "10.2.0.0/16")).await.expect("c");
    assert!(in_sync_with(&consumer, &*client).await);
    let text = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    };
    let t = text();
    for line in [
        r#"kvsync_syncer_status{status="in_sync"} 1"#,
        r#"kvsync_syncer_status{status="wait_for_datastore"} 0"#,
        r#"kvsync_syncer_updates_total{kind="IPPool",type="new"} 3"#,
        r#"kvsync_syncer_updates_total{kind="IPPool",type="updated"} 1"#,
        r#"kvsync_syncer_updates_total{kind="IPPool",type="deleted"} 1"#,
        r#"kvsync_syncer_relists_total{kind="IPPool",cause="initial"} 1"#,
        r#"kvsync_syncer_relists_total{kind="NetworkPolicy",cause="initial"} 1"#,
        r#"kvsync_syncer_watch_restarts_total{kind="IPPool"} 1"#,
        r#"kvsync_syncer_tracked_keys{kind="IPPool"} 2"#,
        r#"kvsync_backend_requests_total{backend="memory",op="create",outcome="ok"} 3"#,
        r#"kvsync_backend_requests_total{backend="memory",op="delete",outcome="ok"} 1"#,
        r#"kvsync_backend_watch_events_total{backend="memory",kind="IPPool"}"#,
        "kvsync_syncer_batch_size_count",
        r#"kvsync_backend_request_duration_seconds_bucket{le="#,
    ] {
        assert!(t.contains(line), "no {line:?} in\n{t}");
    }
    // An outage during which the datastore moved on: the type relists (the gap is more than
    // its two keys / 20 could resume), counted with its cause.
    faults.set_unavailable(true);
    faults.break_watches();
    memory
        .inner()
        .create(pool("d", "10.3.0.0/16"))
        .await
        .expect("d");
    tokio::time::sleep(Duration::from_millis(100)).await;
    faults.set_unavailable(false);
    assert!(in_sync_with(&consumer, &*client).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !text().contains(r#"kvsync_syncer_relists_total{kind="IPPool",cause="gap"} 1"#) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no relist for the gap in\n{}",
            text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        text().contains(
            r#"kvsync_backend_requests_total{backend="memory",op="list",outcome="unavailable"}"#
        ) || text().contains(r#"op="watch",outcome="unavailable""#)
            || text().contains(r#"op="current_revision",outcome="unavailable""#),
        "failed calls are counted by outcome:\n{}",
        text()
    );
    consumer.stop().await;
}
