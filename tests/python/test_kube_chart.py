"""The Helm chart on a real kube-apiserver, as a platform team runs it:
`helm install`, the operator running as the chart's ServiceAccount (RBAC
enforced by the server, a forbidden call stays forbidden), `helm upgrade`
after the operator has written its ConfigMap (field ownership: the operator
owns only its data), invalid objects refused by the CRDs' schema and CEL
rules with their messages, short names that collide with nothing the server
serves, and `helm uninstall` leaving nothing behind but what is kept by
design.
"""
import base64
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, real_testbed

pytestmark = real_testbed()

KUBECTL = os.environ.get("KUBECTL")
HELM = os.environ.get("INFERGATE_HELM")
CHART = ROOT / "charts" / "infergate"
RELEASE = "ig"
SA = f"{RELEASE}-infergate-operator"


class Kube:
    def __init__(self, tmp):
        self.tmp = tmp
        self.ns = f"chart-{random.randrange(16**6):06x}"
        self.user = f"system:serviceaccount:{self.ns}:{SA}"
        self.env = dict(os.environ, KUBECONFIG=str(Path(os.environ["INFERGATE_TESTBED"]) / "kubeconfig"),
                        KUBECACHEDIR=str(tmp / "kubecache"), HELM_CACHE_HOME=str(tmp / "helm-cache"),
                        HELM_CONFIG_HOME=str(tmp / "helm-config"), HELM_DATA_HOME=str(tmp / "helm-data"))

    def run(self, tool, *args, stdin=None, ok=True):
        r = subprocess.run([tool, *args], env=self.env, input=stdin, text=True,
                           capture_output=True, timeout=120)
        if ok:
            assert r.returncode == 0, f"{tool} {' '.join(args)}:\n{r.stdout}{r.stderr}"
        return r

    def kubectl(self, *args, **kw):
        return self.run(KUBECTL, *args, **kw)

    def helm(self, *args, **kw):
        return self.run(HELM, *args, **kw)

    def json(self, *args):
        return json.loads(self.kubectl(*args, "-o", "json").stdout)


def until(what, check, timeout=40):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def kube():
    tmp = Path(tempfile.mkdtemp(prefix="infergate-chart-"))
    k = Kube(tmp)
    k.kubectl("create", "namespace", k.ns)
    yield k


@pytest.fixture(scope="module")
def installed(kube):
    """The chart installed, and the operator binary running as the chart's
    ServiceAccount against it (no kubelet runs the Deployment here)."""
    kube.helm("install", RELEASE, str(CHART), "-n", kube.ns,
              "--set", f"operator.watchNamespaces={{{kube.ns}}}")
    secret = kube.json("get", "secret", f"{RELEASE}-infergate-admin-token", "-n", kube.ns)
    token = kube.tmp / "admin-token"
    token.write_bytes(base64.b64decode(secret["data"]["token"]))
    # The admin kubeconfig, impersonating the ServiceAccount.
    kubeconfig = kube.tmp / "operator.kubeconfig"
    cfg = Path(kube.env["KUBECONFIG"]).read_text()
    kubeconfig.write_text(cfg.replace("\n  user:\n", f"\n  user:\n    as: {kube.user}\n", 1))
    assert f"as: {kube.user}" in kubeconfig.read_text()
    log = open(kube.tmp / "operator.log", "w")
    op = subprocess.Popen(
        [str(BIN / "infergate-operator"), "--namespace", kube.ns, "--watch-namespaces", kube.ns,
         "--admin-token-file", str(token), "--listen", "127.0.0.1:0",
         "--resync-seconds", "2", "--lease-seconds", "3"],
        env=dict(kube.env, KUBECONFIG=str(kubeconfig)), stdout=log, stderr=log)
    try:
        yield kube
    finally:
        op.terminate()
        op.wait(10)
        if op.returncode not in (0, -15):
            print((kube.tmp / "operator.log").read_text())


def config_map(kube):
    return kube.json("get", "configmap", "infergate-config", "-n", kube.ns, "--show-managed-fields")


