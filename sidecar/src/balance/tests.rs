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

/// A prefix key for a 1000-byte request.
/// A fresh pick (nothing tried) by prefix `key` at `now`.
fn by_prefix(route: &Route, key: u64, now: u64) -> Option<usize> {
    pick(route, None, Some(pk(key)), Tried::default(), now)
}

fn pk(key: u64) -> Prefix {
    Prefix { key, bytes: 1000 }
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
        let a = by_prefix(route, key, 0).unwrap();
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
    let owner = by_prefix(route, key, 0).unwrap();
    // Second in rendezvous order: the owner's choice with it excluded.
    let mut without = Tried::default();
    without.add(owner);
    let second = pick(route, None, Some(pk(key)), without, 0).unwrap();
    // 4 in flight on the owner, 0 elsewhere: the mean (with this request
    // and one per backend) is 9/4; the owner would be at 5 > ceil(1.25 x 9/4).
    set_in_flight(route, owner, 4);
    assert_eq!(by_prefix(route, key, 0), Some(second));
    // Within the bound it stays: 1 in flight everywhere.
    for i in 0..4 {
        set_in_flight(route, i, 1);
    }
    assert_eq!(by_prefix(route, key, 0), Some(owner));
}

#[test]
fn fleet_wide_signals_count_and_vanished_metrics_are_not_favoured() {
    use crate::load::Sample;
    let t = table("leastInFlight", &[1, 1]);
    let route = t.route("m").unwrap();
    // Locally idle both, but a peer says backend 0 is busy.
    route.targets[0].backend.record(
        Sample {
            queue: 8,
            kv_permille: 0,
            backlog: 0,
        },
        now_ms(),
    );
    assert_eq!(pick(route, None, None, Tried::default(), now_ms()), Some(1));
    // Backend 1's metrics were there and vanished: 0 wins while usable.
    let s1 = &route.targets[1].backend.counters.signal;
    s1.record(
        Sample {
            queue: 0,
            kv_permille: 0,
            backlog: 0,
        },
        0,
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
            backlog: 0,
        },
        0,
        0,
        now_ms(),
    );
    s1.lost();
    for key in 0..100 {
        assert_eq!(by_prefix(route, key, now_ms()), Some(0));
    }
}

#[test]
fn a_session_key_wins_over_the_prefix() {
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    for k in 0..50u64 {
        let session = format!("s{k}");
        assert_eq!(
            pick(route, Some(&session), Some(pk(k)), Tried::default(), 0),
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

/// Backend indices in the key's rendezvous order.
fn order(route: &Route, key: u64) -> Vec<usize> {
    let mut o: Vec<usize> = (0..route.targets.len()).collect();
    let score = |i: usize| {
        let t = &route.targets[i];
        rendezvous_score(key, t.backend.id_hash, t.weight)
    };
    o.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
    o
}

/// Backend `i` answered a request keyed `key`: it holds that head now.
fn hold(route: &Route, i: usize, key: u64) {
    let b = &route.targets[i].backend.counters.backlog;
    b.release(b.admit(Some(key), 1, false), true);
}

/// A cold request of `bytes` waiting at backend `i` (until dropped).
fn waiting(route: &Route, i: usize, key: u64, bytes: u64) -> crate::backlog::Waiting {
    route.targets[i]
        .backend
        .counters
        .backlog
        .admit(Some(key), bytes, true)
}

#[test]
fn a_held_head_wins_over_rendezvous_order() {
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    let o = order(route, 42);
    hold(route, o[2], 42);
    assert_eq!(by_prefix(route, 42, 0), Some(o[2]));
}

#[test]
fn a_short_cold_backlog_is_not_worth_a_cold_prefill_elsewhere() {
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    let o = order(route, 42);
    hold(route, o[0], 42);
    // 800 bytes of another prompt to prefill first, against 1000 of its
    // own anywhere else: it waits.
    let _other = waiting(route, o[0], 7, 800);
    assert_eq!(by_prefix(route, 42, 0), Some(o[0]));
}

#[test]
fn a_long_cold_backlog_spills_to_the_next_in_rendezvous_order() {
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    let o = order(route, 42);
    hold(route, o[0], 42);
    let other = waiting(route, o[0], 7, 3000);
    // Every other backend costs the same 1000 (cold, idle): the next in
    // order, the same one from every sidecar.
    assert_eq!(by_prefix(route, 42, 0), Some(o[1]));
    // The backlog gone, it is back on its own pod.
    route.targets[o[0]]
        .backend
        .counters
        .backlog
        .release(other, true);
    assert_eq!(by_prefix(route, 42, 0), Some(o[0]));
}

#[test]
fn a_request_joins_its_own_keys_prefill() {
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    let o = order(route, 42);
    // The owner is busy with another prompt; the key is being prefilled on
    // the third backend: waiting for that prefill beats computing it again.
    let _other = waiting(route, o[0], 7, 500);
    let _first = waiting(route, o[2], 42, 1000);
    assert_eq!(by_prefix(route, 42, 0), Some(o[2]));
}

#[test]
fn the_load_bound_still_holds_over_a_held_head() {
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    let o = order(route, 42);
    hold(route, o[0], 42);
    set_in_flight(route, o[0], 4);
    assert_eq!(by_prefix(route, 42, 0), Some(o[1]));
}

#[test]
fn what_a_pods_sidecar_says_counts_like_what_was_seen() {
    use crate::backlog::Bloom;
    use crate::load::Sample;
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    let o = order(route, 42);
    let now = now_ms();
    // The last backend in order reports that it holds the key.
    let mut bloom = Bloom::default();
    bloom.insert(42);
    let report = |i: usize, backlog: u64, cold: &[u64], bloom: Option<&Bloom>| {
        let b = &route.targets[i].backend;
        b.record(
            Sample {
                queue: 0,
                kv_permille: 0,
                backlog,
            },
            now,
        );
        b.counters.signal.record_keys(cold, bloom);
    };
    report(o[3], 0, &[], Some(&bloom));
    assert_eq!(by_prefix(route, 42, now), Some(o[3]));
    // Then that it has 5000 bytes of another prompt to prefill first.
    report(o[3], 5000, &[7], Some(&bloom));
    assert_eq!(by_prefix(route, 42, now), Some(o[0]));
    // Or that it is prefilling this key (about its 1000 bytes) and 200
    // more: it joins.
    report(o[3], 1200, &[42], Some(&bloom));
    assert_eq!(by_prefix(route, 42, now), Some(o[3]));
}

#[test]
fn next_best_is_what_going_elsewhere_would_cost() {
    let t = table("prefixAffinity", &[1, 1, 1, 1]);
    let route = t.route("m").unwrap();
    let o = order(route, 42);
    let mut owner = Tried::default();
    owner.add(o[0]);
    // Cold everywhere else: its own 1000 bytes.
    assert_eq!(next_best(route, pk(42), owner, 0), Some(1000.0));
    // Held on another one, with 300 bytes of someone else's ahead.
    hold(route, o[3], 42);
    let _other = waiting(route, o[3], 7, 300);
    assert_eq!(next_best(route, pk(42), owner, 0), Some(300.0));
    // Nothing else left.
    let mut all = Tried::default();
    (0..4).for_each(|i| all.add(i));
    assert_eq!(next_best(route, pk(42), all, 0), None);
}
