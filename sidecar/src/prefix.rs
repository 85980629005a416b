//! Prefix-affinity keys: which part of a prompt decides where it goes.
//!
//! vLLM's automatic prefix caching reuses the KV blocks of a prompt's longest
//! cached prefix, so requests that share a long head should land on one pod.
//! The key is a hash of the prompt's *head*: the leading system (or developer)
//! messages and the first turn after them, cut at `keyBytes` (16 KiB by
//! default, about 4k tokens). Why this cut:
//!
//! - A conversation keeps its key as it grows: later turns come after the
//!   first one, outside the key, so every turn finds its history cached.
//! - Users sharing only a system prompt differ in their first turn, so they
//!   spread over the pods (each pod then holds the short shared prompt once,
//!   which is cheap) instead of all landing on one.
//! - Questions over one long document (in the system prompt or the first
//!   turn) share their first `keyBytes`, so they land together; at most
//!   `keyBytes` of shared head is recomputed per pod when keys differ.
//!
//! Bytes, not tokens: no tokenizer, and every replica gets the same bytes.
//! Hashing is lazy: validation records only where the pieces are in the body
//! (byte ranges); the key is hashed for routes that use it.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::Xxh3;

/// Where a request's prompt head is in its body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Source {
    /// Not a generation request (or no prompt): no key.
    #[default]
    None,
    /// Chat: (role, content span) of the leading system messages and the
    /// first message after them; at most `MAX_PARTS`.
    Messages(Vec<(Role, Range<usize>)>),
    /// Completions: the raw `prompt` value.
    Prompt(Range<usize>),
    /// Responses: the raw `instructions` (if any) and `input` values.
    Responses {
        instructions: Option<Range<usize>>,
        input: Range<usize>,
    },
}

/// The roles the key tells apart; the rest are "other".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    Other,
}

impl Role {
    pub fn of(role: &str) -> Role {
        match role {
            "system" | "developer" => Role::System,
            _ => Role::Other,
        }
    }
}

/// A chat head is this many messages at most (many system messages in a row
/// are unusual; past this, they are all part of the shared head anyway).
pub const MAX_PARTS: usize = 8;

/// Records the chat head from messages in order: the leading system
/// messages and the first other one.
#[derive(Default)]
pub struct HeadRecorder {
    parts: Vec<(Role, Range<usize>)>,
    done: bool,
}

impl HeadRecorder {
    pub fn push(&mut self, role: Role, span: Option<Range<usize>>) {
        if self.done {
            return;
        }
        if let Some(span) = span {
            self.parts.push((role, span));
        }
        self.done = role == Role::Other || self.parts.len() >= MAX_PARTS;
    }

    pub fn finish(self) -> Source {
        if self.parts.is_empty() {
            Source::None
        } else {
            Source::Messages(self.parts)
        }
    }
}

/// Hashes at most `cap` bytes of tagged pieces.
struct Capped {
    h: Xxh3,
    left: usize,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Capped {
            h: Xxh3::new(),
            left: cap,
        }
    }

    /// Feeds a piece after a one-byte tag (so pieces cannot run together
    /// into the same stream); false once the cap is reached.
    fn feed(&mut self, tag: u8, bytes: &[u8]) -> bool {
        if self.left == 0 {
            return false;
        }
        self.h.update(&[tag]);
        let take = bytes.len().min(self.left);
        self.h.update(&bytes[..take]);
        self.left -= take;
        self.left > 0
    }
}

/// The prefix key a route routes on: only `prefixAffinity` routes hash one.
pub fn route_key(route: &crate::table::Route, body: &[u8], source: &Source) -> Option<u64> {
    (route.strategy == crate::config::Strategy::PrefixAffinity)
        .then(|| key(body, source, route.prefix.key_bytes as usize))
        .flatten()
}

