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
//!   its `mod_revision`, retried if another writer came first. A delete with a uid
//!   precondition reads the envelope, checks the uid and deletes at that `mod_revision`.
//! - `list` reads a first page (10,000 keys by default); every later read is pinned to that
//!   page's revision, so a list of any size is one consistent snapshot. The rest of the range
//!   is split at keys estimated from the first page into parts read side by side, at most two
//!   requests at etcd at once ([`EtcdListReads`]), and handed on in key order; each part is
//!   paged by bytes (about 8 MiB, the last pages smaller) with its next page on its way while
//!   one is decoded, under a raised client decode limit.
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
//!
//! The files: `config.rs` (settings and TLS), `crud.rs` (writes, deletes, reads of one key),
//! `list.rs` and `split.rs` (lists read as parts), `watch.rs`, `convert.rs` (the stored
//! envelope, error mapping), `kv.rs` (the KV client that retries a connection refused).

mod config;
mod convert;
mod crud;
mod kv;
mod list;
mod split;
mod txn;
mod watch;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{DeleteOptions, GetOptions, KvClient, WatchOptions};
use futures::StreamExt;
use kvsync_model::{KVPair, ListOptions, PathCodec, ResourceKey, Revision};

pub use config::{EtcdConfig, EtcdListReads, EtcdTls};
use convert::{decode_kv, map_err, rev_i64};
use kv::RetryingKv;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::watch::WatchStream;

/// The decode limit of the client's responses: room for a 1.5 MiB value and pages of many
/// small ones.
const MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;
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
            // etcd's default --max-txn-ops.
            .with_max_txn_ops(Some(128))
    }

    async fn txn(&self, txn: crate::Txn) -> Result<crate::TxnResponse> {
        self.txn_kvps(txn).await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<crate::LeaseId> {
        self.grant(ttl).await
    }

    async fn lease_keep_alive(&self, lease: crate::LeaseId) -> Result<Duration> {
        self.keep_alive_once(lease).await
    }

    async fn lease_revoke(&self, lease: crate::LeaseId) -> Result<()> {
        self.revoke(lease).await
    }

    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        self.write_kvp(kvp, mode).await
    }
    async fn delete(
        &self,
        key: &ResourceKey,
        opts: &kvsync_model::DeleteOptions,
    ) -> Result<KVPair> {
        self.delete_kvp(key, opts).await
    }

    async fn get(&self, key: &ResourceKey, opts: &kvsync_model::GetOptions) -> Result<KVPair> {
        self.get_kvp(key, opts).await
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
        self.open_watch(opts).await
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
