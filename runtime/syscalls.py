"""The one place where jaula calls libc and raw syscalls (through ctypes).

Python 3.11's ``os`` module has no ``unshare``, ``setns``, ``mount`` or ``pivot_root``; these
thin wrappers raise ``OSError`` with the errno and the arguments in the message, so callers can
translate them into :mod:`runtime.errors` at their boundary.

Sources: mount(2), umount(2), pivot_root(2), unshare(2), setns(2), prctl(2), capset(2), statfs(2),
netdevice(7) for the interface flag ioctls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import platform
import socket
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# clone(2) / unshare(2) namespace flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# prctl(2)
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_NAME = 15

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2).  Raises OSError naming source, target and type."""
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
        f"mount {source or 'none'} on {os.fspath(target)} (type {fstype}, data {data!r})",
    )


def umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2).  Raises OSError naming the target."""
    _check(_libc.umount2(_b(target), flags), f"umount {os.fspath(target)}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (no glibc wrapper, so through syscall(2))."""
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(38, f"pivot_root: unsupported machine {platform.machine()}")
    _check(_libc.syscall(nr, _b(new_root), _b(put_old)), f"pivot_root {new_root} {put_old}")


def unshare(flags: int) -> None:
    """unshare(2) with ``CLONE_*`` flags."""
    _check(_libc.unshare(flags), f"unshare {flags:#x}")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace behind ``fd`` (an open /proc/PID/ns/* file)."""
    _check(_libc.setns(fd, nstype), f"setns fd {fd} type {nstype:#x}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2).  Returns the call's result; raises OSError on -1."""
    ret = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl {option}: {os.strerror(err)}")
    return int(ret)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) on the calling thread, with 64-bit masks (bit N = capability number N)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def cap_last_cap() -> int:
    """Highest capability number the kernel knows (/proc/sys/kernel/cap_last_cap)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def link_up(ifname: str = "lo") -> None:
    """Set IFF_UP on a network interface of the current net namespace (netdevice(7))."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sh14x", ifname.encode(), 0)
        res = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifr)
        flags = struct.unpack("16sh14x", res)[1]
        fcntl.ioctl(
            s.fileno(), SIOCSIFFLAGS, struct.pack("16sh14x", ifname.encode(), flags | IFF_UP)
        )


def statfs_type(path: str | os.PathLike[str]) -> int | None:
    """statfs(2) ``f_type`` of the filesystem that holds ``path``: a magic number of
    include/uapi/linux/magic.h (``os.statvfs`` does not give it).  None when statfs fails
    (no such path, no permission)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs (120 bytes); f_type is the first long
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


class _Statfs(ctypes.Structure):
    """struct statfs of statfs(2) on 64-bit Linux."""

    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


def statfs_id(path: str | os.PathLike[str]) -> tuple[int, bytes]:
    """statfs(2) of the filesystem that holds ``path``: (``f_type``, the 8 bytes of
    ``f_fsid``; all zero when the filesystem gives none).  Raises OSError."""
    sfs = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(sfs)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {os.fspath(path)}: {os.strerror(err)}")
    return sfs.f_type & 0xFFFFFFFF, struct.pack("<ii", *sfs.f_fsid)


_MAX_HANDLE_SZ = 128
_AT_FDCWD = -100


def file_handle(path: str | os.PathLike[str]) -> tuple[int, bytes] | None:
    """name_to_handle_at(2) of ``path``: (handle type, handle bytes), or None when the
    filesystem gives no handles (EOPNOTSUPP) or the call fails."""
    buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)
    struct.pack_into("<Ii", buf, 0, _MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(_AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), 0):
        return None
    size, htype = struct.unpack_from("<Ii", buf, 0)
    return htype, buf.raw[8 : 8 + size]


def set_process_name(name: str) -> None:
    """Name the calling thread (PR_SET_NAME, 15 bytes), as shown by ps and /proc/PID/comm."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after ``comm`` (state first), or None if there is no such
    process.  ``comm`` may hold spaces and parentheses: split after the last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None
    when the process does not exist.  With the pid it identifies a process for good."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def is_alive(pid: int | None, start_time: int | None) -> bool:
    """True when ``pid`` exists, is not a zombie, and started at ``start_time``."""
    if not pid or start_time is None:
        return False
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


# Project quotas: fsxattr ioctls (include/uapi/linux/fs.h) and quotactl_fd(2) with the
# generic VFS quota interface (include/uapi/linux/quota.h), which XFS and ext4 both serve.
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x00000200
_FSXATTR = "<IIIII8x"  # fsx_xflags, fsx_extsize, fsx_nextents, fsx_projid, fsx_cowextsize
PRJQUOTA = 2
Q_GETINFO = 0x800005
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
QIF_BLIMITS = 1
_IF_DQBLK = "<QQQQQQQQI4x"  # struct if_dqblk: limits in 1 KiB blocks, then valid
_SYS_QUOTACTL_FD = {"x86_64": 443, "aarch64": 443, "ppc64le": 443, "s390x": 443}


def set_project(fd: int, project_id: int, inherit: bool = True) -> None:
    """Give the inode open as ``fd`` project ``project_id`` (FS_IOC_FSSETXATTR), and to a
    directory the PROJINHERIT flag so that what is created in it gets the same project.

    Raises OSError (EOPNOTSUPP: the file system has no project ids)."""
    buf = bytearray(struct.calcsize(_FSXATTR))
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    xflags, extsize, nextents, _, cow = struct.unpack(_FSXATTR, buf)
    if inherit:
        xflags |= FS_XFLAG_PROJINHERIT
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, struct.pack(_FSXATTR, xflags, extsize, nextents,
                                                  project_id, cow))  # fmt: skip


def get_project(fd: int) -> tuple[int, bool]:
    """(project id, PROJINHERIT set) of the inode open as ``fd``.  Raises OSError."""
    buf = bytearray(struct.calcsize(_FSXATTR))
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    xflags, _, _, projid, _ = struct.unpack(_FSXATTR, buf)
    return projid, bool(xflags & FS_XFLAG_PROJINHERIT)


def quotactl_fd(fd: int, cmd: int, qtype: int, qid: int, addr: ctypes.Array[ctypes.c_char]) -> None:
    """quotactl_fd(2) on the file system of ``fd`` (Linux 5.14): ``QCMD(cmd, qtype)`` for id
    ``qid`` with ``addr`` as the command's buffer.  Raises OSError (ESRCH: that quota type
    is not enabled; ENOSYS/ENOTTY: no quota support)."""
    nr = _SYS_QUOTACTL_FD.get(platform.machine())
    if nr is None:
        raise OSError(38, f"quotactl_fd: unsupported architecture {platform.machine()}")
    if _libc.syscall(nr, fd, ctypes.c_uint((cmd << 8) | qtype), qid, addr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"quotactl_fd cmd {cmd:#x} id {qid}: {os.strerror(err)}")


def get_project_quota_info(fd: int) -> None:
    """Q_GETINFO for project quotas on the file system of ``fd``: returns when they are
    enabled, raises OSError otherwise."""
    quotactl_fd(fd, Q_GETINFO, PRJQUOTA, 0, ctypes.create_string_buffer(24))


def set_project_block_limit(fd: int, project_id: int, limit_bytes: int) -> None:
    """Set project ``project_id``'s hard and soft block limits (Q_SETQUOTA, QIF_BLIMITS) to
    ``limit_bytes`` rounded up to 1 KiB (0: no limit).  Raises OSError."""
    kib = -(-limit_bytes // 1024)
    buf = ctypes.create_string_buffer(struct.pack(_IF_DQBLK, kib, kib, 0, 0, 0, 0, 0, 0,
                                                  QIF_BLIMITS))  # fmt: skip
    quotactl_fd(fd, Q_SETQUOTA, PRJQUOTA, project_id, buf)


def get_project_usage(fd: int, project_id: int) -> tuple[int, int]:
    """(hard block limit in bytes, space used in bytes) of project ``project_id``
    (Q_GETQUOTA).  Raises OSError."""
    buf = ctypes.create_string_buffer(struct.calcsize(_IF_DQBLK))
    quotactl_fd(fd, Q_GETQUOTA, PRJQUOTA, project_id, buf)
    bhard, _, curspace, *_ = struct.unpack(_IF_DQBLK, buf.raw)
    return bhard * 1024, curspace


# The new mount API for id-mapped mounts (include/uapi/linux/mount.h): open_tree(2),
# mount_setattr(2), move_mount(2); the syscall numbers are the same on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    """struct mount_attr of mount_setattr(2)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _syscall_fd(nr: int, what: str, *args: object) -> int:
    ret = _libc.syscall(nr, *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def open_tree_clone(path: str | os.PathLike[str], recursive: bool = False) -> int:
    """open_tree(2) with OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC: a detached copy of the mount
    at ``path`` (with ``recursive``, of the mounts below it too), as an fd.  Raises
    OSError."""
    return _syscall_fd(
        _SYS_OPEN_TREE,
        f"open_tree {os.fspath(path)}",
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(path),
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)),
    )


def set_idmap(mount_fd: int, userns_fd: int) -> None:
    """mount_setattr(2) MOUNT_ATTR_IDMAP: id-map the detached mount ``mount_fd`` with the
    uid/gid maps of the user namespace open as ``userns_fd`` (Linux 5.12).  Raises OSError
    (EINVAL: the file system cannot be id-mapped, or the mount is attached)."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    _syscall_fd(
        _SYS_MOUNT_SETATTR,
        "mount_setattr MOUNT_ATTR_IDMAP",
        ctypes.c_int(mount_fd),
        b"",
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )


def move_mount_to(mount_fd: int, target: str | os.PathLike[str]) -> None:
    """move_mount(2) of the detached mount ``mount_fd`` onto ``target`` (the working
    directory when ``target`` is empty).  Raises OSError."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (0 if os.fspath(target) else MOVE_MOUNT_T_EMPTY_PATH)
    _syscall_fd(
        _SYS_MOVE_MOUNT,
        f"move_mount to {os.fspath(target) or 'the working directory'}",
        ctypes.c_int(mount_fd),
        b"",
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(target),
        ctypes.c_uint(flags),
    )
