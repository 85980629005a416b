//! Verifiable answers: every completed answer on an attested backend leaves
//! a record of `sha256(request bytes)` and `sha256(response bytes)`; the
//! text `<req hex>:<resp hex>` is signed with ECDSA secp256k1 (Ethereum
//! personal-sign form) and Ed25519 on the first look-up, not on the hot path
//! (the two signatures cost more CPU than proxying the request did). Every
//! other answer leaves its owner and why it has no signature.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::Signer as _;
use k256::ecdsa::SigningKey as EcdsaKey;
use serde::Serialize;
use sha3::{Digest as _, Keccak256};

use crate::peers::Owner;
use crate::store::{Keyed, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    Ecdsa,
    Ed25519,
}

impl Algo {
    pub fn parse(s: &str) -> Option<Algo> {
        match s {
            "ecdsa" => Some(Algo::Ecdsa),
            "ed25519" => Some(Algo::Ed25519),
            _ => None,
        }
    }
}

/// The two signing keys of this sidecar.
pub struct Signer {
    ecdsa: EcdsaKey,
    ed25519: ed25519_dalek::SigningKey,
    /// `0x` + 20-byte Ethereum address of the ECDSA key.
    pub address: String,
    /// Hex Ed25519 public key.
    pub ed25519_public: String,
    /// Hex uncompressed secp256k1 public key without its `04` prefix (64
    /// bytes), as NEAR AI reports `signing_public_key`.
    pub ecdsa_public: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} must hold 32 bytes as 64 hex characters")]
    Format(String),
    #[error("{0} is not a valid secp256k1 secret key")]
    Ecdsa(String),
}

impl Signer {
    pub fn from_secrets(ecdsa: [u8; 32], ed25519: [u8; 32]) -> Result<Self, KeyError> {
        let ecdsa =
            EcdsaKey::from_bytes(&ecdsa.into()).map_err(|_| KeyError::Ecdsa("key".into()))?;
        let ed25519 = ed25519_dalek::SigningKey::from_bytes(&ed25519);
        Ok(Signer {
            address: eth_address(&ecdsa),
            ecdsa_public: hex::encode(
                &ecdsa.verifying_key().to_encoded_point(false).as_bytes()[1..],
            ),
            ed25519_public: hex::encode(ed25519.verifying_key().as_bytes()),
            ecdsa,
            ed25519,
        })
    }

    /// Fresh random keys (when no key files are mounted).
    #[allow(
        clippy::expect_used,
        reason = "startup only: without OS randomness there are no keys to serve with"
    )]
    pub fn generate() -> Self {
        loop {
            let mut a = [0u8; 32];
            let mut b = [0u8; 32];
            getrandom::getrandom(&mut a).expect("OS randomness");
            getrandom::getrandom(&mut b).expect("OS randomness");
            // A random scalar is out of range with probability ~2^-128.
            if let Ok(s) = Signer::from_secrets(a, b) {
                return s;
            }
        }
    }

    /// Keys from files of 64 hex characters (mounted Secrets).
    pub fn from_files(ecdsa: &Path, ed25519: &Path) -> Result<Self, KeyError> {
        let read = |p: &Path| -> Result<[u8; 32], KeyError> {
            let text = std::fs::read_to_string(p).map_err(|source| KeyError::Read {
                path: p.display().to_string(),
                source,
            })?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(text.trim().trim_start_matches("0x"), &mut out)
                .map_err(|_| KeyError::Format(p.display().to_string()))?;
            Ok(out)
        };
        Signer::from_secrets(read(ecdsa)?, read(ed25519)?)
            .map_err(|_| KeyError::Ecdsa(ecdsa.display().to_string()))
    }

    /// `0x` + r || s || v (65 bytes, v = 27 + recovery id) over the
    /// Ethereum personal-sign digest of `text`.
    #[allow(
        clippy::expect_used,
        reason = "the only input checked is the digest length, always 32 bytes"
    )]
    pub fn sign_ecdsa(&self, text: &str) -> String {
        let digest = personal_sign_digest(text.as_bytes());
        let (sig, recid) = self
            .ecdsa
            .sign_prehash_recoverable(&digest)
            .expect("signing a 32-byte digest cannot fail");
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = 27 + recid.to_byte();
        format!("0x{}", hex::encode(out))
    }

    /// Hex Ed25519 signature (64 bytes) over the UTF-8 bytes of `text`.
    pub fn sign_ed25519(&self, text: &str) -> String {
        hex::encode(self.ed25519.sign(text.as_bytes()).to_bytes())
    }

    pub fn sign(&self, algo: Algo, text: &str) -> String {
        match algo {
            Algo::Ecdsa => self.sign_ecdsa(text),
            Algo::Ed25519 => self.sign_ed25519(text),
        }
    }

    /// Who signed, as a client compares it: the address or the public key.
    pub fn identity(&self, algo: Algo) -> &str {
        match algo {
            Algo::Ecdsa => &self.address,
            Algo::Ed25519 => &self.ed25519_public,
        }
    }
}

