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
