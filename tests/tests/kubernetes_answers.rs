//! What the Kubernetes backend makes of the API server's less common answers, through the
//! API server double: per-verb 403s, 504 "Too large resource version", terminating
//! namespaces, and writes the server prunes, defaults and normalises.

use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::{Client, Error};
use kvsync_model::{
    DeleteOptions, GetOptions, KVPair, ListOptions, Registry, ResourceKey, Revision,
};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer};
use kvsync_tests::checker::{CheckingConsumer, datastore_state};
use kvsync_tests::kube_double::ApiServerDouble;
use kvsync_tests::kubernetes::connect;
use serde_json::json;

fn pool(name: &str) -> ResourceKey {
    ResourceKey::cluster("IPPool", name)
}

/// A verb the server forbids is Unauthorized, and nothing else happens: a refused delete
/// leaves the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_verb_is_unauthorized_and_changes_nothing() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1_000).await;
    let client = connect(&double).await;
    client
        .create(KVPair::new(pool("a"), json!({"cidr": "10.0.0.0/16"})))
        .await
        .expect("create");
    double.forbid("delete", "ippools");
    double.forbid("list", "ippools");
    match client.delete(&pool("a"), &DeleteOptions::new()).await {
        Err(Error::Unauthorized { message }) => {
            assert!(message.contains("cannot delete resource"), "{message}");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    client
        .get(&pool("a"), &GetOptions::new())
        .await
        .expect("still there");
    match client.list(&ListOptions::new("IPPool")).await {
        Err(Error::Unauthorized { message }) => {
            assert!(message.contains("cannot list"), "{message}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

/// A watch from a resourceVersion the server has not reached (a server whose cache lags
/// behind the one read before) is Unavailable with the server's Retry-After: retried from
/// the same revision, not Compacted (which would relist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ahead_of_the_server_is_retried_after_the_servers_delay() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1_000).await;
    let client = connect(&double).await;
    let now: u64 = client
        .list(&ListOptions::new("IPPool"))
        .await
        .expect("list")
        .revision
        .to_string()
        .parse()
        .expect("numeric");
    let ahead = ListOptions::new("IPPool").with_revision(Revision::from((now + 100).to_string()));
    match client.watch(&ahead).await {
        Err(e @ Error::Unavailable { .. }) => {
            assert_eq!(e.retry_after(), Some(Duration::from_secs(1)), "{e}");
            assert!(e.to_string().contains("Too large resource version"), "{e}");
        }
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("expected Unavailable, got a watch"),
    }
}

/// A write into a namespace being deleted says so; once it is gone, that it does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_a_terminating_namespace_say_so() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1_000).await;
    double.require_namespaces();
    double.set_namespace_finalize_after(Duration::from_secs(1));
    let client = connect(&double).await;
    let addr = double.url().trim_start_matches("http://").to_owned();
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}});
    let a = addr.clone();
    tokio::task::spawn_blocking(move || {
        let h = [("Authorization", "Bearer test-token")];
        assert_eq!(
            kvsync_tests::http::request(&a, "POST", "/api/v1/namespaces", &h, Some(&ns)).code,
            201
        );
    })
    .await
    .expect("namespace");
    let policy = |name: &str| {
        KVPair::new(
            ResourceKey::namespaced("NetworkPolicy", "team", name),
            json!({"selector": "all()"}),
        )
    };
    client.create(policy("p1")).await.expect("create");
    let a = addr.clone();
    tokio::task::spawn_blocking(move || {
        let h = [("Authorization", "Bearer test-token")];
        assert_eq!(
            kvsync_tests::http::request(&a, "DELETE", "/api/v1/namespaces/team", &h, None).code,
            200
        );
    })
    .await
    .expect("delete namespace");
    match client.create(policy("p2")).await {
        Err(Error::Invalid { field, reason }) => {
            assert_eq!(field, "namespace");
            assert!(reason.contains("is being deleted"), "{reason}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client.create(policy("p3")).await {
            Err(Error::Invalid { reason, .. }) if reason.contains("does not exist") => break,
            Err(Error::Invalid { reason, .. }) if reason.contains("is being deleted") => {}
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the namespace never went"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        client
            .get(
                &ResourceKey::namespaced("NetworkPolicy", "team", "p1"),
                &GetOptions::new()
            )
            .await,
        Err(Error::NotFound { .. })
    ));
}

/// With the CRD installed, the server prunes what its schema does not know, sets its
/// defaults and normalises numbers: the backend returns what the server stored, and a Syncer
/// following the kind holds exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_server_stores_is_what_is_returned_and_followed() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1_000).await;
    let registry = Registry::with_demo_kinds();
    let crd = kvsync_model::crd::crd(registry.kind("IPPool").expect("IPPool"));
    let addr = double.url().trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let h = [("Authorization", "Bearer test-token")];
        let path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        assert_eq!(
            kvsync_tests::http::request(&addr, "POST", path, &h, Some(&crd)).code,
            201
        );
    })
    .await
    .expect("crd");
    let client: Arc<dyn Client> = Arc::new(connect(&double).await);
    let opts = ListOptions::new("IPPool");
    let consumer = CheckingConsumer::start(
        Syncer::new(client.clone())
            .with_resource(ResourceType::new(opts.clone()))
            .stream(),
    );
    // kvsync writes what the kind's type allows; the server adds the schema's defaults.
    let written = client
        .create(KVPair::new(pool("a"), json!({"cidr": "10.0.0.0/16"})))
        .await
        .expect("create");
    let stored = json!({"cidr": "10.0.0.0/16", "disabled": false, "natOutgoing": false});
    assert_eq!(written.value.as_value().expect("json"), &stored);
    let read = client
        .get(&pool("a"), &GetOptions::new())
        .await
        .expect("get");
    assert_eq!(read.value.as_value().expect("json"), &stored);
    // Another tool (kubectl) writes a float and a field the schema does not know: what
    // kvsync reads is what the server kept.
    let addr = double.url().trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let h = [("Authorization", "Bearer test-token")];
        let obj = json!({"apiVersion": "kvsync.dev/v1", "kind": "IPPool", "metadata": {"name": "b"},
            "spec": {"cidr": "10.1.0.0/16", "blockSize": 26.0, "unknown": true}});
        let path = "/apis/kvsync.dev/v1/ippools";
        assert_eq!(
            kvsync_tests::http::request(&addr, "POST", path, &h, Some(&obj)).code,
            201
        );
    })
    .await
    .expect("kubectl");
    let read = client
        .get(&pool("b"), &GetOptions::new())
        .await
        .expect("get");
    assert_eq!(
        read.value.as_value().expect("json"),
        &json!({"cidr": "10.1.0.0/16", "blockSize": 26, "disabled": false, "natOutgoing": false})
    );
    assert!(
        read.value
            .json_text()
            .is_some_and(|t| t.contains("\"blockSize\":26,"))
    );
    let expected = datastore_state(client.as_ref(), &[opts]).await;
    assert!(
        consumer
            .wait_for(Duration::from_secs(30), |s| {
                s.status() == Some(SyncStatus::InSync) && s.cache == expected
            })
            .await,
        "the Syncer holds what the server stored"
    );
}

/// Throttling past kube's few retries reaches the caller with the server's delay, instead of
/// kube retrying for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_past_the_bounded_retries_reaches_the_caller_with_the_delay() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1_000).await;
    let client = connect(&double).await;
    double.throttle(100, 1);
    let gets = double.requests("GET");
    match client.list(&ListOptions::new("IPPool")).await {
        Err(e @ Error::Unavailable { .. }) => {
            assert_eq!(e.retry_after(), Some(Duration::from_secs(1)), "{e}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(
        double.requests("GET") - gets,
        4,
        "the request and three retries"
    );
}
