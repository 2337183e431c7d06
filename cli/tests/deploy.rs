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

/// Every document of every YAML file in deploy/, with its file.
fn all_documents() -> Vec<(PathBuf, Value)> {
    yaml_files(&deploy_dir())
        .into_iter()
        .flat_map(|f| documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

fn named<'a>(docs: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/ has no {kind} {name}"))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

/// The CRD rules of a ClusterRole: exactly `verbs` on every kind of the model, nothing more.
fn assert_crd_rules(role: &Value, verbs: &[&str]) {
    let registry = Registry::with_demo_kinds();
    let want: BTreeSet<String> = verbs.iter().map(|v| (*v).to_owned()).collect();
    let rules = role["rules"].as_array().cloned().unwrap_or_default();
    let groups: BTreeSet<String> = registry.kinds().iter().map(|k| k.group.clone()).collect();
    let plurals: BTreeSet<String> = registry.kinds().iter().map(|k| k.plural.clone()).collect();
    for info in registry.kinds() {
        assert!(
            rules
                .iter()
                .any(|r| strings(&r["apiGroups"]).contains(&info.group)
                    && strings(&r["resources"]).contains(&info.plural)),
            "{}: no rule for {}.{}",
            role["metadata"]["name"],
            info.plural,
            info.group
        );
    }
    for r in &rules {
        assert!(
            strings(&r["apiGroups"]).is_subset(&groups),
            "extra API group in {r}"
        );
        assert!(
            strings(&r["resources"]).is_subset(&plurals),
            "extra resource in {r}"
        );
        assert_eq!(
            strings(&r["verbs"]),
            want,
            "{}: {r}",
            role["metadata"]["name"]
        );
    }
}

#[test]
fn every_yaml_file_parses_and_each_program_gets_only_what_it_does() {
    let docs = all_documents();
    let kinds: BTreeSet<String> = docs
        .iter()
        .filter_map(|(_, d)| d["kind"].as_str().map(str::to_owned))
        .collect();
    for k in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(k), "deploy/ has no {k}");
    }
    // Readers read; writers write; nothing else anywhere.
    assert_crd_rules(
        named(&docs, "ClusterRole", "kvsync-reader"),
        &["get", "list", "watch"],
    );
    assert_crd_rules(
        named(&docs, "ClusterRole", "kvsync-writer"),
        &[
            "get", "list", "watch", "create", "patch", "update", "delete",
        ],
    );
    let cluster_roles: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == "ClusterRole")
        .collect();
    assert_eq!(
        cluster_roles.len(),
        2,
        "only the reader and the writer roles"
    );
    // Leader election as client-go's needs it (get, create, update), on Leases only, in the
    // controllers' namespace only.
    let lease_role = named(&docs, "Role", "kvsync-leader-election");
    assert_eq!(lease_role["metadata"]["namespace"], "kvsync-system");
    for r in lease_role["rules"].as_array().expect("rules") {
        assert_eq!(
            strings(&r["apiGroups"]),
            ["coordination.k8s.io".to_owned()].into()
        );
        assert_eq!(strings(&r["resources"]), ["leases".to_owned()].into());
        assert_eq!(
            strings(&r["verbs"]),
            ["get", "list", "watch", "create", "update"]
                .map(str::to_owned)
                .into()
        );
    }
    // What each service account is bound to.
    let bound = |sa: &str| -> BTreeSet<String> {
        docs.iter()
            .map(|(_, d)| d)
            .filter(|d| {
                matches!(
                    d["kind"].as_str(),
                    Some("ClusterRoleBinding" | "RoleBinding")
                )
            })
            .filter(|d| {
                d["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["name"] == sa && s["namespace"] == "kvsync-system")
            })
            .map(|d| d["roleRef"]["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // The controller and the fan-out server only read.
    for (deployment, what) in [
        ("kvsync-controller", "the controller"),
        ("kvsync-server", "the fan-out server"),
    ] {
        let d = named(&docs, "Deployment", deployment);
        let sa = d["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or_else(|| panic!("{what} names its service account"));
        named(&docs, "ServiceAccount", sa);
        assert_eq!(
            bound(sa),
            ["kvsync-reader".to_owned()].into(),
            "{what} only reads"
        );
    }
    named(&docs, "ServiceAccount", "kvsync-writer");
    assert_eq!(
        bound("kvsync-writer"),
        ["kvsync-writer", "kvsync-leader-election"]
            .map(str::to_owned)
            .into()
    );
}

/// The checks of the Pod Security "restricted" profile on a Deployment's pod, and memory
/// requests and limits on every container; returns the containers.
fn assert_restricted(deployment: &Value) -> &Vec<Value> {
    let pod = &deployment["spec"]["template"]["spec"];
    for forbidden in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod[forbidden].as_bool() != Some(true), "{forbidden}");
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        assert!(v.get("hostPath").is_none(), "no hostPath volumes: {v}");
    }
    let pod_sc = &pod["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert!(pod_sc["runAsUser"].as_u64().is_some_and(|u| u > 0));
    let containers = pod["containers"].as_array().expect("containers");
    for c in containers
        .iter()
        .chain(pod["initContainers"].as_array().into_iter().flatten())
    {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert!(sc["privileged"].as_bool() != Some(true));
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert!(strings(&sc["capabilities"]["drop"]).contains("ALL"));
        assert!(
            strings(&sc["capabilities"]["add"])
                .iter()
                .all(|c| c == "NET_BIND_SERVICE"),
            "restricted allows adding only NET_BIND_SERVICE"
        );
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod_sc["seccompProfile"]["type"].as_str());
        assert!(
            matches!(seccomp, Some("RuntimeDefault" | "Localhost")),
            "seccompProfile: {seccomp:?}"
        );
        assert!(sc["runAsNonRoot"] != false);
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "memory request"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "memory limit"
        );
    }
    containers
}

/// The container's arguments are ones `kvsync` takes: run with them (and a kubeconfig that
/// does not exist), it gets past parsing and fails only at the datastore.
fn assert_args_parse(container: &Value) {
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let out = Command::cargo_bin("kvsync")
        .expect("kvsync")
        .args(["--kubeconfig", "/nonexistent/kubeconfig"])
        .args(&args)
        .output()
        .expect("run kvsync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot use the kubernetes datastore"),
        "kvsync {args:?} does not parse: {stderr}"
    );
}

