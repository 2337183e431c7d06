//! The async driver: per resource type a stream doing the I/O its state machine asks for, and
//! an aggregator, polled by the consumer, that merges statuses and batches updates.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::VecDeque;

use futures::future::{BoxFuture, MaybeDone};
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use kvsync_backend::{Client, Error, ListPages, WatchStream};
use kvsync_model::{ListOptions, Revision};
use rand::{Rng, SeedableRng};
use std::fmt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::metrics::{SyncerMetrics, TypeMetrics};
use crate::state::{Action, Input, Out, TypeState, TypeStatus};
use crate::status::{SyncStatus, SyncerEvent, Update};
use crate::{ResourceType, Syncer};

/// How long the Syncer waits before retrying after a failure: a trait, so that tests and
/// operators can plug in their own (a fixed delay, a policy shared across Syncers). The
/// default is [`Backoff`].
///
/// The Syncer's clock is tokio's: tests drive retries deterministically with a paused clock
/// (`#[tokio::test(start_paused = true)]`) and a policy without randomness or with a seed.
///
/// ```
/// use std::time::Duration;
/// use kvsync_syncer::RetryPolicy;
///
/// /// Always one second.
/// #[derive(Debug)]
/// struct Fixed;
/// impl RetryPolicy for Fixed {
///     fn delay(&self, _attempt: u32) -> Duration {
///         Duration::from_secs(1)
///     }
/// }
/// assert_eq!(Fixed.delay(7), Duration::from_secs(1));
/// ```
pub trait RetryPolicy: Send + Sync + fmt::Debug + 'static {
    /// The delay before retry number `attempt` in a row (1 for the first).
    fn delay(&self, attempt: u32) -> Duration;
}

/// Capped exponential backoff with jitter: the default [`RetryPolicy`].
///
/// The n-th retry in a row waits a random time between half and all of
/// `min(max, initial * 2^(n-1))`, so that many clients recovering together spread out. The
/// randomness is injectable: [`Backoff::with_seed`] makes the delays repeatable and
/// [`Backoff::without_jitter`] removes them.
///
/// ```
/// use std::time::Duration;
/// use kvsync_syncer::{Backoff, RetryPolicy};
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).without_jitter();
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(3), Duration::from_millis(400));
/// assert_eq!(b.delay(40), Duration::from_secs(2));
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// `None`: no jitter.
    rng: Option<Arc<std::sync::Mutex<rand::rngs::StdRng>>>,
}

impl Default for Backoff {
    /// 100 ms doubling up to 10 s, with jitter.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// `initial` doubling up to `max`, with jitter from a randomly seeded generator.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            rng: Some(Arc::new(std::sync::Mutex::new(
                rand::rngs::StdRng::from_os_rng(),
            ))),
        }
    }

    /// The same backoff with jitter drawn from a generator seeded with `seed`: repeatable.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = Some(Arc::new(std::sync::Mutex::new(
            rand::rngs::StdRng::seed_from_u64(seed),
        )));
        self
    }

    /// The same backoff with no jitter: each delay is the full one.
    #[must_use]
    pub fn without_jitter(mut self) -> Self {
        self.rng = None;
        self
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }
}

impl RetryPolicy for Backoff {
    fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        let full = self
            .initial
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        let Some(rng) = &self.rng else {
            return full;
        };
        let unit: f64 = rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .random();
        let half = full / 2;
        half + full.saturating_sub(half).mul_f64(unit)
    }
}

/// A message from a type task to the aggregator.
struct Msg {
    idx: usize,
    out: Out,
}

