//! An in-process MVCC store that behaves like etcd's `mvcc` package.
//!
//! One global revision counter; per key a create and a modify revision; a bounded history of
//! every write (explicit and automatic compaction); watches from any revision still in history;
//! TTLs that expire keys with a `Deleted` event. Writers are serialised by one short mutex, so
//! concurrent writers never lose an update and revisions are handed out in commit order.
//!
//! Use it for tests, examples and single-process programs; nothing is persisted.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use kvsync_model::{
    DEFAULT_PREFIX, DeleteOptions, GetOptions, KVList, KVPair, ListOptions, PathCodec, Registry,
    ResourceKey, Revision,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::check_lease_ttl;
use crate::kernel::{
    check_delete, check_write, decode_entry, encode_for_write, one_page, parse_error, push_listed,
    undecodable_last_value,
};
use crate::lease::LeaseId;
use crate::txn::{Txn, TxnResponse, TxnResult, evaluate, prepare};
use crate::watch::WatchStream;

mod store;
mod watch;

use store::{LogEntry, MemLease, Record, Store, parse_rev};
use watch::WatchState;

/// How many writes the history keeps by default before compacting automatically.
pub const DEFAULT_HISTORY_LIMIT: usize = 100_000;

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
    rev_tx: tokio::sync::watch::Sender<u64>,
    ttl_notify: Arc<Notify>,
    sweeper_started: AtomicBool,
    history_limit: usize,
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
                rev_tx: tokio::sync::watch::Sender::new(0),
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
                rev_tx: tokio::sync::watch::Sender::new(0),
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
            lease: None,
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
        let mut store = self.lock();
        let prev = store.current.get(path.as_str()).cloned();
        let current = prev.as_ref().map(|p| Revision::from(p.mod_rev));
        check_write(&kvp.key, mode, kvp.revision.as_ref(), current.as_ref())?;
        let ttl = kvp.ttl.is_some();
        let stored = self.put_locked(&mut store, kvp, path, bytes, None, prev);
        let rev = store.rev;
        drop(store);
        self.wrote(rev, ttl);
        Ok(stored)
    }

    /// Writes an encoded value over `prev`, what `path` holds (keeping its uid and create
    /// revision), at the next revision; returns the stored pair.
    fn put_locked(
        &self,
        store: &mut Store,
        kvp: KVPair,
        path: String,
        bytes: Vec<u8>,
        lease: Option<i64>,
        prev: Option<Record>,
    ) -> KVPair {
        let uid = prev.as_ref().map_or_else(new_uid, |p| p.uid.clone());
        let rec = Record {
            value: bytes.into(),
            create_rev: prev.as_ref().map_or(0, |p| p.create_rev),
            mod_rev: 0,
            uid: uid.clone(),
            ttl: kvp.ttl,
            expires_at: kvp.ttl.map(|t| Instant::now() + t),
            lease,
        };
        let rev = store.commit(path.into(), Some(rec), self.inner.history_limit);
        let create_rev = prev.as_ref().map_or(rev, |p| p.create_rev);
        KVPair {
            key: kvp.key,
            value: kvp.value,
            revision: Some(rev.into()),
            create_revision: Some(create_rev.into()),
            uid: Some(uid.to_string()),
            ttl: kvp.ttl,
        }
    }

    /// Deletes what `path` holds at the next revision; returns its last value.
    fn delete_locked(&self, store: &mut Store, key: &ResourceKey, path: &str) -> Option<KVPair> {
        let prev = store.current.get(path).cloned()?;
        store.commit(path.into(), None, self.inner.history_limit);
        // A value that no longer decodes is still deleted; it is returned as null.
        Some(self.to_kvp(path, &prev).unwrap_or_else(|_| {
            undecodable_last_value(
                key,
                prev.mod_rev.into(),
                Some(prev.create_rev.into()),
                Some(prev.uid.to_string()),
            )
        }))
    }

    /// Tells watchers about revision `rev`, and the sweeper about a new TTL.
    fn wrote(&self, rev: u64, ttl: bool) {
        self.inner.rev_tx.send_replace(rev);
        if ttl {
            self.start_sweeper();
            self.inner.ttl_notify.notify_one();
        }
    }

    fn txn_now(&self, txn: &Txn) -> Result<TxnResponse> {
        let prepared = prepare(&self.inner.codec, &self.capabilities(), "memory", txn)?;
        let mut store = self.lock();
        let mut current = BTreeMap::new();
        for c in &txn.compares {
            let path = &prepared.paths[c.key()];
            let kvp = store.current.get(path.as_str()).map(|rec| {
                self.to_kvp(path, rec).unwrap_or_else(|_| {
                    undecodable_last_value(c.key(), rec.mod_rev.into(), None, None)
                })
            });
            current.insert(c.key().clone(), kvp);
        }
        let succeeded = evaluate(&txn.compares, &current);
        let branch = prepared.branch(succeeded);
        // Every lease the branch writes under must hold, or nothing is written.
        for put in branch.iter().filter_map(|(_, _, p)| p.as_ref()) {
            if let Some(l) = put.lease
                && !store.leases.contains_key(&l.0)
            {
                return Err(Error::LeaseLost { lease: l });
            }
        }
        let mut results = Vec::new();
        let mut ttl = false;
        for (op, path, put) in branch {
            results.push(match (op.put(), put) {
                (Some((kvp, _)), Some(put)) => {
                    ttl |= kvp.ttl.is_some() || put.lease.is_some();
                    let prev = store.current.get(path.as_str()).cloned();
                    TxnResult::Put(self.put_locked(
                        &mut store,
                        kvp.clone(),
                        path.clone(),
                        put.bytes.clone(),
                        put.lease.map(|l| l.0),
                        prev,
                    ))
                }
                _ => TxnResult::Delete(self.delete_locked(&mut store, op.key(), path)),
            });
        }
        let rev = store.rev;
        drop(store);
        if !results.is_empty() {
            self.wrote(rev, ttl);
        }
        Ok(TxnResponse {
            succeeded,
            revision: rev.into(),
            results,
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
                    store.next_deadline()
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
        let Some(prev) = store.current.get(path.as_str()) else {
            return Err(Error::NotFound { key: key.clone() });
        };
        check_delete(key, opts, &prev.mod_rev.into(), Some(&prev.uid))?;
        let last = self.delete_locked(&mut store, key, &path);
        let rev = store.rev;
        drop(store);
        self.wrote(rev, false);
        last.ok_or_else(|| Error::NotFound { key: key.clone() })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.txn_now(&txn)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        check_lease_ttl(ttl)?;
        let mut store = self.lock();
        store.next_lease += 1;
        let id = store.next_lease;
        store.leases.insert(
            id,
            MemLease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: Default::default(),
            },
        );
        drop(store);
        // The sweeper expires the lease when nobody renews it.
        self.start_sweeper();
        self.inner.ttl_notify.notify_one();
        Ok(LeaseId(id))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut store = self.lock();
        let l = store
            .leases
            .get_mut(&lease.0)
            .ok_or(Error::LeaseLost { lease })?;
        l.deadline = Instant::now() + l.ttl;
        let ttl = l.ttl;
        drop(store);
        self.inner.ttl_notify.notify_one();
        Ok(ttl)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let mut store = self.lock();
        store.revoke_lease(lease.0, self.inner.history_limit);
        let rev = store.rev;
        drop(store);
        self.wrote(rev, false);
        Ok(())
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
        Ok(one_page(list))
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
        let rx = self.inner.rev_tx.subscribe();
        Ok(WatchState::new(self.clone(), rx, opts, prefix, after).into_stream(WatchState::next))
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

#[cfg(test)]
mod tests;
