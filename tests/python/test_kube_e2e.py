"""End to end as a platform team and an application team use it.

A real kube-apiserver (the running testbed INFERGATE_TESTBED names;
scripts/test starts it), the generated CRDs and the README's example
manifests applied with kubectl, the operator running as the chart's
ServiceAccount, and two "pods", each a network namespace with its own
address (tests/python/podnet.py) running a vllm-sim with an
infergate-sidecar beside it (no kubelet here, so the test writes the Pod
and EndpointSlice objects a kubelet and the endpoint controller would).
Then the openai SDK streams through a sidecar, the signature verifies, a
route change applied with kubectl reaches both sidecars, and
`kubectl get modelroutes` shows the route programmed on both.
"""
import hashlib
import json
import os
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from nacl.signing import SigningKey
from openai import OpenAI

from conftest import BIN, ROOT, Proc, real_testbed
from podnet import PodNet

NS = "e2e"
TOKEN = "e2e-admin-token-0123456789abcdef"
UPSTREAM = "meta-llama/Llama-3.1-8B-Instruct"
KUBECTL = os.environ.get("KUBECTL")
HELM = os.environ.get("INFERGATE_HELM")
# The chart's names for a release `ig` (its ServiceAccount; the operator's
# Role grants its ConfigMap and Lease by these default names).
OPERATOR_SA = "ig-infergate-operator"
OPERATOR_USER = f"system:serviceaccount:{NS}:{OPERATOR_SA}"

pytestmark = real_testbed()


def example_key():
    text = (ROOT / "examples" / "api-key.yaml").read_text()
    return re.search(r"^\s+key:\s*(\S+)", text, re.M).group(1)


