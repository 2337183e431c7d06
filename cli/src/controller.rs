//! `kvsync controller`: follows kinds through a Syncer into memory, as a controller does, and
//! serves `/metrics`, `/healthz` and `/readyz` for Prometheus and the kubelet's probes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use futures::StreamExt;
use kvsync_backend::{Client, ClientMetrics, instrumented};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent, SyncerMetrics, UpdateType};
use prometheus_client::registry::Registry;

/// What the endpoints read.
struct Shared {
    registry: Registry,
    /// The Syncer's status: 0 waiting, 1 resyncing, 2 in sync.
    status: AtomicU8,
    /// Whether the Syncer still runs.
    alive: AtomicBool,
}

fn status_code(s: SyncStatus) -> u8 {
    match s {
        SyncStatus::WaitForDatastore => 0,
        SyncStatus::ResyncInProgress => 1,
        SyncStatus::InSync => 2,
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &shared.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The process works: its Syncer runs.
async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.alive.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the syncer stopped\n")
    }
}

/// Ready once the Syncer is in sync with the datastore.
async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.status.load(Ordering::SeqCst) {
        2 => (StatusCode::OK, "in sync\n".to_owned()),
        s => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not in sync: {}\n",
                if s == 0 {
                    "waiting for the datastore"
                } else {
                    "resync in progress"
                }
            ),
        ),
    }
}

/// Resolves on SIGTERM (what the kubelet sends; the process may be PID 1, which has no
/// default handler for it) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the controller over `client` for the list options `kinds` until a signal.
pub async fn run(
    client: Arc<dyn Client>,
    kinds: Vec<ListOptions>,
    listen: SocketAddr,
) -> Result<()> {
    let mut registry = Registry::default();
    let client = instrumented(client, Some(ClientMetrics::new(&mut registry)));
    let syncer_metrics = SyncerMetrics::new(&mut registry);
    let shared = Arc::new(Shared {
        registry,
        status: AtomicU8::new(0),
        alive: AtomicBool::new(true),
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    eprintln!("listening on {addr}");
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(shared.clone());

    let mut syncer = Syncer::new(client).with_metrics(syncer_metrics);
    for k in kinds {
        syncer = syncer.with_resource(ResourceType::new(k));
    }
    let mut events = syncer.stream();
    let follower = {
        let shared = shared.clone();
        async move {
            // What a controller holds: every resource of the kinds, as the datastore has it.
            let mut cache: HashMap<ResourceKey, KVPair> = HashMap::new();
            while let Some(ev) = events.next().await {
                match ev {
                    SyncerEvent::Status(s) => {
                        shared.status.store(status_code(s), Ordering::SeqCst);
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
            shared.alive.store(false, Ordering::SeqCst);
        }
    };
    let follower = tokio::spawn(follower);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    shutdown_signal().await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    // Within a second, whatever the open connections do.
    follower.abort();
    if tokio::time::timeout(Duration::from_millis(500), server)
        .await
        .is_err()
    {
        tracing::warn!("connections still open at shutdown; closing them");
    }
    Ok(())
}
