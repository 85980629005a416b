//! Request validation without re-serialising: the body is parsed once into
//! borrowed views of the few fields the gateway needs; everything else
//! (unknown fields, tool calls, multimodal parts) passes through untouched.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::prefix::{HeadRecorder, Role, Source};

/// Which endpoint a body is for. The generation endpoints have required
/// fields the gateway checks; the others (embeddings, tokenizer, scoring)
/// need a `model` to be routed and pass on the rest for vLLM to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Tokenize,
    Detokenize,
    Score,
    Rerank,
    Pooling,
    Classify,
    Transcriptions,
    Translations,
}

impl Endpoint {
    /// Every endpoint, for the router.
    pub const ALL: [Endpoint; 12] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Responses,
        Endpoint::Embeddings,
        Endpoint::Tokenize,
        Endpoint::Detokenize,
        Endpoint::Score,
        Endpoint::Rerank,
        Endpoint::Pooling,
        Endpoint::Classify,
        Endpoint::Transcriptions,
        Endpoint::Translations,
    ];

    /// The path, the same at the gateway and at vLLM.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Tokenize => "/tokenize",
            Endpoint::Detokenize => "/detokenize",
            Endpoint::Score => "/v1/score",
            Endpoint::Rerank => "/v1/rerank",
            Endpoint::Pooling => "/pooling",
            Endpoint::Classify => "/classify",
            Endpoint::Transcriptions => "/v1/audio/transcriptions",
            Endpoint::Translations => "/v1/audio/translations",
        }
    }

    /// Takes `multipart/form-data` (an audio upload), not JSON.
    pub fn form(self) -> bool {
        matches!(self, Endpoint::Transcriptions | Endpoint::Translations)
    }

    /// Generates text (and may stream); the others answer once.
    pub fn generates(self) -> bool {
        matches!(
            self,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses
        )
    }
}

/// What the gateway learned from a valid body.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    pub model: String,
    /// Byte range of the model value in the body, quotes and any escapes
    /// included, so an alias is replaced without touching another byte.
    pub model_span: Range<usize>,
    /// The model is a form field's plain value, not a JSON string.
    pub model_in_form: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// How to ask the upstream for usage when a stream did not: an insertion
    /// or a replacement at one place in the body (chat and completions).
    pub usage_edit: Option<Edit>,
    pub user: Option<String>,
    pub previous_response_id: Option<String>,
    /// Where the prompt's head is, for prefix-affinity routing.
    pub prefix: crate::prefix::Source,
    /// The most tokens the answer may have (`max_tokens`,
    /// `max_completion_tokens` or `max_output_tokens`, the smallest given):
    /// what the key's token budget reserves for it.
    pub max_tokens: Option<u64>,
}

/// Replace `range` of the body with `text` (an empty range inserts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub range: Range<usize>,
    pub text: &'static str,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    previous_response_id: Option<Cow<'a, str>>,
    /// vLLM names its answer after this: a client must not choose the id
    /// under which the gateway keeps state and signatures.
    #[serde(borrow, default, deserialize_with = "present")]
    request_id: Option<&'a RawValue>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    include_usage: Option<&'a RawValue>,
}

/// `Some` whenever the member is there, `null` included (serde's own
/// `Option` reads `null` as absent; the edit must tell them apart).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

