"""Block-I/O limits as a container's process sees them, for the I/O limit tests (issue 16).

:func:`loop_ext4` makes a small ext4 on a loop device and mounts it on the host (a volume
for the container; its loop device is the one to throttle).  :data:`WRITE` is a python3
program (the python workload image) that writes ``MIB`` MiB with O_DIRECT (so every write is
a bio the cgroup's throttle sees, v1 included), fsyncs, and prints ``wrote B bytes in S s``
as measured inside the container."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WRITE = """
import mmap, os, sys, time
path, mib = sys.argv[1], int(sys.argv[2])
buf = mmap.mmap(-1, 1 << 16)
buf.write(b"x" * (1 << 16))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
t0 = time.monotonic()
for _ in range(mib * 16):
    os.write(fd, buf)
os.fsync(fd)
t1 = time.monotonic()
os.close(fd)
os.unlink(path)
print(f"wrote {mib << 20} bytes in {t1 - t0:.3f} s", flush=True)
"""
_LINE = re.compile(r"wrote (\d+) bytes in ([\d.]+) s")


def rate(out: str) -> float:
    """Bytes per second of a :data:`WRITE` output."""
    m = _LINE.search(out)
    assert m, f"no 'wrote ... bytes in ... s' in {out!r}"
    return int(m.group(1)) / max(float(m.group(2)), 1e-6)


@contextmanager
def loop_ext4(base: Path, size_mib: int = 200) -> Iterator[tuple[Path, str]]:
    """(mount point, loop device path) of a fresh ext4 in ``base``; unmounted (its loop
    device detached with it) and removed on exit, even on failure."""
    img, mnt = base / "io.img", base / "io-mnt"
    mnt.mkdir(parents=True)
    with open(img, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, capture_output=True)
    try:
        dev = subprocess.run(
            ["findmnt", "-no", "SOURCE", str(mnt)], check=True, capture_output=True, text=True
        ).stdout.strip()
        yield mnt, dev
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        img.unlink()
