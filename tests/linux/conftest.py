"""Fixtures for tests that run real containers: a state root per test, the ``jaula`` CLI,
and a finalizer that removes every container and checks nothing leaked (mounts under the
state root, cgroups, monitors)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.cgroups import detect_mode

JAULA = [sys.executable, "-m", "migrate.cli"]
CGROUP_PARENT = "jaula"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(p)]


def cgroup_dirs(container_id: str) -> list[Path]:
    """Directories of this container under any mounted hierarchy."""
    return [d for d in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}/{container_id}")
            ] + list(Path("/sys/fs/cgroup").glob(f"{CGROUP_PARENT}/{container_id}"))


@dataclass
class Jaula:
    """Runs the real CLI against one state root."""

    root: Path

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*JAULA, "--state-root", str(self.root), *args], text=True, check=False,
                           capture_output=True, timeout=timeout, input=input,
                           cwd=Path(__file__).resolve().parents[2])
        if check and p.returncode != 0:
            raise AssertionError(f"jaula {' '.join(args)} exited {p.returncode}:\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def out(self, *args: str, timeout: float = 60) -> str:
        return self.run(*args, timeout=timeout).stdout

    def container_ids(self) -> list[str]:
        d = self.root / "containers"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def cleanup_root(root: Path) -> list[str]:
    """Remove every container under ``root`` (rm -f) and report what leaked."""
    problems: list[str] = []
    j = Jaula(root)
    ids = j.container_ids()
    for cid in ids:
        p = j.run("rm", "-f", cid, check=False)
        if p.returncode != 0:
            problems.append(f"rm -f {cid[:12]} failed: {p.stderr.strip()}")
    for m in mounts_under(root):
        problems.append(f"leaked mount {m}")
        subprocess.run(["umount", "-l", m], check=False)
    for cid in ids:
        for d in cgroup_dirs(cid):
            problems.append(f"leaked cgroup {d}")
            try:
                d.rmdir()
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)
    return problems


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


def _system_snapshot() -> dict[str, set[str]]:
    """What a test run could leak: overlay mounts, jaula cgroups, monitors, criu processes."""
    with open("/proc/self/mountinfo") as f:
        mounts = {" ".join(line.split()[4:5] + line.split()[-3:-2]) for line in f
                  if " - overlay " in line or "jaula" in line or "pytest-of" in line}
    cgroups = {str(p) for p in Path("/sys/fs/cgroup").glob("*/jaula*")}
    cgroups |= {str(p) for p in Path("/sys/fs/cgroup").glob("jaula*")}
    cgroups |= {str(p) for p in Path("/sys/fs/cgroup").glob("*/jaula*/*")}
    procs = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                comm = (d / "comm").read_text().strip()
                zombie = (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if comm in ("jaula-monitor", "criu") and not zombie:  # zombies hold nothing
                procs.add(f"{d.name} {comm}")
    return {"mounts": mounts, "cgroups": cgroups, "processes": procs}


@pytest.fixture(scope="session", autouse=True)
def nothing_leaks_from_the_suite() -> Iterator[None]:
    """After all root tests: mounts, cgroups and our processes are as before the suite."""
    if os.geteuid() != 0:
        yield
        return
    before = _system_snapshot()
    yield
    after = _system_snapshot()
    leaked = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
    assert not leaked, f"the test suite leaked: {leaked}"
