"""IPv4 leases in one locked JSON file: the embedded default for the nodes of one host.

File format (``network-leases.json``, rewritten atomically under an flock of
``network-leases.json.lock``)::

    {"subnets": {"10.89.0.0/24": {"10.89.0.2": "<container id>", ...}}}

The first host address of a subnet is the gateway's and is never leased; the lowest free one
after it is picked.  Several nodes (state roots) of one host share a file by naming it in
:attr:`runtime.network.NetworkConfig.leases_file`.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from runtime.network import NetworkError, NoAddressFree
from runtime.state import atomic_write_json
from runtime.store import flocked


def _net(subnet: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(subnet, strict=False)
    except ValueError as e:
        raise NetworkError(f"invalid subnet {subnet!r}: use IPv4 CIDR like 10.89.0.0/24") from e


def pick_free(net: ipaddress.IPv4Network, taken: set[str]) -> str | None:
    """The lowest host address of ``net`` after the first (the gateway) not in ``taken``."""
    hosts = net.hosts()
    next(hosts, None)
    for a in hosts:
        if str(a) not in taken:
            return str(a)
    return None


class FileLeases:
    """:class:`runtime.network.IpLeases` over one locked file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"subnets": {}}
        except ValueError as e:
            raise NetworkError(f"lease file {self.path} is corrupt ({e}): fix or remove it") from e
        return doc

    def lease_ip(self, subnet: str, container_id: str, address: str | None = None) -> str:
        net = _net(subnet)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with flocked(self.path.with_name(self.path.name + ".lock")):
            doc = self._read()
            leases: dict[str, str] = doc.setdefault("subnets", {}).setdefault(str(net), {})
            for a, cid in leases.items():
                if cid == container_id:
                    return a
            if address is not None:
                if ipaddress.IPv4Address(address) not in net:
                    raise NetworkError(f"--ip {address} is outside subnet {net}")
                if address in leases:
                    raise NoAddressFree(
                        f"--ip {address} is taken by container {leases[address][:12]}: "
                        "pick another address or leave --ip out"
                    )
                pick: str | None = address
            else:
                pick = pick_free(net, set(leases))
            if pick is None:
                raise NoAddressFree(
                    f"every address of {net} is leased: remove a container or use a larger subnet"
                )
            leases[pick] = container_id
            atomic_write_json(self.path, doc)
            return pick

    def release_ip(self, subnet: str, container_id: str) -> bool:
        net = _net(subnet)
        if not self.path.exists():
            return False
        with flocked(self.path.with_name(self.path.name + ".lock")):
            doc = self._read()
            leases: dict[str, str] = doc.setdefault("subnets", {}).setdefault(str(net), {})
            mine = [a for a, cid in leases.items() if cid == container_id]
            for a in mine:
                del leases[a]
            if mine:
                atomic_write_json(self.path, doc)
            return bool(mine)

    def leases(self, subnet: str) -> dict[str, str]:
        """address -> container id for ``subnet`` (for tests and ``inspect``)."""
        got: dict[str, str] = self._read().get("subnets", {}).get(str(_net(subnet)), {})
        return dict(got)
