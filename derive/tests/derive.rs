//! What `#[derive(Resource)]` writes: names, scope, defaults, schema and validation.

use kvsync_model::{Json, KindInfo, Registry, Resource, Validate};
use serde::{Deserialize, Serialize};

/// A kind with every attribute, a schema and rules.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, Resource)]
#[resource(
    group = "example.com",
    version = "v1beta1",
    kind = "Project",
    plural = "projects",
    namespaced,
    shortname = "proj",
    shortname = "prj"
)]
struct ProjectSpec {
    owner: String,
    #[serde(default)]
    quota: u32,
}

impl Validate for ProjectSpec {
    fn validate(&self) -> kvsync_model::Result<()> {
        if self.owner.is_empty() {
            return Err(kvsync_model::Error::invalid(
                "spec.owner",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

/// A kind with only its group: everything else defaults, no schema, no rules.
#[derive(Clone, Debug, Serialize, Deserialize, Resource)]
#[resource(group = "ops.example.com")]
struct Tenant {
    owner: String,
}

#[test]
fn attributes_become_the_kind_s_names_and_scope() {
    assert_eq!(ProjectSpec::KIND, "Project");
    assert_eq!(ProjectSpec::PLURAL, "projects");
    assert_eq!(ProjectSpec::GROUP, "example.com");
    assert_eq!(ProjectSpec::VERSION, "v1beta1");
    assert!(KindInfo::of::<ProjectSpec>().namespaced);
    assert_eq!(ProjectSpec::SHORT_NAMES, ["proj", "prj"]);
    let info = KindInfo::of::<ProjectSpec>();
    assert_eq!(info.api_version(), "example.com/v1beta1");
}

#[test]
fn defaults_are_the_type_name_v1_a_plain_plural_and_cluster_scope() {
    assert_eq!(Tenant::KIND, "Tenant");
    assert_eq!(Tenant::PLURAL, "tenants");
    assert_eq!(Tenant::VERSION, "v1");
    assert!(!KindInfo::of::<Tenant>().namespaced);
    assert!(Tenant::SHORT_NAMES.is_empty());
}

#[test]
fn the_schema_comes_from_json_schema_when_the_type_derives_it() {
    let schema = ProjectSpec::schema();
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["properties"]["owner"]["type"], "string");
    assert_eq!(schema["required"], serde_json::json!(["owner"]));
    assert_eq!(Tenant::schema(), kvsync_model::crd::any_object());
    let crd = kvsync_model::crd::crd(&KindInfo::of::<ProjectSpec>());
    assert_eq!(crd["metadata"]["name"], "projects.example.com");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
}

#[test]
fn validation_uses_the_validate_impl_when_there_is_one() {
    assert!(
        Resource::validate(&ProjectSpec {
            owner: "ann".into(),
            quota: 1
        })
        .is_ok()
    );
    let err = Resource::validate(&ProjectSpec {
        owner: String::new(),
        quota: 1,
    })
    .unwrap_err();
    assert!(err.to_string().contains("spec.owner"), "{err}");
    assert!(
        Resource::validate(&Tenant {
            owner: String::new()
        })
        .is_ok()
    );

    let registry = Registry::new().with::<ProjectSpec>().with::<Tenant>();
    let project = registry.kind("Project").unwrap();
    let bad = Json::from(serde_json::json!({"owner": ""}));
    assert!(project.validate(&bad).is_err());
    let wrong_type = Json::from(serde_json::json!({"owner": 5}));
    assert!(project.validate(&wrong_type).is_err());
    assert_eq!(registry.resolve("prj").unwrap().kind, "Project");
}
