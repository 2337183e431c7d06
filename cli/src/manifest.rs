//! Reading manifests: YAML or JSON, one or many documents, in the Kubernetes shape.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use kvsync_model::{KVPair, PathCodec, ResourceKey};
use serde::de::DeserializeSeed;
use serde_json::Value;

use crate::strict::{Budget, Strict};

/// One document of a manifest, validated and turned into a KVPair.
#[derive(Debug)]
pub struct Doc {
    /// Where it came from, e.g. `pools.yaml: document 2`.
    pub origin: String,
    /// The resource.
    pub kvp: KVPair,
}

/// The files that `-f` arguments name: files as given, directories' `.yaml`, `.yml` and
/// `.json` files in name order, `-` for standard input.
fn expand(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for arg in args {
        let p = PathBuf::from(arg);
        if arg == "-" {
            out.push(p);
        } else if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&p)
                .with_context(|| format!("cannot read directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && matches!(
                            f.extension().and_then(|e| e.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            entries.sort();
            out.extend(entries);
        } else if p.exists() {
            // A file, or what a shell hands over as one: /dev/stdin, a pipe from `<(...)`.
            out.push(p);
        } else {
            bail!("{arg}: no such file or directory");
        }
    }
    Ok(out)
}

/// The limits on what a manifest may hold, each checked before the work it bounds, with a
/// default no legitimate manifest reaches and an environment variable to raise it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest file, in bytes (`KVSYNC_MAX_MANIFEST_BYTES`, default 32 MiB).
    pub file_bytes: u64,
    /// The most documents in one file (`KVSYNC_MAX_DOCUMENTS`, default 10,000).
    pub documents: usize,
    /// The deepest nesting of collections (`KVSYNC_MAX_DEPTH`, default 64).
    pub depth: usize,
    /// The most a file may expand to as values, in bytes of text and nodes, aliases
    /// included (`KVSYNC_MAX_EXPANDED_BYTES`, default 64 MiB).
    pub expanded_bytes: usize,
    /// The longest string (`KVSYNC_MAX_STRING_BYTES`, default 1 MiB).
    pub string_bytes: usize,
    /// The largest spec of one resource, as JSON (`KVSYNC_MAX_VALUE_BYTES`, default 1.5 MiB,
    /// etcd's default request limit).
    pub value_bytes: usize,
}

impl Default for Limits {
    /// The documented defaults.
    fn default() -> Self {
        Limits {
            file_bytes: 32 << 20,
            documents: 10_000,
            depth: 64,
            expanded_bytes: 64 << 20,
            string_bytes: 1 << 20,
            value_bytes: 1_572_864,
        }
    }
}

impl Limits {
    /// The limits, with the environment's overrides.
    ///
    /// # Errors
    /// A [`Usage`](crate::Usage) error for a variable that is not a number.
    pub fn from_env() -> Result<Self> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| crate::usage(format!("{name}={v:?} is not a number"))),
                Err(_) => Ok(default),
            }
        }
        let d = Limits::default();
        Ok(Limits {
            file_bytes: var("KVSYNC_MAX_MANIFEST_BYTES", d.file_bytes)?,
            documents: var("KVSYNC_MAX_DOCUMENTS", d.documents)?,
            depth: var("KVSYNC_MAX_DEPTH", d.depth)?,
            expanded_bytes: var("KVSYNC_MAX_EXPANDED_BYTES", d.expanded_bytes)?,
            string_bytes: var("KVSYNC_MAX_STRING_BYTES", d.string_bytes)?,
            value_bytes: var("KVSYNC_MAX_VALUE_BYTES", d.value_bytes)?,
        })
    }
}

/// Reads a file, or standard input for `-`, refusing one over the size limit without reading
/// more than the limit.
fn read(path: &Path, limits: &Limits) -> Result<String> {
    let name = if path.as_os_str() == "-" {
        "<stdin>".to_owned()
    } else {
        path.display().to_string()
    };
    let source: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("cannot read {name}"))?)
    };
    let mut bytes = Vec::new();
    source
        .take(limits.file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {name}"))?;
    if bytes.len() as u64 > limits.file_bytes {
        bail!(
            "{name}: larger than the limit of {} bytes (KVSYNC_MAX_MANIFEST_BYTES raises it)",
            limits.file_bytes
        );
    }
    String::from_utf8(bytes).map_err(|e| anyhow!("{name}: not UTF-8 text: {e}"))
}

