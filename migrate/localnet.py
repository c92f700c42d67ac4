"""A two-host network on one machine, for the tests and ``make demo`` (issue 12, part 3).

Two nodes' bridges joined by a "wire" bridge, as two hosts on one layer-2 segment, and a
client machine outside the cluster: its own net namespace with ``eth0`` on the wire::

    host netns (nothing here has an address)
      jtb1<tag> (node1's bridge) ── jtv1<tag> ══ veth ══ jtu1<tag> ─┐
      jtb2<tag> (node2's bridge) ── jtv2<tag> ══ veth ══ jtu2<tag> ─┼─ jtw<tag> (the wire)
                          client netns: eth0 client_ip ══ jtc<tag> ─┘

``tag`` is 4 random hex digits, so runs side by side never meet; the subnet is a random /28
of 10.240.0.0/12 and the client takes its last host address.  :func:`build` makes it all (or
nothing), :func:`teardown` removes exactly what :func:`build` made and is idempotent.

CLI (the demo; ``STATE`` is a JSON file of :class:`Segment`)::

    python -m migrate.localnet up STATE [--node-root ROOT]... [--leases FILE]
        build; write STATE; give every ROOT a network.json on its bridge (in order: the
        first root node1's bridge, the second node2's), addresses leased in FILE; print the
        segment as shell assignments (bridge1= bridge2= wire= subnet= client_ns= client_ip=)
    python -m migrate.localnet down STATE
        teardown of what STATE names (nothing when STATE is missing)
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroute2 import IPRoute

from runtime.network import NETWORK_FILE, NetworkConfig, NetworkError
from runtime.network import link as netlink


@dataclass(frozen=True)
class Segment:
    """The topology of the module docstring.

    Attributes:
        bridges: node1's and node2's bridge; wire: the bridge joining them and the client.
        subnet: IPv4 CIDR of the segment; client_ns: the client's pinned net namespace;
        client_ip: the client's address on its ``eth0``; links: the host links made (deleted
        in reverse by :func:`teardown`; a veth takes its peer along).
    """

    bridges: tuple[str, str]
    wire: str
    subnet: str
    client_ns: Path
    client_ip: str
    links: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["client_ns"] = str(self.client_ns)
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Segment:
        b = d["bridges"]
        links = d["links"]
        assert isinstance(b, list) and isinstance(links, list)
        return cls(
            bridges=(str(b[0]), str(b[1])),
            wire=str(d["wire"]),
            subnet=str(d["subnet"]),
            client_ns=Path(str(d["client_ns"])),
            client_ip=str(d["client_ip"]),
            links=tuple(str(x) for x in links),
        )

    def node_network(self, node: int, leases_file: str = "") -> NetworkConfig:
        """The network config of node ``node`` (1 or 2): its bridge (provided, not made by
        the runtime), the segment's subnet, leases in ``leases_file``."""
        return NetworkConfig(
            bridge=self.bridges[node - 1],
            subnet=self.subnet,
            create_bridge=False,
            leases_file=leases_file,
        ).validate()


def scratch_subnet(prefixlen: int = 28) -> str:
    """A random subnet of 10.240.0.0/12 (unlikely to meet anything on the host)."""
    base = ipaddress.IPv4Network("10.240.0.0/12")
    size = 1 << (32 - prefixlen)
    n = secrets.randbelow(base.num_addresses // size)
    return f"{base.network_address + n * size}/{prefixlen}"


def _make_bridge(ipr: IPRoute, name: str) -> None:
    ipr.link("add", ifname=name, kind="bridge")
    ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def _veth_into(ipr: IPRoute, name: str, peer: str, master: int) -> None:
    ipr.link("add", ifname=name, kind="veth", peer=peer)
    idx = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=idx, master=master, state="up")


