//! Locks, elections and guarded writes on Kubernetes, through the API server double: Leases
//! as client-go writes and reads them, fences stored on objects, updates that keep what other
//! owners set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvsync_backend::kubernetes::{FENCE_ANNOTATION, FENCE_LOCK_ANNOTATION, KubernetesBackend};
use kvsync_backend::{Client, Error, Fence, LockOptions, LockRecords, lock};
use kvsync_model::{KVPair, Registry, ResourceKey};
use kvsync_tests::kube_double::ApiServerDouble;
use kvsync_tests::kubernetes::connect;
use serde_json::{Value, json};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases";

fn http(double: &ApiServerDouble, method: &str, path: &str, body: Option<&Value>) -> Value {
    http_as(double, method, path, "application/json", body)
}

fn http_as(
    double: &ApiServerDouble,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> Value {
    let addr = double.url().trim_start_matches("http://").to_owned();
    let answer = kvsync_tests::http::request(
        &addr,
        method,
        path,
        &[
            ("Authorization", "Bearer test-token"),
            ("Content-Type", content_type),
        ],
        body,
    );
    assert!(
        (200..300).contains(&answer.code),
        "{method} {path}: {} {}",
        answer.code,
        answer.body
    );
    answer.json()
}

async fn start() -> (ApiServerDouble, Arc<KubernetesBackend>) {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 1000).await;
    let backend = Arc::new(connect(&double).await);
    (double, backend)
}

fn pool(name: &str, cidr: &str) -> KVPair {
    KVPair::new(ResourceKey::cluster("IPPool", name), json!({"cidr": cidr}))
}

/// A lock is a Lease as client-go writes one: holder, whole-second duration, acquire and
/// renew times in RFC 3339 with microseconds, leaseTransitions as the fence; renewals move
/// renewTime; a release leaves an empty holder with a one-second lease; the next holder's
/// fence is one higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_a_client_go_lease() {
    let (double, backend) = start().await;
    let client: Arc<dyn Client> = backend.clone();
    assert!(client.capabilities().locks && !client.capabilities().leases);
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(2500))
        .with_holder("pod-a")
        .with_renew_every(Duration::from_millis(200));
    let guard = lock(client.clone(), "controller", &opts)
        .await
        .expect("lock");
    let lease = http(&double, "GET", &format!("{LEASES}/controller"), None);
    assert_eq!(lease["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(lease["kind"], "Lease");
    let spec = &lease["spec"];
    assert_eq!(spec["holderIdentity"], "pod-a");
    assert_eq!(spec["leaseDurationSeconds"], 3, "2.5 s rounded up");
    assert_eq!(spec["leaseTransitions"], 0);
    assert_eq!(guard.fence().as_u64(), Some(0));
    let renewed = spec["renewTime"].as_str().expect("renewTime").to_owned();
    assert!(
        renewed.ends_with('Z') && renewed.contains('.'),
        "MicroTime: {renewed}"
    );
    assert!(spec["acquireTime"].is_string());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let later = http(&double, "GET", &format!("{LEASES}/controller"), None);
    assert_ne!(later["spec"]["renewTime"].as_str(), Some(renewed.as_str()));
    assert!(!guard.is_lost());

    guard.release().await.expect("release");
    let released = http(&double, "GET", &format!("{LEASES}/controller"), None);
    assert_eq!(released["spec"]["holderIdentity"], "");
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    let next = lock(
        client.clone(),
        "controller",
        &opts.clone().with_holder("pod-b"),
    )
    .await
    .expect("a released lock is free at once");
    assert_eq!(next.fence().as_u64(), Some(1));
    let held = http(&double, "GET", &format!("{LEASES}/controller"), None);
    assert_eq!(held["spec"]["holderIdentity"], "pod-b");
    assert_eq!(held["spec"]["leaseTransitions"], 1);
}

/// A Lease held by someone else (a client-go candidate) is taken over only after it has not
/// changed for its lease duration as seen from here, even when its renewTime is long past (a
/// skewed clock must not let two lead); the same identity does not count as the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_lease_is_taken_over_only_after_it_expires_here() {
    let (double, backend) = start().await;
    let client: Arc<dyn Client> = backend.clone();
    http(
        &double,
        "POST",
        LEASES,
        Some(&json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "ctl", "namespace": "default"},
            "spec": {
                "holderIdentity": "pod-a",
                "leaseDurationSeconds": 2,
                "acquireTime": "2020-01-01T00:00:00.000000Z",
                "renewTime": "2020-01-01T00:00:00.000000Z",
                "leaseTransitions": 7
            }
        })),
    );
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(2))
        .with_holder("pod-a")
        .with_renew_every(Duration::from_millis(100));
    let t0 = Instant::now();
    let guard = lock(client, "ctl", &opts).await.expect("lock");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "taken over after {:?}, before the lease duration",
        t0.elapsed()
    );
    assert_eq!(guard.fence().as_u64(), Some(8), "one more transition");
}

