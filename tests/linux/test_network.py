"""``--network bridge`` on one node: real bridges, veths and net namespaces, made and
removed by each test (tests.helpers.net checks that nothing is left)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from runtime.network import host_if_name, mac_from_id
from tests.helpers import net as tnet
from tests.helpers.jaula import Jaula

pytestmark = pytest.mark.root


@pytest.fixture
def bridged(jaula: Jaula) -> Iterator[tnet.BridgeNet]:
    """``jaula``'s root on a scratch bridge network (/28); checked and removed after."""
    with tnet.bridge_network(jaula) as net:
        yield net


def _run_bridged(j: Jaula, *args: str) -> str:
    return j.out("run", "-d", "--network", "bridge", *args).strip()


def _inspect(j: Jaula, cid: str) -> dict[str, object]:
    got: list[dict[str, object]] = json.loads(j.out("inspect", cid))
    return got[0]


def test_containers_reach_the_gateway_and_each_other(jaula: Jaula, bridged: tnet.BridgeNet) -> None:
    a = _run_bridged(jaula, "--cap-add", "NET_RAW", "--name", "a", "busybox", "sleep", "60")
    b = _run_bridged(jaula, "--name", "b", "busybox", "sleep", "60")
    b_ip = _inspect(jaula, b)["NetworkSettings"]["IPAddress"]  # type: ignore[index]
    assert b_ip == bridged.host(3)  # .1 is the gateway, a took .2
    assert tnet.leases(jaula.root, bridged) == {bridged.host(2): a, bridged.host(3): b}
    assert sorted(tnet.bridge_ports(bridged.bridge)) == sorted(map(host_if_name, (a, b)))
    for dest in (bridged.gateway, b_ip):
        p = jaula.run("exec", "a", "busybox", "ping", "-c", "1", "-W", "5", str(dest), check=False)
        assert p.returncode == 0, f"a cannot reach {dest}: {p.stdout} {p.stderr}"
    eth0 = jaula.out("exec", "a", "cat", "/sys/class/net/eth0/address").strip()
    assert eth0 == mac_from_id(a)
    route = jaula.out("exec", "a", "busybox", "ip", "route")
    assert f"default via {bridged.gateway} dev eth0" in route
    hosts = jaula.out("exec", "a", "cat", "/etc/hosts")
    assert f"{bridged.host(2)}\t{a[:12]} a" in hosts
    assert jaula.out("exec", "a", "cat", "/etc/hostname").strip() == a[:12]


def test_asked_ip_mac_dns_and_hosts(jaula: Jaula, bridged: tnet.BridgeNet) -> None:
    ip = bridged.host(9)
    cid = _run_bridged(
        jaula,
        "--ip",
        ip,
        "--mac-address",
        "02:42:AC:11:00:09",
        "--dns",
        "192.0.2.53",
        "--add-host",
        "db:192.0.2.7",
        "busybox",
        "sleep",
        "60",
    )
    addr = jaula.out("exec", cid, "busybox", "ip", "-4", "addr", "show", "eth0")
    assert f"inet {ip}/28" in addr
    assert jaula.out("exec", cid, "cat", "/sys/class/net/eth0/address").strip() == (
        "02:42:ac:11:00:09"
    )
    assert jaula.out("exec", cid, "cat", "/etc/resolv.conf") == "nameserver 192.0.2.53\n"
    assert "192.0.2.7\tdb" in jaula.out("exec", cid, "cat", "/etc/hosts")


def test_stop_and_exit_free_the_veth_and_rm_the_lease(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    a = _run_bridged(jaula, "busybox", "sleep", "60")
    b = _run_bridged(jaula, "busybox", "true")
    jaula.run("stop", "-t", "1", a)
    jaula.run("wait", b, check=False)
    assert tnet.bridge_ports(bridged.bridge) == []
    assert host_if_name(a) not in tnet.links()
    assert a not in tnet.leases(jaula.root, bridged).values()  # stop gives the lease back
    jaula.run("rm", a, b)
    assert tnet.leases(jaula.root, bridged) == {}


def test_a_failed_run_leaves_nothing(jaula: Jaula, bridged: tnet.BridgeNet) -> None:
    p = jaula.run("run", "-d", "--network", "bridge", "busybox", "/no/such/program", check=False)
    assert p.returncode != 0
    assert jaula.container_ids() == []
    assert tnet.bridge_ports(bridged.bridge) == []
    assert tnet.leases(jaula.root, bridged) == {}


def _refused(j: Jaula, *args: str) -> str:
    before = j.container_ids()
    p = j.run("run", "-d", "--network", "bridge", *args, "busybox", "sleep", "60", check=False)
    assert p.returncode == 125, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert j.container_ids() == before
    return lines[0]


def test_bad_input_is_refused_and_leaves_nothing(jaula: Jaula, bridged: tnet.BridgeNet) -> None:
    net = tnet.BridgeNet(bridged.bridge, tnet.scratch_subnet(30))  # one address after .1
    net.write(jaula.root)
    only = _run_bridged(jaula, "busybox", "sleep", "60")
    assert "every address of" in _refused(jaula)
    assert f"--ip {net.host(2)} is taken by container {only[:12]}" in _refused(
        jaula, "--ip", net.host(2)
    )
    assert "is outside subnet" in _refused(jaula, "--ip", "192.0.2.9")
    assert "invalid --mac-address" in _refused(jaula, "--mac-address", "03:00:00:00:00:01")
    assert "invalid --add-host" in _refused(jaula, "--add-host", "nocolon")
    jaula.run("rm", "-f", only)
    assert tnet.leases(jaula.root, net) == {}
    bridged.write(jaula.root)


def test_a_missing_bridge_is_refused(jaula: Jaula) -> None:
    net = tnet.BridgeNet(tnet.new_bridge_name(), tnet.scratch_subnet(), create=False)
    with tnet.bridge_network(jaula, net):
        msg = _refused(jaula)
        assert f"bridge {net.bridge} does not exist" in msg
        assert net.bridge not in tnet.links()
        assert tnet.leases(jaula.root, net) == {}


def test_checkpoint_and_restore_keep_the_address(jaula: Jaula, bridged: tnet.BridgeNet) -> None:
    cid = _run_bridged(jaula, "--cap-add", "NET_RAW", "--name", "cr", "busybox", "sleep", "300")
    jaula.run("checkpoint", "cr")
    assert tnet.bridge_ports(bridged.bridge) == []  # the namespace died with the tasks
    assert tnet.leases(jaula.root, bridged) == {bridged.host(2): cid}  # kept while checkpointed
    jaula.run("restore", "cr")
    assert tnet.bridge_ports(bridged.bridge) == [host_if_name(cid)]
    addr = jaula.out("exec", "cr", "busybox", "ip", "-4", "addr", "show", "eth0")
    assert f"inet {bridged.host(2)}/28" in addr
    p = jaula.run(
        "exec", "cr", "busybox", "ping", "-c", "1", "-W", "5", bridged.gateway, check=False
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_what_jaula_did_not_set_up_is_refused(jaula: Jaula, bridged: tnet.BridgeNet) -> None:
    _run_bridged(jaula, "--name", "odd", "busybox", "sleep", "300")
    pid = _inspect(jaula, "odd")["State"]["Pid"]  # type: ignore[index]
    added = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "addr", "add", "192.0.2.99/32", "dev", "eth0"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    p = jaula.run("checkpoint", "odd", check=False)
    assert p.returncode == 125
    assert "192.0.2.99/32 on eth0" in p.stderr and "keeps running" in p.stderr
    assert _inspect(jaula, "odd")["State"]["Status"] == "running"  # type: ignore[index]
