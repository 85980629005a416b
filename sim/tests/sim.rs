//! The vLLM simulator over real sockets: framing as vLLM frames it, the
//! per-request overrides, each fault as a client observes it, and the stats
//! the gateway's tests rely on.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use infergate_sim::{self as sim, Fault, SimConfig, SimHandle};
use serde_json::{json, Value};

async fn sim_with(tokens: usize, f: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut cfg = SimConfig {
        id: "s1".into(),
        tokens,
        ..SimConfig::default()
    };
    f(&mut cfg);
    sim::spawn(cfg).await.unwrap()
}

async fn simulator(tokens: usize) -> SimHandle {
    sim_with(tokens, |_| {}).await
}

async fn post(
    s: &SimHandle,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn chat(stream: bool) -> Value {
    json!({
        "model": "sim-model",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
        ],
    })
}

/// The events of an SSE body; asserts each is a whole `...\n\n` event.
fn events(body: &str) -> Vec<&str> {
    assert!(body.ends_with("\n\n"), "{body}");
    body[..body.len() - 2].split("\n\n").collect()
}

fn data(event: &str) -> Value {
    let json = event
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("{event}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

async fn wait_for(what: impl Fn() -> bool) {
    for _ in 0..200 {
        if what() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn chat_stream_is_framed_like_vllm() {
    let s = simulator(3).await;
    let resp = post(&s, "/v1/chat/completions", chat(true), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(resp.headers()["x-sim-backend"], "s1");
    let body = resp.text().await.unwrap();
    let events = events(&body);
    assert_eq!(events.len(), 1 + 3 + 1, "{body}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(body.ends_with("data: [DONE]\n\n"));
    let chunks: Vec<Value> = events[..4].iter().map(|e| data(e)).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id.len() == 9 + 32, "{id}");
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "sim-model");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        assert!(c.get("usage").is_none(), "usage only when asked for");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks[1..]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 ");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .collect();
    assert_eq!(
        finishes,
        [&Value::Null, &Value::Null, &Value::Null, &json!("stop")]
    );
    // Field order as vLLM's pydantic dump has it.
    assert!(events[1].starts_with(&format!(
        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":"
    )));
    assert!(events[1].ends_with(
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok0 \"},\"logprobs\":null,\"finish_reason\":null}]}"
    ));
}

#[tokio::test]
async fn usage_chunk_comes_only_when_asked_for() {
    let s = simulator(2).await;
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = post(&s, "/v1/chat/completions", body, &[])
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.len(), 1 + 2 + 1 + 1);
    let usage = data(events[3]);
    assert_eq!(usage["choices"], json!([]));
    // "be brief" + "hello there": whitespace words stand in for tokens.
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2})
    );
    assert_eq!(usage["id"], data(events[0])["id"]);
    assert_eq!(events[4], "data: [DONE]");
}

#[tokio::test]
async fn paced_streams_send_one_frame_per_event() {
    let s = simulator(4).await;
    let resp = post(
        &s,
        "/v1/chat/completions",
        chat(true),
        &[("x-sim-delay-ms", "5")],
    )
    .await;
    let started = Instant::now();
    let frames: Vec<_> = resp.bytes_stream().map(|f| f.unwrap()).collect().await;
    assert!(started.elapsed() >= Duration::from_millis(20));
    assert_eq!(frames.len(), 1 + 4 + 1);
    for f in &frames {
        let f = std::str::from_utf8(f).unwrap();
        assert_eq!(events(f).len(), 1, "{f}");
    }
    wait_for(|| s.sim.stats().completed == 1).await;
    assert_eq!(s.sim.stats().active, 0);
}

#[tokio::test]
async fn whole_chat_answer() {
    let s = simulator(3).await;
    let resp = post(&s, "/v1/chat/completions", chat(false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let raw = resp.text().await.unwrap();
    assert!(raw.starts_with("{\"id\":\"chatcmpl-"), "{raw}");
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "sim-model");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 7);
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(s.sim.stats().completed, 1);
}

