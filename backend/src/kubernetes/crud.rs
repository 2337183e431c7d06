//! Reads and writes of single objects: POST, PATCH and DELETE with preconditions, GET.

use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use kvsync_model::{DeleteOptions, GetOptions, KVPair, ResourceKey, Revision};
use serde_json::json;

use super::convert::{map_err, namespace_err, status_err};
use super::{KubernetesBackend, MAX_WRITE_RETRIES};
use crate::error::{Error, Result};
use crate::kernel::{check_delete, undecodable_last_value};

impl KubernetesBackend {
    pub(super) async fn current(&self, key: &ResourceKey) -> Result<Option<DynamicObject>> {
        let api = self.api(&key.kind, key.namespace.as_deref())?;
        api.get_opt(&key.name)
            .await
            .map_err(|e| map_err(e, Some(key), None))
    }

    /// Replaces the object's spec under the resourceVersion `rv` (see
    /// [`KubernetesBackend::patch_json`]): the inner error is the conflict when it moved on.
    pub(super) async fn replace(
        &self,
        kvp: &KVPair,
        rv: String,
    ) -> Result<std::result::Result<KVPair, Error>> {
        let ops = json!([
            {"op": "add", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/spec", "value": kvp.value},
        ]);
        self.patch_json(&kvp.key, &ops).await
    }

    /// A JSON patch (RFC 6902) of the object of `key`. Patches here set
    /// `metadata.resourceVersion`, which the API server checks as a precondition (409 when
    /// the object moved on: the inner error), and change only the paths they name: labels,
    /// annotations, finalizers and ownerReferences that others set are kept (a PUT of the
    /// whole object would wipe them).
    pub(super) async fn patch_json(
        &self,
        key: &ResourceKey,
        ops: &serde_json::Value,
    ) -> Result<std::result::Result<KVPair, Error>> {
        let info = self.codec.registry().kind(&key.kind)?;
        let ar = super::convert::api_resource(info);
        let url = <DynamicObject as kube::Resource>::url_path(&ar, key.namespace.as_deref());
        let params = PatchParams {
            field_manager: Some("kvsync".into()),
            ..PatchParams::default()
        };
        let mut req = kube::core::Request::new(url)
            .patch(&key.name, &params, &Patch::Merge(ops))
            .map_err(|e| Error::invalid("object", e.to_string()))?;
        req.headers_mut().insert(
            "content-type",
            "application/json-patch+json"
                .parse()
                .map_err(|_| Error::invalid("object", "a bad content type"))?,
        );
        match self.client.request::<DynamicObject>(req).await {
            Ok(o) => Ok(Ok(self.to_kvp(&key.kind, o)?)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Err(status_err(&s, Some(key), None))),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::NotFound { key: key.clone() }),
            Err(e) => Err(map_err(e, Some(key), None)),
        }
    }

    /// POST: 409 is AlreadyExists.
    pub(super) async fn create_object(&self, kvp: KVPair) -> Result<KVPair> {
        let obj = self.to_object(&kvp)?;
        self.post(&kvp, &obj).await
    }

