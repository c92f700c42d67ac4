"""What of a running container depends on the node it runs on, looked at before the freeze.

Two halves.  On the source, before anything is frozen:

* checks that hold for any dump (``jaula checkpoint`` and ``migrate``), called from
  :func:`migrate.checkpoint.preflight`: the contents of the container's own net namespace
  (:func:`netns_contents`: what CRIU cannot carry is refused, and a namespace holding more
  than ``lo`` with 127.0.0.1/8 and ::1 is dumped by CRIU, not declared external), UNIX
  sockets connected to a process outside the container (:func:`check_unix_peers`), inotify
  and fanotify watches (:func:`describe_watches`);
* :func:`node_needs`: what the destination must provide, sent in the migration's ``offer``
  (field ``needs``) as a :class:`NodeNeeds`: each volume's identity, the TCP sockets bound in
  the host's network namespace (``--network host``), the private mappings CRIU will map
  writable at restore.

On the destination, :func:`check_needs` compares a :class:`NodeNeeds` with this node and
raises :class:`migrate.errors.PreflightError` naming the first object it cannot give:

* a volume (``-v HOST:CTR``) is local data: ``HOST`` here must be the very directory the
  container has mounted (same file system, by ``statfs`` ``f_fsid`` or else the device
  number, and the same file, by its ``name_to_handle_at`` handle or else its inode).  On two
  hosts with their own disks that never holds: such a container is refused until its data
  is on shared storage.  ``-v HOST:CTR:shared`` declares shared storage (the same data
  under the same path everywhere): then ``HOST`` must exist here, as the same kind of file
  on the same type of file system.  Named volumes that travel with the container do not
  exist yet;
* a TCP listener needs its address and port free here, a connection its local address
  (bind(2) probes, ``SO_REUSEADDR`` as CRIU restores them; a connection is restored in
  repair mode, which skips the port check);
* CRIU maps every private mapping writable while it restores it (criu/mem.c
  ``premap_private_vma``), so a ``PROT_NONE`` reservation the kernel never charged on the
  source is charged here: with ``vm.overcommit_memory`` 0 one mapping larger than RAM plus
  swap fails (mm/util.c ``__vm_enough_memory``), with 2 all of them must fit under
  ``CommitLimit - Committed_AS``; with 1 anything goes.

Sources: proc(5) (``/proc/PID/net/tcp``, ``smaps`` VmFlags, fdinfo of inotify/fanotify),
sock_diag(7) and unix_diag (peers of UNIX sockets), rtnetlink(7) via pyroute2, statfs(2),
name_to_handle_at(2), the kernel's Documentation/mm/overcommit-accounting.rst.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from migrate.errors import PreflightError, ProtocolError
from runtime import syscalls as sc
from runtime.spec import ContainerConfig
from runtime.syscalls import CLONE_NEWIPC, CLONE_NEWNET, setns

T = TypeVar("T")

KEEPS = "; nothing was frozen, the container keeps running"


# -- running code in a container's net namespace ------------------------------------------
def in_namespace(pid: int, kind: str, flag: int, fn: Callable[[], T]) -> T:
    """``fn()`` run in a thread that joined the ``kind`` namespace (``net``, ``ipc``: a
    namespace a thread may join alone, setns(2)) of ``pid``; the thread goes back to ours
    before it ends.  Raises what ``fn`` raises, OSError when the namespace cannot be
    joined."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            mine = os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                theirs = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(theirs, flag)
                finally:
                    os.close(theirs)
                try:
                    box["value"] = fn()
                finally:
                    setns(mine, flag)
            finally:
                os.close(mine)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"{kind}ns-{pid}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def in_netns(pid: int, fn: Callable[[], T]) -> T:
    """``fn()`` run in the net namespace of ``pid`` (sockets it opens stay there)."""
    return in_namespace(pid, "net", CLONE_NEWNET, fn)


def sysv_shm_segments(pid: int) -> int:
    """How many SysV shared memory segments the IPC namespace of ``pid`` holds
    (``/proc/sysvipc/shm`` is read in the reader's IPC namespace, so from a thread that
    joined it).  Raises OSError."""

    def count() -> int:
        with open("/proc/sysvipc/shm") as f:
            return max(0, len(f.read().splitlines()) - 1)  # a header line, then one each

    return in_namespace(pid, "ipc", CLONE_NEWIPC, count)


