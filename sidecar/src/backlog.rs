//! Prefill backlog: what a backend has yet to start answering, and which
//! prompt heads it was sent lately.
//!
//! A first token waits for the prefill queued ahead of it, then for its own
//! prefill, which is short when the pod holds the prompt's head in its
//! prefix cache. vLLM's metrics show neither (a request in prefill counts
//! as running, like one decoding; decodes barely delay a first token), so
//! each sidecar keeps, per backend, for what it sends there:
//!
//! - the *backlog*: bytes of streamed requests whose first chunk has not
//!   come back and that were cold when sent (the backend did not hold
//!   their key); a warm one prefills only its tail and counts nothing;
//! - the keys of those cold requests: a request of the same key waits for
//!   that prefill and then reuses it, so it is not behind it;
//! - the keys that started answering there lately (the last `RECENT` to
//!   `2 x RECENT`, in two generations of a Bloom filter): what the pod's
//!   cache likely holds (a request turned away or failed before its first
//!   chunk did not put its prompt there).
//!
//! Every request a pod gets passes through the sidecar next to it, so that
//! sidecar's numbers for its pod are exact (but for the filter's rare false
//! positives); it shares them with peers (`load_peer`). Lock-free, and a
//! look-up is a few atomic loads, so a choice over many backends stays
//! cheap.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

/// Keys per generation of the held filter. A pod's prefix cache holds far
/// more prompts; this only needs the ones that come back while warm.
pub const RECENT: usize = 64;
/// Cold requests whose keys are kept (more may wait; they still count).
pub const COLD_KEYS: usize = 8;
/// 1024 bits: with both generations (up to `2 x RECENT` keys) and three
/// bits a key, about 3% of keys not held look held (the pod's own sidecar
/// then corrects a choice made on that).
pub const BLOOM_WORDS: usize = 16;

/// Keys are prefix hashes; 0 marks an empty slot.
fn slot_key(key: u64) -> u64 {
    key.max(1)
}

