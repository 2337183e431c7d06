//! Where the API server is, and the kinds kept there.

use std::path::PathBuf;
use std::sync::Arc;

use kvsync_model::Registry;

/// Where the Kubernetes API server is, and the kinds kept there.
///
/// ```
/// use kvsync_backend::KubernetesConfig;
///
/// let config = KubernetesConfig::new(kvsync_model::Registry::new())
///     .with_kubeconfig("/etc/kvsync/kubeconfig")
///     .with_watch_list(false); // paged lists only
/// assert!(!config.watch_list);
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
    /// Read the initial state with a streaming "watch-list" request (`sendInitialEvents`,
    /// a consistent read) instead of paged LISTs, and go on watching on the same stream: the
    /// API server serves it from its watch cache, sparing etcd, and it was the fastest mode
    /// measured on a real server. On by default. Where the server refuses it (Kubernetes
    /// before 1.27 or without the WatchList feature, etcd under it without progress
    /// notifications) the backend says so once in the log and reads with paged lists from
    /// then on.
    pub watch_list: bool,
    /// The namespace of the coordination.k8s.io/v1 Leases behind locks and elections (as
    /// client-go's `--leader-elect-resource-namespace`); `None`: the kubeconfig context's
    /// namespace, in a pod its own namespace, else `default`.
    pub lease_namespace: Option<String>,
    /// How long a watch may bring nothing, not even a bookmark, before it is taken for dead
    /// and reopened from the last resourceVersion seen (3 minutes: three of the API server's
    /// one-minute bookmark intervals). At least 100 ms.
    pub watch_idle_timeout: std::time::Duration,
    /// How many objects a page of a paged list asks for ([`KubernetesConfig::DEFAULT_PAGE_SIZE`] unless set;
    /// at least 1). Bigger pages cost the API server less (each page from its cache scans
    /// past the earlier ones) and the client more memory while a page is decoded.
    pub page_size: u32,
}

impl KubernetesConfig {
    /// The page size of paged lists unless [`KubernetesConfig::page_size`] says otherwise,
    /// chosen by measurement (BENCHMARKS.md, "Kubernetes: decoding and initial sync").
    pub const DEFAULT_PAGE_SIZE: u32 = 2_000;

    /// The kinds of `registry`, on the API server kube infers (`KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account), read with watch-list requests
    /// where the server serves them.
    pub fn new(registry: impl Into<Arc<Registry>>) -> Self {
        KubernetesConfig {
            kubeconfig: None,
            context: None,
            registry: registry.into(),
            watch_list: true,
            lease_namespace: None,
            watch_idle_timeout: std::time::Duration::from_secs(180),
            page_size: Self::DEFAULT_PAGE_SIZE,
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

    /// Keeps the Leases of locks and elections in `namespace` (see
    /// [`KubernetesConfig::lease_namespace`]).
    #[must_use]
    pub fn with_lease_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.lease_namespace = Some(namespace.into());
        self
    }

    /// Sets [`KubernetesConfig::watch_idle_timeout`].
    #[must_use]
    pub fn with_watch_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        self.watch_idle_timeout = idle;
        self
    }

    /// Sets [`KubernetesConfig::page_size`].
    #[must_use]
    pub fn with_page_size(mut self, objects: u32) -> Self {
        self.page_size = objects;
        self
    }

    /// Reads the initial state with streaming watch-list requests, or with paged lists only
    /// (`false`) (see [`KubernetesConfig::watch_list`]).
    #[must_use]
    pub fn with_watch_list(mut self, yes: bool) -> Self {
        self.watch_list = yes;
        self
    }
}