/// Refuses text whose flow collections (`[`, `{`) nest deeper than the limit, before a
/// parser spends its time on them. Brackets inside quoted strings do not count.
fn check_depth(name: &str, text: &str, limit: usize) -> Result<()> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' => quote = Some(c),
                '[' | '{' => {
                    depth += 1;
                    if depth > limit {
                        bail!(
                            "{name}: line {line}: collections nest deeper than the limit of {limit} \
                             (KVSYNC_MAX_DEPTH raises it)"
                        );
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    Ok(())
}

/// Splits a file's text into documents (YAML streams, a JSON object, a JSON array, or a
/// `kind: List`).
fn documents(name: &str, text: &str, limits: &Limits) -> Result<Vec<Value>> {
    // A UTF-8 byte-order mark, as some editors write, is not part of the document (kubectl
    // skips it too).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_depth(name, text, limits.depth)?;
    let budget = Budget::new(limits.expanded_bytes, limits.string_bytes);
    let trimmed = text.trim_start();
    let mut docs = Vec::new();
    let looks_like_json = trimmed.starts_with('{') || trimmed.starts_with('[');
    // Text that starts like JSON is JSON, or else YAML in flow style (`{kind: IPPool, ...}`),
    // which kubectl takes too; a broken JSON file is reported as JSON.
    let json = looks_like_json.then(|| strict_json(text, &budget));
    match json {
        Some(Ok(Value::Array(items))) => docs.extend(items),
        Some(Ok(other)) => docs.push(other),
        Some(Err(json_err)) => {
            let yaml: Value = Strict::yaml_document(&budget)
                .deserialize(serde_yaml_ng::Deserializer::from_str(text))
                .map_err(|_| anyhow!("{name}: invalid JSON: {json_err}"))?;
            match yaml {
                Value::Array(items) => docs.extend(items),
                other => docs.push(other),
            }
        }
        None => {
            for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
                if i >= limits.documents {
                    bail!(
                        "{name}: more than the limit of {} documents (KVSYNC_MAX_DOCUMENTS raises it)",
                        limits.documents
                    );
                }
                let v = Strict::yaml_document(&budget)
                    .deserialize(de)
                    .map_err(|e| anyhow!("{name}: document {}: invalid YAML: {e}", i + 1))?;
                docs.push(v);
            }
        }
    }
    // A `kind: List` holds its documents in `items`.
    let mut out = Vec::new();
    for d in docs {
        match d {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                if let Some(Value::Array(items)) = m.get("items") {
                    out.extend(items.iter().cloned());
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Reads JSON text strictly (see [`Strict`]), the whole text one value.
fn strict_json(text: &str, budget: &Budget) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = Strict::json_document(budget).deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// The fields a manifest may have at its top level.
const TOP_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
/// The fields of `metadata` that kvsync reads (`name`, `namespace`) or writes itself and
/// ignores on the way in (`resourceVersion`, `uid`: `kvsync get -o yaml` prints them).
const METADATA_FIELDS: &[&str] = &["name", "namespace", "resourceVersion", "uid"];

/// Turns one document into a KVPair, checking every field.
fn to_kvp(codec: &PathCodec, doc: &Value) -> Result<KVPair, String> {
    let obj = doc.as_object().ok_or("a document must be a mapping")?;
    if let Some(field) = obj.keys().find(|k| !TOP_FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field {field:?} at the top level (expected {})",
            TOP_FIELDS.join(", ")
        ));
    }
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("missing field kind")?;
    let info = codec.registry().kind(kind).map_err(|e| e.to_string())?;
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or("missing field apiVersion")?;
    if api_version != info.api_version() {
        return Err(format!(
            "invalid apiVersion: {api_version:?} (kind {kind} is {})",
            info.api_version()
        ));
    }
    let meta = obj
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or("missing field metadata")?;
    if let Some(field) = meta.keys().find(|k| !METADATA_FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field metadata.{field} (kvsync reads {})",
            METADATA_FIELDS.join(", ")
        ));
    }
    let text_field = |field: &str| match meta.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(format!(
            "invalid metadata.{field}: must be a string, not {other}"
        )),
    };
    let name = text_field("name")?.ok_or("missing field metadata.name")?;
    let namespace = text_field("namespace")?;
    let key = match (info.namespaced, namespace) {
        (true, ns) => ResourceKey::namespaced(kind, ns.unwrap_or("default"), name),
        (false, None) => ResourceKey::cluster(kind, name),
        (false, Some(_)) => {
            return Err(format!(
                "invalid metadata.namespace: kind {kind} is cluster-scoped and takes no namespace"
            ));
        }
    };
    codec.validate(&key).map_err(|e| {
        // Name the manifest's own field.
        e.to_string()
            .replacen("invalid name", "invalid metadata.name", 1)
            .replacen("invalid namespace", "invalid metadata.namespace", 1)
    })?;
    let spec = kvsync_model::Json::from(obj.get("spec").cloned().ok_or("missing field spec")?);
    info.validate(&spec).map_err(|e| e.to_string())?;
    Ok(KVPair::new(key, spec))
}

