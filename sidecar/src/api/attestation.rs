//! `GET /v1/attestation/report` in the shape NEAR AI's gateway and
//! vllm-proxy use: this sidecar's entry, one entry per sidecar serving
//! `model` (each made by the sidecar that holds that key, asked over the
//! peer protocol), `signing_address` choosing one. Callers without an API
//! key are served when public reports are on, under their own rate limit.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use crate::attest::Algo;
use crate::error::ApiError;
use crate::peers::{PeerHop, Reach};
use crate::report::{self, EntryInput};
use crate::table::Table;
use crate::AppState;

#[derive(Deserialize)]
pub(super) struct ReportQuery {
    nonce: Option<String>,
    model: Option<String>,
    signing_algo: Option<String>,
    signing_address: Option<String>,
}

pub(super) async fn report(
    State(s): State<Arc<AppState>>,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|_| malformed_query())?;
    let table = s.table.load_full();
    // A key is checked as everywhere (a wrong one is a 401, not a public
    // ask) and the ask counts against its limits; no key at all is the
    // public, rate-limited case. A peer's hop was admitted by the sidecar
    // the client reached, but a keyless one also costs this sidecar's
    // public budget: otherwise one public ask to each of N sidecars would
    // make every pod quote N times its budget.
    let now = crate::table::now_ns();
    let mut _key_slot = None;
    let key = if hop.is_some() {
        if !headers.contains_key(header::AUTHORIZATION) {
            s.attestor.admit_public(now)?;
        }
        None
    } else if headers.contains_key(header::AUTHORIZATION) {
        let key = crate::auth::authenticate(&table, &headers)?;
        if let Some(q) = &key.quota {
            _key_slot = q
                .admit(now, s.cluster.as_deref())
                .await
                .map_err(ApiError::RateLimited)?;
        }
        Some(key)
    } else {
        s.attestor.admit_public(now)?;
        None
    };
    let algo = match q.signing_algo.as_deref() {
        None => Algo::Ecdsa,
        Some(a) => Algo::parse(a).ok_or_else(|| {
            ApiError::invalid(
                "signing_algo must be `ecdsa` or `ed25519`.",
                Some("signing_algo"),
            )
        })?,
    };
    let nonce = match q.nonce {
        Some(n) if report::valid_nonce(&n) => n,
        Some(_) => {
            return Err(ApiError::invalid(
                "nonce must be 1 to 128 characters of [A-Za-z0-9_-] (NEAR AI verifiers send 64 hex characters).",
                Some("nonce"),
            ))
        }
        None => {
            let mut n = [0u8; 32];
            getrandom::getrandom(&mut n).map_err(|_| {
                ApiError::invalid(
                    "No nonce given and none could be made; send one.",
                    Some("nonce"),
                )
            })?;
            hex::encode(n)
        }
    };
    let address = q.signing_address.as_deref();
    if address.is_some_and(|a| {
        a.is_empty() || a.len() > 66 || !a.bytes().all(|b| b.is_ascii_alphanumeric())
    }) {
        return Err(ApiError::invalid(
            "signing_address must be a 0x address or a hex public key.",
            Some("signing_address"),
        ));
    }
    let model = q.model.as_deref();
    if let Some(m) = model {
        let route = table
            .route(m)
            .ok_or_else(|| ApiError::ModelNotFound(m.to_owned()))?;
        if key.as_ref().is_some_and(|k| !k.may_use(route)) {
            return Err(ApiError::ModelNotAllowed(m.to_owned()));
        }
    }
    let not_here = || ApiError::NotFound("No sidecar here holds that signing address.".into());
    let own_matches = address.is_none_or(|a| s.signer.identity(algo).eq_ignore_ascii_case(a));
    if hop.is_some() {
        // A peer collecting entries: this sidecar's own, nothing more.
        if !own_matches {
            return Err(not_here());
        }
        return Ok(Json(own_entry(&s, algo, &nonce, model).await).into_response());
    }
    let (local, peers) = sidecars(&s, &table, model, address.is_some());
    let path = hop_path(&nonce, algo, model, address);
    let own = async {
        match own_matches {
            true => Some(own_entry(&s, algo, &nonce, model).await),
            false => None,
        }
    };
    let (own, answers) = tokio::join!(own, s.peers.attestations(&peers, &path, &headers));
    let mut entries: Vec<Value> = own.iter().filter(|_| local).cloned().collect();
    let mut unreachable = Vec::new();
    for (peer, answer) in answers {
        match answer {
            Ok(Some(entry)) => entries.push(entry),
            Ok(None) => {}
            Err(why) => unreachable.push((peer, why)),
        }
    }
    let body = match (address, &own) {
        (Some(a), _) => {
            let chosen = entries
                .iter()
                .chain(own.iter())
                .find(|e| report::is_for(e, a))
                .cloned()
                .ok_or_else(not_here)?;
            report::assemble(
                &chosen,
                own.as_ref(),
                std::slice::from_ref(&chosen),
                &unreachable,
            )
        }
        (None, Some(own)) => report::assemble(own, Some(own), &entries, &unreachable),
        // Without an address this sidecar always has its own entry.
        (None, None) => return Err(not_here()),
    };
    Ok(Json(body).into_response())
}

