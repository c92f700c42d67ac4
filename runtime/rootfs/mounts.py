"""What the container init mounts inside its own mount namespace before it pivots.

Run by the init (after ``unshare(CLONE_NEWNS)`` and making ``/`` recursively private) on the
host path of the rootfs.  The resulting mount table inside the container is::

    /                 overlay (bind of <container dir>/merged)
    /proc             proc            (masked and read-only paths as runc's default spec)
    /dev              tmpfs 64 KiB    null zero full random urandom tty, symlinks
    /dev/pts          devpts          newinstance, ptmx mode 0666
    /dev/shm          tmpfs           mode 1777 (saved with the container by CRIU)
    /sys              sysfs           read-only
    masked dirs       bind, read-only of /dev/.masked (empty); masked files: bind of /dev/null
    <volumes>         bind mounts     from -v HOST:CTR[:ro]

Sources: OCI runtime-spec ``config-linux.md`` ("Default Filesystems", "Default Devices",
"Masked Paths", "Readonly Paths"); runc's libcontainer/rootfs_linux.go for the order; mount(2)
and pivot_root(2) for the ``pivot_root(".", ".")`` idiom.
"""

from __future__ import annotations

import errno
import os
import stat

from runtime import syscalls as sc
from runtime.spec import MASKED_PATHS, READONLY_PATHS, ContainerConfig

_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
    ("core", "/proc/kcore"),
)


def secure_join(root: str, path: str) -> str:
    """Join ``path`` under ``root`` resolving symlinks as if ``root`` were ``/``, so that no
    symlink in the container's filesystem can lead outside it (the idea of runc's
    securejoin).  Returns a host path inside ``root``; missing components are kept as given.

    Raises OSError(ELOOP) after 40 symlinks."""
    root = os.path.abspath(root)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise OSError(errno.ELOOP, f"too many symlinks resolving {path} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _mkdir_in(rootfs: str, path: str, mode: int = 0o755) -> str:
    host = secure_join(rootfs, path)
    os.makedirs(host, mode=mode, exist_ok=True)
    return host


def _mount_volumes(cfg: ContainerConfig, rootfs: str) -> None:
    for m in cfg.mounts:
        target = secure_join(rootfs, m.destination)
        if os.path.isdir(m.source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "a").close()
        # Not recursive: mounts below the source stay on the host (CRIU would have to be told
        # about each of them, and they may be other containers' roots).
        sc.mount(m.source, target, None, sc.MS_BIND)
        if m.readonly:
            sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)


def _mount_dev(rootfs: str, bind_devices: bool = False) -> None:
    """A tmpfs /dev with the default nodes.  ``bind_devices``: in a user namespace, where
    mknod(2) is refused (EPERM), bind the host's nodes instead (as runc does)."""
    dev = _mkdir_in(rootfs, "/dev")
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME, "mode=755,size=65536k")
    for name, major, minor in _DEVICES:
        p = os.path.join(dev, name)
        if bind_devices:
            open(p, "a").close()
            sc.mount(os.path.join("/dev", name), p, None, sc.MS_BIND)
            continue
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(p, 0o666)
    for name, target in _DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    sc.mount(
        "devpts",
        os.path.join(dev, "pts"),
        "devpts",
        sc.MS_NOSUID | sc.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    sc.mount(
        "shm",
        os.path.join(dev, "shm"),
        "tmpfs",
        sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
        "mode=1777,size=65536k",
    )


#: an empty directory of the container's own /dev, bound read-only over the masked
#: directories (runc mounts a read-only tmpfs on each instead).  A bind of a mount CRIU
#: saves anyway costs nothing to checkpoint; a tmpfs of its own costs a tar+gzip at every
#: dump and a mount at every restore, about 6 ms and 3 ms each, all of it downtime.
MASK_DIR = "/dev/.masked"


def _bind_ro(source: str, target: str) -> None:
    sc.mount(source, target, None, sc.MS_BIND)
    sc.mount(
        None,
        target,
        None,
        sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
    )


def _mask_paths(rootfs: str) -> None:
    devnull = os.path.join(rootfs, "dev", "null")
    empty = os.path.join(rootfs, MASK_DIR.lstrip("/"))
    for path in MASKED_PATHS:
        target = secure_join(rootfs, path)
        if not os.path.lexists(target):
            continue
        if os.path.isdir(target):
            if not os.path.isdir(empty):
                os.mkdir(empty, 0o555)  # listable, as runc's empty tmpfs is
                _bind_ro(empty, empty)  # not writable from inside either
            _bind_ro(empty, target)
        else:
            sc.mount(devnull, target, None, sc.MS_BIND)
    for path in READONLY_PATHS:
        target = secure_join(rootfs, path)
        if not os.path.lexists(target):
            continue
        sc.mount(target, target, None, sc.MS_BIND | sc.MS_REC)
        sc.mount(
            None,
            target,
            None,
            sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
        )


def prepare_rootfs(cfg: ContainerConfig, rootfs: str) -> None:
    """Mount volumes, /proc, /dev and /sys under ``rootfs`` and apply the masks.

    Must run in the container's own (private) mount namespace.  Raises OSError naming the
    mount that failed."""
    _mount_volumes(cfg, rootfs)
    proc = _mkdir_in(rootfs, "/proc")
    sc.mount("proc", proc, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    _mount_dev(rootfs, bind_devices=cfg.in_userns)
    sys_dir = _mkdir_in(rootfs, "/sys")
    sc.mount("sysfs", sys_dir, "sysfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    if not cfg.privileged:
        _mask_paths(rootfs)


def pivot_into(rootfs: str) -> None:
    """Make ``rootfs`` the root: ``pivot_root(".", ".")`` then detach the old root."""
    os.chdir(rootfs)
    sc.pivot_root(".", ".")
    sc.umount(".", sc.MNT_DETACH)
    os.chdir("/")
