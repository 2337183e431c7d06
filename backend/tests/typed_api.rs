//! The typed `Api<R>` over a client: decode failures come beside the good items.

use std::sync::Arc;

use kvsync_backend::{Api, Client, MemoryBackend};
use kvsync_model::{KVPair, KindInfo, Registry, Resource, ResourceKey};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The typed view of kind `Tenant`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Resource)]
#[resource(group = "example.com", kind = "Tenant", plural = "tenants")]
#[serde(deny_unknown_fields)]
struct Tenant {
    owner: String,
}

#[tokio::test]
async fn a_list_hands_back_values_that_do_not_decode_beside_the_ones_that_do() {
    // Another writer stores tenants without the type's rules (an untyped kind of the same
    // name), so some stored values are not `Tenant`s.
    let untyped =
        Registry::new().with_kind(KindInfo::untyped("example.com", "Tenant", "tenants", false));
    let client: Arc<dyn Client> = Arc::new(MemoryBackend::new(untyped));
    for (name, value) in [
        ("good", json!({"owner": "ann"})),
        ("wrong-type", json!({"owner": 5})),
        ("extra-field", json!({"owner": "bob", "colour": "red"})),
        ("also-good", json!({"owner": "cy"})),
    ] {
        client
            .create(KVPair::new(ResourceKey::cluster("Tenant", name), value))
            .await
            .unwrap();
    }

    let list = Api::<Tenant>::all(client.clone()).list().await.unwrap();
    let names: Vec<_> = list.items.iter().map(|k| k.key.name.as_str()).collect();
    assert_eq!(names, ["also-good", "good"]);
    assert_eq!(
        list.items[1].value,
        Tenant {
            owner: "ann".into()
        }
    );

    let mut failed: Vec<_> = list
        .parse_failures
        .iter()
        .map(|f| (f.key.clone().unwrap().name, f.reason.clone()))
        .collect();
    failed.sort();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[0].0, "extra-field");
    assert!(failed[0].1.contains("colour"), "{}", failed[0].1);
    assert_eq!(failed[1].0, "wrong-type");
    assert!(failed[1].1.contains("not a Tenant"), "{}", failed[1].1);
    let raw = &list
        .parse_failures
        .iter()
        .find(|f| f.raw_key.ends_with("/wrong-type"))
        .unwrap();
    assert_eq!(raw.raw_key, "/kvsync/v1/tenants/wrong-type");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&raw.raw_value).unwrap(),
        json!({"owner": 5})
    );
    assert!(raw.revision.is_some());

    // One bad value fails a `get` of that key only.
    let tenants = Api::<Tenant>::all(client);
    assert!(tenants.get("wrong-type").await.is_err());
    assert_eq!(tenants.get("good").await.unwrap().value.owner, "ann");
    assert!(tenants.get_opt("absent").await.unwrap().is_none());
}
