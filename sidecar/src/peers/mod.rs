//! Other sidecars of the same deployment, all reached through one
//! [`Peers`] value: which backends are served here and which through a
//! peer, the signed hop to that peer, and asking peers who produced a
//! response or holds its signature.
//!
//! Every sidecar has the same table; a backend whose `sidecar` URL is not
//! this sidecar's own is reached through that sidecar (one hop, marked by
//! `x-infergate-hop`, never forwarded again), so the bytes are hashed and
//! signed next to the model that produced them.

mod hop;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Response, StatusCode};
use axum::response::IntoResponse;
use futures_util::future::select_ok;

pub use hop::{Hop, HopAuth, PeerHop, HOP, PIN};

use crate::attest::Records;
use crate::config::{BackendId, KeyId};
use crate::store::{Keyed, Store};
use crate::table::{Backend, Table};

/// SHA-256 of the empty body: what a body-less hop (a look-up) declares.
pub const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Where a backend is served from, seen from this sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// By this sidecar, straight to the backend.
    Here,
    /// Through the peer sidecar at this URL.
    Peer(&'a str),
    /// Behind a peer, but this sidecar has no peer secret to reach it with
    /// (the peer would take the request for a client's and forward again).
    Unreachable,
}

/// This sidecar's view of its peers and everything it does with them.
pub struct Peers {
    hops: HopAuth,
    client: reqwest::Client,
    self_url: Option<String>,
    /// Every URL that names this sidecar (`self_url` and its listener's):
    /// a backend behind one of them is served here, never forwarded.
    own_urls: ArcSwap<Vec<String>>,
    /// Owners learnt from peers (answers seen here are in the records).
    owners: Owners,
}

impl Peers {
    pub fn new(
        self_url: Option<String>,
        secret: Option<Vec<u8>>,
        owners: Owners,
    ) -> Result<Self, reqwest::Error> {
        let self_url = self_url.map(|u| u.trim_end_matches('/').to_owned());
        Ok(Peers {
            hops: HopAuth::new(secret),
            client: crate::table::upstream_client(2_000)?,
            own_urls: ArcSwap::from_pointee(self_url.iter().cloned().collect()),
            self_url,
            owners,
        })
    }

    /// Checks the hops this sidecar receives.
    pub fn hops(&self) -> &HopAuth {
        &self.hops
    }

    /// With a peer secret: this sidecar may forward to peers and ask them.
    pub fn enabled(&self) -> bool {
        self.hops.enabled()
    }

    /// The public listener is bound: the URLs that name it are this
    /// sidecar's own (so a config that names it is not forwarded to itself).
    pub fn listening_on(&self, addr: std::net::SocketAddr) {
        let mut own: Vec<String> = self.self_url.iter().cloned().collect();
        own.extend(own_urls(addr));
        self.own_urls.store(Arc::new(own));
    }

    /// URLs naming this sidecar.
    pub fn own_urls(&self) -> arc_swap::Guard<Arc<Vec<String>>> {
        self.own_urls.load()
    }

