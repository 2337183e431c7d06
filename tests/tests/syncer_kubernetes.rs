//! The Syncer against the Kubernetes backend through the API server double: the randomized
//! model test, and 410 Gone in the middle of a watch.

use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::Client;
use kvsync_model::{KVPair, ListOptions, Registry, ResourceKey};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus, Syncer};
use kvsync_tests::checker::{CheckingConsumer, datastore_state, diff};
use kvsync_tests::kube_double::ApiServerDouble;
use kvsync_tests::kubernetes::{KubeDoubleTestBackend, connect, connect_configured};
use kvsync_tests::syncer_model::{self, ModelConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_model_holds_the_consumer_invariant_on_kubernetes() {
    let cases = std::env::var("KVSYNC_KUBE_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let mut config = ModelConfig::new(cases);
    config.max_ops = 30;
    syncer_model::run(
        &KubeDoubleTestBackend {
            window: 50,
            watch_list: false,
            watch_cap: None,
        },
        config,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_model_holds_with_watch_list_requests() {
    let mut config = ModelConfig::new(40);
    config.max_ops = 30;
    config.seed = config.seed.wrapping_add(7_000);
    syncer_model::run(
        &KubeDoubleTestBackend {
            window: 50,
            watch_list: true,
            watch_cap: None,
        },
        config,
    )
    .await;
}

/// The randomized model with every watch ended by the server within 150 ms: the backend reopens
/// each from where it was, and the consumer's map still equals the datastore at every InSync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_model_holds_while_the_server_keeps_ending_watches() {
    let mut config = ModelConfig::new(30);
    config.max_ops = 30;
    config.seed = config.seed.wrapping_add(9_000);
    syncer_model::run(
        &KubeDoubleTestBackend {
            window: 10_000,
            watch_list: false,
            watch_cap: Some(Duration::from_millis(150)),
        },
        config,
    )
    .await;
}

/// Pools `p0`..`p{n}` written one by one, `gap` apart.
async fn write_pools(client: &dyn Client, n: usize, gap: Duration) {
    for i in 0..n {
        client
            .create(KVPair::new(
                ResourceKey::cluster("IPPool", format!("p{i}")),
                json!({"cidr": format!("10.{i}.0.0/16")}),
            ))
            .await
            .expect("create");
        tokio::time::sleep(gap).await;
    }
}

/// Reads `n` Added events from `watch`, failing on any error item.
async fn added(watch: &mut kvsync_backend::WatchStream, n: usize) -> Vec<String> {
    use futures::StreamExt;
    let mut names = Vec::new();
    while names.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(kvsync_backend::WatchEvent::Added(k)))) => names.push(k.key.name),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("the consumer saw an error: {e}"),
            Ok(None) => panic!("the watch ended after {names:?}"),
            Err(_) => panic!("no event within 10 s after {names:?}"),
        }
    }
    names
}

/// The server ending a watch (its timeoutSeconds) reopens it from the last resourceVersion
/// seen: no error reaches the consumer, nothing is missed or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_the_server_ends_reopens_quietly_from_where_it_was() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    double.close_watches_after(Duration::from_millis(300));
    let client = connect(&double).await;
    let list = client
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("list");
    let mut watch = client
        .watch(&ListOptions::new("IPPool").with_revision(list.revision))
        .await
        .expect("watch");
    let gets = double.requests("GET");
    // Written while the watch is read, across several of the server's ends.
    let client = Arc::new(client);
    let writer = {
        let client = client.clone();
        tokio::spawn(async move { write_pools(&*client, 12, Duration::from_millis(100)).await })
    };
    let names = added(&mut watch, 12).await;
    writer.await.expect("writer");
    let want: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
    assert_eq!(names, want, "every pool once, in order");
    let reopened = double.requests("GET") - gets;
    assert!(
        reopened >= 3,
        "the watch was reopened across the server's ends: {reopened} GETs"
    );
}

