#!/usr/bin/env python3
"""Answer records end to end: the sidecar binary's RSS as its record store
fills and turns over, and whether the newest answers keep their record.

Starts `vllm-sim` and `infergate-sidecar` (release builds) on loopback,
sends TOTAL non-streaming chat requests on 8 keep-alive connections
(standard library only), and prints one JSON line: the sidecar's RSS after
each quarter of the load; how many of 100 answers made after it have
their signature right away; and how many of 100 more answers, not asked
about until then, still have theirs a second (and 2000 requests) later.
Run it once with a small capacity and once with the default one: the RSS
difference over the difference in records held is what a record costs in
the real process.

Usage: benches/records-e2e.py BIN_DIR CAPACITY TOTAL [SIDECAR_BINARY]
  (CAPACITY 0: pass no --records-capacity, for a binary that has none)
"""

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time

BIN, CAP, TOTAL = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SIDECAR = sys.argv[4] if len(sys.argv) > 4 else os.path.join(BIN, "infergate-sidecar")
KEY = "ig-e2e-0123456789abcdef"
SIM_PORT, PORT, ADMIN_PORT = 18001, 18080, 19090
BACKEND = "inference/llama-3-1-8b/10.42.0.17"
AUTH = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there, how are you?"}]})


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(n):
    c = http.client.HTTPConnection("127.0.0.1", PORT)
    for _ in range(n):
        c.request("POST", "/v1/chat/completions", BODY, AUTH)
        r = c.getresponse()
        data = r.read()
        assert r.status == 200, (r.status, data)


def load(n, threads=8):
    ts = [threading.Thread(target=worker, args=(n // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def answer(c):
    c.request("POST", "/v1/chat/completions", BODY, AUTH)
    return json.loads(c.getresponse().read())["id"]


def signature_status(c, rid):
    c.request("GET", f"/v1/signature/{rid}", headers=AUTH)
    r = c.getresponse()
    r.read()
    return r.status


def main():
    cfg = os.path.join(BIN, "records-e2e.yaml")
    with open(cfg, "w") as f:
        f.write(
            f"keys:\n  - {{ id: team-search-prod-01, sha256: \"{hashlib.sha256(KEY.encode()).hexdigest()}\", models: [\"*\"] }}\n"
            f"backends:\n  - {{ id: {BACKEND}, url: \"http://127.0.0.1:{SIM_PORT}\" }}\n"
            f"models:\n  - {{ name: m, targets: [{{ backend: {BACKEND}, upstreamModel: sim-model }}] }}\n"
        )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    sim = subprocess.Popen([os.path.join(BIN, "vllm-sim"), "--listen", f"127.0.0.1:{SIM_PORT}"], **quiet)
    args = [SIDECAR, "--config", cfg, "--listen", f"127.0.0.1:{PORT}", "--admin-listen", f"127.0.0.1:{ADMIN_PORT}"]
    if CAP:
        args += ["--records-capacity", str(CAP)]
    sidecar = subprocess.Popen(args, env=dict(os.environ, RUST_LOG="warn"), **quiet)
    try:
        time.sleep(1.5)
        started = time.time()
        marks = []
        for _ in range(4):
            load(TOTAL // 4)
            time.sleep(0.5)
            marks.append(rss(sidecar.pid))
        c = http.client.HTTPConnection("127.0.0.1", PORT)
        now, later = {}, {}
        for _ in range(100):
            s = signature_status(c, answer(c))
            now[s] = now.get(s, 0) + 1
        # Answers nobody asked about yet (an auditor samples them later).
        rids = [answer(c) for _ in range(100)]
        load(2000)
        time.sleep(1)
        for rid in rids:
            s = signature_status(c, rid)
            later[s] = later.get(s, 0) + 1
        print(json.dumps({
            "capacity": CAP or "default",
            "requests": TOTAL + 2200,
            "seconds": round(time.time() - started, 1),
            "rss_after_each_quarter": marks,
            "signature_right_after": now,
            "signature_a_second_later": later,
        }))
    finally:
        sidecar.kill()
        sim.kill()


if __name__ == "__main__":
    main()
