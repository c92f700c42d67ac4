"""Netlink side of ``--network bridge`` (pyroute2 is imported here only): the node's bridge,
a container's net namespace and veth pair.

Sequence of :func:`plug` (host = the node's net namespace)::

    create_netns(<cdir>/netns)      a new net namespace pinned by a bind mount
    veth jl<id> <-> jc<id>          made in the host; jl<id>: mtu, master <bridge>, up
    jc<id> -> netns                 moved; inside: renamed eth0, MAC, MTU, up, address/prefix,
                                    default route via the gateway; lo up

The init joins the pinned namespace (setns) instead of making one; once it runs, the pin is
removed (:func:`remove_netns`) so the namespace, and with it the veth pair, dies with the
container's last task: a stopped or crashed container leaves no veth behind.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import threading
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from runtime import syscalls as sc
from runtime.network import Attachment, NetworkConfig, NetworkError

log = structlog.get_logger(__name__)


def _link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_exists(name: str) -> bool:
    """Whether a link called ``name`` exists in the caller's net namespace."""
    with IPRoute() as ipr:
        return _link_index(ipr, name) is not None


def _is_bridge(ipr: IPRoute, index: int) -> bool:
    (link,) = ipr.get_links(index)
    info = link.get("IFLA_LINKINFO")
    return info is not None and info.get("IFLA_INFO_KIND") == "bridge"


def ensure_bridge(cfg: NetworkConfig) -> int:
    """The index of ``cfg.bridge``, made (with the gateway address, MTU, up) when missing and
    ``cfg.create_bridge``.  NetworkError when it is missing and must not be made, or is not a
    bridge."""
    with IPRoute() as ipr:
        idx = _link_index(ipr, cfg.bridge)
        if idx is not None:
            if not _is_bridge(ipr, idx):
                raise NetworkError(
                    f"{cfg.bridge} is not a bridge: name a bridge in [network] bridge"
                )
            return idx
        if not cfg.create_bridge:
            raise NetworkError(
                f"bridge {cfg.bridge} does not exist on this node: create it "
                f"(ip link add {cfg.bridge} type bridge) or fix [network] bridge"
            )
        try:
            ipr.link("add", ifname=cfg.bridge, kind="bridge", mtu=cfg.mtu)
        except NetlinkError as e:
            if e.code != errno.EEXIST:  # made by a racing run: fine
                raise NetworkError(f"cannot create bridge {cfg.bridge}: {e}") from e
        idx = _link_index(ipr, cfg.bridge)
        if idx is None:
            raise NetworkError(f"bridge {cfg.bridge} vanished while it was being made")
        with contextlib.suppress(NetlinkError):  # EEXIST: a racing run added it
            ipr.addr("add", index=idx, address=cfg.gateway_ip, prefixlen=cfg.network.prefixlen)
        ipr.link("set", index=idx, state="up")
        log.info("network.bridge.created", bridge=cfg.bridge, gateway=cfg.gateway_ip)
        return idx


def create_netns(path: Path) -> None:
    """Make a new net namespace pinned by a bind mount on ``path`` (created).  Done in a
    short-lived thread: a net namespace belongs to a thread, so the caller's stays as it
    was.  NetworkError on failure (nothing is left)."""
    path.touch(mode=0o600)
    err: list[BaseException] = []

    def make() -> None:
        try:
            sc.unshare(sc.CLONE_NEWNET)
            sc.mount("/proc/thread-self/ns/net", str(path), None, sc.MS_BIND)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            err.append(e)

    t = threading.Thread(target=make, name="jaula-netns")
    t.start()
    t.join()
    if err:
        path.unlink(missing_ok=True)
        raise NetworkError(f"cannot create a net namespace at {path}: {err[0]}") from err[0]


def remove_netns(path: Path) -> None:
    """Unpin the net namespace at ``path`` (lazy unmount, unlink); idempotent."""
    with contextlib.suppress(OSError):
        sc.umount(str(path), 2)  # MNT_DETACH
    path.unlink(missing_ok=True)


def delete_link(name: str) -> bool:
    """Delete link ``name`` of the caller's namespace (a veth takes its peer along);
    False when there was none."""
    with IPRoute() as ipr:
        idx = _link_index(ipr, name)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise NetworkError(f"cannot delete link {name}: {e}") from e
        return True


def set_link_state(name: str, up: bool) -> None:
    """Set link ``name`` of the caller's namespace up or down (a migration's lock of the
    source's port); NetworkError when it is missing."""
    with IPRoute() as ipr:
        idx = _link_index(ipr, name)
        if idx is None:
            raise NetworkError(f"link {name} is missing")
        ipr.link("set", index=idx, state="up" if up else "down")


