//! The HTTP endpoints of the long-running commands: `/metrics` (Prometheus), `/healthz` (the
//! process works) and `/readyz` (in sync), and the signals that stop them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use kvsync_syncer::SyncStatus;
use prometheus_client::registry::Registry;

/// What the endpoints read.
pub struct Endpoints {
    registry: Registry,
    /// The status that readiness follows: 0 waiting, 1 resyncing, 2 in sync.
    status: AtomicU8,
    /// Whether the work still runs.
    alive: AtomicBool,
}

impl Endpoints {
    /// Endpoints over the metrics of `registry`, not ready yet.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Endpoints {
            registry,
            status: AtomicU8::new(0),
            alive: AtomicBool::new(true),
        })
    }

    /// Readiness follows this status.
    pub fn set_status(&self, s: SyncStatus) {
        let code = match s {
            SyncStatus::WaitForDatastore => 0,
            SyncStatus::ResyncInProgress => 1,
            SyncStatus::InSync => 2,
        };
        self.status.store(code, Ordering::SeqCst);
    }

    /// The work stopped: the process is not healthy.
    pub fn set_dead(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }

    /// Binds `listen`, says where on stderr, and serves until `stop` turns true.
    pub async fn serve(
        self: &Arc<Self>,
        listen: SocketAddr,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>> {
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
            .with_state(self.clone());
        let mut stop = stop;
        Ok(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        }))
    }
}

async fn metrics(State(e): State<Arc<Endpoints>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &e.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn healthz(State(e): State<Arc<Endpoints>>) -> impl IntoResponse {
    if e.alive.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stopped\n")
    }
}

async fn readyz(State(e): State<Arc<Endpoints>>) -> impl IntoResponse {
    match e.status.load(Ordering::SeqCst) {
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
pub async fn shutdown_signal() {
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

/// Waits for the HTTP server to stop, half a second at most.
pub async fn stopped(server: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(Duration::from_millis(500), server)
        .await
        .is_err()
    {
        tracing::warn!("connections still open at shutdown; closing them");
    }
}
