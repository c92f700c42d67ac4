"""Issue 12, tests 2 and 5: Redis in a bridged container reached from a client outside the
cluster (the client namespace of :mod:`migrate.localnet`) at one IP before and after its
migration, a connected writing client keeping its connection; and after the commit only
node2 answering for the IP (ARP, seen on each node's port to the wire, and ping)."""

from __future__ import annotations

import functools
import json
import select
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.network import arp
from runtime.poll import wait_for
from tests.helpers import net as tnet
from tests.helpers.jaula import REPO
from tests.helpers.nodes import Cluster2, make_cluster, serving

pytestmark = [pytest.mark.root, pytest.mark.criu]

ETH_P_ALL = 0x0003
RESP_CLIENT = REPO / "scripts" / "resp_client.py"
#: the image's redis-server, listening on every address of the container (its Cmd binds lo)
REDIS_BRIDGED = ("redis-server", "--port", "6379", "--bind", "0.0.0.0", "--save", "",
                 "--appendonly", "no", "--protected-mode", "no")  # fmt: skip


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tnet.Segment]:
    with tnet.two_node_segment(tmp_path) as seg:
        yield seg


@pytest.fixture
def redis_nodes(
    tmp_path: Path, busybox_image_layout: Path, redis_image_layout: Path, segment: tnet.Segment
) -> Iterator[Cluster2]:
    """node1 and node2 on the segment's bridges (one lease file), the redis image on node1;
    afterwards nothing of the containers' network is left."""
    c = make_cluster(tmp_path / "cluster", busybox_image_layout, import_on=())
    c.local("node1").run("image", "import", str(redis_image_layout), "--name",
                         "jaula-redis:latest")  # fmt: skip
    leases = str(tmp_path / "leases.json")
    nets = {
        node: tnet.BridgeNet(br, segment.subnet, create=False, leases_file=leases)
        for node, br in zip(("node1", "node2"), segment.bridges, strict=True)
    }
    for node, n in nets.items():
        n.write(c.state_root(node))
    with serving(c):
        yield c
    problems = []
    for node, n in nets.items():
        problems += tnet.network_leaks(c.state_root(node), n, sorted(c.seen_ids))
    assert not problems, "\n".join(problems)


def _settings(c: Cluster2, node: str, name: str) -> dict[str, str]:
    got: dict[str, str] = json.loads(c.local(node).out("inspect", name))[0]["NetworkSettings"]
    return got


