//! The hop between two sidecars: a request one sidecar forwards to another
//! carries a signed marker, checked from the headers alone before the body
//! is read.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::EMPTY_SHA256;
use crate::error::ApiError;
use crate::usage::now_unix_ms;
use crate::AppState;

/// Set on a request one sidecar forwards to another; the receiver serves it
/// locally and never forwards it again. Its value authenticates the hop:
/// `v1.<unix ms>.<nonce hex>.<body SHA-256 hex>.<HMAC-SHA256 hex>`, see
/// [`HopAuth`]. The body's hash is in the header so the hop is
/// authenticated before its body is read.
pub const HOP: HeaderName = HeaderName::from_static("x-infergate-hop");
/// With `HOP`: the backend the forwarding sidecar chose (covered by the MAC).
pub const PIN: HeaderName = HeaderName::from_static("x-infergate-backend-pin");

/// How far a hop's clock may be from ours, either way.
const HOP_WINDOW_MS: u64 = 30_000;

/// A hop that proved it comes from a sidecar holding the peer secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The backend the forwarding sidecar chose, when it chose one.
    pub pin: Option<String>,
    /// The SHA-256 of the body the peer sent; the body that arrives must
    /// match it.
    pub body_sha256: [u8; 32],
}

/// Signs hops this sidecar makes and checks the ones it receives.
///
/// The MAC covers method, path, the body's SHA-256, the time, a nonce, the
/// pin and the SHA-256 of the caller's `Authorization`, so a captured hop
/// cannot be replayed (nonces are remembered for the window), moved to
/// another path, body, backend or key. Without a secret this sidecar makes
/// no hops and accepts none.
pub struct HopAuth {
    secret: Option<Vec<u8>>,
    seen: moka::sync::Cache<[u8; 16], ()>,
}

impl HopAuth {
    pub fn new(secret: Option<Vec<u8>>) -> Self {
        HopAuth {
            secret: secret.filter(|s| !s.is_empty()),
            seen: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_millis(2 * HOP_WINDOW_MS))
                .build(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.secret.is_some()
    }

    fn mac(
        secret: &[u8],
        parts: (&Method, &str, &[u8; 32], u64, &[u8; 16], Option<&str>),
        authorization: Option<&HeaderValue>,
    ) -> Hmac<Sha256> {
        let (method, path, body_sha256, ts, nonce, pin) = parts;
        // `new_from_slice` takes any key length for HMAC; the error arm is
        // unreachable, and an empty MAC would only fail verification.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| Hmac::<Sha256>::new(&Default::default()));
        let auth_sha256 = Sha256::digest(authorization.map_or(&b""[..], |v| v.as_bytes()));
        for field in [
            b"infergate-hop-v1".as_slice(),
            method.as_str().as_bytes(),
            path.as_bytes(),
            body_sha256,
            ts.to_string().as_bytes(),
            nonce,
            pin.unwrap_or("").as_bytes(),
            &auth_sha256,
        ] {
            // Length-prefixed, so no two field lists give the same input.
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac
    }

    /// Headers for a request to a peer: the caller's own key (every replica
    /// has the same key table), the signed hop marker and the pin.
    pub fn headers(
        &self,
        client: &HeaderMap,
        method: &Method,
        path: &str,
        body_sha256: &[u8; 32],
        pin: Option<&str>,
    ) -> HeaderMap {
        let mut h = HeaderMap::new();
        let auth = client.get(header::AUTHORIZATION);
        if let Some(auth) = auth {
            h.insert(header::AUTHORIZATION, auth.clone());
        }
        let Some(secret) = &self.secret else {
            return h;
        };
        let mut nonce = [0u8; 16];
        if getrandom::getrandom(&mut nonce).is_err() {
            return h;
        }
        let ts = now_unix_ms();
        let tag = Self::mac(secret, (method, path, body_sha256, ts, &nonce, pin), auth)
            .finalize()
            .into_bytes();
        let value = format!(
            "v1.{ts}.{}.{}.{}",
            hex::encode(nonce),
            hex::encode(body_sha256),
            hex::encode(tag)
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HOP, v);
        }
        if let Some(v) = pin.and_then(|p| HeaderValue::from_str(p).ok()) {
            h.insert(PIN, v);
        }
        h
    }

    /// `None` for a request without internal headers; the verified hop (its
    /// body still to be checked against `Hop::body_sha256`); or a 400 for
    /// internal headers that do not prove a peer sent them. Needs only the
    /// headers, so a forged hop is refused before its body is read.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        method: &Method,
        path: &str,
    ) -> Result<Option<Hop>, ApiError> {
        let hop = headers.get_all(HOP);
        let pin = headers.get_all(PIN);
        let (mut hops, mut pins) = (hop.iter(), pin.iter());
        let (hop, pin) = match (hops.next(), pins.next()) {
            (None, None) => return Ok(None),
            (Some(h), p) if hops.next().is_none() && pins.next().is_none() => (h, p),
            _ => return Err(ApiError::ForgedHop),
        };
        let secret = self.secret.as_deref().ok_or(ApiError::ForgedHop)?;
        let pin = match pin {
            Some(p) => Some(p.to_str().map_err(|_| ApiError::ForgedHop)?),
            None => None,
        };
        let (ts, nonce, body_sha256, tag) = parse_hop(hop).ok_or(ApiError::ForgedHop)?;
        if now_unix_ms().abs_diff(ts) > HOP_WINDOW_MS {
            return Err(ApiError::ForgedHop);
        }
        let auth = headers.get(header::AUTHORIZATION);
        Self::mac(secret, (method, path, &body_sha256, ts, &nonce, pin), auth)
            .verify_slice(&tag)
            .map_err(|_| ApiError::ForgedHop)?;
        // Only a valid MAC gets this far, so only peers fill the cache.
        if !self.seen.entry(nonce).or_insert(()).is_fresh() {
            return Err(ApiError::ForgedHop);
        }
        Ok(Some(Hop {
            pin: pin.map(str::to_owned),
            body_sha256,
        }))
    }
}

/// A hop header's time, nonce, declared body SHA-256 and MAC.
type HopFields = (u64, [u8; 16], [u8; 32], [u8; 32]);

fn parse_hop(v: &HeaderValue) -> Option<HopFields> {
    let mut parts = v.to_str().ok()?.split('.');
    if parts.next()? != "v1" {
        return None;
    }
    let ts = parts.next()?.parse().ok()?;
    let mut nonce = [0u8; 16];
    hex::decode_to_slice(parts.next()?, &mut nonce).ok()?;
    let mut body = [0u8; 32];
    hex::decode_to_slice(parts.next()?, &mut body).ok()?;
    let mut tag = [0u8; 32];
    hex::decode_to_slice(parts.next()?, &mut tag).ok()?;
    parts.next().is_none().then_some((ts, nonce, body, tag))
}

/// The verified hop of a request without a body (look-ups between
/// sidecars); a forged one is refused before the handler runs.
pub struct PeerHop(pub Option<Hop>);

impl FromRequestParts<Arc<AppState>> for PeerHop {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let path = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |p| p.as_str());
        match state
            .peers
            .hops()
            .verify(&parts.headers, &parts.method, path)?
        {
            Some(hop) if hop.body_sha256 != EMPTY_SHA256 => Err(ApiError::ForgedHop),
            hop => Ok(PeerHop(hop)),
        }
    }
}
