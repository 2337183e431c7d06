//! The callback flavour of the Syncer (Calico's `SyncerCallbacks`), an adapter over the stream.

use kvsync_backend::Error;
use kvsync_model::ParseFailure;

use crate::driver::{SyncerStream, next_unless_stopped};
use crate::status::{SyncStatus, SyncerEvent, Update};

/// Receives what a Syncer started with [`Syncer::start`](crate::Syncer::start) reports.
///
/// The calls come from one task, in order. A callback that takes long slows the Syncer down
/// (backpressure) instead of letting updates queue without bound.
pub trait SyncerCallbacks: Send + 'static {
    /// The status changed. All updates before it were delivered first.
    fn on_status_updated(&mut self, status: SyncStatus);

    /// A batch of updates, to apply in order.
    fn on_updates(&mut self, updates: Vec<Update>);

    /// A stored entry does not decode (its raw key and value). The Syncer goes on.
    fn on_parse_failed(&mut self, failure: &ParseFailure) {
        let _ = failure;
    }

    /// The Syncer hit a datastore error and is recovering from it.
    fn on_error(&mut self, error: &Error) {
        let _ = error;
    }
}

/// Feeds a stream's events to callbacks until the stream ends or `stopped` fires.
pub(crate) async fn run(
    mut stream: SyncerStream,
    mut callbacks: impl SyncerCallbacks,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    while let Some(ev) = next_unless_stopped(&mut stream, &mut stopped).await {
        match ev {
            SyncerEvent::Status(s) => callbacks.on_status_updated(s),
            SyncerEvent::Updates(u) => callbacks.on_updates(u),
            SyncerEvent::ParseFailed(f) => callbacks.on_parse_failed(&f),
            SyncerEvent::Error(e) => callbacks.on_error(&e),
        }
    }
    stream.stop().await;
}
