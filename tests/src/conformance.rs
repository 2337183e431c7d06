//! The backend conformance suite: every rule of the [`Client`] contract, as plain functions
//! taking a [`TestBackend`]. Each backend's tests call [`conformance_tests!`](crate::conformance_tests).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvsync_backend::{Capabilities, Client, Error, WatchEvent, WatchStream};
use kvsync_model::{KVPair, ListOptions, ResourceKey, Revision};
use serde_json::{Value, json};

use crate::harness::TestBackend;

/// How long a test waits for a watch event before failing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

fn pool_key(name: &str) -> ResourceKey {
    ResourceKey::cluster("IPPool", name)
}

fn pool(name: &str, cidr: &str) -> KVPair {
    KVPair::new(pool_key(name), json!({"cidr": cidr, "blockSize": 26}))
}

fn policy(ns: &str, name: &str, order: f64) -> KVPair {
    KVPair::new(
        ResourceKey::namespaced("NetworkPolicy", ns, name),
        json!({"order": order, "selector": "all()"}),
    )
}

/// The next event of a watch, failing the test after [`EVENT_TIMEOUT`].
///
/// # Panics
/// When no event arrives in time, the stream ends, or it yields an error.
pub async fn next_event(w: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(EVENT_TIMEOUT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {EVENT_TIMEOUT:?}"),
    }
}

/// Skips bookmarks.
async fn next_change(w: &mut WatchStream) -> WatchEvent {
    loop {
        match next_event(w).await {
            WatchEvent::Bookmark(_) => {}
            ev => return ev,
        }
    }
}

fn rev_num(r: &Option<Revision>) -> Option<u64> {
    r.as_ref().and_then(Revision::as_u64)
}

/// How many keys of `kind` the client lists.
async fn count(c: &dyn Client, kind: &str) -> usize {
    c.list(&ListOptions::new(kind)).await.unwrap().items.len()
}

fn names(items: &[KVPair]) -> Vec<String> {
    items.iter().map(|k| k.key.name.clone()).collect()
}

/// create stores a new key with a revision and uid, and refuses an existing one.
pub async fn create_assigns_revision_and_uid_and_refuses_duplicates(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let created = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    assert!(created.revision.is_some(), "create returns a revision");
    assert!(
        created.uid.as_deref().is_some_and(|u| !u.is_empty()),
        "create returns a uid"
    );
    assert_eq!(created.value.as_value().unwrap()["cidr"], "10.0.0.0/16");

    let got = c
        .get(&pool_key("a"), &kvsync_model::GetOptions::new())
        .await
        .unwrap();
    assert_eq!(got.revision, created.revision);
    assert_eq!(got.uid, created.uid);
    assert_eq!(got.value, created.value);

    let err = c.create(pool("a", "10.1.0.0/16")).await.unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists { key } if *key == pool_key("a")),
        "{err}"
    );
    assert_eq!(cidr_of(&*c, &pool_key("a")).await, "10.0.0.0/16");
}

/// update needs the key, honours a revision precondition and keeps uid and create revision.
pub async fn update_checks_existence_and_revision(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let err = c.update(pool("a", "10.0.0.0/16")).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { key } if *key == pool_key("a")),
        "{err}"
    );
    assert!(
        c.get(&pool_key("a"), &kvsync_model::GetOptions::new())
            .await
            .is_err(),
        "failed update wrote nothing"
    );

    let v1 = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let mut next = pool("a", "10.1.0.0/16");
    next.revision = v1.revision.clone();
    let v2 = c.update(next.clone()).await.unwrap();
    assert_ne!(v2.revision, v1.revision);
    assert_eq!(v2.uid, v1.uid, "update keeps the uid");
    if v1.create_revision.is_some() {
        assert_eq!(
            v2.create_revision, v1.create_revision,
            "update keeps the create revision"
        );
    }

    // The same precondition again is stale now.
    next.value = json!({"cidr": "10.2.0.0/16"}).into();
    let err = c.update(next).await.unwrap_err();
    match &err {
        Error::Conflict {
            key,
            expected,
            actual,
        } => {
            assert_eq!(*key, pool_key("a"));
            assert_eq!(expected.as_ref(), v1.revision.as_ref());
            assert_eq!(
                actual.as_ref(),
                v2.revision.as_ref(),
                "conflict carries the actual revision"
            );
        }
        other => panic!("expected Conflict, got {other}"),
    }
    assert_eq!(cidr_of(&*c, &pool_key("a")).await, "10.1.0.0/16");

    // Without a revision, update is unconditional.
    let v3 = c.update(pool("a", "10.3.0.0/16")).await.unwrap();
    assert_eq!(v3.uid, v1.uid);
    assert_eq!(cidr_of(&*c, &pool_key("a")).await, "10.3.0.0/16");
}

/// A delete with a uid precondition removes the key only while it is the same object: after
/// the key was deleted and created again, the old uid is a conflict and nothing is deleted.
pub async fn delete_with_a_uid_removes_only_that_object(b: &dyn TestBackend) {
    use kvsync_model::DeleteOptions;
    let c = b.client().await.client;
    let first = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    c.delete(&pool_key("a"), &DeleteOptions::new())
        .await
        .unwrap();
    let second = c.create(pool("a", "10.1.0.0/16")).await.unwrap();
    assert_ne!(first.uid, second.uid, "a re-created key has a new uid");

    let stale = DeleteOptions::new().with_uid(first.uid.clone().unwrap());
    let err = c.delete(&pool_key("a"), &stale).await.unwrap_err();
    match &err {
        Error::Conflict { key, expected, .. } => {
            assert_eq!(*key, pool_key("a"));
            assert_eq!(*expected, None, "no revision was asked for");
        }
        other => panic!("expected Conflict, got {other}"),
    }
    assert!(err.to_string().contains("uid"), "{err}");
    assert!(
        c.get_opt(&pool_key("a"), &kvsync_model::GetOptions::new())
            .await
            .unwrap()
            .is_some(),
        "a failed precondition deletes nothing"
    );

    // Written since (same object, new revision): the uid alone still matches.
    let third = c.apply(pool("a", "10.2.0.0/16")).await.unwrap();
    assert_eq!(third.uid, second.uid);
    let deleted = c
        .delete(
            &pool_key("a"),
            &DeleteOptions::new().with_uid(second.uid.clone().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(deleted.value.as_value().unwrap()["cidr"], "10.2.0.0/16");
    assert_eq!(deleted.revision, third.revision);
    assert_eq!(deleted.uid, second.uid);

    // Both preconditions from a value read before.
    let fourth = c.create(pool("a", "10.3.0.0/16")).await.unwrap();
    let deleted = c
        .delete(&pool_key("a"), &DeleteOptions::matching(&fourth))
        .await
        .unwrap();
    assert_eq!(deleted.uid, fourth.uid);
}

/// get_opt answers `None` for an absent key and the pair for a present one.
pub async fn get_opt_says_absent_with_none(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let opts = kvsync_model::GetOptions::new();
    assert!(c.get_opt(&pool_key("a"), &opts).await.unwrap().is_none());
    let created = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let got = c.get_opt(&pool_key("a"), &opts).await.unwrap().unwrap();
    assert_eq!(got.revision, created.revision);
    // Bad keys are still errors, not `None`.
    let bad = ResourceKey::cluster("IPPool", "Bad_Name");
    assert!(matches!(
        c.get_opt(&bad, &opts).await,
        Err(Error::Invalid { .. })
    ));
}

/// The `cidr` of the pool stored under `key` (which must exist).
async fn cidr_of(c: &dyn Client, key: &ResourceKey) -> Value {
    let kvp = c
        .get(key, &kvsync_model::GetOptions::new())
        .await
        .expect("the key exists");
    kvp.value.as_value().expect("readable JSON")["cidr"].clone()
}

/// apply creates or replaces unconditionally.
pub async fn apply_creates_then_replaces(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let v1 = c.apply(pool("a", "10.0.0.0/16")).await.unwrap();
    let v2 = c.apply(pool("a", "10.1.0.0/16")).await.unwrap();
    assert_eq!(v1.uid, v2.uid);
    assert_ne!(v1.revision, v2.revision);
    let got = c
        .get(&pool_key("a"), &kvsync_model::GetOptions::new())
        .await
        .unwrap();
    assert_eq!(got.value.as_value().unwrap()["cidr"], "10.1.0.0/16");
    assert_eq!(got.revision, v2.revision);
}

/// delete returns the last value, honours a revision precondition, and a re-created key gets
/// a new uid.
pub async fn delete_returns_last_value_and_checks_revision(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let err = c
        .delete(&pool_key("a"), &kvsync_model::DeleteOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { key } if *key == pool_key("a")),
        "{err}"
    );

    let v1 = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let v2 = c.apply(pool("a", "10.1.0.0/16")).await.unwrap();
    let err = c
        .delete(
            &pool_key("a"),
            &v1.revision
                .as_ref()
                .map_or_else(kvsync_model::DeleteOptions::new, |r| {
                    kvsync_model::DeleteOptions::new().with_revision(r.clone())
                }),
        )
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Conflict { .. }), "{err}");
    assert!(
        c.get(&pool_key("a"), &kvsync_model::GetOptions::new())
            .await
            .is_ok(),
        "failed delete removed nothing"
    );

    let deleted = c
        .delete(
            &pool_key("a"),
            &v2.revision
                .as_ref()
                .map_or_else(kvsync_model::DeleteOptions::new, |r| {
                    kvsync_model::DeleteOptions::new().with_revision(r.clone())
                }),
        )
        .await
        .unwrap();
    assert_eq!(deleted.value.as_value().unwrap()["cidr"], "10.1.0.0/16");
    assert_eq!(deleted.revision, v2.revision);
    let err = c
        .get(&pool_key("a"), &kvsync_model::GetOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    let v3 = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    assert_ne!(v3.uid, v1.uid, "a re-created key has a new uid");
}

