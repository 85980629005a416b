//! `kube-standin`: the stand-in API server as a process, for tests that
//! drive it with kubectl. Prints `kube-standin listening on URL` and, with
//! `--kubeconfig PATH`, writes a kubeconfig for it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(about = "A stand-in Kubernetes API server for tests")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let url = format!("http://{}", listener.local_addr()?);
    if let Some(path) = &cli.kubeconfig {
        std::fs::write(path, kube_standin::kubeconfig(&url))?;
    }
    println!("kube-standin listening on {url}");
    kube_standin::serve(listener).await;
    Ok(())
}
