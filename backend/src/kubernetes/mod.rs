//! The Kubernetes CRD backend: each kind is a CustomResource (Calico's "KDD" mode).
//!
//! - A kind maps to the CRD `<plural>.<group>` of its registry entry, at its version and
//!   scope; the resource value is the object's `spec`, name and namespace come from the key,
//!   `revision` is the object's `resourceVersion` (opaque), `uid` is `metadata.uid`. The CRDs
//!   come from the Rust types (`kvsync crds`, deploy/crds for the demo kinds).
//! - `write`: create is a POST (409 -> [`Error::AlreadyExists`]); update a JSON patch of the
//!   spec carrying the resourceVersion (409 -> [`Error::Conflict`] with the actual revision,
//!   read back); apply creates or replaces, retried while others write.
//! - `delete` reads the object, then deletes it with that read's resourceVersion and uid as
//!   preconditions, reading again on 409: a real API server answers the DELETE of a custom
//!   resource with a `Status`, not the object, so the value read is the last value returned.
//! - `list_pages` reads with one streaming watch-list request by default
//!   ([`KubernetesConfig::watch_list`]: `sendInitialEvents`, a consistent read), up to its
//!   `k8s.io/initial-events-end` bookmark; the rest of that stream is kept for the watch
//!   that follows on from the list (same options, the list's revision), which then opens no
//!   second request. Where the server refuses watch-list requests, one log line, then paged
//!   lists for good: the API server's pages (`limit`/`continue`) as they come, all one
//!   snapshot at the first page's resourceVersion.
//! - `watch` follows on from `opts.revision` (from the current resourceVersion, read with a
//!   one-object list, when it is `None`) with bookmarks requested. `410 Gone` (an expired
//!   resourceVersion) is [`Error::Compacted`], so the Syncer relists; the server closing the
//!   stream (its `timeoutSeconds`) reopens it quietly from the last resourceVersion seen, and
//!   so does a watch silent past [`KubernetesConfig::watch_idle_timeout`]. kube's errors map onto the
//!   crate's kinds: 401/403 -> [`Error::Unauthorized`], 422 -> [`Error::Invalid`], 5xx and
//!   transport errors -> [`Error::Unavailable`].
//! - Requests answered 429, 503 or 504 are retried three times at most, as the server asks
//!   (`Retry-After`), then the error reaches the caller with that delay
//!   ([`Error::retry_after`]): a 504 "Too large resource version" (a server whose cache lags
//!   behind the revision asked for) is retried from the same revision, not relisted.
//! - **TTLs are not supported** by the Kubernetes API: a KVPair with a `ttl` gets
//!   [`Error::Unsupported`] and nothing is written. Reads at an old revision and compaction
//!   are not supported either (the API server keeps a short window of its own), and
//!   resourceVersions are not one comparable counter: [`Client::capabilities`] says so, and a
//!   Syncer relists after an outage.
//!
//! - **Locks and elections** ([`lock`](crate::lock), [`Election`](crate::Election)) are
//!   coordination.k8s.io/v1 Lease objects named after the lock, in
//!   [`KubernetesConfig::lease_namespace`], read and written as client-go's `LeaseLock`
//!   does (holderIdentity, leaseDurationSeconds, acquireTime, renewTime, leaseTransitions;
//!   released with an empty holder and a one-second lease), so `kubectl get lease` and
//!   client-go tools read them. A candidate takes a Lease over once it was released or has not
//!   changed for its lease duration as observed locally (client-go's `observedTime`, immune
//!   to clock skew). Departures from client-go, for fencing: leaseTransitions goes up on every
//!   acquisition (it is the fence), and a candidate never "renews" a Lease it did not write
//!   itself, even one bearing its identity. Waiters are not served in order: a Lease has no
//!   queue. Guarded writes store their fence on the object (`kvsync.dev/fence`,
//!   `kvsync.dev/fence-lock`) and are refused below a higher one.
//! - Updates are JSON patches of `spec` carrying `metadata.resourceVersion` as the
//!   precondition: labels, annotations, finalizers and ownerReferences set by others survive
//!   (a PUT of the whole object would wipe them).
//!
//! - List pages and watch events are decoded into slim types (`slim.rs`): the name,
//!   namespace, resourceVersion, uid and the spec's JSON text, everything else (managedFields
//!   above all) skipped by the parser without being built. The spec stays text until a
//!   consumer reads it, as on etcd and SQLite.
//!
//! The files: `config.rs`, `crud.rs` (one object's reads and writes), `list.rs`, `watch.rs`,
//! `slim.rs` (lean decoding), `convert.rs` (errors and API resources), `coordination.rs`
//! (Leases and fenced writes).

