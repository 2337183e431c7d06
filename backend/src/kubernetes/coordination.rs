//! Locks and elections on Kubernetes: each lock is a coordination.k8s.io/v1 Lease object,
//! read and written as client-go's `resourcelock.LeaseLock` does; guarded writes store their
//! fence on the object they write.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kvsync_model::{KVPair, ResourceKey, Revision};
use serde_json::json;

use super::convert::{map_err, namespace_err};
use super::{KubernetesBackend, MAX_WRITE_RETRIES};
use crate::error::{Error, Result};
use crate::lock_record::{Fence, LockRecord, LockRecords};

/// The annotation holding the fence of the last guarded write of an object.
pub const FENCE_ANNOTATION: &str = "kvsync.dev/fence";
/// The annotation naming the lock (`<namespace>/<name>` of its Lease) that fence belongs to.
pub const FENCE_LOCK_ANNOTATION: &str = "kvsync.dev/fence-lock";

fn to_micro(t: Option<SystemTime>) -> Option<MicroTime> {
    t.and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
        .map(MicroTime)
}

fn from_micro(t: Option<&MicroTime>) -> Option<SystemTime> {
    t.map(|t| SystemTime::from(t.0))
}

/// A record from a Lease object; fields a candidate cannot read count as absent.
fn to_record(lease: Lease) -> LockRecord {
    let spec = lease.spec.unwrap_or_default();
    LockRecord {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        lease_duration: Duration::from_secs(
            spec.lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(0),
        ),
        acquired: from_micro(spec.acquire_time.as_ref()),
        renewed: from_micro(spec.renew_time.as_ref()),
        transitions: spec
            .lease_transitions
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
        revision: lease.metadata.resource_version.map(Revision::from),
    }
}

impl KubernetesBackend {
    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.lease_namespace)
    }

    /// The key a lock's Lease is named by in errors.
    fn lease_key(&self, name: &str) -> ResourceKey {
        ResourceKey::namespaced("Lease", self.lease_namespace.clone(), name)
    }

    fn to_lease(&self, name: &str, record: &LockRecord) -> Result<Lease> {
        // Whole seconds, rounded up: others wait at least as long as the holder counts on.
        let secs =
            record.lease_duration.as_secs() + u64::from(record.lease_duration.subsec_nanos() > 0);
        let secs = i32::try_from(secs.max(1))
            .map_err(|_| Error::invalid("ttl", "a lease duration must fit in an i32 of seconds"))?;
        let transitions = i32::try_from(record.transitions)
            .map_err(|_| Error::invalid("lease", "leaseTransitions would overflow its 32 bits"))?;
        Ok(Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.lease_namespace.clone()),
                resource_version: record.revision.as_ref().map(ToString::to_string),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                // client-go writes an empty holder on release.
                holder_identity: Some(record.holder.clone().unwrap_or_default()),
                lease_duration_seconds: Some(secs),
                acquire_time: to_micro(record.acquired),
                renew_time: to_micro(record.renewed),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        })
    }

    /// The fence an object carries for `lock`, if any.
    fn stored_fence(obj: &kube::api::DynamicObject, lock: &str) -> Option<u64> {
        let ann = obj.metadata.annotations.as_ref()?;
        if ann.get(FENCE_LOCK_ANNOTATION).map(String::as_str) != Some(lock) {
            return None;
        }
        // An unreadable fence counts as the highest: nobody's write may pass it blindly.
        Some(
            ann.get(FENCE_ANNOTATION)
                .map_or(u64::MAX, |f| f.parse().unwrap_or(u64::MAX)),
        )
    }
}

#[async_trait]
impl LockRecords for KubernetesBackend {
    async fn read_lock_record(&self, name: &str) -> Result<Option<LockRecord>> {
        let key = self.lease_key(name);
        let lease = self
            .leases()
            .get_opt(name)
            .await
            .map_err(|e| map_err(e, Some(&key), None))?;
        Ok(lease.map(to_record))
    }

    async fn write_lock_record(&self, name: &str, record: &LockRecord) -> Result<LockRecord> {
        let key = self.lease_key(name);
        let lease = self.to_lease(name, record)?;
        let pp = PostParams {
            field_manager: Some("kvsync".into()),
            ..PostParams::default()
        };
        let answer = match &record.revision {
            None => self.leases().create(&pp, &lease).await,
            Some(_) => self.leases().replace(name, &pp, &lease).await,
        };
        match answer {
            Ok(l) => Ok(to_record(l)),
            Err(kube::Error::Api(s)) if s.code == 409 && record.revision.is_none() => {
                Err(Error::AlreadyExists { key })
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict {
                key,
                expected: record.revision.clone(),
                actual: None,
            }),
            Err(e) => Err(namespace_err(&e, Some(&self.lease_namespace))
                .unwrap_or_else(|| map_err(e, Some(&key), None))),
        }
    }

    async fn fenced_write(&self, kvp: KVPair, fence: &Fence) -> Result<KVPair> {
        self.check_writable(&kvp)?;
        let lock = format!("{}/{}", self.lease_namespace, fence.lock);
        let refused = || Error::NotHeld {
            lock: fence.lock.clone(),
        };
        let token = fence.token.to_string();
        for _ in 0..MAX_WRITE_RETRIES {
            match self.current(&kvp.key).await? {
                None => {
                    let mut obj = self.to_object(&kvp)?;
                    obj.metadata.annotations = Some(
                        [
                            (FENCE_ANNOTATION.to_owned(), token.clone()),
                            (FENCE_LOCK_ANNOTATION.to_owned(), lock.clone()),
                        ]
                        .into(),
                    );
                    match self.post(&kvp, &obj).await {
                        Err(Error::AlreadyExists { .. }) => continue,
                        other => return other,
                    }
                }
                Some(cur) => {
                    if Self::stored_fence(&cur, &lock).is_some_and(|f| f > fence.token) {
                        return Err(refused());
                    }
                    let rv = cur.metadata.resource_version.clone().unwrap_or_default();
                    let mut annotations = cur.metadata.annotations.clone().unwrap_or_default();
                    annotations.insert(FENCE_ANNOTATION.to_owned(), token.clone());
                    annotations.insert(FENCE_LOCK_ANNOTATION.to_owned(), lock.clone());
                    let ops = json!([
                        {"op": "add", "path": "/metadata/resourceVersion", "value": rv},
                        {"op": "add", "path": "/metadata/annotations", "value": annotations},
                        {"op": "add", "path": "/spec", "value": kvp.value},
                    ]);
                    match self.patch_json(&kvp.key, &ops).await? {
                        Ok(k) => return Ok(k),
                        // Written since it was read: read the fence again.
                        Err(_) => continue,
                    }
                }
            }
        }
        Err(Error::unavailable(format!("{} kept changing", kvp.key)))
    }
}
