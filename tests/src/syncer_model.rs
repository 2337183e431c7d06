//! The Syncer's randomized model test: random writes, deletes, garbage, compactions, broken
//! watches, failed calls and outages against any backend, with an invariant-checking consumer.
//! After every case the datastore goes quiet, the faults heal, and the consumer's map must
//! equal the datastore's state, key for key and revision for revision.

use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::{Client, Faults, FaultyClient};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus, Syncer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::checker::{CheckingConsumer, datastore_state, diff};
use crate::harness::{TestBackend, TestClient};

/// How a randomized run is shaped.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// How many cases.
    pub cases: usize,
    /// Operations per case, at most.
    pub max_ops: usize,
    /// The first case's seed; case `i` uses `seed + i`. Set `KVSYNC_SEED` to replay one.
    pub seed: u64,
    /// How long a case may take to converge once quiet.
    pub converge_timeout: Duration,
    /// Whether the backend can compact.
    pub compaction: bool,
}

impl ModelConfig {
    /// `cases` cases from a fixed seed (or `KVSYNC_SEED` from the environment).
    pub fn new(cases: usize) -> Self {
        let seed = std::env::var("KVSYNC_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6b76_7379);
        ModelConfig {
            cases,
            max_ops: 40,
            seed,
            converge_timeout: Duration::from_secs(20),
            compaction: true,
        }
    }
}

/// The kinds the model writes.
pub fn kinds() -> Vec<ListOptions> {
    vec![
        ListOptions::new("IPPool"),
        ListOptions::new("NetworkPolicy"),
    ]
}

/// A key of the model's small key space (collisions make updates and deletes likely).
pub fn random_key(rng: &mut StdRng) -> ResourceKey {
    if rng.random_bool(0.5) {
        ResourceKey::cluster("IPPool", format!("pool-{}", rng.random_range(0..6)))
    } else {
        ResourceKey::namespaced(
            "NetworkPolicy",
            ["ns-a", "ns-b"][rng.random_range(0..2)],
            format!("pol-{}", rng.random_range(0..4)),
        )
    }
}

/// A valid value for `key`.
pub fn random_value(rng: &mut StdRng, key: &ResourceKey) -> serde_json::Value {
    if key.kind == "IPPool" {
        json!({"cidr": format!("10.{}.0.0/16", rng.random_range(0..=255)), "blockSize": 26})
    } else {
        json!({"order": rng.random_range(0..1000) as f64, "selector": "all()"})
    }
}

/// Runs the randomized model test against `backend`.
///
/// # Panics
/// With the case's seed, the operations and the violations, when a case fails.
pub async fn run(backend: &dyn TestBackend, config: ModelConfig) {
    for case in 0..config.cases {
        let seed = config.seed.wrapping_add(case as u64);
        run_case(backend, &config, seed).await;
    }
}

async fn run_case(backend: &dyn TestBackend, config: &ModelConfig, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let TestClient { client, raw } = backend.client().await;
    let faulty = Arc::new(FaultyClient::new(client.clone()));
    let faults: Faults = faulty.faults();
    // Lists in the backend's own pages, or cut into pages of 1 to 3 keys.
    faults.set_list_page_size(rng.random_range(0..4));
    // Pages that keep the Syncer waiting now and then (so the watch that follows a list
    // opens while the list is read).
    if rng.random_bool(0.3) {
        faults.set_list_page_delay(Duration::from_micros(rng.random_range(100..2_000)));
    }

    // Some state before the Syncer starts.
    for _ in 0..rng.random_range(0..8) {
        let key = random_key(&mut rng);
        let value = random_value(&mut rng, &key);
        client
            .apply(KVPair::new(key, value))
            .await
            .expect("seed write");
    }
    if rng.random_bool(0.2) {
        faults.set_unavailable(true);
    }

    let mut syncer = Syncer::new(faulty.clone())
        .with_max_batch(rng.random_range(1..20))
        .with_channel_capacity(rng.random_range(0..3))
        .with_retry_policy(Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(20),
        ))
        .with_request_timeout(Duration::from_secs(5));
    for opts in kinds() {
        syncer = syncer.with_resource(ResourceType::new(opts));
    }
    let consumer = CheckingConsumer::start(syncer.stream());

    let mut log = Vec::new();
    let ops = rng.random_range(1..=config.max_ops);
    for _ in 0..ops {
        let key = random_key(&mut rng);
        match rng.random_range(0..100) {
            0..=34 => {
                let v = random_value(&mut rng, &key);
                let r = client.apply(KVPair::new(key.clone(), v)).await;
                log.push(format!("apply {key}: {:?}", r.map(|k| k.revision)));
            }
            35..=44 => {
                let v = random_value(&mut rng, &key);
                let r = client.create(KVPair::new(key.clone(), v)).await;
                log.push(format!("create {key}: {}", r.is_ok()));
            }
            45..=64 => {
                let r = client
                    .delete(&key, &kvsync_model::DeleteOptions::new())
                    .await;
                log.push(format!("delete {key}: {}", r.is_ok()));
            }
            65..=69 if backend.can_store_undecodable() => {
                let path = client.codec().to_path(&key).expect("valid key");
                let rev = raw.put_raw(&path, b"{garbage").await;
                log.push(format!("garbage {key} @{rev}"));
            }
            70..=76 if config.compaction && backend.can_compact() => {
                let list = client.list(&ListOptions::new("Node")).await.expect("list");
                raw.compact(client.as_ref(), &list.revision).await;
                log.push(format!("compact @{}", list.revision));
            }
            77..=82 => {
                faults.break_watches();
                log.push("break watches".into());
            }
            83..=87 => {
                let down = !faults.is_unavailable();
                faults.set_unavailable(down);
                log.push(format!("outage {down}"));
            }
            88..=89 => {
                let n = rng.random_range(1..4);
                faults.fail_next_calls(n);
                log.push(format!("fail next {n}"));
            }
            90..=91 => {
                let pages = rng.random_range(0..3);
                faults.break_next_list_after(pages);
                faults.break_watches();
                log.push(format!(
                    "break watches, then the next list after {pages} pages"
                ));
            }
            _ => {
                let ms = rng.random_range(0..5);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                log.push(format!("sleep {ms}ms"));
            }
        }
        if rng.random_bool(0.3) {
            tokio::task::yield_now().await;
        }
    }

    // Quiet: heal every fault, stop writing, and wait for the consumer to converge.
    faults.set_unavailable(false);
    faults.fail_next_calls(0);
    let expected = datastore_state(client.as_ref(), &kinds()).await;
    let converged = consumer
        .wait_for(config.converge_timeout, |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await;
    let seen = consumer.stop().await;
    let fail = |why: String| -> ! {
        panic!(
            "case with seed {seed} failed: {why}\nviolations: {:#?}\nstatuses: {:?}\noperations:\n  {}",
            seen.violations,
            seen.statuses,
            log.join("\n  ")
        )
    };
    if !converged {
        fail(format!(
            "did not converge within {:?}: {}",
            config.converge_timeout,
            diff(&expected, &seen.cache)
        ));
    }
    if !seen.violations.is_empty() {
        fail("rules broken".into());
    }
    client.clean().await.expect("clean");
}
