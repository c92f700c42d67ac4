"""User namespaces: id maps, the id-range allocator, and id-mapped image layers.

Three modes, as Podman spells them (``jaula run --userns=...``):

- ``host`` (the default): the container shares the host's user namespace; root in it is
  root on the host.
- ``auto``: the container gets :data:`AUTO_SIZE` (65,536) uids and gids of its own, a range
  ``[start, start + 65536)`` handed out by an :class:`IdRangeAllocator`; uid 0 inside is
  ``start`` on the host.  The range is the container's for its whole life, on every node
  it migrates to: the destination reserves the same range or refuses the migration.
- ``--uidmap CONTAINER:HOST:SIZE`` / ``--gidmap`` (repeatable): the maps as given
  (``private`` in the config).  Without ``--gidmap`` the gid map is the uid map.

How the rootfs is seen with the container's ids: the image layers are id-mapped mounts
(mount_setattr(2) MOUNT_ATTR_IDMAP with a user namespace that has the container's maps):
a file owned by uid 0 in a layer appears owned by host uid ``start``, so container root
owns it.  overlayfs accepts id-mapped lower layers (Linux 5.19) but cannot itself be
id-mapped (mount_setattr gives EINVAL: overlayfs lacks FS_ALLOW_IDMAP), and an id-mapped
upper layer makes overlayfs mount read-only here; so the upperdir is a plain directory
whose root is chowned to the container's root (one chown of an empty directory: no cost),
and what the container writes there is stored with the mapped host ids, as the kernel
maps them.  Lower layers stay shared between containers of any mapping and are never
copied or chowned.  The layer mounts are detached once the overlay is mounted (overlayfs
holds its own private clones of them), so the host's mount table gains nothing.

The namespace used for the id-mapping is made by a short-lived child (unshare(2)
CLONE_NEWUSER, maps written by the parent, see user_namespaces(7)) and kept by an open
fd; the container's own user namespace is made the same way by its monitor
(:mod:`runtime.monitor`), which then creates the other namespaces inside it.

The allocator's files backend (:class:`FileIdAllocator`) is a JSON file under the state
root, ``idranges.json``: ``{"<container id>": [start, size], ...}``, changed under an
flock of ``idranges.lock`` and written atomically.

Sources: user_namespaces(7) (uid_map rules, ownership of namespaces), mount_setattr(2),
Documentation/filesystems/overlayfs.rst ("Idmapped layers"), podman-run(1) --userns,
--uidmap, --gidmap.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runtime import syscalls as sc
from runtime.errors import ConfigError, ContainerError

#: ids per container with ``--userns=auto`` (Podman's default size)
AUTO_SIZE = 65536
#: first host id the allocator hands out: above the usual /etc/subuid ranges (100000 + n *
#: 65536 for a few users), so that an auto range never meets a rootless user's
AUTO_FIRST = 1 << 20
#: one past the last host id the allocator hands out (uid_t is 32 bits; 2**32 - 1 is
#: "no id")
AUTO_END = 1 << 31
USERNS_MODES = ("host", "auto", "private")
RANGES_FILE = "idranges.json"


@dataclass(frozen=True)
class IdMapping:
    """One line of /proc/PID/uid_map: ``size`` ids from ``container`` inside are
    ``host`` ... on the host."""

    container: int
    host: int
    size: int

    def line(self) -> str:
        return f"{self.container} {self.host} {self.size}"

    def to_json(self) -> list[int]:
        return [self.container, self.host, self.size]

    @classmethod
    def from_json(cls, v: Sequence[int]) -> IdMapping:
        return cls(int(v[0]), int(v[1]), int(v[2]))


def parse_idmap(value: str, flag: str = "--uidmap") -> IdMapping:
    """``CONTAINER:HOST:SIZE`` (Podman's ``--uidmap``).  Raises ConfigError."""
    parts = value.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"{flag} {value!r}: expected CONTAINER:HOST:SIZE, three numbers")
    c, h, s = (int(p) for p in parts)
    if s == 0 or c + s > 1 << 32 or h + s > 1 << 32:
        raise ConfigError(f"{flag} {value!r}: the size must be at least 1 and fit in 32 bits")
    return IdMapping(c, h, s)


