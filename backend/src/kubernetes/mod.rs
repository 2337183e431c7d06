//! The Kubernetes CRD backend: each kind is a CustomResource (Calico's "KDD" mode).
//!
//! - A kind maps to the CRD `<plural>.<group>` (group `kvsync.dev`, version `v1` for the demo
//!   kinds) with its scope; the resource value is the object's `spec`, name and namespace come
//!   from the key, `revision` is the object's `resourceVersion` (opaque), `uid` is
//!   `metadata.uid`. The CRDs come from `kvsync crds` (deploy/crds).
//! - `create` is a POST (409 -> [`Error::AlreadyExists`]); `update` a PUT carrying the
//!   resourceVersion (409 -> [`Error::Conflict`] with the actual revision, read back); `apply`
//!   creates or replaces; `delete` sends a resourceVersion precondition when given and returns
//!   the deleted value; `list` pages with `limit`/`continue` (one consistent snapshot, the
//!   revision from the list's metadata).
//! - `watch` is list-then-watch from a resourceVersion with bookmarks requested (with
//!   [`KubernetesConfig::watch_list`], the list is a streaming watch-list request instead);
//!   `410 Gone`
//!   (an expired resourceVersion) surfaces as [`Error::Compacted`] so the Syncer relists; a
//!   closed stream is a retryable [`Error::Unavailable`]. kube's errors map onto the crate's
//!   kinds: 401/403 -> [`Error::Unauthorized`], 422 -> [`Error::Invalid`], 5xx and transport
//!   errors -> [`Error::Unavailable`].
//! - **TTLs are not supported** by the Kubernetes API: a KVPair with a `ttl` gets
//!   [`Error::Unsupported`] and nothing is written. Reads at an old revision and compaction
//!   are not supported either (the API server keeps a short window of its own);
//!   `current_revision` is unsupported, so a Syncer relists after an outage.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
    Preconditions, WatchEvent as KubeEvent, WatchParams,
};
use kube::core::Status;
use kvsync_model::{
    DeleteOptions, GetOptions, KVList, KVPair, KindInfo, ListOptions, PathCodec, Registry,
    ResourceKey, Revision,
};
use serde_json::{Value, json};
use std::sync::Arc;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::{
    Decoded, check_delete, encode_for_write, fuse_after_error, parse_error, push_listed, put_event,
    undecodable_last_value,
};
use crate::watch::{WatchEvent, WatchStream};

/// How many objects a list page asks for.
const PAGE_LIMIT: u32 = 500;
/// How many times a write retries when other writers keep changing its object.
const MAX_WRITE_RETRIES: usize = 32;

/// Where the Kubernetes API server is, and the kinds kept there.
///
/// ```
/// use kvsync_backend::KubernetesConfig;
///
/// let config = KubernetesConfig::new(kvsync_model::Registry::new())
///     .with_kubeconfig("/etc/kvsync/kubeconfig")
///     .with_watch_list(true);
/// assert!(config.watch_list);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct KubernetesConfig {
    /// A kubeconfig file; `None` infers the configuration as kube does (`KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: the current one).
    pub context: Option<String>,
    /// The kinds, each stored as a CustomResource of its group.
    pub registry: Arc<Registry>,
    /// Read the initial state with a streaming "watch-list" request (`sendInitialEvents`)
    /// instead of paged LISTs: the API server serves it from its watch cache, sparing etcd.
    /// Needs Kubernetes 1.27+ with the WatchList feature, and etcd 3.4.31+ under the API
    /// server, so it is off by default.
    pub watch_list: bool,
}

impl KubernetesConfig {
    /// The kinds of `registry`, on the API server kube infers (`KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account), read with paged lists.
    pub fn new(registry: impl Into<Arc<Registry>>) -> Self {
        KubernetesConfig {
            kubeconfig: None,
            context: None,
            registry: registry.into(),
            watch_list: false,
        }
    }

    /// Reads this kubeconfig file instead of inferring the configuration.
    #[must_use]
    pub fn with_kubeconfig(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// Uses this kubeconfig context instead of the current one.
    #[must_use]
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// Reads the initial state with streaming watch-list requests (see
    /// [`KubernetesConfig::watch_list`]).
    #[must_use]
    pub fn with_watch_list(mut self, yes: bool) -> Self {
        self.watch_list = yes;
        self
    }
}

/// The Kubernetes CRD backend. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesBackend {
    client: kube::Client,
    codec: PathCodec,
    watch_list: bool,
}

impl fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("default_namespace", &self.client.default_namespace())
            .finish_non_exhaustive()
    }
}

