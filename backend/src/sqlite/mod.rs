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

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use kvsync_model::{
    DeleteOptions, GetOptions, KVList, KVPair, ListOptions, ParseFailure, PathCodec, ResourceKey,
    Revision,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::client::{Capabilities, Client, ListPages, WriteMode};
use crate::error::{Error, Result};
use crate::kernel::check_lease_ttl;
use crate::kernel::{
    check_delete, check_write, decode_entry, encode_for_write, one_page, parse_error, push_listed,
    undecodable_last_value,
};
use crate::lease::LeaseId;
use crate::txn::{Txn, TxnResponse, TxnResult, evaluate, prepare};
use crate::watch::WatchStream;

mod config;
mod log;
mod watch;

pub use config::{Durability, SqliteConfig};
use log::{
    L_ROW_COLUMNS, NewRow, ROW_COLUMNS, Row, SCHEMA, compact_rev, current_rev, db_err, expire_due,
    immediate, insert, insert_over, lease_exists, live, now_ms, prefix_end, read_row, rev, rev_of,
    revoke_lease,
};
use watch::WatchState;

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
    rev_tx: tokio::sync::watch::Sender<i64>,
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
        let open_once = |write: bool| -> Result<Connection> {
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
                // One immediate transaction: the busy handler applies, and processes opening
                // a new file at once do not race on its schema.
                conn.execute_batch(&format!("BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;"))
                    .map_err(db_err)?;
            }
            Ok(conn)
        };
        // Switching a new file to WAL takes a lock that SQLite's busy handler does not wait
        // for: when another process is opening the same file, try again until the busy
        // timeout.
        let open = |write: bool| -> Result<Connection> {
            let deadline = std::time::Instant::now() + config.busy_timeout;
            loop {
                match open_once(write) {
                    Err(Error::Unavailable { message, .. })
                        if message.contains("locked") && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => return other,
                }
            }
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
                rev_tx: tokio::sync::watch::Sender::new(start),
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
            let (id, _) =
                insert_over(&tx, &path, prev.as_ref(), None, &bytes, None).map_err(db_err)?;
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
                    insert_over(&tx, &path, prev.as_ref(), ttl, &bytes, None).map_err(db_err)?;
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

    async fn txn_kvps(&self, txn: Txn) -> Result<TxnResponse> {
        let prepared = prepare(&self.inner.codec, &self.capabilities(), "sqlite", &txn)?;
        let codec = self.inner.codec.clone();
        self.write_blocking(move |conn| {
            let tx = immediate(conn)?;
            let mut current = BTreeMap::new();
            for c in &txn.compares {
                let row = live(&tx, &prepared.paths[c.key()], None)?;
                let kvp = row.map(|row| {
                    Self::to_kvp(&codec, &row).unwrap_or_else(|_| {
                        undecodable_last_value(c.key(), rev(row.id), None, None)
                    })
                });
                current.insert(c.key().clone(), kvp);
            }
            let succeeded = evaluate(&txn.compares, &current);
            let branch = prepared.branch(succeeded);
            // Every lease the branch writes under must hold, or nothing is written.
            for put in branch.iter().filter_map(|(_, _, p)| p.as_ref()) {
                if let Some(lease) = put.lease
                    && !lease_exists(&tx, lease.0)?
                {
                    return Err(Error::LeaseLost { lease });
                }
            }
            let mut results = Vec::new();
            for (op, path, put) in branch {
                let prev = live(&tx, path, None)?;
                results.push(match (op.put(), put) {
                    (Some((kvp, _)), Some(put)) => {
                        let lease = put.lease.map(|l| l.0);
                        let (id, uid) =
                            insert_over(&tx, path, prev.as_ref(), kvp.ttl, &put.bytes, lease)
                                .map_err(db_err)?;
                        TxnResult::Put(KVPair {
                            key: kvp.key.clone(),
                            value: kvp.value.clone(),
                            revision: Some(rev(id)),
                            create_revision: Some(rev(prev.map_or(id, |p| p.create_revision))),
                            uid: Some(uid),
                            ttl: kvp.ttl,
                        })
                    }
                    _ => TxnResult::Delete(match prev {
                        Some(prev) => {
                            insert(&tx, NewRow::deletion_of(&prev)).map_err(db_err)?;
                            Some(Self::last_value(&codec, op.key(), &prev))
                        }
                        None => None,
                    }),
                });
            }
            let revision = rev(current_rev(&tx).map_err(db_err)?);
            tx.commit().map_err(db_err)?;
            Ok(TxnResponse {
                succeeded,
                revision,
                results,
            })
        })
        .await
    }

    /// The last value of a deleted row; one that no longer decodes is returned as null.
    fn last_value(codec: &PathCodec, key: &ResourceKey, prev: &Row) -> KVPair {
        Self::to_kvp(codec, prev).unwrap_or_else(|_| {
            undecodable_last_value(
                key,
                rev(prev.id),
                Some(rev(prev.create_revision)),
                Some(prev.uid.clone()),
            )
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
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::revision_log()
            // SQLite's default SQLITE_MAX_LENGTH.
            .with_max_value_bytes(Some(1_000_000_000))
    }

    fn codec(&self) -> &PathCodec {
        &self.inner.codec
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
        Ok(Self::last_value(&self.inner.codec, key, &prev))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.txn_kvps(txn).await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        check_lease_ttl(ttl)?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.write_blocking(move |conn| {
            conn.execute(
                "INSERT INTO kvsync_leases (ttl_ms, expires_at_ms) VALUES (?1, ?2)",
                params![ttl_ms, now_ms().saturating_add(ttl_ms)],
            )
            .map_err(db_err)?;
            Ok(LeaseId(conn.last_insert_rowid()))
        })
        .await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        // write_blocking expires due leases first: a lease past its time is gone here.
        self.write_blocking(move |conn| {
            let ttl_ms: Option<i64> = conn
                .query_row(
                    "UPDATE kvsync_leases SET expires_at_ms = ?2 + ttl_ms WHERE id = ?1 \
                     RETURNING ttl_ms",
                    params![lease.0, now_ms()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let ttl_ms = ttl_ms.ok_or(Error::LeaseLost { lease })?;
            Ok(Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0)))
        })
        .await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.write_blocking(move |conn| {
            let tx = immediate(conn)?;
            revoke_lease(&tx, lease.0).map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
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
        Ok(one_page(list))
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
        let rx = self.inner.rev_tx.subscribe();
        Ok(WatchState::new(self.clone(), rx, opts, prefix, after).into_stream(WatchState::next))
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
