//! The kvsync Syncer: list-then-watch over many resource types, with exact recovery from every
//! fault. The Rust counterpart of Calico's `watchersyncer` and of kube-runtime's
//! `watcher`/`reflector`.
//!
//! A controller hands the Syncer a [`Client`] and the resource types it cares about, and
//! receives status changes ([`SyncStatus`]) and batches of [`Update`]s, either as a
//! [`Stream`](futures::Stream) ([`Syncer::stream`]) or through [`SyncerCallbacks`]
//! ([`Syncer::start`]).
//!
//! **The promise:** a consumer that applies every batch to a map holds exactly the
//! datastore's state whenever the datastore is quiet and the Syncer has said
//! [`SyncStatus::InSync`], whatever happened underneath.
//!
//! - Status starts at `WaitForDatastore`, goes to `ResyncInProgress` once every type's list
//!   answered, and to `InSync` after every type's initial updates were delivered. Updates are
//!   always delivered before the status that follows them.
//! - Per key: `New` the first time, `Updated` afterwards, `Deleted` when it goes; never
//!   `Deleted` for a key not reported before; in revision order; a repeat of the same revision
//!   is dropped.
//! - Lists arrive page by page and each page's updates are handed on as it comes. The watch
//!   that follows a list is opened as soon as the first page gives the list's revision, so it
//!   starts while that revision is still the newest (etcd catches up a watch that starts in
//!   the past only every 100 ms) and changes made during the list wait in its stream.
//! - A broken watch resumes from the last revision seen. A compacted resume point
//!   ([`Error::Compacted`](kvsync_backend::Error::Compacted)) makes the type relist and send
//!   exactly the difference against what it sent: `Updated`, `New`, `Deleted` for keys that
//!   vanished meanwhile, nothing for unchanged keys.
//! - While the datastore is unreachable the status is `WaitForDatastore` and the Syncer
//!   retries as its [`RetryPolicy`] says (capped exponential [`Backoff`] with jitter by
//!   default). When it answers again, each type weighs its gap: with `g` revisions missed (the datastore's current revision minus the
//!   last one seen) and `n` keys tracked, it resumes its watch when `g <= n / 20` (replaying an
//!   event costs about 20 times listing a key on etcd) and stays `ResyncInProgress` until the
//!   watch reaches the current revision (confirmed by an event or a progress notification
//!   within [`Syncer::with_catch_up_timeout`], else it relists); otherwise it relists and
//!   sends the difference.
//!   Backends whose [`capabilities`](kvsync_backend::Client::capabilities) say revisions are
//!   not one global counter always relist. See [`Syncer::with_gap_ratio`].
//! - Batches hold at most [`Syncer::with_max_batch`] updates. The Syncer runs inside the
//!   stream it returns (or the callbacks' task): the datastore is read as the consumer takes
//!   events, so a slow consumer slows the reading instead of growing a queue, and no task hop
//!   lies between a watch and the consumer ([`Syncer::with_channel_capacity`] lets it read
//!   ahead from a task of its own).
//! - Per tracked key the Syncer keeps only its revision (and, with an [`UpdateProcessor`],
//!   the derived keys), never a copy of the value.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use futures::StreamExt;
//! use kvsync_backend::{Api, Client, MemoryBackend};
//! use kvsync_model::{Registry, Resource};
//! use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};
//! use serde::{Deserialize, Serialize};
//!
//! /// Your own kind.
//! #[derive(Clone, Debug, Serialize, Deserialize, Resource)]
//! #[resource(group = "example.com", kind = "Tenant", plural = "tenants")]
//! struct Tenant { owner: String }
//!
//! let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(Registry::new().with::<Tenant>()));
//! Api::<Tenant>::all(client.clone()).create("acme", Tenant { owner: "ann".into() }).await.unwrap();
//!
//! let mut events = Syncer::new(client.clone())
//!     .with_resource(ResourceType::of::<Tenant>())
//!     .stream();
//! let mut cache = BTreeMap::new();
//! while let Some(ev) = events.next().await {
//!     match ev {
//!         SyncerEvent::Updates(batch) => for u in batch {
//!             match u.update_type {
//!                 UpdateType::Deleted => { cache.remove(&u.kvp.key); }
//!                 _ => {
//!                     let tenant: Tenant = u.kvp.value.decode().unwrap();
//!                     cache.insert(u.kvp.key.clone(), tenant);
//!                 }
//!             }
//!         },
//!         SyncerEvent::Status(SyncStatus::InSync) => break,
//!         _ => {}
//!     }
//! }
//! assert_eq!(cache.len(), 1);
//! events.stop().await;
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::Client;
use kvsync_model::{KVPair, ListOptions, Resource};

