//! The embedded default: a persistent SQLite backend, stored as a revision log in the style of
//! kine (the SQL shim k3s uses in place of etcd).
//!
//! - Every write appends a row to `kvsync_log` whose `id` is the new revision: the key path,
//!   the create revision, whether the row created or deleted the key, its TTL expiry, uid and
//!   value (and, for deletions, the last value). The current state is the latest row per key.
//!   `AUTOINCREMENT` keeps revisions increasing even after compaction removes rows.
//! - Preconditions (create-if-absent, update or delete at a revision) are checked inside one
//!   `BEGIN IMMEDIATE` transaction, which SQLite serialises across threads and processes.
//! - `watch(from)` reads the log after `from`. Writers in the same process wake watchers at
//!   once; writes from other processes are picked up by polling (every 100 ms by default).
//! - `compact(revision)` deletes the rows that later rows superseded below it, and deletion
//!   rows below it; reads and watches from before it get [`Error::Compacted`].
//! - WAL journal mode and a busy timeout let several processes (a CLI, a controller) use one
//!   file at once; with `synchronous = FULL` (the default) every acknowledged write is on disk,
//!   and even with `NORMAL` it survives `kill -9` of the writer.
//! - TTLs are stored as wall-clock expiry times; any process that reads or watches the
//!   database turns expired keys into deletions, so watchers get `Deleted` events.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use kvsync_model::{
    DEFAULT_PREFIX, DeleteOptions, GetOptions, KVList, KVPair, ListOptions, ParseFailure,
    PathCodec, Registry, ResourceKey, Revision,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::watch;

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::{
    check_delete, check_write, counter_revision, decode_entry, encode_for_write, fuse_after_error,
    parse_error, push_listed, put_event, undecodable_last_value,
};
use crate::watch::{WatchEvent, WatchStream};

/// How many log rows a watch reads per query.
const WATCH_CHUNK: i64 = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kvsync_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    expires_at_ms INTEGER,
    ttl_ms INTEGER,
    uid TEXT NOT NULL,
    value BLOB,
    old_value BLOB
);
CREATE INDEX IF NOT EXISTS kvsync_log_name_id ON kvsync_log(name, id);
CREATE INDEX IF NOT EXISTS kvsync_log_expiry ON kvsync_log(expires_at_ms)
    WHERE expires_at_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS kvsync_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

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

/// The SQLite backend. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    codec: PathCodec,
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    rev_tx: watch::Sender<i64>,
    poll_interval: Duration,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.inner.path)
            .field("prefix", &self.inner.codec.prefix())
            .finish()
    }
}

fn db_err(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode;
    let code = match &e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        _ => None,
    };
    match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Unavailable {
            message: format!("the database is locked by another process: {e}"),
            source: Some(Box::new(e)),
        },
        Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => Error::Unauthorized {
            message: e.to_string(),
        },
        _ => Error::Unavailable {
            message: format!("sqlite: {e}"),
            source: Some(Box::new(e)),
        },
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn rev_of(r: &Revision) -> Result<i64> {
    // counter_revision only passes revisions that fit an i64.
    Ok(counter_revision(r, "sqlite")? as i64)
}

fn rev(n: i64) -> Revision {
    Revision::from(u64::try_from(n).unwrap_or(0))
}

fn prefix_end(prefix: &str) -> String {
    // Paths are UTF-8 without control characters; U+10FFFF sorts after all of them.
    format!("{prefix}\u{10FFFF}")
}

/// One row of the log.
struct Row {
    id: i64,
    name: String,
    created: bool,
    deleted: bool,
    create_revision: i64,
    ttl_ms: Option<i64>,
    uid: String,
    value: Option<Vec<u8>>,
    old_value: Option<Vec<u8>>,
}

const ROW_COLUMNS: &str =
    "id, name, created, deleted, create_revision, ttl_ms, uid, value, old_value";
