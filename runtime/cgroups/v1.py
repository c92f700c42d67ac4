"""cgroup v1 driver (legacy and hybrid hosts): one directory per mounted controller.

Layout: for each controller of :data:`runtime.cgroups.V1_CONTROLLERS` mounted under ``root``,
the container lives in ``<root>/<mount dir>/<relpath>``.  The mount dir is found by name, the
way systemd lays out ``/sys/fs/cgroup``: a directory holding ``cgroup.procs`` whose name is the
comma-joined list of its controllers.  Both layouts work:

- separate mounts: ``cpu/`` and ``cpuacct/`` are two hierarchies, the container gets two dirs;
- co-mounted: ``cpu,cpuacct/`` (plus symlinks ``cpu`` and ``cpuacct`` to it, which are
  skipped), the container gets one dir shared by both controllers.

Controllers that are not mounted are skipped; asking for a limit that needs one raises
:class:`~runtime.errors.CgroupError`.  In hybrid mode jaula does not also place tasks in the
(controller-less) cgroup2 at ``<root>/unified``: nothing jaula does needs it.

Files (Documentation/admin-guide/cgroup-v1/):

- ``memory.limit_in_bytes``, ``memory.memsw.limit_in_bytes`` (memory.rst, "2.4 Swap
  Extension": memsw limits memory+swap and must stay >= the memory limit), ``-1`` = unlimited;
- ``memory.usage_in_bytes`` (memory.rst, "5.5 usage_in_bytes"), ``memory.oom_control`` with its
  ``oom_kill`` counter (memory.rst, "10. OOM Control");
- ``cpu.cfs_period_us``, ``cpu.cfs_quota_us`` (Documentation/scheduler/sched-bwc.rst,
  "Management"), ``cpuacct.usage`` in ns (cpuacct.rst);
- ``pids.max``, ``pids.current`` (pids.rst, "Usage");
- ``blkio.throttle.{read,write}_{bps,iops}_device``, ``MAJ:MIN VALUE`` per device
  (blkio-controller.rst, "Throttling/Upper limit policy");
- ``freezer.state`` THAWED/FREEZING/FROZEN (freezer-subsystem.rst);
- ``cgroup.procs`` (cgroups.rst, "2.2 Attaching processes": writing a pid moves its whole
  thread group).
"""

from __future__ import annotations

import errno as errno_mod
import signal
import time
from pathlib import Path

from runtime.cgroups import (
    IO_KINDS,
    V1_CONTROLLERS,
    V1_OPTIONAL_CONTROLLERS,
    CgroupMode,
    CgroupStats,
    FreezerState,
    Resources,
    fs,
)
from runtime.cgroups.common import raise_collected, rmdir_until, signal_all, signal_frozen
from runtime.cgroups.detect import KNOWN_V1_CONTROLLERS
from runtime.errors import CgroupError


def find_v1_mounts(root: Path) -> dict[str, Path]:
    """Controller name -> the directory its v1 hierarchy is mounted on, below ``root``.

    A directory counts when it holds ``cgroup.procs`` (so a plain empty dir on the tmpfs
    does not); symlinks (co-mount aliases such as ``cpu -> cpu,cpuacct``) are skipped because
    the real directory is found under its own name.
    """
    found: dict[str, Path] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError as err:
        raise CgroupError(
            f"cannot list cgroup root {root}: {err.strerror}", path=str(root), errno=err.errno
        ) from err
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir() or not (entry / "cgroup.procs").exists():
            continue
        for name in entry.name.split(","):
            if name in KNOWN_V1_CONTROLLERS:
                found[name] = entry
    return found


