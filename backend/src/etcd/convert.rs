//! Conversions between etcd's types and kvsync's.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchResponse};
use kvsync_model::{Json, KVPair, ListOptions, ParseFailure, PathCodec, Revision};
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::error::{Error, Result};
use crate::kernel::put_event;
use crate::watch::WatchEvent;

/// The stored form of a value: metadata kvsync keeps beside the resource.
#[derive(Serialize)]
pub(super) struct Envelope<'a> {
    metadata: MetadataOut<'a>,
    spec: &'a Json,
}

#[derive(Serialize)]
struct MetadataOut<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<f64>,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    metadata: MetadataIn,
    /// Kept as text, in place: decoded only when looked at (see [`Json::from_part_of`]).
    #[serde(borrow)]
    spec: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct MetadataIn {
    uid: String,
    #[serde(default)]
    ttl: Option<f64>,
}

#[derive(Deserialize)]
struct UidOnly {
    metadata: UidMeta,
}

#[derive(Deserialize)]
struct UidMeta {
    uid: String,
}

impl Envelope<'_> {
    pub(super) fn encode(uid: &str, ttl: Option<Duration>, value: &Json) -> Result<Vec<u8>> {
        serde_json::to_vec(&Envelope {
            metadata: MetadataOut {
                uid,
                ttl: ttl.map(|t| t.as_secs_f64()),
            },
            spec: value,
        })
        .map_err(|e| Error::invalid("value", e.to_string()))
    }

    pub(super) fn uid_of(bytes: &[u8]) -> Option<String> {
        serde_json::from_slice::<UidOnly>(bytes)
            .ok()
            .map(|u| u.metadata.uid)
    }
}

/// A revision given back to etcd.
pub(super) fn rev_i64(r: &Revision) -> Result<i64> {
    // counter_revision only passes revisions that fit an i64.
    Ok(crate::kernel::counter_revision(r, "etcd")? as i64)
}

/// Decodes a stored key/value into a KVPair.
pub(super) fn decode_kv(codec: &PathCodec, kv: &KeyValue) -> Result<KVPair, Box<ParseFailure>> {
    decode_parts(
        codec,
        kv.key(),
        kv.value().to_vec(),
        kv.mod_revision(),
        kv.create_revision(),
    )
}

/// Like [`decode_kv`], keeping the stored bytes rather than copying them (for lists).
pub(super) fn decode_owned_kv(
    codec: &PathCodec,
    kv: KeyValue,
) -> Result<KVPair, Box<ParseFailure>> {
    let (mod_revision, create_revision) = (kv.mod_revision(), kv.create_revision());
    let (key, value) = kv.into_key_value();
    decode_parts(codec, &key, value, mod_revision, create_revision)
}

fn decode_parts(
    codec: &PathCodec,
    raw_key: &[u8],
    value: Vec<u8>,
    mod_revision: i64,
    create_revision: i64,
) -> Result<KVPair, Box<ParseFailure>> {
    let revision = Revision::from(mod_revision as u64);
    let path = String::from_utf8_lossy(raw_key);
    let fail = |key, raw_value, reason: String| {
        Box::new(ParseFailure {
            raw_key: path.to_string(),
            raw_value,
            key,
            revision: Some(revision.clone()),
            reason,
        })
    };
    let key = match codec.from_path(&path) {
        Ok(key) => key,
        Err(e) => return Err(fail(None, value, e.to_string())),
    };
    let text = match String::from_utf8(value) {
        Ok(text) => text,
        Err(e) => {
            let reason = format!("not a kvsync value: {e}");
            return Err(fail(Some(key), e.into_bytes(), reason));
        }
    };
    let parsed = Json::from_part_of(text, |t| {
        serde_json::from_str::<EnvelopeIn>(t).map(|env| (env.spec, env.metadata))
    });
    let (value, metadata) = match parsed {
        Ok(parsed) => parsed,
        Err((e, text)) => {
            return Err(fail(
                Some(key),
                text.into_bytes(),
                format!("not a kvsync value: {e}"),
            ));
        }
    };
    Ok(KVPair {
        key,
        value,
        revision: Some(revision),
        create_revision: Some(Revision::from(create_revision as u64)),
        uid: Some(metadata.uid),
        ttl: metadata
            .ttl
            .and_then(|s| Duration::try_from_secs_f64(s).ok()),
    })
}

