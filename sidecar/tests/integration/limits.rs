//! Quotas and bounds: per-key rate, concurrency and token limits (429 with
//! Retry-After), per-backend capacity (a short bounded queue, then 503),
//! and slow or oversized clients (408, 431, closed connections).

use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use infergate_sidecar::config::KeyLimits;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn code_of(resp: reqwest::Response) -> (u16, Option<String>, String) {
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let v: Value = resp.json().await.unwrap();
    (
        status,
        retry,
        v["error"]["code"].as_str().unwrap().to_owned(),
    )
}

fn with_limits(
    urls: &[&str],
    limits: KeyLimits,
    top: &str,
) -> infergate_sidecar::config::GatewayConfig {
    let mut cfg = config(urls, "", top);
    cfg.keys[0].limits = Some(limits);
    cfg
}

#[tokio::test]
async fn requests_per_minute_gives_429_with_retry_after() {
    let sim = simulator("s0", 1, 0).await;
    let limits = KeyLimits {
        requests_per_minute: 3,
        ..Default::default()
    };
    let gw = gateway(with_limits(&[&sim.url], limits, "")).await;
    for _ in 0..3 {
        assert_eq!(
            post_chat(&gw, KEY, &chat_body("m", false), &[])
                .await
                .status(),
            200
        );
    }
    let (status, retry, code) =
        code_of(post_chat(&gw, KEY, &chat_body("m", false), &[]).await).await;
    assert_eq!((status, code.as_str()), (429, "rate_limit_exceeded"));
    assert_eq!(retry.as_deref(), Some("20"));
    // Another key is not affected.
    let mut cfg = with_limits(&[&sim.url], limits, "");
    cfg.keys[1].models = vec!["*".into()];
    gw.state.swap(cfg).unwrap();
    assert_eq!(
        post_chat(&gw, OTHER_KEY, &chat_body("m", false), &[])
            .await
            .status(),
        200
    );
    // The limiter survived the swap: still limited.
    assert_eq!(
        post_chat(&gw, KEY, &chat_body("m", false), &[])
            .await
            .status(),
        429
    );
}

#[tokio::test]
async fn concurrent_requests_are_capped_and_released() {
    let sim = simulator("s0", 100, 10).await;
    let limits = KeyLimits {
        concurrent_requests: 1,
        ..Default::default()
    };
    let gw = gateway(with_limits(&[&sim.url], limits, "")).await;
    let first = post_chat(&gw, KEY, &chat_body("m", true), &[]).await;
    let mut stream = first.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let (status, retry, _) = code_of(post_chat(&gw, KEY, &chat_body("m", true), &[]).await).await;
    assert_eq!((status, retry.as_deref()), (429, Some("1")));
    drop(stream);
    gw.settle().await;
    let again = post_chat(&gw, KEY, &chat_body("m", false), &[("x-sim-tokens", "1")]).await;
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn tokens_per_minute_counts_what_the_upstream_reported() {
    let sim = simulator("s0", 8, 0).await;
    let limits = KeyLimits {
        tokens_per_minute: 10,
        ..Default::default()
    };
    let gw = gateway(with_limits(&[&sim.url], limits, "")).await;
    // 3 prompt words + 8 completion tokens: over a minute's budget.
    assert_eq!(
        post_chat(&gw, KEY, &chat_body("m", false), &[])
            .await
            .status(),
        200
    );
    let (status, retry, code) =
        code_of(post_chat(&gw, KEY, &chat_body("m", false), &[]).await).await;
    assert_eq!((status, code.as_str()), (429, "rate_limit_exceeded"));
    assert_eq!(retry.as_deref(), Some("6"));
}

#[tokio::test]
async fn streams_opened_together_cannot_spend_more_than_the_token_budget() {
    // Each stream takes ~1 s: the quota decides while they are in flight.
    let sim = simulator("s0", 20, 50).await;
    let limits = KeyLimits {
        tokens_per_minute: 1000,
        ..Default::default()
    };
    let gw = gateway(with_limits(&[&sim.url], limits, "")).await;
    let mut body = chat_body("m", true);
    body["max_tokens"] = 400.into();
    let mut open = Vec::new();
    for _ in 0..2 {
        let resp = post_chat(&gw, KEY, &body, &[]).await;
        assert_eq!(resp.status(), 200);
        let mut stream = resp.bytes_stream();
        stream.next().await.unwrap().unwrap();
        open.push(stream);
    }
    // Two answers of up to 400 tokens each are in flight: a third could
    // take the key past its 1000 a minute, so it waits.
    let (status, retry, code) = code_of(post_chat(&gw, KEY, &body, &[]).await).await;
    assert_eq!((status, code.as_str()), (429, "rate_limit_exceeded"));
    assert!(retry.is_some());
    // They end having used ~25 tokens each: the rest comes back.
    for mut stream in open {
        while stream.next().await.is_some() {}
    }
    gw.settle().await;
    assert_eq!(post_chat(&gw, KEY, &body, &[]).await.status(), 200);
}

#[tokio::test]
async fn a_full_backend_queues_briefly_then_answers_503() {
    let sim = simulator("s0", 30, 20).await;
    let mut cfg = config(&[&sim.url], "", "limits: { queueMs: 200 }");
    cfg.backends[0].max_in_flight = 1;
    let gw = gateway(cfg).await;
    let first = post_chat(&gw, KEY, &chat_body("m", true), &[]).await;
    let mut stream = first.bytes_stream();
    stream.next().await.unwrap().unwrap();
    // The first stream needs 600 ms more: the second gives up after 200.
    let (status, retry, code) =
        code_of(post_chat(&gw, KEY, &chat_body("m", true), &[]).await).await;
    assert_eq!(
        (status, retry.as_deref(), code.as_str()),
        (503, Some("1"), "at_capacity")
    );
    // A short wait is served as soon as the slot frees.
    let waiting = tokio::spawn({
        let url = gw.url.clone();
        async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(KEY)
                .header("x-sim-tokens", "1")
                .json(&chat_body("m", false))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
    assert_eq!(waiting.await.unwrap(), 200);
    gw.settle().await;
    assert_eq!(
        gw.state.queued.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn slow_and_oversized_clients_are_cut_off() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "limits: { bodyReadMs: 300 }")).await;
    let addr = gw.url.trim_start_matches("http://").to_owned();

    // Body promised, never sent: 408 once the body deadline passes.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 408"));

    // Headers that never finish: the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut out))
        .await
        .unwrap()
        .unwrap_or(0);
    let reply = String::from_utf8_lossy(&out[..n]);
    assert!(n == 0 || reply.starts_with("HTTP/1.1 408"), "{reply}");

    // A header block over the cap: 431, not a crash.
    let huge = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(KEY)
        .header("x-padding", "a".repeat(100 * 1024))
        .json(&chat_body("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 431);
    // With an OpenAI error body like every other error, not hyper's empty one.
    let body: serde_json::Value = huge.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_header_fields_too_large");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(sim.sim.stats().requests, 0);
}