class V1Manager:
    """One container's cgroups on a v1 (legacy or hybrid) host.

    Args:
        root: where the v1 hierarchies are mounted (``/sys/fs/cgroup``).
        relpath: the container's path inside every hierarchy (``jaula/<id>``).
        mode: LEGACY or HYBRID; recorded in :attr:`mode`, it changes nothing else.
        controllers: the controllers to use; those not mounted are skipped.
    """

    def __init__(
        self,
        root: Path,
        relpath: str,
        mode: CgroupMode = CgroupMode.LEGACY,
        *,
        controllers: tuple[str, ...] = V1_CONTROLLERS,
    ) -> None:
        if mode is CgroupMode.UNIFIED:
            raise CgroupError(
                f"the v1 driver cannot manage a unified host ({root})", path=str(root)
            )
        if not relpath or Path(relpath).is_absolute() or ".." in Path(relpath).parts:
            raise CgroupError(f"bad cgroup path {relpath!r}: must be relative, without '..'")
        self.mode: CgroupMode = mode
        self.root = root
        self.relpath = relpath
        mounts = find_v1_mounts(root)
        #: controller -> its hierarchy's mount dir, for the wanted controllers that are mounted
        self._mounts = {c: mounts[c] for c in controllers if c in mounts}
        #: optional controllers mounted here, added by create() when a limit needs them
        self._optional = {c: mounts[c] for c in V1_OPTIONAL_CONTROLLERS if c in mounts}
        for c, mount in self._optional.items():
            if c not in self._mounts and (mount / relpath).is_dir():
                self._mounts[c] = mount

    # --- paths ---

    def paths(self) -> dict[str, Path]:
        """Controller name -> this container's directory in that controller's hierarchy.

        Co-mounted controllers map to the same directory.
        """
        return {c: mount / self.relpath for c, mount in self._mounts.items()}

    def _dirs(self) -> list[Path]:
        """The distinct container directories, one per mounted hierarchy, in a stable order."""
        seen: dict[Path, None] = {}
        for path in self.paths().values():
            seen.setdefault(path, None)
        return list(seen)

    def _dir(self, controller: str, for_what: str) -> Path:
        try:
            return self.paths()[controller]
        except KeyError:
            raise CgroupError(
                f"cgroup v1 controller {controller!r} is not mounted under {self.root}: "
                f"cannot {for_what}; mount it or drop the setting",
                path=str(self.root),
            ) from None

    # --- lifecycle ---

    def create(self, resources: Resources) -> None:
        """Create the directories and write every limit (``None`` writes "unlimited").

        Idempotent: calling it again on an existing cgroup updates the limits.
        """
        resources.validate()
        if not self._mounts:
            raise CgroupError(
                f"none of the v1 controllers {', '.join(V1_CONTROLLERS)} is mounted under "
                f"{self.root}",
                path=str(self.root),
            )
        needs = {
            "memory": resources.memory_bytes,
            "cpu": resources.cpu_quota_us,
            "pids": resources.pids_max,
        }
        for controller, value in needs.items():
            if value is not None:
                self._dir(controller, f"apply the {controller} limit {value}")
        if resources.io_limits or resources.blkio_weight is not None:
            if "blkio" in self._optional:
                self._mounts.setdefault("blkio", self._optional["blkio"])
            self._dir("blkio", "apply the block-I/O limits")
        io_lines = [(lim, lim.device_numbers()) for lim in resources.io_limits]
        for mount in dict.fromkeys(self._mounts.values()):
            fs.make_dirs(mount, self.relpath)
        paths = self.paths()
        if "memory" in paths:
            self._set_memory(paths["memory"], resources.memory_bytes)
        if "cpu" in paths:
            self._set_cpu(paths["cpu"], resources)
        if "pids" in paths:
            fs.write(
                paths["pids"] / "pids.max",
                "max" if resources.pids_max is None else resources.pids_max,
            )
        if resources.blkio_weight is not None:
            names = ("blkio.weight", "blkio.bfq.weight")
            found = [paths["blkio"] / n for n in names if (paths["blkio"] / n).exists()]
            if not found:
                raise CgroupError(
                    f"--blkio-weight needs {' or '.join(names)} in {paths['blkio']} (CFQ or "
                    "BFQ group scheduling in the kernel): drop the weight",
                    path=str(paths["blkio"]),
                )
            fs.write(found[0], resources.blkio_weight)
        for lim, (major, minor) in io_lines:
            fs.write(paths["blkio"] / IO_KINDS[lim.kind][0], f"{major}:{minor} {lim.value}")

    @staticmethod
    def _set_memory(path: Path, limit_bytes: int | None) -> None:
        """memory.rst "2.4 Swap Extension": memsw.limit >= limit at all times, so raise memsw
        first when growing and lower it last when shrinking.  memsw == limit means no swap."""
        value = -1 if limit_bytes is None else limit_bytes
        limit_file = path / "memory.limit_in_bytes"
        memsw_file = path / "memory.memsw.limit_in_bytes"
        if not memsw_file.exists():  # swap accounting off (swapaccount=0) or no swap support
            fs.write(limit_file, value)
            return
        growing = value == -1 or value > fs.read_int(memsw_file)
        order = (memsw_file, limit_file) if growing else (limit_file, memsw_file)
        for file in order:
            fs.write(file, value)

    @staticmethod
    def _set_cpu(path: Path, resources: Resources) -> None:
        """sched-bwc.rst "Management": period then quota; quota -1 removes the limit."""
        if resources.cpu_quota_us is None:
            fs.write(path / "cpu.cfs_quota_us", -1)
            return
        fs.write(path / "cpu.cfs_period_us", resources.cpu_period_us)
        fs.write(path / "cpu.cfs_quota_us", resources.cpu_quota_us)

    def add_process(self, pid: int) -> None:
        """Write ``pid`` to ``cgroup.procs`` of every hierarchy (moves the whole thread group)."""
        if not self._mounts:
            raise CgroupError(f"no v1 controller mounted under {self.root}", path=str(self.root))
        for path in self._dirs():
            fs.write(path / "cgroup.procs", pid)

    def pids(self) -> list[int]:
        """Every process (thread group leader pid) in any of the container's hierarchies,
        sub-cgroups included; empty when the cgroup does not exist."""
        pids: set[int] = set()
        for path in self._dirs():
            if path.exists():
                pids.update(fs.procs_recursive(path))
        return sorted(pids)

    # --- freezer ---

    def freeze(self, timeout_s: float = 5.0) -> None:
        """Write FROZEN to ``freezer.state`` and poll it until it reads FROZEN.

        freezer-subsystem.rst: the state reads FREEZING until every task is frozen; reading the
        file is what advances it.  On timeout the cgroup is thawed again (nothing is left half
        frozen) and CgroupError is raised.
        """
        state = self._dir("freezer", "freeze") / "freezer.state"
        fs.write(state, FreezerState.FROZEN.value)
        if fs.wait_for(lambda: fs.read_text(state) == FreezerState.FROZEN.value, timeout_s):
            return
        stuck = fs.read_text(state)
        fs.write(state, FreezerState.THAWED.value)
        raise CgroupError(
            f"cgroup {state.parent} did not freeze within {timeout_s:g} s (still {stuck}; "
            f"tasks {self.pids()}); thawed it again",
            path=str(state),
            errno=errno_mod.ETIMEDOUT,
        )

    def thaw(self) -> None:
        """Write THAWED to ``freezer.state`` (takes effect at once)."""
        fs.write(self._dir("freezer", "thaw") / "freezer.state", FreezerState.THAWED.value)

    def freezer_state(self) -> FreezerState:
        """``freezer.state`` of the container (its own or inherited from an ancestor)."""
        text = fs.read_text(self._dir("freezer", "read the freezer state") / "freezer.state")
        try:
            return FreezerState(text)
        except ValueError:
            raise CgroupError(
                f"unexpected freezer state {text!r}",
                path=str(self.paths()["freezer"] / "freezer.state"),
            ) from None

    # --- signals ---

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process of the container.

        With the freezer: freeze, signal the now fixed set of processes, then thaw (for SIGKILL
        always; for another signal only if the cgroup was not frozen before), so that nothing
        escapes by forking in between.  Without the freezer the set is signalled until no new
        process shows up (at most 10 rounds).
        """
        if "freezer" not in self._mounts:
            signalled: set[int] = set()
            for _ in range(10):
                new = set(self.pids()) - signalled
                if not new:
                    return
                signal_all(new, sig)
                signalled |= new
            return
        signal_frozen(self, sig)

    # --- accounting ---

    def stats(self) -> CgroupStats:
        """cpuacct.usage (ns), memory.usage_in_bytes, pids.current; a counter whose controller
        is not mounted reads 0 (pids falls back to counting ``tasks``)."""
        paths = self.paths()
        cpu_ns = fs.read_int(paths["cpuacct"] / "cpuacct.usage") if "cpuacct" in paths else 0
        memory = fs.read_int(paths["memory"] / "memory.usage_in_bytes") if "memory" in paths else 0
        if "pids" in paths:
            tasks = fs.read_int(paths["pids"] / "pids.current")
        else:
            tasks = sum(len(fs.read_pids(d / "tasks")) for d in self._dirs()[:1])
        return CgroupStats(cpu_usage_ns=cpu_ns, memory_bytes=memory, pids=tasks)

    def oom_killed(self) -> bool:
        """``oom_kill`` of ``memory.oom_control`` > 0 (memory.rst "10. OOM Control"; the counter
        exists since Linux 4.13).  False without the memory controller."""
        paths = self.paths()
        if "memory" not in paths:
            return False
        return fs.read_keyed(paths["memory"] / "memory.oom_control").get("oom_kill", 0) > 0

    # --- teardown ---

    def destroy(self, timeout_s: float = 5.0) -> None:
        """SIGKILL what is left, wait until the cgroups are empty, rmdir them (sub-cgroups
        first), then rmdir the empty ancestors below each mount (a busy parent shared with
        other containers is left).

        Waits up to ``timeout_s`` seconds in all.  Idempotent.  Raises one CgroupError listing
        every failure (each hierarchy is still attempted).
        """
        deadline = time.monotonic() + timeout_s
        errors: list[CgroupError] = []
        if self.pids():
            try:
                self.kill_all(signal.SIGKILL)
            except CgroupError as err:
                errors.append(err)
        for path in self._dirs():
            if not path.exists():
                continue
            for cgroup in fs.subtree(path):
                try:
                    rmdir_until(cgroup, deadline)
                except CgroupError as err:
                    errors.append(err)
        for mount in dict.fromkeys(self._mounts.values()):
            try:
                fs.remove_empty_ancestors(mount, self.relpath)
            except CgroupError as err:
                errors.append(err)
        raise_collected(errors, f"cannot destroy cgroup {self.relpath}", self.pids)
