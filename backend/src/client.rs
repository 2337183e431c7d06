//! The `Client` trait every backend implements, and typed access on top of it.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use kvsync_model::{Json, KVList, KVPair, ListOptions, PathCodec, Resource, ResourceKey, Revision};

use crate::error::{Error, Result};
use crate::watch::WatchStream;

/// A list delivered page by page: see [`Client::list_pages`].
pub type ListPages = futures::stream::BoxStream<'static, Result<KVList>>;

/// A datastore: create, update, apply, delete, get, list and watch JSON-valued resources.
///
/// The trait is object safe; share one as `Arc<dyn Client>`. The semantics follow Calico's
/// backend API (`libcalico-go/lib/backend/api`):
///
/// - Every write bumps the datastore revision and returns the stored [`KVPair`] with its new
///   `revision`, its `uid` (assigned on create, kept by updates) and `create_revision`.
/// - A `revision` given to `update` or `delete` is a precondition: if the key was written since,
///   the call fails with [`Error::Conflict`] and writes nothing.
/// - Keys and values are validated against the client's registry first; a bad one gives
///   [`Error::Invalid`] naming the field, and nothing is written.
/// - `watch(opts, Some(r))` yields every change after revision `r` in revision order with no
///   gaps; pass the revision of a `list` to follow it exactly.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use futures::StreamExt;
/// use kvsync_backend::{Client, MemoryBackend, WatchEvent};
/// use kvsync_model::{KVPair, ListOptions, ResourceKey};
/// use serde_json::json;
///
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new());
/// let key = ResourceKey::cluster("IPPool", "pool-a");
/// let created = client.create(KVPair::new(key.clone(), json!({"cidr": "10.0.0.0/16"}))).await?;
///
/// let list = client.list(&ListOptions::new("IPPool"), None).await?;
/// assert_eq!(list.items.len(), 1);
/// let mut watch = client.watch(&ListOptions::new("IPPool"), Some(&list.revision)).await?;
///
/// // An update with a stale revision fails; with the current one it succeeds.
/// let mut next = created.clone();
/// next.value = json!({"cidr": "10.1.0.0/16"}).into();
/// let updated = client.update(next.clone()).await?;
/// assert!(client.update(next).await.unwrap_err().to_string().contains("conflict"));
///
/// match watch.next().await.unwrap()? {
///     WatchEvent::Modified { new, .. } => assert_eq!(new.revision, updated.revision),
///     other => panic!("unexpected {other:?}"),
/// }
/// client.delete(&key, None).await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Client: Send + Sync + fmt::Debug + 'static {
    /// The path codec: the key prefix and the registry of kinds this client knows.
    fn codec(&self) -> &PathCodec;

    /// The backend's short name, e.g. `memory` or `etcd`.
    fn backend_name(&self) -> &'static str;

    /// Creates a key that must not exist yet. `kvp.revision` is ignored.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] if the key exists; [`Error::Invalid`] for a bad key or value.
    async fn create(&self, kvp: KVPair) -> Result<KVPair>;

    /// Replaces the value of an existing key; when `kvp.revision` is set, only if it is the
    /// key's current revision. The uid and create revision are kept.
    ///
    /// # Errors
    /// [`Error::NotFound`] if the key is absent; [`Error::Conflict`] if the revision is stale.
    async fn update(&self, kvp: KVPair) -> Result<KVPair>;

    /// Creates or replaces a key unconditionally.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad key or value; transport errors.
    async fn apply(&self, kvp: KVPair) -> Result<KVPair>;

    /// Deletes a key, only at `revision` when given, and returns its last value (whose
    /// `revision` is the revision of the last write before the delete).
    ///
    /// # Errors
    /// [`Error::NotFound`] if absent; [`Error::Conflict`] if the revision is stale.
    async fn delete(&self, key: &ResourceKey, revision: Option<&Revision>) -> Result<KVPair>;

    /// Reads a key, as of `revision` when given (else the latest).
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Compacted`] for a revision no longer kept;
    /// [`Error::Parse`] if the stored bytes do not decode.
    async fn get(&self, key: &ResourceKey, revision: Option<&Revision>) -> Result<KVPair>;

    /// Lists the keys `opts` covers, as of `revision` when given, in path order, with the
    /// revision the list was read at. Entries that do not decode are returned apart in
    /// [`KVList::parse_failures`].
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad options; [`Error::Compacted`] for a revision no longer kept.
    async fn list(&self, opts: &ListOptions, revision: Option<&Revision>) -> Result<KVList>;

    /// Lists like [`list`](Client::list), delivered page by page as the datastore answers, so
    /// that the caller works on one page while the next is read (the Syncer sends each page's
    /// updates on before the list is complete). The pages are one snapshot: each carries the
    /// list's revision, items keep path order across pages, and each page's parse failures
    /// come with it. An `Err` item ends the stream; the pages before it are still true parts
    /// of the snapshot. The default delivers [`list`](Client::list) as one page.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> kvsync_backend::Result<()> {
    /// use futures::TryStreamExt;
    /// use kvsync_backend::{Client, MemoryBackend};
    /// use kvsync_model::ListOptions;
    ///
    /// let client = MemoryBackend::new();
    /// let mut pages = client.list_pages(&ListOptions::new("IPPool"), None).await?;
    /// while let Some(page) = pages.try_next().await? {
    ///     println!("{} keys at revision {}", page.items.len(), page.revision);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad options; a datastore's errors may come as the stream's
    /// items instead.
    async fn list_pages(
        &self,
        opts: &ListOptions,
        revision: Option<&Revision>,
    ) -> Result<ListPages> {
        let list = self.list(opts, revision).await?;
        Ok(Box::pin(futures::stream::once(async move { Ok(list) })))
    }

    /// Watches the keys `opts` covers for every change after `from` (after the current
    /// revision when `None`). See [`WatchStream`] for what the stream yields.
    ///
    /// # Errors
    /// [`Error::Compacted`] if `from` is older than the kept history.
    async fn watch(&self, opts: &ListOptions, from: Option<&Revision>) -> Result<WatchStream>;

    /// Prepares the datastore for use (creates tables, checks CRDs). Idempotent.
    ///
    /// # Errors
    /// Transport errors, or [`Error::Unauthorized`].
    async fn ensure_initialized(&self) -> Result<()> {
        Ok(())
    }

    /// Deletes every key under the client's prefix (for tests).
    ///
    /// # Errors
    /// Transport errors.
    async fn clean(&self) -> Result<()>;

    /// The datastore's current revision, where revisions are one global counter (memory,
    /// SQLite, etcd). The Syncer compares it with its resume point to choose between resuming
    /// a watch and relisting.
    ///
    /// # Errors
    /// [`Error::Unsupported`] where revisions are not comparable (Kubernetes).
    async fn current_revision(&self) -> Result<Revision> {
        Err(Error::Unsupported {
            op: "current_revision".into(),
            backend: self.backend_name(),
        })
    }

    /// Drops the history before `revision`: reads and watches from older revisions then fail
    /// with [`Error::Compacted`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] where the backend has no history to compact.
    async fn compact(&self, revision: &Revision) -> Result<()> {
        let _ = revision;
        Err(Error::Unsupported {
            op: "compact".into(),
            backend: self.backend_name(),
        })
    }
}

#[async_trait]
impl<C: Client + ?Sized> Client for Arc<C> {
    fn codec(&self) -> &PathCodec {
        (**self).codec()
    }
    fn backend_name(&self) -> &'static str {
        (**self).backend_name()
    }
    async fn create(&self, kvp: KVPair) -> Result<KVPair> {
        (**self).create(kvp).await
    }
    async fn update(&self, kvp: KVPair) -> Result<KVPair> {
        (**self).update(kvp).await
    }
    async fn apply(&self, kvp: KVPair) -> Result<KVPair> {
        (**self).apply(kvp).await
    }
    async fn delete(&self, key: &ResourceKey, revision: Option<&Revision>) -> Result<KVPair> {
        (**self).delete(key, revision).await
    }
    async fn get(&self, key: &ResourceKey, revision: Option<&Revision>) -> Result<KVPair> {
        (**self).get(key, revision).await
    }
    async fn list(&self, opts: &ListOptions, revision: Option<&Revision>) -> Result<KVList> {
        (**self).list(opts, revision).await
    }
    async fn list_pages(
        &self,
        opts: &ListOptions,
        revision: Option<&Revision>,
    ) -> Result<ListPages> {
        (**self).list_pages(opts, revision).await
    }
    async fn watch(&self, opts: &ListOptions, from: Option<&Revision>) -> Result<WatchStream> {
        (**self).watch(opts, from).await
    }
    async fn ensure_initialized(&self) -> Result<()> {
        (**self).ensure_initialized().await
    }
    async fn clean(&self) -> Result<()> {
        (**self).clean().await
    }
    async fn compact(&self, revision: &Revision) -> Result<()> {
        (**self).compact(revision).await
    }
    async fn current_revision(&self) -> Result<Revision> {
        (**self).current_revision().await
    }
}

/// Typed access to the resources of kind `R` through any [`Client`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use kvsync_backend::{Api, MemoryBackend};
/// use kvsync_model::demo::NetworkPolicy;
///
/// let policies = Api::<NetworkPolicy>::namespaced(Arc::new(MemoryBackend::new()), "prod");
/// let spec = NetworkPolicy { order: Some(10.0), selector: "all()".into(), ingress: vec![], egress: vec![] };
/// let created = policies.create("allow-all", spec).await?;
/// assert_eq!(policies.get("allow-all").await?.value, created.value);
/// assert_eq!(policies.list().await?.items.len(), 1);
/// # Ok(()) }
/// ```
pub struct Api<R> {
    client: Arc<dyn Client>,
    namespace: Option<String>,
    _kind: PhantomData<fn() -> R>,
}

