//! Your own kinds, end to end: two kinds defined with `#[derive(Resource)]`, written and read
//! through the memory and SQLite backends (and etcd when an `etcd` binary is installed),
//! followed by a Syncer into a map, and their CRDs printed.
//!
//! Run with `cargo run -p kvsync-tests --example own_kinds`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvsync_backend::etcd::{EtcdBackend, EtcdConfig};
use kvsync_backend::sqlite::{SqliteBackend, SqliteConfig};
use kvsync_backend::{Api, Client, Error, MemoryBackend};
use kvsync_model::{KindInfo, Registry, Resource, ResourceKey, Validate, crd};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A customer of the platform: cluster-scoped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Resource)]
#[resource(
    group = "platform.example.com",
    kind = "Tenant",
    plural = "tenants",
    shortname = "tn"
)]
#[serde(rename_all = "camelCase")]
struct Tenant {
    /// Who to call.
    owner: String,
    /// How many projects the tenant may have.
    #[serde(default)]
    max_projects: u32,
}

impl Validate for Tenant {
    fn validate(&self) -> kvsync_model::Result<()> {
        if !self.owner.contains('@') {
            return Err(kvsync_model::Error::invalid(
                "spec.owner",
                format!("{:?} is not an e-mail address", self.owner),
            ));
        }
        Ok(())
    }
}

/// A tenant's project: lives in the tenant's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Resource)]
#[resource(
    group = "platform.example.com",
    version = "v1alpha1",
    namespaced,
    shortname = "proj"
)]
struct Project {
    /// The container image the project runs.
    image: String,
    /// How many copies.
    replicas: u16,
}

/// Writes, reads, updates and deletes through the typed API, then follows both kinds with a
/// Syncer into a map and checks the map against the datastore.
async fn exercise(client: Arc<dyn Client>) -> Result<(), Box<dyn std::error::Error>> {
    println!("== {} ==", client.backend_name());
    let tenants = Api::<Tenant>::all(client.clone());
    let projects = Api::<Project>::namespaced(client.clone(), "acme");

    let acme = tenants
        .create(
            "acme",
            Tenant {
                owner: "ops@acme.example".into(),
                max_projects: 3,
            },
        )
        .await?;
    println!("created {} at revision {:?}", acme.key, acme.revision);

    // Validation is the type's own: a bad owner is refused and nothing is written.
    let err = tenants
        .create(
            "bad",
            Tenant {
                owner: "nobody".into(),
                max_projects: 1,
            },
        )
        .await
        .expect_err("an owner without @ is refused");
    println!("refused: {err}");
    assert!(tenants.get_opt("bad").await?.is_none());

    // A Syncer follows both kinds from here on.
    let mut events = Syncer::new(client.clone())
        .with_resource(ResourceType::of::<Tenant>())
        .with_resource(ResourceType::of::<Project>())
        .stream();

    for (name, image) in [("web", "nginx:1.27"), ("api", "acme/api:2.1")] {
        projects
            .create(
                name,
                Project {
                    image: image.into(),
                    replicas: 2,
                },
            )
            .await?;
    }
    // Optimistic concurrency: update what was read; a stale revision is a conflict.
    let mut web = projects.get("web").await?;
    web.value.replicas = 5;
    let stale = web.clone();
    projects.update(web).await?;
    assert!(matches!(
        projects.update(stale).await,
        Err(Error::Conflict { .. })
    ));
    projects.delete("api").await?;

    // Apply every batch to a map. The writes above raced the Syncer's first list, so InSync may
    // come before all of them are seen: after InSync, wait for the map to hold what was written.
    let mut cache: BTreeMap<ResourceKey, serde_json::Value> = BTreeMap::new();
    let mut in_sync = false;
    let caught_up = |cache: &BTreeMap<ResourceKey, serde_json::Value>| {
        cache.len() == 2
            && cache
                .iter()
                .any(|(k, v)| k.name == "web" && v["replicas"] == 5)
    };
    while !(in_sync && caught_up(&cache)) {
        let ev = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .map_err(|_| "the Syncer did not catch up within 30 s")?
            .ok_or("the Syncer stopped")?;
        match ev {
            SyncerEvent::Updates(batch) => {
                for u in batch {
                    match u.update_type {
                        UpdateType::Deleted => {
                            cache.remove(&u.kvp.key);
                        }
                        UpdateType::New | UpdateType::Updated => {
                            let value = u.kvp.value.into_value()?;
                            cache.insert(u.kvp.key, value);
                        }
                    }
                }
            }
            SyncerEvent::Status(SyncStatus::InSync) => in_sync = true,
            _ => {}
        }
    }
    events.stop().await;
    let listed = projects.list().await?;
    assert_eq!(listed.items.len(), 1);
    assert!(listed.parse_failures.is_empty());
    assert_eq!(listed.items[0].value.replicas, 5);
    println!(
        "the Syncer's map holds {} resources, as the datastore does: {:?}",
        cache.len(),
        cache.keys().map(ToString::to_string).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The registry holds your kinds and nothing else.
    let registry = Arc::new(Registry::new().with::<Tenant>().with::<Project>());

    exercise(Arc::new(MemoryBackend::new(registry.clone()))).await?;

    let dir = tempfile::tempdir()?;
    let sqlite = SqliteBackend::open(SqliteConfig::new(
        dir.path().join("own.db"),
        registry.clone(),
    ))?;
    exercise(Arc::new(sqlite)).await?;

    // etcd, when a server can be started here (Debian's etcd-server).
    if std::path::Path::new(&kvsync_tests::etcd::etcd_binary()).exists() {
        let cluster = kvsync_tests::etcd::EtcdCluster::start();
        let etcd =
            EtcdBackend::connect(EtcdConfig::new(cluster.endpoints(), registry.clone())).await?;
        exercise(Arc::new(etcd)).await?;
    } else {
        println!("== etcd == skipped: no etcd binary");
    }

    println!("\n# The CRDs of your kinds (kvsync crds prints the same for the registry it serves)");
    for info in registry.kinds() {
        print_crd(info)?;
    }
    Ok(())
}

fn print_crd(info: &KindInfo) -> Result<(), serde_yaml_ng::Error> {
    println!("---\n{}", serde_yaml_ng::to_string(&crd::crd(info))?);
    Ok(())
}
