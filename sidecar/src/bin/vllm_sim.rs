//! `vllm-sim`: an OpenAI-compatible vLLM simulator with fault modes.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use infergate_sidecar::sim::{self, Fault, SimConfig};

#[derive(Parser)]
#[command(
    version,
    about = "vLLM simulator: OpenAI-compatible, vLLM framing, fault modes"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Name reported in the `x-sim-backend` header.
    #[arg(long, default_value = "sim")]
    id: String,
    /// Model names served (repeatable).
    #[arg(long = "model", default_values_t = ["sim-model".to_string()])]
    models: Vec<String>,
    /// Completion tokens per answer (capped by max_tokens).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Delay before each token.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// 500 | refuse | stall-after:N | drop-after:N | malformed-after:N | slow-headers:MS
    #[arg(long)]
    fault: Option<Fault>,
    #[arg(long, env = "VLLM_SIM_API_KEY")]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let config = SimConfig {
        id: args.id,
        models: args.models,
        tokens: args.tokens,
        delay: Duration::from_millis(args.delay_ms),
        fault: args.fault,
        api_key: args.api_key,
    };
    println!("vllm-sim listening on http://{addr}");
    std::io::stdout().flush()?;
    tokio::select! {
        r = sim::serve(listener, config) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate() => Ok(()),
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
