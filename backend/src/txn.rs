//! Transactions: compares, then the puts and deletes of one branch, applied atomically across
//! keys ([`Client::txn`](crate::Client::txn)).

use std::collections::{BTreeMap, HashSet};

use kvsync_model::{Json, KVPair, PathCodec, ResourceKey, Revision};

use crate::client::Capabilities;
use crate::error::{Error, Result};
use crate::kernel::encode_for_write;
use crate::lease::LeaseId;

/// A condition a transaction checks before it chooses a branch, as etcd's `Compare`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Compare {
    /// The key exists.
    Exists(ResourceKey),
    /// The key does not exist.
    Absent(ResourceKey),
    /// The key exists and was last written at this revision.
    Revision(ResourceKey, Revision),
    /// The key exists and its value equals this one, compared as JSON values (so that `1.0`
    /// and `1`, or the order of object fields, make no difference).
    Value(ResourceKey, Json),
}

impl Compare {
    /// The key the compare looks at.
    pub fn key(&self) -> &ResourceKey {
        match self {
            Compare::Exists(k) | Compare::Absent(k) | Compare::Revision(k, _) => k,
            Compare::Value(k, _) => k,
        }
    }

    /// Whether the compare holds for a key whose current state is `current`.
    pub(crate) fn holds(&self, current: Option<&KVPair>) -> bool {
        match (self, current) {
            (Compare::Exists(_), c) => c.is_some(),
            (Compare::Absent(_), c) => c.is_none(),
            (Compare::Revision(_, r), Some(c)) => c.revision.as_ref() == Some(r),
            (Compare::Value(_, v), Some(c)) => match (v.as_value(), c.value.as_value()) {
                (Ok(want), Ok(have)) => json_eq(want, have),
                _ => false,
            },
            (Compare::Revision(..) | Compare::Value(..), None) => false,
        }
    }
}

/// JSON equality where numbers compare by value (`1` equals `1.0`).
pub(crate) fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(x), Some(y), _, _) => x == y,
            (_, _, Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

/// A write in a transaction's branch.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum TxnOp {
    /// Creates or replaces the key (keeping its uid and create revision when it exists). The
    /// pair's `revision` is not a precondition here: compare with [`Compare::Revision`].
    Put(KVPair),
    /// Creates or replaces the key as [`TxnOp::Put`] does, under a lease: the key is deleted
    /// when the lease expires or is revoked. A lease that is gone fails the transaction with
    /// [`Error::LeaseLost`] and nothing is written.
    PutLeased(KVPair, LeaseId),
    /// Deletes the key if it exists.
    Delete(ResourceKey),
}

impl TxnOp {
    /// The pair a put writes and the lease it writes it under, if any.
    pub(crate) fn put(&self) -> Option<(&KVPair, Option<LeaseId>)> {
        match self {
            TxnOp::Put(kvp) => Some((kvp, None)),
            TxnOp::PutLeased(kvp, lease) => Some((kvp, Some(*lease))),
            TxnOp::Delete(_) => None,
        }
    }

    /// The key the operation writes.
    pub fn key(&self) -> &ResourceKey {
        match self {
            TxnOp::Put(kvp) | TxnOp::PutLeased(kvp, _) => &kvp.key,
            TxnOp::Delete(k) => k,
        }
    }
}

/// A transaction: if every compare holds, the `then` operations, else the `otherwise` ones,
/// all applied atomically. Built in the style of etcd-client's `Txn`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kvsync_backend::Result<()> {
/// use kvsync_backend::{Client, Compare, MemoryBackend, Txn, TxnOp};
/// use kvsync_model::{KVPair, KindInfo, Registry, ResourceKey};
/// use serde_json::json;
///
/// let registry = Registry::new().with_kind(KindInfo::untyped("example.com", "Tenant", "tenants", false));
/// let client = MemoryBackend::new(registry);
/// let (a, b) = (ResourceKey::cluster("Tenant", "a"), ResourceKey::cluster("Tenant", "b"));
/// let a1 = client.create(KVPair::new(a.clone(), json!({"owner": "ann"}))).await?;
///
/// // Move the tenant from a to b, only if a was not changed since it was read.
/// let resp = client
///     .txn(
///         Txn::new()
///             .when([Compare::Revision(a.clone(), a1.revision.clone().unwrap()), Compare::Absent(b.clone())])
///             .and_then([TxnOp::Delete(a.clone()), TxnOp::Put(KVPair::new(b.clone(), json!({"owner": "ann"})))]),
///     )
///     .await?;
/// assert!(resp.succeeded);
/// assert!(client.get_opt(&a, &Default::default()).await?.is_none());
///
/// // The same again: a is gone, so the compare fails and nothing is written.
/// let again = client
///     .txn(Txn::new().when([Compare::Exists(a.clone())]).and_then([TxnOp::Delete(b.clone())]))
///     .await?;
/// assert!(!again.succeeded && again.results.is_empty());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Txn {
    /// What must hold for the `then` branch to run.
    pub compares: Vec<Compare>,
    /// Applied when every compare holds.
    pub then: Vec<TxnOp>,
    /// Applied when a compare does not hold.
    pub otherwise: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction (no compares: its `then` branch runs).
    pub fn new() -> Self {
        Txn::default()
    }

    /// Adds compares.
    #[must_use]
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }

    /// Adds operations to the branch that runs when every compare holds.
    #[must_use]
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.then.extend(ops);
        self
    }

    /// Adds operations to the branch that runs when a compare does not hold.
    #[must_use]
    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.otherwise.extend(ops);
        self
    }

    /// Every key the transaction reads or writes, each once, in path order.
    pub(crate) fn keys(&self) -> Vec<ResourceKey> {
        let mut seen = HashSet::new();
        let mut keys: Vec<ResourceKey> = self
            .compares
            .iter()
            .map(Compare::key)
            .chain(self.then.iter().map(TxnOp::key))
            .chain(self.otherwise.iter().map(TxnOp::key))
            .filter(|k| seen.insert(*k))
            .cloned()
            .collect();
        keys.sort();
        keys
    }
}

