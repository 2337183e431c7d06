//! Snapshots across backends: saved from one datastore, restored into an empty one of each
//! other kind, and saved again, every copy equal; a restore refuses a non-empty target, goes
//! on with `Resume`, and rejects a snapshot cut short without writing a thing.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvsync_backend::Client;
use kvsync_backend::snapshot::{self, Existing, RestoreOptions};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_tests::etcd::EtcdTestBackend;
use kvsync_tests::harness::{MemoryTestBackend, TestBackend};
use kvsync_tests::kubernetes::KubeDoubleTestBackend;
use kvsync_tests::sqlite::SqliteTestBackend;
use serde_json::{Value, json};

const KINDS: [&str; 3] = ["IPPool", "NetworkPolicy", "Node"];

/// What a datastore holds, with every number as a float: the API server gives a whole float
/// back without its fraction (`1.0` -> `1`), as its Go JSON round trip does, which is the same
/// number to every typed reader.
async fn state(c: &dyn Client) -> BTreeMap<ResourceKey, Value> {
    fn floats(v: &mut Value) {
        match v {
            Value::Number(n) => {
                if let Some(f) = n.as_f64().and_then(serde_json::Number::from_f64) {
                    *n = f;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(floats),
            Value::Object(map) => map.values_mut().for_each(floats),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    for kind in KINDS {
        for kvp in c.list(&ListOptions::new(kind)).await.expect("list").items {
            let mut v = kvp.value.as_value().expect("json").clone();
            floats(&mut v);
            out.insert(kvp.key, v);
        }
    }
    out
}

async fn seed(c: &dyn Client) {
    for i in 0..150 {
        c.create(KVPair::new(
            ResourceKey::cluster("IPPool", format!("pool-{i}")),
            json!({"cidr": format!("10.{}.{}.0/24", i / 256, i % 256), "natOutgoing": i % 2 == 0}),
        ))
        .await
        .expect("seed pool");
    }
    for ns in ["dev", "prod"] {
        for i in 0..20 {
            c.create(KVPair::new(
                ResourceKey::namespaced("NetworkPolicy", ns, format!("p{i}")),
                json!({"order": f64::from(i), "selector": "all()"}),
            ))
            .await
            .expect("seed policy");
        }
    }
    c.create(KVPair::new(
        ResourceKey::cluster("Node", "node-1"),
        json!({"asn": 64512}),
    ))
    .await
    .expect("seed node");
}

async fn save(c: Arc<dyn Client>) -> Vec<u8> {
    let mut file = Vec::new();
    let summary = snapshot::save(c, &[], &mut file).await.expect("save");
    assert!(summary.left_out.is_empty());
    assert_eq!(summary.count, 191);
    file
}

async fn restore(c: &dyn Client, file: &[u8], opts: &RestoreOptions) -> snapshot::RestoreSummary {
    snapshot::restore(c, snapshot::read(std::io::Cursor::new(file.to_vec())), opts)
        .await
        .expect("restore")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_into_every_other_backend_and_back() {
    let source = MemoryTestBackend.client().await.client;
    seed(&*source).await;
    let expected = state(&*source).await;
    let file = save(source).await;
    let etcd = EtcdTestBackend::shared();
    let kube = KubeDoubleTestBackend::default();
    let targets: Vec<(&str, Arc<dyn Client>)> = vec![
        ("sqlite", SqliteTestBackend.client().await.client),
        ("etcd", etcd.client().await.client),
        ("kubernetes", kube.client().await.client),
    ];
    for (name, target) in targets {
        let summary = restore(&*target, &file, &RestoreOptions::new()).await;
        assert_eq!(summary.written, 191, "{name}");
        assert_eq!(
            summary.atomic,
            name == "sqlite",
            "{name}: one transaction where possible"
        );
        assert_eq!(state(&*target).await, expected, "{name} holds the snapshot");
        // And back: saved from there, restored into a fresh memory store, equal again.
        let again = save(target.clone()).await;
        let back = MemoryTestBackend.client().await.client;
        restore(&*back, &again, &RestoreOptions::new()).await;
        assert_eq!(state(&*back).await, expected, "{name} saved what it holds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_refuses_a_used_target_resumes_and_rejects_a_cut_file() {
    let source = MemoryTestBackend.client().await.client;
    seed(&*source).await;
    let file = save(source.clone()).await;
    for (name, target) in [
        ("sqlite", SqliteTestBackend.client().await.client),
        ("etcd", EtcdTestBackend::shared().client().await.client),
    ] {
        // Cut short: refused at its end, before a thing is written where the restore is one
        // transaction; elsewhere what was written is finished by a resumed run.
        let cut = &file[..file.len() / 2];
        let cut = &cut[..=cut.iter().rposition(|b| *b == b'\n').expect("lines")];
        let err = snapshot::restore(
            &*target,
            snapshot::read(std::io::Cursor::new(cut.to_vec())),
            &RestoreOptions::new(),
        )
        .await
        .expect_err("a cut file is refused");
        assert!(err.to_string().contains("cut short"), "{name}: {err}");
        let written = state(&*target).await.len();
        if name == "sqlite" {
            assert_eq!(written, 0, "sqlite: all or nothing");
        }
        // A used target is refused by default...
        if written > 0 {
            let err = snapshot::restore(
                &*target,
                snapshot::read(std::io::Cursor::new(file.clone())),
                &RestoreOptions::new(),
            )
            .await
            .expect_err("a used target is refused");
            assert!(
                matches!(err, kvsync_backend::Error::AlreadyExists { .. }),
                "{name}: {err}"
            );
        }
        // ...and finished with Resume.
        let resumed = restore(
            &*target,
            &file,
            &RestoreOptions::new().with_existing(Existing::Resume),
        )
        .await;
        assert_eq!(resumed.written + resumed.unchanged, 191, "{name}");
        assert_eq!(resumed.unchanged as usize, written, "{name}");
        assert_eq!(state(&*target).await, state(&*source).await, "{name}");
        // A key changed since: Resume refuses to paper over it, Overwrite replaces it.
        target
            .apply(KVPair::new(
                ResourceKey::cluster("Node", "node-1"),
                json!({"asn": 65000}),
            ))
            .await
            .expect("change");
        let err = snapshot::restore(
            &*target,
            snapshot::read(std::io::Cursor::new(file.clone())),
            &RestoreOptions::new().with_existing(Existing::Resume),
        )
        .await
        .expect_err("a different value is not resumed over");
        assert!(
            matches!(err, kvsync_backend::Error::Conflict { .. }),
            "{name}: {err}"
        );
        restore(
            &*target,
            &file,
            &RestoreOptions::new().with_existing(Existing::Overwrite),
        )
        .await;
        assert_eq!(state(&*target).await, state(&*source).await, "{name}");
    }
}
