//! An in-process MVCC store that behaves like etcd's `mvcc` package.
//!
//! One global revision counter; per key a create and a modify revision; a bounded history of
//! every write (explicit and automatic compaction); watches from any revision still in history;
//! TTLs that expire keys with a `Deleted` event. Writers are serialised by one short mutex, so
//! concurrent writers never lose an update and revisions are handed out in commit order.
//!
//! Use it for tests, examples and single-process programs; nothing is persisted.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use kvsync_model::{
    DEFAULT_PREFIX, DeleteOptions, GetOptions, KVList, KVPair, ListOptions, PathCodec, Registry,
    ResourceKey, Revision,
};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::{
    check_delete, check_write, counter_revision, decode_entry, encode_for_write, fuse_after_error,
    parse_error, push_listed, put_event, undecodable_last_value,
};
use crate::watch::{WatchEvent, WatchStream};

/// How many writes the history keeps by default before compacting automatically.
pub const DEFAULT_HISTORY_LIMIT: usize = 100_000;

/// How many history entries a watch reads per lock.
const WATCH_CHUNK: usize = 512;

/// The in-memory MVCC backend. Cheap to clone: clones share the store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use kvsync_backend::{Client, MemoryBackend};
/// use kvsync_model::{GetOptions, KVPair, KindInfo, Registry, ResourceKey, Revision};
///
/// let registry = Registry::new().with_kind(KindInfo::untyped("example.com", "Node", "nodes", false));
/// let store = MemoryBackend::builder(registry).history_limit(1_000).build()?;
/// let key = ResourceKey::cluster("Node", "n1");
/// let v1 = store.create(KVPair::new(key.clone(), serde_json::json!({}))).await?;
/// store.apply(KVPair::new(key.clone(), serde_json::json!({"asn": 64512}))).await?;
/// // Old revisions stay readable until compacted.
/// let at_v1 = GetOptions::new().with_revision(v1.revision.clone().unwrap());
/// assert_eq!(store.get(&key, &at_v1).await?.value, serde_json::json!({}));
/// store.compact(&Revision::from(store.revision())).await?;
/// assert!(store.get(&key, &at_v1).await.is_err());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

struct Inner {
    codec: PathCodec,
    store: Mutex<Store>,
    rev_tx: watch::Sender<u64>,
    ttl_notify: Arc<Notify>,
    sweeper_started: AtomicBool,
    history_limit: usize,
}

#[derive(Clone)]
struct Record {
    value: Arc<[u8]>,
    create_rev: u64,
    mod_rev: u64,
    uid: Arc<str>,
    ttl: Option<Duration>,
    expires_at: Option<Instant>,
}

struct LogEntry {
    rev: u64,
    path: Arc<str>,
    new: Option<Record>,
    prev: Option<Record>,
}

#[derive(Default)]
struct Store {
    rev: u64,
    compacted: u64,
    current: BTreeMap<Arc<str>, Record>,
    log: VecDeque<LogEntry>,
    expiries: BTreeSet<(Instant, Arc<str>)>,
}

impl Store {
    /// Records a write (or a delete when `new` is `None`) at the next revision.
    fn commit(&mut self, path: Arc<str>, new: Option<Record>, history_limit: usize) -> u64 {
        self.rev += 1;
        let rev = self.rev;
        let new = new.map(|mut r| {
            r.mod_rev = rev;
            if r.create_rev == 0 {
                r.create_rev = rev;
            }
            r
        });
        let prev = match &new {
            Some(r) => self.current.insert(path.clone(), r.clone()),
            None => self.current.remove(&path),
        };
        if let Some(t) = prev.as_ref().and_then(|p| p.expires_at) {
            self.expiries.remove(&(t, path.clone()));
        }
        if let Some(t) = new.as_ref().and_then(|r| r.expires_at) {
            self.expiries.insert((t, path.clone()));
        }
        self.log.push_back(LogEntry {
            rev,
            path,
            new,
            prev,
        });
        while self.log.len() > history_limit.max(1) {
            if let Some(e) = self.log.pop_front() {
                self.compacted = self.compacted.max(e.rev + 1);
            }
        }
        rev
    }

