//! Other sidecars of the same deployment: who owns a response id, and asking
//! them when this sidecar does not know.
//!
//! Every sidecar has the same table; a backend whose `sidecar` URL is not
//! this sidecar's own is reached through that sidecar (one hop, marked by
//! `x-infergate-hop`, never forwarded again), so the bytes are hashed and
//! signed next to the model that produced them.

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use futures_util::future::select_ok;

use crate::table::Table;

/// Set on a request one sidecar forwards to another; the receiver serves it
/// locally and never forwards it again.
pub const HOP: HeaderName = HeaderName::from_static("x-infergate-hop");
/// With `HOP`: the backend the forwarding sidecar chose.
pub const PIN: HeaderName = HeaderName::from_static("x-infergate-backend-pin");

/// Who produced a response: a backend, and the sidecar next to it when that
/// is another one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub backend: String,
    pub via: Option<String>,
    /// The key that made the request: only it (or an admin) may follow up.
    pub key_id: String,
}

pub struct Owners {
    cache: moka::sync::Cache<String, Owner>,
}

impl Owners {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Owners {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub fn remember(&self, id: String, owner: Owner) {
        self.cache.insert(id, owner);
    }

    pub fn get(&self, id: &str) -> Option<Owner> {
        self.cache.get(id)
    }
}

/// The sidecar URL to forward to for `backend_sidecar`, or None if local.
pub fn remote<'a>(backend_sidecar: Option<&'a str>, self_url: Option<&str>) -> Option<&'a str> {
    match (backend_sidecar, self_url) {
        (Some(s), Some(me)) if s == me => None,
        (Some(s), _) => Some(s),
        (None, _) => None,
    }
}

/// Every other sidecar named in the table.
pub fn peers<'a>(table: &'a Table, self_url: Option<&'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = table
        .backends
        .values()
        .filter_map(|b| remote(b.sidecar.as_deref(), self_url))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Headers for a request to a peer: the caller's own key (every replica
/// has the same key table) and the hop marker.
pub fn peer_headers(client: &HeaderMap, self_url: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(auth) = client.get(header::AUTHORIZATION) {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    h.insert(
        HOP,
        HeaderValue::from_str(self_url.unwrap_or("peer"))
            .unwrap_or(HeaderValue::from_static("peer")),
    );
    h
}

/// Ask every peer `GET {peer}{path}` at once; the first 200 wins.
pub async fn ask(
    client: &reqwest::Client,
    peers: &[&str],
    path: &str,
    headers: &HeaderMap,
) -> Option<(reqwest::StatusCode, HeaderMap, bytes::Bytes)> {
    if peers.is_empty() {
        return None;
    }
    let asks = peers.iter().map(|p| {
        let req = client
            .get(format!("{p}{path}"))
            .headers(headers.clone())
            .timeout(Duration::from_secs(5))
            .send();
        Box::pin(async move {
            let resp = req.await.map_err(|_| ())?;
            if resp.status() != reqwest::StatusCode::OK {
                return Err(());
            }
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await.map_err(|_| ())?;
            Ok((status, headers, body))
        })
    });
    select_ok(asks).await.ok().map(|(found, _)| found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_remote_only_when_its_sidecar_is_another() {
        assert_eq!(remote(None, Some("http://me")), None);
        assert_eq!(remote(Some("http://me"), Some("http://me")), None);
        assert_eq!(
            remote(Some("http://you"), Some("http://me")),
            Some("http://you")
        );
        assert_eq!(remote(Some("http://you"), None), Some("http://you"));
    }
}
