//! Per-key quotas: requests per minute and tokens per minute as GCRA
//! (a lock-free token bucket: one atomic "theoretical arrival time"), and
//! concurrent requests as a counter whose slot is released on drop.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::KeyLimits;

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
    pub limits: KeyLimits,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    in_flight: AtomicU32,
}

/// Which quota said no, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub what: &'static str,
    pub retry_after: Duration,
}

impl KeyQuota {
    pub fn new(limits: KeyLimits) -> KeyQuota {
        KeyQuota {
            limits,
            requests: (limits.requests_per_minute > 0)
                .then(|| Gcra::per_minute(limits.requests_per_minute as u64)),
            tokens: (limits.tokens_per_minute > 0)
                .then(|| Gcra::per_minute(limits.tokens_per_minute)),
            in_flight: AtomicU32::new(0),
        }
    }

    /// Admit one request: a concurrency slot, a request, and tokens left.
    pub fn admit(self: &Arc<Self>, now_ns: u64) -> Result<Option<KeySlot>, Exceeded> {
        if let Some(tokens) = &self.tokens {
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
            // On refusal the slot above is dropped, and so released.
            requests.take(now_ns, 1).map_err(|retry_after| Exceeded {
                what: "requests",
                retry_after,
            })?;
        }
        Ok(slot)
    }

    /// Take `tokens` from the key's token budget before the upstream is
    /// asked (the prompt and `max_tokens`, or an estimate), so concurrent
    /// long streams cannot together spend more than the budget; the
    /// reservation is settled against what was used when the answer ends,
    /// and given back whole if it never starts. At most a minute's worth is
    /// reserved, so any one request can be admitted with a full budget.
    pub fn reserve_tokens(
        self: &Arc<Self>,
        now_ns: u64,
        tokens: u64,
    ) -> Result<Option<TokenReservation>, Exceeded> {
        let Some(bucket) = &self.tokens else {
            return Ok(None);
        };
        let tokens = tokens.clamp(1, self.limits.tokens_per_minute);
        bucket
            .take(now_ns, tokens)
            .map_err(|retry_after| Exceeded {
                what: "tokens",
                retry_after,
            })?;
        Ok(Some(TokenReservation {
            quota: self.clone(),
            tokens,
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
    settled: bool,
}

impl TokenReservation {
    /// The request used `used` tokens: charge what the reservation did not
    /// cover, give back what it covered in excess.
    pub fn settle(mut self, now_ns: u64, used: u64) {
        self.settled = true;
        if let Some(bucket) = &self.quota.tokens {
            if used > self.tokens {
                bucket.charge(now_ns, used - self.tokens);
            } else {
                bucket.refund(self.tokens - used);
            }
        }
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        if !self.settled {
            if let Some(bucket) = &self.quota.tokens {
                bucket.refund(self.tokens);
            }
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

    #[test]
    fn token_budget_goes_into_debt_and_recovers() {
        let q = Arc::new(KeyQuota::new(KeyLimits {
            tokens_per_minute: 600,
            ..Default::default()
        }));
        let t0 = 1000 * SEC;
        q.admit(t0).unwrap();
        q.charge_tokens(t0, 1200); // two minutes' worth
        let e = q.admit(t0).unwrap_err();
        assert_eq!(e.what, "tokens");
        assert_eq!(e.retry_after, Duration::from_secs(60));
        assert!(q.admit(t0 + 60 * SEC).is_ok());
    }

    #[test]
    fn reservations_hold_back_concurrent_requests_and_settle_to_what_was_used() {
        let q = Arc::new(KeyQuota::new(KeyLimits {
            tokens_per_minute: 1000,
            ..Default::default()
        }));
        let t0 = 1000 * SEC;
        q.admit(t0).unwrap();
        let a = q.reserve_tokens(t0, 400).unwrap().unwrap();
        let b = q.reserve_tokens(t0, 400).unwrap().unwrap();
        // Two long streams in flight hold 800: a third cannot take 400.
        let e = q.reserve_tokens(t0, 400).err().unwrap();
        assert_eq!(e.what, "tokens");
        // One used only 100: 300 come back, and the third fits.
        a.settle(t0, 100);
        let c = q.reserve_tokens(t0, 400).unwrap().unwrap();
        // A request that never reached the upstream gives back all of it.
        drop(c);
        drop(b);
        assert!(q.reserve_tokens(t0, 900).unwrap().is_some());
        // More than a minute's worth is capped so it can be admitted at all.
        let q = Arc::new(KeyQuota::new(KeyLimits {
            tokens_per_minute: 10,
            ..Default::default()
        }));
        assert!(q.reserve_tokens(t0, 5000).unwrap().is_some());
    }

    #[test]
    fn concurrency_slots_are_released_on_drop_even_when_refused_later() {
        let q = Arc::new(KeyQuota::new(KeyLimits {
            concurrent_requests: 2,
            requests_per_minute: 3,
            ..Default::default()
        }));
        let a = q.admit(0).unwrap();
        let b = q.admit(0).unwrap();
        assert_eq!(q.admit(0).unwrap_err().what, "concurrent_requests");
        drop(a);
        let c = q.admit(0).unwrap();
        drop((b, c));
        assert_eq!(q.admit(0).unwrap_err().what, "requests");
        assert_eq!(q.in_flight(), 0);
    }
}