use std::fmt;

use async_trait::async_trait;
use kube::api::{Api, DynamicObject, ListParams};
use kvsync_model::{DeleteOptions, GetOptions, KVPair, ListOptions, PathCodec, ResourceKey};
use serde_json::json;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::{encode_for_write, parse_error};
use crate::watch::WatchStream;

mod config;
mod convert;
mod coordination;
mod crud;
mod list;
mod slim;
mod watch;

pub use config::KubernetesConfig;
use convert::{api_resource, map_err};
pub use coordination::{FENCE_ANNOTATION, FENCE_LOCK_ANNOTATION};

/// A kube client whose requests answered 429, 503 or 504 are retried at most
/// [`KUBE_RETRIES`] times, waiting as the server asks (`Retry-After`) or 100 ms doubling up to
/// 5 s, in place of kube's default retry (15 times, with waits growing to minutes: a watch
/// from a resourceVersion the server had not reached went silent for six minutes). What is
/// still refused after that reaches the caller with the server's delay
/// ([`Error::retry_after`]); a Syncer then backs off by it, and its status and metrics say so.
fn bounded_retry_client(mut config: kube::Config) -> Result<kube::Client> {
    config.default_retry = false;
    let policy = kube::client::retry::RetryPolicy::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
        KUBE_RETRIES,
        true,
    )
    .map_err(|e| Error::invalid("retry policy", e.to_string()))?;
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(|e| Error::invalid("kubeconfig", e.to_string()))?
        // Retrying needs a service it can clone: kube's stack is boxed, so it goes behind a
        // buffer (a queue to one task that calls it; the calls themselves run concurrently).
        .with_layer(&tower::buffer::BufferLayer::new(1024))
        .with_layer(&tower::retry::RetryLayer::new(policy))
        .build())
}

/// How many times kube retries a request answered 429, 503 or 504.
const KUBE_RETRIES: u32 = 3;

/// How many times a write retries when other writers keep changing its object.
const MAX_WRITE_RETRIES: usize = 32;

/// The Kubernetes CRD backend. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesBackend {
    client: kube::Client,
    codec: PathCodec,
    watch_list: bool,
    /// Where the Leases of locks and elections live.
    lease_namespace: String,
    watch_idle_timeout: std::time::Duration,
    /// Objects per page of a paged list.
    page_size: u32,
    /// Set once the API server refused a watch-list request: paged lists from then on.
    watch_list_refused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Watch-list streams waiting for the watch that follows on from their list.
    parked: std::sync::Arc<std::sync::Mutex<Vec<list::Parked>>>,
}

impl fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("default_namespace", &self.client.default_namespace())
            .finish_non_exhaustive()
    }
}

