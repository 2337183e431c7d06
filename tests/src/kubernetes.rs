//! The Kubernetes backend under test: through the API server double, or against a real
//! cluster when `KVSYNC_TEST_KUBECONFIG` names a kubeconfig.

use std::sync::Arc;

use async_trait::async_trait;
use kvsync_backend::kubernetes::{KubernetesBackend, KubernetesConfig};
use kvsync_model::{Registry, Revision};

use crate::harness::{Guarded, RawAccess, TestBackend, TestClient};
use crate::kube_double::ApiServerDouble;

/// The Kubernetes backend over a fresh API server double per client.
#[derive(Debug, Clone, Copy)]
pub struct KubeDoubleTestBackend {
    /// How many events the double keeps before a watch from older ones gets 410 Gone.
    pub window: usize,
    /// Whether the backend reads the initial state with watch-list requests.
    pub watch_list: bool,
}

impl Default for KubeDoubleTestBackend {
    fn default() -> Self {
        KubeDoubleTestBackend {
            window: 10_000,
            watch_list: false,
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
    KubernetesBackend::connect(KubernetesConfig {
        kubeconfig: Some(double.kubeconfig()),
        watch_list,
        ..KubernetesConfig::default()
    })
    .await
    .expect("connect to the API server double")
}

#[async_trait]
impl TestBackend for KubeDoubleTestBackend {
    async fn client(&self) -> TestClient {
        let double =
            Arc::new(ApiServerDouble::start(&Registry::with_demo_kinds(), self.window).await);
        let backend = connect_with(&double, self.watch_list).await;
        let codec = kvsync_backend::Client::codec(&backend).clone();
        TestClient {
            client: Guarded::wrap(Arc::new(backend), double.clone()),
            raw: Arc::new(DoubleRaw { double, codec }),
        }
    }

    fn supports_ttl(&self) -> bool {
        false
    }

    fn supports_historical_reads(&self) -> bool {
        false
    }

    fn stores_raw_bytes(&self) -> bool {
        false
    }
}

/// The Kubernetes backend against a real cluster named by `KVSYNC_TEST_KUBECONFIG`: installs
/// the CRDs from deploy/crds and the namespaces the suites use, and empties the kvsync
/// resources before every client (so run checks one at a time).
pub struct RealClusterTestBackend {
    kubeconfig: std::path::PathBuf,
}

impl RealClusterTestBackend {
    /// The cluster of `KVSYNC_TEST_KUBECONFIG`, prepared; `None` when the variable is unset.
    ///
    /// # Panics
    /// When the cluster refuses the CRDs or namespaces.
    pub async fn from_env() -> Option<Self> {
        let kubeconfig = std::path::PathBuf::from(std::env::var_os("KVSYNC_TEST_KUBECONFIG")?);
        let backend = RealClusterTestBackend { kubeconfig };
        backend.prepare().await;
        Some(backend)
    }

    async fn connect(&self) -> KubernetesBackend {
        KubernetesBackend::connect(KubernetesConfig {
            kubeconfig: Some(self.kubeconfig.clone()),
            ..KubernetesConfig::default()
        })
        .await
        .expect("connect to the cluster of KVSYNC_TEST_KUBECONFIG")
    }

    async fn prepare(&self) {
        use k8s_openapi::api::core::v1::Namespace;
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use kube::api::{Api, PostParams};
        let client = self.connect().await.kube_client().clone();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("deploy/crds")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read CRD");
            let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).expect("a CRD");
            let name = crd.metadata.name.clone().unwrap_or_default();
            match crds.get_opt(&name).await.expect("read CRD") {
                Some(existing) => {
                    let mut crd = crd;
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
        // Wait until the API serves them.
        let backend = self.connect().await;
        for _ in 0..100 {
            if kvsync_backend::Client::ensure_initialized(&backend)
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let namespaces: Api<Namespace> = Api::all(client);
        for ns in ["a", "b", "ab", "ns", "ns-a", "ns-b", "prod", "dev"] {
            let obj: Namespace =
                serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))
                    .expect("namespace");
            let _ = namespaces.create(&PostParams::default(), &obj).await;
        }
    }
}

#[async_trait]
impl TestBackend for RealClusterTestBackend {
    async fn client(&self) -> TestClient {
        let backend = self.connect().await;
        kvsync_backend::Client::clean(&backend)
            .await
            .expect("empty the kvsync resources");
        struct NoRaw;
        #[async_trait]
        impl RawAccess for NoRaw {
            async fn put_raw(&self, _path: &str, _bytes: &[u8]) -> Revision {
                panic!("a real cluster cannot store undecodable objects through the API")
            }
            async fn compact(&self, _client: &dyn kvsync_backend::Client, _revision: &Revision) {
                // The API server's watch cache window cannot be moved from outside.
            }
        }
        TestClient {
            client: Arc::new(backend),
            raw: Arc::new(NoRaw),
        }
    }

    fn supports_ttl(&self) -> bool {
        false
    }

    fn supports_historical_reads(&self) -> bool {
        false
    }

    fn stores_raw_bytes(&self) -> bool {
        false
    }
}
