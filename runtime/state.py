"""Container status machine and the state file.

Status names are OCI's lowercase ones (runtime-spec ``state.md``: creating, created, running,
stopped; ``paused`` as runc reports it) plus jaula's own for checkpoint and migration.

The transition table :data:`TRANSITIONS` lists every allowed move; :func:`check_transition`
raises :class:`runtime.errors.InvalidStateTransition` naming both states otherwise.

On disk each container directory holds ``state.json`` (written by the CLI/library under the
container lock, atomically: temp file, fsync, rename) and ``exit.json`` (written once by the
monitor when the init exits).  Reading always refreshes from facts: a ``running`` container
whose init (pid + start time) is gone is ``stopped``.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.errors import InvalidStateTransition


class ContainerStatus(enum.Enum):
    """Where a container is in its life."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CHECKPOINTED = "checkpointed"
    MIGRATING = "migrating"
    MIGRATED = "migrated"


S = ContainerStatus

#: Allowed moves: from -> the statuses reachable in one operation.
TRANSITIONS: dict[ContainerStatus, frozenset[ContainerStatus]] = {
    S.CREATED: frozenset({S.RUNNING, S.STOPPED}),
    S.RUNNING: frozenset({S.PAUSED, S.STOPPED, S.CHECKPOINTED, S.MIGRATING}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPED, S.CHECKPOINTED, S.MIGRATING}),
    S.STOPPED: frozenset({S.RUNNING, S.CHECKPOINTED}),  # restore of a kept checkpoint (C17)
    S.CHECKPOINTED: frozenset({S.RUNNING, S.STOPPED}),
    S.MIGRATING: frozenset({S.RUNNING, S.PAUSED, S.MIGRATED, S.STOPPED}),
    S.MIGRATED: frozenset({S.RUNNING}),
}


def check_transition(
    container_id: str, current: ContainerStatus, target: ContainerStatus, action: str
) -> None:
    """Raise InvalidStateTransition unless ``current -> target`` is in :data:`TRANSITIONS`."""
    if target not in TRANSITIONS[current]:
        raise InvalidStateTransition(container_id, current.value, target.value, action)


@dataclass
class State:
    """What ``state.json`` holds.

    Attributes:
        status: the container's status.
        pid: host pid of the container init (pid 1 in its pid namespace), 0 when none.
        pid_start_time: start time of ``pid`` in clock ticks since boot (liveness check).
        monitor_pid / monitor_start_time: the same for the container's monitor.
        started_at / finished_at: wall-clock seconds since the epoch, 0 when not yet.
        exit_code: the init's exit code, or 128+signal when killed; None while it runs.
        oom_killed: whether the kernel OOM-killed a task of the container.
        migrated_to: the node that owns the container after a migration.
    """

    status: ContainerStatus = ContainerStatus.CREATED
    pid: int = 0
    pid_start_time: int | None = None
    monitor_pid: int = 0
    monitor_start_time: int | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    exit_code: int | None = None
    oom_killed: bool = False
    migrated_to: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> State:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["status"] = ContainerStatus(kw.get("status", "created"))
        return cls(**kw)


@dataclass(frozen=True)
class ExitRecord:
    """What the monitor writes to ``exit.json`` when the init exits.

    Attributes:
        exit_code: exit status, or 128 + signal number when killed by a signal.
        signal: the signal that killed the init, or 0.
        finished_at: wall-clock seconds since the epoch.
        oom_killed: whether the cgroup recorded an OOM kill.
    """

    exit_code: int
    signal: int
    finished_at: float
    oom_killed: bool


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically: temp file in the same dir, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: Path) -> Any:
    """Read a JSON file; raises FileNotFoundError or ValueError."""
    with open(path) as f:
        return json.load(f)
