//! The attestation report in NEAR AI's shape over real sockets: quotes from
//! a fake configfs-tsm tree that binds the signing address and nonce, one
//! entry per pod collected from peers, `signing_address` choosing one, and
//! reports without an API key behind their switch and rate limit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use infergate_sidecar::config::{hash_key, GatewayConfig};
use infergate_sidecar::{app, AppState, Options, TeeSource};
use serde_json::Value;

/// A configfs-tsm report tree that behaves like the kernel's for what the
/// sidecar does: for each entry directory whose `inblob` holds 64 bytes it
/// writes `provider` and a TDX v4 `outblob` with those bytes at offset 568
/// (48-byte header + TD report body, report data last). `outblob` appears
/// by rename, so it is never read half-written.
struct FakeTsm {
    root: PathBuf,
    made: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn v4_quote(report_data: &[u8]) -> Vec<u8> {
    let mut q = vec![0u8; 48 + 584];
    q[0..2].copy_from_slice(&4u16.to_le_bytes());
    q[2..4].copy_from_slice(&2u16.to_le_bytes());
    q[4..8].copy_from_slice(&0x81u32.to_le_bytes());
    q[568..632].copy_from_slice(report_data);
    q.extend_from_slice(&16u32.to_le_bytes());
    q.extend_from_slice(&[0xA5; 16]);
    q
}

impl FakeTsm {
    fn start() -> FakeTsm {
        let root = scratch_dir("tsm");
        let (made, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = {
            let (root, made, stop) = (root.clone(), made.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                        if answer(&entry.path()) {
                            made.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // The fake's own thread, not a runtime's: it may block.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        FakeTsm {
            root,
            made,
            stop,
            thread: Some(thread),
        }
    }

    fn entries_left(&self) -> usize {
        std::fs::read_dir(&self.root).unwrap().count()
    }
}

/// Answer one entry if its request is complete and unanswered.
fn answer(dir: &Path) -> bool {
    let out = dir.join("outblob");
    match std::fs::read(dir.join("inblob")) {
        Ok(inblob) if inblob.len() == 64 && !out.exists() => {
            let tmp = dir.join("outblob.tmp");
            std::fs::write(dir.join("provider"), "tdx_guest\n").is_ok()
                && std::fs::write(&tmp, v4_quote(&inblob)).is_ok()
                && std::fs::rename(&tmp, &out).is_ok()
        }
        _ => false,
    }
}

impl Drop for FakeTsm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn quote_report_data(entry: &Value) -> Vec<u8> {
    let quote = hex::decode(entry["intel_quote"].as_str().unwrap()).unwrap();
    quote[568..632].to_vec()
}

fn expected_report_data(identity: &str, nonce: &str) -> Vec<u8> {
    let mut rd = hex::decode(identity.trim_start_matches("0x")).unwrap();
    rd.resize(32, 0);
    rd.extend(hex::decode(nonce).unwrap());
    rd
}

const NONCE: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

#[tokio::test]
async fn a_configfs_tsm_quote_binds_the_signing_key_and_the_nonce() {
    let tsm = FakeTsm::start();
    let sim = simulator("s0", 1, 0).await;
    let options = Options {
        tee: Some(TeeSource::ConfigfsTsm(tsm.root.clone())),
        ..Options::default()
    };
    let gw = gateway_with(config(&[&sim.url], "", ""), options).await;
    for (algo, identity) in [
        ("ecdsa", gw.state.signer.address.clone()),
        ("ed25519", gw.state.signer.ed25519_public.clone()),
    ] {
        let path = format!("/v1/attestation/report?model=m&nonce={NONCE}&signing_algo={algo}");
        let (status, r) = get_json(&gw, Some(KEY), &path).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["signing_address"], identity.as_str());
        assert_eq!(r["signing_algo"], algo);
        assert_eq!(r["request_nonce"], NONCE);
        assert_eq!(r["model_name"], "m");
        let rd = expected_report_data(&identity, NONCE);
        assert_eq!(quote_report_data(&r), rd);
        assert_eq!(r["report_data"], hex::encode(&rd).as_str());
        assert_eq!(r["tee"]["source"], "configfs-tsm");
        assert_eq!(r["tee"]["report_data_matches"], true);
        assert_eq!(r["info"]["tee_provider"], "tdx_guest");
        // One pod serves `m`: it is the one entry, also in vllm-proxy's list.
        assert_eq!(r["model_attestations"].as_array().unwrap().len(), 1);
        assert_eq!(r["all_attestations"], r["model_attestations"]);
        assert_eq!(r["model_attestations"][0]["intel_quote"], r["intel_quote"]);
    }
    // Every entry directory was removed after use.
    assert_eq!(tsm.entries_left(), 0);
    // Without a TEE the report says so, in both shapes.
    let plain = gateway(config(&[&sim.url], "", "")).await;
    let (_, r) = get_json(&plain, Some(KEY), "/v1/attestation/report?nonce=abc").await;
    assert_eq!(r["intel_quote"], Value::Null);
    assert_eq!(r["tee"]["present"], false);
    assert_eq!(r["gpu"]["present"], false);
}

#[tokio::test]
async fn a_quote_and_gpu_evidence_are_made_once_per_nonce() {
    let tsm = FakeTsm::start();
    let dir = scratch_dir("gpu");
    let calls = dir.join("calls");
    let sim = simulator("s0", 1, 0).await;
    let options = Options {
        tee: Some(TeeSource::ConfigfsTsm(tsm.root.clone())),
        gpu_evidence_command: Some(format!(
            "echo x >> {}; echo '[{{\"evidence\":\"for-'$INFERGATE_NONCE_HEX'\"}}]'",
            calls.display()
        )),
        public_attestation_per_minute: Some(1000),
        ..Options::default()
    };
    let gw = gateway_with(config(&[&sim.url], "", ""), options).await;
    let path = format!("/v1/attestation/report?nonce={NONCE}");
    let (a, b, c) = tokio::join!(
        get_json(&gw, None, &path),
        get_json(&gw, Some(KEY), &path),
        get_json(&gw, None, &path)
    );
    for (status, r) in [&a, &b, &c] {
        assert_eq!(*status, 200, "{r}");
        assert_eq!(r["intel_quote"], a.1["intel_quote"]);
        let payload: Value = serde_json::from_str(r["nvidia_payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["nonce"], NONCE);
        assert_eq!(
            payload["evidence_list"][0]["evidence"],
            format!("for-{NONCE}")
        );
    }
    assert_eq!(tsm.made.load(Ordering::Relaxed), 1);
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 1);
    // Another nonce is another quote and another GPU evidence.
    let (status, _) = get_json(&gw, None, "/v1/attestation/report?nonce=other").await;
    assert_eq!(status, 200);
    assert_eq!(tsm.made.load(Ordering::Relaxed), 2);
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reports_without_a_key_need_the_switch_and_have_their_own_limit() {
    let sim = simulator("s0", 1, 0).await;
    let closed = gateway(config(&[&sim.url], "", "")).await;
    let (status, err) = get_json(&closed, None, "/v1/attestation/report").await;
    assert_eq!(status, 401);
    assert_eq!(err["error"]["code"], "missing_api_key");
    let open = gateway_with(
        config(&[&sim.url], "", ""),
        Options {
            public_attestation_per_minute: Some(2),
            ..Options::default()
        },
    )
    .await;
    // A wrong key is refused, not taken for a public ask.
    let (status, _) = get_json(
        &open,
        Some("ig-wrong-key-zzzzzzzzzz"),
        "/v1/attestation/report",
    )
    .await;
    assert_eq!(status, 401);
    for _ in 0..2 {
        let (status, r) = get_json(&open, None, "/v1/attestation/report").await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["request_nonce"].as_str().unwrap().len(), 64);
    }
    let (status, err) = get_json(&open, None, "/v1/attestation/report").await;
    assert_eq!(status, 429);
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    // Keyed callers and inference are not behind that budget.
    let (status, _) = get_json(&open, Some(KEY), "/v1/attestation/report").await;
    assert_eq!(status, 200);
    assert_eq!(
        post_chat(&open, KEY, &chat_body("m", false), &[])
            .await
            .status(),
        200
    );
    // Bad input is a 400 either way; an unknown model a 404.
    for (path, status) in [
        ("/v1/attestation/report?signing_algo=rsa", 400),
        ("/v1/attestation/report?signing_address=0x%20", 400),
        ("/v1/attestation/report?model=nope", 404),
        ("/v1/attestation/report?nonce=a&nonce=b", 400),
    ] {
        assert_eq!(get_json(&open, Some(KEY), path).await.0, status, "{path}");
    }
    // A key that may not use the model gets no report on it.
    assert_eq!(
        get_json(&open, Some(OTHER_KEY), "/v1/attestation/report?model=m")
            .await
            .0,
        403
    );
}

const SECRET: &[u8] = b"near-report-peer-secret";

/// Two sidecars with one config (model `m` on b0 next to sidecar 0 and b1
/// next to sidecar 1), public reports on, each with its own fake TEE.
async fn pair(tsms: &[FakeTsm; 2]) -> (Vec<Gateway>, [infergate_sim::SimHandle; 2]) {
    pair_with(tsms, [1000, 1000]).await
}

/// Two peered sidecars with these keyless report budgets a minute.
async fn pair_with(
    tsms: &[FakeTsm; 2],
    public_per_minute: [u64; 2],
) -> (Vec<Gateway>, [infergate_sim::SimHandle; 2]) {
    let sims = [simulator("s0", 1, 0).await, simulator("s1", 1, 0).await];
    let listeners = [
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    ];
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let config = || {
        GatewayConfig::from_yaml(&format!(
            r#"
keys: [{{ id: key-a, sha256: "{}" }}]
backends:
  - {{ id: b0, url: "{}", sidecar: "{}" }}
  - {{ id: b1, url: "{}", sidecar: "{}" }}
models:
  - name: org/m
    targets: [{{ backend: b0, upstreamModel: {UPSTREAM_MODEL} }}, {{ backend: b1, upstreamModel: {UPSTREAM_MODEL} }}]
"#,
            hash_key(KEY),
            sims[0].url,
            urls[0],
            sims[1].url,
            urls[1],
        ))
        .unwrap()
    };
    let mut gws = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let options = Options {
            self_url: Some(urls[i].clone()),
            peer_secret: Some(SECRET.to_vec()),
            tee: Some(TeeSource::ConfigfsTsm(tsms[i].root.clone())),
            public_attestation_per_minute: Some(public_per_minute[i]),
            ..Options::default()
        };
        let state = AppState::new(Some(config()), options).unwrap();
        tokio::spawn(infergate_sidecar::serve::serve(
            listener,
            app(state.clone()),
            Default::default(),
            std::future::pending(),
        ));
        gws.push(Gateway {
            url: urls[i].clone(),
            admin_url: String::new(),
            state,
        });
    }
    (gws, sims)
}

#[tokio::test]
async fn a_keyless_ask_passed_to_a_peer_costs_that_peers_public_budget_too() {
    let tsms = [FakeTsm::start(), FakeTsm::start()];
    // The peer quotes for strangers once a minute.
    let (gws, _sims) = pair_with(&tsms, [1000, 1]).await;
    let peer = gws[1].state.signer.address.clone();
    let ask = |nonce: String| format!("/v1/attestation/report?model=org%2Fm&nonce={nonce}");
    let (status, first) = get_json(&gws[0], None, &ask("aa".repeat(32))).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["model_attestations"].as_array().unwrap().len(), 2);
    // A second stranger's ask through the first sidecar: the peer says no
    // (its budget is spent) instead of quoting again.
    let (status, second) = get_json(&gws[0], None, &ask("bb".repeat(32))).await;
    assert_eq!(status, 200, "{second}");
    let entries = second["model_attestations"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .all(|e| e["signing_address"] != peer.as_str()),
        "{second}"
    );
    assert_eq!(
        second["unreachable"].as_array().unwrap().len(),
        1,
        "{second}"
    );
    assert_eq!(tsms[1].made.load(Ordering::Relaxed), 1);
    // A caller with a key is not a stranger: the peer answers it.
    let (status, keyed) = get_json(&gws[0], Some(KEY), &ask("cc".repeat(32))).await;
    assert_eq!(status, 200, "{keyed}");
    assert_eq!(keyed["model_attestations"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_model_on_two_pods_has_an_entry_from_each_and_the_address_chooses() {
    let tsms = [FakeTsm::start(), FakeTsm::start()];
    let (gws, _sims) = pair(&tsms).await;
    let addresses: Vec<String> = gws.iter().map(|g| g.state.signer.address.clone()).collect();
    let path = format!("/v1/attestation/report?model=org%2Fm&nonce={NONCE}");
    let (status, r) = get_json(&gws[0], None, &path).await;
    assert_eq!(status, 200, "{r}");
    // The answering sidecar's own entry on top and as the gateway.
    assert_eq!(r["signing_address"], addresses[0].as_str());
    assert_eq!(
        r["gateway_attestation"]["signing_address"],
        addresses[0].as_str()
    );
    let entries = r["model_attestations"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{r}");
    for address in &addresses {
        let e = entries
            .iter()
            .find(|e| e["signing_address"] == address.as_str())
            .unwrap();
        // Each quote binds its own pod's key and the caller's nonce.
        assert_eq!(quote_report_data(e), expected_report_data(address, NONCE));
        assert_eq!(e["model_name"], "org/m");
    }
    assert!(r.get("unreachable").is_none());
    // signing_address picks the other pod's entry, from either sidecar.
    for gw in &gws {
        let path = format!(
            "{path}&signing_address={}",
            addresses[1].to_uppercase().replace("0X", "0x")
        );
        let (status, r) = get_json(gw, None, &path).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["signing_address"], addresses[1].as_str());
        assert_eq!(
            quote_report_data(&r),
            expected_report_data(&addresses[1], NONCE)
        );
        assert_eq!(r["model_attestations"].as_array().unwrap().len(), 1);
    }
    // Only the owner made a quote for it: sidecar 0 made one for itself
    // (first ask), sidecar 1 one for itself, reused by the second ask.
    assert_eq!(tsms[0].made.load(Ordering::Relaxed), 1);
    assert_eq!(tsms[1].made.load(Ordering::Relaxed), 1);
    let unknown = format!("{path}&signing_address=0x{}", "ab".repeat(20));
    let (status, err) = get_json(&gws[0], None, &unknown).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "not_found");
    // The hop header from a client is refused, not served as a peer's.
    let resp = client()
        .get(format!("{}{path}", gws[1].url))
        .header("x-infergate-hop", "v1.1.00.00.00")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn signature_accepts_near_ais_model_query() {
    let sim = simulator("s0", 2, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(&gw, KEY, &chat_body("m", false), &[]).await;
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, sig) = get_json(
        &gw,
        Some(KEY),
        &format!("/v1/signature/{id}?model=m&signing_algo=ecdsa"),
    )
    .await;
    assert_eq!(status, 200, "{sig}");
    assert_eq!(sig["signing_address"], gw.state.signer.address.as_str());
    // A repeated parameter is a JSON 400, not a plain-text one.
    let (status, err) = get_json(
        &gw,
        Some(KEY),
        &format!("/v1/signature/{id}?model=m&model=n"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn a_peer_that_cannot_answer_is_listed_and_the_rest_still_reports() {
    let sim = simulator("s0", 1, 0).await;
    // Bound, then closed: nothing listens there any more.
    let gone = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let cfg = GatewayConfig::from_yaml(&format!(
        r#"
keys: [{{ id: key-a, sha256: "{}" }}]
backends:
  - {{ id: b0, url: "{}" }}
  - {{ id: b1, url: "{}", sidecar: "{gone}" }}
  - {{ id: ext, url: "{}", attestation: false }}
models:
  - name: m
    targets: [{{ backend: b0 }}, {{ backend: b1 }}, {{ backend: ext }}]
"#,
        hash_key(KEY),
        sim.url,
        sim.url,
        sim.url,
    ))
    .unwrap();
    for secret in [Some(SECRET.to_vec()), None] {
        let options = Options {
            peer_secret: secret.clone(),
            ..Options::default()
        };
        let gw = gateway_with(cfg.clone(), options).await;
        let (status, r) = get_json(&gw, Some(KEY), "/v1/attestation/report?model=m&nonce=n").await;
        assert_eq!(status, 200, "{r}");
        // This pod's entry; the external provider has nothing to attest.
        let entries = r["model_attestations"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0]["signing_address"],
            gw.state.signer.address.as_str()
        );
        assert_eq!(r["unreachable"][0]["sidecar"], gone.as_str());
        let why = r["unreachable"][0]["error"].as_str().unwrap();
        match secret {
            Some(_) => assert!(why.contains("could not be reached"), "{why}"),
            None => assert!(why.contains("no peer secret"), "{why}"),
        }
    }
}