/// A query that does not parse (a parameter twice, bad escapes) is a 400
/// in the OpenAI error shape, not axum's plain-text one.
pub(super) fn malformed_query() -> ApiError {
    ApiError::invalid(
        "Malformed query string (each parameter at most once).",
        None,
    )
}

/// Whether this sidecar serves `model` (or no model was named), and the
/// other sidecars to ask: those serving `model`, or with no model every
/// peer when a key is being looked for. Backends with attestation off
/// (external providers) have nothing to attest.
fn sidecars<'t>(
    s: &AppState,
    table: &'t Table,
    model: Option<&str>,
    by_address: bool,
) -> (bool, Vec<&'t str>) {
    let Some(route) = model.and_then(|m| table.route(m)) else {
        let peers = if by_address {
            s.peers.list(table)
        } else {
            Vec::new()
        };
        return (true, peers);
    };
    let (mut local, mut peers) = (false, Vec::new());
    for target in route.targets.iter().filter(|t| t.backend.attestation) {
        match s.peers.reach(&target.backend, false) {
            Reach::Here => local = true,
            // Listed as unreachable when there is no peer secret.
            Reach::Peer(_) | Reach::Unreachable => peers.extend(target.backend.sidecar.as_deref()),
        }
    }
    peers.sort_unstable();
    peers.dedup();
    (local, peers)
}

/// This sidecar's own entry: quote and GPU evidence (cached) for its key of
/// `algo` and the nonce.
async fn own_entry(s: &AppState, algo: Algo, nonce: &str, model: Option<&str>) -> Value {
    let nonce32 = report::nonce_bytes(nonce);
    // Our own identities are hex of 20 or 32 bytes, so this always binds
    // them; zeros would only make the quote fail to verify.
    let rd = report::report_data(s.signer.identity(algo), &nonce32).unwrap_or([0u8; 64]);
    let (tee, gpu) = tokio::join!(s.attestor.tee(&rd, nonce), s.attestor.gpu(&nonce32));
    report::entry(&EntryInput {
        signer: &s.signer,
        algo,
        nonce,
        model,
        report_data: &rd,
        tee: &tee,
        gpu: &gpu,
    })
}

/// The path a peer is asked, with this request's nonce (made here when the
/// caller sent none); the hop signature covers it byte for byte.
fn hop_path(nonce: &str, algo: Algo, model: Option<&str>, address: Option<&str>) -> String {
    let algo = match algo {
        Algo::Ecdsa => "ecdsa",
        Algo::Ed25519 => "ed25519",
    };
    let mut path = format!("/v1/attestation/report?nonce={nonce}&signing_algo={algo}");
    if let Some(m) = model {
        path.push_str("&model=");
        for b in m.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                path.push(char::from(b));
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if let Some(a) = address {
        path.push_str("&signing_address=");
        path.push_str(a);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_path_carries_the_nonce_and_encodes_the_model() {
        assert_eq!(
            hop_path("n1", Algo::Ed25519, Some("org/m 7b+"), Some("0xab")),
            "/v1/attestation/report?nonce=n1&signing_algo=ed25519&model=org%2Fm%207b%2B&signing_address=0xab"
        );
        assert_eq!(
            hop_path("n", Algo::Ecdsa, None, None),
            "/v1/attestation/report?nonce=n&signing_algo=ecdsa"
        );
    }
}
