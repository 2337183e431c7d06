use kvsync_model::Resource;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, Resource)]
#[resource(version = "v1", plural = "tenants")]
struct Tenant {
    owner: String,
}

fn main() {}
