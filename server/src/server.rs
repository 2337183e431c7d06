//! The server: one Syncer upstream, many clients downstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kvsync_backend::Client;
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::{Catch, Frame, Hub, HubStats};
use crate::metrics::ServerMetrics;
use crate::protocol::{
    FEATURE_LZ4, FEATURE_RECONCILE, Message, Mode, ProtocolError, VERSION, decode_digests,
    digests_frame_limit, frame, read_frame,
};
use crate::sketch::{CELL_BYTES, Sketch};
use crate::tls::ServerTls;

/// How a [`Server`] runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The most bytes of recent frames the log keeps (64 MiB).
    pub max_log_bytes: usize,
    /// The oldest a frame of the log may be (5 minutes).
    pub max_log_age: Duration,
    /// The largest frame accepted from a client (1 MiB: clients send only small messages).
    pub max_client_frame: usize,
    /// How often each side pings the other (10 s); a peer silent for three times this is dead.
    pub ping_interval: Duration,
    /// The most clients connected at once (10,000); more are refused.
    pub max_connections: usize,
    /// How long a client may take to say hello (10 s).
    pub hello_timeout: Duration,
    /// Where the server's metrics go (see [`ServerMetrics`]); none by default.
    pub metrics: Option<ServerMetrics>,
    /// TLS (and mutual TLS with an allow-list); see [`ServerConfig::with_tls`].
    pub tls: Option<ServerTls>,
    /// Plain TCP, which must be asked for: a server has TLS or this.
    pub plaintext: bool,
    /// How long the server waits for more changes before it sends what it has as one frame
    /// (1 ms): fewer, larger frames for every client under load, at most this much later.
    pub batch_linger: Duration,
    /// The most resyncs and snapshots sent at once (64); more clients needing one wait their
    /// turn. Clients that resume from the log never wait: resumes come first, so a restart
    /// of many clients does not queue the cheap catch-ups behind the dear ones.
    pub max_catch_ups: usize,
    /// The number of clients this server aims to serve (none: no aim). While more are
    /// connected, one a [`ServerConfig::shed_every`] is told to go away (with where to
    /// resume), so that clients spread over the replicas behind a Service as replicas come
    /// up (Typha's rebalancing).
    pub target_connections: Option<usize>,
    /// How often one client is shed while the server is over its target (1 s).
    pub shed_every: Duration,
    /// Where the server saves its state, log and positions when it stops, and takes them up
    /// again when it starts (none: a restarted server is a new epoch, and its clients
    /// resync by digests). A file saved there is read once and removed, so a server that
    /// crashed later does not start from stale positions.
    pub state_dir: Option<std::path::PathBuf>,
    /// When clients that cannot resume are resynced by sketch rather than by bucket digests
    /// ([`Sketches::Auto`]).
    pub sketches: Sketches,
}

/// When a [`Server`] resyncs a client by sketch ([`crate::sketch`]): the client sends a sketch
/// sized for the difference and the server sends what differs, where bucket digests cost
/// bytes for every key the client holds. Only clients that offer the `reconcile` feature are
/// asked (a [`RemoteSyncer`](crate::RemoteSyncer) does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sketches {
    /// When the sketches would cost less than the digests: sized for what the client missed
    /// when the server can tell (it fell off this server's log), else 1,536 cells first and
    /// twice as many while they do not peel, all of them together costing less than the
    /// digests; then the digests.
    #[default]
    Auto,
    /// Always, whatever the digests would cost: up to three sketches (from the size Auto
    /// picks), then the digests. For tests and for datastores whose keys are large.
    Always,
    /// Never: bucket digests only.
    Never,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_log_bytes: 64 << 20,
            max_log_age: Duration::from_secs(300),
            max_client_frame: 1 << 20,
            ping_interval: Duration::from_secs(10),
            max_connections: 10_000,
            hello_timeout: Duration::from_secs(10),
            metrics: None,
            tls: None,
            plaintext: false,
            batch_linger: Duration::from_millis(1),
            max_catch_ups: 64,
            target_connections: None,
            shed_every: Duration::from_secs(1),
            state_dir: None,
            sketches: Sketches::Auto,
        }
    }
}

impl ServerConfig {
    /// The defaults.
    pub fn new() -> Self {
        ServerConfig::default()
    }

