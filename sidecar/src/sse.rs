//! Watching an SSE byte stream go by without reframing it: find the response
//! id in the first event, the usage near the end, and the terminal event, so
//! the gateway can act before the client sees the end.
//!
//! Only complete events are inspected. Upstreams send one event per frame,
//! so the carry buffer for a split event is almost always empty; it is
//! bounded, and a stream whose events outgrow it is passed on unscanned.

use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;

const MAX_CARRY: usize = 1 << 20;
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

static DONE_AFTER_EVENT: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\n\ndata: [DONE]\n\n"));
static EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static EVENT_END_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"\n\n"));

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Per chunk, in the steady state, this costs two `ends_with` checks and a
/// reference-count bump: JSON is parsed only for the first event (the id)
/// and, once the terminal event arrives, for the last few events (usage and
/// finish reason live there).
#[derive(Default)]
pub struct SseScan {
    carry: Vec<u8>,
    overflowed: bool,
    /// The last two complete regions, kept by reference (no copy) so the
    /// usage and finish reason can be read once the end is known.
    recent: [Bytes; 2],
    pub id: Option<String>,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    /// The terminal event (`[DONE]`, `response.completed`...) has passed.
    pub done: bool,
}

impl SseScan {
    pub fn feed(&mut self, chunk: &Bytes) {
        if self.overflowed || self.done {
            return;
        }
        if self.carry.is_empty() {
            if chunk.ends_with(b"\n\n") {
                return self.complete(chunk.clone());
            }
            match EVENT_END_REV.rfind(chunk) {
                Some(end) => {
                    self.complete(chunk.slice(..end + 2));
                    self.carry.extend_from_slice(&chunk[end + 2..]);
                }
                None => self.carry.extend_from_slice(chunk),
            }
        } else {
            // A split event: join it (the only copy, and only in this case).
            self.carry.extend_from_slice(chunk);
            if let Some(end) = EVENT_END_REV.rfind(&self.carry) {
                let region = Bytes::copy_from_slice(&self.carry[..end + 2]);
                self.carry.drain(..end + 2);
                self.complete(region);
            }
        }
        if self.carry.len() > MAX_CARRY {
            self.carry = Vec::new();
            self.overflowed = true;
        }
    }

    /// One or more whole events.
    fn complete(&mut self, region: Bytes) {
        // `[DONE]` ends the region, or (rarely) the upstream sent more after
        // it in the same chunk.
        let done = region.ends_with(DONE_EVENT)
            || region.starts_with(DONE_EVENT)
            || DONE_AFTER_EVENT.find(&region).is_some();
        let typed_end = !done && region.starts_with(b"event:") && ends_with_terminal(&region);
        if done {
            for earlier in std::mem::take(&mut self.recent) {
                self.inspect(&earlier);
            }
        }
        if self.id.is_none() || done || typed_end {
            self.inspect(&region);
        }
        self.done |= done;
        self.recent = [std::mem::take(&mut self.recent[1]), region];
    }

    fn inspect(&mut self, events: &[u8]) {
        for event in split_events(events) {
            self.inspect_event(event);
        }
    }

    fn inspect_event(&mut self, event: &[u8]) {
        let mut name: &[u8] = b"";
        let mut data: &[u8] = b"";
        for line in event.split(|&b| b == b'\n') {
            if let Some(v) = line.strip_prefix(b"event:") {
                name = v.trim_ascii();
            } else if let Some(v) = line.strip_prefix(b"data:") {
                data = v.trim_ascii();
            }
        }
        if is_terminal(name) {
            self.done = true;
        }
        if data.first() != Some(&b'{') {
            return;
        }
        let Ok(parsed) = serde_json::from_slice::<EventData>(data) else {
            return;
        };
        if self.id.is_none() {
            self.id = parsed
                .id
                .or_else(|| parsed.response.as_ref().and_then(|r| r.id.clone()));
        }
        if let Some(reason) = parsed
            .choices
            .iter()
            .find_map(|c| c.finish_reason.as_deref())
        {
            self.finish_reason = Some(reason.to_owned());
        }
        if let Some(u) = parsed
            .usage
            .or_else(|| parsed.response.and_then(|r| r.usage))
        {
            self.usage = Some(u.into());
        }
    }
}

/// The Responses API's terminal events (it sends no `[DONE]`).
fn is_terminal(name: &[u8]) -> bool {
    matches!(
        name,
        b"response.completed" | b"response.incomplete" | b"response.failed"
    )
}

