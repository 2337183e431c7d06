//! Prometheus metrics of a server, registered into a registry of the user's.

use std::fmt;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The metrics of a [`Server`](crate::Server) ([`ServerConfig::with_metrics`](crate::ServerConfig::with_metrics)):
///
/// | name | type | labels | what |
/// |---|---|---|---|
/// | `kvsync_server_clients` | gauge | | clients connected |
/// | `kvsync_server_catch_ups_total` | counter | `mode` (`resume`, `resync`, `snapshot`) | clients brought up to date, by how |
/// | `kvsync_server_sketches_total` | counter | `outcome` (`peeled`, `too_small`) | sketches of resyncing clients: those that gave the difference, and those too small for it (a larger one or the digests came next) |
/// | `kvsync_server_resync_bytes_received_total` | counter | | bytes of sketches and digests received from resyncing clients |
/// | `kvsync_server_snapshot_builds_total` | counter | | snapshots built (shared by the clients that need one at the same position) |
/// | `kvsync_server_fell_behind_total` | counter | | clients moved to a resync because they fell off the log |
/// | `kvsync_server_refused_total` | counter | | connections refused (bad hello, limits, garbage) |
/// | `kvsync_server_shed_total` | counter | | clients told to go elsewhere because the server was over its connection target |
/// | `kvsync_server_catch_ups_waiting` | gauge | | resyncs and snapshots waiting for a place (`max_catch_ups`) |
/// | `kvsync_server_bytes_sent_total` | counter | | bytes written to clients |
/// | `kvsync_server_log_bytes` | gauge | | bytes the log holds |
/// | `kvsync_server_client_lag_frames` | histogram | | how many frames behind the log's head a client was when it was last sent frames |
/// | `kvsync_server_encode_seconds` | histogram | | time to encode a batch (once, for every client) |
#[derive(Clone)]
pub struct ServerMetrics {
    pub(crate) clients: Gauge,
    catch_ups: Family<ModeLabels, Counter>,
    sketches: Family<OutcomeLabels, Counter>,
    pub(crate) resync_bytes_received: Counter,
    pub(crate) snapshot_builds: Counter,
    pub(crate) fell_behind: Counter,
    pub(crate) refused: Counter,
    pub(crate) shed: Counter,
    pub(crate) catch_ups_waiting: Gauge,
    pub(crate) bytes_sent: Counter,
    pub(crate) log_bytes: Gauge,
    pub(crate) lag: Histogram,
    pub(crate) encode: Histogram,
}

impl fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerMetrics").finish_non_exhaustive()
    }
}

impl Default for ServerMetrics {
    /// Metrics registered nowhere (what a server without metrics counts into).
    fn default() -> Self {
        ServerMetrics {
            clients: Gauge::default(),
            catch_ups: Family::default(),
            sketches: Family::default(),
            resync_bytes_received: Counter::default(),
            snapshot_builds: Counter::default(),
            fell_behind: Counter::default(),
            refused: Counter::default(),
            shed: Counter::default(),
            catch_ups_waiting: Gauge::default(),
            bytes_sent: Counter::default(),
            log_bytes: Gauge::default(),
            lag: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            encode: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
        }
    }
}

impl ServerMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ServerMetrics::default();
        registry.register(
            "kvsync_server_clients",
            "Clients connected",
            m.clients.clone(),
        );
        registry.register(
            "kvsync_server_catch_ups",
            "Clients brought up to date, by how",
            m.catch_ups.clone(),
        );
        registry.register(
            "kvsync_server_sketches",
            "Sketches of resyncing clients, by outcome",
            m.sketches.clone(),
        );
        registry.register(
            "kvsync_server_resync_bytes_received",
            "Bytes of sketches and digests received from resyncing clients",
            m.resync_bytes_received.clone(),
        );
        registry.register(
            "kvsync_server_snapshot_builds",
            "Snapshots built",
            m.snapshot_builds.clone(),
        );
        registry.register(
            "kvsync_server_fell_behind",
            "Clients moved to a resync because they fell off the log",
            m.fell_behind.clone(),
        );
        registry.register(
            "kvsync_server_refused",
            "Connections refused",
            m.refused.clone(),
        );
        registry.register(
            "kvsync_server_shed",
            "Clients told to go elsewhere because the server was over its connection target",
            m.shed.clone(),
        );
        registry.register(
            "kvsync_server_catch_ups_waiting",
            "Resyncs and snapshots waiting for a place",
            m.catch_ups_waiting.clone(),
        );
        registry.register(
            "kvsync_server_bytes_sent",
            "Bytes written to clients",
            m.bytes_sent.clone(),
        );
        registry.register(
            "kvsync_server_log_bytes",
            "Bytes the log holds",
            m.log_bytes.clone(),
        );
        registry.register(
            "kvsync_server_client_lag_frames",
            "Frames behind the log's head a client was when sent frames",
            m.lag.clone(),
        );
        registry.register(
            "kvsync_server_encode_seconds",
            "Time to encode a batch once for every client",
            m.encode.clone(),
        );
        m
    }

    pub(crate) fn catch_up(&self, mode: &'static str) {
        self.catch_ups.get_or_create(&ModeLabels { mode }).inc();
    }

    pub(crate) fn sketch(&self, peeled: bool) {
        let outcome = if peeled { "peeled" } else { "too_small" };
        self.sketches
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}
