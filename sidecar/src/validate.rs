//! Request validation without re-serialising: the body is parsed once into
//! borrowed views of the few fields the gateway needs; everything else
//! (unknown fields, tool calls, multimodal parts) passes through untouched.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;

/// Which OpenAI endpoint a body is for: each has its own required fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Responses,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Responses => "/v1/responses",
        }
    }
}

/// What the gateway learned from a valid body.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    pub model: String,
    /// Byte range of the model string's contents in the body, when it has no
    /// escapes, so an alias can be replaced in place.
    pub model_span: Option<Range<usize>>,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    pub previous_response_id: Option<String>,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    model: Option<Str<'a>>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    previous_response_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A string that borrows from the body when it has no escapes. (serde's own
/// `Option<Cow<str>>` always copies, which would lose the model's position.)
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(Visit)
    }
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
    let parsed: Body = serde_json::from_slice(body).map_err(|e| {
        let msg = if e.is_syntax() || e.is_eof() {
            format!("Request body is not valid JSON: {e}")
        } else {
            format!("Invalid request body: {e}")
        };
        ApiError::invalid(msg, None)
    })?;
    let model = parsed
        .model
        .ok_or_else(|| ApiError::invalid("Missing required parameter: 'model'.", Some("model")))?
        .0;
    if model.is_empty() || model.len() > 256 {
        return Err(ApiError::invalid(
            "'model' must be 1 to 256 characters.",
            Some("model"),
        ));
    }
    let model_span = match &model {
        Cow::Borrowed(s) => span_of(body, s),
        Cow::Owned(_) => None,
    };
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
            for (i, m) in messages.iter().enumerate() {
                check_message(i, m)?;
            }
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
        }
    }
    Ok(Parsed {
        model: model.into_owned(),
        model_span,
        stream: parsed.stream.unwrap_or(false),
        include_usage: parsed
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        user: parsed.user.map(Cow::into_owned),
        previous_response_id: parsed.previous_response_id.map(Cow::into_owned),
    })
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
/// slices of the same buffer, verified by comparing the bytes.
fn span_of(body: &[u8], s: &str) -> Option<Range<usize>> {
    let start = (s.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(s.len())?;
    (body.get(start..end)? == s.as_bytes()).then_some(start..end)
}

/// The body with the model replaced: a splice when the span is known,
/// otherwise a full re-serialisation (only for names written with escapes).
pub fn with_model(body: &Bytes, parsed: &Parsed, upstream_model: &str) -> Bytes {
    if parsed.model == upstream_model {
        return body.clone();
    }
    let quoted = serde_json::to_string(upstream_model).expect("string serialises");
    let inner = &quoted[1..quoted.len() - 1];
    match &parsed.model_span {
        Some(span) => {
            let mut out = BytesMut::with_capacity(body.len() + inner.len());
            out.extend_from_slice(&body[..span.start]);
            out.extend_from_slice(inner.as_bytes());
            out.extend_from_slice(&body[span.end..]);
            out.freeze()
        }
        None => {
            let mut value: serde_json::Value =
                serde_json::from_slice(body).expect("body was validated as JSON");
            // `validate` admits only objects; anything else passes unchanged.
            let Some(object) = value.as_object_mut() else {
                return body.clone();
            };
            object.insert(
                "model".to_owned(),
                serde_json::Value::String(upstream_model.to_owned()),
            );
            Bytes::from(serde_json::to_vec(&value).expect("value serialises"))
        }
    }
}

#[cfg(test)]
mod tests;
