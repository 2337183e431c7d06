//! Watches from a resourceVersion, with bookmarks, that outlive the API server's own ends:
//!
//! - a normal close (the server's `timeoutSeconds`, a restart of the watch cache) reopens the
//!   watch from the last resourceVersion seen, without an error to the consumer;
//! - a watch silent for longer than [`KubernetesConfig::watch_idle_timeout`] (no event, no
//!   bookmark: the API server sends one about every minute) is treated as dead and reopened
//!   the same way;
//! - `410 Gone` ends the stream with [`Error::Compacted`](crate::Error::Compacted) (the caller relists), and other
//!   errors end it with their kind.
//!
//! Reopens that the server closes again at once back off (100 ms doubling up to 5 s), so a
//! server that keeps ending watches is not stormed.
//!
//! [`KubernetesConfig::watch_idle_timeout`]: super::KubernetesConfig::watch_idle_timeout

use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, WatchParams};
use kube::core::Request;
use kvsync_model::{ListOptions, Revision};

use super::KubernetesBackend;
use super::convert::{map_err, status_err};
use super::slim::{self, SlimEvent, SlimStream};
use crate::error::Result;
use crate::kernel::{fuse_after_error, put_event};
use crate::watch::{WatchEvent, WatchStream};

/// How long the API server may keep one watch open (it picks its own, shorter, limit too).
pub(super) const WATCH_TIMEOUT_SECS: u32 = 290;

/// One watch, reopened from `last` as the server ends its streams.
struct Resuming {
    this: KubernetesBackend,
    /// The URL path of the kind's objects.
    url: String,
    opts: ListOptions,
    /// The last resourceVersion seen (of an event or a bookmark).
    last: String,
    stream: Option<SlimStream>,
    /// Whether the current stream delivered anything yet.
    delivered: bool,
    /// The pause before the next reopen, after streams that ended without delivering.
    backoff: Duration,
}

impl Resuming {
    async fn open(&mut self) -> Result<()> {
        let wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
        let at = Revision::from(self.last.as_str());
        let request = Request::new(&self.url)
            .watch(&wp, &self.last)
            .map_err(|e| crate::Error::invalid("watch", e.to_string()))?;
        let stream = slim::watch_events(&self.this.client, request)
            .await
            .map_err(|e| map_err(e, None, Some(&at)))?;
        self.stream = Some(stream);
        self.delivered = false;
        Ok(())
    }

    /// Drops the current stream; the next one opens after a pause when this one brought
    /// nothing.
    async fn reopen_later(&mut self, why: &str) {
        self.stream = None;
        if self.delivered {
            self.backoff = Duration::ZERO;
        } else {
            self.backoff =
                (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
            tokio::time::sleep(self.backoff).await;
        }
        tracing::debug!(kind = %self.opts.kind, from = %self.last, why, "reopening the watch");
    }

    /// The next event for the consumer: `None` never comes (errors end the stream).
    async fn next(&mut self) -> Result<WatchEvent> {
        let idle = self.this.watch_idle_timeout;
        loop {
            if self.stream.is_none() {
                self.open().await?;
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            let item = match tokio::time::timeout(idle, stream.next()).await {
                Err(_) => {
                    tracing::warn!(
                        kind = %self.opts.kind,
                        idle = ?idle,
                        "a watch brought nothing, not even a bookmark, for too long: reopening it"
                    );
                    self.reopen_later("idle").await;
                    continue;
                }
                Ok(None) => {
                    self.reopen_later("closed by the server").await;
                    continue;
                }
                Ok(Some(item)) => item,
            };
            self.delivered = true;
            let event = item?;
            if let Some(out) = self.convert(event)? {
                return Ok(out);
            }
        }
    }

    /// The consumer's event for one of the server's, if `opts` covers it; notes its
    /// resourceVersion as the place to resume from.
    fn convert(&mut self, event: SlimEvent) -> Result<Option<WatchEvent>> {
        let kind = &self.opts.kind;
        let (obj, created) = match event {
            SlimEvent::Bookmark(b) => {
                let rv = b.metadata.resource_version.unwrap_or_default();
                self.last.clone_from(&rv);
                return Ok(Some(WatchEvent::Bookmark(Revision::from(rv))));
            }
            SlimEvent::Error(s) => {
                return Err(status_err(
                    &s,
                    None,
                    Some(&Revision::from(self.last.as_str())),
                ));
            }
            SlimEvent::Added(o) => (o, Some(true)),
            SlimEvent::Modified(o) => (o, Some(false)),
            SlimEvent::Deleted(o) => (o, None),
        };
        if let Some(rv) = &obj.metadata.resource_version {
            self.last.clone_from(rv);
        }
        let decoded = obj.decode(kind, &self.this.codec);
        Ok(match created {
            Some(created) => put_event(&self.opts, decoded, created, None),
            None => match decoded {
                Ok(k) if self.opts.matches(&k.key) => Some(WatchEvent::Deleted {
                    key: k.key.clone(),
                    revision: k.revision.clone().unwrap_or_else(|| Revision::from("")),
                    old: Some(k),
                }),
                Ok(_) => None,
                // Gone without a readable value: still gone.
                Err(f) => {
                    let f = *f;
                    let revision = f.revision.unwrap_or_else(|| Revision::from(""));
                    f.key
                        .filter(|key| self.opts.matches(key))
                        .map(|key| WatchEvent::Deleted {
                            key,
                            revision,
                            old: None,
                        })
                }
            },
        })
    }
}

impl KubernetesBackend {
    pub(super) async fn open_watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        self.codec.list_prefix(opts)?;
        let url = self.url_path(&opts.kind, opts.namespace.as_deref())?;
        let from = match &opts.revision {
            Some(r) => r.to_string(),
            None => {
                let request = Request::new(&url)
                    .list(&ListParams::default().limit(1))
                    .map_err(|e| crate::Error::invalid("list", e.to_string()))?;
                let page = slim::list_page(&self.client, request).await?;
                page.metadata.resource_version.unwrap_or_default()
            }
        };
        let mut watch = Resuming {
            this: self.clone(),
            url,
            opts: opts.clone(),
            last: from,
            stream: self.take_parked(opts),
            delivered: false,
            backoff: Duration::ZERO,
        };
        // The first open answers here: a refused watch is the caller's error at once.
        if watch.stream.is_none() {
            watch.open().await?;
        }
        let events = futures::stream::unfold(watch, |mut w| async move {
            let item = w.next().await;
            Some((item, w))
        });
        Ok(fuse_after_error(events))
    }
}