    /// Deletes every key whose TTL ran out by `now`, each at its own revision.
    fn expire_due(&mut self, now: Instant, history_limit: usize) -> bool {
        let mut any = false;
        while let Some((t, path)) = self.expiries.first().cloned() {
            if t > now {
                break;
            }
            self.expiries.pop_first();
            self.commit(path, None, history_limit);
            any = true;
        }
        any
    }

    fn check_revision(&self, requested: u64) -> Result<()> {
        if requested < self.compacted {
            return Err(Error::Compacted {
                requested: requested.into(),
                compacted: Some(self.compacted.into()),
            });
        }
        if requested > self.rev {
            return Err(Error::invalid(
                "revision",
                format!(
                    "{requested} is newer than the store's revision {}",
                    self.rev
                ),
            ));
        }
        Ok(())
    }

    /// The log entries after revision `after`, oldest first.
    fn log_after(&self, after: u64) -> impl Iterator<Item = &LogEntry> {
        let skip = match self.log.front() {
            Some(front) => {
                usize::try_from((after + 1).saturating_sub(front.rev)).unwrap_or(usize::MAX)
            }
            None => 0,
        };
        self.log.iter().skip(skip)
    }

    /// The record of `path` as of revision `at`.
    fn record_at(&self, path: &str, at: u64) -> Option<Record> {
        let mut rec = self.current.get(path).cloned();
        for e in self.log_after(at).collect::<Vec<_>>().into_iter().rev() {
            if &*e.path == path {
                rec = e.prev.clone();
            }
        }
        rec
    }
}

fn parse_rev(r: &Revision) -> Result<u64> {
    counter_revision(r, "memory")
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("prefix", &self.inner.codec.prefix())
            .field("revision", &self.revision())
            .finish()
    }
}

/// Builds a [`MemoryBackend`].
#[derive(Debug)]
pub struct MemoryBackendBuilder {
    prefix: String,
    registry: Arc<Registry>,
    history_limit: usize,
}

impl MemoryBackendBuilder {
    /// The key prefix (default `/kvsync/v1`).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many writes the history keeps before compacting automatically (default 100,000).
    #[must_use]
    pub fn history_limit(mut self, limit: usize) -> Self {
        self.history_limit = limit;
        self
    }

    /// The backend.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad prefix or a zero history limit.
    pub fn build(self) -> Result<MemoryBackend> {
        if self.history_limit == 0 {
            return Err(Error::invalid("history_limit", "must be at least 1"));
        }
        let codec = PathCodec::new(self.prefix, self.registry)?;
        Ok(MemoryBackend {
            inner: Arc::new(Inner {
                codec,
                store: Mutex::new(Store::default()),
                rev_tx: watch::Sender::new(0),
                ttl_notify: Arc::new(Notify::new()),
                sweeper_started: AtomicBool::new(false),
                history_limit: self.history_limit,
            }),
        })
    }
}

impl MemoryBackend {
    /// A store of the kinds in `registry`, with the default prefix and history limit.
    pub fn new(registry: impl Into<Arc<Registry>>) -> Self {
        MemoryBackend {
            inner: Arc::new(Inner {
                codec: PathCodec::with_registry(registry),
                store: Mutex::new(Store::default()),
                rev_tx: watch::Sender::new(0),
                ttl_notify: Arc::new(Notify::new()),
                sweeper_started: AtomicBool::new(false),
                history_limit: DEFAULT_HISTORY_LIMIT,
            }),
        }
    }

    /// A builder of a store of the kinds in `registry`, to choose the prefix and the history
    /// limit.
    pub fn builder(registry: impl Into<Arc<Registry>>) -> MemoryBackendBuilder {
        MemoryBackendBuilder {
            prefix: DEFAULT_PREFIX.to_owned(),
            registry: registry.into(),
            history_limit: DEFAULT_HISTORY_LIMIT,
        }
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.lock().rev
    }

    /// The revision history was last compacted at (0 if never).
    pub fn compacted_revision(&self) -> u64 {
        self.lock().compacted
    }

    /// Stores `bytes` under `path` as they are, bypassing validation, as a foreign writer
    /// could. For tests of how readers handle undecodable data (feature `testing`).
    #[cfg(feature = "testing")]
    pub fn put_raw(&self, path: &str, bytes: &[u8]) -> u64 {
        let mut store = self.lock();
        let prev = store.current.get(path).cloned();
        let rec = Record {
            value: bytes.into(),
            create_rev: prev.as_ref().map_or(0, |p| p.create_rev),
            mod_rev: 0,
            uid: prev.map_or_else(new_uid, |p| p.uid),
            ttl: None,
            expires_at: None,
        };
        let rev = store.commit(path.into(), Some(rec), self.inner.history_limit);
        drop(store);
        self.inner.rev_tx.send_replace(rev);
        rev
    }

