//! The wire protocol (server/PROTOCOL.md): length-prefixed JSON frames over a byte stream.

use kvsync_model::{KVPair, ResourceKey, Revision};
use kvsync_syncer::SyncStatus;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;

/// The largest frame either side accepts by default (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// How many buckets the keys are hashed into for resync digests.
pub const BUCKETS: usize = 256;

/// Where a client was: the server's epoch and the position of the last frame it applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The epoch of the server that sent the position (a server's epoch changes when it
    /// restarts; positions of another epoch mean nothing).
    pub epoch: u64,
    /// The position of the last frame applied.
    pub position: u64,
}

/// How the server brings a client up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Only the frames after the client's position, from the server's log.
    Resume,
    /// The buckets whose digests differ from the client's, then the log.
    Resync,
    /// Every bucket (the client held nothing), then the log.
    Snapshot,
}

/// The status on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireStatus {
    /// [`SyncStatus::WaitForDatastore`].
    WaitForDatastore,
    /// [`SyncStatus::ResyncInProgress`].
    ResyncInProgress,
    /// [`SyncStatus::InSync`].
    InSync,
}

impl From<SyncStatus> for WireStatus {
    fn from(s: SyncStatus) -> Self {
        match s {
            SyncStatus::WaitForDatastore => WireStatus::WaitForDatastore,
            SyncStatus::ResyncInProgress => WireStatus::ResyncInProgress,
            SyncStatus::InSync => WireStatus::InSync,
        }
    }
}

impl From<WireStatus> for SyncStatus {
    fn from(s: WireStatus) -> Self {
        match s {
            WireStatus::WaitForDatastore => SyncStatus::WaitForDatastore,
            WireStatus::ResyncInProgress => SyncStatus::ResyncInProgress,
            WireStatus::InSync => SyncStatus::InSync,
        }
    }
}

/// One key's state on the wire: its value (absent once deleted) at its revision.
#[derive(Debug, Deserialize)]
pub struct WireUpdate {
    /// The key.
    pub key: ResourceKey,
    /// The revision, as the datastore names it.
    pub revision: String,
    /// The value's JSON text; absent for a deletion.
    #[serde(default)]
    pub value: Option<Box<RawValue>>,
}

/// A control message, as a client or a server sends it. Batches and resync buckets are
/// built by [`updates_frame`] and [`bucket_frame`] (values spliced in as stored text) and read
/// as [`Incoming`].
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Client -> server, first: who it is, what it speaks, where it was, what it holds.
    Hello {
        /// [`VERSION`].
        version: u32,
        /// A name for the server's logs.
        client: String,
        /// Optional features the client speaks (none are defined in version 1).
        #[serde(default)]
        features: Vec<String>,
        /// Where it was, if it followed this server (or a replica) before.
        #[serde(default)]
        resume: Option<Resume>,
        /// The digest of each bucket of what it holds ([`BUCKETS`] of them), for a resync
        /// that sends only what differs; absent when it holds nothing.
        #[serde(default)]
        digests: Option<Vec<u64>>,
    },
    /// Server -> client: accepted, and how it will be brought up to date.
    Welcome {
        /// [`VERSION`].
        version: u32,
        /// The server's epoch.
        epoch: u64,
        /// For a resync or snapshot: the position the buckets are at.
        position: u64,
        /// Resume, resync or snapshot.
        mode: Mode,
        /// Optional features both sides speak.
        #[serde(default)]
        features: Vec<String>,
    },
    /// Server -> client: refused, with why; the server closes the connection.
    Refused {
        /// Why.
        reason: String,
    },
    /// Server -> client: the upstream Syncer's status, at a position of the log (or, sent to
    /// one client once it has caught up with the log, the status now).
    Status {
        /// The frame's position.
        position: u64,
        /// The status.
        status: WireStatus,
    },
    /// Server -> client: the resync's buckets are all sent.
    ResyncDone {
        /// The position the buckets were at.
        position: u64,
    },
    /// Either way: are you there?
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Either way: the answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Server -> client: the server is going away (a planned shutdown, or the client fell
    /// behind the log); reconnect, resuming from the position given.
    GoAway {
        /// The server's epoch.
        epoch: u64,
        /// The position of the last frame sent to this client.
        position: u64,
        /// Why.
        reason: String,
    },
}