pub fn validate(endpoint: Endpoint, body: &[u8], max_messages: usize) -> Result<Parsed, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "Request body is empty; expected a JSON object.",
            None,
        ));
    }
    // serde's derived structs also accept the positional (array) form; a
    // request is an object, and the model splice depends on it.
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(ApiError::invalid(
            "Request body must be a JSON object.",
            None,
        ));
    }
    // One vectorised UTF-8 check of the whole body; the parse then reads a
    // `str` and checks no string again (from bytes, serde_json validated
    // every string and raw value it met, at about 4 instructions a byte).
    let text = simdutf8::basic::from_utf8(body)
        .map_err(|_| ApiError::invalid("Request body is not valid JSON: it is not UTF-8.", None))?;
    let parsed: Body = serde_json::from_str(text).map_err(|e| {
        let msg = if e.is_syntax() || e.is_eof() {
            format!("Request body is not valid JSON: {e}")
        } else {
            format!("Invalid request body: {e}")
        };
        ApiError::invalid(msg, None)
    })?;
    let model_raw = parsed
        .model
        .ok_or_else(|| ApiError::invalid("Missing required parameter: 'model'.", Some("model")))?;
    let model_span = span_of(body, model_raw.get()).ok_or_else(|| {
        ApiError::invalid("Invalid request body: 'model' not found.", Some("model"))
    })?;
    // Escapes (`"ll\u0061ma"`) are decoded for routing; the splice replaces
    // the raw value whatever escapes it used.
    let model: Cow<str> = serde_json::from_str(model_raw.get())
        .map_err(|_| ApiError::invalid("'model' must be a string.", Some("model")))?;
    if model.is_empty() || model.len() > 256 {
        return Err(ApiError::invalid(
            "'model' must be 1 to 256 characters.",
            Some("model"),
        ));
    }
    if parsed.request_id.is_some() {
        return Err(ApiError::invalid(
            "'request_id' is chosen by the gateway, not by a client.",
            Some("request_id"),
        ));
    }
    if parsed.background == Some(true) {
        // Its tokens are generated after the answer, where no quota sees them.
        return Err(ApiError::invalid(
            "Background responses are not supported by this gateway.",
            Some("background"),
        ));
    }
    let stream = parsed.stream.unwrap_or(false);
    let (include_usage, usage_edit) = usage_options(body, parsed.stream_options)?;
    let usage_edit =
        usage_edit.filter(|_| stream && matches!(endpoint, Endpoint::Chat | Endpoint::Completions));
    let span = |raw: &RawValue| span_of(body, raw.get());
    let mut prefix = Source::None;
    match endpoint {
        Endpoint::Chat => {
            let messages = parsed.messages.ok_or_else(|| {
                ApiError::invalid("Missing required parameter: 'messages'.", Some("messages"))
            })?;
            if messages.is_empty() {
                return Err(ApiError::invalid(
                    "'messages' must not be empty.",
                    Some("messages"),
                ));
            }
            if messages.len() > max_messages {
                return Err(ApiError::invalid(
                    format!(
                        "Too many messages: {} (limit {max_messages}).",
                        messages.len()
                    ),
                    Some("messages"),
                ));
            }
            let mut head = HeadRecorder::default();
            for (i, m) in messages.iter().enumerate() {
                check_message(i, m)?;
                head.push(Role::of(&m.role), m.content.and_then(span));
            }
            prefix = head.finish();
        }
        Endpoint::Completions => {
            let prompt = parsed.prompt.ok_or_else(|| {
                ApiError::invalid("Missing required parameter: 'prompt'.", Some("prompt"))
            })?;
            if !matches!(first_byte(prompt), b'"' | b'[') {
                return Err(ApiError::invalid(
                    "'prompt' must be a string or an array.",
                    Some("prompt"),
                ));
            }
            prefix = span(prompt).map_or(Source::None, Source::Prompt);
        }
        Endpoint::Responses => {
            let input = parsed.input.ok_or_else(|| {
                ApiError::invalid("Missing required parameter: 'input'.", Some("input"))
            })?;
            if !matches!(first_byte(input), b'"' | b'[') {
                return Err(ApiError::invalid(
                    "'input' must be a string or an array of items.",
                    Some("input"),
                ));
            }
            if let Some(input) = span(input) {
                prefix = Source::Responses {
                    instructions: parsed.instructions.and_then(span),
                    input,
                };
            }
        }
        // vLLM checks the rest of these bodies itself.
        _ => {}
    }
    Ok(Parsed {
        model: model.into_owned(),
        model_span,
        model_in_form: false,
        stream,
        include_usage,
        usage_edit,
        user: parsed.user.map(Cow::into_owned),
        max_tokens: [
            parsed.max_tokens,
            parsed.max_completion_tokens,
            parsed.max_output_tokens,
        ]
        .into_iter()
        .flatten()
        .min(),
        // Only the Responses API keeps state that a later request names.
        previous_response_id: parsed
            .previous_response_id
            .filter(|_| endpoint == Endpoint::Responses)
            .map(Cow::into_owned),
        prefix,
    })
}

