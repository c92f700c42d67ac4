"""A bridged container's network identity across a migration (DESIGN.md, "Network identity").

The container's net namespace is external to CRIU (``--external net[INODE]:jaula-netns``):
CRIU dumps its processes and their sockets (``--tcp-established``), not the namespace, and
restores them into a namespace the destination made before the freeze, with the same
``eth0`` (address, MAC, MTU, route).  The lock is jaula's own, on the host side of the veth::

    source                                 destination
                                           offer: bridge there, IP/MAC not answered on it
                                                  (ARP probe), MTU; netns + veth plugged,
                                                  host side DOWN (never two on the segment)
    freeze: host side DOWN (the lock:
      nothing reaches the frozen sockets,
      nothing is acked that the dump misses)
    roll back: host side UP again
    commit: CRIU kills the tasks; the
      namespace, and so the veth and its
      bridge port, die with them
                                           resume: host side UP, gratuitous ARP from eth0,
                                                   then the tasks run (restorer)

A frame sent to the container between the two is dropped, and TCP sends it again.

Published ports (``-p``, :mod:`runtime.network.ports`) travel in the container's config; each
node's DNAT rules carry that node's tag, so both nodes of one host keep theirs apart::

    source                                 destination
                                           offer: every host port free here (no other
                                                  container's rule, no bound socket); the
                                                  rules installed with the prepared netns
                                                  (out of the downtime: ~10 iptables runs)
    roll back: its rules were never touched    abort: its rules removed
    commit: its rules removed (with the port)
                                           resume: the tasks run behind them
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from runtime.errors import JaulaError
from runtime.network import Attachment, NetworkError
from runtime.spec import ContainerConfig
from runtime.store import NETNS

if TYPE_CHECKING:  # the restorer imports this module: keep it light
    from runtime.container import Container, Runtime

log = structlog.get_logger(__name__)


def bridged(cfg: ContainerConfig) -> Attachment | None:
    """The attachment of a ``--network bridge`` container, else None."""
    return cfg.attachment if cfg.network == "bridge" else None


def unexpected(att: Attachment, links: tuple[str, ...], addresses: tuple[str, ...],
               routes: tuple[str, ...], rules: tuple[str, ...]) -> list[str]:  # fmt: skip
    """What a bridged container's namespace holds beyond what jaula put there (``eth0``,
    its address and IPv6 link-local, the default route), from
    :func:`migrate.portability.netns_contents`' fields.  A migration rebuilds only what
    jaula put there, so anything else must be refused, never dropped."""
    extra = [x for x in links if x != "eth0 (veth)"]
    extra += [
        a
        for a in addresses
        if a != f"{att.ip}/{att.prefixlen} on eth0"
        and not (a.startswith("fe80:") and a.endswith("/64 on eth0"))
    ]
    extra += [r for r in routes if r != "default table main"]
    return extra + list(rules)


def lock_source(c: Container) -> None:
    """Take the source's port down (at the freeze).  NetworkError when it cannot."""
    att = bridged(c.config)
    if att is not None:
        from runtime.network import link

        link.set_link_state(att.host_if, False)


def unlock_source(c: Container) -> None:
    """Bring the source's port up again (a rolled-back migration); errors are logged."""
    att = bridged(c.config)
    if att is None:
        return
    from runtime.network import link

    try:
        link.set_link_state(att.host_if, True)
    except (NetworkError, OSError) as e:
        log.error("network.unlock", id=c.id[:12], error=str(e))


def remove_source_port(c: Container) -> None:
    """After the commit: delete the source's veth (its bridge port and FDB entries go with
    it; the namespace dying with the tasks would do it too, but later); errors logged."""
    att = bridged(c.config)
    if att is None:
        return
    from runtime.network import link

    try:
        link.delete_link(att.host_if)
    except (NetworkError, OSError) as e:
        log.error("network.remove_port", id=c.id[:12], error=str(e))
    if c.config.ports:  # errors logged there
        from runtime.network import ports

        ports.unpublish(c.rt.port_tag, c.id)


