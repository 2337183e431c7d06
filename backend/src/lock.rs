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
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(15),
            timeout: None,
            holder: format!("pid-{}", std::process::id()),
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
    let wait = wait_for_turn(&*client, name, &key, &lease);
    match opts.timeout {
        None => wait.await?,
        Some(t) => match tokio::time::timeout(t, wait).await {
            Ok(r) => r?,
            // The lease is dropped on return, which withdraws the claim.
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("lock {name:?} not acquired within {t:?}"),
                });
            }
        },
    }
    Ok(LockGuard {
        name: name.to_owned(),
        key,
        fence,
        lease,
        client,
    })
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
    key: ResourceKey,
    fence: Revision,
    lease: Lease,
    client: Arc<dyn Client>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("fence", &self.fence)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
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

    /// The lease behind the claim.
    pub fn lease_id(&self) -> LeaseId {
        self.lease.id()
    }

    /// Whether the lock may have been lost (its lease may have expired).
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// Resolves when the lock may have been lost: stop the work it guards.
    pub async fn lost(&self) {
        self.lease.lost().await;
    }

    /// `txn` with a compare that the lock is still held by this guard added: it runs its
    /// `then` branch only while the lock is held.
    pub fn guard(&self, txn: Txn) -> Txn {
        txn.when([Compare::Revision(self.key.clone(), self.fence.clone())])
    }

    /// Runs `txn` only while the lock is held.
    ///
    /// # Errors
    /// [`Error::NotHeld`] when the lock is no longer held by this guard (nothing is written)
    /// or another compare of `txn` failed; as [`Client::txn`].
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let resp = self.client.txn(self.guard(txn)).await?;
        if resp.succeeded {
            return Ok(resp);
        }
        let held = self
            .client
            .get_opt(&self.key, &Default::default())
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
    /// # Errors
    /// [`Error::NotHeld`] when the lock is no longer held (nothing is written); as
    /// [`Client::txn`].
    pub async fn put(&self, kvp: KVPair) -> Result<KVPair> {
        let resp = self.txn(Txn::new().and_then([TxnOp::Put(kvp)])).await?;
        match resp.results.into_iter().next() {
            Some(TxnResult::Put(kvp)) if resp.succeeded => Ok(kvp),
            _ => Err(Error::NotHeld {
                lock: self.name.clone(),
            }),
        }
    }

    /// Until when the lock surely holds ([`Lease::safe_until`]).
    pub fn safe_until(&self) -> tokio::time::Instant {
        self.lease.safe_until()
    }

    /// Releases the lock through a shared reference (the guard is left lost).
    pub(crate) async fn release_shared(&self) -> Result<()> {
        self.lease.revoke_shared().await
    }

    /// Releases the lock now.
    ///
    /// # Errors
    /// Transport errors (the lock is then released when its lease expires).
    pub async fn release(self) -> Result<()> {
        self.lease.revoke().await
    }
}
