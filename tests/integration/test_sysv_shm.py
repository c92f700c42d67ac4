"""A container holding a SysV shared memory segment migrates between two real node services
on 127.0.0.1 with each strategy, and the segment arrives whole (issue 11, item C).

The workload is ``shared/cases/C07/sysv_shm`` (the python image's ``/opt/cases/C07``): a
writer parent and a checking child attach one 1 MiB segment on key 0xC07 in the container's
own IPC namespace; the writer stores counter ``v`` at word 0 after writing ``v`` into slot
``1 + v % 1000``, the child prints ``FAIL`` when the counter steps back or its slot
disagrees.  Before the migration the test also writes a 64 KiB pattern into the middle of
the segment (a page the workload never touches) from a process exec'd into the container.

After the migration the segment on node2 has the same key, id, mode, size and attach count,
the pattern is there byte for byte, the counter goes on from where it was (not from zero),
and the child never printed ``FAIL``.

Cold dumps send the segment's pages through node2's ``criu page-server`` over TLS: before
jaula's CRIU patch 0012 that failed every time ("tls: Failed receiving data: Decryption has
failed"), because CRIU's forked IPC-namespace dumper sent them with a copy of the TLS
session.  Post-copy dumps write them into the images that travel as files."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.containers import wait_for
from tests.helpers.jaula import Jaula
from tests.helpers.nodes import Cluster2, make_cluster, serving
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

IMAGE = "jaula-python:latest"
WORKLOAD = "/opt/cases/C07/sysv_shm"
SEGMENT = ("3079", "0", "600", str(1 << 20), "2")  # key 0xC07, id, mode, size, nattch
PATTERN_AT, PATTERN_LEN = 512 << 10, 64 << 10

#: Python run inside the container (``python3 -c``, argv: write|read): attach key 0xC07
#: with ctypes; ``write`` fills the pattern region, both print the counter word, its slot
#: and the sha256 of the pattern region.
SHM_TOOL = f"""
import ctypes, hashlib, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
shmid = libc.shmget(0xC07, 0, 0)
addr = libc.shmat(shmid, None, 0)
if shmid < 0 or addr in (None, ctypes.c_void_p(-1).value):
    sys.exit("shm: %s" % ctypes.get_errno())
