//! Snapshots: every item of some kinds at one revision, a file format for them, and restoring
//! one into any datastore (which is also how a datastore is migrated to another).
//!
//! A snapshot is read page by page and handed on as a stream of [`SnapshotEntry`]s: a header,
//! the items of each kind followed by that kind's end (its revision and count), and a final
//! end with the total. Nothing holds the whole snapshot: [`save`] writes entries as they come,
//! [`read`] parses a file line by line, [`restore`] writes as it reads.
//!
//! Where the datastore has one global revision and keeps history (memory, SQLite, etcd), every
//! kind is read at the same revision, the header's; a watch from it misses nothing. On
//! Kubernetes each kind has its own list revision, given in its end entry, from which that
//! kind's watch misses nothing.
//!
//! The file is JSON lines (one entry a line), versioned by the header:
//!
//! ```text
//! {"kvsync_snapshot":1,"datastore":"sqlite","prefix":"/kvsync","revision":"42","kinds":["IPPool"]}
//! {"kind":"IPPool","name":"a","revision":"40","uid":"…","value":{"cidr":"10.0.0.0/16"}}
//! {"end_of":"IPPool","revision":"42","count":1}
//! {"end":true,"count":1}
//! ```
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> kvsync_backend::Result<()> {
//! use std::sync::Arc;
//! use kvsync_backend::{Client, MemoryBackend, snapshot};
//! use kvsync_model::{KVPair, KindInfo, ListOptions, Registry, ResourceKey};
//!
//! let registry = Arc::new(Registry::new().with_kind(KindInfo::untyped("example.com", "Tenant", "tenants", false)));
//! let from: Arc<dyn Client> = Arc::new(MemoryBackend::new(registry.clone()));
//! from.create(KVPair::new(ResourceKey::cluster("Tenant", "acme"), serde_json::json!({"owner": "ann"}))).await?;
//!
//! let mut file = Vec::new();
//! let saved = snapshot::save(from.clone(), &["Tenant".to_owned()], &mut file).await?;
//! assert_eq!(saved.count, 1);
//!
//! let to: Arc<dyn Client> = Arc::new(MemoryBackend::new(registry));
//! let entries = snapshot::read(std::io::Cursor::new(file));
//! let restored = snapshot::restore(&*to, entries, &snapshot::RestoreOptions::new()).await?;
//! assert_eq!(restored.written, 1);
//! assert_eq!(to.list(&ListOptions::new("Tenant")).await?.items.len(), 1);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use kvsync_model::{Json, KVPair, ListOptions, ParseFailure, ResourceKey, Revision};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::txn::{Compare, Txn, TxnOp};

/// The version of the file format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The first entry of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SnapshotHeader {
    /// The file format's version ([`FORMAT_VERSION`]).
    pub kvsync_snapshot: u32,
    /// The backend the snapshot was read from (`sqlite`, `etcd`, ...).
    pub datastore: String,
    /// The key prefix it was read under.
    pub prefix: String,
    /// The one revision every kind was read at, where the datastore has one global revision.
    pub revision: Option<Revision>,
    /// The kinds, in the order their items follow.
    pub kinds: Vec<String>,
}

/// One item of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SnapshotItem {
    /// The kind.
    pub kind: String,
    /// The namespace, for a namespaced kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The name.
    pub name: String,
    /// The revision of its last write, in the datastore it was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    /// Its uid there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The value.
    pub value: Json,
}

impl SnapshotItem {
    /// The item's key.
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    fn from_kvp(kvp: KVPair) -> Self {
        SnapshotItem {
            kind: kvp.key.kind,
            namespace: kvp.key.namespace,
            name: kvp.key.name,
            revision: kvp.revision,
            uid: kvp.uid,
            value: kvp.value,
        }
    }
}

