//! The same suites against a real cluster when `KVSYNC_TEST_KUBECONFIG` names a kubeconfig.
//! Checks that need to store undecodable data or move the API server's watch window are left
//! out there (the API does not allow either).

use kvsync_tests::conformance;
use kvsync_tests::kubernetes::RealClusterTestBackend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suites_against_a_real_cluster() {
    let Some(backend) = RealClusterTestBackend::from_env().await else {
        println!("skipped: KVSYNC_TEST_KUBECONFIG is not set, so no real cluster was tested");
        return;
    };
    let b = &backend;
    conformance::create_assigns_revision_and_uid_and_refuses_duplicates(b).await;
    conformance::update_checks_existence_and_revision(b).await;
    conformance::apply_creates_then_replaces(b).await;
    conformance::delete_returns_last_value_and_checks_revision(b).await;
    conformance::list_filters_by_kind_namespace_name_and_prefix(b).await;
    conformance::watch_from_list_revision_sees_every_change_in_order(b).await;
    conformance::watch_from_revision_replays_the_gap_with_deletions(b).await;
    conformance::ttl_expires_keys_with_a_deleted_event(b).await;
    conformance::racing_writers_with_preconditions_never_lose_an_update(b).await;
    conformance::large_values_round_trip(b).await;
    conformance::invalid_keys_and_values_are_rejected_and_nothing_is_written(b).await;
    conformance::client_is_shareable_across_tasks(b).await;
}
