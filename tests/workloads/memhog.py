#!/usr/bin/env python3
"""memhog: a memory workload whose whole memory can be checked after checkpoint/restore.

usage: memhog.py MIB [--dirty-pct P] [--heartbeat PATH] [--maxgap]

Memory
    One private anonymous mapping of MIB MiB (``mmap(-1, size, MAP_PRIVATE)``, the kind of
    memory a heap is), every page touched before ``READY <pid>`` is printed.  Page ``i``
    (``mmap.PAGESIZE`` bytes) holds a 16-byte header ``struct '<QQ' (i, stamp)`` followed by
    a slice of a fixed 1 MiB pseudo-random block R (``shake_256(b"jaula-memhog")``) starting
    at ``(i * 2654435761) % 2**20``: pages up to 4 GiB are all different and do not compress
    with small-window compressors (gzip, lz4).  ``stamp`` is the tick that last wrote the
    page (0 for the first touch).

Ticks
    Every 100 ms the tick counter goes up by one; tick ``t`` re-dirties
    ``k = ceil(pages * P / 100)`` pages (none when P is 0, the default) by writing ``t`` into
    their stamps: the ``k`` pages starting at ``((t - 1) * k) % pages``, wrapping, so the
    writes sweep the memory.  Only the header is written but the whole page is dirty for the
    kernel.  A tick that takes longer than 100 ms is followed by the next at once (no
    catching up); a clock that jumps (restore on another host) does not stall the loop.

Checksum
    The process keeps the expected stamp of every page (an ``array('Q')``) and a running
    64-bit checksum ``sum(mix(i, stamp_i)) mod 2**64``, updated on every re-dirty.

Signals
    SIGUSR1: at the end of the current tick, read every page, recompute the checksum from the
    headers in memory and compare it and every page (index, stamp, body) with what is
    expected; print ``VERIFY OK <counter>`` or
    ``VERIFY FAIL <counter> bad_pages=N first=[...] checksum=ACTUAL expected=EXPECTED``.
    SIGTERM, SIGINT: exit 0 (as a container's pid 1 it would otherwise ignore SIGTERM).

Heartbeat
    With ``--heartbeat PATH`` a thread keeps PATH open and every millisecond overwrites it in
    place (``pwrite`` at offset 0) with ``time.time()`` as ``%.6f\\n``, so the longest gap
    between two values seen from outside measures how long the process was frozen.  The
    interpreter's thread switch interval is lowered to 1 ms so the heartbeat keeps its pace
    while the main thread verifies.

Longest gap (``--maxgap``, for the benchmarks)
    The heartbeat thread (started by ``--maxgap`` even without ``--heartbeat``) also keeps the
    longest wall-clock gap between two consecutive beats and the ``time.time()`` of the beat
    that ended it: with a beat every millisecond, a gap much longer than that is time the
    process did not run (frozen, dumped, moved, restored).  VERIFY lines then end with
    `` maxgap_ms=G maxgap_at=T`` (the longest gap since the start or the last reset, taken
    when the verification starts, so the verification itself is not in it).  SIGUSR2, at the
    end of the current tick: forget the longest gap and print ``RESET <counter>``.  Without
    ``--maxgap`` nothing of this happens and SIGUSR2 keeps its default action.

Output is line-buffered on stdout (flushed per line); nothing else is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import mmap
import os
import signal
import struct
import sys
import threading
import time
from array import array

TICK_S = 0.1
HEADER = struct.Struct("<QQ")
PAGE = mmap.PAGESIZE
BODY = PAGE - HEADER.size
BLOCK = 1 << 20
MASK = (1 << 64) - 1
R = hashlib.shake_256(b"jaula-memhog").digest(BLOCK + PAGE)


def body_offset(i: int) -> int:
    return (i * 2654435761) % BLOCK


def mix(i: int, stamp: int) -> int:
    h = (((i << 32) ^ stamp) * 0x9E3779B97F4A7C15) & MASK
    return h ^ (h >> 29)


class MemHog:
    """The mapping, the expected stamps and the running checksum."""

    def __init__(self, mib: int, dirty_pct: float) -> None:
        self.pages = mib * (1 << 20) // PAGE
        self.mem = mmap.mmap(-1, self.pages * PAGE, flags=mmap.MAP_PRIVATE)
        self.stamps = array("Q", bytes(8 * self.pages))
        self.per_tick = math.ceil(self.pages * dirty_pct / 100) if dirty_pct > 0 else 0
        self.per_tick = min(self.per_tick, self.pages)
        self.counter = 0
        self.checksum = 0
        rv = memoryview(R)
        for i in range(self.pages):
            o = i * PAGE
            off = body_offset(i)
            HEADER.pack_into(self.mem, o, i, 0)
            self.mem[o + HEADER.size : o + PAGE] = rv[off : off + BODY]
            self.checksum += mix(i, 0)
        self.checksum &= MASK

    def tick(self) -> None:
        self.counter += 1
        t, k = self.counter, self.per_tick
        if not k:
            return
        start = ((t - 1) * k) % self.pages
        mem, stamps, total = self.mem, self.stamps, self.checksum
        for j in range(k):
            i = (start + j) % self.pages
            HEADER.pack_into(mem, i * PAGE, i, t)
            total += mix(i, t) - mix(i, stamps[i])
            stamps[i] = t
        self.checksum = total & MASK

    def verify(self) -> str:
        mem, stamps = self.mem, self.stamps
        total = 0
        bad: list[int] = []
        for i in range(self.pages):
            o = i * PAGE
            idx, stamp = HEADER.unpack_from(mem, o)
            total += mix(idx, stamp)
            off = body_offset(i)
            if (
                idx != i
                or stamp != stamps[i]
                or mem[o + HEADER.size : o + PAGE] != R[off : off + BODY]
            ):
                bad.append(i)
        total &= MASK
        if not bad and total == self.checksum:
            return f"VERIFY OK {self.counter}"
        return (
            f"VERIFY FAIL {self.counter} bad_pages={len(bad)} first={bad[:8]} "
            f"checksum={total:#x} expected={self.checksum:#x}"
        )


class Heartbeat:
    """The heartbeat thread's state: the file it writes, the longest gap between beats."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if path else -1
        self.lock = threading.Lock()
        self.last = 0.0
        self.max_gap = 0.0
        self.max_at = 0.0

    def run(self) -> None:
        while True:
            now = time.time()
            with self.lock:
                if self.last and now - self.last > self.max_gap:
                    self.max_gap, self.max_at = now - self.last, now
                self.last = now
            if self.fd >= 0:
                os.pwrite(self.fd, b"%.6f\n" % now, 0)
            time.sleep(0.001)

    def longest(self) -> str:
        with self.lock:
            return f"maxgap_ms={self.max_gap * 1000:.3f} maxgap_at={self.max_at:.6f}"

    def reset(self) -> None:
        with self.lock:
            self.max_gap = self.max_at = 0.0
            self.last = time.time()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memhog.py", description=__doc__.splitlines()[0])
    parser.add_argument("mib", type=int, help="MiB of memory to allocate and touch")
    parser.add_argument(
        "--dirty-pct",
        type=float,
        default=0.0,
        help="percent of pages re-dirtied every 100 ms (default 0)",
    )
    parser.add_argument("--heartbeat", metavar="PATH", help="write time.time() here every 1 ms")
    parser.add_argument(
        "--maxgap",
        action="store_true",
        help="keep the longest gap between heartbeats, print it with VERIFY, reset on SIGUSR2",
    )
    args = parser.parse_args(argv)
    if args.mib <= 0 or not 0 <= args.dirty_pct <= 100:
        parser.error("MIB must be positive and --dirty-pct within 0..100")

    verify_requested = False
    reset_requested = False

    def on_usr1(signum: int, frame: object) -> None:
        nonlocal verify_requested
        verify_requested = True

    def on_usr2(signum: int, frame: object) -> None:
        nonlocal reset_requested
        reset_requested = True

    signal.signal(signal.SIGUSR1, on_usr1)
    if args.maxgap:
        signal.signal(signal.SIGUSR2, on_usr2)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
    signal.signal(signal.SIGINT, lambda s, f: sys.exit(0))

    hog = MemHog(args.mib, args.dirty_pct)
    beat = None
    if args.heartbeat or args.maxgap:
        sys.setswitchinterval(0.001)
        beat = Heartbeat(args.heartbeat)
        threading.Thread(target=beat.run, daemon=True).start()
    print(f"READY {os.getpid()}", flush=True)

    next_tick = time.monotonic() + TICK_S
    while True:
        now = time.monotonic()
        next_tick = min(next_tick, now + TICK_S)  # the clock may go back (restored elsewhere)
        if next_tick > now:
            time.sleep(next_tick - now)
            continue
        hog.tick()
        if reset_requested and beat is not None:
            reset_requested = False
            beat.reset()
            print(f"RESET {hog.counter}", flush=True)
        if verify_requested:
            verify_requested = False
            gap = beat.longest() if beat is not None and args.maxgap else ""
            result = hog.verify()
            print(f"{result} {gap}".rstrip(), flush=True)
        next_tick = max(next_tick + TICK_S, time.monotonic())


if __name__ == "__main__":
    sys.exit(main())