#[tokio::test]
async fn max_tokens_cuts_the_answer_with_length() {
    let s = simulator(5).await;
    for (field, cap, tokens, finish) in [
        ("max_tokens", 2, 2, "length"),
        ("max_completion_tokens", 9, 5, "stop"),
        ("max_tokens", 5, 5, "stop"),
    ] {
        let mut body = chat(false);
        body[field] = cap.into();
        let v: Value = post(&s, "/v1/chat/completions", body, &[])
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["usage"]["completion_tokens"], tokens);
        assert_eq!(v["choices"][0]["finish_reason"], finish);
    }
    let mut body = chat(true);
    body["max_tokens"] = 1.into();
    let text = post(&s, "/v1/chat/completions", body, &[])
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.len(), 3);
    assert_eq!(data(events[1])["choices"][0]["finish_reason"], "length");
    // The header override, capped the same way.
    let mut body = chat(false);
    body["max_tokens"] = 3.into();
    let v: Value = post(&s, "/v1/chat/completions", body, &[("x-sim-tokens", "1")])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 1);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn text_completions_stream_and_whole() {
    let s = simulator(2).await;
    let body = json!({"model": "sim-model", "prompt": ["one two", "three"], "stream": true,
                      "stream_options": {"include_usage": true}});
    let text = post(&s, "/v1/completions", body, &[])
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.len(), 2 + 1 + 1, "no role chunk in text completions");
    let chunks: Vec<Value> = events[..3].iter().map(|e| data(e)).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("cmpl-"));
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "text_completion"));
    assert_eq!(chunks[0]["choices"][0]["text"], "tok0 ");
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[2]["usage"]["prompt_tokens"], 3);
    assert_eq!(events[3], "data: [DONE]");

    let body = json!({"model": "sim-model", "prompt": "say it"});
    let v: Value = post(&s, "/v1/completions", body, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 ");
    assert_eq!(v["usage"]["total_tokens"], 4);
}

