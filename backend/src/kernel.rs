//! What every backend does the same way, written once: validating and encoding writes,
//! decoding stored entries, revision parsing, preconditions, list filtering, watch events and
//! a watch that ends after its first error.

use futures::StreamExt;
use kvsync_model::{
    DeleteOptions, Json, KVList, KVPair, KindInfo, ListOptions, ParseFailure, PathCodec,
    ResourceKey, Revision,
};

use crate::client::WriteMode;
use crate::watch::WatchEvent;

use crate::error::{Error, Result};

/// A revision of a backend whose revisions are one global counter (memory, SQLite, etcd).
///
/// # Errors
/// [`Error::Invalid`] when `r` is not such a revision (one from another backend).
pub(crate) fn counter_revision(r: &Revision, backend: &str) -> Result<u64> {
    r.as_u64()
        .filter(|n| i64::try_from(*n).is_ok())
        .ok_or_else(|| {
            Error::invalid(
                "revision",
                format!("{r:?} is not a revision of the {backend} backend"),
            )
        })
}

/// Checks a delete's preconditions against the key's current revision and uid.
///
/// # Errors
/// [`Error::Conflict`] when the revision or the uid differs.
pub(crate) fn check_delete(
    key: &ResourceKey,
    opts: &DeleteOptions,
    revision: &Revision,
    uid: Option<&str>,
) -> Result<()> {
    if let Some(expected) = &opts.revision
        && expected != revision
    {
        return Err(Error::Conflict {
            key: key.clone(),
            expected: Some(expected.clone()),
            actual: Some(revision.clone()),
        });
    }
    if let Some(expected) = &opts.uid
        && uid != Some(expected.as_str())
    {
        return Err(Error::Conflict {
            key: key.clone(),
            expected: None,
            actual: Some(revision.clone()),
        });
    }
    Ok(())
}

/// Checks a write against what it finds: create needs the key absent, update present (and at
/// `expected` when given), apply either. `current` is the key's current revision, `None`
/// when it is absent.
///
/// # Errors
/// [`Error::AlreadyExists`], [`Error::NotFound`] or [`Error::Conflict`]; nothing is written.
pub(crate) fn check_write(
    key: &ResourceKey,
    mode: WriteMode,
    expected: Option<&Revision>,
    current: Option<&Revision>,
) -> Result<()> {
    match (mode, current) {
        (WriteMode::Create, Some(_)) => Err(Error::AlreadyExists { key: key.clone() }),
        (WriteMode::Update, None) => Err(Error::NotFound { key: key.clone() }),
        (WriteMode::Update, Some(current)) => check_update(key, expected, current),
        _ => Ok(()),
    }
}

/// Checks an update's revision precondition against the key's current revision.
///
/// # Errors
/// [`Error::Conflict`] when the key was written since `expected`.
pub(crate) fn check_update(
    key: &ResourceKey,
    expected: Option<&Revision>,
    revision: &Revision,
) -> Result<()> {
    match expected {
        Some(e) if e != revision => Err(Error::Conflict {
            key: key.clone(),
            expected: Some(e.clone()),
            actual: Some(revision.clone()),
        }),
        _ => Ok(()),
    }
}

/// `items` ending after their first error, as a [`WatchStream`] and the pages of a list
/// promise.
pub(crate) fn fuse_after_error<T: Send + 'static>(
    items: impl futures::Stream<Item = Result<T>> + Send + 'static,
) -> futures::stream::BoxStream<'static, Result<T>> {
    items
        .scan(false, |failed, item| {
            if *failed {
                return futures::future::ready(None);
            }
            *failed = item.is_err();
            futures::future::ready(Some(item))
        })
        .boxed()
}

/// A list delivered as one page (for backends that read a list in one go).
pub(crate) fn one_page(list: KVList) -> crate::client::ListPages {
    futures::stream::iter([Ok(list)]).boxed()
}

/// The value a delete returns when the last value no longer decodes: the key with its
/// metadata and a `null` value (the entry is gone either way).
pub(crate) fn undecodable_last_value(
    key: &ResourceKey,
    revision: Revision,
    create_revision: Option<Revision>,
    uid: Option<String>,
) -> KVPair {
    KVPair {
        key: key.clone(),
        value: serde_json::Value::Null.into(),
        revision: Some(revision),
        create_revision,
        uid,
        ttl: None,
    }
}

/// Validates the key and value of `kvp` against the codec's registry and returns the key's
/// path and the value's JSON bytes. Nothing is written when this fails.
///
/// # Errors
/// [`Error::Invalid`] naming the field and the rule.
pub(crate) fn encode_for_write(codec: &PathCodec, kvp: &KVPair) -> Result<(String, Vec<u8>)> {
    let info: &KindInfo = codec.validate(&kvp.key)?;
    info.validate(&kvp.value)?;
    if let Some(ttl) = kvp.ttl
        && ttl.is_zero()
    {
        return Err(Error::invalid("ttl", "must be longer than zero"));
    }
    let bytes =
        serde_json::to_vec(&kvp.value).map_err(|e| Error::invalid("value", e.to_string()))?;
    Ok((codec.to_path(&kvp.key)?, bytes))
}

