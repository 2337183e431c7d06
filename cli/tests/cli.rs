//! The `kvsync` binary, driven as a user would: every subcommand, good and bad input.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("kvsync.db")
    }

    fn kvsync(&self) -> Command {
        let mut cmd = Command::cargo_bin("kvsync").expect("the kvsync binary");
        cmd.env_remove("KVSYNC_DATASTORE_TYPE")
            .env_remove("ETCD_ENDPOINTS")
            .env("KVSYNC_DB", self.db())
            .current_dir(self.dir.path());
        cmd
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write manifest");
        p
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Through `run` (kvsync with a datastore's flags): applies the two pools of `pools`, gets
/// them back as JSON and follows them to InSync.
fn apply_get_and_watch_pools(
    run: &dyn Fn(&[&str]) -> std::process::Output,
    pools: &std::path::Path,
) {
    let out = run(&["apply", "-f", pools.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("pool-a created"),
        "a new object is created: {}",
        stdout(&out)
    );
    let out = run(&["apply", "-f", pools.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("pool-a configured"),
        "an existing one configured: {}",
        stdout(&out)
    );
    let out = run(&["get", "ippools", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2));
    let out = run(&["watch", "ippools", "--once"]);
    assert!(
        stdout(&out).ends_with("status InSync\n"),
        "{}",
        stdout(&out)
    );
}

/// A long-running `kvsync` (controller, serve) on `env`'s database, its stderr lines on an
/// iterator: the caller reads the lines it waits for, then drains the rest.
fn spawn_daemon(
    env: &Env,
    args: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kvsync"))
        .env_remove("KVSYNC_DATASTORE_TYPE")
        .env_remove("ETCD_ENDPOINTS")
        .env("KVSYNC_DB", env.db())
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start kvsync");
    let lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    (child, lines)
}

/// Sends SIGTERM and waits for the exit: its status and how long it took.
fn sigterm_and_wait(
    child: &mut std::process::Child,
) -> (std::process::ExitStatus, std::time::Duration) {
    kvsync_tests::process::signal(child.id(), "-TERM");
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return (s, t0.elapsed());
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "still running after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Applies the two demo pools.
fn apply_pools(env: &Env) {
    let pools = env.file("pools.yaml", POOLS);
    let out = env
        .kvsync()
        .args(["apply", "-f"])
        .arg(&pools)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const POOLS: &str = "apiVersion: kvsync.dev/v1
kind: IPPool
metadata:
  name: pool-a
spec:
  cidr: 10.1.0.0/16
  natOutgoing: true
---
apiVersion: kvsync.dev/v1
kind: IPPool
metadata:
  name: pool-b
spec:
  cidr: 10.2.0.0/16
";

const POLICY: &str = r#"{"apiVersion": "kvsync.dev/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "allow-dns", "namespace": "kube-system"},
 "spec": {"selector": "all()", "egress": [{"action": "Allow", "protocol": "UDP", "ports": [53]}]}}"#;

#[test]
fn apply_then_get_in_every_output_format() {
    let env = Env::new();
    let pools = env.file("pools.yaml", POOLS);
    let out = env
        .kvsync()
        .args(["apply", "-f"])
        .arg(&pools)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "ippool/pool-a created\nippool/pool-b created\n"
    );
    let out = env
        .kvsync()
        .args(["apply", "-f"])
        .arg(&pools)
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "ippool/pool-a configured\nippool/pool-b configured\n"
    );

    let out = env.kvsync().args(["get", "ippools"]).output().unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.contains("pool-a") && text.contains("10.1.0.0/16"),
        "{text}"
    );

    let out = env
        .kvsync()
        .args(["get", "pool", "pool-a", "-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["kind"], "IPPool");
    assert_eq!(v["apiVersion"], "kvsync.dev/v1");
    assert_eq!(v["spec"]["cidr"], "10.1.0.0/16");
    assert!(v["metadata"]["uid"].is_string() && v["metadata"]["resourceVersion"].is_string());

    let out = env
        .kvsync()
        .args(["get", "ippool", "-o", "yaml"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_yaml_ng::from_str(&stdout(&out)).expect("yaml");
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2));

    let out = env
        .kvsync()
        .args(["get", "IPPool", "-o", "wide"])
        .output()
        .unwrap();
    assert!(
        stdout(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .contains("REVISION")
    );
}

#[test]
fn namespaced_kinds_and_json_manifests_from_stdin() {
    let env = Env::new();
    let out = env
        .kvsync()
        .args(["apply", "-f", "-"])
        .write_stdin(POLICY)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "networkpolicy/allow-dns -n kube-system created\n"
    );
    let out = env.kvsync().args(["get", "netpol"]).output().unwrap();
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("No resources found"),
        "the default namespace is empty"
    );
    let out = env
        .kvsync()
        .args(["get", "netpol", "-n", "kube-system"])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("allow-dns"));
    let out = env
        .kvsync()
        .args(["get", "networkpolicies", "-A"])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("kube-system"));
    let out = env
        .kvsync()
        .args(["delete", "netpol", "allow-dns", "-n", "kube-system"])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "networkpolicy/allow-dns -n kube-system deleted\n"
    );
}

