//! The `Client` trait every backend implements, and typed access on top of it.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use kvsync_model::{
    DeleteOptions, GetOptions, Json, KVList, KVPair, ListOptions, ParseFailure, PathCodec,
    Resource, ResourceKey, Revision,
};

use crate::error::{Error, Result};
use crate::lease::LeaseId;
use crate::txn::{Txn, TxnResponse};
use crate::watch::WatchStream;

/// A list delivered page by page: see [`Client::list_pages`].
pub type ListPages = futures::stream::BoxStream<'static, Result<KVList>>;

/// What a write may find: see [`Client::write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WriteMode {
    /// The key must not exist ([`Client::create`]).
    Create,
    /// The key must exist, at the pair's revision when it has one ([`Client::update`]).
    Update,
    /// Either ([`Client::apply`]).
    Apply,
}

impl WriteMode {
    /// The operation's name: `create`, `update` or `apply`.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteMode::Create => "create",
            WriteMode::Update => "update",
            WriteMode::Apply => "apply",
        }
    }
}

/// What a backend can do, so that callers choose before they call instead of matching on
/// [`Error::Unsupported`] afterwards (`kvsync version --datastore ...` shows it).
///
/// ```
/// use kvsync_backend::{Capabilities, Client, MemoryBackend};
///
/// let caps = MemoryBackend::new(kvsync_model::Registry::new()).capabilities();
/// assert!(caps.ttl && caps.historical_reads && caps.compaction && caps.global_revision);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Keys can be written with a time to live ([`KVPair::ttl`]).
    pub ttl: bool,
    /// `get` and `list` can read as of an old revision.
    pub historical_reads: bool,
    /// [`Client::compact`] drops history.
    pub compaction: bool,
    /// Revisions are one global, comparable counter: [`Client::current_revision`] works, and
    /// a Syncer can tell a short gap (resume the watch) from a long one (relist).
    pub global_revision: bool,
    /// Stored bytes come back exactly as they were written (not so where the datastore stores
    /// JSON objects and writes them out again, as the Kubernetes API does).
    pub raw_bytes: bool,
    /// The largest value the datastore accepts by default, in bytes, where it has a limit.
    pub max_value_bytes: Option<usize>,
    /// [`Client::txn`] applies compares and writes across keys atomically.
    pub transactions: bool,
    /// The most compares, operations in one branch, or keys a transaction may have, where
    /// the datastore has a limit (etcd's `--max-txn-ops`, 128 by default). A larger
    /// transaction is refused with [`Error::Invalid`] before anything is sent.
    pub max_txn_ops: Option<usize>,
    /// Leases: [`Client::lease_grant`], keys written under one
    /// ([`TxnOp::PutLeased`](crate::TxnOp::PutLeased)) and [`Lease`](crate::Lease). Not on
    /// Kubernetes, whose objects cannot carry a lease.
    pub leases: bool,
    /// [`lock`](crate::lock) and [`Election`](crate::Election) work: built from leases and
    /// transactions (memory, SQLite, etcd), or over lock records
    /// ([`Client::lock_records`]: Kubernetes Leases).
    pub locks: bool,
}

impl Capabilities {
    /// A backend that can do none of the optional things; add what yours can with the
    /// `with_*` methods.
    pub fn none() -> Self {
        Capabilities {
            ttl: false,
            historical_reads: false,
            compaction: false,
            global_revision: false,
            raw_bytes: false,
            max_value_bytes: None,
            transactions: false,
            max_txn_ops: None,
            leases: false,
            locks: false,
        }
    }

    /// A store that keeps a revision log as etcd's mvcc does (memory, SQLite, etcd): TTLs,
    /// reads at old revisions, compaction, one global revision, bytes kept as written,
    /// transactions, leases, and no limit on values or transactions (set them with
    /// [`Capabilities::with_max_value_bytes`] and [`Capabilities::with_max_txn_ops`]).
    pub fn revision_log() -> Self {
        Capabilities {
            ttl: true,
            historical_reads: true,
            compaction: true,
            global_revision: true,
            raw_bytes: true,
            max_value_bytes: None,
            transactions: true,
            max_txn_ops: None,
            leases: true,
            locks: true,
        }
    }