/// Maps an etcd-client error onto the crate's kinds, keeping it as the source.
pub(super) fn map_err(e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let message = status.message().to_owned();
            match status.code() {
                Code::PermissionDenied | Code::Unauthenticated => Error::Unauthorized { message },
                // The callers that know the revision they asked for put it in (see
                // `EtcdBackend::map_read_err`); etcd's message does not carry it.
                Code::OutOfRange if message.contains("compacted") => Error::Compacted {
                    requested: Revision::from("unknown"),
                    compacted: None,
                },
                Code::InvalidArgument if message.contains("authentication failed") => {
                    Error::Unauthorized { message }
                }
                Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted => {
                    Error::Invalid {
                        field: "request".into(),
                        reason: format!("etcd refused it: {message}"),
                    }
                }
                _ => Error::Unavailable {
                    message: format!("etcd: {message} ({:?})", status.code()),
                    source: Some(Box::new(status)),
                },
            }
        }
        E::InvalidArgs(m) => Error::invalid("etcd", m),
        E::InvalidUri(u) => Error::invalid("endpoints", u.to_string()),
        other => Error::Unavailable {
            message: other.to_string(),
            source: Some(Box::new(other)),
        },
    }
}

/// A running watch: the etcd stream, events not yet taken, and a progress timer.
pub(super) struct WatchState {
    codec: PathCodec,
    opts: ListOptions,
    stream: etcd_client::WatchStream,
    buf: VecDeque<Result<WatchEvent>>,
    last: i64,
    /// The revision the watch follows on from: events at or before it are not reported.
    from: i64,
    /// How long to idle before requesting progress; `None` where requested progress cannot be
    /// trusted.
    progress_every: Option<Duration>,
}

impl WatchState {
    pub(super) fn new(
        codec: PathCodec,
        opts: ListOptions,
        stream: etcd_client::WatchStream,
        first: WatchResponse,
        from: i64,
        progress_every: Option<Duration>,
    ) -> Self {
        let mut s = WatchState {
            codec,
            opts,
            stream,
            buf: VecDeque::new(),
            last: from,
            from,
            progress_every,
        };
        s.absorb(first);
        s
    }

    /// Turns one response into events (or a final error).
    fn absorb(&mut self, resp: WatchResponse) {
        if resp.compact_revision() > 0 {
            self.buf.push_back(Err(Error::Compacted {
                requested: Revision::from(self.last.max(0) as u64),
                compacted: Some(Revision::from(resp.compact_revision() as u64)),
            }));
            return;
        }
        if resp.canceled() {
            self.buf.push_back(Err(Error::unavailable(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            ))));
            return;
        }
        let events = resp.events();
        if events.is_empty() {
            // A progress notification: everything up to the header's revision was sent. An
            // answer to a progress request (watch id -1) counts only where such answers are
            // in order with events.
            let requested = resp.watch_id() == -1;
            if !resp.created()
                && (!requested || self.progress_every.is_some())
                && let Some(rev) = resp.header().map(|h| h.revision())
                && rev > self.last
            {
                self.last = rev;
                self.buf
                    .push_back(Ok(WatchEvent::Bookmark(Revision::from(rev as u64))));
            }
            return;
        }
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            // The watch starts at the revision it was asked to follow, which was seen already.
            if kv.mod_revision() <= self.from {
                continue;
            }
            self.last = self.last.max(kv.mod_revision());
            let converted = match ev.event_type() {
                EventType::Put => put_event(
                    &self.opts,
                    decode_kv(&self.codec, kv),
                    kv.create_revision() == kv.mod_revision(),
                    None,
                ),
                EventType::Delete => {
                    let path = String::from_utf8_lossy(kv.key());
                    match self.codec.from_path(&path) {
                        Ok(key) if self.opts.matches(&key) => Some(WatchEvent::Deleted {
                            key,
                            revision: Revision::from(kv.mod_revision() as u64),
                            old: ev.prev_kv().and_then(|p| decode_kv(&self.codec, p).ok()),
                        }),
                        _ => None,
                    }
                }
            };
            if let Some(c) = converted {
                self.buf.push_back(Ok(c));
            }
        }
    }

    pub(super) async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            // After an error the stream ends (fuse_after_error): nothing more is read.
            if let Some(item) = self.buf.pop_front() {
                return Some((item, self));
            }
            let next = self.stream.message();
            let msg = match self.progress_every {
                None => Ok(next.await),
                Some(every) => tokio::time::timeout(every, next).await,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(_) => {
                    // Idle: ask for a progress notification to keep the resume point fresh.
                    if let Err(e) = self.stream.request_progress().await {
                        return Some((Err(map_err(e)), self));
                    }
                    continue;
                }
            };
            match msg {
                Ok(Some(resp)) => self.absorb(resp),
                Ok(None) => {
                    return Some((
                        Err(Error::unavailable("etcd closed the watch stream")),
                        self,
                    ));
                }
                Err(e) => return Some((Err(map_err(e)), self)),
            }
        }
    }
}
