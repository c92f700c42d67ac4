"""Helpers shared by the v1 and v2 drivers: signalling a set of pids and tearing down."""

from __future__ import annotations

import errno as errno_mod
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from runtime.cgroups import fs
from runtime.errors import CgroupError


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each pid; a pid that has already gone is skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        except OSError as err:
            raise CgroupError(
                f"cannot send signal {sig} to pid {pid}: {err.strerror}", errno=err.errno
            ) from err


def rmdir_until(path: Path, deadline: float) -> None:
    """rmdir a cgroup, retrying every 10 ms while it is EBUSY (killed tasks still exiting)
    until ``deadline`` (a :func:`time.monotonic` value).  A missing dir is fine."""
    while True:
        try:
            fs.remove_dir(path)
            return
        except CgroupError as err:
            if err.errno != errno_mod.EBUSY or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def raise_collected(
    errors: list[CgroupError], what: str, remaining: Callable[[], list[int]]
) -> None:
    """Raise one CgroupError summarising every error of a teardown (no-op when empty).

    The message ends with the pids still in the cgroup, when ``remaining()`` finds any.  The
    first error is chained as ``__cause__`` and gives ``path`` and ``errno``.
    """
    if not errors:
        return
    first = errors[0]
    detail = "; ".join(str(e) for e in errors)
    try:
        left = remaining()
    except CgroupError:
        left = []
    suffix = f" (tasks still there: {left})" if left else ""
    raise CgroupError(f"{what}: {detail}{suffix}", path=first.path, errno=first.errno) from first


def signal_frozen(manager: Any, sig: int) -> None:
    """Signal every task of ``manager``'s cgroup with nothing escaping by forking: freeze,
    signal, thaw (unless the cgroup was frozen before and ``sig`` is not SIGKILL).  A cgroup
    that cannot freeze (a task stuck in FREEZING) is killed anyway for SIGKILL."""
    from runtime.cgroups import FreezerState

    was_frozen = manager.freezer_state() is FreezerState.FROZEN
    if not was_frozen:
        try:
            manager.freeze()
        except CgroupError:
            if sig != signal.SIGKILL:
                raise
    try:
        signal_all(manager.pids(), sig)
    finally:
        if sig == signal.SIGKILL or not was_frozen:
            manager.thaw()