    /// Sets [`Capabilities::ttl`].
    #[must_use]
    pub fn with_ttl(mut self, yes: bool) -> Self {
        self.ttl = yes;
        self
    }

    /// Sets [`Capabilities::historical_reads`].
    #[must_use]
    pub fn with_historical_reads(mut self, yes: bool) -> Self {
        self.historical_reads = yes;
        self
    }

    /// Sets [`Capabilities::compaction`].
    #[must_use]
    pub fn with_compaction(mut self, yes: bool) -> Self {
        self.compaction = yes;
        self
    }

    /// Sets [`Capabilities::global_revision`].
    #[must_use]
    pub fn with_global_revision(mut self, yes: bool) -> Self {
        self.global_revision = yes;
        self
    }

    /// Sets [`Capabilities::raw_bytes`].
    #[must_use]
    pub fn with_raw_bytes(mut self, yes: bool) -> Self {
        self.raw_bytes = yes;
        self
    }

    /// Sets [`Capabilities::max_value_bytes`].
    #[must_use]
    pub fn with_max_value_bytes(mut self, max: Option<usize>) -> Self {
        self.max_value_bytes = max;
        self
    }

    /// Sets [`Capabilities::transactions`].
    #[must_use]
    pub fn with_transactions(mut self, yes: bool) -> Self {
        self.transactions = yes;
        self
    }

    /// Sets [`Capabilities::leases`].
    #[must_use]
    pub fn with_leases(mut self, yes: bool) -> Self {
        self.leases = yes;
        self
    }

    /// Sets [`Capabilities::locks`].
    #[must_use]
    pub fn with_locks(mut self, yes: bool) -> Self {
        self.locks = yes;
        self
    }

    /// Sets [`Capabilities::max_txn_ops`].
    #[must_use]
    pub fn with_max_txn_ops(mut self, max: Option<usize>) -> Self {
        self.max_txn_ops = max;
        self
    }
}

