"""Fixtures for tests that run real containers: a state root per test, the ``jaula`` CLI,
and a finalizer that removes every container and checks nothing leaked (mounts under the
state root, cgroups, monitors)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.cgroups import detect_mode
from runtime.rootfs.overlay import overlay_supported

JAULA = [sys.executable, "-m", "migrate.cli"]
CGROUP_PARENT = "jaula"
#: ids of every container the fixtures found and removed (for the session's leak check)
CREATED_IDS: set[str] = set()

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(p)]


def cgroup_dirs(container_id: str, root: Path | None = None) -> list[Path]:
    """Directories of this container under any mounted hierarchy: in the cgroup parent of
    state root ``root`` only, or under any jaula parent (two roots may hold one id)."""
    from runtime.container import default_cgroup_parent

    parent = default_cgroup_parent(root) if root is not None else f"{CGROUP_PARENT}*"
    return [d for d in Path("/sys/fs/cgroup").glob(f"*/{parent}/{container_id}")] + list(
        Path("/sys/fs/cgroup").glob(f"{parent}/{container_id}")
    )


@dataclass
class Jaula:
    """Runs the real CLI against one state root."""

    root: Path

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [*JAULA, "--state-root", str(self.root), *args],
            text=True,
            check=False,
            capture_output=True,
            timeout=timeout,
            input=input,
            cwd=Path(__file__).resolve().parents[2],
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"jaula {' '.join(args)} exited {p.returncode}:\n"
                f"stdout: {p.stdout}\nstderr: {p.stderr}"
            )
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
    CREATED_IDS.update(ids)
    for cid in ids:
        p = j.run("rm", "-f", cid, check=False)
        if p.returncode != 0:
            problems.append(f"rm -f {cid[:12]} failed: {p.stderr.strip()}")
    for m in mounts_under(root):
        problems.append(f"leaked mount {m}")
        subprocess.run(["umount", "-l", m], check=False)
    for cid in ids:
        for d in cgroup_dirs(cid, root):
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


def _leaks(basetemp: Path) -> dict[str, list[str]]:
    """What this test session left behind: mounts below its temp dir, cgroups of the
    containers its fixtures removed, monitors or CRIU processes working below its temp dir.
    (Only this session's own: other runs on the machine are none of its business.)"""
    base = os.path.realpath(basetemp)
    mounts = sorted(m for m in mounts_under(Path(base)))
    cgroups = sorted(str(d) for cid in CREATED_IDS for d in cgroup_dirs(cid))
    procs = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if comm in ("jaula-monitor", "criu") and state != "Z" and base in cmdline:
            procs.append(f"{d.name} {comm}")
    found = {"mounts": mounts, "cgroups": cgroups, "processes": procs}
    return {k: v for k, v in found.items() if v}


@pytest.fixture(scope="session", autouse=True)
def nothing_leaks_from_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After all root tests: no mount, cgroup or process of this session is left."""
    yield
    if os.geteuid() == 0:
        leaked = _leaks(tmp_path_factory.getbasetemp())
        assert not leaked, f"the test suite leaked: {leaked}"


def criu_works() -> str | None:
    """None when CRIU and pycriu are usable here, else the reason to skip."""
    try:
        from migrate import criu

        criu.require()
    except Exception as e:  # noqa: BLE001 - any failure is a reason to skip
        return f"CRIU unavailable: {e}"
    return None


needs_criu = pytest.mark.skipif(criu_works() is not None, reason=str(criu_works()))


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
