"""The container lifecycle: run, inspect, exec, pause/resume, stop/kill, delete.

Every operation follows the same steps (STYLE.md, habit 2): take the container's lock,
refresh its status from facts (the init's pid and start time, the monitor's ``exit.json``),
check the transition, act, save.  ``run`` undoes every step it made when a later one fails,
so a failed ``run`` leaves no mount, cgroup, process or directory behind.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import structlog

from runtime import events, quota
from runtime import syscalls as sc
from runtime.cgroups import CgroupManager, Resources, create_manager
from runtime.errors import (
    CommandNotExecutable,
    CommandNotFound,
    ConfigError,
    ContainerError,
    ContainerExists,
    JaulaError,
    NotRootError,
)
from runtime.exec_process import exec_in
from runtime.image import ImageStore
from runtime.network import LEASES_FILE, Attachment, IpLeases, NetworkConfig
from runtime.network.ports import PortMapping
from runtime.poll import wait_for
from runtime.restart import RestartPolicy, load_init, load_policy, save_policy
from runtime.rootfs.mounts import secure_join
from runtime.rootfs.overlay import OverlayLayout, is_mountpoint, mount_overlay, unmount
from runtime.spec import ContainerConfig, Mount, User, parse_env
from runtime.state import (
    OPERATIONS,
    ContainerStatus,
    ExitRecord,
    Operation,
    State,
    atomic_write_json,
    can,
    check_transition,
    read_json,
)
from runtime.store import (
    CONFIG,
    EXIT,
    GO_FIFO,
    INIT,
    LOG,
    MONITOR_LOG,
    NETNS,
    STATE,
    STOP_MARK,
    TTY_MARK,
    Store,
    flocked,
)
from runtime.userns import (
    AUTO_SIZE,
    FileIdAllocator,
    IdMapping,
    IdRangeAllocator,
    check_maps,
    host_id,
)
from runtime.userns import auto_maps as userns_auto_maps

# Configured by the application, not here (runtime.logconfig.configure_logging: the CLI and the monitor)
log = structlog.get_logger(__name__)
S = ContainerStatus


def require_root() -> None:
    """Raise NotRootError unless the caller is uid 0."""
    if os.geteuid() != 0:
        raise NotRootError(
            "jaula needs root to create namespaces, mounts and cgroups: "
            "run it as root (e.g. with sudo)"
        )


@dataclass(frozen=True)
class RunOptions:
    """What ``jaula run`` was asked for (already parsed; see :mod:`runtime.spec`).

    ``command`` replaces the image's Cmd, ``entrypoint`` (when not None) its Entrypoint;
    ``env`` items are ``K=V`` merged over the image's Env; ``user`` is ``UID[:GID]`` or a name
    from the image's /etc/passwd."""

    image: str
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    name: str | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    network: str = "none"
    resources: Resources = field(default_factory=Resources)
    mounts: tuple[Mount, ...] = ()
    capabilities: tuple[str, ...] | None = None
    privileged: bool = False
    labels: tuple[str, ...] = ()
    ip: str | None = None
    mac_address: str | None = None
    dns: tuple[str, ...] = ()
    add_hosts: tuple[str, ...] = ()
    ports: tuple[PortMapping, ...] = ()
    seccomp: str = "default"
    storage_size_bytes: int | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    tty: bool = False
    userns: str = "host"
    uid_map: tuple[IdMapping, ...] = ()
    gid_map: tuple[IdMapping, ...] = ()


