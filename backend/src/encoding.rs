//! Helpers every backend shares: validating and encoding values, decoding stored entries.

use kvsync_model::{
    Json, KVList, KVPair, KindInfo, ListOptions, ParseFailure, PathCodec, ResourceKey, Revision,
};

use crate::watch::WatchEvent;

use crate::error::{Error, Result};

/// Validates the key and value of `kvp` against the codec's registry and returns the key's
/// path and the value's JSON bytes. Nothing is written when this fails.
///
/// # Errors
/// [`Error::Invalid`] naming the field and the rule.
pub fn encode_for_write(codec: &PathCodec, kvp: &KVPair) -> Result<(String, Vec<u8>)> {
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

/// Decodes a stored value.
///
/// # Errors
/// [`Error::Parse`] with the raw key and bytes when they are not JSON.
pub fn decode_value(raw_key: &str, bytes: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::Parse {
        raw_key: raw_key.to_owned(),
        raw_value: bytes.to_vec(),
        source: Box::new(e),
    })
}

/// Decodes a stored entry's path into a key and checks its value is JSON (decoding it only
/// when it is looked at, see [`Json`]), or says why it cannot.
///
/// # Errors
/// A [`ParseFailure`] with the raw path and bytes (and the key, when only the value is bad).
pub fn decode_entry(
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
pub fn parse_error(f: ParseFailure) -> Error {
    Error::Parse {
        raw_key: f.raw_key,
        raw_value: f.raw_value,
        source: f.reason.into(),
    }
}

/// What a write may find: create needs the key absent, update present, apply either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteMode {
    Create,
    Update,
    Apply,
}

/// A decoded entry, or why it does not decode.
pub type Decoded = Result<KVPair, Box<ParseFailure>>;

/// Adds a decoded entry to a list if `opts` covers it: good ones to the items, undecodable
/// ones (whose key, where known, is covered) to the parse failures.
pub fn push_listed(list: &mut KVList, opts: &ListOptions, entry: Decoded) {
    match entry {
        Ok(kvp) if opts.matches(&kvp.key) => list.items.push(kvp),
        Ok(_) => {}
        Err(f) if f.key.as_ref().is_none_or(|k| opts.matches(k)) => list.parse_failures.push(*f),
        Err(_) => {}
    }
}

/// The watch event of a stored write, if `opts` covers it: `Added` when the write created the
/// key, `Modified` (with `old` where known) otherwise, `ParseFailed` when it does not decode.
pub fn put_event(
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