at, n = {PATTERN_AT}, {PATTERN_LEN}
if sys.argv[1] == "write":
    pat = b"".join(hashlib.sha256(b"C07 %d" % i).digest() for i in range(n // 32))
    ctypes.memmove(addr + at, pat, n)
v = struct.unpack("<Q", ctypes.string_at(addr, 8))[0]
slot = struct.unpack("<Q", ctypes.string_at(addr + 8 * (1 + v % 1000), 8))[0]
print(v, slot, hashlib.sha256(ctypes.string_at(addr + at, n)).hexdigest())
"""


def _expected_pattern_sha() -> str:
    import hashlib

    pat = b"".join(hashlib.sha256(b"C07 %d" % i).digest() for i in range(PATTERN_LEN // 32))
    return hashlib.sha256(pat).hexdigest()


@pytest.fixture
def nodes(
    tmp_path: Path, busybox_image_layout: Path, python_image_layout: Path
) -> Iterator[Cluster2]:
    """node1 and node2 serving with busybox and the python image (the C07 workload) on both;
    stopped and leak-checked at the end."""
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    for node in ("node1", "node2"):
        c.local(node).run("image", "import", str(python_image_layout), "--name", IMAGE, timeout=300)
    with serving(c) as c:
        yield c


def segments(j: Jaula, ref: str) -> list[tuple[str, ...]]:
    """(key, shmid, perms, size, nattch) of every SysV segment container ``ref`` sees."""
    rows = j.out("exec", ref, "cat", "/proc/sysvipc/shm").splitlines()
    head = rows[0].split()
    cols = [head.index(c) for c in ("key", "shmid", "perms", "size", "nattch")]
    return [tuple(r.split()[i] for i in cols) for r in rows[1:]]


def shm_tool(j: Jaula, ref: str, action: str) -> tuple[int, int, str]:
    """(counter, its slot, sha256 of the pattern region) of the segment in ``ref``, after
    writing the pattern when ``action`` is ``write``."""
    v, slot, sha = j.out("exec", ref, "python3", "-c", SHM_TOOL, action).split()
    return int(v), int(slot), sha


def counters(j: Jaula, ref: str) -> list[int]:
    return [int(m) for m in re.findall(r"^counter=(\d+) ", j.out("logs", ref), re.MULTILINE)]


@pytest.mark.parametrize("strategy", ["cold", "postcopy"])
def test_sysv_shm_segment_migrates_whole(nodes: Cluster2, strategy: str) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    n1.run("run", "-d", "--name", "c07", IMAGE, WORKLOAD)
    wait_for(lambda: len(counters(n1, "c07")) >= 1, 30, "the first counter line of c07")
    assert segments(n1, "c07") == [SEGMENT]
    v0, slot0, sha0 = shm_tool(n1, "c07", "write")
    assert v0 > 0 and slot0 == v0 and sha0 == _expected_pattern_sha()

    p = nodes.op("migrate", "c07", "node2", "--strategy", strategy, "--json", timeout=180)
    rep = json.loads(p.stdout)
    assert rep["strategy"] == strategy and rep["resume_confirmed"] is True, rep
    if strategy == "cold":  # the pages (the segment's too) went through the TLS page server
        assert rep["page_server_bytes"] > 0, rep
    nodes.assert_only_on("c07", "node2")

    assert segments(n2, "c07") == [SEGMENT]
    v1, slot1, sha1 = shm_tool(n2, "c07", "read")
    assert sha1 == sha0, "the pattern written into the segment did not arrive"
    assert v1 > v0 and slot1 == v1, (v0, v1, slot1)  # went on from the migrated value
    last = counters(n1, "c07")[-1]  # the log travelled: node1's copy ends at the freeze
    wait_for(lambda: counters(n2, "c07")[-1] >= last + 40, 30, "c07 counting on node2")
    after = [v for v in counters(n2, "c07") if v > last]
    assert after[:2] == [last + 20, last + 40], after
    assert "FAIL" not in n2.out("logs", "c07")


def test_without_patch_0012_a_cold_migration_of_sysv_shm_is_refused_before_the_freeze(
    tmp_path: Path, busybox_image_layout: Path, python_image_layout: Path
) -> None:
    """node1 runs a copy of its criu whose patch manifest lists every patch but 0012 (a
    node built before it): a cold migration of a container holding a SysV segment is
    refused in preflight, naming the patch, and the workload runs on on node1."""
    import hashlib
    import shutil

    from migrate import criu

    real = criu.find_criu()
    fake = tmp_path / "old-criu" / "sbin" / "criu"
    fake.parent.mkdir(parents=True)
    shutil.copy2(real, fake)
    manifest = criu.manifest_path(str(fake))
    manifest.parent.mkdir(parents=True)
    sha = hashlib.sha256(fake.read_bytes()).hexdigest()
    lines = []
    for line in criu.manifest_path(real).read_text().splitlines():
        if line.startswith("binary-sha256 "):
            line = f"binary-sha256 {sha}"
        if line != f"applied {criu.SYSV_SHM_PATCH}":
            lines.append(line)
    manifest.write_text("\n".join(lines) + "\n")
    assert criu.SYSV_SHM_PATCH not in criu.patch_series(str(fake))
    assert criu.missing_patches("cold", criu.patch_series(str(fake))) == []

    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    try:
        for node in ("node1", "node2"):
            c.local(node).run(
                "image", "import", str(python_image_layout), "--name", IMAGE, timeout=300
            )
        c.start("node1", env={"JAULA_CRIU": str(fake)})
        c.start("node2")
        n1 = c.local("node1")
        n1.run("run", "-d", "--name", "c07", IMAGE, WORKLOAD)
        wait_for(lambda: len(counters(n1, "c07")) >= 1, 30, "the first counter line of c07")
        p = c.op("migrate", "c07", "node2", check=False, timeout=180)
        assert p.returncode == 125, p.stderr
        assert f"without patch {criu.SYSV_SHM_PATCH}" in p.stderr and "nothing was frozen" in (
            p.stderr
        )
        c.assert_only_on("c07", "node1")
        before = counters(n1, "c07")[-1]
        wait_for(lambda: counters(n1, "c07")[-1] >= before + 40, 30, "c07 counting on node1")
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)
