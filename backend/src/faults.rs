//! A fault-injecting wrapper around any [`Client`], for tests of what sits above it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use kvsync_model::{
    DeleteOptions, GetOptions, KVList, KVPair, ListOptions, PathCodec, ResourceKey, Revision,
};
use tokio::sync::watch;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::fuse_after_error;
use crate::watch::WatchStream;

/// Wraps a client and fails its calls on demand: the next N calls, every call during an
/// outage, and every open watch at once.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use kvsync_backend::{Client, FaultyClient, MemoryBackend};
/// use kvsync_model::{ListOptions, demo};
///
/// let client = FaultyClient::new(MemoryBackend::new(demo::registry()));
/// let faults = client.faults();
/// faults.fail_next_calls(1);
/// assert!(client.list(&ListOptions::new("IPPool")).await.unwrap_err().is_retryable());
/// assert!(client.list(&ListOptions::new("IPPool")).await.is_ok());
/// # }
/// ```
pub struct FaultyClient<C> {
    inner: C,
    faults: Faults,
}

/// The switches of a [`FaultyClient`]; clone it to inject faults from anywhere.
#[derive(Clone)]
pub struct Faults {
    state: Arc<FaultState>,
}

struct FaultState {
    calls: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    fail_next: AtomicU64,
    down: AtomicBool,
    watch_epoch: watch::Sender<u64>,
    /// 0: pages as the inner client cuts them.
    list_page_size: AtomicUsize,
    /// The next paged list fails after this many pages (`u64::MAX`: never).
    break_list_after: AtomicU64,
    /// Microseconds every page of a list but the first waits, as pages from a server do.
    list_page_delay: AtomicU64,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("fail_next", &self.state.fail_next.load(Ordering::Relaxed))
            .field("down", &self.state.down.load(Ordering::Relaxed))
            .finish()
    }
}

impl Faults {
    /// Makes every page of a list after the first take `delay` to come (zero: at once), as
    /// the pages of a server's list do.
    pub fn set_list_page_delay(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.list_page_delay.store(micros, Ordering::SeqCst);
    }

    /// Fails the next `n` calls (watch streams excluded) with a retryable
    /// [`Error::Unavailable`].
    pub fn fail_next_calls(&self, n: u64) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    /// Starts (`true`) or ends an outage: while it lasts every call fails with
    /// [`Error::Unavailable`]. Starting one breaks the open watches.
    pub fn set_unavailable(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.break_watches();
        }
    }

    /// Whether an outage is on.
    pub fn is_unavailable(&self) -> bool {
        self.state.down.load(Ordering::SeqCst)
    }

    /// Ends every open watch stream with a retryable error.
    pub fn break_watches(&self) {
        self.state.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Cuts the pages of [`Client::list_pages`] into pages of at most `n` items (0: as the
    /// wrapped client cuts them), so that paged lists are exercised over any backend.
    pub fn set_list_page_size(&self, n: usize) {
        self.state.list_page_size.store(n, Ordering::SeqCst);
    }

    /// Makes the next [`Client::list_pages`] stream end with a retryable error after
    /// `pages` pages. An outage that starts while a paged list is read ends it too.
    pub fn break_next_list_after(&self, pages: u64) {
        self.state.break_list_after.store(pages, Ordering::SeqCst);
    }

    /// How many times `op` (`list`, `watch`, `get`, …) was called, failed calls included
    /// (`list` counts [`Client::list_pages`] too).
    pub fn calls(&self, op: &str) -> u64 {
        let calls = self
            .state
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        calls.get(op).copied().unwrap_or(0)
    }

    fn check(&self, op: &'static str) -> Result<()> {
        *self
            .state
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(op)
            .or_default() += 1;
        if self.state.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable(format!("injected outage during {op}")));
        }
        let took = self
            .state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if took.is_ok() {
            return Err(Error::unavailable(format!("injected failure of {op}")));
        }
        Ok(())
    }
}

impl<C: Client> FaultyClient<C> {
    /// Wraps `inner`, with no faults switched on.
    pub fn new(inner: C) -> Self {
        FaultyClient {
            inner,
            faults: Faults {
                state: Arc::new(FaultState {
                    calls: std::sync::Mutex::default(),
                    fail_next: AtomicU64::new(0),
                    down: AtomicBool::new(false),
                    watch_epoch: watch::Sender::new(0),
                    list_page_size: AtomicUsize::new(0),
                    break_list_after: AtomicU64::new(u64::MAX),
                    list_page_delay: AtomicU64::new(0),
                }),
            },
        }
    }

