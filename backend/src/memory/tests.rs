use super::*;
use futures::StreamExt;
use serde_json::json;

fn node(name: &str) -> KVPair {
    KVPair::new(ResourceKey::cluster("Node", name), json!({}))
}

#[tokio::test]
async fn history_limit_compacts_automatically() {
    let store = MemoryBackend::builder(kvsync_model::demo::registry())
        .history_limit(3)
        .build()
        .unwrap();
    for i in 0..5 {
        store.create(node(&format!("n{i}"))).await.unwrap();
    }
    assert_eq!(store.revision(), 5);
    // Entries 3, 4 and 5 are kept: a watch from 2 still works, from 1 does not.
    assert!(
        store
            .watch(
                &ListOptions::new("Node").with_revision(kvsync_model::Revision::from(2u64).clone())
            )
            .await
            .is_ok()
    );
    let err = store
        .watch(&ListOptions::new("Node").with_revision(kvsync_model::Revision::from(1u64).clone()))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Compacted { .. }), "{err}");
}

#[tokio::test]
async fn a_watcher_that_falls_behind_the_history_gets_compacted() {
    let store = MemoryBackend::builder(kvsync_model::demo::registry())
        .history_limit(10)
        .build()
        .unwrap();
    let mut w = store.watch(&ListOptions::new("Node")).await.unwrap();
    for i in 0..50 {
        store.create(node(&format!("n{i}"))).await.unwrap();
    }
    let first = w.next().await.unwrap();
    assert!(matches!(first, Err(Error::Compacted { .. })), "{first:?}");
    assert!(w.next().await.is_none(), "the stream ends after Compacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_distinct_increasing_revisions() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    let mut w = store.watch(&ListOptions::new("Node")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let s = store.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    s.apply(node(&format!("t{t}-{}", i % 10))).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut last = 0;
    for _ in 0..800 {
        let ev = w.next().await.unwrap().unwrap();
        let r = ev.revision().and_then(Revision::as_u64).unwrap();
        assert_eq!(r, last + 1, "no gap and no reordering");
        last = r;
    }
    assert_eq!(last, 800);
}

#[tokio::test(start_paused = true)]
async fn expired_keys_vanish_from_reads_without_a_sweeper_tick() {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    store
        .create(node("n").with_ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(
        store
            .get(
                &ResourceKey::cluster("Node", "n"),
                &kvsync_model::GetOptions::new()
            )
            .await
            .is_ok()
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let err = store
        .get(
            &ResourceKey::cluster("Node", "n"),
            &kvsync_model::GetOptions::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
    assert_eq!(store.revision(), 2, "the expiry is a write of its own");
}
