//! Watches: read the revision log after a revision, in chunks, as writes wake them.

use super::MemoryBackend;
use super::store::LogEntry;
use crate::error::{Error, Result};
use crate::kernel::{LogTail, put_event};
use crate::watch::WatchEvent;

/// How many history entries a watch reads per lock.
const WATCH_CHUNK: usize = 512;

/// A watch of the memory store: its log tailed from a revision.
pub(super) type WatchState = LogTail<MemoryBackend, u64, WatchEvent>;

impl WatchState {
    pub(super) async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                return Some((Ok(ev), self));
            }
            self.rx.borrow_and_update();
            if let Err(e) = self.fill() {
                // The stream ends after it (fuse_after_error).
                return Some((Err(e), self));
            }
            if self.buf.is_empty() && self.rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Reads the next chunk of history into the buffer.
    pub(super) fn fill(&mut self) -> Result<()> {
        let store = self.backend.lock();
        if self.after + 1 < store.compacted {
            return Err(Error::Compacted {
                requested: self.after.into(),
                compacted: Some(store.compacted.into()),
            });
        }
        let entries: Vec<&LogEntry> = store.log_after(self.after).take(WATCH_CHUNK).collect();
        let scanned = !entries.is_empty();
        let buffered = self.buf.len();
        for e in entries {
            self.after = e.rev;
            if !e.path.starts_with(self.prefix.as_str()) {
                continue;
            }
            if let Some(ev) = self.event(e) {
                self.buf.push_back(ev);
            }
        }
        // Writes outside the watch moved the revision on: say so, so that a watcher's resume
        // point stays fresh (etcd's progress notifications).
        if scanned && self.buf.len() == buffered {
            self.buf.push_back(WatchEvent::Bookmark(self.after.into()));
        }
        Ok(())
    }

    pub(super) fn event(&self, e: &LogEntry) -> Option<WatchEvent> {
        let old = e
            .prev
            .as_ref()
            .and_then(|p| self.backend.to_kvp(&e.path, p).ok());
        match &e.new {
            Some(rec) => put_event(
                &self.opts,
                self.backend.to_kvp(&e.path, rec),
                e.prev.is_none(),
                old,
            ),
            None => {
                let key = self.backend.inner.codec.from_path(&e.path).ok()?;
                self.opts.matches(&key).then(|| WatchEvent::Deleted {
                    key,
                    revision: e.rev.into(),
                    old,
                })
            }
        }
    }
}
