"""Checkpoint a running container into a bundle (``jaula checkpoint``).

Sequence::

    preflight (CRIU version, the process tree, objects CRIU cannot dump, FIFOs on volumes,
               foreign file locks): nothing touched
    criu dump --freeze-cgroup <the container's freezer>      tasks frozen
      post-dump notification: tasks still frozen ─► tar the upperdir into the bundle
        answer success: CRIU kills the tasks (or resumes them with --leave-running)
        answer failure (the tar failed): CRIU resumes the tasks, the dump fails
    manifest written last (digests of every file)
    status -> checkpointed; the monitor records the exit and unmounts; the cgroup is removed

The upperdir is captured after the freeze because CRIU checks the size of open files at
restore (criu-recipe.md, "Notes").  The container's stdout/stderr pipes belong to its monitor
and are recorded as CRIU external pipes, handed to the new monitor at restore
(``inherit_fd``).  So is the slave of a ``run -t`` container's pty (``--external
tty[RDEV:DEV]``, :func:`terminal_of`), whose settings and window size go into the images
dir (:data:`migrate.restorer.TERMINAL_STATE`) for the new monitor's pty.  Bind-mounted
volumes are declared as external mounts (``--external mnt[DEST]:volN``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from migrate import criu, netmove, portability, rootfs_diff
from migrate.bundle import Bundle, Manifest, cpu_flags
from migrate.deadlines import SCALE_ENV, FrozenLimits
from migrate.errors import MigrationError, PreflightError
from migrate.restorer import NETNS_KEY, TERMINAL_STATE, network_lock
from runtime import tty
from runtime.cgroups import detect_mode
from runtime.container import Container, Runtime
from runtime.errors import CgroupError, ContainerError
from runtime.state import ContainerStatus, Operation, atomic_write_json, can
from runtime.store import CHECKPOINT_DIR, CHECKPOINT_NEW_DIR, LOG, TTY_MARK
from runtime.syscalls import is_alive, statfs_type

log = structlog.get_logger(__name__)

#: fd link targets CRIU cannot checkpoint, with the name shown to the operator.
UNDUMPABLE_FDS = {
    "anon_inode:[io_uring]": "an io_uring instance",
    "anon_inode:[userfaultfd]": "a userfaultfd",
    "anon_inode:[perf_event]": "a perf event",
    "anon_inode:bpf-map": "a BPF map",
    "anon_inode:bpf-prog": "a BPF program",
}


@dataclass(frozen=True)
class CheckpointReport:
    """What a checkpoint did.  Times in seconds, sizes in bytes.

    Attributes:
        frozen_s: from the dump request until the tasks were released (killed, or resumed
            with leave_running): CRIU's freeze and dump plus the upperdir tar.
        dump_s: CRIU's dump alone, up to its post-dump notification.
        rootfs_s: the upperdir tar, taken while the tasks were frozen.
        total_s: the whole command.
    """

    container_id: str
    name: str
    bundle: Path
    leave_running: bool
    frozen_s: float
    dump_s: float
    rootfs_s: float
    total_s: float
    bundle_bytes: int
    exported: Path | None = None


def tasks_of(c: Container) -> list[int]:
    """Host pids of every task of the container."""
    return sorted(c.cgroup().pids())


def process_tree(root: int) -> list[int]:
    """Host pids of ``root`` and of all its descendants, zombies included: the tree CRIU
    dumps (``/proc/PID/task/TID/children``)."""
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                todo += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
            except OSError:
                continue
    return seen


def _status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict (empty when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


#: CAP_SYS_RESOURCE (linux/capability.h)
_CAP_SYS_RESOURCE = 24


def has_cap_sys_resource() -> bool:
    """Whether this process has CAP_SYS_RESOURCE in its effective set."""
    return bool(int(_status(os.getpid()).get("CapEff", "0"), 16) >> _CAP_SYS_RESOURCE & 1)


#: statfs(2) f_type of the memfd_secret(2) pseudo filesystem (include/uapi/linux/magic.h)
_SECRETMEM_MAGIC = 0x5345434D
#: statfs magics of the file systems whose files a restore recreates (the overlay root,
#: tmpfs mounts CRIU carries): only their files are read for a SQLite header; a file of
#: /proc, /sys or tracefs is never opened (reading one can consume what it reports)
_CARRIED_FS_MAGICS = (0x794C7630, 0x01021994)  # OVERLAYFS_SUPER_MAGIC, TMPFS_MAGIC


def _mount_of_fd(pid: int, fd: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the file open at ``fd`` of ``pid``, as seen in
    the process's own mount namespace; ("", "") when unknown."""
    try:
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        mnt_id = next(ln.split()[1] for ln in info.splitlines() if ln.startswith("mnt_id:"))
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            f = line.split()
            if f[0] == mnt_id:
                return f[4], f[f.index("-") + 1]
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return "", ""


_NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4), ioctl_ns(2)


def _in_userns_we_own(pid: int) -> bool:
    """Whether ``pid`` is in a user namespace other than ours whose owner is our euid: the
    kernel gives the owner every capability in it (user_namespaces(7)), CAP_SYS_RESOURCE
    too, so CRIU may read its tasks' rlimits whatever uid they run as (``--userns``)."""
    import fcntl
    import struct

    try:
        if os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
            return False
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        buf = fcntl.ioctl(fd, _NS_GET_OWNER_UID, b"\0" * 4)
    except OSError:
        return False
    finally:
        os.close(fd)
    return bool(struct.unpack("I", buf)[0] == os.geteuid())


def preflight(c: Container) -> None:
    """Refuse, before anything is frozen, what the dump would not bring back intact.

    Checked, each refusal naming the process and the object:
    - the process tree: every task of the container's cgroup is in the init's tree (an
      attached ``jaula exec`` still running is not: CRIU would leave it out silently), every
      live task of the tree is in the cgroup (a process entered from the host), and no task
      has a session or process group whose leader is outside the container (CRIU cannot
      restore it; shared/cases C09);
    - without CAP_SYS_RESOURCE, tasks running as another uid or gid than ours: CRIU must
      read every task's rlimits and the kernel refuses that (prlimit(2));
    - objects CRIU cannot dump: io_uring and the like, memfd_secret memory (shared/cases C26);
    - a FIFO on a volume: the volume is not shipped with the checkpoint, its node could be
      missing where the container is restored (shared/cases C11);
    - a file lock shared with a process outside the container (shared/cases C08);
    - a SQLite database in rollback-journal mode open from the container's own files (not
      a volume): SQLite refuses to write it once its inode number changed, and a restore
      gives every such file a new one (:func:`_sqlite_rollback_db`);
    - an interface other than ``lo`` in the container's own net namespace, a UNIX socket
      connected to a process outside the container, an inotify or fanotify watch on a file
      no name leads to (deleted; the others are dumped by path, DumpPlan.watched), a UDP
      socket with unsent data (corked) or a TCP listener with connections not yet accepted,
      a task in a nested time namespace or with a SIGTRAP pending (:mod:`migrate.portability`);
    - a container with a terminal (``run -t``) whose monitor holds no pty slave any more, or
      with a process holding a terminal other than that one (:func:`check_terminals`);
    - a container whose memory is still arriving from a post-copy (its lazy-pages daemon
      runs): the pages not fetched yet would be left out.

    Raises CriuUnavailable (missing or old CRIU), PreflightError, ContainerError when the
    container is not running."""
    criu.require()
    if not can(Operation.CHECKPOINT, c.status):
        raise ContainerError(
            f"container {c.name} is {c.status.value}: only a running container can be checkpointed",
            c.id,
        )
    keeps = "; the container keeps running"
    pc = c.state.postcopy
    if pc is not None and is_alive(pc.daemon_pid, pc.daemon_start):
        # the pages not yet fetched look absent to CRIU: a dump would leave them out
        raise PreflightError(
            f"container {c.name} is still receiving its memory from {pc.source or 'its source'}"
            f" (post-copy, session {pc.session}): checkpoint or migrate it once that "
            f"is over{keeps}"
        )
    own_tty = terminal_of(c)
    tty_fds = 0
    in_cgroup = set(tasks_of(c))
    tree = process_tree(c.state.pid)
    for pid in sorted(in_cgroup - set(tree)):
        st = _status(pid)
        if st and not st.get("State", "").startswith("Z"):
            raise PreflightError(
                f"cannot checkpoint {c.name}: process {pid} ({st.get('Name', '?')}) is in the "
                "container's cgroup but not in its process tree (an attached `jaula exec` still "
                "running?), so CRIU would leave it out: wait for it to finish, or use "
                f"`exec -d`{keeps}"
            )
    check_ids = not has_cap_sys_resource()
    my_uid, my_gid = str(os.getuid()), str(os.getgid())
    for pid in tree:
        st = _status(pid)
        if not st:
            continue
        comm, zombie = st.get("Name", "?"), st.get("State", "").startswith("Z")
        for key, what in (("NSsid", "session"), ("NSpgid", "process group")):
            if st.get(key, "").split()[-1:] == ["0"]:
                raise PreflightError(
                    f"cannot checkpoint {c.name}: {'zombie ' if zombie else ''}process {pid} "
                    f"({comm}) belongs to a {what} whose leader is outside the container (it "
                    "was started from the host without a session of its own, e.g. by nsenter), "
                    "which CRIU cannot restore: "
                    + ("have its parent reap it" if zombie else "stop it")
                    + keeps
                )
        if zombie:
            continue
        tracer = int(st.get("TracerPid", "0") or 0)
        if tracer:
            # CRIU seizes every task with ptrace, and a task has one tracer at most: plain
            # CRIU fails this after the freeze ("Unseizable non-zombie ... state t")
            raise PreflightError(
                f"cannot checkpoint {c.name}: process {pid} ({comm}) is traced by process "
                f"{tracer} ({_status(tracer).get('Name', '?')}), and CRIU cannot seize a task "
                f"another tracer holds: detach the tracer (end the debugger or strace) first"
                f"{keeps}"
            )
        portability.check_time_namespace(c.name, c.state.pid, pid, comm)
        portability.check_pending_trap(c.name, pid, comm)
        if pid not in in_cgroup:  # or forked since that look (children inherit the cgroup)
            in_cgroup |= set(tasks_of(c))
        if pid not in in_cgroup and _status(pid):
            raise PreflightError(
                f"cannot checkpoint {c.name}: process {pid} ({comm}) is in the container's "
                "process tree but not in its cgroup (entered from the host?), so the freeze "
                f"would miss it: stop it{keeps}"
            )
        if check_ids and not _in_userns_we_own(pid):
            uids, gids = st.get("Uid", "").split()[:3], st.get("Gid", "").split()[:3]
            if any(u != my_uid for u in uids) or any(g != my_gid for g in gids):
                raise PreflightError(
                    f"cannot checkpoint {c.name}: process {pid} ({comm}) runs as uid "
                    f"{uids[0] if uids else '?'} gid {gids[0] if gids else '?'}; CRIU must read "
                    "its resource limits, which the kernel allows for another user only with "
                    "CAP_SYS_RESOURCE, and this node's root lacks it (run the container as "
                    f"root, or give the node CAP_SYS_RESOURCE){keeps}"
                )
        _check_objects(c, pid, comm)
        tty_fds += check_terminals(c, pid, comm, own_tty)
    if tty_fds > MAX_TERMINAL_FDS:
        raise PreflightError(
            f"cannot checkpoint {c.name}: its processes hold {tty_fds} descriptors of its "
            f"terminal, and CRIU carries {MAX_TERMINAL_FDS} at most: end some of them{keeps}"
        )
    _check_foreign_locks(c, in_cgroup | set(tree))
    try:
        if c.config.network == "none":
            portability.check_netns(c.name, portability.netns_contents(c.state.pid))
        elif (att := netmove.bridged(c.config)) is not None:
            n = portability.netns_contents(c.state.pid)
            if extra := netmove.unexpected(att, n.links, n.addresses, n.routes, n.rules):
                raise PreflightError(
                    f"cannot checkpoint {c.name}: its network namespace holds "
                    f"{', '.join(extra)}, which jaula did not set up and would not carry: "
                    f"remove it first{keeps}"
                )
        portability.check_unix_peers(c.name, c.state.pid, in_cgroup | set(tree))
        portability.check_inflight_unix(c.name, c.state.pid, in_cgroup | set(tree))
        portability.check_socket_queues(c.name, c.state.pid, in_cgroup | set(tree))
    except OSError as e:
        raise PreflightError(
            f"cannot checkpoint {c.name}: its network namespace cannot be looked at "
            f"({e.strerror or e}){keeps}"
        ) from e


