//! The revision log in SQL: the schema, reading and writing rows, expiring TTLs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvsync_model::Revision;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::{Error, Result};
use crate::kernel::counter_revision;

pub(super) const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS kvsync_leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kvsync_lease_keys (
    name TEXT PRIMARY KEY,
    lease INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS kvsync_lease_keys_lease ON kvsync_lease_keys(lease);
";

pub(super) fn db_err(e: rusqlite::Error) -> Error {
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

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) fn rev_of(r: &Revision) -> Result<i64> {
    // counter_revision only passes revisions that fit an i64.
    Ok(counter_revision(r, "sqlite")? as i64)
}

pub(super) fn rev(n: i64) -> Revision {
    Revision::from(u64::try_from(n).unwrap_or(0))
}

pub(super) fn prefix_end(prefix: &str) -> String {
    // Paths are UTF-8 without control characters; U+10FFFF sorts after all of them.
    format!("{prefix}\u{10FFFF}")
}

/// One row of the log.
pub(super) struct Row {
    pub(super) id: i64,
    pub(super) name: String,
    pub(super) created: bool,
    pub(super) deleted: bool,
    pub(super) create_revision: i64,
    pub(super) ttl_ms: Option<i64>,
    pub(super) uid: String,
    pub(super) value: Option<Vec<u8>>,
    pub(super) old_value: Option<Vec<u8>>,
}

pub(super) const ROW_COLUMNS: &str =
    "id, name, created, deleted, create_revision, ttl_ms, uid, value, old_value";
/// [`ROW_COLUMNS`] of the table aliased `l`.
pub(super) const L_ROW_COLUMNS: &str =
    "l.id, l.name, l.created, l.deleted, l.create_revision, l.ttl_ms, l.uid, l.value, l.old_value";

pub(super) fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
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

pub(super) fn current_rev(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'kvsync_log'), 0)",
        [],
        |r| r.get(0),
    )
}

pub(super) fn compact_rev(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE((SELECT value FROM kvsync_meta WHERE key = 'compact_rev'), 0)",
        [],
        |r| r.get(0),
    )
}

/// The latest row of `name`, at or before `at` when given.
/// Opens a write transaction that holds SQLite's write lock from the start, so that the
/// check and the write it guards are one step for every thread and process.
pub(super) fn immediate(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)
}

/// The live row of `name` (its latest, unless that is a deletion).
pub(super) fn live(conn: &Connection, name: &str, at: Option<i64>) -> Result<Option<Row>> {
    Ok(latest(conn, name, at)
        .map_err(db_err)?
        .filter(|r| !r.deleted))
}

pub(super) fn latest(
    conn: &Connection,
    name: &str,
    at: Option<i64>,
) -> rusqlite::Result<Option<Row>> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM kvsync_log WHERE name = ?1 AND id <= ?2 ORDER BY id DESC LIMIT 1"
    );
    conn.query_row(&sql, params![name, at.unwrap_or(i64::MAX)], read_row)
        .optional()
}

pub(super) struct NewRow<'a> {
    pub(super) name: &'a str,
    pub(super) created: bool,
    pub(super) deleted: bool,
    pub(super) create_revision: i64,
    pub(super) prev_revision: i64,
    pub(super) ttl: Option<Duration>,
    pub(super) uid: &'a str,
    pub(super) value: Option<&'a [u8]>,
    pub(super) old_value: Option<&'a [u8]>,
    /// The lease the key lives under from this row on.
    pub(super) lease: Option<i64>,
}

impl<'a> NewRow<'a> {
    /// The row that writes `value` to `name`, over `prev` (its live row, if any).
    pub(super) fn write_over(
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
            lease: None,
        }
    }

    /// The row that deletes the key `last` holds (keeping its value as the last one).
    pub(super) fn deletion_of(last: &'a Row) -> Self {
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
            lease: None,
        }
    }
}

/// Writes `value` to `name` over `prev` (its live row, if any), keeping its uid or making a
/// new one; returns the new row's id and the uid.
pub(super) fn insert_over(
    conn: &Connection,
    name: &str,
    prev: Option<&Row>,
    ttl: Option<Duration>,
    value: &[u8],
    lease: Option<i64>,
) -> rusqlite::Result<(i64, String)> {
    let uid = prev.map_or_else(|| uuid::Uuid::new_v4().to_string(), |p| p.uid.clone());
    let mut row = NewRow::write_over(name, prev, ttl, &uid, value);
    row.lease = lease;
    let id = insert(conn, row)?;
    Ok((id, uid))
}

pub(super) fn insert(conn: &Connection, row: NewRow<'_>) -> rusqlite::Result<i64> {
    // A key belongs to the lease of its last write, if any. Every write runs these, so the
    // statements are prepared once per connection.
    conn.prepare_cached("DELETE FROM kvsync_lease_keys WHERE name = ?1")?
        .execute(params![row.name])?;
    if let Some(lease) = row.lease {
        conn.prepare_cached("INSERT INTO kvsync_lease_keys (name, lease) VALUES (?1, ?2)")?
            .execute(params![row.name, lease])?;
    }
    let ttl_ms = row
        .ttl
        .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
    let expires = ttl_ms.map(|t| now_ms().saturating_add(t.max(1)));
    conn.prepare_cached(
        "INSERT INTO kvsync_log (name, created, deleted, create_revision, prev_revision, \
         expires_at_ms, ttl_ms, uid, value, old_value) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
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
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Turns every key whose TTL ran out into a deletion. Returns the new revision if any.
pub(super) fn expire_due(conn: &mut Connection) -> rusqlite::Result<Option<i64>> {
    let now = now_ms();
    let any: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM kvsync_log WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1) \
         OR EXISTS (SELECT 1 FROM kvsync_leases WHERE expires_at_ms <= ?1)",
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
    let leases: Vec<i64> = {
        let mut stmt = tx.prepare("SELECT id FROM kvsync_leases WHERE expires_at_ms <= ?1")?;
        stmt.query_map([now], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for lease in leases {
        last = revoke_lease(&tx, lease)?.or(last);
    }
    // Superseded rows keep their expiry; clear it so they are not looked at again.
    tx.execute(
        "UPDATE kvsync_log SET expires_at_ms = NULL WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
        [now],
    )?;
    tx.commit()?;
    Ok(last)
}

/// Deletes a lease and the keys that live under it; returns the last revision written.
pub(super) fn revoke_lease(conn: &Connection, lease: i64) -> rusqlite::Result<Option<i64>> {
    let rows: Vec<Row> = {
        let mut stmt = conn.prepare(&format!(
            "SELECT {L_ROW_COLUMNS} FROM kvsync_log l JOIN kvsync_lease_keys k ON k.name = l.name \
             WHERE k.lease = ?1 AND l.deleted = 0 \
             AND l.id = (SELECT MAX(id) FROM kvsync_log m WHERE m.name = l.name) ORDER BY l.name"
        ))?;
        stmt.query_map([lease], read_row)?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut last = None;
    for row in &rows {
        last = Some(insert(conn, NewRow::deletion_of(row))?);
    }
    conn.execute("DELETE FROM kvsync_lease_keys WHERE lease = ?1", [lease])?;
    conn.execute("DELETE FROM kvsync_leases WHERE id = ?1", [lease])?;
    Ok(last)
}

/// Whether a lease is held (expired ones are removed before every write).
pub(super) fn lease_exists(conn: &Connection, lease: i64) -> Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM kvsync_leases WHERE id = ?1)",
        [lease],
        |r| r.get(0),
    )
    .map_err(db_err)
}
