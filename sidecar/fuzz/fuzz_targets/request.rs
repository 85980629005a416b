//! The whole public request path on arbitrary bodies and a few header
//! choices: auth, content type, internal headers, validation, alias
//! resolution, ownership look-up and the upstream rewrite, through the real
//! router. Whatever comes in, an answer goes out: never a panic, never a
//! 500 (the backend port is closed, so a valid request ends in a 502).
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use infergate_sidecar::config::{hash_key, GatewayConfig};
use infergate_sidecar::{app, AppState, Options};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const KEY: &str = "ig-fuzz-key-0123456789";

fn setup() -> &'static (tokio::runtime::Runtime, Arc<AppState>) {
    static S: OnceLock<(tokio::runtime::Runtime, Arc<AppState>)> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A port nothing listens on: bind, note, close.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let yaml = format!(
            r#"
keys: [{{ id: k, sha256: "{}" }}]
backends:
  - {{ id: b0, url: "http://{closed}", sidecar: "http://127.0.0.1:1" }}
  - {{ id: b1, url: "http://{closed}" }}
models:
  - name: llama
    aliases: [llama-alias, "ll\"q"]
    targets: [{{ backend: b0, upstreamModel: "meta/llama" }}, {{ backend: b1, upstreamModel: up }}]
"#,
            hash_key(KEY)
        );
        let state = rt.block_on(async {
            AppState::new(
                Some(GatewayConfig::from_yaml(&yaml).unwrap()),
                Options {
                    self_url: Some("http://127.0.0.1:2".into()),
                    peer_secret: Some(b"fuzz".to_vec()),
                    ..Options::default()
                },
            )
            .unwrap()
        });
        (rt, state)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let (rt, state) = setup();
    let path = ["/v1/chat/completions", "/v1/completions", "/v1/responses"][usize::from(choice % 3)];
    let mut req = Request::post(path).header("authorization", format!("Bearer {KEY}"));
    if choice & 4 == 0 {
        req = req.header("content-type", "application/json");
    }
    if choice & 8 != 0 {
        req = req.header("x-infergate-hop", "v1.0.00.00");
    }
    if choice & 16 != 0 {
        req = req.header("x-infergate-backend-pin", "b1");
    }
    let req = req.body(Body::from(body.to_vec())).unwrap();
    let resp = rt.block_on(app(state.clone()).oneshot(req)).unwrap();
    assert_ne!(resp.status().as_u16(), 500);
    let status = resp.status().as_u16();
    if choice & 4 != 0 {
        assert_eq!(status, 415, "not JSON");
    } else if choice & 24 != 0 {
        assert_eq!(status, 400, "internal headers from a client");
    }
});