/// The stream of a running Syncer. Dropping it stops the Syncer.
///
/// By default the Syncer runs inside this stream: polling it polls every resource type's
/// list or watch and hands on what they bring, so no task hop lies between the datastore's
/// stream and the consumer, and a consumer that does not poll stops the reading (see
/// [`Syncer::with_channel_capacity`](crate::Syncer::with_channel_capacity) for a Syncer that
/// runs ahead in a task of its own).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use futures::StreamExt;
/// use kvsync_backend::{Client, MemoryBackend};
/// use kvsync_model::{ListOptions, Revision};
/// use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent};
///
/// let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
/// let mut events = Syncer::new(client)
///     .with_resource(ResourceType::new(ListOptions::new("IPPool")))
///     .stream();
/// while let Some(ev) = events.next().await {
///     if let SyncerEvent::Status(SyncStatus::InSync) = ev {
///         break;
///     }
/// }
/// events.stop().await;
/// # }
/// ```
pub struct SyncerStream {
    inner: Inner,
}

enum Inner {
    /// The Syncer runs when the stream is polled.
    Inline(BoxStream<'static, SyncerEvent>),
    /// The Syncer runs in a task, up to a channel's capacity ahead of the consumer.
    Channel {
        rx: mpsc::Receiver<SyncerEvent>,
        handle: SyncerHandle,
    },
}

impl std::fmt::Debug for SyncerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncerStream").finish_non_exhaustive()
    }
}

impl SyncerStream {
    pub(crate) fn new(syncer: Syncer) -> Self {
        let capacity = syncer.channel_capacity;
        let events = events(syncer);
        if capacity == 0 {
            return SyncerStream {
                inner: Inner::Inline(events),
            };
        }
        let (tx, rx) = mpsc::channel(capacity);
        let handle = SyncerHandle::spawn(move |mut stopped| async move {
            let mut events = events;
            while let Some(ev) = next_unless_stopped(&mut events, &mut stopped).await {
                // A send that waits for the consumer ends at shutdown too.
                let sent = tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    sent = tx.send(ev) => sent,
                };
                if sent.is_err() {
                    break;
                }
            }
            debug!("syncer stopped");
        });
        SyncerStream {
            inner: Inner::Channel { rx, handle },
        }
    }

    /// Stops every watcher and returns once they are gone.
    pub async fn stop(self) {
        match self.inner {
            Inner::Inline(events) => drop(events),
            Inner::Channel { rx, handle } => {
                drop(rx);
                handle.stop().await;
            }
        }
    }
}

impl Stream for SyncerStream {
    type Item = SyncerEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SyncerEvent>> {
        match &mut self.inner {
            Inner::Inline(events) => events.poll_next_unpin(cx),
            Inner::Channel { rx, .. } => rx.poll_recv(cx),
        }
    }
}

/// The next event, or `None` once `stopped` fires or the events end.
pub(crate) async fn next_unless_stopped(
    events: &mut (impl Stream<Item = SyncerEvent> + Unpin),
    stopped: &mut oneshot::Receiver<()>,
) -> Option<SyncerEvent> {
    tokio::select! {
        biased;
        _ = stopped => None,
        ev = events.next() => ev,
    }
}

/// A running Syncer. [`SyncerHandle::stop`] ends it; dropping the handle ends it too.
#[derive(Debug)]
pub struct SyncerHandle {
    shutdown: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl SyncerHandle {
    /// Runs `task` until it ends or the handle stops it (the task gets the stop signal).
    pub(crate) fn spawn<F>(task: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (shutdown, stopped) = oneshot::channel();
        SyncerHandle {
            shutdown: Some(shutdown),
            tasks: vec![tokio::spawn(task(stopped))],
        }
    }

    /// Stops every watcher and the delivery of events, and returns once all the Syncer's
    /// tasks are gone.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    /// Whether every task of the Syncer has ended.
    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(JoinHandle::is_finished)
    }
}

impl Drop for SyncerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn aggregate_status(statuses: &[TypeStatus]) -> SyncStatus {
    if statuses.iter().all(|s| *s == TypeStatus::InSync) {
        SyncStatus::InSync
    } else if statuses.contains(&TypeStatus::Waiting) {
        SyncStatus::WaitForDatastore
    } else {
        SyncStatus::ResyncInProgress
    }
}