class Container:
    """One container of a :class:`Runtime`.  Attributes are read at construction; call
    :meth:`refresh` (done by every operation under the lock) to re-read the facts."""

    def __init__(self, rt: Runtime, container_id: str) -> None:
        self.rt = rt
        self.id = container_id
        self.dir = rt.store.container_dir(container_id)
        self.config = ContainerConfig.from_json(read_json(self.dir / CONFIG))
        self.state = self._load_state()
        self._refresh_from_facts()

    # -- state -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def status(self) -> ContainerStatus:
        return self.state.status

    def _load_state(self) -> State:
        try:
            st = State.from_json(read_json(self.dir / STATE))
        except FileNotFoundError:
            st = State()
        self._saved_status = st.status  # what is on disk: save() checks the move from it
        return st

    def exit_record(self) -> ExitRecord | None:
        """What the monitor recorded when the init exited, or None."""
        try:
            return ExitRecord(**read_json(self.dir / EXIT))
        except (FileNotFoundError, ValueError):
            return None

    def _refresh_from_facts(self) -> None:
        st = self.state
        self._follow_restart()
        if st.status in (S.RUNNING, S.PAUSED) and not sc.is_alive(st.pid, st.pid_start_time):
            st.status = S.STOPPED
            rec = self.exit_record()
            if rec is not None:
                st.exit_code, st.finished_at, st.oom_killed = (
                    rec.exit_code,
                    rec.finished_at,
                    rec.oom_killed,
                )
            else:  # the monitor died too: the exit status is lost
                st.exit_code = st.exit_code if st.exit_code is not None else -1
                st.finished_at = st.finished_at or time.time()

    def _follow_restart(self) -> None:
        """Take the init a restarting monitor started (``init.json``, :mod:`runtime.restart`)
        when it is newer than the one in state.json and alive: the container runs again."""
        st = self.state
        if st.status not in (S.RUNNING, S.PAUSED, S.STOPPED):
            return
        rec = load_init(self.dir)
        if rec is None or rec.started_at <= st.started_at or rec.pid == st.pid:
            return
        if not sc.is_alive(rec.pid, rec.start_time):
            return
        st.status, st.pid, st.pid_start_time = S.RUNNING, rec.pid, rec.start_time
        st.started_at, st.exit_code, st.finished_at = rec.started_at, None, 0.0

    def _event(self, status: str, **attributes: object) -> None:
        """Record ``status`` in the state root's event log (:mod:`runtime.events`)."""
        events.record(self.rt.root, status, self.id, self.name, self.config.image_ref, **attributes)

    def restart_count(self) -> int:
        """How many times the monitor restarted the init since the last start."""
        rec = load_init(self.dir)
        return rec.restart_count if rec is not None else 0

    def refresh(self) -> None:
        """Re-read state.json and the facts."""
        self.state = self._load_state()
        self._refresh_from_facts()

    def save(self) -> None:
        """Write state.json atomically.  Raises InvalidStateTransition when the status moved
        in a way :data:`runtime.state.TRANSITIONS` does not allow (a bug, not user input)."""
        if self.state.status is not self._saved_status:
            check_transition(self.id, self._saved_status, self.state.status, "save")
        atomic_write_json(self.dir / STATE, self.state.to_json())
        self._saved_status = self.state.status

    @contextlib.contextmanager
    def locked(self, blocking: bool = True, timeout_s: float | None = None) -> Iterator[None]:
        """Hold this container's lock, refreshed on entry.  With ``blocking=False`` raise
        ContainerError at once when another operation holds it; with ``timeout_s``, when it
        still holds it after that many seconds (the error names the holder's pid)."""

        def attempt() -> contextlib.AbstractContextManager[None] | None:
            cm = flocked(self.dir / "lock", blocking=False)
            try:
                cm.__enter__()
            except BlockingIOError:
                return None
            return cm

        cm: contextlib.AbstractContextManager[None]
        if blocking and timeout_s is None:
            cm = flocked(self.dir / "lock")
            cm.__enter__()
        else:
            got = wait_for(attempt, timeout_s if blocking else 0.0, 0.05)
            if got is None:
                holders = _lock_holders(self.dir / "lock")
                raise ContainerError(
                    f"container {self.name} is busy: another operation (a checkpoint or a "
                    "migration?) is in progress"
                    + (f" (process {', '.join(map(str, holders))})" if holders else ""),
                    self.id,
                )
            cm = got
        try:
            self.refresh()
            yield
        finally:
            cm.__exit__(None, None, None)

    # -- helpers ---------------------------------------------------------------------------
    def cgroup(self) -> CgroupManager:
        return create_manager(self.id, root=self.rt.cgroup_root, parent=self.config.cgroup_parent)

    @property
    def rootfs(self) -> Path:
        return self.dir / "merged"

    @property
    def upperdir(self) -> Path:
        return self.dir / "upper"

    def monitor_alive(self) -> bool:
        return sc.is_alive(self.state.monitor_pid, self.state.monitor_start_time)

    def armed_monitor_waiting(self) -> bool:
        """Whether a monitor armed for a restore (:meth:`Runtime.arm`) still waits for its
        ``go`` (it removes ``go.fifo`` once told)."""
        return self.monitor_alive() and (self.dir / GO_FIFO).exists()

    def _require(self, op: Operation) -> None:
        """Raise ContainerError unless ``op`` may start from this container's status
        (:data:`runtime.state.OPERATIONS`), naming both and what it must be."""
        if not can(op, self.status):
            allowed = sorted(s.value for s in OPERATIONS[op][0])
            raise ContainerError(
                f"container {self.name} ({self.id[:12]}) is {self.status.value}: cannot "
                f"{op.value} it (it must be {' or '.join(allowed)})",
                self.id,
            )

    # -- operations ------------------------------------------------------------------------
    def start(self) -> None:
        """Run a created or stopped container: a new init (its command again) in the same
        rootfs, so what it wrote in its upperdir is still there.  Raises ContainerError
        (wrong status, or the init's reason), MountError, CgroupError; on failure the
        container stays as it was (unmounted, no cgroup)."""
        require_root()
        with self.locked():
            self._require(Operation.START)
            for layer in self.config.layers:
                if not self.rt.images.has_layer(layer):
                    raise ContainerError(
                        f"layer sha256:{layer} of container {self.name} is not in this node's "
                        "image store: pull or import its image again",
                        self.id,
                    )
            layout = OverlayLayout.in_dir(
                self.dir, [self.rt.images.layer_dir(la) for la in self.config.layers]
            )
            for f in (EXIT, INIT, STOP_MARK):
                (self.dir / f).unlink(missing_ok=True)
            cg = self.cgroup()
            mon_pid, mon_start = 0, None
            att = self.config.attachment
            try:
                if att is not None:  # bridged: its address again (given back at stop), a veth
                    self.rt.leases.lease_ip(att.subnet or self.rt.network.subnet, self.id, att.ip)
                    self.rt._plug(self.dir, att)
                    self.rt._publish(self.id, att, self.config.ports)
                if not is_mountpoint(layout.merged):
                    mount_overlay(layout, self.config.uid_map, self.config.gid_map)
                cg.create(self.config.resources)
                mon_pid, sync_r = _launch_monitor(self.dir)
                mon_start = sc.proc_start_time(mon_pid)
                pid, start = _await_monitor(self.dir, sync_r)
                self.state = State(
                    status=S.RUNNING,
                    pid=pid,
                    pid_start_time=start,
                    monitor_pid=mon_pid,
                    monitor_start_time=mon_start,
                    started_at=time.time(),
                )
                self.save()
                if att is not None:  # the init joined it: it lives as long as the init
                    from runtime.network import link

                    link.remove_netns(self.dir / NETNS)
            except BaseException:
                _undo_start(layout, cg, mon_pid, mon_start)
                if att is not None:
                    self.rt._detach(self.id, att)
                raise
        log.info("container.started", id=self.id[:12], name=self.name, pid=pid)

    def rename(self, new_name: str) -> None:
        """Give the container another name (``podman rename``).  Raises InvalidContainerId
        (a malformed name), ContainerExists (taken), ContainerError (migrating)."""
        with self.rt.store.lock(), self.locked():
            if self.status is S.MIGRATING:
                raise ContainerError(
                    f"container {self.name} is migrating: rename it once that is over", self.id
                )
            if new_name == self.name:
                return
            self.rt.store.check_name(new_name)
            old = self.name
            self.config = replace(self.config, name=new_name)
            atomic_write_json(self.dir / CONFIG, self.config.to_json())
            self._event("rename", oldName=old)

    @contextlib.contextmanager
    def filesystem(self) -> Iterator[Path]:
        """The container's root as the host sees it, for ``cp``: ``/proc/PID/root`` of a
        running or paused container (its own mounts, volumes included, are visible there);
        for a created or stopped one, its overlay mounted for the time of the block (the
        upperdir holds what is written).  Resolve paths in it with
        :func:`runtime.rootfs.mounts.secure_join`.  Raises ContainerError (checkpointed,
        migrating or migrated: no filesystem here to use), MountError."""
        with self.locked():
            if self.status in (S.RUNNING, S.PAUSED):
                yield Path(f"/proc/{self.state.pid}/root")
                return
            if self.status not in (S.CREATED, S.STOPPED):
                raise ContainerError(
                    f"container {self.name} is {self.status.value}: its files cannot be copied now",
                    self.id,
                )
            layout = OverlayLayout.in_dir(
                self.dir, [self.rt.images.layer_dir(la) for la in self.config.layers]
            )
            mounted_here = not is_mountpoint(layout.merged)
            if mounted_here:
                mount_overlay(layout, self.config.uid_map, self.config.gid_map)
            try:
                yield layout.merged
            finally:
                if mounted_here:
                    unmount(layout.merged)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the container init.  Raises ContainerError unless running/paused."""
        with self.locked():
            self._require(Operation.SIGNAL)
            try:
                os.kill(self.state.pid, sig)
            except ProcessLookupError:
                return
            self._event(
                "kill", signal=signal.Signals(sig).name if sig in signal.valid_signals() else sig
            )
            if self.status is S.PAUSED and sig == signal.SIGKILL:
                self.cgroup().thaw()

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Send the stop signal, wait up to ``timeout_s`` seconds, then SIGKILL every task.
        Returns the exit code (None if the monitor could not record it).  Stopping a stopped
        container is a no-op, as in Podman."""
        with self.locked():
            if self.monitor_alive():
                (self.dir / STOP_MARK).touch()  # no restart (runtime.restart)
            if not can(Operation.STOP, self.status):
                self.wait_monitor(10.0)  # it may be waiting to restart: it ends now
                return self.state.exit_code
            cg = self.cgroup()
            try:
                os.kill(self.state.pid, self.config.stop_signal)
            except ProcessLookupError:
                pass
            if self.status is S.PAUSED:
                cg.thaw()
            if not self._wait_stopped(timeout_s if timeout_s >= 0 else float("inf")):
                cg.kill_all(signal.SIGKILL)
                self._wait_stopped(10.0)
            self.wait_monitor(10.0)
            self.refresh()
            # self.state.status, not self.status: mypy keeps the narrowing above across refresh()
            if self.state.status is not S.STOPPED:
                raise ContainerError(f"container {self.name} did not stop", self.id)
            self.save()
            self._network_down()
            self._event("stop")
            return self.state.exit_code

    def _wait_stopped(self, timeout_s: float) -> bool:
        return wait_for(
            lambda: not sc.is_alive(self.state.pid, self.state.pid_start_time), timeout_s, 0.02
        )

    def wait_monitor(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds for the monitor to exit."""
        wait_for(lambda: not self.monitor_alive(), timeout_s, 0.02)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the container stops; return its exit code.  Raises TimeoutError."""

        def stopped() -> bool:
            self.refresh()
            return self.status not in (S.RUNNING, S.PAUSED) and not self.monitor_alive()

        if not wait_for(stopped, timeout_s):
            raise TimeoutError(f"container {self.name} still running after {timeout_s} s")
        self.refresh()
        return self.state.exit_code

    def pause(self) -> None:
        """Freeze every task of the container (freezer cgroup)."""
        with self.locked():
            if self.status is S.PAUSED:
                raise ContainerError(f"container {self.name} is already paused", self.id)
            if not can(Operation.PAUSE, self.status):
                raise ContainerError(
                    f"container {self.name} is {self.status.value}: only a "
                    "running container can be paused",
                    self.id,
                )
            self.cgroup().freeze()
            self.state.status = S.PAUSED
            self.save()
            self._event("pause")

    def resume(self) -> None:
        """Thaw a paused container."""
        with self.locked():
            if not can(Operation.UNPAUSE, self.status):
                raise ContainerError(
                    f"container {self.name} is {self.status.value}, not paused: nothing to resume",
                    self.id,
                )
            self.cgroup().thaw()
            self.state.status = S.RUNNING
            self.save()
            self._event("unpause")

    def exec(
        self,
        args: tuple[str, ...],
        env: tuple[str, ...] = (),
        workdir: str | None = None,
        user: str | None = None,
        detach: bool = False,
        tty_fd: int | None = None,
    ) -> int:
        """Run ``args`` inside the running container (see :mod:`runtime.exec_process`);
        with ``tty_fd`` (a pty's slave side) on that terminal.

        Returns the program's exit code.  Raises ContainerError when the container is not
        running or the program cannot be started."""
        if not args:
            raise ConfigError("exec needs a command to run")
        with self.locked():
            self._require(Operation.EXEC)
            pid = self.state.pid
            cfg = self.config
            u = resolve_user(self.rootfs, user) if user else cfg.user
        self._event("exec", command=" ".join(args))
        return exec_in(
            pid,
            self.cgroup(),
            tuple(args),
            parse_env(list(env), cfg.env),
            workdir or cfg.cwd,
            u,
            cfg.capabilities,
            detach,
            self.id,
            cfg.seccomp,
            tty_fd,
        )

    def delete(self, force: bool = False) -> None:
        """Remove the container: its processes (with ``force``), cgroup, mount and directory.

        Never waits without a bound: another operation holding the container's lock for
        more than :data:`DELETE_LOCK_WAIT_S` is, with ``force``, ended by killing every
        process of the container (its tasks, its monitor and the monitor's children: a
        restore stuck in CRIU ends when its monitor dies), and the lock waited for once
        more.  Raises ContainerError when it is running or paused and ``force`` is False,
        or when the lock is still held after that."""
        try:
            lock = self.locked(timeout_s=DELETE_LOCK_WAIT_S)
            lock.__enter__()
        except ContainerError:
            if not force:
                raise
            log.warning("container.remove.busy", id=self.id[:12], action="killing it")
            self._kill_everything()
            lock = self.locked(timeout_s=DELETE_LOCK_WAIT_S)
            lock.__enter__()
        try:
            if self.status in (S.RUNNING, S.PAUSED, S.MIGRATING) and not force:
                raise ContainerError(
                    f"container {self.name} ({self.id[:12]}) is {self.status.value}: stop it "
                    "first or use `rm -f`",
                    self.id,
                )
            migrated_away = self.status is S.MIGRATED
            self._teardown()
        finally:
            lock.__exit__(None, None, None)
        self.rt.store.remove_dir(self.id)
        if self.rt.admission is not None:
            self.rt.admission.release(self.id)
        if self.config.userns == "auto" and not (migrated_away and self.rt.id_ranges.cluster_wide):
            self.rt.id_ranges.release(self.id)
        log.info("container.removed", id=self.id[:12], name=self.name)
        self._event("remove")

    def _kill_everything(self) -> None:
        """SIGKILL, without the lock, every process of the container: the monitor's
        children (the init, or a restore's half-restored init and its CRIU), the monitor,
        and every task of the cgroup.  For ``rm -f`` of a container whose operation is
        stuck; errors are logged (the teardown that follows reports what is left)."""
        self.refresh()
        mon, mon_start = self.state.monitor_pid, self.state.monitor_start_time
        if mon and sc.is_alive(mon, mon_start):
            for pid in _children(mon):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(mon, signal.SIGKILL)
        try:
            self.cgroup().kill_all(signal.SIGKILL)
        except JaulaError as e:
            log.error("container.remove.kill", id=self.id[:12], error=str(e))

    def _teardown(self) -> None:
        """Kill every task, wait for the monitor, unmount, destroy the cgroup.  Errors are
        collected and raised together, never dropped."""
        errors: list[str] = []
        cg = self.cgroup()
        if self.monitor_alive():
            (self.dir / STOP_MARK).touch()  # no restart (runtime.restart)
        try:
            if cg.pids():
                cg.kill_all(signal.SIGKILL)
                self._wait_stopped(10.0)
        except JaulaError as e:
            errors.append(str(e))
        if self.armed_monitor_waiting():  # armed for a restore that never came
            with contextlib.suppress(OSError):
                fd = os.open(self.dir / GO_FIFO, os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, b"cancel\n")
                os.close(fd)
        self.wait_monitor(10.0)
        if self.monitor_alive():
            for pid in _children(self.state.monitor_pid):  # a stuck restore's CRIU, say
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.state.monitor_pid, signal.SIGKILL)
            self.wait_monitor(5.0)
        try:
            unmount(self.rootfs)
        except JaulaError as e:
            errors.append(str(e))
        try:
            cg.destroy()
        except JaulaError as e:
            errors.append(str(e))
        errors += list(self._network_down())
        try:
            quota.release(self.dir, self.config.storage_size_bytes)
        except OSError as e:
            errors.append(f"cannot clear the disk quota of {self.dir}: {e.strerror}")
        if errors:
            raise ContainerError(f"cleaning up {self.name} failed: " + "; ".join(errors), self.id)

    def _network_down(self) -> tuple[str, ...]:
        """A bridged container's veth and lease, once its tasks are gone (stop, rm).  The
        lease follows the id across nodes: one that migrated away (its lease is the
        destination's now) or an incoming one being discarded (still the source's) keeps
        it.  Returns the errors."""
        if self.config.attachment is None or self.state.status is S.MIGRATED:
            return ()
        release = self.state.status is not S.MIGRATING
        return self.rt._detach(self.id, self.config.attachment, release=release)

    def inspect(self) -> dict[str, object]:
        """A JSON-able description shaped like ``podman inspect``'s (Id, Name, Created,
        State.Status/Pid/ExitCode/OOMKilled...), plus jaula's paths."""
        self.refresh()
        st = self.state
        return {
            "Id": self.id,
            "Name": self.name,
            "Created": _rfc3339(self.config.created_at),
            "Image": self.config.image_id,
            "ImageName": self.config.image_ref,
            "Path": self.config.args[0] if self.config.args else "",
            "Args": list(self.config.args[1:]),
            "State": {
                "Status": st.status.value,
                "Running": st.status is S.RUNNING,
                "Paused": st.status is S.PAUSED,
                "Pid": st.pid if st.status in (S.RUNNING, S.PAUSED) else 0,
                "ExitCode": st.exit_code if st.exit_code is not None else 0,
                "OOMKilled": st.oom_killed,
                "StartedAt": _rfc3339(st.started_at),
                "FinishedAt": _rfc3339(st.finished_at),
                "MonitorPid": st.monitor_pid,
                "MigratedTo": st.migrated_to,
            },
            "RestartCount": self.restart_count(),
            "HostConfig": {
                "RestartPolicy": {
                    "Name": load_policy(self.dir).name.value,
                    "MaximumRetryCount": load_policy(self.dir).max_retries,
                }
            },
            "Config": self.config.to_json(),
            "Rootfs": str(self.rootfs),
            "UpperDir": str(self.upperdir),
            "LogPath": str(self.dir / LOG),
            "CgroupPaths": {k: str(v) for k, v in self.cgroup().paths().items()},
            "NetworkSettings": _network_settings(self.config),
        }


