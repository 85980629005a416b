"""The official openai SDK against the gateway, as an application team uses it."""
import openai
import pytest

from conftest import KEY, UPSTREAM


def test_chat_non_streaming(client):
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello there"}]
    )
    assert r.object == "chat.completion"
    assert r.model == UPSTREAM
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.split()
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 0


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="alias",
        messages=[{"role": "user", "content": "tell me more"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 8
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["m"]


def test_errors_surface_as_sdk_exceptions(stack):
    from openai import OpenAI

    bad = OpenAI(base_url=stack.url + "/v1", api_key="ig-wrong-key-0000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        good.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"


def test_config_file_is_hot_reloaded_and_bad_edits_are_refused():
    import time

    import httpx2 as httpx
    from openai import OpenAI

    from conftest import ADMIN_TOKEN, gateway_config, start_sidecar, start_sim

    sim = start_sim("sim-reload")
    gw = start_sidecar(gateway_config([sim.url]))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def version():
        return httpx.get(gw.admin_url + "/admin/v1/config", headers=admin).json()["version"]

    def wait_for(cond):
        deadline = time.time() + 10
        while time.time() < deadline:
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError("not reached")

    try:
        client = OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
        before = version()
        config = gw.dir / "config.yaml"
        config.write_text(config.read_text().replace("aliases: [alias]", "aliases: [alias, fresh]"))
        wait_for(lambda: version() != before)
        r = client.chat.completions.create(model="fresh", messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content
        good = version()
        config.write_text("models: [this is not a config")
        time.sleep(2.5)
        assert version() == good
        client.chat.completions.create(model="fresh", messages=[{"role": "user", "content": "x"}])
    finally:
        gw.stop()
        sim.stop()
