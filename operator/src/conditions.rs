//! Status conditions as a platform team reads them in `kubectl describe`:
//! `Accepted`, `ResolvedRefs`, `Programmed`. Pure: the reconciler writes the
//! result only when `merge` says something changed, so status writes never
//! trigger a reconcile loop.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::render::{ProviderOutcome, RouteOutcome};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub kind: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The new condition list, and whether it differs from `current` in
/// anything but timestamps. A condition keeps its `lastTransitionTime`
/// unless its status flips.
pub fn merge(
    current: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &Time,
) -> (Vec<Condition>, bool) {
    let mut changed = current.len() != desired.len();
    let next = desired
        .iter()
        .map(|d| {
            let status = if d.ok { "True" } else { "False" };
            let old = current.iter().find(|c| c.type_ == d.kind);
            let same_status = old.is_some_and(|c| c.status == status);
            let cond = Condition {
                type_: d.kind.to_owned(),
                status: status.to_owned(),
                reason: d.reason.to_owned(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time: match old {
                    Some(c) if same_status => c.last_transition_time.clone(),
                    _ => now.clone(),
                },
            };
            changed |= !old.is_some_and(|c| {
                same_status
                    && c.reason == cond.reason
                    && c.message == cond.message
                    && c.observed_generation == cond.observed_generation
            });
            cond
        })
        .collect();
    (next, changed)
}

/// `unusable`: (backend id, on how many of `sidecars`) the sidecars left
/// out of routing because they could not read its upstream key file.
pub fn for_provider(
    outcome: &ProviderOutcome,
    unusable: &[(&str, usize)],
    sidecars: usize,
) -> Vec<Desired> {
    let refs = if unusable.is_empty() {
        Desired {
            kind: "ResolvedRefs",
            ok: outcome.ready_backends > 0,
            reason: if outcome.ready_backends > 0 {
                "BackendsReady"
            } else {
                "NoReadyBackends"
            },
            message: format!("{} ready backend(s)", outcome.ready_backends),
        }
    } else {
        let list: Vec<String> = unusable
            .iter()
            .map(|(id, n)| format!("{id} ({n}/{sidecars} sidecars)"))
            .collect();
        Desired {
            kind: "ResolvedRefs",
            ok: false,
            reason: "UpstreamKeyUnreadable",
            message: format!(
                "unavailable: the upstream key file (apiKeySecret) cannot be read: {}",
                list.join(", ")
            ),
        }
    };
    vec![
        Desired {
            kind: "Accepted",
            ok: true,
            reason: "Accepted",
            message: "spec is valid".into(),
        },
        refs,
    ]
}

/// `programmed` / `sidecars`: how many running sidecars run the version that
/// contains this route.
pub fn for_route(outcome: &RouteOutcome, programmed: usize, sidecars: usize) -> Vec<Desired> {
    let accepted = match &outcome.rejected {
        None => Desired {
            kind: "Accepted",
            ok: true,
            reason: "Accepted",
            message: "spec is valid".into(),
        },
        Some(why) => Desired {
            kind: "Accepted",
            ok: false,
            reason: "NameConflict",
            message: why.clone(),
        },
    };
    let refs = if !outcome.missing.is_empty() {
        Desired {
            kind: "ResolvedRefs",
            ok: false,
            reason: "ProviderNotFound",
            message: format!(
                "InferenceProvider(s) not found: {}",
                outcome.missing.join(", ")
            ),
        }
    } else if !outcome.unserved.is_empty() {
        Desired {
            kind: "ResolvedRefs",
            ok: false,
            reason: "ModelNotServed",
            message: format!(
                "not in the InferenceProvider's models: {}",
                outcome.unserved.join(", ")
            ),
        }
    } else {
        Desired {
            kind: "ResolvedRefs",
            ok: outcome.resolved_backends > 0,
            reason: if outcome.resolved_backends > 0 {
                "ResolvedRefs"
            } else {
                "NoReadyBackends"
            },
            message: format!("{} backend(s) resolved", outcome.resolved_backends),
        }
    };
    let programmed_ok = outcome.rejected.is_none()
        && outcome.resolved_backends > 0
        && sidecars > 0
        && programmed == sidecars;
    let programmed = Desired {
        kind: "Programmed",
        ok: programmed_ok,
        reason: if programmed_ok {
            "Programmed"
        } else {
            "Pending"
        },
        message: format!("{programmed}/{sidecars} sidecars run the config with this route"),
    };
    vec![accepted, refs, programmed]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn outcome(missing: &[&str], resolved: u32) -> RouteOutcome {
        RouteOutcome {
            rejected: None,
            missing: missing.iter().map(|s| s.to_string()).collect(),
            unserved: Vec::new(),
            resolved_backends: resolved,
        }
    }

    #[test]
    fn unchanged_desired_state_writes_nothing_and_keeps_timestamps() {
        let d = for_route(&outcome(&[], 2), 2, 2);
        let (first, changed) = merge(&[], &d, Some(1), &at(100));
        assert!(changed);
        let (second, changed) = merge(&first, &d, Some(1), &at(200));
        assert!(!changed);
        assert_eq!(second, first);
    }

    #[test]
    fn a_flip_moves_the_transition_time_a_message_change_does_not() {
        let (first, _) = merge(&[], &for_route(&outcome(&[], 2), 1, 2), Some(1), &at(100));
        let programmed =
            |c: &[Condition]| c.iter().find(|c| c.type_ == "Programmed").cloned().unwrap();
        assert_eq!(programmed(&first).status, "False");
        let (second, changed) = merge(
            &first,
            &for_route(&outcome(&[], 2), 2, 2),
            Some(1),
            &at(200),
        );
        assert!(changed);
        assert_eq!(programmed(&second).status, "True");
        assert_eq!(programmed(&second).last_transition_time, at(200));
        let accepted = |c: &[Condition]| c.iter().find(|c| c.type_ == "Accepted").cloned().unwrap();
        assert_eq!(accepted(&second).last_transition_time, at(100));
        // A new generation is a change even with the same statuses.
        let (_, changed) = merge(
            &second,
            &for_route(&outcome(&[], 2), 2, 2),
            Some(2),
            &at(300),
        );
        assert!(changed);
    }

    #[test]
    fn missing_providers_are_named() {
        let d = for_route(&outcome(&["gone", "lost"], 0), 0, 2);
        let refs = d.iter().find(|d| d.kind == "ResolvedRefs").unwrap();
        assert!(!refs.ok);
        assert_eq!(refs.reason, "ProviderNotFound");
        assert!(refs.message.contains("gone, lost"));
        assert!(!d.iter().find(|d| d.kind == "Programmed").unwrap().ok);
    }
}
