//! Per-key quotas: requests per minute and tokens per minute as GCRA
//! (a lock-free token bucket: one atomic "theoretical arrival time"), and
//! concurrent requests as a counter whose slot is released on drop.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::KeyLimits;

mod cluster;
mod redis;

pub use cluster::Cluster;
use cluster::{Lease, Taken};

const MINUTE_NS: u64 = 60_000_000_000;

/// GCRA with a one-minute burst: `rate` units per minute, at most a
/// minute's worth at once.
pub struct Gcra {
    /// Nanoseconds one unit costs.
    unit_ns: u64,
    tat: AtomicU64,
}

impl Gcra {
    pub fn per_minute(rate: u64) -> Gcra {
        Gcra {
            unit_ns: (MINUTE_NS / rate.max(1)).max(1),
            tat: AtomicU64::new(0),
        }
    }

    /// Take `cost` units now if the bucket allows, else say how long to wait.
    pub fn take(&self, now_ns: u64, cost: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now_ns) + cost * self.unit_ns;
            if next > now_ns + MINUTE_NS {
                return Err(Duration::from_nanos(next - now_ns - MINUTE_NS));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Whether anything is left now, without taking (for budgets charged
    /// after the fact, like tokens).
    pub fn check(&self, now_ns: u64) -> Result<(), Duration> {
        let tat = self.tat.load(Ordering::Relaxed);
        if tat > now_ns + MINUTE_NS {
            Err(Duration::from_nanos(tat - now_ns - MINUTE_NS))
        } else {
            Ok(())
        }
    }

    /// Give back `cost` units taken earlier (a reservation larger than
    /// what was used).
    pub fn refund(&self, cost: u64) {
        let sub = cost.saturating_mul(self.unit_ns);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |tat| {
                Some(tat.saturating_sub(sub))
            });
    }

    /// Charge `cost` whatever the balance (it may go into debt).
    pub fn charge(&self, now_ns: u64, cost: u64) {
        let add = cost.saturating_mul(self.unit_ns);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |tat| {
                Some(tat.max(now_ns).saturating_add(add))
            });
    }
}

pub struct KeyQuota {
    /// This sidecar's share of the key's limits.
    pub limits: KeyLimits,
    /// The key's whole limits, enforced across sidecars when they share a
    /// quota store (`Cluster`); the share applies when the store is down.
    pub cluster_limits: Option<KeyLimits>,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    in_flight: AtomicU32,
    requests_key: String,
    tokens_key: String,
    requests_lease: Lease,
    tokens_lease: Lease,
}

/// Which quota said no, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub what: &'static str,
    pub retry_after: Duration,
}

impl KeyQuota {
    pub fn new(key_id: &str, limits: KeyLimits, cluster_limits: Option<KeyLimits>) -> KeyQuota {
        KeyQuota {
            limits,
            cluster_limits,
            requests_key: format!("infergate:quota:{key_id}:requests"),
            tokens_key: format!("infergate:quota:{key_id}:tokens"),
            requests_lease: Lease::default(),
            tokens_lease: Lease::default(),
            requests: (limits.requests_per_minute > 0)
                .then(|| Gcra::per_minute(limits.requests_per_minute as u64)),
            tokens: (limits.tokens_per_minute > 0)
                .then(|| Gcra::per_minute(limits.tokens_per_minute)),
            in_flight: AtomicU32::new(0),
        }
    }

