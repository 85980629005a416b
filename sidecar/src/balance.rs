//! Choosing a backend for one request: weighted round-robin, least-loaded,
//! rendezvous hashing for sticky sessions, or rendezvous on the prompt's
//! prefix with bounded load. No allocation, no locks.
//!
//! Rendezvous (highest random weight) rather than `hash % n`: when a backend
//! joins or leaves, only the sessions that belonged to it move, and every
//! replica with the same table makes the same choice without talking.
//!
//! Prefix affinity: among the backends whose load, with this request, stays
//! within `c x` the mean (consistent hashing with bounded loads, Mirrokni
//! et al.), the one with the lowest estimated time to first token: the
//! cold prefill queued there plus the prompt's own, unless the backend
//! holds its head (see `backlog`). With nothing queued that is the first
//! backend in the key's rendezvous order that holds the head (or just the
//! first), the same on every replica; a backend busy with a long cold
//! prefill is passed over for the next in order, which then caches the
//! head too, so a hot prefix spreads as far as its traffic needs and no
//! further. Loads and backlogs are fleet-wide estimates (see `load`), and
//! the sidecar next to the chosen pod corrects a choice made on stale ones
//! (see `spill`).

use std::sync::atomic::Ordering;

use crate::backlog;
use crate::config::Strategy;
use crate::table::{Route, RouteTarget};

/// A request's prefix key and its size (bytes stand in for tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub key: u64,
    pub bytes: u64,
}

/// Indices already tried in this request (retries never reuse a backend).
#[derive(Default, Clone, Copy)]
pub struct Tried(u64);

impl Tried {
    pub fn add(&mut self, i: usize) {
        self.0 |= 1 << (i % 64);
    }
    pub fn remove(&mut self, i: usize) {
        self.0 &= !(1 << (i % 64));
    }
    pub fn contains(self, i: usize) -> bool {
        self.0 & (1 << (i % 64)) != 0
    }
}

/// Pick a target index. Healthy (not ejected, not full, not tried) targets
/// first; if none is healthy, an ejected one is still better than failing,
/// but full and tried ones are never chosen.
///
/// A session key (explicit stickiness) wins over the prefix key, which only
/// `prefixAffinity` routes use; without either, such a route goes to the
/// least-loaded backend.
pub fn pick(
    route: &Route,
    session: Option<&str>,
    prefix: Option<Prefix>,
    tried: Tried,
    now_ms: u64,
) -> Option<usize> {
    let usable = |i: usize, t: &RouteTarget| !tried.contains(i) && !t.backend.is_full();
    let healthy = |i: usize, t: &RouteTarget| usable(i, t) && !t.backend.is_ejected(now_ms);
    for filter in [&healthy as &dyn Fn(usize, &RouteTarget) -> bool, &usable] {
        let chosen = match (session, route.strategy, prefix) {
            (Some(key), _, _) => rendezvous(&route.targets, key, filter),
            (None, Strategy::RoundRobin, _) => round_robin(route, filter),
            (None, Strategy::PrefixAffinity, Some(p)) => {
                bounded(route, p, route.prefix.load_factor, now_ms, filter)
            }
            (None, Strategy::LeastInFlight | Strategy::PrefixAffinity, _) => {
                least_loaded(route, now_ms, filter)
            }
        };
        if chosen.is_some() {
            return chosen;
        }
    }
    None
}

fn round_robin(route: &Route, ok: &dyn Fn(usize, &RouteTarget) -> bool) -> Option<usize> {
    let n = route.targets.len();
    if n == 0 || route.total_weight == 0 {
        return None;
    }
    let tick = route.cursor.fetch_add(1, Ordering::Relaxed) as u64;
    let mut slot = tick % route.total_weight;
    let mut start = 0;
    for (i, t) in route.targets.iter().enumerate() {
        if slot < t.weight as u64 {
            start = i;
            break;
        }
        slot -= t.weight as u64;
    }
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| ok(i, &route.targets[i]))
}

/// The less loaded of two backends drawn at random (power of two choices,
/// as Envoy's least-request balancer). Loads shared between replicas are up
/// to a period old: "the least loaded" would be the same backend for every
/// replica until the next sample, and they would all pile on it; the better
/// of two random ones still avoids busy backends without herding.
fn least_loaded(
    route: &Route,
    now_ms: u64,
    ok: &dyn Fn(usize, &RouteTarget) -> bool,
) -> Option<usize> {
    let targets = &route.targets;
    let n = targets.len();
    if n == 0 {
        return None;
    }
    let tick = route.cursor.fetch_add(1, Ordering::Relaxed) as u64;
    let r = splitmix64(tick ^ crate::table::now_ns());
    let first = (r % n as u64) as usize;
    let offset = 1 + ((r >> 32) % (n as u64 - 1).max(1)) as usize;
    let usable_from = |start: usize, not: Option<usize>| {
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| Some(i) != not && ok(i, &targets[i]))
    };
    let a = usable_from(first, None)?;
    let Some(b) = usable_from(first + offset, Some(a)) else {
        return Some(a);
    };
    // Load per unit of weight; a pod whose metrics vanished comes last.
    let load = |i: usize| {
        let t = &targets[i];
        t.backend
            .load(now_ms)
            .map_or(f64::INFINITY, |l| (l + 1.0) / t.weight.max(1) as f64)
    };
    Some(if load(b) < load(a) { b } else { a })
}

