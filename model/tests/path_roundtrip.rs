//! Property tests of the path codec.

use std::sync::Arc;

use kvsync_model::{KindInfo, PathCodec, Registry, ResourceKey};
use proptest::prelude::*;

fn codec() -> PathCodec {
    let mut reg = Registry::with_demo_kinds();
    reg.insert(KindInfo::untyped("example.com", "Widget", "widgets", true));
    PathCodec::new("/test/prefix", Arc::new(reg)).unwrap()
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
}

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..4).prop_map(|v| v.join("."))
}

fn key() -> impl Strategy<Value = ResourceKey> {
    prop_oneof![
        (prop_oneof![Just("IPPool"), Just("Node")], name())
            .prop_map(|(k, n)| ResourceKey::cluster(k, n)),
        (
            prop_oneof![Just("NetworkPolicy"), Just("Widget")],
            label(),
            name()
        )
            .prop_map(|(k, ns, n)| ResourceKey::namespaced(k, ns, n)),
    ]
}

proptest! {
    #[test]
    fn every_key_round_trips_through_its_path(k in key()) {
        let c = codec();
        let path = c.to_path(&k).unwrap();
        prop_assert_eq!(c.from_path(&path).unwrap(), k);
    }

    #[test]
    fn display_is_unique_per_key(a in key(), b in key()) {
        prop_assert_eq!(a == b, a.to_string() == b.to_string());
    }

    #[test]
    fn arbitrary_paths_never_panic_the_parser(s in "\\PC*") {
        let c = codec();
        if let Ok(k) = c.from_path(&s) {
            // Whatever parses is a valid key whose path is the input.
            prop_assert_eq!(c.to_path(&k).unwrap(), s);
        }
    }

    #[test]
    fn arbitrary_cidrs_never_panic_and_what_parses_is_canonical(s in "\\PC{0,50}") {
        if let Ok((len, v6)) = kvsync_model::validation::parse_cidr("spec.cidr", &s) {
            let (addr, l) = s.split_once('/').unwrap();
            prop_assert_eq!(l, len.to_string(), "canonical decimal prefix length");
            prop_assert_eq!(v6, addr.contains(':'));
        }
    }

    #[test]
    fn cidr_like_strings_never_panic(
        s in "[0-9a-f:.]{0,20}/[+0-9 -]{0,4}"
    ) {
        let _ = kvsync_model::validation::parse_cidr("spec.cidr", &s);
    }

    #[test]
    fn paths_under_the_prefix_never_panic_the_parser(s in "[a-zA-Z0-9./_-]{0,40}") {
        let c = codec();
        let path = format!("/test/prefix/{s}");
        if let Ok(k) = c.from_path(&path) {
            prop_assert_eq!(c.to_path(&k).unwrap(), path);
        }
    }
}

#[test]
fn wrong_scope_and_unknown_kinds_are_rejected() {
    let c = codec();
    assert!(c.from_path("/test/prefix/ippools/ns/name").is_err());
    assert!(c.from_path("/test/prefix/networkpolicies/name").is_err());
    assert!(c.from_path("/test/prefix/gizmos/name").is_err());
    assert!(c.from_path("/other/ippools/name").is_err());
    let err = c.to_path(&ResourceKey::cluster("Gizmo", "a")).unwrap_err();
    assert!(err.to_string().contains("unknown kind \"Gizmo\""), "{err}");
    let err = c
        .to_path(&ResourceKey::namespaced("IPPool", "ns", "a"))
        .unwrap_err();
    assert!(err.to_string().contains("cluster-scoped"), "{err}");
    assert!(PathCodec::new("nope", Arc::new(Registry::new())).is_err());
    assert!(PathCodec::new("/a//b", Arc::new(Registry::new())).is_err());
}
