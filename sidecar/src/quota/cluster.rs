//! Cluster-wide limits: a key's request and token budgets live in Redis
//! (GCRA on Redis's clock), so N sidecars together give a key its limit,
//! not N times it. Each sidecar leases small batches (a tenth of a second's
//! worth) so the request path rarely waits on Redis; the slack is at most a
//! batch per sidecar. When Redis cannot answer, the sidecar enforces its
//! local share instead and counts it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::redis::{Gcra, Redis};

const MINUTE_US: u64 = 60_000_000;
/// Leased units unused this long go unused (they may belong elsewhere).
const LEASE_MS: u64 = 1_000;

pub struct Cluster {
    redis: Redis,
    /// Decisions made on the local share because Redis did not answer.
    pub fallbacks: Counter,
}

/// What the cluster said about taking `cost` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Yes,
    No(Duration),
    /// Redis did not answer: decide locally.
    Unavailable,
}

impl Cluster {
    pub fn new(addr: &str, fallbacks: Counter) -> Self {
        Cluster {
            redis: Redis::new(addr),
            fallbacks,
        }
    }

    /// Take `cost` of `per_minute` for `key`, from this sidecar's lease or
    /// else from Redis (leasing a batch).
    pub async fn take(
        &self,
        key: &str,
        lease: &Lease,
        per_minute: u64,
        cost: u64,
        now_ms: u64,
    ) -> Taken {
        if lease.take(now_ms, cost) {
            return Taken::Yes;
        }
        let batch = cost.max(per_minute.div_ceil(600)).min(per_minute.max(1));
        match self
            .redis
            .gcra(key, unit_us(per_minute), MINUTE_US, batch as i64, false)
            .await
        {
            Ok(Gcra::Taken) => {
                lease.add(now_ms, batch.saturating_sub(cost));
                Taken::Yes
            }
            Ok(Gcra::Wait(wait)) => Taken::No(wait),
            Err(e) => {
                tracing::warn!(error = %e, "quota store unavailable; enforcing the local share");
                self.fallbacks.inc();
                Taken::Unavailable
            }
        }
    }

    /// Charge `cost` past the limit (tokens used beyond a reservation).
    pub async fn charge(&self, key: &str, per_minute: u64, cost: u64) {
        if self
            .redis
            .gcra(key, unit_us(per_minute), MINUTE_US, cost as i64, true)
            .await
            .is_err()
        {
            self.fallbacks.inc();
        }
    }
}

/// Microseconds one unit costs at `per_minute`.
fn unit_us(per_minute: u64) -> u64 {
    (MINUTE_US / per_minute.max(1)).max(1)
}

/// Units this sidecar took from Redis and has not used yet.
#[derive(Default)]
pub struct Lease {
    units: AtomicI64,
    expires_ms: AtomicU64,
}

impl Lease {
    fn take(&self, now_ms: u64, cost: u64) -> bool {
        if now_ms >= self.expires_ms.load(Ordering::Acquire) {
            return false;
        }
        self.units
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                (u >= cost as i64).then_some(u - cost as i64)
            })
            .is_ok()
    }

    fn add(&self, now_ms: u64, units: u64) {
        if now_ms >= self.expires_ms.load(Ordering::Acquire) {
            self.units.store(0, Ordering::Release);
        }
        self.units.fetch_add(units as i64, Ordering::AcqRel);
        self.expires_ms.store(now_ms + LEASE_MS, Ordering::Release);
    }

    /// Units reserved and not used go back to the lease while it lasts.
    pub fn give_back(&self, now_ms: u64, units: u64) {
        if now_ms < self.expires_ms.load(Ordering::Acquire) {
            self.units.fetch_add(units as i64, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_serves_until_it_runs_out_or_expires() {
        let l = Lease::default();
        assert!(!l.take(0, 1));
        l.add(0, 3);
        assert!(l.take(10, 2) && l.take(10, 1) && !l.take(10, 1));
        l.give_back(20, 2);
        assert!(l.take(30, 2));
        l.give_back(40, 5);
        assert!(!l.take(LEASE_MS + 1, 1), "an expired lease serves nothing");
    }
}