#[tokio::test]
async fn responses_stream_in_openai_event_order() {
    let s = simulator(3).await;
    let body = json!({"model": "sim-model", "input": "two words", "stream": true});
    let resp = post(&s, "/v1/responses", body, &[]).await;
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    let mut kinds = Vec::new();
    let mut deltas = String::new();
    let mut last = Value::Null;
    for (seq, event) in events(&text).into_iter().enumerate() {
        let (name, payload) = event.split_once('\n').unwrap();
        let name = name.strip_prefix("event: ").unwrap();
        let v = data(payload);
        assert_eq!(v["type"], name);
        assert_eq!(v["sequence_number"], seq);
        if name == "response.output_text.delta" {
            deltas.push_str(v["delta"].as_str().unwrap());
        }
        kinds.push(name.to_owned());
        last = v;
    }
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(["response.output_text.delta"; 3]);
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(kinds, expected);
    assert_eq!(deltas, "tok0 tok1 tok2 ");
    let done = &last["response"];
    assert!(done["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(done["object"], "response");
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["type"], "message");
    assert_eq!(done["output"][0]["content"][0]["text"], "tok0 tok1 tok2 ");
    assert_eq!(done["output"][0]["content"][0]["annotations"], json!([]));
    assert_eq!(
        [
            &done["usage"]["input_tokens"],
            &done["usage"]["output_tokens"],
            &done["usage"]["total_tokens"]
        ],
        [&json!(2), &json!(3), &json!(5)]
    );
}

#[tokio::test]
async fn responses_state_lives_on_the_simulator_that_made_it() {
    let (a, b) = (simulator(2).await, simulator(2).await);
    let first: Value = post(
        &a,
        "/v1/responses",
        json!({"model": "sim-model", "input": "hi"}),
        &[],
    )
    .await
    .json()
    .await
    .unwrap();
    let id = first["id"].as_str().unwrap();
    assert_eq!(first["status"], "completed");
    assert_eq!(first["output"][0]["role"], "assistant");
    assert_eq!(first["previous_response_id"], Value::Null);

    let next = json!({"model": "sim-model", "previous_response_id": id,
                      "input": [{"role": "user", "content": "and then"}]});
    let resp = post(&b, "/v1/responses", next.clone(), &[]).await;
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(
        err["error"]["message"],
        format!("Response with id '{id}' not found.")
    );
    assert_eq!(err["error"]["code"], 404);

    let second: Value = post(&a, "/v1/responses", next, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(second["previous_response_id"], id);
    // The earlier turn (1 + 2 tokens) is part of the prompt.
    assert_eq!(second["usage"]["input_tokens"], 3 + 2);

    let url = format!("{}/v1/responses/{id}", a.url);
    let c = reqwest::Client::new();
    let got: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, first);
    let cancelled: Value = c
        .post(format!("{url}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["id"], id);
    let deleted: Value = c.delete(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        deleted,
        json!({"id": id, "object": "response", "deleted": true})
    );
    assert_eq!(c.get(&url).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let s = sim_with(2, |c| c.api_key = Some("k1".into())).await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", s.url);
    let resp = c.post(&url).json(&chat(false)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-sim-backend"], "s1");
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], 401);

    let mut body = chat(false);
    body["model"] = "x".into();
    let resp = c
        .post(&url)
        .bearer_auth("k1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-sim-backend"], "s1");
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}}"#
    );

    let resp = c
        .post(&url)
        .bearer_auth("k1")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "BadRequestError"
    );

    let resp = c
        .post(&url)
        .bearer_auth("k1")
        .header("x-sim-fault", "explode")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Outside /v1 no key is needed.
    let stats: Value = c
        .get(format!("{}/sim/stats", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats,
        json!({"requests": 3, "active": 0, "completed": 3, "cancelled": 0})
    );
}

#[tokio::test]
async fn models_are_listed_like_vllm() {
    let s = sim_with(1, |c| c.models = vec!["a/b".into(), "c".into()]).await;
    let resp = reqwest::get(format!("{}/v1/models", s.url)).await.unwrap();
    assert_eq!(resp.headers()["x-sim-backend"], "s1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a/b", "c"]);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "vllm");
    assert_eq!(v["data"][0]["root"], "a/b");
    assert_eq!(v["data"][0]["parent"], Value::Null);
    assert!(v["data"][0]["max_model_len"].as_u64().is_some());
}

