//! The client: the same `SyncerEvent` stream a local Syncer yields, read from a server.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use kvsync_backend::Error;
use kvsync_model::{Json, KVPair, ResourceKey, Revision};
use kvsync_syncer::{Backoff, RetryPolicy, SyncStatus, SyncerEvent, Update, UpdateType};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::protocol::{
    DEFAULT_MAX_FRAME, FEATURE_LZ4, FEATURE_RECONCILE, Incoming, MAX_BITS, Message, Mode,
    ProtocolError, Resume, VERSION, WireUpdate, bucket, contribution, digests, encode_digests,
    frame, key_hash, read_frame,
};
use crate::sketch::{HASHES, MAX_CELLS, Sketch};
use crate::tls::ClientTls;

/// Follows a [`Server`](crate::Server): yields exactly the [`SyncerEvent`] stream a local
/// [`Syncer`](kvsync_syncer::Syncer) yields (WaitForDatastore -> ResyncInProgress -> InSync,
/// batched New/Updated/Deleted updates with the same guarantees), so a consumer moves from a
/// local Syncer to a server by changing the line that makes the stream.
///
/// It keeps the revision of every key it handed on (not the values), so that after a
/// reconnect it resumes from the server's log when it can, and otherwise has the server send
/// only the buckets whose digests differ, with deletions for what went away (as a local
/// Syncer's relist does). Reconnects back off with jitter; while disconnected the status is
/// WaitForDatastore.
///
/// ```no_run
/// # async fn follow() {
/// use futures::StreamExt;
/// use kvsync_server::RemoteSyncer;
/// use kvsync_syncer::SyncerEvent;
///
/// let mut events = RemoteSyncer::new("127.0.0.1:7878").stream();
/// while let Some(ev) = events.next().await {
///     if let SyncerEvent::Updates(batch) = ev {
///         println!("{} updates", batch.len());
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RemoteSyncer {
    addr: String,
    name: String,
    retry: Arc<dyn RetryPolicy>,
    ping_interval: Duration,
    max_frame: usize,
    tls: Option<ClientTls>,
    lz4: bool,
}

/// A connection's byte stream: TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type Stream = Box<dyn Io>;

impl RemoteSyncer {
    /// A client of the server at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        RemoteSyncer {
            addr: addr.into(),
            name: format!("pid-{}", std::process::id()),
            // Capped at 3 s: a server back from a restart has every client again within a
            // few seconds, and a refused connection costs a server next to nothing.
            retry: Arc::new(Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(3),
            )),
            ping_interval: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            tls: None,
            lz4: true,
        }
    }

    /// Connects over TLS, verifying the server (and presenting a client certificate when the
    /// settings have one). Without it the connection is plain TCP.
    #[must_use]
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The name the server's logs show for this client.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How reconnects back off (capped exponential with jitter, 100 ms to 3 s, by default).
    #[must_use]
    pub fn with_retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.retry = Arc::new(policy);
        self
    }

    /// How often it pings the server (10 s); a server silent for three times this is dead.
    #[must_use]
    pub fn with_ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    /// Whether to offer LZ4 (on by default). Without it the server sends its large frames
    /// (snapshots, resyncs, large batches) decompressed: several times the bytes on the
    /// wire, and none of this client's CPU spent decompressing.
    #[must_use]
    pub fn with_lz4(mut self, on: bool) -> Self {
        self.lz4 = on;
        self
    }

    /// The events, as a local Syncer's `stream()` yields them.
    pub fn stream(self) -> BoxStream<'static, SyncerEvent> {
        let state = ClientState {
            cfg: self,
            held: HashMap::new(),
            reconcile: true,
            resume: None,
            status: None,
            out: VecDeque::new(),
            conn: None,
            attempt: 0,
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(ev) = st.out.pop_front() {
                    return Some((ev, st));
                }
                st.step().await;
            }
        })
        .boxed()
    }
}

struct Conn {
    /// The frames a task of the connection reads (a read is never cut in the middle of a
    /// frame by a ping to send).
    frames: tokio::sync::mpsc::Receiver<Result<Vec<u8>, ProtocolError>>,
    reader: tokio::task::JoinHandle<()>,
    last_heard: tokio::time::Instant,
    w: WriteHalf<Stream>,
    epoch: u64,
    /// During a resync or snapshot: the keys held, by bucket at the resolution of the
    /// buckets coming (those of each bucket that comes and the server does not hold are
    /// deleted).
    index: Option<(u8, HashMap<u32, Vec<ResourceKey>>)>,
    ping: tokio::time::Interval,
}

