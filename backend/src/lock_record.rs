//! Locks kept in one record per lock that candidates take over once it expires, as
//! client-go's `resourcelock.LeaseLock` does: how [`lock`](crate::lock) and
//! [`Election`](crate::Election) work on a datastore without leases (Kubernetes, whose
//! records are coordination.k8s.io/v1 Lease objects).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kvsync_model::{KVPair, Revision};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};

/// The state of one lock as its record holds it: the fields of a coordination.k8s.io/v1
/// `LeaseSpec`, and the record's revision for optimistic concurrency.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockRecord {
    /// Who holds it (`None`, or empty, once released).
    pub holder: Option<String>,
    /// How long the holder's claim lasts after its last renewal, as others observe it.
    pub lease_duration: Duration,
    /// When the holder acquired it.
    pub acquired: Option<SystemTime>,
    /// When the holder last renewed it.
    pub renewed: Option<SystemTime>,
    /// How many times it was acquired (client-go's `leaseTransitions`): the fence of the
    /// current holder.
    pub transitions: u64,
    /// The record's revision; `None` for a record not yet written.
    pub revision: Option<Revision>,
}

impl LockRecord {
    /// A record held by `holder` for `lease_duration`, acquired and renewed now, with the
    /// given number of transitions, not yet written.
    pub fn held(holder: impl Into<String>, lease_duration: Duration, transitions: u64) -> Self {
        let now = SystemTime::now();
        LockRecord {
            holder: Some(holder.into()),
            lease_duration,
            acquired: Some(now),
            renewed: Some(now),
            transitions,
            revision: None,
        }
    }

    /// Whether someone holds it (by the record; it may have expired).
    pub fn is_held(&self) -> bool {
        self.holder.as_deref().is_some_and(|h| !h.is_empty())
    }
}

/// The fence a guarded write carries: the lock's name and its holder's token.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fence {
    /// The lock's name.
    pub lock: String,
    /// The holder's token ([`LockRecord::transitions`] when it acquired the lock).
    pub token: u64,
}

impl Fence {
    /// The fence `token` of the lock `lock`.
    pub fn new(lock: impl Into<String>, token: u64) -> Self {
        Fence {
            lock: lock.into(),
            token,
        }
    }
}

/// A datastore's lock records: what [`Client::lock_records`] returns where locks are kept in
/// records rather than built from leases and transactions.
#[async_trait]
pub trait LockRecords: Send + Sync {
    /// Reads the record of the lock `name` (`None` when there is none yet).
    ///
    /// # Errors
    /// Transport errors.
    async fn read_lock_record(&self, name: &str) -> Result<Option<LockRecord>>;

    /// Writes the record of the lock `name`: creates it when `record.revision` is `None`
    /// ([`Error::AlreadyExists`] when it exists), else replaces it only if it is still at that
    /// revision ([`Error::Conflict`]). Returns the record written, with its new revision.
    ///
    /// # Errors
    /// As above; transport errors.
    async fn write_lock_record(&self, name: &str, record: &LockRecord) -> Result<LockRecord>;

    /// Creates or replaces `kvp`, storing `fence` on it, unless it already carries a higher
    /// fence of the same lock: then [`Error::NotHeld`] and nothing is written. The check and
    /// the write are one: the write is made under the revision the fence was read at.
    ///
    /// # Errors
    /// [`Error::NotHeld`]; as [`Client::apply`].
    async fn fenced_write(&self, kvp: KVPair, fence: &Fence) -> Result<KVPair>;
}

