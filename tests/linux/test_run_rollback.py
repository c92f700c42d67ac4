"""A failure in the middle of ``run`` leaves nothing behind.

The faults are injected in-process (a step made to raise), because a cgroup that refuses to
be created or a monitor that dies at the wrong instant cannot be caused for real on demand.
The failures that can be caused for real (a bad working dir, a missing volume, a missing
command) are in test_containers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import runtime.container as rc
from runtime.cgroups import create_manager
from runtime.container import RunOptions, Runtime
from runtime.errors import CgroupError, ContainerError
from tests.helpers.jaula import Jaula
from tests.helpers.leaks import cgroup_dirs, mounts_under

pytestmark = pytest.mark.root


def _nothing_left(rt: Runtime, before: set[str]) -> None:
    assert rt.store.ids() == []
    assert not list((rt.root / "containers").iterdir())
    assert mounts_under(rt.root / "containers") == []
    after = {str(p) for p in Path("/sys/fs/cgroup").glob("*/jaula/*")}
    assert after - before == set()


@pytest.mark.parametrize("step", ["cgroup", "monitor", "save"])
def test_failure_mid_run_rolls_back(
    jaula: Jaula, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    rt = Runtime(jaula.root)
    before = {str(p) for p in Path("/sys/fs/cgroup").glob("*/jaula/*")}
    started: list[int] = []
    if step == "cgroup":

        def boom(self, resources):
            raise CgroupError("injected: cgroup creation failed", path="/x")

        for cls in {type(create_manager("0" * 64))}:
            monkeypatch.setattr(cls, "create", boom)
        exc: type[Exception] = CgroupError
    elif step == "monitor":

        def boom_monitor(cdir: Path) -> tuple[int, int]:
            raise ContainerError("injected: the monitor could not be launched")

        monkeypatch.setattr(rc, "_launch_monitor", boom_monitor)
        exc = ContainerError
    else:
        real = rc._await_monitor

        def start_then_fail(cdir: Path, sync_r: int) -> tuple[int, int]:
            pid, _start = real(cdir, sync_r)
            started.append(pid)
            raise OSError(28, "injected: No space left on device")

        monkeypatch.setattr(rc, "_await_monitor", start_then_fail)
        exc = OSError
    with pytest.raises(exc, match="injected"):
        rt.run(RunOptions(image="busybox", command=("sleep", "100"), name="fail"))
    for pid in started:  # the init that had started must be gone
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"
    _nothing_left(rt, before)
    for cid in rt.store.ids():
        assert cgroup_dirs(cid) == []