/// A datastore: create, update, apply, delete, get, list and watch JSON-valued resources.
///
/// The trait is object safe; share one as `Arc<dyn Client>`. The semantics follow Calico's
/// backend API (`libcalico-go/lib/backend/api`):
///
/// - Every write bumps the datastore revision and returns the stored [`KVPair`] with its new
///   `revision`, its `uid` (assigned on create, kept by updates) and `create_revision`.
/// - A `revision` given to `update` (in the pair) or `delete` (in [`DeleteOptions`]) is a
///   precondition: if the key was written since, the call fails with [`Error::Conflict`] and
///   writes nothing. A delete can also require the key's uid.
/// - Keys and values are validated against the client's registry first; a bad one gives
///   [`Error::Invalid`] naming the field, and nothing is written.
/// - `watch` with the options of a `list` and the list's revision yields every change after
///   the list in revision order with no gaps.
///
/// A backend implements the required methods; `create`, `update` and `apply` (built on
/// `write`), `list` (built from `list_pages`), `get_opt` and the rest have defaults.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use futures::StreamExt;
/// use kvsync_backend::{Client, MemoryBackend, WatchEvent};
/// use kvsync_model::{DeleteOptions, GetOptions, KVPair, KindInfo, ListOptions, Registry, ResourceKey};
/// use serde_json::json;
///
/// let registry = Registry::new().with_kind(KindInfo::untyped("example.com", "Tenant", "tenants", false));
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(registry));
/// let key = ResourceKey::cluster("Tenant", "acme");
/// let created = client.create(KVPair::new(key.clone(), json!({"owner": "ann"}))).await?;
///
/// let list = client.list(&ListOptions::new("Tenant")).await?;
/// assert_eq!(list.items.len(), 1);
/// let mut watch = client.watch(&ListOptions::new("Tenant").with_revision(list.revision)).await?;
///
/// // An update with a stale revision fails; with the current one it succeeds.
/// let mut next = created.clone();
/// next.value = json!({"owner": "bob"}).into();
/// let updated = client.update(next.clone()).await?;
/// assert!(client.update(next).await.unwrap_err().to_string().contains("conflict"));
///
/// match watch.next().await.unwrap()? {
///     WatchEvent::Modified { new, .. } => assert_eq!(new.revision, updated.revision),
///     other => panic!("unexpected {other:?}"),
/// }
/// client.delete(&key, &DeleteOptions::matching(&updated)).await?;
/// assert!(client.get_opt(&key, &GetOptions::new()).await?.is_none());
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Client: Send + Sync + fmt::Debug + 'static {
    /// The path codec: the key prefix and the registry of kinds this client knows.
    fn codec(&self) -> &PathCodec;

    /// The backend's short name, e.g. `memory` or `etcd`.
    fn backend_name(&self) -> &'static str;

    /// What the backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Writes `kvp` as `mode` says, atomically with the check: [`WriteMode::Create`] only if
    /// the key is absent, [`WriteMode::Update`] only if it is present (and at `kvp.revision`
    /// when set; the uid and create revision are kept), [`WriteMode::Apply`] either way.
    /// Returns the stored pair with its new revision.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`], [`Error::NotFound`], [`Error::Conflict`] as above;
    /// [`Error::Invalid`] for a bad key or value (nothing is written); transport errors.
    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair>;

    /// Creates a key that must not exist yet. `kvp.revision` is ignored.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] if the key exists; [`Error::Invalid`] for a bad key or value.
    async fn create(&self, kvp: KVPair) -> Result<KVPair> {
        self.write(kvp, WriteMode::Create).await
    }

    /// Replaces the value of an existing key; when `kvp.revision` is set, only if it is the
    /// key's current revision. The uid and create revision are kept.
    ///
    /// # Errors
    /// [`Error::NotFound`] if the key is absent; [`Error::Conflict`] if the revision is stale.
    async fn update(&self, kvp: KVPair) -> Result<KVPair> {
        self.write(kvp, WriteMode::Update).await
    }

    /// Creates or replaces a key unconditionally.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad key or value; transport errors.
    async fn apply(&self, kvp: KVPair) -> Result<KVPair> {
        self.write(kvp, WriteMode::Apply).await
    }

    /// Deletes a key, only if it meets the preconditions of `opts` (its revision, its uid),
    /// and returns its last value, whose `revision` is the revision of the last write before
    /// the delete.
    ///
    /// # Errors
    /// [`Error::NotFound`] if absent; [`Error::Conflict`] if a precondition fails.
    async fn delete(&self, key: &ResourceKey, opts: &DeleteOptions) -> Result<KVPair>;

    /// Reads a key, as of `opts.revision` when given (else the latest).
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Compacted`] for a revision no longer kept;
    /// [`Error::Unsupported`] for a revision where the backend cannot read the past;
    /// [`Error::Parse`] if the stored bytes do not decode.
    async fn get(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair>;

    /// Reads a key like [`get`](Client::get), with `Ok(None)` when it is absent (as kube's
    /// `Api::get_opt`).
    ///
    /// # Errors
    /// As [`get`](Client::get), but for `NotFound`.
    async fn get_opt(&self, key: &ResourceKey, opts: &GetOptions) -> Result<Option<KVPair>> {
        match self.get(key, opts).await {
            Ok(kvp) => Ok(Some(kvp)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lists the keys `opts` covers, as of `opts.revision` when given, in path order, with
    /// the revision the list was read at. Entries that do not decode are returned apart in
    /// [`KVList::parse_failures`]. The default gathers [`list_pages`](Client::list_pages).
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad options; [`Error::Compacted`] for a revision no longer kept.
    async fn list(&self, opts: &ListOptions) -> Result<KVList> {
        let mut pages = self.list_pages(opts).await?;
        let mut list: Option<KVList> = None;
        while let Some(page) = pages.next().await {
            let page = page?;
            match &mut list {
                None => list = Some(page),
                Some(l) => {
                    l.items.extend(page.items);
                    l.parse_failures.extend(page.parse_failures);
                }
            }
        }
        list.ok_or_else(|| Error::unavailable("the list ended before its first page"))
    }

    /// Lists like [`list`](Client::list), delivered page by page as the datastore answers, so
    /// that the caller works on one page while the next is read (the Syncer sends each page's
    /// updates on before the list is complete). The pages are one snapshot: there is at least
    /// one, each carries the list's revision, items keep path order across pages, and each
    /// page's parse failures come with it. An `Err` item ends the stream; the pages before it
    /// are still true parts of the snapshot.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> kvsync_backend::Result<()> {
    /// use futures::TryStreamExt;
    /// use kvsync_backend::{Client, MemoryBackend};
    /// use kvsync_model::{KindInfo, ListOptions, Registry};
    ///
    /// let registry = Registry::new().with_kind(KindInfo::untyped("example.com", "Tenant", "tenants", false));
    /// let client = MemoryBackend::new(registry);
    /// let mut pages = client.list_pages(&ListOptions::new("Tenant")).await?;
    /// while let Some(page) = pages.try_next().await? {
    ///     println!("{} keys at revision {}", page.items.len(), page.revision);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad options; a datastore's errors may come as the stream's
    /// items instead.
    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages>;

    /// Watches the keys `opts` covers for every change after `opts.revision` (after the
    /// current revision when `None`). See [`WatchStream`] for what the stream yields.
    ///
    /// # Errors
    /// [`Error::Compacted`] if the revision is older than the kept history.
    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream>;

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

    /// The datastore's current revision, where revisions are one global counter
    /// ([`Capabilities::global_revision`]). The Syncer compares it with its resume point to
    /// choose between resuming a watch and relisting.
    ///
    /// # Errors
    /// [`Error::Unsupported`] where revisions are not comparable (Kubernetes).
    async fn current_revision(&self) -> Result<Revision> {
        Err(Error::Unsupported {
            op: "current_revision".into(),
            backend: self.backend_name(),
        })
    }

    /// Checks the compares of `txn`, then applies the operations of the branch they choose,
    /// atomically across keys ([`Capabilities::transactions`]). On etcd the whole transaction
    /// is one Txn at one revision; on SQLite one database transaction and on memory one step
    /// under the store's lock, where each operation takes the next revision and no other
    /// write comes between them. A transaction is never split: one larger than
    /// [`Capabilities::max_txn_ops`] is refused.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad key or value, a key written twice in one branch, or a
    /// transaction over the backend's limits; [`Error::Unsupported`] where the datastore has
    /// no multi-key transactions (Kubernetes). In both cases nothing is sent.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let _ = txn;
        Err(Error::Unsupported {
            op: "txn".into(),
            backend: self.backend_name(),
        })
    }

    /// Grants a lease of `ttl` ([`Capabilities::leases`]): keys written under it
    /// ([`TxnOp::PutLeased`](crate::TxnOp::PutLeased)) are deleted, with a `Deleted` event to
    /// every watcher, when it expires or is revoked. It expires `ttl` after it was granted or
    /// last kept alive. [`Lease::grant`](crate::Lease::grant) keeps one alive for you.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a TTL under a second; [`Error::Unsupported`] without leases.
    async fn lease_grant(&self, ttl: std::time::Duration) -> Result<LeaseId> {
        let _ = ttl;
        Err(Error::Unsupported {
            op: "lease_grant".into(),
            backend: self.backend_name(),
        })
    }

    /// Renews a lease for its TTL; returns the TTL it now has.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when it has expired or was revoked.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<std::time::Duration> {
        Err(Error::LeaseLost { lease })
    }

    /// Revokes a lease: its keys are deleted now. Revoking a lease that is gone is no error.
    ///
    /// # Errors
    /// Transport errors.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let _ = lease;
        Err(Error::Unsupported {
            op: "lease_revoke".into(),
            backend: self.backend_name(),
        })
    }

    /// Where this datastore keeps each lock in one record (Kubernetes: a
    /// coordination.k8s.io/v1 Lease object) rather than building locks from leases and
    /// transactions: its records, for [`lock`](crate::lock) and
    /// [`Election`](crate::Election). `None` (the default) for the others.
    fn lock_records(&self) -> Option<&dyn crate::LockRecords> {
        None
    }

    /// Drops the history before `revision` ([`Capabilities::compaction`]): reads and watches
    /// from older revisions then fail with [`Error::Compacted`].
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

/// The coordination helpers as methods of a shared client: `client.clone().grant_lease(ttl)`,
/// `client.clone().lock(name, &opts)`, `client.clone().snapshot(&kinds)`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kvsync_backend::{Client, LockOptions, MemoryBackend};
/// use kvsync_model::{Registry, coordination::Lock};
///
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(Registry::new().with::<Lock>()));
/// let lease = client.clone().grant_lease(Duration::from_secs(10)).await?;
/// assert!(!lease.is_lost());
/// let guard = client.clone().lock("jobs", &LockOptions::new()).await?;
/// assert!(guard.fence().as_u64().is_some());
/// # Ok(()) }
/// ```
impl dyn Client {
    /// [`Lease::grant`](crate::Lease::grant): a lease kept alive by a task of its own.
    ///
    /// # Errors
    /// As [`Lease::grant`](crate::Lease::grant).
    pub async fn grant_lease(self: Arc<Self>, ttl: std::time::Duration) -> Result<crate::Lease> {
        crate::Lease::grant(self, ttl).await
    }

