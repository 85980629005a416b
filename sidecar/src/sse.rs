//! Watching an SSE byte stream go by without reframing it: find the response
//! id in the first event, the usage near the end, and the terminal event, so
//! the gateway can act before the client sees the end.
//!
//! Only complete events are inspected. Upstreams send one event per frame,
//! so the carry buffer for a split event is almost always empty; it is
//! bounded, and a stream whose events outgrow it is passed on unscanned.

use std::sync::LazyLock;

use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;

const MAX_CARRY: usize = 1 << 20;

static EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static DONE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"data: [DONE]"));
static EVENT_END_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"\n\n"));
/// The Responses API's terminal events (it sends no `[DONE]`).
static TERMINAL: LazyLock<[Finder<'static>; 3]> = LazyLock::new(|| {
    [
        Finder::new(b"event: response.completed"),
        Finder::new(b"event: response.incomplete"),
        Finder::new(b"event: response.failed"),
    ]
});
/// Matches only a non-null finish reason (vLLM sends `null` on every chunk).
static FINISH: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"finish_reason\":\""));

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Default)]
pub struct SseScan {
    carry: Vec<u8>,
    overflowed: bool,
    pub id: Option<String>,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    /// The terminal event (`[DONE]`, `response.completed`...) has passed.
    pub done: bool,
}

impl SseScan {
    /// Look at the next chunk. Cheap when the chunk holds whole events and
    /// none of them is interesting: a few SIMD substring searches.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.carry.is_empty() {
            match EVENT_END_REV.rfind(chunk) {
                Some(end) => {
                    self.inspect(&chunk[..end + 2]);
                    self.carry.extend_from_slice(&chunk[end + 2..]);
                }
                None => self.carry.extend_from_slice(chunk),
            }
        } else {
            // A split event: join it (the only copy, and only in this case).
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(chunk);
            if let Some(end) = EVENT_END_REV.rfind(&joined) {
                self.inspect(&joined[..end + 2]);
                joined.drain(..end + 2);
            }
            self.carry = joined;
        }
        if self.carry.len() > MAX_CARRY {
            self.carry = Vec::new();
            self.overflowed = true;
        }
    }

    fn inspect(&mut self, events: &[u8]) {
        let wants_id = self.id.is_none();
        let has_usage = USAGE.find(events).is_some();
        let terminal = TERMINAL.iter().any(|f| f.find(events).is_some());
        let finishing = FINISH.find(events).is_some();
        if wants_id || has_usage || terminal || finishing {
            for event in split_events(events) {
                self.inspect_event(event);
            }
        }
        if DONE.find(events).is_some() {
            self.done = true;
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
        if matches!(
            name,
            b"response.completed" | b"response.incomplete" | b"response.failed"
        ) {
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
            s.feed(c);
        }
        s
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
        s.feed(CHAT[0].as_bytes());
        s.feed(b"data: [DO");
        assert!(!s.done);
        s.feed(b"NE]\n");
        assert!(!s.done);
        s.feed(b"\n");
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
        s.feed(events[0].as_bytes());
        s.feed(events[1].as_bytes());
        assert_eq!(s.id.as_deref(), Some("resp_9"));
        assert!(!s.done);
        s.feed(events[2].as_bytes());
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
            s.feed(&big);
        }
        assert!(s.carry.capacity() <= MAX_CARRY * 2);
        s.feed(b"\n\ndata: [DONE]\n\n");
        assert!(!s.done, "an overflowed stream is not scanned any more");
    }
}