def _network_settings(cfg: ContainerConfig) -> dict[str, object]:
    """``podman inspect``'s NetworkSettings subset for a bridged container, else empty."""
    att = cfg.attachment
    if att is None:
        return {}
    published: dict[str, list[dict[str, str]]] = {}
    for m in cfg.ports:  # podman inspect's shape: "80/tcp": [{"HostIp": "", "HostPort": "8080"}]
        published.setdefault(f"{m.container_port}/{m.protocol}", []).append(
            {"HostIp": m.host_ip, "HostPort": str(m.host_port)}
        )
    return {
        "Ports": published,
        "IPAddress": att.ip,
        "IPPrefixLen": att.prefixlen,
        "Gateway": att.gateway,
        "MacAddress": att.mac,
        "Bridge": att.bridge,
        "HostInterface": att.host_if,
    }


def _check_ports(mappings: tuple[PortMapping, ...]) -> tuple[PortMapping, ...]:
    """``-p`` checked before anything is made: no host port twice, each free on this node
    (not published by another container, not bound by a socket); a missing host port gets
    a free one.  Returns the mappings to record.  NetworkError/PortInUse naming the port."""
    if not mappings:
        return ()
    from runtime.network import ports

    ports.check_unique(mappings)
    resolved = ports.assign_host_ports(mappings)
    ports.check_free(resolved)
    return resolved


