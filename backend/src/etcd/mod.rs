//! The etcd v3 backend, on the `etcd-client` crate.
//!
//! - Keys are etcd keys `<prefix>/<plural>[/<namespace>]/<name>`; values are JSON envelopes
//!   `{"metadata": {"uid": …, "ttl": …}, "spec": <the resource>}`; a KVPair's revision is
//!   etcd's `mod_revision`, its create revision etcd's `create_revision`.
//! - Preconditions are etcd transactions: create compares `create_revision == 0`, update and
//!   delete at a revision compare `mod_revision`; a failed compare reads the key in the
//!   transaction's else branch to tell `NotFound` from `Conflict` (with the actual revision),
//!   as Calico's `etcdv3` backend does.
//! - Updates keep the uid: the current envelope is read and the write is made conditional on
//!   its `mod_revision`, retried if another writer came first.
//! - `list` reads pages pinned to the revision of the first page, so a list of any size is
//!   one consistent snapshot. Pages are sized by bytes (about 8 MiB each, adapted from the
//!   bytes per key seen so far), the client's decode limit is raised to fit them, and the next
//!   page is fetched while the current one is decoded.
//! - `watch` yields the changes after `from` with `prev_kv`, so deletions carry the last value
//!   (`Modified` events carry no old value: decoding it would double the cost of every
//!   event, and the Syncer does not need it). It starts at `from` itself and skips what is at
//!   `from`: etcd drops the tombstones at a compaction revision R yet lets a watch start at
//!   R, so a watch starting at `from + 1 == R` could miss a deletion; starting at `from` makes
//!   it fail as compacted instead; a
//!   compacted start surfaces as [`Error::Compacted`] with etcd's compact revision; progress
//!   notifications become [`WatchEvent::Bookmark`](crate::WatchEvent::Bookmark)s. On etcd
//!   3.4.25+ and 3.5.8+ progress is requested when a watch opens and when it idles; older
//!   servers answer such requests out of order with events (etcd issue 15220), so there only
//!   the server's periodic per-watch notifications are used.
//! - TTLs use one etcd lease per key written with a TTL, as Calico does: exact expiry per key,
//!   a `Deleted` event from etcd itself when it runs out, and leases vanish with their keys.
//!   (Shared buckets would save a grant per write but expire keys early or late by up to the
//!   bucket width.) etcd rounds TTLs up to whole seconds and to its minimum lease TTL.

mod config;
mod convert;
mod split;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KvClient, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use futures::StreamExt;
use kvsync_model::{KVList, KVPair, ListOptions, PathCodec, ResourceKey, Revision};

pub use config::{EtcdConfig, EtcdListReads, EtcdTls};
use convert::{Envelope, decode_kv, decode_owned_kv, map_err, rev_i64};

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::{
    check_delete, check_write, encode_for_write, fuse_after_error, parse_error, push_listed,
    undecodable_last_value,
};
use crate::watch::WatchStream;

/// The decode limit of the client's responses: room for a 1.5 MiB value and pages of many
/// small ones.
const MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;
/// The bytes a list page aims at. Measured on a local etcd 3.4 with 100,000 keys of 170
/// bytes: pages of 500 keys read them in 3.3 s, 5,000 in 0.70 s, 10,000 in 0.45 s and 50,000
/// (8.5 MB) in 0.28 s, so pages are large: 8 MiB, well under the raised decode limit.
const PAGE_TARGET_BYTES: usize = 8 * 1024 * 1024;
/// The most keys a page asks for.
const MAX_PAGE_KEYS: usize = 100_000;
/// Below this many keys left, the rest is read in one page.
const TAIL_PAGE_KEYS: usize = 6_000;
/// How long an idle watch waits before asking etcd for a progress notification.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How often a write retries when other writers keep changing its key.
const MAX_WRITE_RETRIES: usize = 64;

/// The etcd v3 backend. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdBackend {
    client: etcd_client::Client,
    kv: KvClient,
    codec: PathCodec,
    endpoints: Vec<String>,
    list_reads: EtcdListReads,
    /// Whether the server answers progress requests only once a watch has caught up.
    synced_progress: Arc<tokio::sync::OnceCell<bool>>,
}

