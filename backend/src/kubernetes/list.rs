//! Lists: the API server's pages (`limit` and `continue`) of one snapshot, or a streaming
//! watch-list request.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, WatchEvent as KubeEvent, WatchParams};
use kvsync_model::{KVList, ListOptions, Revision};

use super::KubernetesBackend;
use super::convert::{map_err, status_err};
use super::watch::{KubeStream, WATCH_TIMEOUT_SECS};
use crate::client::ListPages;
use crate::error::{Error, Result};
use crate::kernel::{one_page, push_listed};

/// How many objects a list page asks for.
const PAGE_LIMIT: u32 = 500;

/// How long a watch-list stream waits, after its initial events, for the watch that follows
/// on from its list to take it over.
const PARK_FOR: Duration = Duration::from_secs(10);
/// How many such streams wait at most (the oldest is closed first).
const MAX_PARKED: usize = 16;

/// A watch-list stream whose initial events were read: the rest of it is the watch that
/// follows on from the list.
pub(super) struct Parked {
    opts: ListOptions,
    revision: Revision,
    stream: KubeStream,
    at: Instant,
}

/// Why a watch-list request failed: the server does not serve them (feature off, an older
/// server, etcd without progress notifications), or some other error.
enum StreamListError {
    Refused(Error),
    Other(Error),
}

/// Whether a status refuses watch-list requests as such: `422`/`400` (sendInitialEvents or
/// resourceVersionMatch forbidden for a watch: the WatchList feature off, or a server older
/// than 1.27), `501`, or a `500` about progress notifications (etcd under the API server
/// without them, "RequestWatchProgress is disabled").
fn refuses_watch_list(code: u16, message: &str) -> bool {
    match code {
        400 | 422 | 501 => true,
        500 => {
            let m = message.to_ascii_lowercase();
            m.contains("progress") || m.contains("watchlist") || m.contains("sendinitialevents")
        }
        _ => false,
    }
}

fn classify(e: kube::Error) -> StreamListError {
    match &e {
        kube::Error::Api(s) if refuses_watch_list(s.code, &s.message) => {
            StreamListError::Refused(map_err(e, None, None))
        }
        _ => StreamListError::Other(map_err(e, None, None)),
    }
}