struct ClientState {
    cfg: RemoteSyncer,
    /// The revision of every key handed on.
    held: HashMap<ResourceKey, Revision>,
    /// Whether to offer resyncs by sketch (off after one that did not match, until a resync
    /// by digests did).
    reconcile: bool,
    resume: Option<Resume>,
    status: Option<SyncStatus>,
    out: VecDeque<SyncerEvent>,
    conn: Option<Conn>,
    attempt: u32,
}

/// The consumer's update of a key (a deletion's value is unknown: `null`, as after a local
/// Syncer's relist).
fn update(key: ResourceKey, value: Json, revision: Revision, update_type: UpdateType) -> Update {
    Update {
        kvp: KVPair {
            key,
            value,
            revision: Some(revision),
            create_revision: None,
            uid: None,
            ttl: None,
        },
        update_type,
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The buffer a connection is read through.
const READ_BUFFER: usize = 64 << 10;

/// Reads whole frames into `tx` until the connection ends or fails.
async fn read_frames(
    mut r: tokio::io::BufReader<ReadHalf<Stream>>,
    max: usize,
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, ProtocolError>>,
) {
    loop {
        let f = read_frame(&mut r, max).await;
        let failed = f.is_err();
        if tx.send(f).await.is_err() || failed {
            return;
        }
    }
}

impl ClientState {
    fn set_status(&mut self, s: SyncStatus) {
        if self.status != Some(s) {
            self.status = Some(s);
            self.out.push_back(SyncerEvent::Status(s));
        }
    }

    /// One step: connect, or read and apply the next frame.
    async fn step(&mut self) {
        if self.status.is_none() {
            self.set_status(SyncStatus::WaitForDatastore);
            return;
        }
        if self.conn.is_none() {
            if self.attempt > 0 {
                tokio::time::sleep(self.cfg.retry.delay(self.attempt)).await;
            }
            match self.connect().await {
                Ok(conn) => {
                    self.attempt = 0;
                    self.conn = Some(conn);
                }
                Err(e) => {
                    debug!(error = %e, addr = %self.cfg.addr, "cannot follow the server");
                    self.attempt = self.attempt.saturating_add(1);
                    self.set_status(SyncStatus::WaitForDatastore);
                    self.out
                        .push_back(SyncerEvent::Error(Arc::new(Error::Unavailable {
                            message: format!("kvsync server at {}: {e}", self.cfg.addr),
                            source: None,
                        })));
                }
            }
            return;
        }
        if let Err(e) = self.read_next().await {
            debug!(error = %e, "connection to the server ended");
            self.conn = None;
            self.attempt = self.attempt.saturating_add(1);
            self.set_status(SyncStatus::WaitForDatastore);
        }
    }

    async fn connect(&mut self) -> Result<Conn, ProtocolError> {
        let stream =
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&self.cfg.addr))
                .await
                .map_err(|_| ProtocolError::Unexpected("connect timed out".into()))??;
        let _ = stream.set_nodelay(true);
        let stream: Stream = match &self.cfg.tls {
            None => Box::new(stream),
            Some(tls) => {
                let (connector, name) = tls
                    .connector()
                    .map_err(|e| ProtocolError::Unexpected(e.to_string()))?;
                Box::new(connector.connect(name, stream).await?)
            }
        };
        let (r, mut w) = tokio::io::split(stream);
        // Buffered: a read takes in every frame that has arrived, not one length word and one
        // body at a time.
        let mut r = tokio::io::BufReader::with_capacity(READ_BUFFER, r);
        w.write_all(&frame(&Message::Hello {
            version: VERSION,
            client: self.cfg.name.clone(),
            features: [
                (self.cfg.lz4, FEATURE_LZ4),
                (self.reconcile, FEATURE_RECONCILE),
            ]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| f.to_owned())
            .collect(),
            resume: self.resume,
            holds: self.held.len() as u64,
        }))
        .await?;
        // Before the welcome, the server may ask for sketches or digests of what it holds.
        let welcome = loop {
            let body = read_frame(&mut r, self.cfg.max_frame).await?;
            let answer = match Incoming::decode(&body)? {
                Incoming::Control(Message::SendSketch { cells }) => {
                    let cells = cells as usize;
                    if cells % HASHES != 0 || cells > MAX_CELLS {
                        return Err(ProtocolError::Unexpected(format!(
                            "the server asked for a sketch of {cells} cells"
                        )));
                    }
                    let sketch = Sketch::of(cells, self.contributions().map(|(_, c)| c));
                    Message::Sketch {
                        cells: cells as u32,
                        sketch: sketch.encode(),
                    }
                }
                Incoming::Control(Message::SendDigests { bits }) => {
                    if bits > MAX_BITS {
                        return Err(ProtocolError::Unexpected(format!(
                            "the server asked for digests of {bits} bits (at most {MAX_BITS})"
                        )));
                    }
                    let d = digests(bits, self.contributions().map(|(k, c)| (key_hash(k), c)));
                    Message::Digests {
                        bits,
                        digests: encode_digests(&d),
                    }
                }
                other => break other,
            };
            w.write_all(&frame(&answer)).await?;
        };
        match welcome {
            Incoming::Control(Message::Welcome {
                epoch,
                mode,
                position,
                ..
            }) => {
                info!(?mode, epoch, position, "following the server");
                if mode != Mode::Resume {
                    // Its old resume point means nothing now; it holds `position` once every
                    // bucket came (a connection lost before resyncs again).
                    self.resume = None;
                }
                if self.status != Some(SyncStatus::InSync) || mode != Mode::Resume {
                    self.set_status(SyncStatus::ResyncInProgress);
                }
                let mut ping = tokio::time::interval(self.cfg.ping_interval);
                ping.tick().await;
                let (tx, frames) = tokio::sync::mpsc::channel(64);
                let max = self.cfg.max_frame;
                let reader = tokio::spawn(read_frames(r, max, tx));
                Ok(Conn {
                    frames,
                    reader,
                    last_heard: tokio::time::Instant::now(),
                    w,
                    epoch,
                    index: None,
                    ping,
                })
            }
            Incoming::Control(Message::Refused { reason }) => Err(ProtocolError::Unexpected(
                format!("the server refused: {reason}"),
            )),
            other => Err(ProtocolError::Unexpected(format!(
                "expected a welcome, got {other:?}"
            ))),
        }
    }

    async fn read_next(&mut self) -> Result<(), ProtocolError> {
        let silent = self.cfg.ping_interval * 3;
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let body = loop {
            tokio::select! {
                // Frames already read come first: a consumer that was slow to poll did not
                // make the server silent.
                biased;
                f = conn.frames.recv() => match f {
                    Some(f) => {
                        conn.last_heard = tokio::time::Instant::now();
                        break f?;
                    }
                    None => return Err(ProtocolError::Unexpected("the connection ended".into())),
                },
                () = tokio::time::sleep_until(conn.last_heard + silent) => {
                    return Err(ProtocolError::Unexpected("the server went silent".into()));
                }
                _ = conn.ping.tick() => {
                    conn.w.write_all(&frame(&Message::Ping { nonce: 0 })).await?;
                }
            }
        };
        let epoch = conn.epoch;
        match Incoming::decode(&body)? {
            Incoming::Updates { position, updates } => {
                let batch = self.apply(updates);
                if !batch.is_empty() {
                    self.out.push_back(SyncerEvent::Updates(batch));
                }
                self.resume = Some(Resume { epoch, position });
            }
            Incoming::Control(Message::Status { position, status }) => {
                self.set_status(status.into());
                self.resume = Some(Resume { epoch, position });
            }
            Incoming::Buckets {
                bits,
                ranges,
                entries,
            } => {
                let batch = self.resync_buckets(bits, &ranges, entries)?;
                if !batch.is_empty() {
                    self.out.push_back(SyncerEvent::Updates(batch));
                }
            }
            Incoming::Control(Message::Gone { ids }) => {
                let batch = self.gone(&ids);
                if !batch.is_empty() {
                    self.out.push_back(SyncerEvent::Updates(batch));
                }
            }
            Incoming::Control(Message::ResyncDone { position, digest }) => {
                if let Some(c) = self.conn.as_mut() {
                    c.index = None;
                }
                if let Some(want) = digest {
                    let have = self.contributions().fold(0, |d, (_, c)| d ^ c);
                    if have != want {
                        // Never InSync on a map that may differ: resync by digests, from
                        // what it holds now.
                        tracing::warn!(
                            "what this client holds after a resync is not what the server \
                             holds: resyncing by digests"
                        );
                        self.resume = None;
                        self.reconcile = false;
                        return Err(ProtocolError::Unexpected(
                            "the resync did not match the server's digest".into(),
                        ));
                    }
                    self.reconcile = true;
                }
                self.resume = Some(Resume { epoch, position });
            }
            Incoming::Control(Message::Ping { nonce }) => {
                if let Some(c) = self.conn.as_mut() {
                    c.w.write_all(&frame(&Message::Pong { nonce })).await?;
                }
            }
            Incoming::Control(Message::Pong { .. }) => {}
            Incoming::Control(Message::GoAway { reason, .. }) => {
                info!(
                    reason,
                    "the server asked this client to go away; reconnecting"
                );
                self.conn = None;
                self.set_status(SyncStatus::WaitForDatastore);
            }
            other => {
                return Err(ProtocolError::Unexpected(format!("unexpected {other:?}")));
            }
        }
        Ok(())
    }

    fn held_revision(&self, key: &ResourceKey) -> Option<&Revision> {
        self.held.get(key)
    }

    fn track(&mut self, key: &ResourceKey, revision: Option<&Revision>) {
        match revision {
            Some(r) => {
                self.held.insert(key.clone(), r.clone());
            }
            None => {
                self.held.remove(key);
            }
        }
    }

    /// One wire update as the consumer's update, by what this client handed on before: New
    /// for a key it does not hold, Updated for another revision, nothing for the same one,
    /// Deleted for a key it holds.
    fn take_update(&mut self, u: WireUpdate) -> Option<Update> {
        let revision = Revision::from(u.revision);
        let held = self.held_revision(&u.key).cloned();
        match u.value {
            None => {
                held?;
                self.track(&u.key, None);
                Some(update(
                    u.key,
                    Json::default(),
                    revision,
                    UpdateType::Deleted,
                ))
            }
            Some(raw) => {
                if held.as_ref() == Some(&revision) {
                    return None;
                }
                self.track(&u.key, Some(&revision));
                let kind = if held.is_some() {
                    UpdateType::Updated
                } else {
                    UpdateType::New
                };
                Some(update(u.key, Json::from_raw(raw), revision, kind))
            }
        }
    }

    fn apply(&mut self, updates: Vec<WireUpdate>) -> Vec<Update> {
        updates
            .into_iter()
            .filter_map(|u| self.take_update(u))
            .collect()
    }

    /// Every key held, with its contribution at the revision held (what digests, sketches and
    /// the server's whole digest are made of).
    fn contributions(&self) -> impl Iterator<Item = (&ResourceKey, u64)> {
        self.held
            .iter()
            .map(|(k, r)| (k, contribution(k, &r.to_string())))
    }

    /// A resync by sketch's deletions: the keys held at one of these contributions (old
    /// revisions the server no longer has, and keys it does not hold).
    fn gone(&mut self, ids: &[u64]) -> Vec<Update> {
        let ids: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let gone: Vec<ResourceKey> = self
            .contributions()
            .filter(|(_, c)| ids.contains(c))
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter()
            .filter_map(|key| {
                let revision = self.held.remove(&key)?;
                Some(update(key, Json::default(), revision, UpdateType::Deleted))
            })
            .collect()
    }

    /// Some buckets of a resync or snapshot, with the server's whole content of them. What
    /// differs is handed on; keys of those buckets the server does not hold are deleted.
    fn resync_buckets(
        &mut self,
        bits: u8,
        ranges: &[(u32, u32)],
        entries: Vec<WireUpdate>,
    ) -> Result<Vec<Update>, ProtocolError> {
        if bits > MAX_BITS {
            return Err(ProtocolError::Unexpected(format!(
                "buckets of {bits} bits (at most {MAX_BITS})"
            )));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        // The keys held, by bucket at this resolution: made once per resync.
        let mut index = match conn.index.take() {
            Some((b, index)) if b == bits => index,
            _ => {
                let mut index: HashMap<u32, Vec<ResourceKey>> = HashMap::new();
                for k in self.held.keys() {
                    index
                        .entry(bucket(key_hash(k), bits))
                        .or_default()
                        .push(k.clone());
                }
                index
            }
        };
        let present: std::collections::HashSet<&ResourceKey> =
            entries.iter().map(|e| &e.key).collect();
        let count = 1u32 << bits;
        let mut gone: Vec<ResourceKey> = Vec::new();
        for &(from, to) in ranges {
            for b in from.min(count)..to.min(count) {
                for k in index.remove(&b).unwrap_or_default() {
                    if !present.contains(&k) {
                        gone.push(k);
                    }
                }
            }
        }
        drop(present);
        if let Some(conn) = self.conn.as_mut() {
            conn.index = Some((bits, index));
        }
        let mut out: Vec<Update> = entries
            .into_iter()
            .filter_map(|u| self.take_update(u))
            .collect();
        for key in gone {
            if let Some(revision) = self.held.remove(&key) {
                out.push(update(key, Json::default(), revision, UpdateType::Deleted));
            }
        }
        Ok(out)
    }
}
