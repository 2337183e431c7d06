//! The Syncer against real etcd servers started by the fixture: the randomized model test,
//! outage recovery, a killed and restarted server, a cluster losing its leader, TLS and auth.

use std::collections::BTreeMap;

use futures::StreamExt as _;
use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::etcd::{EtcdBackend, EtcdConfig};
use kvsync_backend::{Client, Error};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus, Syncer};
use kvsync_tests::checker::{CheckingConsumer, datastore_state, diff};
use kvsync_tests::etcd::{EtcdCluster, EtcdTestBackend, TestPki, enable_auth_with_reader};
use kvsync_tests::syncer_model::{self, ModelConfig};
use kvsync_tests::{TestBackend, unique_prefix};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn pool(name: &str, n: u64) -> KVPair {
    KVPair::new(
        ResourceKey::cluster("IPPool", name),
        json!({"cidr": format!("10.{}.0.0/16", n % 256)}),
    )
}

fn syncer(client: Arc<dyn Client>) -> Syncer {
    Syncer::new(client)
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .with_retry_policy(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
        .with_request_timeout(Duration::from_secs(3))
}

async fn start_cluster(n: usize) -> EtcdCluster {
    tokio::task::spawn_blocking(move || EtcdCluster::start_n(n, None))
        .await
        .expect("start etcd")
}

async fn converged(consumer: &CheckingConsumer, client: &dyn Client) -> Result<(), String> {
    let expected = datastore_state(client, &[ListOptions::new("IPPool")]).await;
    let ok = consumer
        .wait_for(WAIT, |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await;
    if ok {
        Ok(())
    } else {
        Err(consumer.with(|s| format!("{} (statuses {:?})", diff(&expected, &s.cache), s.statuses)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_model_holds_the_consumer_invariant_on_etcd() {
    let cases = std::env::var("KVSYNC_ETCD_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut config = ModelConfig::new(cases);
    config.max_ops = 30;
    syncer_model::run(&EtcdTestBackend::private(), config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_recovery_resumes_short_gaps_and_relists_long_ones_on_etcd() {
    kvsync_tests::scenarios::outage_recovery_resumes_short_gaps_and_relists_long_ones(
        &EtcdTestBackend::private(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_etcd_goes_wait_for_datastore_then_in_sync() {
    let mut cluster = start_cluster(1).await;
    let client: Arc<dyn Client> = Arc::new(
        EtcdBackend::connect(cluster.config(&unique_prefix()))
            .await
            .expect("connect"),
    );
    for i in 0..20 {
        client
            .create(pool(&format!("p{i}"), i))
            .await
            .expect("seed");
    }
    let consumer = CheckingConsumer::start(syncer(client.clone()).stream());
    converged(&consumer, client.as_ref())
        .await
        .expect("initial sync");

    cluster.members[0].kill();
    let waiting = consumer
        .wait_for(WAIT, |s| s.status() == Some(SyncStatus::WaitForDatastore))
        .await;
    assert!(waiting, "a dead etcd shows as WaitForDatastore");
    let pid_before = cluster.members[0].pid();
    assert!(pid_before.is_none());
    cluster.members[0].restart();
    tokio::task::spawn_blocking({
        let endpoints = cluster.endpoints();
        move || {
            let deadline = std::time::Instant::now() + WAIT;
            while std::net::TcpStream::connect(endpoints[0].trim_start_matches("http://")).is_err()
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "etcd did not come back"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .await
    .expect("wait for restart");

    // Writes after the restart (retried until etcd serves again).
    for i in 0..10u64 {
        let mut tries = 0;
        loop {
            match client.apply(pool(&format!("p{i}"), 100 + i)).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("write after restart: {e}"),
            }
        }
    }
    client
        .delete(
            &ResourceKey::cluster("IPPool", "p19"),
            &kvsync_model::DeleteOptions::new(),
        )
        .await
        .expect("delete");
    converged(&consumer, client.as_ref())
        .await
        .expect("in sync after the restart");
    let seen = consumer.stop().await;
    let n = seen.statuses.len();
    assert!(n >= 2 && seen.statuses[n - 1] == SyncStatus::InSync);
    assert!(seen.statuses.contains(&SyncStatus::WaitForDatastore));
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_losing_its_leader_loses_no_acknowledged_write() {
    let mut cluster = start_cluster(3).await;
    let prefix = unique_prefix();
    let client: Arc<dyn Client> = Arc::new(
        EtcdBackend::connect(cluster.config(&prefix))
            .await
            .expect("connect"),
    );
    let consumer = CheckingConsumer::start(syncer(client.clone()).stream());
    converged(&consumer, client.as_ref())
        .await
        .expect("initial sync");

    // Writers: each owns some keys and records the last value etcd acknowledged.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut acked: BTreeMap<String, u64> = BTreeMap::new();
                for i in 0..150u64 {
                    let name = format!("w{w}-{}", i % 10);
                    let value = KVPair::new(
                        ResourceKey::cluster("IPPool", name.as_str()),
                        json!({"cidr": format!("10.0.{i}.0/24")}),
                    );
                    match client.apply(value).await {
                        Ok(_) => {
                            acked.insert(name, i);
                        }
                        Err(e) if e.is_retryable() => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
                acked
            })
        })
        .collect();

    // Kill the leader while the writers run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leader = leader_index(&cluster).await;
    cluster.members[leader].kill();

    let mut acked = BTreeMap::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    // Every acknowledged write is there: each key holds its last acknowledged value, or a
    // later one whose answer was lost when the leader died.
    let state = datastore_state(client.as_ref(), &[ListOptions::new("IPPool")]).await;
    for (name, acked_seq) in &acked {
        let key = ResourceKey::cluster("IPPool", name.as_str());
        let (value, _) = state.get(&key).unwrap_or_else(|| panic!("{key} lost"));
        let stored_seq: u64 = value["cidr"]
            .as_str()
            .and_then(|c| c.split('.').nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key}: unexpected value {value}"));
        assert!(
            stored_seq >= *acked_seq,
            "{key}: acknowledged {acked_seq}, found {stored_seq}"
        );
    }
    assert!(
        acked.len() >= 30,
        "most writes went through: {}",
        acked.len()
    );
    converged(&consumer, client.as_ref())
        .await
        .expect("Syncer in sync with the surviving cluster");
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

async fn leader_index(cluster: &EtcdCluster) -> usize {
    for (i, m) in cluster.members.iter().enumerate() {
        let mut c = etcd_client::Client::connect([m.endpoint()], None)
            .await
            .expect("connect");
        let status = c.status().await.expect("status");
        if status.leader() == status.header().map(|h| h.member_id()).unwrap_or(0) {
            return i;
        }
    }
    panic!("no leader found")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca_works_and_a_client_without_it_is_refused() {
    let pki = TestPki::generate();
    let cluster = tokio::task::spawn_blocking(move || {
        let c = EtcdCluster::start_tls(&pki);
        (c, pki)
    })
    .await
    .expect("start TLS etcd");
    let (cluster, pki) = cluster;
    let prefix = unique_prefix();
    let good = EtcdBackend::connect(cluster.config(&prefix))
        .await
        .expect("connect");
    good.create(pool("tls", 1)).await.expect("write over TLS");
    assert_eq!(
        good.get(
            &ResourceKey::cluster("IPPool", "tls"),
            &kvsync_model::GetOptions::new()
        )
        .await
        .expect("read")
        .value
        .as_value()
        .unwrap()["cidr"],
        "10.1.0.0/16"
    );

    // Another CA: the server's certificate is not trusted.
    let other = TestPki::generate();
    let mut tls = other.client_tls();
    tls.cert_pem = std::fs::read(pki.path("client.pem")).ok();
    tls.key_pem = std::fs::read(pki.path("client-key.pem")).ok();
    let bad_config = cluster.config(&prefix).with_tls(tls);
    let refused = match EtcdBackend::connect(bad_config).await {
        Err(e) => e,
        Ok(bad) => bad
            .get(
                &ResourceKey::cluster("IPPool", "tls"),
                &kvsync_model::GetOptions::new(),
            )
            .await
            .expect_err("a client that does not trust the server's CA is refused"),
    };
    assert!(
        refused.is_retryable() || matches!(refused, Error::Unauthorized { .. }),
        "{refused}"
    );

    // Plain HTTP against the TLS port is refused too.
    let plain = EtcdConfig::new(
        cluster
            .endpoints()
            .iter()
            .map(|e| e.replace("https://", "http://")),
        kvsync_model::demo::registry(),
    )
    .with_prefix(prefix.as_str())
    .with_request_timeout(Duration::from_secs(2));
    let plain = EtcdBackend::connect(plain).await.expect("lazy connect");
    assert!(
        plain
            .get(
                &ResourceKey::cluster("IPPool", "tls"),
                &kvsync_model::GetOptions::new()
            )
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_rights_gets_unauthorized() {
    let cluster = start_cluster(1).await;
    let endpoint = cluster.endpoints()[0].clone();
    enable_auth_with_reader(&endpoint, "/elsewhere/").await;

    let reader = EtcdBackend::connect(cluster.config("/kvsync/v1").with_user("reader", "readerpw"))
        .await
        .expect("authenticate as reader");
    let err = reader
        .create(pool("a", 1))
        .await
        .expect_err("no write rights");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    let err = reader
        .list(&ListOptions::new("IPPool"))
        .await
        .expect_err("no read rights here");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");

    let root = EtcdBackend::connect(cluster.config("/kvsync/v1").with_user("root", "rootpw"))
        .await
        .expect("authenticate as root");
    root.create(pool("a", 1)).await.expect("root writes");

    let wrong = EtcdBackend::connect(cluster.config("/kvsync/v1").with_user("root", "nope")).await;
    assert!(
        matches!(wrong, Err(Error::Unauthorized { .. })),
        "{wrong:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_fails_fast_and_retryably() {
    let port = kvsync_tests::etcd::free_port();
    let backend = EtcdBackend::connect(
        EtcdConfig::new(
            [format!("http://127.0.0.1:{port}")],
            kvsync_model::demo::registry(),
        )
        .with_request_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1)),
    )
    .await
    .expect("lazy connect");
    let started = std::time::Instant::now();
    let err = backend
        .list(&ListOptions::new("IPPool"))
        .await
        .expect_err("nobody listens");
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = EtcdTestBackend::shared().client().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_larger_than_the_decode_limit_is_read_in_smaller_pages() {
    let cluster = start_cluster(1).await;
    let client = EtcdBackend::connect(cluster.config(&unique_prefix()))
        .await
        .expect("connect");
    // 72 values of about 1 MiB: 72 MiB, over the client's 64 MiB decode limit in one page.
    let labels: serde_json::Map<String, serde_json::Value> = (0..1000)
        .map(|i| {
            (
                format!("l{i:04}"),
                serde_json::Value::String("x".repeat(1000)),
            )
        })
        .collect();
    let value = json!({"labels": labels});
    let writes = futures::stream::iter(0..72).map(|i| {
        let client = client.clone();
        let value = value.clone();
        async move {
            client
                .create(KVPair::new(
                    ResourceKey::cluster("Node", format!("n{i:02}")),
                    value,
                ))
                .await
                .expect("write a large value")
        }
    });
    writes.buffer_unordered(8).for_each(|_| async {}).await;
    let list = client.list(&ListOptions::new("Node")).await.expect("list");
    assert_eq!(list.items.len(), 72);
    assert!(list.items.iter().all(|k| k.value == value));
}

/// Lists read as parts side by side (the rest of the list split at keys estimated from its
/// first page) give exactly what one range read page after page gives, in key order, as one
/// snapshot, whatever the names look like and while writers change the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_read_in_parts_match_one_range_exactly() {
    use kvsync_backend::etcd::EtcdListReads;
    let cluster = start_cluster(1).await;
    let prefix = unique_prefix();
    let split_reads = EtcdListReads {
        first_page_keys: 40,
        part_keys: 100,
        max_parts: 8,
        parallel_reads: 3,
    };
    let split = EtcdBackend::connect(cluster.config(&prefix).with_list_reads(split_reads))
        .await
        .expect("connect");
    let plain_reads = EtcdListReads {
        max_parts: 1,
        ..split_reads
    };
    let plain = EtcdBackend::connect(cluster.config(&prefix).with_list_reads(plain_reads))
        .await
        .expect("connect");
    // Names of several shapes: zero-padded numbers, plain numbers (which sort as text),
    // hash-like suffixes; and a namespaced kind across namespaces.
    let mut keys: Vec<ResourceKey> = Vec::new();
    for i in 0..500u64 {
        keys.push(ResourceKey::cluster("IPPool", format!("pool-{i:05}")));
        keys.push(ResourceKey::cluster("IPPool", format!("p-{i}")));
        let hash = format!("{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        keys.push(ResourceKey::cluster(
            "IPPool",
            format!("web-{}", &hash[..8]),
        ));
        keys.push(ResourceKey::namespaced(
            "NetworkPolicy",
            format!("ns-{}", i % 7),
            format!("allow-{i}"),
        ));
    }
    let value = |key: &ResourceKey, n: u64| {
        if key.kind == "IPPool" {
            json!({"cidr": format!("10.{}.0.0/16", n % 256)})
        } else {
            json!({"order": n as f64, "selector": "all()"})
        }
    };
    futures::stream::iter(keys.clone())
        .map(|key| {
            let client = split.clone();
            async move {
                client
                    .apply(KVPair::new(key.clone(), value(&key, 1)))
                    .await
                    .expect("write")
            }
        })
        .buffer_unordered(32)
        .for_each(|_| async {})
        .await;
    let all_pools = ListOptions::new("IPPool");
    let all_policies = ListOptions::new("NetworkPolicy");
    let one_namespace = ListOptions::new("NetworkPolicy").with_namespace("ns-3");
    let before = split.list(&all_pools).await.expect("list");
    assert_eq!(before.items.len(), 1500);

    // Writers change, delete and add keys while the lists run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, keys, stop) = (split.clone(), keys.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 2;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = keys[(n as usize * 37) % keys.len()].clone();
                if n % 5 == 0 {
                    let _ = client
                        .delete(&key, &kvsync_model::DeleteOptions::new())
                        .await;
                } else {
                    let v = value(&key, n);
                    client.apply(KVPair::new(key, v)).await.expect("write");
                }
                n += 1;
            }
        })
    };
    for opts in [&all_pools, &all_policies, &one_namespace] {
        for _ in 0..3 {
            let mut pages = split.list_pages(opts).await.expect("pages");
            let mut listed: Vec<KVPair> = Vec::new();
            let mut page_count = 0;
            let mut revision = None;
            while let Some(page) = pages.next().await {
                let page = page.expect("page");
                assert!(revision.is_none_or(|r| r == page.revision));
                revision = Some(page.revision);
                assert!(page.parse_failures.is_empty());
                listed.extend(page.items);
                page_count += 1;
            }
            let revision = revision.expect("a first page");
            // The same snapshot, read as one range.
            let expected = plain
                .list(&opts.clone().with_revision(revision.clone()))
                .await
                .expect("plain list");
            let paths = |items: &[KVPair]| -> Vec<String> {
                items.iter().map(|k| k.key.to_string()).collect()
            };
            assert_eq!(paths(&listed), paths(&expected.items), "{opts:?}");
            assert_eq!(listed, expected.items, "{opts:?}");
            let sorted = listed.windows(2).all(|w| {
                split.codec().to_path(&w[0].key).unwrap()
                    < split.codec().to_path(&w[1].key).unwrap()
            });
            assert!(sorted, "pages in key order");
            if listed.len() > 400 {
                assert!(
                    page_count > 2,
                    "{opts:?}: {page_count} pages: the list was not split"
                );
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    // And at a revision from before the writers.
    for opts in [&all_pools, &all_policies, &one_namespace] {
        let a = split
            .list(&opts.clone().with_revision(before.revision.clone()))
            .await
            .expect("list");
        let b = plain
            .list(&opts.clone().with_revision(before.revision.clone()))
            .await
            .expect("list");
        assert_eq!(a.items, b.items);
    }
    assert_eq!(
        split
            .list(&all_pools.clone().with_revision(before.revision.clone()))
            .await
            .expect("list")
            .items,
        before.items
    );
}
