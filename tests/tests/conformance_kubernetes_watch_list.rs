//! The conformance suite against the Kubernetes backend reading with watch-list requests.

kvsync_tests::conformance_tests!(kvsync_tests::kubernetes::KubeDoubleTestBackend {
    watch_list: true,
    ..Default::default()
});
