//! Attestation rules over real sockets: who may read a signature, what an
//! unsigned answer says, and the report's TEE section.

use crate::common::*;
use infergate_sidecar::{Options, TeeSource};
use serde_json::Value;

async fn get(gw: &Gateway, key: &str, path: &str) -> (u16, Value) {
    get_json(gw, Some(key), path).await
}

async fn answer_id(gw: &Gateway, stream: bool, headers: &[(&str, &str)]) -> String {
    let resp = post_chat(gw, KEY, &chat_body("m", stream), headers).await;
    let body = resp.text().await.unwrap();
    let first = if stream {
        sse_data(&body)[0].clone()
    } else {
        body
    };
    let v: Value = serde_json::from_str(&first).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn signature_is_for_the_key_that_made_the_request_only() {
    let sim = simulator("s0", 3, 0).await;
    let mut cfg = config(&[&sim.url], "", "");
    cfg.keys[1].models = vec!["*".into()];
    let gw = gateway(cfg).await;
    let id = answer_id(&gw, true, &[]).await;
    let (status, sig) = get(&gw, KEY, &format!("/v1/signature/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(sig["signing_algo"], "ecdsa");
    assert_eq!(sig["signing_address"], gw.state.signer.address.as_str());
    let (status, err) = get(&gw, OTHER_KEY, &format!("/v1/signature/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "not_found");
    // Signing happens on look-up, once per algorithm.
    get(&gw, KEY, &format!("/v1/signature/{id}")).await;
    get(
        &gw,
        KEY,
        &format!("/v1/signature/{id}?signing_algo=ed25519"),
    )
    .await;
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"infergate_signatures_total{algo="ecdsa"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"infergate_signatures_total{algo="ed25519"} 1"#));
}

#[tokio::test]
async fn unattested_backends_and_cut_streams_say_why_there_is_no_signature() {
    let sim = simulator("s0", 50, 10).await;
    let mut cfg = config(&[&sim.url], "", "");
    cfg.backends[0].attestation = false;
    let gw = gateway(cfg).await;
    let id = answer_id(&gw, false, &[]).await;
    let (status, err) = get(&gw, KEY, &format!("/v1/signature/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "signature_unavailable");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("attestation disabled"));

    let gw = gateway(config(&[&sim.url], "", "")).await;
    let resp = post_chat(&gw, KEY, &chat_body("m", true), &[]).await;
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    let v: Value =
        serde_json::from_slice(first.strip_prefix(b"data: ").unwrap().trim_ascii()).unwrap();
    drop(stream);
    gw.settle().await;
    let (status, err) = get(
        &gw,
        KEY,
        &format!("/v1/signature/{}", v["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 404);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("did not reach its end"));
}

#[tokio::test]
async fn a_full_record_store_keeps_every_new_answer_and_drops_the_oldest() {
    // A frequency-admitting cache (moka's TinyLFU) refused new records once
    // full: an answer not asked about at once lost its signature.
    let sim = simulator("s0", 1, 0).await;
    let options = Options {
        records_capacity: Some(20),
        ..Options::default()
    };
    let gw = gateway_with(config(&[&sim.url], "", ""), options).await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        ids.push(answer_id(&gw, false, &[]).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let (status, sig) = get(&gw, KEY, &format!("/v1/signature/{id}")).await;
        let expected = if i < 40 { 404 } else { 200 };
        assert_eq!(status, expected, "answer {i}: {sig}");
    }
    assert_eq!(gw.state.records.len(), 20);
}

#[tokio::test]
async fn report_carries_the_tee_quote_from_a_command_with_the_nonce() {
    let sim = simulator("s0", 1, 0).await;
    let options = Options {
        tee: Some(TeeSource::Command("echo quote-for-$INFERGATE_NONCE".into())),
        ..Options::default()
    };
    let gw = gateway_with(config(&[&sim.url], "", ""), options).await;
    let (status, report) = get(&gw, KEY, "/v1/attestation/report?nonce=abc-123").await;
    assert_eq!(status, 200);
    assert_eq!(report["tee"]["present"], true);
    assert_eq!(report["tee"]["quote"], "quote-for-abc-123");
    assert_eq!(report["nonce"], "abc-123");
    let (status, _) = get(&gw, KEY, "/v1/attestation/report?nonce=a%20b").await;
    assert_eq!(status, 400);
    // The command also gets the report data it must bind: the signing
    // address padded to 32 bytes, then the nonce's 32 bytes.
    let options = Options {
        tee: Some(TeeSource::Command(
            "echo \"$INFERGATE_REPORT_DATA/$INFERGATE_NONCE_HEX\"".into(),
        )),
        ..Options::default()
    };
    let gw = gateway_with(config(&[&sim.url], "", ""), options).await;
    let nonce = "ab".repeat(32);
    let path = format!("/v1/attestation/report?nonce={nonce}&signing_algo=ed25519");
    let (status, report) = get(&gw, KEY, &path).await;
    assert_eq!(status, 200);
    let expected = format!("{}{nonce}/{nonce}", gw.state.signer.ed25519_public);
    assert_eq!(report["intel_quote"], expected.as_str());
    assert_eq!(report["tee"]["source"], "command");
}

/// The stream path hashes exactly what it passes on, and, for an answer
/// nobody signs, hashes nothing and passes on the same bytes.
#[tokio::test]
async fn a_stream_nobody_signs_is_passed_on_unhashed() {
    use futures_util::StreamExt;
    use infergate_sidecar::stream::{End, Observed, OnEnd};
    use sha2::{Digest, Sha256};

    struct Keep(tokio::sync::oneshot::Sender<End>);
    impl OnEnd for Keep {
        fn on_end(self, end: End) {
            let _ = self.0.send(end);
        }
    }
    let frames = [
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[]}\n\ndata: [DONE]\n\n",
    ];
    for hashing in [true, false] {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let upstream = http_body_util::StreamBody::new(futures_util::stream::iter(
            frames.map(|f| Ok::<_, hyper::Error>(http_body::Frame::data(bytes::Bytes::from(f)))),
        ));
        let second = std::time::Duration::from_secs(1);
        let timer = Box::pin(tokio::time::sleep(second));
        let passed: Vec<u8> = Observed::new(upstream, timer, second, second, Keep(tx))
            .hashing(hashing)
            .map(|chunk| chunk.unwrap().to_vec())
            .concat()
            .await;
        assert_eq!(passed, frames.concat().as_bytes());
        let end = rx.await.unwrap();
        let expected = hashing.then(|| <[u8; 32]>::from(Sha256::digest(&passed)));
        assert_eq!(end.response_sha256, expected);
        assert_eq!(end.scan.id.as_deref(), Some("chatcmpl-1"));
    }
}
