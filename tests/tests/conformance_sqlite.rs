//! The conformance suite against the SQLite backend.

kvsync_tests::conformance_tests!(kvsync_tests::sqlite::SqliteTestBackend);
