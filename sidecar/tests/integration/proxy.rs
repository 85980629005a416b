//! The gateway over real sockets, in front of real simulator processes'
//! code (in-process servers on 127.0.0.1:0).

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn streams_chat_through_unchanged_with_alias_rewritten() {
    let sim = simulator("s0", 5, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(&gw, KEY, &chat_body("alias", true), &[]).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(resp.headers()["x-infergate-backend"], "b0");
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // The upstream saw its own model name, not the alias.
    assert!(chunks.iter().all(|c| c["model"] == UPSTREAM_MODEL));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text.split_whitespace().count(), 5, "{text:?}");
    // No usage chunk unless asked.
    assert!(chunks
        .iter()
        .all(|c| c.get("usage").is_none_or(Value::is_null)));
    gw.settle().await;
}

#[tokio::test]
async fn include_usage_is_honoured() {
    let sim = simulator("s0", 4, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let mut body = chat_body("m", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = post_chat(&gw, KEY, &body, &[]).await.text().await.unwrap();
    let data = sse_data(&text);
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn non_streaming_chat_and_completions() {
    let sim = simulator("s0", 3, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(&gw, KEY, &chat_body("m", false), &[]).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    let resp = client()
        .post(format!("{}/v1/completions", gw.url))
        .bearer_auth(KEY)
        .json(&json!({"model": "m", "prompt": "once upon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
}

async fn error_of(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

#[tokio::test]
async fn auth_and_validation_failures_are_openai_errors() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let c = client();
    let no_key = c
        .post(&url)
        .json(&chat_body("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(no_key).await, (401, "missing_api_key".into()));
    let wrong = post_chat(&gw, "ig-not-a-real-key-123456", &chat_body("m", false), &[]).await;
    assert_eq!(error_of(wrong).await, (401, "invalid_api_key".into()));
    let forbidden = post_chat(&gw, OTHER_KEY, &chat_body("m", false), &[]).await;
    assert_eq!(error_of(forbidden).await, (403, "model_not_allowed".into()));
    let unknown = post_chat(&gw, KEY, &chat_body("gpt-9", false), &[]).await;
    assert_eq!(error_of(unknown).await, (404, "model_not_found".into()));
    let bad = c
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await, (400, "invalid_request".into()));
    let huge = c
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(vec![b' '; 5 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(huge).await, (413, "request_too_large".into()));
    // Nothing reached the upstream.
    assert_eq!(sim.sim.stats().requests, 0);
}

#[tokio::test]
async fn models_lists_only_what_the_key_may_use() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let ids = |key: &'static str| {
        let url = format!("{}/v1/models", gw.url);
        async move {
            let v: Value = client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids(KEY).await, vec!["m", "other"]);
    assert_eq!(ids(OTHER_KEY).await, vec!["other"]);
}

async fn served_by(gw: &Gateway, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let resp = post_chat(gw, KEY, &chat_body("m", false), headers).await;
        assert_eq!(resp.status(), 200);
        let b = resp.headers()["x-infergate-backend"]
            .to_str()
            .unwrap()
            .to_owned();
        resp.bytes().await.unwrap();
        *seen.entry(b).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn round_robin_spreads_evenly_and_sticky_sessions_stay() {
    let (a, b) = (simulator("a", 1, 0).await, simulator("b", 1, 0).await);
    let gw = gateway(config(&[&a.url, &b.url], "", "")).await;
    let spread = served_by(&gw, 10, &[]).await;
    assert_eq!(spread.get("b0"), Some(&5));
    assert_eq!(spread.get("b1"), Some(&5));

    for session in ["alpha", "beta", "gamma", "delta"] {
        let seen = served_by(&gw, 6, &[("x-session-id", session)]).await;
        assert_eq!(seen.len(), 1, "session {session} moved: {seen:?}");
    }
}

#[tokio::test]
async fn user_field_is_a_sticky_key_when_enabled() {
    let (a, b) = (simulator("a", 1, 0).await, simulator("b", 1, 0).await);
    let gw = gateway(config(&[&a.url, &b.url], "    sticky: { user: true }", "")).await;
    for user in ["u1", "u2", "u3"] {
        let mut body = chat_body("m", false);
        body["user"] = json!(user);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let resp = post_chat(&gw, KEY, &body, &[]).await;
            seen.insert(
                resp.headers()["x-infergate-backend"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_eq!(seen.len(), 1);
    }
}

#[tokio::test]
async fn refused_backend_is_ejected_and_requests_retry_elsewhere() {
    let good = simulator("good", 1, 0).await;
    // A port that was just free: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let gw = gateway(config(
        &[&dead, &good.url],
        "",
        "limits: { ejectMs: 60000 }",
    ))
    .await;
    let seen = served_by(&gw, 8, &[]).await;
    assert_eq!(seen.get("b1"), Some(&8));
    let metrics = gw.metrics().await;
    // Tried once, then ejected: one connect failure only.
    assert!(
        metrics.contains(r#"infergate_upstream_errors_total{backend="b0",kind="connect"} 1"#),
        "{metrics}"
    );
    gw.settle().await;
}

#[tokio::test]
async fn server_errors_retry_on_another_backend_and_fail_cleanly_when_all_fail() {
    let bad = infergate_sim::spawn(infergate_sim::SimConfig {
        id: "bad".into(),
        models: vec![UPSTREAM_MODEL.into()],
        fault: Some("500".parse().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap();
    let good = simulator("good", 1, 0).await;
    let gw = gateway(config(&[&bad.url, &good.url], "", "")).await;
    assert_eq!(served_by(&gw, 4, &[]).await.get("b1"), Some(&4));

    let only_bad = gateway(config(&[&bad.url], "", "")).await;
    let resp = post_chat(&only_bad, KEY, &chat_body("m", true), &[]).await;
    assert_eq!(error_of(resp).await, (502, "upstream_error".into()));
    only_bad.settle().await;
}

#[tokio::test]
async fn stalled_stream_ends_with_an_error_frame_and_frees_its_slot() {
    let sim = simulator("s0", 50, 0).await;
    let gw = gateway(config(&[&sim.url], "", "timeouts: { idleMs: 300 }")).await;
    let resp = post_chat(
        &gw,
        KEY,
        &chat_body("m", true),
        &[("x-sim-fault", "stall-after:2")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{body}");
    assert!(!body.contains("[DONE]"));
    gw.settle().await;
    // The gateway hung up on the stalled upstream.
    wait_for(|| sim.sim.stats().active == 0).await;
    assert!(gw
        .metrics()
        .await
        .contains(r#"infergate_upstream_errors_total{backend="b0",kind="idle_timeout"} 1"#));
}

#[tokio::test]
async fn slow_but_flowing_streams_are_never_cut() {
    // 10 tokens 100 ms apart = 1 s in all, against a 300 ms idle deadline.
    let sim = simulator("s0", 10, 100).await;
    let gw = gateway(config(&[&sim.url], "", "timeouts: { idleMs: 300 }")).await;
    let body = post_chat(&gw, KEY, &chat_body("m", true), &[])
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn upstream_drop_mid_stream_ends_with_an_error_frame() {
    let sim = simulator("s0", 20, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(
        &gw,
        KEY,
        &chat_body("m", true),
        // Paced, so the first tokens are on the wire before the cut.
        &[("x-sim-fault", "drop-after:3"), ("x-sim-delay-ms", "5")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert_eq!(
        sse_data(&body).len(),
        5,
        "role chunk, 3 tokens, error: {body}"
    );
    let data = sse_data(&body);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_disconnected", "{body}");
    gw.settle().await;
}

#[tokio::test]
async fn client_disconnect_cancels_upstream_and_frees_the_slot() {
    let sim = simulator("s0", 1000, 20).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(&gw, KEY, &chat_body("m", true), &[]).await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(gw.in_flight("b0"), 1);
    drop(stream);
    gw.settle().await;
    wait_for(|| sim.sim.stats().cancelled == 1).await;
    assert_eq!(sim.sim.stats().active, 0);
    assert!(gw
        .metrics()
        .await
        .contains(r#"infergate_stream_ends_total{reason="client_disconnect"} 1"#));
}

#[tokio::test]
async fn admin_takes_gzipped_configs_and_refuses_ones_that_inflate_past_the_bound() {
    use std::io::Write as _;
    let (a, b) = (simulator("a", 1, 0).await, simulator("b", 1, 0).await);
    let gw = gateway(config(&[&a.url], "", "")).await;
    let gzip = |bytes: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    };
    let put = |body: Vec<u8>| {
        client()
            .put(format!("{}/admin/v1/config", gw.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body)
    };
    let new = config(&[&b.url], "", "");
    let ok = put(gzip(&serde_json::to_vec(&new).unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(gw.state.current_version(), new.computed_version());

    // 65 MiB of spaces in 65 KiB: refused, not inflated into memory whole.
    let bomb = gzip(&vec![b' '; 65 * 1024 * 1024]);
    assert!(bomb.len() < 1024 * 1024);
    let refused = put(bomb).send().await.unwrap();
    assert_eq!(refused.status(), 413);
    let not_gzip = put(b"{not gzip".to_vec()).send().await.unwrap();
    assert_eq!(not_gzip.status(), 400);
    assert_eq!(gw.state.current_version(), new.computed_version());
}

#[tokio::test]
async fn admin_swaps_config_atomically_and_rejects_bad_ones() {
    let (a, b) = (simulator("a", 1, 0).await, simulator("b", 1, 0).await);
    let gw = gateway(config(&[&a.url], "", "")).await;
    let put = |body: String, token: &'static str| {
        client()
            .put(format!("{}/admin/v1/config", gw.admin_url))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
    };
    let new = config(&[&b.url], "", "");
    let unauthorized = put(serde_json::to_string(&new).unwrap(), "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    let before = gw.state.current_version();
    let broken = serde_json::to_string(&new)
        .unwrap()
        .replace("\"backend\":\"b0\"", "\"backend\":\"zz\"");
    let rejected = put(broken, ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(rejected.status(), 400);
    let msg: Value = rejected.json().await.unwrap();
    assert!(msg["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not defined"));
    assert_eq!(gw.state.current_version(), before);

    let ok = put(serde_json::to_string(&new).unwrap(), ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let v: Value = ok.json().await.unwrap();
    assert_eq!(v["version"], new.computed_version());
    let got: Value = client()
        .get(format!("{}/admin/v1/config", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["version"], new.computed_version());
    assert_eq!(served_by(&gw, 2, &[]).await.get("b0"), Some(&2));
    assert_eq!((a.sim.stats().requests, b.sim.stats().requests), (0, 2));
}

#[tokio::test]
async fn config_swaps_under_load_fail_no_request() {
    let (a, b) = (simulator("a", 20, 1).await, simulator("b", 20, 1).await);
    let configs = [config(&[&a.url], "", ""), config(&[&a.url, &b.url], "", "")];
    let gw = gateway(configs[0].clone()).await;
    let state = gw.state.clone();
    let swapper = tokio::spawn(async move {
        for i in 0..100 {
            state.swap(configs[i % 2].clone()).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let requests = (0..200).map(|i| {
        let gw = &gw;
        async move {
            let resp = post_chat(gw, KEY, &chat_body("m", i % 2 == 0), &[]).await;
            assert_eq!(resp.status(), 200);
            let body = resp.text().await.unwrap();
            assert!(i % 2 == 1 || body.ends_with("data: [DONE]\n\n"), "{body}");
        }
    });
    futures_util::stream::iter(requests)
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    swapper.await.unwrap();
    gw.settle().await;
}

/// Guards against the 40 ms Nagle/delayed-ACK stall: sockets on both sides
/// set TCP_NODELAY, so an instant 200-token stream takes milliseconds. The
/// bound is loose on purpose (a stall costs 40 ms each time); speed itself
/// is measured in benches/, not here.
#[tokio::test]
async fn an_instant_200_token_stream_is_not_held_back_by_nagle() {
    let sim = simulator("s0", 200, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let body = post_chat(&gw, KEY, &chat_body("m", true), &[])
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(sse_data(&body).len(), 202);
        best = best.min(start.elapsed());
    }
    assert!(best < Duration::from_millis(40), "best of 5 took {best:?}");
}