def check_maps(maps: Sequence[IdMapping], flag: str = "--uidmap") -> None:
    """Raise ConfigError when two mappings overlap inside or on the host (the kernel
    refuses such a uid_map with EINVAL), or when there are more than 340 (its limit)."""
    if len(maps) > 340:
        raise ConfigError(f"{flag}: at most 340 mappings, got {len(maps)}")
    for i, a in enumerate(maps):
        for b in maps[i + 1 :]:
            for side, x, y in (("container", a.container, b.container), ("host", a.host, b.host)):
                if x < y + b.size and y < x + a.size:
                    raise ConfigError(
                        f"{flag} {a.container}:{a.host}:{a.size} and "
                        f"{b.container}:{b.host}:{b.size} overlap on the {side} side: "
                        "give disjoint ranges"
                    )


def host_id(maps: Sequence[IdMapping], inside: int) -> int | None:
    """The host id of container id ``inside``, or None when it is not mapped."""
    for m in maps:
        if m.container <= inside < m.container + m.size:
            return m.host + inside - m.container
    return None


def parse_userns(value: str) -> str:
    """``--userns`` value: ``host`` or ``auto`` (Podman's ``auto:size=N`` and the others
    are not supported).  Raises ConfigError."""
    if value not in ("host", "auto"):
        raise ConfigError(f"--userns {value!r}: jaula supports host and auto")
    return value


# -- the allocator ----------------------------------------------------------------------


class IdRangeAllocator(Protocol):
    """Hands out disjoint host id ranges, one per container, as IP leases are handed out
    (:class:`runtime.network.IpLeases`).  Cluster-wide backends (etcd) implement the same
    three calls.  ``cluster_wide``: one allocator for every node (a migrated-away copy's
    removal must then leave the range to the node that runs the container now)."""

    cluster_wide: bool

    def reserve(self, container_id: str, size: int = AUTO_SIZE) -> int:
        """The start of a free range of ``size`` ids now held by ``container_id`` (the
        range it holds already, if any).  Raises ContainerError when none is left."""
        ...

    def reserve_exact(self, container_id: str, start: int, size: int) -> None:
        """Hold ``[start, start + size)`` for ``container_id`` (a migrated or restored
        container keeps its range).  Raises ContainerError naming the holder when another
        container has any of it."""
        ...

    def release(self, container_id: str) -> None:
        """Give back what ``container_id`` holds (nothing: no error)."""
        ...


class FileIdAllocator:
    """:class:`IdRangeAllocator` on a JSON file under the state root (format in the module
    docstring), changed under an flock so that concurrent ``run`` calls never share.
    One per node: a migration's destination reserves the same range in its own."""

    cluster_wide = False

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / RANGES_FILE
        self.lock_path = Path(root) / "idranges.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, list[int]]]:
        from runtime.state import atomic_write_json
        from runtime.store import flocked

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with flocked(self.lock_path):
            try:
                held: dict[str, list[int]] = json.loads(self.path.read_text())
            except FileNotFoundError:
                held = {}
            before = dict(held)
            yield held
            if held != before:
                atomic_write_json(self.path, held)

    def held(self) -> dict[str, tuple[int, int]]:
        """``{container id: (start, size)}`` of every range held."""
        with self._locked() as held:
            return {k: (v[0], v[1]) for k, v in held.items()}

    def reserve(self, container_id: str, size: int = AUTO_SIZE) -> int:
        with self._locked() as held:
            if container_id in held:
                return held[container_id][0]
            taken = sorted((s, s + n) for s, n in held.values())
            start = AUTO_FIRST
            for s, e in taken:
                if start + size <= s:
                    break
                start = max(start, e)
            if start + size > AUTO_END:
                raise ContainerError(
                    f"no free range of {size} ids left for --userns=auto: remove containers",
                    container_id,
                )
            held[container_id] = [start, size]
            return start

    def reserve_exact(self, container_id: str, start: int, size: int) -> None:
        with self._locked() as held:
            for other, (s, n) in held.items():
                if other != container_id and start < s + n and s < start + size:
                    raise ContainerError(
                        f"host ids {start}-{start + size - 1} are taken by container "
                        f"{other[:12]} on this node",
                        container_id,
                    )
            held[container_id] = [start, size]

    def release(self, container_id: str) -> None:
        with self._locked() as held:
            held.pop(container_id, None)


