//! A bounded map from response ids to small values, each kept for a fixed
//! time after it was inserted: what answer records and learnt owners need,
//! and nothing more. (A moka cache spent more on its own bookkeeping per
//! entry than a compact record holds; see BENCHMARKS.md, "Answer records".)
//!
//! The time to live runs from insertion, so insertion order is expiry order:
//! each shard is a FIFO ring of entries with a hash index into it, and both
//! eviction for capacity and for age take from the front. The first entry
//! for a key stays until it leaves: a second insert of the key is refused
//! (an upstream that reuses an id never takes over another answer's
//! record). Readers and writers of different shards never meet.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

/// A value that carries its own key (so the key is stored once).
pub trait Keyed {
    fn key(&self) -> &str;
}

pub struct Store<T> {
    shards: Box<[Mutex<Shard<T>>]>,
    /// Keyed per process: ids come from upstreams (and so, in part, from
    /// clients), and must not be able to pile up in one bucket.
    hasher: RandomState,
    ttl_ms: u64,
    epoch: Instant,
    /// Moves the clock forward in tests (instead of sleeping).
    #[cfg(test)]
    skew_ms: std::sync::atomic::AtomicU64,
}

struct Shard<T> {
    /// Sequence numbers of the entries in `ring`, found by their key's hash.
    index: HashTable<u32>,
    /// Oldest first.
    ring: VecDeque<Timed<T>>,
    /// Sequence number of `ring[0]`; an entry's position is its number
    /// minus this (wrapping, so numbers may run past `u32::MAX`).
    head: u32,
    capacity: usize,
}

struct Timed<T> {
    /// Milliseconds since the store's epoch.
    at_ms: u64,
    value: T,
}

/// Below this many entries a shard is not split further: small stores keep
/// an exact FIFO over all their entries.
const MIN_PER_SHARD: u64 = 1024;
const MAX_SHARDS: usize = 16;

impl<T: Keyed> Store<T> {
    /// At most `capacity` entries, each for `ttl` after its insertion.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        let mut n = 1;
        while n < MAX_SHARDS && capacity / (2 * n as u64) >= MIN_PER_SHARD {
            n *= 2;
        }
        // The shards' capacities add up to exactly `capacity`.
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        let shards = (0..n)
            .map(|i| {
                Mutex::new(Shard {
                    index: HashTable::new(),
                    ring: VecDeque::new(),
                    head: 0,
                    capacity: capacity / n + usize::from(i < capacity % n),
                })
            })
            .collect();
        Store {
            shards,
            hasher: RandomState::new(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            epoch: Instant::now(),
            #[cfg(test)]
            skew_ms: Default::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        #[cfg(test)]
        let now = now + self.skew_ms.load(std::sync::atomic::Ordering::Relaxed);
        now
    }

    /// The shard for `hash`, its expired entries already gone. Bits 32..
    /// pick it: hashbrown takes the bucket from the low bits and its tag
    /// from the top seven, so those stay spread within a shard.
    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard<T>> {
        // In range: the number of shards is a power of two (at least one).
        let i = (hash >> 32) as usize & (self.shards.len() - 1);
        let mut shard = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
        let now = self.now_ms();
        while shard
            .ring
            .front()
            .is_some_and(|t| now.saturating_sub(t.at_ms) >= self.ttl_ms)
        {
            shard.pop_front(&self.hasher);
        }
        shard
    }

    /// Keeps `value` unless its key is already here (then it is dropped and
    /// the first stays); returns whether it was kept. The oldest entry of
    /// the shard makes room when it is full.
    pub fn insert(&self, value: T) -> bool {
        let hash = self.hasher.hash_one(value.key());
        let at_ms = self.now_ms();
        self.shard(hash)
            .insert(hash, Timed { at_ms, value }, &self.hasher)
    }

    /// `f` on the live entry for `key`, under its shard's lock (keep it
    /// short: copy out what is needed).
    pub fn with<R>(&self, key: &str, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash);
        let pos = shard.find(hash, key)?;
        shard.ring.get_mut(pos).map(|t| f(&mut t.value))
    }

    /// Entries held now (expired ones not yet evicted included).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).ring.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Keyed> Shard<T> {
    fn find(&self, hash: u64, key: &str) -> Option<usize> {
        let (ring, head) = (&self.ring, self.head);
        self.index
            .find(hash, |&seq| {
                ring.get(seq.wrapping_sub(head) as usize)
                    .is_some_and(|t| t.value.key() == key)
            })
            .map(|&seq| seq.wrapping_sub(head) as usize)
    }

    fn insert(&mut self, hash: u64, entry: Timed<T>, hasher: &RandomState) -> bool {
        if self.capacity == 0 || self.find(hash, entry.value.key()).is_some() {
            return false;
        }
        while self.ring.len() >= self.capacity {
            self.pop_front(hasher);
        }
        // Grow by doubling, but never past the capacity: a ring sized to
        // the next power of two would hold up to twice the memory needed.
        if self.ring.len() == self.ring.capacity() {
            let more = self.ring.len().max(4).min(self.capacity - self.ring.len());
            self.ring.reserve_exact(more);
        }
        let seq = self.head.wrapping_add(self.ring.len() as u32);
        self.ring.push_back(entry);
        let (ring, head) = (&self.ring, self.head);
        self.index.insert_unique(hash, seq, |&s| {
            ring.get(s.wrapping_sub(head) as usize)
                .map_or(0, |t| hasher.hash_one(t.value.key()))
        });
        true
    }

