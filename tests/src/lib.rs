//! Tests shared by every kvsync backend: the conformance suite, server fixtures and the
//! Syncer's randomized model test.
//!
//! Each backend's test file calls [`conformance_tests!`] with a constructor of its
//! [`TestBackend`], so every backend passes the same suite unchanged.

pub mod conformance;
pub mod etcd;
pub mod harness;
pub mod http;
pub mod isolate;
pub mod kube_double;
pub mod kubernetes;
pub mod process;
pub mod proxy;
pub mod scenarios;
pub mod sqlite;

pub use harness::{Guarded, MemoryTestBackend, RawAccess, TestBackend, TestClient, unique_prefix};
pub mod checker;
pub mod syncer_model;

/// The README's examples, compiled as doc tests so they stay true.
#[doc = include_str!("../../README.md")]
pub mod readme {}
