//! `infergate-demo`: the sidecar with the bundled example config
//! (`examples/sidecar.yaml`), its backends replaced by in-process vLLM
//! simulators; prints every address it uses and a curl line that works.
//!
//! A binary of its own so the production `infergate-sidecar` carries no
//! simulator: the sidecar crate does not depend on `infergate-sim` at all
//! (only its tests do), whatever features a build turns on.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use infergate_config::{BackendId, GatewayConfig};
use infergate_sidecar::{logging, serve, AppState, Options};
use infergate_sim::{self as sim, SimConfig};

const DEMO_CONFIG: &str = include_str!("../../examples/sidecar.yaml");
/// The example config holds only this key's hash; printed for the demo.
const DEMO_KEY: &str = "ig-demo-0123456789abcdef";

#[derive(Parser)]
#[command(
    version,
    about = "infergate demo: the gateway with the example config and two vLLM simulators"
)]
struct Args {
    /// Public listener (OpenAI API); port 0 picks a free one.
    #[arg(long, env = "INFERGATE_DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin listener (metrics, health); port 0 picks a free one.
    #[arg(
        long,
        env = "INFERGATE_DEMO_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    admin_listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _log_level = logging::init(false);
    demo(args).await
}

/// The example config behind the gateway, its backends replaced by
/// in-process simulators on free ports; prints every address it uses.
async fn demo(args: Args) -> anyhow::Result<()> {
    let mut config = GatewayConfig::from_yaml(DEMO_CONFIG)?;
    // Our own listeners first, so a busy port fails before anything starts.
    let public = serve::bind(args.listen, "--listen").await?;
    let admin = serve::bind(args.admin_listen, "--admin-listen").await?;
    let listen = public.local_addr()?;
    println!("demo: two vLLM simulators behind the gateway; API key (demo only): {DEMO_KEY}");
    println!("  gateway  http://{listen}  (OpenAI API; --listen)");
    println!(
        "  admin    http://{}  (/metrics, /healthz, /readyz; --admin-listen)",
        admin.local_addr()?
    );
    let upstream_models = |backend: &BackendId| -> Vec<String> {
        let mut names: Vec<String> = config
            .models
            .iter()
            .flat_map(|m| &m.targets)
            .filter(|t| t.backend.as_ref() == Some(backend))
            .filter_map(|t| t.upstream_model.clone())
            .collect();
        names.dedup();
        names
    };
    let models: Vec<Vec<String>> = config
        .backends
        .iter()
        .map(|b| upstream_models(&b.id))
        .collect();
    for (backend, models) in config.backends.iter_mut().zip(models) {
        let listener = serve::bind("127.0.0.1:0".parse()?, "(a free port)").await?;
        backend.url = format!("http://{}", listener.local_addr()?);
        println!(
            "  {:<8} {}  (vLLM simulator: {})",
            backend.id,
            backend.url,
            models.join(", ")
        );
        let cfg = SimConfig {
            id: backend.id.to_string(),
            models,
            tokens: 24,
            delay: Duration::from_millis(20),
            ..SimConfig::default()
        };
        tokio::spawn(sim::serve(listener, cfg));
    }
    let state = AppState::new(Some(config), Options::default())?;
    println!(
        "try:\n  curl -sN http://{listen}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \
         -H 'Content-Type: application/json' \
         -d '{{\"model\":\"llama\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
    );
    println!("  curl -s http://{listen}/v1/models -H 'Authorization: Bearer {DEMO_KEY}'");
    Ok(serve::run(state, public, admin).await?)
}
