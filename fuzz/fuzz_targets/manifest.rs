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
    let limits = Limits::default();
    if let Ok((docs, _)) = parse(&codec, "fuzz.yaml", text, &limits) {
        for doc in docs {
            // What was accepted is a valid key and a JSON object.
            assert!(codec.validate(&doc.kvp.key).is_ok());
            assert!(doc.kvp.value.is_object());
        }
    }
});
