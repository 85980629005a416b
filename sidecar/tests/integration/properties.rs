//! Property tests: routing invariants over random backend sets and states,
//! and parsers that never panic and do not care how bytes are chunked.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use infergate_sidecar::balance::{pick, Tried};
use infergate_sidecar::config::GatewayConfig;
use infergate_sidecar::sse::SseScan;
use infergate_sidecar::table::{now_ms, Table};
use infergate_sidecar::validate::{validate, with_model, Endpoint};
use proptest::prelude::*;

fn table(weights: &[u32], strategy: &str, max_in_flight: u32) -> Table {
    let backends: String = (0..weights.len())
        .map(|i| format!("  - {{ id: b{i}, url: http://b{i}, maxInFlight: {max_in_flight} }}\n"))
        .collect();
    let targets: String = weights
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{{ backend: b{i}, weight: {w} }},"))
        .collect();
    let yaml = format!("backends:\n{backends}models:\n  - {{ name: m, strategy: {strategy}, targets: [{targets}] }}\n");
    Table::build(GatewayConfig::from_yaml(&yaml).unwrap(), None).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Never a tried or full backend; something whenever something is usable;
    /// a healthy backend is preferred to an ejected one.
    #[test]
    fn pick_respects_tried_full_and_ejected(
        weights in prop::collection::vec(1u32..5, 1..12),
        tried_mask in any::<u64>(),
        full_mask in any::<u64>(),
        ejected_mask in any::<u64>(),
        session in prop::option::of("[a-z0-9]{1,12}"),
        least in any::<bool>(),
    ) {
        let t = table(&weights, if least { "leastInFlight" } else { "roundRobin" }, 1);
        let route = t.route("m").unwrap();
        let n = weights.len();
        let mut tried = Tried::default();
        for i in 0..n {
            let b = &route.targets[i].backend;
            if full_mask & (1 << i) != 0 {
                b.counters.in_flight.store(1, Ordering::Relaxed);
            }
            if ejected_mask & (1 << i) != 0 {
                b.record_failure(Duration::from_secs(60));
            }
            if tried_mask & (1 << i) != 0 {
                tried.add(i);
            }
        }
        let usable: Vec<usize> = (0..n)
            .filter(|&i| tried_mask & (1 << i) == 0 && full_mask & (1 << i) == 0)
            .collect();
        let healthy: Vec<usize> = usable.iter().copied().filter(|&i| ejected_mask & (1 << i) == 0).collect();
        match pick(route, session.as_deref(), None, tried, now_ms()) {
            None => prop_assert!(usable.is_empty()),
            Some(i) => {
                prop_assert!(usable.contains(&i));
                if !healthy.is_empty() {
                    prop_assert!(healthy.contains(&i));
                }
            }
        }
    }

    /// Removing a backend moves only the sessions that were on it.
    #[test]
    fn rendezvous_moves_only_the_removed_backends_sessions(
        n in 2usize..10,
        removed in 0usize..10,
        keys in prop::collection::hash_set("[a-z0-9]{4,16}", 1..60),
    ) {
        let removed = removed % n;
        let all = table(&vec![1; n], "roundRobin", 0);
        let route = all.route("m").unwrap();
        let mut without = Tried::default();
        without.add(removed);
        for key in &keys {
            let before = pick(route, Some(key), None, Tried::default(), 0).unwrap();
            let after = pick(route, Some(key), None, without, 0).unwrap();
            if before != removed {
                prop_assert_eq!(before, after);
            }
        }
    }

    /// Over one full cycle, weighted round-robin gives each backend exactly its weight.
    #[test]
    fn round_robin_cycle_matches_weights(weights in prop::collection::vec(1u32..6, 1..8)) {
        let t = table(&weights, "roundRobin", 0);
        let route = t.route("m").unwrap();
        let total: u32 = weights.iter().sum();
        let mut counts = vec![0u32; weights.len()];
        for _ in 0..total {
            counts[pick(route, None, None, Tried::default(), 0).unwrap()] += 1;
        }
        prop_assert_eq!(counts, weights);
    }

    /// Any bytes: a result, never a panic.
    #[test]
    fn validation_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
        for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses] {
            let _ = validate(endpoint, &body, 8);
        }
    }

    /// For any valid body, whatever escapes spell the model and whatever
    /// surrounds it, the rewrite changes the model value's bytes and no other.
    #[test]
    fn rewrite_changes_nothing_but_the_model(
        members in prop::collection::vec((json_key(), json_value()), 0..6),
        position in 0usize..7,
        spelling in prop::collection::vec(any::<bool>(), 5),
        space in "[ \t\n]{0,2}",
    ) {
        // "alias", each letter plain or as a \u escape.
        let model: String = "alias".chars().zip(spelling)
            .map(|(c, esc)| if esc { format!("\\u{:04x}", c as u32) } else { c.to_string() })
            .collect();
        let mut parts: Vec<String> = members.iter().map(|(k, v)| format!("{k}:{space}{v}")).collect();
        parts.insert(position.min(parts.len()), format!("\"model\"{space}:{space}\"{model}\""));
        parts.push("\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]".to_owned());
        let raw = format!("{{{space}{}{space}}}", parts.join(","));
        let Ok(parsed) = validate(Endpoint::Chat, raw.as_bytes(), 8) else {
            // Only a member that duplicates one the gateway reads is refused.
            prop_assert!(members.iter().any(|(k, _)| ["\"messages\"", "\"model\"", "\"stream\""].contains(&k.as_str())));
            return Ok(());
        };
        prop_assert_eq!(&parsed.model, "alias");
        let out = with_model(&Bytes::from(raw.clone()), &parsed, "org/up");
        let span = parsed.model_span.clone();
        prop_assert_eq!(&raw[span.clone()], format!("\"{model}\""));
        let want = format!("{}\"org/up\"{}", &raw[..span.start], &raw[span.end..]);
        prop_assert_eq!(std::str::from_utf8(&out).unwrap(), want);
    }

    /// The SSE scan finds the same id, usage and end however the bytes are cut.
    #[test]
    fn sse_scan_is_independent_of_chunking(cuts in prop::collection::btree_set(1usize..900, 0..40)) {
        let stream = concat!(
            "data: {\"id\":\"c-1\",\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"id\":\"c-1\",\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c-1\",\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"id\":\"c-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
            "data: [DONE]\n\n",
        ).as_bytes();
        let mut scan = SseScan::default();
        let mut start = 0;
        for cut in cuts.into_iter().filter(|&c| c < stream.len()).chain([stream.len()]) {
            scan.feed(&Bytes::copy_from_slice(&stream[start..cut]));
            start = cut;
        }
        prop_assert_eq!(scan.id.as_deref(), Some("c-1"));
        prop_assert_eq!(scan.finish_reason.as_deref(), Some("length"));
        prop_assert_eq!(scan.usage.map(|u| (u.prompt_tokens, u.completion_tokens)), Some((7, 2)));
        prop_assert!(scan.done);
    }

    /// Arbitrary bytes in arbitrary chunks: no panic.
    #[test]
    fn sse_scan_never_panics_on_garbage(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..30)) {
        let mut scan = SseScan::default();
        for c in chunks {
            scan.feed(&Bytes::from(c));
        }
    }
}

/// Member names, including ones the gateway reads and odd spellings.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"seed\"".to_owned()),
        Just("\"stream\"".to_owned()),
        Just("\"x\"".to_owned()),
        Just("\"mod\\u0065l_hint\"".to_owned()),
        "[a-z_]{1,8}".prop_map(|k| format!("\"{k}\"")),
    ]
}

/// Values whose bytes a re-serialiser would change.
fn json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1e400".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("1.50".to_owned()),
        Just("-0".to_owned()),
        Just("\"\\ud83d\\ude00\"".to_owned()),
        Just("[[[[[]]]]]".to_owned()),
        Just("{\"a\" : {\"b\":null}}".to_owned()),
        Just("true".to_owned()),
        "[a-z ]{0,10}".prop_map(|v| format!("\"{v}\"")),
    ]
}
