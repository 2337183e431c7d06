//! The kinds kvsync's coordination primitives store: [`Lock`] entries.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::resource::Resource;

/// The API group of kvsync's own coordination kinds.
pub const GROUP: &str = "coordination.kvsync.dev";

/// One claim on a lock: the lock's name is the namespace, each claimant's entry a name in it
/// (written under the claimant's lease). The claim with the lowest create revision holds the
/// lock, the others wait in that order, as etcd's mutex orders them; the holder's create
/// revision is its fence.
///
/// A registry must hold this kind for `kvsync_backend::lock` to work on it:
///
/// ```
/// use kvsync_model::{Registry, coordination::Lock};
///
/// let registry = Registry::new().with::<Lock>();
/// assert!(registry.kind("Lock").is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// Who claims the lock (a process or pod identity), for people reading the datastore.
    pub holder: String,
}

impl Resource for Lock {
    fn schema() -> serde_json::Value {
        crate::crd::schema_of::<Self>()
    }

    const KIND: &'static str = "Lock";
    const GROUP: &'static str = GROUP;
    const PLURAL: &'static str = "locks";
    const NAMESPACED: bool = true;
    const SHORT_NAMES: &'static [&'static str] = &[];

    fn validate(&self) -> Result<()> {
        if self.holder.is_empty() || self.holder.len() > 253 {
            return Err(Error::invalid("spec.holder", "must be 1 to 253 characters"));
        }
        Ok(())
    }
}