/// One line of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum SnapshotEntry {
    /// The header, first.
    Header(SnapshotHeader),
    /// An item.
    Item(SnapshotItem),
    /// The end of one kind's items.
    KindEnd {
        /// The kind.
        end_of: String,
        /// The revision its items were read at: a watch of the kind from here misses nothing.
        revision: Revision,
        /// How many items it has.
        count: u64,
    },
    /// The end of the snapshot, last: a file without it was cut short.
    End {
        /// Always `true`.
        end: bool,
        /// How many items in all.
        count: u64,
    },
}

/// A snapshot's entries, as they are read.
pub type SnapshotStream = BoxStream<'static, Result<SnapshotEntry>>;

/// What [`save`] wrote.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct SaveSummary {
    /// Items written.
    pub count: u64,
    /// Items per kind.
    pub per_kind: BTreeMap<String, u64>,
    /// The revision every kind was read at, where there is one.
    pub revision: Option<Revision>,
    /// Stored entries that did not decode, left out of the snapshot.
    pub left_out: Vec<ParseFailure>,
}

/// Reads every item of `kinds` (every kind the client knows when empty) as a stream of
/// entries, page by page: see the [module docs](self).
///
/// Stored entries that do not decode cannot be restored, so they are not items: the second
/// value resolves, once the stream has ended, to those left out.
///
/// # Errors
/// [`Error::Invalid`] for a kind the client does not know; read errors come as the stream's
/// last item.
pub async fn entries(
    client: Arc<dyn Client>,
    kinds: &[String],
) -> Result<(
    SnapshotStream,
    tokio::sync::oneshot::Receiver<Vec<ParseFailure>>,
)> {
    let registry = client.codec().registry().clone();
    let kinds: Vec<String> = if kinds.is_empty() {
        registry.kinds().iter().map(|k| k.kind.clone()).collect()
    } else {
        for k in kinds {
            registry.kind(k)?;
        }
        kinds.to_vec()
    };
    let caps = client.capabilities();
    let revision = if caps.global_revision && caps.historical_reads {
        Some(client.current_revision().await?)
    } else {
        None
    };
    let header = SnapshotHeader {
        kvsync_snapshot: FORMAT_VERSION,
        datastore: client.backend_name().to_owned(),
        prefix: client.codec().prefix().to_owned(),
        revision: revision.clone(),
        kinds: kinds.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SnapshotEntry>>(1024);
    let (failures_tx, failures_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut failures = Vec::new();
        let result: Result<()> = async {
            let send = |e| {
                let tx = tx.clone();
                async move {
                    tx.send(Ok(e))
                        .await
                        .map_err(|_| Error::unavailable("the snapshot's reader went away"))
                }
            };
            send(SnapshotEntry::Header(header)).await?;
            let mut total = 0;
            for kind in kinds {
                let mut opts = ListOptions::new(kind.as_str());
                if let Some(r) = &revision {
                    opts = opts.with_revision(r.clone());
                }
                let mut pages = client.list_pages(&opts).await?;
                let (mut count, mut at) = (0, revision.clone());
                while let Some(page) = pages.try_next().await? {
                    at = Some(page.revision.clone());
                    failures.extend(page.parse_failures);
                    for kvp in page.items {
                        count += 1;
                        send(SnapshotEntry::Item(SnapshotItem::from_kvp(kvp))).await?;
                    }
                }
                total += count;
                let revision = at.ok_or_else(|| Error::unavailable("a list without a page"))?;
                send(SnapshotEntry::KindEnd {
                    end_of: kind,
                    revision,
                    count,
                })
                .await?;
            }
            send(SnapshotEntry::End {
                end: true,
                count: total,
            })
            .await
        }
        .await;
        let _ = failures_tx.send(failures);
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    });
    let stream = tokio_stream_from(rx);
    Ok((stream, failures_rx))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Writes a snapshot of `kinds` (every kind when empty) to `out` as JSON lines.
///
/// # Errors
/// Read errors of the datastore, write errors of `out` ([`Error::Unavailable`]).
pub async fn save<W: AsyncWrite + Unpin>(
    client: Arc<dyn Client>,
    kinds: &[String],
    mut out: W,
) -> Result<SaveSummary> {
    let (mut stream, failures) = entries(client, kinds).await?;
    let mut summary = SaveSummary::default();
    let io = |e: std::io::Error| Error::unavailable(format!("writing the snapshot: {e}"));
    let mut line = Vec::with_capacity(4096);
    while let Some(entry) = stream.try_next().await? {
        match &entry {
            SnapshotEntry::Header(h) => summary.revision = h.revision.clone(),
            SnapshotEntry::KindEnd { end_of, count, .. } => {
                summary.per_kind.insert(end_of.clone(), *count);
            }
            SnapshotEntry::End { count, .. } => summary.count = *count,
            SnapshotEntry::Item(_) => {}
        }
        line.clear();
        serde_json::to_writer(&mut line, &entry)
            .map_err(|e| Error::invalid("snapshot", e.to_string()))?;
        line.push(b'\n');
        out.write_all(&line).await.map_err(io)?;
    }
    out.flush().await.map_err(io)?;
    summary.left_out = failures.await.unwrap_or_default();
    Ok(summary)
}

/// Reads a snapshot file's entries, line by line, checking that it starts with a header of a
/// version this crate reads and ends with its end entry (else it was cut short).
pub fn read<R: AsyncBufRead + Unpin + Send + 'static>(input: R) -> SnapshotStream {
    let lines = input.lines();
    futures::stream::unfold(
        (lines, 0u64, false, false),
        |(mut lines, n, started, done)| async move {
            if done {
                return None;
            }
            let bad = |n: u64, why: String| Error::invalid(format!("snapshot line {n}"), why);
            let item = match lines.next_line().await {
                Err(e) => Err(Error::unavailable(format!("reading the snapshot: {e}"))),
                Ok(None) if started => Err(bad(
                    n,
                    "the file ends before the snapshot's end: it was cut short".into(),
                )),
                Ok(None) => Err(bad(0, "the file is empty".into())),
                Ok(Some(line)) => match serde_json::from_str::<SnapshotEntry>(&line) {
                    Err(e) => Err(bad(n + 1, format!("not a snapshot entry: {e}"))),
                    Ok(SnapshotEntry::Header(_)) if n > 0 => {
                        Err(bad(n + 1, "a second header".into()))
                    }
                    Ok(SnapshotEntry::Header(h)) if h.kvsync_snapshot != FORMAT_VERSION => {
                        Err(bad(
                            1,
                            format!(
                                "format version {} (this kvsync reads version {FORMAT_VERSION})",
                                h.kvsync_snapshot
                            ),
                        ))
                    }
                    Ok(e @ SnapshotEntry::Header(_)) => Ok(e),
                    Ok(_) if n == 0 => Err(bad(1, "the file does not start with a header".into())),
                    Ok(e) => Ok(e),
                },
            };
            let end = matches!(item, Ok(SnapshotEntry::End { .. }) | Err(_));
            Some((item, (lines, n + 1, true, end)))
        },
    )
    .boxed()
}

