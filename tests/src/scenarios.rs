//! Syncer fault scenarios that every backend with comparable revisions runs.

use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::{Client, FaultyClient};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus, Syncer};
use serde_json::json;

use crate::checker::{CheckingConsumer, datastore_state, diff};
use crate::harness::TestBackend;

const WAIT: Duration = Duration::from_secs(20);

fn pool(name: &str, n: u32) -> KVPair {
    KVPair::new(
        ResourceKey::cluster("IPPool", name),
        json!({"cidr": format!("10.{}.0.0/16", n % 256)}),
    )
}

async fn wait_equal(consumer: &CheckingConsumer, client: &dyn Client) {
    let kinds = [ListOptions::new("IPPool")];
    let expected = datastore_state(client, &kinds).await;
    let ok = consumer
        .wait_for(WAIT, |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await;
    assert!(
        ok,
        "consumer did not converge: {}",
        consumer.with(|s| diff(&expected, &s.cache))
    );
}

/// After an outage, a short gap resumes the watch (no list) and a long gap relists.
///
/// # Panics
/// When the Syncer takes the wrong path or the consumer does not converge.
pub async fn outage_recovery_resumes_short_gaps_and_relists_long_ones(b: &dyn TestBackend) {
    let client = b.client().await.client;
    for i in 0..200 {
        client
            .create(pool(&format!("p{i:03}"), i))
            .await
            .expect("seed");
    }
    let faulty = Arc::new(FaultyClient::new(client.clone()));
    let faults = faulty.faults();
    let syncer = Syncer::new(faulty.clone())
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .with_retry_policy(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(50),
        ));
    let consumer = CheckingConsumer::start(syncer.stream());
    wait_equal(&consumer, client.as_ref()).await;

    for (gap, relists) in [(3u32, 0u64), (60, 1)] {
        let lists = faults.calls("list");
        faults.set_unavailable(true);
        let waiting = consumer
            .wait_for(WAIT, |s| s.status() == Some(SyncStatus::WaitForDatastore))
            .await;
        assert!(waiting, "an outage shows as WaitForDatastore");
        for i in 0..gap {
            let name = format!("p{:03}", i % 200);
            if i % 3 == 2 {
                client
                    .delete(
                        &ResourceKey::cluster("IPPool", name),
                        &kvsync_model::DeleteOptions::new(),
                    )
                    .await
                    .ok();
            } else {
                client
                    .apply(pool(&name, 1000 + i))
                    .await
                    .expect("write in the gap");
            }
        }
        faults.set_unavailable(false);
        wait_equal(&consumer, client.as_ref()).await;
        assert_eq!(
            faults.calls("list") - lists,
            relists,
            "a gap of {gap} revisions over 200 keys {}",
            if relists == 0 {
                "resumes the watch"
            } else {
                "relists"
            }
        );
    }
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    client.clean().await.expect("clean");
}
