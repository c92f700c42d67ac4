"""The last steps of every container process, shared by the init and by ``exec``: drop
privileges as runc and Podman do by default, restore signal dispositions Python changed, and
execve the user's program.

Order (as runc's ``finalizeNamespace``): bounding set -> groups/gid/uid -> capset ->
no_new_privs -> execve.  A uid other than 0 loses every capability at setuid(2), as without
ambient capabilities in runc.

Sources: capabilities(7) ("Effect of user ID changes on capabilities", bounding set),
prctl(2) PR_CAPBSET_DROP / PR_SET_NO_NEW_PRIVS, OCI runtime-spec ``config.md`` process.user
and process.capabilities.
"""

from __future__ import annotations

import os
import signal
from typing import NoReturn

from runtime import syscalls as sc
from runtime.spec import User, capability_mask

#: Signals whose disposition Python changes at start-up and a child would inherit on exec.
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGCHLD,
)


class ExecFailed(Exception):
    """Raised in the child before execve; its message goes back to the parent."""


def fail_to_parent(err_w: int, message: str, exit_code: int) -> NoReturn:
    """In a forked child that could not exec: send ``message`` on the close-on-exec error
    pipe and exit with ``exit_code`` (127: not found, 126: cannot run, as the shells)."""
    try:
        os.write(err_w, message.encode()[:4000])
    finally:
        os._exit(exit_code)


def drop_privileges(user: User, capabilities: tuple[str, ...], no_new_privs: bool = True) -> None:
    """Keep only ``capabilities`` (names) in every set, become ``user``, set no_new_privs."""
    # Never ask for more than this process has (root here may lack some, e.g. SYS_RESOURCE).
    keep = capability_mask(capabilities) & _permitted_now()
    for cap in range(sc.cap_last_cap() + 1):
        if not keep & (1 << cap):
            try:
                sc.prctl(sc.PR_CAPBSET_DROP, cap)
            except OSError as e:
                if e.errno != 22:  # EINVAL: cap unknown to this kernel
                    raise
    os.setgroups(list(user.additional_gids))
    os.setgid(user.gid)
    os.setuid(user.uid)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    if user.uid == 0:
        sc.capset(keep, keep, keep)
    else:
        sc.capset(0, 0, 0)
    if no_new_privs:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)


def _permitted_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    return 0


def reset_signals() -> None:
    """Default dispositions and an empty mask, as a freshly exec'd program expects."""
    for s in _RESET_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def close_fds_except(keep: set[int]) -> None:
    """Close every fd of the process above 2 that is not in ``keep``."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def exec_user_program(args: tuple[str, ...], env: tuple[str, ...], cwd: str) -> NoReturn:
    """chdir to ``cwd`` and execve ``args`` searching ``PATH`` from ``env``.

    Raises ExecFailed with a runc-like message when the program cannot be run."""
    try:
        os.chdir(cwd)
    except OSError as e:
        raise ExecFailed(f"cannot enter working directory {cwd}: {e.strerror}") from e
    envd = dict(kv.partition("=")[::2] for kv in env)
    reset_signals()
    try:
        os.execvpe(args[0], list(args), envd)
    except FileNotFoundError:
        raise ExecFailed(
            f"executable file {args[0]!r} not found in $PATH "
            f"({envd.get('PATH', '')}) of the container"
        ) from None
    except PermissionError:
        raise ExecFailed(f"{args[0]!r}: permission denied (not executable?)") from None
    except OSError as e:
        raise ExecFailed(f"cannot execute {args[0]!r}: {e.strerror}") from None