/// A watch that goes silent (no events, no bookmarks, no end: a dead connection) is taken for
/// dead after the idle timeout and reopened from where it was: the writes made meanwhile
/// arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_watch_is_reopened_and_misses_nothing() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    let client = kvsync_tests::kubernetes::connect_configured(&double, |c| {
        c.with_watch_idle_timeout(Duration::from_millis(700))
    })
    .await;
    let mut watch = client
        .watch(&ListOptions::new("IPPool"))
        .await
        .expect("watch");
    write_pools(&client, 2, Duration::ZERO).await;
    assert_eq!(added(&mut watch, 2).await, ["p0", "p1"]);
    double.stall_watches();
    for i in 2..6 {
        client
            .create(KVPair::new(
                ResourceKey::cluster("IPPool", format!("p{i}")),
                json!({"cidr": format!("10.{i}.0.0/16")}),
            ))
            .await
            .expect("create");
    }
    assert_eq!(added(&mut watch, 4).await, ["p2", "p3", "p4", "p5"]);
}

/// By default the state is read with one watch-list request, and the watch that follows on
/// from that list continues the same stream: no second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_list_read_goes_on_as_the_watch_on_the_same_stream() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    let client = kvsync_tests::kubernetes::connect_configured(&double, |c| c).await;
    write_pools(&client, 3, Duration::ZERO).await;
    let gets = double.requests("GET");
    let list = client
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("list");
    assert_eq!(list.items.len(), 3);
    assert_eq!(double.watch_list_requests(), 1, "watch-list is the default");
    let mut watch = client
        .watch(&ListOptions::new("IPPool").with_revision(list.revision.clone()))
        .await
        .expect("watch");
    assert_eq!(
        double.requests("GET") - gets,
        1,
        "the watch continued the list's stream"
    );
    client
        .create(KVPair::new(
            ResourceKey::cluster("IPPool", "later"),
            json!({"cidr": "10.9.0.0/16"}),
        ))
        .await
        .expect("create");
    assert_eq!(added(&mut watch, 1).await, ["later"]);
    // A watch from another revision opens a request of its own.
    let _other = client
        .watch(&ListOptions::new("IPPool").with_revision(list.revision))
        .await
        .expect("watch");
    assert_eq!(double.requests("GET") - gets, 2);
}

/// A server that refuses watch-list requests (500 "RequestWatchProgress is disabled" with etcd
/// 3.4 under it, 422 without the WatchList feature): the list falls back to paged lists, and
/// no later list asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_watch_list_falls_back_to_paged_lists_once() {
    for code in [500, 422] {
        let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
        double.refuse_watch_list(code);
        let client = kvsync_tests::kubernetes::connect_configured(&double, |c| c).await;
        write_pools(&client, 3, Duration::ZERO).await;
        for kind in ["IPPool", "Node", "IPPool"] {
            let list = client.list(&ListOptions::new(kind)).await.expect("list");
            assert_eq!(list.items.len(), if kind == "IPPool" { 3 } else { 0 });
        }
        assert_eq!(
            double.watch_list_requests(),
            1,
            "{code}: asked once, then paged lists for every kind"
        );
    }
}

