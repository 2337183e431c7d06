//! Any bytes given as a manifest are read or refused within the limits, never a panic.
#![no_main]

use kvsync_cli::manifest::{Limits, parse};
use kvsync_model::PathCodec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let codec = PathCodec::with_registry(kvsync_model::demo::registry());
    let limits = Limits {
        file_bytes: 1 << 20,
        documents: 100,
        depth: 64,
        expanded_bytes: 1 << 20,
        string_bytes: 1 << 16,
        value_bytes: 1 << 20,
    };
    if let Ok((docs, _)) = parse(&codec, "fuzz.yaml", text, &limits) {
        for doc in docs {
            // What was accepted is a valid key and a JSON object.
            assert!(codec.validate(&doc.kvp.key).is_ok());
            assert!(doc.kvp.value.is_object());
        }
    }
});
