"""Published ports (``jaula run -p``): iptables DNAT in chains jaula owns (the one module that
runs ``iptables``; argv lists, never a shell line).

A mapping ``[HOSTIP:][HOSTPORT:]CTRPORT[/tcp|/udp]`` (Podman's spelling) of a bridged
container becomes, in the host's ``nat`` table::

    PREROUTING  -m addrtype --dst-type LOCAL -j JAULA-PORTS       (from other hosts)
    OUTPUT      -m addrtype --dst-type LOCAL -j JAULA-PORTS       (from this node itself)
    POSTROUTING -j JAULA-PORTS-MASQ
    JAULA-PORTS      [-d HOSTIP/32] -p PROTO --dport HOSTPORT
                     -m comment --comment jaula:<node>:<id> -j DNAT --to-destination IP:CTRPORT
    JAULA-PORTS-MASQ -s 127.0.0.0/8 -d IP/32 -p PROTO --dport CTRPORT
                     -m comment --comment jaula:<node>:<id> -j MASQUERADE
    JAULA-PORTS-MASQ -s SUBNET -d IP/32 -p PROTO --dport CTRPORT
                     -m comment --comment jaula:<node>:<id> -m conntrack --ctstate DNAT
                     -j MASQUERADE

The first masquerade rule and ``route_localnet=1`` on the bridge through which this node
reaches the container make ``127.0.0.1:HOSTPORT`` work from the node itself, as in Podman
(netavark does the same).

The second is the hairpin: a container of the bridge's subnet (the container itself
included) that reaches a published port through the node's address would get the reply
straight from the container, from an address it did not talk to.  Masqueraded to the
gateway, the reply comes back through the node and is translated back, as netavark's
``NETAVARK-HOSTPORT-SETMARK`` does for the subnet.  Only connections that went through a
DNAT rule are masqueraded (``--ctstate DNAT``): a neighbour talking to the container's own
address, bridged and seen by iptables through ``br_netfilter``, keeps its source.  It takes
two sysctls besides: ``forwarding=1`` on the bridge (the connection leaves by the bridge it
came in by; netavark sets the host-wide ``ip_forward``) and ``hairpin_mode=1`` on the
container's own bridge port (with ``br_netfilter`` the DNAT happens while the frame is
bridged, and a bridge sends a frame back out of the port it came in by only in hairpin
mode, as Docker sets it without its userland proxy).

``<node>`` is 8 hex of the state root's path: several nodes of one host (the
tests, ``make demo``) share one ``nat`` table, and each removes only its own rules, so a
migration's destination can install its rules before the source removes its own.  Every
change happens under the host-wide flock :data:`LOCK`; the chains and jumps are made by the
first rule and removed with the last, so a node with no published port has none of them.

A host port is taken when a rule of another container (of any node of this host) publishes
it on an overlapping address (one of the two is all addresses, or both are the same), or a
socket of this host is bound to it (a bind probe).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import re
import shlex
import socket
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from runtime.network import Attachment, NetworkError

log = structlog.get_logger(__name__)

CHAIN = "JAULA-PORTS"
MASQ_CHAIN = "JAULA-PORTS-MASQ"
#: the host-wide lock of every change to the chains (all nodes of this host share them)
LOCK = Path("/run/lock/jaula-ports.lock")
#: iptables' own xtables lock: wait this long, seconds
_XT_WAIT_S = "10"
_JUMPS = (
    ("PREROUTING", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", CHAIN)),
    ("OUTPUT", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", CHAIN)),
    ("POSTROUTING", ("-j", MASQ_CHAIN)),
)
_SPEC_RE = re.compile(
    r"^(?:(?:(?P<ip>[0-9.]+):)?(?P<host>\d*):)?(?P<ctr>\d+)(?:/(?P<proto>[A-Za-z]+))?$"
)


class PortInUse(NetworkError):
    """A host port asked for is published by another container or bound by a socket."""


@dataclass(frozen=True)
class PortMapping:
    """One published port.

    Attributes:
        host_port: the node's port (1-65535; 0 only before :func:`assign_host_ports`).
        container_port: the port inside the container (1-65535).
        protocol: ``tcp`` or ``udp``.
        host_ip: the node's IPv4 address it is published on; '' = every address.
    """

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PortMapping:
        return cls(**d)

    def podman_line(self) -> str:
        """As ``podman port`` prints it: ``80/tcp -> 0.0.0.0:8080``."""
        return (
            f"{self.container_port}/{self.protocol} -> {self.host_ip or '0.0.0.0'}:{self.host_port}"
        )

    def overlaps(self, other: PortMapping) -> bool:
        """Whether both claim one host port: same protocol and port, and one of them is on
        every address or both on the same one."""
        return (
            self.protocol == other.protocol
            and self.host_port == other.host_port
            and (not self.host_ip or not other.host_ip or self.host_ip == other.host_ip)
        )

    @property
    def loopback(self) -> bool:
        """Reachable on 127.0.0.1 (all addresses, or a loopback one)."""
        return not self.host_ip or ipaddress.IPv4Address(self.host_ip).is_loopback


def parse_publish(spec: str) -> PortMapping:
    """Parse one ``-p`` value, ``[[HOSTIP:][HOSTPORT]:]CTRPORT[/tcp|/udp]``; a missing
    HOSTPORT is 0 (a free one is picked at run, :func:`assign_host_ports`).  NetworkError
    naming what is wrong (ranges and IPv6 are not supported)."""
    m = _SPEC_RE.match(spec.strip())
    hint = "use [HOSTIP:]HOSTPORT:CTRPORT[/tcp|/udp], e.g. -p 8080:80"
    if not m:
        raise NetworkError(f"invalid -p {spec!r}: {hint} (no ranges, IPv4 only)")
    proto = (m["proto"] or "tcp").lower()
    if proto not in ("tcp", "udp"):
        raise NetworkError(f"invalid -p {spec!r}: protocol {m['proto']!r}, use tcp or udp")
    ip = m["ip"] or ""
    if ip:
        try:
            a = ipaddress.IPv4Address(ip)
        except ValueError:
            raise NetworkError(f"invalid -p {spec!r}: {ip!r} is not an IPv4 address") from None
        ip = "" if a.is_unspecified else str(a)
    host = int(m["host"]) if m["host"] else 0
    ctr = int(m["ctr"])
    for what, n, low in (("host port", host, 0), ("container port", ctr, 1)):
        if not low <= n <= 65535:
            raise NetworkError(f"invalid -p {spec!r}: {what} {n} is not in 1-65535")
    return PortMapping(host, ctr, proto, ip)


def check_unique(mappings: Iterable[PortMapping]) -> None:
    """NetworkError when two of ``mappings`` claim one host port."""
    seen: list[PortMapping] = []
    for m in mappings:
        for s in seen:
            if m.host_port and m.overlaps(s):
                raise NetworkError(
                    f"-p {m.host_port}/{m.protocol} is given twice: publish a host port once"
                )
        seen.append(m)


def node_tag(root: Path) -> str:
    """8 hex naming the state root ``root`` in rule comments (the same path, the same tag)."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]