/// The controller's pod passes the Pod Security "restricted" profile, runs the controller
/// (not a debugging command) with its probes on the endpoints it serves, and has memory
/// requests and limits.
#[test]
fn the_deployment_runs_the_controller_and_passes_pod_security_restricted() {
    let docs = all_documents();
    let deployment = named(&docs, "Deployment", "kvsync-controller");
    let containers = assert_restricted(deployment);
    let c = &containers[0];
    assert_args_parse(c);
    let args = strings(&c["args"]);
    assert!(
        args.contains("controller"),
        "runs `kvsync controller`: {args:?}"
    );
    assert!(!args.contains("watch"), "not a debugging command");
    let port_of = |probe: &str| c[probe]["httpGet"]["path"].as_str().map(str::to_owned);
    assert_eq!(port_of("livenessProbe").as_deref(), Some("/healthz"));
    assert_eq!(port_of("readinessProbe").as_deref(), Some("/readyz"));
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert!(
        c["args"]
            .as_array()
            .expect("args")
            .iter()
            .any(|a| a == "0.0.0.0:8080"),
        "listens where the probes look"
    );
}

/// Documents as a YAML 1.1 reader reads them (kubectl through go-yaml v2, PyYAML): an event
/// parser, with every plain scalar resolved by the YAML 1.1 rules ([`kvsync_cli::yaml11`]) and
/// quoted ones kept as strings. Anchors and aliases are not used in deploy/ and not resolved.
fn documents_1_1(path: &Path) -> Vec<Value> {
    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::{Marker, TScalarStyle};

    enum Open {
        Seq(Vec<Value>),
        Map(serde_json::Map<String, Value>, Option<String>),
    }
    #[derive(Default)]
    struct Reader {
        docs: Vec<Value>,
        stack: Vec<Open>,
    }
    impl Reader {
        fn push(&mut self, v: Value) {
            match self.stack.last_mut() {
                None => self.docs.push(v),
                Some(Open::Seq(items)) => items.push(v),
                Some(Open::Map(map, key)) => match key.take() {
                    None => {
                        let k = match v {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        *key = Some(k);
                    }
                    Some(k) => {
                        map.insert(k, v);
                    }
                },
            }
        }
    }
    impl MarkedEventReceiver for Reader {
        fn on_event(&mut self, ev: Event, _mark: Marker) {
            match ev {
                Event::Scalar(text, style, _, _) => {
                    let v = if style == TScalarStyle::Plain {
                        kvsync_cli::yaml11::plain_scalar_1_1(&text)
                    } else {
                        Value::String(text)
                    };
                    self.push(v);
                }
                Event::SequenceStart(..) => self.stack.push(Open::Seq(Vec::new())),
                Event::MappingStart(..) => {
                    self.stack.push(Open::Map(serde_json::Map::new(), None));
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    let v = match self.stack.pop() {
                        Some(Open::Seq(items)) => Value::Array(items),
                        Some(Open::Map(map, _)) => Value::Object(map),
                        None => Value::Null,
                    };
                    self.push(v);
                }
                _ => {}
            }
        }
    }
    let text = std::fs::read_to_string(path).expect("read yaml");
    let mut reader = Reader::default();
    Parser::new_from_str(&text)
        .load(&mut reader, true)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    reader.docs.into_iter().filter(|v| !v.is_null()).collect()
}

/// kubectl reads YAML 1.1, where a plain `no`, `on`, `y`, `1_000` or `1:30` is not a string:
/// a real API server refused `shortNames: [no]` as `[false]`. Every file in deploy/ reads the
/// same with a YAML 1.1 reader as with a YAML 1.2 one, and the CRDs read by the YAML 1.1
/// reader are what the types generate.
#[test]
fn every_manifest_reads_the_same_in_yaml_1_1_and_the_crds_are_what_the_types_generate() {
    let mut checked = 0;
    for path in yaml_files(&deploy_dir()) {
        assert_eq!(
            documents_1_1(&path),
            documents(&path),
            "{} reads differently with a YAML 1.1 reader (kubectl's): quote the strings it takes for booleans, numbers or null",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 5, "the CRDs and the manifests were read");

    let tmp = tempfile::tempdir().expect("temp dir");
    Command::cargo_bin("kvsync")
        .expect("kvsync")
        .args(["crds", "--out-dir"])
        .arg(tmp.path())
        .assert()
        .success();
    for path in yaml_files(tmp.path()) {
        let name = path.file_name().expect("a file name");
        assert_eq!(
            documents_1_1(&deploy_dir().join("crds").join(name)),
            documents(&path),
            "deploy/crds/{} as kubectl reads it is not what the types generate",
            name.to_string_lossy()
        );
    }
}

/// The YAML 1.1 reader above reads what it must: a plain `no` is false, a quoted one a string.
#[test]
fn the_yaml_1_1_reader_reads_plain_words_as_kubectl_does() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("t.yaml");
    std::fs::write(
        &path,
        "shortNames:\n- no\n- 'no'\nreplicas: 0x10\nport: 1_000\nx: ~\nmode: on\n---\nname: pool\n",
    )
    .expect("write");
    assert_eq!(
        documents_1_1(&path),
        vec![
            serde_json::json!({"shortNames": [false, "no"], "replicas": 16, "port": 1000, "x": null, "mode": true}),
            serde_json::json!({"name": "pool"}),
        ]
    );
}

/// The image: multi-stage, every base pinned by digest, a distroless (or scratch) runtime
/// running as non-root, the dependencies built in a layer of their own before the sources
/// come in, and a .dockerignore that keeps build output and git out of the context. Checked
/// on the text: building it needs Docker (deploy/README.md).
#[test]
fn the_image_is_multi_stage_pinned_distroless_and_caches_its_dependencies() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let stages: Vec<&str> = froms
        .iter()
        .filter_map(|f| f.split_whitespace().nth(3))
        .collect();
    for from in &froms {
        let image = from.split_whitespace().nth(1).expect("an image");
        if stages.contains(&image) || image == "scratch" {
            continue;
        }
        let digest = image.split_once("@sha256:").map(|(_, d)| d);
        assert!(
            digest.is_some_and(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit())),
            "{from}: not pinned by digest"
        );
    }
    let runtime = froms.last().expect("a runtime stage");
    assert!(
        runtime.contains("gcr.io/distroless/")
            || runtime.split_whitespace().nth(1) == Some("scratch"),
        "the runtime is distroless or scratch: {runtime}"
    );
    let after_runtime = &text[text.rfind("FROM ").expect("FROM")..];
    let user = after_runtime
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("a USER in the runtime stage");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("a numeric uid");
    assert_ne!(uid, 0, "non-root, numeric (runAsNonRoot can check it)");
    // The dependencies are cooked before the sources are copied in.
    let cook = lines
        .iter()
        .position(|l| l.contains("cargo chef cook"))
        .expect("a dependency layer (cargo chef cook)");
    let build = lines
        .iter()
        .rposition(|l| l.contains("cargo build --release --locked"))
        .expect("a locked release build");
    let sources = lines
        .iter()
        .rposition(|l| *l == "COPY . .")
        .expect("the sources copied in");
    assert!(
        cook < sources && sources < build,
        "cook, then the sources, then the build"
    );
    let ignore =
        std::fs::read_to_string(deploy_dir().join("../.dockerignore")).expect(".dockerignore");
    for entry in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore leaves out {entry}"
        );
    }
}