    /// Admit one request: a concurrency slot, a request, and tokens left.
    /// With a cluster store the request is counted there (the concurrency
    /// slot is always this sidecar's).
    pub async fn admit(
        self: &Arc<Self>,
        now_ns: u64,
        cluster: Option<&Cluster>,
    ) -> Result<Option<KeySlot>, Exceeded> {
        let cluster = cluster.zip(self.cluster_limits);
        if let (Some(tokens), None) = (&self.tokens, cluster) {
            // (Cluster-wide tokens are reserved per request instead.)
            tokens.check(now_ns).map_err(|retry_after| Exceeded {
                what: "tokens",
                retry_after,
            })?;
        }
        let slot = match self.limits.concurrent_requests {
            0 => None,
            max => {
                self.in_flight
                    .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .map_err(|_| Exceeded {
                        what: "concurrent_requests",
                        retry_after: Duration::from_secs(1),
                    })?;
                Some(KeySlot(self.clone()))
            }
        };
        if let Some(requests) = &self.requests {
            let refused = |retry_after| Exceeded {
                what: "requests",
                retry_after,
            };
            // On refusal the slot above is dropped, and so released.
            let taken = match cluster {
                Some((c, l)) => {
                    let now_ms = now_ns / 1_000_000;
                    c.take(
                        &self.requests_key,
                        &self.requests_lease,
                        l.requests_per_minute as u64,
                        1,
                        now_ms,
                    )
                    .await
                }
                None => Taken::Unavailable,
            };
            match taken {
                Taken::Yes => {}
                Taken::No(wait) => return Err(refused(wait)),
                Taken::Unavailable => requests.take(now_ns, 1).map_err(refused)?,
            }
        }
        Ok(slot)
    }

    /// Take `tokens` from the key's token budget before the upstream is
    /// asked (the prompt and `max_tokens`, or an estimate), so concurrent
    /// long streams cannot together spend more than the budget; the
    /// reservation is settled against what was used when the answer ends,
    /// and given back whole if it never starts. At most a minute's worth is
    /// reserved, so any one request can be admitted with a full budget.
    pub async fn reserve_tokens(
        self: &Arc<Self>,
        now_ns: u64,
        tokens: u64,
        cluster: Option<&Arc<Cluster>>,
    ) -> Result<Option<TokenReservation>, Exceeded> {
        let Some(bucket) = &self.tokens else {
            return Ok(None);
        };
        let refused = |retry_after| Exceeded {
            what: "tokens",
            retry_after,
        };
        if let Some((c, l)) = cluster.zip(self.cluster_limits) {
            let per_minute = l.tokens_per_minute;
            let cost = tokens.clamp(1, per_minute.max(1));
            let now_ms = now_ns / 1_000_000;
            match c
                .take(
                    &self.tokens_key,
                    &self.tokens_lease,
                    per_minute,
                    cost,
                    now_ms,
                )
                .await
            {
                Taken::Yes => {
                    return Ok(Some(TokenReservation {
                        quota: self.clone(),
                        tokens: cost,
                        cluster: Some(c.clone()),
                        settled: false,
                    }))
                }
                Taken::No(wait) => return Err(refused(wait)),
                Taken::Unavailable => {}
            }
        }
        let tokens = tokens.clamp(1, self.limits.tokens_per_minute);
        bucket.take(now_ns, tokens).map_err(refused)?;
        Ok(Some(TokenReservation {
            quota: self.clone(),
            tokens,
            cluster: None,
            settled: false,
        }))
    }

