"""``-p`` parsing, Podman's output shapes and the overlap rule (no root, no iptables)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.network import NetworkError
from runtime.network.ports import PortMapping, check_unique, node_tag, parse_publish
from runtime.spec import ContainerConfig


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("8080:80", PortMapping(8080, 80)),
        ("80", PortMapping(0, 80)),
        ("127.0.0.1:8080:80/tcp", PortMapping(8080, 80, "tcp", "127.0.0.1")),
        ("127.0.0.1::80", PortMapping(0, 80, "tcp", "127.0.0.1")),
        ("0.0.0.0:53:53/UDP", PortMapping(53, 53, "udp", "")),
        ("5353/udp", PortMapping(0, 5353, "udp")),
    ],
)
def test_podman_spellings(spec: str, want: PortMapping) -> None:
    assert parse_publish(spec) == want


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("80-90:80", "no ranges"),
        ("[::1]:80:80", "IPv4 only"),
        ("8080:80/sctp", "use tcp or udp"),
        ("70000:80", "host port 70000 is not in 1-65535"),
        ("8080:0", "container port 0"),
        ("999.1.1.1:80:80", "is not an IPv4 address"),
    ],
)
def test_bad_specs_are_one_line_errors(spec: str, says: str) -> None:
    with pytest.raises(NetworkError, match=says) as e:
        parse_publish(spec)
    assert "\n" not in str(e.value)


def test_podman_port_line_and_overlap() -> None:
    any_addr, lo = PortMapping(8080, 80), PortMapping(8080, 81, "tcp", "127.0.0.1")
    assert any_addr.podman_line() == "80/tcp -> 0.0.0.0:8080"
    assert lo.podman_line() == "81/tcp -> 127.0.0.1:8080"
    assert any_addr.overlaps(lo)
    assert not lo.overlaps(PortMapping(8080, 80, "tcp", "127.0.0.2"))
    assert not any_addr.overlaps(PortMapping(8080, 80, "udp"))
    with pytest.raises(NetworkError, match="given twice"):
        check_unique([any_addr, lo])
    check_unique([PortMapping(0, 80), PortMapping(0, 81)])  # both picked later


def test_the_mappings_travel_in_the_config() -> None:
    cfg = ContainerConfig(
        id="a" * 64, name="x", image_id="i", image_ref="r", layers=(), args=("sh",), env=(),
        ports=(PortMapping(8080, 80), PortMapping(5353, 53, "udp", "127.0.0.1")),
    )  # fmt: skip
    again = ContainerConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again.ports == cfg.ports
    assert ContainerConfig.from_json({**cfg.to_json(), "ports": []}).ports == ()
    del_ports = {k: v for k, v in cfg.to_json().items() if k != "ports"}  # an older record
    assert ContainerConfig.from_json(del_ports).ports == ()


def test_node_tags_name_state_roots() -> None:
    assert node_tag(Path("/var/lib/jaula")) == node_tag(Path("/var/lib/jaula/"))
    assert node_tag(Path("/var/lib/jaula")) != node_tag(Path("/var/lib/jaula2"))
    assert len(node_tag(Path("/x"))) == 8