    /// The list `opts` asks for, read under one lock.
    fn list_now(&self, opts: &ListOptions) -> Result<KVList> {
        let prefix = self.inner.codec.list_prefix(opts)?;
        let store = self.lock();
        let at = match &opts.revision {
            Some(r) => {
                let at = parse_rev(r)?;
                store.check_revision(at)?;
                at
            }
            None => store.rev,
        };
        let mut records: BTreeMap<Arc<str>, Record> = store
            .current
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(p, _)| p.starts_with(prefix.as_str()))
            .map(|(p, r)| (p.clone(), r.clone()))
            .collect();
        if at < store.rev {
            let undo: Vec<&LogEntry> = store.log_after(at).collect();
            for e in undo.into_iter().rev() {
                if e.path.starts_with(prefix.as_str()) {
                    match &e.prev {
                        Some(p) => records.insert(e.path.clone(), p.clone()),
                        None => records.remove(&e.path),
                    };
                }
            }
        }
        drop(store);
        let mut list = KVList {
            items: Vec::with_capacity(records.len()),
            revision: at.into(),
            parse_failures: Vec::new(),
        };
        for (path, rec) in &records {
            push_listed(&mut list, opts, self.to_kvp(path, rec));
        }
        Ok(list)
    }

    /// Locks the store and expires due keys first, so no read sees an expired key.
    fn lock(&self) -> MutexGuard<'_, Store> {
        let mut store = self
            .inner
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if store.expire_due(Instant::now(), self.inner.history_limit) {
            self.inner.rev_tx.send_replace(store.rev);
        }
        store
    }

    fn to_kvp(&self, path: &str, rec: &Record) -> Result<KVPair, Box<kvsync_model::ParseFailure>> {
        let (key, value) = decode_entry(
            &self.inner.codec,
            path,
            &rec.value,
            Some(rec.mod_rev.into()),
        )?;
        Ok(KVPair {
            key,
            value,
            revision: Some(rec.mod_rev.into()),
            create_revision: Some(rec.create_rev.into()),
            uid: Some(rec.uid.to_string()),
            ttl: rec.ttl,
        })
    }

    fn write_now(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        let (path, bytes) = encode_for_write(&self.inner.codec, &kvp)?;
        let expires_at = kvp.ttl.map(|t| Instant::now() + t);
        let mut store = self.lock();
        let prev = store.current.get(path.as_str()).cloned();
        let current = prev.as_ref().map(|p| Revision::from(p.mod_rev));
        check_write(&kvp.key, mode, kvp.revision.as_ref(), current.as_ref())?;
        let uid = prev.as_ref().map_or_else(new_uid, |p| p.uid.clone());
        let rec = Record {
            value: bytes.into(),
            create_rev: prev.as_ref().map_or(0, |p| p.create_rev),
            mod_rev: 0,
            uid: uid.clone(),
            ttl: kvp.ttl,
            expires_at,
        };
        let rev = store.commit(path.into(), Some(rec), self.inner.history_limit);
        let create_rev = prev.as_ref().map_or(rev, |p| p.create_rev);
        drop(store);
        self.inner.rev_tx.send_replace(rev);
        if kvp.ttl.is_some() {
            self.start_sweeper();
            self.inner.ttl_notify.notify_one();
        }
        Ok(KVPair {
            key: kvp.key,
            value: kvp.value,
            revision: Some(rev.into()),
            create_revision: Some(create_rev.into()),
            uid: Some(uid.to_string()),
            ttl: kvp.ttl,
        })
    }

    /// Starts the task that expires keys while nobody calls the store, so watchers see
    /// `Deleted` on time. Without a tokio runtime, keys still expire on the next call.
    fn start_sweeper(&self) {
        if self.inner.sweeper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.inner.sweeper_started.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let notify = self.inner.ttl_notify.clone();
        handle.spawn(async move {
            loop {
                let next = {
                    let Some(inner) = weak.upgrade() else { return };
                    let backend = MemoryBackend { inner };
                    let store = backend.lock();
                    store.expiries.first().map(|(t, _)| *t)
                };
                // Wake at the next expiry, on a new TTL, or after a second to notice that the
                // store was dropped.
                let wake = next
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
                    .min(Instant::now() + Duration::from_secs(1));
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => {}
                    () = notify.notified() => {}
                }
            }
        });
    }
}