/// Merges the types' statuses and batches their updates into the events to hand on.
struct Aggregator {
    out: VecDeque<SyncerEvent>,
    statuses: Vec<TypeStatus>,
    status: SyncStatus,
    pending: Vec<Update>,
    max_batch: usize,
    metrics: Option<SyncerMetrics>,
}

impl Aggregator {
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            if let Some(m) = &self.metrics {
                m.batch(batch.len());
            }
            self.out.push_back(SyncerEvent::Updates(batch));
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg.out {
            Out::Updates(updates) if self.pending.is_empty() && updates.len() < self.max_batch => {
                // Taken whole: no copy.
                self.pending = updates;
            }
            Out::Updates(updates) => {
                let mut updates = updates.into_iter();
                loop {
                    let room = self.max_batch - self.pending.len();
                    self.pending.extend(updates.by_ref().take(room));
                    if self.pending.len() < self.max_batch {
                        break;
                    }
                    self.flush();
                }
            }
            Out::Status(s) => {
                // Every update sent before a status change is delivered before it.
                self.flush();
                self.statuses[msg.idx] = s;
                let agg = aggregate_status(&self.statuses);
                if agg != self.status {
                    info!(status = %agg, "sync status changed");
                    if let Some(m) = &self.metrics {
                        m.set_status(agg);
                    }
                    self.status = agg;
                    self.out.push_back(SyncerEvent::Status(agg));
                }
            }
            Out::ParseFailed(f) => {
                self.flush();
                warn!(raw_key = %f.raw_key, reason = %f.reason, "stored entry does not decode");
                self.out.push_back(SyncerEvent::ParseFailed(f));
            }
            Out::Error(e) => {
                self.flush();
                self.out.push_back(SyncerEvent::Error(Arc::new(e)));
            }
        }
    }
}

/// The Syncer's events, produced as the stream is polled. Every type's list/watch loop is a
/// stream polled by this one: no hop between tasks per event, and a consumer that does not
/// keep up stops the reading of every watch.
fn events(syncer: Syncer) -> BoxStream<'static, SyncerEvent> {
    let n = syncer.types.len();
    let merged = futures::stream::select_all(syncer.types.iter().cloned().enumerate().map(
        |(idx, rt)| {
            let span = info_span!("kvsync_watcher", kind = %rt.options.kind, namespace = ?rt.options.namespace);
            TypeTask {
                idx,
                client: syncer.client.clone(),
                metrics: syncer.metrics.as_ref().map(|m| m.for_kind(&rt.options.kind)),
                rt,
                retry: syncer.retry.clone(),
                request_timeout: syncer.request_timeout,
                gap_ratio: syncer.gap_ratio,
                catch_up_timeout: syncer.catch_up_timeout,
            }
            .into_stream(span)
        },
    ));
    let mut agg = Aggregator {
        out: VecDeque::new(),
        statuses: vec![TypeStatus::Waiting; n],
        status: SyncStatus::WaitForDatastore,
        pending: Vec::new(),
        max_batch: syncer.max_batch.max(1),
        metrics: syncer.metrics.clone(),
    };
    agg.out.push_back(SyncerEvent::Status(agg.status));
    if n == 0 {
        agg.status = SyncStatus::InSync;
        if let Some(m) = &agg.metrics {
            m.set_status(SyncStatus::InSync);
        }
        agg.out.push_back(SyncerEvent::Status(SyncStatus::InSync));
    }
    futures::stream::unfold((agg, merged), |(mut agg, mut merged)| async move {
        loop {
            if let Some(ev) = agg.out.pop_front() {
                return Some((ev, (agg, merged)));
            }
            if merged.is_empty() {
                // With no type, nothing more ever comes: the stream stays open until dropped.
                futures::future::pending::<()>().await;
            }
            let msg = merged.next().await?;
            agg.handle(msg);
            // Take whatever else is ready too, so changes that arrive together go out in one
            // batch.
            while agg.pending.len() < agg.max_batch {
                match merged.next().now_or_never() {
                    Some(Some(m)) => agg.handle(m),
                    _ => break,
                }
            }
            agg.flush();
        }
    })
    .boxed()
}