/// Old revisions can be read until compacted.
pub async fn get_and_list_read_at_old_revisions(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let v1 = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    c.create(pool("b", "10.1.0.0/16")).await.unwrap();
    c.apply(pool("a", "10.2.0.0/16")).await.unwrap();
    c.delete(&pool_key("b"), &kvsync_model::DeleteOptions::new())
        .await
        .unwrap();

    let old = c
        .get(
            &pool_key("a"),
            &kvsync_model::GetOptions::new().at(v1.revision.as_ref().cloned()),
        )
        .await
        .unwrap();
    assert_eq!(old.value.as_value().unwrap()["cidr"], "10.0.0.0/16");
    let list = c
        .list(&ListOptions::new("IPPool").at(v1.revision.as_ref().cloned()))
        .await
        .unwrap();
    assert_eq!(names(&list.items), ["a"]);
    assert_eq!(
        list.items[0].value.as_value().unwrap()["cidr"],
        "10.0.0.0/16"
    );
    assert_eq!(list.revision, v1.revision.clone().unwrap());
}

/// list filters by kind, namespace, exact name and name prefix, in path order, and carries
/// the revision it was read at.
pub async fn list_filters_by_kind_namespace_name_and_prefix(b: &dyn TestBackend) {
    let c = b.client().await.client;
    for (ns, name) in [
        ("a", "p1"),
        ("a", "p2"),
        ("a", "q1"),
        ("b", "p1"),
        ("ab", "p3"),
    ] {
        c.create(policy(ns, name, 1.0)).await.unwrap();
    }
    c.create(pool("p1", "10.0.0.0/16")).await.unwrap();
    let last = c.create(pool("p10", "10.1.0.0/16")).await.unwrap();

    let all = c.list(&ListOptions::new("NetworkPolicy")).await.unwrap();
    let keys: Vec<String> = all.items.iter().map(|k| k.key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "NetworkPolicy(a/p1)",
            "NetworkPolicy(a/p2)",
            "NetworkPolicy(a/q1)",
            "NetworkPolicy(ab/p3)",
            "NetworkPolicy(b/p1)"
        ]
    );
    if let (Some(list_rev), Some(last_rev)) = (all.revision.as_u64(), rev_num(&last.revision)) {
        assert!(
            list_rev >= last_rev,
            "list revision {list_rev} is at least the last write {last_rev}"
        );
    }

    let ns_a = c
        .list(&ListOptions::new("NetworkPolicy").with_namespace("a"))
        .await
        .unwrap();
    assert_eq!(names(&ns_a.items), ["p1", "p2", "q1"]);

    let exact = c
        .list(&ListOptions::new("IPPool").with_name("p1"))
        .await
        .unwrap();
    assert_eq!(
        names(&exact.items),
        ["p1"],
        "an exact name does not match a longer one"
    );

    let prefixed = c
        .list(&ListOptions::new("NetworkPolicy").with_name_prefix("p"))
        .await
        .unwrap();
    assert_eq!(names(&prefixed.items), ["p1", "p2", "p3", "p1"]);

    let prefixed_ns = c
        .list(
            &ListOptions::new("NetworkPolicy")
                .with_namespace("a")
                .with_name_prefix("p"),
        )
        .await
        .unwrap();
    assert_eq!(names(&prefixed_ns.items), ["p1", "p2"]);

    let nodes = c.list(&ListOptions::new("Node")).await.unwrap();
    assert!(nodes.items.is_empty(), "kinds are isolated");

    let err = c
        .list(&ListOptions::new("IPPool").with_namespace("a"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let err = c.list(&ListOptions::new("Gizmo")).await.unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { field, .. } if field == "kind"),
        "{err}"
    );
}

/// A watch from a list's revision sees every later change in order, filtered by its options.
pub async fn watch_from_list_revision_sees_every_change_in_order(b: &dyn TestBackend) {
    let c = b.client().await.client;
    c.create(policy("a", "x", 1.0)).await.unwrap();
    let list = c.list(&ListOptions::new("NetworkPolicy")).await.unwrap();
    let mut w = c
        .watch(&ListOptions::new("NetworkPolicy").with_revision(list.revision.clone()))
        .await
        .unwrap();
    let mut w_ns = c
        .watch(
            &ListOptions::new("NetworkPolicy")
                .with_namespace("b")
                .with_revision(list.revision.clone()),
        )
        .await
        .unwrap();

    c.create(pool("other-kind", "10.0.0.0/16")).await.unwrap();
    let added = c.create(policy("b", "y", 2.0)).await.unwrap();
    let modified = c.apply(policy("a", "x", 3.0)).await.unwrap();
    let deleted = c
        .delete(
            &ResourceKey::namespaced("NetworkPolicy", "b", "y"),
            &kvsync_model::DeleteOptions::new(),
        )
        .await
        .unwrap();

    match next_change(&mut w).await {
        WatchEvent::Added(kvp) => {
            assert_eq!(kvp.key, added.key);
            assert_eq!(kvp.revision, added.revision);
            assert_eq!(kvp.value.as_value().unwrap()["order"], 2.0);
        }
        other => panic!("expected Added, got {other:?}"),
    }
    match next_change(&mut w).await {
        WatchEvent::Modified { new, old } => {
            assert_eq!(new.revision, modified.revision);
            assert_eq!(new.value.as_value().unwrap()["order"], 3.0);
            if let Some(old) = old {
                assert_eq!(old.value.as_value().unwrap()["order"], 1.0);
            }
        }
        other => panic!("expected Modified, got {other:?}"),
    }
    match next_change(&mut w).await {
        WatchEvent::Deleted { key, revision, old } => {
            assert_eq!(key, deleted.key);
            let old = old.expect("a Deleted event carries the previous value");
            assert_eq!(old.value.as_value().unwrap()["order"], 2.0);
            if let (Some(d), Some(m)) = (revision.as_u64(), rev_num(&modified.revision)) {
                assert!(d > m, "revisions increase");
            }
        }
        other => panic!("expected Deleted, got {other:?}"),
    }
    // The namespace-filtered watch sees only namespace b.
    assert!(matches!(next_change(&mut w_ns).await, WatchEvent::Added(k) if k.key.name == "y"));
    assert!(
        matches!(next_change(&mut w_ns).await, WatchEvent::Deleted { key, .. } if key.name == "y")
    );
}

