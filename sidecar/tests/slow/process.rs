//! The real `infergate-sidecar` binary as a process: nothing secret in its
//! logs even at trace level, and a SIGTERM that drops no stream in flight.

use std::process::{Child, Command};
use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use infergate_sidecar::config::hash_key;

const SECRET_KEY: &str = "ig-very-secret-key-5f2a9c";
const SECRET_PROMPT: &str = "PROMPT-NEVER-LOGGED-xyzzy-42";

struct Sidecar {
    child: Child,
    url: String,
    admin_url: String,
}

fn start(config_yaml: &str, dir: &std::path::Path, rust_log: &str) -> Sidecar {
    std::fs::write(dir.join("config.yaml"), config_yaml).unwrap();
    spawn(dir, rust_log)
}

/// The sidecar on `dir/config.yaml`, whether or not that file exists yet.
fn spawn(dir: &std::path::Path, rust_log: &str) -> Sidecar {
    std::fs::write(dir.join("token"), ADMIN_TOKEN).unwrap();
    let token = dir.join("token");
    let (child, url, admin_url) = crate::spawn_sidecar(
        dir,
        &["--admin-token-file", token.to_str().unwrap()],
        rust_log,
    );
    Sidecar {
        child,
        url,
        admin_url,
    }
}

fn yaml(sim_url: &str) -> String {
    format!(
        "keys:\n  - {{ id: team-secret, sha256: \"{}\" }}\nbackends:\n  - {{ id: b0, url: \"{sim_url}\" }}\nmodels:\n  - {{ name: m, targets: [{{ backend: b0, upstreamModel: {UPSTREAM_MODEL} }}] }}\n",
        hash_key(SECRET_KEY)
    )
}

#[tokio::test]
async fn trace_logs_hold_no_key_prompt_or_completion() {
    if !crate::slow_tier("trace_logs_hold_no_key_prompt_or_completion") {
        return;
    }
    let sim = simulator("s0", 6, 0).await;
    let dir = scratch_dir("privacy");
    let mut sc = start(&yaml(&sim.url), &dir, "trace");
    let body = serde_json::json!({
        "model": "m", "stream": true, "user": "customer-name-acme",
        "messages": [{"role": "user", "content": SECRET_PROMPT}],
    });
    let c = client();
    for stream in [true, false] {
        let mut b = body.clone();
        b["stream"] = stream.into();
        let resp = c
            .post(format!("{}/v1/chat/completions", sc.url))
            .bearer_auth(SECRET_KEY)
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("tok3 "));
    }
    // A wrong key that looks like the real one, and an admin call.
    let wrong = c
        .post(format!("{}/v1/chat/completions", sc.url))
        .bearer_auth(format!("{SECRET_KEY}-wrong"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let admin = c
        .get(format!("{}/admin/v1/config", sc.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    sc.child.kill().unwrap();
    sc.child.wait().unwrap();
    let logs = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert!(
        logs.contains("TRACE") && logs.lines().count() >= 10,
        "trace logging produced too little to prove anything"
    );
    for secret in [
        SECRET_KEY,
        SECRET_PROMPT,
        ADMIN_TOKEN,
        "tok3 ",
        "customer-name-acme",
        "Bearer",
    ] {
        assert!(!logs.contains(secret), "{secret:?} appears in the logs");
    }
    // The key's id is what identifies it.
    assert!(logs.contains("team-secret"));
}

/// In a pod the config file is an optional ConfigMap volume that the
/// operator fills later: the sidecar starts without it, is not ready, and
/// serves the config once the file appears.
#[tokio::test]
async fn starts_without_its_config_file_and_serves_it_once_written() {
    if !crate::slow_tier("starts_without_its_config_file_and_serves_it_once_written") {
        return;
    }
    let sim = simulator("s0", 3, 0).await;
    let dir = scratch_dir("absent-config");
    let _ = std::fs::remove_file(dir.join("config.yaml"));
    let mut sc = spawn(&dir, "info");
    let readyz = || async {
        client()
            .get(format!("{}/readyz", sc.admin_url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(readyz().await, 503);
    let chat = || {
        client()
            .post(format!("{}/v1/chat/completions", sc.url))
            .bearer_auth(SECRET_KEY)
            .json(&chat_body("m", false))
            .send()
    };
    // No keys configured yet, so no key is valid.
    assert_eq!(chat().await.unwrap().status(), 401);

    std::fs::write(dir.join("config.yaml"), yaml(&sim.url)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while readyz().await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "config file never picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resp = chat().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("chat.completion"));
    let _ = sc.child.kill();
    let _ = sc.child.wait();
}

#[tokio::test]
async fn sigterm_finishes_streams_in_flight_and_refuses_new_ones() {
    if !crate::slow_tier("sigterm_finishes_streams_in_flight_and_refuses_new_ones") {
        return;
    }
    let sim = simulator("s0", 40, 25).await;
    let dir = scratch_dir("shutdown");
    let mut sc = start(&yaml(&sim.url), &dir, "info");
    let resp = client()
        .post(format!("{}/v1/chat/completions", sc.url))
        .bearer_auth(SECRET_KEY)
        .json(&chat_body("m", true))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut got = stream.next().await.unwrap().unwrap().to_vec();
    let status = Command::new("kill")
        .args(["-TERM", &sc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = client()
        .get(format!("{}/v1/models", sc.url))
        .bearer_auth(SECRET_KEY)
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        got.ends_with(b"data: [DONE]\n\n"),
        "the stream in flight was cut"
    );
    let exit = tokio::task::spawn_blocking(move || sc.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