#[tokio::test]
async fn fault_500() {
    let s = sim_with(2, |c| c.fault = Some(Fault::Status500)).await;
    let resp = post(&s, "/v1/chat/completions", chat(true), &[]).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers()["x-sim-backend"], "s1");
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], 500);
    // A request can opt out of the configured fault.
    let resp = post(
        &s,
        "/v1/chat/completions",
        chat(false),
        &[("x-sim-fault", "none")],
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn drop_after_ends_the_body_with_an_error() {
    let s = simulator(10).await;
    for path in ["/v1/chat/completions", "/v1/responses"] {
        let body = json!({"model": "sim-model", "stream": true, "input": "x",
                          "messages": [{"role": "user", "content": "x"}]});
        let resp = post(&s, path, body, &[("x-sim-fault", "drop-after:2")]).await;
        assert_eq!(resp.status(), 200);
        let mut got = Vec::new();
        let mut stream = resp.bytes_stream();
        let err = loop {
            match stream.next().await {
                Some(Ok(b)) => got.extend_from_slice(&b),
                Some(Err(e)) => break e,
                None => panic!("{path}: the body ended cleanly"),
            }
        };
        assert!(err.is_body() || err.is_decode(), "{err:?}");
        let got = String::from_utf8(got).unwrap();
        assert!(
            got.contains("tok1 ") && !got.contains("tok2 "),
            "{path}: {got}"
        );
        assert!(!got.contains("[DONE]") && !got.contains("response.completed"));
    }
    wait_for(|| s.sim.stats().cancelled == 2).await;
    // Non-streamed: the body is cut halfway.
    let resp = post(
        &s,
        "/v1/chat/completions",
        chat(false),
        &[("x-sim-fault", "drop-after:0")],
    )
    .await;
    assert!(resp.bytes().await.is_err());
    wait_for(|| s.sim.stats().active == 0).await;
}

#[tokio::test]
async fn stall_after_then_client_drop_is_counted_cancelled() {
    let s = simulator(10).await;
    let resp = post(
        &s,
        "/v1/chat/completions",
        chat(true),
        &[("x-sim-fault", "stall-after:2")],
    )
    .await;
    let mut stream = resp.bytes_stream();
    let mut got = String::new();
    while got.matches("\n\n").count() < 3 {
        got.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    assert_eq!(got.matches("tok").count(), 2);
    // Nothing more comes.
    let more = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
    assert!(more.is_err(), "{more:?}");
    assert_eq!(s.sim.stats().active, 1);
    drop(stream);
    wait_for(|| s.sim.stats().active == 0).await;
    assert_eq!(s.sim.stats().cancelled, 1);
    assert_eq!(s.sim.stats().completed, 0);
}

#[tokio::test]
async fn malformed_after_inserts_one_bad_event_and_goes_on() {
    let s = simulator(3).await;
    let text = post(
        &s,
        "/v1/chat/completions",
        chat(true),
        &[("x-sim-fault", "malformed-after:1")],
    )
    .await
    .text()
    .await
    .unwrap();
    let events = events(&text);
    assert_eq!(events.len(), 1 + 3 + 1 + 1);
    assert_eq!(events[2], "data: {not json");
    assert!(data(events[1])["choices"][0]["delta"]["content"] == "tok0 ");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    wait_for(|| s.sim.stats().completed == 1).await;
}

#[tokio::test]
async fn slow_headers_delay_the_response_head() {
    let s = simulator(1).await;
    let started = Instant::now();
    let resp = post(
        &s,
        "/v1/chat/completions",
        chat(true),
        &[("x-sim-fault", "slow-headers:150")],
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn refuse_closes_every_connection() {
    let s = sim_with(1, |c| c.fault = Some(Fault::Refuse)).await;
    let err = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.url))
        .json(&chat(false))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_request() || err.is_connect(), "{err:?}");
    assert_eq!(s.sim.stats().requests, 0);
}

#[tokio::test]
async fn client_gone_during_a_paced_stream_is_cancelled() {
    let s = simulator(1000).await;
    let resp = post(
        &s,
        "/v1/chat/completions",
        chat(true),
        &[("x-sim-delay-ms", "10")],
    )
    .await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(s.sim.stats().active, 1);
    drop(stream);
    wait_for(|| s.sim.stats().cancelled == 1).await;
    assert_eq!(s.sim.stats().active, 0);
}

#[test]
fn fault_strings_round_trip() {
    for s in [
        "500",
        "refuse",
        "stall-after:3",
        "drop-after:0",
        "malformed-after:7",
        "slow-headers:250",
    ] {
        assert_eq!(s.parse::<Fault>().unwrap().to_string(), s);
    }
    for bad in ["", "drop-after", "drop-after:x", "stall:1", "501"] {
        assert!(bad.parse::<Fault>().is_err(), "{bad}");
    }
}

#[tokio::test]
async fn the_binary_prints_its_address_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--id",
            "bin",
            "--model",
            "m1",
            "--tokens",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim_end()
        .strip_prefix("vllm-sim listening on ")
        .unwrap_or_else(|| panic!("{line:?}"));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "m1", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-sim-backend"], "bin");
    assert_eq!(
        resp.json::<Value>().await.unwrap()["choices"][0]["text"],
        "tok0 tok1 "
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