def check_destination(rt: Runtime, cfg: ContainerConfig) -> str | None:
    """Why this node cannot take ``cfg``'s network identity, or None: its bridge is
    missing, its MTU differs, or another MAC answers for the address on the bridge (ARP
    probe) or holds it here."""
    att = bridged(cfg)
    if att is None:
        return None
    from runtime.network import arp, link

    net = rt.network
    if not link.link_exists(net.bridge):
        return f"bridge {net.bridge} does not exist on this node (see [network] bridge)"
    if net.mtu != att.mtu:
        return f"the container's MTU {att.mtu} differs from bridge {net.bridge}'s {net.mtu}"
    if att.subnet and att.subnet != str(net.network):
        return f"the container's subnet {att.subnet} is not this node's {net.network}"
    others = sorted(arp.probe(net.bridge, att.ip) - {att.mac})
    if others:
        return f"{att.ip} is already in use on bridge {net.bridge} (answered by {others[0]})"
    held = link.addresses_in_use(att.ip, att.mac)
    if held:
        return f"{att.ip} or {att.mac} is already in use on this node: {held[0]}"
    if cfg.ports:
        from runtime.network import ports

        return ports.conflict(cfg.ports, cfg.id)
    return None


def for_this_node(rt: Runtime, cfg: ContainerConfig) -> ContainerConfig:
    """``cfg`` as the destination records it: plugged into this node's bridge, the host
    side of its veth named so that it meets no link here (``jl``/``jm`` + id: two nodes of
    one host share a namespace, so the source's port may still be there)."""
    att = bridged(cfg)
    if att is None:
        return cfg
    from dataclasses import replace

    from runtime.network import link

    name = att.host_if
    if link.link_exists(name):
        name = ("jm" if name.startswith("jl") else "jl") + name[2:]
    return replace(cfg, attachment=replace(att, bridge=rt.network.bridge, host_if=name))


def prepare_destination(rt: Runtime, cdir: Path, cfg: ContainerConfig) -> None:
    """Make the namespace the restore goes into (pinned at ``cdir/netns``), with ``eth0``
    plugged into the bridge and its host side down, and install the container's published
    ports here (checked again under the ports' lock: PortInUse when one was taken since the
    preflight).  NetworkError on failure (nothing left)."""
    att = bridged(cfg)
    if att is None:
        return
    from runtime.network import link, ports

    link.create_netns(cdir / NETNS)
    try:
        link.plug(att, cdir / NETNS, link.ensure_bridge(rt.network), host_up=False)
        ports.publish(rt.port_tag, cfg.id, att, cfg.ports)
    except BaseException:
        link.remove_netns(cdir / NETNS)
        with contextlib.suppress(NetworkError, OSError):
            link.delete_link(att.host_if)
        ports.unpublish(rt.port_tag, cfg.id)
        raise


def discard_destination(cdir: Path, cfg: ContainerConfig) -> None:
    """Undo :func:`prepare_destination` (an aborted migration); idempotent, never raises."""
    att = bridged(cfg)
    if att is None:
        return
    from runtime.network import link

    with contextlib.suppress(NetworkError, OSError, JaulaError):
        link.remove_netns(cdir / NETNS)
        link.delete_link(att.host_if)
    if cfg.ports:  # idempotent
        from runtime.network import ports

        ports.unpublish(ports.node_tag(cdir.parents[1]), cfg.id)


def go_live(cfg: ContainerConfig, netns: str) -> None:
    """At the resume on the destination: host side up, gratuitous ARP from ``eth0`` of the
    namespace ``netns`` (a path).  NetworkError/OSError when the link cannot come up."""
    att = bridged(cfg)
    if att is None:
        return
    from runtime.network import arp, link

    link.set_link_state(att.host_if, True)
    try:
        arp.in_netns(netns, lambda: arp.announce("eth0", att.mac, att.ip))
    except OSError as e:  # the container runs; neighbours learn on its first frame
        log.warning("network.garp", id=cfg.id[:12], error=str(e))
