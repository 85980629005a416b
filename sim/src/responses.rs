//! `/v1/responses`, as vLLM's `serving_responses.py` serves it: typed SSE
//! events (`event: <type>\ndata: {..., "sequence_number": n, "type": ...}`,
//! with the OpenAI event types' field order and no `[DONE]`), and answers
//! kept on the server that produced them, so a `previous_response_id` made
//! elsewhere is a 404. The gateway's sticky routing exists because of this.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::ask::Ask;
use super::stream::{sse, text as completion_text, whole, Script, TokenFrame};
use super::{error_with_param, now_secs, Sim};

/// Answers kept for `previous_response_id` and `GET`: the last 10 000.
const CAPACITY: usize = 10_000;

#[derive(Default)]
pub(super) struct Store {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Stored>,
    /// Insertion order, for eviction.
    order: VecDeque<String>,
}

#[derive(Clone)]
struct Stored {
    /// The `response` object as sent, so a look-up re-serialises nothing.
    json: Bytes,
    /// The conversation so far, which the next turn's prompt includes.
    total_tokens: usize,
}

impl Store {
    fn get(&self, id: &str) -> Option<Stored> {
        self.lock().by_id.get(id).cloned()
    }

    fn put(&self, id: String, stored: Stored) {
        let mut inner = self.lock();
        inner.order.push_back(id.clone());
        inner.by_id.insert(id, stored);
        while inner.order.len() > CAPACITY {
            if let Some(old) = inner.order.pop_front() {
                inner.by_id.remove(&old);
            }
        }
    }

    fn remove(&self, id: &str) -> bool {
        self.lock().by_id.remove(id).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned map is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) async fn create(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (active, ask) = match Ask::begin(&sim, &headers, &body).await {
        Ok(begun) => begun,
        Err(resp) => return resp,
    };
    let history = match &ask.previous_response_id {
        None => 0,
        Some(prev) => match sim.responses.get(prev) {
            Some(stored) => stored.total_tokens,
            None => {
                active.finish();
                return not_found(prev);
            }
        },
    };
    let (id, message_id) = (sim.ids.next("resp_"), sim.ids.next("msg_"));
    let text = completion_text(ask.tokens);
    let answer = Answer {
        id: &id,
        message_id: &message_id,
        created_at: now_secs(),
        ask: &ask,
        input_tokens: history + ask.prompt_tokens,
        text: &text,
    };
    let done = Bytes::from(to_json(&answer.object(true)));
    if ask.store {
        let total_tokens = answer.input_tokens + ask.tokens;
        let json = done.clone();
        sim.responses.put(id.clone(), Stored { json, total_tokens });
    }
    if ask.stream {
        return sse(answer.script(), ask.delay, ask.fault, active);
    }
    ask.generate().await;
    whole(done, ask.fault, active).await
}

/// `GET /v1/responses/{id}`, and `POST .../cancel` (too late to cancel
/// anything here: it answers with the finished response).
pub(super) async fn fetch(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match sim.responses.get(&id) {
        Some(stored) => ([(header::CONTENT_TYPE, "application/json")], stored.json).into_response(),
        None => not_found(&id),
    }
}

pub(super) async fn delete(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    #[derive(Serialize)]
    struct Deleted {
        id: String,
        object: &'static str,
        deleted: bool,
    }
    if !sim.responses.remove(&id) {
        return not_found(&id);
    }
    let object = "response";
    Json(Deleted {
        id,
        object,
        deleted: true,
    })
    .into_response()
}

fn not_found(id: &str) -> Response {
    let message = format!("Response with id '{id}' not found.");
    error_with_param(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        &message,
        Some("response_id"),
    )
}

/// One answer, in the shapes its events need.
struct Answer<'a> {
    id: &'a str,
    message_id: &'a str,
    created_at: u64,
    ask: &'a Ask,
    input_tokens: usize,
    text: &'a str,
}

