//! `multipart/form-data` bodies (audio uploads): find the `model` field, and
//! `stream`, by the part boundaries alone. The file part is skipped, never
//! decoded or copied, and the model's value is replaced in place like a JSON
//! body's, so every other byte of the upload reaches vLLM as it was sent.

use std::ops::Range;

use memchr::memmem;

use super::Parsed;
use crate::error::ApiError;

/// The `boundary` of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| (1..=70).contains(&b.len()))
}

/// The fields the gateway reads from a form: a 400 when it cannot find
/// exactly one `model`, never a panic on any bytes.
pub fn validate_form(body: &[u8], boundary: &str) -> Result<Parsed, ApiError> {
    let bad = |m: &str| ApiError::invalid(format!("Invalid multipart body: {m}."), None);
    let delimiter = format!("--{boundary}");
    // A delimiter starts the body or a line; elsewhere it is content.
    let starts: Vec<usize> = memmem::find_iter(body, delimiter.as_bytes())
        .filter(|&i| i == 0 || body.get(i.saturating_sub(2)..i) == Some(b"\r\n"))
        .collect();
    if starts.len() < 2 {
        return Err(bad("no parts"));
    }
    let mut model: Option<Range<usize>> = None;
    let mut stream = false;
    for pair in starts.windows(2) {
        let [start, next] = [pair[0], pair[1]];
        // A part: CRLF, headers, CRLF CRLF, the value, CRLF before `next`.
        let head_start = start + delimiter.len() + 2;
        let Some(rest) = body.get(head_start..next) else {
            return Err(bad("a part without headers"));
        };
        let Some(head_len) = memmem::find(rest, b"\r\n\r\n") else {
            return Err(bad("a part without headers"));
        };
        let value = head_start + head_len + 4..next.saturating_sub(2);
        let Some(value_bytes) = body.get(value.clone()) else {
            return Err(bad("a part without a value"));
        };
        // A part that names itself twice, or twice names its disposition,
        // could be read one way here and another by vLLM: refused.
        let name = field_name(rest.get(..head_len).unwrap_or_default())
            .map_err(|_| bad("a part with an ambiguous name"))?;
        match name {
            Some("model") if model.is_some() => return Err(bad("two `model` fields")),
            Some("model") => model = Some(value),
            Some("stream") if stream => return Err(bad("two `stream` fields")),
            Some("stream") => stream = truthy(value_bytes),
            Some("request_id") => {
                return Err(ApiError::invalid(
                    "'request_id' is chosen by the gateway, not by a client.",
                    Some("request_id"),
                ))
            }
            _ => {}
        }
    }
    let span = model
        .ok_or_else(|| ApiError::invalid("Missing required parameter: 'model'.", Some("model")))?;
    let name = body
        .get(span.clone())
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|m| (1..=256).contains(&m.len()) && !m.contains(['\r', '\n']))
        .ok_or_else(|| ApiError::invalid("'model' must be 1 to 256 characters.", Some("model")))?;
    Ok(Parsed {
        model: name.to_owned(),
        model_span: span,
        model_in_form: true,
        stream,
        include_usage: false,
        usage_edit: None,
        user: None,
        previous_response_id: None,
        prefix: crate::prefix::Source::None,
        max_tokens: None,
    })
}

/// What pydantic reads as `true` for a form's boolean.
fn truthy(v: &[u8]) -> bool {
    let v = v.trim_ascii();
    ["true", "1", "yes", "on", "t", "y"]
        .iter()
        .any(|t| v.eq_ignore_ascii_case(t.as_bytes()))
}

/// `name` of a part's `Content-Disposition: form-data; name="..."`; an
/// error when the part is ambiguous (two dispositions, two names).
fn field_name(headers: &[u8]) -> Result<Option<&str>, ()> {
    let headers = std::str::from_utf8(headers).map_err(|_| ())?;
    let mut dispositions = headers.split("\r\n").filter_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(v)
    });
    let Some(disposition) = dispositions.next() else {
        return Ok(None);
    };
    if dispositions.next().is_some() {
        return Err(());
    }
    let mut names = disposition
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("name"))
        .map(|(_, v)| v.trim().trim_matches('"'));
    let name = names.next();
    if names.next().is_some() {
        return Err(());
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(model: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\xffname=\"model\"\r\n\r\n--Xy\r\n");
        body.extend_from_slice(
            format!("\r\n--XyZ\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--XyZ\r\nContent-Disposition: form-data; name=stream\r\n\r\ntrue\r\n--XyZ--\r\n").as_bytes(),
        );
        body
    }

    #[test]
    fn finds_the_model_and_stream_past_a_binary_file_part() {
        let body = form("whisper");
        let p = validate_form(&body, "XyZ").unwrap();
        assert_eq!(p.model, "whisper");
        assert_eq!(&body[p.model_span.clone()], b"whisper");
        assert!(p.stream && p.model_in_form);
        let out = super::super::with_model(
            &bytes::Bytes::from(body.clone()),
            &p,
            "openai/whisper-large-v3",
        );
        let want = String::from_utf8_lossy(&form("openai/whisper-large-v3")).into_owned();
        assert_eq!(String::from_utf8_lossy(&out), want);
    }

    #[test]
    fn boundaries_are_read_from_the_content_type() {
        assert_eq!(boundary("multipart/form-data; boundary=abc"), Some("abc"));
        assert_eq!(
            boundary("Multipart/Form-Data;boundary=\"a b\""),
            Some("a b")
        );
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data"), None);
    }

    #[test]
    fn malformed_forms_are_a_400() {
        for body in [
            &b""[..],
            b"--XyZ\r\n",
            b"--XyZ\r\nno headers end--XyZ--",
            b"--XyZ--XyZ",
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nb\r\n--XyZ--",
        ] {
            assert!(validate_form(body, "XyZ").is_err(), "{body:?}");
        }
        for ambiguous in [
            &b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; name=\"junk\"\r\n\r\na\r\n--XyZ--"[..],
            b"--XyZ\r\nContent-Disposition: form-data; name=\"junk\"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--XyZ--",
        ] {
            assert!(validate_form(ambiguous, "XyZ").is_err());
        }
        // `--XyZ` inside a value (not at a line start) is content.
        let inline =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm--XyZ\r\n--XyZ--\r\n";
        assert_eq!(validate_form(inline, "XyZ").unwrap().model, "m--XyZ");
        let no_model = b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--XyZ--";
        assert!(validate_form(no_model, "XyZ").is_err());
    }
}
