"""migrate.criu.host_cgroup_yard: /sys/fs/cgroup serves as CRIU's cgroup yard only when
every hierarchy a dump's cgroup.img names is mounted there under CRIU's name for it; else
CRIU makes its own yard (and would otherwise mount into /sys/fs/cgroup)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migrate import criu
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, needs_criu]

ROOT = Path("/sys/fs/cgroup")


def _img(d: Path, *cnames: list[str]) -> Path:
    from pycriu import images

    d.mkdir(exist_ok=True)
    with open(d / "cgroup.img", "wb") as f:
        images.dump(
            {"magic": "CGROUP", "entries": [{"controllers": [{"cnames": c} for c in cnames]}]}, f
        )
    return d


def _mounted(name: str) -> bool:
    return os.path.ismount(ROOT / name)


@pytest.mark.skipif(
    not (_mounted("pids") and _mounted("systemd")),
    reason="needs a v1 or hybrid host (pids, name=systemd under /sys/fs/cgroup)",
)
def test_v1_hierarchies_mounted_here_make_a_yard(tmp_path: Path) -> None:
    assert criu.host_cgroup_yard(_img(tmp_path, ["pids"], ["name=systemd"])) == str(ROOT)


def test_a_hierarchy_not_mounted_here_means_no_yard(tmp_path: Path) -> None:
    d = _img(tmp_path, ["pids"], ["no_such_controller"])
    assert criu.host_cgroup_yard(d) is None


def test_v2_needs_a_unified_mount(tmp_path: Path) -> None:
    d = _img(tmp_path, [""])
    want = str(ROOT) if _mounted("unified") else None  # hybrid: yes; pure v2: no
    assert criu.host_cgroup_yard(d) == want


def test_no_or_bad_image_means_no_yard(tmp_path: Path) -> None:
    assert criu.host_cgroup_yard(tmp_path) is None
    (tmp_path / "cgroup.img").write_bytes(b"not an image")
    assert criu.host_cgroup_yard(tmp_path) is None