/// keccak256("\x19Ethereum Signed Message:\n" + len + message), EIP-191.
pub fn personal_sign_digest(message: &[u8]) -> [u8; 32] {
    let mut h = Keccak256::new();
    h.update(format!("\x19Ethereum Signed Message:\n{}", message.len()).as_bytes());
    h.update(message);
    h.finalize().into()
}

fn eth_address(key: &EcdsaKey) -> String {
    let point = key.verifying_key().to_encoded_point(false);
    let hash = Keccak256::digest(&point.as_bytes()[1..]);
    format!("0x{}", hex::encode(&hash[12..]))
}

/// Why an answer has no signature, said plainly to whoever asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsigned {
    /// The backend is an external provider: nothing of ours to attest.
    NotAttested,
    /// The client left (or the stream failed) before the end.
    Incomplete,
    /// The upstream answered with an error status.
    ErrorStatus,
}

impl Unsigned {
    pub fn message(self) -> &'static str {
        match self {
            Unsigned::NotAttested => {
                "This answer came from a backend with attestation disabled (an external provider); it has no signature."
            }
            Unsigned::Incomplete => {
                "This answer did not reach its end (the client disconnected or the upstream failed), so it was not signed."
            }
            Unsigned::ErrorStatus => "This answer was an upstream error; errors are not signed.",
        }
    }
}

/// What an answer left for its signature, by response id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Who produced the answer (and for whom); also what Responses
    /// follow-ups and peers look up, so one store serves both.
    pub owner: Owner,
    pub answer: Answer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Served and hashed here; signed on the first look-up. The hashes are
    /// kept as bytes: the hex text is made only when someone asks.
    Hashed {
        request: [u8; 32],
        response: [u8; 32],
    },
    /// Served here, with no signature, and why.
    Unsigned(Unsigned),
    /// Forwarded to this peer sidecar, which hashed it and signs it.
    Forwarded(Arc<str>),
}

impl Record {
    /// The peer that holds the signature, when that is not this sidecar.
    pub fn via(&self) -> Option<&Arc<str>> {
        match &self.answer {
            Answer::Forwarded(via) => Some(via),
            _ => None,
        }
    }
}

/// `<hex sha256(request)>:<hex sha256(response)>`, the signed text.
pub fn signed_text(request: &[u8; 32], response: &[u8; 32]) -> String {
    let mut text = String::with_capacity(129);
    text.push_str(&hex::encode(request));
    text.push(':');
    text.push_str(&hex::encode(response));
    text
}

/// A signature as `/v1/signature` returns it.
pub struct Signed {
    pub text: String,
    pub signature: String,
    /// Made by this ask (not found already made), for the counter.
    pub made: bool,
}

/// A record as stored: its id, and the signatures once someone asked (most
/// records are never asked for: no room is kept for them until then).
struct Entry {
    id: Box<str>,
    record: Record,
    signatures: Option<Box<Signatures>>,
}

#[derive(Default)]
struct Signatures {
    ecdsa: Option<String>,
    ed25519: Option<String>,
}

impl Signatures {
    fn slot(&mut self, algo: Algo) -> &mut Option<String> {
        match algo {
            Algo::Ecdsa => &mut self.ecdsa,
            Algo::Ed25519 => &mut self.ed25519,
        }
    }
}

impl Keyed for Entry {
    fn key(&self) -> &str {
        &self.id
    }
}

/// Bounded, expiring store of records by response id.
pub struct Records {
    store: Store<Entry>,
}