/// What a client reads: a batch, a resync's bucket (both with values as raw JSON text), or a
/// control message.
#[derive(Debug)]
pub enum Incoming {
    /// A batch of the upstream Syncer at a position of the log ([`updates_frame`]).
    Updates {
        /// The frame's position.
        position: u64,
        /// The batch.
        updates: Vec<WireUpdate>,
    },
    /// During a resync, the whole content of one bucket ([`bucket_frame`]).
    Bucket {
        /// The bucket.
        bucket: u16,
        /// Everything the server holds in it.
        entries: Vec<WireUpdate>,
    },
    /// Any other message.
    Control(Message),
}

impl Incoming {
    /// Decodes a frame's body. Batches are read with their values as raw JSON text (serde
    /// cannot keep raw text inside an internally tagged enum, so the tag is read first).
    ///
    /// # Errors
    /// When the body is not a message.
    pub fn decode(body: &[u8]) -> Result<Incoming, serde_json::Error> {
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        #[derive(Deserialize)]
        struct Updates {
            position: u64,
            updates: Vec<WireUpdate>,
        }
        #[derive(Deserialize)]
        struct Bucket {
            bucket: u16,
            entries: Vec<WireUpdate>,
        }
        let tag: Tag<'_> = serde_json::from_slice(body)?;
        Ok(match &*tag.kind {
            "updates" => {
                let u: Updates = serde_json::from_slice(body)?;
                Incoming::Updates {
                    position: u.position,
                    updates: u.updates,
                }
            }
            "bucket" => {
                let b: Bucket = serde_json::from_slice(body)?;
                Incoming::Bucket {
                    bucket: b.bucket,
                    entries: b.entries,
                }
            }
            _ => Incoming::Control(serde_json::from_slice::<Message>(body)?),
        })
    }
}

/// An error of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame over the limit.
    #[error("a frame of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// The frame's announced size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A frame that is not a message of the protocol.
    #[error("a frame that is not a message: {0}")]
    Garbage(#[from] serde_json::Error),
    /// The peer does not follow the protocol.
    #[error("{0}")]
    Unexpected(String),
}

/// A message as a frame: its length (4 bytes, big-endian) then its JSON.
///
/// # Panics
/// Never: a message always serializes.
pub fn frame(message: &Message) -> Vec<u8> {
    let body = serde_json::to_vec(message).unwrap_or_default();
    framed(body)
}

fn framed(mut body: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.append(&mut body);
    out
}

/// Appends one update's JSON to `out`: the value's stored text is spliced in as it is.
fn push_update(out: &mut Vec<u8>, kvp: &KVPair, deleted: bool) {
    out.extend_from_slice(b"{\"key\":");
    out.extend_from_slice(&serde_json::to_vec(&kvp.key).unwrap_or_default());
    out.extend_from_slice(b",\"revision\":");
    let rev = kvp
        .revision
        .as_ref()
        .map(Revision::to_string)
        .unwrap_or_default();
    out.extend_from_slice(&serde_json::to_vec(&rev).unwrap_or_default());
    if !deleted {
        out.extend_from_slice(b",\"value\":");
        match kvp.value.json_text() {
            Some(text) => out.extend_from_slice(text.as_bytes()),
            None => out.extend_from_slice(kvp.value.to_string().as_bytes()),
        }
    }
    out.push(b'}');
}

