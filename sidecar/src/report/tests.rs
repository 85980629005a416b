use super::*;

fn signer() -> Signer {
    Signer::from_secrets([7u8; 32], [9u8; 32]).unwrap()
}

/// A TDX v4 quote as the kernel returns it: header (version 4, ECDSA-P256
/// key type 2, TEE type 0x81), the 584-byte TD report body ending in the
/// report data, then a signature section.
fn v4_quote(report_data: &[u8; 64]) -> Vec<u8> {
    let mut q = vec![0u8; 48 + 584];
    q[0..2].copy_from_slice(&4u16.to_le_bytes());
    q[2..4].copy_from_slice(&2u16.to_le_bytes());
    q[4..8].copy_from_slice(&0x81u32.to_le_bytes());
    q[568..632].copy_from_slice(report_data);
    q.extend_from_slice(&8u32.to_le_bytes());
    q.extend_from_slice(&[0xAA; 8]);
    q
}

#[test]
fn report_data_is_the_padded_address_then_the_nonce() {
    let nonce = [0x11u8; 32];
    let rd = report_data("0x7e5f4552091a69125d5dfcb7b8c2659029395bdf", &nonce).unwrap();
    assert_eq!(
        hex::encode(&rd[..20]),
        "7e5f4552091a69125d5dfcb7b8c2659029395bdf"
    );
    assert_eq!(rd[20..32], [0u8; 12]);
    assert_eq!(rd[32..], nonce);
    // An Ed25519 key fills the first half exactly.
    let key = "ab".repeat(32);
    let rd = report_data(&key, &nonce).unwrap();
    assert_eq!(rd[..32], [0xab; 32]);
    assert!(report_data(&"ab".repeat(33), &nonce).is_none());
    assert!(report_data("0xzz", &nonce).is_none());
    assert!(report_data("", &nonce).is_none());
}

#[test]
fn the_layout_matches_a_published_near_ai_quote() {
    // From nearai-cloud-verifier's fixture of a real report: signing address
    // 0x56d0..2b8b with nonce deadbeef00..01; its quote's report data is:
    let published = "56d070df1c6be444b007839ef9cf67cec7c12b8b000000000000000000000000\
                     deadbeef00000000000000000000000000000000000000000000000000000001";
    let nonce = nonce_bytes("deadbeef00000000000000000000000000000000000000000000000000000001");
    let rd = report_data("0x56d070df1c6be444b007839ef9cf67cec7c12b8b", &nonce).unwrap();
    assert_eq!(hex::encode(rd), published);
}

#[test]
fn a_hex_nonce_is_its_bytes_and_any_other_is_hashed() {
    let hexed = "00".repeat(31) + "2a";
    assert_eq!(nonce_bytes(&hexed)[31], 42);
    assert_eq!(nonce_bytes(&hexed)[..31], [0u8; 31]);
    use sha2::{Digest, Sha256};
    let hashed: [u8; 32] = Sha256::digest(b"abc-123").into();
    assert_eq!(nonce_bytes("abc-123"), hashed);
    // 64 characters that are not hex are hashed too.
    let not_hex = "g".repeat(64);
    assert_eq!(
        nonce_bytes(&not_hex),
        <[u8; 32]>::from(Sha256::digest(not_hex.as_bytes()))
    );
    assert!(valid_nonce("abc-123") && valid_nonce(&hexed));
    assert!(!valid_nonce("") && !valid_nonce("a b") && !valid_nonce(&"a".repeat(129)));
}

#[test]
fn report_data_is_found_at_offset_568_of_a_v4_quote() {
    let rd = [0x5au8; 64];
    let q = v4_quote(&rd);
    assert_eq!(tdx_report_data(&q), Some(rd));
    // Not TDX, too short, or another version: not read.
    let mut sev = q.clone();
    sev[4] = 0;
    assert_eq!(tdx_report_data(&sev), None);
    assert_eq!(tdx_report_data(&q[..600]), None);
    let mut v3 = q.clone();
    v3[0] = 3;
    assert_eq!(tdx_report_data(&v3), None);
    assert_eq!(tdx_report_data(&[]), None);
}

