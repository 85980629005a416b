//! The slow tier: the real `infergate-sidecar` binary as a process (log
//! privacy, drain on SIGTERM, config-file reload) and a soak run. They run
//! when `INFERGATE_SLOW_TESTS=1` (`scripts/test` sets it); otherwise each
//! test prints a loud SKIPPED line, so `cargo test --workspace` stays quick.

#[path = "../integration/common/mod.rs"]
mod common;

mod process;
mod reload;
mod soak;

/// Whether the slow tier runs; says SKIPPED (outside the captured output)
/// when it does not.
pub fn slow_tier(test: &str) -> bool {
    if std::env::var_os("INFERGATE_SLOW_TESTS").is_some_and(|v| v == "1") {
        return true;
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: slow tier; set INFERGATE_SLOW_TESTS=1 (scripts/test does)"
    );
    false
}

/// The sidecar binary on `dir/config.yaml` (there or not yet), both ports
/// of its own choosing, stderr to `dir/stderr.log`: the child and the
/// public and admin URLs from its `listening` line.
pub fn spawn_sidecar(
    dir: &std::path::Path,
    extra: &[&str],
    rust_log: &str,
) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_infergate-sidecar"))
        .args(["--config", dir.join("config.yaml").to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_owned()
    };
    (child, field("public="), field("admin="))
}