    /// Sets the log's bounds.
    #[must_use]
    pub fn with_log(mut self, max_bytes: usize, max_age: Duration) -> Self {
        self.max_log_bytes = max_bytes;
        self.max_log_age = max_age;
        self
    }

    /// Sets [`ServerConfig::ping_interval`].
    #[must_use]
    pub fn with_ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    /// Serves over TLS.
    #[must_use]
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Serves over plain TCP: only when asked for (a trusted network, tests).
    #[must_use]
    pub fn with_plaintext(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// Records the server's metrics into `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: ServerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sets [`ServerConfig::max_catch_ups`] (at least 1).
    #[must_use]
    pub fn with_max_catch_ups(mut self, n: usize) -> Self {
        self.max_catch_ups = n.max(1);
        self
    }

    /// Sets [`ServerConfig::target_connections`] and [`ServerConfig::shed_every`].
    #[must_use]
    pub fn with_target_connections(mut self, target: usize, shed_every: Duration) -> Self {
        self.target_connections = Some(target);
        self.shed_every = shed_every;
        self
    }

    /// Sets [`ServerConfig::state_dir`]: a restart resumes its clients from the saved log.
    #[must_use]
    pub fn with_state_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Sets [`ServerConfig::sketches`].
    #[must_use]
    pub fn with_sketches(mut self, sketches: Sketches) -> Self {
        self.sketches = sketches;
        self
    }

    /// Sets [`ServerConfig::max_connections`].
    #[must_use]
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }
}