def _comment(tag: str, cid: str) -> str:
    return f"jaula:{tag}:{cid}"


# -- iptables ------------------------------------------------------------------------------


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``iptables -w N -t nat ARGS``.  NetworkError (with its stderr) on failure when
    ``check``; a missing binary is always NetworkError."""
    argv = ["iptables", "-w", _XT_WAIT_S, "-t", "nat", *args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except FileNotFoundError as e:
        raise NetworkError("iptables is not installed: install iptables to use -p") from e
    if check and p.returncode != 0:
        raise NetworkError(f"{shlex.join(argv)} failed: {p.stderr.strip() or p.returncode}")
    return p


def _rules(chain: str) -> list[list[str]]:
    """The ``-A`` rules of ``chain`` as argv lists (``iptables -S``); [] when it is missing."""
    p = _iptables("-S", chain, check=False)
    if p.returncode != 0:
        return []
    return [shlex.split(line) for line in p.stdout.splitlines() if line.startswith("-A ")]


def _opt(rule: list[str], flag: str) -> str:
    with contextlib.suppress(ValueError, IndexError):
        return rule[rule.index(flag) + 1]
    return ""


@dataclass(frozen=True)
class Published:
    """A DNAT rule found in :data:`CHAIN`: its mapping and the comment's node and id."""

    mapping: PortMapping
    node: str
    container_id: str


