"""``exec``: run another program inside a running container.

Sequence (parent = the CLI)::

    caller                 helper (fork)                         program (fork)
      open the init's namespaces that differ from ours
      fork ──────────────► join the cgroup; setns cgroup,ipc,uts,net,pid,time,mnt, user last
                           fork ───────────────────────────────► setsid; drop privileges;
                                                                  chdir; execve
      ◄── error pipe: EOF = exec worked, else the message
      wait helper ◄──────── wait program, exit with its status (attached mode)

Which namespaces: every one the container's init is in that the caller is not in (compared
by the (st_dev, st_ino) of ``/proc/PID/ns/*``), so the program sees what the init sees.  The
time namespace matters after any restore: CRIU restores the tree into a new time namespace
whose offsets keep CLOCK_MONOTONIC and CLOCK_BOOTTIME where they were at the dump, so a
program left in the host's would read a clock seconds (or, after a migration, anything)
apart from the init's.  A namespace the init shares with the caller (the host's net
namespace with ``--network host``, the cgroup namespace today) is not joined: setns into
one's own user namespace is an error (EINVAL), and the others would be no-ops.

Order: as nsenter(1) does, every namespace but the user one first, while the helper still
has the host's capabilities over them, then the user namespace, which is joined last so
that it deprivileges rather than being needed to privilege (jaula creates none today; an
init in one is handled).  The mount namespace comes last of the others: joining it resets
root and cwd.  The pid and time namespaces apply to the program because it is forked after
the setns (a pid namespace applies only to children; a time namespace moves the caller and
its later children, and refuses a multithreaded caller with EUSERS: the helper is a fresh
fork, one thread).

The program gets its own session (setsid), so that it never shares a session with a process
outside the container: CRIU refuses such trees (shared/cases C09).  With ``detach`` the
helper exits at once and the program is reparented to the container init.

Sources: setns(2) (a pid namespace applies to children; joining a mount namespace resets
root and cwd; user namespace restrictions), time_namespaces(7), nsenter(1) (the two passes
around the user namespace), CRIU's criu/timens.c (restore into a new time namespace).
"""

from __future__ import annotations

import fcntl
import os
import termios
from typing import NoReturn

from runtime import seccomp_filter
from runtime import syscalls as sc
from runtime.cgroups import CgroupManager
from runtime.errors import ContainerError, NamespaceError
from runtime.process import ExecFailed, drop_privileges, exec_user_program, fail_to_parent
from runtime.spec import User

#: Namespaces joined when the init's differs from the caller's, in this order: mnt last of
#: the others (it resets root and cwd), user after all of them (see the module docstring).
NAMESPACES = ("cgroup", "ipc", "uts", "net", "pid", "time", "mnt", "user")


def namespaces_to_join(init_pid: int, proc: str = "/proc") -> list[tuple[str, int]]:
    """Open the namespaces of ``init_pid`` (host pid) that differ from the caller's.

    Returns ``[(name, fd)]`` in :data:`NAMESPACES` order, each fd O_RDONLY|O_CLOEXEC (the
    caller closes them).  A type the kernel lacks (no ``/proc/self/ns/time`` before 5.6) is
    skipped.  Raises NamespaceError naming the namespace when the init's cannot be read or
    opened (it exited, or no permission); no fd is left open then."""
    out: list[tuple[str, int]] = []
    try:
        for ns in NAMESPACES:
            try:
                mine = os.stat(f"{proc}/self/ns/{ns}")
            except FileNotFoundError:
                continue
            path = f"{proc}/{init_pid}/ns/{ns}"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise NamespaceError(
                    f"cannot open the {ns} namespace of pid {init_pid} ({path}): {e.strerror}"
                ) from e
            theirs = os.fstat(fd)  # of what was opened: no window between look and open
            if (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino):
                os.close(fd)
            else:
                out.append((ns, fd))
    except BaseException:
        for _, fd in out:
            os.close(fd)
        raise
    return out


def exec_in(
    init_pid: int,
    cgroup: CgroupManager,
    args: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str,
    user: User,
    capabilities: tuple[str, ...],
    detach: bool = False,
    container_id: str | None = None,
    seccomp: str = "unconfined",
    tty_fd: int | None = None,
) -> int:
    """Run ``args`` in the namespaces of ``init_pid`` (host pid) and wait for it.  With
    ``tty_fd`` (a pty's slave side) that terminal is its stdio and controlling terminal.

    Returns the program's exit code (128 + signal when killed; 0 at once with ``detach``).
    Raises NamespaceError when the namespaces cannot be opened, ContainerError with the
    reason when the program cannot be started (not found, bad cwd, a namespace that cannot
    be joined...).  ``seccomp``: the container's setting (:mod:`runtime.seccomp_filter`),
    loaded in the program before execve, as in the init."""
    ns_fds = namespaces_to_join(init_pid)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _helper(ns_fds, cgroup, args, env, cwd, user, capabilities, detach, err_w, seccomp, tty_fd)
    os.close(err_w)
    for _, fd in ns_fds:
        os.close(fd)
    failure = b""
    while chunk := os.read(err_r, 4096):
        failure += chunk
    os.close(err_r)
    _, status = os.waitpid(pid, 0)
    if failure:
        raise ContainerError(f"exec failed: {failure.decode(errors='replace')}", container_id)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _helper(
    ns_fds: list[tuple[str, int]],
    cgroup: CgroupManager,
    args: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str,
    user: User,
    capabilities: tuple[str, ...],
    detach: bool,
    err_w: int,
    seccomp: str,
    tty_fd: int | None = None,
) -> NoReturn:
    step = "prepare the seccomp filter"
    try:
        syscall_filter = seccomp_filter.prepare(seccomp, capabilities)
        step = "join the cgroup"
        cgroup.add_process(os.getpid())
        for ns, fd in ns_fds:
            step = f"join the {ns} namespace"
            sc.setns(fd)
            os.close(fd)
        step = "fork"
        pid = os.fork()
        if pid == 0:
            step = "setsid"
            os.setsid()
            if tty_fd is not None:
                step = "set up the terminal"
                for fd in (0, 1, 2):
                    os.dup2(tty_fd, fd)
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                if tty_fd > 2:
                    os.close(tty_fd)
            if detach:
                devnull = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
            step = "drop privileges"
            drop_privileges(user, capabilities)
            step = "load the seccomp filter"
            syscall_filter.load()
            exec_user_program(args, env, cwd)
        if detach:
            os._exit(0)
        os.close(err_w)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    except ExecFailed as e:
        fail_to_parent(err_w, str(e), 126)
    except BaseException as e:  # noqa: BLE001 - anything here must reach the caller
        fail_to_parent(err_w, f"{step}: {e}", 126)
