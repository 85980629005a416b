//! `kube-standin`: the stand-in API server as a process, for tests that
//! drive it with kubectl. Prints `kube-standin listening on URL` and, with
//! `--kubeconfig PATH`, writes an admin kubeconfig for it. With `--rbac`,
//! a client impersonating a user (`kubectl --as`, kubeconfig `as:`) is
//! limited by the RBAC objects stored.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(about = "A stand-in Kubernetes API server for tests")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write an admin kubeconfig here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Authorize requests by the stored Roles, ClusterRoles and bindings.
    #[arg(long)]
    rbac: bool,
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
    kube_standin::serve(listener, cli.rbac).await;
    Ok(())
}
