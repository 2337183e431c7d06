//! deploy/ stays true to the Rust types: the CRDs are what `kvsync crds` generates, every YAML
//! file parses, and the RBAC rules grant exactly what the backend and the Syncer need on every
//! CRD the model defines.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use kvsync_model::Registry;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read deploy/") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read yaml");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|de| {
            <Value as serde::Deserialize>::deserialize(de)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn committed_crds_are_exactly_what_the_types_generate() {
    let tmp = tempfile::tempdir().expect("temp dir");
    Command::cargo_bin("kvsync")
        .expect("kvsync")
        .args(["crds", "--out-dir"])
        .arg(tmp.path())
        .assert()
        .success();
    let committed = deploy_dir().join("crds");
    let names = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&committed),
        names(tmp.path()),
        "deploy/crds has other files than `kvsync crds --out-dir deploy/crds` writes"
    );
    for name in names(tmp.path()) {
        let want = std::fs::read_to_string(tmp.path().join(&name)).expect("generated");
        let have = std::fs::read_to_string(committed.join(&name)).expect("committed");
        assert!(
            want == have,
            "deploy/crds/{name} differs from what the types generate: run `cargo run -p kvsync-cli -- crds --out-dir deploy/crds`"
        );
    }
}

#[test]
fn crd_schemas_check_the_spec_fields() {
    let crd = documents(&deploy_dir().join("crds/networkpolicies.kvsync.dev.yaml")).remove(0);
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rule = &spec["properties"]["ingress"]["items"]["properties"];
    assert_eq!(rule["ports"]["items"]["minimum"], 1, "{rule}");
    assert_eq!(rule["ports"]["items"]["maximum"], 65535);
    assert!(rule["nets"]["items"]["pattern"].is_string());
    assert!(rule["action"]["enum"].is_array());
    assert!(
        spec.get("additionalProperties").is_none(),
        "structural: no additionalProperties beside properties"
    );
    let pool = documents(&deploy_dir().join("crds/ippools.kvsync.dev.yaml")).remove(0);
    let spec = &pool["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["cidr"]));
    assert_eq!(pool["spec"]["scope"], "Cluster");
}

#[test]
fn every_yaml_file_parses_and_rbac_covers_every_crd_exactly() {
    let registry = Registry::with_demo_kinds();
    let needed: BTreeSet<&str> = [
        "get", "list", "watch", "create", "patch", "update", "delete",
    ]
    .into();
    let mut rules = Vec::new();
    // The Leases of locks and elections, in the controller's namespace only.
    let mut lease_rules = Vec::new();
    let mut kinds_seen = BTreeSet::new();
    let mut service_accounts = BTreeSet::new();
    let mut bound = BTreeSet::new();
    let mut deployment_sa = None;
    for file in yaml_files(&deploy_dir()) {
        for doc in documents(&file) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a document without kind", file.display()));
            kinds_seen.insert(kind.to_owned());
            match kind {
                "ClusterRole" => rules.extend(doc["rules"].as_array().cloned().unwrap_or_default()),
                "Role" => {
                    assert_eq!(doc["metadata"]["namespace"], "kvsync-system");
                    lease_rules.extend(doc["rules"].as_array().cloned().unwrap_or_default());
                }
                "ServiceAccount" => {
                    service_accounts.insert(
                        doc["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
                "ClusterRoleBinding" | "RoleBinding" => {
                    for s in doc["subjects"].as_array().cloned().unwrap_or_default() {
                        bound.insert(s["name"].as_str().unwrap_or_default().to_owned());
                    }
                }
                "Deployment" => {
                    deployment_sa = doc["spec"]["template"]["spec"]["serviceAccountName"]
                        .as_str()
                        .map(str::to_owned);
                }
                _ => {}
            }
        }
    }
    for k in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
    ] {
        assert!(kinds_seen.contains(k), "deploy/ has no {k}");
    }
    for info in registry.kinds() {
        let covered = rules.iter().any(|r| {
            let has = |field: &str, want: &str| {
                r[field]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v == want))
            };
            has("apiGroups", &info.group)
                && has("resources", &info.plural)
                && needed.iter().all(|v| has("verbs", v))
        });
        assert!(
            covered,
            "no RBAC rule grants {needed:?} on {}.{}",
            info.plural, info.group
        );
    }
    // Nothing beyond the CRDs and those verbs.
    let plurals: BTreeSet<String> = registry.kinds().iter().map(|k| k.plural.clone()).collect();
    let groups: BTreeSet<String> = registry.kinds().iter().map(|k| k.group.clone()).collect();
    for r in &rules {
        for g in r["apiGroups"].as_array().into_iter().flatten() {
            assert!(
                groups.contains(g.as_str().unwrap_or_default()),
                "extra API group in {r}"
            );
        }
        for res in r["resources"].as_array().into_iter().flatten() {
            assert!(
                plurals.contains(res.as_str().unwrap_or_default()),
                "extra resource {res}"
            );
        }
        for v in r["verbs"].as_array().into_iter().flatten() {
            assert!(
                needed.contains(v.as_str().unwrap_or_default()),
                "extra verb {v}"
            );
        }
    }
    // Leader election as client-go's needs it (get, create, update), on Leases only.
    let lease_verbs: BTreeSet<&str> = ["get", "list", "watch", "create", "update"].into();
    assert!(
        !lease_rules.is_empty(),
        "no Role for the Leases of elections"
    );
    for r in &lease_rules {
        assert_eq!(r["apiGroups"], serde_json::json!(["coordination.k8s.io"]));
        assert_eq!(r["resources"], serde_json::json!(["leases"]));
        let verbs: BTreeSet<&str> = r["verbs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(verbs, lease_verbs, "{r}");
    }
    let sa = deployment_sa.expect("the Deployment names its service account");
    assert!(
        service_accounts.contains(&sa) && bound.contains(&sa),
        "{sa} exists and is bound"
    );
}

/// kubectl reads YAML 1.1, where a plain `no`, `yes`, `on`, `off`, `y` or `n` is a boolean:
/// a real API server refused `shortNames: [no]` as `[false]`. Every such word in deploy/ is
/// quoted.
#[test]
fn no_plain_word_that_yaml_1_1_reads_as_a_boolean_is_left_in_deploy() {
    const WORDS: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF",
    ];
    let mut checked = 0;
    for dir in [deploy_dir(), deploy_dir().join("crds")] {
        for path in yaml_files(&dir) {
            let text = std::fs::read_to_string(&path).expect("read");
            for (n, line) in text.lines().enumerate() {
                let item = line.trim_start().trim_start_matches("- ");
                let (key, value) = match item.split_once(": ") {
                    Some((k, v)) => (Some(k), v),
                    None => (item.strip_suffix(':'), item),
                };
                for scalar in [key.unwrap_or(""), value] {
                    assert!(
                        !WORDS.contains(&scalar.trim()),
                        "{}:{}: plain {scalar:?} reads as a boolean in YAML 1.1: {line:?}",
                        path.display(),
                        n + 1
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "the CRDs and the manifests were read");
}