/// A watch from an old revision replays the gap, including keys deleted during it.
pub async fn watch_from_revision_replays_the_gap_with_deletions(b: &dyn TestBackend) {
    let c = b.client().await.client;
    c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let from = c
        .create(pool("b", "10.1.0.0/16"))
        .await
        .unwrap()
        .revision
        .unwrap();
    // The gap: a modified, b deleted, c created then deleted, d created.
    c.apply(pool("a", "10.2.0.0/16")).await.unwrap();
    c.delete(&pool_key("b"), &kvsync_model::DeleteOptions::new())
        .await
        .unwrap();
    c.create(pool("c", "10.3.0.0/16")).await.unwrap();
    c.delete(&pool_key("c"), &kvsync_model::DeleteOptions::new())
        .await
        .unwrap();
    c.create(pool("d", "10.4.0.0/16")).await.unwrap();

    let mut w = c
        .watch(&ListOptions::new("IPPool").with_revision(from.clone()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let ev = next_change(&mut w).await;
        let tag = match &ev {
            WatchEvent::Added(k) => format!("+{}", k.key.name),
            WatchEvent::Modified { new, .. } => format!("~{}", new.key.name),
            WatchEvent::Deleted { key, old, .. } => {
                assert!(
                    old.is_some(),
                    "deleted during the gap still carries its value"
                );
                format!("-{}", key.name)
            }
            other => panic!("unexpected {other:?}"),
        };
        seen.push(tag);
    }
    assert_eq!(seen, ["~a", "-b", "+c", "-c", "+d"]);
}

/// After compaction, reads and watches from before it fail with Compacted.
pub async fn watch_after_compaction_reports_compacted(b: &dyn TestBackend) {
    let tc = b.isolated_client().await;
    let c = tc.client.clone();
    let old = c
        .create(pool("a", "10.0.0.0/16"))
        .await
        .unwrap()
        .revision
        .unwrap();
    c.apply(pool("a", "10.1.0.0/16")).await.unwrap();
    c.apply(pool("a", "10.2.0.0/16")).await.unwrap();
    let newest = c
        .apply(pool("a", "10.3.0.0/16"))
        .await
        .unwrap()
        .revision
        .unwrap();
    tc.raw.compact(c.as_ref(), &newest).await;

    let first_error = match c
        .watch(&ListOptions::new("IPPool").with_revision(old.clone()))
        .await
    {
        Err(e) => e,
        Ok(mut w) => match tokio::time::timeout(EVENT_TIMEOUT, w.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("expected a Compacted error, got {other:?}"),
        },
    };
    assert!(
        matches!(first_error, Error::Compacted { .. }),
        "{first_error}"
    );
    assert!(!first_error.is_retryable());

    if c.capabilities().historical_reads {
        let err = c
            .get(
                &pool_key("a"),
                &kvsync_model::GetOptions::new().with_revision(old.clone()),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Compacted { .. }), "{err}");
    }
    // The current state and watches from the compaction point still work.
    assert_eq!(cidr_of(&*c, &pool_key("a")).await, "10.3.0.0/16");
    let mut w = c
        .watch(&ListOptions::new("IPPool").with_revision(newest.clone()))
        .await
        .unwrap();
    c.apply(pool("a", "10.4.0.0/16")).await.unwrap();
    assert!(matches!(
        next_change(&mut w).await,
        WatchEvent::Modified { .. }
    ));
}

/// A watch from just before a deletion that a compaction at the deletion's own revision
/// covered reports the deletion or Compacted, never nothing (etcd drops tombstones at the
/// compaction revision).
pub async fn watch_from_just_before_a_compacted_deletion_never_misses_it(b: &dyn TestBackend) {
    let tc = b.isolated_client().await;
    let c = tc.client.clone();
    c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let before = c
        .create(pool("b", "10.1.0.0/16"))
        .await
        .unwrap()
        .revision
        .unwrap();
    c.delete(&pool_key("a"), &kvsync_model::DeleteOptions::new())
        .await
        .unwrap();
    let deleted_at = c.current_revision().await.ok();
    let at = deleted_at.clone().unwrap_or_else(|| before.clone());
    tc.raw.compact(c.as_ref(), &at).await;
    let outcome = match c
        .watch(&ListOptions::new("IPPool").with_revision(before.clone()))
        .await
    {
        Err(e) => Err(e),
        Ok(mut w) => match tokio::time::timeout(EVENT_TIMEOUT, w.next()).await {
            Ok(Some(item)) => item,
            other => panic!("neither the deletion nor an error: {other:?}"),
        },
    };
    match outcome {
        Ok(WatchEvent::Deleted { key, .. }) => assert_eq!(key, pool_key("a")),
        Err(Error::Compacted { .. }) => {}
        other => panic!("expected the deletion or Compacted, got {other:?}"),
    }
}

