//! `kvsync controller`: follows kinds through a Syncer into memory, as a controller does, and
//! serves `/metrics`, `/healthz` and `/readyz` for Prometheus and the kubelet's probes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use futures::StreamExt;
use kvsync_backend::{Client, ClientMetrics, instrumented};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{ResourceType, Syncer, SyncerEvent, SyncerMetrics, UpdateType};
use prometheus_client::registry::Registry;

use crate::endpoints::{Endpoints, shutdown_signal, stopped};

/// Runs the controller over `client` for the list options `kinds` until a signal.
pub async fn run(
    client: Arc<dyn Client>,
    kinds: Vec<ListOptions>,
    listen: SocketAddr,
) -> Result<()> {
    let mut registry = Registry::default();
    let client = instrumented(client, Some(ClientMetrics::new(&mut registry)));
    let syncer_metrics = SyncerMetrics::new(&mut registry);
    let endpoints = Endpoints::new(registry);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = endpoints.serve(listen, stop_rx).await?;

    let mut syncer = Syncer::new(client).with_metrics(syncer_metrics);
    for k in kinds {
        syncer = syncer.with_resource(ResourceType::new(k));
    }
    let mut events = syncer.stream();
    let follower = {
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            // What a controller holds: every resource of the kinds, as the datastore has it.
            let mut cache: HashMap<ResourceKey, KVPair> = HashMap::new();
            while let Some(ev) = events.next().await {
                match ev {
                    SyncerEvent::Status(s) => {
                        endpoints.set_status(s);
                        tracing::info!(status = %s, resources = cache.len(), "sync status");
                    }
                    SyncerEvent::Updates(batch) => {
                        for u in batch {
                            match u.update_type {
                                UpdateType::Deleted => {
                                    cache.remove(&u.kvp.key);
                                }
                                UpdateType::New | UpdateType::Updated => {
                                    cache.insert(u.kvp.key.clone(), u.kvp);
                                }
                            }
                        }
                    }
                    SyncerEvent::ParseFailed(f) => {
                        tracing::warn!(raw_key = %f.raw_key, reason = %f.reason, "a stored entry does not decode");
                    }
                    SyncerEvent::Error(e) => {
                        tracing::warn!(error = %e, "datastore error; the syncer retries");
                    }
                }
            }
            endpoints.set_dead();
        })
    };
    shutdown_signal().await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    follower.abort();
    stopped(server).await;
    Ok(())
}
