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

pub(crate) static DONE_AFTER_EVENT: LazyLock<Finder<'static>> =
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
        self.feed_counted(chunk, None);
    }

    /// `feed`, told how many events end in `chunk` (the caller counted
    /// them already), which spares a search in the steady state.
    pub fn feed_counted(&mut self, chunk: &Bytes, event_ends: Option<u64>) {
        if self.overflowed || self.done {
            return;
        }
        if self.carry.is_empty() {
            if chunk.ends_with(b"\n\n") {
                return self.complete(chunk.clone(), event_ends.map(|n| n == 1));
            }
            match EVENT_END_REV.rfind(chunk) {
                Some(end) => {
                    self.complete(chunk.slice(..end + 2), None);
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
                self.complete(region, None);
            }
        }
        if self.carry.len() > MAX_CARRY {
            self.carry = Vec::new();
            self.overflowed = true;
        }
    }

    /// One or more whole events; `single`: whether it is one, if known.
    fn complete(&mut self, region: Bytes, single: Option<bool>) {
        // One event per region is the steady state; then `[DONE]` can only
        // be at its start or end, and the search for it after another
        // event is spared.
        let single =
            single.unwrap_or_else(|| memchr::memchr(b'\n', &region) == Some(region.len() - 2));
        // A region starts at an event boundary, so `[DONE]` is an event of
        // its own only at the start or right after a blank line (not after
        // other bytes on its line, which a region's end alone would match).
        let done = after_blank_lines(&region).starts_with(DONE_EVENT)
            || (!single && DONE_AFTER_EVENT.find(&region).is_some());
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

    /// Reads events up to the terminal one: what follows it in the same
    /// region is never passed on, so it says nothing of this answer (and
    /// the findings stay the same however the stream was cut).
    fn inspect(&mut self, events: &[u8]) {
        let done = &DONE_EVENT[..DONE_EVENT.len() - 2];
        for event in split_events(events) {
            self.inspect_event(event);
            if self.done || after_blank_lines(event) == done {
                break;
            }
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

/// `b` without the blank lines it starts with: a region begins at the
/// last of a run of newlines, so an event may begin with the rest of them.
pub(crate) fn after_blank_lines(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&c| c == b'\n').count();
    &b[n..]
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
///
/// Read by looking for three keys instead of parsing the answer (whose
/// text is most of its bytes): a JSON string escapes its quotes, so
/// `"usage":` or `"finish_reason":` in the bytes is a key, never content.
/// The id must be the object's first member, as vLLM and OpenAI write it;
/// any other shape is parsed in full.
pub fn scan_json(body: &[u8]) -> SseScan {
    let mut scan = SseScan {
        done: true,
        ..SseScan::default()
    };
    let Some(id) = leading_id(body) else {
        return parse_json(body);
    };
    scan.id = Some(id);
    // The last `"usage"` that is a key (a value `"usage"` has no colon).
    let mut end = body.len();
    while let Some(i) = USAGE_KEY_REV.rfind(&body[..end]) {
        if let Some(value) = member_value(&body[i + USAGE_KEY.len()..]) {
            scan.usage = serde_json::from_slice::<WireUsage>(value)
                .ok()
                .map(Into::into);
            break;
        }
        end = i;
    }
    scan.finish_reason = FINISH_KEY.find_iter(body).find_map(|i| {
        let value = member_value(&body[i + FINISH_KEY.needle().len()..])?;
        serde_json::from_slice::<Option<String>>(value)
            .ok()
            .flatten()
    });
    scan
}

/// The same, by parsing the whole answer.
fn parse_json(body: &[u8]) -> SseScan {
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

const USAGE_KEY: &[u8] = b"\"usage\"";
static USAGE_KEY_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(USAGE_KEY));
static FINISH_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"finish_reason\""));

/// After a quoted key: its value, if a colon follows (else it was a value).
fn member_value(after_key: &[u8]) -> Option<&[u8]> {
    let rest = skip_ws(after_key).strip_prefix(b":")?;
    Some(json_value_at(rest))
}

/// The value of `{"id": "..."` when `id` is the first member and a plain
/// string (no escapes).
fn leading_id(body: &[u8]) -> Option<String> {
    let rest = skip_ws(body).strip_prefix(b"{")?;
    let rest = skip_ws(rest).strip_prefix(b"\"id\"")?;
    let rest = skip_ws(skip_ws(rest).strip_prefix(b":")?).strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
}

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .unwrap_or(b.len());
    &b[n..]
}

/// The JSON value that starts `b` (after whitespace): an object up to its
/// matching brace, else up to the next `,` or `}` (scalars). Strings inside
/// an object are stepped over, so braces in them do not count.
fn json_value_at(b: &[u8]) -> &[u8] {
    let b = skip_ws(b);
    if b.first() != Some(&b'{') {
        let end = memchr::memchr2(b',', b'}', b).unwrap_or(b.len());
        return &b[..end];
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate() {
        match (in_string, c) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (true, b'"') => in_string = false,
            (true, _) => {}
            (false, b'"') => in_string = true,
            (false, b'{') => depth += 1,
            (false, b'}') => {
                depth -= 1;
                if depth == 0 {
                    return &b[..=i];
                }
            }
            _ => {}
        }
    }
    b
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

    /// `[DONE]` is the terminal event only as an event of its own, and the
    /// findings do not depend on where the stream was cut (fuzz finds).
    #[test]
    fn done_is_an_event_of_its_own_however_the_stream_is_cut() {
        let streams: [&[u8]; 3] = [
            // Other bytes before `data: [DONE]` on its line: not terminal.
            b"xxdata: [DONE]\n\ndata: {\"id\":\"a\"}\n\n",
            // A third newline before it: still its own event.
            b"data: {\"id\":\"b\"}\n\n\ndata: [DONE]\n\ndata: {\"id\":\"late\"}\n\n",
            // Events after `[DONE]` in the same read say nothing.
            b"data: [DONE]\n\ndata: {\"id\":\"late\"}\n\n",
        ];
        for stream in streams {
            let whole = scan_chunks([stream]);
            for step in 1..stream.len() {
                let cut = scan_chunks(stream.chunks(step));
                assert_eq!((whole.done, &whole.id), (cut.done, &cut.id), "step {step}");
            }
        }
        assert!(!scan_chunks([streams[0]]).done);
        let b = scan_chunks([streams[1]]);
        assert!(b.done);
        assert_eq!(b.id.as_deref(), Some("b"));
        assert_eq!(scan_chunks([streams[2]]).id, None);
    }

    /// The key search reads what a full parse reads, on the shapes upstreams
    /// send and on the ones built to fool it.
    #[test]
    fn scanning_a_json_answer_agrees_with_parsing_it() {
        let answers = [
            // vLLM's chat answer, as the simulator writes it.
            r#"{"id":"chatcmpl-a2f4","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"tok0 "},"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":1,"total_tokens":4,"completion_tokens":3,"prompt_tokens_details":null},"prompt_logprobs":null}"#,
            // Content that spells the keys (escaped, so not keys).
            r#"{"id":"c1","choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":99} and \"finish_reason\":\"x\" {"},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#,
            // Two choices, the first unfinished; whitespace everywhere.
            r#"{ "id" : "c2" ,
              "choices": [{"finish_reason": null}, {"finish_reason" : "stop"}],
              "usage" : { "prompt_tokens" : 2 , "completion_tokens" : 3 } }"#,
            // The Responses API's names.
            r#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":11,"output_tokens":4,"total_tokens":15}}"#,
            // The id not first: parsed in full.
            r#"{"object":"chat.completion","choices":[{"message":{"tool_calls":[{"id":"call_1"}]},"finish_reason":"tool_calls"}],"id":"c3"}"#,
            // An id with an escape: parsed in full.
            r#"{"id":"c\u0034","choices":[]}"#,
            // "usage" also as a value, after the member; usage null.
            r#"{"id":"c6","usage":{"prompt_tokens":1,"completion_tokens":2},"kind":"usage"}"#,
            r#"{"id":"c7","choices":[{"finish_reason":"stop"}],"usage":null}"#,
            // No usage, no choices; not JSON at all.
            r#"{"id":"c5"}"#,
            "upstream error page",
        ];
        for a in answers {
            let (fast, full) = (scan_json(a.as_bytes()), parse_json(a.as_bytes()));
            assert_eq!(fast.id, full.id, "{a}");
            assert_eq!(fast.usage, full.usage, "{a}");
            assert_eq!(fast.finish_reason, full.finish_reason, "{a}");
        }
        assert_eq!(scan_json(answers[4].as_bytes()).id.as_deref(), Some("c3"));
        assert_eq!(
            scan_json(answers[1].as_bytes()).usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7
            })
        );
    }

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