def _check_network_options(rt: Runtime, opts: RunOptions) -> tuple[str | None, str | None]:
    """Check --ip, --mac-address, --dns, --add-host before anything is made; returns the
    normalised (ip, mac).  NetworkError naming the bad one."""
    from runtime.network import NetworkError, check_ip, check_mac
    from runtime.network.files import check_dns, parse_add_host

    if opts.network != "bridge":
        given = [
            flag
            for flag, v in (
                ("--ip", opts.ip),
                ("--mac-address", opts.mac_address),
                ("--dns", opts.dns),
                ("--add-host", opts.add_hosts),
                ("-p", opts.ports),
            )
            if v
        ]
        if given:
            raise NetworkError(f"{given[0]} needs --network bridge (not {opts.network})")
        return None, None
    for d in opts.dns:
        check_dns(d)
    for h in opts.add_hosts:
        parse_add_host(h)
    net = rt.network.validate()
    ip = check_ip(net, opts.ip) if opts.ip else None
    mac = check_mac(opts.mac_address) if opts.mac_address else None
    return ip, mac


def _rfc3339(t: float) -> str:
    if not t:
        return "0001-01-01T00:00:00Z"
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


class Admission(Protocol):
    """What a higher layer decides when a container comes to life here and is told when one
    is gone, without the runtime knowing it (migrate: the container's ownership in the
    cluster state, :class:`migrate.membership.NodeOwnership`)."""

    def claim(self, container_id: str) -> bool:
        """Allow ``container_id`` to run on this node, before any of its processes starts;
        returns True when the claim is new.  Raises a JaulaError (one line, naming what is
        wrong) to refuse: the caller then undoes what it made."""
        ...

    def release(self, container_id: str) -> None:
        """``container_id`` is gone from this node (removed); never raises."""
        ...


