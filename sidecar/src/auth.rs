//! API-key authentication: a cheap format check, then SHA-256, then a map
//! lookup confirmed with a constant-time comparison.
//!
//! The map is keyed by the key's SHA-256, so any timing it leaks is about a
//! hash the caller cannot steer toward a real key; the final `ct_eq` keeps
//! the comparison itself constant-time as well.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::table::{KeyEntry, Table};
use crate::AppState;

/// The caller of a public endpoint: its key, and the one routing-table
/// snapshot the whole request uses (a config swapped mid-request never
/// mixes two tables into one answer). As an extractor it runs before the
/// handler and before the body is read, so no handler can forget it.
pub struct Caller {
    pub key: Arc<KeyEntry>,
    pub table: Arc<Table>,
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let table = state.table.load_full();
        let key = authenticate(&table, &parts.headers)?;
        Ok(Caller { key, table })
    }
}

/// Keys are 16..=256 visible ASCII characters; anything else is rejected
/// before it costs a hash.
pub const MIN_KEY_LEN: usize = 16;
pub const MAX_KEY_LEN: usize = 256;

/// The token of the one `Authorization: Bearer <token>` header, exactly as
/// sent: two headers, or spaces around the token, are malformed (a proxy
/// and the gateway could otherwise disagree on which key was presented).
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let value = all.next().ok_or(ApiError::MissingKey)?;
    if all.next().is_some() {
        return Err(ApiError::InvalidKey);
    }
    let value = value.to_str().map_err(|_| ApiError::InvalidKey)?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::InvalidKey)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::InvalidKey);
    }
    Ok(token)
}

pub fn well_formed(key: &str) -> bool {
    (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

pub fn authenticate(table: &Table, headers: &HeaderMap) -> Result<Arc<KeyEntry>, ApiError> {
    let key = bearer(headers)?;
    if !well_formed(key) {
        return Err(ApiError::InvalidKey);
    }
    let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    match table.key(&hash) {
        Some(entry) if bool::from(entry.hash.ct_eq(&hash)) => Ok(entry.clone()),
        _ => Err(ApiError::InvalidKey),
    }
}

/// Constant-time check of a presented admin token against the expected hash.
pub fn admin_token_ok(expected_sha256: &[u8; 32], headers: &HeaderMap) -> bool {
    match bearer(headers) {
        Ok(token) => {
            let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            bool::from(expected_sha256.ct_eq(&hash))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{hash_key, GatewayConfig};
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn accepts_known_key_and_rejects_everything_else() {
        let key = "ig-test-0123456789abcdef";
        let cfg = GatewayConfig::from_yaml(&format!(
            "keys: [{{ id: k, sha256: \"{}\" }}]",
            hash_key(key)
        ))
        .unwrap();
        let table = Table::build(cfg, None).unwrap();
        assert_eq!(
            authenticate(&table, &headers(&format!("Bearer {key}")))
                .unwrap()
                .id,
            "k"
        );
        assert_eq!(
            authenticate(&table, &headers(&format!("bearer {key}")))
                .unwrap()
                .id,
            "k"
        );
        for bad in [
            format!("Basic {key}"),
            format!("Bearer {key}x"),
            "Bearer short".to_owned(),
            "Bearer".to_owned(),
            format!("Bearer {}", "a".repeat(300)),
            format!("Bearer {key} "),
            format!("Bearer  {key}"),
            format!("Bearer {key}\t"),
        ] {
            assert!(
                matches!(
                    authenticate(&table, &headers(&bad)),
                    Err(ApiError::InvalidKey)
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            authenticate(&table, &HeaderMap::new()),
            Err(ApiError::MissingKey)
        ));
        let mut twice = headers(&format!("Bearer {key}"));
        twice.append(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        assert!(matches!(
            authenticate(&table, &twice),
            Err(ApiError::InvalidKey)
        ));
    }

    #[test]
    fn format_check_rejects_controls_and_spaces() {
        assert!(well_formed("sk-abcdefghijklmnop"));
        assert!(!well_formed("sk-abcdefgh ijklmnop"));
        assert!(!well_formed("sk-abcdefgh\u{7f}ijklmnop"));
        assert!(!well_formed("sk-abcdéfghijklmnop"));
    }
}
