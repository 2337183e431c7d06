//! The conformance suite against a real etcd started by the fixture.

kvsync_tests::conformance_tests!(kvsync_tests::etcd::EtcdTestBackend::shared());
