//! Kubernetes CustomResourceDefinitions generated from the Rust types.
//!
//! Each kind is a CRD in its API group (`kvsync.dev` for the demo kinds) whose `spec` schema
//! comes from the type's [`JsonSchema`](schemars::JsonSchema) derive, made structural as the
//! API server requires (no `$ref`s, no `additionalProperties: false` beside `properties`).

use serde_json::{Value, json};

use crate::resource::KindInfo;

/// The OpenAPI v3 schema of `T`, inlined and structural.
pub fn schema_of<T: schemars::JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    make_structural(&mut value);
    if let Value::Object(map) = &mut value {
        map.remove("title");
        map.remove("$schema");
        map.remove("components");
        map.remove("definitions");
        map.remove("$defs");
    }
    value
}

/// The schema of a kind with no typed value: any object.
pub fn any_object() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Rewrites what the API server refuses in a structural schema: `additionalProperties: false`
/// beside `properties`, and `oneOf` of documented unit variants (one `enum` value each), which
/// becomes one string `enum`.
fn make_structural(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.get("additionalProperties") == Some(&Value::Bool(false)) {
                map.remove("additionalProperties");
            }
            let variants: Option<Vec<Value>> =
                map.get("oneOf").and_then(Value::as_array).and_then(|alts| {
                    alts.iter()
                        .map(|a| match a.get("enum").and_then(Value::as_array) {
                            Some(e)
                                if e.len() == 1 && a.get("type").is_none_or(|t| t == "string") =>
                            {
                                Some(e[0].clone())
                            }
                            _ => None,
                        })
                        .collect()
                });
            if let Some(values) = variants {
                map.remove("oneOf");
                map.insert("type".into(), Value::String("string".into()));
                map.insert("enum".into(), Value::Array(values));
            }
            // `Option<T>` of a schema with its own `type`: `anyOf: [T, null]` -> T, nullable.
            let optional = map.get("anyOf").and_then(Value::as_array).and_then(|alts| {
                let is_null = |a: &Value| a.get("enum") == Some(&serde_json::json!([null]));
                match alts.as_slice() {
                    [a, b] if is_null(b) => Some(a.clone()),
                    [a, b] if is_null(a) => Some(b.clone()),
                    _ => None,
                }
            });
            if let Some(Value::Object(inner)) = optional {
                map.remove("anyOf");
                for (k, v) in inner {
                    if k != "description" || !map.contains_key("description") {
                        map.insert(k, v);
                    }
                }
                map.insert("nullable".into(), Value::Bool(true));
                make_structural(v);
                return;
            }
            for child in map.values_mut() {
                make_structural(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(make_structural),
        _ => {}
    }
}

/// The CustomResourceDefinition of a kind, as JSON (`apiextensions.k8s.io/v1`).
///
/// ```
/// use kvsync_model::{crd, Registry};
///
/// let registry = Registry::with_demo_kinds();
/// let crd = crd::crd(registry.kind("IPPool").unwrap());
/// assert_eq!(crd["metadata"]["name"], "ippools.kvsync.dev");
/// assert_eq!(crd["spec"]["scope"], "Cluster");
/// let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
/// assert!(spec["properties"]["cidr"]["pattern"].is_string());
/// ```
pub fn crd(info: &KindInfo) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{}.{}", info.plural, info.group)},
        "spec": {
            "group": info.group,
            "names": {
                "kind": info.kind,
                "listKind": format!("{}List", info.kind),
                "plural": info.plural,
                "singular": info.singular(),
                "shortNames": info.short_names,
            },
            "scope": if info.namespaced { "Namespaced" } else { "Cluster" },
            "versions": [{
                "name": info.version,
                "served": true,
                "storage": true,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "description": format!("{} of {}, stored by kvsync.", info.kind, info.api_version()),
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": info.schema(),
                        },
                        "required": ["spec"],
                    }
                },
            }],
        },
    })
}
