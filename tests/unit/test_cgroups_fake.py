"""The cgroup drivers against a fake cgroupfs in tmp_path (no root needed): the fake is
:class:`tests.fakes.kernfs.FakeKernfs` (what it emulates is in its module docstring); every
write is logged, so the tests assert which files a driver writes, in what order, with what
value.  Pids are above the kernel's largest pid_max and ``os.kill`` is replaced, so no real
process can ever be signalled.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.cgroups import (
    CgroupMode,
    CgroupStats,
    FreezerState,
    IoLimit,
    Resources,
    create_manager,
    detect_mode,
    fs,
)
from runtime.cgroups.detect import parse_mountinfo
from runtime.cgroups.v1 import V1Manager, find_v1_mounts
from runtime.cgroups.v2 import V2Manager
from runtime.errors import CgroupError
from tests.fakes.kernfs import FAKE_PID, UNLIMITED_V1, FakeKernfs


@pytest.fixture
def kernfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernfs]:
    yield FakeKernfs(tmp_path / "cgroup", monkeypatch)


def mountinfo_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("".join(f"{i + 30} 23 0:{i + 28} / {line}\n" for i, line in enumerate(lines)))
    return path


def _esc(path: Path) -> str:
    return str(path).replace(" ", "\\040")


# --- mode detection ---


def test_detect_hybrid_like_this_machine(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    info = mountinfo_file(
        tmp_path,
        [
            f"{root} rw,relatime - tmpfs tmpfs rw,mode=755",
            f"{root}/cpu rw,relatime - cgroup cgroup rw,cpu",
            f"{root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct",
            f"{root}/memory rw,relatime - cgroup cgroup rw,memory",
            f"{root}/systemd rw,relatime - cgroup cgroup rw,name=systemd",
            f"{root}/unified rw,relatime - cgroup2 cgroup2 rw",
        ],
    )
    assert detect_mode(root, mountinfo=info) is CgroupMode.HYBRID


def test_detect_legacy_comounted(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    info = mountinfo_file(
        tmp_path,
        [
            f"{root} rw - tmpfs tmpfs rw",
            f"{root}/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct",
            f"{root}/pids rw - cgroup cgroup rw,pids",
        ],
    )
    assert detect_mode(root, mountinfo=info) is CgroupMode.LEGACY


def test_detect_unified_with_space_in_path(tmp_path: Path) -> None:
    root = tmp_path / "a cg"
    info = mountinfo_file(
        tmp_path,
        [
            f"{_esc(root)} rw,nosuid shared:4 - tmpfs tmpfs rw",
            f"{_esc(root)} rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate",  # mounted on top
        ],
    )
    assert detect_mode(root, mountinfo=info) is CgroupMode.UNIFIED


def test_detect_nothing_mounted_names_root(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    info = mountinfo_file(
        tmp_path,
        [
            f"{root} rw - tmpfs tmpfs rw",
            f"{root}/systemd rw - cgroup cgroup rw,name=systemd",  # a named hierarchy only
        ],
    )
    with pytest.raises(CgroupError, match=f"no cgroup hierarchy is mounted at {root}"):
        detect_mode(root, mountinfo=info)


def test_parse_mountinfo_skips_garbage_and_reads_optional_fields() -> None:
    entries = parse_mountinfo(
        "garbage\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw\n"
    )
    assert len(entries) == 1
    assert entries[0].mount_point == Path("/sys/fs/cgroup/unified")
    assert entries[0].fs_type == "cgroup2"


def test_find_v1_mounts_separate_and_comounted(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("cpu,cpuacct", "memory", "net_cls,net_prio", symlinks=True)
    (root / "empty-tmpfs-dir").mkdir()
    mounts = find_v1_mounts(root)
    assert mounts["cpu"] == mounts["cpuacct"] == root / "cpu,cpuacct"
    assert mounts["memory"] == root / "memory"
    assert "empty-tmpfs-dir" not in {p.name for p in mounts.values()}


def test_create_manager_forced_modes(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("memory")
    assert isinstance(create_manager("c1", root=root, mode=CgroupMode.HYBRID), V1Manager)
    assert isinstance(create_manager("c1", root=root, mode=CgroupMode.UNIFIED), V2Manager)


# --- v1 ---


def test_v1_create_writes_limits_separate_cpu_cpuacct(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("cpu", "cpuacct", "memory", "pids", "freezer", "blkio")
    mgr = V1Manager(root, "jaula/c1", CgroupMode.HYBRID)
    mgr.create(Resources(memory_bytes=64 << 20, cpu_quota_us=150_000, pids_max=5))
    assert kernfs.written("memory/") == [
        ("memory/jaula/c1/memory.limit_in_bytes", str(64 << 20)),
        ("memory/jaula/c1/memory.memsw.limit_in_bytes", str(64 << 20)),
    ]
    assert kernfs.written("cpu/") == [
        ("cpu/jaula/c1/cpu.cfs_period_us", "100000"),
        ("cpu/jaula/c1/cpu.cfs_quota_us", "150000"),
    ]
    assert kernfs.written("pids/") == [("pids/jaula/c1/pids.max", "5")]
    assert (root / "cpuacct/jaula/c1").is_dir() and (root / "freezer/jaula/c1").is_dir()
    # not in blkio: only a container with I/O limits goes there
    assert not (root / "blkio/jaula").exists()
    assert mgr.paths() == {
        c: root / c / "jaula/c1" for c in ("cpu", "cpuacct", "freezer", "memory", "pids")
    }


def test_v1_comounted_cpu_cpuacct_one_dir(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("cpu,cpuacct", "memory", symlinks=True)
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources(cpu_quota_us=50_000, cpu_period_us=200_000))
    assert mgr.paths()["cpu"] == mgr.paths()["cpuacct"] == root / "cpu,cpuacct/jaula/c1"
    assert fs.read_text(root / "cpu,cpuacct/jaula/c1/cpu.cfs_quota_us") == "50000"
    assert fs.read_text(root / "cpu,cpuacct/jaula/c1/cpu.cfs_period_us") == "200000"
    mgr.add_process(FAKE_PID)
    assert [p for p, _ in kernfs.written() if p.endswith("cgroup.procs")] == [
        "cpu,cpuacct/jaula/c1/cgroup.procs",
        "memory/jaula/c1/cgroup.procs",
    ]
    assert mgr.pids() == [FAKE_PID]


def test_v1_memory_update_keeps_memsw_above_limit(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("memory")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources(memory_bytes=64 << 20))
    mgr.create(Resources(memory_bytes=128 << 20))  # growing: memsw first
    mgr.create(Resources(memory_bytes=32 << 20))  # shrinking: limit first
    mgr.create(Resources())  # unlimited: memsw first
    leaf = "memory/jaula/c1/memory."
    assert kernfs.written()[2:] == [
        (leaf + "memsw.limit_in_bytes", str(128 << 20)),
        (leaf + "limit_in_bytes", str(128 << 20)),
        (leaf + "limit_in_bytes", str(32 << 20)),
        (leaf + "memsw.limit_in_bytes", str(32 << 20)),
        (leaf + "memsw.limit_in_bytes", "-1"),
        (leaf + "limit_in_bytes", "-1"),
    ]
    assert fs.read_text(root / "memory/jaula/c1/memory.limit_in_bytes") == UNLIMITED_V1


def test_v1_without_swap_accounting(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("memory")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    (root / "memory/jaula/c1/memory.memsw.limit_in_bytes").unlink()
    mgr.create(Resources(memory_bytes=1 << 30))
    assert kernfs.writes[-1] == ("memory/jaula/c1/memory.limit_in_bytes", str(1 << 30))


def test_v1_limit_for_unmounted_controller_is_named(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("memory", "freezer")
    mgr = V1Manager(root, "jaula/c1")
    with pytest.raises(CgroupError, match="controller 'pids' is not mounted") as info:
        mgr.create(Resources(pids_max=10))
    assert "pids limit 10" in str(info.value)
    assert not (root / "memory/jaula").exists()  # checked before anything was created


def test_v1_write_error_names_file_value_errno(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("memory")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    kernfs.fail["memory.limit_in_bytes"] = errno.EBUSY
    with pytest.raises(CgroupError) as info:
        mgr.create(Resources(memory_bytes=4096))
    err = info.value
    path = root / "memory/jaula/c1/memory.limit_in_bytes"
    assert err.errno == errno.EBUSY and err.path == str(path)
    assert f"cannot write '4096' to {path}: Device or resource busy" in str(err)
    assert isinstance(err.__cause__, OSError)


def test_not_writable_file_is_named(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("pids")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    kernfs.fail["pids.max"] = errno.EACCES
    with pytest.raises(
        CgroupError,
        match=r"pids\.max: Permission denied: permission denied "
        r"\(needs root or a delegated cgroup\)",
    ) as info:
        mgr.create(Resources(pids_max=3))
    assert info.value.errno == errno.EACCES


def test_missing_and_directory_files_fail_like_the_kernel(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="does not exist") as info:
        fs.write(tmp_path / "pids.max", 5)
    assert info.value.errno == errno.ENOENT and not (tmp_path / "pids.max").exists()
    (tmp_path / "cpu.max").mkdir()
    with pytest.raises(CgroupError, match="cpu.max") as info:
        fs.write(tmp_path / "cpu.max", "max 100000")
    assert info.value.errno == errno.EISDIR
    (tmp_path / "pids.current").write_text("lots\n")
    with pytest.raises(CgroupError, match="unexpected content 'lots'"):
        fs.read_int(tmp_path / "pids.current")


def test_resources_validate() -> None:
    with pytest.raises(CgroupError, match="cpu_period_us=500 must be in 1000..1000000"):
        Resources(cpu_quota_us=1000, cpu_period_us=500).validate()
    with pytest.raises(CgroupError, match="memory_bytes=0 must be > 0; pids_max=-1"):
        Resources(memory_bytes=0, pids_max=-1).validate()
    Resources(memory_bytes=1, cpu_quota_us=1000, cpu_period_us=1_000_000, pids_max=1).validate()


def test_v1_freeze_thaw_state(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("freezer")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    assert mgr.freezer_state() is FreezerState.THAWED
    mgr.freeze()
    assert mgr.freezer_state() is FreezerState.FROZEN
    mgr.thaw()
    assert mgr.freezer_state() is FreezerState.THAWED


def test_v1_freeze_timeout_thaws_back(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("freezer")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    kernfs.stuck_freezing = True
    with pytest.raises(CgroupError, match="did not freeze within 0.05 s") as info:
        mgr.freeze(timeout_s=0.05)
    assert info.value.errno == errno.ETIMEDOUT
    assert mgr.freezer_state() is FreezerState.THAWED


def test_v1_kill_all_freezes_signals_thaws(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("freezer", "memory")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    mgr.add_process(FAKE_PID)
    mgr.add_process(FAKE_PID + 1)
    mgr.kill_all(signal.SIGTERM)
    states = [v for p, v in kernfs.writes if p.endswith("freezer.state")]
    assert states == ["FROZEN", "THAWED"]
    assert kernfs.signals == [(FAKE_PID, signal.SIGTERM), (FAKE_PID + 1, signal.SIGTERM)]
    mgr.freeze()  # a paused container stays paused after a non-fatal signal
    mgr.kill_all(signal.SIGTERM)
    assert mgr.freezer_state() is FreezerState.FROZEN
    mgr.kill_all()  # SIGKILL always thaws, so the tasks can die
    assert mgr.freezer_state() is FreezerState.THAWED and mgr.pids() == []


def test_v1_stats_and_oom(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("cpu,cpuacct", "memory", "pids")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    (root / "cpu,cpuacct/jaula/c1/cpuacct.usage").write_text("123456789\n")
    (root / "memory/jaula/c1/memory.usage_in_bytes").write_text("4096\n")
    (root / "pids/jaula/c1/pids.current").write_text("3\n")
    assert mgr.stats() == CgroupStats(cpu_usage_ns=123456789, memory_bytes=4096, pids=3)
    assert not mgr.oom_killed()
    (root / "memory/jaula/c1/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"
    )
    assert mgr.oom_killed()


def test_v1_destroy_removes_leaf_and_empty_parent_only(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("cpu", "cpuacct", "memory", "pids", "freezer")
    one, two = V1Manager(root, "jaula/c1"), V1Manager(root, "jaula/c2")
    one.create(Resources(pids_max=10))
    two.create(Resources())
    one.add_process(FAKE_PID)
    one.destroy()
    assert (FAKE_PID, signal.SIGKILL) in kernfs.signals
    assert all(not p.exists() for p in one.paths().values())
    assert all(p.parent.is_dir() for p in two.paths().values())  # c2 still lives in jaula/
    two.destroy()
    assert all(not p.parent.exists() for p in two.paths().values())
    two.destroy()  # idempotent


def test_v1_destroy_reports_tasks_that_do_not_die(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("memory", "freezer")
    mgr = V1Manager(root, "jaula/c1")
    mgr.create(Resources())
    mgr.add_process(FAKE_PID)
    kernfs.unkillable.add(FAKE_PID)
    with pytest.raises(CgroupError, match=rf"busy.*tasks still there: \[{FAKE_PID}\]") as info:
        mgr.destroy(timeout_s=0.05)
    assert info.value.errno == errno.EBUSY
    kernfs.unkillable.clear()
    mgr.destroy()
    assert not (root / "memory/jaula").exists()


# --- v2 ---


def test_v2_create_enables_controllers_top_down_and_writes_limits(kernfs: FakeKernfs) -> None:
    root = kernfs.v2("cpuset cpu io memory hugetlb pids rdma")
    mgr = V2Manager(root, "jaula/c1")
    mgr.create(Resources(memory_bytes=64 << 20, cpu_quota_us=150_000, pids_max=5))
    assert kernfs.writes == [
        ("cgroup.subtree_control", "+cpu"),
        ("cgroup.subtree_control", "+io"),
        ("cgroup.subtree_control", "+memory"),
        ("cgroup.subtree_control", "+pids"),
        ("jaula/cgroup.subtree_control", "+cpu"),
        ("jaula/cgroup.subtree_control", "+io"),
        ("jaula/cgroup.subtree_control", "+memory"),
        ("jaula/cgroup.subtree_control", "+pids"),
        ("jaula/c1/memory.max", str(64 << 20)),
        ("jaula/c1/memory.swap.max", "0"),
        ("jaula/c1/cpu.max", "150000 100000"),
        ("jaula/c1/pids.max", "5"),
    ]
    assert mgr.paths() == {"": root / "jaula/c1"}
    kernfs.writes.clear()
    mgr.create(Resources())  # idempotent: nothing re-enabled, limits reset
    assert kernfs.writes == [
        ("jaula/c1/memory.max", "max"),
        ("jaula/c1/memory.swap.max", "max"),
        ("jaula/c1/cpu.max", "max 100000"),
        ("jaula/c1/pids.max", "max"),
    ]


def test_v2_unavailable_controller_is_named_and_nothing_created(kernfs: FakeKernfs) -> None:
    root = kernfs.v2("cpu pids")  # like a hybrid host's unified mount: memory bound to v1
    mgr = V2Manager(root, "jaula/c1")
    with pytest.raises(CgroupError, match="controller 'memory' is not available in") as info:
        mgr.create(Resources(memory_bytes=1 << 20, pids_max=4))
    assert "cannot apply the memory limit of 1048576 bytes" in str(info.value)
    assert "has: cpu pids" in str(info.value)
    assert not (root / "jaula").exists()


def test_v2_no_controllers_like_this_machines_unified(kernfs: FakeKernfs) -> None:
    root = kernfs.v2("", at="unified")
    mgr = V2Manager(root, "jaula/c1")
    mgr.create(Resources())
    assert kernfs.writes == []  # nothing to enable, no limit file exists
    mgr.add_process(FAKE_PID)
    assert mgr.pids() == [FAKE_PID]
    assert mgr.stats() == CgroupStats(cpu_usage_ns=0, memory_bytes=0, pids=0)
    assert not mgr.oom_killed()


def test_v2_freeze_thaw_kill_destroy(kernfs: FakeKernfs) -> None:
    root = kernfs.v2()
    mgr = V2Manager(root, "jaula/c1")
    mgr.create(Resources())
    mgr.add_process(FAKE_PID)
    mgr.freeze()
    assert mgr.freezer_state() is FreezerState.FROZEN
    mgr.thaw()
    assert mgr.freezer_state() is FreezerState.THAWED
    mgr.kill_all()
    assert ("jaula/c1/cgroup.kill", "1") in kernfs.writes and mgr.pids() == []
    mgr.destroy()
    assert not (root / "jaula").exists()
    mgr.destroy()


def test_v2_freeze_timeout(kernfs: FakeKernfs) -> None:
    root = kernfs.v2()
    mgr = V2Manager(root, "jaula/c1")
    mgr.create(Resources())
    kernfs.stuck_freezing = True
    with pytest.raises(CgroupError, match="did not freeze within"):
        mgr.freeze(timeout_s=0.02)
    assert fs.read_text(root / "jaula/c1/cgroup.freeze") == "0"


def test_v2_stats_and_oom(kernfs: FakeKernfs) -> None:
    root = kernfs.v2()
    mgr = V2Manager(root, "jaula/c1")
    mgr.create(Resources())
    leaf = root / "jaula/c1"
    (leaf / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (leaf / "memory.current").write_text("8192\n")
    (leaf / "pids.current").write_text("2\n")
    assert mgr.stats() == CgroupStats(cpu_usage_ns=1_500_000, memory_bytes=8192, pids=2)
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert mgr.oom_killed()


def test_v2_destroy_keeps_shared_parent(kernfs: FakeKernfs) -> None:
    root = kernfs.v2()
    one, two = V2Manager(root, "jaula/c1"), V2Manager(root, "jaula/c2")
    one.create(Resources())
    two.create(Resources())
    two.add_process(FAKE_PID)
    one.destroy()
    assert (root / "jaula/c2").is_dir()
    two.destroy()
    assert not (root / "jaula").exists()


def _fake_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every IoLimit's device is 7:3 (no real block device in a unit test)."""
    monkeypatch.setattr(IoLimit, "device_numbers", lambda self: (7, 3))


