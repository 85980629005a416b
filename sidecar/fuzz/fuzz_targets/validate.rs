//! Request validation and alias rewriting on arbitrary bodies: a result or a
//! 4xx, never a panic; a rewritten body is still valid JSON with the new model.
#![no_main]

use bytes::Bytes;
use infergate_sidecar::validate::{validate, with_model, Endpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses] {
        if let Ok(parsed) = validate(endpoint, data, 64) {
            let body = Bytes::copy_from_slice(data);
            let out = with_model(&body, &parsed, "up/stream-model");
            let again = validate(endpoint, &out, 64).expect("rewritten body stays valid");
            assert_eq!(again.model, "up/stream-model");
        }
    }
});