def plug(att: Attachment, netns: Path, bridge_index: int, host_up: bool = True) -> None:
    """Give the net namespace pinned at ``netns`` an ``eth0`` on ``att``'s bridge: the veth
    pair of the module docstring.  ``host_up=False`` leaves the host side down (a migration's
    destination, until the resume).  On failure the veth is deleted and NetworkError
    raised."""
    peer = "jc" + att.host_if[2:]
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=att.host_if, kind="veth", peer=peer)
            host = _link_index(ipr, att.host_if)
            inner = _link_index(ipr, peer)
            if host is None or inner is None:
                raise NetworkError(f"veth {att.host_if} vanished while it was being made")
            ipr.link("set", index=host, mtu=att.mtu, master=bridge_index)
            if host_up:
                ipr.link("set", index=host, state="up")
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("set", index=inner, net_ns_fd=fd)
            finally:
                os.close(fd)
        from runtime.network.arp import in_netns

        in_netns(str(netns), lambda: _configure_inside(att, peer, str(netns)))
    except NetlinkError as e:
        with contextlib.suppress(NetworkError, NetlinkError):
            delete_link(att.host_if)
        raise NetworkError(f"cannot plug {att.host_if} into {att.bridge}: {e}") from e
    except BaseException:
        with contextlib.suppress(NetworkError, NetlinkError):
            delete_link(att.host_if)
        raise


def _configure_inside(att: Attachment, peer: str, netns: str) -> None:
    """In the container's namespace (the calling thread joined it): ``peer`` becomes
    ``eth0`` with ``att``'s MAC, MTU, address and default route; ``lo`` up.  A socket made
    in a thread that joined a namespace is that namespace's (``IPRoute(netns=)`` forks,
    which a node service's threads must not do)."""
    with IPRoute() as ns:
        lo = _link_index(ns, "lo")
        if lo is not None:
            ns.link("set", index=lo, state="up")
        idx = _link_index(ns, peer)
        if idx is None:
            raise NetworkError(f"veth {peer} did not arrive in {netns}")
        ns.link("set", index=idx, ifname="eth0", address=att.mac, mtu=att.mtu)
        ns.link("set", index=idx, state="up")
        ns.addr("add", index=idx, address=att.ip, prefixlen=att.prefixlen)
        ns.route("add", dst="default", gateway=att.gateway)


def addresses_in_use(ip: str, mac: str) -> list[str]:
    """What on this node already holds ``ip`` or ``mac``: host addresses, neighbour
    entries, FDB entries of the bridges.  Empty when neither is seen (a migration's
    destination preflight; an ARP probe on the wire is :func:`arp_probe`)."""
    found: list[str] = []
    a = ipaddress.IPv4Address(ip)
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=2):
            if addr.get("IFA_ADDRESS") == str(a):
                found.append(f"address {a} on link {addr['index']}")
        for n in ipr.get_neighbours(family=2):
            if n.get("NDA_DST") == str(a) and n.get("NDA_LLADDR") not in (None, mac):
                found.append(f"neighbour {a} at {n.get('NDA_LLADDR')}")
        for link in ipr.get_links():
            if link.get("IFLA_ADDRESS") == mac:
                found.append(f"MAC {mac} on {link.get('IFLA_IFNAME')}")
    return found


def open_for_ports(ip: str, localnet: bool, port: str | None = None) -> str | None:
    """Let DNATed connections reach ``ip`` through the bridge this node reaches it by:
    ``forwarding=1`` on that bridge (a connection that came in through the bridge itself, a
    container reaching a published port through the node's address, is forwarded back out
    of it), and with ``localnet`` also ``route_localnet=1`` (so that ``127.0.0.1:HOSTPORT``
    may leave through it), as Podman does for published ports (netavark sets the host-wide
    ``ip_forward``; jaula sets only its bridge's), and ``hairpin_mode`` on the bridge port
    ``port`` (the container's ``jl<id>``: its own connections to its published ports come
    back through it).  The bridge's name, or None when the route does not go through a
    bridge (nothing is changed).  OSError when a sysctl cannot be written
    (``/proc/sys/net/ipv4/conf/BRIDGE/``, ip-sysctl.rst)."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=ip)
        except NetlinkError:
            return None
        oif = routes[0].get("RTA_OIF") if routes else None
        if oif is None or not _is_bridge(ipr, int(oif)):
            return None
        (lk,) = ipr.get_links(int(oif))
        name = str(lk.get("IFLA_IFNAME"))
    conf = Path(f"/proc/sys/net/ipv4/conf/{name}")
    (conf / "forwarding").write_text("1\n")
    if localnet:
        (conf / "route_localnet").write_text("1\n")
    if port is not None:
        Path(f"/sys/class/net/{port}/brport/hairpin_mode").write_text("1\n")
    return name
