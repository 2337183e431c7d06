//! Prometheus metrics of a Syncer, registered into a registry of the user's.

use std::fmt;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::status::{SyncStatus, Update, UpdateType};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    kind: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelistLabels {
    kind: String,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

fn batch_histogram() -> Histogram {
    // 1 to 4,096 updates.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// The metrics of one Syncer ([`Syncer::with_metrics`](crate::Syncer::with_metrics)):
///
/// | name | type | labels | what |
/// |---|---|---|---|
/// | `kvsync_syncer_status` | gauge | `status` (`wait_for_datastore`, `resync_in_progress`, `in_sync`) | 1 for the Syncer's status, 0 for the others |
/// | `kvsync_syncer_updates_total` | counter | `kind`, `type` (`new`, `updated`, `deleted`) | updates handed to the consumer |
/// | `kvsync_syncer_batch_size` | histogram | | updates per batch handed on |
/// | `kvsync_syncer_relists_total` | counter | `kind`, `cause` (`initial`, `compacted`, `outage`, `gap`, `catch_up_timeout`) | lists of a type, by why it was listed |
/// | `kvsync_syncer_watch_restarts_total` | counter | `kind` | watches opened again other than after a list |
/// | `kvsync_syncer_tracked_keys` | gauge | `kind` | keys the Syncer has handed on and tracks |
///
/// One `SyncerMetrics` per Syncer: for several Syncers in one process, register each into a
/// sub-registry with a label of its own (`registry.sub_registry_with_label`).
///
/// ```
/// use kvsync_syncer::SyncerMetrics;
///
/// let mut registry = prometheus_client::registry::Registry::default();
/// let metrics = SyncerMetrics::new(&mut registry);
/// # let _ = metrics;
/// ```
#[derive(Clone)]
pub struct SyncerMetrics {
    status: Family<StatusLabels, Gauge>,
    updates: Family<UpdateLabels, Counter>,
    batch_size: Histogram,
    relists: Family<RelistLabels, Counter>,
    watch_restarts: Family<KindLabels, Counter>,
    tracked: Family<KindLabels, Gauge>,
}

impl fmt::Debug for SyncerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncerMetrics").finish_non_exhaustive()
    }
}

const STATUSES: [(SyncStatus, &str); 3] = [
    (SyncStatus::WaitForDatastore, "wait_for_datastore"),
    (SyncStatus::ResyncInProgress, "resync_in_progress"),
    (SyncStatus::InSync, "in_sync"),
];

impl SyncerMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = SyncerMetrics {
            status: Family::default(),
            updates: Family::default(),
            batch_size: batch_histogram(),
            relists: Family::default(),
            watch_restarts: Family::default(),
            tracked: Family::default(),
        };
        registry.register(
            "kvsync_syncer_status",
            "1 for the Syncer's status, 0 for the others",
            m.status.clone(),
        );
        registry.register(
            "kvsync_syncer_updates",
            "Updates handed to the consumer, by kind and type",
            m.updates.clone(),
        );
        registry.register(
            "kvsync_syncer_batch_size",
            "Updates per batch handed on",
            m.batch_size.clone(),
        );
        registry.register(
            "kvsync_syncer_relists",
            "Lists of a resource type, by why it was listed",
            m.relists.clone(),
        );
        registry.register(
            "kvsync_syncer_watch_restarts",
            "Watches opened again other than after a list",
            m.watch_restarts.clone(),
        );
        registry.register(
            "kvsync_syncer_tracked_keys",
            "Keys the Syncer has handed on and tracks, by kind",
            m.tracked.clone(),
        );
        m.set_status(SyncStatus::WaitForDatastore);
        m
    }

    pub(crate) fn set_status(&self, status: SyncStatus) {
        for (s, name) in STATUSES {
            self.status
                .get_or_create(&StatusLabels { status: name })
                .set(i64::from(s == status));
        }
    }

    pub(crate) fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    /// The handles of one resource type, looked up once.
    pub(crate) fn for_kind(&self, kind: &str) -> TypeMetrics {
        let updates = |t: &'static str| {
            self.updates
                .get_or_create(&UpdateLabels {
                    kind: kind.to_owned(),
                    r#type: t,
                })
                .clone()
        };
        let k = KindLabels {
            kind: kind.to_owned(),
        };
        TypeMetrics {
            kind: kind.to_owned(),
            new: updates("new"),
            updated: updates("updated"),
            deleted: updates("deleted"),
            relists: self.relists.clone(),
            watch_restarts: self.watch_restarts.get_or_create(&k).clone(),
            tracked: self.tracked.get_or_create(&k).clone(),
        }
    }
}

/// One resource type's metrics.
#[derive(Clone)]
pub(crate) struct TypeMetrics {
    kind: String,
    new: Counter,
    updated: Counter,
    deleted: Counter,
    relists: Family<RelistLabels, Counter>,
    watch_restarts: Counter,
    tracked: Gauge,
}

impl TypeMetrics {
    pub(crate) fn updates(&self, updates: &[Update]) {
        let (mut n, mut u, mut d) = (0u64, 0u64, 0u64);
        for up in updates {
            match up.update_type {
                UpdateType::New => n += 1,
                UpdateType::Updated => u += 1,
                UpdateType::Deleted => d += 1,
            }
        }
        for (c, v) in [(&self.new, n), (&self.updated, u), (&self.deleted, d)] {
            if v > 0 {
                c.inc_by(v);
            }
        }
    }

    pub(crate) fn relist(&self, cause: &'static str) {
        self.relists
            .get_or_create(&RelistLabels {
                kind: self.kind.clone(),
                cause,
            })
            .inc();
    }

    pub(crate) fn watch_restart(&self) {
        self.watch_restarts.inc();
    }

    pub(crate) fn tracked(&self, n: usize) {
        self.tracked.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
