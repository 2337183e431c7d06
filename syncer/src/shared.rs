//! A shared store in the style of Cilium's `SharedStore`: every process publishes its own keys
//! under one lease and follows everyone's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kvsync_backend::{Client, Error, Lease, Result, WatchEvent};
use kvsync_model::{Json, KVPair, ListOptions, ResourceKey};
use tokio::task::JoinHandle;

use crate::{ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};

/// What a [`SharedStore`] tells about everyone's keys, called from its task in the order the
/// changes happened.
pub trait SharedObserver: Send + 'static {
    /// A key was added or changed.
    fn on_update(&mut self, kvp: &KVPair);
    /// A key was deleted (its owner deleted it, or its owner's lease ran out).
    fn on_delete(&mut self, key: &ResourceKey);
}

/// An observer that does nothing (read the store with [`SharedStore::shared`]).
impl SharedObserver for () {
    fn on_update(&mut self, _: &KVPair) {}
    fn on_delete(&mut self, _: &ResourceKey) {}
}

type Local = Arc<Mutex<BTreeMap<ResourceKey, Json>>>;
type Shared = Arc<Mutex<BTreeMap<ResourceKey, KVPair>>>;
/// The current lease; replaced when it is lost.
type LeaseCell = Arc<Mutex<Arc<Lease>>>;

fn current(cell: &LeaseCell) -> Arc<Lease> {
    cell.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// This process's own keys of one resource type (local keys), written under one lease it
/// keeps alive, and everyone's keys of that type (shared keys), followed through a Syncer.
///
/// - A local key that someone else deletes is written again at once.
/// - When the lease is lost (the datastore was out of reach past its TTL), a new one is
///   granted and every local key written again under it.
/// - When the store is dropped its lease is revoked: its keys go from everyone's view.
/// - [`synced`](SharedStore::synced) resolves once the shared keys' initial state is in.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kvsync_backend::{Client, MemoryBackend};
/// use kvsync_model::{KVPair, ResourceKey};
/// use kvsync_syncer::{ResourceType, SharedStore};
///
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
/// let nodes = SharedStore::start(client, ResourceType::new(kvsync_model::ListOptions::new("Node")), Duration::from_secs(10), ()).await?;
/// nodes.update_local(KVPair::new(ResourceKey::cluster("Node", "node-1"), serde_json::json!({"asn": 64512}))).await?;
/// nodes.synced().await;
/// # Ok(()) }
/// ```
pub struct SharedStore {
    client: Arc<dyn Client>,
    local: Local,
    shared: Shared,
    lease: LeaseCell,
    synced: tokio::sync::watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("local", &self.local_keys())
            .finish_non_exhaustive()
    }
}

impl SharedStore {
    /// Starts the store for the keys `resource` covers: grants a lease of `ttl` for the local
    /// keys and starts following everyone's, telling `observer` of each change.
    ///
    /// # Errors
    /// [`Error::Unsupported`] where the backend has no leases; transport errors.
    pub async fn start(
        client: Arc<dyn Client>,
        resource: ResourceType,
        ttl: Duration,
        observer: impl SharedObserver,
    ) -> Result<SharedStore> {
        let lease: LeaseCell = Arc::new(Mutex::new(Arc::new(
            Lease::grant(client.clone(), ttl).await?,
        )));
        let local: Local = Arc::default();
        let shared: Shared = Arc::default();
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let follower = tokio::spawn(follow(
            client.clone(),
            resource.clone(),
            shared.clone(),
            synced_tx,
            observer,
        ));
        let keeper = tokio::spawn(keep_local(
            client.clone(),
            resource.options.clone(),
            ttl,
            local.clone(),
            lease.clone(),
        ));
        Ok(SharedStore {
            client,
            local,
            shared,
            lease,
            synced,
            tasks: vec![follower, keeper],
        })
    }

