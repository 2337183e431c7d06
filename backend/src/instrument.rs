//! Tracing spans and Prometheus metrics for the calls of any [`Client`].

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use futures::StreamExt;
use kvsync_model::{
    DeleteOptions, GetOptions, KVList, KVPair, ListOptions, PathCodec, ResourceKey, Revision,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::Instrument;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::lease::LeaseId;
use crate::txn::{Txn, TxnResponse};
use crate::watch::WatchStream;

/// The labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    backend: &'static str,
    op: &'static str,
    outcome: &'static str,
}

/// The labels of a latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    backend: &'static str,
    op: &'static str,
}

/// The labels of the watch event counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    backend: &'static str,
    kind: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The metrics of datastore calls, registered into a registry of yours:
///
/// | name | type | labels | what |
/// |---|---|---|---|
/// | `kvsync_backend_requests_total` | counter | `backend`, `op`, `outcome` | calls made, by operation and outcome (`ok` or the error's kind) |
/// | `kvsync_backend_request_duration_seconds` | histogram | `backend`, `op` | how long calls took (a watch or a paged list: until it opened) |
/// | `kvsync_backend_watch_events_total` | counter | `backend`, `kind` | events delivered by watches |
///
/// ```
/// use kvsync_backend::ClientMetrics;
///
/// let mut registry = prometheus_client::registry::Registry::default();
/// let metrics = ClientMetrics::new(&mut registry);
/// # let _ = metrics;
/// ```
#[derive(Clone)]
pub struct ClientMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<OpLabels, Histogram, fn() -> Histogram>,
    watch_events: Family<KindLabels, Counter>,
}

impl fmt::Debug for ClientMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientMetrics").finish_non_exhaustive()
    }
}

impl ClientMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ClientMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            watch_events: Family::default(),
        };
        registry.register(
            "kvsync_backend_requests",
            "Datastore calls, by operation and outcome",
            m.requests.clone(),
        );
        registry.register(
            "kvsync_backend_request_duration_seconds",
            "How long datastore calls took (watches and paged lists: until they opened)",
            m.duration.clone(),
        );
        registry.register(
            "kvsync_backend_watch_events",
            "Events delivered by watches",
            m.watch_events.clone(),
        );
        m
    }
}

/// The name of an error's kind, as the `outcome` label says it.
pub(crate) fn outcome(e: &Error) -> &'static str {
    match e {
        Error::NotFound { .. } => "not_found",
        Error::AlreadyExists { .. } => "already_exists",
        Error::Conflict { .. } => "conflict",
        Error::Compacted { .. } => "compacted",
        Error::Unavailable { .. } => "unavailable",
        Error::Invalid { .. } => "invalid",
        Error::Parse { .. } => "parse",
        Error::LeaseLost { .. } => "lease_lost",
        Error::NotHeld { .. } => "not_held",
        Error::Timeout { .. } => "timeout",
        Error::Unauthorized { .. } => "unauthorized",
        Error::Unsupported { .. } => "unsupported",
    }
}

/// Wraps a client: every call runs in a `tracing` span (`kvsync.backend`, with the fields an
/// operator filters by: `op`, `backend`, `kind`, `key`, and `revision` once known) and, with
/// [`ClientMetrics`], is counted and timed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use kvsync_backend::{Client, ClientMetrics, Instrumented, MemoryBackend};
/// use kvsync_model::{KVPair, ResourceKey, demo};
///
/// let mut registry = prometheus_client::registry::Registry::default();
/// let client = Instrumented::new(MemoryBackend::new(demo::registry()))
///     .with_metrics(ClientMetrics::new(&mut registry));
/// client
///     .create(KVPair::new(ResourceKey::cluster("IPPool", "a"), serde_json::json!({"cidr": "10.0.0.0/16"})))
///     .await?;
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
/// assert!(text.contains(r#"kvsync_backend_requests_total{backend="memory",op="create",outcome="ok"} 1"#));
/// # Ok(()) }
/// ```
pub struct Instrumented<C> {
    inner: C,
    metrics: Option<ClientMetrics>,
}

impl<C: Client> fmt::Debug for Instrumented<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instrumented")
            .field("backend", &self.inner.backend_name())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

impl<C: Client> Instrumented<C> {
    /// `inner`, with spans and no metrics.
    pub fn new(inner: C) -> Self {
        Instrumented {
            inner,
            metrics: None,
        }
    }