const ASK_USAGE_MEMBER: &str = "\"stream_options\":{\"include_usage\":true},";
const ASK_USAGE_OBJECT: &str = "{\"include_usage\":true}";

/// Whether the client asked for usage, and else the edit that asks for it:
/// no `stream_options` gets a member inserted first in the body; `null`
/// becomes an object; an object without `include_usage` gets it; `false`
/// becomes `true`. Each keeps every other byte where it was.
fn usage_options(
    body: &[u8],
    options: Option<&RawValue>,
) -> Result<(bool, Option<Edit>), ApiError> {
    let bad = || {
        ApiError::invalid(
            "'stream_options' must be an object; 'include_usage' a boolean.",
            Some("stream_options"),
        )
    };
    let Some(raw) = options else {
        let open = body.iter().position(|&b| b == b'{').ok_or_else(bad)?;
        let at = open + 1;
        return Ok((
            false,
            Some(Edit {
                range: at..at,
                text: ASK_USAGE_MEMBER,
            }),
        ));
    };
    let span = span_of(body, raw.get()).ok_or_else(bad)?;
    let text = raw.get().as_bytes();
    if text == b"null" {
        return Ok((
            false,
            Some(Edit {
                range: span,
                text: ASK_USAGE_OBJECT,
            }),
        ));
    }
    if text.first() != Some(&b'{') {
        return Err(bad());
    }
    let options: StreamOptions = serde_json::from_str(raw.get()).map_err(|_| bad())?;
    let Some(flag) = options.include_usage else {
        let at = span.start + 1;
        let empty = text
            .iter()
            .skip(1)
            .all(|b| b.is_ascii_whitespace() || *b == b'}');
        let text = if empty {
            "\"include_usage\":true"
        } else {
            "\"include_usage\":true,"
        };
        return Ok((
            false,
            Some(Edit {
                range: at..at,
                text,
            }),
        ));
    };
    match flag.get() {
        "true" => Ok((true, None)),
        "false" | "null" => {
            let within = (flag.get().as_ptr() as usize).wrapping_sub(raw.get().as_ptr() as usize);
            let start = span.start + within;
            Ok((
                false,
                Some(Edit {
                    range: start..start + flag.get().len(),
                    text: "true",
                }),
            ))
        }
        _ => Err(bad()),
    }
}

fn check_message(i: usize, m: &Message) -> Result<(), ApiError> {
    if !ROLES.contains(&m.role.as_ref()) {
        return Err(ApiError::invalid(
            format!("messages[{i}].role must be one of {ROLES:?}."),
            Some("messages"),
        ));
    }
    // Strings and content-part arrays (text, images, audio) pass as they are;
    // null is fine for assistant turns that only call tools.
    match m.content.map(first_byte) {
        Some(b'"') | Some(b'[') => Ok(()),
        None | Some(b'n') if matches!(m.role.as_ref(), "assistant" | "function" | "tool") => Ok(()),
        _ => Err(ApiError::invalid(
            format!("messages[{i}].content must be a string or an array of content parts."),
            Some("messages"),
        )),
    }
}

fn first_byte(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b' ')
}

/// Where a borrowed `&str` sits inside `body`: pointer arithmetic on two
/// slices of the same buffer. Inside `body`'s bounds they are the same
/// memory, so the bytes need no comparing (a 150 KB prompt is not read
/// twice); a value from elsewhere (a decoded escape) falls outside.
fn span_of(body: &[u8], s: &str) -> Option<Range<usize>> {
    let start = (s.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(s.len())?;
    body.get(start..end).map(|_| start..end)
}

mod splice;
pub use splice::{upstream_body, with_model};

pub mod form;
/// Response ids are opaque tokens; anything else (slashes, dots-dots,
/// control bytes) is refused before it is used as a key anywhere.
pub fn valid_id(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        && !id.contains("..")
}

#[cfg(test)]
mod tests;
