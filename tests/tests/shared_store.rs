//! The SharedStore on the memory backend: nodes publish their own Node and follow everyone's;
//! a local key deleted by someone else comes back, keys come back under a new lease after the
//! old one is lost, and a store that goes away takes its keys with it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvsync_backend::{Client, MemoryBackend};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{ResourceType, SharedObserver, SharedStore};
use serde_json::json;

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl SharedObserver for Seen {
    fn on_update(&mut self, kvp: &kvsync_model::KVPair) {
        self.0
            .lock()
            .unwrap()
            .push(format!("update {}", kvp.key.name));
    }
    fn on_delete(&mut self, key: &ResourceKey) {
        self.0.lock().unwrap().push(format!("delete {}", key.name));
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node(name: &str, asn: u32) -> KVPair {
    KVPair::new(ResourceKey::cluster("Node", name), json!({"asn": asn}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_publish_their_own_and_follow_everyones() {
    let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    let nodes = || ResourceType::new(ListOptions::new("Node"));
    let seen = Seen::default();
    let a = SharedStore::start(
        client.clone(),
        nodes(),
        Duration::from_secs(3),
        seen.clone(),
    )
    .await
    .expect("a");
    let b = SharedStore::start(client.clone(), nodes(), Duration::from_secs(3), ())
        .await
        .expect("b");
    a.update_local(node("node-a", 64512))
        .await
        .expect("publish a");
    b.update_local(node("node-b", 64513))
        .await
        .expect("publish b");
    tokio::time::timeout(Duration::from_secs(15), a.synced())
        .await
        .expect("synced");
    eventually("both see both", async || {
        a.shared().len() == 2 && b.shared().len() == 2
    })
    .await;
    assert_eq!(a.local_keys(), [ResourceKey::cluster("Node", "node-a")]);

    // Someone else deletes a's key: a writes it back.
    let key_a = ResourceKey::cluster("Node", "node-a");
    client
        .delete(&key_a, &Default::default())
        .await
        .expect("delete");
    eventually("node-a written back", async || {
        client
            .get_opt(&key_a, &Default::default())
            .await
            .expect("get")
            .is_some()
    })
    .await;

    // a's lease is lost (revoked behind its back, as an expiry would): its key goes, then
    // comes back under a new lease.
    let old = a.lease_id();
    client.lease_revoke(old).await.expect("revoke");
    assert!(
        client
            .get_opt(&key_a, &Default::default())
            .await
            .expect("get")
            .is_none(),
        "node-a went with its lease"
    );
    eventually("node-a back under a new lease", async || {
        a.lease_id() != old
            && client
                .get_opt(&key_a, &Default::default())
                .await
                .expect("get")
                .is_some()
    })
    .await;

    // b goes away: its key goes from a's view, and a's observer is told.
    drop(b);
    eventually("node-b gone from a's view", async || {
        a.shared().keys().all(|k| k.name != "node-b")
    })
    .await;
    let log = seen.0.lock().unwrap().clone();
    assert!(log.contains(&"update node-b".to_owned()), "{log:?}");
    assert!(log.contains(&"delete node-b".to_owned()), "{log:?}");
}