#[test]
fn a_directory_applies_every_manifest_in_it() {
    let env = Env::new();
    env.file("dir/a.yaml", POOLS);
    env.file("dir/b.json", POLICY);
    env.file("dir/readme.txt", "not a manifest");
    let out = env.kvsync().args(["create", "-f", "dir"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 3);
    // create refuses what exists: exit 1 with the conflict named.
    let out = env.kvsync().args(["create", "-f", "dir"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = env.kvsync().args(["delete", "-f", "dir"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).matches("deleted").count(), 3);
}

#[test]
fn bad_input_fails_with_one_clear_line_and_writes_nothing() {
    // The manifests themselves: tests/corpus/bad (the_corpus_of_bad_manifests_...). Here:
    // the command line's own mistakes.
    let env = Env::new();
    // An unknown kind on the command line is a usage error (2), as a bad flag is.
    let out = env.kvsync().args(["get", "gizmos"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("gizmos"));
    let out = env
        .kvsync()
        .args(["get", "ippool", "missing"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"));
    let out = env
        .kvsync()
        .args(["get", "ippool", "Bad_Name"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad name on the command line is usage"
    );
    assert!(stderr(&out).contains("invalid name"), "{}", stderr(&out));
    let out = env
        .kvsync()
        .args(["delete", "ippool", "missing"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = env
        .kvsync()
        .args(["apply", "-f", "no-such-file.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-such-file.yaml"));
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    for args in [
        vec!["--bogus"],
        vec!["get"],
        vec!["apply"],
        vec!["frobnicate"],
        vec!["--datastore", "oracle", "get", "pools"],
    ] {
        let out = env.kvsync().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    // What the command line names wrong is a usage error too, reported at once with what
    // was wrong; a watch never starts on options that can never work.
    for (args, says) in [
        (vec!["delete", "ippool"], "give KIND NAME"),
        (vec!["get", "frobs"], "resource type \"frobs\""),
        (vec!["get", "ippool", "Bad_Name"], "invalid name"),
        (vec!["get", "ippools", "-n", "prod"], "cluster-scoped"),
        (
            vec!["watch", "networkpolicies", "-n", "BAD", "--once"],
            "invalid namespace",
        ),
        (
            vec!["watch", "ippools", "-n", "prod", "--once"],
            "cluster-scoped",
        ),
    ] {
        check_usage(&env, &["--datastore", "memory"], &args, says);
    }
    // Datastore settings that can never work are usage errors too.
    for (args, says) in [
        (vec!["--prefix", "nope", "get", "ippools"], "invalid prefix"),
        (
            vec![
                "--datastore",
                "etcd",
                "--etcd-endpoints",
                "foo",
                "get",
                "ippools",
            ],
            "invalid endpoints",
        ),
        (
            vec![
                "--datastore",
                "etcd",
                "--etcd-username",
                "u",
                "get",
                "ippools",
            ],
            "go together",
        ),
    ] {
        check_usage(&env, &[], &args, says);
    }
    // A resource that is not there is a runtime failure: 1.
    let out = env
        .kvsync()
        .args(["--datastore", "memory", "get", "ippool", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

/// Runs `kvsync` with `global` then `args`, and checks it fails at once with exit 2 saying
/// `says`.
fn check_usage(env: &Env, global: &[&str], args: &[&str], says: &str) {
    let started = Instant::now();
    let out = env
        .kvsync()
        .args(global)
        .args(args)
        .timeout(Duration::from_secs(20))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{args:?} did not fail at once"
    );
}

#[test]
fn an_unreachable_etcd_fails_clearly_within_the_timeout() {
    let env = Env::new();
    let port = kvsync_tests::etcd::free_port();
    let started = Instant::now();
    let out = env
        .kvsync()
        .args(["--datastore", "etcd", "--timeout", "2", "--etcd-endpoints"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["get", "ippools"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: datastore unavailable"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn the_cli_works_against_the_kubernetes_api_server_double() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let double = rt.block_on(kvsync_tests::kube_double::ApiServerDouble::start(
        &kvsync_model::Registry::with_demo_kinds(),
        1000,
    ));
    let kubeconfig = double.kubeconfig();
    let pools = env.file("pools.yaml", POOLS);
    let run = |args: &[&str]| {
        env.kvsync()
            .args(["--datastore", "kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap()
    };
    apply_get_and_watch_pools(&run, &pools);
    for flag in ["--kube-paged-lists", "--kube-watch-list"] {
        let out = run(&[flag, "get", "ippools", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            v["items"].as_array().map(Vec::len),
            Some(2),
            "{flag} reads the same"
        );
    }
    let out = run(&["delete", "ippool", "pool-a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env
        .kvsync()
        .args([
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "get",
            "ippools",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a kubeconfig that cannot be read is usage"
    );
    assert!(stderr(&out).contains("kubeconfig"), "{}", stderr(&out));
    drop(double);
}

#[test]
fn watch_prints_the_state_then_follows_changes() {
    let env = Env::new();
    let pools = env.file("pools.yaml", POOLS);
    env.kvsync()
        .args(["apply", "-f"])
        .arg(&pools)
        .assert()
        .success();

    let out = env
        .kvsync()
        .args(["watch", "ippools", "--once", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(
        lines.first().map(|l| l["status"].clone()),
        Some("WaitForDatastore".into())
    );
    assert_eq!(
        lines.last().map(|l| l["status"].clone()),
        Some("InSync".into())
    );
    assert_eq!(lines.iter().filter(|l| l["type"] == "New").count(), 2);

    // A running watch sees a change made by another process.
    let mut child = StdCommand::new(assert_cmd::cargo::cargo_bin("kvsync"))
        .env("KVSYNC_DB", env.db())
        .args(["watch", "pools", "networkpolicies"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        let done = line == "status InSync";
        seen.push(line);
        if done {
            break;
        }
    }
    env.kvsync()
        .args(["delete", "ippool", "pool-a"])
        .assert()
        .success();
    let next = lines.next().and_then(Result::ok).unwrap_or_default();
    child.kill().expect("stop the watch");
    let _ = child.wait();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("New") && l.contains("IPPool(pool-a)")),
        "{seen:?}"
    );
    assert!(
        next.starts_with("Deleted") && next.contains("IPPool(pool-a)"),
        "{next}"
    );
}

#[test]
fn compact_crds_and_demo() {
    let env = Env::new();
    let out = env.kvsync().arg("demo").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("status InSync"), "{text}");
    assert!(text.contains("matches the datastore"), "{text}");
    let out = env.kvsync().args(["get", "pools"]).output().unwrap();
    assert!(stdout(&out).contains("demo-pool-a"));

    let out = env.kvsync().arg("compact").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("compacted at revision "));

    let out = env.kvsync().arg("crds").output().unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert_eq!(text.matches("kind: CustomResourceDefinition").count(), 4);
    assert!(text.contains("name: networkpolicies.kvsync.dev"));
    let dir = env.dir.path().join("crds");
    let out = env
        .kvsync()
        .args(["crds", "--out-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(Path::new(&dir.join("ippools.kvsync.dev.yaml")).is_file());
}

#[test]
fn the_cli_works_against_a_real_etcd() {
    let env = Env::new();
    let backend = kvsync_tests::etcd::EtcdTestBackend::shared();
    let endpoint = backend.cluster().endpoints()[0].clone();
    let prefix = kvsync_tests::unique_prefix();
    let pools = env.file("pools.yaml", POOLS);
    let run = |args: &[&str]| {
        env.kvsync()
            .args([
                "--datastore",
                "etcd",
                "--etcd-endpoints",
                endpoint.as_str(),
                "--prefix",
                prefix.as_str(),
            ])
            .args(args)
            .output()
            .unwrap()
    };
    apply_get_and_watch_pools(&run, &pools);
    let out = run(&["delete", "ippool", "pool-b"]);
    assert!(out.status.success());
}

#[test]
fn version_prints_the_client_and_the_datastore_s_capabilities() {
    let env = Env::new();
    let out = env.kvsync().args(["version", "--client"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("Client Version: {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        !text.contains("Datastore"),
        "--client opens no datastore: {text}"
    );

    let out = env
        .kvsync()
        .args(["version", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["datastore"]["backend"], "sqlite");
    assert_eq!(v["datastore"]["capabilities"]["ttl"], true);
    assert_eq!(v["datastore"]["capabilities"]["global_revision"], true);

    let out = env
        .kvsync()
        .args(["--datastore", "memory", "version"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Datastore: memory"), "{text}");
    assert!(text.contains("TTL:                    yes"), "{text}");
}

#[test]
fn a_closed_stdout_ends_the_process_quietly_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    for args in [&["crds"][..], &["--datastore", "memory", "version"][..]] {
        let mut child = StdCommand::new(assert_cmd::cargo::cargo_bin("kvsync"))
            .args(args)
            .env("KVSYNC_DB", env.db())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kvsync");
        // The reader goes away before kvsync writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let quiet = out.status.success() || out.status.signal() == Some(13);
        assert!(quiet, "{args:?}: {:?}", out.status);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn an_ipv6_pool_without_a_block_size_gets_calico_s_default_of_122() {
    let env = Env::new();
    let manifest = env.file(
        "v6.yaml",
        "apiVersion: kvsync.dev/v1\nkind: IPPool\nmetadata:\n  name: v6\nspec:\n  cidr: fd00:10::/64\n",
    );
    let out = env
        .kvsync()
        .args(["apply", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env
        .kvsync()
        .args(["get", "ippool", "v6", "-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // Stored as written; read as the type, the default follows the family.
    let pool: kvsync_model::demo::IPPool =
        serde_json::from_value(v["spec"].clone()).expect("an IPPool");
    assert_eq!(pool.block_size, 122, "{v}");
}

#[test]
fn manifests_past_a_limit_fail_fast_naming_the_file_and_the_limit_and_write_nothing() {
    let env = Env::new();
    let laughs = {
        let long = "x".repeat(20_000);
        let a1 = vec!["*a0"; 300].join(",");
        let a2 = vec!["*a1"; 300].join(",");
        format!(
            "apiVersion: kvsync.dev/v1\nkind: Node\nmetadata:\n  name: n\nspec:\n  a0: &a0 \"{long}\"\n  a1: &a1 [{a1}]\n  a2: [{a2}]\n"
        )
    };
    let deep = format!(
        "apiVersion: kvsync.dev/v1\nkind: Node\nmetadata:\n  name: n\nspec:\n  labels: {}{}\n",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    /// File name, text, environment, what the error says.
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("laughs.yaml", laughs, vec![], "KVSYNC_MAX_EXPANDED_BYTES"),
        (
            "deep.yaml",
            deep,
            vec![],
            "nest deeper than the limit of 64",
        ),
        (
            "big.yaml",
            POOLS.into(),
            vec![("KVSYNC_MAX_MANIFEST_BYTES", "100")],
            "larger than the limit of 100 bytes",
        ),
        (
            "many.yaml",
            POOLS.into(),
            vec![("KVSYNC_MAX_DOCUMENTS", "1")],
            "more than the limit of 1 documents",
        ),
        (
            "long.yaml",
            POOLS.into(),
            vec![("KVSYNC_MAX_STRING_BYTES", "8")],
            "over the limit of 8 (KVSYNC_MAX_STRING_BYTES",
        ),
        (
            "value.yaml",
            POOLS.into(),
            vec![("KVSYNC_MAX_VALUE_BYTES", "20")],
            "over the limit of 20 (KVSYNC_MAX_VALUE_BYTES",
        ),
    ];
    for (name, text, vars, says) in cases {
        let path = env.file(name, &text);
        let started = Instant::now();
        let out = env
            .kvsync()
            .envs(vars)
            .args(["apply", "-f"])
            .arg(&path)
            .timeout(Duration::from_secs(30))
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(says) && err.contains(name), "{name}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    let out = env
        .kvsync()
        .args(["get", "nodes", "-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["items"], serde_json::json!([]), "nothing was written");
}

#[test]
fn dev_stdin_and_a_pipe_are_read_as_files() {
    let env = Env::new();
    let node = "apiVersion: kvsync.dev/v1\nkind: Node\nmetadata:\n  name: piped\nspec: {}\n";
    let out = env
        .kvsync()
        .args(["apply", "-f", "/dev/stdin"])
        .write_stdin(node)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // What `-f <(...)` hands over: a pipe's path under /dev/fd.
    let script = format!(
        "{} apply -f <(printf '{}')",
        assert_cmd::cargo::cargo_bin("kvsync").display(),
        node.replace("piped", "substituted").replace('\n', "\\n")
    );
    let out = StdCommand::new("bash")
        .args(["-c", &script])
        .env("KVSYNC_DB", env.db())
        .env_remove("KVSYNC_DATASTORE_TYPE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.kvsync().args(["get", "nodes"]).output().unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("piped") && text.contains("substituted"),
        "{text}"
    );
}

fn corpus(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind)
}

/// Every resource of every kind, with revisions and uids, as `kvsync get` prints them.
fn dump(env: &Env) -> String {
    let mut all = String::new();
    for args in [
        &["get", "ippools", "-o", "json"][..],
        &["get", "nodes", "-o", "json"][..],
        &["get", "networkpolicies", "-A", "-o", "json"][..],
    ] {
        let out = env.kvsync().args(args).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        all.push_str(&stdout(&out));
    }
    all
}

#[test]
fn the_corpus_of_bad_manifests_fails_as_listed_and_changes_nothing() {
    let env = Env::new();
    let seed = env.file("seed.yaml", POOLS);
    assert!(
        env.kvsync()
            .args(["apply", "-f"])
            .arg(&seed)
            .output()
            .unwrap()
            .status
            .success()
    );
    let before = dump(&env);
    let expect = std::fs::read_to_string(corpus("bad").join("EXPECT")).expect("EXPECT");
    let mut listed = Vec::new();
    for line in expect
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let mut fields = line.splitn(3, '\t');
        let (file, code, says) = (
            fields.next().unwrap(),
            fields.next().unwrap().parse::<i32>().unwrap(),
            fields.next().unwrap(),
        );
        listed.push(file.to_owned());
        let out = env
            .kvsync()
            .args(["apply", "-f"])
            .arg(corpus("bad").join(file))
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{file}: {err}");
        assert!(err.contains(says), "{file}: expected {says:?} in {err:?}");
        assert!(
            err.contains(file),
            "{file}: the error names the file: {err:?}"
        );
        assert!(!err.contains("panicked"), "{file}: {err}");
        assert_eq!(dump(&env), before, "{file} changed the datastore");
    }
    let mut files: Vec<String> = std::fs::read_dir(corpus("bad"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f != "EXPECT")
        .collect();
    files.sort();
    listed.sort();
    assert_eq!(
        files, listed,
        "every file of the corpus is listed in EXPECT"
    );
}

#[test]
fn the_corpus_of_manifests_kubectl_accepts_is_accepted() {
    let env = Env::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus("good"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 6);
    for file in files {
        let out = env
            .kvsync()
            .args(["apply", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", file.display(), stderr(&out));
    }
    let all = dump(&env);
    for name in [
        "bom", "flow", "v6", "json-a", "json-b", "listed", "pool-b", "pool-c",
    ] {
        assert!(
            all.contains(&format!("\"{name}\"")),
            "{name} missing: {all}"
        );
    }
}

#[test]
fn a_document_that_fails_to_write_does_not_stop_the_others_and_says_so() {
    let env = Env::new();
    let first = env.file(
        "a.yaml",
        "apiVersion: kvsync.dev/v1\nkind: IPPool\nmetadata:\n  name: pool-a\nspec:\n  cidr: 10.1.0.0/16\n",
    );
    assert!(
        env.kvsync()
            .args(["create", "-f"])
            .arg(&first)
            .output()
            .unwrap()
            .status
            .success()
    );
    // pool-a exists: `create` fails for it, and still creates pool-b after it.
    let both = env.file("both.yaml", POOLS);
    let out = env
        .kvsync()
        .args(["create", "-f"])
        .arg(&both)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("document 1: ippool/pool-a: IPPool(pool-a) already exists"),
        "{err}"
    );
    assert!(err.contains("1 of 2 documents failed"), "{err}");
    assert!(
        stdout(&out).contains("ippool/pool-b created"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn an_invalid_document_is_reported_and_the_valid_ones_are_still_written() {
    // As kubectl: each document says what happened to it; the command exits 1 if any failed.
    let env = Env::new();
    let mixed = env.file(
        "mixed.yaml",
        &format!(
            "{POOLS}---\napiVersion: kvsync.dev/v1\nkind: IPPool\nmetadata:\n  name: Bad_Name\nspec:\n  cidr: 10.3.0.0/16\n"
        ),
    );
    let out = env
        .kvsync()
        .args(["apply", "-f"])
        .arg(&mixed)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("document 3 (IPPool Bad_Name): invalid metadata.name"),
        "{err}"
    );
    assert!(err.contains("1 of 3 documents failed"), "{err}");
    let text = stdout(&out);
    assert!(
        text.contains("ippool/pool-a created") && text.contains("ippool/pool-b created"),
        "{text}"
    );

    // delete -f goes on past a resource that is not there.
    let gone = env.file(
        "gone.yaml",
        "apiVersion: kvsync.dev/v1\nkind: IPPool\nmetadata:\n  name: never-made\nspec:\n  cidr: 10.9.0.0/16\n",
    );
    let out = env
        .kvsync()
        .args(["delete", "-f"])
        .arg(&gone)
        .arg("-f")
        .arg(&mixed)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ippool/never-made not found"), "{err}");
    assert!(err.contains("2 of 4 documents failed"), "{err}");
    assert!(
        stdout(&out).contains("ippool/pool-b deleted"),
        "{}",
        stdout(&out)
    );
}

/// `snapshot save`/`restore` and `migrate` SQLite -> etcd -> SQLite: every copy holds what the
/// first did, a used target is refused, a dry run writes nothing.
#[test]
fn snapshots_and_migrate_from_sqlite_to_etcd_and_back() {
    let env = Env::new();
    let backend = kvsync_tests::etcd::EtcdTestBackend::shared();
    let endpoint = backend.cluster().endpoints()[0].clone();
    // One prefix for every datastore of the test (the flag is global to source and target).
    let prefix = kvsync_tests::unique_prefix();
    let run = |args: &[&str]| {
        env.kvsync()
            .args(["--prefix", prefix.as_str()])
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let pools = env.file("pools.yaml", POOLS);
    ok(run(&["apply", "-f", pools.to_str().unwrap()]));
    let pools_of = |flags: &[&str]| {
        let mut args = flags.to_vec();
        args.extend(["get", "ippools", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&ok(run(&args))).expect("json");
        let mut specs: Vec<String> = v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| format!("{} {}", i["metadata"]["name"], i["spec"]))
            .collect();
        specs.sort();
        specs
    };
    let original = pools_of(&[]);
    assert_eq!(original.len(), 2);

    // A snapshot file, restored into a second SQLite file; a used target is refused.
    let snap = env.dir.path().join("snap.jsonl");
    let snap = snap.to_str().unwrap();
    ok(run(&["snapshot", "save", snap]));
    let second = env.dir.path().join("second.db");
    let second = ["--db", second.to_str().unwrap()];
    let out = ok(run(&[&second[..], &["snapshot", "restore", snap]].concat()));
    assert!(out.contains("wrote 2 of 2"), "{out}");
    assert_eq!(pools_of(&second), original);
    let out = run(&[&second[..], &["snapshot", "restore", snap]].concat());
    assert_eq!(out.status.code(), Some(1), "a used target is refused");
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));

    // To etcd: a dry run writes nothing; then the copy, with its count check.
    let etcd = ["--datastore", "etcd", "--etcd-endpoints", endpoint.as_str()];
    let to_etcd = format!("etcd:{endpoint}");
    let out = ok(run(&["migrate", "--to", &to_etcd, "--dry-run"]));
    assert!(out.contains("would write 2 of 2"), "{out}");
    assert!(pools_of(&etcd).is_empty(), "a dry run writes nothing");
    let out = ok(run(&["migrate", "--to", &to_etcd]));
    assert!(
        out.contains("IPPool: 2 in the source, 2 in the target"),
        "{out}"
    );
    assert_eq!(pools_of(&etcd), original);

    // And back from etcd (named by --from), into a new SQLite file.
    let third = env.dir.path().join("third.db");
    let to_third = format!("sqlite:{}", third.display());
    let out = ok(run(&["migrate", "--from", &to_etcd, "--to", &to_third]));
    assert!(
        out.contains("IPPool: 2 in the source, 2 in the target"),
        "{out}"
    );
    assert_eq!(pools_of(&["--db", third.to_str().unwrap()]), original);

    let out = run(&["migrate", "--to", "nowhere:x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad datastore is a usage error"
    );
}

/// `kvsync controller` follows the kinds, serves /healthz, /readyz (once in sync) and
/// /metrics (the Syncer's and the client's), counts the updates another process writes, and
/// stops within a second of SIGTERM with status 0.
#[test]
fn the_controller_serves_probes_and_metrics_and_stops_on_sigterm() {
    let env = Env::new();
    apply_pools(&env);
    let (mut child, mut lines) = spawn_daemon(
        &env,
        &[
            "controller",
            "--kinds",
            "ippools,nodes",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let addr = loop {
        let line = lines
            .next()
            .expect("the controller says where it listens")
            .expect("stderr");
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    // The rest of the log is drained, so that the controller never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    let get = |path: &str| kvsync_tests::http::request(&addr, "GET", path, &[], None);
    assert_eq!(get("/healthz").code, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while get("/readyz").code != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let metrics = get("/metrics");
    assert_eq!(metrics.code, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        metrics.headers
    );
    for want in [
        r#"kvsync_syncer_status{status="in_sync"} 1"#,
        r#"kvsync_syncer_updates_total{kind="IPPool",type="new"} 2"#,
        r#"kvsync_syncer_tracked_keys{kind="IPPool"} 2"#,
        r#"kvsync_backend_requests_total{backend="sqlite",op="list",outcome="ok"} 2"#,
    ] {
        assert!(
            metrics.body.contains(want),
            "no {want:?} in\n{}",
            metrics.body
        );
    }
    // Another process writes: the controller follows.
    let out = env
        .kvsync()
        .args(["delete", "ippool", "pool-a"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    while !get("/metrics")
        .body
        .contains(r#"kvsync_syncer_updates_total{kind="IPPool",type="deleted"} 1"#)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the delete never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (exit, took) = sigterm_and_wait(&mut child);
    assert!(exit.success(), "{exit:?}");
    assert!(
        took < std::time::Duration::from_secs(1),
        "stopped {took:?} after SIGTERM"
    );
}

/// `kvsync serve` on the embedded SQLite and `kvsync watch --server` in another process: the
/// follower sees the state, then InSync; /readyz says ready once the server is in sync; the
/// server stops on SIGTERM.
#[test]
fn serve_on_sqlite_and_follow_it_from_another_process() {
    let env = Env::new();
    apply_pools(&env);
    let (mut server, mut lines) = spawn_daemon(
        &env,
        &[
            "serve",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let (mut http, mut serving) = (None, None);
    while http.is_none() || serving.is_none() {
        let line = lines.next().expect("a line").expect("stderr");
        if let Some(a) = line.strip_prefix("listening on ") {
            http = Some(a.to_owned());
        }
        if let Some(a) = line.strip_prefix("serving on ") {
            serving = Some(a.to_owned());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (http, serving) = (http.unwrap(), serving.unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while kvsync_tests::http::request(&http, "GET", "/readyz", &[], None).code != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = env
        .kvsync()
        .args(["watch", "--server", &serving, "ippools", "--once"])
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("IPPool(pool-a)") && text.contains("IPPool(pool-b)"),
        "{text}"
    );
    assert!(text.ends_with("status InSync\n"), "{text}");
    let metrics = kvsync_tests::http::request(&http, "GET", "/metrics", &[], None);
    assert!(
        metrics
            .body
            .contains(r#"kvsync_server_catch_ups_total{mode="snapshot"} 1"#),
        "{}",
        metrics.body
    );
    let (exit, _) = sigterm_and_wait(&mut server);
    assert!(exit.success(), "{exit:?}");
}
