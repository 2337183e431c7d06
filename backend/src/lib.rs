//! The kvsync datastore client: one object-safe async [`Client`] trait with one [`Error`]
//! enum, and the backends that implement it.
//!
//! | backend | feature | what it is |
//! |---|---|---|
//! | [`MemoryBackend`] | always | in-process MVCC store, like etcd's mvcc; for tests and demos |
//! | `SqliteBackend` | `sqlite` (default) | persistent, multi-process revision log in one SQLite file, in the style of kine |
//! | `EtcdBackend` | `etcd` | etcd v3 through `etcd-client`: paged consistent lists, watches with progress notifications, leases for TTLs, TLS and auth |
//! | `KubernetesBackend` | `kubernetes` | each kind a CustomResource on a Kubernetes API server (`kube`); no TTLs. As with kube, the binary picks the API version: enable a `k8s-openapi` version feature (e.g. `latest`) in it |
//! | `FaultyClient` | `testing` | wraps any client and injects failures, for tests; with raw writes that bypass validation (`put_raw`) |
//!
//! Every backend is built from the [`Registry`](kvsync_model::Registry) of the kinds it
//! serves, and knows only those. With one of your own kinds:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> kvsync_backend::Result<()> {
//! use std::sync::Arc;
//! use kvsync_backend::{Api, Client, MemoryBackend};
//! use kvsync_model::{Registry, Resource};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, Serialize, Deserialize, Resource)]
//! #[resource(group = "example.com", kind = "Tenant", plural = "tenants")]
//! struct Tenant { owner: String }
//!
//! let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(Registry::new().with::<Tenant>()));
//! let tenants = Api::<Tenant>::all(client.clone());
//! let kvp = tenants.create("acme", Tenant { owner: "ann".into() }).await?;
//! assert!(kvp.revision.is_some() && kvp.uid.is_some());
//! assert!(client.capabilities().ttl);
//! # Ok(()) }
//! ```

mod client;
mod election;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "testing")]
mod faults;
mod instrument;
mod kernel;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
mod lease;
mod lock;
mod lock_record;
pub mod memory;
pub mod snapshot;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod txn;
mod watch;

pub use client::{Api, Capabilities, Client, ListPages, WriteMode};
pub use election::{Election, ElectionOptions, Leadership};
pub use error::{BoxError, Error, Result, RetryAfter};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdBackend, EtcdConfig};
#[cfg(feature = "testing")]
pub use faults::{Faults, FaultyClient};
pub use instrument::{ClientMetrics, Instrumented, instrumented};
#[cfg(feature = "kubernetes")]
pub use kubernetes::{KubernetesBackend, KubernetesConfig};
pub use lease::{Lease, LeaseId};
pub use lock::{LockGuard, LockOptions, lock};
pub use lock_record::{Fence, LockRecord, LockRecords};
pub use memory::MemoryBackend;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteBackend, SqliteConfig};
pub use txn::{Compare, Txn, TxnOp, TxnResponse, TxnResult};
pub use watch::{WatchEvent, WatchStream};

pub use kvsync_model as model;

/// What `delegate_client!` expands to refers to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use async_trait::async_trait;
}
