//! What an outsider tries against state and peers, on real sockets: a key
//! continuing another key's conversation, and a client sending the headers
//! sidecars use between themselves (forged, replayed, with a wrong secret).

use crate::common::*;
use axum::http::{HeaderMap, HeaderValue, Method};
use infergate_sidecar::config::{hash_key, GatewayConfig};
use infergate_sidecar::peers::{HopAuth, HOP, PIN};
use infergate_sidecar::{admin_app, app, AppState, Options};
use infergate_sim::SimHandle;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const ADMIN_KEY: &str = "ig-test-admin-cccccccccccc";
const SECRET: &[u8] = b"peer-secret-for-the-tests";

/// Two sidecars, each next to its own simulator, with the same config:
/// backend `b0` is served by sidecar 0, `b1` by sidecar 1. Keys A and B may
/// both use model `m`; the admin key may read everything.
struct Pair {
    gws: Vec<Gateway>,
    sims: Vec<SimHandle>,
}

fn pair_config(sidecars: &[String], sims: &[SimHandle], sticky: &str) -> GatewayConfig {
    // `sticky` may also say `unattested`: both backends without attestation.
    let (sticky, attestation) = match sticky.strip_prefix("unattested") {
        Some(rest) => (rest, false),
        None => (sticky, true),
    };
    GatewayConfig::from_yaml(&format!(
        r#"
keys:
  - {{ id: key-a, sha256: "{}" }}
  - {{ id: key-b, sha256: "{}" }}
  - {{ id: auditor, sha256: "{}", admin: true }}
backends:
  - {{ id: b0, url: "{}", sidecar: "{}", attestation: {attestation} }}
  - {{ id: b1, url: "{}", sidecar: "{}", attestation: {attestation} }}
models:
  - name: m
    targets: [{{ backend: b0, upstreamModel: {UPSTREAM_MODEL} }}, {{ backend: b1, upstreamModel: {UPSTREAM_MODEL} }}]
    {sticky}
"#,
        hash_key(KEY),
        hash_key(OTHER_KEY),
        hash_key(ADMIN_KEY),
        sims[0].url,
        sidecars[0],
        sims[1].url,
        sidecars[1],
    ))
    .unwrap()
}

async fn pair_with(secrets: [Option<&[u8]>; 2], sticky: &str) -> Pair {
    let sims = vec![simulator("s0", 3, 0).await, simulator("s1", 3, 0).await];
    let listeners = [
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    ];
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let mut gws = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let state = AppState::new(
            Some(pair_config(&urls, &sims, sticky)),
            Options {
                admin_token: Some(ADMIN_TOKEN.into()),
                self_url: Some(urls[i].clone()),
                peer_secret: secrets[i].map(<[u8]>::to_vec),
                ..Options::default()
            },
        )
        .unwrap();
        tokio::spawn(infergate_sidecar::serve::serve(
            listener,
            app(state.clone()),
            Default::default(),
            std::future::pending(),
        ));
        let admin = serve(admin_app(state.clone())).await;
        gws.push(Gateway {
            url: urls[i].clone(),
            admin_url: format!("http://{admin}"),
            state,
        });
    }
    Pair { gws, sims }
}

async fn pair() -> Pair {
    pair_with([Some(SECRET), Some(SECRET)], "").await
}

