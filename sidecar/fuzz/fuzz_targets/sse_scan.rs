//! SSE framing on arbitrary bytes cut at arbitrary points: never a panic,
//! and the same findings whatever the cuts. The same bytes read as a
//! non-streamed answer (key search, not a parse): never a panic either.
#![no_main]

use bytes::Bytes;
use infergate_sidecar::sse::{scan_json, SseScan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let answer = scan_json(stream);
    assert!(answer.done);
    let mut whole = SseScan::default();
    whole.feed(&Bytes::copy_from_slice(stream));
    let mut cut = SseScan::default();
    for chunk in stream.chunks(step) {
        cut.feed(&Bytes::copy_from_slice(chunk));
    }
    if !(whole.done && cut.done) {
        return;
    }
    assert_eq!(whole.id, cut.id);
});
