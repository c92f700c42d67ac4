"""A bridged container keeps its address, MAC and TCP connection across a migration: two
node services whose bridges are joined by a wire, and a client outside the cluster holding
one connection to a counter server in the container (tests.helpers.net)."""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from runtime.network import host_if_name, ports
from runtime.poll import wait_for
from tests.helpers import net as tnet
from tests.helpers.nodes import Cluster2, make_cluster, serving

pytestmark = [pytest.mark.root, pytest.mark.criu]


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tnet.Segment]:
    with tnet.two_node_segment(tmp_path) as seg:
        yield seg


@pytest.fixture
def bridged_nodes(
    tmp_path: Path, busybox_image_layout: Path, segment: tnet.Segment
) -> Iterator[Cluster2]:
    """node1 on the segment's first bridge, node2 on its second, one shared lease file;
    afterwards nothing of the containers' network is left."""
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
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


def _ip_of(c: Cluster2, node: str, name: str) -> str:
    got = json.loads(c.local(node).out("inspect", name))[0]
    ip: str = got["NetworkSettings"]["IPAddress"]
    return ip


def _advanced(path: Path, n: int, client: subprocess.Popen[str]) -> bool:
    """The client got reply ``n`` (or ended)."""
    return _progress(path) >= n or client.poll() is not None


def _progress(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("strategy", ["cold", "postcopy"])
def test_a_connected_client_sees_no_reset_there_and_back(
    bridged_nodes: Cluster2, segment: tnet.Segment, tmp_path: Path, strategy: str
) -> None:
    c = bridged_nodes
    n1 = c.local("node1")
    cid = n1.out("run", "-d", "--network", "bridge", "--name", "ctr", "busybox",
                 *tnet.COUNTER_SERVER).strip()  # fmt: skip
    c.seen_ids.add(cid)
    ip = _ip_of(c, "node1", "ctr")
    stop, progress = tmp_path / "stop", tmp_path / "progress"
    client = subprocess.Popen(
        ["nsenter", f"--net={segment.client_ns}", sys.executable, "-c",
         tnet.PINGPONG_CLIENT, ip, "7000", str(stop), str(progress)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert wait_for(lambda: _progress(progress) >= 20 or client.poll() is not None, 30)
        assert client.poll() is None, client.communicate()[0]
        for there, back in (("node2", "node1"), ("node1", "node2")):
            c.op("migrate", "ctr", there, "--strategy", strategy)
            c.assert_only_on("ctr", there)
            assert _ip_of(c, there, "ctr") == ip
            after = _progress(progress)
            assert wait_for(functools.partial(_advanced, progress, after + 20, client), 30), (
                f"the client made no progress after the migration to {there}"
            )
            assert client.poll() is None, client.communicate()[0]
            ports = dict(zip(("node1", "node2"), map(tnet.bridge_ports, segment.bridges)))
            assert [p for p in ports[back] if p.endswith(cid[:12])] == []  # source port gone
            assert [p for p in ports[there] if p.endswith(cid[:12])] != []
    finally:
        stop.touch()
        out, _ = client.communicate(timeout=60)
    assert client.returncode == 0 and out.startswith("ok "), out
    _, count, gap = out.split()
    assert int(count) >= after + 20
    print(f"{strategy}: {count} replies, longest gap {gap} s")


def test_an_address_in_use_on_the_destination_is_refused_before_the_freeze(
    bridged_nodes: Cluster2, segment: tnet.Segment
) -> None:
    c = bridged_nodes
    n1 = c.local("node1")
    cid = n1.out("run", "-d", "--network", "bridge", "--name", "ctr", "busybox",
                 "sleep", "300").strip()  # fmt: skip
    c.seen_ids.add(cid)
    ip = _ip_of(c, "node1", "ctr")
    pid_before = json.loads(n1.out("inspect", "ctr"))[0]["State"]["Pid"]
    tnet.add_client_address(segment, ip)  # a squatter on the segment
    p = c.op("migrate", "ctr", "node2", check=False)
    assert p.returncode == 125
    assert f"{ip} is already in use on bridge {segment.bridges[1]}" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    c.assert_only_on("ctr", "node1")
    assert (
        json.loads(n1.out("inspect", "ctr"))[0]["State"]["Pid"] == pid_before
    )  # never frozen away
    assert c.local("node2").container_ids() == []
    assert host_if_name(cid) in tnet.bridge_ports(segment.bridges[0])
    assert tnet.bridge_ports(segment.bridges[1]) == ["jtv2" + segment.wire[3:]]


@pytest.fixture
def routed(segment: tnet.Segment) -> Iterator[str]:
    """This host reaches the segment: the gateway address on node2's bridge (the
    destination's side; node1's bridge is reached over the wire); it goes with the bridge
    when the segment is torn down.

    Not on the wire: with br_netfilter on (bridge-nf-call-iptables=1, as on this host) the
    one conntrack table of both "hosts" then sees the DNATed flow again in every bridge it
    crosses, and after the move the replies were not un-NATed (the destination's port was
    reachable directly, not through the rule).  Two real hosts have a table each."""
    gateway = tnet.BridgeNet(segment.wire, segment.subnet).gateway
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=segment.bridges[1])[0]
        prefix = int(segment.subnet.split("/")[1])
        ipr.addr("add", index=idx, address=gateway, prefixlen=prefix)
    yield gateway


def test_a_published_port_moves_with_the_container(
    bridged_nodes: Cluster2, segment: tnet.Segment, routed: str
) -> None:
    c = bridged_nodes
    port = tnet.free_port()
    cid = c.local("node1").out("run", "-d", "--network", "bridge", "--name", "web",
                               "-p", f"{port}:80", "busybox",
                               "busybox", "httpd", "-f", "-p", "80", "-h", "/etc").strip()  # fmt: skip
    c.seen_ids.add(cid)
    tags = {node: ports.node_tag(c.state_root(node)) for node in ("node1", "node2")}

    def owners() -> set[str]:
        """The nodes whose rules publish the container's port (a host has both)."""
        return {n for r in tnet.port_rules(cid) for n, t in tags.items() if f"jaula:{t}:" in r}

    for addr in ("127.0.0.1", routed):
        assert tnet.http_get(addr, port, "/hostname").strip() == cid[:12], addr
    assert owners() == {"node1"}
    with socket.socket() as squatter:  # the host port taken on the destination's side
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        p = c.op("migrate", "web", "node2", check=False)
        assert p.returncode == 125
        assert f"host port 0.0.0.0:{port}/tcp is in use" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    c.assert_only_on("web", "node1")
    assert owners() == {"node1"}  # refused before the freeze: the source's rules kept
    c.op("migrate", "web", "node2")
    c.assert_only_on("web", "node2")
    assert owners() == {"node2"}  # the destination's rules, none of the source's
    assert c.local("node2").out("port", "web") == f"80/tcp -> 0.0.0.0:{port}\n"
    for addr in ("127.0.0.1", routed):
        assert tnet.http_get(addr, port, "/hostname").strip() == cid[:12], addr
    c.local("node2").run("rm", "-f", "web")
    assert tnet.port_rules(cid) == []