/// The frame of a batch: encoded once, sent as the same bytes to every client.
pub fn updates_frame<'a>(
    position: u64,
    updates: impl IntoIterator<Item = (&'a KVPair, bool)>,
) -> Vec<u8> {
    let mut body =
        format!("{{\"type\":\"updates\",\"position\":{position},\"updates\":[").into_bytes();
    for (i, (kvp, deleted)) in updates.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        push_update(&mut body, kvp, deleted);
    }
    body.extend_from_slice(b"]}");
    framed(body)
}

/// The frame of one bucket's whole content, for a resync.
pub fn bucket_frame<'a>(bucket: u16, entries: impl IntoIterator<Item = &'a KVPair>) -> Vec<u8> {
    let mut body = format!("{{\"type\":\"bucket\",\"bucket\":{bucket},\"entries\":[").into_bytes();
    for (i, kvp) in entries.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        push_update(&mut body, kvp, false);
    }
    body.extend_from_slice(b"]}");
    framed(body)
}

/// Reads one frame's body, refusing one over `limit` bytes before reading it.
///
/// # Errors
/// [`ProtocolError::Io`] when the connection closes or fails; [`ProtocolError::TooLarge`].
pub async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(ProtocolError::TooLarge { size, limit });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body).await?;
    Ok(body)
}

/// Writes a whole frame.
///
/// # Errors
/// When the connection fails.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    frame: &[u8],
) -> Result<(), ProtocolError> {
    w.write_all(frame).await?;
    Ok(())
}

/// The FNV-1a hash of bytes: stable across processes, versions and machines, as the digests
/// of both sides must be.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            // A separator, so that ("ab", "c") and ("a", "bc") differ.
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The bucket of a key: the FNV-1a of `kind`, `namespace` (empty for cluster-scoped kinds)
/// and `name`, modulo [`BUCKETS`].
pub fn bucket_of(key: &ResourceKey) -> u16 {
    let h = fnv1a(&[
        key.kind.as_bytes(),
        key.namespace.as_deref().unwrap_or("").as_bytes(),
        key.name.as_bytes(),
    ]);
    (h % BUCKETS as u64) as u16
}

/// A key's contribution to its bucket's digest: the FNV-1a of its kind, namespace, name and
/// revision. A bucket's digest is the XOR of its keys' contributions, so it is kept up to date
/// in constant time per change.
pub fn contribution(key: &ResourceKey, revision: &str) -> u64 {
    fnv1a(&[
        key.kind.as_bytes(),
        key.namespace.as_deref().unwrap_or("").as_bytes(),
        key.name.as_bytes(),
        revision.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_splice_the_stored_text() {
        let kvp = KVPair::new(
            ResourceKey::cluster("IPPool", "a"),
            serde_json::json!({"cidr": "10.0.0.0/16"}),
        )
        .with_revision(Revision::from(7u64));
        let f = updates_frame(3, [(&kvp, false), (&kvp, true)]);
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let Incoming::Updates { position, updates } = Incoming::decode(&f[4..]).unwrap() else {
            panic!("updates");
        };
        assert_eq!(position, 3);
        assert_eq!(updates[0].key, kvp.key);
        assert_eq!(updates[0].revision, "7");
        assert_eq!(
            updates[0].value.as_ref().unwrap().get(),
            r#"{"cidr":"10.0.0.0/16"}"#
        );
        assert!(updates[1].value.is_none());
    }

    #[test]
    fn buckets_and_digests_are_stable() {
        let k = ResourceKey::namespaced("NetworkPolicy", "prod", "p");
        assert_eq!(bucket_of(&k), bucket_of(&k.clone()));
        assert_ne!(contribution(&k, "1"), contribution(&k, "2"));
        assert_ne!(
            fnv1a(&[b"ab", b"c"]),
            fnv1a(&[b"a", b"bc"]),
            "parts are separated"
        );
        // Fixed values: a change of the hash is a change of the protocol.
        assert_eq!(fnv1a(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
    }
}