/// Maps an API status onto the crate's kinds; `at` is the resourceVersion the request asked
/// for, which a `410 Gone` names as compacted.
fn status_err(s: &Status, key: Option<&ResourceKey>, at: Option<&Revision>) -> Error {
    let message = if s.message.is_empty() {
        s.reason.clone()
    } else {
        s.message.clone()
    };
    match (s.code, key) {
        (404, Some(k)) => Error::NotFound { key: k.clone() },
        (409, Some(k)) if s.reason == "AlreadyExists" => Error::AlreadyExists { key: k.clone() },
        (410, _) => match at {
            Some(at) => Error::Compacted {
                requested: at.clone(),
                compacted: None,
            },
            // A continue token of a list that expired: list again from the start.
            None => Error::Unavailable {
                message: format!("kubernetes: {message} (410 Gone): list again"),
                source: Some(Box::new(s.clone())),
            },
        },
        (401 | 403, _) => Error::Unauthorized { message },
        (400 | 422, _) => Error::Invalid {
            field: "object".into(),
            reason: format!("the API server refused it: {message}"),
        },
        (code, _) => Error::Unavailable {
            message: format!("kubernetes: {message} ({code})"),
            source: Some(Box::new(s.clone())),
        },
    }
}

/// Maps a kube error onto the crate's kinds (see [`status_err`]).
fn map_err(e: kube::Error, key: Option<&ResourceKey>, at: Option<&Revision>) -> Error {
    match e {
        kube::Error::Api(s) => status_err(&s, key, at),
        kube::Error::SerdeError(e) => Error::Parse {
            raw_key: key.map(ToString::to_string).unwrap_or_default(),
            raw_value: Vec::new(),
            source: Box::new(e),
        },
        other => Error::Unavailable {
            message: format!("kubernetes: {other}"),
            source: Some(Box::new(other)),
        },
    }
}

fn api_resource(info: &KindInfo) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&info.group, &info.version, &info.kind),
        &info.plural,
    )
}