class Runtime:
    """A node's containers and images under one state root.

    Args:
        root: the state root (default ``$JAULA_ROOT`` or ``/var/lib/jaula``).
        cgroup_root: where cgroupfs is mounted.
        cgroup_parent: directory under each hierarchy that holds this runtime's containers
            (default: see :func:`default_cgroup_parent`).
    """

    def __init__(
        self,
        root: Path | None = None,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        cgroup_parent: str | None = None,
        network: NetworkConfig | None = None,
        leases: IpLeases | None = None,
    ) -> None:
        self.store = Store(root)
        self.root = self.store.root
        self.images = ImageStore(self.root)
        self.cgroup_root = cgroup_root
        self.cgroup_parent = cgroup_parent or default_cgroup_parent(self.root)
        self._network = network
        self._leases = leases
        #: asked before a container starts (``run``) and told when one is removed; None:
        #: every container may run (a runtime outside a cluster)
        self.admission: Admission | None = None
        self._id_ranges: IdRangeAllocator | None = None

    @property
    def network(self) -> NetworkConfig:
        """This node's bridge network: as given, else ``<root>/network.json``, else the
        defaults (:class:`runtime.network.NetworkConfig`)."""
        if self._network is None:
            self._network = NetworkConfig.load(self.root)
        return self._network

    @property
    def leases(self) -> IpLeases:
        """The IP leases: as given (a node service's cluster state), else a locked file."""
        if self._leases is None:
            from runtime.network.ipam import FileLeases

            f = self.network.leases_file
            self._leases = FileLeases(Path(f) if f else self.root / LEASES_FILE)
        return self._leases

    @leases.setter
    def leases(self, leases: IpLeases) -> None:
        self._leases = leases

    @property
    def id_ranges(self) -> IdRangeAllocator:
        """The ``--userns=auto`` id ranges: as given (a node service's cluster state),
        else a locked file under the state root (:class:`runtime.userns.FileIdAllocator`)."""
        if self._id_ranges is None:
            self._id_ranges = FileIdAllocator(self.root)
        return self._id_ranges

    @id_ranges.setter
    def id_ranges(self, allocator: IdRangeAllocator) -> None:
        self._id_ranges = allocator

    def get(self, ref: str) -> Container:
        """The container named ``ref`` or whose id (or unique id prefix) is ``ref``."""
        return Container(self, self.store.resolve(ref))

    def list(self, all: bool = False) -> list[Container]:
        """Containers, oldest first; only running/paused ones unless ``all``."""
        out = []
        for cid in self.store.ids():
            try:
                c = Container(self, cid)
            except (FileNotFoundError, ValueError):
                continue  # being created or removed right now
            if all or c.status in (S.RUNNING, S.PAUSED):
                out.append(c)
        return sorted(out, key=lambda c: c.config.created_at)

    def image_in_use(self, image_id: str) -> bool:
        return any(c.config.image_id == image_id for c in self.list(all=True))

    def create(self, opts: RunOptions) -> Container:
        """Create a container without starting it (status created; :meth:`Container.start`
        runs it).  Checks as :meth:`run` does; raises the same errors."""
        return self.run(opts, start_now=False)

    def run(self, opts: RunOptions, start_now: bool = True) -> Container:
        """Create and start a container; returns it running (with ``start_now`` False:
        created, its rootfs prepared and unmounted).

        Raises ImageError (no such image), ContainerExists (name taken), ConfigError (bad
        user, workdir or command), MountError, CgroupError, ContainerError (the init failed
        to start, with its reason).  On any failure nothing is left behind."""
        require_root()
        if opts.network not in ("none", "host", "bridge"):
            raise ConfigError(f"invalid --network {opts.network!r}: use bridge, none or host")
        want_ip, want_mac = _check_network_options(self, opts)
        ports = _check_ports(opts.ports)
        image = self.images.resolve(opts.image)
        layer_dirs = self.images.layer_dirs(image)
        icfg = image.config
        entrypoint = icfg.entrypoint if opts.entrypoint is None else opts.entrypoint
        cmd = opts.command or (icfg.cmd if opts.entrypoint is None else ())
        args = tuple(entrypoint) + tuple(cmd)
        if not args:
            raise ConfigError(
                f"no command given and image {opts.image} has no Entrypoint or "
                "Cmd: give one after the image name"
            )
        from runtime.spec import DEFAULT_CAPABILITIES

        env = parse_env(list(opts.env), tuple(icfg.env))  # may raise: before anything is made
        userns = _check_userns_options(opts)
        if opts.storage_size_bytes:
            quota.check_supported(self.root)
        with self.store.lock():
            name = opts.name or self.store.new_name()
            self.store.check_name(name)
            cid = self.store.new_id()
            cdir = self.store.create_dir(cid)
            cfg = ContainerConfig(
                id=cid,
                name=name,
                image_id=image.id,
                image_ref=opts.image,
                layers=tuple(image.layers),
                args=args,
                env=env,
                cwd=opts.workdir or icfg.working_dir or "/",
                user_spec=opts.user or icfg.user or "",
                hostname=opts.hostname or cid[:12],
                network=opts.network,
                resources=opts.resources,
                mounts=opts.mounts,
                capabilities=(
                    DEFAULT_CAPABILITIES if opts.capabilities is None else opts.capabilities
                ),
                privileged=opts.privileged,
                seccomp=opts.seccomp,
                storage_size_bytes=opts.storage_size_bytes,
                stop_signal=_stop_signal(icfg.stop_signal),
                cgroup_parent=self.cgroup_parent,
                created_at=time.time(),
                labels=opts.labels,
                ports=ports,
                userns=userns,
                uid_map=opts.uid_map,
                gid_map=opts.gid_map or opts.uid_map,
            )
            atomic_write_json(cdir / CONFIG, cfg.to_json())
            atomic_write_json(cdir / STATE, State().to_json())
            if opts.restart != RestartPolicy():
                save_policy(cdir, opts.restart)
            if opts.tty:
                (cdir / TTY_MARK).touch()  # the monitor owns a pty (runtime.tty)
        layout = OverlayLayout.in_dir(cdir, layer_dirs)
        mon_pid, mon_start = 0, None
        cg = create_manager(cid, root=self.cgroup_root, parent=self.cgroup_parent)
        att: Attachment | None = None
        claimed = False
        try:
            if self.admission is not None:
                claimed = self.admission.claim(cid)
            if opts.network == "bridge":
                att = self._attach(cid, want_ip, want_mac, opts)
            if userns == "auto":
                maps = userns_auto_maps(self.id_ranges.reserve(cid, AUTO_SIZE))
                cfg = replace(cfg, uid_map=maps, gid_map=maps)
                atomic_write_json(cdir / CONFIG, cfg.to_json())
            quota.prepare_dirs(cdir, cfg.storage_size_bytes)
            mount_overlay(layout, cfg.uid_map, cfg.gid_map)
            user = resolve_user(layout.merged, cfg.user_spec) if cfg.user_spec else User()
            check_command(layout.merged, cfg.args[0], cfg.env, cfg.cwd)
            make_workdir(layout.merged, cfg.cwd, user)
            cfg = replace(cfg, user=user, attachment=att)
            atomic_write_json(cdir / CONFIG, cfg.to_json())
            if att is not None:
                from runtime.network import files

                files.write_etc(layout.merged, cfg.hostname, name, att.ip, att.dns, att.add_hosts)
            ctr = Container(self, cid)
            ctr._event("create")  # before the monitor's "start" (runtime.events)
            if not start_now:  # created: the lease is kept, the veth made at start
                unmount(layout.merged)
                return ctr
            if att is not None:
                self._plug(cdir, att)
                self._publish(cid, att, cfg.ports)
            cg.create(cfg.resources)
            with ctr.locked():
                mon_pid, sync_r = _launch_monitor(cdir)
                mon_start = sc.proc_start_time(mon_pid)
                pid, start = _await_monitor(cdir, sync_r)
                ctr.state = State(
                    status=S.RUNNING,
                    pid=pid,
                    pid_start_time=start,
                    monitor_pid=mon_pid,
                    monitor_start_time=mon_start,
                    started_at=time.time(),
                )
                ctr.save()
            if att is not None:  # the init joined it: the namespace now lives as long as it
                from runtime.network import link

                link.remove_netns(cdir / NETNS)
        except BaseException:
            if att is not None or (cdir / NETNS).exists():
                self._detach(cid, att)
            _rollback(cdir, layout, cg, mon_pid, mon_start)
            if claimed and self.admission is not None:
                self.admission.release(cid)
            if userns == "auto":
                self.id_ranges.release(cid)
            raise
        log.info("container.started", id=cid[:12], name=name, pid=pid)
        return ctr

    @property
    def port_tag(self) -> str:
        """This node's name in its published ports' rules (:mod:`runtime.network.ports`)."""
        from runtime.network.ports import node_tag

        return node_tag(self.root)

    def _publish(self, cid: str, att: Attachment, mappings: tuple[PortMapping, ...]) -> None:
        """Install the DNAT rules of ``mappings`` towards ``att.ip``.  PortInUse (a host
        port taken since the run's check), NetworkError."""
        if mappings:
            from runtime.network import ports

            ports.publish(self.port_tag, cid, att, mappings)

    def _plug(self, cdir: Path, att: Attachment) -> None:
        """Pin a new net namespace at ``cdir``/netns and plug the container's veth into the
        bridge (the init joins that namespace).  Raises NetworkError."""
        from runtime.network import link

        link.create_netns(cdir / NETNS)
        link.plug(att, cdir / NETNS, link.ensure_bridge(self.network))

    def _attach(
        self, cid: str, want_ip: str | None, want_mac: str | None, opts: RunOptions
    ) -> Attachment:
        """Check the bridge, lease an address; the container's :class:`Attachment`.
        NetworkError (bridge missing, no address free, address taken)."""
        from runtime.network import host_if_name, link, mac_from_id

        net = self.network
        link.ensure_bridge(net)  # before the lease: a missing bridge takes nothing
        ip = self.leases.lease_ip(net.subnet, cid, want_ip)
        return Attachment(
            ip=ip,
            prefixlen=net.network.prefixlen,
            gateway=net.gateway_ip,
            mac=want_mac or mac_from_id(cid),
            bridge=net.bridge,
            mtu=net.mtu,
            host_if=host_if_name(cid),
            subnet=str(net.network),
            dns=opts.dns,
            add_hosts=opts.add_hosts,
        )

    def _detach(self, cid: str, att: Attachment | None, release: bool = True) -> tuple[str, ...]:
        """Undo :meth:`_attach` and the plug: unpin the namespace, delete the veth, give the
        lease back (unless not ``release``).  Returns the errors (logged), never raises."""
        from runtime.network import NetworkError, host_if_name, link

        errors: builtins.list[str] = []
        try:
            link.remove_netns(self.store.container_dir(cid) / NETNS)
            link.delete_link(att.host_if if att else host_if_name(cid))
        except (NetworkError, OSError) as e:
            errors.append(str(e))
        from runtime.network import ports

        errors += ports.unpublish(self.port_tag, cid)
        if att is not None and release:
            try:
                self.leases.release_ip(att.subnet or self.network.subnet, cid)
            except (JaulaError, OSError) as e:
                errors.append(f"cannot release {att.ip}: {e}")
        for msg in errors:
            log.error("network.detach", id=cid[:12], error=msg)
        return tuple(errors)

    def adopt(
        self, cfg: ContainerConfig, state: State, *, replace_departed: bool = False
    ) -> Container:
        """Record on this node a container made elsewhere, with its own id: an incoming
        migration (``state`` migrating, incoming) or an imported checkpoint bundle
        (``state`` checkpointed).  Its directory, ``config.json`` and ``state.json`` are
        written under the store lock, as :meth:`run` writes them; its upperdir and what
        else it needs are the caller's to put in place, then :meth:`revive` runs it.

        ``replace_departed``: a record of the same id that says the container left this
        node (``migrated``) is replaced (it came back).

        Raises ContainerExists (the id is here, or the name is taken),
        InvalidContainerId (a malformed name)."""
        with self.store.lock():
            cdir = self.store.container_dir(cfg.id)
            if cdir.exists():
                try:
                    departed = Container(self, cfg.id).status is S.MIGRATED
                except (OSError, ValueError, JaulaError):
                    departed = False  # a half-written directory: not ours to replace
                if not (departed and replace_departed):
                    raise ContainerExists(
                        f"container {cfg.id[:12]} already exists on this node: remove it first "
                        "(`jaula rm -f`)",
                        cfg.id,
                    )
                shutil.rmtree(cdir)
            self.store.check_name(cfg.name)
            cdir = self.store.create_dir(cfg.id)
            atomic_write_json(cdir / CONFIG, cfg.to_json())
            atomic_write_json(cdir / STATE, state.to_json())
        return Container(self, cfg.id)

    def arm(self, container_id: str, restorer: str, arg: str) -> ArmedRestore:
        """Start the container's monitor in restore mode ahead of time: it loads
        ``restorer`` and waits for :meth:`revive` (``armed=``) or :meth:`disarm`.  Saves the
        interpreter's start-up (about 0.2 s) from a migration's downtime."""
        c = Container(self, container_id)
        fifo = c.dir / GO_FIFO
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        mon_pid, sync_r = _launch_monitor(c.dir, ("--restore-with", restorer, arg, "--armed"))
        armed = ArmedRestore(container_id, mon_pid, sc.proc_start_time(mon_pid), sync_r, fifo)
        with c.locked():
            c.state.monitor_pid, c.state.monitor_start_time = armed.mon_pid, armed.mon_start
            c.save()
        return armed

    def wait_armed(self, armed: ArmedRestore, timeout_s: float = 30.0) -> None:
        """Wait until an armed monitor has loaded its restorer and waits for ``go``: its
        start-up (about 0.15 s of interpreter and imports, more on a busy host) is then
        over before anything freezes.  Raises ContainerError if it died or is not ready
        after ``timeout_s`` seconds."""
        from runtime.store import ARMED_MARK

        mark = Path(armed.fifo).parent / ARMED_MARK

        def ready_or_dead() -> bool:
            return mark.exists() or not sc.is_alive(armed.mon_pid, armed.mon_start)

        if not wait_for(ready_or_dead, timeout_s, 0.002):
            raise ContainerError(
                f"the armed monitor {armed.mon_pid} was not ready after {timeout_s:.0f} s",
                armed.container_id,
            )
        if not mark.exists():
            raise ContainerError(
                f"the armed monitor {armed.mon_pid} died before it was ready",
                armed.container_id,
            )

    def disarm(self, armed: ArmedRestore) -> None:
        """Call off an armed restore: the monitor exits without restoring."""
        _tell_monitor(armed, b"cancel\n")
        try:
            _await_monitor(Path(armed.fifo).parent, armed.sync_r)
        except ContainerError:
            pass
        wait_for(lambda: not sc.is_alive(armed.mon_pid, armed.mon_start), 5.0, 0.01)

    def revive(
        self, container_id: str, restorer: str, arg: str, armed: ArmedRestore | None = None
    ) -> Container:
        """Bring a checkpointed container back to running through an external restorer.

        The caller has put the container's upperdir in place.  This mounts the overlay,
        creates the cgroup with the container's limits, and starts a monitor in restore
        mode, which calls ``restorer`` (``"module:function"``, see :mod:`runtime.monitor`)
        with ``arg`` so that the restored init is the monitor's child.  On failure every
        step is undone and the container stays ``checkpointed``; the error is raised.

        Raises ContainerError (wrong status, or the restorer's own error), MountError,
        CgroupError, ImageError (a layer is missing)."""
        require_root()
        c = Container(self, container_id)
        with c.locked():
            if not can(Operation.RESTORE, c.status):
                raise ContainerError(
                    f"container {c.name} ({c.id[:12]}) is {c.status.value}: only a checkpointed "
                    "or incoming container can be restored",
                    c.id,
                )
            for layer in c.config.layers:
                if not self.images.has_layer(layer):
                    raise ContainerError(
                        f"layer sha256:{layer} of container {c.name} is not in "
                        "this node's image store: import its image first",
                        c.id,
                    )
            layout = OverlayLayout.in_dir(
                c.dir, [self.images.layer_dir(la) for la in c.config.layers]
            )
            (c.dir / EXIT).unlink(missing_ok=True)
            cg = c.cgroup()
            mon_pid, mon_start = 0, None
            try:
                mount_overlay(layout, c.config.uid_map, c.config.gid_map)
                cg.create(c.config.resources)
                if armed is not None:
                    mon_pid, mon_start, sync_r = armed.mon_pid, armed.mon_start, armed.sync_r
                    _tell_monitor(armed, b"go\n")
                    armed = None  # told: from here on it is a plain restore
                else:
                    mon_pid, sync_r = _launch_monitor(c.dir, ("--restore-with", restorer, arg))
                    mon_start = sc.proc_start_time(mon_pid)
                # recorded before the (possibly long, held) restore, so that a restarted
                # node service can find the monitor holding the restored tasks
                c.state.monitor_pid, c.state.monitor_start_time = mon_pid, mon_start
                c.save()
                pid, start = _await_monitor(c.dir, sync_r)
                c.state = State(
                    status=S.RUNNING,
                    pid=pid,
                    pid_start_time=start,
                    monitor_pid=mon_pid,
                    monitor_start_time=mon_start,
                    started_at=c.state.started_at or time.time(),
                    migration=c.state.migration,
                    checkpointed_at=c.state.checkpointed_at,
                    restored_at=time.time(),
                )
                c.save()
            except BaseException:
                if armed is not None:  # failed before the monitor was told to go
                    with contextlib.suppress(ContainerError):
                        _tell_monitor(armed, b"cancel\n", timeout_s=1.0)
                    mon_pid, mon_start = armed.mon_pid, armed.mon_start
                _undo_start(layout, cg, mon_pid, mon_start)
                raise
        log.info("container.restored", id=c.id[:12], name=c.name, pid=pid)
        c._event("restore")
        return c