impl<R> Clone for Api<R> {
    fn clone(&self) -> Self {
        Api {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            _kind: PhantomData,
        }
    }
}

impl<R> fmt::Debug for Api<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("kind", &std::any::type_name::<R>())
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn decode<R: Resource>(kvp: KVPair) -> Result<KVPair<R>> {
    kvp.try_map(|v| {
        v.decode()
            .map_err(|e| Error::invalid("spec", e.to_string()))
    })
}

fn encode<R: Resource>(kvp: KVPair<R>) -> Result<KVPair> {
    kvp.try_map(|v| {
        serde_json::to_value(v)
            .map(Json::from)
            .map_err(|e| Error::invalid("spec", e.to_string()))
    })
}

impl<R: Resource> Api<R> {
    /// Cluster-scoped kinds, or namespaced kinds across all namespaces (list only).
    pub fn all(client: Arc<dyn Client>) -> Self {
        Api {
            client,
            namespace: None,
            _kind: PhantomData,
        }
    }

    /// A namespaced kind within `namespace`.
    pub fn namespaced(client: Arc<dyn Client>, namespace: impl Into<String>) -> Self {
        Api {
            client,
            namespace: Some(namespace.into()),
            _kind: PhantomData,
        }
    }

    /// The key of `name` in this Api's namespace.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the scope does not fit the kind.
    pub fn key(&self, name: &str) -> Result<ResourceKey> {
        Ok(ResourceKey::of::<R>(self.namespace.as_deref(), name)?)
    }

