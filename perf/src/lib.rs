//! The processes a comparison starts: a binary found next to the running
//! one (or named by an environment variable), its address read from the
//! first line it prints, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Proc {
    pub child: Child,
    /// The first `http://` address it printed (`public=` for a sidecar).
    pub url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` in this executable's directory.
pub fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent().expect("a directory").join(name)
}

/// `$env` if set, else the sibling `name`.
pub fn binary(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map_or_else(|| sibling(name), PathBuf::from)
}

/// Starts `cmd` and waits for the address on its first line.
pub fn start(mut cmd: Command, what: &str) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e} (build it first: see BENCHMARKS.md)"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .split_whitespace()
        .find_map(|w| {
            let w = w.strip_prefix("public=").unwrap_or(w);
            w.starts_with("http://").then(|| w.to_owned())
        })
        .unwrap_or_else(|| panic!("{what} printed {line:?}"));
    Proc { child, url }
}

/// `vllm-sim` (`$VLLM_SIM_BIN`, else the sibling) serving `sim-model`, the
/// name the sidecar rewrites to, and `m`, which the passthrough sends as
/// the client wrote it.
pub fn start_sim() -> Proc {
    let mut cmd = Command::new(binary("VLLM_SIM_BIN", "vllm-sim"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--model",
        "sim-model",
        "--model",
        "m",
    ])
    .args(["--id", "sim"])
    .env("RUST_LOG", "warn");
    start(cmd, "vllm-sim")
}

/// The sidecar's config for a comparison: the one key, the simulator as
/// an attested backend, `m` routed to `sim-model`, then `extra` lines.
pub fn sidecar_config(key: &str, sim_url: &str, extra: &str) -> String {
    use sha2::{Digest, Sha256};
    let key_hash = hex::encode(Sha256::digest(key.as_bytes()));
    format!(
        "keys: [{{ id: bench, sha256: \"{key_hash}\" }}]\n\
         backends: [{{ id: sim, url: \"{sim_url}\", attestation: true }}]\n\
         models: [{{ name: m, targets: [{{ backend: sim, upstreamModel: sim-model }}] }}]\n\
         {extra}"
    )
}
