//! The SQLite backend under test: each client gets a fresh database file in a temporary
//! directory that lives as long as the client.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kvsync_backend::sqlite::{Durability, SqliteBackend, SqliteConfig};
use kvsync_model::Revision;

use crate::harness::{Guarded, RawAccess, TestBackend, TestClient, unique_prefix};

/// The SQLite backend under test.
#[derive(Debug, Default)]
pub struct SqliteTestBackend;

struct SqliteRaw(SqliteBackend);

#[async_trait]
impl RawAccess for SqliteRaw {
    async fn put_raw(&self, path: &str, bytes: &[u8]) -> Revision {
        let id = self.0.put_raw(path, bytes).await.expect("raw write");
        Revision::from(u64::try_from(id).expect("positive revision"))
    }
}

/// Settings for a test database at `path`: a short poll interval, `NORMAL` durability.
pub fn test_config(path: &std::path::Path) -> SqliteConfig {
    SqliteConfig::new(path, kvsync_model::demo::registry())
        .with_prefix(unique_prefix())
        .with_poll_interval(Duration::from_millis(20))
        .with_durability(Durability::Normal)
}

#[async_trait]
impl TestBackend for SqliteTestBackend {
    async fn client(&self) -> TestClient {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend =
            SqliteBackend::open(test_config(&dir.path().join("kvsync.db"))).expect("open sqlite");
        TestClient {
            client: Guarded::wrap(Arc::new(backend.clone()), Arc::new(dir)),
            raw: Arc::new(SqliteRaw(backend)),
        }
    }
}