/// A key with a TTL disappears after it, with a Deleted event.
pub async fn ttl_expires_keys_with_a_deleted_event(b: &dyn TestBackend) {
    let c = b.client().await.client;
    if !c.capabilities().ttl {
        let err = c
            .create(pool("a", "10.0.0.0/16").with_ttl(Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(
            c.get(&pool_key("a"), &kvsync_model::GetOptions::new())
                .await
                .is_err(),
            "nothing written"
        );
        return;
    }
    let mut w = c.watch(&ListOptions::new("IPPool")).await.unwrap();
    c.create(pool("keep", "10.1.0.0/16")).await.unwrap();
    let created = c
        .create(pool("a", "10.0.0.0/16").with_ttl(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(created.ttl, Some(Duration::from_secs(1)));
    assert!(matches!(next_change(&mut w).await, WatchEvent::Added(k) if k.key.name == "keep"));
    assert!(matches!(next_change(&mut w).await, WatchEvent::Added(k) if k.key.name == "a"));
    match next_change(&mut w).await {
        WatchEvent::Deleted { key, .. } => assert_eq!(key, pool_key("a")),
        other => panic!("expected the TTL deletion, got {other:?}"),
    }
    let err = c
        .get(&pool_key("a"), &kvsync_model::GetOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let list = c.list(&ListOptions::new("IPPool")).await.unwrap();
    assert_eq!(names(&list.items), ["keep"]);
}

/// 64 writers race on one key with revision preconditions: exactly one wins per revision
/// and the final value is the last winner's.
pub async fn racing_writers_with_preconditions_never_lose_an_update(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let key = ResourceKey::cluster("Node", "counter");
    c.create(KVPair::new(key.clone(), json!({"asn": 1})))
        .await
        .unwrap();
    let rounds = 3;
    let mut tasks = Vec::new();
    for writer in 0..64u32 {
        let c = c.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            for _ in 0..rounds {
                loop {
                    let cur = c.get(&key, &kvsync_model::GetOptions::new()).await.unwrap();
                    let n = cur.value.as_value().unwrap()["asn"].as_u64().unwrap();
                    let next = KVPair::new(key.clone(), json!({"asn": n + 1}))
                        .with_revision(cur.revision.clone().unwrap());
                    match c.update(next).await {
                        Ok(kvp) => {
                            wins.push((n + 1, kvp.revision.unwrap(), writer));
                            break;
                        }
                        Err(Error::Conflict { .. }) => {}
                        Err(e) => panic!("writer {writer}: {e}"),
                    }
                }
            }
            wins
        }));
    }
    let mut wins = Vec::new();
    for t in tasks {
        wins.extend(t.await.unwrap());
    }
    let total = 64 * rounds as u64;
    let values: BTreeSet<u64> = wins.iter().map(|w| w.0).collect();
    assert_eq!(
        values.len() as u64,
        total,
        "every increment won exactly once"
    );
    assert_eq!(
        values,
        (2..=total + 1).collect(),
        "no value was skipped or doubled"
    );
    let revs: BTreeSet<String> = wins.iter().map(|w| w.1.to_string()).collect();
    assert_eq!(revs.len() as u64, total, "one winner per revision");
    let last = c.get(&key, &kvsync_model::GetOptions::new()).await.unwrap();
    let top = wins.iter().max_by_key(|w| w.0).unwrap();
    assert_eq!(
        last.value.as_value().unwrap()["asn"].as_u64(),
        Some(total + 1)
    );
    assert_eq!(
        last.revision.as_ref(),
        Some(&top.1),
        "the final value is the last winner's"
    );
}

/// Values up to 1 MiB round-trip unchanged.
pub async fn large_values_round_trip(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let labels: serde_json::Map<String, Value> = (0..1024)
        .map(|i| (format!("label-{i:04}"), Value::String("x".repeat(1000))))
        .collect();
    let value = json!({ "labels": labels });
    let size = serde_json::to_vec(&value).unwrap().len();
    assert!(size > 1_000_000 && size <= 1 << 20, "value is {size} bytes");
    let key = ResourceKey::cluster("Node", "big");
    c.create(KVPair::new(key.clone(), value.clone()))
        .await
        .unwrap();
    assert_eq!(
        c.get(&key, &kvsync_model::GetOptions::new())
            .await
            .unwrap()
            .value,
        value
    );
    let list = c.list(&ListOptions::new("Node")).await.unwrap();
    assert_eq!(list.items[0].value, value);
}

/// Invalid keys and values are rejected with the field named, and nothing is written.
pub async fn invalid_keys_and_values_are_rejected_and_nothing_is_written(b: &dyn TestBackend) {
    let c = b.client().await.client;
    let cases: Vec<(KVPair, &str)> = vec![
        (
            KVPair::new(
                ResourceKey::cluster("IPPool", "Bad_Name"),
                json!({"cidr": "10.0.0.0/8"}),
            ),
            "name",
        ),
        (
            KVPair::new(
                ResourceKey::cluster("IPPool", "a/b"),
                json!({"cidr": "10.0.0.0/8"}),
            ),
            "name",
        ),
        (
            KVPair::new(
                ResourceKey::cluster("IPPool", "a..b"),
                json!({"cidr": "10.0.0.0/8"}),
            ),
            "name",
        ),
        (
            KVPair::new(
                ResourceKey::cluster("IPPool", ""),
                json!({"cidr": "10.0.0.0/8"}),
            ),
            "name",
        ),
        (
            KVPair::new(
                ResourceKey::cluster("IPPool", "x".repeat(254)),
                json!({"cidr": "10.0.0.0/8"}),
            ),
            "name",
        ),
        (
            KVPair::new(ResourceKey::cluster("Gizmo", "a"), json!({})),
            "kind",
        ),
        (
            KVPair::new(
                ResourceKey::namespaced("IPPool", "ns", "a"),
                json!({"cidr": "10.0.0.0/8"}),
            ),
            "namespace",
        ),
        (
            KVPair::new(ResourceKey::cluster("NetworkPolicy", "a"), json!({})),
            "namespace",
        ),
        (
            KVPair::new(
                ResourceKey::namespaced("NetworkPolicy", "Bad.NS", "a"),
                json!({}),
            ),
            "namespace",
        ),
        (
            KVPair::new(
                ResourceKey::cluster("IPPool", "a"),
                json!({"cidr": "10.0.0.1/8"}),
            ),
            "spec.cidr",
        ),
        (
            KVPair::new(
                ResourceKey::cluster("IPPool", "a"),
                json!({"cidr": "10.0.0.0/8", "bogus": 1}),
            ),
            // The field that failed, by its path.
            "spec.bogus",
        ),
        (
            KVPair::new(ResourceKey::cluster("IPPool", "a"), json!("not an object")),
            "spec",
        ),
    ];
    for (kvp, field) in cases {
        for op in ["create", "apply"] {
            let res = match op {
                "create" => c.create(kvp.clone()).await,
                _ => c.apply(kvp.clone()).await,
            };
            match res {
                Err(Error::Invalid { field: f, reason }) => {
                    assert_eq!(f, field, "{op} {:?}: {reason}", kvp.key);
                    assert!(!reason.is_empty());
                }
                other => panic!(
                    "{op} {:?}: expected Invalid({field}), got {other:?}",
                    kvp.key
                ),
            }
        }
    }
    for kind in ["IPPool", "NetworkPolicy", "Node"] {
        let list = c.list(&ListOptions::new(kind)).await.unwrap();
        assert!(
            list.items.is_empty() && list.parse_failures.is_empty(),
            "nothing written for {kind}"
        );
    }
}

/// Stored bytes that do not decode surface as Parse with the key, from get, list and watch.
pub async fn stored_garbage_surfaces_as_parse_with_the_key(b: &dyn TestBackend) {
    let tc = b.client().await;
    let c = tc.client.clone();
    c.create(pool("good", "10.0.0.0/16")).await.unwrap();
    let mut w = c.watch(&ListOptions::new("IPPool")).await.unwrap();
    let path = c.codec().to_path(&pool_key("bad")).unwrap();
    tc.raw.put_raw(&path, b"{not json").await;

    let raw_bytes = c.capabilities().raw_bytes;
    let err = c
        .get(&pool_key("bad"), &kvsync_model::GetOptions::new())
        .await
        .unwrap_err();
    match &err {
        Error::Parse {
            raw_key, raw_value, ..
        } => {
            assert_eq!(raw_key, &path);
            if raw_bytes {
                assert_eq!(raw_value, b"{not json");
            }
        }
        other => panic!("expected Parse, got {other}"),
    }
    let list = c.list(&ListOptions::new("IPPool")).await.unwrap();
    assert_eq!(
        names(&list.items),
        ["good"],
        "good entries are still listed"
    );
    assert_eq!(list.parse_failures.len(), 1);
    assert_eq!(list.parse_failures[0].key, Some(pool_key("bad")));
    assert_eq!(list.parse_failures[0].raw_key, path);
    match next_change(&mut w).await {
        WatchEvent::ParseFailed(f) => {
            assert_eq!(f.key, Some(pool_key("bad")));
            if raw_bytes {
                assert_eq!(f.raw_value, b"{not json");
            }
        }
        other => panic!("expected ParseFailed, got {other:?}"),
    }
    // The watch goes on after a parse failure.
    c.create(pool("later", "10.1.0.0/16")).await.unwrap();
    assert!(matches!(next_change(&mut w).await, WatchEvent::Added(k) if k.key.name == "later"));
    // The bad entry can be repaired through the client.
    c.apply(pool("bad", "10.2.0.0/16")).await.unwrap();
    assert_eq!(cidr_of(&*c, &pool_key("bad")).await, "10.2.0.0/16");
}

/// clean removes every key under the client's prefix, and only those.
pub async fn clean_removes_only_the_clients_keys(b: &dyn TestBackend) {
    let c1 = b.client().await.client;
    let c2 = b.client().await.client;
    c1.create(pool("a", "10.0.0.0/16")).await.unwrap();
    c1.create(policy("ns", "p", 1.0)).await.unwrap();
    c2.create(pool("a", "10.0.0.0/16")).await.unwrap();
    c1.clean().await.unwrap();
    assert!(
        c1.list(&ListOptions::new("IPPool"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        c1.list(&ListOptions::new("NetworkPolicy"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(count(&*c2, "IPPool").await, 1);
}

/// The client is usable as `Arc<dyn Client>` across tasks.
pub async fn client_is_shareable_across_tasks(b: &dyn TestBackend) {
    let c: Arc<dyn Client> = b.client().await.client;
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.create(pool(&format!("p{i}"), "10.0.0.0/16")).await })
        })
        .collect();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(count(&*c, "IPPool").await, 8);
}

/// A transaction applies the branch its compares choose, all of it, in one step: the right
/// results, the uid kept by a put over an existing key, and watchers see every write.
pub async fn txn_applies_the_chosen_branch_atomically(b: &dyn TestBackend) {
    use kvsync_backend::{Compare, Txn, TxnOp, TxnResult};
    let c = b.client().await.client;
    let a1 = c.create(pool("a", "10.0.0.0/16")).await.unwrap();
    let kept = c.create(pool("kept", "10.9.0.0/16")).await.unwrap();
    let list = c.list(&ListOptions::new("IPPool")).await.unwrap();
    let mut w = c
        .watch(&ListOptions::new("IPPool").with_revision(list.revision.clone()))
        .await
        .unwrap();
    // Move a to b and replace kept, only if a is as read and b is absent.
    let moved = c
        .txn(
            Txn::new()
                .when([
                    Compare::Revision(pool_key("a"), a1.revision.clone().unwrap()),
                    Compare::Absent(pool_key("b")),
                    Compare::Exists(pool_key("kept")),
                    // Values compare as JSON: number spelling and field order do not matter.
                    Compare::Value(
                        pool_key("kept"),
                        json!({"blockSize": 26.0, "cidr": "10.9.0.0/16"}).into(),
                    ),
                ])
                .and_then([
                    TxnOp::Delete(pool_key("a")),
                    TxnOp::Put(pool("b", "10.0.0.0/16")),
                    TxnOp::Put(pool("kept", "10.8.0.0/16")),
                    TxnOp::Delete(pool_key("never-was")),
                ])
                .or_else([TxnOp::Put(pool("other", "10.1.0.0/16"))]),
        )
        .await
        .unwrap();
    assert!(moved.succeeded, "every compare held");
    let [
        TxnResult::Delete(Some(last_a)),
        TxnResult::Put(b1),
        TxnResult::Put(kept2),
        TxnResult::Delete(None),
    ] = moved.results.as_slice()
    else {
        panic!("unexpected results {:?}", moved.results);
    };
    assert_eq!(
        last_a.revision, a1.revision,
        "the delete returns the last value"
    );
    assert_eq!(last_a.uid, a1.uid);
    assert!(
        b1.uid.is_some() && b1.uid != a1.uid,
        "a new key gets a new uid"
    );
    assert_eq!(kept2.uid, kept.uid, "a put over a key keeps its uid");
    assert_eq!(kept2.create_revision, kept.create_revision);
    for put in [b1, kept2] {
        assert!(rev_num(&put.revision) > rev_num(&kept.revision));
        assert!(rev_num(&put.revision) <= moved.revision.as_u64());
    }
    let now = c.list(&ListOptions::new("IPPool")).await.unwrap();
    assert_eq!(names(&now.items), ["b", "kept"]);
    assert_eq!(
        now.items[1].value.as_value().unwrap()["cidr"],
        "10.8.0.0/16"
    );
    // Watchers see the transaction's writes, in the order of its operations.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match next_change(&mut w).await {
            WatchEvent::Deleted { key, .. } => seen.push(format!("deleted {}", key.name)),
            WatchEvent::Added(k) => seen.push(format!("added {}", k.key.name)),
            WatchEvent::Modified { new, .. } => seen.push(format!("modified {}", new.key.name)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["deleted a", "added b", "modified kept"]);

    // The same again: a is gone, so the other branch runs, and only it.
    let again = c
        .txn(
            Txn::new()
                .when([Compare::Revision(
                    pool_key("a"),
                    a1.revision.clone().unwrap(),
                )])
                .and_then([TxnOp::Delete(pool_key("b"))])
                .or_else([TxnOp::Put(pool("other", "10.1.0.0/16"))]),
        )
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert!(matches!(again.results.as_slice(), [TxnResult::Put(k)] if k.key.name == "other"));
    let now = c.list(&ListOptions::new("IPPool")).await.unwrap();
    assert_eq!(names(&now.items), ["b", "kept", "other"]);
    // A value that differs fails its compare; nothing is written by an empty branch.
    let unchanged = c
        .txn(
            Txn::new()
                .when([Compare::Value(
                    pool_key("kept"),
                    json!({"cidr": "10.9.0.0/16", "blockSize": 26}).into(),
                )])
                .and_then([TxnOp::Delete(pool_key("kept"))]),
        )
        .await
        .unwrap();
    assert!(!unchanged.succeeded && unchanged.results.is_empty());
    assert_eq!(count(&*c, "IPPool").await, 3);
}

/// Transactions that race on one counter, each incrementing it under a revision compare:
/// every increment that succeeded is counted once.
pub async fn racing_transactions_never_lose_an_increment(b: &dyn TestBackend) {
    use kvsync_backend::{Compare, Txn, TxnOp};
    let c = b.client().await.client;
    let key = ResourceKey::cluster("Node", "counter");
    c.create(KVPair::new(key.clone(), json!({"asn": 1})))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, key) = (c.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for _ in 0..5 {
                loop {
                    let cur = c.get(&key, &kvsync_model::GetOptions::new()).await.unwrap();
                    let n = cur.value.as_value().unwrap()["asn"].as_u64().unwrap();
                    let resp = c
                        .txn(
                            Txn::new()
                                .when([Compare::Revision(
                                    key.clone(),
                                    cur.revision.clone().unwrap(),
                                )])
                                .and_then([TxnOp::Put(KVPair::new(
                                    key.clone(),
                                    json!({"asn": n + 1}),
                                ))]),
                        )
                        .await
                        .unwrap();
                    if resp.succeeded {
                        won += 1;
                        break;
                    }
                }
            }
            won
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap();
    }
    let last = c.get(&key, &kvsync_model::GetOptions::new()).await.unwrap();
    assert_eq!(won, 40);
    assert_eq!(last.value.as_value().unwrap()["asn"].as_u64(), Some(41));
}

/// A transaction the backend cannot apply whole is refused before anything is written: a bad
/// value (even in the branch that would not run), a key written twice in one branch, more
/// operations than the backend's limit; a backend without transactions says Unsupported.
pub async fn txn_refuses_what_it_cannot_apply_whole_and_writes_nothing(b: &dyn TestBackend) {
    use kvsync_backend::{Compare, Txn, TxnOp};
    let c = b.client().await.client;
    let caps = c.capabilities();
    let before = c.list(&ListOptions::new("IPPool")).await.unwrap();
    let good = TxnOp::Put(pool("good", "10.0.0.0/16"));
    if !caps.transactions {
        let err = c.txn(Txn::new().and_then([good])).await.unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    } else {
        let bad_value = Txn::new()
            .when([Compare::Exists(pool_key("nothing"))])
            .and_then([good.clone()])
            .or_else([TxnOp::Put(pool("bad", "not a cidr"))]);
        let err = c.txn(bad_value).await.unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("cidr"), "names the field: {err}");
        let twice = Txn::new().and_then([good.clone(), TxnOp::Delete(pool_key("good"))]);
        let err = c.txn(twice).await.unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("twice"), "{err}");
        let bad_key = Txn::new().and_then([
            good.clone(),
            TxnOp::Delete(ResourceKey::cluster("IPPool", "Not A Name")),
        ]);
        assert!(matches!(
            c.txn(bad_key).await.unwrap_err(),
            Error::Invalid { .. }
        ));
        if let Some(max) = caps.max_txn_ops {
            let ops = (0..=max).map(|i| TxnOp::Put(pool(&format!("p{i}"), "10.0.0.0/16")));
            let err = c.txn(Txn::new().and_then(ops)).await.unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{err}");
            assert!(err.to_string().contains(&format!("{}", max + 1)), "{err}");
        }
    }
    let after = c.list(&ListOptions::new("IPPool")).await.unwrap();
    assert_eq!(
        names(&after.items),
        names(&before.items),
        "nothing was written"
    );
    // The datastore's revision may move with other clients' writes (a shared etcd), but no
    // item of this client's moved.
    let revisions = |l: &kvsync_model::KVList| -> Vec<(String, Option<Revision>)> {
        l.items
            .iter()
            .map(|k| (k.key.name.clone(), k.revision.clone()))
            .collect()
    };
    assert_eq!(revisions(&after), revisions(&before), "nothing moved");
}

