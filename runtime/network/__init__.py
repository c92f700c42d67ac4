"""Container networks on one node: ``--network bridge`` (a veth into the node's bridge).

A node's bridge network is described by :class:`NetworkConfig` (bridge name, subnet, gateway,
MTU), read from ``<state root>/network.json`` when present (the node service writes it from
the cluster file's ``[network]`` section), else the single-host default :data:`DEFAULT`.
Addresses are leased through :class:`IpLeases`: :class:`~runtime.network.ipam.FileLeases`
(a locked file, enough for one host) or, on a node service, the cluster state's leases
through an adapter in ``migrate`` (the runtime imports nothing from migrate).

What a bridged container gets (:class:`Attachment`, kept in its ``config.json``)::

    host netns                         container netns (pinned at <cdir>/netns until the
      bridge jaula0 (gateway/prefix)     init has joined it; it dies with the container)
        └─ jl<id[:12]> ══ veth ══════════► eth0  ip/prefix, mac, mtu, default via gateway
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from runtime.errors import ConfigError

#: the file under a state root that configures its bridge network (JSON of NetworkConfig)
NETWORK_FILE = "network.json"
#: the single-host lease file under a state root
LEASES_FILE = "network-leases.json"

_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class NetworkError(ConfigError):
    """A network request that cannot be met (no address free, address taken or outside the
    subnet, bridge missing, a netlink failure).  The message names what to do."""


class NoAddressFree(NetworkError):
    """Every address of the subnet is leased, or the one asked for is another container's."""


@dataclass(frozen=True)
class NetworkConfig:
    """A node's bridge network.

    Attributes:
        bridge: the Linux bridge's name (at most 15 characters).
        subnet: IPv4 subnet in CIDR form (``10.89.0.0/24``); the same on every node.
        gateway: the bridge's address, the containers' default route ('' = first host).
        mtu: MTU of the bridge and of every container's veth, bytes.
        create_bridge: make the bridge (with the gateway address) when missing; False when
            the operator provides it (an uplink NIC or VXLAN in it): a missing bridge is then
            an error.
        leases_file: the lease file shared by the nodes of one host ('' = the state root's).
    """

    bridge: str = "jaula0"
    subnet: str = "10.89.0.0/24"
    gateway: str = ""
    mtu: int = 1500
    create_bridge: bool = True
    leases_file: str = ""

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet, strict=False)

    @property
    def gateway_ip(self) -> str:
        return self.gateway or str(next(self.network.hosts()))

    def validate(self) -> NetworkConfig:
        """Return self; ConfigError naming the bad field otherwise."""
        if not _BRIDGE_RE.match(self.bridge):
            raise NetworkError(
                f"invalid bridge name {self.bridge!r}: use 1-15 letters, digits, '_', '.', '-'"
            )
        try:
            net = ipaddress.IPv4Network(self.subnet, strict=False)
        except ValueError as e:
            raise NetworkError(
                f"invalid network subnet {self.subnet!r}: use IPv4 CIDR like 10.89.0.0/24"
            ) from e
        if net.prefixlen > 30:
            raise NetworkError(f"network subnet {self.subnet} is too small: use /30 or larger")
        if self.gateway and ipaddress.IPv4Address(self.gateway) not in net:
            raise NetworkError(f"gateway {self.gateway} is outside subnet {net}: fix [network]")
        if not 576 <= self.mtu <= 65535:
            raise NetworkError(f"invalid network MTU {self.mtu}: use 576-65535")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, root: Path) -> NetworkConfig:
        """``<root>/network.json`` when present, else the defaults.  NetworkError when it
        is not valid JSON of this class."""
        path = root / NETWORK_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except ValueError as e:
            raise NetworkError(f"{path} is not valid JSON ({e}): fix or remove it") from e
        try:
            return cls(**raw).validate()
        except TypeError as e:
            raise NetworkError(f"{path}: {e}: fix or remove it") from e


@dataclass(frozen=True)
class Attachment:
    """A bridged container's network identity (kept in its config; moves with it).

    Attributes:
        ip: its IPv4 address; prefixlen: the subnet's prefix length.
        gateway: its default route; mac: ``02:..`` lowercase, derived from the id unless asked.
        bridge: the bridge it is plugged into on this node; mtu: bytes.
        host_if: the host side of its veth (``jl`` + id[:12]).
        dns: nameservers for /etc/resolv.conf; add_hosts: ``NAME:IP`` lines for /etc/hosts.
    """

    ip: str
    prefixlen: int
    gateway: str
    mac: str
    bridge: str
    mtu: int
    host_if: str
    subnet: str = ""
    dns: tuple[str, ...] = ()
    add_hosts: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Attachment:
        d = dict(d)
        d["dns"] = tuple(d.get("dns", ()))
        d["add_hosts"] = tuple(d.get("add_hosts", ()))
        return cls(**d)


class IpLeases(Protocol):
    """Cluster-wide IPv4 leases: never two containers on one address.  The embedded
    default is :class:`runtime.network.ipam.FileLeases`; a node service passes an adapter
    over its cluster state (etcd or files)."""

    def lease_ip(self, subnet: str, container_id: str, address: str | None = None) -> str:
        """Lease ``address`` (or the lowest free host address after the gateway) of
        ``subnet`` to ``container_id``; the one it holds already when it has one.  Returns
        the address.  NoAddressFree when none is free or ``address`` is another's;
        NetworkError when ``address`` is outside ``subnet``."""
        ...

    def release_ip(self, subnet: str, container_id: str) -> bool:
        """Give ``container_id``'s address back; False when it held none."""
        ...


def mac_from_id(container_id: str) -> str:
    """A locally administered unicast MAC (``02:xx:..``) from the container id: the same id
    gives the same MAC on every node."""
    h = hashlib.sha256(container_id.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in h[:5])


def check_mac(mac: str) -> str:
    """``mac`` lowercased; NetworkError unless it is a unicast MAC ``xx:xx:xx:xx:xx:xx``."""
    m = mac.strip().lower()
    if not _MAC_RE.match(m) or int(m[:2], 16) & 1 or m == "00:00:00:00:00:00":
        raise NetworkError(
            f"invalid --mac-address {mac!r}: use a unicast MAC like 02:42:ac:11:00:02"
        )
    return m


def check_ip(cfg: NetworkConfig, ip: str) -> str:
    """``ip`` as a host address of ``cfg``'s subnet other than the gateway; NetworkError
    otherwise."""
    try:
        a = ipaddress.IPv4Address(ip.strip())
    except ValueError as e:
        raise NetworkError(f"invalid --ip {ip!r}: use an IPv4 address of {cfg.subnet}") from e
    net = cfg.network
    if a not in net or a in (net.network_address, net.broadcast_address):
        raise NetworkError(f"--ip {ip} is outside subnet {net}: pick a host address in it")
    if str(a) == cfg.gateway_ip:
        raise NetworkError(f"--ip {ip} is the gateway of {net}: pick another address")
    return str(a)


def host_if_name(container_id: str) -> str:
    """The host side of a container's veth: ``jl`` + 12 hex (15 characters at most)."""
    return "jl" + container_id[:12]


__all__ = [
    "LEASES_FILE",
    "NETWORK_FILE",
    "Attachment",
    "IpLeases",
    "NetworkConfig",
    "NetworkError",
    "NoAddressFree",
    "check_ip",
    "check_mac",
    "host_if_name",
    "mac_from_id",
]