class Cluster:
    def __init__(self, tmp):
        self.tmp = tmp
        self.kubeconfig = Path(os.environ["INFERGATE_TESTBED"]) / "kubeconfig"
        self.validate = "--validate=strict"
        self.env = dict(os.environ, KUBECONFIG=str(self.kubeconfig),
                        KUBECACHEDIR=str(tmp / "kubecache"))

    def kubectl(self, *args, stdin=None):
        r = subprocess.run([KUBECTL, *args], env=self.env, input=stdin, text=True,
                           capture_output=True, timeout=60)
        assert r.returncode == 0, f"kubectl {' '.join(args)}:\n{r.stdout}{r.stderr}"
        return r.stdout

    def apply(self, *files, docs=None, ns=None):
        args = ["apply", "--server-side", self.validate] + (["-n", ns] if ns else [])
        for f in files:
            args += ["-f", str(f)]
        if docs is not None:
            args += ["-f", "-"]
        return self.kubectl(*args, stdin=None if docs is None else json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": docs}))

    def operator_kubeconfig(self):
        """The admin kubeconfig impersonating the chart's operator
        ServiceAccount, so the operator runs with exactly the chart's RBAC
        (the API server evaluates it)."""
        text = self.kubeconfig.read_text()
        text, n = re.subn(r"(\n  user:\n)", rf"\1    as: {OPERATOR_USER}\n", text)
        assert n == 1, text
        path = self.tmp / "operator.kubeconfig"
        path.write_text(text)
        return path


def until(what, check, timeout=40):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, AssertionError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def deployment():
    tmp = Path(tempfile.mkdtemp(prefix="infergate-e2e-"))
    cluster = Cluster(tmp)
    procs = []
    net = None
    try:
        cluster.apply(ROOT / "crds")
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        "crd/inferenceproviders.infergate.dev", "crd/modelroutes.infergate.dev")
        cluster.apply(docs=[{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
        # The chart's ServiceAccount, RBAC and (empty) ConfigMap, as
        # `helm install -n e2e` makes them.
        rbac = subprocess.run(
            [HELM, "template", "ig", str(ROOT / "charts" / "infergate"), "--namespace", NS,
             "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml",
             "--show-only", "templates/configmap.yaml"],
            capture_output=True, text=True, check=True).stdout
        (tmp / "rbac.yaml").write_text(rbac)
        cluster.apply(tmp / "rbac.yaml")
        # RBAC is enforced: the operator's account may not read ConfigMaps
        # elsewhere, nor touch another ConfigMap in its own namespace.
        for args in (["get", "configmaps", "-n", "default"],
                     ["get", "configmap", "other", "-n", NS]):
            r = subprocess.run([KUBECTL, "--as", OPERATOR_USER, *args], env=cluster.env,
                               capture_output=True, text=True)
            assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr

        # Signing keys shared by the replicas, as the chart mounts them.
        (tmp / "token").write_text(TOKEN)
        # What the chart mounts from its admin-token Secret (key `peer`).
        (tmp / "peer").write_text(os.urandom(24).hex())
        (tmp / "ecdsa").write_text(os.urandom(32).hex())
        (tmp / "ed25519").write_text(os.urandom(32).hex())

        net = PodNet(2)
        ips = net.addresses
        sidecars = []
        for i, ip in enumerate(ips):
            procs.append(Proc(
                net.run_in(i, [str(BIN / "vllm-sim"), "--listen", f"{ip}:8000", "--id", f"pod-{i}",
                               "--model", UPSTREAM, "--tokens", "12"]),
                r"listening on (http://\S+)",
            ))
            sc = Proc(
                net.run_in(i, [
                    str(BIN / "infergate-sidecar"),
                    "--config", str(tmp / "config.json"),  # absent: the ConfigMap not yet mounted
                    "--listen", f"{ip}:8080", "--admin-listen", f"{ip}:9090",
                    "--admin-token-file", str(tmp / "token"),
                    "--ecdsa-key-file", str(tmp / "ecdsa"), "--ed25519-key-file", str(tmp / "ed25519"),
                    "--self-url", f"http://{ip}:8080",
                    "--peer-secret-file", str(tmp / "peer")]),
                r"public=(http://\S+) admin=(http://\S+)",
            )
            sc.url, sc.admin_url, sc.ip = sc.match.group(1), sc.match.group(2), ip
            procs.append(sc)
            sidecars.append(sc)

        # What a kubelet and the endpoint controller would write.
        pods = [{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"vllm-{i}", "namespace": NS,
                         "labels": {"app.kubernetes.io/name": "vllm", "infergate.dev/sidecar": "true"},
                         "annotations": {"infergate.dev/admin-port": "9090"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"},
                                    {"name": "infergate", "image": "infergate/sidecar"}]},
        } for i in range(2)]
        cluster.apply(docs=pods)
        for i, ip in enumerate(ips):
            cluster.kubectl("patch", "pod", f"vllm-{i}", "-n", NS, "--subresource=status",
                            "--type=merge", "-p", json.dumps({"status": {
                                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}))
        cluster.apply(docs=[{
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "vllm-abc12", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "vllm"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }])

        log = open(tmp / "operator.log", "w")
        operator = subprocess.Popen(
            [str(BIN / "infergate-operator"), "--namespace", NS, "--watch-namespaces", NS,
             "--admin-token-file", str(tmp / "token"), "--listen", "127.0.0.1:0",
             "--resync-seconds", "2", "--lease-seconds", "3"],
            env=dict(cluster.env, KUBECONFIG=str(cluster.operator_kubeconfig())),
            stdout=log, stderr=log,
        )

        # The README's tour: the example key, provider and route, as they are.
        cluster.apply(*(ROOT / "examples" / f for f in ("api-key.yaml", "provider.yaml", "route.yaml")),
                      ns=NS)
        yield cluster, sidecars, tmp
    finally:
        if "operator" in locals():
            operator.terminate()
            operator.wait(10)
        for p in reversed(procs):
            p.stop()
        if net:
            net.down()


def configs(sidecars):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    return [httpx.get(s.admin_url + "/admin/v1/config", headers=admin).json() for s in sidecars]


def served(sidecars, model, alias=None):
    """Every sidecar runs one config version that serves `model` (and `alias`)."""
    cs = configs(sidecars)
    if len({c["version"] for c in cs}) != 1:
        return False
    for m in cs[0]["models"]:
        if m["name"] == model and (alias is None or alias in m["aliases"]):
            return cs[0]
    return False


def test_sdk_stream_through_operator_programmed_sidecars_verifies(deployment):
    from test_attestation import Recording

    cluster, sidecars, _ = deployment
    config = until("the example route on both sidecars",
                   lambda: served(sidecars, "llama-3.1-8b", "llama"))
    # Two backends, one per pod, each reached through its own sidecar; the
    # raw key never leaves its Secret.
    assert sorted(b["sidecar"] for b in config["backends"]) == sorted(s.url for s in sidecars)
    key = example_key()
    assert key not in json.dumps(config)
    assert config["keys"][0]["sha256"] == hashlib.sha256(key.encode()).hexdigest()

    rec = Recording()
    client = OpenAI(base_url=sidecars[0].url + "/v1", api_key=key, max_retries=0,
                    http_client=httpx.Client(transport=rec))
    ids, text = set(), []
    for chunk in client.chat.completions.create(
        model="llama", stream=True, messages=[{"role": "user", "content": "hello cluster"}],
    ):
        ids.add(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert len(ids) == 1 and text
    answer_id = ids.pop()
    request_hash = hashlib.sha256(rec.sent[-1]).hexdigest()
    response_hash = hashlib.sha256(b"".join(rec.received[-1])).hexdigest()

    auth = {"Authorization": f"Bearer {key}"}
    report = httpx.get(sidecars[0].url + "/v1/attestation/report", params={"nonce": "e2e"},
                       headers=auth).json()
    sig = httpx.get(f"{sidecars[0].url}/v1/signature/{answer_id}",
                    params={"signing_algo": "ecdsa"}, headers=auth).json()
    assert sig["text"] == f"{request_hash}:{response_hash}"
    signer = Account.recover_message(encode_defunct(text=sig["text"]), signature=sig["signature"])
    assert signer.lower() == report["signing_address"].lower()
    # The address is the one of the mounted key, whichever pod answered.
    ecdsa_key = (cluster.tmp / "ecdsa").read_text()
    assert signer == Account.from_key(bytes.fromhex(ecdsa_key)).address
    ed = httpx.get(f"{sidecars[0].url}/v1/signature/{answer_id}",
                   params={"signing_algo": "ed25519"}, headers=auth).json()
    seed = bytes.fromhex((cluster.tmp / "ed25519").read_text())
    SigningKey(seed).verify_key.verify(ed["text"].encode(), bytes.fromhex(ed["signature"]))


def test_route_change_with_kubectl_reaches_both_sidecars_and_status_reads_right(deployment):
    cluster, sidecars, tmp = deployment
    until("the example route on both sidecars", lambda: served(sidecars, "llama-3.1-8b", "llama"))

    route = (ROOT / "examples" / "route.yaml").read_text()
    changed = route.replace("aliases: [llama]", "aliases: [llama, l3]")
    assert changed != route
    (tmp / "route.yaml").write_text(changed)
    cluster.apply(tmp / "route.yaml", ns=NS)
    until("the new alias on both sidecars", lambda: served(sidecars, "llama-3.1-8b", "l3"))

    key = example_key()
    for s in sidecars:
        client = OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
        r = client.chat.completions.create(model="l3", messages=[{"role": "user", "content": "hi"}])
        assert r.model == "llama-3.1-8b" or r.model == UPSTREAM
        assert r.choices[0].message.content

    def row():
        out = cluster.kubectl("get", "modelroutes", "-n", NS)
        lines = out.strip().splitlines()
        assert lines[0].split()[:5] == ["NAME", "MODEL", "BACKENDS", "REFS", "PROGRAMMED"]
        cells = lines[1].split()
        return cells if cells[:5] == ["llama", "llama-3.1-8b", "2", "True", "True"] else None

    until("kubectl get modelroutes: llama programmed with 2 backends", row)
    message = cluster.kubectl(
        "get", "modelroute", "llama", "-n", NS,
        "-o", 'jsonpath={.status.conditions[?(@.type=="Programmed")].message}')
    assert message.startswith("2/2"), message
    generation = cluster.kubectl("get", "modelroute", "llama", "-n", NS,
                                 "-o", "jsonpath={.metadata.generation}")
    observed = cluster.kubectl("get", "modelroute", "llama", "-n", NS,
                               "-o", "jsonpath={.status.observedGeneration}")
    assert generation == observed == "2"
    providers = cluster.kubectl("get", "inferenceproviders", "-n", NS)
    assert providers.splitlines()[1].split()[:3] == ["vllm", "2", "true"]


def test_a_sidecar_forwards_to_the_other_pod_and_signatures_follow(deployment):
    """The rendered backends carry each pod's sidecar URL: a request that
    sidecar 0 routes to pod 1 is served (hashed, signed) by pod 1's sidecar,
    and sidecar 0 still answers the signature look-up."""
    cluster, sidecars, _ = deployment
    until("the example route on both sidecars", lambda: served(sidecars, "llama-3.1-8b", "llama"))
    key = example_key()
    client = OpenAI(base_url=sidecars[0].url + "/v1", api_key=key, max_retries=0)
    answered_by = {}
    for i in range(24):  # sticky by `user`: different users spread over both pods
        raw = client.chat.completions.with_raw_response.create(
            model="llama", user=f"user-{i}", messages=[{"role": "user", "content": "which pod?"}])
        answered_by.setdefault(raw.headers["x-infergate-backend"], raw.parse().id)
        if len(answered_by) == 2:
            break
    assert set(answered_by) == {f"{NS}/vllm/{s.ip}" for s in sidecars}, answered_by
    remote = answered_by[f"{NS}/vllm/{sidecars[1].ip}"]
    auth = {"Authorization": f"Bearer {key}"}
    for s in sidecars:
        sig = httpx.get(f"{s.url}/v1/signature/{remote}", params={"signing_algo": "ecdsa"},
                        headers=auth).json()
        signer = Account.recover_message(encode_defunct(text=sig["text"]), signature=sig["signature"])
        assert signer == Account.from_key(bytes.fromhex((cluster.tmp / "ecdsa").read_text())).address
