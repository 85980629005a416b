//! The body the upstream gets, made by splicing the client's bytes: the
//! model value replaced, usage asked for, nothing else touched.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::Parsed;
use crate::upstream::Chunks;

/// The body the upstream gets: the client's bytes with the model value
/// replaced and, when asked, usage requested. Splices only: every other byte
/// stays as the client wrote it (no re-serialising, whatever the escapes),
/// and is sent as slices of the client's buffer (no copy).
pub fn upstream_body(
    body: &Bytes,
    parsed: &Parsed,
    upstream_model: &str,
    ask_usage: bool,
) -> Chunks {
    let usage = parsed.usage_edit.as_ref().filter(|_| ask_usage);
    let rename = parsed.model != upstream_model;
    if usage.is_none() && !rename {
        return Chunks::one(body.clone());
    }
    let mut edits: [Option<(Range<usize>, Bytes)>; 2] = [None, None];
    if rename {
        let value = if parsed.model_in_form {
            Bytes::copy_from_slice(upstream_model.as_bytes())
        } else {
            json_string(upstream_model)
        };
        edits[0] = Some((parsed.model_span.clone(), value));
    }
    if let Some(u) = usage {
        edits[1] = Some((u.range.clone(), Bytes::from_static(u.text.as_bytes())));
    }
    if let [Some(a), Some(b)] = &edits {
        if b.0.start < a.0.start {
            edits.swap(0, 1);
        }
    }
    let mut parts: [Bytes; 5] = Default::default();
    let mut n = 0;
    let mut at = 0;
    for (range, text) in edits.into_iter().flatten() {
        // Spans come from this very body; one that does not fit would be a
        // bug, and then the client's bytes go on unchanged, not a panic.
        if at > range.start || range.start > range.end || range.end > body.len() {
            return Chunks::one(body.clone());
        }
        parts[n] = body.slice(at..range.start);
        parts[n + 1] = text;
        n += 2;
        at = range.end;
    }
    parts[n] = body.slice(at..);
    Chunks::from_parts(parts)
}

/// `s` as a JSON string literal; without escapes to make (a model name
/// nearly always), no serializer is involved.
fn json_string(s: &str) -> Bytes {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        let mut out = BytesMut::with_capacity(s.len() + 2);
        out.extend_from_slice(b"\"");
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\"");
        return out.freeze();
    }
    Bytes::from(serde_json::Value::String(s.to_owned()).to_string())
}

/// The body with only the model replaced.
pub fn with_model(body: &Bytes, parsed: &Parsed, upstream_model: &str) -> Bytes {
    upstream_body(body, parsed, upstream_model, false).concat()
}