def test_operator_writes_its_config_under_the_charts_rbac_and_helm_upgrade_still_works(installed):
    kube = installed
    kube.kubectl("apply", "--server-side", "-n", kube.ns, "-f", str(ROOT / "examples" / "api-key.yaml"),
                 "-f", str(ROOT / "examples" / "provider.yaml"), "-f", str(ROOT / "examples" / "route.yaml"))
    cm = until("the operator's config (with the key) in the chart's ConfigMap",
               lambda: '"team-a"' in (c := config_map(kube)).get("data", {}).get("config.json", "") and c)
    config = json.loads(cm["data"]["config.json"])
    assert config["keys"][0]["id"] == "team-a"
    # The case a real server showed: upgrading after the operator wrote.
    up = kube.helm("upgrade", RELEASE, str(CHART), "-n", kube.ns,
                   "--set", f"operator.watchNamespaces={{{kube.ns}}}", "--set", "operator.resyncSeconds=20")
    assert "conflict" not in (up.stdout + up.stderr).lower()
    after = config_map(kube)
    # Field ownership: Helm keeps the labels, the operator owns only its
    # data entry and version annotation.
    owners = {m["manager"]: json.dumps(m.get("fieldsV1", {})) for m in after["metadata"]["managedFields"]}
    assert "infergate-operator" in owners, owners
    operator_fields = owners["infergate-operator"]
    assert "f:labels" not in operator_fields, operator_fields
    assert '"f:config.json"' in operator_fields
    assert after["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    # Status written by the ServiceAccount too.
    until("route status with observedGeneration", lambda: kube.json(
        "get", "modelroute", "llama", "-n", kube.ns).get("status", {}).get("observedGeneration") == 1)
    assert after["data"]["config.json"] == cm["data"]["config.json"], "helm upgrade dropped the operator's data"
    deployment = kube.json("get", "deployment", f"{RELEASE}-infergate-operator", "-n", kube.ns)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--resync-seconds=20" in args, args
    # And the operator keeps writing after Helm's apply.
    kube.kubectl("create", "secret", "generic", "after-upgrade", "-n", kube.ns,
                 "--from-literal=key=ig-after-upgrade-0123456789")
    kube.kubectl("label", "secret", "after-upgrade", "-n", kube.ns, "infergate.dev/api-key=true")
    until("the operator's write after the upgrade",
          lambda: '"after-upgrade"' in config_map(kube)["data"]["config.json"])
    second = kube.helm("upgrade", RELEASE, str(CHART), "-n", kube.ns,
                       "--set", f"operator.watchNamespaces={{{kube.ns}}}")
    assert second.returncode == 0


def test_the_server_enforces_the_charts_rbac(installed):
    kube = installed
    allowed = [
        ["get", "configmap/infergate-config", "-n", kube.ns],
        ["patch", "configmap/infergate-config", "-n", kube.ns],
        ["list", "secrets", "-n", kube.ns],
        ["patch", "modelroutes", "--subresource=status", "-n", kube.ns],
    ]
    forbidden = [
        ["get", "configmap/other", "-n", kube.ns],          # only its own ConfigMap
        ["delete", "configmap/infergate-config", "-n", kube.ns],
        ["get", "secrets", "-n", kube.ns],                  # list/watch keys, never get one by name
        ["list", "secrets", "-n", "default"],               # outside the watched namespace
        ["patch", "modelroutes", "-n", kube.ns],            # status only, never the spec
        ["create", "clusterroles"],
    ]
    for args in allowed:
        r = kube.kubectl("auth", "can-i", "--as", kube.user, *args, ok=False)
        assert r.stdout.strip() == "yes", (args, r.stdout, r.stderr)
    for args in forbidden:
        r = kube.kubectl("auth", "can-i", "--as", kube.user, *args, ok=False)
        assert r.stdout.strip() == "no", (args, r.stdout, r.stderr)
    # A real call, refused by the server.
    r = kube.kubectl("--as", kube.user, "get", "configmaps", "-n", "default", ok=False)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr


INVALID = [
    ("InferenceProvider", {"url": "http://a", "service": {"name": "b", "port": 80}},
     "set exactly one of url, service, endpoints"),
    ("InferenceProvider", {}, "set exactly one of url, service, endpoints"),
    ("InferenceProvider", {"service": {"name": "b", "port": 70000}},
     "should be less than or equal to 65535"),
    ("InferenceProvider", {"endpoints": {"service": "v", "port": 0}}, "should be greater than or equal to 1"),
    ("ModelRoute", {"model": "m", "aliases": ["m"], "backends": [{"provider": "p"}]},
     "an alias must differ from the model name"),
    ("ModelRoute", {"model": "m", "backends": []}, "should have at least 1 items"),
    ("ModelRoute", {"model": "", "backends": [{"provider": "p"}]}, "should be at least 1 chars long"),
    ("ModelRoute", {"model": "m", "backends": [{"provider": "p", "weight": 0}]},
     "should be greater than or equal to 1"),
    ("ModelRoute", {"model": "m", "backends": [{"provider": "p"}], "strategy": "random"},
     'supported values: "roundRobin", "leastInFlight"'),
    ("ModelRoute", {"backends": [{"provider": "p"}]}, "spec.model: Required value"),
]


@pytest.mark.parametrize("kind,spec,message", INVALID)
def test_invalid_objects_are_refused_with_the_crds_messages(kube, kind, spec, message):
    obj = {"apiVersion": "infergate.dev/v1alpha1", "kind": kind,
           "metadata": {"name": "invalid", "namespace": kube.ns}, "spec": spec}
    r = kube.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(obj), ok=False)
    assert r.returncode != 0, f"{kind} {spec} was accepted"
    assert message in r.stderr, r.stderr
    assert "is invalid" in r.stderr, r.stderr


