//! What the suites need from a backend under test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use kvsync_backend::{Client, MemoryBackend};
use kvsync_model::Revision;

/// Direct access to a backend's storage, bypassing the client, as a foreign writer has.
#[async_trait]
pub trait RawAccess: Send + Sync {
    /// Writes `bytes` under `path` as they are; returns the revision of the write.
    async fn put_raw(&self, path: &str, bytes: &[u8]) -> Revision;

    /// Drops the history before `revision`, as an operator's compaction does (the
    /// Kubernetes API server double forgets its watch window instead).
    async fn compact(&self, client: &dyn Client, revision: &Revision) {
        client
            .compact(revision)
            .await
            .expect("compaction must succeed in tests");
    }
}

/// A client under test and raw access to the same storage.
#[derive(Clone)]
pub struct TestClient {
    /// The client.
    pub client: Arc<dyn Client>,
    /// Raw access to what the client reads.
    pub raw: Arc<dyn RawAccess>,
}

/// Something a test client needs alive as long as itself (a private server, a directory).
pub type Guard = Arc<dyn std::any::Any + Send + Sync>;

/// A client that keeps a [`Guard`] alive for as long as the client is.
#[derive(Debug)]
pub struct Guarded {
    inner: Arc<dyn Client>,
    _guard: GuardBox,
}

/// Held only to be dropped with the client.
struct GuardBox(#[allow(dead_code)] Guard);

impl std::fmt::Debug for GuardBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("guard")
    }
}

impl Guarded {
    /// `inner`, keeping `guard` alive.
    pub fn wrap(inner: Arc<dyn Client>, guard: Guard) -> Arc<dyn Client> {
        Arc::new(Guarded {
            inner,
            _guard: GuardBox(guard),
        })
    }
}

kvsync_backend::delegate_client!(impl [] for Guarded, |this| &*this.inner);

/// A backend under test: hands out fresh clients, each over its own empty key prefix.
#[async_trait]
pub trait TestBackend: Send + Sync {
    /// A fresh client whose prefix no other test uses.
    async fn client(&self) -> TestClient;

    /// A client whose datastore no other test shares, for tests that compact history (etcd
    /// compacts the whole cluster, which would break other tests' reads at old revisions).
    async fn isolated_client(&self) -> TestClient {
        self.client().await
    }

    /// Whether [`RawAccess::put_raw`] can store an entry the client cannot decode (not so on
    /// a real Kubernetes cluster, whose CRD schemas refuse objects without a valid spec).
    fn can_store_undecodable(&self) -> bool {
        true
    }

    /// Whether [`RawAccess::compact`] really drops history (not so on a real Kubernetes
    /// cluster, whose watch cache window cannot be moved from outside).
    fn can_compact(&self) -> bool {
        true
    }
}

/// A prefix no other test in this process uses: `/kvsync-test/p<pid>-<n>`.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "/kvsync-test/p{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The memory backend under test; each client is a new store.
#[derive(Debug, Default)]
pub struct MemoryTestBackend;

struct MemoryRaw(MemoryBackend);

#[async_trait]
impl RawAccess for MemoryRaw {
    async fn put_raw(&self, path: &str, bytes: &[u8]) -> Revision {
        self.0.put_raw(path, bytes).into()
    }
}

#[async_trait]
impl TestBackend for MemoryTestBackend {
    async fn client(&self) -> TestClient {
        let store = MemoryBackend::builder(kvsync_model::demo::registry())
            .prefix(unique_prefix())
            .build()
            .expect("valid test prefix");
        TestClient {
            client: Arc::new(store.clone()),
            raw: Arc::new(MemoryRaw(store)),
        }
    }
}