def build(tmp: Path, prefixlen: int = 28) -> Segment:
    """Make the topology, the client's namespace pinned under directory ``tmp``.  On any
    failure what was made is removed and the error (NetlinkError, NetworkError, OSError)
    raised."""
    tag = secrets.token_hex(2)
    b1, b2, wire = f"jtb1{tag}", f"jtb2{tag}", f"jtw{tag}"
    subnet = scratch_subnet(prefixlen)
    client_ip = str(ipaddress.IPv4Network(subnet).broadcast_address - 1)
    ns = tmp / f"client-{tag}.netns"
    made: list[str] = []
    try:
        with IPRoute() as ipr:
            for br in (b1, b2, wire):
                _make_bridge(ipr, br)
                made.append(br)
            w = ipr.link_lookup(ifname=wire)[0]
            for i, br in ((1, b1), (2, b2)):
                _veth_into(ipr, f"jtu{i}{tag}", f"jtv{i}{tag}", w)
                made.append(f"jtu{i}{tag}")
                v = ipr.link_lookup(ifname=f"jtv{i}{tag}")[0]
                ipr.link("set", index=v, master=ipr.link_lookup(ifname=br)[0], state="up")
            _veth_into(ipr, f"jtc{tag}", f"jtd{tag}", w)
            made.append(f"jtc{tag}")
            netlink.create_netns(ns)
            fd = os.open(ns, os.O_RDONLY)
            try:
                ipr.link("set", index=ipr.link_lookup(ifname=f"jtd{tag}")[0], net_ns_fd=fd)
            finally:
                os.close(fd)
        with IPRoute(netns=str(ns)) as c:
            idx = c.link_lookup(ifname=f"jtd{tag}")[0]
            c.link("set", index=idx, ifname="eth0", state="up")
            c.link("set", index=c.link_lookup(ifname="lo")[0], state="up")
            c.addr("add", index=idx, address=client_ip, prefixlen=prefixlen)
    except BaseException:
        teardown(Segment((b1, b2), wire, subnet, ns, client_ip, tuple(made)))
        raise
    return Segment((b1, b2), wire, subnet, ns, client_ip, tuple(made))


def teardown(seg: Segment) -> list[str]:
    """Remove what :func:`build` made for ``seg`` (idempotent).  Returns the errors met,
    one line each (every link is tried regardless)."""
    errors: list[str] = []
    for name in reversed(seg.links):
        try:
            netlink.delete_link(name)
        except (OSError, NetworkError) as e:
            errors.append(f"cannot delete link {name}: {e}")
    netlink.remove_netns(seg.client_ns)
    return errors


@contextlib.contextmanager
def two_node_segment(tmp: Path, prefixlen: int = 28) -> Iterator[Segment]:
    """:func:`build`, yield, :func:`teardown` (also on failure)."""
    seg = build(tmp, prefixlen)
    try:
        yield seg
    finally:
        teardown(seg)


def add_client_address(seg: Segment, ip: str) -> None:
    """Give the client another address (one a container should have: a squatter)."""
    with IPRoute(netns=str(seg.client_ns)) as c:
        idx = c.link_lookup(ifname="eth0")[0]
        c.addr("add", index=idx, address=ip, prefixlen=ipaddress.IPv4Network(seg.subnet).prefixlen)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI of the module docstring; 0 on success, 1 with a one-line error otherwise."""
    p = argparse.ArgumentParser(prog="python -m migrate.localnet")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("state", type=Path)
    up.add_argument("--node-root", action="append", type=Path, default=[])
    up.add_argument("--leases", default="")
    down = sub.add_parser("down")
    down.add_argument("state", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "down":
        try:
            seg = Segment.from_json(json.loads(a.state.read_text()))
        except FileNotFoundError:
            return 0
        errors = teardown(seg)
        a.state.unlink(missing_ok=True)
        for e in errors:
            print(f"localnet: {e}", file=sys.stderr)
        return 1 if errors else 0
    if len(a.node_root) > 2:
        print("localnet: at most two --node-root (node1's, node2's)", file=sys.stderr)
        return 1
    try:
        seg = build(a.state.parent)
    except Exception as e:  # noqa: BLE001 - one line for the operator
        print(f"localnet: cannot build the two-host network: {e}", file=sys.stderr)
        return 1
    a.state.write_text(json.dumps(seg.to_json()))
    for i, root in enumerate(a.node_root, start=1):
        root.mkdir(parents=True, exist_ok=True)
        (root / NETWORK_FILE).write_text(json.dumps(seg.node_network(i, a.leases).to_json()))
    for k, v in (("bridge1", seg.bridges[0]), ("bridge2", seg.bridges[1]), ("wire", seg.wire),
                 ("subnet", seg.subnet), ("client_ns", str(seg.client_ns)),
                 ("client_ip", seg.client_ip)):  # fmt: skip
        print(f"{k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