    /// POSTs `obj`, the object of `kvp`.
    pub(super) async fn post(&self, kvp: &KVPair, obj: &DynamicObject) -> Result<KVPair> {
        let api = self.api(&kvp.key.kind, kvp.key.namespace.as_deref())?;
        let pp = PostParams {
            field_manager: Some("kvsync".into()),
            ..PostParams::default()
        };
        match api.create(&pp, obj).await {
            Ok(o) => self.to_kvp(&kvp.key.kind, o),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::AlreadyExists {
                key: kvp.key.clone(),
            }),
            Err(e) => Err(namespace_err(&e, kvp.key.namespace.as_deref())
                .unwrap_or_else(|| map_err(e, Some(&kvp.key), None))),
        }
    }

    /// A patch of the spec under the given resourceVersion, or under the current one (retried
    /// while others write).
    pub(super) async fn update_object(&self, kvp: KVPair) -> Result<KVPair> {
        if let Some(expected) = kvp.revision.clone() {
            return match self.replace(&kvp, expected.to_string()).await? {
                Ok(k) => Ok(k),
                Err(_) => Err(self.conflict(&kvp, &expected).await),
            };
        }
        for _ in 0..MAX_WRITE_RETRIES {
            let Some(cur) = self.current(&kvp.key).await? else {
                return Err(Error::NotFound { key: kvp.key });
            };
            let rv = cur.metadata.resource_version.unwrap_or_default();
            if let Ok(k) = self.replace(&kvp, rv).await? {
                return Ok(k);
            }
        }
        Err(Error::unavailable(format!("{} kept changing", kvp.key)))
    }

    /// POST first (one request for a new object); when it exists, a patch of its spec under
    /// its current resourceVersion (retried while others write).
    pub(super) async fn apply_object(&self, kvp: KVPair) -> Result<KVPair> {
        match self.create_object(kvp.clone()).await {
            Err(Error::AlreadyExists { .. }) => {}
            other => return other,
        }
        for _ in 0..MAX_WRITE_RETRIES {
            match self.current(&kvp.key).await? {
                None => match self.create_object(kvp.clone()).await {
                    Err(Error::AlreadyExists { .. }) => continue,
                    other => return other,
                },
                Some(cur) => {
                    let rv = cur.metadata.resource_version.unwrap_or_default();
                    match self.replace(&kvp, rv).await {
                        Ok(Ok(k)) => return Ok(k),
                        Ok(Err(_)) | Err(Error::NotFound { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(Error::unavailable(format!("{} kept changing", kvp.key)))
    }

    pub(super) async fn conflict(&self, kvp: &KVPair, expected: &Revision) -> Error {
        let actual = match self.current(&kvp.key).await {
            Ok(Some(o)) => o.metadata.resource_version.map(Revision::from),
            _ => None,
        };
        Error::Conflict {
            key: kvp.key.clone(),
            expected: Some(expected.clone()),
            actual,
        }
    }

    /// A real API server answers the DELETE of a custom resource with a `Status`, not the
    /// object, once the object is gone: so the object is read first, deleted with that read's
    /// resourceVersion and uid as preconditions (nothing else can be deleted), and read again
    /// when another writer came first. What was read is the last value returned.
    pub(super) async fn delete_kvp(
        &self,
        key: &ResourceKey,
        opts: &DeleteOptions,
    ) -> Result<KVPair> {
        self.codec.validate(key)?;
        let api = self.api(&key.kind, key.namespace.as_deref())?;
        for _ in 0..MAX_WRITE_RETRIES {
            let Some(obj) = self.current(key).await? else {
                return Err(Error::NotFound { key: key.clone() });
            };
            let rv = obj.metadata.resource_version.clone().unwrap_or_default();
            let uid = obj.metadata.uid.clone();
            check_delete(key, opts, &Revision::from(rv.as_str()), uid.as_deref())?;
            let last = self.to_kvp(&key.kind, obj).unwrap_or_else(|_| {
                undecodable_last_value(key, Revision::from(rv.as_str()), None, uid.clone())
            });
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(rv),
                    uid,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&key.name, &dp).await {
                // The object (while finalizers hold it) or a Status: either way it is what
                // was read that was deleted.
                Ok(_) => return Ok(last),
                // Written since it was read: read again (and check the preconditions again).
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(Error::NotFound { key: key.clone() });
                }
                Err(e) => return Err(map_err(e, Some(key), None)),
            }
        }
        Err(Error::unavailable(format!("{key} kept changing")))
    }

    pub(super) async fn get_kvp(&self, key: &ResourceKey, opts: &GetOptions) -> Result<KVPair> {
        self.codec.validate(key)?;
        if opts.revision.is_some() {
            return Err(Error::Unsupported {
                op: "get at a revision".into(),
                backend: "kubernetes",
            });
        }
        match self.current(key).await? {
            Some(o) => self.to_kvp(&key.kind, o),
            None => Err(Error::NotFound { key: key.clone() }),
        }
    }
}
