"""cgroup v2 driver (unified hierarchy): one directory, controllers enabled top-down.

The container lives in ``<root>/<relpath>``; ``root`` is ``/sys/fs/cgroup`` on a unified host
(or ``/sys/fs/cgroup/unified`` to use the cgroup2 of a hybrid host).

Files (Documentation/admin-guide/cgroup-v2.rst):

- "Enabling and Disabling" / "Top-down Constraint": a controller can be used in a cgroup only
  when it is listed in the parent's ``cgroup.subtree_control``, and can be enabled there only
  when it is in the parent's ``cgroup.controllers``.  jaula writes ``+memory``, ``+pids``,
  ``+cpu`` into every ancestor from ``root`` down to the container's parent, for those that
  are available.  "No Internal Process Constraint": a non-root ancestor holding processes
  refuses with EBUSY.
- "Core Interface Files": ``cgroup.procs``; ``cgroup.freeze`` (write 1/0) with ``frozen 1``
  in ``cgroup.events`` once every task is frozen; ``cgroup.kill`` (write 1: SIGKILL every
  task of the subtree, no fork can escape; Linux 5.14); ``populated`` in ``cgroup.events``.
- "Memory Interface Files": ``memory.max`` and ``memory.swap.max`` in bytes or ``max``,
  ``memory.current`` in bytes, ``memory.events`` with its ``oom_kill`` counter.
- "CPU Interface Files": ``cpu.max`` "$MAX $PERIOD" in us (``max`` = no limit), ``cpu.stat``
  ``usage_usec`` (present even when the cpu controller is not enabled).
- "PID Interface Files": ``pids.max``, ``pids.current``.
- "IO Interface Files": ``io.max``, one line ``MAJ:MIN rbps=N wbps=N riops=N wiops=N`` per
  device (a key left out keeps its value; ``max`` = no limit).
"""

from __future__ import annotations

import errno as errno_mod
import signal
import time
from pathlib import Path

from runtime.cgroups import IO_KINDS, CgroupMode, CgroupStats, FreezerState, Resources, fs
from runtime.cgroups.common import raise_collected, rmdir_until, signal_frozen
from runtime.errors import CgroupError

#: Controllers jaula enables for its containers, where the host makes them available.
V2_CONTROLLERS: tuple[str, ...] = ("cpu", "io", "memory", "pids")


