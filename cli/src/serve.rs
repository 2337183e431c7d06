//! `kvsync serve`: one Syncer upstream, many `RemoteSyncer`s downstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kvsync_backend::{Client, ClientMetrics, instrumented};
use kvsync_model::ListOptions;
use kvsync_server::{Server, ServerConfig, ServerMetrics};
use kvsync_syncer::ResourceType;
use prometheus_client::registry::Registry;

use crate::endpoints::{Endpoints, shutdown_signal, stopped};

/// How `kvsync serve` runs.
pub struct ServeArgs {
    /// The kinds to serve.
    pub kinds: Vec<ListOptions>,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub http_listen: SocketAddr,
    /// The log's bound in bytes.
    pub log_bytes: usize,
    /// The log's bound in age.
    pub log_age: Duration,
    /// The most resyncs and snapshots sent at once.
    pub max_catch_ups: usize,
    /// The number of clients to shed down to, if any.
    pub target_connections: Option<usize>,
    /// Where the state is saved on shutdown and taken up on start, if anywhere.
    pub state_dir: Option<std::path::PathBuf>,
    /// When clients are resynced by sketch.
    pub sketches: kvsync_server::Sketches,
    /// TLS, or `None` for the plain TCP asked for with `--plaintext`.
    pub tls: Option<kvsync_server::ServerTls>,
}

/// Runs the server until SIGTERM or Ctrl-C, then tells every client where to resume.
pub async fn run(client: Arc<dyn Client>, args: ServeArgs) -> Result<()> {
    let mut registry = Registry::default();
    let client = instrumented(client, Some(ClientMetrics::new(&mut registry)));
    let metrics = ServerMetrics::new(&mut registry);
    let endpoints = Endpoints::new(registry);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = endpoints.serve(args.http_listen, stop_rx).await?;
    let mut config = match args.tls {
        Some(tls) => ServerConfig::new().with_tls(tls),
        None => ServerConfig::new().with_plaintext(),
    }
    .with_log(args.log_bytes, args.log_age)
    .with_max_catch_ups(args.max_catch_ups)
    .with_sketches(args.sketches)
    .with_metrics(metrics);
    if let Some(target) = args.target_connections {
        config = config.with_target_connections(target, Duration::from_secs(1));
    }
    if let Some(dir) = args.state_dir {
        config = config.with_state_dir(dir);
    }
    let server = Server::bind(
        args.listen,
        client,
        args.kinds.into_iter().map(ResourceType::new).collect(),
        config,
    )
    .await
    .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("serving on {}", server.local_addr());
    // Ready while the upstream Syncer is in sync.
    let follow = {
        let endpoints = endpoints.clone();
        let mut status = server.watch_status();
        tokio::spawn(async move {
            loop {
                let s = *status.borrow_and_update();
                endpoints.set_status(s);
                if status.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    shutdown_signal().await;
    tracing::info!("stopping: clients are told where to resume");
    follow.abort();
    server.shutdown().await;
    let _ = stop_tx.send(true);
    stopped(http).await;
    Ok(())
}
