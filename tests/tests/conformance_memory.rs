//! The conformance suite against the memory backend.

kvsync_tests::conformance_tests!(kvsync_tests::MemoryTestBackend);
