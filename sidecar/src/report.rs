//! The attestation report in the shape NEAR AI's gateway and vllm-proxy use,
//! as pure functions (no IO): the 64 bytes of TEE report data that bind the
//! signing key and the caller's nonce, finding them again in a TDX quote,
//! the GPU evidence payload, and the JSON of one sidecar's entry and of the
//! whole report.
//!
//! Report data (NEAR AI's layout, `_build_report_data` in nearai/vllm-proxy,
//! checked by `check_report_data` in nearai/nearai-cloud-verifier):
//! bytes 0..32 are the signing address zero-padded on the right (the 20-byte
//! Ethereum address for `ecdsa`, the 32-byte public key for `ed25519`),
//! bytes 32..64 the nonce.

use serde_json::{json, Map, Value};

use crate::attest::{Algo, Signer};

/// TDX quote v4: a 48-byte header, then the TD report body (TD 1.0, 584
/// bytes) whose last 64 bytes are the report data: 48 + 520 = 568.
pub const TDX_V4_REPORT_DATA: usize = 568;
const TDX_HEADER: usize = 48;
const TD10_BODY: usize = 584;
/// Quote v5 puts a body type (u16) and size (u32) before the body.
const TDX_V5_REPORT_DATA: usize = TDX_HEADER + 6 + 520;
const TDX_TEE_TYPE: u32 = 0x81;

/// A nonce the report accepts: 1..=128 characters of `[A-Za-z0-9_-]`. NEAR
/// AI's verifiers send 64 hex characters (32 bytes).
pub fn valid_nonce(n: &str) -> bool {
    (1..=128).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The 32 nonce bytes bound into the quote: a nonce of 64 hex characters
/// (NEAR AI's form) is those bytes; any other is its SHA-256, so an older
/// client's free-form nonce is still bound.
pub fn nonce_bytes(nonce: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if nonce.len() == 64 && hex::decode_to_slice(nonce, &mut out).is_ok() {
        return out;
    }
    use sha2::{Digest, Sha256};
    Sha256::digest(nonce.as_bytes()).into()
}

/// Report data for a signing identity (`0x` address or hex public key, as
/// the report shows it) and nonce; None if the identity is not hex of at
/// most 32 bytes.
pub fn report_data(identity: &str, nonce: &[u8; 32]) -> Option<[u8; 64]> {
    let raw = hex::decode(identity.strip_prefix("0x").unwrap_or(identity)).ok()?;
    if raw.is_empty() || raw.len() > 32 {
        return None;
    }
    let mut out = [0u8; 64];
    out[..raw.len()].copy_from_slice(&raw);
    out[32..].copy_from_slice(nonce);
    Some(out)
}

/// The report data inside a TDX quote (v4, or v5 with a TD report body);
/// None for anything else (an SEV-SNP report, a quote too short).
pub fn tdx_report_data(quote: &[u8]) -> Option<[u8; 64]> {
    let version = u16::from_le_bytes(quote.get(0..2)?.try_into().ok()?);
    let tee_type = u32::from_le_bytes(quote.get(4..8)?.try_into().ok()?);
    if tee_type != TDX_TEE_TYPE {
        return None;
    }
    let at = match version {
        4 if quote.len() >= TDX_HEADER + TD10_BODY => TDX_V4_REPORT_DATA,
        5 => TDX_V5_REPORT_DATA,
        _ => return None,
    };
    quote.get(at..at + 64)?.try_into().ok()
}

/// `nvidia_payload` from what the GPU evidence command printed: either the
/// payload itself (`{"nonce", "evidence_list", "arch"}`, as NVIDIA's local
/// GPU verifier tooling and vllm-proxy build it), whose nonce must be ours,
/// or just the evidence list, which is wrapped with our nonce.
pub fn nvidia_payload(output: &str, nonce_hex: &str) -> Result<String, String> {
    let value: Value = serde_json::from_str(output.trim())
        .map_err(|_| "the GPU evidence command did not print JSON".to_owned())?;
    match value {
        Value::Array(list) => {
            Ok(json!({"nonce": nonce_hex, "evidence_list": list, "arch": "HOPPER"}).to_string())
        }
        Value::Object(ref o) if o.contains_key("evidence_list") => {
            match o.get("nonce").and_then(Value::as_str) {
                Some(n) if n.eq_ignore_ascii_case(nonce_hex) => Ok(value.to_string()),
                _ => Err("the GPU evidence is not for this nonce".to_owned()),
            }
        }
        _ => Err("the GPU evidence command printed neither a payload nor an evidence list".into()),
    }
}

/// What a quote hook printed (or a quote file holds): the quote itself
/// (hex by convention), or a JSON object like dstack's `get_quote` answer,
/// `{"quote", "event_log"}` (the event log may be a JSON string), with
/// optional `info` fields for the report.
pub fn parse_quote_output(out: &str) -> Result<(String, Value, Map<String, Value>), String> {
    let out = out.trim();
    if out.is_empty() {
        return Err("the quote source gave nothing".into());
    }
    if !out.starts_with('{') {
        return Ok((out.to_owned(), Value::Null, Map::new()));
    }
    let Ok(Value::Object(mut o)) = serde_json::from_str::<Value>(out) else {
        return Err("the quote source printed JSON that is not an object".into());
    };
    let quote = match o.remove("quote").or_else(|| o.remove("intel_quote")) {
        Some(Value::String(q)) if !q.is_empty() => q,
        _ => return Err("the quote source's JSON has no `quote`".into()),
    };
    let event_log = match o.remove("event_log") {
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        Some(v) => v,
        None => Value::Null,
    };
    let info = match o.remove("info") {
        Some(Value::Object(i)) => i,
        _ => Map::new(),
    };
    Ok((quote, event_log, info))
}

/// What the TEE said for one report data.
#[derive(Debug, Clone, PartialEq)]
pub enum TeeEvidence {
    /// No quote source is configured.
    Absent,
    Quote {
        /// `configfs-tsm`, `command` or `file`.
        source: &'static str,
        /// Hex for configfs-tsm; as printed or stored for the others.
        quote: String,
        event_log: Value,
        /// configfs-tsm's `provider` (`tdx_guest`, `sev_guest`).
        provider: Option<String>,
        /// Extra `info` fields from a command that printed JSON.
        info: Map<String, Value>,
    },
    Failed(String),
}

/// GPU evidence for one nonce.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuEvidence {
    Absent,
    Payload(String),
    Failed(String),
}