#: how long ``rm`` waits for another operation's lock before it gives up (or, ``rm -f``,
#: kills the container's processes and waits once more), in seconds
DELETE_LOCK_WAIT_S = 10.0


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (/proc/PID/task/TID/children); empty when it
    is gone."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                kids += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return kids


def _lock_holders(path: Path) -> list[int]:
    """Pids holding an flock on ``path`` (/proc/locks, matched by inode)."""
    try:
        ino = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(ino):
            with contextlib.suppress(ValueError):
                pids.append(int(f[4]))
    return sorted(set(pids))


def default_cgroup_parent(root: Path) -> str:
    """``jaula`` for the default state root, ``jaula-<hash of the root>`` for any other: two
    state roots on one host (two nodes) may hold the same container id (a migrated or
    imported container keeps its id), and must not share its cgroup."""
    from runtime.store import DEFAULT_ROOT

    if Path(root).resolve() == DEFAULT_ROOT:
        return "jaula"
    import hashlib

    return "jaula-" + hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ArmedRestore:
    """A monitor started in restore mode, waiting for ``go`` on ``fifo`` (see
    :meth:`Runtime.arm`)."""

    container_id: str
    mon_pid: int
    mon_start: int | None
    sync_r: int
    fifo: Path


def _tell_monitor(armed: ArmedRestore, word: bytes, timeout_s: float = 10.0) -> None:
    """Write ``word`` to an armed monitor's FIFO; raises ContainerError if it is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(armed.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if (
                e.errno != 6
                or time.monotonic() > deadline
                or not sc.is_alive(armed.mon_pid, armed.mon_start)
            ):  # 6: ENXIO, no reader yet
                raise ContainerError(
                    f"the armed monitor {armed.mon_pid} is not waiting: {e.strerror}",
                    armed.container_id,
                ) from e
            time.sleep(0.002)
            continue
        try:
            os.write(fd, word)
        finally:
            os.close(fd)
        return


def _check_userns_options(opts: RunOptions) -> str:
    """The container's user namespace mode (``host``, ``auto``, ``private``) from
    ``--userns``/``--uidmap``/``--gidmap``.  Raises ConfigError (one line) for maps with
    ``--userns``, a gid map alone, overlapping maps, a network jaula cannot give a user
    namespace (``host``, ``bridge``: their net namespace belongs to the host's user
    namespace, so the container could not mount its /sys)."""
    if opts.userns not in ("host", "auto"):
        raise ConfigError(f"--userns {opts.userns!r}: jaula supports host and auto")
    if opts.gid_map and not opts.uid_map:
        raise ConfigError("--gidmap needs --uidmap too")
    if opts.uid_map and opts.userns != "host":
        raise ConfigError("--uidmap and --userns=auto exclude each other: give one")
    check_maps(opts.uid_map, "--uidmap")
    check_maps(opts.gid_map, "--gidmap")
    mode = "private" if opts.uid_map else opts.userns
    if mode != "host":
        if host_id(opts.uid_map, 0) is None and opts.uid_map:
            raise ConfigError("--uidmap must map container uid 0 (the container's root)")
        if opts.network != "none":
            raise ConfigError(
                f"--network {opts.network} with a user namespace is not supported yet: "
                "use --network none, or --userns=host"
            )
        if opts.privileged:
            raise ConfigError("--privileged with a user namespace is not supported: drop one")
    return mode


def _stop_signal(value: str | None) -> int:
    from runtime.spec import parse_signal

    try:
        return parse_signal(value) if value else signal.SIGTERM
    except ConfigError:
        return signal.SIGTERM


def _rollback(
    cdir: Path, layout: OverlayLayout, cg: CgroupManager, mon_pid: int, mon_start: int | None
) -> None:
    """Undo a failed ``run``: processes, cgroup, monitor, mount, directory (in that order)."""
    import shutil

    _undo_start(layout, cg, mon_pid, mon_start)
    if not is_mountpoint(layout.merged):
        shutil.rmtree(cdir, ignore_errors=True)


def _undo_start(
    layout: OverlayLayout, cg: CgroupManager, mon_pid: int, mon_start: int | None
) -> None:
    """Kill what a failed start or restore started and unmount; errors are logged."""
    try:
        cg.destroy()
    except Exception as e:  # noqa: BLE001 - keep undoing, but say so
        log.error("run.rollback.cgroup", error=str(e))
    if not wait_for(lambda: not sc.is_alive(mon_pid, mon_start), 10.0, 0.01):
        os.kill(mon_pid, signal.SIGKILL)
    try:
        unmount(layout.merged)
    except Exception as e:  # noqa: BLE001
        log.error("run.rollback.unmount", error=str(e))


def _launch_monitor(cdir: Path, extra: tuple[str, ...] = ()) -> tuple[int, int]:
    """Start the container's monitor detached (double fork, own session, so it outlives the
    caller and is not its child).  Returns (monitor pid, read end of its report pipe)."""
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    log_fd = os.open(cdir / MONITOR_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    first = os.fork()
    if first == 0:
        try:
            os.setsid()
            second = os.fork()
            if second:
                os.write(pid_w, str(second).encode())
                os._exit(0)
            devnull = os.open("/dev/null", os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.set_inheritable(sync_w, True)
            from runtime.process import close_fds_except

            close_fds_except({sync_w})
            os.execv(
                sys.executable,
                [sys.executable, "-m", "runtime.monitor", str(cdir), str(sync_w), *extra],
            )
        finally:
            os._exit(127)
    os.close(sync_w)
    os.close(pid_w)
    os.close(log_fd)
    os.waitpid(first, 0)
    mon_pid = int(os.read(pid_r, 32) or b"0")
    os.close(pid_r)
    return mon_pid, sync_r


def _await_monitor(cdir: Path, sync_r: int) -> tuple[int, int]:
    """Read the monitor's report.  Returns (init host pid, init start time).  Raises
    ContainerError with the init's own reason when it could not start."""
    report = b""
    while chunk := os.read(sync_r, 65536):
        report += chunk
    os.close(sync_r)
    text = report.decode(errors="replace")
    if text.startswith("ok "):
        _, pid, start = text.split()
        return int(pid), int(start)
    if text.startswith("error "):
        raise ContainerError(f"the container failed to start: {text[6:]}")
    tail = ""
    with contextlib.suppress(OSError):
        tail = (cdir / MONITOR_LOG).read_text()[-500:].strip()
    raise ContainerError(f"the container monitor died before starting it: {tail or 'no output'}")


