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
    Ok(quote_yaml11_words(&serde_yaml_ng::to_string(v)?))
}

/// Single-quotes every plain scalar (key, value or sequence item) of block-style YAML that a
/// YAML 1.2 writer left plain as a string and a YAML 1.1 reader (kubectl's, PyYAML) would not
/// read as a string (`no`, `on`, `1_000`, `1:30`, ...: [`kvsync_cli::yaml11`]): a YAML 1.2
/// writer wrote `shortNames: [no]`, which reached the API server as `[false]` and was
/// refused. Block scalars (`|`, `>`) are left as they are.
fn quote_yaml11_words(yaml: &str) -> String {
    let quote = |s: &str| {
        if kvsync_cli::yaml11::misread_by_1_1(s) {
            format!("'{s}'")
        } else {
            s.to_owned()
        }
    };
    let mut out = String::with_capacity(yaml.len() + 16);
    // While inside a block scalar: the indentation of the line that opened it.
    let mut block: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(opened) = block {
            if line.trim().is_empty() || indent > opened {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            block = None;
        }
        // Leading `- ` markers, then `key: value`, `key:` or a plain item.
        let mut rest = &line[indent..];
        let mut fixed = " ".repeat(indent);
        while let Some(r) = rest.strip_prefix("- ") {
            fixed.push_str("- ");
            rest = r;
        }
        if rest == "-" {
            fixed.push('-');
            rest = "";
        }
        match rest.split_once(": ") {
            Some((key, value)) if !key.starts_with(['\'', '"']) => {
                fixed.push_str(&quote(key));
                fixed.push_str(": ");
                fixed.push_str(&quote(value));
                if value.starts_with(['|', '>']) {
                    block = Some(indent);
                }
            }
            _ => match rest.strip_suffix(':') {
                Some(key) if !key.is_empty() && !key.contains(": ") => {
                    fixed.push_str(&quote(key));
                    fixed.push(':');
                }
                _ => {
                    fixed.push_str(&quote(rest));
                    if rest.starts_with(['|', '>']) {
                        block = Some(indent);
                    }
                }
            },
        }
        out.push_str(&fixed);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod yaml_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn words_a_yaml_1_1_reader_takes_for_booleans_are_quoted() {
        let v = json!({
            "shortNames": ["no", "n", "pool"],
            "on": "off",
            "nested": [{"y": "yes", "flag": true, "text": "no\nno\n"}],
            "plain": "nothing to quote",
        });
        let text = yaml(&v).unwrap();
        assert!(text.contains("- 'no'"), "{text}");
        assert!(text.contains("- 'n'"), "{text}");
        assert!(text.contains("- pool"), "{text}");
        assert!(text.contains("'on': 'off'"), "{text}");
        assert!(text.contains("'y': 'yes'"), "{text}");
        assert!(
            text.contains("flag: true"),
            "real booleans stay booleans: {text}"
        );
        // The YAML still reads back as the same value.
        let back: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(back, v);
    }
}
