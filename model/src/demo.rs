//! The demo model (feature `demo`): `IPPool`, `NetworkPolicy` and `Node`, in API group
//! `kvsync.dev/v1`.
//!
//! They follow Calico's resources of the same names, trimmed to what the examples, tests, the
//! CLI and the deploy files need. Nothing in kvsync falls back to them: a program that wants
//! them registers them, e.g. with [`registry`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::Registry;
use crate::resource::Resource;
use crate::validation::parse_cidr;

/// The API group of the demo kinds.
pub const GROUP: &str = "kvsync.dev";

/// A registry holding the demo kinds, ready to hand to a backend.
///
/// ```
/// let registry = kvsync_model::demo::registry();
/// assert!(registry.kind("IPPool").is_ok());
/// ```
pub fn registry() -> std::sync::Arc<Registry> {
    std::sync::Arc::new(Registry::with_demo_kinds())
}

/// Adds the demo kinds to `registry`, with kvsync's own [`Lock`](crate::coordination::Lock)
/// kind that the locks of `kvsync_backend` store their claims as.
pub fn register(registry: &mut Registry) {
    registry
        .register::<IPPool>()
        .register::<NetworkPolicy>()
        .register::<Node>()
        .register::<crate::coordination::Lock>();
}

/// A pool of IP addresses that workloads are given addresses from (cluster-scoped).
///
/// ```
/// use kvsync_model::{demo::IPPool, Resource};
/// let pool = IPPool { cidr: "10.1.0.0/16".into(), block_size: 26, nat_outgoing: true, disabled: false };
/// assert!(pool.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, from = "IPPoolFields")]
pub struct IPPool {
    /// The pool's network, e.g. `10.1.0.0/16`.
    #[schemars(regex(pattern = CIDR_PATTERN))]
    pub cidr: String,
    /// The prefix length of the blocks handed to nodes (default 26 for IPv4, 122 for IPv6, as
    /// Calico's).
    #[schemars(range(min = 0, max = 128))]
    pub block_size: u8,
    /// Whether traffic leaving the pool is masqueraded.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// Whether new addresses may not be taken from the pool.
    #[serde(default)]
    pub disabled: bool,
}

/// An IPPool as written: `blockSize` may be left out, and its default depends on the
/// family of the CIDR.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IPPoolFields {
    /// The pool's network, e.g. `10.1.0.0/16`.
    #[schemars(regex(pattern = CIDR_PATTERN))]
    cidr: String,
    /// The prefix length of the blocks handed to nodes (default 26 for IPv4, 122 for IPv6).
    #[schemars(range(min = 0, max = 128))]
    block_size: Option<u8>,
    /// Whether traffic leaving the pool is masqueraded.
    #[serde(default)]
    nat_outgoing: bool,
    /// Whether new addresses may not be taken from the pool.
    #[serde(default)]
    disabled: bool,
}

impl From<IPPoolFields> for IPPool {
    fn from(f: IPPoolFields) -> Self {
        let v6 = f.cidr.contains(':');
        IPPool {
            block_size: f.block_size.unwrap_or(if v6 { 122 } else { 26 }),
            cidr: f.cidr,
            nat_outgoing: f.nat_outgoing,
            disabled: f.disabled,
        }
    }
}

/// What a CIDR looks like, for the CRD schemas (the exact check is in `validate`).
pub const CIDR_PATTERN: &str =
    r"^(([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/[0-9]{1,3})$";

impl Resource for IPPool {
    fn schema() -> serde_json::Value {
        crate::crd::schema_of::<Self>()
    }

    const KIND: &'static str = "IPPool";
    const GROUP: &'static str = GROUP;
    const PLURAL: &'static str = "ippools";
    const NAMESPACED: bool = false;
    const SHORT_NAMES: &'static [&'static str] = &["pool", "pools"];

    fn validate(&self) -> Result<()> {
        let (len, v6) = parse_cidr("spec.cidr", &self.cidr)?;
        let max = if v6 { 128 } else { 32 };
        if self.block_size < len || self.block_size > max {
            return Err(Error::invalid(
                "spec.blockSize",
                format!(
                    "must be between the pool's prefix length {len} and {max} (got {})",
                    self.block_size
                ),
            ));
        }
        Ok(())
    }
}

/// What a rule does with matching traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
    /// Skip the remaining policies of this tier.
    Pass,
    /// Log it and keep evaluating.
    Log,
}

/// A transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
    /// ICMP.
    #[serde(rename = "ICMP")]
    Icmp,
}

/// One rule of a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// What to do with matching traffic.
    pub action: Action,
    /// Only this protocol, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Only these ports (1-65535); all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    /// Only these networks (CIDRs); all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = CIDR_PATTERN)))]
    pub nets: Vec<String>,
}

/// A set of rules applied to the workloads that a selector picks (namespaced).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Policies with a lower order apply first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Which workloads the policy applies to, e.g. `app == 'web'`.
    #[serde(default)]
    pub selector: String,
    /// Rules for incoming traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    /// Rules for outgoing traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
}

impl Resource for NetworkPolicy {
    fn schema() -> serde_json::Value {
        crate::crd::schema_of::<Self>()
    }

