//! What crosses the wire, as an outsider would check it on real sockets: the
//! exact bytes the upstream receives for a crafted body, the usage event a
//! client did and did not ask for, token limits that streams cannot bypass,
//! bytes after `[DONE]`, deadlines that never run a generation twice, and
//! malformed headers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use axum::body::Bytes;
use axum::Router;
use infergate_sidecar::config::KeyLimits;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream on a real socket that records each request body and answers
/// every request with the same bytes (and identity headers a real server
/// sends, which must not reach clients).
struct Scripted {
    url: String,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

async fn scripted(content_type: &'static str, answer: &'static [u8]) -> Scripted {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let paths = Arc::new(Mutex::new(Vec::new()));
    let (seen, seen_paths) = (bodies.clone(), paths.clone());
    let router = Router::new().fallback(move |uri: axum::http::Uri, body: Bytes| {
        let (seen, seen_paths) = (seen.clone(), seen_paths.clone());
        async move {
            seen.lock().unwrap().push(body);
            seen_paths.lock().unwrap().push(uri.path().to_owned());
            (
                [
                    ("content-type", content_type),
                    ("server", "uvicorn"),
                    ("x-upstream-pod", "pod-7"),
                ],
                answer,
            )
        }
    });
    let addr = serve(router).await;
    Scripted {
        url: format!("http://{addr}"),
        bodies,
        paths,
    }
}

const CHAT_ANSWER: &[u8] = br#"{"id":"chatcmpl-w1","object":"chat.completion","model":"org/model-7b","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

async fn post_raw(gw: &Gateway, path: &str, key: &str, body: &[u8]) -> reqwest::Response {
    client()
        .post(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_crafted_body_reaches_the_upstream_with_only_the_model_changed() {
    let up = scripted("application/json", CHAT_ANSWER).await;
    let gw = gateway(config(&[&up.url], "", "")).await;
    // An escaped alias, a number out of f64 range, an integer past 2^53,
    // odd spacing, a non-ASCII escape and a duplicated unknown key.
    let crafted = concat!(
        r#"{"seed" : 18446744073709551615, "model":"al\u0069as","#,
        r#""messages":[{"role":"user","content":"\ud83d\ude00 1e400"}],"#,
        r#""temperature":1e400,"x":1,"x":2,"deep":[[[[[[[[[[]]]]]]]]]]}"#
    );
    let resp = post_raw(&gw, "/v1/chat/completions", KEY, crafted.as_bytes()).await;
    assert_eq!(resp.status(), 200);
    let expected = crafted.replace(r#""al\u0069as""#, &format!("\"{UPSTREAM_MODEL}\""));
    let bodies = up.bodies.lock().unwrap().clone();
    assert_eq!(bodies, vec![Bytes::from(expected)]);
    // Nothing that names the upstream reaches the client.
    for name in ["server", "x-upstream-pod"] {
        assert!(resp.headers().get(name).is_none(), "{name}");
    }
    assert_eq!(resp.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn bodies_that_cannot_be_rewritten_are_a_400_never_a_dropped_connection() {
    let up = scripted("application/json", CHAT_ANSWER).await;
    let gw = gateway(config(&[&up.url], "", "")).await;
    let deep = format!(
        r#"{{"model":"al\u0069as","messages":[{{"role":"user","content":"x"}}],"d":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    for body in [
        r#"{"model":"ll\ud800ama","messages":[{"role":"user","content":"x"}]}"#.to_owned(),
        r#"{"model":"alias","messages":[{"role":"user","content":"x"}],"model":"m"}"#.to_owned(),
        r#"{"model":"alias","stream":true,"stream_options":[],"messages":[{"role":"user","content":"x"}]}"#.to_owned(),
    ] {
        let resp = post_raw(&gw, "/v1/chat/completions", KEY, body.as_bytes()).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    assert!(up.bodies.lock().unwrap().is_empty());
    // Deep nesting the gateway does not read passes as it is.
    let resp = post_raw(&gw, "/v1/chat/completions", KEY, deep.as_bytes()).await;
    assert_eq!(resp.status(), 200);
    let expected = deep.replace(r#""al\u0069as""#, &format!("\"{UPSTREAM_MODEL}\""));
    assert_eq!(up.bodies.lock().unwrap()[0], Bytes::from(expected));
}

#[tokio::test]
async fn streams_ask_for_usage_and_only_clients_that_asked_receive_it() {
    let up = scripted(
        "text/event-stream",
        concat!(
            "data: {\"id\":\"chatcmpl-u\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-u\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"id\":\"chatcmpl-u\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1,\"total_tokens\":5}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes(),
    )
    .await;
    let gw = gateway(config(&[&up.url], "", "")).await;
    let plain = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}"#;
    let resp = post_raw(&gw, "/v1/chat/completions", KEY, plain).await;
    let text = resp.text().await.unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let sent = up.bodies.lock().unwrap()[0].clone();
    assert_eq!(
        sent,
        Bytes::from(format!(
            r#"{{"stream_options":{{"include_usage":true}},"model":"{UPSTREAM_MODEL}","stream":true,"messages":[{{"role":"user","content":"x"}}]}}"#
        ))
    );
    // The signature covers what this client received, and the request hash
    // is of its own bytes.
    let (_, sig) = get_json(&gw, Some(KEY), "/v1/signature/chatcmpl-u").await;
    assert_eq!(
        sig["text"],
        format!(
            "{}:{}",
            hex::encode(Sha256::digest(plain)),
            hex::encode(Sha256::digest(text.as_bytes()))
        )
    );
    let asked = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"x"}]}"#;
    let text = post_raw(&gw, "/v1/chat/completions", KEY, asked)
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"usage\":{\"prompt_tokens\":4"), "{text}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"infergate_completion_tokens_total{model="m",key="team-a"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn bytes_after_done_are_not_passed_on_and_the_signature_verifies() {
    let up = scripted(
        "text/event-stream",
        b"data: {\"id\":\"chatcmpl-d\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n",
    )
    .await;
    // The scripted body ends at [DONE]; a second upstream adds a trailer.
    let trailing = scripted(
        "text/event-stream",
        b"data: {\"id\":\"chatcmpl-t\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\ndata: {\"sneaky\":true}\n\n",
    )
    .await;
    for (url, id) in [(&up.url, "chatcmpl-d"), (&trailing.url, "chatcmpl-t")] {
        let gw = gateway(config(&[url], "", "")).await;
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"x"}]}"#;
        let text = post_raw(&gw, "/v1/chat/completions", KEY, body)
            .await
            .text()
            .await
            .unwrap();
        let (_, sig) = get_json(&gw, Some(KEY), &format!("/v1/signature/{id}")).await;
        let response_hash = hex::encode(Sha256::digest(text.as_bytes()));
        assert!(
            sig["text"].as_str().unwrap().ends_with(&response_hash),
            "{id}: the hash covers exactly what the client received"
        );
        assert!(!text.contains("sneaky"), "{text}");
    }
}

#[tokio::test]
async fn token_limits_hold_for_streams_on_chat_and_completions() {
    let sim = simulator("s0", 200, 0).await;
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let mut cfg = config(&[&sim.url], "", "");
        cfg.keys[0].limits = Some(KeyLimits {
            tokens_per_minute: 60,
            ..Default::default()
        });
        let gw = gateway(cfg).await;
        let body = if path == "/v1/completions" {
            json!({"model": "m", "stream": true, "prompt": "hello"})
        } else {
            chat_body("m", true)
        };
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let resp = post_raw(&gw, path, KEY, &serde_json::to_vec(&body).unwrap()).await;
            statuses.push(resp.status().as_u16());
            resp.bytes().await.unwrap();
        }
        // The first stream spends the minute's budget; the rest wait.
        assert_eq!(statuses, [200, 429, 429, 429, 429], "{path}");
    }
}

#[tokio::test]
async fn a_stream_cut_before_its_usage_is_charged_an_estimate() {
    let sim = simulator("s0", 50, 0).await;
    let dir = std::env::temp_dir().join(format!("infergate-wire-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let usage_path = dir.join("usage.jsonl");
    let _ = std::fs::remove_file(&usage_path);
    let gw = gateway_with(
        config(&[&sim.url], "", ""),
        infergate_sidecar::Options {
            usage: Some(infergate_sidecar::usage::Sink::File(usage_path.clone())),
            ..Default::default()
        },
    )
    .await;
    let resp = post_chat(
        &gw,
        KEY,
        &chat_body("m", true),
        &[("x-sim-fault", "drop-after:5")],
    )
    .await;
    resp.bytes().await.ok();
    gw.settle().await;
    let mut record = Value::Null;
    for _ in 0..100 {
        let text = std::fs::read_to_string(&usage_path).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            record = serde_json::from_str(line).unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(record["usage_estimated"], true, "{record}");
    let completion = record["completion_tokens"].as_u64().unwrap();
    assert!((5..=7).contains(&completion), "{record}");
    assert!(record["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_slow_answer_runs_once_and_ejects_nothing() {
    let (a, b) = (simulator("a", 4, 0).await, simulator("b", 4, 0).await);
    // First-byte deadline 100 ms, answers take ~400 ms: non-streamed
    // answers wait for the total deadline instead, and are not retried.
    let gw = gateway(config(
        &[&a.url, &b.url],
        "",
        "timeouts: { firstByteMs: 100, totalMs: 5000 }",
    ))
    .await;
    let slow = [("x-sim-delay-ms", "100")];
    for _ in 0..2 {
        let resp = post_chat(&gw, KEY, &chat_body("m", false), &slow).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(a.sim.stats().requests + b.sim.stats().requests, 2);

    // Past the total deadline: a 504, no second run elsewhere, no ejection.
    let gw = gateway(config(&[&a.url, &b.url], "", "timeouts: { totalMs: 150 }")).await;
    let before = a.sim.stats().requests + b.sim.stats().requests;
    let resp = post_chat(&gw, KEY, &chat_body("m", false), &slow).await;
    assert_eq!(resp.status(), 504);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.sim.stats().requests + b.sim.stats().requests, before + 1);
    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"kind="total_timeout"} 1"#), "{metrics}");
    let table = gw.state.table.load();
    for backend in table.backends.values() {
        assert!(
            !backend.is_ejected(infergate_sidecar::table::now_ms()),
            "{}",
            backend.id
        );
    }
}

/// One raw request; the status line's code.
async fn raw_status(gw: &Gateway, head: &str) -> String {
    let addr = gw.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = serde_json::to_string(&chat_body("m", false)).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{head}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn malformed_authorization_and_content_types_are_refused() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let json = "content-type: application/json\r\n";
    let ok = format!("authorization: Bearer {KEY}\r\n{json}");
    assert_eq!(raw_status(&gw, &ok).await, "200");
    // (Whitespace after the key is not part of the header value in HTTP;
    // the parser drops it, so it is covered by the unit test of `bearer`.)
    for head in [
        format!("authorization: Bearer  {KEY}\r\n{json}"),
        format!("authorization: Bearer {KEY} x\r\n{json}"),
        format!("authorization: Bearer {KEY}\r\nauthorization: Bearer {KEY}\r\n{json}"),
        format!("authorization: Bearer {KEY}\r\nauthorization: Bearer {OTHER_KEY}\r\n{json}"),
    ] {
        assert_eq!(raw_status(&gw, &head).await, "401", "{head:?}");
    }
    for ct in [
        "",
        "content-type: text/plain\r\n",
        "content-type: multipart/form-data; boundary=x\r\n",
        "content-type: application/x-www-form-urlencoded\r\n",
    ] {
        let head = format!("authorization: Bearer {KEY}\r\n{ct}");
        assert_eq!(raw_status(&gw, &head).await, "415", "{ct:?}");
    }
    let charset =
        format!("authorization: Bearer {KEY}\r\ncontent-type: Application/JSON; charset=utf-8\r\n");
    assert_eq!(raw_status(&gw, &charset).await, "200");
    assert_eq!(sim.sim.stats().requests, 2);
}

#[tokio::test]
async fn vllm_endpoints_beyond_generation_pass_with_auth_models_and_rewrite() {
    let up = scripted(
        "application/json",
        br#"{"id":"embd-1","object":"list","data":[],"usage":{"prompt_tokens":3,"total_tokens":3}}"#,
    )
    .await;
    let gw = gateway(config(&[&up.url], "", "")).await;
    let bodies = [
        (
            "/v1/embeddings",
            r#"{"model":"alias","input":["a","b"],"encoding_format":"float"}"#,
        ),
        ("/tokenize", r#"{"model":"alias","prompt":"hello"}"#),
        ("/detokenize", r#"{"model":"alias","tokens":[1,2,3]}"#),
        (
            "/v1/score",
            r#"{"model":"alias","text_1":"a","text_2":["b","c"]}"#,
        ),
        (
            "/v1/rerank",
            r#"{"model":"alias","query":"q","documents":["x","y"]}"#,
        ),
        ("/pooling", r#"{"model":"alias","input":"x"}"#),
        ("/classify", r#"{"model":"alias","input":["x"]}"#),
    ];
    for (path, body) in bodies {
        let resp = post_raw(&gw, path, KEY, body.as_bytes()).await;
        assert_eq!(resp.status(), 200, "{path}");
        // The other key may not use this model; no key is no answer.
        let other = post_raw(&gw, path, OTHER_KEY, body.as_bytes()).await;
        assert_eq!(other.status(), 403, "{path}");
        let anonymous = client()
            .post(format!("{}{path}", gw.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), 401, "{path}");
        let missing = post_raw(&gw, path, KEY, br#"{"input":"x"}"#).await;
        assert_eq!(missing.status(), 400, "{path}");
    }
    let paths = up.paths.lock().unwrap().clone();
    assert_eq!(paths, bodies.map(|(p, _)| p.to_owned()).to_vec());
    let sent = up.bodies.lock().unwrap().clone();
    for ((_, body), got) in bodies.iter().zip(sent) {
        assert_eq!(
            got,
            Bytes::from(body.replace("\"alias\"", &format!("\"{UPSTREAM_MODEL}\"")))
        );
    }
    // Usage is counted and the answer is signed like any other.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"infergate_prompt_tokens_total{model="m",key="team-a"} 21"#),
        "{metrics}"
    );
    let (status, _) = get_json(&gw, Some(KEY), "/v1/signature/embd-1").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn audio_uploads_pass_byte_exact_with_only_the_model_changed() {
    let up = scripted("application/json", br#"{"text":"hello"}"#).await;
    let gw = gateway(config(&[&up.url], "", "")).await;
    let upload = |model: &str| -> Vec<u8> {
        let mut body = b"--b0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01\xfe\xff name=\"model\"\r\n".to_vec();
        body.extend_from_slice(
            format!("\r\n--b0und\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--b0und\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--b0und--\r\n").as_bytes(),
        );
        body
    };
    let post = |path: &'static str, key: &'static str, ct: &'static str, body: Vec<u8>| {
        client()
            .post(format!("{}{path}", gw.url))
            .bearer_auth(key)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let form = "multipart/form-data; boundary=b0und";
    for path in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        let resp = post(path, KEY, form, upload("alias")).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.text().await.unwrap(), r#"{"text":"hello"}"#);
        assert_eq!(
            post(path, OTHER_KEY, form, upload("alias"))
                .await
                .unwrap()
                .status(),
            403
        );
        let json = post(path, KEY, "application/json", b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(json.status(), 415);
        let no_model =
            b"--b0und\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--b0und--\r\n"
                .to_vec();
        assert_eq!(post(path, KEY, form, no_model).await.unwrap().status(), 400);
    }
    let sent = up.bodies.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    for got in sent {
        assert_eq!(got, Bytes::from(upload(UPSTREAM_MODEL)));
    }
    assert_eq!(
        *up.paths.lock().unwrap(),
        ["/v1/audio/transcriptions", "/v1/audio/translations"]
    );
}

/// An upstream that reuses an id (vLLM names answers after a client's
/// `request_id` or `x-request-id`) must not hand one key's record to another.
#[tokio::test]
async fn a_reused_answer_id_never_moves_a_record_to_another_key() {
    let up = scripted("application/json", CHAT_ANSWER).await;
    let gw = gateway(config(&[&up.url], "", "")).await;
    let body = |model: &str| serde_json::to_vec(&chat_body(model, false)).unwrap();
    assert_eq!(
        post_raw(&gw, "/v1/chat/completions", KEY, &body("m"))
            .await
            .status(),
        200
    );
    // Key B's answer comes back under the same id.
    let b = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(OTHER_KEY)
        .header("content-type", "application/json")
        .header("x-request-id", "w1")
        .body(body("other"))
        .send()
        .await
        .unwrap();
    assert_eq!(b.status(), 200);
    let sig = |key| get_json(&gw, Some(key), "/v1/signature/chatcmpl-w1");
    assert_eq!(sig(KEY).await.0, 200);
    assert_eq!(sig(OTHER_KEY).await.0, 404);
    // Ids are the upstream's to choose, never the client's.
    for field in [r#""request_id":"chatcmpl-w1""#, r#""background":true"#] {
        let crafted =
            format!(r#"{{"model":"m",{field},"messages":[{{"role":"user","content":"x"}}]}}"#);
        let resp = post_raw(&gw, "/v1/chat/completions", OTHER_KEY, crafted.as_bytes()).await;
        assert_eq!(resp.status(), 400, "{field}");
    }
    assert_eq!(up.bodies.lock().unwrap().len(), 2);
}