/// The fan-out server: `kvsync serve` over mutual TLS (not plain TCP), probes on the endpoints
/// it serves, several replicas spread over nodes, a Service for followers and metrics on the
/// container's ports, and a PodDisruptionBudget over its pods.
#[test]
fn the_server_deployment_serves_over_mutual_tls_with_probes_a_service_and_a_pdb() {
    let docs = all_documents();
    let deployment = named(&docs, "Deployment", "kvsync-server");
    let c = &assert_restricted(deployment)[0];
    assert_args_parse(c);
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    assert!(
        args.contains(&"serve".to_owned()),
        "runs `kvsync serve`: {args:?}"
    );
    assert!(!args.contains(&"--plaintext".to_owned()), "not plain TCP");
    for f in ["--tls-cert", "--tls-key", "--client-ca"] {
        let path = flag(f).unwrap_or_else(|| panic!("{f}"));
        assert!(
            path.starts_with("/etc/kvsync/tls/"),
            "{f} {path}: from the mounted Secret"
        );
    }
    assert!(
        flag("--target-connections").is_some(),
        "sheds over a target"
    );
    assert_eq!(flag("--http-listen").as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(flag("--listen").as_deref(), Some("0.0.0.0:7878"));
    let probe = |p: &str| c[p]["httpGet"]["path"].as_str().map(str::to_owned);
    assert_eq!(probe("livenessProbe").as_deref(), Some("/healthz"));
    assert_eq!(probe("readinessProbe").as_deref(), Some("/readyz"));
    let ports: BTreeSet<(String, u64)> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["containerPort"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [("sync".to_owned(), 7878), ("http".to_owned(), 8080)].into()
    );
    let spec = &deployment["spec"];
    assert!(
        spec["replicas"].as_u64().is_some_and(|r| r >= 2),
        "replicas"
    );
    let labels = &spec["template"]["metadata"]["labels"];
    let selects = |selector: &Value| {
        selector
            .as_object()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &labels[k] == v))
    };
    let service = named(&docs, "Service", "kvsync-server");
    assert!(
        selects(&service["spec"]["selector"]),
        "the Service selects the pods"
    );
    let targets: BTreeSet<String> = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["targetPort"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(targets, ["http", "sync"].map(str::to_owned).into());
    let pdb = named(&docs, "PodDisruptionBudget", "kvsync-server");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"]),
        "the PDB selects the pods"
    );
    assert!(
        pdb["spec"]["maxUnavailable"] == 1 || pdb["spec"]["minAvailable"].is_u64(),
        "{pdb}"
    );
    // The Secret its TLS files come from is mounted.
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "kvsync-server-tls")
    );
}