/// The pair, if its spec is within the value limit.
fn fits(kvp: KVPair, limits: &Limits) -> Result<KVPair, String> {
    let bytes = kvp.value.to_string().len();
    if bytes > limits.value_bytes {
        return Err(format!(
            "spec is {bytes} bytes as JSON, over the limit of {} (KVSYNC_MAX_VALUE_BYTES raises it)",
            limits.value_bytes
        ));
    }
    Ok(kvp)
}

/// Reads the documents of one file's `text` (named `name` in messages) within `limits`: the
/// valid ones as [`Doc`]s, and a message for each invalid one.
///
/// # Errors
/// When the text as a whole cannot be read (malformed, past a limit).
pub fn parse(
    codec: &PathCodec,
    name: &str,
    text: &str,
    limits: &Limits,
) -> Result<(Vec<Doc>, Vec<String>)> {
    let docs = documents(name, text, limits)?;
    if docs.len() > limits.documents {
        bail!(
            "{name}: more than the limit of {} documents (KVSYNC_MAX_DOCUMENTS raises it)",
            limits.documents
        );
    }
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for (i, doc) in docs.iter().enumerate() {
        let label = describe(doc);
        match to_kvp(codec, doc).and_then(|kvp| fits(kvp, limits)) {
            Ok(kvp) => good.push(Doc {
                origin: format!("{name}: document {}", i + 1),
                kvp,
            }),
            Err(e) => bad.push(format!("{name}: document {}{label}: {e}", i + 1)),
        }
    }
    Ok((good, bad))
}

/// What the files of a command hold: the valid documents, and a message for each invalid one
/// (which the command reports, as kubectl does, while it goes on with the others).
#[derive(Debug, Default)]
pub struct Loaded {
    /// The valid documents, in order.
    pub docs: Vec<Doc>,
    /// One message per invalid document, naming the file, the document and the field.
    pub invalid: Vec<String>,
}

/// Reads and checks every document of every file before anything is written.
///
/// # Errors
/// A file that cannot be read as a whole (missing, malformed, past a limit: then nothing is
/// written at all), or no documents at all.
pub fn load(codec: &PathCodec, args: &[String]) -> Result<Loaded> {
    let limits = Limits::from_env()?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for path in expand(args)? {
        let name = if path.as_os_str() == "-" {
            "<stdin>".to_owned()
        } else {
            path.display().to_string()
        };
        let text = read(&path, &limits)?;
        let (docs, invalid) = parse(codec, &name, &text, &limits)?;
        out.extend(docs);
        errors.extend(invalid);
    }
    if out.is_empty() && errors.is_empty() {
        bail!("no resources found in {}", args.join(", "));
    }
    Ok(Loaded {
        docs: out,
        invalid: errors,
    })
}