fn new_uid() -> Arc<str> {
    uuid::Uuid::new_v4().to_string().into()
}

#[async_trait]
impl Client for MemoryBackend {
    fn codec(&self) -> &PathCodec {
        &self.inner.codec
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::revision_log()
    }

    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        self.write_now(kvp, mode)
    }

    async fn delete(&self, key: &ResourceKey, opts: &DeleteOptions) -> Result<KVPair> {
        let path = self.inner.codec.to_path(key)?;
        let mut store = self.lock();
        let Some(prev) = store.current.get(path.as_str()).cloned() else {
            return Err(Error::NotFound { key: key.clone() });
        };
        check_delete(key, opts, &prev.mod_rev.into(), Some(&prev.uid))?;
        let rev = store.commit(path.as_str().into(), None, self.inner.history_limit);
        drop(store);
        self.inner.rev_tx.send_replace(rev);
        // A value that no longer decodes is still deleted; it is returned as null.
        Ok(self.to_kvp(&path, &prev).unwrap_or_else(|_| {
            undecodable_last_value(
                key,
                prev.mod_rev.into(),
                Some(prev.create_rev.into()),
                Some(prev.uid.to_string()),
            )
        }))
    }

    async fn get(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair> {
        let path = self.inner.codec.to_path(key)?;
        let store = self.lock();
        let rec = match &opts.revision {
            Some(r) => {
                let at = parse_rev(r)?;
                store.check_revision(at)?;
                store.record_at(&path, at)
            }
            None => store.current.get(path.as_str()).cloned(),
        };
        drop(store);
        let rec = rec.ok_or_else(|| Error::NotFound { key: key.clone() })?;
        self.to_kvp(&path, &rec).map_err(|f| parse_error(*f))
    }

    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        let list = self.list_now(opts)?;
        Ok(futures::stream::once(async move { Ok(list) }).boxed())
    }

    async fn list(&self, opts: &ListOptions) -> Result<KVList> {
        self.list_now(opts)
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        let prefix = self.inner.codec.list_prefix(opts)?;
        let store = self.lock();
        let after = match &opts.revision {
            Some(r) => {
                let after = parse_rev(r)?;
                if after + 1 < store.compacted {
                    return Err(Error::Compacted {
                        requested: r.clone(),
                        compacted: Some(store.compacted.into()),
                    });
                }
                after
            }
            None => store.rev,
        };
        drop(store);
        let state = WatchState {
            backend: self.clone(),
            rx: self.inner.rev_tx.subscribe(),
            opts: opts.clone(),
            prefix,
            after,
            buf: VecDeque::new(),
        };
        Ok(fuse_after_error(futures::stream::unfold(
            state,
            WatchState::next,
        )))
    }
    async fn clean(&self) -> Result<()> {
        let prefix = format!("{}/", self.inner.codec.prefix());
        let mut store = self.lock();
        let paths: Vec<Arc<str>> = store
            .current
            .keys()
            .filter(|p| p.starts_with(prefix.as_str()))
            .cloned()
            .collect();
        for p in paths {
            store.commit(p, None, self.inner.history_limit);
        }
        let rev = store.rev;
        drop(store);
        self.inner.rev_tx.send_replace(rev);
        Ok(())
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.revision().into())
    }

    async fn compact(&self, revision: &Revision) -> Result<()> {
        let rev = parse_rev(revision)?;
        let mut store = self.lock();
        if rev > store.rev {
            return Err(Error::invalid(
                "revision",
                format!("cannot compact at {rev}: the store is at {}", store.rev),
            ));
        }
        while store.log.front().is_some_and(|e| e.rev < rev) {
            store.log.pop_front();
        }
        store.compacted = store.compacted.max(rev);
        Ok(())
    }
}