/// The `tee` section infergate has always had, now saying whether the
/// quote's report data is the one this report expects (when it is a TDX
/// quote in hex; `null` when that cannot be told).
fn tee_section(tee: &TeeEvidence, expected: &[u8; 64]) -> Value {
    match tee {
        TeeEvidence::Absent => json!({
            "present": false,
            "message": "No TEE quote source is configured on this sidecar; only the signing keys are attested."
        }),
        TeeEvidence::Quote {
            source,
            quote,
            provider,
            ..
        } => {
            let matches = hex::decode(quote)
                .ok()
                .and_then(|q| tdx_report_data(&q))
                .map(|rd| &rd == expected);
            json!({"present": true, "source": source, "quote": quote,
                   "provider": provider, "report_data_matches": matches})
        }
        TeeEvidence::Failed(message) => json!({"present": false, "message": message}),
    }
}

/// Everything one sidecar's entry is made of.
pub struct EntryInput<'a> {
    pub signer: &'a Signer,
    pub algo: Algo,
    pub nonce: &'a str,
    pub model: Option<&'a str>,
    pub report_data: &'a [u8; 64],
    pub tee: &'a TeeEvidence,
    pub gpu: &'a GpuEvidence,
}

/// The statement infergate signs with both keys (unchanged since v1).
pub fn statement(signer: &Signer, nonce: &str) -> String {
    format!(
        "infergate-attestation-report:v1:nonce={nonce}:signing_address={}:ed25519_public_key={}",
        signer.address, signer.ed25519_public
    )
}

/// One sidecar's attestation: NEAR AI's fields for the key of `algo`, and
/// infergate's own signed statement alongside.
pub fn entry(i: &EntryInput) -> Value {
    let statement = statement(i.signer, i.nonce);
    let (quote, event_log, mut info, provider) = match i.tee {
        TeeEvidence::Quote {
            quote,
            event_log,
            info,
            provider,
            ..
        } => (
            Value::from(quote.as_str()),
            event_log.clone(),
            info.clone(),
            provider.clone(),
        ),
        _ => (Value::Null, Value::Null, Map::new(), None),
    };
    info.insert("app_name".into(), "infergate-sidecar".into());
    info.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    info.insert("tee_provider".into(), provider.into());
    let (nvidia_payload, gpu) = match i.gpu {
        GpuEvidence::Absent => (
            Value::Null,
            json!({"present": false,
            "message": "No GPU evidence command is configured on this sidecar."}),
        ),
        GpuEvidence::Payload(p) => (Value::from(p.as_str()), json!({"present": true})),
        GpuEvidence::Failed(m) => (Value::Null, json!({"present": false, "message": m})),
    };
    let public_key = match i.algo {
        Algo::Ecdsa => i.signer.ecdsa_public.as_str(),
        Algo::Ed25519 => i.signer.ed25519_public.as_str(),
    };
    json!({
        "model_name": i.model,
        "signing_address": i.signer.identity(i.algo),
        "signing_algo": i.algo,
        "signing_public_key": public_key,
        "request_nonce": i.nonce,
        "report_data": hex::encode(i.report_data),
        "intel_quote": quote,
        "nvidia_payload": nvidia_payload,
        "event_log": event_log,
        "info": info,
        "gpu": gpu,
        "nonce": i.nonce,
        "ed25519_public_key": i.signer.ed25519_public,
        "signing_algos": ["ecdsa", "ed25519"],
        "statement": statement,
        "signatures": {
            "ecdsa": i.signer.sign_ecdsa(&statement),
            "ed25519": i.signer.sign_ed25519(&statement),
        },
        "tee": tee_section(i.tee, i.report_data),
    })
}

/// Whether an entry is for `identity` (addresses compare case-insensitively).
pub fn is_for(entry: &Value, identity: &str) -> bool {
    entry
        .get("signing_address")
        .and_then(Value::as_str)
        .is_some_and(|a| a.eq_ignore_ascii_case(identity))
}

/// The whole report: the fields of `top` (this sidecar's entry, or the one
/// `signing_address` chose), the answering sidecar as `gateway_attestation`
/// when it has an entry, every pod's entry as `model_attestations` and
/// `all_attestations` (NEAR AI's gateway and vllm-proxy names), and peers
/// that could not answer.
pub fn assemble(
    top: &Value,
    gateway: Option<&Value>,
    entries: &[Value],
    unreachable: &[(String, String)],
) -> Value {
    let mut out = top.as_object().cloned().unwrap_or_default();
    if let Some(g) = gateway {
        out.insert("gateway_attestation".into(), g.clone());
    }
    out.insert("model_attestations".into(), entries.to_vec().into());
    out.insert("all_attestations".into(), entries.to_vec().into());
    if !unreachable.is_empty() {
        let list: Vec<Value> = unreachable
            .iter()
            .map(|(sidecar, error)| json!({"sidecar": sidecar, "error": error}))
            .collect();
        out.insert("unreachable".into(), list.into());
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests;