/// What one operation of the branch that ran did.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum TxnResult {
    /// The stored pair, with its new revision.
    Put(KVPair),
    /// The deleted key's last value; `None` when it did not exist.
    Delete(Option<KVPair>),
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TxnResponse {
    /// Whether every compare held (the `then` branch ran) or not (`otherwise` ran).
    pub succeeded: bool,
    /// The datastore's revision after the transaction.
    pub revision: Revision,
    /// One result per operation of the branch that ran, in order.
    pub results: Vec<TxnResult>,
}

/// A put of a transaction, validated and encoded.
pub(crate) struct EncodedPut {
    pub(crate) bytes: Vec<u8>,
    pub(crate) lease: Option<LeaseId>,
}

/// One branch's operations, validated: each put's path and bytes (`None` for a delete).
pub(crate) struct Prepared {
    pub(crate) then: Vec<(TxnOp, String, Option<EncodedPut>)>,
    pub(crate) otherwise: Vec<(TxnOp, String, Option<EncodedPut>)>,
    /// The paths of every key the transaction reads or writes, by key.
    pub(crate) paths: BTreeMap<ResourceKey, String>,
}

impl Prepared {
    /// The branch that runs.
    pub(crate) fn branch(&self, succeeded: bool) -> &[(TxnOp, String, Option<EncodedPut>)] {
        if succeeded {
            &self.then
        } else {
            &self.otherwise
        }
    }
}

/// Validates a transaction before anything is sent: its size against the backend's limits,
/// every key and value against the registry, no key written twice in one branch.
///
/// # Errors
/// [`Error::Unsupported`] where the backend has no transactions; [`Error::Invalid`] naming
/// what is wrong. Nothing is written.
pub(crate) fn prepare(
    codec: &PathCodec,
    caps: &Capabilities,
    backend: &'static str,
    txn: &Txn,
) -> Result<Prepared> {
    if !caps.transactions {
        return Err(Error::Unsupported {
            op: "txn".into(),
            backend,
        });
    }
    if let Some(max) = caps.max_txn_ops {
        for (what, n) in [
            ("compares", txn.compares.len()),
            ("then", txn.then.len()),
            ("otherwise", txn.otherwise.len()),
            ("keys", txn.keys().len()),
        ] {
            if n > max {
                return Err(Error::invalid(
                    format!("txn.{what}"),
                    format!(
                        "{n} is more than the {max} operations a transaction on {backend} may have; \
                         a transaction is never split"
                    ),
                ));
            }
        }
    }
    let mut paths = BTreeMap::new();
    for c in &txn.compares {
        paths.insert(c.key().clone(), codec.to_path(c.key())?);
    }
    let mut branch =
        |ops: &[TxnOp], name: &str| -> Result<Vec<(TxnOp, String, Option<EncodedPut>)>> {
            let mut seen = HashSet::new();
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                if !seen.insert(op.key().clone()) {
                    return Err(Error::invalid(
                        format!("txn.{name}"),
                        format!("{} is written twice in one branch", op.key()),
                    ));
                }
                let (path, put) = match op.put() {
                    Some((kvp, lease)) => {
                        if lease.is_some() && kvp.ttl.is_some() {
                            return Err(Error::invalid(
                                format!("txn.{name}"),
                                format!("{} has a TTL and a lease: one or the other", kvp.key),
                            ));
                        }
                        let (path, bytes) = encode_for_write(codec, kvp)?;
                        (path, Some(EncodedPut { bytes, lease }))
                    }
                    None => {
                        codec.validate(op.key())?;
                        (codec.to_path(op.key())?, None)
                    }
                };
                paths.insert(op.key().clone(), path.clone());
                out.push((op.clone(), path, put));
            }
            Ok(out)
        };
    let then = branch(&txn.then, "then")?;
    let otherwise = branch(&txn.otherwise, "otherwise")?;
    Ok(Prepared {
        then,
        otherwise,
        paths,
    })
}

/// Whether every compare holds, given each key's current state.
pub(crate) fn evaluate(
    compares: &[Compare],
    current: &BTreeMap<ResourceKey, Option<KVPair>>,
) -> bool {
    compares
        .iter()
        .all(|c| c.holds(current.get(c.key()).and_then(Option::as_ref)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_compare_by_value_and_objects_by_content() {
        assert!(json_eq(
            &json!({"a": 1, "b": [1.0]}),
            &json!({"b": [1], "a": 1.0})
        ));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": null})));
        assert!(!json_eq(&json!("1"), &json!(1)));
    }

    #[test]
    fn keys_are_listed_once_in_order() {
        let (a, b) = (
            ResourceKey::cluster("K", "a"),
            ResourceKey::cluster("K", "b"),
        );
        let txn = Txn::new()
            .when([Compare::Exists(b.clone())])
            .and_then([TxnOp::Delete(b.clone()), TxnOp::Delete(a.clone())])
            .or_else([TxnOp::Delete(a.clone())]);
        assert_eq!(txn.keys(), vec![a, b]);
    }
}
