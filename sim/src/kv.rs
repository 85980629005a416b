//! The KV cache model behind the simulator's prefix caching: vLLM's
//! automatic prefix caching in miniature, with no IO.
//!
//! A prompt is a sequence of token hashes (the simulator's "tokenizer" is
//! whitespace words, plus one token per message role). Full blocks of
//! `block_size` tokens are hashed in a chain (each block's hash covers its
//! parent's), so a block is reused only under the same whole prefix, as in
//! vLLM. A prompt's hit is its longest run of cached leading blocks. The
//! cache holds `capacity` blocks; a new block beyond that evicts the least
//! recently used one. A prompt's blocks are touched last-to-first, so its
//! head is the most recent and a prefix outlives its tails.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};

/// Deterministic hashing (the same prompt hashes the same in every process).
fn hasher() -> impl Hasher {
    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .build_hasher()
}

/// One token's hash.
pub fn token(word: &str) -> u64 {
    let mut h = hasher();
    h.write(word.as_bytes());
    h.finish()
}

/// Chained hashes of the full blocks of `tokens`.
pub fn block_hashes(tokens: &[u64], block_size: usize) -> Vec<u64> {
    let mut parent = 0u64;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            let mut h = hasher();
            h.write_u64(parent);
            block.iter().for_each(|t| h.write_u64(*t));
            parent = h.finish();
            parent
        })
        .collect()
}

pub struct KvCache {
    block_size: usize,
    capacity: usize,
    /// Block hash -> its last use.
    blocks: HashMap<u64, u64>,
    /// Last use -> block hash: the LRU order.
    lru: BTreeMap<u64, u64>,
    clock: u64,
    /// Prompt tokens looked up, and found cached (vLLM's counters).
    pub queries: u64,
    pub hits: u64,
}

impl KvCache {
    pub fn new(block_size: usize, capacity: usize) -> Self {
        KvCache {
            block_size: block_size.max(1),
            capacity,
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            queries: 0,
            hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn contains(&self, block: u64) -> bool {
        self.blocks.contains_key(&block)
    }

    /// Looks `tokens` up, counts the query, caches its full blocks; returns
    /// how many leading tokens were cached. As in vLLM, the last token is
    /// always computed (its logits are needed), so a full hit is `len - 1`.
    pub fn admit(&mut self, tokens: &[u64]) -> usize {
        let hashes = block_hashes(tokens, self.block_size);
        let cached_blocks = hashes.iter().take_while(|h| self.contains(**h)).count();
        let hit = (cached_blocks * self.block_size).min(tokens.len().saturating_sub(1));
        self.queries += tokens.len() as u64;
        self.hits += hit as u64;
        for h in hashes.iter().rev() {
            self.touch(*h);
        }
        hit
    }

    fn touch(&mut self, block: u64) {
        if self.capacity == 0 {
            return;
        }
        self.clock += 1;
        if let Some(old) = self.blocks.insert(block, self.clock) {
            self.lru.remove(&old);
        }
        self.lru.insert(self.clock, block);
        while self.blocks.len() > self.capacity {
            let Some((_, evicted)) = self.lru.pop_first() else {
                break;
            };
            self.blocks.remove(&evicted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(words: &str) -> Vec<u64> {
        words.split_whitespace().map(token).collect()
    }

    #[test]
    fn a_repeated_prompt_is_a_hit() {
        let mut kv = KvCache::new(4, 100);
        let p = prompt("a b c d e f g h i j");
        assert_eq!(kv.admit(&p), 0);
        // Two full blocks (8 tokens) are cached; the tail of 2 is not.
        assert_eq!(kv.admit(&p), 8);
        assert_eq!((kv.queries, kv.hits), (20, 8));
    }

    #[test]
    fn a_shared_prefix_hits_and_a_different_one_does_not() {
        let mut kv = KvCache::new(4, 100);
        kv.admit(&prompt("sys sys sys sys user1 asks about x"));
        assert_eq!(kv.admit(&prompt("sys sys sys sys user2 asks about y")), 4);
        // Same words after a different head: chained hashes differ.
        assert_eq!(kv.admit(&prompt("other sys sys sys user1 asks about x")), 0);
    }

    #[test]
    fn a_full_prompt_hit_still_computes_its_last_token() {
        let mut kv = KvCache::new(4, 100);
        let p = prompt("a b c d e f g h");
        kv.admit(&p);
        assert_eq!(kv.admit(&p), 7);
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_block() {
        let mut kv = KvCache::new(2, 3);
        let a = prompt("a1 a2");
        let b = prompt("b1 b2");
        let c = prompt("c1 c2");
        kv.admit(&a);
        kv.admit(&b);
        kv.admit(&c);
        assert_eq!(kv.len(), 3);
        // Touch a: b is now the least recently used.
        assert_eq!(kv.admit(&a), 1);
        kv.admit(&prompt("d1 d2"));
        assert_eq!(kv.len(), 3);
        let h = |p: &[u64]| block_hashes(p, 2)[0];
        assert!(!kv.contains(h(&b)), "b was least recently used");
        assert!(kv.contains(h(&a)) && kv.contains(h(&c)));
    }

    #[test]
    fn a_prompt_head_outlives_its_tail() {
        // Capacity 2: a 3-block prompt keeps its first two blocks.
        let mut kv = KvCache::new(1, 2);
        let p = prompt("x y z");
        kv.admit(&p);
        let hashes = block_hashes(&p, 1);
        assert!(kv.contains(hashes[0]) && kv.contains(hashes[1]));
        assert!(!kv.contains(hashes[2]));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut kv = KvCache::new(2, 0);
        let p = prompt("a b c d");
        kv.admit(&p);
        assert_eq!(kv.admit(&p), 0);
    }
}
