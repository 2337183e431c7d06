//! Fenced locks: first come, first served, each holder with a fence token, writes that land
//! only while the lock is held.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvsync_model::coordination::Lock;
use kvsync_model::{KVPair, ListOptions, Resource, ResourceKey, Revision};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId};
use crate::lock_record::RecordHold;
use crate::txn::{Compare, Txn, TxnOp, TxnResponse, TxnResult};
use crate::watch::WatchEvent;

/// How to take a lock: see [`lock`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LockOptions {
    /// The TTL of the lease behind the claim (15 s by default, as client-go's lease
    /// duration): a holder that stops renewing loses the lock this long after its last
    /// keep-alive was sent.
    pub ttl: Duration,
    /// How long to wait for the lock; `None` waits until it comes (or the future is dropped).
    pub timeout: Option<Duration>,
    /// Who claims it, stored in the claim for people reading the datastore.
    pub holder: String,
    /// Where locks are records (Kubernetes Leases): how often the record is read while
    /// waiting and renewed once held (`None`: every 2/15 of the TTL, client-go's retry
    /// period of 2 s for its 15 s lease). Where locks are built from leases, the lease is
    /// kept alive every third of its TTL and this is not used.
    pub renew_every: Option<Duration>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(15),
            timeout: None,
            holder: format!("pid-{}", std::process::id()),
            renew_every: None,
        }
    }
}

impl LockOptions {
    /// The defaults: a 15 s lease, no timeout, the process id as the holder.
    pub fn new() -> Self {
        LockOptions::default()
    }

    /// Sets [`LockOptions::ttl`].
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets [`LockOptions::timeout`].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets [`LockOptions::holder`].
    #[must_use]
    pub fn with_holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self
    }

    /// Sets [`LockOptions::renew_every`].
    #[must_use]
    pub fn with_renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    fn record_period(&self) -> Duration {
        self.renew_every
            .unwrap_or_else(|| self.ttl.mul_f64(2.0 / 15.0))
            .max(Duration::from_millis(10))
    }
}