struct TypeTask {
    idx: usize,
    client: Arc<dyn Client>,
    metrics: Option<TypeMetrics>,
    rt: ResourceType,
    retry: Arc<dyn RetryPolicy>,
    request_timeout: Duration,
    gap_ratio: u64,
    catch_up_timeout: Duration,
}

/// The next item of a watch; `None` when the deadline passes first.
async fn next_or_deadline(
    w: &mut WatchStream,
    deadline: Option<tokio::time::Instant>,
) -> Option<Option<kvsync_backend::Result<kvsync_backend::WatchEvent>>> {
    match deadline {
        None => Some(w.next().await),
        Some(d) => tokio::time::timeout_at(d, w.next()).await.ok(),
    }
}

/// One type's loop: its state machine, the I/O it asks for, and the outputs not yet taken.
struct TypeRun {
    task: TypeTask,
    state: TypeState,
    action: Action,
    watch: Option<WatchStream>,
    /// The pages of the list being read.
    pages: Option<ListPages>,
    /// A watch from the list's revision, opened as soon as the first page gave the revision
    /// and driven while the next pages are awaited. etcd puts a watch whose start is already
    /// in the past into a group it catches up only every 100 ms; opened while the revision is
    /// still the newest, the watch starts in step and its events wait in the stream.
    early_watch: Option<(
        Revision,
        MaybeDone<BoxFuture<'static, kvsync_backend::Result<WatchStream>>>,
    )>,
    outs: VecDeque<Out>,
    /// When a resumed watch must have confirmed catching up.
    catch_up_deadline: Option<tokio::time::Instant>,
    /// Whether the type was listed before (a later list is a relist, with a cause).
    listed: bool,
}

/// Why a list that `input` leads to happens (for the relist counter).
fn relist_cause(input: &Input, listed: bool) -> &'static str {
    if !listed {
        return "initial";
    }
    match input {
        Input::WatchBroken(Error::Compacted { .. })
        | Input::WatchFailedToStart(Error::Compacted { .. }) => "compacted",
        Input::CurrentRevision(Ok(_)) => "gap",
        Input::CatchUpTimedOut => "catch_up_timeout",
        _ => "outage",
    }
}

/// Whether a watch that `input` leads to is opened again (not the one following a list).
fn restarts(input: &Input) -> bool {
    !matches!(input, Input::ListDone | Input::ListPage(_))
}

impl TypeTask {
    async fn with_timeout<T>(
        &self,
        what: &str,
        fut: impl Future<Output = kvsync_backend::Result<T>>,
    ) -> kvsync_backend::Result<T> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::unavailable(format!(
                "{what} did not answer within {:?}",
                self.request_timeout
            ))),
        }
    }

    fn into_stream(self, span: Span) -> BoxStream<'static, Msg> {
        // The gap after an outage can be weighed only where revisions are one counter.
        let gap_ratio = self
            .client
            .capabilities()
            .global_revision
            .then_some(self.gap_ratio);
        let state = TypeState::new(
            self.rt.options.kind.clone(),
            self.rt.processor.clone(),
            gap_ratio,
        );
        let first = state.start();
        if let (Some(m), Action::List) = (&self.metrics, &first) {
            m.relist("initial");
        }
        let run = TypeRun {
            listed: first == Action::List,
            action: first,
            task: self,
            state,
            watch: None,
            pages: None,
            early_watch: None,
            outs: VecDeque::new(),
            catch_up_deadline: None,
        };
        futures::stream::unfold(run, move |mut run| {
            async move {
                loop {
                    if let Some(out) = run.outs.pop_front() {
                        let idx = run.task.idx;
                        return Some((Msg { idx, out }, run));
                    }
                    let input = run.io().await;
                    if let Input::WatchBroken(e)
                    | Input::WatchFailedToStart(e)
                    | Input::ListFailed(e) = &input
                    {
                        warn!(error = %e, "datastore call failed");
                    }
                    // Only with metrics: nothing is added to the path of each event without.
                    let why = run
                        .task
                        .metrics
                        .is_some()
                        .then(|| (relist_cause(&input, run.listed), restarts(&input)));
                    let step = run.state.step(input);
                    if let (Some(m), Some((cause, restart))) = (&run.task.metrics, why) {
                        for o in &step.out {
                            if let Out::Updates(v) = o {
                                m.updates(v);
                            }
                        }
                        match &step.action {
                            Action::List => m.relist(cause),
                            Action::Watch(_) if restart => m.watch_restart(),
                            _ => {}
                        }
                        m.tracked(run.state.tracked());
                    }
                    if step.action == Action::List {
                        run.listed = true;
                    }
                    run.outs.extend(step.out);
                    run.action = step.action;
                    run.catch_up_deadline = match (run.state.catching_up(), run.catch_up_deadline) {
                        (false, _) => None,
                        (true, Some(d)) => Some(d),
                        (true, None) => {
                            Some(tokio::time::Instant::now() + run.task.catch_up_timeout)
                        }
                    };
                }
            }
            .instrument(span.clone())
        })
        .boxed()
    }
}

