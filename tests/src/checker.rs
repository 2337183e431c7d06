//! An invariant-checking Syncer consumer, like Calico's `syncertester`: it applies every batch
//! to a map and records every rule the Syncer breaks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kvsync_backend::Client;
use kvsync_model::{ListOptions, ResourceKey, Revision};
use kvsync_syncer::{SyncStatus, SyncerEvent, SyncerStream, UpdateType};
use serde_json::Value;

/// The consumer's cache: key -> (value, revision).
pub type Cache = BTreeMap<ResourceKey, (Value, Option<Revision>)>;

/// What a checking consumer saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// The map built by applying every batch.
    pub cache: Cache,
    /// Every status, in order.
    pub statuses: Vec<SyncStatus>,
    /// Every rule broken, in words.
    pub violations: Vec<String>,
    /// Size of every batch.
    pub batch_sizes: Vec<usize>,
    /// Parse failures reported.
    pub parse_failures: usize,
    /// Errors reported.
    pub errors: usize,
    /// Updates of each type.
    pub counts: BTreeMap<String, usize>,
}

impl Seen {
    /// The last status.
    pub fn status(&self) -> Option<SyncStatus> {
        self.statuses.last().copied()
    }

    /// Applies one event, checking the rules.
    pub fn apply(&mut self, ev: SyncerEvent) {
        match ev {
            SyncerEvent::Status(s) => {
                if self.statuses.is_empty() && s != SyncStatus::WaitForDatastore {
                    self.violations
                        .push(format!("first status is {s}, not WaitForDatastore"));
                }
                if self.statuses.last() == Some(&s) {
                    self.violations
                        .push(format!("status {s} reported twice in a row"));
                }
                self.statuses.push(s);
            }
            SyncerEvent::Updates(batch) => {
                self.batch_sizes.push(batch.len());
                for u in batch {
                    *self.counts.entry(u.update_type.to_string()).or_default() += 1;
                    let key = u.kvp.key.clone();
                    let present = self.cache.get(&key);
                    match u.update_type {
                        UpdateType::New if present.is_some() => {
                            self.violations
                                .push(format!("New for {key}, which is present"));
                        }
                        UpdateType::Updated | UpdateType::Deleted if present.is_none() => {
                            self.violations
                                .push(format!("{} for {key}, which is absent", u.update_type));
                        }
                        _ => {}
                    }
                    if u.update_type != UpdateType::Deleted
                        && let Some((_, Some(old))) = present
                        && let (Some(o), Some(n)) = (
                            old.as_u64(),
                            u.kvp.revision.as_ref().and_then(Revision::as_u64),
                        )
                        && n <= o
                    {
                        self.violations.push(format!(
                            "{key}: revision {n} after {o}, not in revision order"
                        ));
                    }
                    match u.update_type {
                        UpdateType::Deleted => {
                            self.cache.remove(&key);
                        }
                        _ => {
                            self.cache.insert(
                                key,
                                (
                                    Value::try_from(u.kvp.value).expect("readable value"),
                                    u.kvp.revision,
                                ),
                            );
                        }
                    }
                }
            }
            SyncerEvent::ParseFailed(_) => self.parse_failures += 1,
            SyncerEvent::Error(_) => self.errors += 1,
        }
    }
}

/// A short description of how two caches differ.
pub fn diff(expected: &Cache, actual: &Cache) -> String {
    let mut out = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => out.push(format!("missing {k}")),
            Some(a) if a != v => out.push(format!("{k}: expected {v:?}, got {a:?}")),
            _ => {}
        }
    }
    for k in actual.keys() {
        if !expected.contains_key(k) {
            out.push(format!("extra {k}"));
        }
    }
    out.truncate(10);
    out.join("; ")
}

/// Reads the datastore's state of the given list options as a cache.
///
/// # Panics
/// When a list fails.
pub async fn datastore_state(client: &dyn Client, kinds: &[ListOptions]) -> Cache {
    let mut cache = Cache::new();
    for opts in kinds {
        let list = client.list(opts).await.expect("list the datastore");
        for kvp in list.items {
            cache.insert(
                kvp.key,
                (
                    Value::try_from(kvp.value).expect("readable value"),
                    kvp.revision,
                ),
            );
        }
    }
    cache
}

/// A consumer task applying a Syncer's events to a shared [`Seen`].
pub struct CheckingConsumer {
    /// What it saw so far.
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<Option<SyncerStream>>,
    stop: tokio::sync::oneshot::Sender<()>,
    paused: tokio::sync::watch::Sender<bool>,
}

impl CheckingConsumer {
    /// Starts consuming a Syncer's `stream`.
    pub fn start(stream: SyncerStream) -> Self {
        Self::spawn(Box::new(stream), true)
    }

    /// Starts consuming any stream of Syncer events (a `RemoteSyncer`'s).
    pub fn start_stream(stream: futures::stream::BoxStream<'static, SyncerEvent>) -> Self {
        Self::spawn(Box::new(Remote(stream)), false)
    }

    fn spawn(mut stream: Box<dyn EventSource>, local: bool) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel();
        let (paused, mut paused_rx) = tokio::sync::watch::channel(false);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                // While paused, the stream is not polled: nothing is read from it.
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = paused_rx.wait_for(|p| !*p) => {}
                }
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = paused_rx.changed() => {}
                    ev = stream.next_event() => match ev {
                        Some(ev) => s.lock().expect("lock").apply(ev),
                        None => break,
                    },
                }
            }
            if local { stream.into_syncer() } else { None }
        });
        CheckingConsumer {
            seen,
            task,
            stop,
            paused,
        }
    }

    /// Stops reading the stream (`true`) or reads it again (`false`): a consumer that does
    /// not keep up.
    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// Runs `f` on what was seen so far.
    pub fn with<T>(&self, f: impl FnOnce(&mut Seen) -> T) -> T {
        f(&mut self.seen.lock().expect("lock"))
    }

    /// Waits until `cond` holds, up to `timeout`; returns whether it did.
    pub async fn wait_for(&self, timeout: Duration, mut cond: impl FnMut(&Seen) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.with(|s| cond(s)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops consuming and stops the Syncer; returns what was seen.
    ///
    /// # Panics
    /// If the consumer task panicked.
    pub async fn stop(self) -> Seen {
        let _ = self.stop.send(());
        if let Some(stream) = self.task.await.expect("consumer task") {
            stream.stop().await;
        }
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

/// Where a [`CheckingConsumer`] reads events from.
#[async_trait::async_trait]
trait EventSource: Send {
    async fn next_event(&mut self) -> Option<SyncerEvent>;
    fn into_syncer(self: Box<Self>) -> Option<SyncerStream>;
}

#[async_trait::async_trait]
impl EventSource for SyncerStream {
    async fn next_event(&mut self) -> Option<SyncerEvent> {
        self.next().await
    }

    fn into_syncer(self: Box<Self>) -> Option<SyncerStream> {
        Some(*self)
    }
}

struct Remote(futures::stream::BoxStream<'static, SyncerEvent>);

#[async_trait::async_trait]
impl EventSource for Remote {
    async fn next_event(&mut self) -> Option<SyncerEvent> {
        self.0.next().await
    }

    fn into_syncer(self: Box<Self>) -> Option<SyncerStream> {
        None
    }
}
