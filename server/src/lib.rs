//! kvsync-server: one Syncer upstream, many consumers downstream (Calico's Typha, done for
//! kvsync).
//!
//! A [`Server`] follows resource types on any backend with one Syncer and keeps what it holds
//! (key, revision, value) and a log of recent frames bounded by bytes and by age. Each batch
//! is encoded once and the same bytes go to every client. A [`RemoteSyncer`] yields exactly
//! the stream of events a local Syncer yields, so a consumer switches by changing one line.
//!
//! A client that reconnects says where it was (the server's epoch and the position of the
//! last frame it applied): within the log's window it is sent only what it missed. A server
//! with a state directory saves its log and positions as it stops, so its clients resume
//! across its restart too. Outside the log (or on another replica) the client sends a sketch
//! of what it holds ([`sketch`]), sized for what it missed, and is sent only the keys that
//! differ, with deletions for what went away; when the difference is too large for a sketch,
//! the digests of what it holds per bucket of about two keys, and the buckets that differ.
//! A client that held nothing gets a snapshot, built once for every client that needs one at
//! the same position. Large frames are compressed (LZ4) once, for every client that speaks
//! it. A client that falls off the end of the log is told to reconnect, and resyncs; it never
//! holds the server's memory.
//!
//! The protocol is written down in server/PROTOCOL.md.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use futures::StreamExt;
//! use kvsync_backend::{Client, MemoryBackend};
//! use kvsync_model::{KVPair, ListOptions, ResourceKey, demo};
//! use kvsync_server::{RemoteSyncer, Server, ServerConfig};
//! use kvsync_syncer::{ResourceType, SyncStatus, SyncerEvent};
//!
//! let store = Arc::new(MemoryBackend::new(demo::registry()));
//! store
//!     .create(KVPair::new(ResourceKey::cluster("IPPool", "a"), serde_json::json!({"cidr": "10.0.0.0/16"})))
//!     .await?;
//! let server = Server::bind(
//!     "127.0.0.1:0".parse()?,
//!     store,
//!     vec![ResourceType::new(ListOptions::new("IPPool"))],
//!     ServerConfig::new().with_plaintext(),
//! )
//! .await?;
//! let mut events = RemoteSyncer::new(server.local_addr().to_string()).stream();
//! let mut keys = Vec::new();
//! while let Some(ev) = events.next().await {
//!     match ev {
//!         SyncerEvent::Updates(batch) => keys.extend(batch.into_iter().map(|u| u.kvp.key)),
//!         SyncerEvent::Status(SyncStatus::InSync) => break,
//!         _ => {}
//!     }
//! }
//! assert_eq!(keys, [ResourceKey::cluster("IPPool", "a")]);
//! server.shutdown().await;
//! # Ok(()) }
//! ```

mod client;
mod hub;
mod metrics;
pub mod protocol;
mod server;
pub mod sketch;
mod tls;

pub use client::RemoteSyncer;
pub use hub::HubStats;
pub use metrics::ServerMetrics;
pub use server::{Server, ServerConfig, Sketches};
pub use tls::{ClientTls, ServerTls, TlsError};
