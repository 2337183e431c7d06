use kvsync_model::Resource;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, Resource)]
#[resource(group = "example.com")]
struct Tenant<T> {
    owner: T,
}

fn main() {}