/// How [`restore`] treats keys that exist already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Existing {
    /// Refuse to start unless the target holds none of the snapshot's kinds (the default).
    #[default]
    Refuse,
    /// Go on from an interrupted restore: a key that holds the snapshot's value is skipped, one
    /// that holds another value is an error.
    Resume,
    /// Replace what is there.
    Overwrite,
}

/// Options of [`restore`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// What to do with keys that exist already.
    pub existing: Existing,
    /// Check everything and write nothing.
    pub dry_run: bool,
}

impl RestoreOptions {
    /// Refuse a non-empty target; write.
    pub fn new() -> Self {
        RestoreOptions::default()
    }

    /// Sets [`RestoreOptions::existing`].
    #[must_use]
    pub fn with_existing(mut self, existing: Existing) -> Self {
        self.existing = existing;
        self
    }

    /// Sets [`RestoreOptions::dry_run`].
    #[must_use]
    pub fn with_dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }
}

/// What [`restore`] did.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct RestoreSummary {
    /// The snapshot's header.
    pub header: Option<SnapshotHeader>,
    /// Items read from the snapshot.
    pub read: u64,
    /// Items written (in a dry run: that would be written).
    pub written: u64,
    /// Items skipped because the target held the same value already.
    pub unchanged: u64,
    /// Items per kind, as the snapshot counted them.
    pub per_kind: BTreeMap<String, u64>,
    /// Whether the whole restore was one transaction (all or nothing).
    pub atomic: bool,
}

