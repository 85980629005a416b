use bytes::Bytes;

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
    assert!(message_of(chat(r#"{"model":3,"messages":[]}"#)).contains("'model' must be a string"));
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

/// Found by an outside attack run: an escaped alias made the gateway
/// re-serialise the body (keys reordered, numbers normalised, duplicate keys
/// collapsed), and a number out of f64 range or deep nesting then panicked.
#[test]
fn escaped_model_names_are_spliced_byte_exact_whatever_else_the_body_holds() {
    for raw in [
        r#"{"model":"al\u0069as","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"z":1e400,"seed":18446744073709551615,"model" :	"\u0061lias" ,"messages":[{"role":"user","content":"\ud83d\ude00 x"}],"a":{"b":[1.50,2E3]}}"#,
        r#"{"model":"\u0061\u006c\u0069\u0061\u0073","messages":[{"role":"user","content":"x"}],"deep":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
    ] {
        let body = Bytes::from(raw);
        let p = match validate(Endpoint::Chat, &body, 4) {
            Ok(p) => p,
            // Deeper than serde_json's limit: a clear 400, also fine.
            Err(e) => {
                assert!(matches!(e, ApiError::InvalidRequest { .. }), "{e:?}");
                continue;
            }
        };
        assert_eq!(p.model, "alias");
        let out = with_model(&body, &p, "meta/llama-3");
        let start = p.model_span.start;
        let end = p.model_span.end;
        let expected = [
            &raw.as_bytes()[..start],
            b"\"meta/llama-3\"",
            &raw.as_bytes()[end..],
        ]
        .concat();
        assert_eq!(out, expected, "{raw}");
    }
}

#[test]
fn a_lone_surrogate_in_the_model_is_a_400() {
    let body = br#"{"model":"ll\ud800ama","messages":[{"role":"user","content":"x"}]}"#;
    assert!(matches!(
        validate(Endpoint::Chat, body, 4),
        Err(ApiError::InvalidRequest { .. })
    ));
}

#[test]
fn a_duplicated_model_is_a_400_not_a_guess() {
    // The gateway and the upstream could read different ones.
    let body = br#"{"model":"alias","messages":[{"role":"user","content":"x"}],"model":"secret"}"#;
    assert!(message_of(validate(Endpoint::Chat, body, 4)).contains("duplicate field"));
}

fn ask_usage(raw: &str) -> String {
    let body = Bytes::copy_from_slice(raw.as_bytes());
    let p = validate(Endpoint::Chat, &body, 4).unwrap();
    String::from_utf8(upstream_body(&body, &p, "up", true).concat().to_vec()).unwrap()
}

#[test]
fn streams_ask_for_usage_with_one_splice() {
    let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
    let cases = [
        (
            format!(r#"{{"model":"m","stream":true,{msgs}}}"#),
            format!(
                r#"{{"stream_options":{{"include_usage":true}},"model":"up","stream":true,{msgs}}}"#
            ),
        ),
        (
            format!(r#"{{"model":"m","stream":true,"stream_options":null,{msgs}}}"#),
            format!(
                r#"{{"model":"up","stream":true,"stream_options":{{"include_usage":true}},{msgs}}}"#
            ),
        ),
        (
            format!(r#"{{"model":"m","stream":true,"stream_options":{{ }},{msgs}}}"#),
            format!(
                r#"{{"model":"up","stream":true,"stream_options":{{"include_usage":true }},{msgs}}}"#
            ),
        ),
        (
            format!(
                r#"{{"model":"m","stream":true,"stream_options":{{"continuous_usage_stats":false}},{msgs}}}"#
            ),
            format!(
                r#"{{"model":"up","stream":true,"stream_options":{{"include_usage":true,"continuous_usage_stats":false}},{msgs}}}"#
            ),
        ),
        (
            format!(
                r#"{{"model":"m","stream":true,"stream_options":{{"include_usage": false}},{msgs}}}"#
            ),
            format!(
                r#"{{"model":"up","stream":true,"stream_options":{{"include_usage": true}},{msgs}}}"#
            ),
        ),
        // Asked already, or not a stream: only the model changes.
        (
            format!(
                r#"{{"model":"m","stream":true,"stream_options":{{"include_usage":true}},{msgs}}}"#
            ),
            format!(
                r#"{{"model":"up","stream":true,"stream_options":{{"include_usage":true}},{msgs}}}"#
            ),
        ),
        (
            format!(r#"{{"model":"m",{msgs}}}"#),
            format!(r#"{{"model":"up",{msgs}}}"#),
        ),
    ];
    for (raw, want) in cases {
        let got = ask_usage(&raw);
        assert_eq!(got, want);
        let again: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(again["model"], "up");
    }
    let p = chat(&format!(
        r#"{{"model":"m","stream":true,"stream_options":{{"include_usage":false}},{msgs}}}"#
    ))
    .unwrap();
    assert!(!p.include_usage);
    assert!(message_of(chat(&format!(
        r#"{{"model":"m","stream":true,"stream_options":"yes",{msgs}}}"#
    )))
    .contains("stream_options"));
    assert!(message_of(chat(&format!(
        r#"{{"model":"m","stream":true,"stream_options":{{"include_usage":1}},{msgs}}}"#
    )))
    .contains("stream_options"));
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