    pub fn charge_tokens(&self, now_ns: u64, tokens: u64) {
        if let Some(t) = &self.tokens {
            t.charge(now_ns, tokens);
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Tokens taken from a key's budget for one request; given back on drop
/// unless `settle` ran.
pub struct TokenReservation {
    quota: Arc<KeyQuota>,
    tokens: u64,
    /// Taken from the cluster store (through this sidecar's lease).
    cluster: Option<Arc<Cluster>>,
    settled: bool,
}

impl TokenReservation {
    /// The request used `used` tokens: charge what the reservation did not
    /// cover, give back what it covered in excess.
    pub fn settle(mut self, now_ns: u64, used: u64) {
        self.settled = true;
        let q = &self.quota;
        match (&self.cluster, q.cluster_limits) {
            (Some(c), Some(l)) if used > self.tokens => {
                let (c, key, extra) = (c.clone(), q.tokens_key.clone(), used - self.tokens);
                // Off the response path: the answer has ended already.
                tokio::spawn(async move { c.charge(&key, l.tokens_per_minute, extra).await });
            }
            (Some(_), _) => q
                .tokens_lease
                .give_back(now_ns / 1_000_000, self.tokens.saturating_sub(used)),
            (None, _) => {
                if let Some(bucket) = &q.tokens {
                    if used > self.tokens {
                        bucket.charge(now_ns, used - self.tokens);
                    } else {
                        bucket.refund(self.tokens - used);
                    }
                }
            }
        }
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        match (&self.cluster, &self.quota.tokens) {
            (Some(_), _) => self
                .quota
                .tokens_lease
                .give_back(crate::table::now_ns() / 1_000_000, self.tokens),
            (None, Some(bucket)) => bucket.refund(self.tokens),
            (None, None) => {}
        }
    }
}

/// A key's concurrency slot, released when the request ends.
pub struct KeySlot(Arc<KeyQuota>);

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySlot")
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_minute_of_burst_then_the_steady_rate() {
        let g = Gcra::per_minute(60);
        let t0 = 1000 * SEC;
        for _ in 0..60 {
            g.take(t0, 1).unwrap();
        }
        let wait = g.take(t0, 1).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(g.take(t0 + SEC / 2, 1).is_err());
        g.take(t0 + SEC, 1).unwrap();
    }

    #[tokio::test]
    async fn token_budget_goes_into_debt_and_recovers() {
        let q = Arc::new(KeyQuota::new(
            "k",
            KeyLimits {
                tokens_per_minute: 600,
                ..Default::default()
            },
            None,
        ));
        let t0 = 1000 * SEC;
        q.admit(t0, None).await.unwrap();
        q.charge_tokens(t0, 1200); // two minutes' worth
        let e = q.admit(t0, None).await.unwrap_err();
        assert_eq!(e.what, "tokens");
        assert_eq!(e.retry_after, Duration::from_secs(60));
        assert!(q.admit(t0 + 60 * SEC, None).await.is_ok());
    }

    #[tokio::test]
    async fn reservations_hold_back_concurrent_requests_and_settle_to_what_was_used() {
        let q = Arc::new(KeyQuota::new(
            "k",
            KeyLimits {
                tokens_per_minute: 1000,
                ..Default::default()
            },
            None,
        ));
        let t0 = 1000 * SEC;
        q.admit(t0, None).await.unwrap();
        let a = q.reserve_tokens(t0, 400, None).await.unwrap().unwrap();
        let b = q.reserve_tokens(t0, 400, None).await.unwrap().unwrap();
        // Two long streams in flight hold 800: a third cannot take 400.
        let e = q.reserve_tokens(t0, 400, None).await.err().unwrap();
        assert_eq!(e.what, "tokens");
        // One used only 100: 300 come back, and the third fits.
        a.settle(t0, 100);
        let c = q.reserve_tokens(t0, 400, None).await.unwrap().unwrap();
        // A request that never reached the upstream gives back all of it.
        drop(c);
        drop(b);
        assert!(q.reserve_tokens(t0, 900, None).await.unwrap().is_some());
        // More than a minute's worth is capped so it can be admitted at all.
        let q = Arc::new(KeyQuota::new(
            "k",
            KeyLimits {
                tokens_per_minute: 10,
                ..Default::default()
            },
            None,
        ));
        assert!(q.reserve_tokens(t0, 5000, None).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn concurrency_slots_are_released_on_drop_even_when_refused_later() {
        let q = Arc::new(KeyQuota::new(
            "k",
            KeyLimits {
                concurrent_requests: 2,
                requests_per_minute: 3,
                ..Default::default()
            },
            None,
        ));
        let a = q.admit(0, None).await.unwrap();
        let b = q.admit(0, None).await.unwrap();
        assert_eq!(
            q.admit(0, None).await.unwrap_err().what,
            "concurrent_requests"
        );
        drop(a);
        let c = q.admit(0, None).await.unwrap();
        drop((b, c));
        assert_eq!(q.admit(0, None).await.unwrap_err().what, "requests");
        assert_eq!(q.in_flight(), 0);
    }
}
