//! `/v1/chat/completions` and `/v1/completions`, framed as vLLM's
//! `serving_chat.py` and `serving_completion.py` frame them: stream chunks
//! are pydantic dumps with `exclude_unset` (so only the fields vLLM sets, in
//! declaration order), whole answers are full dumps (so every null is there).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;

use super::ask::Ask;
use super::stream::{sse, text as completion_text, whole, Script, TokenFrame, DONE};
use super::{now_secs, Sim};

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

pub(super) async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(sim, Kind::Chat, headers, body).await
}

pub(super) async fn text(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(sim, Kind::Text, headers, body).await
}

async fn answer(sim: Arc<Sim>, kind: Kind, headers: HeaderMap, body: Bytes) -> Response {
    let (active, ask) = match Ask::begin(&sim, &headers, &body).await {
        Ok(begun) => begun,
        Err(resp) => return resp,
    };
    let id = sim.ids.next(match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Text => "cmpl-",
    });
    let created = now_secs();
    if ask.stream {
        return sse(
            script(kind, &id, created, &ask),
            ask.delay,
            ask.fault,
            active,
        );
    }
    ask.generate().await;
    let usage = Usage {
        prompt_tokens: ask.prompt_tokens,
        total_tokens: ask.prompt_tokens + ask.tokens,
        completion_tokens: ask.tokens,
        prompt_tokens_details: (),
    };
    let content = completion_text(ask.tokens);
    let json = match kind {
        Kind::Chat => serde_json::to_vec(&Whole {
            id: &id,
            object: "chat.completion",
            created,
            model: &ask.model,
            choices: [ChatChoice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: &content,
                    refusal: (),
                    annotations: (),
                    audio: (),
                    function_call: (),
                    tool_calls: [],
                    reasoning_content: (),
                },
                logprobs: (),
                finish_reason: ask.finish,
                stop_reason: (),
            }],
            service_tier: (),
            system_fingerprint: (),
            usage,
            prompt_logprobs: Some(()),
            kv_transfer_params: (),
        }),
        Kind::Text => serde_json::to_vec(&Whole {
            id: &id,
            object: "text_completion",
            created,
            model: &ask.model,
            choices: [TextChoice {
                index: 0,
                text: &content,
                logprobs: (),
                finish_reason: ask.finish,
                stop_reason: (),
                prompt_logprobs: (),
            }],
            service_tier: (),
            system_fingerprint: (),
            usage,
            prompt_logprobs: None,
            kv_transfer_params: (),
        }),
    };
    let json = json.expect("plain structs serialise");
    whole(json.into(), ask.fault, active).await
}

/// Every event of a streamed chat or text completion.
fn script(kind: Kind, id: &str, created: u64, ask: &Ask) -> Script {
    let model = serde_json::to_string(&ask.model).expect("a string serialises");
    let object = match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    // Every chunk of the answer starts with the same bytes.
    let head =
        format!("data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model},\"choices\":[");
    let finish = ask.finish;
    let (lead, frame) = match kind {
        Kind::Chat => (
            vec![Bytes::from(format!(
                "{head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            ))],
            TokenFrame {
                before: format!("{head}{{\"index\":0,\"delta\":{{\"content\":\""),
                after: "\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n".into(),
                last_after: format!(
                    "\"}},\"logprobs\":null,\"finish_reason\":\"{finish}\",\"stop_reason\":null}}]}}\n\n"
                ),
                seq: None,
            },
        ),
        Kind::Text => (
            Vec::new(),
            TokenFrame {
                before: format!("{head}{{\"index\":0,\"text\":\""),
                after: "\",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}]}\n\n".into(),
                last_after: format!(
                    "\",\"logprobs\":null,\"finish_reason\":\"{finish}\",\"stop_reason\":null}}]}}\n\n"
                ),
                seq: None,
            },
        ),
    };
    let mut tail = Vec::with_capacity(3);
    if ask.tokens == 0 {
        tail.push(frame.empty_last());
    }
    if ask.include_usage {
        let (prompt, completion) = (ask.prompt_tokens, ask.tokens);
        let total = prompt + completion;
        tail.push(Bytes::from(format!(
            "{head}],\"usage\":{{\"prompt_tokens\":{prompt},\"total_tokens\":{total},\"completion_tokens\":{completion}}}}}\n\n"
        )));
    }
    tail.push(Bytes::from_static(DONE));
    Script {
        lead,
        tokens: ask.tokens,
        frame,
        tail,
    }
}

#[derive(Serialize)]
struct Whole<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
    service_tier: (),
    system_fingerprint: (),
    usage: Usage,
    /// Chat answers have it (null), text completions not.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<()>,
    kv_transfer_params: (),
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: (),
    finish_reason: &'static str,
    stop_reason: (),
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: (),
    annotations: (),
    audio: (),
    function_call: (),
    tool_calls: [(); 0],
    reasoning_content: (),
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: (),
    finish_reason: &'static str,
    stop_reason: (),
    prompt_logprobs: (),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    prompt_tokens_details: (),
}
