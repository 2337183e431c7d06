//! What the Syncer tells its consumer: statuses, updates and events.

use std::fmt;
use std::sync::Arc;

use kvsync_backend::Error;
use kvsync_model::{KVPair, ParseFailure, Resource, ResourceKey, Revision};

/// Where the Syncer is in following the datastore (Calico's `SyncStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncStatus {
    /// The datastore has not answered yet, or is unreachable: updates may be stale.
    WaitForDatastore,
    /// The datastore answers; the Syncer is sending what it holds.
    ResyncInProgress,
    /// Every resource type finished its list and its updates were delivered: applying every
    /// batch so far gives the datastore's state.
    InSync,
}

impl fmt::Display for SyncStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncStatus::WaitForDatastore => "WaitForDatastore",
            SyncStatus::ResyncInProgress => "ResyncInProgress",
            SyncStatus::InSync => "InSync",
        })
    }
}

/// What happened to a key (Calico's `UpdateType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpdateType {
    /// The first time this key is reported.
    New,
    /// A key reported before has a new value.
    Updated,
    /// A key reported before is gone.
    Deleted,
}

impl fmt::Display for UpdateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpdateType::New => "New",
            UpdateType::Updated => "Updated",
            UpdateType::Deleted => "Deleted",
        })
    }
}

/// One change to apply to the consumer's cache.
///
/// For `New` and `Updated`, `kvp` is the key's new value and revision. For `Deleted`, `kvp`
/// carries the key, the revision of the deletion where known (else the last revision sent),
/// and the last value where the Syncer learnt it (from the watch); after a relist the value is
/// unknown and is `null`.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// The key, value and revision.
    pub kvp: KVPair,
    /// What happened.
    pub update_type: UpdateType,
}

impl Update {
    /// The key.
    pub fn key(&self) -> &ResourceKey {
        &self.kvp.key
    }

    /// The revision.
    pub fn revision(&self) -> Option<&Revision> {
        self.kvp.revision.as_ref()
    }

    /// The value decoded as `R`.
    ///
    /// # Errors
    /// The serde error when the value is not an `R` (e.g. `null` for a deletion after a
    /// relist).
    pub fn decode<R: Resource>(&self) -> Result<R, serde_json::Error> {
        self.kvp.value.decode()
    }
}

/// What a Syncer's stream yields.
#[derive(Clone, Debug)]
pub enum SyncerEvent {
    /// The status changed. Every update sent before it is delivered first.
    Status(SyncStatus),
    /// A batch of updates, in order; apply them all.
    Updates(Vec<Update>),
    /// A stored entry that does not decode. If it replaced a key reported before, a
    /// `Deleted` update for that key comes with it; the Syncer goes on.
    ParseFailed(ParseFailure),
    /// A datastore error the Syncer is recovering from (it retries on its own).
    Error(Arc<Error>),
}