# -- the net namespace's contents ---------------------------------------------------------
#: addresses a fresh namespace has on lo once it is up
_LO_ADDRESSES = {"127.0.0.1/8", "::1/128"}
#: (family, priority) of the routing rules a fresh namespace has
_DEFAULT_RULES = {
    (socket.AF_INET, 0),
    (socket.AF_INET, 32766),
    (socket.AF_INET, 32767),
    (socket.AF_INET6, 0),
    (socket.AF_INET6, 32766),
}
_RTPROT_KERNEL = 2
_TABLES = {253: "default", 254: "main", 255: "local"}


@dataclass(frozen=True)
class NetnsContents:
    """What a net namespace holds beyond a fresh one's (``lo`` up, 127.0.0.1/8, ::1 and the
    kernel's routes for them).  Each entry is a short description for the operator.

    Attributes:
        links: interfaces other than ``lo``, as ``NAME (KIND)``: CRIU cannot rebuild them
            alone (a veth's peer, a device of the host), so they are refused.
        addresses: other addresses, ``ADDR/LEN on IFNAME``.
        routes: routes no address made (protocol not ``kernel``), ``DST/LEN table T``.
        rules: routing rules other than the default ones, ``priority P``.
    """

    links: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()

    @property
    def carried(self) -> tuple[str, ...]:
        """What CRIU carries when it dumps the namespace (addresses, routes, rules)."""
        return self.addresses + self.routes + self.rules

    @property
    def fresh(self) -> bool:
        """Whether the namespace holds nothing a fresh one lacks."""
        return not (self.links or self.carried)


def netns_contents(pid: int) -> NetnsContents:
    """The contents of the net namespace of ``pid`` (rtnetlink, from inside it).  Raises
    OSError when it cannot be read (the process is gone)."""
    from pyroute2 import IPRoute

    def look() -> NetnsContents:
        links, addrs, routes, rules = [], [], [], []
        with IPRoute() as ip:
            names = {}
            for link in ip.get_links():
                name = str(link.get("ifname") or link.get_attr("IFLA_IFNAME"))
                names[link["index"]] = name
                if name != "lo":
                    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "device"
                    links.append(f"{name} ({kind})")
            for a in ip.get_addr():
                text = f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                on = names.get(a["index"], str(a["index"]))
                if not (on == "lo" and text in _LO_ADDRESSES):
                    addrs.append(f"{text} on {on}")
            for fam in (socket.AF_INET, socket.AF_INET6):
                for r in ip.route("dump", family=fam):
                    if r["proto"] == _RTPROT_KERNEL:
                        continue
                    table = r.get_attr("RTA_TABLE") or r["table"]
                    dst = r.get_attr("RTA_DST") or ("default" if not r["dst_len"] else "?")
                    plen = f"/{r['dst_len']}" if r["dst_len"] else ""
                    routes.append(f"{dst}{plen} table {_TABLES.get(table, table)}")
                for rule in ip.get_rules(family=fam):
                    prio = rule.get_attr("FRA_PRIORITY") or 0
                    if (fam, prio) not in _DEFAULT_RULES:
                        rules.append(f"rule priority {prio}")
        return NetnsContents(tuple(links), tuple(addrs), tuple(routes), tuple(rules))

    return in_netns(pid, look)


def check_netns(name: str, contents: NetnsContents) -> None:
    """Refuse a container's own net namespace holding interfaces besides ``lo``.  Raises
    PreflightError naming them."""
    if contents.links:
        raise PreflightError(
            f"cannot checkpoint {name}: its network namespace holds the interface"
            f"{'s' if len(contents.links) > 1 else ''} {', '.join(contents.links)}, which CRIU "
            f"cannot rebuild on its own: remove it (`ip link del`) first{KEEPS}"
        )


