"""``jaula run -p``: published ports as iptables DNAT rules on one node (real containers, real
rules in the host's nat table; tests.helpers.net checks that no veth, lease or rule is left)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from runtime.poll import wait_for
from tests.helpers import net as tnet
from tests.helpers.jaula import Jaula

pytestmark = pytest.mark.root


@pytest.fixture
def bridged(jaula: Jaula) -> Iterator[tnet.BridgeNet]:
    """``jaula``'s root on a scratch bridge network; afterwards nothing of its network (its
    published ports' rules included) is left."""
    with tnet.bridge_network(jaula) as net:
        yield net


def _serve(j: Jaula, *args: str) -> str:
    """A bridged container running busybox httpd on port 80 (serving /etc)."""
    return j.out(
        "run", "-d", "--network", "bridge", *args, "busybox", "busybox", "httpd", "-f", "-p", "80", "-h", "/etc"
    ).strip()  # fmt: skip


def _inspect(j: Jaula, ref: str) -> dict[str, object]:
    got: list[dict[str, object]] = json.loads(j.out("inspect", ref))
    return got[0]


def test_a_published_port_is_reached_on_loopback_and_the_bridge_address(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    port = tnet.free_port()
    cid = _serve(jaula, "--name", "web", "-p", f"{port}:80")
    hostname = cid[:12]
    for addr in ("127.0.0.1", bridged.gateway):
        assert tnet.http_get(addr, port, "/hostname").strip() == hostname, addr
    assert jaula.out("port", "web") == f"80/tcp -> 0.0.0.0:{port}\n"
    assert jaula.out("port", "web", "80/tcp") == f"0.0.0.0:{port}\n"
    settings = _inspect(jaula, "web")["NetworkSettings"]
    assert settings["Ports"] == {"80/tcp": [{"HostIp": "", "HostPort": str(port)}]}  # type: ignore[index]
    mine = tnet.port_rules(cid)
    assert any("-j DNAT" in r and f"--dport {port}" in r for r in mine), mine
    jaula.run("rm", "-f", "web")
    assert tnet.port_rules(cid) == []
    assert tnet.jaula_chains() == []  # the last rule took the chains and jumps along


def test_stop_removes_the_rules_and_start_puts_them_back(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    port = tnet.free_port()
    cid = _serve(jaula, "--name", "web", "-p", f"127.0.0.1:{port}:80/tcp", "-p", "5353/udp")
    lines = jaula.out("port", "web").splitlines()
    assert lines[0] == f"80/tcp -> 127.0.0.1:{port}"
    assert lines[1].startswith("5353/udp -> 0.0.0.0:") and not lines[1].endswith(":0")
    jaula.run("stop", "-t", "1", "web")
    assert tnet.port_rules(cid) == []
    jaula.run("start", "web")
    assert tnet.http_get("127.0.0.1", port, "/hostname").strip() == cid[:12]
    assert len([r for r in tnet.port_rules(cid) if "-j DNAT" in r]) == 2


def _refused(j: Jaula, *args: str) -> str:
    before = j.container_ids()
    p = j.run("run", "-d", *args, "busybox", "sleep", "60", check=False)
    assert p.returncode == 125, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert j.container_ids() == before
    return lines[0]


def test_a_taken_host_port_is_refused_before_anything_starts(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    port = tnet.free_port()
    first = _serve(jaula, "-p", f"{port}:80")
    rules = tnet.port_rules(first)
    msg = _refused(jaula, "--network", "bridge", "-p", f"{port}:8080")
    assert f"host port 0.0.0.0:{port}/tcp is already published by container {first[:12]}" in msg
    assert tnet.leases(jaula.root, bridged) == {bridged.host(2): first}  # nothing leased
    with socket.socket() as s:  # a listening socket of the host
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        msg = _refused(jaula, "--network", "bridge", "-p", f"{busy}:80")
        assert f"host port 0.0.0.0:{busy}/tcp is in use" in msg
    for spec in ("192.0.2.77:8080:80", "192.0.2.77::80"):
        assert "192.0.2.77 is not an address of this node" in _refused(
            jaula, "--network", "bridge", "-p", spec
        )
    assert "invalid -p '80-90:80'" in _refused(jaula, "--network", "bridge", "-p", "80-90:80")
    assert "-p needs --network bridge (not none)" in _refused(jaula, "-p", "8080:80")
    assert "-p needs --network bridge (not host)" in _refused(
        jaula, "--network", "host", "-p", "8080:80"
    )
    assert tnet.port_rules(first) == rules  # the first container's rules untouched


def test_a_container_that_exits_takes_its_rules_along(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    port = tnet.free_port()
    cid = jaula.out("run", "-d", "--network", "bridge", "-p", f"{port}:80", "busybox",
                    "sleep", "1").strip()  # fmt: skip
    assert tnet.port_rules(cid) != []
    jaula.run("wait", cid)
    assert wait_for(lambda: tnet.port_rules(cid) == [], 10)  # the monitor removes them
    jaula.run("start", cid)
    assert tnet.port_rules(cid) != []


def test_checkpoint_drops_the_rules_and_restore_puts_them_back(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    port = tnet.free_port()
    cid = _serve(jaula, "--name", "web", "-p", f"{port}:80")
    jaula.run("checkpoint", "web")
    assert wait_for(lambda: tnet.port_rules(cid) == [], 10)  # its monitor removed them
    jaula.run("restore", "web")
    assert tnet.http_get("127.0.0.1", port, "/hostname").strip() == cid[:12]


def _get_from(j: Jaula, who: str, addr: str, port: int) -> str:
    """``GET /hostname`` from inside container ``who`` with busybox nc (busybox-static's
    wget crashes in its name-service code); the response's last line, or ''."""
    req = f"printf 'GET /hostname HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {addr} {port}"
    p = j.run("exec", who, "sh", "-c", req, check=False)
    return p.stdout.strip() if p.returncode == 0 else ""


def test_a_published_port_is_reached_from_the_bridge_itself(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    # the hairpin: the container itself and a neighbour on its bridge reach its published
    # port through the node's address (the bridge's gateway); without the subnet's
    # masquerade the reply comes from the container's own address and the request fails
    port = tnet.free_port()
    cid = _serve(jaula, "--name", "web", "-p", f"{port}:80")
    jaula.run("run", "-d", "--network", "bridge", "--name", "peer", "busybox", "sleep", "600")
    for who in ("web", "peer"):
        got = wait_for(partial(_get_from, jaula, who, bridged.gateway, port), 30)
        assert got.endswith(cid[:12]), (who, got)
    masq = [r for r in tnet.port_rules(cid) if "MASQUERADE" in r and bridged.subnet in r]
    assert masq, tnet.port_rules(cid)
    host_if = "jl" + cid[:12]
    assert Path(f"/sys/class/net/{host_if}/brport/hairpin_mode").read_text().strip() == "1"


def test_a_restarted_bridged_container_keeps_its_address_and_ports(
    jaula: Jaula, bridged: tnet.BridgeNet
) -> None:
    # the net namespace is pinned at the container's dir, so the restarted init joins the
    # same one: the same eth0, address and published port (Podman keeps them too)
    port = tnet.free_port()
    script = "busybox ip -4 -o addr show eth0 | busybox awk '{print $4}'; exit 3"
    jaula.out(
        "run", "-d", "--network", "bridge", "--name", "r", "--restart", "on-failure:2",
        "-p", f"{port}:80", "busybox", "sh", "-c", script,
    )  # fmt: skip
    assert jaula.out("wait", "r").strip() == "3"
    addrs = jaula.out("logs", "r").splitlines()
    (d,) = json.loads(jaula.out("inspect", "r"))
    ip = d["NetworkSettings"]["IPAddress"]
    assert addrs == [f"{ip}/{bridged.subnet.split('/')[1]}"] * 3, (addrs, ip)
    assert d["RestartCount"] == 2
    assert tnet.port_rules(d["Id"]) == []  # the last exit took its rules along