/// [`ROW_COLUMNS`] of the table aliased `l`.
const L_ROW_COLUMNS: &str =
    "l.id, l.name, l.created, l.deleted, l.create_revision, l.ttl_ms, l.uid, l.value, l.old_value";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let id: i64 = r.get(0)?;
    let create_revision: i64 = r.get(4)?;
    Ok(Row {
        id,
        name: r.get(1)?,
        created: r.get::<_, i64>(2)? != 0,
        deleted: r.get::<_, i64>(3)? != 0,
        create_revision: if create_revision == 0 {
            id
        } else {
            create_revision
        },
        ttl_ms: r.get(5)?,
        uid: r.get(6)?,
        value: r.get(7)?,
        old_value: r.get(8)?,
    })
}

fn current_rev(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'kvsync_log'), 0)",
        [],
        |r| r.get(0),
    )
}

fn compact_rev(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE((SELECT value FROM kvsync_meta WHERE key = 'compact_rev'), 0)",
        [],
        |r| r.get(0),
    )
}

/// The latest row of `name`, at or before `at` when given.
/// Opens a write transaction that holds SQLite's write lock from the start, so that the
/// check and the write it guards are one step for every thread and process.
fn immediate(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)
}

/// The live row of `name` (its latest, unless that is a deletion).
fn live(conn: &Connection, name: &str, at: Option<i64>) -> Result<Option<Row>> {
    Ok(latest(conn, name, at)
        .map_err(db_err)?
        .filter(|r| !r.deleted))
}

fn latest(conn: &Connection, name: &str, at: Option<i64>) -> rusqlite::Result<Option<Row>> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM kvsync_log WHERE name = ?1 AND id <= ?2 ORDER BY id DESC LIMIT 1"
    );
    conn.query_row(&sql, params![name, at.unwrap_or(i64::MAX)], read_row)
        .optional()
}

struct NewRow<'a> {
    name: &'a str,
    created: bool,
    deleted: bool,
    create_revision: i64,
    prev_revision: i64,
    ttl: Option<Duration>,
    uid: &'a str,
    value: Option<&'a [u8]>,
    old_value: Option<&'a [u8]>,
}

impl<'a> NewRow<'a> {
    /// The row that writes `value` to `name`, over `prev` (its live row, if any).
    fn write_over(
        name: &'a str,
        prev: Option<&Row>,
        ttl: Option<Duration>,
        uid: &'a str,
        value: &'a [u8],
    ) -> Self {
        NewRow {
            name,
            created: prev.is_none(),
            deleted: false,
            create_revision: prev.map_or(0, |p| p.create_revision),
            prev_revision: prev.map_or(0, |p| p.id),
            ttl,
            uid,
            value: Some(value),
            old_value: None,
        }
    }

    /// The row that deletes the key `last` holds (keeping its value as the last one).
    fn deletion_of(last: &'a Row) -> Self {
        NewRow {
            name: &last.name,
            created: false,
            deleted: true,
            create_revision: last.create_revision,
            prev_revision: last.id,
            ttl: None,
            uid: &last.uid,
            value: None,
            old_value: last.value.as_deref(),
        }
    }
}

/// Writes `value` to `name` over `prev` (its live row, if any), keeping its uid or making a
/// new one; returns the new row's id and the uid.
fn insert_over(
    conn: &Connection,
    name: &str,
    prev: Option<&Row>,
    ttl: Option<Duration>,
    value: &[u8],
) -> rusqlite::Result<(i64, String)> {
    let uid = prev.map_or_else(|| uuid::Uuid::new_v4().to_string(), |p| p.uid.clone());
    let id = insert(conn, NewRow::write_over(name, prev, ttl, &uid, value))?;
    Ok((id, uid))
}

