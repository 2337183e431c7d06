//! Runs the suites in a datastore other users share (a real Kubernetes cluster) without
//! seeing or touching anything but their own keys.
//!
//! [`Isolated`] wraps a client and gives every key a run tag on the way in and takes it off on
//! the way out: a namespaced key's namespace `ns` is stored as `<tag>-ns` (a fresh namespace
//! per client and logical namespace), a cluster-scoped key's name `n` as `<tag>-n`. Lists and
//! watches see only the tagged keys, with the tag taken off, and errors name the keys the
//! caller gave. The suites run through it unchanged, as they run on a prefix of etcd.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::BoxFuture;
use kvsync_backend::{Client, Error, ListPages, Result, WatchEvent, WatchStream};
use kvsync_model::{KVList, KVPair, ListOptions, ParseFailure, PathCodec, ResourceKey, Revision};

/// Makes sure a namespace exists before the first write into it (creates it on a cluster).
pub type EnsureNamespace = Arc<dyn Fn(String) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// A client that sees only the keys carrying its tag; see the [module docs](self).
pub struct Isolated {
    inner: Arc<dyn Client>,
    tags: Tags,
    ensure_namespace: Option<EnsureNamespace>,
    namespaces: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Isolated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Isolated")
            .field("inner", &self.inner)
            .field("mark", &self.tags.mark)
            .finish_non_exhaustive()
    }
}

/// Puts the tag on keys and takes it off.
#[derive(Clone)]
struct Tags {
    inner: Arc<dyn Client>,
    /// `<tag>-`, the prefix of every stored namespace or cluster-scoped name.
    mark: String,
}

impl Tags {
    fn scope(&self, kind: &str) -> Option<Scope> {
        let info = self.inner.codec().registry().kind(kind).ok()?;
        Some(if info.namespaced {
            Scope::Namespace
        } else {
            Scope::Name
        })
    }

    /// The stored form of a key the caller gave. Invalid keys pass as they are, so that the
    /// backend refuses them with its own error.
    fn tag_key(&self, key: &ResourceKey) -> ResourceKey {
        if self.inner.codec().validate(key).is_err() {
            return key.clone();
        }
        let mut key = key.clone();
        match (self.scope(&key.kind), key.namespace.as_mut()) {
            (Some(Scope::Namespace), Some(ns)) => *ns = format!("{}{ns}", self.mark),
            (Some(Scope::Name), _) => key.name = format!("{}{}", self.mark, key.name),
            _ => {}
        }
        key
    }

    /// The caller's form of a stored key; `None` when it is not this client's.
    fn untag_key(&self, key: &ResourceKey) -> Option<ResourceKey> {
        let mut key = key.clone();
        match self.scope(&key.kind)? {
            Scope::Namespace => {
                let ns = key.namespace.as_mut()?;
                *ns = ns.strip_prefix(&self.mark)?.to_owned();
            }
            Scope::Name => key.name = key.name.strip_prefix(&self.mark)?.to_owned(),
        }
        Some(key)
    }

    /// A stored key as the caller knows it (or as it is, if it is not this client's).
    fn shown(&self, key: ResourceKey) -> ResourceKey {
        self.untag_key(&key).unwrap_or(key)
    }

    fn tag_opts(&self, opts: &ListOptions) -> ListOptions {
        let mut opts = opts.clone();
        match self.scope(&opts.kind) {
            Some(Scope::Namespace) => {
                if let Some(ns) = opts.namespace.as_mut() {
                    *ns = format!("{}{ns}", self.mark);
                }
            }
            Some(Scope::Name) => {
                if let Some(name) = opts.name.as_mut() {
                    *name = format!("{}{name}", self.mark);
                }
                let prefix = opts.name_prefix.take().unwrap_or_default();
                opts.name_prefix = Some(format!("{}{prefix}", self.mark));
            }
            None => {}
        }
        opts
    }

    fn untag_list(&self, list: KVList) -> KVList {
        KVList {
            items: list
                .items
                .into_iter()
                .filter_map(|k| self.untag_kvp(k))
                .collect(),
            revision: list.revision,
            parse_failures: list
                .parse_failures
                .into_iter()
                .filter_map(|f| self.untag_failure(f))
                .collect(),
        }
    }

    fn untag_kvp(&self, mut kvp: KVPair) -> Option<KVPair> {
        kvp.key = self.untag_key(&kvp.key)?;
        Some(kvp)
    }

    fn shown_kvp(&self, mut kvp: KVPair) -> KVPair {
        kvp.key = self.shown(kvp.key);
        kvp
    }

    fn untag_failure(&self, mut f: ParseFailure) -> Option<ParseFailure> {
        let key = self.untag_key(f.key.as_ref()?)?;
        if let Ok(path) = self.inner.codec().to_path(&key) {
            f.raw_key = path;
        }
        f.key = Some(key);
        Some(f)
    }

    fn untag_event(&self, ev: WatchEvent) -> Option<WatchEvent> {
        Some(match ev {
            WatchEvent::Added(kvp) => WatchEvent::Added(self.untag_kvp(kvp)?),
            WatchEvent::Modified { new, old } => WatchEvent::Modified {
                new: self.untag_kvp(new)?,
                old: old.and_then(|o| self.untag_kvp(o)),
            },
            WatchEvent::Deleted { key, revision, old } => WatchEvent::Deleted {
                key: self.untag_key(&key)?,
                revision,
                old: old.and_then(|o| self.untag_kvp(o)),
            },
            WatchEvent::Bookmark(r) => WatchEvent::Bookmark(r),
            WatchEvent::ParseFailed(f) => WatchEvent::ParseFailed(self.untag_failure(f)?),
        })
    }

