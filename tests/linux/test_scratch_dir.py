"""The scratch directory of a migration lives in /dev/shm, which everyone can write: one
made there by someone else must be refused, never used (root would restore images, and
trust certificates, that another user can swap)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate.errors import PreflightError
from migrate.scratch import SCRATCH_TMPFS, root_tag, scratch_dir
from runtime.container import Runtime

pytestmark = [pytest.mark.root]

NOBODY = 65534


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    r = Runtime(tmp_path / "state")
    d = SCRATCH_TMPFS / f"jaula-{root_tag(r)}"
    assert not d.exists()
    try:
        yield r
    finally:
        if d.is_symlink() or d.is_file():
            d.unlink()
        else:
            shutil.rmtree(d, ignore_errors=True)


def test_our_own_scratch_dir_is_private(rt: Runtime) -> None:
    d = scratch_dir(rt, 1 << 20)
    st = os.lstat(d)
    assert d.parent == SCRATCH_TMPFS and st.st_uid == os.geteuid()
    assert st.st_mode & 0o777 == 0o700
    assert scratch_dir(rt, 1 << 20) == d  # used again as it is


@pytest.mark.parametrize("plant", ["other owner", "open mode", "symlink"])
def test_a_scratch_dir_planted_by_someone_else_is_refused(
    rt: Runtime, tmp_path: Path, plant: str
) -> None:
    d = SCRATCH_TMPFS / f"jaula-{root_tag(rt)}"
    if plant == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        d.symlink_to(target)
    else:
        d.mkdir(mode=0o700)
        if plant == "other owner":
            os.chown(d, NOBODY, NOBODY)
        else:
            os.chmod(d, 0o777)
    with pytest.raises(PreflightError, match="not a private directory"):
        scratch_dir(rt, 1 << 20)
