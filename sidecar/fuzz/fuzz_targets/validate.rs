//! Request validation and the upstream rewrite on arbitrary bodies: a result
//! or a 4xx, never a panic; a rewritten body differs from the client's only
//! in the model value (and, for streams, the one request for usage).
#![no_main]

use bytes::Bytes;
use infergate_sidecar::validate::{upstream_body, validate, Endpoint};
use libfuzzer_sys::fuzz_target;

const UP: &str = "up/stream-\"model\"";

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses] {
        let Ok(parsed) = validate(endpoint, data, 64) else {
            continue;
        };
        let body = Bytes::copy_from_slice(data);
        let quoted = serde_json::to_string(UP).unwrap();
        // The model alone: exactly the client's bytes around the new value.
        let renamed = upstream_body(&body, &parsed, UP, false).concat();
        let span = parsed.model_span.clone();
        let expected = [&data[..span.start], quoted.as_bytes(), &data[span.end..]].concat();
        assert_eq!(&renamed[..], &expected[..]);
        // With usage asked for: still valid, same model, usage on for streams.
        let out = upstream_body(&body, &parsed, UP, true).concat();
        let again = validate(endpoint, &out, 64).expect("rewritten body stays valid");
        assert_eq!(again.model, UP);
        if parsed.usage_edit.is_some() {
            assert!(again.include_usage && again.usage_edit.is_none());
        } else {
            assert_eq!(out, renamed);
        }
    }
});
