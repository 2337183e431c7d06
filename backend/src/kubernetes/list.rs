//! Lists: the API server's pages (`limit` and `continue`) of one snapshot, or a streaming
//! watch-list request.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{ListParams, WatchParams};
use kube::core::Request;
use kvsync_model::{KVList, ListOptions, Revision};
use tracing::Instrument;

use super::KubernetesBackend;
use super::convert::{map_err, status_err};
use super::slim::{self, SlimEvent, SlimStream};
use super::watch::WATCH_TIMEOUT_SECS;
use crate::client::ListPages;
use crate::error::{Error, Result};
use crate::kernel::{one_page, push_listed};

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
    stream: SlimStream,
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
        url: &str,
        opts: &ListOptions,
        list: &mut KVList,
    ) -> std::result::Result<(), StreamListError> {
        let wp = WatchParams {
            send_initial_events: true,
            bookmarks: true,
            ..WatchParams::default()
        }
        .timeout(WATCH_TIMEOUT_SECS);
        let request = Request::new(url)
            .watch(&wp, "")
            .map_err(|e| StreamListError::Other(Error::invalid("watch-list", e.to_string())))?;
        let mut stream = slim::watch_events(&self.client, request)
            .await
            .map_err(classify)?;
        while let Some(item) = stream.next().await {
            match item.map_err(StreamListError::Other)? {
                SlimEvent::Added(o) | SlimEvent::Modified(o) => {
                    push_listed(list, opts, o.decode(&opts.kind, &self.codec));
                }
                SlimEvent::Deleted(_) => {}
                SlimEvent::Bookmark(b) => {
                    if b.ends_initial_events() {
                        list.revision =
                            Revision::from(b.metadata.resource_version.unwrap_or_default());
                        self.park(opts, list.revision.clone(), stream);
                        return Ok(());
                    }
                    // A plain bookmark before the end: the server ignored sendInitialEvents.
                    return Err(StreamListError::Refused(Error::unavailable(
                        "the API server ignored sendInitialEvents",
                    )));
                }
                SlimEvent::Error(s) if refuses_watch_list(s.code, &s.message) => {
                    return Err(StreamListError::Refused(status_err(&s, None, None)));
                }
                SlimEvent::Error(s) => {
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

    fn park(&self, opts: &ListOptions, revision: Revision, stream: SlimStream) {
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
    pub(super) fn take_parked(&self, opts: &ListOptions) -> Option<SlimStream> {
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
    /// watch-list stream comes as one page). Pages are read ahead: the next page is fetched
    /// and decoded while the caller works on the current one (one page ahead at most).
    pub(super) async fn list_pages_kvp(&self, opts: &ListOptions) -> Result<ListPages> {
        self.codec.list_prefix(opts)?;
        if opts.revision.is_some() {
            return Err(Error::Unsupported {
                op: "list at a revision".into(),
                backend: "kubernetes",
            });
        }
        let url = self.url_path(&opts.kind, opts.namespace.as_deref())?;
        if self.watch_list && !self.watch_list_refused.load(Ordering::Relaxed) {
            let mut list = KVList {
                items: Vec::new(),
                revision: Revision::from(""),
                parse_failures: Vec::new(),
            };
            match self.stream_list(&url, opts, &mut list).await {
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
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<KVList>>(1);
        let this = self.clone();
        let opts = opts.clone();
        tokio::spawn(
            async move {
                // The continue token and the first page's revision (every page belongs to
                // its snapshot).
                let mut token: Option<String> = None;
                let mut revision: Option<Revision> = None;
                loop {
                    // A page is fetched only once there is room for it: one page ahead of
                    // the caller at most. The caller gone: stop reading.
                    let Ok(permit) = tx.reserve().await else {
                        return;
                    };
                    let page = this.list_page(&url, &opts, token.as_deref()).await;
                    let (mut list, next) = match page {
                        Ok(p) => p,
                        Err(e) => {
                            permit.send(Err(e));
                            return;
                        }
                    };
                    let revision = revision.get_or_insert_with(|| list.revision.clone());
                    list.revision.clone_from(revision);
                    permit.send(Ok(list));
                    match next {
                        Some(t) => token = Some(t),
                        None => return,
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|page| (page, rx))
        })
        .boxed())
    }

    /// One page of a paged list, decoded, and the next page's continue token.
    async fn list_page(
        &self,
        url: &str,
        opts: &ListOptions,
        token: Option<&str>,
    ) -> Result<(KVList, Option<String>)> {
        let mut lp = ListParams::default().limit(self.page_size);
        if let Some(t) = token {
            lp = lp.continue_token(t);
        }
        if let Some(name) = &opts.name {
            lp = lp.fields(&format!("metadata.name={name}"));
        }
        let request = Request::new(url)
            .list(&lp)
            .map_err(|e| Error::invalid("list", e.to_string()))?;
        let page = slim::list_page(&self.client, request).await?;
        Ok(self.page_to_list(opts, page))
    }

    /// A decoded page's pairs (those `opts` cover, sorted) and its continue token.
    fn page_to_list(&self, opts: &ListOptions, page: slim::SlimList) -> (KVList, Option<String>) {
        let mut list = KVList {
            items: Vec::with_capacity(page.items.len()),
            revision: Revision::from(page.metadata.resource_version.unwrap_or_default()),
            parse_failures: Vec::new(),
        };
        for obj in page.items {
            push_listed(&mut list, opts, obj.decode(&opts.kind, &self.codec));
        }
        sort_items(&mut list);
        (list, page.metadata.continue_.filter(|t| !t.is_empty()))
    }

    /// Decodes the JSON text of a list page of `kind` as a paged list decodes what the API
    /// server sends: for the decoding benchmark, beside kube's own decoding of the same text.
    ///
    /// # Errors
    /// [`Error::Parse`] when the text is not a list.
    #[cfg(feature = "testing")]
    pub fn decode_list_text(&self, kind: &str, text: &str) -> Result<KVList> {
        let page: slim::SlimList = serde_json::from_str(text).map_err(|e| Error::Parse {
            raw_key: "list page".into(),
            raw_value: Vec::new(),
            source: Box::new(e),
        })?;
        Ok(self.page_to_list(&ListOptions::new(kind), page).0)
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