impl TypeRun {
    /// The next page of the open list.
    async fn next_page(&mut self) -> Input {
        let Some(pages) = self.pages.as_mut() else {
            return Input::ListFailed(Error::unavailable("no list is open"));
        };
        let next = self
            .task
            .with_timeout("list page", async { pages.next().await.transpose() });
        let next = match self.early_watch.as_mut() {
            Some((_, opening)) => {
                let mut next = std::pin::pin!(next);
                loop {
                    let opened = matches!(opening, MaybeDone::Done(_) | MaybeDone::Gone);
                    tokio::select! {
                        biased;
                        page = &mut next => break page,
                        () = &mut *opening, if !opened => {}
                    }
                }
            }
            None => next.await,
        };
        match next {
            Ok(Some(page)) => {
                debug!(items = page.items.len(), revision = %page.revision, "list page");
                if self.early_watch.is_none() {
                    self.open_early_watch(page.revision.clone());
                }
                Input::ListPage(page)
            }
            Ok(None) => {
                self.pages = None;
                info!(tracked = self.state.tracked(), "listed");
                Input::ListDone
            }
            Err(e) => {
                self.pages = None;
                self.early_watch = None;
                Input::ListFailed(e)
            }
        }
    }

    /// Starts opening the watch that is to follow the list at `revision`.
    fn open_early_watch(&mut self, revision: Revision) {
        let client = self.task.client.clone();
        let opts = self.task.rt.options.clone();
        let timeout = self.task.request_timeout;
        let rev = revision.clone();
        let opening = async move {
            match tokio::time::timeout(
                timeout,
                client.watch(&opts.clone().with_revision(rev.clone())),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(Error::unavailable(format!(
                    "watch did not answer within {timeout:?}"
                ))),
            }
        }
        .boxed();
        self.early_watch = Some((revision, futures::future::maybe_done(opening)));
    }

