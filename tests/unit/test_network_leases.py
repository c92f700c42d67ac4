"""IP leases behind runtime.network.IpLeases: the locked file and the cluster-state adapter
give the same answers; MAC and address checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrate.cluster_state.files import FilesState
from migrate.net_leases import ClusterLeases
from runtime.network import (
    IpLeases,
    NetworkConfig,
    NetworkError,
    NoAddressFree,
    check_ip,
    check_mac,
    mac_from_id,
)
from runtime.network.ipam import FileLeases

A, B, C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture(params=["file", "cluster"])
def leases(request: pytest.FixtureRequest, tmp_path: Path) -> IpLeases:
    if request.param == "file":
        return FileLeases(tmp_path / "leases.json")
    return ClusterLeases(FilesState(tmp_path / "state"))


def test_lowest_free_after_the_gateway_and_sticky(leases: IpLeases) -> None:
    net = "10.9.0.0/30"  # .1 gateway, .2 the only host left
    assert leases.lease_ip(net, A) == "10.9.0.2"
    assert leases.lease_ip(net, A) == "10.9.0.2"  # the one it holds
    with pytest.raises(NoAddressFree):
        leases.lease_ip(net, B)
    assert leases.release_ip(net, A)
    assert not leases.release_ip(net, A)
    assert leases.lease_ip(net, B) == "10.9.0.2"


def test_asked_address_taken(leases: IpLeases) -> None:
    net = "10.9.1.0/24"
    assert leases.lease_ip(net, A, "10.9.1.7") == "10.9.1.7"
    with pytest.raises(NoAddressFree):
        leases.lease_ip(net, B, "10.9.1.7")
    assert leases.lease_ip(net, C) == "10.9.1.2"


def test_checks() -> None:
    cfg = NetworkConfig(subnet="10.9.2.0/24")
    assert check_ip(cfg, "10.9.2.5") == "10.9.2.5"
    for bad in ("10.9.3.5", "10.9.2.1", "10.9.2.255", "nope"):
        with pytest.raises(NetworkError):
            check_ip(cfg, bad)
    assert check_mac("02:AA:bb:cc:dd:ee") == "02:aa:bb:cc:dd:ee"
    for bad in ("03:00:00:00:00:01", "02:00:00:00:00", "00:00:00:00:00:00"):
        with pytest.raises(NetworkError):
            check_mac(bad)
    m = mac_from_id(A)
    assert m == mac_from_id(A) != mac_from_id(B)
    assert check_mac(m) == m  # unicast, locally administered


def test_only_what_jaula_set_up_is_expected_in_a_bridged_namespace() -> None:
    from migrate.netmove import unexpected
    from runtime.network import Attachment

    att = Attachment("10.9.2.5", 24, "10.9.2.1", mac_from_id(A), "br0", 1500, "jl" + A[:12])
    ours = (
        ("eth0 (veth)",),
        ("10.9.2.5/24 on eth0", "fe80::1/64 on eth0"),
        ("default table main",),
        (),
    )
    assert unexpected(att, *ours) == []
    links, addrs, routes, rules = ours
    assert unexpected(att, links + ("eth1 (veth)",), addrs, routes, rules) == ["eth1 (veth)"]
    assert unexpected(att, links, addrs + ("192.0.2.9/32 on eth0",), routes, rules) == [
        "192.0.2.9/32 on eth0"
    ]
    assert unexpected(att, links, addrs, routes + ("10.0.0.0/8 table main",), ("priority 5",)) == [
        "10.0.0.0/8 table main",
        "priority 5",
    ]
