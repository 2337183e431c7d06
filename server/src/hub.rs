//! The server's state: what the upstream Syncer holds (key, revision, value), the digests of
//! its buckets, and a log of recent frames bounded by bytes and by age, each frame encoded
//! once and shared by every client.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvsync_model::{Json, KVPair, ResourceKey, Revision};
use kvsync_syncer::{SyncStatus, Update, UpdateType};

use crate::metrics::ServerMetrics;
use crate::protocol::{
    Incoming, Message, ProtocolError, bits_for, buckets_frame, contribution, digests, frame,
    is_compressed, key_hash, updates_frame,
};
use crate::sketch::Sketch;

/// The most cells of sketches of the state kept in step with it (32 MiB): the sizes clients
/// were asked for most recently.
const SKETCH_CACHE_CELLS: usize = 1 << 21;

/// A resync's or snapshot's frames are cut at bucket boundaries once they hold this much.
const BUCKETS_FRAME_BYTES: usize = 256 << 10;

/// One key the server holds, with its contribution to its bucket's digest.
pub(crate) struct Entry {
    pub(crate) kvp: KVPair,
    contribution: u64,
}

/// What the server holds, in key-hash order: every bucket, at every resolution, is a range.
pub(crate) type Entries = BTreeMap<(u64, ResourceKey), Entry>;

