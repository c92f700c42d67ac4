"""What a container's processes can see of their seccomp filter, for the seccomp tests.

:data:`LOOP` is a container init (python3 in the python workload image) that prints, every
0.2 s, ``tick N errno E seccomp S``: E is the errno of ``add_key("jaulaprobe", ...)``
(x86_64 syscall 248; 0 when it succeeded), S the ``Seccomp:`` field of its own
``/proc/self/status`` (0 none, 2 filter).  ``add_key`` is one of the syscalls jaula's default
profile denies with EPERM (the keyring is not namespaced); unconfined, the kernel answers
ENODEV (no key type of that name), so the two cases differ by the filter alone.  :data:`ONCE` prints one such line and exits (for
``jaula exec`` and attached runs)."""

from __future__ import annotations

import errno
import platform
import re

import pytest

_BODY = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
def line(n):
    ctypes.set_errno(0)
    r = libc.syscall(248, b'jaulaprobe', b'd', None, 0, ctypes.c_int(-2))
    e = ctypes.get_errno() if r == -1 else 0
    s = [l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')][0]
    return f'tick {n} errno {e} seccomp {s}'
"""
LOOP = (
    _BODY
    + """
n = 0
while True:
    print(line(n), flush=True)
    n += 1
    time.sleep(0.2)
"""
)
ONCE = _BODY + "\nprint(line(0), flush=True)\n"

EPERM, ENODEV, EACCES = errno.EPERM, errno.ENODEV, errno.EACCES
_LINE = re.compile(r"tick (\d+) errno (\d+) seccomp (\d+)")

needs_x86_64 = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the probe calls add_key by its x86_64 number"
)


def parse(line: str) -> tuple[int, int]:
    """(errno, Seccomp mode) of one probe line."""
    m = _LINE.search(line)
    assert m, f"not a probe line: {line!r}"
    return int(m.group(2)), int(m.group(3))


def host_seccomp_mode(pid: int) -> int:
    """The ``Seccomp:`` field of host pid ``pid``'s status (0 none, 1 strict, 2 filter)."""
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("Seccomp:"):
                return int(ln.split()[1])
    raise AssertionError(f"no Seccomp: line for pid {pid}")


__all__ = [
    "EACCES",
    "ENODEV",
    "EPERM",
    "LOOP",
    "ONCE",
    "host_seccomp_mode",
    "needs_x86_64",
    "parse",
]