    /// Writes a local key (creating or replacing it) under the store's lease, and keeps it.
    ///
    /// # Errors
    /// As [`Lease::put`]; the key is kept and written again when the lease is renewed.
    pub async fn update_local(&self, kvp: KVPair) -> Result<KVPair> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(kvp.key.clone(), kvp.value.clone());
        current(&self.lease).put(kvp).await
    }

    /// Deletes a local key and stops keeping it.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn delete_local(&self, key: &ResourceKey) -> Result<()> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        match self.client.delete(key, &Default::default()).await {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The lease the local keys are written under now.
    pub fn lease_id(&self) -> kvsync_backend::LeaseId {
        current(&self.lease).id()
    }

    /// The local keys.
    pub fn local_keys(&self) -> Vec<ResourceKey> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Everyone's keys, as last seen.
    pub fn shared(&self) -> BTreeMap<ResourceKey, KVPair> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Resolves once the shared keys' initial state is in (the Syncer's first InSync).
    pub async fn synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

impl Drop for SharedStore {
    /// Stops following and keeping; the lease is revoked (in the background), so the local
    /// keys go from everyone's view.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn follow(
    client: Arc<dyn Client>,
    resource: ResourceType,
    shared: Shared,
    synced: tokio::sync::watch::Sender<bool>,
    mut observer: impl SharedObserver,
) {
    let mut events = Syncer::new(client).with_resource(resource).stream();
    while let Some(ev) = events.next().await {
        match ev {
            SyncerEvent::Updates(batch) => {
                for u in batch {
                    let mut map = shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match u.update_type {
                        UpdateType::Deleted => {
                            map.remove(&u.kvp.key);
                            drop(map);
                            observer.on_delete(&u.kvp.key);
                        }
                        UpdateType::New | UpdateType::Updated => {
                            map.insert(u.kvp.key.clone(), u.kvp.clone());
                            drop(map);
                            observer.on_update(&u.kvp);
                        }
                    }
                }
            }
            SyncerEvent::Status(SyncStatus::InSync) => {
                synced.send_replace(true);
            }
            _ => {}
        }
    }
}

/// Writes every local key under `lease`; whether all were written.
async fn write_all(local: &Local, lease: &Lease) -> bool {
    let keys: Vec<(ResourceKey, Json)> = local
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut all = true;
    for (k, v) in keys {
        all &= lease.put(KVPair::new(k, v)).await.is_ok();
    }
    all
}

/// Keeps the local keys: writes back one someone deleted, and after a lost lease grants a
/// new one and writes them all again.
async fn keep_local(
    client: Arc<dyn Client>,
    opts: ListOptions,
    ttl: Duration,
    local: Local,
    lease: LeaseCell,
) {
    let retry = (ttl / 10).max(Duration::from_millis(100));
    loop {
        let mut watch = match client.watch(&opts).await {
            Ok(w) => w,
            Err(_) => {
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        loop {
            let held = current(&lease);
            tokio::select! {
                ev = watch.next() => match ev {
                    Some(Ok(WatchEvent::Deleted { key, .. })) => {
                        let value = local
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(&key)
                            .cloned();
                        if let Some(value) = value {
                            // Someone deleted one of ours: write it again.
                            let _ = held.put(KVPair::new(key, value)).await;
                        }
                    }
                    Some(Ok(_)) => {}
                    // A broken watch: watch again (writing everything, in case a delete was
                    // missed meanwhile).
                    Some(Err(_)) | None => {
                        let _ = write_all(&local, &held).await;
                        break;
                    }
                },
                () = held.lost() => {
                    // The lease is gone (and the keys with it): a new one, and everything
                    // written again.
                    loop {
                        match Lease::grant(client.clone(), ttl).await {
                            Ok(new) => {
                                let new = Arc::new(new);
                                *lease.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                                    new.clone();
                                if write_all(&local, &new).await {
                                    break;
                                }
                            }
                            Err(_) => tokio::time::sleep(retry).await,
                        }
                    }
                }
            }
        }
    }
}
