//! The Kubernetes backend under test: through the API server double, or against a real
//! cluster when `KVSYNC_TEST_KUBECONFIG` names a kubeconfig ([`ClusterTestBackend`], which
//! CI also runs against the double so that path is never untested).

use std::sync::Arc;

use async_trait::async_trait;
use kvsync_backend::kubernetes::{KubernetesBackend, KubernetesConfig};
use kvsync_model::{Registry, Revision};

use crate::harness::{Guarded, RawAccess, TestBackend, TestClient};
use crate::isolate::{EnsureNamespace, Isolated};
use crate::kube_double::ApiServerDouble;
use crate::syncer_model::{self, ModelConfig};

/// The Kubernetes backend over a fresh API server double per client.
#[derive(Debug, Clone, Copy)]
pub struct KubeDoubleTestBackend {
    /// How many events the double keeps before a watch from older ones gets 410 Gone.
    pub window: usize,
    /// Whether the backend reads the initial state with watch-list requests.
    pub watch_list: bool,
    /// Whether the double ends every watch this soon after it opened (as a real server ends
    /// watches after their timeout), so that the backend must reopen them.
    pub watch_cap: Option<std::time::Duration>,
}

impl Default for KubeDoubleTestBackend {
    fn default() -> Self {
        KubeDoubleTestBackend {
            window: 10_000,
            watch_list: false,
            watch_cap: None,
        }
    }
}

struct DoubleRaw {
    double: Arc<ApiServerDouble>,
    codec: kvsync_model::PathCodec,
}

#[async_trait]
impl RawAccess for DoubleRaw {
    async fn put_raw(&self, path: &str, _bytes: &[u8]) -> Revision {
        // The API stores only JSON objects: the closest to garbage is an object without spec.
        let key = self.codec.from_path(path).expect("a kvsync path");
        let info = self.codec.registry().kind(&key.kind).expect("a known kind");
        let rv = self
            .double
            .put_without_spec(&info.plural, key.namespace.as_deref(), &key.name);
        Revision::from(rv.to_string())
    }

    async fn compact(&self, _client: &dyn kvsync_backend::Client, _revision: &Revision) {
        self.double.expire_history();
    }
}

/// Connects the backend to a double.
///
/// # Panics
/// If the kubeconfig the double wrote cannot be used.
pub async fn connect(double: &ApiServerDouble) -> KubernetesBackend {
    connect_with(double, false).await
}

/// Connects the backend to a double, with or without watch-list requests.
///
/// # Panics
/// If the kubeconfig the double wrote cannot be used.
pub async fn connect_with(double: &ApiServerDouble, watch_list: bool) -> KubernetesBackend {
    connect_configured(double, |c| c.with_watch_list(watch_list)).await
}

/// Connects the backend to a double with a configuration `configure` finishes.
///
/// # Panics
/// If the kubeconfig the double wrote cannot be used.
pub async fn connect_configured(
    double: &ApiServerDouble,
    configure: impl FnOnce(KubernetesConfig) -> KubernetesConfig,
) -> KubernetesBackend {
    KubernetesBackend::connect(configure(
        KubernetesConfig::new(kvsync_model::demo::registry()).with_kubeconfig(double.kubeconfig()),
    ))
    .await
    .expect("connect to the API server double")
}

#[async_trait]
impl TestBackend for KubeDoubleTestBackend {
    async fn client(&self) -> TestClient {
        let double =
            Arc::new(ApiServerDouble::start(&Registry::with_demo_kinds(), self.window).await);
        if let Some(cap) = self.watch_cap {
            double.close_watches_after(cap);
        }
        let backend = connect_with(&double, self.watch_list).await;
        let codec = kvsync_backend::Client::codec(&backend).clone();
        TestClient {
            client: Guarded::wrap(Arc::new(backend), double.clone()),
            raw: Arc::new(DoubleRaw { double, codec }),
        }
    }
}