/// A server: follows `types` on `client` with one Syncer and serves what it follows to
/// [`RemoteSyncer`](crate::RemoteSyncer)s.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use kvsync_backend::MemoryBackend;
/// use kvsync_model::{ListOptions, demo};
/// use kvsync_server::{Server, ServerConfig};
/// use kvsync_syncer::ResourceType;
///
/// let client = Arc::new(MemoryBackend::new(demo::registry()));
/// let server = Server::bind(
///     "127.0.0.1:0".parse().unwrap(),
///     client,
///     vec![ResourceType::new(ListOptions::new("IPPool"))],
///     ServerConfig::new().with_plaintext(),
/// )
/// .await?;
/// println!("serving on {}", server.local_addr());
/// server.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Server {
    addr: SocketAddr,
    hub: Arc<Hub>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("epoch", &self.hub.epoch)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `addr` and starts following `types` on `client`.
    ///
    /// # Errors
    /// When `addr` cannot be bound; `InvalidInput` when the TLS settings are unusable, or when
    /// the configuration has neither TLS nor [`ServerConfig::with_plaintext`].
    pub async fn bind(
        addr: SocketAddr,
        client: Arc<dyn Client>,
        types: Vec<ResourceType>,
        config: ServerConfig,
    ) -> std::io::Result<Server> {
        let acceptor = match (&config.tls, config.plaintext) {
            (Some(tls), _) => Some(
                tls.acceptor()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
            (None, true) => None,
            (None, false) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "choose TLS (ServerConfig::with_tls) or ask for plain TCP \
                     (ServerConfig::with_plaintext)",
                ));
            }
        };
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let saved = match &config.state_dir {
            Some(dir) => take_saved(dir).await,
            None => None,
        };
        let epoch = saved
            .as_ref()
            .map_or_else(|| rand::random::<u64>() | 1, |s| s.epoch);
        let hub = Arc::new(Hub::new(
            epoch,
            config.max_log_bytes,
            config.max_log_age,
            config.metrics.clone().unwrap_or_default(),
            config.max_catch_ups,
        ));
        if let Some(saved) = saved {
            hub.restore(saved);
        }
        let state_dir = config.state_dir.clone();
        let (stop, _) = tokio::sync::watch::channel(false);
        let mut syncer = Syncer::new(client);
        for t in types {
            syncer = syncer.with_resource(t);
        }
        let upstream = {
            let hub = hub.clone();
            let mut stop_rx = stop.subscribe();
            let linger = config.batch_linger;
            let max_frame_bytes = (config.max_log_bytes / 16).max(4096);
            tokio::spawn(async move {
                let mut events = syncer.stream();
                // Updates that came while the last frame was being made: one frame for them.
                let mut pending: Vec<kvsync_syncer::Update> = Vec::new();
                let mut pending_bytes = 0usize;
                let mut since = tokio::time::Instant::now();
                loop {
                    let ev = if pending.is_empty() {
                        tokio::select! {
                            ev = events.next() => ev,
                            _ = stop_rx.wait_for(|s| *s) => None,
                        }
                    } else {
                        // Lingers a moment for more (from the first change waiting, not the
                        // last), so that changes close together go out as one frame to every
                        // client rather than one each.
                        match tokio::time::timeout_at(since + linger, events.next()).await {
                            Ok(ev) => ev,
                            Err(_) => {
                                hub.apply(std::mem::take(&mut pending));
                                pending_bytes = 0;
                                continue;
                            }
                        }
                    };
                    match ev {
                        Some(SyncerEvent::Updates(batch)) => {
                            if pending.is_empty() {
                                since = tokio::time::Instant::now();
                            }
                            pending_bytes += batch
                                .iter()
                                .map(|u| u.kvp.value.json_text().map_or(64, str::len) + 64)
                                .sum::<usize>();
                            pending.extend(batch);
                            // A frame stays small next to the log's bound.
                            if pending.len() >= 1000
                                || pending_bytes >= max_frame_bytes
                                || linger.is_zero()
                            {
                                hub.apply(std::mem::take(&mut pending));
                                pending_bytes = 0;
                            }
                        }
                        Some(SyncerEvent::Status(s)) => {
                            if !pending.is_empty() {
                                hub.apply(std::mem::take(&mut pending));
                                pending_bytes = 0;
                            }
                            hub.set_status(s);
                        }
                        Some(SyncerEvent::ParseFailed(f)) => {
                            warn!(raw_key = %f.raw_key, "upstream: an entry does not decode");
                        }
                        Some(SyncerEvent::Error(e)) => debug!(error = %e, "upstream error"),
                        None => return,
                    }
                }
            })
        };
        let acceptor = {
            let hub = hub.clone();
            let stop = stop.clone();
            tokio::spawn(accept_loop(listener, hub, config, acceptor, stop))
        };
        info!(%addr, epoch, "kvsync server listening");
        Ok(Server {
            addr,
            hub,
            stop,
            tasks: vec![upstream, acceptor],
            state_dir,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's epoch: positions are meaningful within it.
    pub fn epoch(&self) -> u64 {
        self.hub.epoch
    }

    /// How clients were brought up to date so far.
    pub fn stats(&self) -> HubStats {
        self.hub.lock().stats
    }

    /// The upstream Syncer's status.
    pub fn status(&self) -> SyncStatus {
        self.hub.status().0
    }

    /// The upstream Syncer's status as it changes (readiness: in sync).
    pub fn watch_status(&self) -> tokio::sync::watch::Receiver<SyncStatus> {
        self.hub.status_tx.subscribe()
    }

    /// How many bytes the log holds now.
    pub fn log_bytes(&self) -> usize {
        self.hub.log_bytes()
    }

    /// Tells every client to go away (with where to resume) and stops; with a
    /// [`ServerConfig::state_dir`], saves the state for the next start.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Some(dir) = &self.state_dir {
            save(&self.hub, dir).await;
        }
        let s = self.hub.lock().stats;
        info!(
            resumes = s.resumes,
            resyncs = s.resyncs,
            snapshots = s.snapshots,
            snapshot_builds = s.snapshot_builds,
            fell_behind = s.fell_behind,
            "kvsync server stopped"
        );
    }
}

/// The name of the saved state in a [`ServerConfig::state_dir`].
const STATE_FILE: &str = "kvsync-server.state";