def _cli(seg: tnet.Segment, ip: str, *args: str) -> str:
    """``redis-cli -h ip ARGS`` from the client namespace; its stdout (AssertionError when
    it fails)."""
    p = tnet.in_netns(seg.client_ns, "redis-cli", "-h", ip, *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def _pong(seg: tnet.Segment, ip: str) -> bool:
    return tnet.in_netns(seg.client_ns, "redis-cli", "-h", ip, "ping").stdout.strip() == "PONG"


def _progress(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _advanced(path: Path, n: int, client: subprocess.Popen[str]) -> bool:
    return _progress(path) >= n or client.poll() is not None


def _run_redis(c: Cluster2, seg: tnet.Segment) -> tuple[str, str]:
    """Redis on node1 with --network bridge, answering the client: (id, ip)."""
    cid = c.local("node1").out("run", "-d", "--network", "bridge", "--name", "redis",
                               "jaula-redis:latest", *REDIS_BRIDGED).strip()  # fmt: skip
    c.seen_ids.add(cid)
    ip = _settings(c, "node1", "redis")["IPAddress"]
    assert wait_for(functools.partial(_pong, seg, ip), 30), f"redis at {ip} never answered"
    return cid, ip


def _run_id(seg: tnet.Segment, ip: str) -> str:
    info = _cli(seg, ip, "INFO", "server")
    return next(x for x in info.splitlines() if x.startswith("run_id:")).strip()


@pytest.mark.parametrize("strategy", ["cold", "postcopy"])
def test_redis_keeps_its_ip_and_a_writing_client_its_connection(
    redis_nodes: Cluster2, segment: tnet.Segment, tmp_path: Path, strategy: str
) -> None:
    c = redis_nodes
    _, ip = _run_redis(c, segment)
    assert _cli(segment, ip, "SET", "greeting", "from node1") == "OK"
    run_id = _run_id(segment, ip)
    stop, progress = tmp_path / "stop", tmp_path / "progress"
    client = subprocess.Popen(
        ["nsenter", f"--net={segment.client_ns}", sys.executable, str(RESP_CLIENT), ip, "6379",
         str(stop), str(progress)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert wait_for(functools.partial(_advanced, progress, 20, client), 30)
        assert client.poll() is None, client.communicate()[0]
        c.op("migrate", "redis", "node2", "--strategy", strategy)
        c.assert_only_on("redis", "node2")
        assert _settings(c, "node2", "redis")["IPAddress"] == ip
        after = _progress(progress)
        assert wait_for(functools.partial(_advanced, progress, after + 20, client), 30), (
            "the client made no progress after the migration"
        )
        assert client.poll() is None, client.communicate()[0]
        # a new connection at the same IP reaches the same server, with the data
        assert _cli(segment, ip, "GET", "greeting") == "from node1"
        assert _run_id(segment, ip) == run_id
    finally:
        stop.touch()
        out, _ = client.communicate(timeout=60)
    assert client.returncode == 0 and out.startswith("ok "), out
    _, count, gap = out.split()
    assert int(count) >= after + 20
    assert int(_cli(segment, ip, "GET", "jaula:client")) == int(count)  # every write landed
    print(f"{strategy}: {count} round trips, longest gap {gap} s")


def _sniffer(ifname: str) -> socket.socket:
    """A packet socket on host link ``ifname`` seeing its frames, both directions (a socket
    bound to one protocol sees only received frames: ETH_P_ALL also sees sent ones)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, ETH_P_ALL))
    return s


def _replies_for(s: socket.socket, ip: str) -> int:
    """How many ARP replies with sender ``ip`` wait in ``s`` (drained)."""
    want, n = socket.inet_aton(ip), 0
    while select.select([s], [], [], 0)[0]:
        pkt = s.recv(128)
        kind, op = struct.unpack("!H6xH", pkt[12:22]) if len(pkt) >= 42 else (0, 0)
        if kind == arp.ETH_P_ARP and op == 2 and pkt[28:32] == want:
            n += 1
    return n


def _who_answers(seg: tnet.Segment, ip: str) -> tuple[set[str], dict[str, int]]:
    """An ARP probe for ``ip`` from the client: the MACs that answered, and per node how
    many replies went out through its port to the wire."""
    ports = {"node1": "jtv1" + seg.wire[3:], "node2": "jtv2" + seg.wire[3:]}
    socks = {node: _sniffer(port) for node, port in ports.items()}
    try:
        for s in socks.values():
            _replies_for(s, ip)  # what came before
        macs = arp.in_netns(str(seg.client_ns), lambda: arp.probe("eth0", ip, wait_s=0.5))
        return macs, {node: _replies_for(s, ip) for node, s in socks.items()}
    finally:
        for s in socks.values():
            s.close()


def test_after_the_commit_only_node2_answers_for_the_ip(
    redis_nodes: Cluster2, segment: tnet.Segment
) -> None:
    c = redis_nodes
    _, ip = _run_redis(c, segment)
    mac = _settings(c, "node1", "redis")["MacAddress"]
    macs, per_node = _who_answers(segment, ip)
    assert macs == {mac}
    assert per_node["node1"] > 0 and per_node["node2"] == 0, per_node  # the sniffers see
    c.op("migrate", "redis", "node2")
    c.assert_only_on("redis", "node2")
    macs, per_node = _who_answers(segment, ip)
    assert macs == {mac}
    assert per_node["node2"] > 0 and per_node["node1"] == 0, per_node
    p = tnet.in_netns(segment.client_ns, "busybox", "ping", "-c", "3", "-W", "2", ip)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "DUP!" not in p.stdout, p.stdout  # no second host answers the echo (busybox ping)
    assert " 0% packet loss" in p.stdout, p.stdout
