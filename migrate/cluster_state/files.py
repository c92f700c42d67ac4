"""The ``files`` backend: the cluster state of nodes that share one host, in one directory.

Layout (``ROOT`` is ``[state] path``, by default ``<cluster file stem>-state`` beside the
cluster file; made 0700)::

    ROOT/
      members.json      {"nodes": {NODE: {"expires": T, "registered": T, "draining": B,
                                          "epoch": N}}}
      owners.json       {"revision": N, "owners": {ID: {"node": NODE, "revision": N}}}
      ips.json          {"subnets": {SUBNET: {ADDRESS: ID}}}
      leaders.json      {"elections": {NAME: {"node": NODE, "token": N}}}
      leaders/NAME.lock held with flock(LOCK_EX) by the leader of NAME while it leads
      events.jsonl      one JSON object a line: {"seq", "time", "kind", "node", "data"}
      .NAME.lock        the flock of each document above while it changes

Every change of a JSON document happens under an exclusive ``flock(2)`` of its ``.lock``
file: read, change, write a temp file, fsync, rename over the document, fsync the
directory.  Readers read without the lock (a rename is atomic: they see the old or the new
document, whole).  Times are wall-clock seconds (every node here shares the host's clock):
a member whose ``expires`` has passed is ``lost``.  The owners' ``revision`` counter only
grows (also across releases), so an owner's revision is a fencing token as etcd's is.

Leadership is the flock of ``leaders/NAME.lock``: the kernel drops it when the leader's
process dies, so a crashed leader is replaced at once; it cannot be lost otherwise.  The
event log is appended under its lock with ``seq`` one more than the last line's; a torn last
line (a crash in the middle of a write) is cut off by the next append.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from migrate.cluster_state import (
    ClusterStateError,
    Event,
    IpLease,
    Member,
    MemberLost,
    MemberStatus,
    NoAddressFree,
    NotLeader,
    Owner,
    OwnershipConflict,
    StaleRevision,
    StateUnavailable,
)
from migrate.cluster_state.common import (
    canonical_subnet,
    check_address,
    check_container_id,
    check_election,
    check_kind,
    check_node,
    pick_address,
)
from migrate.config import DEFAULT_STATE_TTL_S, StateBackend
from runtime.poll import wait_for


class _Doc:
    """One JSON document of the store, changed under its flock."""

    def __init__(self, root: Path, name: str) -> None:
        self.path = root / name
        self.lock = root / f".{name}.lock"

    def read(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ClusterStateError(f"cannot read {self.path}: {e}") from e
        if not isinstance(data, dict):
            raise ClusterStateError(f"{self.path} is not a JSON object: remove or repair it")
        return data

    @contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """Yield the document; what the caller leaves in it is written back atomically
        (unless the block raises)."""
        with _locked(self.lock):
            data = self.read()
            yield data
            _write_atomic(self.path, json.dumps(data, sort_keys=True).encode())


@contextmanager
def _locked(path: Path, shared: bool = False) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FileLeadership:
    """Leading one election of a :class:`FilesState`: the flock of ``leaders/NAME.lock``."""

    def __init__(self, state: FilesState, name: str, node: str, fd: int, token: int) -> None:
        self.name = name
        self.node = node
        self.token = token
        self.lost = threading.Event()
        self._state = state
        self._fd: int | None = fd

    def held(self) -> bool:
        return not self.lost.is_set()

    def resign(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with self._state._leaders.update() as doc:
                e = doc.get("elections", {}).get(self.name)
                if e is not None and e.get("token") == self.token:
                    e["node"] = None
        finally:
            os.close(fd)  # drops the flock
            self.lost.set()
            self._state._held.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.resign()


class FilesState:
    """The ``files`` backend (layout and rules in the module docstring).

    Args:
        root: the directory (made 0700 when missing).
        ttl_s: the default membership lease, seconds.

    Raises:
        ClusterStateError: ``root`` cannot be made.
    """

    backend = StateBackend.FILES

    def __init__(self, root: Path, ttl_s: float = DEFAULT_STATE_TTL_S) -> None:
        self.root = Path(root)
        self.ttl_s = ttl_s
        try:
            (self.root / "leaders").mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ClusterStateError(
                f"cannot make the cluster state directory {self.root}: {e.strerror or e}; "
                "set [state] path in the cluster file to a directory this node can write"
            ) from e
        self._members = _Doc(self.root, "members.json")
        self._owners = _Doc(self.root, "owners.json")
        self._ips = _Doc(self.root, "ips.json")
        self._leaders = _Doc(self.root, "leaders.json")
        self._events = self.root / "events.jsonl"
        self._epochs: dict[str, int] = {}  # node -> the epoch this client registered
        self._held: set[FileLeadership] = set()

    def close(self) -> None:
        for lead in list(self._held):
            lead.resign()

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StateUnavailable(f"the cluster state directory {self.root} is not writable")

    # -- membership ---------------------------------------------------------------------------

    def register(self, node: str, ttl_s: float | None = None) -> Member:
        check_node(node)
        ttl = self.ttl_s if ttl_s is None else ttl_s
        now = time.time()
        with self._members.update() as doc:
            nodes = doc.setdefault("nodes", {})
            old = nodes.get(node, {})
            epoch = int(old.get("epoch", 0)) + 1
            draining = bool(old.get("draining", False))
            nodes[node] = {
                "expires": now + ttl,
                "ttl": ttl,
                "registered": now,
                "draining": draining,
                "epoch": epoch,
            }
        self._epochs[node] = epoch
        return Member(node, MemberStatus.DRAINING if draining else MemberStatus.READY, now)

    def renew(self, node: str) -> None:
        check_node(node)
        now = time.time()
        with self._members.update() as doc:
            e = doc.get("nodes", {}).get(node)
            mine = self._epochs.get(node)
            if e is None or mine is None or e.get("epoch") != mine:
                raise MemberLost(
                    f"node {node} is not registered by this process (or registered again "
                    "elsewhere): register it again",
                    node,
                )
            if e["expires"] <= now:
                raise MemberLost(
                    f"node {node}'s membership lease expired {now - e['expires']:.1f} s ago: "
                    "register again and reconcile its containers",
                    node,
                )
            e["expires"] = now + float(e.get("ttl", self.ttl_s))

    def set_draining(self, node: str, draining: bool) -> None:
        check_node(node)
        with self._members.update() as doc:
            e = doc.get("nodes", {}).get(node)
            if e is None:
                raise MemberLost(f"node {node} never registered", node)
            e["draining"] = bool(draining)

    def deregister(self, node: str) -> None:
        check_node(node)
        with self._members.update() as doc:
            e = doc.get("nodes", {}).get(node)
            if e is not None and e.get("epoch") == self._epochs.get(node):
                e["expires"] = 0.0
        self._epochs.pop(node, None)

    def members(self) -> list[Member]:
        now = time.time()
        out = []
        for name, e in sorted(self._members.read().get("nodes", {}).items()):
            if e.get("expires", 0) <= now:
                status = MemberStatus.LOST
            elif e.get("draining"):
                status = MemberStatus.DRAINING
            else:
                status = MemberStatus.READY
            out.append(Member(name, status, float(e.get("registered", 0))))
        return out

    # -- ownership ----------------------------------------------------------------------------

    def claim(self, container_id: str, node: str) -> Owner:
        check_container_id(container_id)
        check_node(node)
        with self._owners.update() as doc:
            owners = doc.setdefault("owners", {})
            cur = owners.get(container_id)
            if cur is not None:
                if cur["node"] == node:
                    return Owner(node, int(cur["revision"]))
                raise _conflict(container_id, node, cur)
            rev = int(doc.get("revision", 0)) + 1
            doc["revision"] = rev
            owners[container_id] = {"node": node, "revision": rev}
            return Owner(node, rev)

    def transfer(
        self, container_id: str, from_node: str, to_node: str, expected_revision: int
    ) -> Owner:
        check_container_id(container_id)
        check_node(from_node)
        check_node(to_node)
        with self._owners.update() as doc:
            owners = doc.setdefault("owners", {})
            cur = owners.get(container_id)
            if cur is None or cur["node"] != from_node or int(cur["revision"]) != expected_revision:
                raise _stale(container_id, from_node, expected_revision, cur)
            rev = int(doc.get("revision", 0)) + 1
            doc["revision"] = rev
            owners[container_id] = {"node": to_node, "revision": rev}
            return Owner(to_node, rev)

    def owner(self, container_id: str) -> Owner | None:
        check_container_id(container_id)
        cur = self._owners.read().get("owners", {}).get(container_id)
        return None if cur is None else Owner(cur["node"], int(cur["revision"]))

    def release(self, container_id: str, node: str, expected_revision: int | None = None) -> bool:
        check_container_id(container_id)
        check_node(node)
        with self._owners.update() as doc:
            owners = doc.setdefault("owners", {})
            cur = owners.get(container_id)
            if cur is None:
                return False
            if cur["node"] != node:
                raise _conflict(container_id, node, cur)
            if expected_revision is not None and int(cur["revision"]) != expected_revision:
                raise _stale(container_id, node, expected_revision, cur)
            del owners[container_id]
            # the counter stays: a later claim gets a larger revision
            return True

    def owned_by(self, node: str) -> dict[str, Owner]:
        check_node(node)
        owners = self._owners.read().get("owners", {})
        return {
            cid: Owner(e["node"], int(e["revision"]))
            for cid, e in sorted(owners.items())
            if e["node"] == node
        }

    # -- IP leases ----------------------------------------------------------------------------

    def lease_ip(self, subnet: str, container_id: str, address: str | None = None) -> IpLease:
        net = canonical_subnet(subnet)
        check_container_id(container_id)
        want = None if address is None else str(check_address(net, address))
        with self._ips.update() as doc:
            leases = doc.setdefault("subnets", {}).setdefault(str(net), {})
            for a, cid in leases.items():
                if cid == container_id:
                    return IpLease(str(net), a, container_id)
            if want is not None:
                if want in leases:
                    raise NoAddressFree(
                        f"{want} in {net} is leased to container {leases[want]}: pick another "
                        "address or none"
                    )
                pick: str | None = want
            else:
                pick = pick_address(net, leases)
            if pick is None:
                raise NoAddressFree(f"every address of {net} is leased: use a larger subnet")
            leases[pick] = container_id
            return IpLease(str(net), pick, container_id)

    def release_ip(self, subnet: str, container_id: str) -> bool:
        net = canonical_subnet(subnet)
        check_container_id(container_id)
        with self._ips.update() as doc:
            leases = doc.setdefault("subnets", {}).setdefault(str(net), {})
            mine = [a for a, cid in leases.items() if cid == container_id]
            for a in mine:
                del leases[a]
            return bool(mine)

    def ip_leases(self, subnet: str) -> list[IpLease]:
        net = canonical_subnet(subnet)
        leases = self._ips.read().get("subnets", {}).get(str(net), {})
        return [
            IpLease(str(net), a, cid)
            for a, cid in sorted(leases.items(), key=lambda kv: _ip_key(kv[0]))
        ]

    # -- leadership ---------------------------------------------------------------------------

    def campaign(
        self, name: str, node: str, ttl_s: float | None = None, timeout_s: float | None = None
    ) -> FileLeadership:
        check_election(name)
        check_node(node)
        lock = self.root / "leaders" / f"{name}.lock"

        def try_lock() -> int | None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            return fd

        fd = wait_for(try_lock, timeout_s, max_interval_s=0.1)
        if fd is None:
            raise NotLeader(
                f"{self.leader(name) or 'another node'} still leads {name} after {timeout_s:g} s",
                name,
                self.leader(name),
            )
        try:
            with self._leaders.update() as doc:
                e = doc.setdefault("elections", {}).setdefault(name, {})
                token = int(e.get("token", 0)) + 1
                e.update(node=node, token=token)
        except BaseException:
            os.close(fd)
            raise
        lead = FileLeadership(self, name, node, fd, token)
        self._held.add(lead)
        return lead

    def leader(self, name: str) -> str | None:
        check_election(name)
        lock = self.root / "leaders" / f"{name}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it
            except BlockingIOError:
                pass
        finally:
            os.close(fd)
        e = self._leaders.read().get("elections", {}).get(name, {})
        node = e.get("node")
        return node if isinstance(node, str) else None

    # -- events -------------------------------------------------------------------------------

    def append_event(self, kind: str, node: str, data: Mapping[str, Any] | None = None) -> Event:
        check_kind(kind)
        check_node(node)
        body = dict(data or {})
        with _locked(self.root / ".events.jsonl.lock"):
            fd = os.open(self._events, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "r+b") as f:
                last = _last_seq(f)  # also cuts a torn last line off
                ev = Event(last + 1, time.time(), kind, node, body)
                line = {"seq": ev.seq, "time": ev.time, "kind": kind, "node": node, "data": body}
                f.seek(0, os.SEEK_END)
                f.write(json.dumps(line, sort_keys=True).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return ev

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        out: list[Event] = []
        if not self._events.exists():
            return out
        with open(self._events, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # being written, or torn
                e = json.loads(raw)
                if e["seq"] > seq:
                    out.append(Event(e["seq"], e["time"], e["kind"], e["node"], e["data"]))
                    if len(out) >= limit:
                        break
        return out


def _last_seq(f: Any) -> int:
    """The ``seq`` of the last whole line of the open events file ``f``; a torn tail (no
    final newline) is truncated away first."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    chunk = 4096
    pos = size
    tail = b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
        if tail.count(b"\n") >= 2 or pos == 0:
            break
    if not tail.endswith(b"\n"):
        cut = tail.rfind(b"\n")
        keep = pos + cut + 1 if cut >= 0 else 0
        f.truncate(keep)
        tail = tail[: cut + 1] if cut >= 0 else b""
    lines = [ln for ln in tail.split(b"\n") if ln]
    return int(json.loads(lines[-1])["seq"]) if lines else 0


def _ip_key(address: str) -> tuple[int, int]:
    import ipaddress

    a = ipaddress.ip_address(address)
    return (a.version, int(a))


def _conflict(container_id: str, node: str, cur: Mapping[str, Any]) -> OwnershipConflict:
    return OwnershipConflict(
        f"container {container_id} is owned by node {cur['node']} (revision "
        f"{cur['revision']}), not {node}: it runs (or may run) there; move it with "
        f"`jaula migrate` or release it on {cur['node']} first",
        container_id,
        str(cur["node"]),
        int(cur["revision"]),
    )


def _stale(
    container_id: str, from_node: str, expected: int, cur: Mapping[str, Any] | None
) -> StaleRevision:
    now = (
        "nobody owns it" if cur is None else f"{cur['node']} owns it at revision {cur['revision']}"
    )
    return StaleRevision(
        f"container {container_id}: expected {from_node} at revision {expected}, but {now}: "
        "another writer came first",
        container_id,
        None if cur is None else str(cur["node"]),
        0 if cur is None else int(cur["revision"]),
        expected,
    )
