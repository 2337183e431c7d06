//! Leases: keys that live as long as their owner keeps a lease alive.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvsync_model::KVPair;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::txn::{Txn, TxnOp, TxnResult};

/// A lease's id, as the datastore numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A lease kept alive by a task of its own, as etcd's `concurrency.Session` and Cilium's lease
/// manager keep theirs. Many keys share it ([`Lease::put`]); they are deleted, with a
/// `Deleted` event to every watcher, when it expires or is revoked, and when the `Lease` is
/// dropped (revoked in the background).
///
/// [`safe_until`](Lease::safe_until) is computed from when the last successful keep-alive was
/// *sent* (not when its answer came), so it never overstates how long the datastore keeps the
/// lease; [`lost`](Lease::lost) resolves once that moment passes without a renewal, or when the
/// datastore says the lease is gone. A lost lease stays lost: grant another.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kvsync_backend::{Client, Lease, MemoryBackend};
/// use kvsync_model::{KVPair, KindInfo, Registry, ResourceKey};
///
/// let registry = Registry::new().with_kind(KindInfo::untyped("example.com", "Member", "members", false));
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(registry));
/// let lease = Lease::grant(client.clone(), Duration::from_secs(10)).await?;
/// let key = ResourceKey::cluster("Member", "node-1");
/// lease.put(KVPair::new(key.clone(), serde_json::json!({"addr": "10.0.0.1"}))).await?;
/// assert!(!lease.is_lost());
///
/// lease.revoke().await?; // the member's key goes with it
/// assert!(client.get_opt(&key, &Default::default()).await?.is_none());
/// # Ok(()) }
/// ```
pub struct Lease {
    id: LeaseId,
    ttl: Duration,
    client: Arc<dyn Client>,
    state: Arc<State>,
    keeper: tokio::task::JoinHandle<()>,
    revoked: bool,
}

struct State {
    safe_until: Mutex<Instant>,
    lost: tokio::sync::watch::Sender<bool>,
}

impl State {
    fn safe_until(&self) -> Instant {
        *self
            .safe_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn renewed(&self, until: Instant) {
        *self
            .safe_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Grants a lease of `ttl` and keeps it alive, renewing it every third of its TTL.
    ///
    /// # Errors
    /// [`Error::Unsupported`] where the backend has no leases
    /// ([`Capabilities::leases`](crate::Capabilities::leases)); [`Error::Invalid`] for a TTL
    /// under a second; transport errors.
    pub async fn grant(client: Arc<dyn Client>, ttl: Duration) -> Result<Lease> {
        let sent = Instant::now();
        let id = client.lease_grant(ttl).await?;
        let state = Arc::new(State {
            safe_until: Mutex::new(sent + ttl),
            lost: tokio::sync::watch::Sender::new(false),
        });
        let keeper = tokio::spawn(keep_alive(client.clone(), id, ttl, state.clone()));
        Ok(Lease {
            id,
            ttl,
            client,
            state,
            keeper,
            revoked: false,
        })
    }

    /// The lease's id.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// The TTL it was granted with.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Until when the lease surely holds: the TTL after the last successful keep-alive was
    /// sent (or the grant).
    pub fn safe_until(&self) -> Instant {
        self.state.safe_until()
    }

    /// Whether the lease may have expired.
    pub fn is_lost(&self) -> bool {
        *self.state.lost.borrow() || Instant::now() >= self.state.safe_until()
    }

    /// Resolves when the lease may have expired: its safe time passed without a renewal, or
    /// the datastore said it is gone.
    pub async fn lost(&self) {
        let mut rx = self.state.lost.subscribe();
        loop {
            if self.is_lost() {
                return;
            }
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep_until(self.state.safe_until()) => {}
            }
        }
    }

    /// Writes `kvp` (creating or replacing it) under this lease.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the lease is gone (nothing is written); as [`Client::txn`].
    pub async fn put(&self, kvp: KVPair) -> Result<KVPair> {
        let resp = self
            .client
            .txn(Txn::new().and_then([TxnOp::PutLeased(kvp, self.id)]))
            .await?;
        match resp.results.into_iter().next() {
            Some(TxnResult::Put(kvp)) => Ok(kvp),
            _ => Err(Error::unavailable("a leased put returned no result")),
        }
    }

    /// Revokes the lease now: its keys are deleted.
    ///
    /// # Errors
    /// Transport errors (the lease then expires by itself after its TTL).
    pub async fn revoke(mut self) -> Result<()> {
        self.keeper.abort();
        self.revoked = true;
        self.state.lost.send_replace(true);
        self.client.lease_revoke(self.id).await
    }
}

impl Lease {
    /// Revokes the lease through a shared reference: no more keep-alives, lost from now on.
    pub(crate) async fn revoke_shared(&self) -> Result<()> {
        self.keeper.abort();
        self.state.lost.send_replace(true);
        self.client.lease_revoke(self.id).await
    }
}

impl Drop for Lease {
    /// Stops the keep-alives and revokes the lease in the background (where a tokio runtime
    /// runs; else it expires after its TTL).
    fn drop(&mut self) {
        self.keeper.abort();
        if self.revoked {
            return;
        }
        self.state.lost.send_replace(true);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, id) = (self.client.clone(), self.id);
            rt.spawn(async move {
                let _ = client.lease_revoke(id).await;
            });
        }
    }
}

async fn keep_alive(client: Arc<dyn Client>, id: LeaseId, ttl: Duration, state: Arc<State>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut next = Instant::now() + period;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        let answer = tokio::select! {
            a = client.lease_keep_alive(id) => a,
            () = tokio::time::sleep_until(state.safe_until()) => {
                // No answer before the lease could expire: it may be gone.
                state.lost.send_replace(true);
                return;
            }
        };
        match answer {
            Ok(granted) => {
                state.renewed(sent + granted);
                next = sent + period;
            }
            Err(Error::LeaseLost { .. }) => {
                state.lost.send_replace(true);
                return;
            }
            Err(e) => {
                tracing::debug!(lease = %id, error = %e, "lease keep-alive failed; retrying");
                if Instant::now() >= state.safe_until() {
                    state.lost.send_replace(true);
                    return;
                }
                next = Instant::now() + (period / 4).max(Duration::from_millis(50));
            }
        }
    }
}
