"""Block-I/O limits (``--device-{read,write}-{bps,iops}``, issue 16): the limits reach the
cgroup (v1 blkio throttle files, v2 ``io.max``), a direct write to a throttled loop device
runs no faster than the limit (+20 %), and still so after ``jaula checkpoint`` + ``jaula
restore`` and after a move to another state root, where the device is resolved again by its
path; bad values are refused in one line with nothing made.

Only an upper bound on the rate is asserted (a busy host only slows the writer down), and
the same write outside any limit must be faster than twice the limit, so that the bound says
something."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.containers import inspect, move
from tests.helpers.io_probe import WRITE, loop_ext4, rate
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root]
LIMIT = 1 << 20  # 1 MiB/s
MIB = 4


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula


@pytest.fixture
def py2(jaula2: Jaula, python_image_layout: Path) -> Jaula:
    jaula2.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula2


def limits_in_cgroup(j: Jaula, ref: str) -> str:
    """The container's throttle settings as its cgroup has them (v1 files or v2 io.max)."""
    paths = inspect(j, ref)["CgroupPaths"]
    if "blkio" in paths:
        d = Path(paths["blkio"])
        return "".join(
            f"{f}: {(d / f'blkio.throttle.{f}_device').read_text()}"
            for f in ("read_bps", "write_bps", "read_iops", "write_iops")
        )
    return Path(paths[""], "io.max").read_text()


def write_rate(j: Jaula, ref: str, name: str) -> float:
    return rate(j.out("exec", ref, "python3", "-c", WRITE, f"/data/{name}", str(MIB)))


@pytest.mark.criu
@needs_criu
def test_write_bps_bites_after_restore_and_a_move(py: Jaula, py2: Jaula, tmp_path: Path) -> None:
    with loop_ext4(tmp_path) as (mnt, dev):
        free = subprocess.run(
            [sys.executable, "-c", WRITE, str(mnt / "free"), str(MIB)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        assert rate(free) > 2 * LIMIT, f"the device is too slow to show a limit: {free}"
        try:
            py.run("run", "-d", "--name", "io", "-v", f"{mnt}:/data",
                   "--device-write-bps", f"{dev}:1mb", "--device-read-bps", f"{dev}:2m",
                   "--device-read-iops", f"{dev}:1000", "--device-write-iops", f"{dev}:100000",
                   "jaula-python", "sleep", "1000")  # fmt: skip
            st = os.stat(dev)
            mm = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            got = limits_in_cgroup(py, "io")
            for want in (f"{mm} {LIMIT}", f"{mm} {2 << 20}", f"{mm} 1000", f"{mm} 100000"):
                assert want in got or want.replace(" ", " wbps=") in got, (want, got)
            assert write_rate(py, "io", "a") <= 1.2 * LIMIT
            py.run("checkpoint", "io")
            py.run("restore", "io")
            assert f"{mm} {LIMIT}" in limits_in_cgroup(py, "io")
            assert write_rate(py, "io", "b") <= 1.2 * LIMIT, "no limit after the restore"
            move(py, py2, "io", tmp_path / "io.tar")
            assert write_rate(py2, "io", "c") <= 1.2 * LIMIT, "no limit after the move"
        finally:
            for j in (py, py2):
                j.run("rm", "-f", "io", check=False)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--device-write-bps", "/dev/jaula-no-such:1mb"), "No such file"),
        (("--device-read-iops", "/dev/null:10"), "not a block device"),
        (("--device-write-bps", "/dev/null"), "PATH:RATE"),
        (("--device-write-iops", "/dev/null:lots"), "PATH:N"),
        (("--device-read-bps", "/dev/null:0"), "must be positive"),
        (("--blkio-weight", "5"), "10 to 1000"),
    ],
)
def test_bad_io_limits_are_refused_in_one_line(
    py: Jaula, args: tuple[str, str], words: str
) -> None:
    p = py.run("run", "-d", *args, "jaula-python", "true", check=False)
    assert p.returncode == 125, (p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr
    assert args[0] in p.stderr, p.stderr
    assert py.container_ids() == []


def test_blkio_weight_reaches_the_cgroup(py: Jaula) -> None:
    py.run("run", "-d", "--name", "w", "--blkio-weight", "300", "jaula-python", "sleep", "100")
    paths = inspect(py, "w")["CgroupPaths"]
    d = Path(paths.get("blkio") or paths[""])
    files = ("blkio.weight", "blkio.bfq.weight", "io.bfq.weight", "io.weight")
    got = [(d / f).read_text().split()[-1] for f in files if (d / f).exists()]
    assert got and got[0] == "300", got
