"""Child side of ``run``: the container init, from fork to execve.

The monitor has already called ``unshare(CLONE_NEWPID)``, so this process is pid 1 of a new
pid namespace.  Sequence (parent = monitor)::

    monitor                               init (this module)
      fork ───────────────────────────────► wait for "go" on start pipe
      add pid to the cgroup
      write "go" ─────────────────────────► setsid; unshare(mnt|uts|ipc[|net])
                                            make / rprivate; hostname; lo up
                                            mounts (runtime.rootfs.mounts); pivot_root
                                            stdio; drop privileges; seccomp; execve
      read error pipe: EOF = exec worked ◄── (O_CLOEXEC) or "message" + exit 127

Why setsid first: CRIU dumps a tree only when its session and process-group leaders are
inside it (DESIGN.md, "Pitfalls").
"""

from __future__ import annotations

import fcntl
import os
import socket
import termios
from typing import NoReturn

from runtime import seccomp_filter
from runtime import syscalls as sc
from runtime.process import (
    ExecFailed,
    close_fds_except,
    drop_privileges,
    exec_user_program,
    fail_to_parent,
)
from runtime.rootfs.mounts import pivot_into, prepare_rootfs
from runtime.spec import ContainerConfig


def _own_root_mount(rootfs: str) -> None:
    """In a user namespace: put a copy of the rootfs mount on top of it and move into it.
    The mounts copied from the host's namespace are locked (MNT_LOCKED), and pivot_root(2)
    refuses a locked new root (EINVAL); a copy made here is not.  As runc's bind of the
    rootfs onto itself, but through open_tree(2), whose fd lets the init enter the copy
    without walking the (0700) state root."""
    fd = sc.open_tree_clone(rootfs, recursive=True)
    try:
        sc.move_mount_to(fd, "")  # onto the working directory: the rootfs
        os.fchdir(fd)
    finally:
        os.close(fd)


def run_init(
    cfg: ContainerConfig,
    rootfs: str,
    start_r: int,
    err_w: int,
    stdout_w: int,
    stderr_w: int,
    netns: str | None = None,
    tty_fd: int | None = None,
) -> NoReturn:
    """Become the container init and exec its program; never returns.  With ``tty_fd`` (a
    pty's slave side) that terminal is its stdin, stdout, stderr and controlling terminal
    instead of /dev/null and the two pipes.

    ``netns``: a net namespace to join (``--network bridge``: made and plugged by the
    runtime, runtime.network.link) instead of making one.

    On failure writes ``"<step>: <reason>"`` to ``err_w`` and exits 127."""
    step = "wait for the monitor"
    try:
        os.read(start_r, 1)
        os.close(start_r)
        step = "setsid"
        os.setsid()
        step = "create namespaces"
        flags = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
        if netns is not None:
            step = "join the net namespace"
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            sc.setns(fd, sc.CLONE_NEWNET)
            os.close(fd)
            step = "create namespaces"
        elif cfg.network != "host":
            flags |= sc.CLONE_NEWNET
        sc.unshare(flags)
        step = "make mounts private"
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        if cfg.in_userns:
            step = "remount the rootfs in the user namespace"
            _own_root_mount(rootfs)
        step = "set the hostname"
        socket.sethostname(cfg.hostname or cfg.id[:12])
        if cfg.network == "none":
            step = "bring lo up"
            sc.link_up("lo")
        step = "prepare the seccomp filter"
        syscall_filter = seccomp_filter.prepare(cfg.seccomp, cfg.capabilities)
        step = "mount the container filesystems"
        prepare_rootfs(cfg, rootfs)
        step = "pivot_root"
        pivot_into(rootfs)
        step = "set up stdio"
        if tty_fd is not None:  # the monitor's pty (runtime.tty): stdio and controlling tty
            for fd in (0, 1, 2):
                os.dup2(tty_fd, fd)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        else:
            devnull = os.open("/dev/null", os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stdout_w, 1)
            os.dup2(stderr_w, 2)
        close_fds_except({err_w})
        step = "drop privileges"
        drop_privileges(cfg.user, cfg.capabilities)
        step = "load the seccomp filter"
        syscall_filter.load()
        step = "exec"
        exec_user_program(cfg.args, cfg.env, cfg.cwd)
    except ExecFailed as e:
        fail_to_parent(err_w, str(e), 127)
    except BaseException as e:  # noqa: BLE001 - anything here must reach the parent
        fail_to_parent(err_w, f"{step}: {e}", 127)
