"""Fixtures: real vllm-sim and infergate-sidecar processes on 127.0.0.1:0.

The binaries come from target/ (scripts/test builds them first); set
INFERGATE_BIN_DIR to use others.
"""
import hashlib
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("INFERGATE_BIN_DIR", ROOT / "target" / "debug"))
KEY = "ig-python-test-key-0001"
OTHER_KEY = "ig-python-test-key-0002"
PEER_SECRET = "python-peer-secret"
ADMIN_TOKEN = "python-admin-token"
UPSTREAM = "org/model-7b"


class Proc:
    def __init__(self, args, pattern):
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{args[0]} exited before listening")
            m = re.search(pattern, line)
            if m:
                self.match = m
                return
        raise RuntimeError(f"{args[0]} did not start in time")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_sim(sim_id, tokens=8, delay_ms=0):
    p = Proc(
        [str(BIN / "vllm-sim"), "--listen", "127.0.0.1:0", "--id", sim_id,
         "--model", UPSTREAM, "--tokens", str(tokens), "--delay-ms", str(delay_ms)],
        r"listening on (http://\S+)",
    )
    p.url = p.match.group(1)
    return p


def gateway_config(backend_urls, sidecars=None):
    key_hash = hashlib.sha256(KEY.encode()).hexdigest()
    other_hash = hashlib.sha256(OTHER_KEY.encode()).hexdigest()
    lines = ["keys:", f'  - {{ id: py, sha256: "{key_hash}" }}',
             f'  - {{ id: py-other, sha256: "{other_hash}" }}', "backends:"]
    for i, url in enumerate(backend_urls):
        extra = f", sidecar: \"{sidecars[i]}\"" if sidecars and sidecars[i] else ""
        lines.append(f'  - {{ id: b{i}, url: "{url}"{extra} }}')
    targets = ", ".join(
        f"{{ backend: b{i}, upstreamModel: {UPSTREAM} }}" for i in range(len(backend_urls))
    )
    lines += ["models:", "  - name: m", "    aliases: [alias]", f"    targets: [{targets}]"]
    return "\n".join(lines) + "\n"


def start_sidecar(config_text, extra_args=(), listen="127.0.0.1:0"):
    d = Path(tempfile.mkdtemp(prefix="infergate-py-"))
    (d / "config.yaml").write_text(config_text)
    (d / "admin-token").write_text(ADMIN_TOKEN)
    (d / "peer-secret").write_text(PEER_SECRET)
    p = Proc(
        [str(BIN / "infergate-sidecar"), "--config", str(d / "config.yaml"),
         "--listen", listen, "--admin-listen", "127.0.0.1:0",
         "--admin-token-file", str(d / "admin-token"),
         "--peer-secret-file", str(d / "peer-secret"), *extra_args],
        r"public=(http://\S+) admin=(http://\S+)",
    )
    p.url, p.admin_url = p.match.group(1), p.match.group(2)
    p.dir = d
    return p


@pytest.fixture(scope="module")
def stack():
    sims = [start_sim("sim-a"), start_sim("sim-b")]
    gw = start_sidecar(gateway_config([s.url for s in sims]))
    yield gw
    gw.stop()
    for s in sims:
        s.stop()


@pytest.fixture
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0)


def real_testbed():
    """The mark for tests that need the real kube-apiserver testbed
    (INFERGATE_TESTBED, with KUBECTL and INFERGATE_HELM from
    scripts/k8s-testbed env): they run when it is there, fail when
    INFERGATE_KUBE_TESTS=1 demands it (scripts/test), and are skipped with a
    loud reason otherwise (pytest -rs prints it)."""
    missing = [v for v in ("INFERGATE_TESTBED", "KUBECTL", "INFERGATE_HELM") if not os.environ.get(v)]
    if missing and os.environ.get("INFERGATE_KUBE_TESTS") == "1":
        raise RuntimeError(f"INFERGATE_KUBE_TESTS=1 but {', '.join(missing)} unset")
    return pytest.mark.skipif(
        bool(missing),
        reason=f"SKIPPED: no real kube-apiserver testbed ({', '.join(missing)} unset); scripts/test runs these",
    )