    /// How this sidecar reaches `backend`; a request that is itself a hop is
    /// always served here.
    pub fn reach<'a>(&self, backend: &'a Backend, hop: bool) -> Reach<'a> {
        if hop {
            return Reach::Here;
        }
        match remote(backend.sidecar.as_deref(), &self.own_urls()) {
            None => Reach::Here,
            Some(peer) if self.enabled() => Reach::Peer(peer),
            Some(_) => Reach::Unreachable,
        }
    }

    /// Every other sidecar named in `table`.
    pub fn list<'a>(&self, table: &'a Table) -> Vec<&'a str> {
        peers(table, &self.own_urls())
    }

    pub fn warn_if_unreachable(&self, table: &Table) {
        if !self.enabled() && !self.list(table).is_empty() {
            tracing::warn!(
                "the config names other sidecars but no peer secret is set \
                 (--peer-secret-file): their backends are unavailable from here"
            );
        }
    }

    /// Headers for a request to a peer: the caller's key and the signed hop
    /// (`pin`: the backend this sidecar chose for it).
    pub fn hop_headers(
        &self,
        client: &HeaderMap,
        method: &Method,
        path: &str,
        body_sha256: &[u8; 32],
        pin: Option<&str>,
    ) -> HeaderMap {
        self.hops.headers(client, method, path, body_sha256, pin)
    }

    /// The client for requests to peers.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `GET path` as a signed hop from each of `peers` at once; the first 200.
    async fn ask(
        &self,
        peers: &[&str],
        path: &str,
        client_headers: &HeaderMap,
    ) -> Option<(reqwest::StatusCode, HeaderMap, bytes::Bytes)> {
        let headers = self.hop_headers(client_headers, &Method::GET, path, &EMPTY_SHA256, None);
        ask(&self.client, peers, path, &headers).await
    }

    /// Who produced response `id`: remembered here, or learnt from a peer
    /// (never when this request is itself a hop, so look-ups do not bounce).
    pub async fn owner(
        &self,
        records: &Records,
        table: &Table,
        id: &str,
        headers: &HeaderMap,
        hop: bool,
    ) -> Option<Owner> {
        if let Some(r) = records.get(id) {
            return Some(r.owner);
        }
        if let Some(o) = self.owners.get(id) {
            return Some(o);
        }
        if hop || !self.enabled() {
            return None;
        }
        let path = format!("/v1/internal/owner/{id}");
        let (_, _, body) = self.ask(&self.list(table), &path, headers).await?;
        #[derive(serde::Deserialize)]
        struct Found {
            backend: BackendId,
            key_id: KeyId,
        }
        let found: Found = serde_json::from_slice(&body).ok()?;
        let owner = Owner {
            backend: found.backend,
            key_id: found.key_id,
        };
        self.owners.remember(id, owner.clone());
        Some(owner)
    }

    /// A signature this sidecar does not hold: from the sidecar it forwarded
    /// the request to (`via`), or else from whichever peer has it. Never on
    /// a hop, so a look-up visits each sidecar at most once.
    pub async fn signature(
        &self,
        table: &Table,
        via: Option<&str>,
        path_and_query: &str,
        headers: &HeaderMap,
        hop: bool,
    ) -> Option<Response<Body>> {
        // Without the peer secret peers would take this for a client's
        // request and ask on, back and forth.
        if hop || !self.enabled() {
            return None;
        }
        let ask: Vec<&str> = match via {
            Some(v) => vec![v],
            None => self.list(table),
        };
        let (status, resp_headers, body) = self.ask(&ask, path_and_query, headers).await?;
        let mut out = (StatusCode::from_u16(status.as_u16()).ok()?, body).into_response();
        if let Some(ct) = resp_headers.get(header::CONTENT_TYPE) {
            out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        Some(out)
    }
}

impl Peers {
    /// Each of `peers`' own attestation entry for the report at `path`
    /// (asked as signed hops, all at once): the entry, `None` where that
    /// peer does not hold the key the path names (a 404), or why it could
    /// not answer. A hop is answered with the peer's own entry only, so the
    /// report never fans out twice.
    pub async fn attestations(
        &self,
        peers: &[&str],
        path: &str,
        client_headers: &HeaderMap,
    ) -> Vec<(String, Result<Option<serde_json::Value>, String>)> {
        if !self.enabled() {
            let why = "this sidecar has no peer secret to ask it with";
            return peers
                .iter()
                .map(|p| ((*p).to_owned(), Err(why.to_owned())))
                .collect();
        }
        let headers = self.hop_headers(client_headers, &Method::GET, path, &EMPTY_SHA256, None);
        let asks = peers.iter().map(|p| {
            // Quote and GPU evidence hooks may each take a while.
            let req = self
                .client
                .get(format!("{p}{path}"))
                .headers(headers.clone())
                .timeout(Duration::from_secs(100))
                .send();
            async move {
                let answer = match req.await {
                    Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => Ok(None),
                    Ok(resp) if resp.status() == reqwest::StatusCode::OK => {
                        match resp.json::<serde_json::Value>().await {
                            Ok(v) if v.get("signing_address").is_some_and(|a| a.is_string()) => {
                                Ok(Some(v))
                            }
                            _ => Err("the peer's answer is not an attestation".to_owned()),
                        }
                    }
                    Ok(resp) => Err(format!("the peer answered {}", resp.status().as_u16())),
                    Err(e) if e.is_timeout() => Err("the peer did not answer in time".to_owned()),
                    Err(_) => Err("the peer could not be reached".to_owned()),
                };
                ((*p).to_owned(), answer)
            }
        });
        futures_util::future::join_all(asks).await
    }
}

