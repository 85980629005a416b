//! Prefix-affinity routing across two peered sidecars on real sockets: the
//! same conversation lands on the same pod from either sidecar, and load is
//! shared between sidecars over the hop-authenticated load endpoint.

use crate::common::*;
use infergate_sidecar::config::{hash_key, GatewayConfig};
use infergate_sidecar::load_peer::{self, PATH};
use infergate_sidecar::table::now_ms;
use infergate_sidecar::{admin_app, app, AppState, Options};
use infergate_sim::engine::EngineConfig;
use infergate_sim::{SimConfig, SimHandle};
use serde_json::{json, Value};

const SECRET: &[u8] = b"peer-secret-for-the-routing-tests";

async fn pod(id: &str) -> SimHandle {
    infergate_sim::spawn(SimConfig {
        id: id.into(),
        models: vec![UPSTREAM_MODEL.into()],
        tokens: 3,
        engine: EngineConfig {
            cache_blocks: 10_000,
            ..EngineConfig::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// Sidecar `i` sits next to pod `i`; both have the same config.
async fn fleet(n: usize) -> (Vec<Gateway>, Vec<SimHandle>) {
    let mut sims = Vec::new();
    let mut listeners = Vec::new();
    for i in 0..n {
        sims.push(pod(&format!("s{i}")).await);
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let backends: String = (0..n)
        .map(|i| {
            format!(
                "  - {{ id: b{i}, url: \"{}\", sidecar: \"{}\" }}\n",
                sims[i].url, urls[i]
            )
        })
        .collect();
    let targets: String = (0..n)
        .map(|i| format!("{{ backend: b{i}, upstreamModel: {UPSTREAM_MODEL} }},"))
        .collect();
    let yaml = format!(
        "keys:\n  - {{ id: a, sha256: \"{}\" }}\nbackends:\n{backends}models:\n  - {{ name: m, strategy: prefixAffinity, targets: [{targets}] }}\n",
        hash_key(KEY)
    );
    let mut gws = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let state = AppState::new(
            Some(GatewayConfig::from_yaml(&yaml).unwrap()),
            Options {
                admin_token: Some(ADMIN_TOKEN.into()),
                self_url: Some(urls[i].clone()),
                peer_secret: Some(SECRET.to_vec()),
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
    (gws, sims)
}

async fn chat_at(gw: &Gateway, messages: &Value) -> String {
    let resp = post_chat(gw, KEY, &json!({"model": "m", "messages": messages}), &[]).await;
    assert_eq!(resp.status(), 200);
    resp.headers()["x-infergate-backend"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_conversation_stays_on_one_pod_whichever_sidecar_it_enters() {
    let (gws, sims) = fleet(3).await;
    let system = "You are the support assistant of a large shop. ".repeat(200);
    let mut owners = std::collections::HashSet::new();
    for user in 0..12 {
        let mut messages = vec![
            json!({"role": "system", "content": system}),
            json!({"role": "user", "content": format!("user {user}: where is my parcel?")}),
        ];
        let mut seen = Vec::new();
        for turn in 0..4 {
            // Alternate entry sidecars, as a Service would.
            seen.push(chat_at(&gws[(user + turn) % gws.len()], &json!(messages)).await);
            messages.push(json!({"role": "assistant", "content": "tok0 tok1 tok2 "}));
            messages.push(json!({"role": "user", "content": format!("turn {turn} follow-up")}));
        }
        assert!(seen.iter().all(|s| *s == seen[0]), "user {user}: {seen:?}");
        owners.insert(seen[0].clone());
    }
    // Twelve conversations sharing only a system prompt spread out.
    assert!(owners.len() > 1, "{owners:?}");
    let hits: u64 = sims.iter().map(|s| s.sim.engine().prefix_cache().1).sum();
    let queries: u64 = sims.iter().map(|s| s.sim.engine().prefix_cache().0).sum();
    assert!(hits * 10 > queries * 7, "hit rate {hits}/{queries}");
}

#[tokio::test]
async fn load_is_shared_between_peers_and_hidden_from_clients() {
    let (gws, _sims) = fleet(2).await;
    // A public client (even with a valid key) does not see the endpoint.
    let resp = client()
        .get(format!("{}{PATH}", gws[1].url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // Hold one stream open on pod 1 through its own sidecar.
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let held = client()
        .post(format!("{}/v1/chat/completions", gws[1].url))
        .bearer_auth(KEY)
        .header("x-sim-fault", "stall-after:1")
        .header("x-session-id", session_for(&gws[1], "b1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    wait_for(|| gws[1].in_flight("b1") == 1).await;
    // Sidecar 1 reads its pod; sidecar 0 asks sidecar 1.
    load_peer::poll_once(&gws[1].state).await;
    load_peer::poll_once(&gws[0].state).await;
    let table = gws[0].state.table.load();
    assert_eq!(gws[0].in_flight("b1"), 0, "sidecar 0 sent nothing itself");
    assert_eq!(table.backends["b1"].load(now_ms()), Some(1.0));
    assert_eq!(table.backends["b0"].load(now_ms()), Some(0.0));
    let metrics = gws[0].metrics().await;
    assert!(
        metrics.contains(r#"infergate_backend_load{backend="b1"} 1.0"#),
        "{metrics}"
    );
    drop(held);
}

#[tokio::test]
async fn a_hop_answer_carries_the_pods_load_back_but_not_to_the_client() {
    let (gws, _sims) = fleet(2).await;
    // One stream held on pod 1 through its own sidecar.
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let held = client()
        .post(format!("{}/v1/chat/completions", gws[1].url))
        .bearer_auth(KEY)
        .header("x-sim-fault", "stall-after:1")
        .header("x-session-id", session_for(&gws[1], "b1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    wait_for(|| gws[1].in_flight("b1") == 1).await;
    // Another request enters sidecar 0 and is forwarded to pod 1.
    let resp = client()
        .post(format!("{}/v1/chat/completions", gws[0].url))
        .bearer_auth(KEY)
        .header("x-session-id", session_for(&gws[0], "b1"))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "yo"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-infergate-backend"], "b1");
    assert!(resp.headers().get("x-infergate-load").is_none());
    resp.bytes().await.unwrap();
    gws[0].settle().await;
    // No polling happened: sidecar 0 learnt pod 1's load (2 when it
    // answered, less its own one since finished) from the answer.
    let table = gws[0].state.table.load();
    assert_eq!(table.backends["b1"].load(now_ms()), Some(1.0));
    drop(held);
}

/// A session id that rendezvous sends to `backend` on this route.
fn session_for(gw: &Gateway, backend: &str) -> String {
    let table = gw.state.table.load();
    let route = table.route("m").unwrap();
    (0..)
        .map(|i| format!("s{i}"))
        .find(|s| {
            let i = infergate_sidecar::balance::pick(route, Some(s), None, Default::default(), 0)
                .unwrap();
            route.targets[i].backend.id == backend
        })
        .unwrap()
}

/// The pod a request's prefix lands on from `gw` now.
async fn owner_of(gw: &Gateway, messages: &Value) -> String {
    let resp = post_chat(
        gw,
        KEY,
        &json!({"model": "m", "stream": true, "messages": messages}),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let backend = resp.headers()["x-infergate-backend"]
        .to_str()
        .unwrap()
        .to_owned();
    resp.bytes().await.unwrap();
    backend
}

#[tokio::test]
async fn a_pods_sidecar_turns_away_a_choice_its_backlog_makes_slower() {
    let (gws, sims) = fleet(2).await;
    // A conversation whose pod is b1, entered at sidecar 0 (which then
    // knows b1 holds it).
    let mut messages = None;
    for i in 0.. {
        let m = json!([{"role": "user", "content": format!("question {i}")}]);
        if owner_of(&gws[0], &m).await == "b1" {
            messages = Some(m);
            break;
        }
    }
    let messages = messages.unwrap();
    gws[0].settle().await;
    gws[1].settle().await;
    // A long cold prompt waits at b1 for its first token (held before
    // its headers), through b1's own sidecar: sidecar 0 has not heard.
    let long = "w ".repeat(20_000);
    let held = client()
        .post(format!("{}/v1/chat/completions", gws[1].url))
        .bearer_auth(KEY)
        .header("x-sim-fault", "slow-headers:2000")
        .header("x-session-id", session_for(&gws[1], "b1"))
        .json(
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": long}]}),
        )
        .send();
    let held = tokio::spawn(held);
    wait_for(|| gws[1].in_flight("b1") == 1).await;
    let b1_before = sims[1].sim.engine().prefix_cache().0;

    // The conversation goes on at sidecar 0: its choice, b1, is turned
    // away by b1's sidecar (40 KB of prefill ahead against a short prompt
    // anywhere else), and it runs once, on b0.
    let resp = post_chat(
        &gws[0],
        KEY,
        &json!({"model": "m", "stream": true, "messages": messages}),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-infergate-backend"], "b0");
    assert!(resp.headers().get("x-infergate-spilled").is_none());
    resp.bytes().await.unwrap();
    assert_eq!(sims[1].sim.engine().prefix_cache().0, b1_before);
    assert!(
        gws[1]
            .metrics()
            .await
            .contains(r#"infergate_prefix_spills_total{backend="b1"} 1"#),
        "{}",
        gws[1].metrics().await
    );
    // Sidecar 0 learnt b1's backlog from the refusal, without polling.
    let table = gws[0].state.table.load();
    let v = table.backends["b1"].view(0, now_ms());
    assert!(v.backlog > 40_000.0, "{v:?}");

    // A client cannot make a sidecar turn a request away: the offer is
    // read only on an authenticated hop.
    let resp = post_chat(
        &gws[1],
        KEY,
        &json!({"model": "m", "stream": true, "messages": messages}),
        &[
            ("x-infergate-spill", "0"),
            ("x-session-id", &session_for(&gws[1], "b1")),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-infergate-backend"], "b1");
    resp.bytes().await.unwrap();
    held.await.unwrap().unwrap().bytes().await.unwrap();
}