mod callbacks;
mod driver;
mod metrics;
mod shared;
mod state;
mod status;

pub use callbacks::SyncerCallbacks;
pub use driver::{Backoff, RetryPolicy, SyncerHandle, SyncerStream};
pub use metrics::SyncerMetrics;
pub use shared::{SharedObserver, SharedStore};
pub use status::{SyncStatus, SyncerEvent, Update, UpdateType};

/// The default ratio of tracked keys to missed revisions below which a Syncer resumes its
/// watch after an outage instead of relisting.
pub const DEFAULT_GAP_RATIO: u64 = 20;

/// The default largest batch of updates.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// Converts a resource into zero or more derived KVPairs (Calico's
/// `SyncerUpdateProcessor`), e.g. one policy fanned out per selector.
///
/// The Syncer remembers which keys each resource produced, so a derived key that a later
/// version no longer produces, or whose resource is deleted, is sent as `Deleted`. Derived
/// pairs without a revision get their resource's. Each derived key must come from one
/// resource only: two resources producing the same key would report it twice.
///
/// ```
/// use kvsync_model::{KVPair, ResourceKey};
/// use kvsync_syncer::UpdateProcessor;
///
/// /// One derived key per selector term of a policy.
/// struct BySelector;
/// impl UpdateProcessor for BySelector {
///     fn process(&self, kvp: &KVPair) -> Vec<KVPair> {
///         let selector = kvp.value.as_value().unwrap()["selector"].as_str().unwrap_or_default();
///         selector
///             .split("&&")
///             .enumerate()
///             .map(|(i, term)| {
///                 let name = format!("{}-{i}", kvp.key.name);
///                 KVPair::new(ResourceKey::cluster("SelectorTerm", name), serde_json::json!(term.trim()))
///             })
///             .collect()
///     }
/// }
/// let policy = KVPair::new(
///     ResourceKey::namespaced("NetworkPolicy", "prod", "web"),
///     serde_json::json!({"selector": "app == 'web' && tier == 'front'"}),
/// );
/// assert_eq!(BySelector.process(&policy).len(), 2);
/// ```
pub trait UpdateProcessor: Send + Sync + 'static {
    /// The derived pairs for the current value of a resource.
    fn process(&self, kvp: &KVPair) -> Vec<KVPair>;
}

/// One resource type a Syncer follows: what to list and watch, and an optional processor.
#[derive(Clone)]
pub struct ResourceType {
    /// Which keys (kind and optional namespace, name or prefix).
    pub options: ListOptions,
    /// The optional processor.
    pub processor: Option<Arc<dyn UpdateProcessor>>,
}

impl fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceType")
            .field("options", &self.options)
            .field("processor", &self.processor.is_some())
            .finish()
    }
}

impl ResourceType {
    /// Follows the keys `options` covers.
    pub fn new(options: ListOptions) -> Self {
        ResourceType {
            options,
            processor: None,
        }
    }

    /// Follows every resource of `R`.
    pub fn of<R: Resource>() -> Self {
        Self::new(ListOptions::new(R::KIND))
    }

    /// Sends the processor's derived pairs instead of the resources themselves.
    #[must_use]
    pub fn with_processor(mut self, processor: Arc<dyn UpdateProcessor>) -> Self {
        self.processor = Some(processor);
        self
    }
}

