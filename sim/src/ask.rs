//! What a generation request asks for: the simulator's settings, overridden
//! per request by `x-sim-*` headers, capped by the body's `max_*tokens`.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::{error, Active, Fault, Sim};

pub(super) struct Ask {
    pub model: String,
    /// Completion tokens to produce.
    pub tokens: usize,
    /// `length` when `max_tokens` cut the answer short, else `stop`.
    pub finish: &'static str,
    /// The body's cap, if any (the Responses API echoes it).
    pub max_tokens: Option<u64>,
    pub delay: Duration,
    pub fault: Option<Fault>,
    pub stream: bool,
    pub include_usage: bool,
    /// Words in the prompt text: a deterministic stand-in for a tokenizer.
    pub prompt_tokens: usize,
    pub previous_response_id: Option<String>,
    pub store: bool,
    /// The prompt as token hashes, when the engine models prompts.
    pub prompt: Vec<u64>,
}

/// Only the fields the simulator looks at; serde skips the rest unparsed.
#[derive(Deserialize)]
struct Body {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    // Where the prompt text is: chat, completions, Responses.
    messages: Option<Value>,
    prompt: Option<Value>,
    input: Option<Value>,
    instructions: Option<Value>,
    previous_response_id: Option<String>,
    store: Option<bool>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

impl Ask {
    /// Counts the request as active and reads it; a request answered at
    /// once (an `Err`) counts as completed, not cancelled.
    pub async fn begin(
        sim: &Arc<Sim>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(Active, Ask), Response> {
        let mut active = Active::start(sim);
        match Ask::read(sim, headers, body).await {
            Ok(ask) => {
                // Queue, cache look-up and prefill: before the first token.
                active.running = Some(sim.engine.run(&ask.prompt, ask.tokens).await);
                Ok((active, ask))
            }
            Err(resp) => {
                active.finish();
                Err(resp)
            }
        }
    }

    /// Reads the request and applies the faults that strike before any
    /// answer (`slow-headers`, `500`); an `Err` is the answer to send.
    pub async fn read(sim: &Sim, headers: &HeaderMap, body: &[u8]) -> Result<Ask, Response> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let fault = match header("x-sim-fault") {
            None => sim.config.fault,
            Some("none") => None,
            Some(f) => match f.parse::<Fault>() {
                Ok(Fault::Refuse) => {
                    return Err(bad("x-sim-fault: refuse is a server-level fault"))
                }
                Ok(f) => Some(f),
                Err(e) => return Err(bad(&e)),
            },
        };
        if let Some(Fault::SlowHeaders(ms)) = fault {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if fault == Some(Fault::Status500) {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "simulated failure (fault 500)",
            ));
        }
        let body: Body = serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
        let model = match body.model {
            Some(m) if sim.config.models.contains(&m) => m,
            Some(m) => {
                let message = format!("The model `{m}` does not exist.");
                return Err(error(StatusCode::NOT_FOUND, "NotFoundError", &message));
            }
            // vLLM serves its first model name when none is given.
            None => sim.config.models.first().cloned().unwrap_or_default(),
        };
        let number = |name| header(name).and_then(|v| v.parse::<u64>().ok());
        let configured = number("x-sim-tokens").map_or(sim.config.tokens, |n| n as usize);
        // vLLM prefers `max_completion_tokens` over the deprecated `max_tokens`.
        let max_tokens = body
            .max_completion_tokens
            .or(body.max_tokens)
            .or(body.max_output_tokens);
        let tokens = max_tokens.map_or(configured, |m| configured.min(m as usize));
        let prompt = [
            &body.messages,
            &body.prompt,
            &body.input,
            &body.instructions,
        ];
        Ok(Ask {
            model,
            tokens,
            finish: if tokens < configured {
                "length"
            } else {
                "stop"
            },
            max_tokens,
            delay: number("x-sim-delay-ms").map_or(sim.config.delay, Duration::from_millis),
            fault,
            stream: body.stream.unwrap_or(false),
            include_usage: body
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            prompt_tokens: prompt.into_iter().flatten().map(words).sum(),
            prompt: if sim.engine.config().models_prompts() {
                super::engine::tokens(&[
                    &body.instructions,
                    &body.messages,
                    &body.input,
                    &body.prompt,
                ])
            } else {
                Vec::new()
            },
            previous_response_id: body.previous_response_id,
            store: body.store.unwrap_or(true),
        })
    }

    /// Waits as long as the whole answer takes to generate (non-streamed).
    pub async fn generate(&self) {
        if !self.delay.is_zero() {
            let tokens = u32::try_from(self.tokens).unwrap_or(u32::MAX);
            tokio::time::sleep(self.delay.saturating_mul(tokens)).await;
        }
    }
}

fn bad(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "BadRequestError", message)
}

/// Whitespace-separated words in every string of `v`, except the `role` and
/// `type` tags of messages and content parts.
fn words(v: &Value) -> usize {
    match v {
        Value::String(s) => s.split_whitespace().count(),
        Value::Array(items) => items.iter().map(words).sum(),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| *k != "role" && *k != "type")
            .map(|(_, v)| words(v))
            .sum(),
        _ => 0,
    }
}