#[test]
fn gpu_output_is_a_payload_for_our_nonce_or_a_list_we_wrap() {
    let n = "ab".repeat(32);
    let wrapped = nvidia_payload(r#"[{"certificate":"c","evidence":"e"}]"#, &n).unwrap();
    let v: Value = serde_json::from_str(&wrapped).unwrap();
    assert_eq!(v["nonce"], n.as_str());
    assert_eq!(v["evidence_list"][0]["evidence"], "e");
    assert_eq!(v["arch"], "HOPPER");
    let own = format!(
        r#"{{"nonce":"{}","evidence_list":[],"arch":"BLACKWELL"}}"#,
        n.to_uppercase()
    );
    let kept: Value = serde_json::from_str(&nvidia_payload(&own, &n).unwrap()).unwrap();
    assert_eq!(kept["arch"], "BLACKWELL");
    let other = r#"{"nonce":"00","evidence_list":[]}"#;
    assert!(nvidia_payload(other, &n)
        .unwrap_err()
        .contains("not for this nonce"));
    assert!(nvidia_payload("not json", &n).is_err());
    assert!(nvidia_payload("42", &n).is_err());
}

fn quoted(quote: String) -> TeeEvidence {
    TeeEvidence::Quote {
        source: "configfs-tsm",
        quote,
        event_log: Value::Null,
        provider: Some("tdx_guest".into()),
        info: Map::new(),
    }
}

#[test]
fn an_entry_has_near_ai_fields_and_the_signed_statement() {
    let s = signer();
    let nonce = "cd".repeat(32);
    let rd = report_data(&s.address, &nonce_bytes(&nonce)).unwrap();
    let tee = quoted(hex::encode(v4_quote(&rd)));
    let gpu = GpuEvidence::Payload(r#"{"nonce":"x"}"#.into());
    let e = entry(&EntryInput {
        signer: &s,
        algo: Algo::Ecdsa,
        nonce: &nonce,
        model: Some("m"),
        report_data: &rd,
        tee: &tee,
        gpu: &gpu,
    });
    assert_eq!(e["signing_address"], s.address.as_str());
    assert_eq!(e["signing_algo"], "ecdsa");
    assert_eq!(e["signing_public_key"].as_str().unwrap().len(), 128);
    assert_eq!(e["request_nonce"], nonce.as_str());
    assert_eq!(e["model_name"], "m");
    assert_eq!(e["report_data"], hex::encode(rd).as_str());
    assert_eq!(e["nvidia_payload"], r#"{"nonce":"x"}"#);
    assert_eq!(e["info"]["tee_provider"], "tdx_guest");
    assert_eq!(e["tee"]["present"], true);
    assert_eq!(e["tee"]["report_data_matches"], true);
    assert_eq!(e["statement"], statement(&s, &nonce).as_str());
    assert_eq!(e["signatures"]["ecdsa"].as_str().unwrap().len(), 132);
    // For ed25519 the address is the public key.
    let e = entry(&EntryInput {
        algo: Algo::Ed25519,
        tee: &TeeEvidence::Absent,
        gpu: &GpuEvidence::Absent,
        ..EntryInput {
            signer: &s,
            algo: Algo::Ecdsa,
            nonce: &nonce,
            model: None,
            report_data: &rd,
            tee: &tee,
            gpu: &gpu,
        }
    });
    assert_eq!(e["signing_address"], s.ed25519_public.as_str());
    assert_eq!(e["intel_quote"], Value::Null);
    assert_eq!(e["nvidia_payload"], Value::Null);
    assert_eq!(e["tee"]["present"], false);
    assert!(e["tee"]["message"].as_str().unwrap().contains("No TEE"));
}

#[test]
fn a_quote_for_other_report_data_is_flagged() {
    let s = signer();
    let rd = report_data(&s.address, &[1; 32]).unwrap();
    let tee = quoted(hex::encode(v4_quote(&[0; 64])));
    let e = entry(&EntryInput {
        signer: &s,
        algo: Algo::Ecdsa,
        nonce: "n",
        model: None,
        report_data: &rd,
        tee: &tee,
        gpu: &GpuEvidence::Absent,
    });
    assert_eq!(e["tee"]["report_data_matches"], false);
    let e = entry(&EntryInput {
        tee: &quoted("not-hex".into()),
        ..EntryInput {
            signer: &s,
            algo: Algo::Ecdsa,
            nonce: "n",
            model: None,
            report_data: &rd,
            tee: &tee,
            gpu: &GpuEvidence::Absent,
        }
    });
    assert_eq!(e["tee"]["report_data_matches"], Value::Null);
}

#[test]
fn the_report_lists_every_entry_and_the_gateway() {
    let a = json!({"signing_address": "0xAA", "x": 1});
    let b = json!({"signing_address": "0xbb", "x": 2});
    assert!(is_for(&a, "0xaa") && !is_for(&a, "0xbb") && !is_for(&json!({}), "0xaa"));
    let r = assemble(
        &b,
        Some(&a),
        &[a.clone(), b.clone()],
        &[("http://c".into(), "down".into())],
    );
    assert_eq!(r["x"], 2);
    assert_eq!(r["gateway_attestation"]["x"], 1);
    assert_eq!(r["model_attestations"].as_array().unwrap().len(), 2);
    assert_eq!(r["all_attestations"], r["model_attestations"]);
    assert_eq!(r["unreachable"][0]["sidecar"], "http://c");
    let r = assemble(&a, None, std::slice::from_ref(&a), &[]);
    assert!(r.get("unreachable").is_none() && r.get("gateway_attestation").is_none());
}

#[test]
fn quote_output_is_plain_or_dstack_style_json() {
    let (q, log, info) = parse_quote_output("  abcd\n").unwrap();
    assert_eq!((q.as_str(), log, info.len()), ("abcd", Value::Null, 0));
    let out = r#"{"quote":"0400","event_log":"[{\"imr\":0}]","info":{"app_id":"x"}}"#;
    let (q, log, info) = parse_quote_output(out).unwrap();
    assert_eq!(q, "0400");
    assert_eq!(log[0]["imr"], 0);
    assert_eq!(info["app_id"], "x");
    let (q, _, _) = parse_quote_output(r#"{"intel_quote":"04"}"#).unwrap();
    assert_eq!(q, "04");
    assert!(parse_quote_output("").is_err());
    assert!(parse_quote_output("{}").is_err());
    assert!(parse_quote_output("{not json").is_err());
}
