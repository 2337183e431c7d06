//! The Syncer.
