"""The container's root filesystem: an overlayfs mount in the host mount namespace.

``lowerdir`` is the image's layers (top first, as overlayfs wants them), ``upperdir`` and
``workdir`` live in the container's directory, and the merged view is mounted at
``<container dir>/merged``; the container init pivots into it.  Everything the container
writes lands in ``upperdir`` (with whiteouts and opaque dirs in overlayfs form), which is what
a checkpoint carries.

Source: Documentation/filesystems/overlayfs.rst (lowerdir order, workdir on the same
filesystem as upperdir, "index" and "redirect_dir" features).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from runtime import syscalls
from runtime.errors import MountError
from runtime.userns import IdMapping, host_id, idmapped_layers

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class OverlayLayout:
    """Paths of one container's overlay.

    Attributes:
        lowerdirs: layer directories, bottom -> top (image order).
        upperdir / workdir: writable layer and overlayfs' scratch dir (same filesystem).
        merged: the mount point.
    """

    lowerdirs: tuple[Path, ...]
    upperdir: Path
    workdir: Path
    merged: Path

    @classmethod
    def in_dir(cls, container_dir: Path, lowerdirs: list[Path]) -> OverlayLayout:
        return cls(
            tuple(lowerdirs),
            container_dir / "upper",
            container_dir / "work",
            container_dir / "merged",
        )

    def options(self) -> str:
        """The mount data string.  Raises MountError when it exceeds a page (too many
        layers for one mount(2) call)."""
        lower = ":".join(os.fspath(p) for p in reversed(self.lowerdirs))
        data = f"lowerdir={lower},upperdir={self.upperdir},workdir={self.workdir}"
        if len(data) >= _PAGE:
            raise MountError(
                f"overlay options are {len(data)} bytes, over the {_PAGE}-byte "
                f"limit: the image has too many layers ({len(self.lowerdirs)})"
            )
        return data


def overlay_supported() -> bool:
    """Whether the kernel knows overlayfs (``/proc/filesystems``)."""
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def is_mountpoint(path: Path) -> bool:
    """True when ``path`` is a mount point in the caller's mount namespace (mountinfo)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp == target:
                    return True
    except OSError:
        return False
    return False


def mount_overlay(
    layout: OverlayLayout,
    uid_map: Sequence[IdMapping] = (),
    gid_map: Sequence[IdMapping] = (),
) -> None:
    """Create upperdir/workdir/merged if needed and mount the overlay at ``merged``.

    With ``uid_map``/``gid_map`` (a container in a user namespace) the layers are id-mapped
    mounts and the upperdir's root belongs to the container's root (:mod:`runtime.userns`).

    Raises MountError naming the mount point and the kernel's reason."""
    if not layout.lowerdirs:
        raise MountError("the image has no layers: nothing to mount")
    for d in (layout.upperdir, layout.workdir, layout.merged):
        d.mkdir(mode=0o755, exist_ok=True)
    if not overlay_supported():
        raise MountError("this kernel has no overlayfs: load it with `modprobe overlay`")
    try:
        if not uid_map:
            syscalls.mount("overlay", layout.merged, "overlay", 0, layout.options())
            return
        root_uid = host_id(uid_map, 0)
        root_gid = host_id(gid_map or uid_map, 0)
        os.chown(layout.upperdir, -1 if root_uid is None else root_uid,
                 -1 if root_gid is None else root_gid)  # fmt: skip
        stage = layout.upperdir.parent / "idmap"
        with idmapped_layers(layout.lowerdirs, stage, uid_map, gid_map or uid_map) as lowers:
            mapped = replace(layout, lowerdirs=tuple(lowers))
            syscalls.mount("overlay", layout.merged, "overlay", 0, mapped.options())
    except OSError as e:
        raise MountError(
            f"cannot mount the container's overlay at {layout.merged}: {e.strerror}"
        ) from e


def unmount(path: Path) -> None:
    """Unmount ``path`` if it is a mount point (lazily if busy).  Raises MountError."""
    if not is_mountpoint(path):
        return
    try:
        syscalls.umount(path)
    except OSError as e:
        if e.errno == 16:  # EBUSY: detach; the last user releases it
            try:
                syscalls.umount(path, syscalls.MNT_DETACH)
                return
            except OSError as e2:
                e = e2
        raise MountError(f"cannot unmount {path}: {e.strerror}") from e
