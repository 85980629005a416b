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
    let starts: Vec<usize> = memmem::find_iter(body, delimiter.as_bytes()).collect();
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
        match field_name(rest.get(..head_len).unwrap_or_default()) {
            Some("model") if model.is_some() => return Err(bad("two `model` fields")),
            Some("model") => model = Some(value),
            Some("stream") => stream = value_bytes.eq_ignore_ascii_case(b"true"),
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
    })
}

/// `name` of a part's `Content-Disposition: form-data; name="..."`.
fn field_name(headers: &[u8]) -> Option<&str> {
    let headers = std::str::from_utf8(headers).ok()?;
    let disposition = headers.split("\r\n").find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(v)
    })?;
    disposition
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("name"))
        .map(|(_, v)| v.trim().trim_matches('"'))
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
        let no_model = b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--XyZ--";
        assert!(validate_form(no_model, "XyZ").is_err());
    }
}
