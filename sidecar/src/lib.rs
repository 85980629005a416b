//! infergate sidecar: the gateway library (`app(state) -> Router`) and the vLLM simulator.

pub mod config;
pub mod sim;
