#!/usr/bin/env python3
"""Process-tree workload for checkpoint/restore tests (run as the container's init).

The init forks three children; each child runs two spinning threads and answers the init over
a pipe pair (the init writes N, the child answers N+1 and the least count of its threads).  The
init has a heartbeat thread and prints ``round N spins A,B,C beat H`` every 100 ms.  SIGUSR1:
the init tells the children to quit, reaps them (``reaped PID exit=10+k``), prints ``all
reaped`` and idles.  ``FAIL`` on a wrong answer.
"""

import os
import signal
import threading
import time

KIDS = 3
beat = [0]


def heartbeat() -> None:
    while True:
        beat[0] += 1
        time.sleep(0.01)


kids = []
for k in range(KIDS):
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(down_w)
        os.close(up_r)
        counts = [0, 0]

        def spin(counts: list[int], i: int) -> None:
            while True:
                counts[i] += 1
                time.sleep(0.01)

        for i in range(2):
            threading.Thread(target=spin, args=(counts, i), daemon=True).start()
        while True:
            msg = os.read(down_r, 64)
            if msg in (b"", b"quit"):
                os._exit(10 + k)
            os.write(up_w, b"%d %d" % (int(msg) + 1, min(counts)))
    os.close(down_r)
    os.close(up_w)
    kids.append((pid, down_w, up_r))
threading.Thread(target=heartbeat, daemon=True).start()
stop: list[int] = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
n = 0
while not stop:
    spins = []
    for pid, w, r in kids:
        os.write(w, b"%d" % n)
        m, spun = os.read(r, 64).split()
        if int(m) != n + 1:
            print(f"FAIL child {pid} answered {m!r} to {n}", flush=True)
        n = int(m)
        spins.append(spun.decode())
    print(f"round {n} spins {','.join(spins)} beat {beat[0]}", flush=True)
    time.sleep(0.1)
for pid, w, r in kids:
    os.write(w, b"quit")
for pid, w, r in kids:
    _, status = os.waitpid(pid, 0)
    print(f"reaped {pid} exit={os.waitstatus_to_exitcode(status)}", flush=True)
print("all reaped", flush=True)
while True:
    time.sleep(1)