fn describe(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str);
    let name = doc.pointer("/metadata/name").and_then(Value::as_str);
    match (kind, name) {
        (Some(k), Some(n)) => format!(" ({k} {n})"),
        (Some(k), None) => format!(" ({k})"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> PathCodec {
        PathCodec::with_registry(kvsync_model::demo::registry())
    }

    #[test]
    fn yaml_streams_json_arrays_and_lists_all_parse() {
        let yaml = "apiVersion: kvsync.dev/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.0.0.0/16}\n---\n\
                    apiVersion: kvsync.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {selector: all()}\n";
        let docs = documents("x.yaml", yaml, &Limits::from_env().unwrap()).unwrap();
        assert_eq!(docs.len(), 2);
        let kvp = to_kvp(&codec(), &docs[1]).unwrap();
        assert_eq!(
            kvp.key,
            ResourceKey::namespaced("NetworkPolicy", "default", "p")
        );
        let json = r#"{"kind": "List", "items": [{"apiVersion": "kvsync.dev/v1", "kind": "Node", "metadata": {"name": "n"}, "spec": {}}]}"#;
        assert_eq!(
            documents("x.json", json, &Limits::from_env().unwrap())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_byte_order_mark_and_yaml_flow_mappings_are_read_as_kubectl_reads_them() {
        let bom = "\u{feff}apiVersion: kvsync.dev/v1\nkind: Node\nmetadata:\n  name: n\nspec: {}\n";
        let docs = documents("bom.yaml", bom, &Limits::from_env().unwrap()).unwrap();
        assert_eq!(to_kvp(&codec(), &docs[0]).unwrap().key.name, "n");
        let bom_json = "\u{feff}{\"apiVersion\": \"kvsync.dev/v1\", \"kind\": \"Node\", \"metadata\": {\"name\": \"j\"}, \"spec\": {}}";
        assert_eq!(
            documents("bom.json", bom_json, &Limits::from_env().unwrap())
                .unwrap()
                .len(),
            1
        );

        let flow = "{apiVersion: kvsync.dev/v1, kind: IPPool, metadata: {name: f}, spec: {cidr: 10.0.0.0/16}}\n";
        let docs = documents("flow.yaml", flow, &Limits::from_env().unwrap()).unwrap();
        let kvp = to_kvp(&codec(), &docs[0]).unwrap();
        assert_eq!(kvp.key, ResourceKey::cluster("IPPool", "f"));

        // Broken JSON is still reported as JSON, with serde_json's position.
        let err = documents(
            "bad.json",
            "{\"kind\": \"Node\",, }",
            &Limits::from_env().unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad.json: invalid JSON"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let bad = serde_json::json!({"apiVersion": "kvsync.dev/v1", "kind": "IPPool", "metadata": {"name": "Bad_Name"}, "spec": {"cidr": "10.0.0.0/8"}});
        assert!(
            to_kvp(&codec(), &bad)
                .unwrap_err()
                .contains("metadata.name")
        );
        let bad = serde_json::json!({"apiVersion": "kvsync.dev/v1", "kind": "IPPool", "metadata": {"name": "a"}, "spec": {"cidr": "10.0.0.1/8"}});
        assert!(to_kvp(&codec(), &bad).unwrap_err().contains("spec.cidr"));
        let bad = serde_json::json!({"apiVersion": "v1", "kind": "IPPool", "metadata": {"name": "a"}, "spec": {}});
        assert!(to_kvp(&codec(), &bad).unwrap_err().contains("apiVersion"));
        let bad = serde_json::json!({"apiVersion": "kvsync.dev/v1", "kind": "Gizmo", "metadata": {"name": "a"}, "spec": {}});
        assert!(to_kvp(&codec(), &bad).unwrap_err().contains("unknown kind"));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits::default()
    }

    /// Reads `text` as `load` does: documents, then each document's checks.
    fn read_all(text: &str) {
        let codec = PathCodec::with_registry(kvsync_model::demo::registry());
        if let Ok(docs) = documents("prop.yaml", text, &limits()) {
            for doc in &docs {
                let _ = to_kvp(&codec, doc);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn any_text_is_read_or_refused_never_a_panic(text in "\\PC{0,300}") {
            read_all(&text);
        }

        #[test]
        fn manifest_like_text_is_read_or_refused_never_a_panic(
            text in "(apiVersion: kvsync.dev/v1\nkind: (IPPool|Node|NetworkPolicy)\n)?(metadata:\n  name: [a-zA-Z_-]{0,8}\n(  namespace: [a-z0-9]{0,5}\n)?)?(spec:\n  [a-zA-Z]{1,8}: [-\\[\\]{}a-z0-9.&*!:,\"' ]{0,20}\n){0,3}(---\n)?"
        ) {
            read_all(&text);
        }

        #[test]
        fn any_bytes_as_json_are_read_or_refused_never_a_panic(text in "[\\[\\]{}\":,0-9a-z .eE+-]{0,200}") {
            read_all(&text);
        }
    }
}
