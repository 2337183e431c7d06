use kvsync_model::Resource;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, Resource)]
#[resource(group = "example.com", plural = "Tenant_List")]
struct Tenant {
    owner: String,
}

fn main() {}
