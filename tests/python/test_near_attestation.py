"""The NEAR AI verifier's steps (nearai-cloud-verifier, chat_verifier.py and
model_verifier.py) against two peered sidecars, each with a fake
configfs-tsm tree: answers made with the openai SDK, signatures fetched with
NEAR's `model` query, the report fetched WITHOUT an API key, the right pod's
entry found by `signing_address`, and the quote's report data parsed with
the standard library (`struct`) to check that it binds that pod's key and
the verifier's nonce (docs/attestation.md, "For NEAR AI verifiers")."""
import hashlib
import json
import secrets
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import httpx2 as httpx  # the HTTP library the openai SDK itself uses
import pytest
from openai import OpenAI

from conftest import KEY, gateway_config, start_sidecar, start_sim
from test_attestation import Recording, verify_ecdsa, verify_ed25519
from test_replicas import free_port

GPU_COMMAND = "echo '[{\"arch\":\"HOPPER\",\"evidence\":\"fake-'$INFERGATE_NONCE_HEX'\"}]'"


def tdx_v4_quote(report_data):
    """A TDX quote v4 as the kernel's outblob: a 48-byte header (version 4,
    ECDSA-256 key type 2, TEE type 0x81), the 584-byte TD report body whose
    last 64 bytes are the report data, then a signature section."""
    header = struct.pack("<HHI", 4, 2, 0x81) + bytes(40)
    body = bytes(520) + report_data
    return header + body + struct.pack("<I", 8) + b"\xa5" * 8