    /// Creates `name`. See [`Client::create`].
    ///
    /// # Errors
    /// As [`Client::create`].
    pub async fn create(&self, name: &str, value: R) -> Result<KVPair<R>> {
        let kvp = encode(KVPair::of(self.key(name)?, value))?;
        decode(self.client.create(kvp).await?)
    }

    /// Creates or replaces `name`. See [`Client::apply`].
    ///
    /// # Errors
    /// As [`Client::apply`].
    pub async fn apply(&self, name: &str, value: R) -> Result<KVPair<R>> {
        let kvp = encode(KVPair::of(self.key(name)?, value))?;
        decode(self.client.apply(kvp).await?)
    }

    /// Updates a pair read before, with its revision as the precondition.
    ///
    /// # Errors
    /// As [`Client::update`].
    pub async fn update(&self, kvp: KVPair<R>) -> Result<KVPair<R>> {
        decode(self.client.update(encode(kvp)?).await?)
    }

    /// Reads `name`.
    ///
    /// # Errors
    /// As [`Client::get`].
    pub async fn get(&self, name: &str) -> Result<KVPair<R>> {
        decode(self.client.get(&self.key(name)?, None).await?)
    }

    /// Deletes `name`.
    ///
    /// # Errors
    /// As [`Client::delete`].
    pub async fn delete(&self, name: &str) -> Result<KVPair<R>> {
        decode(self.client.delete(&self.key(name)?, None).await?)
    }

    /// Lists every resource of `R` in this Api's namespace (all namespaces for
    /// [`Api::all`]).
    ///
    /// # Errors
    /// As [`Client::list`].
    pub async fn list(&self) -> Result<KVList<R>> {
        let mut opts = ListOptions::new(R::KIND);
        opts.namespace = self.namespace.clone();
        let list = self.client.list(&opts, None).await?;
        Ok(KVList {
            items: list
                .items
                .into_iter()
                .map(decode::<R>)
                .collect::<Result<_>>()?,
            revision: list.revision,
            parse_failures: list.parse_failures,
        })
    }
}
