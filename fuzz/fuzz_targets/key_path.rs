//! Any string given as a datastore path or a CIDR is parsed or refused, never a panic; what
//! parses round-trips.
#![no_main]

use kvsync_model::PathCodec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &str| {
    let codec = PathCodec::with_registry(kvsync_model::demo::registry());
    if let Ok(key) = codec.from_path(data) {
        assert_eq!(codec.to_path(&key).ok().as_deref(), Some(data));
    }
    let _ = kvsync_model::validation::parse_cidr("spec.cidr", data);
});