/// Reads and removes a saved state; `None` (logged) when there is none or it does not read.
async fn take_saved(dir: &std::path::Path) -> Option<crate::hub::Restored> {
    let path = dir.join(STATE_FILE);
    // Claimed by a rename first: of two servers starting on one directory only one takes
    // the saved epoch up, and it is read once (positions saved must not outlive the run that
    // takes them up).
    let claimed = dir.join(format!("{STATE_FILE}.taken-{}", std::process::id()));
    match tokio::fs::rename(&path, &claimed).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot take the saved state: starting afresh");
            return None;
        }
    }
    let read = tokio::fs::read(&claimed).await;
    let _ = tokio::fs::remove_file(&claimed).await;
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the saved state: starting afresh");
            return None;
        }
    };
    match tokio::task::spawn_blocking(move || crate::hub::Restored::read(&bytes)).await {
        Ok(Ok(r)) => {
            info!(path = %path.display(), epoch = r.epoch, "took up the saved state");
            Some(r)
        }
        Ok(Err(e)) => {
            warn!(path = %path.display(), error = %e, "the saved state does not read: starting afresh");
            None
        }
        Err(_) => None,
    }
}

/// Saves the state for the next start (written whole, then renamed into place).
async fn save(hub: &Arc<Hub>, dir: &std::path::Path) {
    let hub = hub.clone();
    let dir = dir.to_path_buf();
    let done = tokio::task::spawn_blocking(move || -> std::io::Result<Option<usize>> {
        let Some(bytes) = hub.save() else {
            return Ok(None);
        };
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))?;
        Ok(Some(bytes.len()))
    })
    .await;
    match done {
        Ok(Ok(Some(bytes))) => info!(bytes, "saved the state for the next start"),
        Ok(Ok(None)) => info!("nothing saved: the upstream was never in sync"),
        Ok(Err(e)) => warn!(error = %e, "cannot save the state"),
        Err(e) => warn!(error = %e, "cannot save the state"),
    }
}

async fn accept_loop(
    listener: TcpListener,
    hub: Arc<Hub>,
    config: ServerConfig,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    stop: tokio::sync::watch::Sender<bool>,
) {
    let connections = Arc::new(AtomicUsize::new(0));
    let mut stop_rx = stop.subscribe();
    let mut conns = tokio::task::JoinSet::new();
    let mut shed_tick = tokio::time::interval(config.shed_every.max(Duration::from_millis(10)));
    shed_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop_rx.wait_for(|s| *s) => break,
            _ = shed_tick.tick(), if config.target_connections.is_some() => {
                let target = config.target_connections.unwrap_or(usize::MAX);
                if connections.load(Ordering::SeqCst) > target {
                    // One client (whichever waits first) goes away with where to resume.
                    hub.shed.notify_one();
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let n = connections.fetch_add(1, Ordering::SeqCst) + 1;
        let (hub, config, connections, stop_rx, acceptor) = (
            hub.clone(),
            config.clone(),
            connections.clone(),
            stop.subscribe(),
            acceptor.clone(),
        );
        conns.spawn(
            async move {
                hub.metrics.clients.inc();
                let result = if n > config.max_connections {
                    hub.metrics.refused.inc();
                    refuse(stream, "the server is at its connection limit").await;
                    Ok(())
                } else {
                    match acceptor {
                        None => serve(stream, &hub, &config, stop_rx).await,
                        Some(a) => serve_tls(a, stream, &hub, &config, stop_rx).await,
                    }
                };
                if let Err(e) = result {
                    match e {
                        ProtocolError::Io(e) => debug!(error = %e, "connection ended"),
                        e => warn!(error = %e, "connection ended with an error"),
                    }
                }
                hub.metrics.clients.dec();
                connections.fetch_sub(1, Ordering::SeqCst);
            }
            .instrument(info_span!("kvsync_server_client", %peer)),
        );
        while conns.try_join_next().is_some() {}
    }
    // Every connection sends its GoAway and ends.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// The TLS handshake (refused with a logged reason when it fails or the client's certificate
/// is not allowed), then [`serve`].
async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    hub: &Hub,
    config: &ServerConfig,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ProtocolError> {
    let tls = match tokio::time::timeout(config.hello_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            hub.metrics.refused.inc();
            warn!(error = %e, "connection refused: the TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            hub.metrics.refused.inc();
            warn!("connection refused: no TLS handshake in time");
            return Ok(());
        }
    };
    let why = config
        .tls
        .as_ref()
        .and_then(|t| t.refuse(tls.get_ref().1.peer_certificates()));
    if let Some(reason) = why {
        hub.metrics.refused.inc();
        refuse(tls, &reason).await;
        return Ok(());
    }
    serve(tls, hub, config, stop).await
}

async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, reason: &str) {
    warn!(reason, "connection refused");
    let _ = stream
        .write_all(&frame(&Message::Refused {
            reason: reason.to_owned(),
        }))
        .await;
    let _ = stream.shutdown().await;
}

/// Reads the client's messages (pongs and pings) and reports pings to answer; ends when the
/// client goes silent for too long or breaks the protocol.
async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    limit: usize,
    silent: Duration,
    pings: tokio::sync::mpsc::Sender<u64>,
) -> ProtocolError {
    loop {
        let body = match tokio::time::timeout(silent, read_frame(&mut r, limit)).await {
            Err(_) => return ProtocolError::Unexpected("the client went silent".into()),
            Ok(Err(e)) => return e,
            Ok(Ok(b)) => b,
        };
        match serde_json::from_slice::<Message>(&body) {
            Ok(Message::Ping { nonce }) => {
                if pings.send(nonce).await.is_err() {
                    return ProtocolError::Unexpected("closed".into());
                }
            }
            Ok(Message::Pong { .. }) => {}
            Ok(other) => {
                return ProtocolError::Unexpected(format!("unexpected message {other:?}"));
            }
            Err(e) => return ProtocolError::Garbage(e),
        }
    }
}

