//! The usage chunk a client did not ask for.
//!
//! The gateway always asks the upstream for usage on streams (quotas and
//! accounting need the token count), and removes the final usage event from
//! what a client that did not ask for it receives. Nothing else is touched:
//! events pass as whole byte ranges of the upstream chunks, and only the one
//! usage event is left out, so what comes out is the same whatever way the
//! upstream cut its chunks.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A partial event longer than this is passed on as it is.
const MAX_PENDING: usize = 1 << 20;

static EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static EVENT_END_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"\n\n"));
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\":"));

#[derive(Default)]
pub struct UsageStrip {
    /// The start of an event whose end has not arrived yet.
    pending: Vec<u8>,
}

impl UsageStrip {
    /// What of `chunk` to pass on: the whole events it completes, without a
    /// usage-only event. In the steady state (one event per chunk, no usage)
    /// this is the chunk itself, not a copy.
    pub fn filter(&mut self, chunk: Bytes) -> Bytes {
        self.filter_ref(&chunk).unwrap_or(chunk)
    }

    /// `filter` without taking the chunk: `None` when what passes is the
    /// chunk itself (whole events, no usage event), which costs no
    /// reference-count traffic on the per-frame path.
    pub fn filter_ref(&mut self, chunk: &Bytes) -> Option<Bytes> {
        if self.pending.is_empty() && chunk.ends_with(b"\n\n") && !mentions_usage_object(chunk) {
            return None;
        }
        Some(self.split(chunk.clone()))
    }

    fn split(&mut self, chunk: Bytes) -> Bytes {
        let data = if self.pending.is_empty() {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            Bytes::from(std::mem::take(&mut self.pending))
        };
        let whole_len = if data.ends_with(b"\n\n") {
            data.len()
        } else {
            EVENT_END_REV.rfind(&data).map_or(0, |i| i + 2)
        };
        let whole = data.slice(..whole_len);
        if let Some(tail) = data.get(whole_len..).filter(|t| !t.is_empty()) {
            if tail.len() > MAX_PENDING {
                // Not an event stream we understand: pass it on untouched.
                return data;
            }
            self.pending.extend_from_slice(tail);
        }
        if !mentions_usage_object(&whole) {
            return whole;
        }
        let mut out = BytesMut::with_capacity(whole.len());
        let mut rest = &whole[..];
        while let Some(i) = EVENT_END.find(rest) {
            let (event, tail) = rest.split_at(i + 2);
            if !is_usage_event(event) {
                out.extend_from_slice(event);
            }
            rest = tail;
        }
        out.freeze()
    }

    /// At the end of the upstream body: a trailing partial event, as it is.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }
}

/// `"usage":` followed by an object somewhere in `events` (cheap: one
/// vectorised search; JSON strings escape quotes, so content cannot match).
fn mentions_usage_object(events: &[u8]) -> bool {
    USAGE_KEY.find_iter(events).any(|i| {
        events
            .get(i + 8..)
            .and_then(|rest| rest.iter().find(|b| !b.is_ascii_whitespace()))
            == Some(&b'{')
    })
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

/// The event vLLM sends for `include_usage`: no choices, a usage object.
fn is_usage_event(event: &[u8]) -> bool {
    let mut data = None;
    for line in event.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"data:") {
            if data.is_some() {
                return false;
            }
            data = Some(v.trim_ascii());
        } else if !line.is_empty() {
            return false;
        }
    }
    let Some(data) = data else { return false };
    let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
        return false;
    };
    chunk.choices.is_some_and(|c| c.is_empty())
        && chunk.usage.is_some_and(|u| u.get().starts_with('{'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\":{\"}}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> String {
        let usage_event = STREAM.split_inclusive("\n\n").nth(2).unwrap();
        STREAM.replacen(usage_event, "", 1)
    }

    fn run(step: usize) -> String {
        let mut strip = UsageStrip::default();
        let mut out = Vec::new();
        for piece in STREAM.as_bytes().chunks(step) {
            out.extend_from_slice(&strip.filter(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&strip.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn removes_only_the_usage_event_whatever_the_chunking() {
        for step in 1..=STREAM.len() {
            assert_eq!(run(step), expected(), "chunks of {step}");
        }
    }

    #[test]
    fn a_chunk_without_usage_passes_as_the_same_bytes() {
        let mut strip = UsageStrip::default();
        let chunk = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n");
        let out = strip.filter(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out, chunk);
    }

    #[test]
    fn continuous_usage_on_content_chunks_is_kept() {
        let mut strip = UsageStrip::default();
        let chunk = Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
        );
        assert_eq!(strip.filter(chunk.clone()), chunk);
    }

    #[test]
    fn a_trailing_partial_event_comes_out_at_the_end() {
        let mut strip = UsageStrip::default();
        assert_eq!(strip.filter(Bytes::from_static(b"data: {\"a\"")), "");
        assert_eq!(strip.finish(), "data: {\"a\"");
    }
}