/// The key for `source` within `body`, hashing at most `cap` bytes; `None`
/// when the request has no prompt to key on.
pub fn key(body: &[u8], source: &Source, cap: usize) -> Option<u64> {
    let mut c = Capped::new(cap.max(1));
    match source {
        Source::None => return None,
        Source::Messages(parts) => {
            for (role, span) in parts {
                let tag = match role {
                    Role::System => b's',
                    Role::Other => b'u',
                };
                if !c.feed(tag, body.get(span.clone())?) {
                    break;
                }
            }
        }
        Source::Prompt(span) => {
            c.feed(b'p', body.get(span.clone())?);
        }
        Source::Responses {
            instructions,
            input,
        } => {
            if let Some(span) = instructions {
                if !c.feed(b'i', body.get(span.clone())?) {
                    return Some(c.h.digest());
                }
            }
            let input = body.get(input.clone())?;
            match input.first() {
                Some(b'[') => responses_items(&mut c, input)?,
                _ => {
                    c.feed(b'u', input);
                }
            }
        }
    }
    Some(c.h.digest())
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// A Responses `input` array: the leading system items and the first other
/// one, as for chat. Validation kept `input` raw (it checks only its first
/// byte), so its items are read here, only for routes that key on them.
fn responses_items(c: &mut Capped, input: &[u8]) -> Option<()> {
    let items: Vec<&RawValue> = serde_json::from_slice(input).ok()?;
    for raw in items.iter().take(MAX_PARTS) {
        let item: Item = serde_json::from_str(raw.get()).ok()?;
        let role = Role::of(item.role.as_deref().unwrap_or(""));
        // A message's content; any other item (a tool call, its output)
        // counts whole.
        let bytes = match (&item.kind.as_deref(), item.content) {
            (None | Some("message"), Some(content)) => content.get(),
            _ => raw.get(),
        };
        let tag = if role == Role::System { b's' } else { b'u' };
        if !c.feed(tag, bytes.as_bytes()) || role == Role::Other {
            break;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source validation would record for a chat body (test helper:
    /// finds each content by its text).
    fn chat(messages: &[(&str, &str)]) -> (Vec<u8>, Source) {
        let body = serde_json::to_vec(&serde_json::json!({
            "model": "m",
            "messages": messages.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect::<Vec<_>>(),
        }))
        .unwrap();
        let mut rec = HeadRecorder::default();
        let mut from = 0;
        for (role, content) in messages {
            let raw = serde_json::to_string(content).unwrap();
            let at = from + find(&body[from..], raw.as_bytes()).unwrap();
            rec.push(Role::of(role), Some(at..at + raw.len()));
            from = at + raw.len();
        }
        (body, rec.finish())
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    fn chat_key(messages: &[(&str, &str)], cap: usize) -> u64 {
        let (body, source) = chat(messages);
        key(&body, &source, cap).unwrap()
    }

    #[test]
    fn a_conversation_keeps_its_key_as_it_grows() {
        let system = "You are helpful. ".repeat(500); // ~8 KiB, shared by all
        let t1 = [
            ("system", system.as_str()),
            ("user", "plan my trip to Oslo"),
        ];
        let t3 = [
            t1[0],
            t1[1],
            ("assistant", "sure, when?"),
            ("user", "in May"),
        ];
        assert_eq!(chat_key(&t1, 16384), chat_key(&t3, 16384));
    }

    #[test]
    fn users_sharing_only_a_system_prompt_get_different_keys() {
        let system = "You are helpful. ".repeat(500);
        let a = chat_key(&[("system", &system), ("user", "plan my trip")], 16384);
        let b = chat_key(&[("system", &system), ("user", "fix my code")], 16384);
        assert_ne!(a, b);
    }

    #[test]
    fn questions_over_one_long_document_share_a_key() {
        let doc = "Clause 1. The party of the first part ... ".repeat(1000); // 43 KB
        let q = |question: &str| format!("{doc}\n\nQuestion: {question}");
        let a = chat_key(
            &[
                ("system", "Answer from the document."),
                ("user", &q("who?")),
            ],
            16384,
        );
        let b = chat_key(
            &[
                ("system", "Answer from the document."),
                ("user", &q("when?")),
            ],
            16384,
        );
        assert_eq!(a, b);
        // A short cap that ends inside the system prompt would lump
        // everything together; the default does not, for short turns.
        let c = chat_key(
            &[("system", "Answer from the document."), ("user", "hi")],
            16384,
        );
        assert_ne!(a, c);
    }

    #[test]
    fn roles_are_part_of_the_key() {
        let a = chat_key(&[("system", "x"), ("user", "y")], 100);
        let b = chat_key(&[("user", "x"), ("user", "y")], 100);
        assert_ne!(a, b);
    }

    #[test]
    fn the_head_stops_after_the_first_non_system_message() {
        let mut rec = HeadRecorder::default();
        rec.push(Role::System, Some(0..1));
        rec.push(Role::System, Some(1..2));
        rec.push(Role::Other, Some(2..3));
        rec.push(Role::Other, Some(3..4));
        assert_eq!(
            rec.finish(),
            Source::Messages(vec![
                (Role::System, 0..1),
                (Role::System, 1..2),
                (Role::Other, 2..3)
            ])
        );
        assert_eq!(HeadRecorder::default().finish(), Source::None);
    }

    #[test]
    fn completions_key_on_the_capped_prompt() {
        let body = br#"{"prompt":"abcdefgh-1"} {"prompt":"abcdefgh-2"}"#;
        let k = |r: Range<usize>, cap| key(body, &Source::Prompt(r), cap).unwrap();
        assert_eq!(k(10..22, 8), k(34..46, 8));
        assert_ne!(k(10..22, 64), k(34..46, 64));
    }

    #[test]
    fn responses_key_on_instructions_and_the_first_turn() {
        let key_of = |body: &str| {
            let input = body.find("\"input\":").unwrap() + 8;
            let end = body.rfind('}').unwrap();
            key(
                body.as_bytes(),
                &Source::Responses {
                    instructions: None,
                    input: input..end,
                },
                16384,
            )
            .unwrap()
        };
        let one =
            r#"{"input":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
        let two = r#"{"input":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"more"}]}"#;
        let other =
            r#"{"input":[{"role":"system","content":"be brief"},{"role":"user","content":"bye"}]}"#;
        assert_eq!(key_of(one), key_of(two));
        assert_ne!(key_of(one), key_of(other));
        // A string input is the whole first turn.
        let text = r#"{"input":"hello there"}"#;
        assert_ne!(key_of(text), key_of(one));
    }

    #[test]
    fn no_prompt_or_a_bad_span_gives_no_key() {
        assert_eq!(key(b"{}", &Source::None, 10), None);
        assert_eq!(key(b"{}", &Source::Prompt(1..99), 10), None);
    }

    /// The key from what validation records, end to end over real bodies.
    fn validated_key(endpoint: crate::validate::Endpoint, body: &serde_json::Value) -> u64 {
        let bytes = serde_json::to_vec(body).unwrap();
        let parsed = crate::validate::validate(endpoint, &bytes, 100).unwrap();
        key(&bytes, &parsed.prefix, 16384).unwrap()
    }

    #[test]
    fn validation_records_the_head_of_each_kind_of_request() {
        use crate::validate::Endpoint;
        use serde_json::json;
        let chat = |extra: &[serde_json::Value]| {
            let mut m = vec![
                json!({"role": "system", "content": "be kind"}),
                json!({"role": "user", "content": [{"type": "text", "text": "hi"}]}),
            ];
            m.extend_from_slice(extra);
            json!({"model": "m", "messages": m, "stream": true})
        };
        let grown = [
            json!({"role": "assistant", "content": null, "tool_calls": []}),
            json!({"role": "tool", "content": "42", "tool_call_id": "t"}),
        ];
        assert_eq!(
            validated_key(Endpoint::Chat, &chat(&[])),
            validated_key(Endpoint::Chat, &chat(&grown))
        );
        let responses = |instructions: &str| json!({"model": "m", "instructions": instructions, "input": "hello"});
        assert_ne!(
            validated_key(Endpoint::Responses, &responses("a")),
            validated_key(Endpoint::Responses, &responses("b"))
        );
        let completion = |p: &str| json!({"model": "m", "prompt": p});
        assert_ne!(
            validated_key(Endpoint::Completions, &completion("x")),
            validated_key(Endpoint::Completions, &completion("y"))
        );
        let bytes = br#"{"model":"m","input":"text to embed"}"#;
        let parsed = crate::validate::validate(Endpoint::Embeddings, bytes, 100).unwrap();
        assert_eq!(parsed.prefix, Source::None);
    }
}
