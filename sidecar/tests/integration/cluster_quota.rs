//! Cluster-wide key limits on a real `redis-server`: three sidecars share
//! one budget; with Redis gone they fall back to their share, count it, and
//! keep serving; with Redis back they share again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use infergate_sidecar::config::KeyLimits;
use infergate_sidecar::Options;

struct RedisServer {
    child: Child,
    socket: PathBuf,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server on a unix socket in `dir` (no port to race for), or
/// `None` with a loud SKIPPED line where none is installed (a failure
/// where `INFERGATE_REDIS_TESTS=1` demands it, as in scripts/test).
async fn redis_server(dir: &Path) -> Option<RedisServer> {
    let socket = dir.join("redis.sock");
    let spawned = Command::new("redis-server")
        .args(["--port", "0", "--save", "", "--appendonly", "no"])
        .arg("--unixsocket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match spawned {
        Ok(c) => c,
        Err(e) if std::env::var_os("INFERGATE_REDIS_TESTS").is_some_and(|v| v == "1") => {
            panic!("INFERGATE_REDIS_TESTS=1 but redis-server cannot run: {e}")
        }
        Err(_) => {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED cluster quota tests: no redis-server (scripts/test installs Debian's)"
            );
            return None;
        }
    };
    for _ in 0..200 {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Some(RedisServer { child, socket });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("redis-server did not open {socket:?}");
}

/// Statuses of `n` requests sent round-robin over `gateways`.
async fn spread(gateways: &[Gateway], n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let gw = &gateways[i % gateways.len()];
        out.push(
            post_chat(gw, KEY, &chat_body("m", false), &[])
                .await
                .status()
                .as_u16(),
        );
    }
    out
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test]
async fn three_sidecars_share_one_budget_and_fall_back_to_their_share_without_redis() {
    let dir = scratch_dir("cluster-quota");
    let Some(redis) = redis_server(&dir).await else {
        return;
    };
    let sim = simulator("s0", 1, 0).await;
    let mut cfg = config(&[&sim.url], "", "");
    // The operator renders each of 3 sidecars a third, and the whole.
    cfg.keys[0].limits = Some(KeyLimits {
        requests_per_minute: 4,
        ..Default::default()
    });
    cfg.keys[0].cluster_limits = Some(KeyLimits {
        requests_per_minute: 12,
        ..Default::default()
    });
    let addr = format!("unix:{}", redis.socket.display());
    let mut gateways = Vec::new();
    for _ in 0..3 {
        let options = Options {
            quota_redis: Some(addr.clone()),
            ..Options::default()
        };
        gateways.push(gateway_with(cfg.clone(), options).await);
    }

    // Shared: 12 in total across the three, not 3 x 12 (and not 3 x 4 by
    // accident: one sidecar alone gets more than its share).
    let statuses = spread(&gateways, 30).await;
    assert_eq!(count(&statuses, 200), 12, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 18, "{statuses:?}");
    let alone = spread(&gateways[..1], 3).await;
    assert_eq!(
        count(&alone, 200),
        0,
        "the shared budget is spent: {alone:?}"
    );

    // Redis gone: each sidecar decides on its own share (4 a minute, none
    // of it spent yet), counts the fallback, and nothing fails otherwise.
    drop(redis);
    let statuses = spread(&gateways, 15).await;
    assert_eq!(count(&statuses, 200), 12, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 3, "{statuses:?}");
    for gw in &gateways {
        let metrics = gw.metrics().await;
        let fallbacks = metrics
            .lines()
            .find_map(|l| l.strip_prefix("infergate_quota_fallbacks_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap();
        assert!(fallbacks >= 1.0, "{metrics}");
    }

    // Redis back (empty, a fresh budget): shared again.
    let redis = redis_server(&dir).await.unwrap();
    let statuses = spread(&gateways, 15).await;
    assert_eq!(count(&statuses, 200), 12, "{statuses:?}");
    drop(redis);
}