impl KubernetesBackend {
    /// Connects with `config`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when no configuration can be found or read.
    pub async fn connect(config: KubernetesConfig) -> Result<Self> {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    Error::invalid("kubeconfig", format!("cannot read {}: {e}", path.display()))
                })?;
                let opts = kube::config::KubeConfigOptions {
                    context: config.context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| Error::invalid("kubeconfig", e.to_string()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| Error::invalid("kubeconfig", e.to_string()))?,
        };
        let client = kube::Client::try_from(kube_config)
            .map_err(|e| Error::invalid("kubeconfig", e.to_string()))?;
        Ok(KubernetesBackend {
            client,
            codec: PathCodec::with_registry(config.registry),
            watch_list: config.watch_list,
        })
    }

    /// The underlying kube client.
    pub fn kube_client(&self) -> &kube::Client {
        &self.client
    }

    fn api(&self, kind: &str, namespace: Option<&str>) -> Result<Api<DynamicObject>> {
        let info = self.codec.registry().kind(kind)?;
        let ar = api_resource(info);
        Ok(match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        })
    }

    fn to_object(&self, kvp: &KVPair, resource_version: Option<String>) -> Result<DynamicObject> {
        let info = self.codec.registry().kind(&kvp.key.kind)?;
        let mut obj = DynamicObject::new(&kvp.key.name, &api_resource(info)).data(json!({
            "spec": kvp.value,
        }));
        obj.metadata.namespace = kvp.key.namespace.clone();
        obj.metadata.resource_version = resource_version;
        Ok(obj)
    }

    /// The KVPair of an object, or why it has none (an object without `spec`).
    fn decode(&self, kind: &str, obj: DynamicObject) -> Decoded {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let key = match obj.metadata.namespace.clone() {
            Some(ns) => ResourceKey::namespaced(kind, ns, name),
            None => ResourceKey::cluster(kind, name),
        };
        let revision = obj.metadata.resource_version.map(Revision::from);
        let mut data = obj.data;
        let Some(spec) = data.get_mut("spec").map(Value::take) else {
            return Err(Box::new(kvsync_model::ParseFailure {
                raw_key: self.codec.to_path(&key).unwrap_or_else(|_| key.to_string()),
                raw_value: data.to_string().into_bytes(),
                key: Some(key),
                revision,
                reason: "the object has no spec".into(),
            }));
        };
        Ok(KVPair {
            key,
            value: spec.into(),
            revision,
            create_revision: None,
            uid: obj.metadata.uid,
            ttl: None,
        })
    }

    /// [`KubernetesBackend::decode`] for the calls that return one pair.
    fn to_kvp(&self, kind: &str, obj: DynamicObject) -> Result<KVPair> {
        self.decode(kind, obj).map_err(|f| parse_error(*f))
    }

    fn check_writable(&self, kvp: &KVPair) -> Result<()> {
        encode_for_write(&self.codec, kvp)?;
        if kvp.ttl.is_some() {
            return Err(Error::Unsupported {
                op: "ttl".into(),
                backend: "kubernetes",
            });
        }
        Ok(())
    }

    async fn current(&self, key: &ResourceKey) -> Result<Option<DynamicObject>> {
        let api = self.api(&key.kind, key.namespace.as_deref())?;
        api.get_opt(&key.name)
            .await
            .map_err(|e| map_err(e, Some(key), None))
    }

    async fn replace(
        &self,
        kvp: &KVPair,
        rv: String,
    ) -> Result<std::result::Result<KVPair, Error>> {
        let api = self.api(&kvp.key.kind, kvp.key.namespace.as_deref())?;
        let obj = self.to_object(kvp, Some(rv))?;
        match api
            .replace(&kvp.key.name, &PostParams::default(), &obj)
            .await
        {
            Ok(o) => Ok(Ok(self.to_kvp(&kvp.key.kind, o)?)),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Err(status_err(&s, Some(&kvp.key), None)))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::NotFound {
                key: kvp.key.clone(),
            }),
            Err(e) => Err(map_err(e, Some(&kvp.key), None)),
        }
    }

    /// Reads the current state with a streaming watch-list request: ADDED events for every
    /// object, then a bookmark marked `k8s.io/initial-events-end` whose resourceVersion is
    /// the snapshot's.
    async fn stream_list(
        &self,
        api: &Api<DynamicObject>,
        opts: &ListOptions,
        list: &mut KVList,
    ) -> Result<()> {
        let wp = WatchParams {
            send_initial_events: true,
            bookmarks: true,
            ..WatchParams::default()
        }
        .timeout(290);
        let stream = api
            .watch(&wp, "0")
            .await
            .map_err(|e| map_err(e, None, None))?;
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item.map_err(|e| map_err(e, None, None))? {
                KubeEvent::Added(o) | KubeEvent::Modified(o) => {
                    push_listed(list, opts, self.decode(&opts.kind, o));
                }
                KubeEvent::Deleted(_) => {}
                KubeEvent::Bookmark(b) => {
                    let end = b
                        .metadata
                        .annotations
                        .get("k8s.io/initial-events-end")
                        .is_some_and(|v| v == "true");
                    if end {
                        list.revision = Revision::from(b.metadata.resource_version);
                        return Ok(());
                    }
                }
                KubeEvent::Error(s) => return Err(status_err(&s, None, None)),
            }
        }
        Err(Error::unavailable(
            "the API server closed the watch-list stream before the initial events ended",
        ))
    }

    /// POST: 409 is AlreadyExists.
    async fn create_object(&self, kvp: KVPair) -> Result<KVPair> {
        let api = self.api(&kvp.key.kind, kvp.key.namespace.as_deref())?;
        let obj = self.to_object(&kvp, None)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(o) => self.to_kvp(&kvp.key.kind, o),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::AlreadyExists { key: kvp.key }),
            Err(e) => Err(map_err(e, Some(&kvp.key), None)),
        }
    }

    /// PUT with the given resourceVersion, or with the current one (retried while others
    /// write).
    async fn update_object(&self, kvp: KVPair) -> Result<KVPair> {
        if let Some(expected) = kvp.revision.clone() {
            return match self.replace(&kvp, expected.to_string()).await? {
                Ok(k) => Ok(k),
                Err(_) => Err(self.conflict(&kvp, &expected).await),
            };
        }
        for _ in 0..MAX_WRITE_RETRIES {
            let Some(cur) = self.current(&kvp.key).await? else {
                return Err(Error::NotFound { key: kvp.key });
            };
            let rv = cur.metadata.resource_version.unwrap_or_default();
            if let Ok(k) = self.replace(&kvp, rv).await? {
                return Ok(k);
            }
        }
        Err(Error::unavailable(format!("{} kept changing", kvp.key)))
    }

    /// POST when absent, PUT over the current resourceVersion when present.
    async fn apply_object(&self, kvp: KVPair) -> Result<KVPair> {
        for _ in 0..MAX_WRITE_RETRIES {
            match self.current(&kvp.key).await? {
                None => match self.create_object(kvp.clone()).await {
                    Err(Error::AlreadyExists { .. }) => continue,
                    other => return other,
                },
                Some(cur) => {
                    let rv = cur.metadata.resource_version.unwrap_or_default();
                    match self.replace(&kvp, rv).await {
                        Ok(Ok(k)) => return Ok(k),
                        Ok(Err(_)) | Err(Error::NotFound { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(Error::unavailable(format!("{} kept changing", kvp.key)))
    }

    async fn conflict(&self, kvp: &KVPair, expected: &Revision) -> Error {
        let actual = match self.current(&kvp.key).await {
            Ok(Some(o)) => o.metadata.resource_version.map(Revision::from),
            _ => None,
        };
        Error::Conflict {
            key: kvp.key.clone(),
            expected: Some(expected.clone()),
            actual,
        }
    }
}

#[async_trait]
impl Client for KubernetesBackend {
    fn codec(&self) -> &PathCodec {
        &self.codec
    }

    fn backend_name(&self) -> &'static str {
        "kubernetes"
    }

    fn capabilities(&self) -> Capabilities {
        // No TTLs, no reads of the past, no compaction from a client, opaque
        // resourceVersions, values stored as JSON objects; the API server's request limit
        // (3 MiB) and etcd's (1.5 MiB by default) bound an object.
        Capabilities::none().with_max_value_bytes(Some(1_572_864 - 4_096))
    }

    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        self.check_writable(&kvp)?;
        match mode {
            WriteMode::Create => self.create_object(kvp).await,
            WriteMode::Update => self.update_object(kvp).await,
            WriteMode::Apply => self.apply_object(kvp).await,
        }
    }

    /// A real API server answers the DELETE of a custom resource with a `Status`, not the
    /// object, once the object is gone: so the object is read first, deleted with that read's
    /// resourceVersion and uid as preconditions (nothing else can be deleted), and read again
    /// when another writer came first. What was read is the last value returned.
    async fn delete(&self, key: &ResourceKey, opts: &DeleteOptions) -> Result<KVPair> {
        self.codec.validate(key)?;
        let api = self.api(&key.kind, key.namespace.as_deref())?;
        for _ in 0..MAX_WRITE_RETRIES {
            let Some(obj) = self.current(key).await? else {
                return Err(Error::NotFound { key: key.clone() });
            };
            let rv = obj.metadata.resource_version.clone().unwrap_or_default();
            let uid = obj.metadata.uid.clone();
            check_delete(key, opts, &Revision::from(rv.as_str()), uid.as_deref())?;
            let last = self.to_kvp(&key.kind, obj).unwrap_or_else(|_| {
                undecodable_last_value(key, Revision::from(rv.as_str()), None, uid.clone())
            });
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(rv),
                    uid,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&key.name, &dp).await {
                // The object (while finalizers hold it) or a Status: either way it is what
                // was read that was deleted.
                Ok(_) => return Ok(last),
                // Written since it was read: read again (and check the preconditions again).
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(Error::NotFound { key: key.clone() });
                }
                Err(e) => return Err(map_err(e, Some(key), None)),
            }
        }
        Err(Error::unavailable(format!("{key} kept changing")))
    }

    async fn get(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair> {
        self.codec.validate(key)?;
        if opts.revision.is_some() {
            return Err(Error::Unsupported {
                op: "get at a revision".into(),
                backend: "kubernetes",
            });
        }
        match self.current(key).await? {
            Some(o) => self.to_kvp(&key.kind, o),
            None => Err(Error::NotFound { key: key.clone() }),
        }
    }

    /// The API server's pages (`limit` and `continue`), each handed on as it comes (a
    /// watch-list stream comes as one page).
    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        self.codec.list_prefix(opts)?;
        if opts.revision.is_some() {
            return Err(Error::Unsupported {
                op: "list at a revision".into(),
                backend: "kubernetes",
            });
        }
        let api = self.api(&opts.kind, opts.namespace.as_deref())?;
        if self.watch_list {
            let mut list = KVList {
                items: Vec::new(),
                revision: Revision::from(""),
                parse_failures: Vec::new(),
            };
            self.stream_list(&api, opts, &mut list).await?;
            sort_items(&mut list);
            return Ok(futures::stream::iter([Ok(list)]).boxed());
        }
        let this = self.clone();
        let opts = opts.clone();
        // (continue token, revision of the first page); `None` once the last page is read.
        let start: Option<(Option<String>, Option<Revision>)> = Some((None, None));
        Ok(futures::stream::try_unfold(start, move |state| {
            let (api, this, opts) = (api.clone(), this.clone(), opts.clone());
            async move {
                let Some((token, revision)) = state else {
                    return Ok(None);
                };
                let mut lp = ListParams::default().limit(PAGE_LIMIT);
                if let Some(t) = &token {
                    lp = lp.continue_token(t);
                }
                if let Some(name) = &opts.name {
                    lp = lp.fields(&format!("metadata.name={name}"));
                }
                let page = api.list(&lp).await.map_err(|e| map_err(e, None, None))?;
                // Every page belongs to the first page's snapshot.
                let revision = revision.unwrap_or_else(|| {
                    Revision::from(page.metadata.resource_version.clone().unwrap_or_default())
                });
                let mut list = KVList {
                    items: Vec::with_capacity(page.items.len()),
                    revision: revision.clone(),
                    parse_failures: Vec::new(),
                };
                for obj in page.items {
                    push_listed(&mut list, &opts, this.decode(&opts.kind, obj));
                }
                sort_items(&mut list);
                let next = page
                    .metadata
                    .continue_
                    .filter(|t| !t.is_empty())
                    .map(|t| (Some(t), Some(revision)));
                Ok(Some((list, next)))
            }
        })
        .boxed())
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        self.codec.list_prefix(opts)?;
        let api = self.api(&opts.kind, opts.namespace.as_deref())?;
        let from = match &opts.revision {
            Some(r) => r.to_string(),
            None => {
                let page = api
                    .list(&ListParams::default().limit(1))
                    .await
                    .map_err(|e| map_err(e, None, None))?;
                page.metadata.resource_version.unwrap_or_default()
            }
        };
        let wp = WatchParams::default().timeout(290);
        let requested = Revision::from(from.as_str());
        let stream = api
            .watch(&wp, &from)
            .await
            .map_err(|e| map_err(e, None, Some(&requested)))?;
        let kind = opts.kind.clone();
        let opts = opts.clone();
        let this = self.clone();
        let at = requested.clone();
        let events = stream
            .map_err(move |e| map_err(e, None, Some(&at)))
            .filter_map(move |item| {
                let out = match item {
                    Err(e) => Some(Err(e)),
                    Ok(KubeEvent::Bookmark(b)) => Some(Ok(WatchEvent::Bookmark(Revision::from(
                        b.metadata.resource_version,
                    )))),
                    Ok(KubeEvent::Error(s)) => Some(Err(status_err(&s, None, Some(&requested)))),
                    Ok(KubeEvent::Added(o)) => convert(&this, &kind, &opts, o, true),
                    Ok(KubeEvent::Modified(o)) => convert(&this, &kind, &opts, o, false),
                    Ok(KubeEvent::Deleted(o)) => match this.decode(&kind, o) {
                        Ok(k) if opts.matches(&k.key) => Some(Ok(WatchEvent::Deleted {
                            key: k.key.clone(),
                            revision: k.revision.clone().unwrap_or_else(|| Revision::from("")),
                            old: Some(k),
                        })),
                        Ok(_) => None,
                        // Gone without a readable value: still gone.
                        Err(f) => {
                            let f = *f;
                            let revision = f.revision.unwrap_or_else(|| Revision::from(""));
                            f.key.filter(|key| opts.matches(key)).map(|key| {
                                Ok(WatchEvent::Deleted {
                                    key,
                                    revision,
                                    old: None,
                                })
                            })
                        }
                    },
                };
                futures::future::ready(out)
            });
        // An error ends the stream; so does the server closing it, which is retryable.
        let ended = futures::stream::once(async {
            Err(Error::unavailable("the API server closed the watch"))
        });
        Ok(fuse_after_error(events.chain(ended)))
    }

    async fn ensure_initialized(&self) -> Result<()> {
        for info in self.codec.registry().kinds() {
            let api = self.api(&info.kind, None)?;
            match api.list(&ListParams::default().limit(1)).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(Error::invalid(
                        "crd",
                        format!(
                            "the CRD {}.{} is not installed: kubectl apply -f deploy/crds",
                            info.plural, info.group
                        ),
                    ));
                }
                Err(e) => return Err(map_err(e, None, None)),
            }
        }
        Ok(())
    }

    async fn clean(&self) -> Result<()> {
        for info in self.codec.registry().kinds() {
            let list = self.list(&ListOptions::new(&info.kind)).await?;
            for kvp in list.items {
                match self.delete(&kvp.key, &DeleteOptions::new()).await {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

fn sort_items(list: &mut KVList) {
    list.items
        .sort_by(|a, b| (&a.key.namespace, &a.key.name).cmp(&(&b.key.namespace, &b.key.name)));
}

/// The watch event of an added or modified object, if `opts` covers it.
fn convert(
    this: &KubernetesBackend,
    kind: &str,
    opts: &ListOptions,
    obj: DynamicObject,
    created: bool,
) -> Option<Result<WatchEvent>> {
    put_event(opts, this.decode(kind, obj), created, None).map(Ok)
}