def _check_objects(c: Container, pid: int, comm: str) -> None:
    """Refuse the objects of one process that CRIU cannot dump or restore intact."""
    keeps = "; the container keeps running"
    volumes = [m.destination for m in c.config.mounts]
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return
    for fd in fds:
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
        except OSError:
            continue
        for prefix, what in UNDUMPABLE_FDS.items():
            if target.startswith(prefix):
                raise PreflightError(
                    f"cannot checkpoint {c.name}: process {pid} ({comm}) holds {what} "
                    f"(fd {fd}), which CRIU cannot dump{keeps}"
                )
        if target in portability.WATCH_FDS:
            # dumped by path (DumpPlan.watched): a mark on a file with no name cannot be
            lost = [
                f"inode {ino} on device {dev}"
                for ino, dev, path in portability.watch_targets(pid, fd)
                if path is None
            ]
            whole = portability.filesystem_marks(pid, fd)
            if whole:
                raise PreflightError(
                    f"cannot checkpoint {c.name}: process {pid} ({comm}) has a fanotify mark "
                    f"on the whole file system of device {', '.join(whole)} (fd {fd}), which "
                    f"CRIU does not dump (it would be lost): stop watching it{keeps}"
                )
            if lost:
                raise PreflightError(
                    f"cannot checkpoint {c.name}: process {pid} ({comm}) has an "
                    f"{target.split(':')[1].strip('[]')} watch on {', '.join(lost)} (fd {fd}), "
                    "a file no name in the container leads to (deleted?), which CRIU cannot "
                    f"watch again where it restores: stop watching it{keeps}"
                )
        if target.startswith(("pipe:", "socket:", "anon_inode:")):
            continue
        if target == "/secretmem (deleted)" and statfs_type(link) == _SECRETMEM_MAGIC:
            raise PreflightError(
                f"cannot checkpoint {c.name}: process {pid} ({comm}) holds memfd_secret "
                f"memory (fd {fd}), which CRIU cannot dump{keeps}"
            )
        try:
            mode = os.stat(link).st_mode
        except OSError:
            continue
        if (
            stat.S_ISREG(mode)
            and statfs_type(link) in _CARRIED_FS_MAGICS
            and _sqlite_rollback_db(link)
        ):
            mnt, _fstype = _mount_of_fd(pid, fd)
            if mnt and not any(mnt == v or mnt.startswith(v.rstrip("/") + "/") for v in volumes):
                raise PreflightError(
                    f"cannot checkpoint {c.name}: process {pid} ({comm}) has the SQLite "
                    f"database {target} open (fd {fd}) in rollback-journal mode, which SQLite "
                    "will not write after a restore (the file gets another inode number: "
                    "SQLITE_READONLY_DBMOVED): switch it to WAL (PRAGMA journal_mode=WAL) or "
                    f"put it on a volume{keeps}"
                )
        if stat.S_ISFIFO(mode):
            mnt, fstype = _mount_of_fd(pid, fd)
            try:
                still = os.readlink(link)
            except OSError:
                continue
            if still != target or not mnt:
                continue  # the fd changed while we looked (a shell's `> file` redirect)
            on_volume = any(mnt == v or mnt.startswith(v.rstrip("/") + "/") for v in volumes)
            if on_volume or (mnt != "/" and fstype != "tmpfs"):
                raise PreflightError(
                    f"cannot checkpoint {c.name}: process {pid} ({comm}) has the FIFO {target} "
                    f"open (fd {fd}) on the mount {mnt or '?'} ({fstype or '?'}), which is not "
                    "shipped with the checkpoint, so the FIFO could be missing where it is "
                    f"restored: put it in the container's own filesystem{keeps}"
                )
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return
    for line in maps:
        if line.endswith("/secretmem (deleted)"):
            area = line.split()[0]
            if statfs_type(f"/proc/{pid}/map_files/{area}") == _SECRETMEM_MAGIC:
                raise PreflightError(
                    f"cannot checkpoint {c.name}: process {pid} ({comm}) maps memfd_secret "
                    f"memory ({area}), which CRIU cannot dump{keeps}"
                )