/// Decodes a stored entry's path into a key and checks its value is JSON (decoding it only
/// when it is looked at, see [`Json`]), or says why it cannot.
///
/// # Errors
/// A [`ParseFailure`] with the raw path and bytes (and the key, when only the value is bad).
pub(crate) fn decode_entry(
    codec: &PathCodec,
    path: &str,
    bytes: &[u8],
    revision: Option<Revision>,
) -> Result<(ResourceKey, Json), Box<ParseFailure>> {
    let fail = |key: Option<ResourceKey>, reason: String| {
        Box::new(ParseFailure {
            raw_key: path.to_owned(),
            raw_value: bytes.to_vec(),
            key,
            revision: revision.clone(),
            reason,
        })
    };
    let key = codec
        .from_path(path)
        .map_err(|e| fail(None, e.to_string()))?;
    match serde_json::from_slice::<Box<serde_json::value::RawValue>>(bytes) {
        Ok(v) => Ok((key, Json::from_raw(v))),
        Err(e) => Err(fail(Some(key), e.to_string())),
    }
}

/// Turns a parse failure into the error `get` returns for it.
pub(crate) fn parse_error(f: ParseFailure) -> Error {
    Error::Parse {
        raw_key: f.raw_key,
        raw_value: f.raw_value,
        source: f.reason.into(),
    }
}

/// A decoded entry, or why it does not decode.
pub(crate) type Decoded = Result<KVPair, Box<ParseFailure>>;

/// Adds a decoded entry to a list if `opts` covers it: good ones to the items, undecodable
/// ones (whose key, where known, is covered) to the parse failures.
pub(crate) fn push_listed(list: &mut KVList, opts: &ListOptions, entry: Decoded) {
    match entry {
        Ok(kvp) if opts.matches(&kvp.key) => list.items.push(kvp),
        Ok(_) => {}
        Err(f) if f.key.as_ref().is_none_or(|k| opts.matches(k)) => list.parse_failures.push(*f),
        Err(_) => {}
    }
}

/// The watch event of a stored write, if `opts` covers it: `Added` when the write created the
/// key, `Modified` (with `old` where known) otherwise, `ParseFailed` when it does not decode.
pub(crate) fn put_event(
    opts: &ListOptions,
    entry: Decoded,
    created: bool,
    old: Option<KVPair>,
) -> Option<WatchEvent> {
    match entry {
        Ok(kvp) if !opts.matches(&kvp.key) => None,
        Ok(kvp) if created => Some(WatchEvent::Added(kvp)),
        Ok(kvp) => Some(WatchEvent::Modified { new: kvp, old }),
        Err(f) if f.key.as_ref().is_none_or(|k| opts.matches(k)) => {
            Some(WatchEvent::ParseFailed(*f))
        }
        Err(_) => None,
    }
}

/// Checks a lease's TTL: at least a second (etcd's unit), at most a year.
///
/// # Errors
/// [`Error::Invalid`] naming the rule.
pub(crate) fn check_lease_ttl(ttl: std::time::Duration) -> Result<()> {
    if ttl < std::time::Duration::from_secs(1) || ttl > std::time::Duration::from_secs(365 * 86_400)
    {
        return Err(Error::invalid(
            "ttl",
            format!("a lease lives from 1 s to a year, not {ttl:?}"),
        ));
    }
    Ok(())
}

/// The state of a watch that tails a revision log (memory, SQLite): the backend, the signal
/// of new revisions, what it watches, where it is, and the events read but not yet yielded.
/// Each backend implements reading the log on its own instantiation.
pub(crate) struct LogTail<B, R, E> {
    pub(crate) backend: B,
    pub(crate) rx: tokio::sync::watch::Receiver<R>,
    pub(crate) opts: ListOptions,
    pub(crate) prefix: String,
    pub(crate) after: R,
    pub(crate) buf: std::collections::VecDeque<E>,
}

impl<B, R, E> LogTail<B, R, E> {
    /// A tail of `backend`'s log after revision `after`, for the keys of `opts` under `prefix`.
    pub(crate) fn new(
        backend: B,
        rx: tokio::sync::watch::Receiver<R>,
        opts: &ListOptions,
        prefix: String,
        after: R,
    ) -> Self {
        LogTail {
            backend,
            rx,
            opts: opts.clone(),
            prefix,
            after,
            buf: std::collections::VecDeque::new(),
        }
    }

    /// The watch stream that `next` yields, ending after its first error.
    pub(crate) fn into_stream<F, Fut>(self, next: F) -> crate::watch::WatchStream
    where
        Self: Send + 'static,
        F: FnMut(Self) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Option<(Result<WatchEvent>, Self)>> + Send + 'static,
    {
        fuse_after_error(futures::stream::unfold(self, next))
    }
}

/// A number in [0, 1) for jitter, without a random number crate.
pub(crate) fn rand_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos().into()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