/// Throttled requests (429 with Retry-After, as API priority and fairness answers) are
/// retried after the time the server asks for (a bounded server-aware retry; past its retries the
/// backend's error carries the time, see `Error::retry_after`), and a Syncer comes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_requests_wait_as_the_server_asks_and_the_syncer_gets_through() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    let client: Arc<dyn Client> = Arc::new(connect(&double).await);
    write_pools(&*client, 2, Duration::ZERO).await;
    double.throttle(2, 1);
    let t0 = std::time::Instant::now();
    let list = client
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("list");
    assert_eq!(list.items.len(), 2);
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "each retry waited the second the server asked for: {:?}",
        t0.elapsed()
    );
    double.throttle(3, 1);
    let consumer = CheckingConsumer::start(
        Syncer::new(client.clone())
            .with_resource(ResourceType::new(ListOptions::new("IPPool")))
            .stream(),
    );
    let expected = datastore_state(&*client, &[ListOptions::new("IPPool")]).await;
    let ok = consumer
        .wait_for(Duration::from_secs(30), |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await;
    assert!(ok, "{}", consumer.with(|s| diff(&expected, &s.cache)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_in_the_middle_of_a_watch_relists_and_sends_the_difference() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    let client: Arc<dyn Client> = Arc::new(connect(&double).await);
    for name in ["a", "b", "c"] {
        client
            .create(KVPair::new(
                ResourceKey::cluster("IPPool", name),
                json!({"cidr": "10.0.0.0/16"}),
            ))
            .await
            .expect("seed");
    }
    let syncer = Syncer::new(client.clone())
        .with_resource(ResourceType::new(ListOptions::new("IPPool")))
        .with_retry_policy(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(50),
        ));
    let consumer = CheckingConsumer::start(syncer.stream());
    let kinds = [ListOptions::new("IPPool")];
    let expected = datastore_state(client.as_ref(), &kinds).await;
    assert!(
        consumer
            .wait_for(Duration::from_secs(10), |s| s.status()
                == Some(SyncStatus::InSync)
                && s.cache == expected)
            .await
    );

    // The API server's window moves on while changes happen: the open watch gets 410 Gone.
    client
        .apply(KVPair::new(
            ResourceKey::cluster("IPPool", "b"),
            json!({"cidr": "10.9.0.0/16"}),
        ))
        .await
        .expect("update");
    double.expire_history();
    client
        .delete(
            &ResourceKey::cluster("IPPool", "c"),
            &kvsync_model::DeleteOptions::new(),
        )
        .await
        .expect("delete");
    client
        .create(KVPair::new(
            ResourceKey::cluster("IPPool", "d"),
            json!({"cidr": "10.4.0.0/16"}),
        ))
        .await
        .expect("create");

    let expected = datastore_state(client.as_ref(), &kinds).await;
    let ok = consumer
        .wait_for(Duration::from_secs(10), |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await;
    let seen = consumer.stop().await;
    assert!(ok, "{}", diff(&expected, &seen.cache));
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert!(
        seen.statuses
            .iter()
            .filter(|s| **s == SyncStatus::ResyncInProgress)
            .count()
            >= 2,
        "410 Gone made the type relist: {:?}",
        seen.statuses
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_unauthorized() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    double.require_token("right");
    let wrong = kvsync_backend::kubernetes::KubernetesBackend::connect(
        kvsync_backend::kubernetes::KubernetesConfig::new(kvsync_model::demo::registry())
            .with_kubeconfig(double.kubeconfig_with_token("wrong")),
    )
    .await
    .expect("connect");
    let err = wrong
        .list(&ListOptions::new("IPPool"))
        .await
        .expect_err("refused");
    assert!(
        matches!(err, kvsync_backend::Error::Unauthorized { .. }),
        "{err}"
    );
    let right = kvsync_backend::kubernetes::KubernetesBackend::connect(
        kvsync_backend::kubernetes::KubernetesConfig::new(kvsync_model::demo::registry())
            .with_kubeconfig(double.kubeconfig_with_token("right")),
    )
    .await
    .expect("connect");
    right
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_is_unsupported_and_nothing_is_written() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let client = connect(&double).await;
    let err = client
        .create(
            KVPair::new(
                ResourceKey::cluster("IPPool", "a"),
                json!({"cidr": "10.0.0.0/16"}),
            )
            .with_ttl(Duration::from_secs(5)),
        )
        .await
        .expect_err("no TTLs on Kubernetes");
    assert!(
        matches!(err, kvsync_backend::Error::Unsupported { .. }),
        "{err}"
    );
    assert!(
        client
            .list(&ListOptions::new("IPPool"))
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

/// A list of more objects than one API page holds comes page by page (`limit`/`continue`),
/// every page of one snapshot; the whole list is the pages put together, and the Syncer
/// following it holds every object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_come_page_by_page_from_one_snapshot() {
    use futures::StreamExt;
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    let client: Arc<dyn Client> = Arc::new(
        connect_configured(&double, |c| c.with_watch_list(false).with_page_size(500)).await,
    );
    futures::stream::iter(0..1_200)
        .map(|i| {
            let client = client.clone();
            async move {
                client
                    .create(KVPair::new(
                        ResourceKey::cluster("IPPool", format!("p{i:04}")),
                        json!({"cidr": format!("10.{}.{}.0/24", i / 256, i % 256)}),
                    ))
                    .await
                    .expect("create")
            }
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;
    let opts = ListOptions::new("IPPool");
    let mut pages = client.list_pages(&opts).await.expect("pages");
    let gets = double.requests("GET");
    let first = pages.next().await.expect("a first page").expect("page");
    assert_eq!(first.items.len(), 500, "one API page");
    // The next page is read ahead while the caller works on this one, and only that one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while double.requests("GET") < gets + 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        double.requests("GET"),
        gets + 2,
        "the first page and one ahead"
    );
    // A write between pages belongs to a later snapshot.
    client
        .create(KVPair::new(
            ResourceKey::cluster("IPPool", "p9999"),
            json!({"cidr": "10.99.0.0/24"}),
        ))
        .await
        .expect("create");
    let mut names: Vec<String> = first.items.iter().map(|k| k.key.name.clone()).collect();
    let mut sizes = vec![first.items.len()];
    while let Some(page) = pages.next().await {
        let page = page.expect("page");
        assert_eq!(page.revision, first.revision, "one snapshot");
        sizes.push(page.items.len());
        names.extend(page.items.into_iter().map(|k| k.key.name));
    }
    assert_eq!(sizes, vec![500, 500, 200]);
    let expected: Vec<String> = (0..1_200).map(|i| format!("p{i:04}")).collect();
    assert_eq!(
        names, expected,
        "every object once, in order, without the later write"
    );
    let whole = client.list(&opts).await.expect("list");
    assert_eq!(whole.items.len(), 1_201);

    let consumer = CheckingConsumer::start(
        Syncer::new(client.clone())
            .with_resource(ResourceType::new(opts.clone()))
            .stream(),
    );
    let expected = datastore_state(client.as_ref(), &[opts]).await;
    let ok = consumer
        .wait_for(Duration::from_secs(30), |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await;
    assert!(ok, "{}", consumer.with(|s| diff(&expected, &s.cache)));
}

/// Creating an object is one POST, and so is applying a new one: no GET before it (50,000
/// needless 404s were seen creating 50,000 objects on a real API server). Applying over an
/// existing object reads it and patches its spec under its resourceVersion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_apply_of_a_new_object_is_one_post() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let client = connect(&double).await;
    let (gets, posts) = (double.requests("GET"), double.requests("POST"));
    for i in 0..10 {
        let kvp = KVPair::new(
            ResourceKey::cluster("IPPool", format!("p{i}")),
            json!({"cidr": format!("10.{i}.0.0/16")}),
        );
        if i % 2 == 0 {
            client.create(kvp).await.expect("create");
        } else {
            client.apply(kvp).await.expect("apply");
        }
    }
    assert_eq!(double.requests("GET") - gets, 0, "no GET before a POST");
    assert_eq!(double.requests("POST") - posts, 10);
    let updated = client
        .apply(KVPair::new(
            ResourceKey::cluster("IPPool", "p1"),
            json!({"cidr": "10.99.0.0/16"}),
        ))
        .await
        .expect("apply over an existing object");
    assert_eq!(
        updated.value.as_value().expect("json")["cidr"],
        "10.99.0.0/16"
    );
    assert_eq!(double.requests("PATCH"), 1);
}
