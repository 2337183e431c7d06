//! The store itself: current records, the revision log, expiries.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kvsync_model::Revision;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::kernel::counter_revision;

#[derive(Clone)]
pub(super) struct Record {
    pub(super) value: Arc<[u8]>,
    pub(super) create_rev: u64,
    pub(super) mod_rev: u64,
    pub(super) uid: Arc<str>,
    pub(super) ttl: Option<Duration>,
    pub(super) expires_at: Option<Instant>,
    /// The lease the key lives under.
    pub(super) lease: Option<i64>,
}

/// A lease: when it runs out, its keys are deleted.
pub(super) struct MemLease {
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
    pub(super) keys: BTreeSet<Arc<str>>,
}

pub(super) struct LogEntry {
    pub(super) rev: u64,
    pub(super) path: Arc<str>,
    pub(super) new: Option<Record>,
    pub(super) prev: Option<Record>,
}

#[derive(Default)]
pub(super) struct Store {
    pub(super) rev: u64,
    pub(super) compacted: u64,
    pub(super) current: BTreeMap<Arc<str>, Record>,
    pub(super) log: VecDeque<LogEntry>,
    pub(super) expiries: BTreeSet<(Instant, Arc<str>)>,
    pub(super) leases: BTreeMap<i64, MemLease>,
    pub(super) next_lease: i64,
}

impl Store {
    /// Records a write (or a delete when `new` is `None`) at the next revision.
    pub(super) fn commit(
        &mut self,
        path: Arc<str>,
        new: Option<Record>,
        history_limit: usize,
    ) -> u64 {
        self.rev += 1;
        let rev = self.rev;
        let new = new.map(|mut r| {
            r.mod_rev = rev;
            if r.create_rev == 0 {
                r.create_rev = rev;
            }
            r
        });
        let prev = match &new {
            Some(r) => self.current.insert(path.clone(), r.clone()),
            None => self.current.remove(&path),
        };
        if let Some(t) = prev.as_ref().and_then(|p| p.expires_at) {
            self.expiries.remove(&(t, path.clone()));
        }
        if let Some(t) = new.as_ref().and_then(|r| r.expires_at) {
            self.expiries.insert((t, path.clone()));
        }
        if let Some(l) = prev.as_ref().and_then(|p| p.lease) {
            if let Some(lease) = self.leases.get_mut(&l) {
                lease.keys.remove(&path);
            }
        }
        if let Some(l) = new.as_ref().and_then(|r| r.lease) {
            if let Some(lease) = self.leases.get_mut(&l) {
                lease.keys.insert(path.clone());
            }
        }
        self.log.push_back(LogEntry {
            rev,
            path,
            new,
            prev,
        });
        while self.log.len() > history_limit.max(1) {
            if let Some(e) = self.log.pop_front() {
                self.compacted = self.compacted.max(e.rev + 1);
            }
        }
        rev
    }

    /// Deletes every key whose TTL ran out by `now`, and the keys of every lease that ran out,
    /// each at its own revision.
    pub(super) fn expire_due(&mut self, now: Instant, history_limit: usize) -> bool {
        let mut any = false;
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            any |= self.revoke_lease(id, history_limit);
        }
        while let Some((t, path)) = self.expiries.first().cloned() {
            if t > now {
                break;
            }
            self.expiries.pop_first();
            self.commit(path, None, history_limit);
            any = true;
        }
        any
    }

    /// Removes a lease and deletes its keys; whether there were any.
    pub(super) fn revoke_lease(&mut self, id: i64, history_limit: usize) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        for path in &lease.keys {
            self.commit(path.clone(), None, history_limit);
        }
        !lease.keys.is_empty()
    }

    /// The earliest moment a TTL or a lease runs out.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let ttl = self.expiries.first().map(|(t, _)| *t);
        let lease = self.leases.values().map(|l| l.deadline).min();
        match (ttl, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn check_revision(&self, requested: u64) -> Result<()> {
        if requested < self.compacted {
            return Err(Error::Compacted {
                requested: requested.into(),
                compacted: Some(self.compacted.into()),
            });
        }
        if requested > self.rev {
            return Err(Error::invalid(
                "revision",
                format!(
                    "{requested} is newer than the store's revision {}",
                    self.rev
                ),
            ));
        }
        Ok(())
    }

    /// The log entries after revision `after`, oldest first.
    pub(super) fn log_after(&self, after: u64) -> impl Iterator<Item = &LogEntry> {
        let skip = match self.log.front() {
            Some(front) => {
                usize::try_from((after + 1).saturating_sub(front.rev)).unwrap_or(usize::MAX)
            }
            None => 0,
        };
        self.log.iter().skip(skip)
    }

    /// The record of `path` as of revision `at`.
    pub(super) fn record_at(&self, path: &str, at: u64) -> Option<Record> {
        let mut rec = self.current.get(path).cloned();
        for e in self.log_after(at).collect::<Vec<_>>().into_iter().rev() {
            if &*e.path == path {
                rec = e.prev.clone();
            }
        }
        rec
    }
}

pub(super) fn parse_rev(r: &Revision) -> Result<u64> {
    counter_revision(r, "memory")
}
