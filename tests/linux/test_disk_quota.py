"""Disk quota (``--storage-opt size=``, issue 16) on a loop-mounted XFS that each test makes
and removes.

Where the kernel has XFS quotas (CONFIG_XFS_QUOTA), the file system is mounted with
``prjquota`` and a write past the size fails with EDQUOT, still after ``jaula checkpoint`` +
``jaula restore`` and after a move to another state root on it.  Everywhere: a state root
without project quotas is refused in one line with nothing made, a bad size too, and the
project ids :mod:`runtime.quota` sets are inherited and keep overlayfs' work -> upper renames
working (XFS refuses renames across projects)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime import quota
from runtime import syscalls as sc
from tests.helpers.containers import inspect, move
from tests.helpers.jaula import Jaula
from tests.helpers.leaks import cleanup_root
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root]


def _mount_xfs(tmp_path: Path, prjquota: bool) -> Path | str:
    """A fresh 300 MiB XFS under tmp_path, loop-mounted (autoclear); the mount point, or why
    it could not be mounted."""
    if shutil.which("mkfs.xfs") is None:
        return "mkfs.xfs is missing (xfsprogs; `make setup` installs it)"
    img, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(img, "wb") as f:
        f.truncate(300 << 20)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True, capture_output=True)
    mnt.mkdir()
    opts = "loop,prjquota" if prjquota else "loop"
    cmd = ["mount", "-o", opts, str(img), str(mnt)]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if p.returncode != 0:
        img.unlink()
        why = (p.stderr.strip().splitlines() or ["?"])[0]
        return f"cannot mount XFS with -o {opts} ({why}): a kernel without CONFIG_XFS_QUOTA?"
    return mnt


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Callable[[bool], Path]]:
    """``make(prjquota) -> mount point`` of a loop XFS; skips when it cannot be mounted.
    Finalizer: unmounts every one made (its loop device goes with it) and removes the image."""
    made: list[Path] = []

    def make(prjquota: bool) -> Path:
        base = tmp_path / f"x{len(made)}"
        base.mkdir()
        got = _mount_xfs(base, prjquota)
        if isinstance(got, str):
            pytest.skip(got)
        made.append(got)
        return got

    yield make
    for mnt in reversed(made):
        subprocess.run(["umount", str(mnt)], check=True)
        (mnt.parent / "xfs.img").unlink()


def _root(mnt: Path, name: str, busybox_image_layout: Path) -> Jaula:
    j = Jaula(mnt / name)
    j.run("image", "import", str(busybox_image_layout), "--name", "busybox:latest")
    return j


def test_a_state_root_without_project_quotas_is_refused(
    xfs: Callable[[bool], Path], busybox_image_layout: Path
) -> None:
    mnt = xfs(False)
    j = _root(mnt, "state", busybox_image_layout)
    try:
        p = j.run("run", "-d", "--storage-opt", "size=20m", "busybox", "sleep", "100",
                  check=False)  # fmt: skip
        assert p.returncode == 125, (p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "project quotas" in p.stderr and str(j.root) in p.stderr, p.stderr
        assert j.container_ids() == [], "a refused run left a container"
        for bad, words in (("size=lots", "size=SIZE"), ("quota=1g", "size=SIZE"),
                           ("size=10k", "minimum")):  # fmt: skip
            p = j.run("run", "-d", "--storage-opt", bad, "busybox", "true", check=False)
            assert p.returncode == 125 and words in p.stderr, (bad, p.stderr)
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert j.container_ids() == []
    finally:
        assert not cleanup_root(j.root)


def test_project_ids_are_inherited_and_keep_renames_working(xfs: Callable[[bool], Path]) -> None:
    mnt = xfs(False)
    cdir = mnt / "c"
    cdir.mkdir()
    for d in ("upper", "work"):
        (cdir / d).mkdir()
        fd = os.open(cdir / d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sc.set_project(fd, quota.project_id(cdir))
        finally:
            os.close(fd)
    (cdir / "work" / "tmp").mkdir()
    (cdir / "work" / "tmp" / "f").write_text("x")
    os.rename(cdir / "work" / "tmp", cdir / "upper" / "moved")  # overlayfs' copy-up does this
    fd = os.open(cdir / "upper" / "moved" / "f", os.O_RDONLY)
    try:
        assert sc.get_project(fd)[0] == quota.project_id(cdir)
    finally:
        os.close(fd)
    assert quota.project_id(cdir) != quota.project_id(mnt / "other")


DD = "dd if=/dev/zero of=/fill{n} bs=1M count=40 2>&1; echo rc=$?"


@pytest.mark.criu
@needs_criu
def test_a_write_past_the_size_fails_still_after_restore_and_a_move(
    xfs: Callable[[bool], Path], busybox_image_layout: Path, tmp_path: Path
) -> None:
    mnt = xfs(True)
    j, j2 = _root(mnt, "state", busybox_image_layout), _root(mnt, "state2", busybox_image_layout)
    try:
        j.run("run", "-d", "--name", "q", "--storage-opt", "size=20m", "busybox", "sleep", "1000")
        out = j.out("exec", "q", "sh", "-c", DD.format(n=1))
        assert "Disk quota exceeded" in out and "rc=1" in out, out
        j.out("exec", "q", "rm", "/fill1")
        j.run("checkpoint", "q")
        j.run("restore", "q")
        out = j.out("exec", "q", "sh", "-c", DD.format(n=2))
        assert "Disk quota exceeded" in out, f"no quota after the restore: {out}"
        j.out("exec", "q", "rm", "/fill2")
        move(j, j2, "q", tmp_path / "q.tar")
        out = j2.out("exec", "q", "sh", "-c", DD.format(n=3))
        assert "Disk quota exceeded" in out, f"no quota after the move: {out}"
        limit, _ = quota.usage(Path(inspect(j2, "q")["UpperDir"]).parent)
        assert limit == 20 << 20
    finally:
        assert not cleanup_root(j2.root) and not cleanup_root(j.root)
