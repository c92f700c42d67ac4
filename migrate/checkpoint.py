"""Checkpoint a running container into a bundle (``jaula checkpoint``).

Sequence::

    preflight (CRIU version, objects CRIU cannot dump, foreign file locks): nothing touched
    criu dump --freeze-cgroup <the container's freezer>      tasks frozen
      post-dump notification: tasks still frozen ─► tar the upperdir into the bundle
        answer success: CRIU kills the tasks (or resumes them with --leave-running)
        answer failure (the tar failed): CRIU resumes the tasks, the dump fails
    manifest written last (digests of every file)
    status -> checkpointed; the monitor records the exit and unmounts; the cgroup is removed

The upperdir is captured after the freeze because CRIU checks the size of open files at
restore (criu-recipe.md, "Notes").  The container's stdout/stderr pipes belong to its monitor
and are recorded as CRIU external pipes, handed to the new monitor at restore
(``inherit_fd``).  Bind-mounted volumes are declared as external mounts
(``--external mnt[DEST]:volN``).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from migrate import criu, rootfs_diff
from migrate.bundle import Bundle, Manifest, cpu_flags
from migrate.errors import MigrationError, PreflightError
from runtime.cgroups import detect_mode
from runtime.container import Container, Runtime
from runtime.errors import ContainerError
from runtime.spec import ContainerConfig
from runtime.state import ContainerStatus

log = structlog.get_logger(__name__)

#: fd link targets CRIU cannot checkpoint, with the name shown to the operator.
UNDUMPABLE_FDS = {"anon_inode:[io_uring]": "an io_uring instance",
                  "anon_inode:[userfaultfd]": "a userfaultfd",
                  "anon_inode:[perf_event]": "a perf event",
                  "anon_inode:bpf-map": "a BPF map", "anon_inode:bpf-prog": "a BPF program"}


@dataclass(frozen=True)
class CheckpointReport:
    """What a checkpoint did.  Times in seconds, sizes in bytes.

    Attributes:
        frozen_s: from the dump request until the tasks were released (killed, or resumed
            with leave_running): CRIU's freeze and dump plus the upperdir tar.
        dump_s: CRIU's dump alone, up to its post-dump notification.
        rootfs_s: the upperdir tar, taken while the tasks were frozen.
        total_s: the whole command.
    """

    container_id: str
    name: str
    bundle: Path
    leave_running: bool
    frozen_s: float
    dump_s: float
    rootfs_s: float
    total_s: float
    bundle_bytes: int
    exported: Path | None = None


def tasks_of(c: Container) -> list[int]:
    """Host pids of every task of the container."""
    return sorted(c.cgroup().pids())


def preflight(c: Container) -> None:
    """Refuse, before anything is frozen, what the dump would not bring back intact.

    Raises CriuUnavailable (missing or old CRIU), PreflightError naming the process and the
    object (io_uring and the like; a file lock shared with a process outside the
    container), ContainerError when the container is not running."""
    criu.require()
    if c.status is not ContainerStatus.RUNNING:
        raise ContainerError(f"container {c.name} is {c.status.value}: only a running container "
                             "can be checkpointed", c.id)
    pids = tasks_of(c)
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            for prefix, what in UNDUMPABLE_FDS.items():
                if target.startswith(prefix):
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    raise PreflightError(
                        f"cannot checkpoint {c.name}: process {pid} ({comm}) holds {what} "
                        f"(fd {fd}), which CRIU cannot dump; the container keeps running")
    _check_foreign_locks(c, set(pids))


def _check_foreign_locks(c: Container, pids: set[int]) -> None:
    """A lock on a file also locked by a process outside the container cannot be moved with
    it (shared/cases C08): refuse."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return
    by_file: dict[str, set[int]] = {}
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] != "->" and f[4].lstrip("-").isdigit():
            by_file.setdefault(f[5], set()).add(int(f[4]))
    for inode, holders in by_file.items():
        if holders & pids and holders - pids:
            outside = sorted(holders - pids)
            raise PreflightError(f"cannot checkpoint {c.name}: a file it has locked (inode "
                                 f"{inode}) is also locked by process(es) {outside} outside the "
                                 "container; the container keeps running")


def _stdio_keys(c: Container) -> dict[str, str | None]:
    """CRIU keys (``pipe:[INODE]``) of the init's stdout/stderr when they are the pipes the
    monitor reads."""
    monitor_pipes = set()
    for fd in os.listdir(f"/proc/{c.state.monitor_pid}/fd"):
        try:
            t = os.readlink(f"/proc/{c.state.monitor_pid}/fd/{fd}")
        except OSError:
            continue
        if t.startswith("pipe:"):
            monitor_pipes.add(t)
    keys: dict[str, str | None] = {}
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        try:
            t = os.readlink(f"/proc/{c.state.pid}/fd/{fd}")
        except OSError:
            t = ""
        keys[stream] = t if t in monitor_pipes else None
    return keys


