"""Cgroups behind one interface, with a v1 (legacy/hybrid) and a v2 (unified) driver.

The runtime asks :func:`create_manager` for a :class:`CgroupManager` for one container; the
factory detects how the host mounts cgroups (:func:`detect_mode`) and picks the driver.

Layout chosen by jaula (both drivers): every container gets ``<parent>/<container id>`` where
``parent`` defaults to ``jaula``:
- v1: ``/sys/fs/cgroup/<controller>/jaula/<id>`` for each controller in
  :data:`V1_CONTROLLERS` that the host mounts;
- v2: ``/sys/fs/cgroup/jaula/<id>``, with the needed controllers enabled in the parent's
  ``cgroup.subtree_control``.

Sources: Documentation/admin-guide/cgroup-v1/{memory,freezer-subsystem,pids}.rst and
Documentation/admin-guide/cgroup-v2.rst in the kernel tree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class CgroupMode(enum.Enum):
    """How the host mounts cgroups."""

    LEGACY = "legacy"  #: v1 controllers only
    HYBRID = "hybrid"  #: v1 controllers plus an (often empty) cgroup2 at <root>/unified
    UNIFIED = "unified"  #: pure cgroup v2 at <root>


class FreezerState(enum.Enum):
    """State of a cgroup's freezer (v1 ``freezer.state`` names)."""

    THAWED = "THAWED"
    FREEZING = "FREEZING"
    FROZEN = "FROZEN"


#: IoLimit kinds -> (v1 blkio throttle file, v2 io.max key, the Podman flag).
IO_KINDS: dict[str, tuple[str, str, str]] = {
    "read_bps": ("blkio.throttle.read_bps_device", "rbps", "--device-read-bps"),
    "write_bps": ("blkio.throttle.write_bps_device", "wbps", "--device-write-bps"),
    "read_iops": ("blkio.throttle.read_iops_device", "riops", "--device-read-iops"),
    "write_iops": ("blkio.throttle.write_iops_device", "wiops", "--device-write-iops"),
}


@dataclass(frozen=True)
class IoLimit:
    """One block-I/O throttle: at most ``value`` bytes (``*_bps``) or operations (``*_iops``)
    per second of ``kind`` on the block device at ``device`` (a path, resolved to its
    major:minor on the node where the cgroup is made, so a migrated container is throttled
    on the destination's device of that path).

    Sources: Documentation/admin-guide/cgroup-v1/blkio-controller.rst ("Throttling/Upper
    limit policy"), cgroup-v2.rst ("IO Interface Files", ``io.max``)."""

    device: str
    kind: str
    value: int

    def device_numbers(self) -> tuple[int, int]:
        """(major, minor) of :attr:`device`.  Raises CgroupError when it is missing or not a
        block device."""
        import os
        import stat

        from runtime.errors import CgroupError

        flag = IO_KINDS[self.kind][2] if self.kind in IO_KINDS else self.kind
        try:
            st = os.stat(self.device)
        except OSError as e:
            raise CgroupError(
                f"{flag} {self.device}: {e.strerror} on this node: give a block device that "
                "exists here",
                path=self.device,
                errno=e.errno,
            ) from None
        if not stat.S_ISBLK(st.st_mode):
            raise CgroupError(f"{flag} {self.device}: not a block device", path=self.device)
        return os.major(st.st_rdev), os.minor(st.st_rdev)


@dataclass(frozen=True)
class Resources:
    """Limits applied to a container's cgroup.  ``None`` means unlimited.

    Attributes:
        memory_bytes: hard memory limit in bytes (v1 ``memory.limit_in_bytes``, v2
            ``memory.max``); swap is limited to the same value where the host allows it.
        cpu_quota_us / cpu_period_us: CFS bandwidth; ``--cpus 1.5`` is quota 150000 per
            period 100000 (v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, v2 ``cpu.max``).
        pids_max: maximum number of tasks (``pids.max``).
        io_limits: block-I/O throttles (v1 ``blkio.throttle.*_device``, v2 ``io.max``);
            see :class:`IoLimit`.
        blkio_weight: ``--blkio-weight`` 10..1000, the proportional share of disk time
            (v1 ``blkio.weight`` or BFQ's ``blkio.bfq.weight``; v2 ``io.bfq.weight``, else
            ``io.weight``); it acts only on devices whose scheduler is BFQ (or with io.cost).
    """

    memory_bytes: int | None = None
    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000
    pids_max: int | None = None
    io_limits: tuple[IoLimit, ...] = ()
    blkio_weight: int | None = None

    def __post_init__(self) -> None:
        # from JSON (config.json, a bundle's manifest): a list of dicts
        limits = tuple(
            lim if isinstance(lim, IoLimit) else IoLimit(**lim) for lim in self.io_limits
        )
        object.__setattr__(self, "io_limits", limits)

    def validate(self) -> None:
        """Check the values against the kernel's bounds before anything is written.

        CFS bandwidth (Documentation/scheduler/sched-bwc.rst, "Management"): period 1 ms..1 s,
        quota at least 1 ms.  Memory and pids limits must be positive.

        Raises:
            runtime.errors.CgroupError: naming the field, the value and the allowed range.
        """
        from runtime.errors import CgroupError

        problems = []
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            problems.append(f"memory_bytes={self.memory_bytes} must be > 0")
        if self.pids_max is not None and self.pids_max <= 0:
            problems.append(f"pids_max={self.pids_max} must be > 0")
        if not 1_000 <= self.cpu_period_us <= 1_000_000:
            problems.append(f"cpu_period_us={self.cpu_period_us} must be in 1000..1000000")
        if self.cpu_quota_us is not None and self.cpu_quota_us < 1_000:
            problems.append(f"cpu_quota_us={self.cpu_quota_us} must be >= 1000")
        if self.blkio_weight is not None and not 10 <= self.blkio_weight <= 1000:
            problems.append(f"--blkio-weight {self.blkio_weight} must be in 10..1000")
        for lim in self.io_limits:
            if lim.kind not in IO_KINDS:
                problems.append(f"io limit kind {lim.kind!r} must be one of {', '.join(IO_KINDS)}")
            elif lim.value <= 0:
                problems.append(f"{IO_KINDS[lim.kind][2]} {lim.device}:{lim.value} must be > 0")
        if problems:
            raise CgroupError("invalid cgroup resources: " + "; ".join(problems))


