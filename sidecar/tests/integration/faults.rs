//! Fault injection with the simulator's fault modes: what each client sees,
//! what is counted, and that every in-flight counter returns to zero.

use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

async fn assert_drained(gw: &Gateway) {
    gw.settle().await;
    let m = gw.metrics().await;
    for line in m
        .lines()
        .filter(|l| l.starts_with("infergate_in_flight_requests{"))
    {
        assert!(line.ends_with(" 0"), "{line}");
    }
}

fn counted(metrics: &str, series: &str) -> bool {
    metrics.lines().any(|l| l == series)
}

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    (status, v["error"]["code"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn refused_upstream_is_a_502_and_counted() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let gw = gateway(config(&[&dead], "", "")).await;
    let resp = post_chat(&gw, KEY, &chat_body("m", true), &[]).await;
    assert_eq!(error_code(resp).await, (502, "upstream_error".into()));
    let m = gw.metrics().await;
    assert!(
        counted(
            &m,
            r#"infergate_upstream_errors_total{backend="b0",kind="connect"} 1"#
        ),
        "{m}"
    );
    assert!(counted(
        &m,
        r#"infergate_rejected_requests_total{reason="upstream_error"} 1"#
    ));
    assert_drained(&gw).await;
}

#[tokio::test]
async fn upstream_500_is_a_502_and_counted() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(&gw, KEY, &chat_body("m", false), &[("x-sim-fault", "500")]).await;
    assert_eq!(error_code(resp).await, (502, "upstream_error".into()));
    assert!(counted(
        &gw.metrics().await,
        r#"infergate_upstream_errors_total{backend="b0",kind="status_5xx"} 1"#
    ));
    assert_drained(&gw).await;
}

#[tokio::test]
async fn slow_headers_hit_the_first_byte_deadline() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "timeouts: { firstByteMs: 200 }")).await;
    let resp = post_chat(
        &gw,
        KEY,
        &chat_body("m", true),
        &[("x-sim-fault", "slow-headers:2000")],
    )
    .await;
    assert_eq!(error_code(resp).await, (504, "upstream_timeout".into()));
    assert!(counted(
        &gw.metrics().await,
        r#"infergate_upstream_errors_total{backend="b0",kind="first_byte_timeout"} 1"#
    ));
    assert_drained(&gw).await;
}

#[tokio::test]
async fn malformed_events_pass_through_and_the_stream_completes() {
    let sim = simulator("s0", 5, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(
        &gw,
        KEY,
        &chat_body("m", true),
        &[("x-sim-fault", "malformed-after:2")],
    )
    .await;
    let body = resp.text().await.unwrap();
    assert!(body.contains("data: {not json\n\n"));
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert!(counted(
        &gw.metrics().await,
        r#"infergate_stream_ends_total{reason="completed"} 1"#
    ));
    assert_drained(&gw).await;
}

#[tokio::test]
async fn an_answer_over_the_size_bound_is_cut_with_an_error() {
    let sim = simulator("s0", 200, 0).await;
    let gw = gateway(config(
        &[&sim.url],
        "",
        "limits: { maxResponseBytes: 4000 }",
    ))
    .await;
    let body = post_chat(&gw, KEY, &chat_body("m", true), &[])
        .await
        .text()
        .await
        .unwrap();
    assert!(body.len() < 4500, "{}", body.len());
    let last: Value = serde_json::from_str(sse_data(&body).last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_too_large");
    let resp = post_chat(
        &gw,
        KEY,
        &chat_body("m", false),
        &[("x-sim-tokens", "2000")],
    )
    .await;
    assert_eq!(error_code(resp).await, (502, "upstream_error".into()));
    let m = gw.metrics().await;
    assert!(
        counted(&m, r#"infergate_stream_ends_total{reason="too_large"} 1"#),
        "{m}"
    );
    assert!(counted(
        &m,
        r#"infergate_upstream_errors_total{backend="b0",kind="too_large"} 1"#
    ));
    assert_drained(&gw).await;
}

#[tokio::test]
async fn a_config_push_cut_mid_body_changes_nothing() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let before = gw.state.current_version();
    let addr = gw.admin_url.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "PUT /admin/v1/config HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{{\"keys\":["
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.state.current_version(), before);
    assert_eq!(
        post_chat(&gw, KEY, &chat_body("m", false), &[])
            .await
            .status(),
        200
    );
}
