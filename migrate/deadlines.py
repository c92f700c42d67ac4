"""Time limits for the steps that run while a container is frozen (or, on a destination,
half restored): past its limit a step is given up, its CRIU killed, the cgroup thawed and
the migration or checkpoint rolled back, so that no stuck CRIU keeps a container frozen.

Each limit is a base plus a part per GiB of the container's size, as KubeVirt bounds a live
migration by ``completionTimeoutPerGiB`` seconds per GiB of memory (and of ephemeral disk)
and aborts one that makes no progress for ``progressTimeout`` seconds (kubevirt/user-guide,
docs/operations/live_migration.md, "Migration timeouts": 800 s/GiB and 150 s by default).
KubeVirt's guest keeps running while it copies; ours is frozen, so the limits here are far
tighter: a floor that a small container on a busy host never reaches, and a pace per GiB
about ten times slower than these machines dump or restore (~300 MiB/s through TLS).  The
transfer's progress limit is the link's peer timeout (:mod:`migrate.stream`: no credit for
that long, and the destination is given up).

``$JAULA_LIMIT_SCALE`` (a positive number, default 1) multiplies every limit: above 1 for
a slow host, below 1 for tests that wait for a limit on purpose.

A CRIU killed at its limit is the last resort: the tasks it had seized are let go by the
kernel when it dies, but a task it had injected its parasite into at that moment may not
survive it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1 << 30
SCALE_ENV = "JAULA_LIMIT_SCALE"


@dataclass(frozen=True)
class Limit:
    """``base_s`` seconds plus ``per_gib_s`` seconds per GiB."""

    base_s: float
    per_gib_s: float = 0.0

    def for_bytes(self, size_bytes: int, scale: float = 1.0) -> float:
        """Seconds allowed for a container of ``size_bytes`` (negative sizes count as 0)."""
        return scale * (self.base_s + self.per_gib_s * max(size_bytes, 0) / GIB)


@dataclass(frozen=True)
class FrozenLimits:
    """The limits of each frozen step (seconds; sizes: the container's memory for the CRIU
    steps, memory plus upperdir for the transfer).

    Attributes:
        freeze: the cgroup freezer, from FREEZING to FROZEN.
        dump: CRIU's dump, from the request to its ``post-dump`` notification (the pages
            included, when they stream to a page server).
        transfer: the images and the upperdir delta, until the destination confirmed each.
        restore: the destination's restore, until its tasks are held at ``pre-resume``.
        resume: CRIU resuming the tasks after ``post-dump`` was answered "failure" (the roll
            back), or a failed restore ending after its tasks were killed.
        scale: :data:`SCALE_ENV`, applied to every limit.
    """

    freeze: Limit = Limit(10.0)
    dump: Limit = Limit(30.0, 30.0)
    transfer: Limit = Limit(60.0, 60.0)
    restore: Limit = Limit(60.0, 30.0)
    resume: Limit = Limit(15.0, 15.0)
    scale: float = 1.0

    def freeze_s(self, memory_bytes: int) -> float:
        return self.freeze.for_bytes(memory_bytes, self.scale)

    def dump_s(self, memory_bytes: int) -> float:
        return self.dump.for_bytes(memory_bytes, self.scale)

    def transfer_s(self, size_bytes: int) -> float:
        return self.transfer.for_bytes(size_bytes, self.scale)

    def restore_s(self, memory_bytes: int) -> float:
        return self.restore.for_bytes(memory_bytes, self.scale)

    def resume_s(self, memory_bytes: int) -> float:
        return self.resume.for_bytes(memory_bytes, self.scale)

    @classmethod
    def from_env(cls) -> FrozenLimits:
        """The default limits, scaled by ``$JAULA_LIMIT_SCALE``.  Raises ValueError (one
        line, what to write instead) when it is not a positive number."""
        raw = os.environ.get(SCALE_ENV, "").strip()
        if not raw:
            return cls()
        try:
            scale = float(raw)
        except ValueError:
            scale = -1.0
        if not 0 < scale < 1e6:
            raise ValueError(
                f"${SCALE_ENV}={raw!r} is not a positive number: unset it, or write e.g. 2 "
                "for limits twice as long"
            )
        return cls(scale=scale)