/// A snapshot taken while others write holds the state at its revision: applying every
/// watch event after it (each kind from its own revision) gives exactly the live state.
pub async fn snapshot_then_watch_from_its_revision_misses_nothing(b: &dyn TestBackend) {
    use kvsync_backend::snapshot::{self, SnapshotEntry};
    let c = b.client().await.client;
    for i in 0..20 {
        c.create(pool(&format!("p{i}"), &format!("10.{i}.0.0/16")))
            .await
            .unwrap();
        c.create(policy("ns", &format!("q{i}"), f64::from(i)))
            .await
            .unwrap();
    }
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..60u32 {
                match i % 3 {
                    0 => {
                        let _ = c
                            .delete(
                                &pool_key(&format!("p{}", i / 3)),
                                &kvsync_model::DeleteOptions::new(),
                            )
                            .await;
                    }
                    1 => {
                        c.apply(policy("ns", &format!("q{}", i % 20), f64::from(i) + 0.5))
                            .await
                            .unwrap();
                    }
                    _ => {
                        c.apply(pool(&format!("n{i}"), "10.200.0.0/16"))
                            .await
                            .unwrap();
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let kinds = ["IPPool".to_owned(), "NetworkPolicy".to_owned()];
    let (mut entries, _) = snapshot::entries(c.clone(), &kinds).await.unwrap();
    let mut state: std::collections::BTreeMap<ResourceKey, Value> = Default::default();
    let mut revisions = Vec::new();
    while let Some(entry) = entries.next().await {
        match entry.unwrap() {
            SnapshotEntry::Item(item) => {
                state.insert(item.key(), item.value.as_value().unwrap().clone());
            }
            SnapshotEntry::KindEnd {
                end_of, revision, ..
            } => revisions.push((end_of, revision)),
            _ => {}
        }
    }
    writer.await.unwrap();
    let mut live: std::collections::BTreeMap<ResourceKey, Value> = Default::default();
    for kind in &kinds {
        for kvp in c
            .list(&ListOptions::new(kind.as_str()))
            .await
            .unwrap()
            .items
        {
            live.insert(kvp.key, kvp.value.as_value().unwrap().clone());
        }
    }
    let mut watches = Vec::new();
    for (kind, revision) in revisions {
        watches.push(
            c.watch(&ListOptions::new(kind.as_str()).with_revision(revision))
                .await
                .unwrap(),
        );
    }
    let mut all = futures::stream::select_all(watches);
    while state != live {
        let ev = match tokio::time::timeout(EVENT_TIMEOUT, all.next()).await {
            Ok(Some(Ok(ev))) => ev,
            other => panic!(
                "the snapshot plus its watch did not reach the live state ({other:?}); \
                 {} keys differ",
                state
                    .keys()
                    .chain(live.keys())
                    .filter(|k| state.get(*k) != live.get(*k))
                    .count()
            ),
        };
        match ev {
            WatchEvent::Added(k) | WatchEvent::Modified { new: k, .. } => {
                state.insert(k.key, k.value.as_value().unwrap().clone());
            }
            WatchEvent::Deleted { key, .. } => {
                state.remove(&key);
            }
            WatchEvent::Bookmark(_) => {}
            WatchEvent::ParseFailed(f) => panic!("{f:?}"),
        }
    }
}

/// Keys written under a lease go when it is revoked or expires, each with a Deleted event;
/// keys not under it stay; a key written again without the lease leaves it; a lease that is
/// gone cannot be renewed or written under. Without leases, granting one is Unsupported.
pub async fn lease_keys_go_when_the_lease_is_revoked_or_expires(b: &dyn TestBackend) {
    use kvsync_backend::{Txn, TxnOp};
    let c = b.client().await.client;
    if !c.capabilities().leases {
        let err = c.lease_grant(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        return;
    }
    let put = |kvp: KVPair, lease| Txn::new().and_then([TxnOp::PutLeased(kvp, lease)]);
    let lease = c.lease_grant(Duration::from_secs(30)).await.unwrap();
    for name in ["a", "b", "c", "moved"] {
        c.txn(put(pool(name, "10.0.0.0/16"), lease)).await.unwrap();
    }
    c.create(pool("free", "10.1.0.0/16")).await.unwrap();
    // Written again without the lease: no longer under it.
    c.apply(pool("moved", "10.2.0.0/16")).await.unwrap();
    let list = c.list(&ListOptions::new("IPPool")).await.unwrap();
    let mut w = c
        .watch(&ListOptions::new("IPPool").with_revision(list.revision))
        .await
        .unwrap();
    assert!(c.lease_keep_alive(lease).await.unwrap() >= Duration::from_secs(29));
    c.lease_revoke(lease).await.unwrap();
    let mut gone = BTreeSet::new();
    while gone.len() < 3 {
        match next_change(&mut w).await {
            WatchEvent::Deleted { key, .. } => gone.insert(key.name),
            other => panic!("expected the lease's deletions, got {other:?}"),
        };
    }
    assert_eq!(gone, ["a", "b", "c"].map(String::from).into());
    let left = c.list(&ListOptions::new("IPPool")).await.unwrap();
    assert_eq!(names(&left.items), ["free", "moved"]);
    // A lease that is gone: no renewal, no write under it, and a second revoke is no error.
    let err = c.lease_keep_alive(lease).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    let err = c
        .txn(put(pool("late", "10.3.0.0/16"), lease))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert!(
        c.get_opt(&pool_key("late"), &Default::default())
            .await
            .unwrap()
            .is_none()
    );
    c.lease_revoke(lease).await.unwrap();
    // A lease nobody renews expires by itself, its key with it.
    let short = c.lease_grant(Duration::from_secs(1)).await.unwrap();
    c.txn(put(pool("short", "10.4.0.0/16"), short))
        .await
        .unwrap();
    loop {
        match next_change(&mut w).await {
            WatchEvent::Deleted { key, .. } if key.name == "short" => break,
            WatchEvent::Added(_) | WatchEvent::Bookmark(_) => {}
            other => panic!("expected the expiry, got {other:?}"),
        }
    }
    // Too short a TTL is refused.
    let err = c.lease_grant(Duration::from_millis(10)).await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

/// A [`kvsync_backend::Lease`] keeps itself alive past its TTL; `lost()` fires once the
/// datastore no longer has it; dropping one revokes it.
pub async fn a_kept_lease_outlives_its_ttl_and_says_when_it_is_lost(b: &dyn TestBackend) {
    use kvsync_backend::Lease;
    let c = b.client().await.client;
    if !c.capabilities().leases {
        return;
    }
    let lease = Lease::grant(c.clone(), Duration::from_secs(2))
        .await
        .unwrap();
    lease.put(pool("kept", "10.0.0.0/16")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!lease.is_lost());
    assert!(lease.safe_until() > tokio::time::Instant::now());
    assert!(
        c.get_opt(&pool_key("kept"), &Default::default())
            .await
            .unwrap()
            .is_some()
    );
    // Revoked behind its back: the next keep-alive finds out.
    c.lease_revoke(lease.id()).await.unwrap();
    tokio::time::timeout(EVENT_TIMEOUT, lease.lost())
        .await
        .expect("lost() resolves");
    assert!(lease.is_lost());
    assert!(
        c.get_opt(&pool_key("kept"), &Default::default())
            .await
            .unwrap()
            .is_none()
    );
    // Dropped: revoked, its key gone.
    let other = Lease::grant(c.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    other.put(pool("dropped", "10.1.0.0/16")).await.unwrap();
    drop(other);
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while c
        .get_opt(&pool_key("dropped"), &Default::default())
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a dropped lease is revoked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many claims the lock `name` has.
async fn claims(c: &dyn Client, name: &str) -> usize {
    c.list(&ListOptions::new("Lock").with_namespace(name))
        .await
        .unwrap()
        .items
        .len()
}

/// Waits until the lock `name` has `n` claims.
async fn until_claims(c: &dyn Client, name: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while claims(c, name).await != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never had {n} claims"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A lock is held by one claimant at a time, served in the order of the claims, each holder
/// with a higher fence; a wait times out and withdraws its claim; a holder whose lease is
/// gone cannot write (nothing lands), and its successor can.
pub async fn a_lock_serves_claims_in_order_with_rising_fences(b: &dyn TestBackend) {
    use kvsync_backend::{LockOptions, lock};
    let c = b.client().await.client;
    let opts = LockOptions::new().with_ttl(Duration::from_secs(10));
    let a = lock(c.clone(), "res", &opts.clone().with_holder("a"))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (who, n) in [("b", 2), ("c", 3)] {
        let (c2, tx, opts) = (c.clone(), tx.clone(), opts.clone().with_holder(who));
        tokio::spawn(async move {
            let g = lock(c2, "res", &opts).await.unwrap();
            tx.send((who, g)).unwrap();
        });
        // b claims before c does.
        until_claims(&*c, "res", n).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "nobody else holds it while a does");
    // A wait that times out withdraws its claim.
    let err = lock(
        c.clone(),
        "res",
        &opts.clone().with_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    until_claims(&*c, "res", 3).await;

    let fence_a = a.fence().as_u64().unwrap();
    a.release().await.unwrap();
    let (who, b_guard) = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who, "b", "first come, first served");
    let fence_b = b_guard.fence().as_u64().unwrap();
    assert!(fence_b > fence_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "c waits while b holds it");
    b_guard.put(pool("guarded", "10.0.0.0/16")).await.unwrap();

    // b's lease is revoked behind its back (as if it paused past its TTL): c gets the lock,
    // and b's writes no longer land.
    c.lease_revoke(b_guard.lease_id().unwrap()).await.unwrap();
    let (who, c_guard) = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who, "c");
    assert!(c_guard.fence().as_u64().unwrap() > fence_b);
    let err = b_guard
        .put(pool("guarded", "10.99.0.0/16"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
    c_guard.put(pool("guarded", "10.1.0.0/16")).await.unwrap();
    let stored = c
        .get(&pool_key("guarded"), &Default::default())
        .await
        .unwrap();
    assert_eq!(stored.value.as_value().unwrap()["cidr"], "10.1.0.0/16");
    drop(c_guard);
    until_claims(&*c, "res", 0).await;
}

/// Tasks incrementing one counter under a lock, each write guarded: the count equals the
/// increments made.
pub async fn guarded_increments_under_a_lock_are_all_counted(b: &dyn TestBackend) {
    use kvsync_backend::{LockOptions, lock};
    let c = b.client().await.client;
    let key = ResourceKey::cluster("Node", "counter");
    c.create(KVPair::new(key.clone(), json!({"asn": 1})))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (c, key) = (c.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                let g = lock(
                    c.clone(),
                    "counter",
                    &LockOptions::new().with_holder(format!("task-{t}")),
                )
                .await
                .unwrap();
                let cur = c.get(&key, &Default::default()).await.unwrap();
                let n = cur.value.as_value().unwrap()["asn"].as_u64().unwrap();
                g.put(KVPair::new(key.clone(), json!({"asn": n + 1})))
                    .await
                    .unwrap();
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let last = c.get(&key, &Default::default()).await.unwrap();
    assert_eq!(last.value.as_value().unwrap()["asn"].as_u64(), Some(21));
}

/// Two candidates: one leads at a time, `observe` follows who does, the second leads once the
/// first's work is done, with a higher fence; the first's writes are refused after its term.
pub async fn an_election_has_one_leader_at_a_time_and_observe_follows_it(b: &dyn TestBackend) {
    use kvsync_backend::{Election, ElectionOptions};
    let c = b.client().await.client;
    let options = ElectionOptions::new()
        .with_timing(
            Duration::from_secs(3),
            Duration::from_secs(2),
            Duration::from_millis(200),
        )
        .unwrap();
    let a = Election::new(c.clone(), "ctl", "a", options.clone());
    let b2 = Election::new(c.clone(), "ctl", "b", options);
    let mut observed = a.observe();
    assert_eq!(
        tokio::time::timeout(EVENT_TIMEOUT, observed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        None,
        "nobody leads yet"
    );
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (led_tx, led_rx) = tokio::sync::oneshot::channel();
    let slots = Arc::new(std::sync::Mutex::new((Some(led_tx), Some(done_rx))));
    let a_task = tokio::spawn(async move {
        a.run(|leadership| {
            let (led_tx, done_rx) = {
                let mut s = slots.lock().unwrap();
                (s.0.take(), s.1.take())
            };
            async move {
                if let Some(tx) = led_tx {
                    let _ = tx.send(leadership.clone());
                }
                if let Some(rx) = done_rx {
                    let _ = rx.await;
                }
                Ok(leadership.fence().as_u64().unwrap())
            }
        })
        .await
    });
    let a_term = tokio::time::timeout(EVENT_TIMEOUT, led_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        tokio::time::timeout(EVENT_TIMEOUT, observed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Some("a".to_owned())
    );
    let b_task = tokio::spawn(async move {
        b2.run(|leadership| async move { Ok(leadership.fence().as_u64().unwrap()) })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b_task.is_finished(), "b does not lead while a does");
    a_term.put(pool("by-leader", "10.0.0.0/16")).await.unwrap();
    done_tx.send(()).unwrap();
    let fence_a = a_task.await.unwrap().unwrap();
    let fence_b = tokio::time::timeout(EVENT_TIMEOUT, b_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(fence_b > fence_a, "the second term's fence is higher");
    // The first term is over: its leadership's writes are refused.
    let err = a_term
        .put(pool("by-leader", "10.9.0.0/16"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotHeld { .. }), "{err}");
    // Both terms are over: observe comes to "nobody" (it may skip b's short term).
    let mut seen = Vec::new();
    while seen.last() != Some(&None) {
        let who = tokio::time::timeout(EVENT_TIMEOUT, observed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(who);
    }
    assert!(
        seen.iter().flatten().all(|w| w == "b"),
        "after a, only b led: {seen:?}"
    );
}

/// Calls `$callback!` with the names of every conformance check, so that the list is written
/// once.
#[macro_export]
macro_rules! with_conformance_checks {
    ($callback:ident ! ($($args:tt)*)) => {
        $crate::$callback!($($args)*;
            create_assigns_revision_and_uid_and_refuses_duplicates: Nothing,
            update_checks_existence_and_revision: Nothing,
            apply_creates_then_replaces: Nothing,
            delete_returns_last_value_and_checks_revision: Nothing,
            delete_with_a_uid_removes_only_that_object: Nothing,
            get_opt_says_absent_with_none: Nothing,
            get_and_list_read_at_old_revisions: HistoricalReads,
            list_filters_by_kind_namespace_name_and_prefix: Nothing,
            watch_from_list_revision_sees_every_change_in_order: Nothing,
            watch_from_revision_replays_the_gap_with_deletions: Nothing,
            watch_after_compaction_reports_compacted: Compaction,
            watch_from_just_before_a_compacted_deletion_never_misses_it: Compaction,
            ttl_expires_keys_with_a_deleted_event: Nothing,
            racing_writers_with_preconditions_never_lose_an_update: Nothing,
            large_values_round_trip: Nothing,
            invalid_keys_and_values_are_rejected_and_nothing_is_written: Nothing,
            stored_garbage_surfaces_as_parse_with_the_key: UndecodableEntries,
            clean_removes_only_the_clients_keys: Nothing,
            client_is_shareable_across_tasks: Nothing,
            txn_applies_the_chosen_branch_atomically: Transactions,
            racing_transactions_never_lose_an_increment: Transactions,
            txn_refuses_what_it_cannot_apply_whole_and_writes_nothing: Nothing,
            snapshot_then_watch_from_its_revision_misses_nothing: Nothing,
            lease_keys_go_when_the_lease_is_revoked_or_expires: Nothing,
            a_kept_lease_outlives_its_ttl_and_says_when_it_is_lost: Leases,
            a_lock_serves_claims_in_order_with_rising_fences: Leases,
            guarded_increments_under_a_lock_are_all_counted: Locks,
            an_election_has_one_leader_at_a_time_and_observe_follows_it: Locks,
        )
    };
}

/// Runs every conformance check named after `;` one after another against `$b` (a
/// `&dyn TestBackend`), printing each name, and skipping (with a line saying so) the checks
/// whose [`Needs`] the backend does not meet; for [`with_conformance_checks!`].
#[macro_export]
macro_rules! conformance_sequence {
    ($b:expr; $($name:ident: $needs:ident),* $(,)?) => {
        let caps = $crate::TestBackend::client($b).await.client.capabilities();
        $(
            match $crate::conformance::Needs::$needs.unmet($b, &caps) {
                Some(why) => println!("conformance: {} skipped: {why}", stringify!($name)),
                None => {
                    println!("conformance: {}", stringify!($name));
                    $crate::conformance::$name($b).await;
                }
            }
        )*
    };
}

/// The conformance checks as a list: name, what each needs, and the check.
#[macro_export]
macro_rules! conformance_list {
    (; $($name:ident: $needs:ident),* $(,)?) => {
        vec![$(
            $crate::conformance::Check {
                name: stringify!($name),
                needs: $crate::conformance::Needs::$needs,
                run: |b| Box::pin($crate::conformance::$name(b)),
            },
        )*]
    };
}

/// The conformance suite as a test binary's `main` (a `[[test]]` with `harness = false`):
/// one test per check against the backend `make` builds, run on a runtime of its own. A
/// check whose [`Needs`] the backend does not meet is reported as ignored, with the reason,
/// never counted as passed. Takes the usual test-harness arguments (filters, `--list`, ...).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        fn main() -> std::process::ExitCode {
            $crate::conformance::run_suite(|| $make)
        }
    };
}

/// One conformance check: see [`conformance_tests!`].
pub struct Check {
    /// The check's name (its function's).
    pub name: &'static str,
    /// What the backend must be able to do for the check to apply.
    pub needs: Needs,
    /// The check.
    pub run: for<'a> fn(&'a dyn TestBackend) -> futures::future::BoxFuture<'a, ()>,
}

/// What a conformance check needs beyond the contract every backend keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Nothing more.
    Nothing,
    /// Reads at old revisions ([`kvsync_backend::Capabilities::historical_reads`]).
    HistoricalReads,
    /// History that a test can drop ([`TestBackend::can_compact`]: the client's compaction,
    /// or the datastore's own, as the API server double forgetting its watch window).
    Compaction,
    /// Multi-key transactions ([`kvsync_backend::Capabilities::transactions`]).
    Transactions,
    /// Leases ([`kvsync_backend::Capabilities::leases`]).
    Leases,
    /// Locks and elections ([`kvsync_backend::Capabilities::locks`]).
    Locks,
    /// Raw access that can store entries the client cannot decode
    /// ([`TestBackend::can_store_undecodable`]).
    UndecodableEntries,
}

impl Needs {
    /// Why `b` (whose clients can do `caps`) cannot run a check that needs this, or `None`
    /// when it can.
    pub fn unmet(self, b: &dyn TestBackend, caps: &Capabilities) -> Option<&'static str> {
        match self {
            Needs::Nothing => None,
            Needs::HistoricalReads if !caps.historical_reads => {
                Some("the backend cannot read at old revisions")
            }
            // Through the backend's raw access (the API server double forgets its watch window
            // instead of compacting), not only through the client.
            Needs::Compaction if !b.can_compact() => {
                Some("this datastore's history cannot be compacted from a test")
            }
            Needs::Leases if !caps.leases => Some("the datastore has no leases"),
            Needs::Locks if !caps.locks => Some("the datastore has no locks"),
            Needs::Transactions if !caps.transactions => {
                Some("the datastore has no multi-key transactions")
            }
            Needs::UndecodableEntries if !b.can_store_undecodable() => {
                Some("this datastore refuses entries its clients cannot decode")
            }
            _ => None,
        }
    }
}

/// Every conformance check.
pub fn checks() -> Vec<Check> {
    crate::with_conformance_checks!(conformance_list!())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs the conformance suite against the backends `make` builds: see
/// [`conformance_tests!`].
pub fn run_suite<B, F>(make: F) -> std::process::ExitCode
where
    B: TestBackend + 'static,
    F: Fn() -> B + Send + Sync + 'static,
{
    let args = libtest_mimic::Arguments::from_args();
    let make = Arc::new(make);
    // Which checks apply is decided once, from a backend like the ones the checks get.
    let unmet: Vec<Option<&'static str>> = {
        let probe = make();
        let caps = runtime().block_on(probe.client()).client.capabilities();
        checks()
            .iter()
            .map(|c| c.needs.unmet(&probe, &caps))
            .collect()
    };
    let trials = checks()
        .into_iter()
        .zip(unmet)
        .map(|(check, unmet)| {
            let make = make.clone();
            let name = match unmet {
                Some(why) => format!("{} (skipped: {why})", check.name),
                None => check.name.to_owned(),
            };
            libtest_mimic::Trial::test(name, move || {
                let backend = make();
                runtime().block_on((check.run)(&backend));
                Ok(())
            })
            .with_ignored_flag(unmet.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
