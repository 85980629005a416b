//! Response bodies framed the way vLLM's OpenAI server frames them: chat and
//! text completion chunks (`data: {json}\n\n`, a usage chunk when asked,
//! `data: [DONE]\n\n`) and the Responses API's typed events.

use bytes::Bytes;
use serde_json::{json, Value};

pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// The completion text of token `i`.
pub fn token(i: usize) -> String {
    format!("tok{i} ")
}

pub fn text(n: usize) -> String {
    (0..n).map(token).collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Everything one streamed answer needs, formatted up front so each token
/// costs one small `format!`.
pub struct Framer {
    kind: Kind,
    head: String,
}

impl Framer {
    pub fn new(kind: Kind, id: &str, created: u64, model: &str) -> Framer {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let model = serde_json::to_string(model).expect("string serialises");
        Framer {
            kind,
            head: format!(
                "data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model},\"choices\":"
            ),
        }
    }

    /// The chat stream's opening chunk (role, empty content); none for text.
    pub fn first(&self) -> Option<Bytes> {
        (self.kind == Kind::Chat).then(|| {
            Bytes::from(format!(
                "{}[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n",
                self.head
            ))
        })
    }

    pub fn token(&self, i: usize, finish: Option<&str>) -> Bytes {
        let finish = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
        let tok = token(i);
        Bytes::from(match self.kind {
            Kind::Chat => format!(
                "{}[{{\"index\":0,\"delta\":{{\"content\":\"{tok}\"}},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n",
                self.head
            ),
            Kind::Completion => format!(
                "{}[{{\"index\":0,\"text\":\"{tok}\",\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null}}]}}\n\n",
                self.head
            ),
        })
    }

    pub fn usage(&self, prompt: usize, completion: usize) -> Bytes {
        Bytes::from(format!(
            "{}[],\"usage\":{{\"prompt_tokens\":{prompt},\"total_tokens\":{},\"completion_tokens\":{completion}}}}}\n\n",
            self.head,
            prompt + completion
        ))
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion})
}

pub fn chat_completion(
    id: &str,
    created: u64,
    model: &str,
    n: usize,
    finish: &str,
    prompt: usize,
) -> Value {
    json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text(n), "tool_calls": []},
                     "logprobs": null, "finish_reason": finish, "stop_reason": null}],
        "usage": usage(prompt, n),
        "prompt_logprobs": null,
    })
}

pub fn text_completion(
    id: &str,
    created: u64,
    model: &str,
    n: usize,
    finish: &str,
    prompt: usize,
) -> Value {
    json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text(n), "logprobs": null, "finish_reason": finish, "stop_reason": null}],
        "usage": usage(prompt, n),
    })
}

/// A Responses API `response` object.
pub struct ResponseDoc<'a> {
    pub id: &'a str,
    pub message_id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub previous: Option<&'a str>,
    pub prompt: usize,
}

impl ResponseDoc<'_> {
    pub fn message(&self, text: &str, status: &str) -> Value {
        let content = if status == "completed" {
            json!([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
        } else {
            json!([])
        };
        json!({"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content})
    }

    pub fn object(&self, status: &str, n: Option<usize>) -> Value {
        let output = match n {
            Some(n) => json!([self.message(&text(n), "completed")]),
            None => json!([]),
        };
        let usage = n.map(|n| {
            json!({
                "input_tokens": self.prompt, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt + n,
            })
        });
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "usage": usage,
            "previous_response_id": self.previous, "parallel_tool_calls": true,
            "tool_choice": "auto", "tools": [], "temperature": 1.0, "top_p": 1.0,
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
            "incomplete_details": null, "error": null, "instructions": null,
            "max_output_tokens": null, "reasoning": null, "store": true, "user": null,
        })
    }
}

/// `event: <type>\ndata: {json with type and sequence_number}\n\n`
pub fn typed_event(seq: &mut u64, kind: &str, mut data: Value) -> Bytes {
    data["type"] = json!(kind);
    data["sequence_number"] = json!(*seq);
    *seq += 1;
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}
