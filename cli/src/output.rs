//! Printing resources: tables, YAML and JSON in the Kubernetes shape.

use kvsync_model::{KVPair, KindInfo};
use serde_json::{Value, json};

/// A resource as a Kubernetes-shaped manifest.
pub fn manifest(info: &KindInfo, kvp: &KVPair) -> Value {
    let mut meta = serde_json::Map::new();
    meta.insert("name".into(), json!(kvp.key.name));
    if let Some(ns) = &kvp.key.namespace {
        meta.insert("namespace".into(), json!(ns));
    }
    if let Some(uid) = &kvp.uid {
        meta.insert("uid".into(), json!(uid));
    }
    if let Some(r) = &kvp.revision {
        meta.insert("resourceVersion".into(), json!(r.to_string()));
    }
    json!({
        "apiVersion": info.api_version(),
        "kind": info.kind,
        "metadata": meta,
        "spec": kvp.value,
    })
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".into(),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            items.iter().map(cell).collect::<Vec<_>>().join(",")
        }
        Value::Array(items) => format!("{} items", items.len()),
        Value::Object(m) => format!("{} fields", m.len()),
        other => other.to_string(),
    }
}

/// Renders a table: NAMESPACE (namespaced kinds), NAME, up to four top-level spec fields
/// (all of them for `wide`), then REVISION and UID for `wide`.
pub fn table(info: &KindInfo, items: &[KVPair], wide: bool) -> String {
    let mut fields: Vec<String> = Vec::new();
    for kvp in items {
        if let Ok(Value::Object(m)) = kvp.value.as_value() {
            for (k, v) in m {
                let scalar = !matches!(v, Value::Object(_));
                if scalar && !fields.contains(k) {
                    fields.push(k.clone());
                }
            }
        }
    }
    fields.sort();
    if !wide {
        fields.truncate(4);
    }
    let mut header: Vec<String> = Vec::new();
    if info.namespaced {
        header.push("NAMESPACE".into());
    }
    header.push("NAME".into());
    header.extend(fields.iter().map(|f| upper(f)));
    if wide {
        header.push("REVISION".into());
        header.push("UID".into());
    }
    let mut rows = vec![header];
    for kvp in items {
        let mut row = Vec::new();
        if info.namespaced {
            row.push(kvp.key.namespace.clone().unwrap_or_default());
        }
        row.push(kvp.key.name.clone());
        for f in &fields {
            row.push(
                kvp.value
                    .as_value()
                    .ok()
                    .and_then(|v| v.get(f))
                    .map_or_else(|| "<none>".into(), cell),
            );
        }
        if wide {
            row.push(
                kvp.revision
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            );
            row.push(kvp.uid.clone().unwrap_or_default());
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// `blockSize` -> `BLOCKSIZE`, as kubectl prints column names.
fn upper(field: &str) -> String {
    field.to_ascii_uppercase()
}

/// YAML text of a value.
pub fn yaml(v: &Value) -> anyhow::Result<String> {
    Ok(serde_yaml_ng::to_string(v)?)
}