    /// The switches.
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// The wrapped client.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

impl<C: fmt::Debug> fmt::Debug for FaultyClient<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyClient")
            .field("inner", &self.inner)
            .field("faults", &self.faults)
            .finish()
    }
}

#[async_trait]
impl<C: Client> Client for FaultyClient<C> {
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
        self.faults.check(mode.as_str())?;
        self.inner.write(kvp, mode).await
    }

    async fn delete(&self, key: &ResourceKey, opts: &DeleteOptions) -> Result<KVPair> {
        self.faults.check("delete")?;
        self.inner.delete(key, opts).await
    }

    async fn get(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair> {
        self.faults.check("get")?;
        self.inner.get(key, opts).await
    }

    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        self.faults.check("list")?;
        let size = self.faults.state.list_page_size.load(Ordering::SeqCst);
        let break_after = self
            .faults
            .state
            .break_list_after
            .swap(u64::MAX, Ordering::SeqCst);
        let pages = self.inner.list_pages(opts).await?;
        let pages = pages.flat_map(move |page| {
            let cut: Vec<Result<KVList>> = match page {
                Ok(page) if size > 0 && page.items.len() > size => {
                    let KVList {
                        items,
                        revision,
                        mut parse_failures,
                    } = page;
                    let mut items = items.into_iter().peekable();
                    let mut out = Vec::new();
                    while items.peek().is_some() {
                        out.push(Ok(KVList {
                            items: items.by_ref().take(size).collect(),
                            revision: revision.clone(),
                            parse_failures: std::mem::take(&mut parse_failures),
                        }));
                    }
                    out
                }
                other => vec![other],
            };
            futures::stream::iter(cut)
        });
        let state = self.faults.state.clone();
        let mut given = 0u64;
        let pages = pages.map(move |page| {
            if given > 0 && state.down.load(Ordering::SeqCst) {
                return Err(Error::unavailable("injected outage during a paged list"));
            }
            if given >= break_after {
                return Err(Error::unavailable("paged list broken by fault injection"));
            }
            given += 1;
            page
        });
        let delay = self.faults.state.list_page_delay.load(Ordering::SeqCst);
        let pages = pages.enumerate().then(move |(i, page)| async move {
            if i > 0 && delay > 0 {
                tokio::time::sleep(std::time::Duration::from_micros(delay)).await;
            }
            page
        });
        // An error ends the stream, as from a real client.
        Ok(fuse_after_error(pages))
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        self.faults.check("watch")?;
        let mut epoch = self.faults.state.watch_epoch.subscribe();
        epoch.borrow_and_update();
        let inner = self.inner.watch(opts).await?;
        let stream = futures::stream::unfold(Some((inner, epoch)), |state| async move {
            let (mut inner, mut epoch) = state?;
            tokio::select! {
                biased;
                _ = epoch.changed() => Some((
                    Err(Error::unavailable("watch broken by fault injection")),
                    None,
                )),
                item = inner.next() => item.map(|i| (i, Some((inner, epoch)))),
            }
        });
        Ok(stream.boxed())
    }

    async fn ensure_initialized(&self) -> Result<()> {
        self.faults.check("ensure_initialized")?;
        self.inner.ensure_initialized().await
    }

    async fn clean(&self) -> Result<()> {
        self.inner.clean().await
    }

    async fn compact(&self, revision: &Revision) -> Result<()> {
        self.inner.compact(revision).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.faults.check("current_revision")?;
        self.inner.current_revision().await
    }

    async fn txn(&self, txn: crate::Txn) -> Result<crate::TxnResponse> {
        self.faults.check("txn")?;
        self.inner.txn(txn).await
    }

    async fn lease_grant(&self, ttl: std::time::Duration) -> Result<crate::LeaseId> {
        self.faults.check("lease_grant")?;
        self.inner.lease_grant(ttl).await
    }

    async fn lease_keep_alive(&self, lease: crate::LeaseId) -> Result<std::time::Duration> {
        self.faults.check("lease_keep_alive")?;
        self.inner.lease_keep_alive(lease).await
    }

    async fn lease_revoke(&self, lease: crate::LeaseId) -> Result<()> {
        self.faults.check("lease_revoke")?;
        self.inner.lease_revoke(lease).await
    }

    /// The inner client's records, without faults (the record calls are not named ops).
    fn lock_records(&self) -> Option<&dyn crate::LockRecords> {
        self.inner.lock_records()
    }
}
