//! Lists: the API server's pages (`limit` and `continue`) of one snapshot, or a streaming
//! watch-list request.

use futures::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, WatchEvent as KubeEvent, WatchParams};
use kvsync_model::{KVList, ListOptions, Revision};

use super::KubernetesBackend;
use super::convert::{map_err, status_err};
use crate::client::ListPages;
use crate::error::{Error, Result};
use crate::kernel::{one_page, push_listed};

/// How many objects a list page asks for.
const PAGE_LIMIT: u32 = 500;

impl KubernetesBackend {
    /// Reads the current state with a streaming watch-list request: ADDED events for every
    /// object, then a bookmark marked `k8s.io/initial-events-end` whose resourceVersion is
    /// the snapshot's.
    async fn stream_list(
        &self,
        api: &Api<DynamicObject>,
        opts: &ListOptions,
        list: &mut KVList,
    ) -> Result<()> {
        let wp = WatchParams {
            send_initial_events: true,
            bookmarks: true,
            ..WatchParams::default()
        }
        .timeout(290);
        let stream = api
            .watch(&wp, "0")
            .await
            .map_err(|e| map_err(e, None, None))?;
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item.map_err(|e| map_err(e, None, None))? {
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
                        return Ok(());
                    }
                }
                KubeEvent::Error(s) => return Err(status_err(&s, None, None)),
            }
        }
        Err(Error::unavailable(
            "the API server closed the watch-list stream before the initial events ended",
        ))
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
        if self.watch_list {
            let mut list = KVList {
                items: Vec::new(),
                revision: Revision::from(""),
                parse_failures: Vec::new(),
            };
            self.stream_list(&api, opts, &mut list).await?;
            sort_items(&mut list);
            return Ok(one_page(list));
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

fn sort_items(list: &mut KVList) {
    list.items
        .sort_by(|a, b| (&a.key.namespace, &a.key.name).cmp(&(&b.key.namespace, &b.key.name)));
}