#: character devices that are terminals but not pty slaves, by (major, minor) and by major
#: alone: /dev/tty, /dev/console, /dev/ptmx; virtual consoles and serial ports, pty masters
_OTHER_TTYS = {(5, 0): "/dev/tty", (5, 1): "/dev/console", (5, 2): "a pty master (/dev/ptmx)"}
_TTY_MAJORS = {
    4: "a virtual console or serial port",
    **{m: "a pty master" for m in range(128, 136)},
}


#: how many descriptors of external terminals CRIU dumps at most (tty.c ETTY_INDEX_MAX -
#: ETTY_INDEX: each open descriptor of one counts)
MAX_TERMINAL_FDS = 63


@dataclass(frozen=True)
class OwnTerminal:
    """The container's own terminal (``run -t``), as CRIU is told about it.

    Attributes:
        key: CRIU's key of the pty slave (``tty[RDEV:DEV]``, :func:`runtime.tty.criu_key`).
        path: a path that opens that slave (the monitor's descriptor of it).
        ctty_key: CRIU's key of ``/dev/tty`` in the container's ``/dev`` (busybox's shell
            keeps it open for job control); declared external too, as CRIU dumps a
            ``/dev/tty`` only along with the pty pair it stands for.  None when the
            container has no ``/dev/tty``.
    """

    key: str
    path: str
    ctty_key: str | None


def terminal_of(c: Container) -> OwnTerminal | None:
    """The container's own terminal (``run -t``: the pty its monitor holds, :mod:`runtime.tty`),
    or None when it has none.  Raises PreflightError when it was started with a terminal but
    its monitor holds no pty slave (a monitor of an older jaula, or one going away)."""
    if not (c.dir / TTY_MARK).exists():
        return None
    mon = c.state.monitor_pid
    try:
        fds = os.listdir(f"/proc/{mon}/fd")
    except OSError:
        fds = []
    ctty = None
    with contextlib.suppress(OSError):
        st = os.stat(f"/proc/{c.state.pid}/root/dev/tty")
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(5, 0):
            ctty = tty.criu_key(st.st_rdev, st.st_dev)
    for fd in fds:
        path = f"/proc/{mon}/fd/{fd}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in tty.PTS_MAJORS:
            return OwnTerminal(tty.criu_key(st.st_rdev, st.st_dev), path, ctty)
    raise PreflightError(
        f"cannot checkpoint {c.name}: it has a terminal (run -t) but its monitor "
        f"({mon}) holds no pty slave to carry: restart it first; the container keeps running"
    )


