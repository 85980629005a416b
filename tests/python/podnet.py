"""Test "pods" with real addresses: one network namespace per pod, joined to
a bridge by a veth pair, with an address from a private /24 picked for this
run and carried only by these links. The API server refuses loopback
endpoint addresses, and a pod's processes (vllm-sim and sidecar) should see
the network as they would on a node: their own address, the other pods
across the bridge.

Needs root and iproute2. Everything made here is named with one prefix
(INFERGATE_NETNS_PREFIX, default from the pid) and removed by `down()`,
also when a test fails; scripts/test removes anything left with that
prefix when it exits.
"""
import os
import random
import subprocess


def ip(*args, check=True):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def free_subnet():
    """A 10.x.y.0/24 that no address or route on this machine touches."""
    used = ip("-4", "-o", "addr", "show") + ip("-4", "route", "show", "table", "all")
    for _ in range(100):
        a, b = random.randint(200, 250), random.randint(1, 254)
        if f"10.{a}.{b}." not in used and f"10.{a}.0.0" not in used and "10.0.0.0/8" not in used:
            return f"10.{a}.{b}"
    raise RuntimeError("no free 10.x.y.0/24 for the test pods")


class PodNet:
    def __init__(self, count, prefix=None):
        # Interface names have at most 15 characters.
        self.prefix = (prefix or os.environ.get("INFERGATE_NETNS_PREFIX")
                       or f"ig{os.getpid() % 100000}")[:9]
        self.bridge = f"{self.prefix}br"
        self.namespaces = []
        self.addresses = []
        net = free_subnet()
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{net}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i in range(count):
                ns, veth, addr = f"{self.prefix}-pod{i}", f"{self.prefix}v{i}", f"{net}.{i + 2}"
                ip("netns", "add", ns)
                self.namespaces.append(ns)
                ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("link", "set", veth, "master", self.bridge)
                ip("link", "set", veth, "up")
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
                self.addresses.append(addr)
        except Exception:
            self.down()
            raise

    def run_in(self, i, args):
        """`args` run inside pod i's namespace."""
        return ["ip", "netns", "exec", self.namespaces[i], *args]

    def down(self):
        # Deleting one end of a veth pair deletes both; a namespace's own
        # teardown is asynchronous, so the host ends go first, explicitly.
        for i, ns in enumerate(self.namespaces):
            ip("link", "del", f"{self.prefix}v{i}", check=False)
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.bridge, check=False)
        self.namespaces = []
