//! Transactions: the compares are checked on one snapshot of the keys, then the chosen branch
//! is written in one etcd Txn guarded by what that snapshot saw.
//!
//! etcd compares stored bytes, and kvsync stores each value in an envelope with its uid, so a
//! compare of values (and keeping the uid of a key a put replaces) needs the current entries.
//! They are read in one Txn of gets (one revision); the write then runs only if every key the
//! transaction touches is still as read (its mod revision, or its absence), which makes the
//! compares' outcome hold at the moment of the write. When another writer came between, the
//! two steps run again.

use std::collections::BTreeMap;

use etcd_client::{
    Compare as EtcdCompare, CompareOp, DeleteOptions, KeyValue, PutOptions, Txn as EtcdTxn,
    TxnOp as EtcdOp, TxnOpResponse,
};
use kvsync_model::{KVPair, ResourceKey, Revision};

use super::convert::{Envelope, map_err};
use super::{EtcdBackend, MAX_WRITE_RETRIES};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::kernel::{check_lease_ttl, undecodable_last_value};
use crate::lease::LeaseId;
use crate::txn::{Txn, TxnOp, TxnResponse, TxnResult, evaluate, prepare};

impl EtcdBackend {
    pub(super) async fn txn_kvps(&self, txn: Txn) -> Result<TxnResponse> {
        let prepared = prepare(&self.codec, &self.capabilities(), "etcd", &txn)?;
        // Leases for the puts with a TTL, granted once (an unused one expires by itself).
        let mut leases = Vec::new();
        for (op, _, _) in prepared.then.iter().chain(&prepared.otherwise) {
            if let TxnOp::Put(kvp) = op
                && kvp.ttl.is_some()
            {
                leases.push((kvp.key.clone(), self.lease_for(kvp.ttl).await?));
            }
        }
        let lease_of = |key: &ResourceKey| leases.iter().find(|(k, _)| k == key).and_then(|l| l.1);
        for _ in 0..MAX_WRITE_RETRIES {
            let seen = self.read_snapshot(&prepared.paths).await?;
            let mut current = BTreeMap::new();
            for c in &txn.compares {
                let kvp = seen[c.key()].as_ref().map(|kv| {
                    self.decode(kv).unwrap_or_else(|_| {
                        let at = Revision::from(kv.mod_revision() as u64);
                        undecodable_last_value(c.key(), at, None, None)
                    })
                });
                current.insert(c.key().clone(), kvp);
            }
            let succeeded = evaluate(&txn.compares, &current);
            let guards: Vec<EtcdCompare> = prepared
                .paths
                .iter()
                .map(|(key, path)| match &seen[key] {
                    Some(kv) => EtcdCompare::mod_revision(
                        path.as_str(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    ),
                    None => EtcdCompare::create_revision(path.as_str(), CompareOp::Equal, 0),
                })
                .collect();
            let branch = prepared.branch(succeeded);
            let mut ops = Vec::with_capacity(branch.len());
            let mut uids = Vec::with_capacity(branch.len());
            for (op, path, put) in branch {
                match (op.put(), put) {
                    (Some((kvp, _)), Some(put)) => {
                        // Keep the uid of what is there; one that no longer decodes is
                        // replaced under a new uid.
                        let uid = seen[&kvp.key]
                            .as_ref()
                            .and_then(|kv| Envelope::uid_of(kv.value()))
                            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                        let bytes = Envelope::encode(&uid, kvp.ttl, &kvp.value)?;
                        let lease = put.lease.map(|l| l.0).or_else(|| lease_of(&kvp.key));
                        let opts = lease.map(|l| PutOptions::new().with_lease(l));
                        ops.push(EtcdOp::put(path.as_str(), bytes, opts));
                        uids.push(uid);
                    }
                    _ => {
                        if seen[op.key()].is_some() {
                            let opts = DeleteOptions::new().with_prev_key();
                            ops.push(EtcdOp::delete(path.as_str(), Some(opts)));
                        }
                        uids.push(String::new());
                    }
                }
            }
            let resp = match self
                .kv()
                .txn(EtcdTxn::new().when(guards).and_then(ops))
                .await
            {
                Ok(resp) => resp,
                Err(e) if e.to_string().contains("lease not found") => {
                    let lease = branch
                        .iter()
                        .find_map(|(_, _, p)| p.as_ref().and_then(|p| p.lease))
                        .unwrap_or(LeaseId(0));
                    return Err(Error::LeaseLost { lease });
                }
                Err(e) => return Err(map_err(e)),
            };
            if !resp.succeeded() {
                // Another writer came between the read and the write: again.
                continue;
            }
            let revision = resp
                .header()
                .map(|h| Revision::from(h.revision() as u64))
                .ok_or_else(|| Error::unavailable("etcd answered a txn without a header"))?;
            let mut answers = resp.op_responses().into_iter();
            let mut results = Vec::with_capacity(branch.len());
            for ((op, _, _), uid) in branch.iter().zip(uids) {
                results.push(match op {
                    TxnOp::Put(kvp) | TxnOp::PutLeased(kvp, _) => {
                        answers.next();
                        let create = seen[&kvp.key].as_ref().map_or(revision.clone(), |kv| {
                            Revision::from(kv.create_revision() as u64)
                        });
                        TxnResult::Put(KVPair {
                            key: kvp.key.clone(),
                            value: kvp.value.clone(),
                            revision: Some(revision.clone()),
                            create_revision: Some(create),
                            uid: Some(uid),
                            ttl: kvp.ttl,
                        })
                    }
                    TxnOp::Delete(key) => TxnResult::Delete(match &seen[key] {
                        None => None,
                        Some(_) => {
                            let prev = match answers.next() {
                                Some(TxnOpResponse::Delete(d)) => d.prev_kvs().first().cloned(),
                                _ => None,
                            };
                            prev.map(|kv| self.last_value(key, &kv))
                        }
                    }),
                });
            }
            return Ok(TxnResponse {
                succeeded,
                revision,
                results,
            });
        }
        Err(Error::unavailable(format!(
            "the keys of a transaction kept changing: gave up after {MAX_WRITE_RETRIES} attempts"
        )))
    }

    /// Every key's entry, read in one Txn (so at one revision).
    async fn read_snapshot(
        &self,
        paths: &BTreeMap<ResourceKey, String>,
    ) -> Result<BTreeMap<ResourceKey, Option<KeyValue>>> {
        let gets: Vec<EtcdOp> = paths
            .values()
            .map(|p| EtcdOp::get(p.as_str(), None))
            .collect();
        let resp = self
            .kv()
            .txn(EtcdTxn::new().and_then(gets))
            .await
            .map_err(map_err)?;
        let answers = resp.op_responses();
        if answers.len() != paths.len() {
            return Err(Error::unavailable(format!(
                "etcd answered {} of {} reads of a transaction",
                answers.len(),
                paths.len()
            )));
        }
        Ok(paths
            .keys()
            .zip(answers)
            .map(|(key, answer)| {
                let kv = match answer {
                    TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                    _ => None,
                };
                (key.clone(), kv)
            })
            .collect())
    }

    /// A deleted entry's last value; one that no longer decodes is returned as null.
    pub(super) fn last_value(&self, key: &ResourceKey, kv: &KeyValue) -> KVPair {
        self.decode(kv).unwrap_or_else(|_| {
            undecodable_last_value(
                key,
                Revision::from(kv.mod_revision() as u64),
                Some(Revision::from(kv.create_revision() as u64)),
                Envelope::uid_of(kv.value()),
            )
        })
    }
}

impl EtcdBackend {
    pub(super) async fn grant(&self, ttl: std::time::Duration) -> Result<LeaseId> {
        check_lease_ttl(ttl)?;
        // etcd counts in whole seconds: round up, never shorten the lease asked for.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let resp = self
            .client
            .lease_client()
            .grant(i64::try_from(secs).unwrap_or(i64::MAX), None)
            .await
            .map_err(map_err)?;
        Ok(LeaseId(resp.id()))
    }

    pub(super) async fn keep_alive_once(&self, lease: LeaseId) -> Result<std::time::Duration> {
        // etcd-client says "lease not found" (and etcd "requested lease not found").
        let lost = |e: etcd_client::Error| {
            if e.to_string().contains("lease not found") {
                Error::LeaseLost { lease }
            } else {
                map_err(e)
            }
        };
        let (mut keeper, mut answers) = self
            .client
            .lease_client()
            .keep_alive(lease.0)
            .await
            .map_err(lost)?;
        keeper.keep_alive().await.map_err(lost)?;
        match answers.message().await.map_err(lost)? {
            Some(a) if a.ttl() > 0 => Ok(std::time::Duration::from_secs(a.ttl() as u64)),
            Some(_) => Err(Error::LeaseLost { lease }),
            None => Err(Error::unavailable(
                "etcd ended a lease keep-alive without an answer",
            )),
        }
    }

    pub(super) async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self.client.lease_client().revoke(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("lease not found") => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }
}