def resolve_user(rootfs: Path, spec: str) -> User:
    """``UID[:GID]`` or ``NAME[:GROUP]`` against the image's /etc/passwd and /etc/group.

    Raises ConfigError naming the user or group not found."""
    user, _, group = spec.partition(":")
    passwd = _read_db(rootfs, "/etc/passwd")
    groups = _read_db(rootfs, "/etc/group")
    if user.isdigit():
        uid = int(user)
        entry = next((e for e in passwd if e[2] == user), None)
        gid = int(entry[3]) if entry else 0
        uname = entry[0] if entry else None
    else:
        entry = next((e for e in passwd if e[0] == user), None)
        if entry is None:
            raise ConfigError(
                f"unable to find user {user}: no matching entries in the image's "
                "/etc/passwd; use a numeric UID[:GID]"
            )
        uid, gid, uname = int(entry[2]), int(entry[3]), entry[0]
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((e for e in groups if e[0] == group), None)
            if g is None:
                raise ConfigError(
                    f"unable to find group {group}: no matching entries in the image's /etc/group"
                )
            gid = int(g[2])
    extra: tuple[int, ...] = ()
    if uname:
        extra = tuple(
            sorted(
                {
                    int(e[2])
                    for e in groups
                    if len(e) > 3 and uname in e[3].split(",") and e[2].isdigit()
                }
            )
        )
    return User(uid, gid, extra)


