"""Disk quota of a container's writable layer (``--storage-opt size=SIZE``), on project quotas.

What is limited: the container's overlay ``upper`` and ``work`` directories (what it writes;
the image's layers are shared and read-only, as with Podman's overlay driver).  Both get one
project id with the PROJINHERIT flag, so that everything created under them is counted in
that project and a rename from ``work`` into ``upper`` (overlayfs' copy-up) stays within one
project (XFS refuses a rename across projects with EXDEV).  The project's hard and soft block
limits are set to SIZE; a write past it fails with EDQUOT ("Disk quota exceeded").

Which file systems: those that serve project quotas through the generic quota interface
(quotactl_fd(2), Linux 5.14): XFS mounted with ``prjquota`` (or ``pquota``), or ext4 made with
the ``project`` and ``quota`` features and mounted with ``prjquota``.  The state root's file
system is asked (Q_GETINFO for PRJQUOTA) before anything is made; when it cannot,
:func:`check_supported` raises a one-line ConfigError naming the state root and what it needs.

Project id: derived from the container's directory path (a 31-bit hash, never 0), so that it
is stable for the container on that node and differs between two nodes whose state roots
share one file system (a migration on one host then does not count both copies in one
project).  The directory keeps the id; the limit is set again whenever the upper directory
is made anew (a restore, a migration's destination) and cleared when the container is
removed.

Across checkpoint and migration: the size is part of the container's config; the restore
and the destination call :func:`prepare_dirs` before unpacking the upperdir into it, and the
destination's preflight refuses a migration when its state root cannot hold a quota
(:func:`check_supported`).

Sources: xfs_quota(8) ("project"), ioctl_xfs_fsgetxattr(2), quotactl(2), ext4(5) (project).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from runtime import syscalls as sc
from runtime.errors import ConfigError

UPPER, WORK = "upper", "work"


def parse_storage_opts(values: list[str]) -> int | None:
    """The size in bytes of ``--storage-opt size=SIZE`` values (bytes, or k/m/g/t), ``None``
    when none is given.  Raises ConfigError for another option or a bad size."""
    from runtime.spec import _SIZE_RE, _UNITS

    size: int | None = None
    for v in values:
        key, sep, val = v.partition("=")
        m = _SIZE_RE.match(val.strip()) if key == "size" and sep else None
        if not m:
            raise ConfigError(
                f"invalid --storage-opt {v!r}: jaula knows size=SIZE (bytes, or 100m, 1g...)"
            )
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if size < 1 << 20:
            raise ConfigError(f"invalid --storage-opt {v!r}: the minimum is 1m")
    return size


def check_supported(root: Path) -> None:
    """Return when the file system of ``root`` can hold project quotas; else raise
    ConfigError in one line naming ``root`` and what it needs."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ConfigError(f"--storage-opt size= cannot check {root}: {e.strerror}") from None
    try:
        sc.get_project_quota_info(fd)
    except OSError as e:
        raise ConfigError(
            f"--storage-opt size= needs project quotas on the file system of the state root "
            f"{root} ({os.strerror(e.errno or 0)}): put it on XFS mounted with prjquota, or "
            "ext4 with the project feature mounted with prjquota"
        ) from None
    finally:
        os.close(fd)


def project_id(container_dir: Path) -> int:
    """The project id of the container whose directory is ``container_dir``: 1..2**31-1."""
    h = hashlib.sha256(os.fsencode(os.path.realpath(container_dir))).digest()
    return int.from_bytes(h[:4], "big") % ((1 << 31) - 1) + 1


def prepare_dirs(container_dir: Path, size_bytes: int | None) -> None:
    """Make the container's ``upper`` and ``work`` directories (0755) if missing, and with
    ``size_bytes`` put both in the container's project with that hard limit.

    Raises ConfigError when the file system cannot (see :func:`check_supported`), OSError
    for other failures."""
    dirs = [container_dir / UPPER, container_dir / WORK]
    for d in dirs:
        d.mkdir(mode=0o755, exist_ok=True)
    if not size_bytes:
        return
    check_supported(container_dir)
    pid = project_id(container_dir)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sc.set_project(fd, pid)
            if d.name == UPPER:
                sc.set_project_block_limit(fd, pid, size_bytes)
        finally:
            os.close(fd)


def release(container_dir: Path, size_bytes: int | None) -> None:
    """Clear the limit of the container's project (before its directory is removed);
    nothing without ``size_bytes``.  Raises OSError."""
    if not size_bytes or not (container_dir / UPPER).is_dir():
        return
    fd = os.open(container_dir / UPPER, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sc.set_project_block_limit(fd, project_id(container_dir), 0)
    finally:
        os.close(fd)


def usage(container_dir: Path) -> tuple[int, int]:
    """(limit bytes, used bytes) of the container's project.  Raises OSError."""
    fd = os.open(container_dir / UPPER, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sc.get_project_usage(fd, project_id(container_dir))
    finally:
        os.close(fd)


__all__ = [
    "check_supported",
    "parse_storage_opts",
    "prepare_dirs",
    "project_id",
    "release",
    "usage",
]