    /// Does the I/O the last step asked for and returns its outcome.
    async fn io(&mut self) -> Input {
        let opts: &ListOptions = &self.task.rt.options;
        match self.action.clone() {
            Action::List => {
                self.watch = None;
                self.pages = None;
                self.early_watch = None;
                info!(tracked = self.state.tracked(), "listing");
                match self
                    .task
                    .with_timeout("list", self.task.client.list_pages(opts))
                    .await
                {
                    Ok(pages) => {
                        self.pages = Some(pages);
                        self.next_page().await
                    }
                    Err(e) => Input::ListFailed(e),
                }
            }
            Action::NextPage => self.next_page().await,
            Action::Watch(rev) => {
                self.watch = None;
                debug!(from = %rev, "watching");
                let opened = match self.early_watch.take() {
                    Some((from, mut opening)) if from == rev => {
                        (&mut opening).await;
                        std::pin::Pin::new(&mut opening)
                            .take_output()
                            .unwrap_or_else(|| {
                                Err(Error::unavailable("the watch was opened twice"))
                            })
                    }
                    _ => {
                        self.task
                            .with_timeout(
                                "watch",
                                self.task
                                    .client
                                    .watch(&opts.clone().with_revision(rev.clone())),
                            )
                            .await
                    }
                };
                match opened {
                    Ok(w) => {
                        self.watch = Some(w);
                        Input::WatchStarted
                    }
                    Err(e) => Input::WatchFailedToStart(e),
                }
            }
            Action::Continue => match self.watch.as_mut() {
                Some(w) => match next_or_deadline(w, self.catch_up_deadline).await {
                    None => {
                        warn!("resumed watch did not confirm catching up in time; relisting");
                        self.watch = None;
                        Input::CatchUpTimedOut
                    }
                    Some(Some(Ok(ev))) => Input::Event(ev),
                    Some(Some(Err(e))) => {
                        self.watch = None;
                        Input::WatchBroken(e)
                    }
                    Some(None) => {
                        self.watch = None;
                        Input::WatchEnded
                    }
                },
                None => Input::WatchEnded,
            },
            Action::CheckGap => {
                let current = self
                    .task
                    .with_timeout("current_revision", self.task.client.current_revision())
                    .await;
                debug!(
                    ?current,
                    last_tracked = self.state.tracked(),
                    "weighing the gap"
                );
                Input::CurrentRevision(current)
            }
            Action::Backoff(attempt) => {
                // At least as long as the datastore asked (429 Retry-After).
                let delay = self
                    .task
                    .retry
                    .delay(attempt)
                    .max(self.state.retry_after().unwrap_or_default());
                warn!(attempt, ?delay, "retrying after backoff");
                tokio::time::sleep(delay).await;
                Input::BackoffElapsed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relists_are_counted_with_their_cause() {
        use kvsync_model::Revision;
        let compacted = || Error::Compacted {
            requested: Revision::from(1u64),
            compacted: None,
        };
        assert_eq!(relist_cause(&Input::BackoffElapsed, false), "initial");
        assert_eq!(
            relist_cause(&Input::WatchBroken(compacted()), true),
            "compacted"
        );
        assert_eq!(
            relist_cause(&Input::WatchFailedToStart(compacted()), true),
            "compacted"
        );
        assert_eq!(
            relist_cause(&Input::CurrentRevision(Ok(Revision::from(9u64))), true),
            "gap"
        );
        assert_eq!(
            relist_cause(&Input::CatchUpTimedOut, true),
            "catch_up_timeout"
        );
        assert_eq!(relist_cause(&Input::BackoffElapsed, true), "outage");
        assert!(!restarts(&Input::ListDone) && restarts(&Input::WatchEnded));
    }

    #[test]
    fn backoff_with_the_same_seed_repeats_its_delays() {
        let a = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).with_seed(7);
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).with_seed(7);
        let da: Vec<_> = (1..20).map(|n| a.delay(n)).collect();
        let db: Vec<_> = (1..20).map(|n| b.delay(n)).collect();
        assert_eq!(da, db);
        assert!(da.windows(2).any(|w| w[0] != w[1] / 2), "jittered: {da:?}");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..100 {
            let d1 = b.delay(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = b.delay(3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d40 = b.delay(40);
            assert!(
                d40 >= Duration::from_secs(1) && d40 <= Duration::from_secs(2),
                "{d40:?}"
            );
        }
    }

    #[test]
    fn status_is_in_sync_only_when_every_type_is() {
        use TypeStatus::*;
        assert_eq!(aggregate_status(&[InSync, InSync]), SyncStatus::InSync);
        assert_eq!(
            aggregate_status(&[InSync, Waiting]),
            SyncStatus::WaitForDatastore
        );
        assert_eq!(
            aggregate_status(&[Resyncing, InSync]),
            SyncStatus::ResyncInProgress
        );
        assert_eq!(
            aggregate_status(&[Resyncing, Waiting]),
            SyncStatus::WaitForDatastore
        );
    }
}
