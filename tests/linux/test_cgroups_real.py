"""The cgroup drivers on this host's real cgroupfs (needs root).

v1 (legacy or hybrid hosts): limits read back from the kernel's files, a real process moved in,
frozen (its CPU time stops advancing), thawed, killed; the pids limit refuses forks; the memory
limit OOM-kills.  v2: on the cgroup2 mount (``/sys/fs/cgroup/unified`` on a hybrid host, which
usually offers no controllers, or ``/sys/fs/cgroup`` on a unified one): create, add a process,
freeze/thaw through ``cgroup.freeze``/``cgroup.events``, ``cgroup.kill``, destroy.

Every cgroup lives below ``jaula-test-<random>`` (one name per test session); the ``cgroups``
fixture destroys every cgroup a test made and kills every process it started, even when the
test fails, and the session ends by checking that nothing named after this session is left.
To have a process in the cgroup before it does its work, it is started blocked on a
``read`` from its stdin, moved in, then released with a newline.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.cgroups import (
    CgroupManager,
    CgroupMode,
    FreezerState,
    Resources,
    create_manager,
    detect_mode,
    fs,
)
from runtime.cgroups.v1 import V1Manager
from runtime.cgroups.v2 import V2Manager
from runtime.errors import CgroupError

ROOT = Path("/sys/fs/cgroup")
SESSION_PARENT = f"jaula-test-{secrets.token_hex(4)}"
MIB = 1 << 20

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups"),
    pytest.mark.timeout(120),
]


def _mode() -> CgroupMode | None:
    try:
        return detect_mode(ROOT)
    except CgroupError:
        return None


MODE = _mode()
needs_v1 = pytest.mark.skipif(
    MODE not in (CgroupMode.LEGACY, CgroupMode.HYBRID),
    reason=f"no cgroup v1 hierarchies under {ROOT} (mode {MODE})",
)
V2_ROOT = (
    {CgroupMode.HYBRID: ROOT / "unified", CgroupMode.UNIFIED: ROOT}.get(MODE) if MODE else None
)
needs_v2 = pytest.mark.skipif(
    V2_ROOT is None or not (V2_ROOT / "cgroup.procs").exists(),
    reason=f"no cgroup2 hierarchy at {ROOT} or {ROOT}/unified (mode {MODE})",
)


def _leftovers() -> list[str]:
    out = subprocess.run(
        ["find", str(ROOT), "-name", f"*{SESSION_PARENT}*"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.split()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the session: no cgroup named after this session may remain anywhere."""
    yield
    if os.geteuid() != 0:
        return
    left = _leftovers()
    for path in sorted(left, key=len, reverse=True):  # best effort, deepest first: ours only
        try:
            os.rmdir(path)
        except OSError:
            pass
    assert not left, f"cgroups left behind: {left}"