/// Who produced a response, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub backend: BackendId,
    /// The key that made the request: only it (or an admin) may follow up.
    pub key_id: KeyId,
}

/// Owners learnt from peers, by response id.
pub struct Owners {
    store: Store<Learnt>,
}

struct Learnt {
    id: Box<str>,
    owner: Owner,
}

impl Keyed for Learnt {
    fn key(&self) -> &str {
        &self.id
    }
}

impl Owners {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Owners {
            store: Store::new(capacity, ttl),
        }
    }

    /// The first owner learnt for an id stays (see `Records::insert`).
    pub fn remember(&self, id: &str, owner: Owner) {
        self.store.insert(Learnt {
            id: id.into(),
            owner,
        });
    }

    pub fn get(&self, id: &str) -> Option<Owner> {
        self.store.with(id, |l| l.owner.clone())
    }
}

/// The sidecar URL to forward to for `backend_sidecar`, or None if it is
/// this sidecar (any of the URLs it answers on: see [`own_urls`]).
fn remote<'a>(backend_sidecar: Option<&'a str>, own: &[String]) -> Option<&'a str> {
    backend_sidecar.filter(|s| !own.iter().any(|o| o == s))
}

/// Every other sidecar named in the table.
fn peers<'a>(table: &'a Table, own: &[String]) -> Vec<&'a str> {
    let mut out: Vec<&str> = table
        .backends
        .values()
        .filter_map(|b| remote(b.sidecar.as_deref(), own))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The URLs a config may use to name this sidecar's public listener: its
/// address, and the loopback names when it listens on loopback or on every
/// address. (Its pod IP is `--self-url`.) A backend behind one of these is
/// served here, never forwarded to this very sidecar.
pub fn own_urls(addr: std::net::SocketAddr) -> Vec<String> {
    let port = addr.port();
    let ip = addr.ip();
    let mut out = vec![match ip {
        std::net::IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
        v4 => format!("http://{v4}:{port}"),
    }];
    if ip.is_unspecified() || ip.is_loopback() {
        for host in ["127.0.0.1", "localhost", "[::1]"] {
            out.push(format!("http://{host}:{port}"));
        }
    }
    out.dedup();
    out
}

/// Ask every peer `GET {peer}{path}` at once; the first 200 wins.
async fn ask(
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
    fn the_empty_body_hash_is_sha256_of_nothing() {
        use sha2::{Digest, Sha256};
        assert_eq!(EMPTY_SHA256, <[u8; 32]>::from(Sha256::digest(b"")));
    }

    #[test]
    fn a_backend_is_remote_only_when_its_sidecar_is_another() {
        let me = vec!["http://me".to_owned()];
        assert_eq!(remote(None, &me), None);
        assert_eq!(remote(Some("http://me"), &me), None);
        assert_eq!(remote(Some("http://you"), &me), Some("http://you"));
        assert_eq!(remote(Some("http://you"), &[]), Some("http://you"));
    }

    #[test]
    fn a_sidecar_knows_the_urls_of_its_own_listener() {
        let all = own_urls("0.0.0.0:8080".parse().unwrap());
        for u in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            assert!(all.contains(&u.to_owned()), "{u}");
        }
        let one = own_urls("10.1.2.3:8080".parse().unwrap());
        assert_eq!(one, vec!["http://10.1.2.3:8080".to_owned()]);
        assert!(!own_urls("127.0.0.1:8081".parse().unwrap())
            .contains(&"http://127.0.0.1:8080".to_owned()));
    }
}
