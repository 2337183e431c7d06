//! Leader election over fenced locks, with client-go's defaults.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use kvsync_model::coordination::Lock;
use kvsync_model::{KVPair, ListOptions, Resource, Revision};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::lock::{LockGuard, LockOptions, lock};
use crate::txn::{Txn, TxnResponse};

/// The timing of an [`Election`], with client-go's leaderelection defaults.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ElectionOptions {
    /// How long a leader's claim lasts without a renewal (15 s).
    pub lease_duration: Duration,
    /// How long a leader goes on after its last successful renewal was sent before it stops
    /// its work (10 s): shorter than the lease, so the work stops before another can lead.
    pub renew_deadline: Duration,
    /// How long to wait before campaigning again after an error (2 s, with up to 20% jitter).
    pub retry_period: Duration,
}

impl Default for ElectionOptions {
    fn default() -> Self {
        ElectionOptions {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl ElectionOptions {
    /// client-go's defaults: lease 15 s, renew deadline 10 s, retry 2 s.
    pub fn new() -> Self {
        ElectionOptions::default()
    }

    /// Sets the three durations.
    ///
    /// # Errors
    /// [`Error::Invalid`] unless retry period < renew deadline < lease duration.
    pub fn with_timing(
        mut self,
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self> {
        if !(retry_period < renew_deadline && renew_deadline < lease_duration) {
            return Err(Error::invalid(
                "election",
                "the retry period must be shorter than the renew deadline, and that shorter \
                 than the lease duration",
            ));
        }
        self.lease_duration = lease_duration;
        self.renew_deadline = renew_deadline;
        self.retry_period = retry_period;
        Ok(self)
    }
}

/// A leader election: candidates campaign for the lock `name`; the oldest claim leads (as in
/// etcd's election, campaigning on a prefix). See [`Election::run`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use std::sync::Arc;
/// use kvsync_backend::{Client, Election, ElectionOptions, MemoryBackend};
/// use kvsync_model::{Registry, coordination::Lock};
///
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(Registry::new().with::<Lock>()));
/// let election = Election::new(client, "controller", "pod-a", ElectionOptions::new());
/// let term = election
///     .run(|leadership| async move {
///         // The leader's work; stop when leadership.cancelled() resolves.
///         Ok::<_, kvsync_backend::Error>(leadership.fence().clone())
///     })
///     .await?;
/// assert!(term.as_u64().is_some());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Election {
    client: Arc<dyn Client>,
    name: String,
    identity: String,
    options: ElectionOptions,
}

/// The leader's side of a term: its fence, for guarded writes, and the signal to stop. Clones
/// share the term: once it ends, every clone's writes are refused.
#[derive(Clone, Debug)]
pub struct Leadership {
    guard: Arc<LockGuard>,
    identity: String,
    stop_at: tokio::sync::watch::Receiver<bool>,
}

impl Leadership {
    /// The term's fence: higher than every earlier term's.
    pub fn fence(&self) -> &Revision {
        self.guard.fence()
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Resolves when the leader must stop: its last renewal was sent longer ago than the
    /// renew deadline, so its claim may soon expire.
    pub async fn cancelled(&self) {
        let mut rx = self.stop_at.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Whether the leader must stop.
    pub fn is_cancelled(&self) -> bool {
        *self.stop_at.borrow()
    }

    /// Runs `txn` only while this term holds ([`LockGuard::txn`]).
    ///
    /// # Errors
    /// [`Error::NotHeld`] after the term ended; as [`Client::txn`].
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.guard.txn(txn).await
    }

    /// Writes `kvp` only while this term holds ([`LockGuard::put`]).
    ///
    /// # Errors
    /// [`Error::NotHeld`] after the term ended; as [`Client::txn`].
    pub async fn put(&self, kvp: KVPair) -> Result<KVPair> {
        self.guard.put(kvp).await
    }
}

impl Election {
    /// An election for `name` (a DNS-1123 label) in which this process is `identity`.
    pub fn new(
        client: Arc<dyn Client>,
        name: impl Into<String>,
        identity: impl Into<String>,
        options: ElectionOptions,
    ) -> Self {
        Election {
            client,
            name: name.into(),
            identity: identity.into(),
            options,
        }
    }

    /// Campaigns, and once leading runs `work` with the term's [`Leadership`]. When the
    /// leadership must stop (the renew deadline passed without a renewal) the work is
    /// stopped (its future dropped) before the claim is released, and the candidate
    /// campaigns again. Returns what the work returns once it finishes on its own, releasing
    /// the leadership.
    ///
    /// # Errors
    /// The work's error; [`Error::Invalid`] or [`Error::Unsupported`] from the lock. Errors of
    /// the datastore while campaigning are retried after the retry period.
    pub async fn run<F, Fut, T>(&self, mut work: F) -> Result<T>
    where
        F: FnMut(Leadership) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        loop {
            let opts = LockOptions::new()
                .with_ttl(self.options.lease_duration)
                .with_holder(self.identity.clone())
                .with_renew_every(self.options.retry_period);
            let guard = match lock(self.client.clone(), &self.name, &opts).await {
                Ok(g) => g,
                Err(e @ (Error::Invalid { .. } | Error::Unsupported { .. })) => return Err(e),
                Err(e) => {
                    tracing::debug!(election = %self.name, error = %e, "campaign failed; retrying");
                    tokio::time::sleep(self.jittered_retry()).await;
                    continue;
                }
            };
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let guard = Arc::new(guard);
            let leadership = Leadership {
                guard: guard.clone(),
                identity: self.identity.clone(),
                stop_at: stop_rx,
            };
            let deadline = self.stop_signal(guard.clone(), stop_tx);
            let outcome = {
                let run = work(leadership);
                tokio::pin!(run);
                tokio::select! {
                    r = &mut run => Some(r),
                    () = deadline => None,
                }
                // The work's future is dropped here: stopped before the release below.
            };
            // Released even where the work kept a clone of its leadership: the term is over.
            let _ = guard.release_shared().await;
            match outcome {
                Some(r) => return r,
                None => tokio::time::sleep(self.jittered_retry()).await,
            }
        }
    }

    /// Resolves when the leader must stop, setting the leadership's signal.
    fn stop_signal(
        &self,
        lease: Arc<LockGuard>,
        tx: tokio::sync::watch::Sender<bool>,
    ) -> impl Future<Output = ()> + use<> {
        let margin = self.options.lease_duration - self.options.renew_deadline;
        async move {
            loop {
                // safe_until = last renewal sent + lease duration; stop at sent + renew deadline.
                let stop_at = lease.safe_until() - margin;
                if lease.is_lost() || Instant::now() >= stop_at {
                    tx.send_replace(true);
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(stop_at) => {}
                    () = lease.lost() => {}
                }
            }
        }
    }

    fn jittered_retry(&self) -> Duration {
        let jitter = crate::kernel::rand_fraction() * 0.2;
        self.options.retry_period.mul_f64(1.0 + jitter)
    }

    /// The identity of the leader, each time it changes (`None` while nobody leads).
    ///
    /// Where the lock is a record (Kubernetes Leases) the record is read every retry period,
    /// as client-go's candidates read it; elsewhere the claims are watched.
    pub fn observe(&self) -> BoxStream<'static, Result<Option<String>>> {
        if self.client.lock_records().is_some() {
            return self.observe_record();
        }
        let client = self.client.clone();
        let opts = ListOptions::new(Lock::KIND).with_namespace(self.name.clone());
        futures::stream::unfold(
            (client, opts, None::<Option<String>>, None),
            |(client, opts, last, watch)| async move {
                let mut watch: Option<crate::WatchStream> = watch;
                let mut last = last;
                loop {
                    if let Some(w) = watch.as_mut() {
                        // Any change may change the leader: look again after it.
                        match w.next().await {
                            Some(Ok(crate::WatchEvent::Bookmark(_))) => continue,
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => {}
                        }
                    }
                    let list = match client.list(&opts).await {
                        Ok(l) => l,
                        Err(e) => return Some((Err(e), (client, opts, last, None))),
                    };
                    let leader = list
                        .items
                        .iter()
                        .min_by_key(|k| {
                            k.create_revision
                                .as_ref()
                                .and_then(Revision::as_u64)
                                .unwrap_or(u64::MAX)
                        })
                        .and_then(|k| k.value.decode::<Lock>().ok())
                        .map(|l| l.holder);
                    watch = client
                        .watch(&opts.clone().with_revision(list.revision))
                        .await
                        .ok();
                    if last.as_ref() != Some(&leader) {
                        last = Some(leader.clone());
                        return Some((Ok(leader), (client, opts, last, watch)));
                    }
                }
            },
        )
        .boxed()
    }
}

impl Election {
    fn observe_record(&self) -> BoxStream<'static, Result<Option<String>>> {
        let (client, name, every) = (
            self.client.clone(),
            self.name.clone(),
            self.options.retry_period,
        );
        futures::stream::unfold(
            (client, name, None::<Option<String>>, true),
            move |(client, name, last, first)| async move {
                let mut first = first;
                loop {
                    if !first {
                        tokio::time::sleep(every).await;
                    }
                    first = false;
                    match crate::lock_record::holder(&*client, &name).await {
                        Err(e) => return Some((Err(e), (client, name, last, false))),
                        Ok(leader) if last.as_ref() != Some(&leader) => {
                            let last = Some(leader.clone());
                            return Some((Ok(leader), (client, name, last, false)));
                        }
                        Ok(_) => {}
                    }
                }
            },
        )
        .boxed()
    }
}