class Cgroups:
    """Makes managers and processes for one test and undoes everything at teardown."""

    def __init__(self) -> None:
        self.managers: list[CgroupManager] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def v1(self, name: str) -> CgroupManager:
        assert MODE is not None
        mgr = create_manager(name, root=ROOT, parent=SESSION_PARENT, mode=MODE)
        assert isinstance(mgr, V1Manager)
        self.managers.append(mgr)
        return mgr

    def v2(self, name: str) -> V2Manager:
        assert V2_ROOT is not None
        mgr = V2Manager(V2_ROOT, f"{SESSION_PARENT}/{name}")
        self.managers.append(mgr)
        return mgr

    def blocked(self, *argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` after a line arrives on its stdin (``sh -c 'read x; exec ...'``)."""
        script = 'read x; exec "$@"'
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["sh", "-c", script, "sh", *argv], stdin=subprocess.PIPE, **kwargs
        )
        self.procs.append(proc)
        return proc

    def run_in(self, mgr: CgroupManager, *argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``mgr``'s cgroup before it runs a single instruction of it."""
        proc = self.blocked(*argv, **kwargs)
        mgr.add_process(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        return proc

    def teardown(self) -> None:
        errors: list[BaseException] = []
        for mgr in reversed(self.managers):  # kills everything in the cgroups first
            try:
                mgr.destroy()
            except CgroupError as err:
                errors.append(err)
        for proc in self.procs:  # then our own children, in or out of a cgroup
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stdin:
                proc.stdin.close()
        if errors:
            raise errors[0]


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    made = Cgroups()
    try:
        yield made
    finally:
        made.teardown()


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (proc(5), /proc/pid/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def proc_state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    raise AssertionError(f"no State in /proc/{pid}/status")


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    return fs.wait_for(condition, timeout_s)


# --- v1 ---


@needs_v1
def test_v1_limits_read_back_from_the_kernel(cgroups: Cgroups) -> None:
    mgr = cgroups.v1("limits")
    mgr.create(Resources(memory_bytes=64 * MIB, cpu_quota_us=50_000, pids_max=20))
    paths = mgr.paths()
    assert {"memory", "pids", "cpu", "cpuacct", "freezer"} <= set(paths)
    assert fs.read_int(paths["memory"] / "memory.limit_in_bytes") == 64 * MIB
    memsw = paths["memory"] / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        assert fs.read_int(memsw) == 64 * MIB
    assert fs.read_int(paths["cpu"] / "cpu.cfs_quota_us") == 50_000
    assert fs.read_int(paths["cpu"] / "cpu.cfs_period_us") == 100_000
    assert fs.read_text(paths["pids"] / "pids.max") == "20"
    mgr.create(Resources(pids_max=7))  # update in place
    assert fs.read_text(paths["pids"] / "pids.max") == "7"
    assert fs.read_int(paths["cpu"] / "cpu.cfs_quota_us") == -1
    assert fs.read_int(paths["memory"] / "memory.limit_in_bytes") > 1 << 60
    mgr.destroy()
    assert not any(p.exists() for p in paths.values())
    assert not any(p.parent.exists() for p in paths.values())  # the session parent too


@needs_v1
def test_v1_process_freeze_thaw_kill_destroy(cgroups: Cgroups) -> None:
    mgr = cgroups.v1("lifecycle")
    mgr.create(Resources(cpu_quota_us=50_000))
    proc = cgroups.run_in(mgr, "sh", "-c", "while :; do :; done")  # a busy loop
    assert mgr.pids() == [proc.pid]
    own = Path(f"/proc/{proc.pid}/cgroup").read_text()
    for controller in ("memory", "freezer", "pids"):
        assert f"{controller}:/{SESSION_PARENT}/lifecycle" in own
    start = cpu_ticks(proc.pid)
    assert wait_until(lambda: cpu_ticks(proc.pid) > start + 2), "the busy loop does not run"

    mgr.freeze()
    assert mgr.freezer_state() is FreezerState.FROZEN
    assert fs.read_text(mgr.paths()["freezer"] / "freezer.state") == "FROZEN"
    assert proc_state(proc.pid) == "D"  # the v1 freezer shows frozen tasks as D
    frozen_at = cpu_ticks(proc.pid)
    time.sleep(0.3)
    assert cpu_ticks(proc.pid) == frozen_at, "a frozen task got CPU time"

    mgr.thaw()
    assert mgr.freezer_state() is FreezerState.THAWED
    assert wait_until(lambda: cpu_ticks(proc.pid) > frozen_at + 2), "not running after thaw"

    stats = mgr.stats()
    assert stats.cpu_usage_ns > 0 and stats.pids == 1 and stats.memory_bytes >= 0
    assert not mgr.oom_killed()

    mgr.kill_all()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert mgr.freezer_state() is FreezerState.THAWED
    assert wait_until(lambda: mgr.pids() == [])
    paths = mgr.paths()
    mgr.destroy()
    assert not any(p.exists() for p in paths.values())
    mgr.destroy()  # idempotent


@needs_v1
def test_v1_kill_all_catches_forking_children(cgroups: Cgroups) -> None:
    mgr = cgroups.v1("forker")
    mgr.create(Resources())
    # a shell that keeps forking short-lived children: none may escape kill_all
    proc = cgroups.run_in(mgr, "sh", "-c", "while :; do sleep 0.01 & sleep 0.001; done")
    assert wait_until(lambda: len(mgr.pids()) > 1)
    mgr.kill_all()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert wait_until(lambda: mgr.pids() == []), f"tasks survived: {mgr.pids()}"


@needs_v1
def test_v1_pids_limit_refuses_forks(cgroups: Cgroups) -> None:
    mgr = cgroups.v1("pids")
    mgr.create(Resources(pids_max=5))
    forker = (
        "import os, sys, time\n"
        "ok = failed = 0\n"
        "for _ in range(20):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except BlockingIOError:\n"
        "        failed += 1\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    ok += 1\n"
        "print(ok, failed, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = cgroups.run_in(mgr, sys.executable, "-c", forker, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ok, failed = map(int, proc.stdout.readline().split())
    assert (ok, failed) == (4, 16)  # itself plus 4 children make 5 tasks
    assert mgr.stats().pids == 5
    assert fs.read_keyed(mgr.paths()["pids"] / "pids.events")["max"] >= 16
    assert len(mgr.pids()) == 5
    mgr.kill_all()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert wait_until(lambda: mgr.pids() == [])


@needs_v1
def test_v1_memory_limit_oom_kills(cgroups: Cgroups) -> None:
    mgr = cgroups.v1("oom")
    mgr.create(Resources(memory_bytes=64 * MIB))
    hog = "data = b'x' * (200 << 20)\nprint('survived', flush=True)\n"
    proc = cgroups.run_in(mgr, sys.executable, "-c", hog, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, out
    assert b"survived" not in out
    assert mgr.oom_killed()
    assert fs.read_keyed(mgr.paths()["memory"] / "memory.oom_control")["oom_kill"] == 1


@needs_v1
def test_v1_errors_name_the_file(cgroups: Cgroups) -> None:
    mgr = cgroups.v1("errors")
    mgr.create(Resources())
    with pytest.raises(CgroupError, match="no such process|Invalid argument") as info:
        mgr.add_process(2**22 + 7)  # above any pid_max
    assert info.value.path is not None and info.value.path.endswith("cgroup.procs")
    with pytest.raises(CgroupError, match="cpu_quota_us=10 must be >= 1000"):
        mgr.create(Resources(cpu_quota_us=10))


# --- v2 ---


@needs_v2
def test_v2_lifecycle(cgroups: Cgroups) -> None:
    assert V2_ROOT is not None
    mgr = cgroups.v2("lifecycle")
    mgr.create(Resources())
    leaf = V2_ROOT / SESSION_PARENT / "lifecycle"
    assert mgr.paths() == {"": leaf} and leaf.is_dir()
    proc = cgroups.run_in(mgr, "sh", "-c", "while :; do :; done")
    assert mgr.pids() == [proc.pid]
    assert f"0::/{SESSION_PARENT}/lifecycle" in Path(f"/proc/{proc.pid}/cgroup").read_text()
    assert fs.read_keyed(leaf / "cgroup.events")["populated"] == 1
    start = cpu_ticks(proc.pid)
    assert wait_until(lambda: cpu_ticks(proc.pid) > start + 2)

    mgr.freeze()
    assert fs.read_keyed(leaf / "cgroup.events")["frozen"] == 1
    assert mgr.freezer_state() is FreezerState.FROZEN
    frozen_at = cpu_ticks(proc.pid)
    time.sleep(0.3)
    assert cpu_ticks(proc.pid) == frozen_at, "a frozen task got CPU time"
    mgr.thaw()
    assert mgr.freezer_state() is FreezerState.THAWED
    assert wait_until(lambda: cpu_ticks(proc.pid) > frozen_at + 2)
    assert mgr.stats().cpu_usage_ns > 0

    mgr.kill_all()  # cgroup.kill
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert wait_until(lambda: fs.read_keyed(leaf / "cgroup.events")["populated"] == 0)
    mgr.destroy()
    assert not leaf.exists() and not leaf.parent.exists()


@needs_v2
def test_v2_unavailable_controller_refused_before_anything_is_made(cgroups: Cgroups) -> None:
    assert V2_ROOT is not None
    available = fs.read_words(V2_ROOT / "cgroup.controllers")
    missing = [c for c in ("memory", "pids", "cpu") if c not in available]
    if not missing:
        pytest.skip(f"{V2_ROOT} offers memory, pids and cpu")
    mgr = cgroups.v2("refused")
    limits = {
        "memory": Resources(memory_bytes=64 * MIB),
        "pids": Resources(pids_max=5),
        "cpu": Resources(cpu_quota_us=50_000),
    }
    with pytest.raises(CgroupError, match=f"controller '{missing[0]}' is not available"):
        mgr.create(limits[missing[0]])
    assert not (V2_ROOT / SESSION_PARENT).exists()


def test_detect_mode_on_this_host() -> None:
    if MODE is None:
        pytest.skip(f"no cgroups mounted at {ROOT}")
    unified = ROOT / "unified"
    if MODE is CgroupMode.HYBRID:
        assert (unified / "cgroup.controllers").exists()
    elif MODE is CgroupMode.UNIFIED:
        assert (ROOT / "cgroup.controllers").exists()
    else:
        assert not (unified / "cgroup.controllers").exists()
