//! Conversions between etcd's types and kvsync's.

use std::time::Duration;

use etcd_client::KeyValue;
use kvsync_model::{Json, KVPair, ParseFailure, PathCodec, Revision};
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::error::{Error, Result};

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
