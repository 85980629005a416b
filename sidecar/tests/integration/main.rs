//! The sidecar's integration tests, one binary: real sockets on port 0, a
//! gateway in this process in front of in-process vLLM simulators, and the
//! real clients (async-openai, raw HTTP). The slow tier (processes, soak)
//! is `tests/slow`; fuzzing is `sidecar/fuzz`.

mod common;

mod async_openai;
mod attest;
mod cluster_quota;
mod faults;
mod isolation;
mod limits;
mod metrics;
mod near_report;
mod properties;
mod proxy;
mod routing;
mod wire;
