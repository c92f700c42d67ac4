"""What both backends check and compute the same way: names, ids, subnets, the address pick.

Every name or id becomes part of a key (etcd) or a JSON member name (files), so each is
checked before it is used: a ``/`` or a control character never reaches a key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection

from migrate import keys

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ELECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
#: how many addresses :func:`pick_address` tries before it says the subnet is full
MAX_SCAN = 1 << 20


def check_node(node: str) -> str:
    """``node`` when it is a valid node name (:data:`migrate.keys.NAME_PATTERN`), else
    ValueError naming it."""
    if not isinstance(node, str) or not keys.NAME_PATTERN.fullmatch(node):
        raise ValueError(
            f"{node!r} is not a node name: 1 to 63 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit"
        )
    return node


def check_container_id(container_id: str) -> str:
    """``container_id`` when it is a container id or name (up to 128 letters, digits,
    ``_ . -``), else ValueError naming it."""
    if not isinstance(container_id, str) or not _CONTAINER_ID.fullmatch(container_id):
        raise ValueError(
            f"{container_id!r} is not a container id: up to 128 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    return container_id


def check_election(name: str) -> str:
    """``name`` when it is a valid election name, else ValueError."""
    if not isinstance(name, str) or not _ELECTION.fullmatch(name):
        raise ValueError(f"{name!r} is not an election name: letters, digits, '_', '.', '-'")
    return name


def check_kind(kind: str) -> str:
    """``kind`` when it is a valid event kind (letters, digits, ``_ . : -``), else ValueError."""
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"{kind!r} is not an event kind: letters, digits, '_', '.', ':', '-'")
    return kind


def canonical_subnet(subnet: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``subnet`` parsed strictly (``10.88.0.0/16``; host bits must be zero), with room for
    at least one container after the gateway.  ValueError naming it otherwise."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as e:
        raise ValueError(f"{subnet!r} is not a subnet such as 10.88.0.0/16: {e}") from None
    if net.num_addresses < 4:
        raise ValueError(f"subnet {net} is too small: it needs a gateway and a container")
    return net


def check_address(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network, address: str
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``address`` parsed, when it is a host address of ``net`` other than its first (the
    gateway's); ValueError otherwise."""
    try:
        a = ipaddress.ip_address(address)
    except ValueError as e:
        raise ValueError(f"{address!r} is not an IP address: {e}") from None
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    if a.version != net.version or not first < int(a) <= last:
        lo, hi = net.network_address + 2, net.network_address + (last - first + 1)
        raise ValueError(f"{a} is not a container address of {net}: use one from {lo} to {hi}")
    return a


def pick_address(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network, used: Collection[str]
) -> str | None:
    """The lowest host address of ``net`` after the first that is not in ``used`` (text
    forms), or None when every one (of the first :data:`MAX_SCAN`) is used."""
    base = net.network_address
    last = int(net.broadcast_address) - int(base) - (1 if net.version == 4 else 0)
    for offset in range(2, min(last, MAX_SCAN) + 1):
        a = str(base + offset)
        if a not in used:
            return a
    return None
