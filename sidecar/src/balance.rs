//! Choosing a backend for one request: weighted round-robin, least-loaded,
//! rendezvous hashing for sticky sessions, or rendezvous on the prompt's
//! prefix with bounded load. No allocation, no locks.
//!
//! Rendezvous (highest random weight) rather than `hash % n`: when a backend
//! joins or leaves, only the sessions that belonged to it move, and every
//! replica with the same table makes the same choice without talking.
//!
//! Bounded load (consistent hashing with bounded loads, Mirrokni et al.):
//! a prefix goes to the first backend in its rendezvous order whose load,
//! with this request, stays within `c x` the mean. A hot prefix thus spills
//! to the same second backend from every replica (which then caches it too)
//! rather than scattering. Loads are fleet-wide estimates (see `load`).

use std::sync::atomic::Ordering;

use crate::config::Strategy;
use crate::table::{Route, RouteTarget};

/// Indices already tried in this request (retries never reuse a backend).
#[derive(Default, Clone, Copy)]
pub struct Tried(u64);

impl Tried {
    pub fn add(&mut self, i: usize) {
        self.0 |= 1 << (i % 64);
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
    prefix: Option<u64>,
    tried: Tried,
    now_ms: u64,
) -> Option<usize> {
    let usable = |i: usize, t: &RouteTarget| !tried.contains(i) && !t.backend.is_full();
    let healthy = |i: usize, t: &RouteTarget| usable(i, t) && !t.backend.is_ejected(now_ms);
    for filter in [&healthy as &dyn Fn(usize, &RouteTarget) -> bool, &usable] {
        let chosen = match (session, route.strategy, prefix) {
            (Some(key), _, _) => rendezvous(&route.targets, key, filter),
            (None, Strategy::RoundRobin, _) => round_robin(route, filter),
            (None, Strategy::PrefixAffinity, Some(key)) => {
                bounded(route, key, route.prefix.load_factor, now_ms, filter)
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

/// Rendezvous order on `key`, skipping backends whose load per weight
/// would exceed `c` times the mean; if every one would, the least loaded.
fn bounded(
    route: &Route,
    key: u64,
    c: f64,
    now_ms: u64,
    ok: &dyn Fn(usize, &RouteTarget) -> bool,
) -> Option<usize> {
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
    let mut above = f64::INFINITY;
    for _ in 0..route.targets.len() {
        // The next in rendezvous order: the best score below the last one.
        let mut next: Option<(usize, f64)> = None;
        for (i, t) in route.targets.iter().enumerate() {
            if !ok(i, t) {
                continue;
            }
            let s = rendezvous_score(key, t.backend.id_hash, t.weight);
            if s < above && next.is_none_or(|(_, b)| s > b) {
                next = Some((i, s));
            }
        }
        let (i, s) = next?;
        above = s;
        let t = &route.targets[i];
        if let Some(l) = t.backend.load(now_ms) {
            if l + 1.0 <= (per_weight * t.weight.max(1) as f64).ceil() {
                return Some(i);
            }
        }
    }
    least_loaded(route, now_ms, ok)
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
mod tests {
    use super::*;
    use crate::config::GatewayConfig;
    use crate::table::{now_ms, Table};
    use std::time::Duration;

    fn table(strategy: &str, weights: &[u32]) -> Table {
        let backends: String = (0..weights.len())
            .map(|i| format!("  - {{ id: b{i}, url: http://b{i} }}\n"))
            .collect();
        let targets: String = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ backend: b{i}, weight: {w} }},"))
            .collect();
        let yaml = format!(
            "backends:\n{backends}models:\n  - {{ name: m, strategy: {strategy}, targets: [{targets}] }}\n"
        );
        Table::build(GatewayConfig::from_yaml(&yaml).unwrap(), None).unwrap()
    }

    fn counts(t: &Table, n: usize, session: impl Fn(usize) -> Option<String>) -> Vec<usize> {
        let route = t.route("m").unwrap();
        let mut c = vec![0; route.targets.len()];
        for i in 0..n {
            c[pick(
                route,
                session(i).as_deref(),
                None,
                Tried::default(),
                now_ms(),
            )
            .unwrap()] += 1;
        }
        c
    }

    #[test]
    fn weighted_round_robin_follows_weights_exactly() {
        let t = table("roundRobin", &[3, 1, 2]);
        assert_eq!(counts(&t, 600, |_| None), vec![300, 100, 200]);
    }

    #[test]
    fn ejected_and_tried_backends_are_skipped() {
        let t = table("roundRobin", &[1, 1, 1]);
        let route = t.route("m").unwrap();
        route.targets[1]
            .backend
            .record_failure(Duration::from_secs(60));
        let c = counts(&t, 300, |_| None);
        assert_eq!(c[1], 0, "{c:?}");
        assert_eq!(c[0] + c[2], 300);

        let mut tried = Tried::default();
        tried.add(0);
        tried.add(2);
        // Only the ejected one is left: better to try it than to fail.
        assert_eq!(pick(route, None, None, tried, now_ms()), Some(1));
        tried.add(1);
        assert_eq!(pick(route, None, None, tried, now_ms()), None);
    }

    #[test]
    fn least_in_flight_prefers_the_idle_backend() {
        let t = table("leastInFlight", &[1, 1]);
        let route = t.route("m").unwrap();
        route.targets[0]
            .backend
            .counters
            .in_flight
            .store(5, Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(pick(route, None, None, Tried::default(), now_ms()), Some(1));
        }
    }

    #[test]
    fn sticky_sessions_stay_and_spread() {
        let t = table("roundRobin", &[1, 1, 1, 1]);
        let route = t.route("m").unwrap();
        let first: Vec<usize> = (0..1000)
            .map(|i| pick(route, Some(&format!("s{i}")), None, Tried::default(), 0).unwrap())
            .collect();
        let again: Vec<usize> = (0..1000)
            .map(|i| pick(route, Some(&format!("s{i}")), None, Tried::default(), 0).unwrap())
            .collect();
        assert_eq!(first, again);
        for b in 0..4 {
            let n = first.iter().filter(|&&x| x == b).count();
            assert!((150..350).contains(&n), "backend {b} got {n} of 1000");
        }
    }

    #[test]
    fn adding_a_backend_moves_only_its_share_of_sessions() {
        let four = table("roundRobin", &[1, 1, 1, 1]);
        let five = table("roundRobin", &[1, 1, 1, 1, 1]);
        let (r4, r5) = (four.route("m").unwrap(), five.route("m").unwrap());
        let mut moved = 0;
        for i in 0..10_000 {
            let key = format!("session-{i}");
            let a = pick(r4, Some(&key), None, Tried::default(), 0).unwrap();
            let b = pick(r5, Some(&key), None, Tried::default(), 0).unwrap();
            if a != b {
                assert_eq!(b, 4, "a session moved between two old backends");
                moved += 1;
            }
        }
        // Ideal is 1/5 of sessions; `hash % n` would move about 4/5.
        eprintln!("4 -> 5 backends: {moved} of 10000 sessions moved");
        assert!((1_600..2_400).contains(&moved), "moved {moved}");
    }

    fn set_in_flight(route: &Route, i: usize, n: u32) {
        route.targets[i]
            .backend
            .counters
            .in_flight
            .store(n, Ordering::Relaxed);
    }

    #[test]
    fn prefix_affinity_is_rendezvous_on_the_key_when_load_is_even() {
        let t = table("prefixAffinity", &[1, 1, 1, 1]);
        let route = t.route("m").unwrap();
        let mut c = [0usize; 4];
        for k in 0..1000u64 {
            let key = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            let a = pick(route, None, Some(key), Tried::default(), 0).unwrap();
            // Same as a plain rendezvous choice: every replica agrees.
            assert_eq!(Some(a), rendezvous_hash(&route.targets, key, &|_, _| true));
            c[a] += 1;
        }
        assert!(c.iter().all(|&n| (150..350).contains(&n)), "{c:?}");
    }

    #[test]
    fn a_busy_owner_is_skipped_for_the_next_in_rendezvous_order() {
        let t = table("prefixAffinity", &[1, 1, 1, 1]);
        let route = t.route("m").unwrap();
        let key = 42;
        let owner = pick(route, None, Some(key), Tried::default(), 0).unwrap();
        // Second in rendezvous order: the owner's choice with it excluded.
        let mut without = Tried::default();
        without.add(owner);
        let second = pick(route, None, Some(key), without, 0).unwrap();
        // 4 in flight on the owner, 0 elsewhere: the mean (with this request
        // and one per backend) is 9/4; the owner would be at 5 > ceil(1.25 x 9/4).
        set_in_flight(route, owner, 4);
        assert_eq!(
            pick(route, None, Some(key), Tried::default(), 0),
            Some(second)
        );
        // Within the bound it stays: 1 in flight everywhere.
        for i in 0..4 {
            set_in_flight(route, i, 1);
        }
        assert_eq!(
            pick(route, None, Some(key), Tried::default(), 0),
            Some(owner)
        );
    }

    #[test]
    fn fleet_wide_signals_count_and_vanished_metrics_are_not_favoured() {
        use crate::load::Sample;
        let t = table("leastInFlight", &[1, 1]);
        let route = t.route("m").unwrap();
        // Locally idle both, but a peer says backend 0 is busy.
        route.targets[0].backend.counters.signal.record(
            Sample {
                queue: 8,
                kv_permille: 0,
            },
            0,
            now_ms(),
        );
        assert_eq!(pick(route, None, None, Tried::default(), now_ms()), Some(1));
        // Backend 1's metrics were there and vanished: 0 wins while usable.
        let s1 = &route.targets[1].backend.counters.signal;
        s1.record(
            Sample {
                queue: 0,
                kv_permille: 0,
            },
            0,
            now_ms(),
        );
        s1.lost();
        assert_eq!(pick(route, None, None, Tried::default(), now_ms()), Some(0));
        let t = table("prefixAffinity", &[1, 1]);
        let route = t.route("m").unwrap();
        let s1 = &route.targets[1].backend.counters.signal;
        s1.record(
            Sample {
                queue: 0,
                kv_permille: 0,
            },
            0,
            now_ms(),
        );
        s1.lost();
        for key in 0..100 {
            assert_eq!(
                pick(route, None, Some(key), Tried::default(), now_ms()),
                Some(0)
            );
        }
    }

    #[test]
    fn a_session_key_wins_over_the_prefix() {
        let t = table("prefixAffinity", &[1, 1, 1, 1]);
        let route = t.route("m").unwrap();
        for k in 0..50u64 {
            let session = format!("s{k}");
            assert_eq!(
                pick(route, Some(&session), Some(k), Tried::default(), 0),
                pick(route, Some(&session), None, Tried::default(), 0)
            );
        }
    }

    #[test]
    fn least_loaded_avoids_a_busy_backend_without_piling_on_one() {
        let t = table("leastInFlight", &[1, 1, 1, 1]);
        let route = t.route("m").unwrap();
        set_in_flight(route, 0, 10);
        let c = counts(&t, 600, |_| None);
        assert_eq!(c[0], 0, "{c:?}");
        // Three equally idle backends share the requests (no herd on one).
        assert!(c[1..].iter().all(|&n| n > 100), "{c:?}");
    }
}