class V2Manager:
    """One container's cgroup on a cgroup2 hierarchy.

    Args:
        root: the cgroup2 mount (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified`` on hybrid).
        relpath: the container's path below ``root`` (``jaula/<id>``).
    """

    mode: CgroupMode = CgroupMode.UNIFIED

    def __init__(self, root: Path, relpath: str) -> None:
        if not relpath or Path(relpath).is_absolute() or ".." in Path(relpath).parts:
            raise CgroupError(f"bad cgroup path {relpath!r}: must be relative, without '..'")
        self.root = root
        self.relpath = relpath
        self.path = root / relpath

    def paths(self) -> dict[str, Path]:
        """``{"": <root>/<relpath>}``: one directory for every controller."""
        return {"": self.path}

    # --- lifecycle ---

    def _required(self, resources: Resources) -> dict[str, str]:
        """Controllers that a requested limit needs -> a description of that limit."""
        needs = {}
        if resources.memory_bytes is not None:
            needs["memory"] = f"memory limit of {resources.memory_bytes} bytes"
        if resources.cpu_quota_us is not None:
            needs["cpu"] = (
                f"cpu quota of {resources.cpu_quota_us} us per {resources.cpu_period_us} us"
            )
        if resources.pids_max is not None:
            needs["pids"] = f"pids limit of {resources.pids_max}"
        if resources.blkio_weight is not None:
            needs["io"] = f"--blkio-weight {resources.blkio_weight}"
        if resources.io_limits:
            needs["io"] = (
                "block-I/O limits ("
                + ", ".join(f"{IO_KINDS[lim.kind][2]} {lim.device}" for lim in resources.io_limits)
                + ")"
            )
        return needs

    def create(self, resources: Resources) -> None:
        """Enable the controllers down the path, create the directories, write the limits.

        Availability is checked in ``root``'s ``cgroup.controllers`` before anything is
        created, so a refused limit leaves nothing behind.  Idempotent; a second call updates
        the limits.

        Raises:
            CgroupError: a limit needs a controller that ``root`` does not offer (the message
                names it and says what to do), or a write failed.
        """
        resources.validate()
        for lim in resources.io_limits:
            lim.device_numbers()  # a missing device: refused before anything is made
        available = set(fs.read_words(self.root / "cgroup.controllers"))
        for controller, what in self._required(resources).items():
            if controller not in available:
                raise CgroupError(
                    f"cgroup v2 controller {controller!r} is not available in "
                    f"{self.root / 'cgroup.controllers'} (has: {' '.join(sorted(available)) or 'none'}): "
                    f"cannot apply the {what}; enable it in the parent's cgroup.subtree_control "
                    f"(e.g. systemd Delegate=yes, or on a hybrid host move the controller from "
                    f"v1 to v2 with systemd.unified_cgroup_hierarchy=1) or drop the limit",
                    path=str(self.root / "cgroup.controllers"),
                )
        parts = Path(self.relpath).parts
        parent = self.root
        for part in parts:
            self._enable_controllers(parent)
            fs.make_dir(parent / part)
            parent = parent / part
        self._write_limits(resources)

    @staticmethod
    def _enable_controllers(cgroup: Path) -> None:
        """Write ``+<name>`` to ``cgroup.subtree_control`` for each of :data:`V2_CONTROLLERS`
        that ``cgroup.controllers`` lists and that is not enabled yet (one write each, so an
        error names the controller)."""
        available = set(fs.read_words(cgroup / "cgroup.controllers"))
        enabled = set(fs.read_words(cgroup / "cgroup.subtree_control"))
        for controller in V2_CONTROLLERS:
            if controller in available and controller not in enabled:
                fs.write(cgroup / "cgroup.subtree_control", f"+{controller}")

    def _write_limits(self, resources: Resources) -> None:
        """Write the limit files that exist (a controller's files exist only once enabled)."""
        path = self.path
        if (path / "memory.max").exists():
            fs.write(
                path / "memory.max",
                "max" if resources.memory_bytes is None else resources.memory_bytes,
            )
            if (path / "memory.swap.max").exists():
                # v1 semantics of Resources: memory+swap <= memory_bytes, i.e. no swap
                fs.write(path / "memory.swap.max", "max" if resources.memory_bytes is None else 0)
        if (path / "cpu.max").exists():
            quota = "max" if resources.cpu_quota_us is None else str(resources.cpu_quota_us)
            fs.write(path / "cpu.max", f"{quota} {resources.cpu_period_us}")
        if (path / "pids.max").exists():
            fs.write(path / "pids.max", "max" if resources.pids_max is None else resources.pids_max)
        if resources.blkio_weight is not None:
            if (path / "io.bfq.weight").exists():
                fs.write(path / "io.bfq.weight", resources.blkio_weight)
            else:
                fs.write(path / "io.weight", f"default {resources.blkio_weight}")
        per_device: dict[tuple[int, int], list[str]] = {}
        for lim in resources.io_limits:
            per_device.setdefault(lim.device_numbers(), []).append(
                f"{IO_KINDS[lim.kind][1]}={lim.value}"
            )
        for (major, minor), keys in per_device.items():
            fs.write(path / "io.max", f"{major}:{minor} " + " ".join(keys))

    def add_process(self, pid: int) -> None:
        """Write ``pid`` to ``cgroup.procs`` (moves the whole thread group)."""
        fs.write(self.path / "cgroup.procs", pid)

    def pids(self) -> list[int]:
        """Every process in the cgroup and its sub-cgroups; empty when it does not exist."""
        if not self.path.exists():
            return []
        return fs.procs_recursive(self.path)

    # --- freezer ---

    def _frozen(self) -> bool:
        return fs.read_keyed(self.path / "cgroup.events").get("frozen") == 1

    def freeze(self, timeout_s: float = 5.0) -> None:
        """Write 1 to ``cgroup.freeze`` and poll ``cgroup.events`` until ``frozen 1``.

        On timeout the cgroup is thawed again and CgroupError is raised.
        """
        fs.write(self.path / "cgroup.freeze", 1)
        if fs.wait_for(self._frozen, timeout_s):
            return
        fs.write(self.path / "cgroup.freeze", 0)
        raise CgroupError(
            f"cgroup {self.path} did not freeze within {timeout_s:g} s (tasks {self.pids()}); "
            f"thawed it again",
            path=str(self.path / "cgroup.events"),
            errno=errno_mod.ETIMEDOUT,
        )

    def thaw(self) -> None:
        """Write 0 to ``cgroup.freeze``."""
        fs.write(self.path / "cgroup.freeze", 0)

    def freezer_state(self) -> FreezerState:
        """FROZEN when ``cgroup.events`` says ``frozen 1`` (also when an ancestor froze it),
        FREEZING when freezing was asked but is not complete, THAWED otherwise."""
        if self._frozen():
            return FreezerState.FROZEN
        if fs.read_int(self.path / "cgroup.freeze") == 1:
            return FreezerState.FREEZING
        return FreezerState.THAWED

    # --- signals ---

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: write 1 to ``cgroup.kill`` (the kernel kills the subtree atomically with
        respect to fork).  Other signals, or kernels before 5.14: freeze, signal every
        process, thaw (unless the cgroup was frozen before and ``sig`` is not SIGKILL)."""
        if sig == signal.SIGKILL and (self.path / "cgroup.kill").exists():
            fs.write(self.path / "cgroup.kill", 1)
            return
        signal_frozen(self, sig)

    # --- accounting ---

    def stats(self) -> CgroupStats:
        """``cpu.stat`` usage_usec (converted to ns), ``memory.current``, ``pids.current``.

        Without the memory controller memory reads 0; without the pids controller the tasks
        in ``cgroup.threads`` are counted.
        """
        cpu_us = fs.read_keyed(self.path / "cpu.stat").get("usage_usec", 0)
        memory_file = self.path / "memory.current"
        memory = fs.read_int(memory_file) if memory_file.exists() else 0
        pids_file = self.path / "pids.current"
        if pids_file.exists():
            tasks = fs.read_int(pids_file)
        else:
            tasks = len(fs.read_words(self.path / "cgroup.threads"))
        return CgroupStats(cpu_usage_ns=cpu_us * 1000, memory_bytes=memory, pids=tasks)

    def oom_killed(self) -> bool:
        """``oom_kill`` in ``memory.events`` > 0; False without the memory controller."""
        events = self.path / "memory.events"
        if not events.exists():
            return False
        return fs.read_keyed(events).get("oom_kill", 0) > 0

    # --- teardown ---

    def _populated(self) -> bool:
        try:
            return fs.read_keyed(self.path / "cgroup.events").get("populated") == 1
        except CgroupError as err:
            if err.errno == errno_mod.ENOENT:
                return False
            raise

    def destroy(self, timeout_s: float = 5.0) -> None:
        """Kill every task (``cgroup.kill``), wait until ``populated 0``, rmdir the subtree
        deepest first, then rmdir the empty ancestors below ``root`` (a busy parent shared with
        other containers is left).  Waits up to ``timeout_s`` seconds in all.  Idempotent.

        Raises one CgroupError listing every failure.
        """
        deadline = time.monotonic() + timeout_s
        errors: list[CgroupError] = []
        if self.path.exists():
            try:
                if self._populated() or self.pids():
                    self.kill_all(signal.SIGKILL)
                    fs.wait_for(
                        lambda: not self._populated(), max(0.0, deadline - time.monotonic())
                    )
            except CgroupError as err:
                errors.append(err)
            for cgroup in fs.subtree(self.path):
                try:
                    rmdir_until(cgroup, deadline)
                except CgroupError as err:
                    errors.append(err)
        try:
            fs.remove_empty_ancestors(self.root, self.relpath)
        except CgroupError as err:
            errors.append(err)
        raise_collected(errors, f"cannot destroy cgroup {self.path}", self.pids)