/// Tells a client to reconnect, resuming from `position` (best effort: it may be gone).
async fn go_away<W: AsyncWrite + Unpin>(w: &mut W, hub: &Hub, position: u64, reason: &str) {
    let _ = w
        .write_all(&frame(&Message::GoAway {
            epoch: hub.epoch,
            position,
            reason: reason.to_owned(),
        }))
        .await;
}

/// Counts and logs a client let go of because it stopped reading (it resyncs when it comes
/// back, from where it was).
fn stalled(hub: &Hub, client: &str, position: u64) {
    hub.lock().stats.fell_behind += 1;
    hub.metrics.fell_behind.inc();
    info!(
        client,
        position,
        "client stopped reading and fell behind the log: closed, it resyncs when it comes back"
    );
}

/// The most bytes of the log a client's writer takes at a time: what one blocked write can
/// hold beyond the log's bound until the log drops it.
const WRITE_BATCH_BYTES: usize = 1 << 20;

/// Writes a frame of the log (at `position`) or of a catch-up (`None`): as it is (compressed
/// or not) to a client that speaks LZ4, decompressed for one that does not. The decompressed
/// copy is made once for all such clients; a log frame's counts against the log's bound.
async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    hub: &Hub,
    position: Option<u64>,
    f: &Frame,
    lz4: bool,
) -> Result<(), ProtocolError> {
    if lz4 {
        w.write_all(f).await?;
    } else {
        let plain = f.plain(|f| {
            if let Some(p) = position {
                hub.count_plain(p, f);
            }
        })?;
        w.write_all(plain).await?;
    }
    Ok(())
}

/// The first sketch asked for when the server cannot tell how much differs: 1,536 cells
/// (20 KiB), enough for about 1,000 differing items (a few hundred keys changed).
const FIRST_SKETCH_CELLS: usize = 1536;

/// The cells of a sketch for at most `items` differing items: 1.35 a cell and a margin, where
/// peeling fails now and then (and a sketch twice as large is asked for next), rounded up to
/// 48 times a power of two, so that clients are asked for few sizes and the server's own
/// sketches of those sizes, kept in step with its state, serve them all.
fn sketch_cells(items: u64) -> usize {
    let items = usize::try_from(items).unwrap_or(usize::MAX);
    let cells = items.saturating_mul(27) / 20 + 30;
    let mut ladder = 48;
    while ladder < cells && ladder < crate::sketch::MAX_CELLS {
        ladder *= 2;
    }
    ladder
}

