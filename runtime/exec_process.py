"""``exec``: run another program inside a running container.

Sequence (parent = the CLI)::

    caller                 helper (fork)                         program (fork)
      fork ──────────────► join the cgroup; setns ipc,uts,net,pid,mnt
                           fork ───────────────────────────────► setsid; drop privileges;
                                                                  chdir; execve
      ◄── error pipe: EOF = exec worked, else the message
      wait helper ◄──────── wait program, exit with its status (attached mode)

The program gets its own session (setsid), so that it never shares a session with a process
outside the container: CRIU refuses such trees (shared/cases C09).  With ``detach`` the
helper exits at once and the program is reparented to the container init.

Sources: setns(2) (a pid namespace applies to children; joining a mount namespace resets
root and cwd), nsenter(1).
"""

from __future__ import annotations

import os
from typing import NoReturn

from runtime import syscalls as sc
from runtime.cgroups import CgroupManager
from runtime.errors import ContainerError, NamespaceError
from runtime.process import ExecFailed, drop_privileges, exec_user_program, fail_to_parent
from runtime.spec import User

#: Namespaces joined, in order (mnt last: it changes what /proc paths mean).
NAMESPACES = ("ipc", "uts", "net", "pid", "mnt")


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
) -> int:
    """Run ``args`` in the namespaces of ``init_pid`` (host pid) and wait for it.

    Returns the program's exit code (128 + signal when killed; 0 at once with ``detach``).
    Raises NamespaceError when the namespaces cannot be opened, ContainerError with the
    reason when the program cannot be started (not found, bad cwd...)."""
    try:
        ns_fds = [
            os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in NAMESPACES
        ]
    except OSError as e:
        raise NamespaceError(f"cannot open the namespaces of pid {init_pid}: {e.strerror}") from e
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _helper(ns_fds, cgroup, args, env, cwd, user, capabilities, detach, err_w)
    os.close(err_w)
    for fd in ns_fds:
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
    ns_fds: list[int],
    cgroup: CgroupManager,
    args: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str,
    user: User,
    capabilities: tuple[str, ...],
    detach: bool,
    err_w: int,
) -> NoReturn:
    step = "join the cgroup"
    try:
        cgroup.add_process(os.getpid())
        step = "join the namespaces"
        for fd in ns_fds:
            sc.setns(fd)
            os.close(fd)
        step = "fork"
        pid = os.fork()
        if pid == 0:
            step = "setsid"
            os.setsid()
            if detach:
                devnull = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
            step = "drop privileges"
            drop_privileges(user, capabilities)
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
