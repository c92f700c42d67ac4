"""Container status machine and the state file.

Status names are OCI's lowercase ones (runtime-spec ``state.md``: creating, created, running,
stopped; ``paused`` as runc reports it) plus jaula's own for checkpoint and migration.

The transition table :data:`TRANSITIONS` lists every allowed move; :func:`check_transition`
raises :class:`runtime.errors.InvalidStateTransition` naming both states otherwise.  Each
operation's precondition comes from one table too, :data:`OPERATIONS` (the statuses it
starts from and the one it leads to), read through :func:`can` and :func:`require`.

A container that takes part in a migration carries a typed :class:`MigrationRecord`: its
session, its direction (``outgoing`` on the source, ``incoming`` on the destination), the
peer node and, on the source once committed, when.  A post-copy restore that still waits
for pages carries a :class:`PostcopyRecord`.

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
from dataclasses import asdict, dataclass, fields
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


class Operation(enum.Enum):
    """What can be done to a container, each with its precondition in :data:`OPERATIONS`."""

    START = "start"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    STOP = "stop"
    SIGNAL = "signal"
    EXEC = "exec into"
    CHECKPOINT = "checkpoint"
    RESTORE = "restore"
    MIGRATE_OUT = "migrate"
    COMMIT_OUT = "commit"
    ROLL_BACK = "roll back"


#: operation -> (the statuses it may start from, the status it leads to; None: unchanged).
#: Every ``(from, to)`` pair here is also in :data:`TRANSITIONS` (a unit test checks it).
OPERATIONS: dict[Operation, tuple[frozenset[ContainerStatus], ContainerStatus | None]] = {
    Operation.START: (frozenset({S.CREATED, S.STOPPED}), S.RUNNING),
    Operation.PAUSE: (frozenset({S.RUNNING}), S.PAUSED),
    Operation.UNPAUSE: (frozenset({S.PAUSED}), S.RUNNING),
    Operation.STOP: (frozenset({S.RUNNING, S.PAUSED}), S.STOPPED),
    Operation.SIGNAL: (frozenset({S.RUNNING, S.PAUSED}), None),
    Operation.EXEC: (frozenset({S.RUNNING}), None),
    Operation.CHECKPOINT: (frozenset({S.RUNNING}), S.CHECKPOINTED),
    Operation.RESTORE: (frozenset({S.CHECKPOINTED, S.MIGRATING}), S.RUNNING),
    Operation.MIGRATE_OUT: (frozenset({S.RUNNING}), S.MIGRATING),
    Operation.COMMIT_OUT: (frozenset({S.MIGRATING}), S.MIGRATED),
    Operation.ROLL_BACK: (frozenset({S.MIGRATING}), S.RUNNING),
}


def can(op: Operation, status: ContainerStatus) -> bool:
    """Whether ``op`` may start from ``status`` (:data:`OPERATIONS`)."""
    return status in OPERATIONS[op][0]


def require(op: Operation, container_id: str, status: ContainerStatus) -> None:
    """Raise InvalidStateTransition (naming the status, the operation and what it needs)
    unless ``op`` may start from ``status``."""
    allowed, target = OPERATIONS[op]
    if status not in allowed:
        raise InvalidStateTransition(container_id, status.value, (target or status).value, op.value)


class MigrationDirection(enum.Enum):
    """Which side of a migration a container record is on."""

    OUTGOING = "outgoing"  #: on the source: the container leaves (or left) this node
    INCOMING = "incoming"  #: on the destination: the container arrives on this node


@dataclass(frozen=True)
class MigrationRecord:
    """The migration a container takes (or took) part in, kept in ``state.json``.

    Attributes:
        session: the session id (16 hex characters), as in the protocol's messages.
        direction: outgoing (this node is the source) or incoming (the destination).
        peer: the other node's name (the destination of an outgoing one, the source of an
            incoming one).
        committed_at: outgoing only: wall-clock seconds since the epoch at the commit
            point (the record that decides a recovery), None before.
    """

    session: str
    direction: MigrationDirection
    peer: str
    committed_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "direction": self.direction.value,
            "peer": self.peer,
            "committed_at": self.committed_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MigrationRecord:
        return cls(
            session=str(d["session"]),
            direction=MigrationDirection(d["direction"]),
            peer=str(d["peer"]),
            committed_at=d.get("committed_at"),
        )


@dataclass(frozen=True)
class PostcopyRecord:
    """A restored container whose memory is still arriving (post-copy): the lazy-pages
    daemon that brings it.  A dump meanwhile would miss the pages not yet here.

    Attributes:
        session: the migration session; source: the node that serves the pages.
        daemon_pid / daemon_start: the ``criu lazy-pages`` process (pid and start time in
            clock ticks since boot, for the liveness check).
    """

    session: str
    source: str
    daemon_pid: int
    daemon_start: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PostcopyRecord:
        return cls(
            session=str(d["session"]),
            source=str(d["source"]),
            daemon_pid=int(d["daemon_pid"]),
            daemon_start=d.get("daemon_start"),
        )


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
        migration: the migration this container takes or took part in, or None.
        postcopy: set while a post-copy restore's memory is still arriving.
        checkpointed_at / restored_at: wall-clock seconds of the last local checkpoint and
            of the last restore (local or migration), 0 when never.
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
    migration: MigrationRecord | None = None
    postcopy: PostcopyRecord | None = None
    checkpointed_at: float = 0.0
    restored_at: float = 0.0

    @property
    def incoming(self) -> bool:
        """Whether this is a destination's record of a container still arriving."""
        return (
            self.status is ContainerStatus.MIGRATING
            and self.migration is not None
            and self.migration.direction is MigrationDirection.INCOMING
        )

    @property
    def outgoing(self) -> bool:
        """Whether this is a source's record of a container leaving (not yet committed)."""
        return self.status is ContainerStatus.MIGRATING and not self.incoming

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["migration"] = self.migration.to_json() if self.migration else None
        d["postcopy"] = self.postcopy.to_json() if self.postcopy else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> State:
        """Read ``state.json``; also one written before the typed records (their fields in
        a free-form ``extra`` map: ``session``, ``from``, ``migrated_at``, ``postcopy``)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["status"] = ContainerStatus(kw.get("status", "created"))
        mig, pc = kw.pop("migration", None), kw.pop("postcopy", None)
        extra = d.get("extra") or {}
        if mig is None and extra.get("session"):
            came_from = extra.get("from")
            mig = {
                "session": extra["session"],
                "direction": "incoming" if came_from else "outgoing",
                "peer": came_from or d.get("migrated_to") or "",
                "committed_at": extra.get("migrated_at"),
            }
        if pc is None and isinstance(extra.get("postcopy"), dict):
            pc = {**extra["postcopy"], "source": extra["postcopy"].get("from", "")}
        for k in ("checkpointed_at", "restored_at"):
            if k not in kw and k in extra:
                kw[k] = float(extra[k])
        kw["migration"] = MigrationRecord.from_json(mig) if mig else None
        kw["postcopy"] = PostcopyRecord.from_json(pc) if pc else None
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