/// The Kubernetes backend against a cluster other users may share: a real one named by
/// `KVSYNC_TEST_KUBECONFIG`, or the API server double standing in for one.
///
/// It installs the CRDs from deploy/crds, and every client it hands out is [`Isolated`] under
/// a tag of its own: namespaced keys go to fresh namespaces (`<tag>-<ns>`, created on first
/// use), cluster-scoped names get the tag as a prefix. Checks never see each other's keys or
/// anyone else's, and [`cleanup`](Self::cleanup) (or dropping the backend) deletes the
/// namespaces and cluster-scoped objects this run made.
pub struct ClusterTestBackend {
    kubeconfig: std::path::PathBuf,
    run: String,
    clients: std::sync::atomic::AtomicU64,
    namespaces: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    cleaned: std::sync::atomic::AtomicBool,
}

impl ClusterTestBackend {
    /// The cluster of `KVSYNC_TEST_KUBECONFIG`, prepared; `None` when the variable is unset.
    ///
    /// # Panics
    /// When the cluster refuses the CRDs.
    pub async fn from_env() -> Option<Self> {
        let kubeconfig = std::env::var_os("KVSYNC_TEST_KUBECONFIG")?;
        Some(Self::prepare(kubeconfig.into()).await)
    }

    /// The cluster of `kubeconfig`, with the CRDs of deploy/crds installed (created, or
    /// replaced when present) and served.
    ///
    /// # Panics
    /// When the cluster refuses the CRDs or does not serve them within 20 s.
    pub async fn prepare(kubeconfig: std::path::PathBuf) -> Self {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use kube::api::{Api, PostParams};
        use rand::Rng;
        let backend = ClusterTestBackend {
            kubeconfig,
            run: format!("kvt{:06x}", rand::rng().random_range(0..0x100_0000)),
            clients: std::sync::atomic::AtomicU64::new(0),
            namespaces: Arc::default(),
            cleaned: std::sync::atomic::AtomicBool::new(false),
        };
        let kube = backend.connect().await.kube_client().clone();
        // The Leases of the run's locks and elections live in a namespace of its own.
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(kube.clone());
        let leases = backend.lease_namespace();
        let ns = serde_json::from_value(serde_json::json!({
            "metadata": {"name": leases, "labels": {"app.kubernetes.io/created-by": "kvsync-tests"}}
        }))
        .expect("a namespace");
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create namespace {leases}: {e}"),
        }
        backend
            .namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(leases);
        let crds: Api<CustomResourceDefinition> = Api::all(kube);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("deploy/crds")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read CRD");
            let mut crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).expect("a CRD");
            let name = crd.metadata.name.clone().unwrap_or_default();
            match crds.get_opt(&name).await.expect("read CRD") {
                Some(existing) => {
                    crd.metadata.resource_version = existing.metadata.resource_version;
                    crds.replace(&name, &PostParams::default(), &crd)
                        .await
                        .expect("replace CRD");
                }
                None => {
                    crds.create(&PostParams::default(), &crd)
                        .await
                        .expect("create CRD");
                }
            }
        }
        let client = backend.connect().await;
        let mut served = false;
        for _ in 0..100 {
            if kvsync_backend::Client::ensure_initialized(&client)
                .await
                .is_ok()
            {
                served = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(
            served,
            "the cluster did not serve the kvsync CRDs within 20 s"
        );
        backend
    }

    /// The prefix of every tag this run uses, e.g. `kvt3f9a1c`.
    pub fn run_tag(&self) -> &str {
        &self.run
    }

    /// The namespace of this run's lock Leases (made in [`Self::prepare`]).
    fn lease_namespace(&self) -> String {
        format!("{}-leases", self.run)
    }

    async fn connect(&self) -> KubernetesBackend {
        KubernetesBackend::connect(
            KubernetesConfig::new(kvsync_model::demo::registry())
                .with_kubeconfig(self.kubeconfig.clone())
                .with_lease_namespace(self.lease_namespace()),
        )
        .await
        .expect("connect to the cluster")
    }

    /// Deletes the namespaces this run created (with their objects) and the cluster-scoped
    /// objects whose names carry this run's tag.
    ///
    /// # Errors
    /// The first call the cluster refused.
    pub async fn cleanup(&self) -> kvsync_backend::Result<()> {
        use k8s_openapi::api::core::v1::Namespace;
        use kube::api::{Api, DeleteParams};
        use kvsync_backend::Client;
        self.cleaned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let backend = self.connect().await;
        let mark = format!("{}-", self.run);
        let kinds: Vec<_> = backend
            .codec()
            .registry()
            .kinds()
            .into_iter()
            .filter(|k| !k.namespaced)
            .map(|k| k.kind.clone())
            .collect();
        for kind in kinds {
            let opts = kvsync_model::ListOptions::new(kind).with_name_prefix(mark.clone());
            for kvp in backend.list(&opts).await?.items {
                match backend
                    .delete(&kvp.key, &kvsync_model::DeleteOptions::new())
                    .await
                {
                    Ok(_) | Err(kvsync_backend::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let api: Api<Namespace> = Api::all(backend.kube_client().clone());
        let names: Vec<String> = std::mem::take(
            &mut *self
                .namespaces
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .collect();
        for ns in names {
            match api.delete(&ns, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(kvsync_backend::Error::unavailable(format!(
                        "delete namespace {ns}: {e}"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Drop for ClusterTestBackend {
    /// Cleans up when [`cleanup`](Self::cleanup) was not called (a failed check), on a thread
    /// of its own since `drop` cannot await.
    fn drop(&mut self) {
        if self.cleaned.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let this = ClusterTestBackend {
            kubeconfig: self.kubeconfig.clone(),
            run: self.run.clone(),
            clients: std::sync::atomic::AtomicU64::new(0),
            namespaces: self.namespaces.clone(),
            cleaned: std::sync::atomic::AtomicBool::new(true),
        };
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            if let Err(e) = rt.block_on(this.cleanup()) {
                eprintln!("cleanup of test run {} failed: {e}", this.run);
            }
        })
        .join();
    }
}

/// What a cluster cannot do for a test: store undecodable objects, move its watch window.
struct NoRaw;

#[async_trait]
impl RawAccess for NoRaw {
    async fn put_raw(&self, _path: &str, _bytes: &[u8]) -> Revision {
        panic!("a cluster's CRD schemas refuse objects without a valid spec")
    }

    async fn compact(&self, _client: &dyn kvsync_backend::Client, _revision: &Revision) {
        // The API server's watch cache window cannot be moved from outside.
    }
}

#[async_trait]
impl TestBackend for ClusterTestBackend {
    async fn client(&self) -> TestClient {
        use k8s_openapi::api::core::v1::Namespace;
        use kube::api::{Api, PostParams};
        let backend = self.connect().await;
        let n = self
            .clients
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}-{n}", self.run);
        let api: Api<Namespace> = Api::all(backend.kube_client().clone());
        let created = self.namespaces.clone();
        let ensure: EnsureNamespace = Arc::new(move |ns: String| {
            let api = api.clone();
            let created = created.clone();
            Box::pin(async move {
                let obj: Namespace = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": ns, "labels": {"app.kubernetes.io/created-by": "kvsync-tests"}}
                }))
                .map_err(|e| kvsync_backend::Error::invalid("namespace", e.to_string()))?;
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => {
                        return Err(kvsync_backend::Error::unavailable(format!(
                            "create namespace {ns}: {e}"
                        )));
                    }
                }
                created
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(ns);
                Ok(())
            })
        });
        TestClient {
            client: Arc::new(Isolated::new(Arc::new(backend), &tag, Some(ensure))),
            raw: Arc::new(NoRaw),
        }
    }

    fn can_store_undecodable(&self) -> bool {
        false
    }

    fn can_compact(&self) -> bool {
        false
    }
}

/// Every conformance check, one after another, then the Syncer's randomized model test
/// (`KVSYNC_CLUSTER_MODEL_CASES` cases, 20 by default), then the cleanup.
///
/// # Panics
/// When a check fails.
pub async fn run_cluster_suites(backend: &ClusterTestBackend) {
    let b: &dyn TestBackend = backend;
    crate::with_conformance_checks!(conformance_sequence!(b));
    let cases = std::env::var("KVSYNC_CLUSTER_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut config = ModelConfig::new(cases);
    config.max_ops = 30;
    syncer_model::run(b, config).await;
    backend.cleanup().await.expect("clean up the test run");
}
