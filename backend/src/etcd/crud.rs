//! Reads and writes of single keys: put, delete and get, each checked in one etcd Txn.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use kvsync_model::{KVPair, ResourceKey, Revision};

use super::convert::{Envelope, map_err, rev_i64};
use super::{EtcdBackend, MAX_WRITE_RETRIES};
use crate::client::WriteMode;
use crate::error::{Error, Result};
use crate::kernel::{check_delete, check_write, encode_for_write, parse_error};

impl EtcdBackend {
    pub(super) async fn read_current(&self, path: &str) -> Result<Option<etcd_client::KeyValue>> {
        let resp = self.kv().get(path, None).await.map_err(map_err)?;
        Ok(resp.kvs().first().cloned())
    }

    pub(super) async fn lease_for(&self, ttl: Option<Duration>) -> Result<Option<i64>> {
        let Some(ttl) = ttl else { return Ok(None) };
        let secs =
            i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).unwrap_or(i64::MAX);
        let lease = self
            .client
            .lease_client()
            .grant(secs.max(1), None)
            .await
            .map_err(map_err)?;
        Ok(Some(lease.id()))
    }

    pub(super) async fn write_kvp(&self, kvp: KVPair, mode: WriteMode) -> Result<KVPair> {
        let (path, _) = encode_for_write(&self.codec, &kvp)?;
        let lease = self.lease_for(kvp.ttl).await?;
        let expected = match (&mode, &kvp.revision) {
            (WriteMode::Update, Some(r)) => Some(rev_i64(r)?),
            _ => None,
        };
        for _ in 0..MAX_WRITE_RETRIES {
            let current = self.read_current(&path).await?;
            let current_rev = current
                .as_ref()
                .map(|c| Revision::from(c.mod_revision() as u64));
            let precondition = expected.and(kvp.revision.as_ref());
            check_write(&kvp.key, mode, precondition, current_rev.as_ref())?;
            let (compare, uid, create_rev) = match &current {
                None => (
                    Compare::create_revision(path.as_str(), CompareOp::Equal, 0),
                    uuid::Uuid::new_v4().to_string(),
                    None,
                ),
                Some(cur) => {
                    // Keep the uid of what is there; a stored value that no longer decodes
                    // is replaced under a new uid.
                    let uid = Envelope::uid_of(cur.value())
                        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                    (
                        Compare::mod_revision(path.as_str(), CompareOp::Equal, cur.mod_revision()),
                        uid,
                        Some(cur.create_revision()),
                    )
                }
            };
            let bytes = Envelope::encode(&uid, kvp.ttl, &kvp.value)?;
            let put_opts = lease.map(|l| PutOptions::new().with_lease(l));
            let txn = Txn::new().when(vec![compare]).and_then(vec![TxnOp::put(
                path.as_str(),
                bytes,
                put_opts,
            )]);
            let resp = self.kv().txn(txn).await.map_err(map_err)?;
            if !resp.succeeded() {
                // Another writer came between our read and our write: read again.
                continue;
            }
            let rev = resp
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| Error::unavailable("etcd answered a write without a header"))?;
            return Ok(KVPair {
                key: kvp.key,
                value: kvp.value,
                revision: Some(Revision::from(rev as u64)),
                create_revision: Some(Revision::from(create_rev.unwrap_or(rev) as u64)),
                uid: Some(uid),
                ttl: kvp.ttl,
            });
        }
        Err(Error::unavailable(format!(
            "{} kept changing: gave up after {MAX_WRITE_RETRIES} attempts",
            kvp.key
        )))
    }

    pub(super) async fn delete_kvp(
        &self,
        key: &ResourceKey,
        opts: &kvsync_model::DeleteOptions,
    ) -> Result<KVPair> {
        let path = self.codec.to_path(key)?;
        let expected = opts.revision.as_ref().map(rev_i64).transpose()?;
        for _ in 0..MAX_WRITE_RETRIES {
            // A uid precondition is checked on the value read, and the delete made
            // conditional on that read's revision (retried if another writer came first).
            let read = match &opts.uid {
                Some(_) => {
                    let Some(cur) = self.read_current(&path).await? else {
                        return Err(Error::NotFound { key: key.clone() });
                    };
                    let uid = Envelope::uid_of(cur.value());
                    let at = Revision::from(cur.mod_revision() as u64);
                    check_delete(key, opts, &at, uid.as_deref())?;
                    Some(cur.mod_revision())
                }
                None => None,
            };
            let compare = match read.or(expected) {
                Some(r) => Compare::mod_revision(path.as_str(), CompareOp::Equal, r),
                None => Compare::create_revision(path.as_str(), CompareOp::Greater, 0),
            };
            let txn = Txn::new()
                .when(vec![compare])
                .and_then(vec![TxnOp::delete(
                    path.as_str(),
                    Some(DeleteOptions::new().with_prev_key()),
                )])
                .or_else(vec![TxnOp::get(path.as_str(), None)]);
            let resp = self.kv().txn(txn).await.map_err(map_err)?;
            let ops = resp.op_responses();
            if !resp.succeeded() {
                let actual = ops.iter().find_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                    _ => None,
                });
                match (actual, &opts.revision) {
                    (None, _) => return Err(Error::NotFound { key: key.clone() }),
                    (Some(actual), Some(e)) => {
                        return Err(Error::Conflict {
                            key: key.clone(),
                            expected: Some(e.clone()),
                            actual: Some(Revision::from(actual as u64)),
                        });
                    }
                    // Written between the uid check and the delete: check again.
                    (Some(_), None) => continue,
                }
            }
            let prev = ops.iter().find_map(|op| match op {
                TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
                _ => None,
            });
            let Some(prev) = prev else {
                return Err(Error::NotFound { key: key.clone() });
            };
            // A value that no longer decodes is still deleted; it is returned as null.
            return Ok(self.last_value(key, &prev));
        }
        Err(Error::unavailable(format!("{key} kept changing")))
    }

    pub(super) async fn get_kvp(
        &self,
        key: &ResourceKey,
        opts: &kvsync_model::GetOptions,
    ) -> Result<KVPair> {
        let path = self.codec.to_path(key)?;
        let at = opts.revision.as_ref().map(rev_i64).transpose()?;
        let opts = at.map(|r| GetOptions::new().with_revision(r));
        let resp = match self.kv().get(path.as_str(), opts).await {
            Ok(r) => r,
            Err(e) => return Err(self.map_read_err(e, at).await),
        };
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| Error::NotFound { key: key.clone() })?;
        self.decode(kv).map_err(|f| parse_error(*f))
    }
}
