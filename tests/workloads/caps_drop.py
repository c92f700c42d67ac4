"""Capability workload (issue 11, B): the init forks a child that drops CAP_SYS_CHROOT from
its bounding, permitted and effective sets and keeps every other capability, as ``capsh
--drop`` and then a capset(2) would; its inheritable set stays as the container gave it
(which still holds CAP_SYS_CHROOT: the shape CRIU 4.2's restorer failed on).  Env ``WHERE``
(``child``, the default, or ``init``) says which process drops.  The child prints ``child
ready``; the init keeps a count in /tmp/count and prints ``tick N`` every 50 ms.
"""

import ctypes
import os
import sys
import time

CAP_SYS_CHROOT = 18
PR_CAPBSET_DROP = 24
libc = ctypes.CDLL(None, use_errno=True)


class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop(cap: int) -> None:
    if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
        sys.exit(f"FAIL PR_CAPBSET_DROP: errno {ctypes.get_errno()}")
    hdr, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(hdr), data) != 0:
        sys.exit(f"FAIL capget: errno {ctypes.get_errno()}")
    data[0].effective &= ~(1 << cap)
    data[0].permitted &= ~(1 << cap)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        sys.exit(f"FAIL capset: errno {ctypes.get_errno()}")


where = os.environ.get("WHERE", "child")
if where == "init":
    drop(CAP_SYS_CHROOT)
if os.fork() == 0:
    if where == "child":
        drop(CAP_SYS_CHROOT)
    print("child ready", flush=True)
    while True:
        time.sleep(0.1)
n = 0
while True:
    n += 1
    with open("/tmp/count", "w") as f:
        f.write(str(n))
    print(f"tick {n}", flush=True)
    time.sleep(0.05)
