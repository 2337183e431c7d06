//! The wire protocol (server/PROTOCOL.md): length-prefixed JSON frames over a byte stream.

use kvsync_model::{KVPair, ResourceKey, Revision};
use kvsync_syncer::SyncStatus;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The protocol version this crate speaks.
pub const VERSION: u32 = 2;

/// The largest frame either side accepts by default (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// The feature of compressed frames (LZ4 blocks): a server sends them only to a client that
/// named it in its hello.
pub const FEATURE_LZ4: &str = "lz4";

/// The feature of resyncs by sketch ([`crate::sketch`]): a server asks a client that speaks it
/// for a sketch of what it holds, sized for the difference, before the bucket digests.
pub const FEATURE_RECONCILE: &str = "reconcile";

/// The finest buckets of a resync: `2^MAX_BITS` of them (enough for about two million keys at
/// two keys a bucket).
pub const MAX_BITS: u8 = 20;

/// Frames from this size on are compressed (once, when they are made) if that makes them
/// smaller by an eighth at least.
pub const COMPRESS_AT: usize = 4096;

/// The bit of a frame's length word that marks an LZ4-compressed body.
const COMPRESSED: u32 = 1 << 31;

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
    /// What differs from what the client holds (found by sketch or by bucket digests), then
    /// the log.
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
/// built by [`updates_frame`] and [`buckets_frame`] (values spliced in as stored text) and
/// read as [`Incoming`].
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Client -> server, first: who it is, what it speaks, where it was, how much it holds.
    Hello {
        /// [`VERSION`].
        version: u32,
        /// A name for the server's logs.
        client: String,
        /// Optional features the client speaks ([`FEATURE_LZ4`]).
        #[serde(default)]
        features: Vec<String>,
        /// Where it was, if it followed this server (or a replica) before.
        #[serde(default)]
        resume: Option<Resume>,
        /// How many keys it holds (0: nothing, so a snapshot rather than a resync).
        #[serde(default)]
        holds: u64,
    },
    /// Server -> client, when the client cannot resume and holds something: send the digests
    /// of what you hold, in `2^bits` buckets.
    SendDigests {
        /// The buckets' bits (at most [`MAX_BITS`]).
        bits: u8,
    },
    /// Server -> client, when the client cannot resume, holds something and speaks
    /// [`FEATURE_RECONCILE`]: send a sketch of what you hold, of `cells` cells.
    SendSketch {
        /// The sketch's cells (a multiple of 3).
        cells: u32,
    },
    /// Client -> server: the sketch asked for ([`crate::sketch::Sketch::encode`]) of the
    /// contributions of the keys it holds.
    Sketch {
        /// The cells, as asked.
        cells: u32,
        /// [`crate::sketch::CELL_BYTES`] a cell, in base64.
        sketch: String,
    },
    /// Server -> client, in a resync by sketch after the entries: the contributions of what
    /// the client holds and the server does not (old revisions and deleted keys); the keys
    /// still held at one of them are deleted.
    Gone {
        /// The contributions.
        ids: Vec<u64>,
    },
    /// Client -> server: the digests asked for ([`encode_digests`]).
    Digests {
        /// The buckets' bits, as asked.
        bits: u8,
        /// `2^bits` digests, each 8 bytes little-endian, in base64 (standard, padded).
        digests: String,
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
        /// The XOR of the contributions of every key the server holds at that position: the
        /// client checks what it holds against it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<u64>,
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

/// What a client reads: a batch, a resync's buckets (both with values as raw JSON text), or a
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
    /// During a resync or snapshot, the whole content of some buckets ([`buckets_frame`]).
    Buckets {
        /// The buckets' bits.
        bits: u8,
        /// The buckets covered, as half-open ranges `[from, to)`.
        ranges: Vec<(u32, u32)>,
        /// Everything the server holds in them.
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
        struct Buckets {
            bits: u8,
            ranges: Vec<(u32, u32)>,
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
            "buckets" => {
                let b: Buckets = serde_json::from_slice(body)?;
                Incoming::Buckets {
                    bits: b.bits,
                    ranges: b.ranges,
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
    /// A compressed frame that does not decompress, or digests that do not decode.
    #[error("a corrupt frame: {0}")]
    Corrupt(String),
    /// The peer does not follow the protocol.
    #[error("{0}")]
    Unexpected(String),
}

/// A message as a frame: its length (4 bytes, big-endian) then its JSON.
pub fn frame(message: &Message) -> Vec<u8> {
    let body = serde_json::to_vec(message).unwrap_or_default();
    framed(body)
}

/// A body as a frame (uncompressed).
pub(crate) fn framed(mut body: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX) & !COMPRESSED;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.append(&mut body);
    out
}

/// The frame compressed (an LZ4 block after its uncompressed size, 4 bytes little-endian,
/// with the length word's top bit set) when it is at least [`COMPRESS_AT`] bytes and that
/// saves an eighth of it at least; otherwise the frame as it is.
pub fn compressed(frame: Vec<u8>) -> Vec<u8> {
    let body = frame.get(4..).unwrap_or_default();
    if body.len() < COMPRESS_AT || is_compressed(&frame) {
        return frame;
    }
    let packed = lz4_flex::block::compress(body);
    if packed.len() + 4 > body.len() - body.len() / 8 {
        return frame;
    }
    let len = u32::try_from(packed.len() + 4).unwrap_or(u32::MAX) | COMPRESSED;
    let mut out = Vec::with_capacity(packed.len() + 8);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&packed);
    out
}

/// Whether a frame's body is compressed.
pub fn is_compressed(frame: &[u8]) -> bool {
    frame
        .first()
        .is_some_and(|b| u32::from(*b) << 24 & COMPRESSED != 0)
}

/// The frame as a peer without [`FEATURE_LZ4`] reads it: decompressed when it was compressed.
///
/// # Errors
/// [`ProtocolError::Corrupt`] when a compressed body does not decompress.
pub fn plain(frame: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, ProtocolError> {
    if !is_compressed(frame) {
        return Ok(std::borrow::Cow::Borrowed(frame));
    }
    // The server's own frames: bounded only against a corrupt size word (1 GiB).
    let body = decompress(frame.get(4..).unwrap_or_default(), 1 << 30)?;
    Ok(std::borrow::Cow::Owned(framed(body)))
}

/// A compressed body's bytes, refusing an uncompressed size over `limit` before allocating.
fn decompress(body: &[u8], limit: usize) -> Result<Vec<u8>, ProtocolError> {
    let (size, packed) = body
        .split_first_chunk::<4>()
        .ok_or_else(|| ProtocolError::Corrupt("a compressed frame without its size".into()))?;
    let size = u32::from_le_bytes(*size) as usize;
    if size > limit {
        return Err(ProtocolError::TooLarge { size, limit });
    }
    let out = lz4_flex::block::decompress(packed, size)
        .map_err(|e| ProtocolError::Corrupt(format!("LZ4: {e}")))?;
    if out.len() != size {
        return Err(ProtocolError::Corrupt(format!(
            "a compressed frame of {} bytes where {size} were announced",
            out.len()
        )));
    }
    Ok(out)
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

/// The frame of a batch: encoded once (and compressed once when large, [`compressed`]), sent
/// as the same bytes to every client.
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
    compressed(framed(body))
}

/// The frame of the whole content of some buckets (`ranges`, half-open, of `2^bits`
/// buckets), for a resync or a snapshot; compressed when large ([`compressed`]).
pub fn buckets_frame<'a>(
    bits: u8,
    ranges: &[(u32, u32)],
    entries: impl IntoIterator<Item = &'a KVPair>,
) -> Vec<u8> {
    let ranges = serde_json::to_string(ranges).unwrap_or_default();
    let mut body =
        format!("{{\"type\":\"buckets\",\"bits\":{bits},\"ranges\":{ranges},\"entries\":[")
            .into_bytes();
    for (i, kvp) in entries.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        push_update(&mut body, kvp, false);
    }
    body.extend_from_slice(b"]}");
    compressed(framed(body))
}

/// Reads one frame's body (decompressed), refusing one over `limit` bytes, compressed or
/// not, before reading or decompressing it.
///
/// # Errors
/// [`ProtocolError::Io`] when the connection closes or fails; [`ProtocolError::TooLarge`];
/// [`ProtocolError::Corrupt`] for a compressed body that does not decompress.
pub async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let word = u32::from_be_bytes(len);
    let size = (word & !COMPRESSED) as usize;
    if size > limit {
        return Err(ProtocolError::TooLarge { size, limit });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body).await?;
    if word & COMPRESSED != 0 {
        return decompress(&body, limit);
    }
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

/// MurmurHash3's 64-bit finalizer: spreads every input bit over every output bit (FNV-1a's
/// low bits depend only on the inputs' low bits, and its high bits mix well only after it).
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// A key's hash, which places it in a bucket at every resolution ([`bucket`]): `fmix64` of the
/// FNV-1a of its kind, namespace (empty for cluster-scoped kinds) and name.
pub fn key_hash(key: &ResourceKey) -> u64 {
    fmix64(fnv1a(&[
        key.kind.as_bytes(),
        key.namespace.as_deref().unwrap_or("").as_bytes(),
        key.name.as_bytes(),
    ]))
}

/// The bucket of a key hash among `2^bits`: its top `bits` bits. Bucket `i` of `bits` is
/// buckets `2i` and `2i + 1` of `bits + 1`, and the keys in hash order are in bucket order.
pub fn bucket(hash: u64, bits: u8) -> u32 {
    if bits == 0 {
        0
    } else {
        (hash >> (64 - u32::from(bits.min(32)))) as u32
    }
}

/// How many bits of buckets a resync of `keys` keys uses: about two keys a bucket, at most
/// [`MAX_BITS`]. Finer buckets send less of what did not change; coarser ones send fewer
/// digests (8 bytes a bucket).
pub fn bits_for(keys: usize) -> u8 {
    let log2 = usize::BITS - keys.saturating_sub(1).leading_zeros();
    u8::try_from(log2.saturating_sub(1)).map_or(MAX_BITS, |b| b.min(MAX_BITS))
}

/// A key's contribution to its bucket's digest: `fmix64` of the FNV-1a of its kind,
/// namespace, name and revision. A bucket's digest is the XOR of its keys' contributions.
pub fn contribution(key: &ResourceKey, revision: &str) -> u64 {
    fmix64(fnv1a(&[
        key.kind.as_bytes(),
        key.namespace.as_deref().unwrap_or("").as_bytes(),
        key.name.as_bytes(),
        revision.as_bytes(),
    ]))
}

/// The digests of `2^bits` buckets over `(key hash, contribution)` pairs.
pub fn digests<I: IntoIterator<Item = (u64, u64)>>(bits: u8, keys: I) -> Vec<u64> {
    let mut d = vec![0u64; 1usize << bits.min(MAX_BITS)];
    for (hash, c) in keys {
        if let Some(slot) = d.get_mut(bucket(hash, bits) as usize) {
            *slot ^= c;
        }
    }
    d
}

/// Digests as a [`Message::Digests`] carries them: 8 bytes little-endian each, in base64.
pub fn encode_digests(digests: &[u64]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The digests of a [`Message::Digests`]: exactly `2^bits` of them.
///
/// # Errors
/// [`ProtocolError::Corrupt`] when the text is not base64 or not `2^bits` digests.
pub fn decode_digests(bits: u8, text: &str) -> Result<Vec<u64>, ProtocolError> {
    use base64::Engine;
    if bits > MAX_BITS {
        return Err(ProtocolError::Corrupt(format!(
            "digests of {bits} bits (at most {MAX_BITS})"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ProtocolError::Corrupt(format!("digests: {e}")))?;
    let want = 8usize << bits;
    if bytes.len() != want {
        return Err(ProtocolError::Corrupt(format!(
            "{} bytes of digests where {bits} bits need {want}",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// The largest [`Message::Digests`] frame of `bits` bits: what a server accepts once it asked
/// for one.
pub fn digests_frame_limit(bits: u8) -> usize {
    (8usize << bits.min(MAX_BITS)).div_ceil(3) * 4 + 256
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

    #[tokio::test]
    async fn large_frames_are_compressed_once_and_read_back_whole() {
        let pools: Vec<KVPair> = (0..200)
            .map(|i| {
                KVPair::new(
                    ResourceKey::cluster("IPPool", format!("pool-{i}")),
                    serde_json::json!({"cidr": format!("10.{i}.0.0/16"), "mode": "Always"}),
                )
                .with_revision(Revision::from(i as u64 + 1))
            })
            .collect();
        let f = buckets_frame(4, &[(0, 3), (7, 8)], &pools);
        assert!(is_compressed(&f), "a large frame is compressed");
        let plain_frame = plain(&f).unwrap().into_owned();
        assert!(!is_compressed(&plain_frame));
        assert!(
            f.len() * 3 < plain_frame.len(),
            "{} vs {}",
            f.len(),
            plain_frame.len()
        );
        // Both forms read back as the same body.
        let a = read_frame(&mut &f[..], DEFAULT_MAX_FRAME).await.unwrap();
        let b = read_frame(&mut &plain_frame[..], DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        assert_eq!(a, b);
        let Incoming::Buckets {
            bits,
            ranges,
            entries,
        } = Incoming::decode(&a).unwrap()
        else {
            panic!("buckets");
        };
        assert_eq!(
            (bits, ranges, entries.len()),
            (4, vec![(0, 3), (7, 8)], 200)
        );
        // A small one is left alone.
        let small = updates_frame(1, [(&pools[0], false)]);
        assert!(!is_compressed(&small));
        // The limit applies to the decompressed size too, before it is allocated.
        let err = read_frame(&mut &f[..], plain_frame.len() - 5)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
        // A corrupt body is an error, not a panic.
        let mut bad = f.clone();
        for b in bad.iter_mut().skip(12) {
            *b = 0xff;
        }
        let err = read_frame(&mut &bad[..], DEFAULT_MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Corrupt(_)), "{err}");
    }

    /// Bytes from a peer never panic the reader: random frames, and valid compressed frames
    /// with bytes flipped, are read as errors or as whatever they decode to.
    #[tokio::test]
    async fn garbage_frames_are_errors_not_panics() {
        let pools: Vec<KVPair> = (0..100)
            .map(|i| {
                KVPair::new(
                    ResourceKey::cluster("IPPool", format!("pool-{i}")),
                    serde_json::json!({"cidr": format!("10.{i}.0.0/16")}),
                )
            })
            .collect();
        let good = buckets_frame(3, &[(0, 8)], &pools);
        assert!(is_compressed(&good));
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..4000 {
            let mut f = if round % 2 == 0 {
                let mut f = good.clone();
                for _ in 0..1 + next() % 8 {
                    let i = (next() as usize) % f.len();
                    f[i] ^= (next() % 255 + 1) as u8;
                }
                f
            } else {
                let len = (next() % 64) as usize;
                let mut f: Vec<u8> = (0..len + 8).map(|_| next() as u8).collect();
                if round % 4 == 1 {
                    // A compressed frame's word with a plausible length.
                    f[..4].copy_from_slice(&((len as u32 + 4) | COMPRESSED).to_be_bytes());
                }
                f
            };
            f.truncate(f.len().max(4));
            if let Ok(body) = read_frame(&mut &f[..], 1 << 20).await {
                let _ = Incoming::decode(&body);
            }
            let _ = plain(&f);
        }
    }

    #[test]
    fn buckets_nest_and_digests_are_stable() {
        let k = ResourceKey::namespaced("NetworkPolicy", "prod", "p");
        let h = key_hash(&k);
        assert_eq!(h, key_hash(&k.clone()));
        for bits in 0..MAX_BITS {
            assert_eq!(bucket(h, bits), bucket(h, bits + 1) >> 1, "bits {bits}");
        }
        assert_ne!(contribution(&k, "1"), contribution(&k, "2"));
        assert_ne!(
            fnv1a(&[b"ab", b"c"]),
            fnv1a(&[b"a", b"bc"]),
            "parts are separated"
        );
        // Fixed values: a change of the hash is a change of the protocol.
        assert_eq!(fnv1a(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        // About two keys a bucket.
        assert_eq!(bits_for(0), 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(4), 1);
        assert_eq!(bits_for(100_000), 16);
        assert_eq!(bits_for(usize::MAX), MAX_BITS);
        // Keys spread evenly over the buckets even when their names differ in one digit.
        let keys: Vec<u64> = (0..65_536)
            .map(|i| key_hash(&ResourceKey::cluster("Node", format!("node-{i:06}"))))
            .collect();
        let d = digests(8, keys.iter().map(|h| (*h, 1)));
        let mut counts = vec![0u32; 256];
        for h in &keys {
            counts[bucket(*h, 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (160..=352).contains(c)),
            "{:?}",
            counts
        );
        assert_eq!(d.len(), 256);
        let text = encode_digests(&d);
        assert_eq!(decode_digests(8, &text).unwrap(), d);
        assert!(decode_digests(9, &text).is_err(), "the wrong count");
        assert!(decode_digests(8, "not base64!").is_err());
        assert!(text.len() + 64 < digests_frame_limit(8));
    }
}