def network_lock(cfg: ContainerConfig) -> int:
    """CRIU's network lock for this container: none is needed for a private net namespace
    with only ``lo`` (nobody outside can send it anything while it is frozen)."""
    return criu.NET_LOCK_SKIP if cfg.network == "none" else criu.NET_LOCK_IPTABLES


def freezer_path(c: Container) -> str:
    """The cgroup dir CRIU freezes: v1 ``freezer`` controller, or the v2 cgroup."""
    paths = c.cgroup().paths()
    return str(paths.get("freezer") or paths.get(""))


def checkpoint(rt: Runtime, ref: str, *, leave_running: bool = False,
               export: Path | None = None, node_name: str = "") -> CheckpointReport:
    """Checkpoint container ``ref`` into ``<container dir>/checkpoint``.

    Without ``leave_running`` the container's processes are gone afterwards and its status is
    ``checkpointed``; with it they continue.  If anything fails before the commit point (the
    answer to ``post-dump``), the container keeps running.  ``export`` also writes the
    bundle as one tar there.

    Raises PreflightError, CriuUnavailable, CriuError (with CRIU's log lines),
    BundleError, ContainerError."""
    t0 = time.monotonic()
    c = rt.get(ref)
    with c.locked():
        preflight(c)
        bundle = Bundle.create(c.dir / "checkpoint")
        cfg = c.config
        stdio = _stdio_keys(c)
        volumes = tuple({"key": f"vol{i}", "destination": m.destination, "source": m.source}
                        for i, m in enumerate(cfg.mounts))
        marks: dict[str, float] = {}

        def on_notify(n: criu.Notify) -> bool:
            if n.script == "post-dump":
                marks["post_dump"] = time.monotonic()
                rootfs_diff.write(c.upperdir, bundle.rootfs_diff)
                marks["rootfs"] = time.monotonic()
            return True

        t_dump = time.monotonic()
        try:
            # Freeze first: CRIU polls the freezer every 100 ms, the cgroup driver from 1 ms.
            c.cgroup().freeze()
            result = criu.dump(criu.DumpOptions(
                pid=c.state.pid, images_dir=bundle.criu_dir, leave_running=leave_running,
                freeze_cgroup=freezer_path(c), network_lock=network_lock(cfg),
                external=tuple(f"mnt[{v['destination']}]:{v['key']}" for v in volumes)),
                on_notify)
        except MigrationError:
            _make_sure_running(c)
            raise
        if leave_running:
            c.cgroup().thaw()  # CRIU leaves a cgroup as frozen as it found it
        t_released = time.monotonic()
        if (c.dir / "ctr.log").exists():
            shutil.copyfile(c.dir / "ctr.log", bundle.path / "ctr.log")
        manifest = bundle.finalize(Manifest(
            container=cfg.to_json(),
            image={"id": cfg.image_id, "ref": cfg.image_ref, "layers": list(cfg.layers)},
            criu_version=criu.version(), stdio=stdio, volumes=volumes,
            cgroup_mode=detect_mode().value, source_node=node_name, kernel=platform.release(),
            cpu_flags=cpu_flags(),
            dump={"dump_s": marks["post_dump"] - t_dump, "criu_s": result.duration_s,
                  "leave_running": leave_running}))
        if not leave_running:
            c.state.status = ContainerStatus.CHECKPOINTED
            c.state.extra = {**c.state.extra, "checkpointed_at": time.time()}
            c.save()
            c.wait_monitor(10.0)
            c.cgroup().destroy()
    size = sum(f.size for f in manifest.files)
    exported = None
    if export is not None:
        bundle.export(export)
        exported = export
    report = CheckpointReport(
        container_id=c.id, name=c.name, bundle=bundle.path, leave_running=leave_running,
        frozen_s=t_released - t_dump, dump_s=marks["post_dump"] - t_dump,
        rootfs_s=marks["rootfs"] - marks["post_dump"], total_s=time.monotonic() - t0,
        bundle_bytes=size, exported=exported)
    log.info("container.checkpointed", id=c.id[:12], frozen_s=round(report.frozen_s, 3))
    return report


def _make_sure_running(c: Container) -> None:
    """After a failed dump CRIU resumes the tasks; thaw the freezer in case it did not."""
    try:
        c.cgroup().thaw()
    except Exception as e:  # noqa: BLE001 - the dump error is what the operator needs
        log.error("checkpoint.thaw_failed", id=c.id[:12], error=str(e))
    if c.state.pid:
        try:
            os.kill(c.state.pid, 0)
        except ProcessLookupError:
            log.error("checkpoint.container_lost", id=c.id[:12])
