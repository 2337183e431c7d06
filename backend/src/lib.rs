//! The kvsync datastore client: one object-safe async [`Client`] trait with one [`Error`]
//! enum, and the backends that implement it.
//!
//! | backend | feature | what it is |
//! |---|---|---|
//! | [`MemoryBackend`] | always | in-process MVCC store, like etcd's mvcc; for tests and demos |
//! | `SqliteBackend` | `sqlite` (default) | persistent, multi-process revision log in one SQLite file, in the style of kine |
//! | `EtcdBackend` | `etcd` | etcd v3 through `etcd-client`: paged consistent lists, watches with progress notifications, leases for TTLs, TLS and auth |
//! | `KubernetesBackend` | `kubernetes` | each kind a CustomResource on a Kubernetes API server (`kube`); no TTLs. As with kube, the binary picks the API version: enable a `k8s-openapi` version feature (e.g. `latest`) in it |
//! | [`FaultyClient`] | always | wraps any client and injects failures, for tests |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> kvsync_backend::Result<()> {
//! use std::sync::Arc;
//! use kvsync_backend::{Client, MemoryBackend};
//! use kvsync_model::{KVPair, ResourceKey};
//!
//! let client: Arc<dyn Client> = Arc::new(MemoryBackend::new());
//! let kvp = client
//!     .create(KVPair::new(ResourceKey::cluster("Node", "n1"), serde_json::json!({"asn": 64512})))
//!     .await?;
//! assert!(kvp.revision.is_some() && kvp.uid.is_some());
//! # Ok(()) }
//! ```

mod client;
pub mod encoding;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
mod faults;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod memory;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod watch;

pub use client::{Api, Client, ListPages};
pub use error::{BoxError, Error, Result};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdBackend, EtcdConfig};
pub use faults::{Faults, FaultyClient};
#[cfg(feature = "kubernetes")]
pub use kubernetes::{KubernetesBackend, KubernetesConfig};
pub use memory::MemoryBackend;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteBackend, SqliteConfig};
pub use watch::{WatchEvent, WatchStream};

pub use kvsync_model as model;