/// The backend with the lowest estimated time to first token (see
/// `backlog::cost`: cold prefill queued ahead, plus the prompt's own unless
/// the backend holds its head), among those whose load per weight stays
/// within `c` times the mean; ties (the common case: nothing waiting, the
/// head held nowhere or at one) go by rendezvous order on the key. If every
/// backend is over the bound, the least loaded.
fn bounded(
    route: &Route,
    prefix: Prefix,
    c: f64,
    now_ms: u64,
    ok: &dyn Fn(usize, &RouteTarget) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, f64, f64)> = None;
    for (i, cost, score) in candidates(route, prefix, c, now_ms, ok) {
        if best.is_none_or(|(_, c, s)| cost < c || (cost == c && score > s)) {
            best = Some((i, cost, score));
        }
    }
    match best {
        Some((i, _, _)) => Some(i),
        None => least_loaded(route, now_ms, ok),
    }
}

/// The lowest cost (`backlog::cost`) among the healthy backends not in
/// `tried` that a prefix-affinity choice could still make: what going
/// elsewhere would cost, as far as this sidecar knows.
pub fn next_best(route: &Route, prefix: Prefix, tried: Tried, now_ms: u64) -> Option<f64> {
    let ok = |i: usize, t: &RouteTarget| {
        !tried.contains(i) && !t.backend.is_full() && !t.backend.is_ejected(now_ms)
    };
    candidates(route, prefix, route.prefix.load_factor, now_ms, &ok)
        .map(|(_, cost, _)| cost)
        .reduce(f64::min)
}

/// `(index, cost, rendezvous score)` of each backend `ok` accepts whose
/// load per weight, with this request, stays within `c` times the mean.
fn candidates<'a>(
    route: &'a Route,
    prefix: Prefix,
    c: f64,
    now_ms: u64,
    ok: &'a dyn Fn(usize, &RouteTarget) -> bool,
) -> impl Iterator<Item = (usize, f64, f64)> + 'a {
    let (mut total, mut weights) = (0.0, 0.0);
    for (i, t) in route.targets.iter().enumerate() {
        if let (true, Some(l)) = (ok(i, t), t.backend.load(now_ms)) {
            total += l;
            weights += t.weight.max(1) as f64;
        }
    }
    // Capacity per unit of weight with this request placed: as in the paper,
    // ceil(c x mean), but the mean counts one more request per backend. At a
    // handful of requests in flight, c x mean alone would bounce a
    // conversation off a pod running just two (losing its cache for nothing);
    // under real load the extra one is noise.
    let per_weight = c * (total + 1.0 + weights) / weights.max(1.0);
    let bytes = prefix.bytes as f64;
    route
        .targets
        .iter()
        .enumerate()
        .filter(move |&(i, t)| {
            ok(i, t)
                && t.backend
                    .load(now_ms)
                    .is_some_and(|l| l + 1.0 <= (per_weight * t.weight.max(1) as f64).ceil())
        })
        .map(move |(i, t)| {
            let cost = backlog::cost(t.backend.view(prefix.key, now_ms), bytes);
            (
                i,
                cost,
                rendezvous_score(prefix.key, t.backend.id_hash, t.weight),
            )
        })
}

fn rendezvous(
    targets: &[RouteTarget],
    key: &str,
    ok: &dyn Fn(usize, &RouteTarget) -> bool,
) -> Option<usize> {
    let key_hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
    rendezvous_hash(targets, key_hash, ok)
}

fn rendezvous_hash(
    targets: &[RouteTarget],
    key_hash: u64,
    ok: &dyn Fn(usize, &RouteTarget) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, t) in targets.iter().enumerate() {
        if !ok(i, t) {
            continue;
        }
        let s = rendezvous_score(key_hash, t.backend.id_hash, t.weight);
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// Weighted rendezvous score `-w / ln(u)`, u uniform in (0, 1) from the pair.
pub fn rendezvous_score(key_hash: u64, backend_hash: u64, weight: u32) -> f64 {
    let mixed = splitmix64(key_hash ^ backend_hash.rotate_left(17));
    let u = ((mixed >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight.max(1) as f64) / u.ln()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
