"""Cross-replica routing with the openai SDK: several sidecars with one config,
each next to its own simulator. Follow-ups with previous_response_id reach the
backend that holds the conversation whichever sidecar they hit, and a
signature fetched from any sidecar verifies against the bytes received."""
import hashlib
import socket

import httpx2 as httpx  # the HTTP library the openai SDK itself uses
import pytest
from openai import OpenAI

from conftest import KEY, OTHER_KEY, gateway_config, start_sidecar, start_sim
from test_attestation import Recording, verify_ecdsa, verify_ed25519


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replicas(sims, count):
    """`count` sidecars that know each other's URLs, so their ports are
    picked before they start; a port taken meanwhile by another process makes
    a sidecar exit, and the whole set is started again on fresh ports."""
    for attempt in range(3):
        ports = [free_port() for _ in range(count)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        config = gateway_config([s.url for s in sims], sidecars=urls[: len(sims)])
        started = []
        try:
            for i in range(count):
                started.append(start_sidecar(
                    config, ["--self-url", urls[i]], listen=f"127.0.0.1:{ports[i]}"))
            return started
        except RuntimeError:
            for p in started:
                p.stop()
            if attempt == 2:
                raise


@pytest.fixture(scope="module")
def two():
    sims = [start_sim(f"sim-{i}") for i in range(2)]
    sidecars = start_replicas(sims, 2)
    yield sims, sidecars
    for p in sims + sidecars:
        p.stop()


def client_for(sidecar, transport=None, key=KEY):
    http = httpx.Client(transport=transport) if transport else None
    return OpenAI(base_url=sidecar.url + "/v1", api_key=key, max_retries=0, http_client=http)


def test_another_key_cannot_continue_a_conversation_from_any_sidecar(two):
    import openai

    sims, (a, b) = two
    first = client_for(a).responses.create(model="m", input="my secret plans")
    def upstream_requests():
        return [httpx.get(s.url + "/sim/stats").json()["requests"] for s in sims]

    before = upstream_requests()
    for via in (a, b):
        with pytest.raises(openai.NotFoundError) as stolen:
            client_for(via, key=OTHER_KEY).responses.create(
                model="m", input="what did I say?", previous_response_id=first.id)
        with pytest.raises(openai.NotFoundError) as unknown:
            client_for(via, key=OTHER_KEY).responses.create(
                model="m", input="what did I say?", previous_response_id="resp_unknown")
        assert stolen.value.body["message"] == unknown.value.body["message"].replace(
            "resp_unknown", first.id)
    assert upstream_requests() == before, "no upstream saw the stolen conversation"
    # The owner still continues it.
    assert client_for(b).responses.create(
        model="m", input="go on", previous_response_id=first.id).previous_response_id == first.id


def test_follow_ups_reach_the_owner_from_any_sidecar(two):
    _, (a, b) = two
    first = client_for(a).responses.create(model="m", input="start a conversation")
    assert first.status == "completed"
    previous = first.id
    for i in range(6):
        via = (a, b)[i % 2]
        if i % 3 == 2:
            events = list(client_for(via).responses.create(
                model="m", input="and then?", previous_response_id=previous, stream=True))
            assert events[0].type == "response.created"
            assert events[-1].type == "response.completed"
            previous = events[-1].response.id
        else:
            r = client_for(via).responses.create(
                model="m", input="and then?", previous_response_id=previous)
            assert r.previous_response_id == previous
            previous = r.id


def test_responses_get_and_delete_go_to_the_owner(two):
    _, (a, b) = two
    r = client_for(a).responses.create(model="m", input="keep me")
    got = client_for(b).responses.retrieve(r.id)
    assert got.id == r.id
    client_for(b).responses.delete(r.id)
    with pytest.raises(Exception):
        client_for(a).responses.retrieve(r.id)


def test_unknown_previous_response_id_is_a_clean_404(two):
    _, (a, _) = two
    import openai

    with pytest.raises(openai.NotFoundError):
        client_for(a).responses.create(model="m", input="x", previous_response_id="resp_nope")


def test_signature_from_any_of_three_sidecars_verifies():
    sims = [start_sim(f"sim-{i}") for i in range(2)]
    sidecars = start_replicas(sims, 3)
    try:
        rec = Recording()
        # The third sidecar has no model of its own: it forwards every request.
        stream = client_for(sidecars[2], rec).chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "forward me"}])
        ids = {c.id for c in stream}
        answer_id = ids.pop()
        text = (hashlib.sha256(rec.sent[-1]).hexdigest() + ":"
                + hashlib.sha256(b"".join(rec.received[-1])).hexdigest())
        signers = set()
        for s in sidecars:
            for algo, verify in (("ecdsa", verify_ecdsa), ("ed25519", verify_ed25519)):
                r = httpx.get(f"{s.url}/v1/signature/{answer_id}", params={"signing_algo": algo},
                              headers={"Authorization": f"Bearer {KEY}"})
                assert r.status_code == 200, r.text
                sig = r.json()
                assert sig["text"] == text
                assert verify(sig["text"], sig["signature"], sig["signing_address"])
                if algo == "ecdsa":
                    signers.add(sig["signing_address"])
        # One signer: the sidecar next to the model, not the forwarder.
        assert len(signers) == 1
        report = httpx.get(f"{sidecars[2].url}/v1/attestation/report",
                           headers={"Authorization": f"Bearer {KEY}"}).json()
        assert report["signing_address"] not in signers
    finally:
        for p in sims + sidecars:
            p.stop()
