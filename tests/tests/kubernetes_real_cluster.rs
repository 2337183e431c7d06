//! The same suites against a real cluster when `KVSYNC_TEST_KUBECONFIG` names a kubeconfig,
//! in fresh namespaces and under a run tag; and the same path against the API server double
//! (which then requires namespaces to exist, as a real server does), so it runs in CI too.
//! Checks that store undecodable data or move the API server's watch window skip themselves
//! on a cluster (its CRD schemas and watch cache allow neither).

//!
//! Without `KVSYNC_TEST_KUBECONFIG` the real-cluster test is reported as ignored (its own
//! harness, so that it is never counted as passed).

use std::future::Future;
use std::time::Duration;

use kvsync_model::Registry;
use kvsync_tests::kube_double::ApiServerDouble;
use kvsync_tests::kubernetes::{ClusterTestBackend, run_cluster_suites};
use libtest_mimic::{Arguments, Trial};

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let real = std::env::var_os("KVSYNC_TEST_KUBECONFIG").is_some();
    let trials = vec![
        trial(
            if real {
                "suites_against_a_real_cluster"
            } else {
                "suites_against_a_real_cluster (skipped: KVSYNC_TEST_KUBECONFIG is not set)"
            },
            suites_against_a_real_cluster,
        )
        .with_ignored_flag(!real),
        trial(
            "the_real_cluster_path_runs_against_the_double",
            the_real_cluster_path_runs_against_the_double,
        ),
        trial(
            "clients_of_one_cluster_never_see_each_others_keys",
            clients_of_one_cluster_never_see_each_others_keys,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// A test of its own runtime.
fn trial<F: Future<Output = ()> + 'static>(name: &str, test: fn() -> F) -> Trial {
    Trial::test(name, move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(test());
        Ok(())
    })
}

async fn suites_against_a_real_cluster() {
    let backend = ClusterTestBackend::from_env()
        .await
        .expect("KVSYNC_TEST_KUBECONFIG names a usable cluster");
    run_cluster_suites(&backend).await;
}

async fn the_real_cluster_path_runs_against_the_double() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    double.require_namespaces();
    let backend = ClusterTestBackend::prepare(double.kubeconfig()).await;
    assert_eq!(
        double.crds(),
        [
            "ippools.kvsync.dev",
            "locks.coordination.kvsync.dev",
            "networkpolicies.kvsync.dev",
            "nodes.kvsync.dev"
        ],
        "the CRDs of deploy/crds are installed"
    );
    run_cluster_suites(&backend).await;
    // Deleted namespaces terminate before they are gone, as on a real server.
    assert!(
        double.namespaces_finalized(Duration::from_secs(30)).await,
        "the deleted namespaces terminate"
    );
    assert!(
        double.namespaces().is_empty(),
        "the run's namespaces are deleted: {:?}",
        double.namespaces()
    );
    assert_eq!(double.object_count(), 0, "the run leaves no objects behind");
}

async fn clients_of_one_cluster_never_see_each_others_keys() {
    use kvsync_model::{KVPair, ListOptions, ResourceKey};
    use kvsync_tests::TestBackend;
    use serde_json::json;
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 10_000).await;
    double.require_namespaces();
    let backend = ClusterTestBackend::prepare(double.kubeconfig()).await;
    let (a, b) = (backend.client().await.client, backend.client().await.client);
    let policy = KVPair::new(
        ResourceKey::namespaced("NetworkPolicy", "prod", "p"),
        json!({"order": 1.0, "selector": "all()"}),
    );
    let pool = KVPair::new(
        ResourceKey::cluster("IPPool", "a"),
        json!({"cidr": "10.0.0.0/16"}),
    );
    for c in [&a, &b] {
        let written = c
            .create(policy.clone())
            .await
            .expect("same key, own namespace");
        assert_eq!(written.key, policy.key, "the caller's key comes back");
        c.create(pool.clone()).await.expect("same name, own tag");
    }
    assert_eq!(
        double.namespaces().len(),
        3,
        "one fresh namespace per client, and one for the run's lock Leases"
    );
    assert_eq!(double.object_count(), 4);
    let list = a
        .list(&ListOptions::new("NetworkPolicy"))
        .await
        .expect("list");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].key, policy.key);
    a.clean().await.expect("clean");
    assert_eq!(
        double.object_count(),
        2,
        "clean removes only the client's keys"
    );
    backend.cleanup().await.expect("cleanup");
    assert!(double.namespaces_finalized(Duration::from_secs(30)).await);
    assert_eq!(double.object_count(), 0);
    assert!(double.namespaces().is_empty());
}
