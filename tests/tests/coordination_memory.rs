//! Locks and leases on the memory backend under a randomized fault model, on tokio's paused
//! clock: workers increment one counter under a lock with guarded writes while a chaos task
//! cuts them off from the datastore for longer than their lease. Whatever happens, every
//! acknowledged increment is counted once, and no write of an older lock holder lands after a
//! newer holder's.
//!
//! `KVSYNC_COORDINATION_CASES=N` runs N seeds (20 by default).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvsync_backend::{Client, Error, FaultyClient, LockOptions, MemoryBackend, lock};
use kvsync_model::{KVPair, ResourceKey};
use serde_json::json;

/// xorshift64*: a small seeded generator, so that a failing seed can be run again.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// What the workers saw: each landed increment's (fence, revision, new value).
type Landed = Arc<Mutex<Vec<(u64, u64, u64)>>>;

async fn worker(
    id: usize,
    client: Arc<dyn Client>,
    seed: u64,
    landed: Landed,
    refused: Arc<Mutex<u64>>,
) {
    let mut rng = Rng(seed ^ ((id as u64 + 1) * 0x9E37_79B9));
    let key = ResourceKey::cluster("Node", "counter");
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(120))
        .with_holder(format!("worker-{id}"));
    for _ in 0..6 {
        let guard = match lock(client.clone(), "counter", &opts).await {
            Ok(g) => g,
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1 + rng.below(3))).await;
                continue;
            }
        };
        let fence = guard.fence().as_u64().expect("a counter revision");
        // Increments without looking at lost(): the fence alone must keep a stale holder out.
        // Failed calls (cut off) are tried again, so a holder cut off past its lease comes
        // back and tries to write.
        let mut left = 1 + rng.below(4);
        for _ in 0..200 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.below(2_000))).await;
            let Ok(cur) = client.get(&key, &Default::default()).await else {
                continue;
            };
            let n = cur.value.as_value().expect("json")["asn"]
                .as_u64()
                .expect("a count");
            match guard
                .put(KVPair::new(key.clone(), json!({"asn": n + 1})))
                .await
            {
                Ok(kvp) => {
                    let rev = kvp.revision.and_then(|r| r.as_u64()).expect("revision");
                    landed.lock().unwrap().push((fence, rev, n + 1));
                    left -= 1;
                }
                Err(Error::NotHeld { .. }) => {
                    *refused.lock().unwrap() += 1;
                    break;
                }
                Err(_) => {}
            }
        }
        let _ = guard.release().await;
    }
}

async fn run_case(seed: u64) -> (usize, u64) {
    let store = MemoryBackend::new(kvsync_model::demo::registry());
    let key = ResourceKey::cluster("Node", "counter");
    store
        .create(KVPair::new(key.clone(), json!({"asn": 1})))
        .await
        .expect("counter");
    let landed: Landed = Arc::default();
    let refused = Arc::new(Mutex::new(0));
    let mut faults = Vec::new();
    let mut tasks = Vec::new();
    for id in 0..3 {
        let client = FaultyClient::new(store.clone());
        faults.push(client.faults());
        tasks.push(tokio::spawn(worker(
            id,
            Arc::new(client),
            seed,
            landed.clone(),
            refused.clone(),
        )));
    }
    let chaos = tokio::spawn(async move {
        let mut rng = Rng(seed.wrapping_add(0xC0FFEE));
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1 + rng.below(8))).await;
            let f = &faults[rng.below(3) as usize];
            f.set_unavailable(true);
            // Longer than the lease at times, shorter at others.
            tokio::time::sleep(Duration::from_secs(3 + rng.below(20))).await;
            f.set_unavailable(false);
        }
    });
    for t in tasks {
        t.await.expect("worker");
    }
    chaos.await.expect("chaos");
    let landed = landed.lock().unwrap().clone();
    let last = store.get(&key, &Default::default()).await.expect("counter");
    let count = last.value.as_value().expect("json")["asn"]
        .as_u64()
        .expect("count");
    assert_eq!(
        count,
        1 + landed.len() as u64,
        "seed {seed}: every acknowledged increment counted once"
    );
    let mut by_rev = landed.clone();
    by_rev.sort_by_key(|l| l.1);
    assert!(
        by_rev.windows(2).all(|w| w[0].0 <= w[1].0),
        "seed {seed}: a write of an older holder landed after a newer holder's: {by_rev:?}"
    );
    let refused = *refused.lock().unwrap();
    (landed.len(), refused)
}

#[tokio::test(start_paused = true)]
async fn guarded_increments_hold_under_partitions_longer_than_the_lease() {
    let cases: u64 = std::env::var("KVSYNC_COORDINATION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (mut landed, mut refused) = (0, 0);
    for seed in 0..cases {
        let (l, r) = run_case(seed).await;
        landed += l;
        refused += r;
    }
    assert!(landed > 0, "increments landed");
    // The fault model must reach the case fencing exists for: a holder cut off past its
    // lease that comes back and tries to write.
    assert!(
        refused > 0,
        "no stale holder ever tried to write: the faults are too weak"
    );
}
