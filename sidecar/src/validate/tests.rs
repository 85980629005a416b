use super::*;

fn chat(body: &str) -> Result<Parsed, ApiError> {
    validate(Endpoint::Chat, body.as_bytes(), 4)
}

fn message_of(r: Result<Parsed, ApiError>) -> String {
    match r {
        Err(e @ ApiError::InvalidRequest { .. }) => e.to_string(),
        other => panic!("expected invalid request, got {other:?}"),
    }
}

#[test]
fn accepts_a_normal_chat_request_and_reads_its_options() {
    let p = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"user":"u1","extra":{"x":1}}"#).unwrap();
    assert_eq!(p.model, "m");
    assert!(p.stream && p.include_usage);
    assert_eq!(p.user.as_deref(), Some("u1"));
}

#[test]
fn multimodal_and_tool_calls_pass() {
    chat(r#"{"model":"m","messages":[
        {"role":"user","content":[{"type":"text","text":"what"},{"type":"image_url","image_url":{"url":"data:x"}}]},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"c","content":"42"}]}"#)
    .unwrap();
}

#[test]
fn rejects_bad_bodies_with_a_message_that_says_why() {
    assert!(message_of(chat("")).contains("empty"));
    assert!(message_of(chat("{")).contains("not valid JSON"));
    assert!(message_of(chat(r#"{"messages":[]}"#)).contains("'model'"));
    assert!(message_of(chat(r#"{"model":"m"}"#)).contains("'messages'"));
    assert!(message_of(chat(r#"{"model":"m","messages":[]}"#)).contains("empty"));
    assert!(message_of(chat(
        r#"{"model":"m","messages":[{"role":"pirate","content":"x"}]}"#
    ))
    .contains("role"));
    assert!(message_of(chat(
        r#"{"model":"m","messages":[{"role":"user","content":5}]}"#
    ))
    .contains("content"));
    assert!(message_of(chat(r#"{"model":"m","messages":[{"role":"user"}]}"#)).contains("content"));
    assert!(message_of(chat(r#"{"model":3,"messages":[]}"#)).contains("Invalid request body"));
    assert!(message_of(chat(
        r#"{"model":"m","stream":"yes","messages":[{"role":"user","content":"x"}]}"#
    ))
    .contains("Invalid"));
    let five = r#"{"role":"user","content":"x"},"#.repeat(5);
    assert!(message_of(chat(&format!(
        r#"{{"model":"m","messages":[{}]}}"#,
        five.trim_end_matches(',')
    )))
    .contains("Too many messages"));
    assert!(
        message_of(validate(Endpoint::Completions, br#"{"model":"m"}"#, 4)).contains("'prompt'")
    );
    assert!(message_of(validate(
        Endpoint::Completions,
        br#"{"model":"m","prompt":{}}"#,
        4
    ))
    .contains("'prompt'"));
    assert!(message_of(validate(
        Endpoint::Responses,
        br#"{"model":"m","input":1}"#,
        4
    ))
    .contains("'input'"));
}

#[test]
fn invalid_utf8_is_a_400_not_a_panic() {
    let body = b"{\"model\":\"m\xff\",\"messages\":[]}";
    assert!(message_of(validate(Endpoint::Chat, body, 4)).contains("JSON"));
}

#[test]
fn alias_is_spliced_in_place_leaving_every_other_byte_alone() {
    let raw =
        r#"{ "messages":[{"role":"user","content":"model \"alias\""}], "model" : "alias", "z":1}"#;
    let body = Bytes::from(raw);
    let p = validate(Endpoint::Chat, &body, 4).unwrap();
    let out = with_model(&body, &p, "meta/llama-3");
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        raw.replace(r#""model" : "alias""#, r#""model" : "meta/llama-3""#)
    );
    // Same name: the very same bytes, no copy.
    assert_eq!(with_model(&body, &p, "alias").as_ptr(), body.as_ptr());
}

#[test]
fn escaped_model_names_fall_back_to_reserialising() {
    let body = Bytes::from(r#"{"model":"al\u0069as","messages":[{"role":"user","content":"x"}]}"#);
    let p = validate(Endpoint::Chat, &body, 4).unwrap();
    assert_eq!(p.model, "alias");
    assert!(p.model_span.is_none());
    let out: serde_json::Value = serde_json::from_slice(&with_model(&body, &p, "up")).unwrap();
    assert_eq!(out["model"], "up");
    assert_eq!(out["messages"][0]["content"], "x");
}

/// Found by the fuzzer: serde's derived structs also accept the positional
/// (array) form, which then reached the model rewrite as a non-object.
#[test]
fn a_body_that_is_not_an_object_is_a_400() {
    for body in [
        r#"["m", [{"role": "user", "content": "x"}]]"#,
        "  [\"&\\n \",[[\n\"];]]\"]],[0]\n]",
        "\"just a string\"",
        "42",
    ] {
        assert!(
            message_of(chat(body)).contains("must be a JSON object"),
            "{body:?}"
        );
    }
    let ok = chat(" \n{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}");
    assert!(ok.is_ok());
}