def test_v1_io_limits_go_to_the_blkio_throttle_files(
    kernfs: FakeKernfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_device(monkeypatch)
    root = kernfs.v1("cpu", "cpuacct", "memory", "pids", "freezer", "blkio")
    lims = (IoLimit("/dev/x", "write_bps", 1 << 20), IoLimit("/dev/x", "read_iops", 50))
    V1Manager(root, "jaula/c1", CgroupMode.HYBRID).create(Resources(io_limits=lims))
    # a later manager of the same container (monitor, teardown) finds its blkio dir
    assert "blkio" in V1Manager(root, "jaula/c1", CgroupMode.HYBRID).paths()
    assert "blkio" not in V1Manager(root, "jaula/c9", CgroupMode.HYBRID).paths()
    assert kernfs.written("blkio/") == [
        ("blkio/jaula/c1/blkio.throttle.write_bps_device", f"7:3 {1 << 20}"),
        ("blkio/jaula/c1/blkio.throttle.read_iops_device", "7:3 50"),
    ]
    # and the limits survive the config's JSON round trip (what a bundle carries)
    import dataclasses

    assert Resources(**dataclasses.asdict(Resources(io_limits=lims))).io_limits == lims


def test_v2_io_limits_go_to_io_max_one_line_per_device(
    kernfs: FakeKernfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_device(monkeypatch)
    root = kernfs.v2("cpu io memory pids")
    lims = (IoLimit("/dev/x", "write_bps", 1 << 20), IoLimit("/dev/x", "write_iops", 9))
    V2Manager(root, "jaula/c1").create(Resources(io_limits=lims))
    assert kernfs.written("jaula/c1/io") == [("jaula/c1/io.max", f"7:3 wbps={1 << 20} wiops=9")]


def test_io_limits_without_the_controller_are_refused(
    kernfs: FakeKernfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_device(monkeypatch)
    lims = (IoLimit("/dev/x", "write_bps", 1 << 20),)
    with pytest.raises(CgroupError, match="'io' is not available"):
        V2Manager(kernfs.v2("cpu memory pids"), "jaula/c1").create(Resources(io_limits=lims))
    with pytest.raises(CgroupError, match="'blkio' is not mounted"):
        V1Manager(kernfs.v1("cpu", "memory"), "jaula/c2").create(Resources(io_limits=lims))


def test_blkio_weight_goes_to_the_bfq_weight(kernfs: FakeKernfs) -> None:
    root = kernfs.v1("cpu", "cpuacct", "memory", "pids", "freezer", "blkio")
    V1Manager(root, "jaula/c1", CgroupMode.HYBRID).create(Resources(blkio_weight=300))
    assert kernfs.written("blkio/") == [("blkio/jaula/c1/blkio.bfq.weight", "300")]
    V2Manager(kernfs.v2("cpu io memory pids", at="v2"), "jaula/c2").create(
        Resources(blkio_weight=300)
    )
    assert ("v2/jaula/c2/io.bfq.weight", "300") in kernfs.writes
    with pytest.raises(CgroupError, match="must be in 10..1000"):
        Resources(blkio_weight=5).validate()