impl Answer<'_> {
    /// Cut by `max_output_tokens`: OpenAI's `incomplete` status.
    fn incomplete(&self) -> bool {
        self.ask.finish == "length"
    }

    fn status(&self) -> &'static str {
        if self.incomplete() {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn message(&self, done: bool) -> Message<'_> {
        Message {
            id: self.message_id,
            content: if done {
                vec![self.part(self.text)]
            } else {
                Vec::new()
            },
            role: "assistant",
            status: if done { self.status() } else { "in_progress" },
            kind: "message",
        }
    }

    fn part<'t>(&self, text: &'t str) -> Part<'t> {
        Part {
            annotations: [],
            text,
            kind: "output_text",
        }
    }

    fn object(&self, done: bool) -> Object<'_> {
        let ask = self.ask;
        Object {
            id: self.id,
            created_at: self.created_at,
            incomplete_details: (done && self.incomplete()).then_some(Incomplete {
                reason: "max_output_tokens",
            }),
            instructions: (),
            metadata: (),
            model: &ask.model,
            object: "response",
            output: if done {
                vec![self.message(true)]
            } else {
                Vec::new()
            },
            parallel_tool_calls: true,
            temperature: 1.0,
            tool_choice: "auto",
            tools: [],
            top_p: 1.0,
            background: false,
            max_output_tokens: ask.max_tokens,
            max_tool_calls: (),
            previous_response_id: ask.previous_response_id.as_deref(),
            prompt: (),
            reasoning: (),
            service_tier: "auto",
            status: if done { self.status() } else { "in_progress" },
            text: (),
            top_logprobs: (),
            truncation: "disabled",
            usage: done.then_some(Usage {
                input_tokens: self.input_tokens,
                input_tokens_details: Cached { cached_tokens: 0 },
                output_tokens: ask.tokens,
                output_tokens_details: Reasoning {
                    reasoning_tokens: 0,
                },
                total_tokens: self.input_tokens + ask.tokens,
            }),
            user: (),
        }
    }

    /// The event sequence of vLLM's simple (non-harmony) streaming path.
    fn script(&self) -> Script {
        let (tokens, item_id) = (self.ask.tokens, self.message_id);
        let (pending, done) = (self.object(false), self.object(true));
        let (adding, added) = (self.message(false), self.message(true));
        let (empty, full) = (self.part(""), self.part(self.text));
        let lead = numbered(
            0,
            [
                Event {
                    response: Some(&pending),
                    ..Event::new("response.created")
                },
                Event {
                    response: Some(&pending),
                    ..Event::new("response.in_progress")
                },
                Event {
                    item: Some(&adding),
                    output_index: Some(0),
                    ..Event::new("response.output_item.added")
                },
                Event {
                    part: Some(&empty),
                    ..Event::in_part("response.content_part.added", item_id)
                },
            ],
        );
        // Deltas go by the thousand: formatted from pieces, not serialised.
        let delta = "response.output_text.delta";
        let after = format!(
            "\",\"item_id\":\"{item_id}\",\"logprobs\":[],\"output_index\":0,\"sequence_number\":"
        );
        let frame = TokenFrame {
            before: format!("event: {delta}\ndata: {{\"content_index\":0,\"delta\":\""),
            last_after: after.clone(),
            after,
            seq: Some((lead.len(), format!(",\"type\":\"{delta}\"}}\n\n"))),
        };
        let tail = numbered(
            lead.len() + tokens,
            [
                Event {
                    logprobs: Some([]),
                    text: Some(self.text),
                    ..Event::in_part("response.output_text.done", item_id)
                },
                Event {
                    part: Some(&full),
                    ..Event::in_part("response.content_part.done", item_id)
                },
                Event {
                    item: Some(&added),
                    output_index: Some(0),
                    ..Event::new("response.output_item.done")
                },
                Event {
                    response: Some(&done),
                    ..Event::new("response.completed")
                },
            ],
        );
        Script {
            lead,
            tokens,
            frame,
            tail,
        }
    }
}

/// `event: <type>\ndata: <json>\n\n` for each event, numbered from `first`.
fn numbered<const N: usize>(first: usize, events: [Event<'_>; N]) -> Vec<Bytes> {
    let frame = |(i, mut event): (usize, Event<'_>)| {
        event.sequence_number = first + i;
        let mut out = format!("event: {}\ndata: ", event.kind).into_bytes();
        out.extend_from_slice(&to_json(&event));
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    };
    events.into_iter().enumerate().map(frame).collect()
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain structs serialise")
}

/// A streamed event. The OpenAI event types list their fields in
/// alphabetical order, and vLLM dumps them so; a type has only some.
#[derive(Serialize, Default)]
struct Event<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<&'a Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[(); 0]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<&'a Part<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a Object<'a>>,
    sequence_number: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'a str,
}

impl<'a> Event<'a> {
    fn new(kind: &'a str) -> Self {
        Event {
            kind,
            ..Event::default()
        }
    }

    /// An event about the first content part of the first output item.
    fn in_part(kind: &'a str, item_id: &'a str) -> Self {
        Event {
            content_index: Some(0),
            item_id: Some(item_id),
            output_index: Some(0),
            kind,
            ..Event::default()
        }
    }
}

/// vLLM's `ResponsesResponse`.
#[derive(Serialize)]
struct Object<'a> {
    id: &'a str,
    created_at: u64,
    incomplete_details: Option<Incomplete>,
    instructions: (),
    metadata: (),
    model: &'a str,
    object: &'static str,
    output: Vec<Message<'a>>,
    parallel_tool_calls: bool,
    temperature: f32,
    tool_choice: &'static str,
    tools: [(); 0],
    top_p: f32,
    background: bool,
    max_output_tokens: Option<u64>,
    max_tool_calls: (),
    previous_response_id: Option<&'a str>,
    prompt: (),
    reasoning: (),
    service_tier: &'static str,
    status: &'static str,
    text: (),
    top_logprobs: (),
    truncation: &'static str,
    usage: Option<Usage>,
    user: (),
}

#[derive(Serialize)]
struct Incomplete {
    reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    content: Vec<Part<'a>>,
    role: &'static str,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Part<'a> {
    annotations: [(); 0],
    text: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Usage {
    input_tokens: usize,
    input_tokens_details: Cached,
    output_tokens: usize,
    output_tokens_details: Reasoning,
    total_tokens: usize,
}

#[derive(Serialize)]
struct Cached {
    cached_tokens: usize,
}

#[derive(Serialize)]
struct Reasoning {
    reasoning_tokens: usize,
}
