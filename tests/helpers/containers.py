"""Reading a container through the CLI (its log, ``inspect``, its SysV segments) and moving
one between two state roots (checkpoint to a bundle file, restore from it), for the tests of
real workloads.  Waits poll without sleeping on the whole budget; a timeout raises
AssertionError naming what was awaited (and the end of the log when there is one)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from runtime.poll import wait_for as poll
from tests.helpers.jaula import Jaula

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """The first truthy value ``pred()`` returns, polled (runtime.poll) for ``timeout`` s;
    AssertionError naming ``what`` on a time-out."""
    if v := poll(pred, timeout):
        return v
    raise AssertionError(f"timed out waiting for {what}")


def inspect(j: Jaula, ref: str) -> dict[str, Any]:
    """``jaula inspect`` of one container."""
    return json.loads(j.out("inspect", ref))[0]


def host_pid(j: Jaula, ref: str) -> int:
    """The host pid of the container's init."""
    info = json.loads(j.out("inspect", ref))
    info = info[0] if isinstance(info, list) else info
    return int(info["State"]["Pid"])


def log_lines(j: Jaula, ref: str) -> list[str]:
    """The container's output so far, stdout and stderr (each in order)."""
    p = j.run("logs", ref)
    return p.stdout.splitlines() + p.stderr.splitlines()


def stdout_lines(j: Jaula, ref: str) -> list[str]:
    """The container's stdout so far, line by line."""
    return j.out("logs", ref).splitlines()


def wait_lines(
    j: Jaula, ref: str, pattern: str, after: int = 0, count: int = 1, timeout: float = 20.0
) -> list[str]:
    """The stdout lines from index ``after`` on that match ``pattern`` (a regex), once there
    are at least ``count`` of them."""
    rx = re.compile(pattern)

    def found() -> list[str]:
        got = [ln for ln in stdout_lines(j, ref)[after:] if rx.search(ln)]
        return got if len(got) >= count else []

    try:
        return wait_for(found, timeout, f"{count} x {pattern!r} in the log of {ref}")
    except AssertionError as e:
        raise AssertionError(f"{e}; log:\n" + "\n".join(log_lines(j, ref)[-30:])) from None


def last_number(j: Jaula, ref: str, pattern: str) -> int:
    """The number captured by ``pattern``'s group 1 in the last stdout line matching it."""
    rx = re.compile(pattern)
    return int([m.group(1) for ln in stdout_lines(j, ref) if (m := rx.search(ln))][-1])


def no_fail(j: Jaula, ref: str) -> None:
    """The workload reported no ``FAIL`` line (the workloads print one per broken check)."""
    bad = [ln for ln in log_lines(j, ref) if "FAIL" in ln]
    assert not bad, bad


def move(src: Jaula, dst: Jaula, ref: str, bundle: Path) -> int:
    """Checkpoint ``ref`` on ``src`` into the file ``bundle`` and restore it on ``dst``.

    Returns the number of stdout lines of the log at the checkpoint: the log travels with the
    container, so lines from that index on were written after the restore."""
    src.run("checkpoint", ref, "--export", str(bundle))
    assert inspect(src, ref)["State"]["Status"] == "checkpointed"
    before = stdout_lines(src, ref)
    dst.run("restore", "--import", str(bundle), "--insecure-unsigned")  # no node keys here
    assert inspect(dst, ref)["State"]["Status"] == "running"
    after = stdout_lines(dst, ref)
    assert after[: len(before)] == before, "the log did not travel whole with the container"
    return len(before)


def sysv_segments(j: Jaula, ref: str) -> list[tuple[str, ...]]:
    """(key, shmid, perms, size, nattch) of every SysV segment the container sees."""
    rows = j.out("exec", ref, "cat", "/proc/sysvipc/shm").splitlines()
    head = rows[0].split()
    cols = [head.index(c) for c in ("key", "shmid", "perms", "size", "nattch")]
    return [tuple(r.split()[i] for i in cols) for r in rows[1:]]