/// Asks a client that cannot resume for sketches of what it holds: sized for `differ` items
/// when the server can tell how many differ at most, else [`FIRST_SKETCH_CELLS`]; doubled
/// while they are too small for the difference, as long as all the sketches asked for stay
/// smaller than the bucket digests of `bits`. `None` when none peeled (the digests come
/// next).
async fn try_sketches<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    hub: &Hub,
    holds: u64,
    differ: Option<u64>,
    bits: u8,
    config: &ServerConfig,
) -> Result<Option<Catch>, ProtocolError> {
    let (policy, timeout) = (config.sketches, config.hello_timeout);
    let digest_bytes = 8usize << bits;
    let mut cells = differ.map_or(FIRST_SKETCH_CELLS, sketch_cells);
    let mut spent = 0;
    let mut tries = 0;
    while cells <= crate::sketch::MAX_CELLS
        && match policy {
            Sketches::Auto => spent + cells * CELL_BYTES <= digest_bytes,
            Sketches::Always => tries < 3,
            Sketches::Never => false,
        }
    {
        spent += cells * CELL_BYTES;
        tries += 1;
        let answer = ask(
            r,
            w,
            &Message::SendSketch {
                cells: u32::try_from(cells).unwrap_or(u32::MAX),
            },
            Sketch::frame_limit(cells),
            timeout,
            &hub.metrics,
        )
        .await?;
        let theirs = match answer {
            Message::Sketch { cells: c, sketch } if c as usize == cells => {
                Sketch::decode_text(cells, &sketch)?
            }
            other => {
                return Err(ProtocolError::Unexpected(format!(
                    "expected a sketch of {cells} cells, got {other:?}"
                )));
            }
        };
        if let Some(c) = hub.reconcile(holds, &theirs) {
            return Ok(Some(c));
        }
        cells *= 2;
    }
    Ok(None)
}

/// Asks a resyncing client for its sketch or digests (`question`) and reads its answer: one
/// frame of at most `limit` bytes, within `timeout`, counted in the metrics.
async fn ask<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    question: &Message,
    limit: usize,
    timeout: Duration,
    metrics: &ServerMetrics,
) -> Result<Message, ProtocolError> {
    w.write_all(&frame(question)).await?;
    w.flush().await?;
    let body = tokio::time::timeout(timeout, read_frame(r, limit))
        .await
        .map_err(|_| ProtocolError::Unexpected(format!("no answer in time to {question:?}")))??;
    metrics.resync_bytes_received.inc_by(body.len() as u64 + 4);
    Ok(serde_json::from_slice::<Message>(&body)?)
}

/// Asks a client that cannot resume for the digests of what it holds at `bits`, and reads
/// them (a frame up to their size, within `timeout`).
async fn ask_digests<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    bits: u8,
    timeout: Duration,
    metrics: &ServerMetrics,
) -> Result<Vec<u64>, ProtocolError> {
    let answer = ask(
        r,
        w,
        &Message::SendDigests { bits },
        digests_frame_limit(bits),
        timeout,
        metrics,
    )
    .await?;
    match answer {
        Message::Digests { bits: b, digests } if b == bits => decode_digests(bits, &digests),
        other => Err(ProtocolError::Unexpected(format!(
            "expected digests of {bits} bits, got {other:?}"
        ))),
    }
}