@dataclass(frozen=True)
class CgroupStats:
    """A snapshot of a container's usage.

    Attributes:
        cpu_usage_ns: CPU time consumed by all tasks, in nanoseconds.
        memory_bytes: memory currently charged, in bytes.
        pids: number of tasks.
    """

    cpu_usage_ns: int
    memory_bytes: int
    pids: int


class CgroupManager(Protocol):
    """One container's cgroup(s).  Every method raises :class:`runtime.errors.CgroupError`
    naming the file and errno on failure."""

    mode: CgroupMode

    def create(self, resources: Resources) -> None:
        """Create the cgroup directories and write the limits.  Idempotent."""

    def add_process(self, pid: int) -> None:
        """Move ``pid`` (host pid) into the cgroup (``cgroup.procs``)."""

    def pids(self) -> list[int]:
        """Host pids of every task in the cgroup."""

    def freeze(self, timeout_s: float = 5.0) -> None:
        """Freeze every task and wait until the kernel reports FROZEN."""

    def thaw(self) -> None:
        """Thaw every task."""

    def freezer_state(self) -> FreezerState:
        """Current freezer state."""

    def kill_all(self, sig: int = 9) -> None:
        """Send ``sig`` to every task in the cgroup (v2 ``cgroup.kill`` for SIGKILL)."""

    def stats(self) -> CgroupStats:
        """Usage counters."""

    def destroy(self, timeout_s: float = 5.0) -> None:
        """Kill what is left, then remove the directories (and the parent when empty).
        Idempotent: a missing cgroup is not an error."""

    def paths(self) -> dict[str, Path]:
        """Directory per controller (v1: controller name -> dir; v2: ``{"": dir}``).
        CRIU needs these for ``freeze_cgroup`` and ``cg_root``."""

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a task of this cgroup since it was created."""


def detect_mode(
    root: Path = Path("/sys/fs/cgroup"), *, mountinfo: Path = Path("/proc/self/mountinfo")
) -> CgroupMode:
    """Tell how cgroups are mounted under ``root``: the filesystem type (the statfs magic
    as mountinfo names it) of ``root`` and ``root/unified``, and the v1 mounts below ``root``.
    Raises CgroupError when no cgroup hierarchy is mounted there.  A unit test passes a fake
    ``mountinfo`` file describing a tmp_path root."""
    from runtime.cgroups.detect import detect_mode as _detect

    return _detect(root, mountinfo=mountinfo)


def create_manager(
    container_id: str,
    *,
    root: Path = Path("/sys/fs/cgroup"),
    parent: str = "jaula",
    mode: CgroupMode | None = None,
) -> CgroupManager:
    """Return the driver fitting the host for one container.

    Args:
        container_id: the container's full id; the leaf directory name.
        root: where cgroupfs is mounted (a tmp dir in unit tests).
        parent: the directory under which jaula keeps its containers.
        mode: force a mode instead of detecting it.
    """
    from runtime.cgroups.v1 import V1Manager
    from runtime.cgroups.v2 import V2Manager

    mode = mode or detect_mode(root)
    if mode is CgroupMode.UNIFIED:
        return V2Manager(root, f"{parent}/{container_id}")
    return V1Manager(root, f"{parent}/{container_id}", mode=mode)


#: v1 controllers jaula puts a container in (those the host mounts; others are skipped).
#: Single names: "cpu" and "cpuacct" may be separate hierarchies or co-mounted as
#: "cpu,cpuacct"; the v1 driver finds either (see :func:`runtime.cgroups.v1.find_v1_mounts`).
V1_CONTROLLERS: tuple[str, ...] = ("cpu", "cpuacct", "freezer", "memory", "pids")
#: v1 controllers a container is put in only when its limits need them (blkio: I/O limits),
#: or when its directory there already exists (made by an earlier ``create``), so that every
#: later manager of the same container (monitor, restorer, teardown) sees the same set.
V1_OPTIONAL_CONTROLLERS: tuple[str, ...] = ("blkio",)

__all__ = [
    "IO_KINDS",
    "V1_CONTROLLERS",
    "V1_OPTIONAL_CONTROLLERS",
    "CgroupManager",
    "CgroupMode",
    "CgroupStats",
    "FreezerState",
    "IoLimit",
    "Resources",
    "create_manager",
    "detect_mode",
]
