//! Watches from a resourceVersion, with bookmarks; `410 Gone` is `Compacted`.

use futures::{StreamExt, TryStreamExt};
use kube::api::{DynamicObject, ListParams, WatchEvent as KubeEvent, WatchParams};
use kvsync_model::{ListOptions, Revision};

use super::KubernetesBackend;
use super::convert::{map_err, status_err};
use crate::error::{Error, Result};
use crate::kernel::{fuse_after_error, put_event};
use crate::watch::{WatchEvent, WatchStream};

impl KubernetesBackend {
    pub(super) async fn open_watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        self.codec.list_prefix(opts)?;
        let api = self.api(&opts.kind, opts.namespace.as_deref())?;
        let from = match &opts.revision {
            Some(r) => r.to_string(),
            None => {
                let page = api
                    .list(&ListParams::default().limit(1))
                    .await
                    .map_err(|e| map_err(e, None, None))?;
                page.metadata.resource_version.unwrap_or_default()
            }
        };
        let wp = WatchParams::default().timeout(290);
        let requested = Revision::from(from.as_str());
        let stream = api
            .watch(&wp, &from)
            .await
            .map_err(|e| map_err(e, None, Some(&requested)))?;
        let kind = opts.kind.clone();
        let opts = opts.clone();
        let this = self.clone();
        let at = requested.clone();
        let events = stream
            .map_err(move |e| map_err(e, None, Some(&at)))
            .filter_map(move |item| {
                let out = match item {
                    Err(e) => Some(Err(e)),
                    Ok(KubeEvent::Bookmark(b)) => Some(Ok(WatchEvent::Bookmark(Revision::from(
                        b.metadata.resource_version,
                    )))),
                    Ok(KubeEvent::Error(s)) => Some(Err(status_err(&s, None, Some(&requested)))),
                    Ok(KubeEvent::Added(o)) => convert(&this, &kind, &opts, o, true),
                    Ok(KubeEvent::Modified(o)) => convert(&this, &kind, &opts, o, false),
                    Ok(KubeEvent::Deleted(o)) => match this.decode(&kind, o) {
                        Ok(k) if opts.matches(&k.key) => Some(Ok(WatchEvent::Deleted {
                            key: k.key.clone(),
                            revision: k.revision.clone().unwrap_or_else(|| Revision::from("")),
                            old: Some(k),
                        })),
                        Ok(_) => None,
                        // Gone without a readable value: still gone.
                        Err(f) => {
                            let f = *f;
                            let revision = f.revision.unwrap_or_else(|| Revision::from(""));
                            f.key.filter(|key| opts.matches(key)).map(|key| {
                                Ok(WatchEvent::Deleted {
                                    key,
                                    revision,
                                    old: None,
                                })
                            })
                        }
                    },
                };
                futures::future::ready(out)
            });
        // An error ends the stream; so does the server closing it, which is retryable.
        let ended = futures::stream::once(async {
            Err(Error::unavailable("the API server closed the watch"))
        });
        Ok(fuse_after_error(events.chain(ended)))
    }
}

/// The watch event of an added or modified object, if `opts` covers it.
fn convert(
    this: &KubernetesBackend,
    kind: &str,
    opts: &ListOptions,
    obj: DynamicObject,
    created: bool,
) -> Option<Result<WatchEvent>> {
    put_event(opts, this.decode(kind, obj), created, None).map(Ok)
}