impl Records {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Records {
            store: Store::new(capacity, ttl),
        }
    }

    /// The first record for an id stays: an answer that reuses an id (an
    /// upstream that let a client choose it) never takes over another's.
    pub fn insert(&self, id: impl Into<Box<str>>, record: Record) {
        self.store.insert(Entry {
            id: id.into(),
            record,
            signatures: None,
        });
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        self.store.with(id, |e| e.record.clone())
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// The `algo` signature of the answer `id` hashed as `request` and
    /// `response` (as read from its record), signed now if this is the
    /// first ask, outside the store's lock, and then kept in the record.
    pub fn sign(
        &self,
        id: &str,
        request: &[u8; 32],
        response: &[u8; 32],
        signer: &Signer,
        algo: Algo,
    ) -> Signed {
        // Only into the record these hashes were read from: the id may have
        // expired and come back as another answer meanwhile.
        let same = |e: &Entry| {
            matches!(&e.record.answer,
                Answer::Hashed { request: q, response: r } if q == request && r == response)
        };
        let text = signed_text(request, response);
        let cached = self.store.with(id, |e| {
            if !same(e) {
                return None;
            }
            e.signatures.as_mut()?.slot(algo).clone()
        });
        if let Some(signature) = cached.flatten() {
            return Signed {
                text,
                signature,
                made: false,
            };
        }
        let signature = signer.sign(algo, &text);
        // Two first asks at once both sign (the same bytes: both schemes
        // are deterministic); the first to come back keeps its signature.
        let made = self
            .store
            .with(id, |e| {
                if !same(e) {
                    return false;
                }
                let slot = e.signatures.get_or_insert_with(Default::default).slot(algo);
                let first = slot.is_none();
                if first {
                    *slot = Some(signature.clone());
                }
                first
            })
            .unwrap_or(false);
        Signed {
            text,
            signature,
            made,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};

    fn signer() -> Signer {
        Signer::from_secrets([7u8; 32], [9u8; 32]).unwrap()
    }

    #[test]
    fn ecdsa_signature_recovers_to_the_signing_address() {
        let s = signer();
        let text = "ab:cd";
        let sig = hex::decode(s.sign_ecdsa(text).trim_start_matches("0x")).unwrap();
        assert_eq!(sig.len(), 65);
        let recid = RecoveryId::from_byte(sig[64] - 27).unwrap();
        let signature = Signature::from_slice(&sig[..64]).unwrap();
        let key = VerifyingKey::recover_from_prehash(
            &personal_sign_digest(text.as_bytes()),
            &signature,
            recid,
        )
        .unwrap();
        let hash = Keccak256::digest(&key.to_encoded_point(false).as_bytes()[1..]);
        assert_eq!(format!("0x{}", hex::encode(&hash[12..])), s.address);
    }

    #[test]
    fn ethereum_address_matches_a_known_vector() {
        // Private key 0x...01 is the generator point; its address is well known.
        let mut one = [0u8; 32];
        one[31] = 1;
        let s = Signer::from_secrets(one, [1u8; 32]).unwrap();
        assert_eq!(s.address, "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf");
    }

    #[test]
    fn ed25519_signature_verifies_and_tampering_fails() {
        use ed25519_dalek::{Verifier, VerifyingKey};
        let s = signer();
        let sig = hex::decode(s.sign_ed25519("ab:cd")).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
        let key =
            VerifyingKey::from_bytes(&hex::decode(&s.ed25519_public).unwrap().try_into().unwrap())
                .unwrap();
        assert!(key.verify(b"ab:cd", &sig).is_ok());
        assert!(key.verify(b"ab:ce", &sig).is_err());
    }

    fn owner(key: &str) -> Owner {
        Owner {
            backend: "b".into(),
            key_id: key.into(),
        }
    }

    fn hashed(q: u8, r: u8) -> Record {
        Record {
            owner: owner("k"),
            answer: Answer::Hashed {
                request: [q; 32],
                response: [r; 32],
            },
        }
    }

    #[test]
    fn records_sign_once_and_keep_the_signature() {
        let s = signer();
        let records = Records::new(10, Duration::from_secs(60));
        records.insert("id", hashed(1, 2));
        let text = format!("{}:{}", "01".repeat(32), "02".repeat(32));
        let first = records.sign("id", &[1; 32], &[2; 32], &s, Algo::Ecdsa);
        assert!(first.made);
        assert_eq!(first.text, text);
        assert_eq!(first.signature, s.sign_ecdsa(&text));
        let again = records.sign("id", &[1; 32], &[2; 32], &s, Algo::Ecdsa);
        assert!(!again.made);
        assert_eq!(again.signature, first.signature);
        let ed = records.sign("id", &[1; 32], &[2; 32], &s, Algo::Ed25519);
        assert!(ed.made);
        assert_eq!(ed.signature, s.sign_ed25519(&text));
    }

    #[test]
    fn a_signature_is_kept_only_in_the_record_it_was_made_for() {
        let s = signer();
        let records = Records::new(10, Duration::from_secs(60));
        records.insert("id", hashed(1, 2));
        // Hashes read from an older record under the same id: signed (over
        // what was read), never cached into this one.
        let stale = records.sign("id", &[3; 32], &[4; 32], &s, Algo::Ecdsa);
        assert!(!stale.made);
        let fresh = records.sign("id", &[1; 32], &[2; 32], &s, Algo::Ecdsa);
        assert!(fresh.made);
        assert_ne!(stale.signature, fresh.signature);
        // A record gone: still signed for the one asking, kept nowhere.
        assert!(
            !records
                .sign("gone", &[1; 32], &[2; 32], &s, Algo::Ecdsa)
                .made
        );
    }

    #[test]
    fn the_first_record_for_an_id_stays() {
        let records = Records::new(10, Duration::from_secs(60));
        records.insert("id", hashed(1, 2));
        records.insert(
            "id",
            Record {
                owner: owner("other"),
                answer: Answer::Unsigned(Unsigned::NotAttested),
            },
        );
        assert_eq!(records.get("id"), Some(hashed(1, 2)));
        assert_eq!(records.get("id").unwrap().via(), None);
    }
}