def auto_maps(start: int, size: int = AUTO_SIZE) -> tuple[IdMapping, ...]:
    """The one mapping of an auto range: container ids 0.. are host ids ``start``.."""
    return (IdMapping(0, start, size),)


def range_of(maps: Sequence[IdMapping]) -> tuple[int, int]:
    """(first host id, count) covering every mapping, for the allocator."""
    lo = min(m.host for m in maps)
    hi = max(m.host + m.size for m in maps)
    return lo, hi - lo


# -- the kernel side --------------------------------------------------------------------


def write_maps(pid: int, uid_map: Sequence[IdMapping], gid_map: Sequence[IdMapping]) -> None:
    """Write /proc/PID/uid_map and gid_map of a process in a fresh user namespace (once
    each; the caller is root in the parent namespace).  Raises OSError."""
    for name, maps in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("\n".join(m.line() for m in maps) + "\n")


def make_userns(uid_map: Sequence[IdMapping], gid_map: Sequence[IdMapping]) -> int:
    """A new user namespace with these maps, as an O_RDONLY fd (close it to let the
    namespace go).  Made by a forked child that exits at once.  Raises ContainerError with
    the kernel's reason (an overlapping or out-of-range map: EINVAL)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(ready_r)
            os.close(done_w)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(done_r, 1)
        except BaseException:  # noqa: BLE001 - the parent sees EOF
            code = 1
        os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise ContainerError("cannot create a user namespace (unshare CLONE_NEWUSER failed)")
        try:
            write_maps(pid, uid_map, gid_map)
        except OSError as e:
            raise ContainerError(f"cannot write the user namespace's id maps: {e}") from e
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


@contextlib.contextmanager
def idmapped_layers(
    lowerdirs: Sequence[Path],
    stage: Path,
    uid_map: Sequence[IdMapping],
    gid_map: Sequence[IdMapping],
) -> Iterator[list[Path]]:
    """Id-mapped mounts of ``lowerdirs`` at ``stage/0``, ``stage/1``... for the time of
    the block (mount the overlay in it); every one is detached and ``stage`` removed on
    exit.  Raises OSError (EINVAL: the layers' file system cannot be id-mapped)."""
    userns = make_userns(uid_map, gid_map)
    stage.mkdir(mode=0o700, exist_ok=True)
    mounted: list[Path] = []
    try:
        for i, d in enumerate(lowerdirs):
            target = stage / str(i)
            target.mkdir(exist_ok=True)
            fd = sc.open_tree_clone(d)
            try:
                sc.set_idmap(fd, userns)
                sc.move_mount_to(fd, target)
            finally:
                os.close(fd)
            mounted.append(target)
        yield mounted
    finally:
        os.close(userns)
        for target in mounted:
            with contextlib.suppress(OSError):
                sc.umount(target, sc.MNT_DETACH)
        with contextlib.suppress(OSError):
            for d in stage.iterdir():
                d.rmdir()
            stage.rmdir()


def maps_json(maps: Sequence[IdMapping]) -> list[list[int]]:
    return [m.to_json() for m in maps]


def maps_from_json(v: Any) -> tuple[IdMapping, ...]:
    return tuple(IdMapping.from_json(x) for x in (v or ()))
