//! Watches: read the log after a revision, woken by this process's writes and polling for
//! other processes'.

use kvsync_model::{KVPair, PathCodec};
use rusqlite::params;

use super::SqliteBackend;
use super::log::{ROW_COLUMNS, Row, compact_rev, current_rev, db_err, prefix_end, read_row, rev};
use crate::error::{Error, Result};
use crate::kernel::{LogTail, decode_entry, put_event};
use crate::watch::WatchEvent;

/// How many log rows a watch reads per query.
const WATCH_CHUNK: i64 = 512;

/// A watch of the database: its log tailed from a revision, polled for other processes'
/// writes.
pub(super) type WatchState = LogTail<SqliteBackend, i64, Result<WatchEvent>>;

impl WatchState {
    pub(super) async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
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

    pub(super) async fn fill(&mut self) -> Result<()> {
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

    pub(super) fn event(&self, codec: &PathCodec, row: &Row) -> Option<WatchEvent> {
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