def check_terminals(c: Container, pid: int, comm: str, own: OwnTerminal | None) -> int:
    """Refuse a process of the container holding a terminal jaula cannot carry: any but the
    container's own pty slave ``own`` (from :func:`terminal_of`, declared external to CRIU)
    and its ``/dev/tty``.  Returns how many descriptors of those two it holds."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    keys = {own.key, own.ctty_key} if own is not None else set()
    held = 0
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not stat.S_ISCHR(st.st_mode):
            continue
        if tty.criu_key(st.st_rdev, st.st_dev) in keys:
            held += 1
            continue
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        what = _OTHER_TTYS.get((major, minor)) or _TTY_MAJORS.get(major)
        if major in tty.PTS_MAJORS or (major, minor) == (5, 0):
            try:
                what = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                what = "another terminal"
        if what is None:
            continue
        raise PreflightError(
            f"cannot checkpoint {c.name}: process {pid} ({comm}) holds {what} (fd {fd}), a "
            "terminal other than the container's own (run -t), which jaula cannot carry: "
            "close it first; the container keeps running"
        )
    return held


#: the first 16 bytes of a SQLite 3 database (sqlite.org/fileformat2.html, 1.3.1)
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _sqlite_rollback_db(link: str) -> bool:
    """Whether the regular file open at ``link`` (``/proc/PID/fd/N``) is a SQLite database
    in rollback-journal mode: its header's file format write version (byte 18) is 1; a
    WAL database has 2 (sqlite.org/fileformat2.html, 1.3.3).

    Such a database is not written after a restore: SQLite remembers the inode number of
    the file it opened and, before each write transaction opens its journal, compares it
    with the path's (``fileHasMoved`` in os_unix.c); a restored container's files are new
    inodes (the upperdir is extracted anew, the image layers are another node's), so every
    write fails with SQLITE_READONLY_DBMOVED.  WAL writes make no such check.  A file that
    cannot be read is not one: ``False``."""
    try:
        fd = os.open(link, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        head = os.pread(fd, 20, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return len(head) == 20 and head.startswith(_SQLITE_MAGIC) and head[18] == 1


def _check_foreign_locks(c: Container, pids: set[int]) -> None:
    """A lock on a file also locked by a process outside the container cannot be moved with
    it (shared/cases C08): refuse."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return
    by_file: dict[str, set[int]] = {}
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] != "->" and f[4].lstrip("-").isdigit():
            by_file.setdefault(f[5], set()).add(int(f[4]))
    for inode, holders in by_file.items():
        if holders & pids and holders - pids:
            outside = sorted(holders - pids)
            raise PreflightError(
                f"cannot checkpoint {c.name}: a file it has locked (inode "
                f"{inode}) is also locked by process(es) {outside} outside the "
                "container; the container keeps running"
            )


def _stdio_keys(c: Container) -> dict[str, str | None]:
    """CRIU keys (``pipe:[INODE]``) of the init's stdout/stderr when they are the pipes the
    monitor reads."""
    monitor_pipes = set()
    for fd in os.listdir(f"/proc/{c.state.monitor_pid}/fd"):
        try:
            t = os.readlink(f"/proc/{c.state.monitor_pid}/fd/{fd}")
        except OSError:
            continue
        if t.startswith("pipe:"):
            monitor_pipes.add(t)
    keys: dict[str, str | None] = {}
    for num, stream in ((1, "stdout"), (2, "stderr")):
        try:
            t = os.readlink(f"/proc/{c.state.pid}/fd/{num}")
        except OSError:
            t = ""
        keys[stream] = t if t in monitor_pipes else None
    return keys


def _device_binds(pid: int) -> tuple[dict[str, str], ...]:
    """The host device nodes bound into a container in a user namespace (it cannot mknod:
    :func:`runtime.rootfs.mounts.prepare_rootfs`), and the masks bound from them, as
    external mounts ``{key: devN, destination, source: /dev/NODE}``: their file system, the
    host's devtmpfs, has no root in the container, which CRIU refuses to dump ("doesn't
    have a proper root mount"); restored, each is bound again from the node's own node."""
    out: list[dict[str, str]] = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if right.split()[0] == "devtmpfs":
                dest = fields[4].encode().decode("unicode_escape")
                out.append(
                    {"key": f"dev{len(out)}", "destination": dest, "source": "/dev" + fields[3]}
                )
    return tuple(out)