    fn untag_error(&self, e: Error) -> Error {
        match e {
            Error::NotFound { key } => Error::NotFound {
                key: self.shown(key),
            },
            Error::AlreadyExists { key } => Error::AlreadyExists {
                key: self.shown(key),
            },
            Error::Conflict {
                key,
                expected,
                actual,
            } => Error::Conflict {
                key: self.shown(key),
                expected,
                actual,
            },
            other => other,
        }
    }
}

/// Which part of a key carries the tag.
enum Scope {
    Namespace,
    Name,
}

impl Isolated {
    /// `inner`, seeing only keys tagged with `tag` (a DNS label, e.g. `kvt3f9a1c-7`);
    /// `ensure_namespace`, when given, runs once per stored namespace before the first write.
    pub fn new(
        inner: Arc<dyn Client>,
        tag: &str,
        ensure_namespace: Option<EnsureNamespace>,
    ) -> Self {
        Isolated {
            tags: Tags {
                inner: inner.clone(),
                mark: format!("{tag}-"),
            },
            inner,
            ensure_namespace,
            namespaces: Mutex::new(BTreeSet::new()),
        }
    }

    /// The stored namespaces this client has written into.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock_namespaces().iter().cloned().collect()
    }

    fn lock_namespaces(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tags the key of a write, first making sure its stored namespace exists.
    async fn prepare_write(&self, mut kvp: KVPair) -> Result<KVPair> {
        kvp.key = self.tags.tag_key(&kvp.key);
        if let (Some(ensure), Some(ns)) = (&self.ensure_namespace, &kvp.key.namespace)
            && ns.starts_with(&self.tags.mark)
            && !self.lock_namespaces().contains(ns)
        {
            ensure(ns.clone()).await?;
            self.lock_namespaces().insert(ns.clone());
        }
        Ok(kvp)
    }
}

#[async_trait]
impl Client for Isolated {
    fn codec(&self) -> &PathCodec {
        self.inner.codec()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn capabilities(&self) -> kvsync_backend::Capabilities {
        self.inner.capabilities()
    }

    async fn write(&self, kvp: KVPair, mode: kvsync_backend::WriteMode) -> Result<KVPair> {
        let kvp = self.prepare_write(kvp).await?;
        self.inner
            .write(kvp, mode)
            .await
            .map(|k| self.tags.shown_kvp(k))
            .map_err(|e| self.tags.untag_error(e))
    }

    async fn delete(
        &self,
        key: &ResourceKey,
        opts: &kvsync_model::DeleteOptions,
    ) -> Result<KVPair> {
        self.inner
            .delete(&self.tags.tag_key(key), opts)
            .await
            .map(|k| self.tags.shown_kvp(k))
            .map_err(|e| self.tags.untag_error(e))
    }

    async fn get(&self, key: &ResourceKey, opts: &kvsync_model::GetOptions) -> Result<KVPair> {
        self.inner
            .get(&self.tags.tag_key(key), opts)
            .await
            .map(|k| self.tags.shown_kvp(k))
            .map_err(|e| self.tags.untag_error(e))
    }

    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        let tags = self.tags.clone();
        let pages = self.inner.list_pages(&self.tags.tag_opts(opts)).await?;
        Ok(pages
            .map(move |page| page.map(|list| tags.untag_list(list)))
            .boxed())
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        let tags = self.tags.clone();
        let stream = self.inner.watch(&self.tags.tag_opts(opts)).await?;
        Ok(stream
            .filter_map(move |item| {
                std::future::ready(match item {
                    Ok(ev) => tags.untag_event(ev).map(Ok),
                    Err(e) => Some(Err(e)),
                })
            })
            .boxed())
    }

    async fn ensure_initialized(&self) -> Result<()> {
        self.inner.ensure_initialized().await
    }

    /// Deletes this client's keys only.
    async fn clean(&self) -> Result<()> {
        let kinds: Vec<String> = self
            .inner
            .codec()
            .registry()
            .kinds()
            .into_iter()
            .map(|k| k.kind.clone())
            .collect();
        for kind in kinds {
            for kvp in self.list(&ListOptions::new(kind)).await?.items {
                match self
                    .delete(&kvp.key, &kvsync_model::DeleteOptions::new())
                    .await
                {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn compact(&self, revision: &Revision) -> Result<()> {
        self.inner.compact(revision).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.inner.current_revision().await
    }

    /// The inner client's lock records, with lock names and written keys tagged.
    fn lock_records(&self) -> Option<&dyn kvsync_backend::LockRecords> {
        self.inner
            .lock_records()
            .map(|_| self as &dyn kvsync_backend::LockRecords)
    }
}

#[async_trait]
impl kvsync_backend::LockRecords for Isolated {
    async fn read_lock_record(&self, name: &str) -> Result<Option<kvsync_backend::LockRecord>> {
        let records = self.inner.lock_records().expect("records");
        records
            .read_lock_record(&format!("{}{name}", self.tags.mark))
            .await
    }

    async fn write_lock_record(
        &self,
        name: &str,
        record: &kvsync_backend::LockRecord,
    ) -> Result<kvsync_backend::LockRecord> {
        let records = self.inner.lock_records().expect("records");
        records
            .write_lock_record(&format!("{}{name}", self.tags.mark), record)
            .await
    }

    async fn fenced_write(&self, kvp: KVPair, fence: &kvsync_backend::Fence) -> Result<KVPair> {
        let kvp = self.prepare_write(kvp).await?;
        let fence =
            kvsync_backend::Fence::new(format!("{}{}", self.tags.mark, fence.lock), fence.token);
        let records = self.inner.lock_records().expect("records");
        records
            .fenced_write(kvp, &fence)
            .await
            .map(|k| self.tags.shown_kvp(k))
            .map_err(|e| self.tags.untag_error(e))
    }
}
