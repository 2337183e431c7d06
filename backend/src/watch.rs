//! Watch events.

use futures::stream::BoxStream;
use kvsync_model::{KVPair, ParseFailure, ResourceKey, Revision};

use crate::error::Result;

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchEvent {
    /// A key was created.
    Added(KVPair),
    /// A key was written again; `old` is its previous value where the backend has it.
    Modified {
        /// The new value, with the write's revision.
        new: KVPair,
        /// The previous value.
        old: Option<KVPair>,
    },
    /// A key was deleted (or expired) at `revision`; `old` is its last value where known.
    Deleted {
        /// The key.
        key: ResourceKey,
        /// The revision of the deletion.
        revision: Revision,
        /// The last value before the deletion.
        old: Option<KVPair>,
    },
    /// Nothing the watch covers changed up to `revision`: resume from here (etcd progress
    /// notifications, Kubernetes bookmarks).
    Bookmark(Revision),
    /// A write stored bytes that do not decode. The watch goes on.
    ParseFailed(ParseFailure),
}

impl WatchEvent {
    /// The revision the event happened at (where known for a parse failure).
    pub fn revision(&self) -> Option<&Revision> {
        match self {
            WatchEvent::Added(kvp) | WatchEvent::Modified { new: kvp, .. } => kvp.revision.as_ref(),
            WatchEvent::Deleted { revision, .. } | WatchEvent::Bookmark(revision) => Some(revision),
            WatchEvent::ParseFailed(f) => f.revision.as_ref(),
        }
    }

    /// The key the event is about (none for a bookmark or an unparsable path).
    pub fn key(&self) -> Option<&ResourceKey> {
        match self {
            WatchEvent::Added(kvp) | WatchEvent::Modified { new: kvp, .. } => Some(&kvp.key),
            WatchEvent::Deleted { key, .. } => Some(key),
            WatchEvent::Bookmark(_) => None,
            WatchEvent::ParseFailed(f) => f.key.as_ref(),
        }
    }
}

/// The stream a watch returns.
///
/// It yields every change after the start revision in revision order, with no gaps and no
/// duplicates. An `Err` item ends the stream: [`Error::Compacted`](crate::Error::Compacted)
/// when the watch fell behind the datastore's history (list again), a retryable
/// [`Error::Unavailable`](crate::Error::Unavailable) when the connection broke (watch again
/// from the last revision seen).
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;