/// How a record lock is held: shared by its guard and its renewal task.
pub(crate) struct RecordHold {
    name: String,
    ttl: Duration,
    fence: u64,
    client: Arc<dyn Client>,
    record: Mutex<LockRecord>,
    safe_until: Mutex<Instant>,
    lost: tokio::sync::watch::Sender<bool>,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for RecordHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordHold")
            .field("name", &self.name)
            .field("fence", &self.fence)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

fn unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn records(client: &dyn Client) -> Result<&dyn LockRecords> {
    client.lock_records().ok_or_else(|| Error::Unsupported {
        op: "lock records".into(),
        backend: client.backend_name(),
    })
}

/// Errors that waiting again cannot cure.
fn is_final(e: &Error) -> bool {
    matches!(
        e,
        Error::Invalid { .. } | Error::Unsupported { .. } | Error::Unauthorized { .. }
    )
}

/// Takes the record lock `name` for `holder`: waits until its record is free (released, or
/// not renewed for its lease duration as observed here, as client-go judges it) and takes it
/// over under the revision read, with one more transition. `every` is how often the record
/// is read while waiting, and renewed once held.
pub(crate) async fn acquire(
    client: Arc<dyn Client>,
    name: &str,
    holder: &str,
    ttl: Duration,
    every: Duration,
) -> Result<Arc<RecordHold>> {
    // When the record was first seen at its current revision: a holder that has not renewed
    // for its lease duration since then has lost it (client-go's observedTime).
    let mut observed: Option<(Option<Revision>, Instant)> = None;
    loop {
        let current = match records(&*client)?.read_lock_record(name).await {
            Ok(r) => r,
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(lock = name, error = %e, "reading the lock record failed; retrying");
                tokio::time::sleep(every).await;
                continue;
            }
        };
        let now = Instant::now();
        let next = match &current {
            None => LockRecord::held(holder, ttl, 0),
            Some(r) => {
                if observed.as_ref().is_none_or(|(rev, _)| rev != &r.revision) {
                    observed = Some((r.revision.clone(), now));
                }
                let since = observed.as_ref().map_or(now, |(_, at)| *at);
                if r.is_held() && now < since + r.lease_duration {
                    // Up to 20% later, as client-go's JitterUntil spreads its candidates.
                    tokio::time::sleep(every.mul_f64(1.0 + crate::kernel::rand_fraction() * 0.2))
                        .await;
                    continue;
                }
                let mut next = LockRecord::held(holder, ttl, r.transitions + 1);
                next.revision = r.revision.clone();
                next
            }
        };
        let sent = Instant::now();
        match records(&*client)?.write_lock_record(name, &next).await {
            Ok(written) => {
                let hold = Arc::new(RecordHold {
                    name: name.to_owned(),
                    ttl,
                    fence: written.transitions,
                    client: client.clone(),
                    record: Mutex::new(written),
                    safe_until: Mutex::new(sent + ttl),
                    lost: tokio::sync::watch::Sender::new(false),
                    renewer: Mutex::new(None),
                });
                let task = tokio::spawn(renew(Arc::downgrade(&hold), every));
                *unpoisoned(&hold.renewer) = Some(task);
                return Ok(hold);
            }
            // Another candidate came first: look again.
            Err(Error::Conflict { .. } | Error::AlreadyExists { .. }) => {}
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(lock = name, error = %e, "taking the lock record failed; retrying");
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// Renews the record every `every` while its hold lives; marks it lost when another took it
/// or no renewal was sent successfully within the lease duration.
async fn renew(hold: std::sync::Weak<RecordHold>, every: Duration) {
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        let Some(h) = hold.upgrade() else { return };
        if h.is_lost() {
            h.lost.send_replace(true);
            return;
        }
        let mut rec = unpoisoned(&h.record).clone();
        rec.renewed = Some(SystemTime::now());
        let sent = Instant::now();
        let answer = match records(&*h.client) {
            Ok(r) => {
                tokio::select! {
                    a = r.write_lock_record(&h.name, &rec) => a,
                    () = tokio::time::sleep_until(h.safe_until()) => {
                        h.lost.send_replace(true);
                        return;
                    }
                }
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(written) => {
                *unpoisoned(&h.record) = written;
                *unpoisoned(&h.safe_until) = sent + h.ttl;
                next = sent + every;
            }
            Err(Error::Conflict { .. } | Error::NotFound { .. }) => {
                // Someone else wrote the record: it is theirs now.
                h.lost.send_replace(true);
                return;
            }
            Err(e) => {
                tracing::debug!(lock = %h.name, error = %e, "renewing the lock record failed; retrying");
                if Instant::now() >= h.safe_until() {
                    h.lost.send_replace(true);
                    return;
                }
                next = Instant::now() + (every / 4).max(Duration::from_millis(50));
            }
        }
    }
}

impl RecordHold {
    pub(crate) fn fence(&self) -> u64 {
        self.fence
    }

    pub(crate) fn safe_until(&self) -> Instant {
        *unpoisoned(&self.safe_until)
    }

    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow() || Instant::now() >= self.safe_until()
    }

    pub(crate) async fn lost(&self) {
        let mut rx = self.lost.subscribe();
        loop {
            if self.is_lost() {
                return;
            }
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep_until(self.safe_until()) => {}
            }
        }
    }

    /// Writes `kvp` carrying this holder's fence, only while the lock surely holds.
    pub(crate) async fn put(&self, kvp: KVPair) -> Result<KVPair> {
        if self.is_lost() {
            return Err(Error::NotHeld {
                lock: self.name.clone(),
            });
        }
        records(&*self.client)?
            .fenced_write(kvp, &Fence::new(self.name.clone(), self.fence))
            .await
    }

    /// Releases the lock as client-go does: no holder, a lease of one second, under the
    /// revision last written (a record someone else took over is left alone).
    pub(crate) async fn release(&self) -> Result<()> {
        if let Some(t) = unpoisoned(&self.renewer).take() {
            t.abort();
        }
        let was_lost = self.is_lost();
        self.lost.send_replace(true);
        if was_lost {
            return Ok(());
        }
        let mut rec = unpoisoned(&self.record).clone();
        rec.holder = None;
        rec.lease_duration = Duration::from_secs(1);
        let now = SystemTime::now();
        rec.acquired = Some(now);
        rec.renewed = Some(now);
        match records(&*self.client)?
            .write_lock_record(&self.name, &rec)
            .await
        {
            Ok(_) | Err(Error::Conflict { .. } | Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for RecordHold {
    fn drop(&mut self) {
        if let Some(t) = unpoisoned(&self.renewer).take() {
            t.abort();
        }
    }
}

/// The holder of the lock `name` by its record, as others see it now: `None` when released or
/// never taken.
pub(crate) async fn holder(client: &dyn Client, name: &str) -> Result<Option<String>> {
    Ok(records(client)?
        .read_lock_record(name)
        .await?
        .filter(LockRecord::is_held)
        .and_then(|r| r.holder))
}