    fn pop_front(&mut self, hasher: &RandomState) {
        let Some(front) = self.ring.pop_front() else {
            return;
        };
        let seq = self.head;
        self.head = self.head.wrapping_add(1);
        let hash = hasher.hash_one(front.value.key());
        if let Ok(found) = self.index.find_entry(hash, |&s| s == seq) {
            found.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Debug, Clone, PartialEq)]
    struct E(String, u32);

    impl Keyed for E {
        fn key(&self) -> &str {
            &self.0
        }
    }

    fn e(k: &str, v: u32) -> E {
        E(k.to_owned(), v)
    }

    fn get(s: &Store<E>, k: &str) -> Option<u32> {
        s.with(k, |e| e.1)
    }

    #[test]
    fn the_first_entry_for_a_key_stays() {
        let s = Store::new(10, Duration::from_secs(60));
        assert!(s.insert(e("a", 1)));
        assert!(!s.insert(e("a", 2)));
        assert_eq!(get(&s, "a"), Some(1));
        assert_eq!(get(&s, "b"), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_full_store_evicts_the_oldest() {
        let s = Store::new(3, Duration::from_secs(60));
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            s.insert(e(k, i as u32));
        }
        assert_eq!(s.len(), 3);
        assert_eq!(get(&s, "a"), None);
        assert_eq!(get(&s, "d"), Some(3));
        // The evicted key may come back (as a new entry).
        assert!(s.insert(e("a", 9)));
        assert_eq!(get(&s, "a"), Some(9));
        assert_eq!(get(&s, "b"), None);
        let none = Store::new(0, Duration::from_secs(60));
        assert!(!none.insert(e("a", 1)));
        assert_eq!(get(&none, "a"), None);
    }

    #[test]
    fn a_sharded_store_holds_its_capacity_and_no_more() {
        let cap = 20_000;
        let s = Store::new(cap, Duration::from_secs(60));
        assert_eq!(s.shards.len(), 16);
        for i in 0..3 * cap as u32 {
            s.insert(e(&format!("chatcmpl-{i:032x}"), i));
        }
        assert_eq!(s.len(), cap as usize);
        // Every shard is full and holds its newest entries; each shard's
        // ring never grew past its share.
        for shard in s.shards.iter() {
            let shard = shard.lock().unwrap();
            assert_eq!(shard.ring.len(), shard.capacity);
            assert_eq!(shard.ring.capacity(), shard.capacity);
            assert_eq!(shard.index.len(), shard.capacity);
        }
        // A full store admits every new entry: the newest half are all
        // here (each shard evicts its own oldest, so the very oldest of
        // the newest capacity's worth may have gone a little early).
        for i in 3 * cap as u32 - cap as u32 / 2..3 * cap as u32 {
            assert_eq!(get(&s, &format!("chatcmpl-{i:032x}")), Some(i));
        }
        assert_eq!(get(&s, &format!("chatcmpl-{:032x}", 0)), None);
    }

    #[test]
    fn entries_expire_after_the_ttl_from_insertion() {
        let s = Store::new(100, Duration::from_secs(60));
        let later = |ms| {
            s.skew_ms
                .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
        };
        s.insert(e("old", 1));
        later(40_000);
        s.insert(e("new", 2));
        // A look-up does not extend an entry's life.
        assert_eq!(get(&s, "old"), Some(1));
        later(20_000);
        assert_eq!(get(&s, "old"), None);
        assert_eq!(get(&s, "new"), Some(2));
        assert_eq!(s.len(), 1);
        later(40_000);
        assert_eq!(get(&s, "new"), None);
        assert!(s.is_empty());
        // An expired key is free again.
        assert!(s.insert(e("old", 3)));
        assert_eq!(get(&s, "old"), Some(3));
    }

    #[test]
    fn sequence_numbers_may_wrap() {
        let s = Store::new(4, Duration::from_secs(60));
        s.shards[0].lock().unwrap().head = u32::MAX - 2;
        for i in 0..10 {
            s.insert(e(&i.to_string(), i));
        }
        for i in 0..6 {
            assert_eq!(get(&s, &i.to_string()), None);
        }
        for i in 6..10 {
            assert_eq!(get(&s, &i.to_string()), Some(i));
        }
    }

    #[test]
    fn concurrent_inserts_and_reads_agree() {
        let s = Arc::new(Store::new(50_000, Duration::from_secs(60)));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000u32 {
                        // Every thread races for the shared keys too.
                        let shared = format!("shared-{i}");
                        s.insert(e(&shared, t));
                        let own = format!("t{t}-{i}");
                        assert!(s.insert(e(&own, i)));
                        assert_eq!(get(&s, &own), Some(i));
                        assert!(get(&s, &shared).is_some());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.len(), 5 * 5_000);
        for i in 0..5_000u32 {
            // One thread's value won, and stayed.
            let first = get(&s, &format!("shared-{i}")).unwrap();
            assert!(first < 4);
        }
    }
}
