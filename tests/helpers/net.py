"""Networks for the tests: a scratch bridge network per state root, the two-host segment of
:mod:`migrate.localnet` (re-exported), and the check that nothing of them is left (veths,
bridge ports, leases, pins).

Names are unique per test (``jtb`` + 6 hex for a bridge) so that runs side by side never
meet; every helper removes only what it made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from migrate.localnet import Segment, add_client_address, scratch_subnet, two_node_segment
from runtime.network import LEASES_FILE, NETWORK_FILE, host_if_name
from runtime.network import link as netlink
from tests.helpers.jaula import Jaula

#: the two-host segment lives in migrate.localnet (the demo builds it too)
SEGMENT_API = (Segment, add_client_address, two_node_segment)


@dataclass(frozen=True)
class BridgeNet:
    """A state root's bridge network: ``bridge`` (made by the runtime on first use unless
    ``create`` is False), ``subnet``, ``gateway`` (its first host)."""

    bridge: str
    subnet: str
    create: bool = True
    leases_file: str = ""

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.IPv4Network(self.subnet).hosts()))

    def host(self, n: int) -> str:
        """The n-th host address (1 = the gateway)."""
        return str(ipaddress.IPv4Network(self.subnet).network_address + n)

    def write(self, root: Path) -> None:
        """Configure state root ``root`` with this network (``network.json``)."""
        root.mkdir(parents=True, exist_ok=True)
        cfg = {"bridge": self.bridge, "subnet": self.subnet, "create_bridge": self.create}
        if self.leases_file:
            cfg["leases_file"] = self.leases_file
        (root / NETWORK_FILE).write_text(json.dumps(cfg))


def new_bridge_name() -> str:
    return "jtb" + secrets.token_hex(3)


def links() -> dict[str, int]:
    """Every link of this (the host's) net namespace: name -> index."""
    with IPRoute() as ipr:
        return {str(lk.get("IFLA_IFNAME")): int(lk["index"]) for lk in ipr.get_links()}


def bridge_ports(bridge: str) -> list[str]:
    """Names of the links enslaved to ``bridge`` (empty when it does not exist)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=bridge)
        if not idx:
            return []
        return [
            str(lk.get("IFLA_IFNAME")) for lk in ipr.get_links() if lk.get("IFLA_MASTER") == idx[0]
        ]


def make_bridge(name: str, address: str | None = None, prefixlen: int = 24) -> None:
    """A bridge ``name`` (up), with ``address`` when given."""
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        idx = ipr.link_lookup(ifname=name)[0]
        if address:
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")


def delete_link(name: str) -> None:
    """Delete link ``name`` when it exists."""
    netlink.delete_link(name)


def leases(root: Path, net: BridgeNet) -> dict[str, str]:
    """address -> container id in ``root``'s lease file (or the shared one)."""
    path = Path(net.leases_file) if net.leases_file else root / LEASES_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    got: dict[str, str] = doc.get("subnets", {}).get(net.subnet, {})
    return got


def network_leaks(root: Path, net: BridgeNet, ids: list[str]) -> list[str]:
    """What the containers ``ids`` of ``root`` left of their network: host veths, bridge
    ports, leases, netns pins."""
    problems: list[str] = []
    have = links()
    for cid in ids:
        for name in (host_if_name(cid), "jm" + cid[:12]):
            if name in have:
                problems.append(f"veth {name} of {cid[:12]} left")
        pin = root / "containers" / cid / "netns"
        if pin.exists():
            problems.append(f"netns pin {pin} left")
    short = {cid[:12] for cid in ids}
    ports = [p for p in bridge_ports(net.bridge) if p[2:] in short or p.startswith("jl")]
    if ports:
        problems.append(f"bridge {net.bridge} still has container ports {ports}")
    if leases(root, net):
        problems.append(f"leases left in {net.subnet}: {leases(root, net)}")
    return problems


def port_rules(cid: str) -> list[str]:
    """The nat rules (``iptables -S`` lines) of every node of this host for container
    ``cid`` (:mod:`runtime.network.ports` comments them ``jaula:<node>:<id>``)."""
    out = subprocess.run(
        ["iptables", "-w", "10", "-t", "nat", "-S"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if f":{cid}" in line and "jaula:" in line]


def jaula_chains() -> list[str]:
    """The jaula chains and jumps left in the nat table when no rule of any node of this
    host publishes a port (read under the ports' lock, :data:`runtime.network.ports.LOCK`);
    ``[]`` also while another run of this host (the other ``make test`` shard) publishes
    one, since the chains are then rightly there."""
    from runtime.network import ports
    from runtime.store import flocked

    ports.LOCK.parent.mkdir(parents=True, exist_ok=True)
    with flocked(ports.LOCK):
        out = subprocess.run(
            ["iptables", "-w", "10", "-t", "nat", "-S"], capture_output=True, text=True, check=True
        ).stdout
    lines = out.splitlines()
    if any("jaula:" in line for line in lines):
        return []
    return [line for line in lines if "JAULA-PORTS" in line]


def port_leaks(ids: list[str]) -> list[str]:
    """The rules the containers ``ids`` left; each is deleted (then the test fails)."""
    problems = []
    for cid in ids:
        for rule in port_rules(cid):
            problems.append(f"nat rule left: {rule}")
            subprocess.run(
                ["iptables", "-w", "10", "-t", "nat", "-D", *shlex.split(rule)[1:]], check=False
            )
    return problems


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody holds right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(addr: str, port: int, path: str, netns: Path | None = None) -> str:
    """The body of ``GET path`` from ``addr:port`` (curl-free: python's urllib), from the
    host or, with ``netns``, from that net namespace."""
    code = (
        "import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end='')"
    )
    argv = [sys.executable, "-c", code, f"http://{addr}:{port}{path}"]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    assert p.returncode == 0, f"GET http://{addr}:{port}{path} failed: {p.stderr.strip()}"
    return p.stdout


@contextlib.contextmanager
def bridge_network(j: Jaula, net: BridgeNet | None = None) -> Iterator[BridgeNet]:
    """Configure ``j``'s state root with a scratch bridge network; afterwards remove every
    container of the root, assert that nothing of their network is left, and delete the
    bridge."""
    net = net or BridgeNet(new_bridge_name(), scratch_subnet())
    net.write(j.root)
    try:
        yield net
    finally:
        ids = j.container_ids()
        for cid in ids:
            j.run("rm", "-f", cid, check=False)
        problems = network_leaks(j.root, net, ids)
        problems += port_leaks(ids)
        for cid in ids:  # clean what leaked, then fail
            delete_link(host_if_name(cid))
            delete_link("jm" + cid[:12])
        delete_link(net.bridge)
    assert not problems, "\n".join(problems)


def in_netns(netns: Path, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the net namespace pinned at ``netns`` (nsenter)."""
    return subprocess.run(
        ["nsenter", f"--net={netns}", *argv],
        text=True,
        capture_output=True,
        check=False,
        timeout=timeout,
    )


#: a client holding one TCP connection: sends n, expects n+1, until the file argv[3]
#: exists; prints "ok <last n> <longest gap s>" or "FAIL <why>"; writes its count to argv[4]
PINGPONG_CLIENT = r"""
import socket, sys, time, os
host, port, stop, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=60)
f = s.makefile("rw")
n, gap, last = 0, 0.0, time.monotonic()
try:
    while not os.path.exists(stop):
        f.write(f"{n}\n"); f.flush()
        line = f.readline()
        if not line:
            print(f"FAIL EOF after {n}"); sys.exit(1)
        if int(line) != n + 1:
            print(f"FAIL sent {n} got {line.strip()}"); sys.exit(1)
        now = time.monotonic(); gap = max(gap, now - last); last = now
        n += 1
        with open(progress + ".tmp", "w") as p:
            p.write(str(n))
        os.replace(progress + ".tmp", progress)
        time.sleep(0.01)
except OSError as e:
    print(f"FAIL {e!r} after {n}"); sys.exit(1)
print(f"ok {n} {gap:.3f}")
"""

#: the counter server: one connection, reply n+1 to n (busybox nc hands it to sh)
COUNTER_SERVER = ("busybox", "nc", "-l", "-p", "7000", "-e", "sh", "-c",
                  "while read n; do echo $((n+1)); done")  # fmt: skip
