use kvsync_model::Resource;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, Resource)]
#[resource(group = "Example_Com")]
struct Tenant {
    owner: String,
}

fn main() {}