/// How many items one write of a restore carries where transactions are limited in size.
const BATCH: usize = 128;

/// Restores a snapshot's entries into `client`: validates every item against the target's
/// registry, refuses a target that holds any of the snapshot's kinds (unless
/// [`Existing::Resume`] or [`Existing::Overwrite`]), then writes. Where the target has
/// transactions without a size limit (memory, SQLite) the whole restore is one transaction,
/// all or nothing; elsewhere (etcd, Kubernetes) it writes in batches, and an interrupted
/// restore is finished by running it again with [`Existing::Resume`].
///
/// # Errors
/// [`Error::Invalid`] for a snapshot that does not parse, is cut short, or holds an item the
/// target refuses; [`Error::AlreadyExists`] for a non-empty target; datastore errors.
pub async fn restore(
    client: &dyn Client,
    entries: impl Stream<Item = Result<SnapshotEntry>> + Send,
    opts: &RestoreOptions,
) -> Result<RestoreSummary> {
    restore_with_progress(client, entries, opts, &mut |_| {}).await
}

/// [`restore`], calling `progress` with the number of items handled so far as it goes.
///
/// # Errors
/// As [`restore`].
pub async fn restore_with_progress(
    client: &dyn Client,
    entries: impl Stream<Item = Result<SnapshotEntry>> + Send,
    opts: &RestoreOptions,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<RestoreSummary> {
    let mut entries = std::pin::pin!(entries);
    let Some(SnapshotEntry::Header(header)) = entries.try_next().await? else {
        return Err(Error::invalid(
            "snapshot",
            "it does not start with a header",
        ));
    };
    let registry = client.codec().registry().clone();
    for kind in &header.kinds {
        registry.kind(kind)?;
    }
    if opts.existing == Existing::Refuse {
        // Stops at the first item found: a full kind is not read to the end.
        for kind in &header.kinds {
            let mut pages = client.list_pages(&ListOptions::new(kind.as_str())).await?;
            while let Some(page) = pages.try_next().await? {
                if let Some(first) = page.items.first() {
                    return Err(Error::AlreadyExists {
                        key: first.key.clone(),
                    });
                }
            }
        }
    }
    let caps = client.capabilities();
    let atomic =
        caps.transactions && caps.max_txn_ops.is_none() && opts.existing != Existing::Resume;
    let mut summary = RestoreSummary {
        header: Some(header.clone()),
        atomic,
        ..RestoreSummary::default()
    };
    let kinds: BTreeSet<&String> = header.kinds.iter().collect();
    let mut txn = Txn::new();
    let mut batch: Vec<KVPair> = Vec::new();
    let mut ended = false;
    while let Some(entry) = entries.try_next().await? {
        match entry {
            SnapshotEntry::Header(_) => {
                return Err(Error::invalid("snapshot", "a second header"));
            }
            SnapshotEntry::Item(item) => {
                if !kinds.contains(&item.kind) {
                    return Err(Error::invalid(
                        "snapshot",
                        format!("{} is of a kind its header does not name", item.key()),
                    ));
                }
                summary.read += 1;
                let kvp = KVPair::new(item.key(), item.value);
                if atomic {
                    // The transaction validates every item before anything is written.
                    if opts.existing == Existing::Refuse {
                        txn = txn.when([Compare::Absent(kvp.key.clone())]);
                    }
                    txn = txn.and_then([TxnOp::Put(kvp)]);
                } else {
                    // Validated now, so that a bad item fails the restore before its batch
                    // is written (key by key where the target has no transactions).
                    crate::kernel::encode_for_write(client.codec(), &kvp)?;
                    batch.push(kvp);
                    if batch.len() == BATCH {
                        write_batch(client, std::mem::take(&mut batch), opts, &mut summary).await?;
                    }
                }
                progress(summary.read);
            }
            SnapshotEntry::KindEnd { end_of, count, .. } => {
                summary.per_kind.insert(end_of, count);
            }
            SnapshotEntry::End { count, .. } => {
                if count != summary.read {
                    return Err(Error::invalid(
                        "snapshot",
                        format!("it says {count} items but holds {}", summary.read),
                    ));
                }
                ended = true;
            }
        }
    }
    if !ended {
        return Err(Error::invalid(
            "snapshot",
            "it was cut short (no end entry)",
        ));
    }
    if atomic {
        summary.written = summary.read;
        if !opts.dry_run && !txn.then.is_empty() {
            let resp = client.txn(txn).await?;
            if !resp.succeeded {
                return Err(Error::invalid(
                    "target",
                    "another writer created some of the snapshot's keys during the restore; \
                     nothing was written",
                ));
            }
        }
    } else {
        write_batch(client, batch, opts, &mut summary).await?;
    }
    Ok(summary)
}

/// Writes one batch: as one transaction where the target has them (each key required absent,
/// unless overwriting), else key by key; keys found to exist are handled as `opts` says.
async fn write_batch(
    client: &dyn Client,
    batch: Vec<KVPair>,
    opts: &RestoreOptions,
    summary: &mut RestoreSummary,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    if opts.dry_run {
        for kvp in batch {
            match client.get_opt(&kvp.key, &Default::default()).await? {
                Some(cur) if same_value(&cur.value, &kvp.value) => summary.unchanged += 1,
                Some(_) if opts.existing != Existing::Overwrite => {
                    return Err(differs(&kvp.key));
                }
                _ => summary.written += 1,
            }
        }
        return Ok(());
    }
    let caps = client.capabilities();
    if caps.transactions && opts.existing != Existing::Overwrite {
        let n = batch.len() as u64;
        let txn = Txn::new()
            .when(batch.iter().map(|k| Compare::Absent(k.key.clone())))
            .and_then(batch.iter().cloned().map(TxnOp::Put));
        if client.txn(txn).await?.succeeded {
            summary.written += n;
            return Ok(());
        }
        // Some exist (a resumed restore): key by key.
    }
    let writes = batch.into_iter().map(|kvp| async move {
        let key = kvp.key.clone();
        let value = kvp.value.clone();
        match client.create(kvp.clone()).await {
            Ok(_) => Ok(true),
            Err(Error::AlreadyExists { .. }) => {
                let cur = client.get_opt(&key, &Default::default()).await?;
                match cur {
                    Some(cur) if same_value(&cur.value, &value) => Ok(false),
                    _ if opts.existing == Existing::Overwrite => {
                        client.apply(kvp).await?;
                        Ok(true)
                    }
                    _ => Err(differs(&key)),
                }
            }
            Err(e) => Err(e),
        }
    });
    let results: Vec<Result<bool>> = futures::stream::iter(writes).buffered(16).collect().await;
    for r in results {
        if r? {
            summary.written += 1;
        } else {
            summary.unchanged += 1;
        }
    }
    Ok(())
}

fn differs(key: &ResourceKey) -> Error {
    Error::Conflict {
        key: key.clone(),
        expected: None,
        actual: None,
    }
}

fn same_value(a: &Json, b: &Json) -> bool {
    match (a.as_value(), b.as_value()) {
        (Ok(a), Ok(b)) => crate::txn::json_eq(a, b),
        _ => false,
    }
}