def external_netns(c: Container) -> str | None:
    """CRIU ``--external net[INODE]:KEY`` for a container whose net namespace holds nothing
    to save: its own, with no CAP_NET_ADMIN to change routes, addresses, rules or sysctls,
    and, as its contents show (:func:`migrate.portability.netns_contents`), only ``lo``
    with 127.0.0.1/8, ::1 and their routes (the host may have added more).  CRIU then
    neither saves it (ip/iptables-save at dump) nor rebuilds it (ip/iptables-restore at
    restore, about 50 ms of downtime); the restorer hands it a fresh namespace with ``lo``
    up (``inherit_fd``).  None when the namespace must be dumped.  Raises OSError when the
    init is gone.  None too in a user namespace (``--userns``): CRIU dumps and restores it."""
    cfg = c.config
    if cfg.network == "bridge":  # made by jaula, rebuilt by the destination (migrate.netmove)
        return f"net[{os.stat(f'/proc/{c.state.pid}/ns/net').st_ino}]:{NETNS_KEY}"
    if cfg.network != "none" or cfg.privileged or "CAP_NET_ADMIN" in cfg.capabilities:
        return None
    if cfg.in_userns:  # its net namespace belongs to its user namespace: a fresh one made
        return None  # by the restorer would be the host's, and CRIU's setns is refused
    if not portability.netns_contents(c.state.pid).fresh:
        return None
    return f"net[{os.stat(f'/proc/{c.state.pid}/ns/net').st_ino}]:{NETNS_KEY}"


def dump_externals(
    volumes: tuple[dict[str, str], ...] | list[dict[str, str]],
    netns: str | None,
    terminal: str | None = None,
    ctty: str | None = None,
) -> tuple[str, ...]:
    """Every ``--external`` of a container's dump: its volumes, when it is one (see
    :func:`external_netns`) its net namespace, and when it has a terminal the CRIU keys
    (``tty[..]``) of its pty slave and of its ``/dev/tty`` (:class:`OwnTerminal`)."""
    ext = [f"mnt[{v['destination']}]:{v['key']}" for v in volumes]
    if netns:
        ext.append(netns)
    ext += [key for key in (terminal, ctty) if key]
    return tuple(ext)


def freezer_path(c: Container) -> str:
    """The cgroup dir CRIU freezes: v1 ``freezer`` controller, or the v2 cgroup."""
    paths = c.cgroup().paths()
    return str(paths.get("freezer") or paths.get(""))