/// Whether an etcd version sends requested progress notifications in order with events.
///
/// Before 3.4.25 and 3.5.8 a progress request was answered at once with the store's
/// revision, possibly ahead of events still queued for the watch (etcd issue 15220), so such
/// an answer cannot be trusted as "everything up to here was sent".
fn progress_is_synchronized(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    match (major, minor) {
        (3, 4) => patch >= 25,
        (3, 5) => patch >= 8,
        (3, m) => m > 5,
        (m, _) => m > 3,
    }
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.codec.prefix())
            .finish_non_exhaustive()
    }
}

impl EtcdBackend {
    /// Connects to etcd with `config`. The connection is made lazily: an unreachable etcd
    /// shows up as [`Error::Unavailable`] on the first call, within the request timeout.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad endpoints, TLS material or prefix; [`Error::Unauthorized`]
    /// when the credentials are refused.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        let codec = PathCodec::new(config.prefix.clone(), config.registry.clone())?;
        let endpoints = config.endpoints.clone();
        let options = config.connect_options()?;
        let client = etcd_client::Client::connect(&endpoints, Some(options))
            .await
            .map_err(map_err)?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_DECODE_BYTES);
        Ok(EtcdBackend {
            client,
            kv,
            codec,
            endpoints,
            list_reads: config.list_reads,
            synced_progress: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// Whether requested progress notifications can be trusted (see
    /// [`progress_is_synchronized`]); asked of the server once.
    async fn synced_progress(&self) -> bool {
        let client = self.client.clone();
        *self
            .synced_progress
            .get_or_init(|| async move {
                let mut m = client.maintenance_client();
                match m.status().await {
                    Ok(s) => progress_is_synchronized(s.version()),
                    Err(_) => false,
                }
            })
            .await
    }

    /// The underlying `etcd-client` client, for what this backend does not cover.
    pub fn etcd_client(&self) -> &etcd_client::Client {
        &self.client
    }

    fn kv(&self) -> RetryingKv {
        RetryingKv {
            kv: self.kv.clone(),
            attempts: self.endpoints.len() * 2 + 1,
        }
    }

    /// etcd's oldest readable revision, read from a watch at `requested` (etcd does not put
    /// it in the error of a read).
    async fn compacted_hint(&self, requested: i64) -> Option<Revision> {
        let mut wc = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_DECODE_BYTES);
        let opts = WatchOptions::new().with_start_revision(requested.max(1));
        let probe = async {
            let mut stream = wc
                .watch(self.codec.prefix().as_bytes(), Some(opts))
                .await
                .ok()?;
            let resp = stream.message().await.ok()??;
            (resp.compact_revision() > 0).then(|| Revision::from(resp.compact_revision() as u64))
        };
        tokio::time::timeout(Duration::from_secs(5), probe)
            .await
            .ok()
            .flatten()
    }

    async fn map_read_err(&self, e: etcd_client::Error, requested: Option<i64>) -> Error {
        let err = map_err(e);
        match (err, requested) {
            (Error::Compacted { .. }, Some(r)) => Error::Compacted {
                requested: Revision::from(r as u64),
                compacted: self.compacted_hint(r).await,
            },
            (err, _) => err,
        }
    }

    fn decode(
        &self,
        kv: &etcd_client::KeyValue,
    ) -> Result<KVPair, Box<kvsync_model::ParseFailure>> {
        decode_kv(&self.codec, kv)
    }

    /// Reads the pages of a list into `tx`, in key order; returns early when the receiver is
    /// gone. The first page gives the list's revision, the number of keys and the keys to
    /// split the rest by (see [`split`]); the parts are then read side by side, each paged on
    /// its own, and handed on in order.
    async fn read_pages(
        &self,
        prefix: &str,
        opts: &ListOptions,
        at: Option<i64>,
        tx: &tokio::sync::mpsc::Sender<Result<KVList>>,
    ) -> Result<()> {
        let end = prefix_end(prefix);
        let start = prefix.as_bytes().to_vec();
        let tuning = self.list_reads;
        let mut limit = i64::try_from(tuning.first_page_keys.max(1)).unwrap_or(i64::MAX);
        let mut resp = loop {
            match self
                .kv()
                .get(start.clone(), Some(range_opts(&end, limit, at)))
                .await
            {
                Ok(r) => break r,
                // A page over the decode limit (large values): ask for fewer keys.
                Err(e) if is_too_large(&e) && limit > 1 => limit = (limit / 4).max(1),
                Err(e) => return Err(self.map_read_err(e, at).await),
            }
        };
        // Every later page is pinned to the first page's revision: one consistent snapshot.
        let pinned = at.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision()));
        let kvs = resp.take_kvs();
        let mut parts = Vec::new();
        if resp.more()
            && let Some(last) = kvs.last()
        {
            let remaining = usize::try_from(resp.count())
                .unwrap_or(0)
                .saturating_sub(kvs.len());
            let bytes: usize = kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
            let stats = (bytes, kvs.len());
            let mut after = last.key().to_vec();
            after.push(0);
            let n_parts = (remaining / tuning.part_keys.max(1)).clamp(1, tuning.max_parts.max(1));
            let seen: Vec<&[u8]> = kvs.iter().map(|kv| kv.key()).collect();
            let splits = split::split_keys(&seen, prefix.len(), &after, &end, remaining, n_parts);
            let bounds: Vec<Vec<u8>> = std::iter::once(after)
                .chain(splits)
                .chain(std::iter::once(end.clone()))
                .collect();
            // At most `parallel_reads` requests at etcd at once, and the parts start in key
            // order, so the first parts come back first and their keys are handed on while
            // etcd reads the later ones.
            let permits = Arc::new(tokio::sync::Semaphore::new(tuning.parallel_reads.max(1)));
            let mut to_start = Vec::new();
            for range in bounds.windows(2) {
                let (rtx, rrx) = tokio::sync::mpsc::channel(1);
                let part = Part {
                    backend: self.clone(),
                    opts: opts.clone(),
                    start: range[0].clone(),
                    end: range[1].clone(),
                    at: pinned,
                    // By bytes alone: a part's last page comes in while earlier parts are
                    // handed on, so it need not be small.
                    limit: next_page_keys(0, stats.0 / stats.1.max(1)),
                    stats,
                    permits: permits.clone(),
                };
                to_start.push((part, rtx));
                parts.push(rrx);
            }
            tokio::spawn(async move {
                for (part, tx) in to_start {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    // Not started when the list was dropped.
                    if tx.is_closed() {
                        return;
                    }
                    tokio::spawn(part.read(permit, tx));
                }
            });
        }
        let mut page = KVList {
            items: Vec::with_capacity(kvs.len()),
            revision: Revision::from(pinned as u64),
            parse_failures: Vec::new(),
        };
        for kv in kvs {
            push_listed(&mut page, opts, decode_owned_kv(&self.codec, kv));
        }
        // The first page always goes, even empty, as it carries the revision.
        if tx.send(Ok(page)).await.is_err() {
            return Ok(());
        }
        for mut part in parts {
            loop {
                let page = match part.recv().await {
                    Some(Some(page)) => page,
                    Some(None) => break,
                    None => Err(Error::unavailable(
                        "a part of the list ended before its end",
                    )),
                };
                let failed = page.is_err();
                if tx.send(page).await.is_err() || failed {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Reads the current envelope of a key: its kv and uid.
    async fn read_current(&self, path: &str) -> Result<Option<etcd_client::KeyValue>> {
        let resp = self.kv().get(path, None).await.map_err(map_err)?;
        Ok(resp.kvs().first().cloned())
    }

    async fn lease_for(&self, ttl: Option<Duration>) -> Result<Option<i64>> {
        let Some(ttl) = ttl else { return Ok(None) };
        let secs =
            i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).unwrap_or(i64::MAX);
        let lease = self
            .client
            .lease_client()
            .grant(secs.max(1), None)
            .await
            .map_err(map_err)?;
        Ok(Some(lease.id()))
    }

    async fn write_kvp(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        let (path, _) = encode_for_write(&self.codec, &kvp)?;
        let lease = self.lease_for(kvp.ttl).await?;
        let expected = match (&mode, &kvp.revision) {
            (WriteMode::Update, Some(r)) => Some(rev_i64(r)?),
            _ => None,
        };
        for _ in 0..MAX_WRITE_RETRIES {
            let current = self.read_current(&path).await?;
            let current_rev = current
                .as_ref()
                .map(|c| Revision::from(c.mod_revision() as u64));
            let precondition = expected.and(kvp.revision.as_ref());
            check_write(&kvp.key, mode, precondition, current_rev.as_ref())?;
            let (compare, uid, create_rev) = match &current {
                None => (
                    Compare::create_revision(path.as_str(), CompareOp::Equal, 0),
                    uuid::Uuid::new_v4().to_string(),
                    None,
                ),
                Some(cur) => {
                    // Keep the uid of what is there; a stored value that no longer decodes
                    // is replaced under a new uid.
                    let uid = Envelope::uid_of(cur.value())
                        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                    (
                        Compare::mod_revision(path.as_str(), CompareOp::Equal, cur.mod_revision()),
                        uid,
                        Some(cur.create_revision()),
                    )
                }
            };
            let bytes = Envelope::encode(&uid, kvp.ttl, &kvp.value)?;
            let put_opts = lease.map(|l| PutOptions::new().with_lease(l));
            let txn = Txn::new().when(vec![compare]).and_then(vec![TxnOp::put(
                path.as_str(),
                bytes,
                put_opts,
            )]);
            let resp = self.kv().txn(txn).await.map_err(map_err)?;
            if !resp.succeeded() {
                // Another writer came between our read and our write: read again.
                continue;
            }
            let rev = resp
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| Error::unavailable("etcd answered a write without a header"))?;
            return Ok(KVPair {
                key: kvp.key,
                value: kvp.value,
                revision: Some(Revision::from(rev as u64)),
                create_revision: Some(Revision::from(create_rev.unwrap_or(rev) as u64)),
                uid: Some(uid),
                ttl: kvp.ttl,
            });
        }
        Err(Error::unavailable(format!(
            "{} kept changing: gave up after {MAX_WRITE_RETRIES} attempts",
            kvp.key
        )))
    }

    /// Compacts etcd's history at `revision` and waits until the compaction is applied. A
    /// revision compacted already is no error.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a future revision; transport errors.
    pub async fn compact_at(&self, revision: i64) -> Result<()> {
        let done = self
            .kv()
            .compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .map_err(map_err);
        match done {
            // Compacted at or after `revision` already: nothing older is left, as asked.
            Ok(_) | Err(Error::Compacted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The cluster's current revision.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn current_revision(&self) -> Result<i64> {
        let resp = self
            .kv()
            .get(
                self.codec.prefix(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(map_err)?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| Error::unavailable("etcd answered without a header"))
    }
}

/// The KV client, retrying a call whose connection could not be made (so the request never
/// left): with several endpoints, a dead member must not fail requests the others can serve.
struct RetryingKv {
    kv: KvClient,
    attempts: usize,
}

/// The options of one range read of a list: up to `end`, at `at`, `limit` keys.
fn range_opts(end: &[u8], limit: i64, at: Option<i64>) -> GetOptions {
    let opts = GetOptions::new().with_range(end.to_vec()).with_limit(limit);
    match at {
        Some(r) => opts.with_revision(r),
        None => opts,
    }
}

/// What a part hands on: its pages, then `None` once it is complete (a channel that closes
/// without it means the part's task died, which must not pass for the end of the list).
type PartTx = tokio::sync::mpsc::Sender<Option<Result<KVList>>>;

/// One part of a list (the keys from `start` to `end`), read page by page at the list's
/// revision.
struct Part {
    backend: EtcdBackend,
    opts: ListOptions,
    start: Vec<u8>,
    end: Vec<u8>,
    at: i64,
    /// The first page's key count.
    limit: i64,
    /// Bytes and keys read so far, to size pages by bytes.
    stats: (usize, usize),
    /// Leave to have a request at etcd, shared by the list's parts.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Part {
    /// Reads the part into `tx` (an error ends it); stops when the receiver is gone.
    async fn read(self, first: tokio::sync::OwnedSemaphorePermit, tx: PartTx) {
        let end = match self.pages(first, &tx).await {
            Ok(()) => None,
            Err(e) => Some(Err(e)),
        };
        let _ = tx.send(end).await;
    }

    async fn pages(self, first: tokio::sync::OwnedSemaphorePermit, tx: &PartTx) -> Result<()> {
        let Part {
            backend,
            opts,
            mut start,
            end,
            at,
            mut limit,
            stats: (mut bytes_seen, mut keys_seen),
            permits,
        } = self;
        let fetch =
            |start: Vec<u8>, limit: i64, permit: Option<tokio::sync::OwnedSemaphorePermit>| {
                let kv = backend.kv();
                let page_opts = range_opts(&end, limit, Some(at));
                let permits = permits.clone();
                // A task of its own, so the next page is on its way while this one is decoded.
                tokio::spawn(async move {
                    let _permit = match permit {
                        Some(p) => Some(p),
                        None => permits.acquire_owned().await.ok(),
                    };
                    kv.get(start, Some(page_opts)).await
                })
            };
        let mut pending = Some(fetch(start.clone(), limit, Some(first)));
        while let Some(page) = pending.take() {
            let page = page
                .await
                .map_err(|e| Error::unavailable(format!("list page task failed: {e}")))?;
            let mut resp = match page {
                Ok(r) => r,
                Err(e) if is_too_large(&e) && limit > 1 => {
                    limit = (limit / 4).max(1);
                    pending = Some(fetch(start.clone(), limit, None));
                    continue;
                }
                Err(e) => return Err(backend.map_read_err(e, Some(at)).await),
            };
            let more = resp.more();
            // The keys from this page's first to the end of the part.
            let remaining_with_page = usize::try_from(resp.count()).unwrap_or(0);
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                start = last.key().to_vec();
                start.push(0);
            }
            for kv in &kvs {
                bytes_seen += kv.key().len() + kv.value().len();
                keys_seen += 1;
            }
            if more && !kvs.is_empty() {
                let remaining = remaining_with_page.saturating_sub(kvs.len());
                limit = next_page_keys(remaining, bytes_seen / keys_seen.max(1));
                pending = Some(fetch(start.clone(), limit, None));
            }
            // Empty pages (a range with keys other kinds own) are not worth a message.
            if kvs.is_empty() {
                continue;
            }
            let mut page = KVList {
                items: Vec::with_capacity(kvs.len()),
                revision: Revision::from(at as u64),
                parse_failures: Vec::new(),
            };
            for kv in kvs {
                push_listed(&mut page, &opts, decode_owned_kv(&backend.codec, kv));
            }
            if (!page.items.is_empty() || !page.parse_failures.is_empty())
                && tx.send(Some(Ok(page))).await.is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Whether a response was refused for its size (over the client's decode limit).
/// The size of the next list page: as many keys as fill [`PAGE_TARGET_BYTES`], but at most
/// half of the `remaining` keys (down to [`TAIL_PAGE_KEYS`], then all of them). A list is
/// done only when its last page is decoded and handed on, so a small last page leaves little
/// work after etcd's last answer; etcd 3.4 counts the rest of the range on every page, which
/// makes the extra small pages at the end cheap.
fn next_page_keys(remaining: usize, bytes_per_key: usize) -> i64 {
    let by_bytes = (PAGE_TARGET_BYTES / bytes_per_key.max(1)).clamp(100, MAX_PAGE_KEYS);
    let keys = if remaining == 0 {
        // etcd did not count the rest: pages by bytes alone.
        by_bytes
    } else if remaining <= 2 * TAIL_PAGE_KEYS {
        remaining.max(1)
    } else {
        (remaining / 2).max(TAIL_PAGE_KEYS)
    };
    i64::try_from(keys.min(by_bytes)).unwrap_or(1)
}

fn is_too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::ResourceExhausted
                || (s.code() == tonic::Code::OutOfRange && !s.message().contains("compacted"))
                || s.message().contains("message length too large")
        }
        _ => false,
    }
}

fn is_connect_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        _ => false,
    }
}

impl RetryingKv {
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 1;
        loop {
            match f(self.kv.clone()).await {
                Err(e) if attempt < self.attempts && is_connect_error(&e) => {
                    tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let key = key.into();
        self.run(|mut kv| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { kv.get(key, opts).await }
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.run(|mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    async fn delete(
        &self,
        key: impl Into<Vec<u8>>,
        opts: Option<DeleteOptions>,
    ) -> Result<etcd_client::DeleteResponse, etcd_client::Error> {
        let key = key.into();
        self.run(|mut kv| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { kv.delete(key, opts).await }
        })
        .await
    }

    async fn compact(
        &self,
        revision: i64,
        opts: Option<etcd_client::CompactionOptions>,
    ) -> Result<etcd_client::CompactionResponse, etcd_client::Error> {
        self.run(|mut kv| {
            let opts = opts.clone();
            async move { kv.compact(revision, opts).await }
        })
        .await
    }
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    // The smallest key greater than every key starting with `prefix`.
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[async_trait]
impl Client for EtcdBackend {
    fn codec(&self) -> &PathCodec {
        &self.codec
    }

    fn backend_name(&self) -> &'static str {
        "etcd"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::revision_log()
            // etcd's default --max-request-bytes (1.5 MiB), less room for the key and the
            // envelope.
            .with_max_value_bytes(Some(1_572_864 - 4_096))
    }

    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        self.write_kvp(kvp, mode).await
    }

    async fn delete(
        &self,
        key: &ResourceKey,
        opts: &kvsync_model::DeleteOptions,
    ) -> Result<KVPair> {
        let path = self.codec.to_path(key)?;
        let expected = opts.revision.as_ref().map(rev_i64).transpose()?;
        for _ in 0..MAX_WRITE_RETRIES {
            // A uid precondition is checked on the value read, and the delete made
            // conditional on that read's revision (retried if another writer came first).
            let read = match &opts.uid {
                Some(_) => {
                    let Some(cur) = self.read_current(&path).await? else {
                        return Err(Error::NotFound { key: key.clone() });
                    };
                    let uid = Envelope::uid_of(cur.value());
                    let at = Revision::from(cur.mod_revision() as u64);
                    check_delete(key, opts, &at, uid.as_deref())?;
                    Some(cur.mod_revision())
                }
                None => None,
            };
            let compare = match read.or(expected) {
                Some(r) => Compare::mod_revision(path.as_str(), CompareOp::Equal, r),
                None => Compare::create_revision(path.as_str(), CompareOp::Greater, 0),
            };
            let txn = Txn::new()
                .when(vec![compare])
                .and_then(vec![TxnOp::delete(
                    path.as_str(),
                    Some(DeleteOptions::new().with_prev_key()),
                )])
                .or_else(vec![TxnOp::get(path.as_str(), None)]);
            let resp = self.kv().txn(txn).await.map_err(map_err)?;
            let ops = resp.op_responses();
            if !resp.succeeded() {
                let actual = ops.iter().find_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                    _ => None,
                });
                match (actual, &opts.revision) {
                    (None, _) => return Err(Error::NotFound { key: key.clone() }),
                    (Some(actual), Some(e)) => {
                        return Err(Error::Conflict {
                            key: key.clone(),
                            expected: Some(e.clone()),
                            actual: Some(Revision::from(actual as u64)),
                        });
                    }
                    // Written between the uid check and the delete: check again.
                    (Some(_), None) => continue,
                }
            }
            let prev = ops.iter().find_map(|op| match op {
                TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
                _ => None,
            });
            let Some(prev) = prev else {
                return Err(Error::NotFound { key: key.clone() });
            };
            // A value that no longer decodes is still deleted; it is returned as null.
            return Ok(self.decode(&prev).unwrap_or_else(|_| {
                undecodable_last_value(
                    key,
                    Revision::from(prev.mod_revision() as u64),
                    Some(Revision::from(prev.create_revision() as u64)),
                    Envelope::uid_of(prev.value()),
                )
            }));
        }
        Err(Error::unavailable(format!("{key} kept changing")))
    }

    async fn get(&self, key: &ResourceKey, opts: &kvsync_model::GetOptions) -> Result<KVPair> {
        let path = self.codec.to_path(key)?;
        let at = opts.revision.as_ref().map(rev_i64).transpose()?;
        let opts = at.map(|r| GetOptions::new().with_revision(r));
        let resp = match self.kv().get(path.as_str(), opts).await {
            Ok(r) => r,
            Err(e) => return Err(self.map_read_err(e, at).await),
        };
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| Error::NotFound { key: key.clone() })?;
        self.decode(kv).map_err(|f| parse_error(*f))
    }

    /// Range reads pinned to the first page's revision: a first page, then the rest split
    /// into parts read side by side (see [`EtcdListReads`]), each in pages sized by bytes
    /// (about 8 MiB, the last ones smaller) with its next page on its way while one is
    /// decoded. Pages come in key order.
    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        let prefix = self.codec.list_prefix(opts)?;
        let at = opts.revision.as_ref().map(rev_i64).transpose()?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let this = self.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            if let Err(e) = this.read_pages(&prefix, &opts, at, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|page| (page, rx))
        })
        .boxed())
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        let prefix = self.codec.list_prefix(opts)?;
        let from = match &opts.revision {
            Some(r) => rev_i64(r)?,
            None => self.current_revision().await?,
        };
        // Watch from `from` itself, not `from + 1`, and drop what is at `from`: compacting at
        // revision R drops the tombstones at R, yet etcd lets a watch start at R. Starting one
        // earlier makes such a watch fail as compacted instead of missing a deletion.
        let start = from.max(1);
        let mut wc = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_DECODE_BYTES);
        let wopts = WatchOptions::new()
            .with_range(prefix_end(&prefix))
            .with_start_revision(start)
            .with_prev_key()
            .with_progress_notify();
        let attempts = self.endpoints.len() * 2 + 1;
        let mut attempt = 1;
        let mut stream = loop {
            match wc.watch(prefix.as_bytes(), Some(wopts.clone())).await {
                Err(e) if attempt < attempts && is_connect_error(&e) => {
                    tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                    attempt += 1;
                }
                other => break other.map_err(map_err)?,
            }
        };
        // The first response says whether the watch was created or its start is compacted.
        let first = stream
            .message()
            .await
            .map_err(map_err)?
            .ok_or_else(|| Error::unavailable("etcd closed the watch before creating it"))?;
        if first.compact_revision() > 0 {
            return Err(Error::Compacted {
                requested: Revision::from(from.max(0) as u64),
                compacted: Some(Revision::from(first.compact_revision() as u64)),
            });
        }
        if first.canceled() {
            return Err(Error::unavailable(format!(
                "etcd cancelled the watch: {}",
                first.cancel_reason()
            )));
        }
        // Where the server answers progress requests in order, ask at once: the answer comes
        // once the watch has caught up, which tells a resuming Syncer it has seen everything.
        // Older servers still send their periodic per-watch progress notifications, which are
        // in order (`--experimental-watch-progress-notify-interval`, 10 minutes by default).
        let synced_progress = self.synced_progress().await;
        if synced_progress {
            stream.request_progress().await.map_err(map_err)?;
        }
        let state = convert::WatchState::new(
            self.codec.clone(),
            opts.clone(),
            stream,
            first,
            from,
            synced_progress.then_some(PROGRESS_INTERVAL),
        );
        Ok(fuse_after_error(futures::stream::unfold(
            state,
            convert::WatchState::next,
        )))
    }

    async fn clean(&self) -> Result<()> {
        let prefix = format!("{}/", self.codec.prefix());
        self.kv()
            .delete(prefix.as_str(), Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn compact(&self, revision: &Revision) -> Result<()> {
        self.compact_at(rev_i64(revision)?).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(Revision::from(
            EtcdBackend::current_revision(self).await? as u64,
        ))
    }
}
