//! The SQLite backend's settings.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvsync_model::{DEFAULT_PREFIX, Registry};

/// How hard SQLite syncs to disk (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Sync at every commit: acknowledged writes survive a power loss.
    #[default]
    Full,
    /// Sync at checkpoints: acknowledged writes survive a crash of the process (`kill -9`),
    /// not a power loss. Faster.
    Normal,
}

/// Settings of the SQLite backend.
///
/// ```
/// use std::time::Duration;
/// use kvsync_backend::sqlite::SqliteConfig;
///
/// let config = SqliteConfig::new("/tmp/kvsync-doc.db", kvsync_model::Registry::new()).with_poll_interval(Duration::from_millis(50));
/// assert_eq!(config.poll_interval, Duration::from_millis(50));
/// ```
#[derive(Clone)]
pub struct SqliteConfig {
    /// The database file (created on first use).
    pub path: PathBuf,
    /// The key prefix (default `/kvsync/v1`).
    pub prefix: String,
    /// The kinds the backend serves.
    pub registry: Arc<Registry>,
    /// How often watches look for writes made by other processes (default 100 ms).
    pub poll_interval: Duration,
    /// How long a call waits for another process's write lock (default 5 s).
    pub busy_timeout: Duration,
    /// How hard SQLite syncs to disk.
    pub durability: Durability,
}

impl fmt::Debug for SqliteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteConfig")
            .field("path", &self.path)
            .field("prefix", &self.prefix)
            .field("poll_interval", &self.poll_interval)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl SqliteConfig {
    /// Settings for the database at `path` holding the kinds of `registry`, with the
    /// defaults above.
    pub fn new(path: impl Into<PathBuf>, registry: impl Into<Arc<Registry>>) -> Self {
        SqliteConfig {
            path: path.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            registry: registry.into(),
            poll_interval: Duration::from_millis(100),
            busy_timeout: Duration::from_secs(5),
            durability: Durability::Full,
        }
    }

    /// Sets the key prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets how often watches poll for other processes' writes.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets the durability.
    #[must_use]
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
}