# -- sockets ------------------------------------------------------------------------------
def fd_targets(pid: int) -> list[tuple[str, str]]:
    """(fd, link target) of each open descriptor of ``pid`` (``/proc/PID/fd``, proc(5));
    empty when the process is gone, a descriptor closed meanwhile left out."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append((fd, os.readlink(f"/proc/{pid}/fd/{fd}")))
        except OSError:
            continue
    return out


def socket_inodes(pids: Iterable[int]) -> dict[int, tuple[int, str]]:
    """socket inode -> (pid, comm) of the first of ``pids`` holding it open."""
    found: dict[int, tuple[int, str]] = {}
    for pid in pids:
        comm = _comm(pid)
        for _, target in fd_targets(pid):
            if target.startswith("socket:["):
                found.setdefault(int(target[8:-1]), (pid, comm))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _owners(inodes: set[int]) -> dict[int, tuple[int, str]]:
    """inode -> (pid, comm) of a process on this host holding one of ``inodes``."""
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    return {i: o for i, o in socket_inodes(pids).items() if i in inodes}


def _unix_paths(pid: int) -> dict[int, str]:
    """inode -> bound path of the UNIX sockets of the net namespace of ``pid``
    (``/proc/PID/net/unix``; an abstract name shown as ``@name``)."""
    paths: dict[int, str] = {}
    try:
        lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return paths
    for line in lines:
        f = line.split(None, 7)
        if len(f) == 8 and f[6].isdigit():
            paths[int(f[6])] = f[7]
    return paths


_UNIX_TYPES = {1: "stream", 2: "datagram", 5: "seqpacket"}


def check_unix_peers(name: str, init: int, pids: Iterable[int]) -> None:
    """Refuse a UNIX socket of the container's processes whose peer is not held by any of
    them (CRIU: "Unix socket ... not found"): the peer stays behind.  ``init`` gives the net
    namespace to look in (sock_diag lists the sockets of its own namespace).

    Raises PreflightError naming the process, the socket's path and the peer's holder."""
    from pyroute2.netlink.diag import UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, DiagSocket

    ours = socket_inodes(pids)
    if not ours:
        return

    def look() -> list[tuple[int, int, int, str]]:
        out = []
        with DiagSocket() as ds:
            ds.bind()
            for m in ds.get_sock_stats(
                family=socket.AF_UNIX, show=UDIAG_SHOW_NAME | UDIAG_SHOW_PEER
            ):
                peer = m.get_attr("UNIX_DIAG_PEER")
                if m["udiag_ino"] in ours and peer:
                    name_ = m.get_attr("UNIX_DIAG_NAME") or ""
                    out.append((m["udiag_ino"], int(peer), m["udiag_type"], str(name_)))
        return out

    connected = in_netns(init, look)
    outside = [(ino, peer, t, p) for ino, peer, t, p in connected if peer not in ours]
    if not outside:
        return
    owners = _owners({peer for _, peer, _, _ in outside})
    ino, peer, utype, path = outside[0]
    pid, comm = ours[ino]
    holder = owners.get(peer)
    if not path:  # the client end: the path is the listener's, on the peer's side
        path = _unix_paths(init).get(peer) or (
            _unix_paths(holder[0]).get(peer, "") if holder else ""
        )
    who = f"process {holder[0]} ({holder[1]})" if holder else "no process visible on this host"
    raise PreflightError(
        f"cannot checkpoint {name}: process {pid} ({comm}) has a UNIX {_UNIX_TYPES.get(utype, '')}"
        f" socket connected to {path or 'an unnamed socket'} (socket {peer}), held by {who} "
        f"outside the container, which CRIU cannot take along: close that connection{KEEPS}"
    )


def _icons(raw: object) -> list[int]:
    """The inodes in a UNIX_DIAG_ICONS attribute (pyroute2 gives it as ``aa:bb:..`` hex):
    one native-endian u32 per connection queued on a listener, the connecting socket's
    inode, 0 once that socket was closed (linux net/unix/diag.c, sk_diag_dump_icons)."""
    if not isinstance(raw, str) or not raw:
        return []
    data = bytes.fromhex(raw.replace(":", ""))
    return [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, len(data) - 3, 4)]


def check_inflight_unix(name: str, init: int, pids: Iterable[int]) -> None:
    """Refuse a listening UNIX socket of the container's processes with a connection queued
    on it (not yet accepted) that CRIU cannot carry: its client already closed, or its
    client sent data the listener has not accepted yet.  CRIU refuses both only during the
    dump, with the tasks frozen ("Found a closed in-flight socket", "Non-empty write queue
    on an in-flight socket", criu/sk-unix.c; zdtm sk-unix-listen02..04).

    Raises PreflightError naming the process, the listener's path and what is queued."""
    from pyroute2.netlink.diag import (
        UDIAG_SHOW_ICONS,
        UDIAG_SHOW_NAME,
        UDIAG_SHOW_RQLEN,
        DiagSocket,
    )

    ours = socket_inodes(pids)
    if not ours:
        return

    def look() -> tuple[list[tuple[int, str, list[int]]], dict[int, int]]:
        listeners, wqueue = [], {}
        with DiagSocket() as ds:
            ds.bind()
            for m in ds.get_sock_stats(
                family=socket.AF_UNIX, show=UDIAG_SHOW_NAME | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN
            ):
                rq = m.get_attr("UNIX_DIAG_RQLEN")
                if m["udiag_state"] == _UNIX_LISTEN:
                    if m["udiag_ino"] in ours and (icons := _icons(m.get_attr("UNIX_DIAG_ICONS"))):
                        path = str(m.get_attr("UNIX_DIAG_NAME") or "")
                        listeners.append((m["udiag_ino"], path, icons))
                elif rq is not None:
                    wqueue[m["udiag_ino"]] = int(rq["udiag_wqueue"])
        return listeners, wqueue

    listeners, wqueue = in_netns(init, look)
    for ino, path, icons in listeners:
        pid, comm = ours[ino]
        where = f"process {pid} ({comm}) listens on the UNIX socket {path or 'an unnamed socket'}"
        if 0 in icons:
            raise PreflightError(
                f"cannot checkpoint {name}: {where}, and a connection queued on it was closed "
                "by its client before being accepted (CRIU cannot tell what it sent): let "
                f"the process accept its pending connections first{KEEPS}"
            )
        sent = [i for i in icons if wqueue.get(i, 0)]
        if sent:
            raise PreflightError(
                f"cannot checkpoint {name}: {where}, and a connection queued on it (socket "
                f"{sent[0]}) holds data sent before it was accepted, which CRIU cannot "
                f"carry: let the process accept its pending connections first{KEEPS}"
            )


_UNIX_LISTEN = 10  #: TCP_LISTEN, as unix_diag reports a listening UNIX socket's state


@dataclass(frozen=True)
class BoundSocket:
    """A TCP socket of the container in the host's network namespace.

    Attributes:
        address: its local IP address; port: its local port; listening: a listener (else a
        connection); pid, comm: the process holding it.
    """

    address: str
    port: int
    listening: bool
    pid: int = 0
    comm: str = ""

    @property
    def where(self) -> str:
        a = f"[{self.address}]" if ":" in self.address else self.address
        return f"{a}:{self.port}"


_TCP_LISTEN, _TCP_ESTABLISHED = "0A", "01"


def _hex_address(text: str) -> tuple[str, int]:
    """``/proc/net/tcp{,6}`` ``ADDR:PORT`` (hex, address in host byte order per 32-bit
    word) -> (address, port)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    packed = struct.pack(f">{len(words)}I", *words)
    return str(ipaddress.ip_address(packed)), int(port, 16)


def host_tcp_sockets(init: int, pids: Iterable[int]) -> tuple[BoundSocket, ...]:
    """The listening and connected TCP sockets held by ``pids`` in the net namespace of
    ``init`` (``/proc/INIT/net/tcp``, ``tcp6``)."""
    ours = socket_inodes(pids)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{init}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] not in (_TCP_LISTEN, _TCP_ESTABLISHED):
                continue
            ino = int(f[9])
            if ino in ours:
                addr, port = _hex_address(f[1])
                pid, comm = ours[ino]
                found.append(BoundSocket(addr, port, f[3] == _TCP_LISTEN, pid, comm))
    return tuple(found)


def check_sockets(sockets: Iterable[BoundSocket], name: str, node: str) -> None:
    """On the destination: each listener's address and port can be bound here, each
    connection's local address exists here.  Raises PreflightError naming the first socket
    that cannot be restored."""
    for s in sockets:
        family = socket.AF_INET6 if ":" in s.address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((s.address, s.port if s.listening else 0))
            except OSError as e:
                what = "listens on" if s.listening else "is connected from"
                if e.errno == errno.EADDRINUSE:
                    why = f"that port is taken on {node}"
                    todo = "free the port there, or use `--network none`"
                elif e.errno == errno.EADDRNOTAVAIL:
                    why = f"{node} has no such address"
                    todo = "pick a node that has it, or bind to 0.0.0.0"
                else:
                    why, todo = f"it cannot be bound on {node} ({e.strerror})", "check the node"
                raise PreflightError(
                    f"cannot migrate {name}: process {s.pid} ({s.comm}) {what} {s.where} in "
                    "the host's network, and "
                    f"{why}: {todo}{KEEPS}"
                ) from None


_UDP_TABLES, _TCP_TABLES = ("udp", "udp6"), ("tcp", "tcp6")


@dataclass(frozen=True)
class QueuedSocket:
    """A socket of the container whose queue CRIU refuses to dump.

    Attributes:
        kind: ``"udp"`` (unsent datagram data: a corked socket, or data sent with
        ``MSG_MORE``) or ``"listen"`` (connections in a TCP listener's accept queue, not
        yet accepted: CRIU's "in-flight" connections).
        address, port: the socket's local address and port.  queued: bytes (udp) or
        connections (listen); the send queue of a UDP socket counts the
        buffer charged (skb truesize), not the payload.  pid, comm: the process holding it.
    """

    kind: str
    address: str
    port: int
    queued: int
    pid: int
    comm: str


def queued_sockets(init: int, pids: Iterable[int]) -> tuple[QueuedSocket, ...]:
    """The UDP sockets of ``pids`` with unsent data and the TCP listeners with connections
    waiting in their accept queue, from the tables of the net namespace of ``init``.

    proc(5) ``/proc/net/udp``: ``tx_queue`` is the send queue (``sk_wmem_alloc``), which
    CRIU reads as ``idiag_wqueue`` and refuses when not empty ("Can't dump corked dgram
    socket", criu/sk-inet.c); for a listener in ``/proc/net/tcp`` ``rx_queue`` is the
    accept backlog, whose connections CRIU refuses ("In-flight connection") unless told
    ``--skip-in-flight``, which would reset them."""
    ours = socket_inodes(pids)
    found: list[QueuedSocket] = []
    for table in (*_UDP_TABLES, *_TCP_TABLES):
        try:
            lines = Path(f"/proc/{init}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or int(f[9]) not in ours:
                continue
            tx, rx = (int(q, 16) for q in f[4].split(":"))
            if table in _UDP_TABLES and tx:
                kind, queued = "udp", tx
            elif table in _TCP_TABLES and f[3] == _TCP_LISTEN and rx:
                kind, queued = "listen", rx
            else:
                continue
            addr, port = _hex_address(f[1])
            pid, comm = ours[int(f[9])]
            found.append(QueuedSocket(kind, addr, port, queued, pid, comm))
    return tuple(found)


def check_socket_queues(name: str, init: int, pids: Iterable[int]) -> None:
    """On the source, before the freeze: refuse a container holding a socket whose queue
    CRIU would refuse after the freeze (see :func:`queued_sockets`).  Raises
    PreflightError naming the socket, the process and what to do."""
    for q in queued_sockets(init, pids):
        where = f"[{q.address}]:{q.port}" if ":" in q.address else f"{q.address}:{q.port}"
        if q.kind == "udp":
            what = (
                f"a UDP socket on {where} with data not yet sent ({q.queued} bytes of send "
                "buffer: corked, or sent with MSG_MORE), which CRIU cannot dump: uncork it or "
                "retry once sent"
            )
        else:
            what = (
                f"a TCP listener on {where} with {q.queued} connection"
                f"{'s' if q.queued > 1 else ''} not yet accepted, which CRIU would have to "
                "reset: retry once the process has accepted them"
            )
        raise PreflightError(
            f"cannot checkpoint {name}: process {q.pid} ({q.comm}) holds {what}{KEEPS}"
        )


# -- time namespaces and pending traps ----------------------------------------------------
def _ns_inode(pid: int, name: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{name}").st_ino
    except OSError:
        return None


def check_time_namespace(name: str, init: int, pid: int, comm: str) -> None:
    """Refuse a task in a time namespace of its own, or one that made one for its children
    (``unshare(CLONE_NEWTIME)``): CRIU dumps only the container's own time namespace and
    fails on a nested one after the freeze ("Can't dump nested time namespace",
    criu/namespaces.c; zdtm timens_nested, timens_for_kids).  time_namespaces(7).
    Raises PreflightError naming the task."""
    own = _ns_inode(init, "time")
    mine, kids = _ns_inode(pid, "time"), _ns_inode(pid, "time_for_children")
    if own is None or mine is None:
        return  # gone, or a kernel without time namespaces
    if mine != own or (kids is not None and kids != own):
        which = "is in" if mine != own else "made for its children"
        raise PreflightError(
            f"cannot checkpoint {name}: process {pid} ({comm}) {which} a time namespace "
            f"of its own inside the container's, which CRIU cannot dump: run it without "
            f"unshare --time{KEEPS}"
        )


#: SIGTRAP's bit in the SigPnd/ShdPnd masks of /proc/PID/status (signal 5)
_SIGTRAP_BIT = 1 << (5 - 1)


def check_pending_trap(name: str, pid: int, comm: str) -> None:
    """Refuse a task with a SIGTRAP pending (on a thread or the process): CRIU seizes tasks
    with ptrace and cannot tell that trap from its own, and fails after the freeze ("Can't
    dump the thread with a pending SIGTRAP", compel/src/lib/infect.c; zdtm sigtrap).
    proc(5) ``SigPnd``/``ShdPnd``.  Raises PreflightError naming the task."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("SigPnd", "ShdPnd") and int(value.strip() or "0", 16) & _SIGTRAP_BIT:
                raise PreflightError(
                    f"cannot checkpoint {name}: thread {tid} of process {pid} ({comm}) has a "
                    "SIGTRAP pending, which CRIU cannot tell from its own traps: retry once "
                    f"it is handled{KEEPS}"
                )


# -- inotify and fanotify -----------------------------------------------------------------
_WATCH = re.compile(r"^(inotify|fanotify) .*?\bino:([0-9a-f]+) sdev:([0-9a-f]+)", re.MULTILINE)
WATCH_FDS = ("anon_inode:inotify", "anon_inode:[fanotify]")


def describe_watches(pid: int, fd: str) -> list[str]:
    """The files watched through the inotify or fanotify instance at ``fd`` of ``pid``, as
    paths inside the container where they can be found (else ``inode N on device M:m``),
    from ``/proc/PID/fdinfo/FD``."""
    return [path or f"inode {ino} on device {dev}" for ino, dev, path in watch_targets(pid, fd)]


def filesystem_marks(pid: int, fd: str) -> list[str]:
    """The devices (``major:minor``) that the fanotify instance at ``fd`` of ``pid`` marks
    as a whole (``FAN_MARK_FILESYSTEM``: the ``fanotify sdev:`` lines of its fdinfo), which
    CRIU's fdinfo parser skips: such a mark would vanish from a dump without an error.
    ``[]`` when the fd is gone."""
    try:
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    except OSError:
        return []
    out = []
    for m in re.finditer(r"^fanotify sdev:([0-9a-f]+)", info, re.MULTILINE):
        sdev = int(m[1], 16)
        out.append(f"{sdev >> 20}:{sdev & 0xFFFFF}")
    return out


def watch_targets(pid: int, fd: str) -> list[tuple[int, str, str | None]]:
    """The inode marks of the inotify or fanotify instance at ``fd`` of ``pid`` (from
    ``/proc/PID/fdinfo/FD``): (inode, ``major:minor``, its path inside the container or
    None when no name leads to it: deleted, or not found within :func:`_find_inode`'s
    limit).  ``[]`` when the fd is gone."""
    try:
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    except OSError:
        return []
    out = []
    for _, ino_hex, sdev_hex in _WATCH.findall(info):
        ino, sdev = int(ino_hex, 16), int(sdev_hex, 16)
        major, minor = sdev >> 20, sdev & 0xFFFFF  # the kernel's dev_t (MINORBITS 20)
        out.append((ino, f"{major}:{minor}", _find_inode(pid, major, minor, ino)))
    return out


def _find_inode(pid: int, major: int, minor: int, ino: int, limit: int = 50000) -> str | None:
    """Path inside the container of ``pid`` of inode ``ino`` on the file system
    ``major:minor``: searched breadth first below each of its mount points there (a watched
    directory is seldom deep), not crossing into other file systems, at most ``limit``
    entries."""
    from collections import deque

    root = f"/proc/{pid}/root"
    try:
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return None
    seen = 0
    for line in mounts:
        f = line.split()
        if len(f) < 5 or f[2] != f"{major}:{minor}":
            continue
        top = root + (f[4] if f[4] != "/" else "")
        try:
            dev = os.stat(top).st_dev
        except OSError:
            continue
        todo = deque([top])
        while todo and seen < limit:
            d = todo.popleft()
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                seen += 1
                p = os.path.join(d, n)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if st.st_ino == ino:
                    return p[len(root) :]
                if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                    todo.append(p)
    return None


# -- volumes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeIdentity:
    """Which file a volume is, as seen from the node that has it.

    Attributes:
        destination: where it is mounted in the container; source: the host path.
        shared: declared shared storage (``-v HOST:CTR:shared``).
        kind: ``directory``, ``file``, ... (the file type).
        fstype: the file system's statfs ``f_type`` (magic number).
        fsid: statfs ``f_fsid`` in hex, "" when the file system gives none (0).
        dev: ``st_dev``; ino: ``st_ino``.
        handle: ``name_to_handle_at`` handle (type and bytes, hex), "" when the file system
            has none; unlike the inode it changes when a file is deleted and its inode reused.
    """

    destination: str
    source: str
    shared: bool
    kind: str
    fstype: int
    fsid: str
    dev: int
    ino: int
    handle: str

    def same_file(self, other: VolumeIdentity) -> bool:
        """Whether ``other`` is the same file on the same file system."""
        if self.fstype != other.fstype or self.kind != other.kind:
            return False
        if self.fsid and other.fsid:
            same_fs = self.fsid == other.fsid
        else:
            same_fs = self.dev == other.dev
        if self.handle and other.handle:
            return same_fs and self.handle == other.handle
        return same_fs and self.ino == other.ino


_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFREG: "file",
    stat.S_IFSOCK: "socket",
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def identify(
    path: str, destination: str = "", source: str = "", shared: bool = False
) -> VolumeIdentity:
    """The :class:`VolumeIdentity` of ``path`` (followed if a symlink).  Raises OSError when
    it cannot be stat'ed."""
    st = os.stat(path)
    fstype, fsid = sc.statfs_id(path)
    fh = sc.file_handle(path)
    handle = f"{fh[0]:x}:{fh[1].hex()}" if fh else ""
    return VolumeIdentity(
        destination=destination,
        source=source or path,
        shared=shared,
        kind=_KINDS.get(stat.S_IFMT(st.st_mode), "special file"),
        fstype=fstype,
        fsid=fsid.hex() if fsid.strip(b"\0") else "",
        dev=st.st_dev,
        ino=st.st_ino,
        handle=handle,
    )


def volume_identities(cfg: ContainerConfig, init: int) -> tuple[VolumeIdentity, ...]:
    """Each volume as the container has it mounted (through ``/proc/INIT/root``: the path on
    the host may name another directory by now).  Raises PreflightError when one cannot be
    looked at."""
    out = []
    for m in cfg.mounts:
        try:
            out.append(
                identify(f"/proc/{init}/root{m.destination}", m.destination, m.source, m.shared)
            )
        except OSError as e:
            raise PreflightError(
                f"cannot look at the volume {m.source} (at {m.destination} in {cfg.name}): "
                f"{e.strerror or e}{KEEPS}"
            ) from e
    return tuple(out)


def check_volumes(volumes: Iterable[VolumeIdentity], name: str, source: str, node: str) -> None:
    """On the destination: each volume here is the one the container has (or, declared
    shared, at least exists as the same kind of file on the same type of file system).

    Raises PreflightError naming the first volume that is not."""
    for v in volumes:
        what = f"cannot migrate {name}: the volume {v.source} (at {v.destination})"
        try:
            here = identify(v.source, v.destination, v.source, v.shared)
        except OSError as e:
            raise PreflightError(
                f"{what} does not exist on {node} ({e.strerror or e}): "
                + (
                    "mount the shared storage there"
                    if v.shared
                    else "local data does not move with a migration; put it on shared storage "
                    "mounted on both nodes and declare it `-v HOST:CTR:shared`"
                )
                + KEEPS
            ) from e
        if v.shared:
            if here.kind != v.kind or here.fstype != v.fstype:
                raise PreflightError(
                    f"{what} is declared shared, but on {node} it is a {here.kind} on file "
                    f"system type {here.fstype:#x}, on {source} a {v.kind} on {v.fstype:#x}: "
                    f"mount the same storage at {v.source} on {node}{KEEPS}"
                )
        elif not v.same_file(here):
            raise PreflightError(
                f"{what} on {node} is not the {v.kind} the container has on {source} (another "
                "file system or another file): local data does not move with a migration; "
                "put it on shared storage mounted on both nodes and declare it "
                f"`-v HOST:CTR:shared`{KEEPS}"
            )


# -- private mappings ---------------------------------------------------------------------
@dataclass(frozen=True)
class PrivateMapping:
    """One private mapping of a process: ``start`` (hex), ``size_bytes``, ``pid``, ``comm``."""

    pid: int
    comm: str
    start: str
    size_bytes: int


#: areas CRIU does not map itself at restore
_SPECIAL_AREAS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
_AREA = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def private_mappings(pids: Iterable[int]) -> tuple[PrivateMapping | None, int]:
    """(the largest private mapping CRIU charges at restore under overcommit heuristics,
    the total bytes of private mappings) of ``pids``, from ``/proc/PID/smaps``.  A mapping
    made ``MAP_NORESERVE`` (VmFlags ``nr``) is left out of the first: it is not charged then
    (CRIU keeps the flag)."""
    largest: PrivateMapping | None = None
    total = 0
    for pid in pids:
        comm = _comm(pid)
        try:
            text = Path(f"/proc/{pid}/smaps").read_text()
        except OSError:
            continue
        area: tuple[str, int] | None = None
        for line in text.splitlines():
            m = _AREA.match(line)
            if m:
                area = None
                if m.group(3)[3] == "p" and m.group(4).strip() not in _SPECIAL_AREAS:
                    size = int(m.group(2), 16) - int(m.group(1), 16)
                    total += size
                    area = (m.group(1), size)
            elif line.startswith("VmFlags:") and area is not None:
                if "nr" not in line.split()[1:] and (
                    largest is None or area[1] > largest.size_bytes
                ):
                    largest = PrivateMapping(pid, comm, area[0], area[1])
                area = None
    return largest, total


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        f = v.split()
        if f and f[0].isdigit():
            out[k] = int(f[0]) * (1024 if f[1:] == ["kB"] else 1)
    return out


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_memory(largest: PrivateMapping | None, total: int, name: str, node: str) -> None:
    """On the destination: the private mappings can be charged here when CRIU maps them
    writable.  Raises PreflightError naming the mapping, its size and the limit."""
    try:
        mode = int(Path("/proc/sys/vm/overcommit_memory").read_text())
    except (OSError, ValueError):
        return
    mem = _meminfo()
    if mode == 0 and largest is not None:
        limit = mem.get("MemTotal", 0) + mem.get("SwapTotal", 0)
        if largest.size_bytes > limit:
            raise PreflightError(
                f"cannot migrate {name}: process {largest.pid} ({largest.comm}) has a private "
                "mapping of "
                f"{_gib(largest.size_bytes)} at 0x{largest.start}, which CRIU maps writable "
                f"at restore, and {node} (vm.overcommit_memory=0) refuses any mapping over "
                f"its RAM and swap ({_gib(limit)}): map it MAP_NORESERVE, or pick a node "
                f"with vm.overcommit_memory=1{KEEPS}"
            )
    if mode == 2:
        room = mem.get("CommitLimit", 0) - mem.get("Committed_AS", 0)
        if total > room:
            big = (
                f", the largest {_gib(largest.size_bytes)} at 0x{largest.start}" if largest else ""
            )
            raise PreflightError(
                f"cannot migrate {name}: its private mappings total {_gib(total)}{big}, and {node} "
                f"(vm.overcommit_memory=2) can commit only {_gib(room)} more: free memory "
                f"there or pick another node{KEEPS}"
            )


# -- what the source sends ----------------------------------------------------------------
@dataclass(frozen=True)
class NodeNeeds:
    """What a container needs of the node it is restored on, sent in the ``offer``.

    Attributes:
        volumes: one :class:`VolumeIdentity` per volume.
        sockets: TCP sockets bound in the host's network namespace (``--network host``).
        largest_mapping: the largest private mapping charged at restore, or None.
        private_bytes: the sum of the private mappings of every process.
    """

    volumes: tuple[VolumeIdentity, ...] = ()
    sockets: tuple[BoundSocket, ...] = ()
    largest_mapping: PrivateMapping | None = None
    private_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeNeeds:
        """Raises ProtocolError naming what is malformed."""
        try:
            lm = d.get("largest_mapping")
            return cls(
                volumes=tuple(VolumeIdentity(**v) for v in d.get("volumes", ())),
                sockets=tuple(BoundSocket(**s) for s in d.get("sockets", ())),
                largest_mapping=PrivateMapping(**lm) if lm else None,
                private_bytes=int(d.get("private_bytes", 0)),
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"offer.needs is malformed: {e}") from e


def node_needs(cfg: ContainerConfig, init: int, pids: Iterable[int]) -> NodeNeeds:
    """On the source, before the freeze: what the container of init ``init`` (its tasks
    ``pids``) needs of a destination.  Raises PreflightError when a volume cannot be
    looked at."""
    pids = list(pids)
    largest, total = private_mappings(pids)
    return NodeNeeds(
        volumes=volume_identities(cfg, init),
        sockets=host_tcp_sockets(init, pids) if cfg.network == "host" else (),
        largest_mapping=largest,
        private_bytes=total,
    )


def check_needs(needs: NodeNeeds, name: str, source: str, node: str) -> None:
    """On the destination: refuse what this node cannot give the container ``name``
    coming from ``source``.  Raises PreflightError naming the object."""
    check_volumes(needs.volumes, name, source, node)
    check_sockets(needs.sockets, name, node)
    check_memory(needs.largest_mapping, needs.private_bytes, name, node)