def stopped_tasks(pids: list[int]) -> list[int]:
    """The tasks of ``pids`` in a job-control stop (SIGSTOP, SIGTSTP...: state ``T`` in
    /proc/PID/stat), or stopped so and then frozen (state ``D`` with wchan
    ``do_signal_stop``: the freezer leaves a stopped task in its stop).

    Why it matters: with the cgroup frozen, CRIU's PTRACE_SEIZE of such a task never
    returns.  ptrace_attach(2) finds the task stopped, asks it to re-trap as traced
    (JOBCTL_TRAPPING) and waits for it, but a frozen task cannot run to do so: CRIU hangs
    in the kernel, killable only, and the container stays frozen (issue 11, A).  CRIU's own
    freezing by ptrace (no ``--freeze-cgroup``, as its tests for stopped tasks run) seizes
    it while it is not frozen, dumps it as stopped, and the restore stops it again."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            frozen_in_stop = (
                state == "D" and Path(f"/proc/{pid}/wchan").read_text() == "do_signal_stop"
            )
            if state == "T" or frozen_in_stop:
                found.append(pid)
        except (OSError, IndexError):
            continue
    return found


def watched_paths(c: Container) -> tuple[str, ...]:
    """The paths inside ``c`` (sorted, once each) of the files its processes' inotify and
    fanotify inode marks watch (:func:`migrate.portability.watch_targets`; a mark no name
    leads to is left out: preflight refuses it)."""
    found: set[str] = set()
    for pid in process_tree(c.state.pid):
        for fd, target in portability.fd_targets(pid):
            if target in portability.WATCH_FDS:
                found |= {p for _, _, p in portability.watch_targets(pid, fd) if p}
    return tuple(sorted(found))


@dataclass(frozen=True)
class DumpPlan:
    """What one dump of a running container needs from it, taken before the freeze: the
    one place that turns a container into CRIU dump options, for ``checkpoint`` and for a
    migration's source alike.

    Attributes:
        pid: the init's host pid (CRIU's ``--tree``).
        stdio: CRIU keys of the init's stdout/stderr pipes (:func:`_stdio_keys`), and
            with a terminal ``tty`` and ``ctty``: the keys of its pty slave and of its
            ``/dev/tty`` (:class:`OwnTerminal`).
        netns: ``--external net[...]`` when the net namespace is external, else None.
        volumes: one ``{key, destination, source}`` per bind mount (``--external mnt[]``).
        freezer: the cgroup dir frozen for the dump (``--freeze-cgroup``), or None when
            a task is stopped (:func:`stopped_tasks`): CRIU then freezes the tasks itself
            with ptrace, and the cgroup is not frozen.
        network_lock: CRIU's network lock method (migrate.restorer.network_lock).
        stopped: the stopped tasks that made ``freezer`` None.
        terminal: the settings and window size of the container's terminal (JSON of
            :class:`runtime.tty.TerminalState`), None without one; taken before the
            freeze (CRIU keeps its own copy, taken frozen, and applies it last).
        watched: the paths inside the container of the files inotify and fanotify marks
            watch (:func:`watched_paths`), which CRIU dumps the marks by.
    """

    pid: int
    stdio: dict[str, str | None]
    netns: str | None
    volumes: tuple[dict[str, str], ...]
    freezer: str | None
    network_lock: int
    stopped: tuple[int, ...] = ()
    terminal: dict[str, Any] | None = None
    watched: tuple[str, ...] = ()

    @classmethod
    def of(cls, c: Container) -> DumpPlan:
        """The plan for ``c`` (running).  Raises OSError when its init is gone,
        PreflightError when its terminal cannot be found (:func:`terminal_of`)."""
        stopped = tuple(stopped_tasks(tasks_of(c)))
        if stopped:
            log.info("dump.freeze_by_ptrace", id=c.id[:12], stopped=list(stopped))
        stdio = _stdio_keys(c)
        terminal = None
        if (own := terminal_of(c)) is not None:
            stdio["tty"], stdio["ctty"] = own.key, own.ctty_key
            fd = os.open(own.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                terminal = tty.capture(fd).to_json()
            finally:
                os.close(fd)
        return cls(
            pid=c.state.pid,
            stdio=stdio,
            netns=external_netns(c),
            volumes=tuple(
                {"key": f"vol{i}", "destination": m.destination, "source": m.source}
                for i, m in enumerate(c.config.mounts)
            )
            + (_device_binds(c.state.pid) if c.config.in_userns else ()),
            freezer=None if stopped else freezer_path(c),
            network_lock=network_lock(c.config),
            stopped=stopped,
            terminal=terminal,
            watched=watched_paths(c),
        )

    def freeze(self, c: Container, limit_s: float) -> DumpPlan:
        """Freeze ``c``'s cgroup before the dump (the cgroup driver polls from 1 ms, CRIU
        every 100 ms) and return the plan to dump with: the cgroup is frozen when its
        ``freezer`` is set.  Not when a task is stopped (``freezer`` None already), nor
        when one turns out stopped once frozen: the cgroup is thawed again and the plan
        returned leaves the freezing to CRIU.  Raises CgroupError when the cgroup did not
        freeze within ``limit_s`` seconds (it is thawed again)."""
        if self.freezer is None:
            return self
        cg = c.cgroup()
        cg.freeze(timeout_s=limit_s)
        stopped = tuple(stopped_tasks(tasks_of(c)))
        if not stopped:
            return self
        cg.thaw()
        log.info("dump.freeze_by_ptrace", id=c.id[:12], stopped=list(stopped))
        return replace(self, freezer=None, stopped=stopped)

    def options(self, images_dir: Path, **kw: Any) -> criu.DumpOptions:
        """CRIU's dump options into ``images_dir``; ``kw`` adds the caller's own
        (``leave_running``, ``page_server``, ``tls``, ``lazy_pages``, ``ps_socket``).  With
        a terminal its saved state is written into ``images_dir`` too (:data:`TERMINAL_STATE`),
        so that it travels with the images."""
        if self.terminal is not None:
            images_dir.mkdir(parents=True, exist_ok=True)  # as criu.dump makes it
            atomic_write_json(images_dir / TERMINAL_STATE, self.terminal)
        return criu.DumpOptions(
            pid=self.pid,
            images_dir=images_dir,
            freeze_cgroup=self.freezer,
            network_lock=self.network_lock,
            external=dump_externals(
                self.volumes, self.netns, self.stdio.get("tty"), self.stdio.get("ctty")
            ),
            irmap_scan_paths=self.watched,
            **kw,
        )


def checkpoint(
    rt: Runtime,
    ref: str,
    *,
    leave_running: bool = False,
    export: Path | None = None,
    node_name: str = "",
    signer: tuple[str, Any] | None = None,
) -> CheckpointReport:
    """Checkpoint container ``ref`` into ``<container dir>/checkpoint``.

    Without ``leave_running`` the container's processes are gone afterwards and its status is
    ``checkpointed``; with it they continue.  If anything fails before the commit point (the
    answer to ``post-dump``), the container keeps running.  ``export`` also writes the
    bundle as one tar there, signed by ``signer`` (node name, Ed25519 key from
    :func:`migrate.keys.signing_key`) when given (:meth:`Bundle.export`).

    Raises PreflightError, CriuUnavailable, CriuError (with CRIU's log lines),
    BundleError, ContainerError."""
    t0 = time.monotonic()
    c = rt.get(ref)
    with c.locked():
        preflight(c)
        # Written aside and renamed over the previous checkpoint only once complete: a failed
        # dump neither leaves a partial bundle nor loses the last good one.
        bundle = Bundle.create(c.dir / CHECKPOINT_NEW_DIR)
        cfg = c.config
        plan = DumpPlan.of(c)
        marks: dict[str, float] = {}

        limits = FrozenLimits.from_env()
        memory = c.cgroup().stats().memory_bytes
        dump_s = limits.dump_s(memory)
        handle = criu.CriuHandle()

        def on_notify(n: criu.Notify) -> bool:
            if n.script == "post-dump":
                marks["post_dump"] = time.monotonic()
                rootfs_diff.write(c.upperdir, bundle.rootfs_diff)
                marks["rootfs"] = time.monotonic()
                # the point of no return: from the answer on CRIU kills (or resumes) the tasks
                return handle.disarm()
            return True

        t_dump = time.monotonic()
        try:
            plan = plan.freeze(c, limits.freeze_s(memory))
            # the time limit covers the freeze, the dump and the rootfs tar, to post-dump
            handle.arm(
                dump_s,
                f"the dump of {c.name} did not reach post-dump within {dump_s:.0f} s "
                f"({memory >> 20} MiB of memory; ${SCALE_ENV} scales the limit): its CRIU "
                "was killed, the container thawed",
            )
            result = criu.dump(
                plan.options(bundle.criu_dir, leave_running=leave_running), on_notify, handle
            )
        except (MigrationError, CgroupError):
            handle.disarm()
            _make_sure_running(c)
            shutil.rmtree(bundle.path, ignore_errors=True)
            raise
        if leave_running and plan.freezer is not None:
            c.cgroup().thaw()  # CRIU leaves a cgroup as frozen as it found it
        t_released = time.monotonic()
        criu.rearm_expired_timerfds(bundle.criu_dir)
        if not leave_running:
            # The monitor drains the container's stdout/stderr pipes into ctr.log once the
            # tasks are dead, then exits: copying the log before that loses its last lines.
            c.wait_monitor(10.0)
        if (c.dir / LOG).exists():
            shutil.copyfile(c.dir / LOG, bundle.path / LOG)
        manifest = bundle.finalize(
            Manifest(
                container=cfg.to_json(),
                image={"id": cfg.image_id, "ref": cfg.image_ref, "layers": list(cfg.layers)},
                criu_version=criu.version(),
                stdio=plan.stdio,
                volumes=plan.volumes,
                netns="external" if plan.netns else "",
                cgroup_mode=detect_mode().value,
                source_node=node_name,
                kernel=platform.release(),
                cpu_flags=cpu_flags(),
                dump={
                    "dump_s": marks["post_dump"] - t_dump,
                    "criu_s": result.duration_s,
                    "leave_running": leave_running,
                },
            )
        )
        final = c.dir / CHECKPOINT_DIR
        shutil.rmtree(final, ignore_errors=True)
        bundle.path.rename(final)
        bundle = Bundle(final)
        if not leave_running:
            c.state.status = ContainerStatus.CHECKPOINTED
            c.state.checkpointed_at = time.time()
            c.save()
            c.cgroup().destroy()
    size = sum(f.size for f in manifest.files)
    exported = None
    if export is not None:
        bundle.export(export, signer)
        exported = export
    report = CheckpointReport(
        container_id=c.id,
        name=c.name,
        bundle=bundle.path,
        leave_running=leave_running,
        frozen_s=t_released - t_dump,
        dump_s=marks["post_dump"] - t_dump,
        rootfs_s=marks["rootfs"] - marks["post_dump"],
        total_s=time.monotonic() - t0,
        bundle_bytes=size,
        exported=exported,
    )
    log.info("container.checkpointed", id=c.id[:12], frozen_s=round(report.frozen_s, 3))
    return report


def _make_sure_running(c: Container) -> None:
    """After a failed dump CRIU resumes the tasks; thaw the freezer in case it did not."""
    try:
        c.cgroup().thaw()
    except Exception as e:  # noqa: BLE001 - the dump error is what the operator needs
        log.error("checkpoint.thaw_failed", id=c.id[:12], error=str(e))
    if c.state.pid:
        try:
            os.kill(c.state.pid, 0)
        except ProcessLookupError:
            log.error("checkpoint.container_lost", id=c.id[:12])
