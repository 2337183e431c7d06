//! Reads and writes of single objects: POST, PUT, DELETE with preconditions, GET.

use kube::api::{DeleteParams, DynamicObject, PostParams, Preconditions};
use kvsync_model::{DeleteOptions, GetOptions, KVPair, ResourceKey, Revision};

use super::convert::{map_err, status_err};
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

    pub(super) async fn replace(
        &self,
        kvp: &KVPair,
        rv: String,
    ) -> Result<std::result::Result<KVPair, Error>> {
        let api = self.api(&kvp.key.kind, kvp.key.namespace.as_deref())?;
        let obj = self.to_object(kvp, Some(rv))?;
        match api
            .replace(&kvp.key.name, &PostParams::default(), &obj)
            .await
        {
            Ok(o) => Ok(Ok(self.to_kvp(&kvp.key.kind, o)?)),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Err(status_err(&s, Some(&kvp.key), None)))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::NotFound {
                key: kvp.key.clone(),
            }),
            Err(e) => Err(map_err(e, Some(&kvp.key), None)),
        }
    }

    /// POST: 409 is AlreadyExists.
    pub(super) async fn create_object(&self, kvp: KVPair) -> Result<KVPair> {
        let api = self.api(&kvp.key.kind, kvp.key.namespace.as_deref())?;
        let obj = self.to_object(&kvp, None)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(o) => self.to_kvp(&kvp.key.kind, o),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::AlreadyExists { key: kvp.key }),
            Err(e) => Err(map_err(e, Some(&kvp.key), None)),
        }
    }

    /// PUT with the given resourceVersion, or with the current one (retried while others
    /// write).
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

    /// POST first (one request for a new object); when it exists, PUT over its current
    /// resourceVersion (retried while others write).
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