fn revision_text(kvp: &KVPair) -> String {
    kvp.revision
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Puts `kvp` in: the contribution of the entry it replaced (if any), and its own.
fn put(entries: &mut Entries, kvp: KVPair) -> (Option<u64>, u64) {
    let c = contribution(&kvp.key, &revision_text(&kvp));
    let old = entries.insert(
        (key_hash(&kvp.key), kvp.key.clone()),
        Entry {
            kvp,
            contribution: c,
        },
    );
    (old.map(|e| e.contribution), c)
}

fn take(entries: &mut Entries, key: &ResourceKey) -> Option<Entry> {
    entries.remove(&(key_hash(key), key.clone()))
}

/// The hashes of bucket `b` of `2^bits`, inclusive.
fn hash_range(b: u32, bits: u8) -> (u64, u64) {
    if bits == 0 {
        return (0, u64::MAX);
    }
    let shift = 64 - u32::from(bits);
    let lo = u64::from(b) << shift;
    (lo, lo | (u64::MAX >> u32::from(bits)))
}

/// A frame of the log or of a catch-up: the same bytes for every client (LZ4-compressed when
/// large) and, once a client that does not speak LZ4 has needed it, the same frame
/// decompressed, made once and shared by every such client.
#[derive(Clone)]
pub(crate) struct Frame(Arc<FrameBytes>);

struct FrameBytes {
    wire: Box<[u8]>,
    plain: std::sync::OnceLock<Box<[u8]>>,
    /// The bytes of `plain` the log counts against its bound (set under the hub's lock).
    counted: std::sync::atomic::AtomicUsize,
}

impl From<Vec<u8>> for Frame {
    fn from(wire: Vec<u8>) -> Self {
        Frame(Arc::new(FrameBytes {
            wire: wire.into_boxed_slice(),
            plain: std::sync::OnceLock::new(),
            counted: std::sync::atomic::AtomicUsize::new(0),
        }))
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0.wire
    }
}

impl Frame {
    /// The frame for a client that does not speak LZ4: itself when it is not compressed, else
    /// its decompressed copy, made by the first client that needs it and kept for the
    /// others. `made` is told when this call made the copy (the log counts it).
    pub(crate) fn plain(&self, made: impl FnOnce(&Frame)) -> Result<&[u8], ProtocolError> {
        if !is_compressed(&self.0.wire) {
            return Ok(&self.0.wire);
        }
        if self.0.plain.get().is_none() {
            let body = crate::protocol::plain(&self.0.wire)?.into_owned();
            if self.0.plain.set(body.into_boxed_slice()).is_ok() {
                made(self);
            }
        }
        Ok(self.0.plain.get().map_or(&[][..], |p| &p[..]))
    }

    /// Its bytes as the log counts them: the wire's, and the plain copy's once counted.
    fn counted_len(&self) -> usize {
        self.0.wire.len() + self.0.counted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub(crate) struct LogItem {
    pub(crate) position: u64,
    /// The updates logged up to and including this frame ([`State::changes`]).
    changes: u64,
    at: Instant,
    pub(crate) frame: Frame,
}

/// Counters for the logs and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Clients brought up to date from the log alone.
    pub resumes: u64,
    /// Clients sent only the buckets that differed.
    pub resyncs: u64,
    /// Clients sent everything (they held nothing).
    pub snapshots: u64,
    /// Of the resyncs, those done by sketch ([`crate::sketch`]) rather than bucket digests.
    pub reconciled: u64,
    /// Sketches that were too small for the difference (a larger one, or the digests, was
    /// asked for next).
    pub sketches_too_small: u64,
    /// Snapshots built (shared by the clients that needed one at the same position).
    pub snapshot_builds: u64,
    /// Clients moved to a resync because they fell off the end of the log.
    pub fell_behind: u64,
    /// The most resyncs and snapshots that were being sent at once (at most
    /// [`ServerConfig::max_catch_ups`](crate::ServerConfig::max_catch_ups)).
    pub most_catch_ups_at_once: u64,
    /// Resyncs and snapshots that waited for one of those places.
    pub catch_ups_waited: u64,
    /// Clients told to go elsewhere because the server was over its connection target.
    pub shed: u64,
}

pub(crate) struct State {
    pub(crate) entries: Entries,
    /// A restored server's upstream state until its first InSync: then what differs from
    /// `entries` is logged as ordinary frames (so that clients resume across the restart).
    staging: Option<Entries>,
    /// The digests of `entries` at a position and a resolution, for the clients resyncing
    /// there.
    digests: Option<(u64, u8, Arc<Vec<u64>>)>,
    /// Sketches of `entries` (of the sizes clients were asked for), kept in step with them as
    /// they change, most recently used last: a client's sketch is answered without going
    /// over every entry.
    sketches: Vec<Sketch>,
    /// The XOR of every entry's contribution, kept in step.
    digest: u64,
    pub(crate) status: SyncStatus,
    pub(crate) log: VecDeque<LogItem>,
    log_bytes: usize,
    /// The updates logged since the hub started (or was restored).
    changes: u64,
    /// `(position, changes)` at some dropped frames, thinned so that the gap between two is
    /// at most an eighth of what came after them: how many updates a client that fell off
    /// the log missed, at most ([`Hub::differ_at_most`]).
    checkpoints: Vec<(u64, u64)>,
    /// The position of the last frame logged (0: none yet).
    pub(crate) head: u64,
    /// The position of the last frame dropped from the log (a client at or after it can
    /// resume).
    pub(crate) dropped: u64,
    snapshot: Option<(u64, Arc<Vec<Frame>>)>,
    pub(crate) stats: HubStats,
}

/// What a client is sent to be brought up to date.
pub(crate) enum Catch {
    /// The frames after its position are in the log.
    Resume,
    /// It holds something: its digests at this resolution are needed first.
    NeedDigests(u8),
    /// These bucket frames, at this position (where the XOR of every key's contribution is
    /// `digest`).
    Buckets {
        position: u64,
        frames: Arc<Vec<Frame>>,
        snapshot: bool,
        digest: u64,
    },
}

/// The shared state of a server.
pub(crate) struct Hub {
    state: Mutex<State>,
    /// The position of the last frame logged, for clients to wait on.
    pub(crate) head: tokio::sync::watch::Sender<u64>,
    /// Whether the upstream Syncer was ever in sync: until then the state is partial, and no
    /// client is resynced against it (it would be told to delete what it holds).
    pub(crate) synced: tokio::sync::watch::Sender<bool>,
    /// The upstream Syncer's status, for those who follow it.
    pub(crate) status_tx: tokio::sync::watch::Sender<SyncStatus>,
    pub(crate) epoch: u64,
    max_log_bytes: usize,
    max_log_age: Duration,
    pub(crate) metrics: ServerMetrics,
    /// Places for resyncs and snapshots being sent (resumes need none).
    pub(crate) catch_ups: tokio::sync::Semaphore,
    /// The number of those places.
    pub(crate) max_catch_ups: usize,
    /// Rung once for each client to shed.
    pub(crate) shed: tokio::sync::Notify,
    /// [`State::dropped`], read without the lock by writers blocked on a slow client.
    dropped_at: std::sync::atomic::AtomicU64,
}

impl Hub {
    pub(crate) fn new(
        epoch: u64,
        max_log_bytes: usize,
        max_log_age: Duration,
        metrics: ServerMetrics,
        max_catch_ups: usize,
    ) -> Self {
        Hub {
            state: Mutex::new(State {
                entries: Entries::new(),
                staging: None,
                digests: None,
                sketches: Vec::new(),
                digest: 0,
                status: SyncStatus::WaitForDatastore,
                log: VecDeque::new(),
                log_bytes: 0,
                changes: 0,
                checkpoints: vec![(0, 0)],
                head: 0,
                dropped: 0,
                snapshot: None,
                stats: HubStats::default(),
            }),
            head: tokio::sync::watch::Sender::new(0),
            synced: tokio::sync::watch::Sender::new(false),
            status_tx: tokio::sync::watch::Sender::new(SyncStatus::WaitForDatastore),
            epoch,
            max_log_bytes,
            max_log_age,
            metrics,
            catch_ups: tokio::sync::Semaphore::new(max_catch_ups.max(1)),
            max_catch_ups: max_catch_ups.max(1),
            shed: tokio::sync::Notify::new(),
            dropped_at: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether a client at `resume` can be brought up to date from the log alone.
    pub(crate) fn can_resume(&self, resume: Option<u64>) -> bool {
        let st = self.lock();
        resume.is_some_and(|p| p >= st.dropped && p <= st.head)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, st: &mut State, frame: Frame) {
        st.log_bytes += frame.len();
        st.log.push_back(LogItem {
            position: st.head,
            changes: st.changes,
            at: Instant::now(),
            frame,
        });
        self.trim(st);
    }

    /// Counts a log frame's plain copy, just made for a client that does not speak LZ4,
    /// against the log's bound (when the frame is still in the log).
    pub(crate) fn count_plain(&self, position: u64, frame: &Frame) {
        let mut st = self.lock();
        let first = st.log.front().map_or(0, |i| i.position);
        let Some(item) = position
            .checked_sub(first)
            .and_then(|i| st.log.get(usize::try_from(i).ok()?))
        else {
            return;
        };
        if !Arc::ptr_eq(&item.frame.0, &frame.0) {
            return;
        }
        let len = frame.0.plain.get().map_or(0, |p| p.len());
        if frame
            .0
            .counted
            .swap(len, std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            st.log_bytes += len;
            self.trim(&mut st);
        }
    }

    /// Drops the oldest frames while the log is over its bound of bytes or of age.
    fn trim(&self, st: &mut State) {
        // Bounded by bytes and by age; the newest frame always stays.
        while st.log.len() > 1
            && (st.log_bytes > self.max_log_bytes
                || st
                    .log
                    .front()
                    .is_some_and(|i| i.at.elapsed() > self.max_log_age))
        {
            if let Some(old) = st.log.pop_front() {
                st.log_bytes -= old.frame.counted_len();
                st.dropped = old.position;
                self.dropped_at
                    .store(old.position, std::sync::atomic::Ordering::Release);
                checkpoint(st, old.position, old.changes);
            }
        }
        self.metrics
            .log_bytes
            .set(i64::try_from(st.log_bytes).unwrap_or(i64::MAX));
    }

    /// Applies a batch of the upstream Syncer: the state and one frame in the log (or, on a
    /// restored server before its upstream's first InSync, the staged state only).
    pub(crate) fn apply(&self, batch: Vec<Update>) {
        let mut st = self.lock();
        if let Some(staging) = st.staging.as_mut() {
            for u in batch {
                if u.update_type == UpdateType::Deleted {
                    take(staging, &u.kvp.key);
                } else {
                    put(staging, u.kvp);
                }
            }
            return;
        }
        self.log_batch(&mut st, batch);
    }

    fn log_batch(&self, st: &mut State, batch: Vec<Update>) -> u64 {
        st.head += 1;
        let position = st.head;
        let started = Instant::now();
        let frame: Frame = updates_frame(
            position,
            batch
                .iter()
                .map(|u| (&u.kvp, u.update_type == UpdateType::Deleted)),
        )
        .into();
        self.metrics.encode.observe(started.elapsed().as_secs_f64());
        st.changes += batch.len() as u64;
        for u in batch {
            let (old, new) = if u.update_type == UpdateType::Deleted {
                (
                    take(&mut st.entries, &u.kvp.key).map(|e| e.contribution),
                    None,
                )
            } else {
                let (old, new) = put(&mut st.entries, u.kvp);
                (old, Some(new))
            };
            for (c, add) in [(old, false), (new, true)] {
                if let Some(c) = c {
                    st.digest ^= c;
                    for s in &mut st.sketches {
                        s.toggle(c, add);
                    }
                }
            }
        }
        self.push(st, frame);
        self.head.send_replace(position);
        position
    }

    /// Logs a status change of the upstream Syncer. On a restored server, the first InSync
    /// first logs what differs between the restored state and the upstream's.
    pub(crate) fn set_status(&self, status: SyncStatus) {
        let mut st = self.lock();
        if st.staging.is_some() {
            if status != SyncStatus::InSync {
                return;
            }
            let fresh = st.staging.take().unwrap_or_default();
            let changed = diff(&st.entries, fresh);
            let n = changed.len();
            let mut frames = 0;
            let mut changed = changed.into_iter().peekable();
            while changed.peek().is_some() {
                let batch: Vec<Update> = changed.by_ref().take(1000).collect();
                self.log_batch(&mut st, batch);
                frames += 1;
            }
            tracing::info!(
                changed = n,
                frames,
                "restored state brought up to the upstream's"
            );
        }
        st.head += 1;
        let position = st.head;
        st.status = status;
        let frame: Frame = frame(&Message::Status {
            position,
            status: status.into(),
        })
        .into();
        self.push(&mut st, frame);
        drop(st);
        if status == SyncStatus::InSync {
            self.synced.send_replace(true);
        }
        self.status_tx.send_replace(status);
        self.head.send_replace(position);
    }

    /// How to bring a client at `resume` (this server's position, if it has one) holding
    /// `holds` keys up to date; `digests` are its digests once asked for
    /// ([`Catch::NeedDigests`]).
    pub(crate) fn catch_up(
        &self,
        resume: Option<u64>,
        holds: u64,
        digests_of_client: Option<(u8, Vec<u64>)>,
    ) -> Catch {
        let mut st = self.lock();
        if let Some(p) = resume
            && p >= st.dropped
            && p <= st.head
        {
            st.stats.resumes += 1;
            self.metrics.catch_up("resume");
            return Catch::Resume;
        }
        let position = st.head;
        if holds > 0 && digests_of_client.is_none() {
            return Catch::NeedDigests(bits_for(st.entries.len()));
        }
        match digests_of_client {
            Some((bits, theirs)) => {
                st.stats.resyncs += 1;
                self.metrics.catch_up("resync");
                let ours = match &st.digests {
                    Some((p, b, d)) if *p == position && *b == bits => d.clone(),
                    _ => {
                        let d = Arc::new(digests(
                            bits,
                            st.entries.iter().map(|((h, _), e)| (*h, e.contribution)),
                        ));
                        st.digests = Some((position, bits, d.clone()));
                        d
                    }
                };
                let differ = ours
                    .iter()
                    .zip(&theirs)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, _)| i as u32);
                let frames = Arc::new(bucket_frames(&st.entries, bits, differ));
                Catch::Buckets {
                    position,
                    frames,
                    snapshot: false,
                    digest: st.digest,
                }
            }
            None => {
                st.stats.snapshots += 1;
                self.metrics.catch_up("snapshot");
                let frames = match &st.snapshot {
                    // Built once for everyone who needs one at this position.
                    Some((p, f)) if *p == position => f.clone(),
                    _ => {
                        st.stats.snapshot_builds += 1;
                        self.metrics.snapshot_builds.inc();
                        let bits = bits_for(st.entries.len());
                        let f = Arc::new(bucket_frames(&st.entries, bits, 0..1u32 << bits));
                        st.snapshot = Some((position, f.clone()));
                        f
                    }
                };
                Catch::Buckets {
                    position,
                    frames,
                    snapshot: true,
                    digest: st.digest,
                }
            }
        }
    }

    /// At most how many items differ between this hub's state and that of a client of this
    /// epoch at `position` holding `holds` keys (one per key it holds that the hub does not,
    /// one per key the other way, two per key at another revision): twice the updates logged
    /// after `position`, and never more than both sets. `None` when the hub cannot tell (a
    /// position from before a restore, or past the head).
    pub(crate) fn differ_at_most(&self, position: u64, holds: u64) -> Option<u64> {
        let st = self.lock();
        if position > st.head {
            return None;
        }
        let i = st.checkpoints.partition_point(|&(p, _)| p <= position);
        let &(_, before) = st.checkpoints.get(i.checked_sub(1)?)?;
        let missed = st.changes - before;
        Some(
            missed
                .saturating_mul(2)
                .min(holds.saturating_add(st.entries.len() as u64)),
        )
    }

    /// A resync by sketch: the client's sketch of what it holds (`holds` keys) against the
    /// server's; `None` when the difference does not peel (too large for the sketch), and the
    /// caller asks for a larger one or for digests.
    pub(crate) fn reconcile(&self, holds: u64, theirs: &Sketch) -> Option<Catch> {
        let mut st = self.lock();
        let frames = reconciled(&mut st, holds, theirs);
        self.metrics.sketch(frames.is_some());
        let Some(frames) = frames else {
            st.stats.sketches_too_small += 1;
            return None;
        };
        st.stats.resyncs += 1;
        st.stats.reconciled += 1;
        self.metrics.catch_up("resync");
        Some(Catch::Buckets {
            position: st.head,
            frames: Arc::new(frames),
            snapshot: false,
            digest: st.digest,
        })
    }

    /// The frames after `position`, up to `max_bytes` of them (one at least), and the head;
    /// `None` when the log no longer holds the frame right after it (the client fell behind).
    pub(crate) fn after(
        &self,
        position: u64,
        max_bytes: usize,
    ) -> Option<(Vec<(u64, Frame)>, u64)> {
        let st = self.lock();
        if position < st.dropped {
            return None;
        }
        let first = st.log.front().map_or(st.head + 1, |i| i.position);
        let skip = (position + 1).saturating_sub(first) as usize;
        let mut bytes = 0;
        let frames = st
            .log
            .iter()
            .skip(skip)
            .take_while(|i| {
                let more = bytes == 0 || bytes + i.frame.len() <= max_bytes;
                bytes += i.frame.len();
                more
            })
            .map(|i| (i.position, i.frame.clone()))
            .collect();
        Some((frames, st.head))
    }

    /// Resolves once the log has dropped the frame at `position` (a writer blocked on a
    /// client that stopped reading must then let go of it: the log's bound holds).
    pub(crate) async fn dropped_past(&self, position: u64) {
        let mut head = self.head.subscribe();
        while self.dropped_at.load(std::sync::atomic::Ordering::Acquire) < position {
            if head.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The upstream status and the head position now.
    pub(crate) fn status(&self) -> (SyncStatus, u64) {
        let st = self.lock();
        (st.status, st.head)
    }

    /// How many bytes the log holds.
    pub(crate) fn log_bytes(&self) -> usize {
        self.lock().log_bytes
    }

    /// The state, the log and the positions as bytes for [`Hub::restore`] (a stopped server's
    /// saved state); `None` when the state was never whole (the upstream never in sync).
    pub(crate) fn save(&self) -> Option<Vec<u8>> {
        let st = self.lock();
        if !*self.synced.borrow() && st.staging.is_none() {
            return None;
        }
        let header = Saved {
            kind: "saved".into(),
            format: SAVED_FORMAT,
            epoch: self.epoch,
            head: st.head,
            dropped: st.dropped,
            log: st.log.len() as u64,
            changes: Some(Changes {
                now: st.changes,
                log: st.log.iter().map(|i| i.changes).collect(),
                checkpoints: st.checkpoints.clone(),
            }),
        };
        let mut out = frame_json(&header);
        for item in &st.log {
            out.extend_from_slice(&item.frame);
        }
        let bits = bits_for(st.entries.len());
        for f in bucket_frames(&st.entries, bits, 0..1u32 << bits) {
            out.extend_from_slice(&f);
        }
        Some(out)
    }

    /// Takes up a stopped server's saved state ([`Hub::save`]) with its epoch, positions and
    /// log, so that its clients resume. Until the upstream Syncer's first InSync, what it
    /// hands on is staged; then what differs from the saved state is logged.
    pub(crate) fn restore(&self, saved: Restored) {
        let mut st = self.lock();
        st.entries = saved.entries;
        st.digest = whole_digest(&st.entries);
        st.sketches.clear();
        st.staging = Some(Entries::new());
        st.head = saved.head;
        st.dropped = saved.dropped;
        self.dropped_at
            .store(saved.dropped, std::sync::atomic::Ordering::Release);
        st.log_bytes = saved.log.iter().map(|f| f.len()).sum();
        // Without the saved counts, what came before the saved head is not counted: a client
        // from before it has no estimate of what it missed.
        let (changes, log_changes, checkpoints) = match saved.changes {
            Some(c) => (c.now, c.log, c.checkpoints),
            None => (0, vec![0; saved.log.len()], vec![(saved.head, 0)]),
        };
        st.changes = changes;
        st.checkpoints = checkpoints;
        let first = saved.head + 1 - saved.log.len() as u64;
        let now = Instant::now();
        st.log = saved
            .log
            .into_iter()
            .zip(first..)
            .zip(log_changes)
            .map(|((frame, position), changes)| LogItem {
                position,
                changes,
                at: now,
                frame,
            })
            .collect();
        self.metrics
            .log_bytes
            .set(i64::try_from(st.log_bytes).unwrap_or(i64::MAX));
        drop(st);
        self.head.send_replace(saved.head);
    }
}

/// The version of the saved-state format.
const SAVED_FORMAT: u32 = 1;

/// The first frame of a saved state: then `log` frames of the log as they were sent, then
/// bucket frames of every key the server held.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    #[serde(rename = "type")]
    kind: String,
    format: u32,
    epoch: u64,
    head: u64,
    dropped: u64,
    log: u64,
    /// The count of updates (absent in a state saved before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    changes: Option<Changes>,
}

/// The count of updates a saved state carries, so that a restored server still knows how
/// much a client that fell off its log before the restart missed.
#[derive(serde::Serialize, serde::Deserialize)]
struct Changes {
    /// [`State::changes`].
    now: u64,
    /// Each logged frame's [`LogItem::changes`].
    log: Vec<u64>,
    /// [`State::checkpoints`].
    checkpoints: Vec<(u64, u64)>,
}

impl Changes {
    /// Whether these counts fit a saved state of `head` with `log` frames: in order, none
    /// past the head or the count.
    fn fits(&self, head: u64, log: u64) -> bool {
        let ordered = |v: &[(u64, u64)]| v.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        self.log.len() as u64 == log
            && self.log.windows(2).all(|w| w[0] <= w[1])
            && self.log.last().is_none_or(|&c| c <= self.now)
            && !self.checkpoints.is_empty()
            && ordered(&self.checkpoints)
            && self
                .checkpoints
                .last()
                .is_some_and(|&(p, c)| p <= head && c <= self.now)
    }
}

fn frame_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    crate::protocol::framed(serde_json::to_vec(v).unwrap_or_default())
}

/// A saved state read back ([`Restored::read`]).
pub(crate) struct Restored {
    pub(crate) epoch: u64,
    head: u64,
    dropped: u64,
    log: Vec<Frame>,
    entries: Entries,
    changes: Option<Changes>,
}

impl Restored {
    /// Reads a saved state.
    ///
    /// # Errors
    /// When the bytes are not a saved state of this format: a clear reason.
    pub(crate) fn read(bytes: &[u8]) -> Result<Restored, String> {
        let mut rest = bytes;
        // One frame as it is (length word included), compressed or not.
        let mut next = || -> Option<Result<&[u8], String>> {
            if rest.is_empty() {
                return None;
            }
            let Some((len, _)) = rest.split_first_chunk::<4>() else {
                return Some(Err("a truncated frame".into()));
            };
            let size = (u32::from_be_bytes(*len) & !(1 << 31)) as usize;
            if rest.len() < 4 + size {
                return Some(Err("a truncated frame".into()));
            }
            let (f, tail) = rest.split_at(4 + size);
            rest = tail;
            Some(Ok(f))
        };
        let body = |f: &[u8]| -> Result<Vec<u8>, String> {
            let plain = crate::protocol::plain(f).map_err(|e| e.to_string())?;
            Ok(plain.get(4..).unwrap_or_default().to_vec())
        };
        let header = next().ok_or("empty")??;
        let header: Saved = serde_json::from_slice(&body(header)?)
            .map_err(|e| format!("not a saved state: {e}"))?;
        if header.kind != "saved" || header.format != SAVED_FORMAT {
            return Err(format!(
                "a saved state of format {} (this server reads {SAVED_FORMAT})",
                header.format
            ));
        }
        if header.log > header.head || header.dropped > header.head {
            return Err("positions that do not add up".into());
        }
        let mut log = Vec::new();
        for _ in 0..header.log {
            let f = next().ok_or("the log is cut short")??;
            log.push(Frame::from(f.to_vec()));
        }
        let mut entries = Entries::new();
        while let Some(f) = next() {
            let Incoming::Buckets { entries: got, .. } = Incoming::decode(&body(f?)?)
                .map_err(|e| format!("a frame of the state that is not a message: {e}"))?
            else {
                return Err("a frame of the state that is not buckets".into());
            };
            for u in got {
                let Some(raw) = u.value else {
                    return Err(format!("{} saved without its value", u.key));
                };
                put(
                    &mut entries,
                    KVPair::new(u.key, Json::from_raw(raw))
                        .with_revision(Revision::from(u.revision)),
                );
            }
        }
        Ok(Restored {
            epoch: header.epoch,
            head: header.head,
            dropped: header.dropped,
            log,
            entries,
            // Counts that do not fit are left out: estimates start again from the head.
            changes: header.changes.filter(|c| c.fits(header.head, header.log)),
        })
    }
}

/// The client's sketch minus the server's of the same size. The server's is one kept in step
/// with the state (now the most recently used), or one built for it and, when it fits, kept
/// from now on. `None` when the sizes differ.
fn difference(st: &mut State, theirs: &Sketch) -> Option<Sketch> {
    let cells = theirs.len();
    if let Some(i) = st.sketches.iter().position(|s| s.len() == cells) {
        let ours = st.sketches.remove(i);
        let diff = theirs.minus(&ours).ok();
        st.sketches.push(ours);
        return diff;
    }
    let ours = Sketch::of(cells, st.entries.values().map(|e| e.contribution));
    let diff = theirs.minus(&ours).ok();
    if cells <= SKETCH_CACHE_CELLS {
        st.sketches.push(ours);
        while st.sketches.len() > 1
            && st.sketches.iter().map(Sketch::len).sum::<usize>() > SKETCH_CACHE_CELLS
        {
            st.sketches.remove(0);
        }
    }
    diff
}

/// The frames of a resync by sketch (the entries only the server holds, then the client's
/// items that are gone), or `None` when the client's sketch against the server's does not
/// peel into the difference of the two sets (too small, or not a sketch of what it holds).
fn reconciled(st: &mut State, holds: u64, theirs: &Sketch) -> Option<Vec<Frame>> {
    let (only_client, only_server) = difference(st, theirs)?.decode()?;
    // What the client will hold must be what the server holds.
    let after = (holds as usize)
        .checked_sub(only_client.len())
        .map(|n| n + only_server.len());
    if after != Some(st.entries.len()) {
        return None;
    }
    let wanted: std::collections::HashSet<u64> = only_server.iter().copied().collect();
    let send: Vec<&KVPair> = st
        .entries
        .values()
        .filter(|e| wanted.contains(&e.contribution))
        .map(|e| &e.kvp)
        .collect();
    if send.len() != only_server.len() {
        return None;
    }
    let mut frames: Vec<Frame> = send
        .chunks(1000)
        .map(|chunk| buckets_frame(0, &[], chunk.iter().copied()).into())
        .collect();
    frames.push(frame(&Message::Gone { ids: only_client }).into());
    Some(frames)
}

/// Records that `changes` updates were logged up to `position` (a frame just dropped), and
/// thins the checkpoints: one goes when its neighbours are closer than an eighth of what came
/// after them, so they stay a few hundred for any history and an estimate is at most an
/// eighth too high.
fn checkpoint(st: &mut State, position: u64, changes: u64) {
    if st.checkpoints.last().is_some_and(|&(p, _)| p >= position) {
        return;
    }
    st.checkpoints.push((position, changes));
    let now = st.changes;
    // In place (this runs for every frame the log drops): `kept` of them are kept so far, at
    // the front.
    let cps = &mut st.checkpoints;
    let mut kept = 0;
    for i in 0..cps.len() {
        let removable = kept > 0
            && cps
                .get(i + 1)
                .is_some_and(|&(_, after)| after - cps[kept - 1].1 <= (now - after) / 8);
        if !removable {
            cps[kept] = cps[i];
            kept += 1;
        }
    }
    cps.truncate(kept);
}

/// The XOR of every key's contribution.
fn whole_digest(entries: &Entries) -> u64 {
    entries.values().fold(0, |d, e| d ^ e.contribution)
}

/// The frames of the whole content of `buckets` (in increasing order) of `2^bits`: cut at
/// bucket boundaries once a frame holds [`BUCKETS_FRAME_BYTES`], each naming the buckets it
/// covers as ranges.
fn bucket_frames(entries: &Entries, bits: u8, buckets: impl Iterator<Item = u32>) -> Vec<Frame> {
    let lowest = ResourceKey::cluster("", "");
    let mut frames: Vec<Frame> = Vec::new();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    let mut batch: Vec<&KVPair> = Vec::new();
    let mut size = 0usize;
    for b in buckets {
        let (lo, hi) = hash_range(b, bits);
        for ((_, _), e) in entries
            .range((lo, lowest.clone())..)
            .take_while(|((h, _), _)| *h <= hi)
        {
            size += e.kvp.value.json_text().map_or(64, str::len) + 64;
            batch.push(&e.kvp);
        }
        match ranges.last_mut() {
            Some(r) if r.1 == b => r.1 = b + 1,
            _ => ranges.push((b, b + 1)),
        }
        if size >= BUCKETS_FRAME_BYTES {
            frames.push(buckets_frame(bits, &ranges, batch.drain(..)).into());
            ranges.clear();
            size = 0;
        }
    }
    if !ranges.is_empty() {
        frames.push(buckets_frame(bits, &ranges, batch).into());
    }
    frames
}

/// What changed from `old` to `new`, as a relist hands it on: the keys new or at another
/// revision (or with another value), then deletions of the keys `new` does not hold.
fn diff(old: &Entries, mut new: Entries) -> Vec<Update> {
    let mut out = Vec::new();
    for (k, e) in old {
        match new.remove(k) {
            None => out.push(Update {
                kvp: e.kvp.clone(),
                update_type: UpdateType::Deleted,
            }),
            Some(n) => {
                if n.kvp.revision != e.kvp.revision || n.kvp.value != e.kvp.value {
                    out.push(Update {
                        kvp: n.kvp,
                        update_type: UpdateType::Updated,
                    });
                }
            }
        }
    }
    out.extend(new.into_values().map(|n| Update {
        kvp: n.kvp,
        update_type: UpdateType::New,
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(i: u64, n: u64) -> Vec<Update> {
        (0..n)
            .map(|j| Update {
                kvp: KVPair::new(
                    ResourceKey::cluster("IPPool", format!("p{}", (i * n + j) % 50)),
                    Json::from(serde_json::json!({"i": i})),
                )
                .with_revision(Revision::from(format!("{}", i * n + j + 1))),
                update_type: UpdateType::Updated,
            })
            .collect()
    }

    /// A compressed log frame is decompressed once for every client that does not speak LZ4,
    /// and its plain copy counts against the log's bound while the frame is in the log.
    #[test]
    fn a_plain_copy_is_made_once_and_counted_by_the_log() {
        let big = |i: u64| -> Vec<Update> {
            (0..200u64)
                .map(|j| Update {
                    kvp: KVPair::new(
                        ResourceKey::cluster("IPPool", format!("big-{j}")),
                        Json::from(serde_json::json!({"i": i, "pad": "x".repeat(100)})),
                    )
                    .with_revision(Revision::from(format!("{}", i * 1000 + j + 1))),
                    update_type: UpdateType::Updated,
                })
                .collect()
        };
        let counted =
            |hub: &Hub| -> usize { hub.lock().log.iter().map(|i| i.frame.counted_len()).sum() };
        // A hub with a log of `bound` bytes holding a compressed frame and a small one after it.
        let with_bound = |bound: usize| -> (Hub, u64, Frame) {
            let hub = Hub::new(
                7,
                bound,
                Duration::from_secs(300),
                ServerMetrics::default(),
                1,
            );
            hub.set_status(SyncStatus::InSync);
            hub.apply(big(1));
            hub.apply(batch(2, 1));
            let (frames, _) = hub.after(0, usize::MAX).expect("in the log");
            let (position, f) = frames
                .into_iter()
                .find(|(_, f)| is_compressed(f))
                .expect("a compressed frame");
            (hub, position, f)
        };
        let (hub, position, f) = with_bound(64 << 10);
        let before = hub.log_bytes();
        let mut made = 0;
        let first = f
            .plain(|f| {
                made += 1;
                hub.count_plain(position, f);
            })
            .expect("decompresses")
            .as_ptr();
        let plain_len = f.plain(|_| made += 1).expect("kept").len();
        assert_eq!(made, 1, "made once");
        assert_eq!(
            f.plain(|_| {}).expect("kept").as_ptr(),
            first,
            "the same copy"
        );
        assert!(
            plain_len > 4 * f.len(),
            "{plain_len} bytes from {}",
            f.len()
        );
        assert_eq!(hub.log_bytes(), before + plain_len);
        assert_eq!(hub.log_bytes(), counted(&hub));
        // Counted once, whoever calls again.
        hub.count_plain(position, &f);
        assert_eq!(hub.log_bytes(), before + plain_len);
        // Once the frame leaves the log, its copy leaves the count with it.
        drop(f);
        for i in 3..2000 {
            hub.apply(batch(i, 2));
            if hub.lock().dropped >= position {
                break;
            }
        }
        assert!(hub.lock().dropped >= position, "the big frame was dropped");
        assert_eq!(hub.log_bytes(), counted(&hub));

        // A copy larger than the log's bound makes the log drop its oldest frames.
        let (hub, position, f) = with_bound(8 << 10);
        f.plain(|f| hub.count_plain(position, f))
            .expect("decompresses");
        assert!(hub.lock().dropped >= position);
        assert!(hub.log_bytes() <= 8 << 10);
        assert_eq!(hub.log_bytes(), counted(&hub));
    }

    /// The sketches and the digest kept in step with the state are those built from it anew,
    /// through updates, new keys and deletions.
    #[test]
    fn sketches_and_digest_kept_in_step_equal_fresh_ones() {
        let hub = Hub::new(
            7,
            1 << 20,
            Duration::from_secs(300),
            ServerMetrics::default(),
            1,
        );
        hub.set_status(SyncStatus::InSync);
        for i in 0..30u64 {
            hub.apply(batch(i, 3));
        }
        // A client holding nothing asks with sketches of two sizes: both are kept from then on.
        for cells in [48, 96] {
            let _ = hub.reconcile(0, &Sketch::new(cells));
        }
        for i in 30..200u64 {
            let mut b = batch(i, 4);
            if i % 3 == 0 {
                b[0].update_type = UpdateType::Deleted;
            }
            hub.apply(b);
        }
        let st = hub.lock();
        assert_eq!(st.sketches.len(), 2);
        for s in &st.sketches {
            assert_eq!(
                *s,
                Sketch::of(s.len(), st.entries.values().map(|e| e.contribution))
            );
        }
        assert_eq!(st.digest, whole_digest(&st.entries));
        assert!(st.digest != 0 && st.entries.len() < 50);
    }

    /// The estimate of what a client at a position missed is never too low and at most about
    /// an eighth too high, for positions long gone from the log; the checkpoints stay few;
    /// and a saved state keeps them.
    #[test]
    fn what_a_client_missed_is_bounded_and_survives_a_restore() {
        let hub = Hub::new(7, 1, Duration::from_secs(300), ServerMetrics::default(), 1);
        hub.set_status(SyncStatus::InSync);
        let mut changes_at = vec![0u64];
        let mut total = 0;
        for i in 0..20_000u64 {
            let n = i % 7 + 1;
            hub.apply(batch(i, n));
            total += n;
            changes_at.push(total);
        }
        let checkpoints = hub.lock().checkpoints.len();
        assert!(checkpoints < 400, "{checkpoints} checkpoints");
        let head = hub.status().1;
        let holds = 1_000_000;
        let check = |hub: &Hub| {
            for p in [2u64, 100, 5_000, 15_000, 19_990, head - 2] {
                // Position p is the status frame (1) plus p - 1 batches.
                let missed = total - changes_at[(p - 1) as usize];
                let got = hub.differ_at_most(p, holds).expect("an estimate") / 2;
                assert!(got >= missed, "at {p}: {got} < {missed}");
                assert!(
                    got <= missed + missed / 8 + 8,
                    "at {p}: {got} for {missed} missed"
                );
            }
            assert_eq!(hub.differ_at_most(head + 1, holds), None);
        };
        check(&hub);
        let saved = hub.save().expect("saved");
        let restored = Hub::new(7, 1, Duration::from_secs(300), ServerMetrics::default(), 1);
        restored.restore(Restored::read(&saved).expect("reads"));
        check(&restored);
    }
}