def published() -> list[Published]:
    """Every port published on this host (all nodes), read from :data:`CHAIN`."""
    out = []
    for r in _rules(CHAIN):
        parts = _opt(r, "--comment").split(":")
        dport, dest = _opt(r, "--dport"), _opt(r, "--to-destination")
        if len(parts) != 3 or parts[0] != "jaula" or not dport.isdigit() or ":" not in dest:
            continue
        m = PortMapping(
            host_port=int(dport),
            container_port=int(dest.rsplit(":", 1)[1]),
            protocol=_opt(r, "-p"),
            host_ip=_opt(r, "-d").removesuffix("/32"),
        )
        out.append(Published(m, parts[1], parts[2]))
    return out


def _bound(m: PortMapping) -> str | None:
    """Why ``m``'s host port cannot be bound here (a socket has it), else None."""
    kind = socket.SOCK_STREAM if m.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:  # a TIME_WAIT left by a client is no owner
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((m.host_ip or "0.0.0.0", m.host_port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return _not_local(m)
            return f"a socket of this node is bound to it ({e.strerror})"
    return None


def _not_local(m: PortMapping) -> str:
    return (
        f"-p {m.host_ip}:...: {m.host_ip} is not an address of this node: "
        "publish on one of its addresses or leave HOSTIP out"
    )


def conflict(mappings: Iterable[PortMapping], container_id: str) -> str | None:
    """Why one of ``mappings`` cannot be published here for ``container_id``, one line, or
    None.  Rules of ``container_id`` itself (a migration's source on this host) are not in
    the way."""
    others = [p for p in published() if p.container_id != container_id]
    for m in mappings:
        where = f"{m.host_ip or '0.0.0.0'}:{m.host_port}/{m.protocol}"
        for p in others:
            if m.overlaps(p.mapping):
                return (
                    f"host port {where} is already published by container "
                    f"{p.container_id[:12]}: pick another host port"
                )
        if why := _bound(m):
            return why if why.startswith("-p ") else f"host port {where} is in use: {why}"
    return None


def check_free(mappings: Iterable[PortMapping], container_id: str = "") -> None:
    """PortInUse naming the first taken host port of ``mappings``."""
    if why := conflict(mappings, container_id):
        raise PortInUse(why)


def assign_host_ports(mappings: Iterable[PortMapping]) -> tuple[PortMapping, ...]:
    """``mappings`` with every host port 0 replaced by a free one (the kernel's pick for a
    bind to port 0, not published by any rule), as Podman does for ``-p CTRPORT``."""
    taken = {(p.mapping.protocol, p.mapping.host_port) for p in published()}
    out: list[PortMapping] = []
    for m in mappings:
        port = 0
        kind = socket.SOCK_STREAM if m.protocol == "tcp" else socket.SOCK_DGRAM
        for _ in range(64):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((m.host_ip or "0.0.0.0", 0))
                except OSError as e:
                    raise NetworkError(_not_local(m)) from e
                port = int(s.getsockname()[1])
            if (m.protocol, port) not in taken and all(
                not (o.protocol == m.protocol and o.host_port == port) for o in out
            ):
                break
        if m.host_port:
            out.append(m)
        else:
            out.append(PortMapping(port, m.container_port, m.protocol, m.host_ip))
    return tuple(out)


def _proto(m: PortMapping) -> list[str]:
    return ["-p", m.protocol, "-m", m.protocol]


def _masquerade(src: str, ip: str, m: PortMapping, cm: list[str]) -> tuple[str, list[str]]:
    spec = ["-s", src, "-d", f"{ip}/32", *_proto(m), "--dport", str(m.container_port), *cm]
    return MASQ_CHAIN, [*spec, "-j", "MASQUERADE"]


def _rule_specs(
    tag: str, cid: str, ip: str, m: PortMapping, subnet: str | None = None
) -> list[tuple[str, list[str]]]:
    cm = ["-m", "comment", "--comment", _comment(tag, cid)]
    dest = ["-d", f"{m.host_ip}/32"] if m.host_ip else []
    proto = _proto(m)
    specs = [
        (
            CHAIN,
            [
                *dest,
                *proto,
                "--dport",
                str(m.host_port),
                *cm,
                "-j",
                "DNAT",
                "--to-destination",
                f"{ip}:{m.container_port}",
            ],
        )
    ]
    if m.loopback:
        specs.append(_masquerade("127.0.0.0/8", ip, m, cm))
    if subnet:
        specs.append(_masquerade(subnet, ip, m, [*cm, "-m", "conntrack", "--ctstate", "DNAT"]))
    return specs


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    from runtime.store import flocked

    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with flocked(LOCK):
        yield


def _ensure_chains() -> None:
    for chain in (CHAIN, MASQ_CHAIN):
        if _iptables("-S", chain, check=False).returncode != 0:
            _iptables("-N", chain)
    for parent, jump in _JUMPS:
        if _iptables("-C", parent, *jump, check=False).returncode != 0:
            _iptables("-A", parent, *jump)


def _drop_chains_if_empty() -> None:
    if _rules(CHAIN) or _rules(MASQ_CHAIN):
        return
    for parent, jump in _JUMPS:
        while _iptables("-C", parent, *jump, check=False).returncode == 0:
            _iptables("-D", parent, *jump)
    for chain in (CHAIN, MASQ_CHAIN):
        if _iptables("-S", chain, check=False).returncode == 0:
            _iptables("-X", chain)


def _delete_own(tag: str, cid: str) -> int:
    """Delete the rules commented ``jaula:tag:cid``; their number.  NetworkError."""
    want = _comment(tag, cid)
    n = 0
    for chain in (CHAIN, MASQ_CHAIN):
        for r in _rules(chain):
            if _opt(r, "--comment") == want:
                _iptables("-D", *r[1:])
                n += 1
    return n


def publish(tag: str, container_id: str, att: Attachment, mappings: Iterable[PortMapping]) -> None:
    """Install ``mappings`` of container ``container_id`` (plugged in as ``att``) for node
    ``tag``, with the hairpin (the masquerade for its subnet, ``hairpin_mode`` on its
    bridge port, ``forwarding`` on the bridge), replacing what that node had for it
    (idempotent: ``start``, a restore).  Checks under the lock that no other container has
    one of the host ports (PortInUse); NetworkError when iptables fails, after removing
    what it added."""
    ms = tuple(mappings)
    if not ms:
        return
    ip = att.ip
    # att.subnet is recorded at attach; a config written before it was has "" there
    subnet = att.subnet or str(ipaddress.ip_interface(f"{ip}/{att.prefixlen}").network)
    with _locked():
        check_free(ms, container_id)
        try:
            _delete_own(tag, container_id)
            _ensure_chains()
            for m in ms:
                for chain, spec in _rule_specs(tag, container_id, ip, m, subnet):
                    _iptables("-A", chain, *spec)
        except BaseException:
            with contextlib.suppress(NetworkError):
                _delete_own(tag, container_id)
                _drop_chains_if_empty()
            raise
    from runtime.network import link

    try:
        link.open_for_ports(ip, localnet=any(m.loopback for m in ms), port=att.host_if)
    except (NetworkError, OSError) as e:  # the other addresses still work
        log.warning("network.ports.bridge_sysctl", ip=ip, error=str(e))
    log.info("network.ports.published", id=container_id[:12], ports=[m.podman_line() for m in ms])


def unpublish(tag: str, container_id: str) -> list[str]:
    """Remove node ``tag``'s rules of ``container_id`` (and the chains once empty);
    idempotent.  Returns the errors, one line each (logged), never raises."""
    try:
        with _locked():
            if _delete_own(tag, container_id):
                _drop_chains_if_empty()
    except (NetworkError, OSError) as e:
        log.error("network.ports.unpublish", id=container_id[:12], error=str(e))
        return [f"cannot remove the published ports of {container_id[:12]}: {e}"]
    return []


__all__ = [
    "CHAIN",
    "LOCK",
    "MASQ_CHAIN",
    "PortInUse",
    "PortMapping",
    "Published",
    "assign_host_ports",
    "check_free",
    "check_unique",
    "conflict",
    "node_tag",
    "parse_publish",
    "publish",
    "published",
    "unpublish",
]