/// A Syncer, configured and not yet started. Start it with [`Syncer::stream`] or
/// [`Syncer::start`].
#[derive(Clone)]
pub struct Syncer {
    client: Arc<dyn Client>,
    types: Vec<ResourceType>,
    max_batch: usize,
    channel_capacity: usize,
    retry: Arc<dyn RetryPolicy>,
    request_timeout: Duration,
    gap_ratio: u64,
    catch_up_timeout: Duration,
    metrics: Option<SyncerMetrics>,
}

impl fmt::Debug for Syncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Syncer")
            .field("client", &self.client)
            .field("types", &self.types)
            .field("max_batch", &self.max_batch)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Syncer {
    /// A Syncer over `client` with no resource types yet.
    pub fn new(client: Arc<dyn Client>) -> Self {
        Syncer {
            client,
            types: Vec::new(),
            max_batch: DEFAULT_MAX_BATCH,
            channel_capacity: 0,
            retry: Arc::new(Backoff::default()),
            request_timeout: Duration::from_secs(30),
            gap_ratio: DEFAULT_GAP_RATIO,
            catch_up_timeout: Duration::from_secs(10),
            metrics: None,
        }
    }

    /// Records the Syncer's status, updates, batches, relists and watch restarts into
    /// `metrics` (see [`SyncerMetrics`] for the names).
    #[must_use]
    pub fn with_metrics(mut self, metrics: SyncerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How long a watch resumed after an outage may take to confirm that it reached the
    /// datastore's revision (by an event or a progress notification) before the type relists
    /// instead (default 10 s).
    #[must_use]
    pub fn with_catch_up_timeout(mut self, timeout: Duration) -> Self {
        self.catch_up_timeout = timeout;
        self
    }

    /// After an outage, resume the watch when the revisions missed are at most the tracked
    /// keys divided by `ratio`, and relist otherwise (default 20; see the crate docs).
    #[must_use]
    pub fn with_gap_ratio(mut self, ratio: u64) -> Self {
        self.gap_ratio = ratio.max(1);
        self
    }

    /// Also follows `rt`. Give each key to one type only: overlapping types report the same
    /// key twice.
    #[must_use]
    pub fn with_resource(mut self, rt: ResourceType) -> Self {
        self.types.push(rt);
        self
    }

    /// The largest batch of updates delivered at once (default 1,000; at least 1).
    #[must_use]
    pub fn with_max_batch(mut self, max: usize) -> Self {
        self.max_batch = max.max(1);
        self
    }

    /// How many events the Syncer may prepare ahead of its consumer, in a task of its own,
    /// before it stops reading the datastore. The default, 0, runs the Syncer inside the
    /// consumer's stream (or the callbacks' task): no task hop per batch, which measured
    /// faster in steady state; a capacity lets the Syncer read on while the consumer is busy.
    #[must_use]
    pub fn with_channel_capacity(mut self, capacity: usize) -> Self {
        self.channel_capacity = capacity;
        self
    }

    /// How long to wait between retries (default [`Backoff`]: 100 ms doubling up to 10 s,
    /// with jitter).
    #[must_use]
    pub fn with_retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.retry = Arc::new(policy);
        self
    }

    /// How long a list or the opening of a watch may take before it counts as a failure
    /// (default 30 s).
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The Syncer as a stream of events: it runs as the stream is polled (in a task of its
    /// own, which needs a tokio runtime, with [`Syncer::with_channel_capacity`]).
    pub fn stream(self) -> SyncerStream {
        SyncerStream::new(self)
    }

    /// Starts the Syncer and calls `callbacks` from a task of its own. Needs a tokio runtime.
    pub fn start(self, callbacks: impl SyncerCallbacks) -> SyncerHandle {
        let stream = self.stream();
        SyncerHandle::spawn(move |stopped| callbacks::run(stream, callbacks, stopped))
    }
}