    const KIND: &'static str = "NetworkPolicy";
    const GROUP: &'static str = GROUP;
    const PLURAL: &'static str = "networkpolicies";
    const NAMESPACED: bool = true;
    const SHORT_NAMES: &'static [&'static str] = &["netpol", "policy", "policies"];

    fn validate(&self) -> Result<()> {
        if let Some(o) = self.order
            && (!o.is_finite() || o < 0.0)
        {
            return Err(Error::invalid(
                "spec.order",
                format!("must be a finite number >= 0 (got {o})"),
            ));
        }
        if self.selector.chars().any(char::is_control) {
            return Err(Error::invalid(
                "spec.selector",
                "must not contain control characters",
            ));
        }
        for (dir, rules) in [("ingress", &self.ingress), ("egress", &self.egress)] {
            for (i, rule) in rules.iter().enumerate() {
                if rule.ports.contains(&0) {
                    return Err(Error::invalid(
                        format!("spec.{dir}[{i}].ports"),
                        "ports must be between 1 and 65535",
                    ));
                }
                if !rule.ports.is_empty()
                    && !matches!(
                        rule.protocol,
                        Some(Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
                    )
                {
                    return Err(Error::invalid(
                        format!("spec.{dir}[{i}].ports"),
                        "ports need protocol TCP, UDP or SCTP",
                    ));
                }
                for (j, net) in rule.nets.iter().enumerate() {
                    parse_cidr(&format!("spec.{dir}[{i}].nets[{j}]"), net)?;
                }
            }
        }
        Ok(())
    }
}

/// A host in the cluster (cluster-scoped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    /// The node's addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    /// Labels, for selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The node's BGP AS number, if it peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
}

impl Resource for Node {
    fn schema() -> serde_json::Value {
        crate::crd::schema_of::<Self>()
    }

    const KIND: &'static str = "Node";
    const GROUP: &'static str = GROUP;
    const PLURAL: &'static str = "nodes";
    const NAMESPACED: bool = false;
    const SHORT_NAMES: &'static [&'static str] = &["no"];

    fn validate(&self) -> Result<()> {
        for k in self.labels.keys() {
            if k.is_empty() || k.len() > 317 || k.chars().any(|c| c.is_control() || c == ' ') {
                return Err(Error::invalid(
                    "spec.labels",
                    format!("label key {k:?} must be 1-317 characters without spaces"),
                ));
            }
        }
        if self.asn == Some(0) {
            return Err(Error::invalid("spec.asn", "AS number 0 is reserved"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn demo_values_validate_with_field_names() {
        let reg = Registry::with_demo_kinds();
        let pool = reg.kind("IPPool").unwrap();
        let v = |j: serde_json::Value| crate::Json::from(j);
        assert!(pool.validate(&v(json!({"cidr": "10.0.0.0/16"}))).is_ok());
        let err = pool
            .validate(&v(json!({"cidr": "10.0.0.1/16"})))
            .unwrap_err();
        assert!(err.to_string().contains("spec.cidr"), "{err}");
        let err = pool
            .validate(&v(json!({"cidr": "10.0.0.0/16", "blockSize": 8})))
            .unwrap_err();
        assert!(err.to_string().contains("spec.blockSize"), "{err}");
        // A spec is an object: serde's derive alone would take an array for the struct.
        let err = pool
            .validate(&v(json!(["10.0.0.0/8", 24, true])))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid spec: must be an object, not an array"
        );
        let text = crate::Json::from_json_text(" [1] ".into()).unwrap();
        assert!(
            pool.validate(&text).is_err(),
            "checked on the stored text too"
        );
        let untyped = crate::KindInfo::untyped("example.com", "Thing", "things", false);
        assert!(untyped.validate(&v(json!("a string"))).is_err());
        assert!(untyped.validate(&v(json!({"any": "thing"}))).is_ok());
        // The default block size follows the family, as Calico's: 26 for IPv4, 122 for IPv6.
        assert!(pool.validate(&v(json!({"cidr": "fd00:10::/64"}))).is_ok());
        let v6: IPPool = serde_json::from_value(json!({"cidr": "fd00:10::/64"})).unwrap();
        assert_eq!(v6.block_size, 122);
        let v4: IPPool = serde_json::from_value(json!({"cidr": "10.0.0.0/16"})).unwrap();
        assert_eq!(v4.block_size, 26);
        // A value of the wrong type names its field.
        let err = pool
            .validate(&v(json!({"cidr": "10.0.0.0/16", "natOutgoing": "yes"})))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid spec.natOutgoing: invalid type"),
            "{err}"
        );
        let stored =
            crate::Json::from_json_text(r#"{"cidr": "10.0.0.0/16", "blockSize": "x"}"#.into())
                .unwrap();
        let err = pool.validate(&stored).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid spec.blockSize"),
            "{err}"
        );
        let err = pool.validate(&v(json!({"cidr": 5}))).unwrap_err();
        assert!(err.to_string().contains("spec"), "{err}");

        let np = reg.kind("NetworkPolicy").unwrap();
        let bad = json!({"selector": "all()", "ingress": [{"action": "Allow", "protocol": "TCP", "ports": [0]}]});
        let err = np.validate(&v(bad)).unwrap_err();
        assert!(err.to_string().contains("spec.ingress[0].ports"), "{err}");
        let good = json!({"order": 10.0, "selector": "all()", "egress": [{"action": "Deny", "nets": ["10.0.0.0/8"]}]});
        np.validate(&v(good)).unwrap();
    }
}