def _read_db(rootfs: Path, path: str) -> list[list[str]]:
    try:
        with open(secure_join(str(rootfs), path)) as f:
            return [
                line.rstrip("\n").split(":")
                for line in f
                if line.strip() and not line.startswith("#") and line.count(":") >= 2
            ]
    except OSError:
        return []


def make_workdir(rootfs: Path, cwd: str, user: User) -> None:
    """Create the working directory in the rootfs when the image lacks it (as Podman does),
    owned by the container's user.  Raises ConfigError when it exists but is not a
    directory."""
    host = secure_join(str(rootfs), cwd)
    if os.path.isdir(host):
        return
    if os.path.lexists(host):
        raise ConfigError(f"cannot use working directory {cwd}: it is not a directory in the image")
    os.makedirs(host, mode=0o755)
    os.chown(host, user.uid, user.gid)


def check_command(rootfs: Path, program: str, env: tuple[str, ...], cwd: str) -> None:
    """Raise ConfigError when ``program`` is not found in the image (by path, or through the
    container's ``PATH``), before anything is started."""
    root = str(rootfs)

    def check_exec(host: str) -> None:
        if os.path.isdir(host) or not os.access(host, os.X_OK):
            raise CommandNotExecutable(
                f"{program}: permission denied: not an executable file in the image"
            )

    if "/" in program:
        p = program if program.startswith("/") else os.path.join(cwd, program)
        host = secure_join(root, p)
        if not os.path.exists(host):
            raise CommandNotFound(f"{program}: no such file or directory in the image")
        check_exec(host)
        return
    path = dict(kv.partition("=")[::2] for kv in env).get("PATH", "")
    for d in path.split(":"):
        host = secure_join(root, os.path.join(d, program)) if d else ""
        if host and os.path.exists(host):
            check_exec(host)
            return
    raise CommandNotFound(f"executable file {program!r} not found in $PATH ({path}) of the image")