    /// [`lock`](crate::lock): the fenced lock `name`, once it is this caller's turn.
    ///
    /// # Errors
    /// As [`lock`](crate::lock).
    pub async fn lock(
        self: Arc<Self>,
        name: &str,
        opts: &crate::LockOptions,
    ) -> Result<crate::LockGuard> {
        crate::lock(self, name, opts).await
    }

    /// [`snapshot::entries`](crate::snapshot::entries): every item of `kinds` (every kind when
    /// empty) at one revision, streamed, and the entries that did not decode once it ends.
    ///
    /// # Errors
    /// As [`snapshot::entries`](crate::snapshot::entries).
    pub async fn snapshot(
        self: Arc<Self>,
        kinds: &[String],
    ) -> Result<(
        crate::snapshot::SnapshotStream,
        tokio::sync::oneshot::Receiver<Vec<kvsync_model::ParseFailure>>,
    )> {
        crate::snapshot::entries(self, kinds).await
    }
}

/// Implements [`Client`] for a type by handing every call to a client it holds: for
/// wrappers that add nothing to the calls (a guard kept alive, a handle type).
///
/// `delegate_client!(impl [generics] for Type, |this| expression giving &impl Client)`.
///
/// ```
/// use std::sync::Arc;
/// use kvsync_backend::{Client, MemoryBackend};
///
/// /// A client that keeps a temporary directory alive as long as itself.
/// #[derive(Debug)]
/// struct WithDir {
///     inner: Arc<dyn Client>,
///     _dir: std::path::PathBuf,
/// }
///
/// kvsync_backend::delegate_client!(impl [] for WithDir, |this| &*this.inner);
///
/// let c = WithDir { inner: Arc::new(MemoryBackend::new(kvsync_model::Registry::new())), _dir: "/tmp".into() };
/// assert_eq!(c.backend_name(), "memory");
/// ```
#[macro_export]
macro_rules! delegate_client {
    (impl [$($gen:tt)*] for $ty:ty, |$this:ident| $inner:expr) => {
        #[$crate::__private::async_trait]
        impl<$($gen)*> $crate::Client for $ty {
            fn codec(&self) -> &$crate::model::PathCodec {
                let $this = self;
                $crate::Client::codec($inner)
            }
            fn backend_name(&self) -> &'static str {
                let $this = self;
                $crate::Client::backend_name($inner)
            }
            fn capabilities(&self) -> $crate::Capabilities {
                let $this = self;
                $crate::Client::capabilities($inner)
            }
            async fn write(
                &self,
                kvp: $crate::model::KVPair,
                mode: $crate::WriteMode,
            ) -> $crate::Result<$crate::model::KVPair> {
                let $this = self;
                $crate::Client::write($inner, kvp, mode).await
            }
            async fn create(&self, kvp: $crate::model::KVPair) -> $crate::Result<$crate::model::KVPair> {
                let $this = self;
                $crate::Client::create($inner, kvp).await
            }
            async fn update(&self, kvp: $crate::model::KVPair) -> $crate::Result<$crate::model::KVPair> {
                let $this = self;
                $crate::Client::update($inner, kvp).await
            }
            async fn apply(&self, kvp: $crate::model::KVPair) -> $crate::Result<$crate::model::KVPair> {
                let $this = self;
                $crate::Client::apply($inner, kvp).await
            }
            async fn delete(
                &self,
                key: &$crate::model::ResourceKey,
                opts: &$crate::model::DeleteOptions,
            ) -> $crate::Result<$crate::model::KVPair> {
                let $this = self;
                $crate::Client::delete($inner, key, opts).await
            }
            async fn get(
                &self,
                key: &$crate::model::ResourceKey,
                opts: &$crate::model::GetOptions,
            ) -> $crate::Result<$crate::model::KVPair> {
                let $this = self;
                $crate::Client::get($inner, key, opts).await
            }
            async fn get_opt(
                &self,
                key: &$crate::model::ResourceKey,
                opts: &$crate::model::GetOptions,
            ) -> $crate::Result<::core::option::Option<$crate::model::KVPair>> {
                let $this = self;
                $crate::Client::get_opt($inner, key, opts).await
            }
            async fn list(&self, opts: &$crate::model::ListOptions) -> $crate::Result<$crate::model::KVList> {
                let $this = self;
                $crate::Client::list($inner, opts).await
            }
            async fn list_pages(&self, opts: &$crate::model::ListOptions) -> $crate::Result<$crate::ListPages> {
                let $this = self;
                $crate::Client::list_pages($inner, opts).await
            }
            async fn watch(&self, opts: &$crate::model::ListOptions) -> $crate::Result<$crate::WatchStream> {
                let $this = self;
                $crate::Client::watch($inner, opts).await
            }
            async fn ensure_initialized(&self) -> $crate::Result<()> {
                let $this = self;
                $crate::Client::ensure_initialized($inner).await
            }
            async fn clean(&self) -> $crate::Result<()> {
                let $this = self;
                $crate::Client::clean($inner).await
            }
            async fn current_revision(&self) -> $crate::Result<$crate::model::Revision> {
                let $this = self;
                $crate::Client::current_revision($inner).await
            }
            async fn compact(&self, revision: &$crate::model::Revision) -> $crate::Result<()> {
                let $this = self;
                $crate::Client::compact($inner, revision).await
            }
            async fn txn(&self, txn: $crate::Txn) -> $crate::Result<$crate::TxnResponse> {
                let $this = self;
                $crate::Client::txn($inner, txn).await
            }
            async fn lease_grant(&self, ttl: std::time::Duration) -> $crate::Result<$crate::LeaseId> {
                let $this = self;
                $crate::Client::lease_grant($inner, ttl).await
            }
            async fn lease_keep_alive(&self, lease: $crate::LeaseId) -> $crate::Result<std::time::Duration> {
                let $this = self;
                $crate::Client::lease_keep_alive($inner, lease).await
            }
            async fn lease_revoke(&self, lease: $crate::LeaseId) -> $crate::Result<()> {
                let $this = self;
                $crate::Client::lease_revoke($inner, lease).await
            }
            fn lock_records(&self) -> ::core::option::Option<&dyn $crate::LockRecords> {
                let $this = self;
                $crate::Client::lock_records($inner)
            }
        }
    };
}