def test_short_names_collide_with_nothing_the_server_serves(kube):
    ours, others = {}, {}
    resources = json.loads(kube.kubectl("get", "--raw", "/apis/infergate.dev/v1alpha1").stdout)
    for r in resources["resources"]:
        if "/" not in r["name"]:
            ours[r["name"]] = r.get("shortNames", [])
    assert ours == {"inferenceproviders": ["iprov"], "modelroutes": ["mr"]}, ours
    # Every other short name and resource name the server serves.
    for group_path in ["/api/v1"] + [
        f"/apis/{v['groupVersion']}"
        for g in json.loads(kube.kubectl("get", "--raw", "/apis").stdout)["groups"]
        for v in g["versions"] if g["name"] != "infergate.dev"
    ]:
        for r in json.loads(kube.kubectl("get", "--raw", group_path).stdout)["resources"]:
            for n in [r["name"], r.get("singularName", "")] + r.get("shortNames", []):
                others.setdefault(n, group_path)
    assert others.get("ip") == "/apis/networking.k8s.io/v1", "ip is IPAddress's short name"
    for short in ("iprov", "mr", "inferenceprovider", "modelroute"):
        assert short not in others, f"{short} is also {others[short]}"
    kube.kubectl("get", "iprov,mr", "-n", kube.ns)


def test_helm_uninstall_leaves_nothing_behind_but_what_is_kept_by_design(installed):
    kube = installed
    # The operator's own objects in the namespace are there before.
    kube.kubectl("get", "lease", "infergate-operator", "-n", kube.ns)
    kube.helm("uninstall", RELEASE, "-n", kube.ns, "--wait")
    left = kube.json("get", "all,configmaps,secrets,serviceaccounts,roles,rolebindings,"
                     "networkpolicies,leases", "-n", kube.ns)["items"]
    names = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in left
                   if o["metadata"]["name"] not in ("kube-root-ca.crt", "default"))
    # Kept by design: the admin token (helm.sh/resource-policy: keep, so a
    # reinstall keeps the token the sidecars hold), the operator's Lease
    # (the operator's, not the chart's) and the key the platform team
    # applied (like its InferenceProvider and ModelRoute, not listed here).
    assert names == sorted([
        "Lease/infergate-operator", f"Secret/{RELEASE}-infergate-admin-token",
        "Secret/after-upgrade", "Secret/team-a",
    ]), names
    # CRDs are never removed by helm (that would delete every user object).
    kube.kubectl("get", "crd", "modelroutes.infergate.dev")