impl KubernetesBackend {
    /// Reads the current state with a streaming watch-list request: ADDED events for every
    /// object, then a bookmark marked `k8s.io/initial-events-end` whose resourceVersion is
    /// the snapshot's. The read is consistent (resourceVersion unset, `resourceVersionMatch
    /// =NotOlderThan`, as the API concepts document it). The rest of the stream is parked for
    /// the watch that follows on from the list.
    async fn stream_list(
        &self,
        api: &Api<DynamicObject>,
        opts: &ListOptions,
        list: &mut KVList,
    ) -> std::result::Result<(), StreamListError> {
        let wp = WatchParams {
            send_initial_events: true,
            bookmarks: true,
            ..WatchParams::default()
        }
        .timeout(WATCH_TIMEOUT_SECS);
        let mut stream = api.watch(&wp, "").await.map_err(classify)?.boxed();
        while let Some(item) = stream.next().await {
            match item.map_err(classify)? {
                KubeEvent::Added(o) | KubeEvent::Modified(o) => {
                    push_listed(list, opts, self.decode(&opts.kind, o));
                }
                KubeEvent::Deleted(_) => {}
                KubeEvent::Bookmark(b) => {
                    let end = b
                        .metadata
                        .annotations
                        .get("k8s.io/initial-events-end")
                        .is_some_and(|v| v == "true");
                    if end {
                        list.revision = Revision::from(b.metadata.resource_version);
                        self.park(opts, list.revision.clone(), stream);
                        return Ok(());
                    }
                    // A plain bookmark before the end: the server ignored sendInitialEvents.
                    return Err(StreamListError::Refused(Error::unavailable(
                        "the API server ignored sendInitialEvents",
                    )));
                }
                KubeEvent::Error(s) if refuses_watch_list(s.code, &s.message) => {
                    return Err(StreamListError::Refused(status_err(&s, None, None)));
                }
                KubeEvent::Error(s) => {
                    return Err(StreamListError::Other(status_err(&s, None, None)));
                }
            }
        }
        Err(StreamListError::Other(Error::unavailable(
            "the API server closed the watch-list stream before the initial events ended",
        )))
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        self.parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn park(&self, opts: &ListOptions, revision: Revision, stream: KubeStream) {
        let mut parked = self.parked();
        parked.retain(|p| p.at.elapsed() < PARK_FOR);
        if parked.len() >= MAX_PARKED {
            parked.remove(0);
        }
        parked.push(Parked {
            opts: without_revision(opts),
            revision,
            stream,
            at: Instant::now(),
        });
    }

    /// The rest of the watch-list stream of a list with these options at this revision, if
    /// one waits: the watch that follows on from the list, without a second request.
    pub(super) fn take_parked(&self, opts: &ListOptions) -> Option<KubeStream> {
        let revision = opts.revision.as_ref()?;
        let key = without_revision(opts);
        let mut parked = self.parked();
        parked.retain(|p| p.at.elapsed() < PARK_FOR);
        let i = parked
            .iter()
            .position(|p| p.opts == key && &p.revision == revision)?;
        Some(parked.remove(i).stream)
    }

    /// The API server's pages (`limit` and `continue`), each handed on as it comes (a
    /// watch-list stream comes as one page).
    pub(super) async fn list_pages_kvp(&self, opts: &ListOptions) -> Result<ListPages> {
        self.codec.list_prefix(opts)?;
        if opts.revision.is_some() {
            return Err(Error::Unsupported {
                op: "list at a revision".into(),
                backend: "kubernetes",
            });
        }
        let api = self.api(&opts.kind, opts.namespace.as_deref())?;
        if self.watch_list && !self.watch_list_refused.load(Ordering::Relaxed) {
            let mut list = KVList {
                items: Vec::new(),
                revision: Revision::from(""),
                parse_failures: Vec::new(),
            };
            match self.stream_list(&api, opts, &mut list).await {
                Ok(()) => {
                    sort_items(&mut list);
                    return Ok(one_page(list));
                }
                Err(StreamListError::Other(e)) => return Err(e),
                Err(StreamListError::Refused(e)) => {
                    // Once, for every kind: paged lists from now on.
                    if !self.watch_list_refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "the API server does not serve watch-list requests; reading with paged lists from now on"
                        );
                    }
                }
            }
        }
        let this = self.clone();
        let opts = opts.clone();
        // (continue token, revision of the first page); `None` once the last page is read.
        let start: Option<(Option<String>, Option<Revision>)> = Some((None, None));
        Ok(futures::stream::try_unfold(start, move |state| {
            let (api, this, opts) = (api.clone(), this.clone(), opts.clone());
            async move {
                let Some((token, revision)) = state else {
                    return Ok(None);
                };
                let mut lp = ListParams::default().limit(PAGE_LIMIT);
                if let Some(t) = &token {
                    lp = lp.continue_token(t);
                }
                if let Some(name) = &opts.name {
                    lp = lp.fields(&format!("metadata.name={name}"));
                }
                let page = api.list(&lp).await.map_err(|e| map_err(e, None, None))?;
                // Every page belongs to the first page's snapshot.
                let revision = revision.unwrap_or_else(|| {
                    Revision::from(page.metadata.resource_version.clone().unwrap_or_default())
                });
                let mut list = KVList {
                    items: Vec::with_capacity(page.items.len()),
                    revision: revision.clone(),
                    parse_failures: Vec::new(),
                };
                for obj in page.items {
                    push_listed(&mut list, &opts, this.decode(&opts.kind, obj));
                }
                sort_items(&mut list);
                let next = page
                    .metadata
                    .continue_
                    .filter(|t| !t.is_empty())
                    .map(|t| (Some(t), Some(revision)));
                Ok(Some((list, next)))
            }
        })
        .boxed())
    }
}

fn without_revision(opts: &ListOptions) -> ListOptions {
    let mut o = opts.clone();
    o.revision = None;
    o
}

fn sort_items(list: &mut KVList) {
    list.items
        .sort_by(|a, b| (&a.key.namespace, &a.key.name).cmp(&(&b.key.namespace, &b.key.name)));
}
