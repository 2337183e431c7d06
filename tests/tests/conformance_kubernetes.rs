//! The conformance suite against the Kubernetes backend, through the API server double.

kvsync_tests::conformance_tests!(kvsync_tests::kubernetes::KubeDoubleTestBackend::default());
