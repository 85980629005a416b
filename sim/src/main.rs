//! `vllm-sim`: a vLLM simulator (OpenAI-compatible, vLLM's framing, fault
//! modes) for the demo, the benchmarks and tests that run processes.
//!
//! Prints exactly one line, `vllm-sim listening on http://IP:PORT`, which
//! scripts parse to find the port when `--listen` asks for port 0.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use infergate_sim::{self as sim, Fault, SimConfig};

#[derive(Parser)]
#[command(
    version,
    about = "vLLM simulator: OpenAI-compatible, vLLM framing, fault modes"
)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Name sent in the `x-sim-backend` header of every answer.
    #[arg(long, default_value = "sim")]
    id: String,
    /// Model name served (repeatable).
    #[arg(long = "model", default_values_t = ["sim-model".to_string()])]
    models: Vec<String>,
    /// Completion tokens per answer (a request's max_tokens may cut it).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Delay before each token (decode time per output token), in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// 500 | refuse | stall-after:N | drop-after:N | malformed-after:N | slow-headers:MS
    #[arg(long)]
    fault: Option<Fault>,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Prefix cache capacity in blocks (LRU eviction); 0 = no prefix caching.
    #[arg(long, default_value_t = 0)]
    cache_blocks: usize,
    /// Prefill time per uncached prompt token, in microseconds (prefills
    /// run one at a time; decode time per output token is --delay-ms).
    #[arg(long, default_value_t = 0)]
    prefill_us_per_token: u64,
    /// Sequences running at once; more wait in a queue. 0 = no limit.
    #[arg(long, default_value_t = 0)]
    max_running: usize,
    /// Require `Authorization: Bearer <key>` on /v1/*.
    #[arg(long, env = "VLLM_SIM_API_KEY", hide_env_values = true)]
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
        engine: sim::engine::EngineConfig {
            block_size: args.block_size,
            cache_blocks: args.cache_blocks,
            prefill_us_per_token: args.prefill_us_per_token,
            max_running: args.max_running,
        },
    };
    println!("vllm-sim listening on http://{addr}");
    std::io::stdout().flush()?;
    tokio::select! {
        served = sim::serve(listener, config) => served,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate() => Ok(()),
    }
}

async fn terminate() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