struct WatchState {
    backend: MemoryBackend,
    rx: watch::Receiver<u64>,
    opts: ListOptions,
    prefix: String,
    after: u64,
    buf: VecDeque<WatchEvent>,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                return Some((Ok(ev), self));
            }
            self.rx.borrow_and_update();
            if let Err(e) = self.fill() {
                // The stream ends after it (fuse_after_error).
                return Some((Err(e), self));
            }
            if self.buf.is_empty() && self.rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Reads the next chunk of history into the buffer.
    fn fill(&mut self) -> Result<()> {
        let store = self.backend.lock();
        if self.after + 1 < store.compacted {
            return Err(Error::Compacted {
                requested: self.after.into(),
                compacted: Some(store.compacted.into()),
            });
        }
        let entries: Vec<&LogEntry> = store.log_after(self.after).take(WATCH_CHUNK).collect();
        let scanned = !entries.is_empty();
        let buffered = self.buf.len();
        for e in entries {
            self.after = e.rev;
            if !e.path.starts_with(self.prefix.as_str()) {
                continue;
            }
            if let Some(ev) = self.event(e) {
                self.buf.push_back(ev);
            }
        }
        // Writes outside the watch moved the revision on: say so, so that a watcher's resume
        // point stays fresh (etcd's progress notifications).
        if scanned && self.buf.len() == buffered {
            self.buf.push_back(WatchEvent::Bookmark(self.after.into()));
        }
        Ok(())
    }

    fn event(&self, e: &LogEntry) -> Option<WatchEvent> {
        let old = e
            .prev
            .as_ref()
            .and_then(|p| self.backend.to_kvp(&e.path, p).ok());
        match &e.new {
            Some(rec) => put_event(
                &self.opts,
                self.backend.to_kvp(&e.path, rec),
                e.prev.is_none(),
                old,
            ),
            None => {
                let key = self.backend.inner.codec.from_path(&e.path).ok()?;
                self.opts.matches(&key).then(|| WatchEvent::Deleted {
                    key,
                    revision: e.rev.into(),
                    old,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> KVPair {
        KVPair::new(ResourceKey::cluster("Node", name), json!({}))
    }

    #[tokio::test]
    async fn history_limit_compacts_automatically() {
        let store = MemoryBackend::builder(kvsync_model::demo::registry())
            .history_limit(3)
            .build()
            .unwrap();
        for i in 0..5 {
            store.create(node(&format!("n{i}"))).await.unwrap();
        }
        assert_eq!(store.revision(), 5);
        // Entries 3, 4 and 5 are kept: a watch from 2 still works, from 1 does not.
        assert!(
            store
                .watch(
                    &ListOptions::new("Node")
                        .with_revision(kvsync_model::Revision::from(2u64).clone())
                )
                .await
                .is_ok()
        );
        let err = store
            .watch(
                &ListOptions::new("Node").with_revision(kvsync_model::Revision::from(1u64).clone()),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::Compacted { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_the_history_gets_compacted() {
        let store = MemoryBackend::builder(kvsync_model::demo::registry())
            .history_limit(10)
            .build()
            .unwrap();
        let mut w = store.watch(&ListOptions::new("Node")).await.unwrap();
        for i in 0..50 {
            store.create(node(&format!("n{i}"))).await.unwrap();
        }
        let first = w.next().await.unwrap();
        assert!(matches!(first, Err(Error::Compacted { .. })), "{first:?}");
        assert!(w.next().await.is_none(), "the stream ends after Compacted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_get_distinct_increasing_revisions() {
        let store = MemoryBackend::new(kvsync_model::demo::registry());
        let mut w = store.watch(&ListOptions::new("Node")).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let s = store.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        s.apply(node(&format!("t{t}-{}", i % 10))).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut last = 0;
        for _ in 0..800 {
            let ev = w.next().await.unwrap().unwrap();
            let r = ev.revision().and_then(Revision::as_u64).unwrap();
            assert_eq!(r, last + 1, "no gap and no reordering");
            last = r;
        }
        assert_eq!(last, 800);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_keys_vanish_from_reads_without_a_sweeper_tick() {
        let store = MemoryBackend::new(kvsync_model::demo::registry());
        store
            .create(node("n").with_ttl(Duration::from_secs(5)))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(
            store
                .get(
                    &ResourceKey::cluster("Node", "n"),
                    &kvsync_model::GetOptions::new()
                )
                .await
                .is_ok()
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let err = store
            .get(
                &ResourceKey::cluster("Node", "n"),
                &kvsync_model::GetOptions::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }));
        assert_eq!(store.revision(), 2, "the expiry is a write of its own");
    }
}