class FakeTsm:
    """A configfs-tsm report root in a temp dir that answers like the
    kernel's: an entry whose `inblob` holds 64 bytes gets `provider` and an
    `outblob` (by rename, so never read half-written)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="infergate-tsm-"))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.002):
            for entry in self.root.iterdir():
                try:
                    inblob = (entry / "inblob").read_bytes()
                except OSError:
                    continue
                if len(inblob) == 64 and not (entry / "outblob").exists():
                    (entry / "provider").write_text("tdx_guest\n")
                    (entry / "outblob.tmp").write_bytes(tdx_v4_quote(inblob))
                    (entry / "outblob.tmp").rename(entry / "outblob")

    def close(self):
        self.stop.set()
        self.thread.join()
        shutil.rmtree(self.root, ignore_errors=True)


def report_data_of(quote_hex):
    """The report data of a TDX v4 quote, read with `struct` only."""
    quote = bytes.fromhex(quote_hex)
    version, _key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    assert (version, tee_type) == (4, 0x81), "not a TDX v4 quote"
    header_len, report_data_in_body = 48, 520
    start = header_len + report_data_in_body
    assert start == 568
    return quote[start:start + 64]


@pytest.fixture(scope="module")
def pods():
    """Two sidecars, each next to its own simulator and with its own TEE,
    public reports on; model `m` is served by both."""
    sims = [start_sim(f"near-sim-{i}") for i in range(2)]
    tsms = [FakeTsm(), FakeTsm()]
    for attempt in range(3):
        ports = [free_port() for _ in range(2)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        config = gateway_config([s.url for s in sims], sidecars=urls)
        started = []
        try:
            for i in range(2):
                started.append(start_sidecar(config, [
                    "--self-url", urls[i], "--public-attestation",
                    "--tee-configfs-tsm", str(tsms[i].root),
                    "--gpu-evidence-command", GPU_COMMAND,
                ], listen=f"127.0.0.1:{ports[i]}"))
            break
        except RuntimeError:
            for p in started:
                p.stop()
            if attempt == 2:
                raise
    yield started
    for p in sims + started:
        p.stop()
    for t in tsms:
        t.close()


def check_report_data(attestation, nonce):
    """NEAR AI's check: report_data[0:32] is the signing address padded with
    zeros, report_data[32:64] the raw 32-byte nonce."""
    report_data = report_data_of(attestation["intel_quote"])
    address = bytes.fromhex(attestation["signing_address"].removeprefix("0x"))
    return {
        "binds_address": report_data[:32] == address.ljust(32, b"\0"),
        "embeds_nonce": report_data[32:64] == bytes.fromhex(nonce),
    }


def test_a_near_ai_verifier_finds_and_checks_the_pod_that_signed(pods):
    rec = Recording()
    client = OpenAI(base_url=pods[0].url + "/v1", api_key=KEY, max_retries=0,
                    http_client=httpx.Client(transport=rec))
    signers = set()
    # Round-robin over b0 and b1: answers from both pods, all through pod 0.
    for i in range(4):
        stream = client.chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": f"hello {i}"}])
        answer_id = {chunk.id for chunk in stream}.pop()
        request_hash = hashlib.sha256(rec.sent[-1]).hexdigest()
        response_hash = hashlib.sha256(b"".join(rec.received[-1])).hexdigest()
        # chat_verifier.fetch_signature: with the key, and NEAR's model query.
        sig = httpx.get(f"{pods[0].url}/v1/signature/{answer_id}",
                        params={"model": "m", "signing_algo": "ecdsa"},
                        headers={"Authorization": f"Bearer {KEY}"}).json()
        assert sig["text"] == f"{request_hash}:{response_hash}"
        assert verify_ecdsa(sig["text"], sig["signature"], sig["signing_address"])
        signing_address = sig["signing_address"]
        signers.add(signing_address)
        # chat_verifier.fetch_attestation_for: NO key, a 32-byte hex nonce.
        nonce = secrets.token_hex(32)
        report = httpx.get(f"{pods[0].url}/v1/attestation/report", params={
            "model": "m", "nonce": nonce, "signing_algo": "ecdsa",
            "signing_address": signing_address}).json()
        attestation = next(item for item in report["model_attestations"]
                           if item["signing_address"].lower() == signing_address.lower())
        assert attestation["request_nonce"] == nonce
        assert check_report_data(attestation, nonce) == {"binds_address": True, "embeds_nonce": True}
        # model_verifier.check_gpu, up to the NRAS call: the payload's nonce.
        payload = json.loads(attestation["nvidia_payload"])
        assert payload["nonce"].lower() == nonce
        assert payload["evidence_list"][0]["evidence"] == f"fake-{nonce}"
        # infergate's own statement rides alongside, signed by both keys.
        assert f"nonce={nonce}" in attestation["statement"]
        assert verify_ecdsa(attestation["statement"], attestation["signatures"]["ecdsa"], signing_address)
        assert verify_ed25519(attestation["statement"], attestation["signatures"]["ed25519"],
                              attestation["ed25519_public_key"])
    assert len(signers) == 2, "both pods signed answers"


def test_the_whole_model_report_lists_every_pod_from_either_sidecar(pods):
    nonce = secrets.token_hex(32)
    seen = []
    for pod in pods:
        report = httpx.get(f"{pod.url}/v1/attestation/report",
                           params={"model": "m", "nonce": nonce}).json()
        entries = report["model_attestations"]
        assert len(entries) == 2 and report["all_attestations"] == entries
        for e in entries:
            assert check_report_data(e, nonce) == {"binds_address": True, "embeds_nonce": True}
            assert e["info"]["tee_provider"] == "tdx_guest"
        seen.append(sorted(e["signing_address"] for e in entries))
        # The sidecar that answered is on top and is the gateway attestation.
        assert report["gateway_attestation"]["signing_address"] == report["signing_address"]
    assert seen[0] == seen[1]


def test_ed25519_reports_bind_the_public_key(pods):
    nonce = secrets.token_hex(32)
    report = httpx.get(f"{pods[1].url}/v1/attestation/report",
                       params={"nonce": nonce, "signing_algo": "ed25519"}).json()
    assert report["signing_algo"] == "ed25519"
    assert report["signing_address"] == report["ed25519_public_key"]
    rd = report_data_of(report["intel_quote"])
    assert rd == bytes.fromhex(report["signing_address"]) + bytes.fromhex(nonce)


def test_an_unknown_signing_address_is_a_404_json_error(pods):
    r = httpx.get(f"{pods[0].url}/v1/attestation/report", params={
        "model": "m", "nonce": secrets.token_hex(32), "signing_address": "0x" + "ab" * 20})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
