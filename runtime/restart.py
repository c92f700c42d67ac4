"""Restart policies (``--restart``, as Podman spells them) carried out by the monitor.

===================  ==========================================================================
``no``               never restart (the default)
``on-failure[:N]``   restart when the init exits non-zero (or is killed), at most N times
                     (no N: without limit)
``always``           restart whatever the exit code
``unless-stopped``   as ``always`` (Podman's difference, not restarting after a reboot of a
                     container stopped by the user, needs a boot-time service jaula has not)
===================  ==========================================================================

A container stopped or removed by the user (``jaula stop``, ``rm -f``: they make the file
``stop-requested``) is not restarted.  Between two starts the monitor waits
:func:`backoff_s`: 100 ms doubling up to 60 s (Docker's and Podman's shape), back to 100 ms
after a run of :data:`RESET_AFTER_S` seconds or more.

Files in the container directory (names in :mod:`runtime.store`): ``restart.json``
``{"name": "on-failure", "max_retries": 3}`` written at create time; ``init.json``
``{"pid", "start_time", "started_at", "restart_count"}`` written by the monitor after each
restart, read by :meth:`runtime.container.Container.refresh` to follow the new init.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from runtime.state import atomic_write_json, read_json
from runtime.store import INIT, RESTART

#: a run at least this long (seconds) resets the backoff
RESET_AFTER_S = 10.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 60.0


class RestartName(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    UNLESS_STOPPED = "unless-stopped"


@dataclass(frozen=True)
class RestartPolicy:
    """A parsed ``--restart`` value; ``max_retries`` 0 means no limit (on-failure only)."""

    name: RestartName = RestartName.NO
    max_retries: int = 0

    def __str__(self) -> str:
        if self.name is RestartName.ON_FAILURE and self.max_retries:
            return f"on-failure:{self.max_retries}"
        return self.name.value

    def should_restart(self, exit_code: int, restarts_so_far: int) -> bool:
        """Whether the monitor starts the init again after it exited with ``exit_code``
        (128+signal when killed), having restarted it ``restarts_so_far`` times."""
        if self.name is RestartName.NO:
            return False
        if self.name is RestartName.ON_FAILURE:
            if exit_code == 0:
                return False
            return not self.max_retries or restarts_so_far < self.max_retries
        return True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name.value, "max_retries": self.max_retries}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RestartPolicy:
        return cls(RestartName(d["name"]), int(d.get("max_retries", 0)))


_SPEC = re.compile(r"^(no|always|unless-stopped|on-failure)(?::(\d+))?$")


def parse_restart(value: str) -> RestartPolicy:
    """``no``, ``always``, ``unless-stopped`` or ``on-failure[:N]``.  Raises ConfigError."""
    m = _SPEC.match(value.strip())
    if m is None:
        raise ConfigError(
            f"invalid --restart {value!r}: use no, always, unless-stopped or on-failure[:N]"
        )
    name = RestartName(m.group(1))
    if m.group(2) is not None and name is not RestartName.ON_FAILURE:
        raise ConfigError(f"invalid --restart {value!r}: only on-failure takes a retry count")
    return RestartPolicy(name, int(m.group(2) or 0))


def backoff_s(restarts_so_far: int) -> float:
    """Seconds to wait before restart number ``restarts_so_far + 1``."""
    return float(min(BACKOFF_FIRST_S * (2 ** min(restarts_so_far, 20)), BACKOFF_MAX_S))


def save_policy(cdir: Path, policy: RestartPolicy) -> None:
    atomic_write_json(cdir / RESTART, policy.to_json())


def load_policy(cdir: Path) -> RestartPolicy:
    """The container's policy; ``no`` when it has none."""
    try:
        return RestartPolicy.from_json(read_json(cdir / RESTART))
    except FileNotFoundError:
        return RestartPolicy()


@dataclass(frozen=True)
class InitRecord:
    """What ``init.json`` holds: the init the monitor started last."""

    pid: int
    start_time: int | None
    started_at: float
    restart_count: int


def save_init(cdir: Path, rec: InitRecord) -> None:
    atomic_write_json(cdir / INIT, rec.__dict__)


def load_init(cdir: Path) -> InitRecord | None:
    try:
        return InitRecord(**read_json(cdir / INIT))
    except (FileNotFoundError, ValueError, TypeError):
        return None