/// Someone else writing the Lease (another candidate that took it over) makes the holder's
/// next renewal fail: it learns at once that it lost, and its guarded writes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_was_taken_learns_it_lost() {
    let (double, backend) = start().await;
    let client: Arc<dyn Client> = backend.clone();
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_holder("pod-a")
        .with_renew_every(Duration::from_millis(100));
    let guard = lock(client, "ctl", &opts).await.expect("lock");
    guard.put(pool("p", "10.0.0.0/16")).await.expect("held");
    let mut lease = http(&double, "GET", &format!("{LEASES}/ctl"), None);
    lease["spec"]["holderIdentity"] = json!("pod-b");
    lease["spec"]["leaseTransitions"] = json!(1);
    http(&double, "PUT", &format!("{LEASES}/ctl"), Some(&lease));
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("the holder learns it lost");
    let err = guard.put(pool("p", "10.9.0.0/16")).await.unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
    let stored = backend
        .get(&ResourceKey::cluster("IPPool", "p"), &Default::default())
        .await
        .expect("get");
    assert_eq!(
        stored.value.as_value().expect("json")["cidr"],
        "10.0.0.0/16"
    );
}

/// A fenced write stores its fence on the object; a write with an older fence of the same
/// lock is refused and changes nothing; a newer one passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_with_an_older_fence_than_the_objects_are_refused() {
    let (double, backend) = start().await;
    let path = "/apis/kvsync.dev/v1/ippools/p";
    backend
        .fenced_write(pool("p", "10.5.0.0/16"), &Fence::new("res", 5))
        .await
        .expect("a first fenced write creates the object");
    let obj = http(&double, "GET", path, None);
    assert_eq!(obj["metadata"]["annotations"][FENCE_ANNOTATION], "5");
    assert_eq!(
        obj["metadata"]["annotations"][FENCE_LOCK_ANNOTATION],
        "default/res"
    );
    let err = backend
        .fenced_write(pool("p", "10.4.0.0/16"), &Fence::new("res", 4))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
    assert_eq!(http(&double, "GET", path, None), obj, "nothing written");
    backend
        .fenced_write(pool("p", "10.5.1.0/24"), &Fence::new("res", 5))
        .await
        .expect("the same fence writes again");
    let written = backend
        .fenced_write(pool("p", "10.6.0.0/16"), &Fence::new("res", 6))
        .await
        .expect("a newer fence");
    assert_eq!(
        written.value.as_value().expect("json")["cidr"],
        "10.6.0.0/16"
    );
    let err = backend
        .fenced_write(pool("p", "10.5.0.0/16"), &Fence::new("res", 5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
    let obj = http(&double, "GET", path, None);
    assert_eq!(obj["metadata"]["annotations"][FENCE_ANNOTATION], "6");
    assert_eq!(obj["spec"]["cidr"], "10.6.0.0/16");
}

/// Updates and applies change the spec only: labels, annotations (the fence among them),
/// finalizers and ownerReferences set by other tools stay, and the update's resourceVersion
/// is still a precondition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_keep_what_other_owners_set() {
    let (double, backend) = start().await;
    let path = "/apis/kvsync.dev/v1/ippools/p";
    let created = backend
        .create(KVPair::new(
            ResourceKey::cluster("IPPool", "p"),
            json!({"cidr": "10.0.0.0/16", "disabled": true}),
        ))
        .await
        .expect("create");
    let others = json!({"metadata": {
        "labels": {"team": "net"},
        "annotations": {"owner": "someone-else"},
        "finalizers": ["example.com/cleanup"],
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "cm", "uid": "u-1"}]
    }});
    http_as(
        &double,
        "PATCH",
        path,
        "application/merge-patch+json",
        Some(&others),
    );
    let mut stale = created.clone();
    stale.value = json!({"cidr": "10.1.0.0/16"}).into();
    let err = backend.update(stale).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    let current = backend
        .get(&created.key, &Default::default())
        .await
        .expect("get");
    let mut next = current;
    next.value = json!({"cidr": "10.1.0.0/16"}).into();
    backend
        .update(next)
        .await
        .expect("update at the current revision");
    backend
        .apply(KVPair::new(
            created.key.clone(),
            json!({"cidr": "10.2.0.0/16"}),
        ))
        .await
        .expect("apply");
    let obj = http(&double, "GET", path, None);
    assert_eq!(
        obj["spec"],
        json!({"cidr": "10.2.0.0/16"}),
        "the spec is replaced whole"
    );
    for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
        assert_eq!(
            obj["metadata"][field], others["metadata"][field],
            "{field} kept"
        );
    }
}

/// A write into a namespace that does not exist says so (not NotFound of the key), and so does
/// a lock whose Lease namespace is missing: an error at once, not a wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_namespace_is_named_as_such() {
    let (double, backend) = start().await;
    double.require_namespaces();
    let err = backend
        .create(KVPair::new(
            ResourceKey::namespaced("NetworkPolicy", "nope", "p"),
            json!({"order": 1.0, "selector": "all()"}),
        ))
        .await
        .unwrap_err();
    match &err {
        Error::Invalid { field, reason } => {
            assert_eq!(field, "namespace");
            assert!(reason.contains("\"nope\" does not exist"), "{reason}");
        }
        other => panic!("{other}"),
    }
    let client: Arc<dyn Client> = backend;
    let err = lock(
        client,
        "ctl",
        &LockOptions::new().with_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { reason, .. } if reason.contains("\"default\" does not exist")),
        "{err}"
    );
}