impl KubernetesBackend {
    /// Connects with `config`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when no configuration can be found or read.
    pub async fn connect(config: KubernetesConfig) -> Result<Self> {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    Error::invalid("kubeconfig", format!("cannot read {}: {e}", path.display()))
                })?;
                let opts = kube::config::KubeConfigOptions {
                    context: config.context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| Error::invalid("kubeconfig", e.to_string()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| Error::invalid("kubeconfig", e.to_string()))?,
        };
        let client = bounded_retry_client(kube_config)?;
        let lease_namespace = config
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        kvsync_model::validation::validate_namespace(&lease_namespace)?;
        if config.watch_idle_timeout < std::time::Duration::from_millis(100) {
            return Err(Error::invalid(
                "watch_idle_timeout",
                format!(
                    "must be at least 100 ms, not {:?}",
                    config.watch_idle_timeout
                ),
            ));
        }
        if config.page_size == 0 {
            return Err(Error::invalid(
                "page_size",
                "must be at least 1 object, not 0",
            ));
        }
        Ok(KubernetesBackend {
            client,
            page_size: config.page_size,
            codec: PathCodec::with_registry(config.registry),
            watch_list: config.watch_list,
            lease_namespace,
            watch_idle_timeout: config.watch_idle_timeout,
            watch_list_refused: std::sync::Arc::default(),
            parked: std::sync::Arc::default(),
        })
    }

    /// The underlying kube client.
    pub fn kube_client(&self) -> &kube::Client {
        &self.client
    }

    fn api(&self, kind: &str, namespace: Option<&str>) -> Result<Api<DynamicObject>> {
        let info = self.codec.registry().kind(kind)?;
        let ar = api_resource(info);
        Ok(match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        })
    }

    fn to_object(&self, kvp: &KVPair) -> Result<DynamicObject> {
        let info = self.codec.registry().kind(&kvp.key.kind)?;
        let mut obj = DynamicObject::new(&kvp.key.name, &api_resource(info)).data(json!({
            "spec": kvp.value,
        }));
        obj.metadata.namespace = kvp.key.namespace.clone();
        Ok(obj)
    }

    /// The KVPair of an object decoded whole by kube (single-object requests), or why it
    /// has none (an object without `spec`).
    fn to_kvp(&self, kind: &str, obj: DynamicObject) -> Result<KVPair> {
        slim::SlimObject::from_dynamic(obj)
            .decode(kind, &self.codec)
            .map_err(|f| parse_error(*f))
    }

    /// The URL path of a kind's objects (in `namespace`, or of every namespace).
    fn url_path(&self, kind: &str, namespace: Option<&str>) -> Result<String> {
        let info = self.codec.registry().kind(kind)?;
        Ok(<DynamicObject as kube::Resource>::url_path(
            &api_resource(info),
            namespace,
        ))
    }

    fn check_writable(&self, kvp: &KVPair) -> Result<()> {
        encode_for_write(&self.codec, kvp)?;
        if kvp.ttl.is_some() {
            return Err(Error::Unsupported {
                op: "ttl".into(),
                backend: "kubernetes",
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Client for KubernetesBackend {
    fn codec(&self) -> &PathCodec {
        &self.codec
    }

    fn backend_name(&self) -> &'static str {
        "kubernetes"
    }

    fn capabilities(&self) -> Capabilities {
        // No TTLs, no reads of the past, no compaction from a client, opaque
        // resourceVersions, values stored as JSON objects; the API server's request limit
        // (3 MiB) and etcd's (1.5 MiB by default) bound an object.
        Capabilities::none()
            .with_max_value_bytes(Some(1_572_864 - 4_096))
            .with_locks(true)
    }

    /// Locks and elections are coordination.k8s.io/v1 Lease objects in
    /// [`KubernetesConfig::lease_namespace`].
    fn lock_records(&self) -> Option<&dyn crate::LockRecords> {
        Some(self)
    }

    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        self.check_writable(&kvp)?;
        match mode {
            WriteMode::Create => self.create_object(kvp).await,
            WriteMode::Update => self.update_object(kvp).await,
            WriteMode::Apply => self.apply_object(kvp).await,
        }
    }

    /// The object is read first, then deleted with its resourceVersion and uid as
    /// preconditions, so the last value is always returned.
    async fn delete(&self, key: &ResourceKey, opts: &DeleteOptions) -> Result<KVPair> {
        self.delete_kvp(key, opts).await
    }

    async fn get(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair> {
        self.get_kvp(key, opts).await
    }

    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        self.list_pages_kvp(opts).await
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        self.open_watch(opts).await
    }

    async fn ensure_initialized(&self) -> Result<()> {
        for info in self.codec.registry().kinds() {
            let api = self.api(&info.kind, None)?;
            match api.list(&ListParams::default().limit(1)).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(Error::invalid(
                        "crd",
                        format!(
                            "the CRD {}.{} is not installed: kubectl apply -f deploy/crds",
                            info.plural, info.group
                        ),
                    ));
                }
                Err(e) => return Err(map_err(e, None, None)),
            }
        }
        Ok(())
    }

    async fn clean(&self) -> Result<()> {
        for info in self.codec.registry().kinds() {
            let list = self.list(&ListOptions::new(&info.kind)).await?;
            for kvp in list.items {
                match self.delete(&kvp.key, &DeleteOptions::new()).await {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}
