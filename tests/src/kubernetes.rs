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
}

impl Default for KubeDoubleTestBackend {
    fn default() -> Self {
        KubeDoubleTestBackend { window: 10_000 }
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
    KubernetesBackend::connect(KubernetesConfig {
        kubeconfig: Some(double.kubeconfig()),
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
        let backend = connect(&double).await;
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
