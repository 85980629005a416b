//! Known traffic in, exact numbers out: `/metrics` and the usage records
//! must match what was sent and what the simulator reported.

use crate::common::*;
use infergate_sidecar::usage::Sink;
use infergate_sidecar::Options;
use serde_json::{json, Value};

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn counters_histograms_and_usage_records_match_the_traffic() {
    let sim = simulator("s0", 7, 0).await;
    let dir = std::env::temp_dir().join(format!("infergate-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let usage_path = dir.join("usage.jsonl");
    let _ = std::fs::remove_file(&usage_path);
    let options = Options {
        usage: Some(Sink::File(usage_path.clone())),
        ..Options::default()
    };
    let gw = gateway_with(config(&[&sim.url], "", ""), options).await;

    // 4 non-streamed, 3 streamed with usage, 2 streamed without, 2 refused.
    for _ in 0..4 {
        post_chat(&gw, KEY, &chat_body("m", false), &[])
            .await
            .bytes()
            .await
            .unwrap();
    }
    let mut with_usage = chat_body("m", true);
    with_usage["stream_options"] = json!({"include_usage": true});
    for _ in 0..3 {
        post_chat(&gw, KEY, &with_usage, &[])
            .await
            .bytes()
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let body = post_chat(&gw, KEY, &chat_body("m", true), &[])
            .await
            .text()
            .await
            .unwrap();
        // Counted (the gateway asked the upstream), but not sent: this
        // client did not ask for the usage event.
        assert!(!body.contains("\"usage\":{"), "{body}");
    }
    for _ in 0..2 {
        post_chat(&gw, KEY, &chat_body("nope", false), &[])
            .await
            .bytes()
            .await
            .unwrap();
    }
    gw.settle().await;
    let m = gw.metrics().await;

    assert_eq!(
        value(
            &m,
            r#"infergate_requests_total{model="m",backend="b0",status="2xx"}"#
        ),
        9.0
    );
    assert_eq!(
        value(
            &m,
            r#"infergate_rejected_requests_total{reason="model_not_found"}"#
        ),
        2.0
    );
    assert_eq!(
        value(&m, r#"infergate_request_duration_seconds_count{model="m"}"#),
        9.0
    );
    assert_eq!(
        value(
            &m,
            r#"infergate_time_to_first_token_seconds_count{model="m"}"#
        ),
        5.0
    );
    assert_eq!(
        value(
            &m,
            r#"infergate_inter_token_latency_seconds_count{model="m"}"#
        ),
        5.0
    );
    assert_eq!(
        value(&m, r#"infergate_stream_ends_total{reason="completed"}"#),
        9.0
    );
    // "hello there gateway" is 3 words; 7 tokens each; all 9 answers reported
    // usage, streams without include_usage too (the gateway always asks).
    assert_eq!(
        value(
            &m,
            r#"infergate_prompt_tokens_total{model="m",key="team-a"}"#
        ),
        27.0
    );
    assert_eq!(
        value(
            &m,
            r#"infergate_completion_tokens_total{model="m",key="team-a"}"#
        ),
        63.0
    );
    assert_eq!(
        value(&m, r#"infergate_in_flight_requests{backend="b0"}"#),
        0.0
    );
    let version = gw.state.current_version();
    assert_eq!(
        value(
            &m,
            &format!(r#"infergate_config_version_info{{version="{version}"}}"#)
        ),
        1.0
    );

    // The writer task flushes when its queue is empty.
    let mut records = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&usage_path).unwrap_or_default();
        records = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        if records.len() == 9 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(records.len(), 9);
    for r in &records {
        assert_eq!(r["key_id"], "team-a");
        assert_eq!(r["model"], "m");
        assert_eq!(r["backend"], "b0");
        assert_eq!(r["stop_cause"], "completed");
        assert_eq!(r["finish_reason"], "stop");
        assert!(r["request_id"].as_str().unwrap().contains('-'));
    }
    let reported: Vec<&Value> = records
        .iter()
        .filter(|r| !r["completion_tokens"].is_null())
        .collect();
    assert_eq!(reported.len(), 9);
    assert!(reported.iter().all(|r| r["completion_tokens"] == 7
        && r["prompt_tokens"] == 3
        && r["usage_estimated"] == false));
    let text = std::fs::read_to_string(&usage_path).unwrap();
    assert!(
        !text.contains("hello there"),
        "a prompt leaked into usage records"
    );
}
