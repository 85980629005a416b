//! The simulator's engine over real sockets: prefix caching seen through
//! vLLM's metric names, and the waiting queue behind `max_running`.

use std::time::Duration;

use infergate_sim::engine::EngineConfig;
use infergate_sim::{self as sim, SimConfig, SimHandle};
use serde_json::{json, Value};

async fn engine_sim(engine: EngineConfig, delay_ms: u64) -> SimHandle {
    sim::spawn(SimConfig {
        tokens: 4,
        delay: Duration::from_millis(delay_ms),
        engine,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn chat(system: &str, user: &str) -> Value {
    json!({"model": "sim-model", "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": user}
    ]})
}

async fn post(s: &SimHandle, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.url))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn metric(s: &SimHandle, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

#[tokio::test]
async fn a_repeated_prefix_shows_as_prefix_cache_hits() {
    let s = engine_sim(
        EngineConfig {
            block_size: 4,
            cache_blocks: 1000,
            ..EngineConfig::default()
        },
        0,
    )
    .await;
    let system = "you are a careful assistant who answers briefly and well";
    assert_eq!(
        post(&s, &chat(system, "first question here"))
            .await
            .status(),
        200
    );
    assert_eq!(metric(&s, "vllm:prefix_cache_hits_total").await, 0.0);
    let queries = metric(&s, "vllm:prefix_cache_queries_total").await;
    assert!(queries > 10.0, "{queries}");
    post(&s, &chat(system, "another question")).await;
    // Two role tokens around 10 words of system prompt: 12 tokens, 3 blocks.
    assert_eq!(metric(&s, "vllm:prefix_cache_hits_total").await, 12.0);
    assert_eq!(metric(&s, "vllm:num_requests_running").await, 0.0);
}

#[tokio::test]
async fn sequences_beyond_max_running_wait() {
    let s = engine_sim(
        EngineConfig {
            max_running: 1,
            ..EngineConfig::default()
        },
        0,
    )
    .await;
    // The first holds the only slot while its stream stays open (a stall).
    let mut stalled = chat("s", "u");
    stalled["stream"] = json!(true);
    let held = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.url))
        .header("x-sim-fault", "stall-after:1")
        .json(&stalled)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let url = s.url.clone();
    let second = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("s", "v"))
            .send()
            .await
            .unwrap()
            .status()
    });
    let mut waiting = 0.0;
    for _ in 0..500 {
        waiting = metric(&s, "vllm:num_requests_waiting").await;
        if waiting == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waiting, 1.0);
    assert_eq!(metric(&s, "vllm:num_requests_running").await, 1.0);
    drop(held);
    assert_eq!(second.await.unwrap(), 200);
}
