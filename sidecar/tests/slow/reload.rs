//! Config-file hot reload in the real binary: a truncated or comment-only
//! file is a bad edit, removing every key or route needs `allowEmpty: true`,
//! and every reload logs what changed by id, never key material.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::*;
use infergate_sidecar::config::hash_key;

const SECRET_KEY: &str = "ig-reload-secret-key-7c1e";

struct Sidecar {
    child: Child,
    url: String,
    admin_url: String,
    dir: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    fn start(name: &str, yaml: &str) -> Sidecar {
        let dir = std::env::temp_dir().join(format!("infergate-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        let (child, url, admin_url) = crate::spawn_sidecar(&dir, &[], "info");
        Sidecar {
            url,
            admin_url,
            child,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap()
    }

    /// Write the file, then wait (the binary polls once a second) until the
    /// log has one more line mentioning the reload than before.
    async fn edit(&self, text: &str) -> String {
        let count = |log: &str| log.matches("config file").count();
        let before = count(&self.log());
        // Write and rename, so the poll never sees a half-written file.
        let tmp = self.dir.join("config.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("config.yaml")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log();
            if count(&log) > before {
                let line = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("config file"))
                    .unwrap();
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no reload logged for {text:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn chat_status(&self) -> u16 {
        client()
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(SECRET_KEY)
            .json(&chat_body("m", false))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn readyz(&self) -> u16 {
        let url = format!("{}/readyz", self.admin_url);
        client().get(url).send().await.unwrap().status().as_u16()
    }
}

fn yaml(sim_url: &str, extra_model: &str) -> String {
    format!(
        "# the test's config\nkeys:\n  - {{ id: team-reload, sha256: \"{}\" }}\nbackends:\n  - {{ id: b0, url: \"{sim_url}\" }}\nmodels:\n  - {{ name: m, targets: [{{ backend: b0, upstreamModel: {UPSTREAM_MODEL} }}] }}\n{extra_model}",
        hash_key(SECRET_KEY)
    )
}

fn no_ansi(log: &str) {
    // stderr is a file here, not a terminal: plain text only.
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
}

#[tokio::test]
async fn empty_or_comment_only_file_is_refused_and_the_old_config_kept() {
    if !crate::slow_tier("empty_or_comment_only_file_is_refused_and_the_old_config_kept") {
        return;
    }
    let sim = simulator("s0", 3, 0).await;
    let sc = Sidecar::start("reload-empty", &yaml(&sim.url, ""));
    assert_eq!(sc.chat_status().await, 200);
    for bad in ["", "# editor wrote only the header so far\n", "\n  \n"] {
        let line = sc.edit(bad).await;
        assert!(
            line.contains("rejected") && line.contains("empty or only comments"),
            "{bad:?}: {line}"
        );
        assert_eq!(sc.chat_status().await, 200, "after {bad:?}");
        assert_eq!(sc.readyz().await, 200, "after {bad:?}");
    }
    no_ansi(&sc.log());
}

#[tokio::test]
async fn removing_every_key_or_route_needs_allow_empty() {
    if !crate::slow_tier("removing_every_key_or_route_needs_allow_empty") {
        return;
    }
    let sim = simulator("s0", 3, 0).await;
    let full = yaml(&sim.url, "");
    let sc = Sidecar::start("reload-remove-all", &full);
    assert_eq!(sc.chat_status().await, 200);

    let no_keys = full.replace(
        &format!(
            "  - {{ id: team-reload, sha256: \"{}\" }}\n",
            hash_key(SECRET_KEY)
        ),
        "",
    );
    let no_keys = no_keys.replace("keys:\n", "keys: []\n");
    let line = sc.edit(&no_keys).await;
    assert!(
        line.contains("rejected") && line.contains("every key (1)"),
        "{line}"
    );
    assert!(line.contains("allowEmpty: true"), "{line}");
    assert_eq!(sc.chat_status().await, 200);

    let no_routes = "backends: []\n# keys and models gone\n";
    let line = sc.edit(no_routes).await;
    assert!(
        line.contains("every key") && line.contains("every model route"),
        "{line}"
    );
    assert_eq!(sc.chat_status().await, 200);

    // Said explicitly: applied, and the log says what went.
    let line = sc.edit(&format!("allowEmpty: true\n{no_keys}")).await;
    assert!(line.contains("config file reloaded"), "{line}");
    assert!(line.contains("keys 0 -[team-reload]"), "{line}");
    assert_eq!(sc.chat_status().await, 401);
    let log = sc.log();
    assert!(!log.contains(&hash_key(SECRET_KEY)) && !log.contains(SECRET_KEY));
    no_ansi(&log);
}

#[tokio::test]
async fn each_reload_logs_what_changed_by_id() {
    if !crate::slow_tier("each_reload_logs_what_changed_by_id") {
        return;
    }
    let sim = simulator("s0", 3, 0).await;
    let sc = Sidecar::start("reload-diff", &yaml(&sim.url, ""));
    let more = "  - { name: m2, aliases: [two], targets: [{ backend: b0 }] }\n";
    let line = sc.edit(&yaml(&sim.url, more)).await;
    assert!(
        line.contains("config file reloaded") && line.contains("version"),
        "{line}"
    );
    assert!(
        line.contains("keys 1; models 2 +[m2]; backends 1"),
        "{line}"
    );
    let changed = yaml(&sim.url, more).replace("aliases: [two]", "aliases: [zwei]");
    let line = sc.edit(&changed).await;
    assert!(line.contains("models 2 ~[m2]"), "{line}");
    assert_eq!(sc.chat_status().await, 200);
    no_ansi(&sc.log());
}