    /// Counts and times every call into `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: ClientMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The wrapped client.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// Runs `call` as the operation `op` in `span`, counting and timing it; the revision of
    /// what it returns goes into the span.
    async fn observe<T>(
        &self,
        op: &'static str,
        span: tracing::Span,
        revision_of: impl FnOnce(&T) -> Option<&Revision>,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = call.instrument(span.clone()).await;
        if let Ok(v) = &result
            && let Some(r) = revision_of(v)
        {
            span.record("revision", tracing::field::display(r));
        }
        if let Some(m) = &self.metrics {
            let backend = self.inner.backend_name();
            let outcome = result.as_ref().map_or_else(outcome, |_| "ok");
            m.requests
                .get_or_create(&RequestLabels {
                    backend,
                    op,
                    outcome,
                })
                .inc();
            m.duration
                .get_or_create(&OpLabels { backend, op })
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    fn span(&self, op: &'static str, kind: &str, key: Option<&ResourceKey>) -> tracing::Span {
        tracing::debug_span!(
            "kvsync.backend",
            op,
            backend = self.inner.backend_name(),
            kind,
            key = key.map(tracing::field::display),
            revision = tracing::field::Empty,
        )
    }
}

fn kvp_revision(k: &KVPair) -> Option<&Revision> {
    k.revision.as_ref()
}

fn no_revision<T>(_: &T) -> Option<&Revision> {
    None
}

#[async_trait]
impl<C: Client> Client for Instrumented<C> {
    fn codec(&self) -> &PathCodec {
        self.inner.codec()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        let span = self.span(mode.as_str(), &kvp.key.kind, Some(&kvp.key));
        self.observe(
            mode.as_str(),
            span,
            kvp_revision,
            self.inner.write(kvp, mode),
        )
        .await
    }

    async fn create(&self, kvp: KVPair) -> Result<KVPair> {
        let span = self.span("create", &kvp.key.kind, Some(&kvp.key));
        self.observe("create", span, kvp_revision, self.inner.create(kvp))
            .await
    }

    async fn update(&self, kvp: KVPair) -> Result<KVPair> {
        let span = self.span("update", &kvp.key.kind, Some(&kvp.key));
        self.observe("update", span, kvp_revision, self.inner.update(kvp))
            .await
    }

    async fn apply(&self, kvp: KVPair) -> Result<KVPair> {
        let span = self.span("apply", &kvp.key.kind, Some(&kvp.key));
        self.observe("apply", span, kvp_revision, self.inner.apply(kvp))
            .await
    }

    async fn delete(&self, key: &ResourceKey, opts: &DeleteOptions) -> Result<KVPair> {
        let span = self.span("delete", &key.kind, Some(key));
        self.observe("delete", span, kvp_revision, self.inner.delete(key, opts))
            .await
    }

    async fn get(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair> {
        let span = self.span("get", &key.kind, Some(key));
        self.observe("get", span, kvp_revision, self.inner.get(key, opts))
            .await
    }

    async fn get_opt(&self, key: &ResourceKey, opts: &GetOptions) -> Result<Option<KVPair>> {
        let span = self.span("get", &key.kind, Some(key));
        self.observe(
            "get",
            span,
            |k: &Option<KVPair>| k.as_ref().and_then(kvp_revision),
            self.inner.get_opt(key, opts),
        )
        .await
    }

    async fn list(&self, opts: &ListOptions) -> Result<KVList> {
        let span = self.span("list", &opts.kind, None);
        self.observe(
            "list",
            span,
            |l: &KVList| Some(&l.revision),
            self.inner.list(opts),
        )
        .await
    }

    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        let span = self.span("list", &opts.kind, None);
        self.observe("list", span, no_revision, self.inner.list_pages(opts))
            .await
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        let span = self.span("watch", &opts.kind, None);
        if let Some(r) = &opts.revision {
            span.record("revision", tracing::field::display(r));
        }
        let stream = self
            .observe("watch", span, no_revision, self.inner.watch(opts))
            .await?;
        Ok(match &self.metrics {
            Some(m) => {
                let events = m
                    .watch_events
                    .get_or_create(&KindLabels {
                        backend: self.inner.backend_name(),
                        kind: opts.kind.clone(),
                    })
                    .clone();
                stream
                    .inspect(move |item| {
                        if item.is_ok() {
                            events.inc();
                        }
                    })
                    .boxed()
            }
            None => stream,
        })
    }

    async fn ensure_initialized(&self) -> Result<()> {
        let span = self.span("ensure_initialized", "", None);
        self.observe(
            "ensure_initialized",
            span,
            no_revision,
            self.inner.ensure_initialized(),
        )
        .await
    }

    async fn clean(&self) -> Result<()> {
        let span = self.span("clean", "", None);
        self.observe("clean", span, no_revision, self.inner.clean())
            .await
    }

    async fn current_revision(&self) -> Result<Revision> {
        let span = self.span("current_revision", "", None);
        self.observe(
            "current_revision",
            span,
            |r: &Revision| Some(r),
            self.inner.current_revision(),
        )
        .await
    }

    async fn compact(&self, revision: &Revision) -> Result<()> {
        let span = self.span("compact", "", None);
        span.record("revision", tracing::field::display(revision));
        self.observe("compact", span, no_revision, self.inner.compact(revision))
            .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let span = self.span("txn", "", None);
        self.observe(
            "txn",
            span,
            |r: &TxnResponse| Some(&r.revision),
            self.inner.txn(txn),
        )
        .await
    }

    async fn lease_grant(&self, ttl: std::time::Duration) -> Result<LeaseId> {
        let span = self.span("lease_grant", "", None);
        self.observe(
            "lease_grant",
            span,
            no_revision,
            self.inner.lease_grant(ttl),
        )
        .await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<std::time::Duration> {
        let span = self.span("lease_keep_alive", "", None);
        self.observe(
            "lease_keep_alive",
            span,
            no_revision,
            self.inner.lease_keep_alive(lease),
        )
        .await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let span = self.span("lease_revoke", "", None);
        self.observe(
            "lease_revoke",
            span,
            no_revision,
            self.inner.lease_revoke(lease),
        )
        .await
    }

    fn lock_records(&self) -> Option<&dyn crate::LockRecords> {
        self.inner.lock_records()
    }
}

/// An [`Instrumented`] client shared as `Arc<dyn Client>`, the form the Syncer and the
/// coordination helpers take.
pub fn instrumented(inner: Arc<dyn Client>, metrics: Option<ClientMetrics>) -> Arc<dyn Client> {
    let mut c = Instrumented::new(inner);
    c.metrics = metrics;
    Arc::new(c)
}
