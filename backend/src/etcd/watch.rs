//! Watches: opened at the followed revision itself, with progress notifications where the
//! server answers them in order.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use kvsync_model::{ListOptions, PathCodec, Revision};

use super::convert::{decode_kv, map_err, rev_i64};
use super::kv::is_connect_error;
use super::{EtcdBackend, MAX_DECODE_BYTES, PROGRESS_INTERVAL, prefix_end};
use crate::error::{Error, Result};
use crate::kernel::fuse_after_error;
use crate::kernel::put_event;
use crate::watch::{WatchEvent, WatchStream};

impl EtcdBackend {
    pub(super) async fn open_watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        let prefix = self.codec.list_prefix(opts)?;
        let from = match &opts.revision {
            Some(r) => rev_i64(r)?,
            None => self.current_revision().await?,
        };
        // Watch from `from` itself, not `from + 1`, and drop what is at `from`: compacting at
        // revision R drops the tombstones at R, yet etcd lets a watch start at R. Starting one
        // earlier makes such a watch fail as compacted instead of missing a deletion.
        let start = from.max(1);
        let mut wc = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_DECODE_BYTES);
        let wopts = WatchOptions::new()
            .with_range(prefix_end(&prefix))
            .with_start_revision(start)
            .with_prev_key()
            .with_progress_notify();
        let attempts = self.endpoints.len() * 2 + 1;
        let mut attempt = 1;
        let mut stream = loop {
            match wc.watch(prefix.as_bytes(), Some(wopts.clone())).await {
                Err(e) if attempt < attempts && is_connect_error(&e) => {
                    tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                    attempt += 1;
                }
                other => break other.map_err(map_err)?,
            }
        };
        // The first response says whether the watch was created or its start is compacted.
        let first = stream
            .message()
            .await
            .map_err(map_err)?
            .ok_or_else(|| Error::unavailable("etcd closed the watch before creating it"))?;
        if first.compact_revision() > 0 {
            return Err(Error::Compacted {
                requested: Revision::from(from.max(0) as u64),
                compacted: Some(Revision::from(first.compact_revision() as u64)),
            });
        }
        if first.canceled() {
            return Err(Error::unavailable(format!(
                "etcd cancelled the watch: {}",
                first.cancel_reason()
            )));
        }
        // Where the server answers progress requests in order, ask at once: the answer comes
        // once the watch has caught up, which tells a resuming Syncer it has seen everything.
        // Older servers still send their periodic per-watch progress notifications, which are
        // in order (`--experimental-watch-progress-notify-interval`, 10 minutes by default).
        let synced_progress = self.synced_progress().await;
        if synced_progress {
            stream.request_progress().await.map_err(map_err)?;
        }
        let state = WatchState::new(
            self.codec.clone(),
            opts.clone(),
            stream,
            first,
            from,
            synced_progress.then_some(PROGRESS_INTERVAL),
        );
        Ok(fuse_after_error(futures::stream::unfold(
            state,
            WatchState::next,
        )))
    }
}

/// A running watch: the etcd stream, events not yet taken, and a progress timer.
struct WatchState {
    codec: PathCodec,
    opts: ListOptions,
    stream: etcd_client::WatchStream,
    buf: VecDeque<Result<WatchEvent>>,
    last: i64,
    /// The revision the watch follows on from: events at or before it are not reported.
    from: i64,
    /// How long to idle before requesting progress; `None` where requested progress cannot be
    /// trusted.
    progress_every: Option<Duration>,
}

impl WatchState {
    fn new(
        codec: PathCodec,
        opts: ListOptions,
        stream: etcd_client::WatchStream,
        first: WatchResponse,
        from: i64,
        progress_every: Option<Duration>,
    ) -> Self {
        let mut s = WatchState {
            codec,
            opts,
            stream,
            buf: VecDeque::new(),
            last: from,
            from,
            progress_every,
        };
        s.absorb(first);
        s
    }

    /// Turns one response into events (or a final error).
    fn absorb(&mut self, resp: WatchResponse) {
        if resp.compact_revision() > 0 {
            self.buf.push_back(Err(Error::Compacted {
                requested: Revision::from(self.last.max(0) as u64),
                compacted: Some(Revision::from(resp.compact_revision() as u64)),
            }));
            return;
        }
        if resp.canceled() {
            self.buf.push_back(Err(Error::unavailable(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            ))));
            return;
        }
        let events = resp.events();
        if events.is_empty() {
            // A progress notification: everything up to the header's revision was sent. An
            // answer to a progress request (watch id -1) counts only where such answers are
            // in order with events.
            let requested = resp.watch_id() == -1;
            if !resp.created()
                && (!requested || self.progress_every.is_some())
                && let Some(rev) = resp.header().map(|h| h.revision())
                && rev > self.last
            {
                self.last = rev;
                self.buf
                    .push_back(Ok(WatchEvent::Bookmark(Revision::from(rev as u64))));
            }
            return;
        }
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            // The watch starts at the revision it was asked to follow, which was seen already.
            if kv.mod_revision() <= self.from {
                continue;
            }
            self.last = self.last.max(kv.mod_revision());
            let converted = match ev.event_type() {
                EventType::Put => put_event(
                    &self.opts,
                    decode_kv(&self.codec, kv),
                    kv.create_revision() == kv.mod_revision(),
                    None,
                ),
                EventType::Delete => {
                    let path = String::from_utf8_lossy(kv.key());
                    match self.codec.from_path(&path) {
                        Ok(key) if self.opts.matches(&key) => Some(WatchEvent::Deleted {
                            key,
                            revision: Revision::from(kv.mod_revision() as u64),
                            old: ev.prev_kv().and_then(|p| decode_kv(&self.codec, p).ok()),
                        }),
                        _ => None,
                    }
                }
            };
            if let Some(c) = converted {
                self.buf.push_back(Ok(c));
            }
        }
    }

    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            // After an error the stream ends (fuse_after_error): nothing more is read.
            if let Some(item) = self.buf.pop_front() {
                return Some((item, self));
            }
            let next = self.stream.message();
            let msg = match self.progress_every {
                None => Ok(next.await),
                Some(every) => tokio::time::timeout(every, next).await,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(_) => {
                    // Idle: ask for a progress notification to keep the resume point fresh.
                    if let Err(e) = self.stream.request_progress().await {
                        return Some((Err(map_err(e)), self));
                    }
                    continue;
                }
            };
            match msg {
                Ok(Some(resp)) => self.absorb(resp),
                Ok(None) => {
                    return Some((
                        Err(Error::unavailable("etcd closed the watch stream")),
                        self,
                    ));
                }
                Err(e) => return Some((Err(map_err(e)), self)),
            }
        }
    }
}
