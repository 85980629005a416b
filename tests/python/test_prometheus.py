"""A real Prometheus (Debian's package) scrapes a running sidecar; the
counter it stores, read back through its HTTP API, matches the traffic."""
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
from openai import OpenAI

from conftest import KEY, gateway_config, start_sidecar, start_sim


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_scrapes_the_request_counter():
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed (scripts/test installs Debian's package)"
    sim = start_sim("sim-prom")
    gw = start_sidecar(gateway_config([sim.url]))
    d = Path(tempfile.mkdtemp(prefix="infergate-prom-"))
    target = gw.admin_url.removeprefix("http://")
    (d / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: infergate\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    prom = subprocess.Popen(
        [prometheus, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "count me"}])
        query = 'sum(infergate_requests_total{job="infergate",status="2xx"})'
        deadline = time.time() + 60
        value = None
        while time.time() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query})
                result = r.json()["data"]["result"]
                if result:
                    value = float(result[0]["value"][1])
                    if value == 3:
                        break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        assert value == 3, f"prometheus saw {value}"
    finally:
        prom.terminate()
        prom.wait(10)
        gw.stop()
        sim.stop()