/// One client: hello, catch-up, then the log as it grows, with pings both ways.
async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    hub: &Hub,
    config: &ServerConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ProtocolError> {
    let (mut r, w) = tokio::io::split(stream);
    // Frames are gathered and written with one call when several are ready.
    let mut w = tokio::io::BufWriter::with_capacity(64 << 10, w);
    let hello = match tokio::time::timeout(
        config.hello_timeout,
        read_frame(&mut r, config.max_client_frame),
    )
    .await
    {
        Err(_) => {
            hub.metrics.refused.inc();
            refuse(&mut w, "no hello in time").await;
            return Err(ProtocolError::Unexpected("no hello in time".into()));
        }
        Ok(Err(e @ ProtocolError::TooLarge { .. })) => {
            hub.metrics.refused.inc();
            refuse(&mut w, &e.to_string()).await;
            return Err(e);
        }
        Ok(r) => r?,
    };
    let (client, resume, holds, lz4, reconcile) = match serde_json::from_slice::<Message>(&hello) {
        Ok(Message::Hello {
            version: VERSION,
            client,
            resume,
            holds,
            features,
        }) => (
            client,
            resume,
            holds,
            features.iter().any(|f| f == FEATURE_LZ4),
            features.iter().any(|f| f == FEATURE_RECONCILE),
        ),
        Ok(Message::Hello { version, .. }) => {
            let reason = format!("protocol version {version} is not spoken here (only {VERSION})");
            hub.metrics.refused.inc();
            refuse(&mut w, &reason).await;
            return Err(ProtocolError::Unexpected(reason));
        }
        Ok(other) => {
            let reason = format!("the first message must be a hello, not {other:?}");
            hub.metrics.refused.inc();
            refuse(&mut w, &reason).await;
            return Err(ProtocolError::Unexpected(reason));
        }
        Err(e) => {
            hub.metrics.refused.inc();
            refuse(&mut w, "the first frame is not a message").await;
            return Err(ProtocolError::Garbage(e));
        }
    };
    let resume_at = resume.filter(|r| r.epoch == hub.epoch).map(|r| r.position);
    // A client is brought up to date only from a state that was whole once: until the
    // upstream Syncer's first InSync it waits (and says WaitForDatastore).
    let mut synced = hub.synced.subscribe();
    tokio::select! {
        _ = synced.wait_for(|s| *s) => {}
        () = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
    }
    // Resumes come first: only a resync or a snapshot waits for a place.
    let permit = if hub.can_resume(resume_at) {
        None
    } else {
        let permit = match hub.catch_ups.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                hub.lock().stats.catch_ups_waited += 1;
                hub.metrics.catch_ups_waiting.inc();
                let got = tokio::select! {
                    p = hub.catch_ups.acquire() => p.ok(),
                    () = async { let _ = stop.wait_for(|s| *s).await; } => None,
                };
                hub.metrics.catch_ups_waiting.dec();
                match got {
                    Some(p) => p,
                    None => return Ok(()),
                }
            }
        };
        let at_once = (hub.max_catch_ups - hub.catch_ups.available_permits()) as u64;
        let mut st = hub.lock();
        st.stats.most_catch_ups_at_once = st.stats.most_catch_ups_at_once.max(at_once);
        Some(permit)
    };
    let mut digests = None;
    let mut sketched = !reconcile;
    let catch = loop {
        match hub.catch_up(resume_at, holds, digests.take()) {
            Catch::NeedDigests(bits) => {
                if !sketched {
                    sketched = true;
                    let differ = resume_at.and_then(|p| hub.differ_at_most(p, holds));
                    match try_sketches(&mut r, &mut w, hub, holds, differ, bits, config).await {
                        Ok(Some(c)) => break c,
                        Ok(None) => {}
                        Err(e) => {
                            hub.metrics.refused.inc();
                            refuse(&mut w, &format!("bad sketch: {e}")).await;
                            return Err(e);
                        }
                    }
                }
                match ask_digests(&mut r, &mut w, bits, config.hello_timeout, &hub.metrics).await {
                    Ok(d) => digests = Some((bits, d)),
                    Err(e) => {
                        hub.metrics.refused.inc();
                        refuse(&mut w, &format!("bad digests: {e}")).await;
                        return Err(e);
                    }
                }
            }
            c => break c,
        }
    };
    let (mode, mut cursor, buckets) = match catch {
        Catch::Resume | Catch::NeedDigests(_) => (Mode::Resume, resume_at.unwrap_or(0), None),
        Catch::Buckets {
            position,
            frames,
            snapshot,
            digest,
        } => (
            if snapshot {
                Mode::Snapshot
            } else {
                Mode::Resync
            },
            position,
            Some((frames, digest)),
        ),
    };
    info!(client, ?mode, position = cursor, "client connected");
    w.write_all(&frame(&Message::Welcome {
        version: VERSION,
        epoch: hub.epoch,
        position: cursor,
        mode,
        features: [(lz4, FEATURE_LZ4), (reconcile, FEATURE_RECONCILE)]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| f.to_owned())
            .collect(),
    }))
    .await?;
    if let Some((frames, digest)) = buckets {
        // A client that does not take its catch-up (a frame in three ping intervals) would
        // hold a place and the frames: it is closed, and comes back to try again.
        for f in frames.iter() {
            match tokio::time::timeout(config.ping_interval * 3, send(&mut w, hub, None, f, lz4))
                .await
            {
                Ok(r) => r?,
                Err(_) => {
                    warn!(client, "client did not read its catch-up in time: closed");
                    return Err(ProtocolError::Unexpected(
                        "the client did not read its catch-up".into(),
                    ));
                }
            }
            hub.metrics.bytes_sent.inc_by(f.len() as u64);
        }
        w.write_all(&frame(&Message::ResyncDone {
            position: cursor,
            digest: Some(digest),
        }))
        .await?;
        w.flush().await?;
    }
    // The place is the next client's once this one's catch-up is written.
    drop(permit);
    let (ping_tx, mut ping_rx) = tokio::sync::mpsc::channel(8);
    let mut reader = tokio::spawn(read_loop(
        r,
        config.max_client_frame,
        config.ping_interval * 3,
        ping_tx,
    ));
    let mut head = hub.head.subscribe();
    // Made once, not each time round the loop: 1,000 clients each registering with (and
    // leaving) the two notifiers every round is a visible share of a busy server's CPU.
    // Each ends the loop when it fires.
    let shed = hub.shed.notified();
    tokio::pin!(shed);
    // The watch's guard is dropped inside: it is not held across the go-away's write.
    let stopped = async {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await;
    let mut told_status = false;
    let result = loop {
        let Some((frames, head_now)) = hub.after(cursor, WRITE_BATCH_BYTES) else {
            hub.lock().stats.fell_behind += 1;
            hub.metrics.fell_behind.inc();
            info!(
                client,
                position = cursor,
                "client fell behind the log: moved to a resync"
            );
            go_away(&mut w, hub, cursor, "fell behind the log").await;
            break Ok(());
        };
        if let Some(&(first, _)) = frames.first() {
            hub.metrics
                .lag
                .observe(head_now.saturating_sub(cursor) as f64);
            // A client that stops reading blocks this write: it lets go of the frames (and
            // the connection: the client resyncs when it comes back) once the log drops them,
            // or once it has waited three ping intervals.
            let written = tokio::select! {
                // The write first: the other two cost nothing unless it waits.
                biased;
                r = async {
                    for (position, f) in &frames {
                        send(&mut w, hub, Some(*position), f, lz4).await?;
                        hub.metrics.bytes_sent.inc_by(f.len() as u64);
                    }
                    Ok::<_, ProtocolError>(())
                } => Some(r),
                () = hub.dropped_past(first) => None,
                () = async { tokio::time::sleep(config.ping_interval * 3).await } => None,
            };
            let last = frames.last().map_or(cursor, |f| f.0);
            drop(frames);
            match written {
                Some(r) => r?,
                None => {
                    stalled(hub, &client, cursor);
                    break Ok(());
                }
            }
            cursor = last;
            continue;
        }
        // Caught up with the log: tell this client the status now, once.
        if !told_status {
            let (status, at) = hub.status();
            if at == cursor {
                w.write_all(&frame(&Message::Status {
                    position: cursor,
                    status: status.into(),
                }))
                .await?;
                told_status = true;
            } else {
                continue;
            }
        }
        // Everything gathered goes out before waiting (let go of as a blocked write is).
        let flushed = tokio::select! {
            biased;
            r = w.flush() => Some(r),
            () = hub.dropped_past(cursor + 1) => None,
            () = async { tokio::time::sleep(config.ping_interval * 3).await } => None,
        };
        match flushed {
            Some(r) => r?,
            None => {
                stalled(hub, &client, cursor);
                break Ok(());
            }
        }
        head.borrow_and_update();
        tokio::select! {
            _ = head.changed() => {}
            _ = ping.tick() => {
                w.write_all(&frame(&Message::Ping { nonce: cursor })).await?;
            }
            Some(nonce) = ping_rx.recv() => {
                w.write_all(&frame(&Message::Pong { nonce })).await?;
            }
            () = &mut stopped => {
                go_away(&mut w, hub, cursor, "the server is shutting down").await;
                break Ok(());
            }
            () = &mut shed => {
                hub.lock().stats.shed += 1;
                hub.metrics.shed.inc();
                info!(client, position = cursor, "client shed: the server is over its connection target");
                go_away(&mut w, hub, cursor, "the server is over its connection target").await;
                break Ok(());
            }
            ended = &mut reader => {
                break match ended {
                    Ok(e) => Err(e),
                    Err(_) => Ok(()),
                };
            }
        }
    };
    reader.abort();
    let _ = w.shutdown().await;
    result
}
