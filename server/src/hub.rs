//! The server's state: what the upstream Syncer holds (key, revision, value), the digests of
//! its buckets, and a log of recent frames bounded by bytes and by age, each frame encoded
//! once and shared by every client.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvsync_model::{KVPair, ResourceKey};
use kvsync_syncer::{SyncStatus, Update, UpdateType};

use crate::metrics::ServerMetrics;
use crate::protocol::{
    BUCKETS, Message, bucket_frame, bucket_of, contribution, frame, updates_frame,
};

/// A frame of the log: the same bytes for every client.
pub(crate) type Frame = Arc<[u8]>;

struct LogItem {
    position: u64,
    at: Instant,
    frame: Frame,
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
    entries: HashMap<ResourceKey, KVPair>,
    digests: Vec<u64>,
    status: SyncStatus,
    log: VecDeque<LogItem>,
    log_bytes: usize,
    /// The position of the last frame logged (0: none yet).
    head: u64,
    /// The position of the last frame dropped from the log (a client at or after it can
    /// resume).
    dropped: u64,
    snapshot: Option<(u64, Arc<Vec<Frame>>)>,
    pub(crate) stats: HubStats,
}

/// What a client is sent to be brought up to date.
pub(crate) enum Catch {
    /// The frames after its position are in the log.
    Resume,
    /// These bucket frames, at this position.
    Buckets {
        position: u64,
        frames: Arc<Vec<Frame>>,
        snapshot: bool,
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
                entries: HashMap::new(),
                digests: vec![0; BUCKETS],
                status: SyncStatus::WaitForDatastore,
                log: VecDeque::new(),
                log_bytes: 0,
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
            at: Instant::now(),
            frame,
        });
        // Bounded by bytes and by age; the newest frame always stays.
        while st.log.len() > 1
            && (st.log_bytes > self.max_log_bytes
                || st
                    .log
                    .front()
                    .is_some_and(|i| i.at.elapsed() > self.max_log_age))
        {
            if let Some(old) = st.log.pop_front() {
                st.log_bytes -= old.frame.len();
                st.dropped = old.position;
            }
        }
        self.metrics
            .log_bytes
            .set(i64::try_from(st.log_bytes).unwrap_or(i64::MAX));
    }

    /// Applies a batch of the upstream Syncer: the state, the digests, one frame in the log.
    pub(crate) fn apply(&self, batch: Vec<Update>) {
        let mut st = self.lock();
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
        for u in batch {
            let b = usize::from(bucket_of(&u.kvp.key));
            let rev = u
                .kvp
                .revision
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            if let Some(old) = st.entries.remove(&u.kvp.key) {
                let old_rev = old
                    .revision
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                st.digests[b] ^= contribution(&old.key, &old_rev);
            }
            if u.update_type != UpdateType::Deleted {
                st.digests[b] ^= contribution(&u.kvp.key, &rev);
                st.entries.insert(u.kvp.key.clone(), u.kvp);
            }
        }
        self.push(&mut st, frame);
        drop(st);
        self.head.send_replace(position);
    }

    /// Logs a status change of the upstream Syncer.
    pub(crate) fn set_status(&self, status: SyncStatus) {
        let mut st = self.lock();
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
    /// `digests` up to date.
    pub(crate) fn catch_up(&self, resume: Option<u64>, digests: Option<&[u64]>) -> Catch {
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
        match digests.filter(|d| d.len() == BUCKETS) {
            Some(d) => {
                st.stats.resyncs += 1;
                self.metrics.catch_up("resync");
                let differ: Vec<u16> = (0..BUCKETS)
                    .filter(|&b| d[b] != st.digests[b])
                    .map(|b| b as u16)
                    .collect();
                let frames = Arc::new(Self::bucket_frames(&st, &differ));
                Catch::Buckets {
                    position,
                    frames,
                    snapshot: false,
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
                        let all: Vec<u16> = (0..BUCKETS as u16).collect();
                        let f = Arc::new(Self::bucket_frames(&st, &all));
                        st.snapshot = Some((position, f.clone()));
                        f
                    }
                };
                Catch::Buckets {
                    position,
                    frames,
                    snapshot: true,
                }
            }
        }
    }

    fn bucket_frames(st: &State, buckets: &[u16]) -> Vec<Frame> {
        let mut by_bucket: HashMap<u16, Vec<&KVPair>> = HashMap::new();
        if buckets.len() == BUCKETS {
            for kvp in st.entries.values() {
                by_bucket.entry(bucket_of(&kvp.key)).or_default().push(kvp);
            }
        } else {
            let wanted: std::collections::HashSet<u16> = buckets.iter().copied().collect();
            for kvp in st.entries.values() {
                let b = bucket_of(&kvp.key);
                if wanted.contains(&b) {
                    by_bucket.entry(b).or_default().push(kvp);
                }
            }
        }
        buckets
            .iter()
            .map(|b| {
                let entries = by_bucket.remove(b).unwrap_or_default();
                bucket_frame(*b, entries).into()
            })
            .collect()
    }

    /// The frames after `position`, up to `max`; `None` when the log no longer holds the
    /// frame right after it (the client fell behind).
    pub(crate) fn after(&self, position: u64, max: usize) -> Option<Vec<(u64, Frame)>> {
        let st = self.lock();
        if position < st.dropped {
            return None;
        }
        let first = st.log.front().map_or(st.head + 1, |i| i.position);
        let skip = (position + 1).saturating_sub(first) as usize;
        Some(
            st.log
                .iter()
                .skip(skip)
                .take(max)
                .map(|i| (i.position, i.frame.clone()))
                .collect(),
        )
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
}
