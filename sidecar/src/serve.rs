//! The listener loop: hyper's HTTP/1 server with the limits a public port
//! needs (header read deadline against slowloris clients, header size cap),
//! Nagle off on every accepted socket, and a graceful drain on shutdown.
//! `run` serves a sidecar's two ports until SIGTERM or Ctrl-C; the sidecar
//! binary and the demo both start through it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::{admin_app, app, AppState};

mod drain;
mod header_limit;

/// Bind, naming the port and the flag that moves it when the port is taken.
pub async fn bind(addr: SocketAddr, flag: &str) -> io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            e.kind(),
            format!(
                "port {} is busy: something already listens on {addr}; choose another with {flag}",
                addr.port()
            ),
        )),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("binding {addr} ({flag}): {e}"),
        )),
    }
}

/// Serve the public and admin routers until SIGTERM or Ctrl-C, then drain.
/// Prints the one `listening` line scripts and tests parse for the ports.
pub async fn run(state: Arc<AppState>, public: TcpListener, admin: TcpListener) -> io::Result<()> {
    state.listening_on(public.local_addr()?);
    // Load signals for least-loaded and prefix-affinity routing.
    crate::load_peer::spawn(state.clone());
    println!(
        "infergate-sidecar listening public=http://{} admin=http://{} version={}",
        public.local_addr()?,
        admin.local_addr()?,
        state.current_version()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let options = ServeOptions::default();
    tokio::join!(
        serve(
            public,
            app(state.clone()),
            options,
            stopped(stop_rx.clone())
        ),
        serve(admin, admin_app(state), options, stopped(stop_rx)),
    );
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        #[cfg(unix)]
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections, finishing streams in flight");
}

#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A client must finish sending its request headers within this.
    pub header_timeout: Duration,
    /// Request line + headers larger than this get 431.
    pub max_header_bytes: usize,
    /// On shutdown, how long streams in flight may take to finish.
    pub drain: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            drain: Duration::from_secs(30),
        }
    }
}

/// Serve until `shutdown` resolves, then stop accepting and let open
/// connections finish (up to `drain`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = drain::Drain::default();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_header_size(options.max_header_bytes)
        // Streamed frames are small: copying one into the write buffer costs
        // less than queueing it for a vectored write (BENCHMARKS.md).
        .writev(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                // hyper's own 431 gets an OpenAI error body (see header_limit).
                let io = header_limit::HeaderLimitIo::new(stream, options.max_header_bytes);
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(options.drain) => {
            tracing::warn!("drain deadline passed; closing the remaining connections");
        }
    }
}