delegate_client!(impl [C: Client + ?Sized] for Arc<C>, |this| &**this);
delegate_client!(impl [C: Client + ?Sized] for Box<C>, |this| &**this);

/// Typed access to the resources of kind `R` through any [`Client`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use kvsync_backend::{Api, MemoryBackend};
/// use kvsync_model::{Registry, Resource};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Resource)]
/// #[resource(group = "example.com", namespaced)]
/// struct Project { owner: String }
///
/// let client = Arc::new(MemoryBackend::new(Registry::new().with::<Project>()));
/// let projects = Api::<Project>::namespaced(client, "team-a");
/// let created = projects.create("web", Project { owner: "ann".into() }).await?;
/// assert_eq!(projects.get("web").await?.value, created.value);
/// assert!(projects.get_opt("nope").await?.is_none());
/// assert_eq!(projects.list().await?.items.len(), 1);
/// projects.delete("web").await?;
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

    /// The client this Api uses.
    pub fn client(&self) -> &Arc<dyn Client> {
        &self.client
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

    /// Updates a pair read before, with its revision (when set) as the precondition.
    ///
    /// # Errors
    /// As [`Client::update`].
    pub async fn update(&self, kvp: KVPair<R>) -> Result<KVPair<R>> {
        decode(self.client.update(encode(kvp)?).await?)
    }

    /// Reads `name`.
    ///
    /// # Errors
    /// As [`Client::get`]; [`Error::Invalid`] (field `spec`) when the stored value is not an
    /// `R`.
    pub async fn get(&self, name: &str) -> Result<KVPair<R>> {
        decode(
            self.client
                .get(&self.key(name)?, &GetOptions::new())
                .await?,
        )
    }

    /// Reads `name`, `None` when it is absent.
    ///
    /// # Errors
    /// As [`Api::get`], but for `NotFound`.
    pub async fn get_opt(&self, name: &str) -> Result<Option<KVPair<R>>> {
        match self
            .client
            .get_opt(&self.key(name)?, &GetOptions::new())
            .await?
        {
            Some(kvp) => decode(kvp).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes `name` whatever its revision.
    ///
    /// # Errors
    /// As [`Client::delete`].
    pub async fn delete(&self, name: &str) -> Result<KVPair<R>> {
        self.delete_with(name, &DeleteOptions::new()).await
    }

    /// Deletes `name` if it meets the preconditions of `opts`.
    ///
    /// # Errors
    /// As [`Client::delete`].
    pub async fn delete_with(&self, name: &str, opts: &DeleteOptions) -> Result<KVPair<R>> {
        decode(self.client.delete(&self.key(name)?, opts).await?)
    }

    /// Lists every resource of `R` in this Api's namespace (all namespaces for
    /// [`Api::all`]). A stored value that is not an `R` does not fail the list: it comes in
    /// [`KVList::parse_failures`] with its key and the decode error, beside the items that
    /// decode.
    ///
    /// # Errors
    /// As [`Client::list`].
    pub async fn list(&self) -> Result<KVList<R>> {
        let mut opts = ListOptions::new(R::KIND);
        opts.namespace = self.namespace.clone();
        let list = self.client.list(&opts).await?;
        let mut items = Vec::with_capacity(list.items.len());
        let mut parse_failures = list.parse_failures;
        for kvp in list.items {
            match kvp.value.decode::<R>() {
                Ok(value) => items.push(KVPair {
                    value,
                    key: kvp.key,
                    revision: kvp.revision,
                    create_revision: kvp.create_revision,
                    uid: kvp.uid,
                    ttl: kvp.ttl,
                }),
                Err(e) => parse_failures.push(ParseFailure {
                    raw_key: self
                        .client
                        .codec()
                        .to_path(&kvp.key)
                        .unwrap_or_else(|_| kvp.key.to_string()),
                    raw_value: kvp.value.to_string().into_bytes(),
                    key: Some(kvp.key),
                    revision: kvp.revision,
                    reason: format!("not a {}: {e}", R::KIND),
                }),
            }
        }
        Ok(KVList {
            items,
            revision: list.revision,
            parse_failures,
        })
    }
}