async fn respond(gw: &Gateway, key: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn ask(previous: Option<&str>) -> Value {
    let mut body = json!({"model": "m", "input": "and then?"});
    if let Some(p) = previous {
        body["previous_response_id"] = json!(p);
    }
    body
}

/// Key A starts a conversation; its answer's id.
async fn conversation_of_a(gw: &Gateway) -> String {
    let resp = respond(gw, KEY, ask(None)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

fn requests(sims: &[SimHandle]) -> u64 {
    sims.iter().map(|s| s.sim.stats().requests).sum()
}

#[tokio::test]
async fn another_key_cannot_continue_a_conversation_on_any_sidecar() {
    let p = pair().await;
    let id = conversation_of_a(&p.gws[0]).await;
    let before = requests(&p.sims);
    let unknown = respond(&p.gws[0], OTHER_KEY, ask(Some("resp_doesnotexist"))).await;
    assert_eq!(unknown.status(), 404);
    let unknown: Value = unknown.json().await.unwrap();
    for gw in &p.gws {
        // Where the record lives, and on the peer that must ask for it.
        let stolen = respond(gw, OTHER_KEY, ask(Some(&id))).await;
        assert_eq!(stolen.status(), 404, "{}", gw.url);
        let stolen: Value = stolen.json().await.unwrap();
        assert_eq!(
            stolen["error"]["message"].as_str().unwrap(),
            unknown["error"]["message"]
                .as_str()
                .unwrap()
                .replace("resp_doesnotexist", &id),
            "the same answer as an id that does not exist"
        );
        assert_eq!(stolen["error"]["code"], unknown["error"]["code"]);
    }
    assert_eq!(
        requests(&p.sims),
        before,
        "no upstream saw the stolen conversation"
    );
    // The owner and an admin key continue it, from either sidecar.
    for gw in &p.gws {
        for key in [KEY, ADMIN_KEY] {
            let resp = respond(gw, key, ask(Some(&id))).await;
            assert_eq!(resp.status(), 200, "{key} via {}", gw.url);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["previous_response_id"], id.as_str());
        }
    }
}

#[tokio::test]
async fn ownership_holds_when_pinning_by_previous_response_id_is_off() {
    let p = pair_with(
        [Some(SECRET), Some(SECRET)],
        "sticky: { previousResponseId: false }",
    )
    .await;
    let id = conversation_of_a(&p.gws[1]).await;
    for gw in &p.gws {
        assert_eq!(respond(gw, OTHER_KEY, ask(Some(&id))).await.status(), 404);
    }
}

#[tokio::test]
async fn follow_ups_by_id_answer_only_their_key() {
    let p = pair().await;
    let id = conversation_of_a(&p.gws[0]).await;
    for gw in &p.gws {
        for (method, suffix) in [("GET", ""), ("POST", "/cancel"), ("DELETE", "")] {
            let url = format!("{}/v1/responses/{id}{suffix}", gw.url);
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let resp = client()
                .request(m, &url)
                .bearer_auth(OTHER_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 404, "{method} {url}");
        }
        let (status, _) = get_json(gw, Some(OTHER_KEY), &format!("/v1/signature/{id}")).await;
        assert_eq!(status, 404);
    }
}

#[tokio::test]
async fn unattested_answers_stay_their_keys_and_are_never_signed() {
    // Nothing is hashed for them, but the owner is kept on every sidecar.
    let p = pair_with([Some(SECRET), Some(SECRET)], "unattested").await;
    for _ in 0..2 {
        // Round-robin: one conversation is served by each sidecar's backend.
        let id = conversation_of_a(&p.gws[0]).await;
        for gw in &p.gws {
            assert_eq!(respond(gw, OTHER_KEY, ask(Some(&id))).await.status(), 404);
            assert_eq!(respond(gw, KEY, ask(Some(&id))).await.status(), 200);
            for key in [KEY, OTHER_KEY] {
                let path = format!("/v1/signature/{id}");
                let (status, body) = get_json(gw, Some(key), &path).await;
                assert_eq!(status, 404, "{key} via {}: {body}", gw.url);
                assert!(body.get("signature").is_none(), "{body}");
            }
        }
    }
    // The sidecar next to the backend says why there is none.
    let mut said = 0;
    for _ in 0..2 {
        let resp = post_chat(&p.gws[0], KEY, &chat_body("m", false), &[]).await;
        if resp.headers()["x-infergate-backend"] != "b0" {
            continue;
        }
        let id = resp.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (_, why) = get_json(&p.gws[0], Some(KEY), &format!("/v1/signature/{id}")).await;
        assert_eq!(why["error"]["code"], "signature_unavailable", "{why}");
        assert!(why.to_string().contains("attestation disabled"), "{why}");
        said += 1;
    }
    assert_eq!(said, 1);
    // A hop's body is still checked against its signed hash.
    let body = serde_json::to_vec(&chat_body("m", false)).unwrap();
    let other_body = serde_json::to_vec(&chat_body("m", true)).unwrap();
    let before = requests(&p.sims);
    let moved = signed(SECRET, &body, Some("b0"));
    assert_eq!(send_hop(&p.gws[0], moved, &other_body).await.status(), 400);
    assert_eq!(requests(&p.sims), before);
    let genuine = signed(SECRET, &body, Some("b0"));
    assert_eq!(send_hop(&p.gws[0], genuine, &body).await.status(), 200);
}

/// The headers a public client might send to steer a sidecar.
fn forged(pin: &str) -> [(&'static str, String); 2] {
    [
        ("x-infergate-hop", "http://evil".to_owned()),
        ("x-infergate-backend-pin", pin.to_owned()),
    ]
}

#[tokio::test]
async fn internal_headers_from_a_client_are_refused_and_change_nothing() {
    let p = pair().await;
    let body = chat_body("m", false);
    let variants: Vec<Vec<(&str, String)>> = vec![
        forged("b1").to_vec(),
        vec![("x-infergate-hop", "v1.1.00.00".into())],
        vec![("x-infergate-backend-pin", "b1".into())],
        vec![(
            "x-infergate-hop",
            format!(
                "v1.{}.{}.{}.{}",
                now_ms(),
                "0".repeat(32),
                "0".repeat(64),
                "0".repeat(64)
            ),
        )],
    ];
    for headers in variants {
        let mut req = client()
            .post(format!("{}/v1/chat/completions", p.gws[0].url))
            .bearer_auth(KEY)
            .json(&body);
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 400, "{headers:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "forged_internal_header");
    }
    assert_eq!(requests(&p.sims), 0, "no backend was called");
    // Look-ups between sidecars refuse them too.
    let owner = client()
        .get(format!("{}/v1/internal/owner/resp_x", p.gws[0].url))
        .bearer_auth(KEY)
        .header("x-infergate-hop", "peer")
        .send()
        .await
        .unwrap();
    assert_eq!(owner.status(), 400);
    let metrics = p.gws[0].metrics().await;
    assert!(
        metrics.contains(r#"infergate_rejected_requests_total{reason="forged_internal_header"} 4"#),
        "{metrics}"
    );
}

fn signed(secret: &[u8], body: &[u8], pin: Option<&str>) -> HeaderMap {
    let mut client = HeaderMap::new();
    client.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {KEY}")).unwrap(),
    );
    let sha: [u8; 32] = Sha256::digest(body).into();
    HopAuth::new(Some(secret.to_vec())).headers(
        &client,
        &Method::POST,
        "/v1/chat/completions",
        &sha,
        pin,
    )
}

async fn send_hop(gw: &Gateway, headers: HeaderMap, body: &[u8]) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .headers(headers)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_hop_counts_once_with_the_right_secret_and_never_otherwise() {
    let p = pair().await;
    let body = serde_json::to_vec(&chat_body("m", false)).unwrap();
    // A genuine hop pinned to this sidecar's own backend is served there.
    let genuine = signed(SECRET, &body, Some("b0"));
    let ok = send_hop(&p.gws[0], genuine.clone(), &body).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-infergate-backend"], "b0");
    // The same hop again is a replay.
    assert_eq!(send_hop(&p.gws[0], genuine, &body).await.status(), 400);
    // Another secret, another body, another pin: each fails the MAC.
    let wrong = signed(b"not-the-secret", &body, Some("b0"));
    assert_eq!(send_hop(&p.gws[0], wrong, &body).await.status(), 400);
    let other_body = serde_json::to_vec(&chat_body("m", true)).unwrap();
    let moved = signed(SECRET, &body, Some("b0"));
    assert_eq!(send_hop(&p.gws[0], moved, &other_body).await.status(), 400);
    let mut repinned = signed(SECRET, &body, Some("b0"));
    repinned.insert(PIN, HeaderValue::from_static("b1"));
    assert_eq!(send_hop(&p.gws[0], repinned, &body).await.status(), 400);
    let mut stale = signed(SECRET, &body, Some("b0"));
    let v = stale[HOP].to_str().unwrap().to_owned();
    let parts: Vec<&str> = v.split('.').collect();
    let old = format!(
        "v1.{}.{}.{}.{}",
        now_ms() - 120_000,
        parts[2],
        parts[3],
        parts[4]
    );
    stale.insert(HOP, HeaderValue::from_str(&old).unwrap());
    assert_eq!(send_hop(&p.gws[0], stale, &body).await.status(), 400);
    assert_eq!(p.sims[0].sim.stats().requests, 1);
    assert_eq!(p.sims[1].sim.stats().requests, 0);
}

#[tokio::test]
async fn sidecars_with_the_secret_forward_and_the_answer_verifies_from_both() {
    let p = pair().await;
    // Round-robin from sidecar 0 reaches b1 through sidecar 1.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let resp = post_chat(&p.gws[0], KEY, &chat_body("m", true), &[]).await;
        assert_eq!(resp.status(), 200);
        let backend = resp.headers()["x-infergate-backend"]
            .to_str()
            .unwrap()
            .to_owned();
        let text = resp.text().await.unwrap();
        let id = serde_json::from_str::<Value>(&sse_data(&text)[0]).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        for gw in &p.gws {
            let (_, sig) = get_json(gw, Some(KEY), &format!("/v1/signature/{id}")).await;
            let response_hash = hex::encode(Sha256::digest(text.as_bytes()));
            assert!(
                sig["text"].as_str().unwrap().ends_with(&response_hash),
                "signed hash covers the bytes received ({backend})"
            );
        }
        seen.insert(backend);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(p.sims[1].sim.stats().requests > 0);
}

#[tokio::test]
async fn a_peer_with_another_secret_is_refused_not_trusted() {
    let p = pair_with([Some(SECRET), Some(b"a-different-secret")], "").await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = post_chat(&p.gws[0], KEY, &chat_body("m", false), &[]).await;
        statuses.push(resp.status().as_u16());
    }
    // b1's answers would come through sidecar 1, which refuses the hop.
    assert!(statuses.contains(&200) && statuses.iter().any(|s| *s >= 400));
    assert_eq!(p.sims[1].sim.stats().requests, 0);
}

fn now_ms() -> u64 {
    infergate_sidecar::usage::now_unix_ms()
}

/// "Configuration at a glance" names the sidecar's own address as the
/// backend's `sidecar`; without `--self-url` every request used to pass the
/// gateway twice (two metrics, two quota charges, no signature).
#[tokio::test]
async fn a_sidecar_never_forwards_to_itself() {
    let sim = simulator("s0", 3, 0).await;
    for secret in [None, Some(SECRET)] {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let cfg = GatewayConfig::from_yaml(&format!(
            r#"
keys: [{{ id: key-a, sha256: "{}", limits: {{ requestsPerMinute: 3 }} }}]
backends: [{{ id: b0, url: "{}", sidecar: "http://localhost:{port}" }}]
models: [{{ name: m, targets: [{{ backend: b0, upstreamModel: {UPSTREAM_MODEL} }}] }}]
"#,
            hash_key(KEY),
            sim.url
        ))
        .unwrap();
        let state = AppState::new(
            Some(cfg),
            Options {
                peer_secret: secret.map(<[u8]>::to_vec),
                ..Options::default()
            },
        )
        .unwrap();
        state.listening_on(listener.local_addr().unwrap());
        tokio::spawn(infergate_sidecar::serve::serve(
            listener,
            app(state.clone()),
            Default::default(),
            std::future::pending(),
        ));
        let gw = Gateway {
            url,
            admin_url: format!("http://{}", serve(admin_app(state.clone())).await),
            state,
        };
        let before = sim.sim.stats().requests;
        let mut id = String::new();
        for _ in 0..3 {
            let resp = post_chat(&gw, KEY, &chat_body("m", false), &[]).await;
            assert_eq!(resp.status(), 200, "a 3-per-minute key gets its 3");
            id = resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
        }
        assert_eq!(sim.sim.stats().requests - before, 3);
        let metrics = gw.metrics().await;
        assert!(
            metrics.contains(r#"infergate_requests_total{model="m",backend="b0",status="2xx"} 3"#),
            "{metrics}"
        );
        let (status, _) = get_json(&gw, Some(KEY), &format!("/v1/signature/{id}")).await;
        assert_eq!(status, 200);
    }
}

/// A hop is authenticated from its headers alone: a forged one is refused
/// before its body is read, so it can neither hold a body buffer nor skip
/// the key's quota while the body trickles in.
#[tokio::test]
async fn a_forged_hop_is_refused_before_its_body_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = pair().await;
    let addr = p.gws[0].url.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\nx-infergate-hop: v1.{}.{}.{}.{}\r\ncontent-length: 4000000\r\n\r\n{{",
        now_ms(),
        "1".repeat(32),
        "2".repeat(64),
        "3".repeat(64)
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = vec![0u8; 4096];
    // Long before the 30 s body deadline.
    let n = tokio::time::timeout(std::time::Duration::from_secs(3), tcp.read(&mut out))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out[..n])
    );
}
