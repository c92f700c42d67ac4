"""Fixtures for tests that run real containers: a state root per test, the ``jaula`` CLI,
and a finalizer that removes every container and checks nothing leaked (mounts under the
state root, cgroups, monitors).  Fixtures only: what the tests import is in tests/helpers
(:mod:`tests.helpers.jaula`, :mod:`tests.helpers.leaks`, :mod:`tests.helpers.skips`)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.cgroups import detect_mode
from runtime.rootfs.overlay import overlay_supported
from tests.helpers.jaula import Jaula
from tests.helpers.leaks import cleanup_root, mounts_under, session_leaks


@pytest.fixture
def jaula(tmp_path_factory: pytest.TempPathFactory, busybox_image_layout: Path) -> Iterator[Jaula]:
    """The CLI on a fresh state root with the busybox image imported as ``busybox``.
    Finalizer: every container removed; fails the test if anything leaked."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if detect_mode() is None:  # pragma: no cover - detect_mode raises when no cgroups
        pytest.skip("no cgroups")
    root = tmp_path_factory.mktemp("state")
    j = Jaula(root)
    j.run("image", "import", str(busybox_image_layout), "--name", "busybox:latest")
    yield j
    problems = cleanup_root(root)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session", autouse=True)
def nothing_leaks_from_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After all root tests: no mount, cgroup or process of this session is left."""
    yield
    if os.geteuid() == 0:
        leaked = session_leaks(tmp_path_factory.getbasetemp())
        assert not leaked, f"the test suite leaked: {leaked}"


@pytest.fixture
def jaula2(
    tmp_path_factory: pytest.TempPathFactory, busybox_image_layout: Path, jaula: Jaula
) -> Iterator[Jaula]:
    """A second state root on the same host (another node), busybox imported; cleaned and
    leak-checked like ``jaula``."""
    root = tmp_path_factory.mktemp("state2")
    j = Jaula(root)
    j.run("image", "import", str(busybox_image_layout), "--name", "busybox:latest")
    yield j
    problems = cleanup_root(root)
    assert not problems, "\n".join(problems)


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Callable[[list[Path]], Path]]:
    """``mount(layer_dirs_bottom_to_top) -> merged dir`` under tmp_path; the finalizer
    unmounts every mount and fails the test if one had to be forced or is left."""
    if not overlay_supported():
        pytest.skip("overlayfs is not available")
    mounted: list[Path] = []

    def mount(lowers: list[Path]) -> Path:
        base = tmp_path / f"overlay{len(mounted)}"
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        lowerdir = ":".join(str(d) for d in reversed(lowers))  # overlayfs wants top first
        opts = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
            check=True,
            capture_output=True,
            text=True,
        )
        mounted.append(merged)
        return merged

    try:
        yield mount
    finally:
        problems = []
        for m in reversed(mounted):
            if subprocess.run(["umount", str(m)], check=False, capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)
                problems.append(f"{m} needed a lazy unmount")
        left = mounts_under(tmp_path)
        for point in left:
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        assert not problems and not left, problems + left
