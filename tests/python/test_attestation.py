"""Verify infergate's signatures the way an auditor would: with independent
libraries (eth-account for Ethereum personal-sign ECDSA, PyNaCl for Ed25519)
over the exact bytes the openai SDK sent and received."""
import hashlib
import secrets

import httpx2 as httpx  # the HTTP library the openai SDK itself uses
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from openai import OpenAI

from conftest import KEY


class Recording(httpx.HTTPTransport):
    """Keeps the request body and every response byte, as the SDK saw them."""

    def __init__(self):
        super().__init__()
        self.sent = []
        self.received = []

    def handle_request(self, request):
        self.sent.append(request.read())
        response = super().handle_request(request)
        chunks = []
        self.received.append(chunks)
        inner = response.stream

        class Tee(httpx.SyncByteStream):
            def __iter__(self):
                for chunk in inner:
                    chunks.append(chunk)
                    yield chunk

            def close(self):
                inner.close()

        response.stream = Tee()
        return response


def get(stack, path, **params):
    r = httpx.get(stack.url + path, params=params, headers={"Authorization": f"Bearer {KEY}"})
    return r


def verify_ecdsa(text, signature, address):
    return Account.recover_message(encode_defunct(text=text), signature=signature).lower() == address.lower()


def verify_ed25519(text, signature, public_key):
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(text.encode(), bytes.fromhex(signature))
        return True
    except BadSignatureError:
        return False


@pytest.fixture
def recorded(stack):
    rec = Recording()
    client = OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0,
                    http_client=httpx.Client(transport=rec))
    return client, rec


def test_streamed_answer_verifies_with_both_algorithms(stack, recorded):
    client, rec = recorded
    stream = client.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "sign this please"}]
    )
    ids = {chunk.id for chunk in stream}
    assert len(ids) == 1
    answer_id = ids.pop()
    request_hash = hashlib.sha256(rec.sent[-1]).hexdigest()
    response_bytes = b"".join(rec.received[-1])
    assert response_bytes.endswith(b"data: [DONE]\n\n")
    response_hash = hashlib.sha256(response_bytes).hexdigest()

    report = get(stack, "/v1/attestation/report", nonce="n1").json()
    for algo, verify, who in [
        ("ecdsa", verify_ecdsa, report["signing_address"]),
        ("ed25519", verify_ed25519, report["ed25519_public_key"]),
    ]:
        # Asked right after [DONE]: the record must already be there.
        sig = get(stack, f"/v1/signature/{answer_id}", signing_algo=algo).json()
        assert sig["signing_algo"] == algo
        assert sig["signing_address"] == who
        assert sig["text"] == f"{request_hash}:{response_hash}"
        assert verify(sig["text"], sig["signature"], who)

        # One changed byte in the response or the request: verification fails.
        tampered = bytearray(response_bytes)
        tampered[len(tampered) // 2] ^= 0x01
        text = f"{request_hash}:{hashlib.sha256(bytes(tampered)).hexdigest()}"
        assert not verify(text, sig["signature"], who)
        tampered_req = bytearray(rec.sent[-1])
        tampered_req[5] ^= 0x01
        text = f"{hashlib.sha256(bytes(tampered_req)).hexdigest()}:{response_hash}"
        assert not verify(text, sig["signature"], who)


def test_non_streamed_answer_verifies(stack, recorded):
    client, rec = recorded
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    sig = get(stack, f"/v1/signature/{r.id}").json()
    expected = f"{hashlib.sha256(rec.sent[-1]).hexdigest()}:{hashlib.sha256(b''.join(rec.received[-1])).hexdigest()}"
    assert sig["text"] == expected
    assert verify_ecdsa(sig["text"], sig["signature"], sig["signing_address"])


def test_report_signs_the_callers_nonce(stack):
    nonce = secrets.token_hex(16)
    report = get(stack, "/v1/attestation/report", nonce=nonce).json()
    assert report["nonce"] == nonce
    assert f"nonce={nonce}" in report["statement"]
    assert verify_ecdsa(report["statement"], report["signatures"]["ecdsa"], report["signing_address"])
    assert verify_ed25519(report["statement"], report["signatures"]["ed25519"], report["ed25519_public_key"])
    assert report["tee"]["present"] is False
    assert "No TEE" in report["tee"]["message"]


def test_unknown_ids_and_bad_ids(stack):
    assert get(stack, "/v1/signature/chatcmpl-does-not-exist").status_code == 404
    assert get(stack, "/v1/signature/..%2F..%2Fetc").status_code in (400, 404)
    r = get(stack, "/v1/signature/abc", signing_algo="rsa")
    assert r.status_code == 400


def test_responses_stream_verifies(stack, recorded):
    client, rec = recorded
    events = list(client.responses.create(model="m", input="sign the typed events", stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    received = b"".join(rec.received[-1])
    assert received.rstrip().endswith(b"}")
    sig = get(stack, f"/v1/signature/{events[0].response.id}").json()
    text = f"{hashlib.sha256(rec.sent[-1]).hexdigest()}:{hashlib.sha256(received).hexdigest()}"
    assert sig["text"] == text
    assert verify_ecdsa(text, sig["signature"], sig["signing_address"])


def test_keys_come_from_mounted_files(tmp_path):
    import nacl.signing

    from conftest import gateway_config, start_sidecar, start_sim

    ecdsa, ed = secrets.token_hex(32), secrets.token_hex(32)
    (tmp_path / "ecdsa").write_text(ecdsa + "\n")
    (tmp_path / "ed25519").write_text(ed)
    sim = start_sim("sim-k")
    gw = start_sidecar(gateway_config([sim.url]), [
        "--ecdsa-key-file", str(tmp_path / "ecdsa"), "--ed25519-key-file", str(tmp_path / "ed25519")])
    try:
        report = get(gw, "/v1/attestation/report", nonce="k").json()
        assert report["signing_address"] == Account.from_key(bytes.fromhex(ecdsa)).address.lower()
        expected_pub = nacl.signing.SigningKey(bytes.fromhex(ed)).verify_key.encode().hex()
        assert report["ed25519_public_key"] == expected_pub
    finally:
        gw.stop()
        sim.stop()