/// Whether the last event of a region of typed events is a terminal one;
/// searches backwards, so it touches only that last event.
fn ends_with_terminal(region: &[u8]) -> bool {
    let body = &region[..region.len() - 2];
    let start = EVENT_END_REV.rfind(body).map_or(0, |i| i + 2);
    let first_line = body[start..].split(|&b| b == b'\n').next().unwrap_or(b"");
    first_line
        .strip_prefix(b"event:")
        .is_some_and(|n| is_terminal(n.trim_ascii()))
}

fn split_events(events: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match EVENT_END.find(rest) {
            Some(i) => {
                let (event, tail) = rest.split_at(i);
                rest = &tail[2..];
                Some(event)
            }
            None => Some(std::mem::take(&mut rest)),
        }
    })
}

#[derive(Deserialize)]
struct EventData {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    response: Option<ResponseObject>,
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    finish_reason: Option<String>,
}

/// Chat/completions name tokens `prompt_/completion_`, Responses `input_/output_`.
#[derive(Deserialize)]
pub(crate) struct WireUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: u64,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        }
    }
}

/// What a non-streamed JSON response body says about itself.
pub fn scan_json(body: &[u8]) -> SseScan {
    let mut scan = SseScan {
        done: true,
        ..SseScan::default()
    };
    if let Ok(d) = serde_json::from_slice::<EventData>(body) {
        scan.id = d.id;
        scan.finish_reason = d.choices.into_iter().find_map(|c| c.finish_reason);
        scan.usage = d.usage.map(Into::into);
    }
    scan
}

/// One SSE frame carrying an OpenAI error body; ends a stream that failed
/// after the client already got its headers.
pub fn error_frame(message: String, code: &str) -> bytes::Bytes {
    let json = crate::error::error_json(message, "server_error", code);
    let mut frame = Vec::with_capacity(json.len() + 8);
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(&json);
    frame.extend_from_slice(b"\n\n");
    frame.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &[&str] = &[
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"total_tokens\":5,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    ];

    fn scan_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> SseScan {
        let mut s = SseScan::default();
        for c in chunks {
            s.feed(&Bytes::copy_from_slice(c));
        }
        s
    }

    fn feed(s: &mut SseScan, chunk: &[u8]) {
        s.feed(&Bytes::copy_from_slice(chunk));
    }

    fn expect_chat(s: &SseScan) {
        assert_eq!(s.id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2
            })
        );
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        assert!(s.done);
    }

    #[test]
    fn finds_id_usage_and_done_in_aligned_frames() {
        let s = scan_chunks(CHAT.iter().map(|c| c.as_bytes()));
        expect_chat(&s);
    }

    #[test]
    fn same_result_whatever_the_chunking() {
        let all: Vec<u8> = CHAT.concat().into_bytes();
        for size in [1, 2, 3, 7, 64, all.len()] {
            let s = scan_chunks(all.chunks(size));
            expect_chat(&s);
        }
    }

    #[test]
    fn done_is_seen_only_when_its_event_is_complete() {
        let mut s = SseScan::default();
        feed(&mut s, CHAT[0].as_bytes());
        feed(&mut s, b"data: [DO");
        assert!(!s.done);
        feed(&mut s, b"NE]\n");
        assert!(!s.done);
        feed(&mut s, b"\n");
        assert!(s.done);
    }

    #[test]
    fn responses_api_events() {
        let events = [
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_9\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_9\",\"usage\":{\"input_tokens\":4,\"output_tokens\":1,\"total_tokens\":5}}}\n\n",
        ];
        let mut s = SseScan::default();
        feed(&mut s, events[0].as_bytes());
        feed(&mut s, events[1].as_bytes());
        assert_eq!(s.id.as_deref(), Some("resp_9"));
        assert!(!s.done);
        feed(&mut s, events[2].as_bytes());
        assert!(s.done);
        assert_eq!(s.usage.unwrap().completion_tokens, 1);
    }

    #[test]
    fn malformed_events_are_ignored_not_fatal() {
        let s = scan_chunks([
            b"data: {not json\n\n".as_slice(),
            CHAT[0].as_bytes(),
            b"data: [DONE]\n\n",
        ]);
        assert_eq!(s.id.as_deref(), Some("chatcmpl-1"));
        assert!(s.done);
    }

    #[test]
    fn carry_is_bounded() {
        let mut s = SseScan::default();
        let big = vec![b'x'; 64 * 1024];
        for _ in 0..20 {
            feed(&mut s, &big);
        }
        assert!(s.carry.capacity() <= MAX_CARRY * 2);
        feed(&mut s, b"\n\ndata: [DONE]\n\n");
        assert!(!s.done, "an overflowed stream is not scanned any more");
    }
}
