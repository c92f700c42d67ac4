#!/usr/bin/env python3
"""Filesystem workload for checkpoint/restore tests (run as the container's init).

Before ``ready`` it writes the upper dir: /srv/static (a file with mode 0640, owner 1000, a
user xattr, a hardlink and a symlink to it, a 1 MiB binary, a 32 MiB sparse file), deletes
/etc/motd of the image (whiteout), replaces /opt/data of the image (opaque dir), appends to
/var/old/file of the image (copy-up), and deletes /srv/gone.txt while holding it open.
Then every 50 ms: appends ``N`` to /srv/live.log (O_APPEND), rewrites the counter at offset
0 of /srv/rw.dat (O_RDWR, fixed size), reads gone.txt back through its fd; every 10th:
``tick N gone-ok`` (or ``FAIL``).
"""

import os
import shutil
import time

os.makedirs("/srv/static", exist_ok=True)
with open("/srv/static/a.txt", "w") as f:
    f.write("written in the upper dir before the checkpoint\n")
os.chmod("/srv/static/a.txt", 0o640)
os.chown("/srv/static/a.txt", 1000, 1000)
os.setxattr("/srv/static/a.txt", "user.note", b"kept")
os.link("/srv/static/a.txt", "/srv/static/hard")
os.symlink("a.txt", "/srv/static/link")
with open("/srv/static/b.bin", "wb") as f:
    f.write(bytes(range(256)) * 4096)
with open("/srv/static/sparse", "wb") as f:
    f.seek(32 << 20)
    f.write(b"end of a sparse file\n")
os.unlink("/etc/motd")  # a file of the image: whiteout
shutil.rmtree("/opt/data")  # a dir of the image, made again: opaque
os.mkdir("/opt/data")
with open("/opt/data/c", "w") as f:
    f.write("c made in the container\n")
with open("/var/old/file", "a") as f:  # a file of the image changed: copy-up
    f.write("appended in the container\n")
gone_text = b"deleted while open, read back after the restore\n" * 100
with open("/srv/gone.txt", "wb") as f:
    f.write(gone_text)
gone = os.open("/srv/gone.txt", os.O_RDONLY)
os.unlink("/srv/gone.txt")
live = os.open("/srv/live.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
rw = os.open("/srv/rw.dat", os.O_RDWR | os.O_CREAT, 0o600)
os.write(rw, b"0" * 64)
print("ready", flush=True)
n = 0
while True:
    n += 1
    os.write(live, b"%d\n" % n)
    os.pwrite(rw, b"%020d" % n, 0)
    ok = os.pread(gone, len(gone_text) + 1, 0) == gone_text and os.fstat(gone).st_nlink == 0
    if n % 10 == 0:
        print(f"tick {n} {'gone-ok' if ok else 'FAIL gone.txt changed'}", flush=True)
    time.sleep(0.05)
