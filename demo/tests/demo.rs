//! `infergate-demo` as a process: it honours its listen flags,
//! prints every address it uses, serves the example route, and names a busy
//! port instead of dying obscurely.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const DEMO_KEY: &str = "ig-demo-0123456789abcdef";

fn demo(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infergate-demo"));
    cmd.args(args)
        .env_remove("INFERGATE_DEMO_LISTEN")
        .env_remove("INFERGATE_DEMO_ADMIN_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo's stdout up to its `listening` line.
fn banner(child: &mut Child) -> Vec<String> {
    let mut lines = Vec::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "demo ended: {lines:?}"
        );
        let done = line.contains("listening public=");
        lines.push(line.trim_end().to_owned());
        if done {
            return lines;
        }
    }
}

fn address_of(lines: &[String], name: &str) -> String {
    lines
        .iter()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next().unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("no address for {name} in {lines:?}"))
}

#[tokio::test]
async fn demo_honours_its_flags_prints_every_port_and_serves() {
    let mut child = demo(&["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    let lines = banner(&mut child);
    let _running = Running(child);
    let gateway = address_of(&lines, "gateway");
    let admin = address_of(&lines, "admin");
    for addr in [
        &gateway,
        &admin,
        &address_of(&lines, "vllm-0"),
        &address_of(&lines, "vllm-1"),
    ] {
        assert!(
            addr.starts_with("http://127.0.0.1:") && !addr.ends_with(":0"),
            "{addr}"
        );
    }
    // The curl line it prints points at the port it really uses.
    assert!(lines
        .iter()
        .any(|l| l.contains(&format!("curl -sN {gateway}/v1/chat/completions"))));

    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(DEMO_KEY)
        .json(
            &serde_json::json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ready = client.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "a plain test thread polling a child process, not a runtime thread"
)]
fn a_busy_port_is_named_in_the_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut child = demo(&[
        "--listen",
        &addr.to_string(),
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "demo kept running on a busy port"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&format!("port {} is busy", addr.port())) && err.contains("--listen"),
        "{err}"
    );
}