fn insert(conn: &Connection, row: NewRow<'_>) -> rusqlite::Result<i64> {
    let ttl_ms = row
        .ttl
        .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
    let expires = ttl_ms.map(|t| now_ms().saturating_add(t.max(1)));
    conn.execute(
        "INSERT INTO kvsync_log (name, created, deleted, create_revision, prev_revision, \
         expires_at_ms, ttl_ms, uid, value, old_value) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            row.name,
            i64::from(row.created),
            i64::from(row.deleted),
            row.create_revision,
            row.prev_revision,
            expires,
            ttl_ms,
            row.uid,
            row.value,
            row.old_value
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Turns every key whose TTL ran out into a deletion. Returns the new revision if any.
fn expire_due(conn: &mut Connection) -> rusqlite::Result<Option<i64>> {
    let now = now_ms();
    let any: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM kvsync_log WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1)",
        [now],
        |r| r.get(0),
    )?;
    if !any {
        return Ok(None);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let due: Vec<Row> = {
        let mut stmt = tx.prepare(&format!(
            "SELECT {L_ROW_COLUMNS} FROM kvsync_log l \
             WHERE l.expires_at_ms IS NOT NULL AND l.expires_at_ms <= ?1 AND l.deleted = 0 \
             AND l.id = (SELECT MAX(id) FROM kvsync_log m WHERE m.name = l.name)"
        ))?;
        stmt.query_map([now], read_row)?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut last = None;
    for row in &due {
        last = Some(insert(&tx, NewRow::deletion_of(row))?);
    }
    // Superseded rows keep their expiry; clear it so they are not looked at again.
    tx.execute(
        "UPDATE kvsync_log SET expires_at_ms = NULL WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
        [now],
    )?;
    tx.commit()?;
    Ok(last)
}

impl SqliteBackend {
    /// Opens (creating when missing) the database of `config`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad prefix; [`Error::Unavailable`] when the file cannot be
    /// opened or its schema made; [`Error::Unauthorized`] when it is read-only.
    pub fn open(config: SqliteConfig) -> Result<Self> {
        let codec = PathCodec::new(config.prefix.clone(), config.registry.clone())?;
        if let Some(parent) = config.path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| Error::Unavailable {
                message: format!("cannot create {}: {e}", parent.display()),
                source: Some(Box::new(e)),
            })?;
        }
        let open = |write: bool| -> Result<Connection> {
            let conn = Connection::open(&config.path).map_err(db_err)?;
            conn.busy_timeout(config.busy_timeout).map_err(db_err)?;
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(db_err)?;
            let sync = match config.durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            };
            conn.pragma_update(None, "synchronous", sync)
                .map_err(db_err)?;
            if write {
                conn.execute_batch(SCHEMA).map_err(db_err)?;
            }
            Ok(conn)
        };
        let writer = open(true)?;
        let reader = open(false)?;
        let start = current_rev(&writer).map_err(db_err)?;
        Ok(SqliteBackend {
            inner: Arc::new(Inner {
                codec,
                path: config.path,
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                rev_tx: watch::Sender::new(start),
                poll_interval: config.poll_interval,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Writes `bytes` under `path` as they are, bypassing validation, as a foreign writer
    /// could. For tests of how readers handle undecodable data (feature `testing`).
    ///
    /// # Errors
    /// Database errors.
    #[cfg(feature = "testing")]
    pub async fn put_raw(&self, path: &str, bytes: &[u8]) -> Result<i64> {
        let (path, bytes) = (path.to_owned(), bytes.to_vec());
        self.write_blocking(move |conn| {
            let tx = immediate(conn)?;
            let prev = live(&tx, &path, None)?;
            let (id, _) = insert_over(&tx, &path, prev.as_ref(), None, &bytes).map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(id)
        })
        .await
    }

    fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the writer connection in a blocking thread, then wakes local watchers.
    async fn write_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = Self::lock(&inner.writer);
            let _ = expire_due(&mut conn).map_err(db_err)?;
            let out = f(&mut conn);
            if let Ok(rev) = current_rev(&conn) {
                inner.rev_tx.send_if_modified(|r| {
                    let newer = rev > *r;
                    *r = (*r).max(rev);
                    newer
                });
            }
            out
        })
        .await
        .map_err(|e| Error::unavailable(format!("sqlite task failed: {e}")))?
    }

    /// Runs `f` on the reader connection in a blocking thread (after expiring due keys).
    async fn read_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.expire().await?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&Self::lock(&inner.reader)))
            .await
            .map_err(|e| Error::unavailable(format!("sqlite task failed: {e}")))?
    }

    /// Deletes expired keys, waking local watchers if any were.
    async fn expire(&self) -> Result<()> {
        self.write_blocking(|_| Ok(())).await
    }

    fn to_kvp(codec: &PathCodec, row: &Row) -> Result<KVPair, Box<ParseFailure>> {
        let bytes = row.value.as_deref().unwrap_or_default();
        let (key, value) = decode_entry(codec, &row.name, bytes, Some(rev(row.id)))?;
        Ok(KVPair {
            key,
            value,
            revision: Some(rev(row.id)),
            create_revision: Some(rev(row.create_revision)),
            uid: Some(row.uid.clone()),
            ttl: row
                .ttl_ms
                .map(|t| Duration::from_millis(u64::try_from(t).unwrap_or(0))),
        })
    }

    async fn write_kvp(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        let (path, bytes) = encode_for_write(&self.inner.codec, &kvp)?;
        let KVPair {
            key,
            value,
            revision,
            ttl,
            ..
        } = kvp;
        let expected = match (&mode, &revision) {
            (WriteMode::Update, Some(r)) => {
                rev_of(r)?;
                Some(r.clone())
            }
            _ => None,
        };
        let key2 = key.clone();
        let (id, create_revision, uid) = self
            .write_blocking(move |conn| {
                let tx = immediate(conn)?;
                let prev = live(&tx, &path, None)?;
                let current = prev.as_ref().map(|p| rev(p.id));
                check_write(&key2, mode, expected.as_ref(), current.as_ref())?;
                let (id, uid) =
                    insert_over(&tx, &path, prev.as_ref(), ttl, &bytes).map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok((id, prev.map_or(id, |p| p.create_revision), uid))
            })
            .await?;
        Ok(KVPair {
            key,
            value,
            revision: Some(rev(id)),
            create_revision: Some(rev(create_revision)),
            uid: Some(uid),
            ttl,
        })
    }

    /// Checks that reads at `at` are still possible.
    fn check_at(conn: &Connection, at: i64) -> Result<()> {
        let compacted = compact_rev(conn).map_err(db_err)?;
        if at < compacted {
            return Err(Error::Compacted {
                requested: rev(at),
                compacted: Some(rev(compacted)),
            });
        }
        let current = current_rev(conn).map_err(db_err)?;
        if at > current {
            return Err(Error::invalid(
                "revision",
                format!("{at} is newer than the database's revision {current}"),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Client for SqliteBackend {
    fn codec(&self) -> &PathCodec {
        &self.inner.codec
    }

    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::revision_log()
            // SQLite's default SQLITE_MAX_LENGTH.
            .with_max_value_bytes(Some(1_000_000_000))
    }

    async fn write(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        self.write_kvp(kvp, mode).await
    }

    async fn delete(&self, key: &ResourceKey, opts: &DeleteOptions) -> Result<KVPair> {
        let path = self.inner.codec.to_path(key)?;
        if let Some(r) = &opts.revision {
            rev_of(r)?;
        }
        let (key2, opts2) = (key.clone(), opts.clone());
        let prev = self
            .write_blocking(move |conn| {
                let tx = immediate(conn)?;
                let Some(prev) = live(&tx, &path, None)? else {
                    return Err(Error::NotFound { key: key2 });
                };
                check_delete(&key2, &opts2, &rev(prev.id), Some(&prev.uid))?;
                insert(&tx, NewRow::deletion_of(&prev)).map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(prev)
            })
            .await?;
        // A value that no longer decodes is still deleted; it is returned as null.
        Ok(Self::to_kvp(&self.inner.codec, &prev).unwrap_or_else(|_| {
            undecodable_last_value(
                key,
                rev(prev.id),
                Some(rev(prev.create_revision)),
                Some(prev.uid.clone()),
            )
        }))
    }

    async fn get(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair> {
        let path = self.inner.codec.to_path(key)?;
        let at = opts.revision.as_ref().map(rev_of).transpose()?;
        let codec = self.inner.codec.clone();
        let key2 = key.clone();
        self.read_blocking(move |conn| {
            if let Some(at) = at {
                Self::check_at(conn, at)?;
            }
            let row = live(conn, &path, at)?.ok_or(Error::NotFound { key: key2 })?;
            Self::to_kvp(&codec, &row).map_err(|f| parse_error(*f))
        })
        .await
    }

    async fn list_pages(&self, opts: &ListOptions) -> Result<ListPages> {
        let list = self.list(opts).await?;
        Ok(futures::stream::once(async move { Ok(list) }).boxed())
    }

    async fn list(&self, opts: &ListOptions) -> Result<KVList> {
        let prefix = self.inner.codec.list_prefix(opts)?;
        let at = opts.revision.as_ref().map(rev_of).transpose()?;
        let codec = self.inner.codec.clone();
        let opts = opts.clone();
        self.read_blocking(move |conn| {
            // One read transaction: the rows and the revision come from one snapshot.
            let tx = conn.unchecked_transaction().map_err(db_err)?;
            let at = match at {
                Some(at) => {
                    Self::check_at(&tx, at)?;
                    at
                }
                None => current_rev(&tx).map_err(db_err)?,
            };
            let sql = format!(
                "SELECT {L_ROW_COLUMNS} FROM kvsync_log l JOIN (SELECT name AS n, MAX(id) AS m FROM kvsync_log \
                 WHERE name >= ?1 AND name < ?2 AND id <= ?3 GROUP BY name) latest ON l.id = latest.m \
                 WHERE l.deleted = 0 ORDER BY l.name"
            );
            let mut stmt = tx.prepare(&sql).map_err(db_err)?;
            let rows = stmt
                .query_map(params![prefix, prefix_end(&prefix), at], read_row)
                .map_err(db_err)?;
            let mut list = KVList {
                items: Vec::new(),
                revision: rev(at),
                parse_failures: Vec::new(),
            };
            for row in rows {
                let row = row.map_err(db_err)?;
                push_listed(&mut list, &opts, Self::to_kvp(&codec, &row));
            }
            Ok(list)
        })
        .await
    }

    async fn watch(&self, opts: &ListOptions) -> Result<WatchStream> {
        let prefix = self.inner.codec.list_prefix(opts)?;
        let from = opts.revision.as_ref().map(rev_of).transpose()?;
        let after = self
            .read_blocking(move |conn| {
                let current = current_rev(conn).map_err(db_err)?;
                let compacted = compact_rev(conn).map_err(db_err)?;
                match from {
                    Some(f) if f + 1 < compacted => Err(Error::Compacted {
                        requested: rev(f),
                        compacted: Some(rev(compacted)),
                    }),
                    Some(f) => Ok(f),
                    None => Ok(current),
                }
            })
            .await?;
        let state = WatchState {
            backend: self.clone(),
            rx: self.inner.rev_tx.subscribe(),
            opts: opts.clone(),
            prefix,
            after,
            buf: std::collections::VecDeque::new(),
        };
        Ok(fuse_after_error(futures::stream::unfold(
            state,
            WatchState::next,
        )))
    }

    async fn clean(&self) -> Result<()> {
        let prefix = format!("{}/", self.inner.codec.prefix());
        self.write_blocking(move |conn| {
            let tx = immediate(conn)?;
            let live: Vec<Row> = {
                let sql = format!(
                    "SELECT {ROW_COLUMNS} FROM kvsync_log WHERE id IN (SELECT MAX(id) FROM kvsync_log \
                     WHERE name >= ?1 AND name < ?2 GROUP BY name) AND deleted = 0"
                );
                let mut stmt = tx.prepare(&sql).map_err(db_err)?;
                stmt.query_map(params![prefix, prefix_end(&prefix)], read_row)
                    .map_err(db_err)?
                    .collect::<rusqlite::Result<_>>()
                    .map_err(db_err)?
            };
            for row in &live {
                insert(&tx, NewRow::deletion_of(row))
                .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn compact(&self, revision: &Revision) -> Result<()> {
        let at = rev_of(revision)?;
        self.write_blocking(move |conn| {
            let tx = immediate(conn)?;
            let current = current_rev(&tx).map_err(db_err)?;
            if at > current {
                return Err(Error::invalid(
                    "revision",
                    format!("cannot compact at {at}: the database is at {current}"),
                ));
            }
            // Rows below `at` that a later row at or below `at` superseded, and deletion rows
            // below it, are history nobody can read any more.
            tx.execute(
                "DELETE FROM kvsync_log WHERE id < ?1 AND (deleted = 1 OR EXISTS (SELECT 1 FROM kvsync_log later \
                 WHERE later.name = kvsync_log.name AND later.id > kvsync_log.id AND later.id <= ?1))",
                [at],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO kvsync_meta (key, value) VALUES ('compact_rev', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                [at],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.read_blocking(|conn| current_rev(conn).map(rev).map_err(db_err))
            .await
    }
}

struct WatchState {
    backend: SqliteBackend,
    rx: watch::Receiver<i64>,
    opts: ListOptions,
    prefix: String,
    after: i64,
    buf: std::collections::VecDeque<Result<WatchEvent>>,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(item) = self.buf.pop_front() {
                return Some((item, self));
            }
            self.rx.borrow_and_update();
            if let Err(e) = self.fill().await {
                // The stream ends after it (fuse_after_error).
                return Some((Err(e), self));
            }
            if self.buf.is_empty() {
                // Woken by a write of this process, or after the poll interval for others'.
                let poll = self.backend.inner.poll_interval;
                let _ = tokio::time::timeout(poll, self.rx.changed()).await;
            }
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let (prefix, after) = (self.prefix.clone(), self.after);
        let (rows, current, compacted) = self
            .backend
            .read_blocking(move |conn| {
                let tx = conn.unchecked_transaction().map_err(db_err)?;
                let compacted = compact_rev(&tx).map_err(db_err)?;
                let current = current_rev(&tx).map_err(db_err)?;
                let sql = format!(
                    "SELECT {ROW_COLUMNS} FROM kvsync_log WHERE id > ?1 AND name >= ?2 AND name < ?3 \
                     ORDER BY id LIMIT ?4"
                );
                let mut stmt = tx.prepare(&sql).map_err(db_err)?;
                let rows: Vec<Row> = stmt
                    .query_map(params![after, prefix, prefix_end(&prefix), WATCH_CHUNK], read_row)
                    .map_err(db_err)?
                    .collect::<rusqlite::Result<_>>()
                    .map_err(db_err)?;
                Ok((rows, current, compacted))
            })
            .await?;
        if self.after + 1 < compacted {
            return Err(Error::Compacted {
                requested: rev(self.after),
                compacted: Some(rev(compacted)),
            });
        }
        let full = rows.len() as i64 == WATCH_CHUNK;
        let codec = self.backend.inner.codec.clone();
        for row in rows {
            self.after = row.id;
            if let Some(ev) = self.event(&codec, &row) {
                self.buf.push_back(Ok(ev));
            }
        }
        // Nothing more for this watch up to the current revision: say so, so a resume point
        // stays fresh.
        if !full && current > self.after {
            self.after = current;
            if self.buf.is_empty() {
                self.buf.push_back(Ok(WatchEvent::Bookmark(rev(current))));
            }
        }
        Ok(())
    }

    fn event(&self, codec: &PathCodec, row: &Row) -> Option<WatchEvent> {
        if row.deleted {
            let key = codec.from_path(&row.name).ok()?;
            if !self.opts.matches(&key) {
                return None;
            }
            let old = row.old_value.as_ref().and_then(|v| {
                let (k, value) = decode_entry(codec, &row.name, v, None).ok()?;
                let mut kvp = KVPair::new(k, value);
                kvp.uid = Some(row.uid.clone());
                kvp.create_revision = Some(rev(row.create_revision));
                Some(kvp)
            });
            return Some(WatchEvent::Deleted {
                key,
                revision: rev(row.id),
                old,
            });
        }
        put_event(
            &self.opts,
            SqliteBackend::to_kvp(codec, row),
            row.created,
            None,
        )
    }
}
