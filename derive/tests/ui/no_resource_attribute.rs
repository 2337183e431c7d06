use kvsync_model::Resource;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, Resource)]
struct Tenant {
    owner: String,
}

fn main() {}