/// Takes the lock `name`, waiting for its turn: claims are served in the order they were
/// made (their create revisions), as etcd's mutex serves them. Every call grants a lease of
/// its own for its claim, so two tasks never share one and both believe they hold the lock,
/// and no claim outlives a holder that stopped renewing it.
///
/// The returned guard's [`fence`](LockGuard::fence) is higher than every earlier holder's,
/// and its writes ([`LockGuard::put`], [`LockGuard::txn`]) are applied only if the lock is
/// still held at the moment of the write, in the same transaction: a holder that paused
/// past its lease gets [`Error::NotHeld`], never a write over its successor's.
///
/// Dropping the future while it waits withdraws the claim (its lease is revoked).
///
/// Needs [`Capabilities::leases`](crate::Capabilities::leases) and transactions (memory,
/// SQLite, etcd), and the registry to hold [`Lock`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use kvsync_backend::{Client, LockOptions, MemoryBackend, lock};
/// use kvsync_model::coordination::Lock;
/// use kvsync_model::{KVPair, KindInfo, Registry, ResourceKey};
///
/// let registry = Registry::new()
///     .with::<Lock>()
///     .with_kind(KindInfo::untyped("example.com", "Counter", "counters", false));
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(registry));
/// let guard = lock(client.clone(), "counter", &LockOptions::new()).await?;
/// let key = ResourceKey::cluster("Counter", "hits");
/// guard.put(KVPair::new(key, serde_json::json!({"n": 1}))).await?; // only while held
/// let fence = guard.fence().clone();
/// guard.release().await?;
///
/// let next = lock(client, "counter", &LockOptions::new()).await?;
/// assert!(next.fence().as_u64() > fence.as_u64());
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Unsupported`] without leases or transactions; [`Error::Invalid`] for a name that
/// is not a DNS-1123 label or a registry without [`Lock`]; [`Error::Timeout`] when the
/// timeout passes first; [`Error::LeaseLost`] when the claim's lease is lost while waiting.
pub async fn lock(client: Arc<dyn Client>, name: &str, opts: &LockOptions) -> Result<LockGuard> {
    let caps = client.capabilities();
    if client.lock_records().is_some() {
        kvsync_model::validation::validate_subdomain("lock", name)?;
        check_ttl(opts)?;
        let take = crate::lock_record::acquire(
            client.clone(),
            name,
            &opts.holder,
            opts.ttl,
            opts.record_period(),
        );
        let hold = with_timeout(name, opts.timeout, take).await?;
        return Ok(LockGuard {
            name: name.to_owned(),
            fence: Revision::from(hold.fence()),
            claim: Claim::Record(hold),
            client,
        });
    }
    if !caps.leases || !caps.transactions {
        return Err(Error::Unsupported {
            op: "lock".into(),
            backend: client.backend_name(),
        });
    }
    if client.codec().registry().kind(Lock::KIND).is_err() {
        return Err(Error::invalid(
            "kind",
            "locks are stored as kvsync_model::coordination::Lock: add it to the registry \
             (Registry::new().with::<Lock>())",
        ));
    }
    let lease = Lease::grant(client.clone(), opts.ttl).await?;
    let key = ResourceKey::namespaced(Lock::KIND, name, format!("claim-{}", lease.id()));
    let value = serde_json::to_value(Lock {
        holder: opts.holder.clone(),
    })
    .map_err(|e| Error::invalid("holder", e.to_string()))?;
    let claim = lease.put(KVPair::new(key.clone(), value)).await?;
    let fence = claim
        .create_revision
        .ok_or_else(|| Error::unavailable("a lock claim came back without a revision"))?;
    // The lease is dropped on a timeout, which withdraws the claim.
    with_timeout(
        name,
        opts.timeout,
        wait_for_turn(&*client, name, &key, &lease),
    )
    .await?;
    Ok(LockGuard {
        name: name.to_owned(),
        fence,
        claim: Claim::Lease { key, lease },
        client,
    })
}

fn check_ttl(opts: &LockOptions) -> Result<()> {
    if opts.ttl < Duration::from_secs(1) {
        return Err(Error::invalid(
            "ttl",
            format!("a lock's TTL must be at least a second, not {:?}", opts.ttl),
        ));
    }
    Ok(())
}

async fn with_timeout<T>(
    name: &str,
    timeout: Option<Duration>,
    wait: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match timeout {
        None => wait.await,
        Some(t) => tokio::time::timeout(t, wait)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("lock {name:?} not acquired within {t:?}"),
            })?,
    }
}

fn rev_order(r: Option<&Revision>) -> (u64, String) {
    match r {
        Some(r) => (r.as_u64().unwrap_or(u64::MAX), r.to_string()),
        None => (u64::MAX, String::new()),
    }
}

/// Waits until the claim `mine` is the oldest of the lock's claims.
async fn wait_for_turn(
    client: &dyn Client,
    name: &str,
    mine: &ResourceKey,
    lease: &Lease,
) -> Result<()> {
    let opts = ListOptions::new(Lock::KIND).with_namespace(name);
    loop {
        let list = client.list(&opts).await?;
        let mut claims: Vec<&KVPair> = list.items.iter().collect();
        claims.sort_by_key(|k| rev_order(k.create_revision.as_ref()));
        let Some(pos) = claims.iter().position(|k| &k.key == mine) else {
            return Err(Error::LeaseLost { lease: lease.id() });
        };
        if pos == 0 {
            return Ok(());
        }
        // Wait for the claim just before ours to go (as etcd's mutex waits on its
        // predecessor), then look again.
        let before = claims[pos - 1].key.clone();
        let mut watch = client
            .watch(&opts.clone().with_revision(list.revision))
            .await?;
        loop {
            tokio::select! {
                ev = watch.next() => match ev {
                    Some(Ok(WatchEvent::Deleted { key, .. })) if key == before || &key == mine => break,
                    Some(Ok(_)) => {}
                    // A broken watch: look again.
                    Some(Err(_)) | None => break,
                },
                () = lease.lost() => return Err(Error::LeaseLost { lease: lease.id() }),
            }
        }
    }
}

/// A held lock: see [`lock`]. Dropping it releases the lock (in the background).
pub struct LockGuard {
    name: String,
    fence: Revision,
    claim: Claim,
    client: Arc<dyn Client>,
}

/// How the lock is held.
enum Claim {
    /// A claim key under a lease of its own (memory, SQLite, etcd).
    Lease { key: ResourceKey, lease: Lease },
    /// The lock's record (Kubernetes Leases).
    Record(Arc<RecordHold>),
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LockGuard");
        d.field("name", &self.name).field("fence", &self.fence);
        match &self.claim {
            Claim::Lease { lease, .. } => d.field("lease", lease),
            Claim::Record(hold) => d.field("record", hold),
        };
        d.finish_non_exhaustive()
    }
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fence token: higher than that of every earlier holder of this lock.
    pub fn fence(&self) -> &Revision {
        &self.fence
    }

    /// The lease behind the claim (`None` where the lock is a record, as on Kubernetes).
    pub fn lease_id(&self) -> Option<LeaseId> {
        match &self.claim {
            Claim::Lease { lease, .. } => Some(lease.id()),
            Claim::Record(_) => None,
        }
    }

    /// Whether the lock may have been lost (its lease may have expired).
    pub fn is_lost(&self) -> bool {
        match &self.claim {
            Claim::Lease { lease, .. } => lease.is_lost(),
            Claim::Record(hold) => hold.is_lost(),
        }
    }

    /// Resolves when the lock may have been lost: stop the work it guards.
    pub async fn lost(&self) {
        match &self.claim {
            Claim::Lease { lease, .. } => lease.lost().await,
            Claim::Record(hold) => hold.lost().await,
        }
    }

    /// `txn` with a compare that the lock is still held by this guard added: it runs its
    /// `then` branch only while the lock is held. (Where the lock is a record, as on
    /// Kubernetes, there are no transactions: [`LockGuard::txn`] says so.)
    pub fn guard(&self, txn: Txn) -> Txn {
        match &self.claim {
            Claim::Lease { key, .. } => {
                txn.when([Compare::Revision(key.clone(), self.fence.clone())])
            }
            Claim::Record(_) => txn,
        }
    }

    /// Runs `txn` only while the lock is held.
    ///
    /// # Errors
    /// [`Error::NotHeld`] when the lock is no longer held by this guard (nothing is written)
    /// or another compare of `txn` failed; [`Error::Unsupported`] where the datastore has no
    /// transactions (Kubernetes: use [`LockGuard::put`]); as [`Client::txn`].
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let Claim::Lease { key, .. } = &self.claim else {
            return Err(Error::Unsupported {
                op: "txn".into(),
                backend: self.client.backend_name(),
            });
        };
        let resp = self.client.txn(self.guard(txn)).await?;
        if resp.succeeded {
            return Ok(resp);
        }
        let held = self
            .client
            .get_opt(key, &Default::default())
            .await?
            .is_some_and(|k| k.revision.as_ref() == Some(&self.fence));
        if held {
            Ok(resp)
        } else {
            Err(Error::NotHeld {
                lock: self.name.clone(),
            })
        }
    }

    /// Writes `kvp` (creating or replacing it) only while the lock is held.
    ///
    /// Where locks are built from leases (memory, SQLite, etcd) the write is one transaction
    /// with a compare of the claim. Where the lock is a record (Kubernetes), the write carries
    /// the fence, stored on the object (annotations `kvsync.dev/fence` and
    /// `kvsync.dev/fence-lock`), and is refused when the object already carries a higher fence
    /// of the same lock; the check and the write are one update under the object's
    /// resourceVersion. A holder that paused past its lease is refused before it sends
    /// anything, and once its successor has written an object, never writes it again.
    ///
    /// # Errors
    /// [`Error::NotHeld`] when the lock is no longer held (nothing is written); as
    /// [`Client::txn`] or [`Client::apply`].
    pub async fn put(&self, kvp: KVPair) -> Result<KVPair> {
        if let Claim::Record(hold) = &self.claim {
            return hold.put(kvp).await;
        }
        let resp = self.txn(Txn::new().and_then([TxnOp::Put(kvp)])).await?;
        match resp.results.into_iter().next() {
            Some(TxnResult::Put(kvp)) if resp.succeeded => Ok(kvp),
            _ => Err(Error::NotHeld {
                lock: self.name.clone(),
            }),
        }
    }

    /// Until when the lock surely holds: the TTL after its last renewal was sent.
    pub fn safe_until(&self) -> tokio::time::Instant {
        match &self.claim {
            Claim::Lease { lease, .. } => lease.safe_until(),
            Claim::Record(hold) => hold.safe_until(),
        }
    }

    /// Releases the lock through a shared reference (the guard is left lost).
    pub(crate) async fn release_shared(&self) -> Result<()> {
        match &self.claim {
            Claim::Lease { lease, .. } => lease.revoke_shared().await,
            Claim::Record(hold) => hold.release().await,
        }
    }

    /// Releases the lock now.
    ///
    /// # Errors
    /// Transport errors (the lock is then released when its lease expires).
    pub async fn release(self) -> Result<()> {
        self.release_shared().await
    }
}

impl Drop for LockGuard {
    /// A lease is revoked when it is dropped; a record is released in the background (where
    /// a tokio runtime runs; else it expires after its lease duration).
    fn drop(&mut self) {
        if let Claim::Record(hold) = &self.claim
            && !hold.is_lost()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let hold = hold.clone();
            rt.spawn(async move {
                let _ = hold.release().await;
            });
        }
    }
}