pub struct Backlog {
    /// Two generations; the older is cleared and reused every `RECENT`
    /// keys, so a key is remembered for `RECENT` to `2 x RECENT` more.
    held: [AtomicBloom; 2],
    inserted: AtomicUsize,
    bytes: AtomicU64,
    cold: [AtomicU64; COLD_KEYS],
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog {
            held: Default::default(),
            inserted: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            cold: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// One request's place in a backlog, given back when it starts answering
/// or ends without.
#[derive(Debug, Default)]
pub struct Waiting {
    key: Option<u64>,
    bytes: u64,
    slot: Option<usize>,
}

impl Backlog {
    /// A streamed request sent to the backend: `cold` when the backend is
    /// not thought to hold its key (an unkeyed one is cold: nothing says
    /// its prompt is cached).
    pub fn admit(&self, key: Option<u64>, bytes: u64, cold: bool) -> Waiting {
        if !cold {
            return Waiting {
                key,
                ..Waiting::default()
            };
        }
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        let slot = key.and_then(|k| {
            self.cold.iter().position(|c| {
                c.compare_exchange(0, slot_key(k), Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
        });
        Waiting { key, bytes, slot }
    }

    /// The request's first chunk came back (`started`: its prompt is in
    /// the pod's cache now) or it ended without one.
    pub fn release(&self, w: Waiting, started: bool) {
        if let (true, Some(k)) = (started, w.key) {
            let n = self.inserted.fetch_add(1, Ordering::Relaxed);
            let generation = &self.held[(n / RECENT) % 2];
            if n % RECENT == 0 {
                // A race with an insert here loses at most that key.
                generation.clear();
            }
            generation.insert(k);
        }
        self.bytes.fetch_sub(w.bytes, Ordering::AcqRel);
        if let Some(i) = w.slot {
            self.cold[i].store(0, Ordering::Release);
        }
    }

    /// Bytes of cold prefill waiting.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// A cold request of this key is waiting.
    pub fn prefilling(&self, key: u64) -> bool {
        let k = slot_key(key);
        self.cold.iter().any(|c| c.load(Ordering::Relaxed) == k)
    }

    /// The key started answering here lately.
    pub fn holds(&self, key: u64) -> bool {
        self.held.iter().any(|g| g.contains(key))
    }

    /// The keys of the cold requests waiting, for peers.
    pub fn cold_keys(&self) -> Vec<u64> {
        self.cold
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .filter(|&k| k != 0)
            .collect()
    }

    /// The keys held (both generations), for peers.
    pub fn bloom(&self) -> Bloom {
        let (a, b) = (self.held[0].get(), self.held[1].get());
        Bloom(std::array::from_fn(|i| a.0[i] | b.0[i]))
    }
}

/// The three bits of a key (keys are already hashes: three cuts of a remix).
fn bits(key: u64) -> [usize; 3] {
    let k = slot_key(key);
    let total = (BLOOM_WORDS * 64) as u64;
    let m = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    [
        (k % total) as usize,
        ((m >> 20) % total) as usize,
        ((m >> 40) % total) as usize,
    ]
}

/// A set of keys in `BLOOM_WORDS` words, as peers send it: no false
/// negatives, a few false positives.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bloom(pub [u64; BLOOM_WORDS]);

impl Bloom {
    pub fn insert(&mut self, key: u64) {
        for bit in bits(key) {
            self.0[bit / 64] |= 1 << (bit % 64);
        }
    }

    pub fn contains(&self, key: u64) -> bool {
        bits(key)
            .iter()
            .all(|&bit| self.0[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// A `Bloom` shared between threads: a look-up is three loads.
pub struct AtomicBloom([AtomicU64; BLOOM_WORDS]);

impl Default for AtomicBloom {
    fn default() -> Self {
        AtomicBloom(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl AtomicBloom {
    pub fn insert(&self, key: u64) {
        for bit in bits(key) {
            self.0[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    pub fn contains(&self, key: u64) -> bool {
        bits(key)
            .iter()
            .all(|&bit| self.0[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    pub fn set(&self, b: &Bloom) {
        for (w, v) in self.0.iter().zip(b.0) {
            w.store(v, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> Bloom {
        Bloom(std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed)))
    }

    pub fn clear(&self) {
        self.0.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    }
}

/// What one sidecar believes about a backend, for one request's key.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct View {
    /// Bytes of cold prefill waiting there.
    pub backlog: f64,
    /// The backend holds the key (sent there lately, or being prefilled).
    pub holds: bool,
    /// A cold request of the same key is part of the backlog.
    pub prefilling: bool,
}

/// Estimated time to first token on a backend, in bytes of prefill: the
/// cold work ahead, less the same key's own prefill (the request waits for
/// it and then reuses it instead of computing it again), plus its own
/// prompt unless the backend holds the key.
pub fn cost(v: View, bytes: f64) -> f64 {
    let ahead = if v.prefilling {
        (v.backlog - bytes).max(0.0)
    } else {
        v.backlog
    };
    ahead + if v.holds || v.prefilling { 0.0 } else { bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_requests_count_until_they_start_and_warm_ones_never() {
        let b = Backlog::default();
        let first = b.admit(Some(7), 1000, true);
        assert_eq!(b.bytes(), 1000);
        assert!(b.prefilling(7) && !b.holds(7));
        // The same key again, behind that prefill: nothing more to wait for.
        let second = b.admit(Some(7), 1000, false);
        assert_eq!(b.bytes(), 1000);
        let unkeyed = b.admit(None, 300, true);
        assert_eq!(b.bytes(), 1300);
        b.release(first, true);
        assert!(!b.prefilling(7) && b.holds(7));
        b.release(second, true);
        b.release(unkeyed, true);
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn a_request_that_never_started_leaves_no_key_behind() {
        let b = Backlog::default();
        b.release(b.admit(Some(9), 500, true), false);
        b.release(b.admit(Some(8), 500, false), false);
        assert_eq!(b.bytes(), 0);
        assert!(!b.holds(9) && !b.holds(8) && !b.prefilling(9));
    }

    #[test]
    fn only_the_last_keys_are_held() {
        let b = Backlog::default();
        let key = |i: u64| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
        for i in 0..3 * RECENT as u64 {
            b.release(b.admit(Some(key(i)), 1, false), true);
        }
        // The last two generations are held; the first is gone.
        assert!((RECENT as u64..3 * RECENT as u64).all(|i| b.holds(key(i))));
        let forgotten = (0..RECENT as u64).filter(|&i| !b.holds(key(i))).count();
        assert!(forgotten > RECENT * 9 / 10, "{forgotten}");
    }

    #[test]
    fn more_cold_requests_than_slots_still_count() {
        let b = Backlog::default();
        let w: Vec<_> = (1..=COLD_KEYS as u64 + 2)
            .map(|k| b.admit(Some(k), 10, true))
            .collect();
        assert_eq!(b.bytes(), 10 * (COLD_KEYS as u64 + 2));
        assert_eq!(b.cold_keys().len(), COLD_KEYS);
        w.into_iter().for_each(|w| b.release(w, false));
        assert_eq!((b.bytes(), b.cold_keys().len()), (0, 0));
    }

    #[test]
    fn the_bloom_filter_has_what_was_sent_and_little_else() {
        let b = Backlog::default();
        let keys: Vec<u64> = (0..2 * RECENT as u64)
            .map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()))
            .collect();
        for &k in &keys {
            b.release(b.admit(Some(k), 1, false), true);
        }
        let bloom = b.bloom();
        assert!(keys.iter().all(|&k| bloom.contains(k)));
        let false_positives = (10_000..20_000u64)
            .filter(|i| bloom.contains(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())))
            .count();
        assert!(false_positives < 600, "{false_positives} of 10000");
        let own = (10_000..20_000u64)
            .filter(|i| b.holds(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())))
            .count();
        assert!(own < 600, "{own} of 10000");
    }

    #[test]
    fn cost_is_the_work_ahead_plus_the_own_prefill_unless_held() {
        let idle = View::default();
        assert_eq!(cost(idle, 100.0), 100.0);
        let warm = View {
            holds: true,
            ..idle
        };
        assert_eq!(cost(warm, 100.0), 0.0);
        // Warm, but behind 150 bytes of someone else's cold prefill.
        let busy = View {
            backlog: 150.0,
            holds: true,
            prefilling: false,
        };
        assert_eq!(cost(busy, 100.0), 150.0);
        // Behind its own key's cold prefill (and 30 bytes of another).
        let joining = View {
            backlog: 130.0,
            holds: true,
            prefilling: true,
        };
        assert_eq!(cost(joining, 100.0), 30.0);
    }
}
