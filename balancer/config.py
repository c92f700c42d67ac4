"""The balancer's settings: :class:`BalancerConfig`, read from a TOML file's ``[balancer]``
table (or the whole file when it has none)::

    # /etc/jaula/balancer.toml (every key optional; the defaults and where they come from)
    [balancer]
    interval_s = 10.0            # one round (Proxmox's HA manager: about 10 s)
    threshold = 0.3              # imbalance (stddev / mean of node loads) that is too much (Proxmox)
    hold_rounds = 3              # rounds it must stay above before anything moves (Proxmox)
    margin = 0.10                # a move's relief must beat its cost by this share (Proxmox: 10 %)
    overload_percent = 80.0      # no destination goes above this, CPU or memory (oVirt)
    trigger_on_overload = true   # a node above overload_percent for hold_rounds triggers too (oVirt)
    max_in_flight = 5            # moves at once in the cluster (KubeVirt)
    max_in_flight_per_node = 2   # moves at once touching one node (KubeVirt: outbound)
    cooldown_s = 900             # a moved container rests max(this, its last move's time) (KubeVirt)
    cooldown_max_s = 21600       # ... doubled per move within backoff_window_s, up to this (KubeVirt)
    backoff_window_s = 172800    # 48 h (KubeVirt)
    destination_backoff_s = 300  # a destination that failed a move rests this long, doubled per failure
    candidate_nodes = 8          # most/least loaded nodes searched per move (see balancer.policy)
    memory_reserve_bytes = 536870912   # free memory a destination keeps after the move
    cost_per_downtime_s = 0.02   # node load levelled that 1 s of predicted downtime is worth
    cost_per_total_s = 0.002     # node load levelled that 1 s of predicted migration time is worth
    strategies = ["postcopy", "cold"]  # strategies the balancer may choose
    link_bytes_per_s = 125000000.0     # for image layers the destination lacks
    prior_weight = 2.0           # weight of each README benchmark row in the cost model
    load_from = "host"           # a node's load: "host" (psutil: the whole host) or
                                 # "containers" (its containers' share: nodes sharing a host)
    move_timeout_s = 600.0       # the longest the daemon waits for one move's report
    settle_s = 15.0              # a node a move arrived at takes no other for this long: its
                                 # figures lag (the node's 10 s averaging window, a round)

Unknown keys are errors; every error is one :class:`~balancer.errors.BalancerConfigError`
line naming the file, the key, what is wrong and what to write.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from balancer.costmodel import STRATEGIES
from balancer.errors import BalancerConfigError

#: where a node's load comes from (see ``load_from`` in the module docstring)
LOAD_FROM = ("host", "containers")


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """The policy's parameters (see the module docstring for each one's meaning and source)."""

    interval_s: float = 10.0
    threshold: float = 0.3
    hold_rounds: int = 3
    margin: float = 0.10
    overload_percent: float = 80.0
    trigger_on_overload: bool = True
    max_in_flight: int = 5
    max_in_flight_per_node: int = 2
    cooldown_s: float = 900.0
    cooldown_max_s: float = 21600.0
    backoff_window_s: float = 172800.0
    destination_backoff_s: float = 300.0
    candidate_nodes: int = 8
    memory_reserve_bytes: int = 512 << 20
    cost_per_downtime_s: float = 0.02
    cost_per_total_s: float = 0.002
    strategies: tuple[str, ...] = ("postcopy", "cold")
    link_bytes_per_s: float = 125e6
    prior_weight: float = 2.0
    load_from: str = "host"
    move_timeout_s: float = 600.0
    settle_s: float = 15.0

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            key, what = problem
            raise BalancerConfigError(f"balancer.{key}: {what}", key=f"balancer.{key}")

    def problem(self) -> tuple[str, str] | None:
        """The first ``(key, what is wrong)`` in these settings, or None when they are usable."""
        positive = (
            "interval_s",
            "threshold",
            "overload_percent",
            "link_bytes_per_s",
            "move_timeout_s",
        )
        for k in positive:
            if not getattr(self, k) > 0:
                return k, f"must be > 0, got {getattr(self, k)!r}"
        at_least_one = ("hold_rounds", "max_in_flight", "max_in_flight_per_node", "candidate_nodes")
        for k in at_least_one:
            if getattr(self, k) < 1:
                return k, f"must be an integer >= 1, got {getattr(self, k)!r}"
        non_negative = (
            "margin",
            "cooldown_s",
            "cooldown_max_s",
            "backoff_window_s",
            "destination_backoff_s",
            "memory_reserve_bytes",
            "cost_per_downtime_s",
            "cost_per_total_s",
            "prior_weight",
            "settle_s",
        )
        for k in non_negative:
            if getattr(self, k) < 0:
                return k, f"must be >= 0, got {getattr(self, k)!r}"
        if self.overload_percent > 100:
            return "overload_percent", f"is a percentage (<= 100), got {self.overload_percent!r}"
        if self.margin >= 1:
            return "margin", f"is a fraction below 1 (0.10 = 10 %), got {self.margin!r}"
        if self.cooldown_max_s < self.cooldown_s:
            return "cooldown_max_s", (
                f"({self.cooldown_max_s}) must be >= cooldown_s ({self.cooldown_s})"
            )
        if self.max_in_flight_per_node > self.max_in_flight:
            return "max_in_flight_per_node", (
                f"({self.max_in_flight_per_node}) must be <= max_in_flight ({self.max_in_flight})"
            )
        if self.load_from not in LOAD_FROM:
            return "load_from", f"must be one of {list(LOAD_FROM)}, got {self.load_from!r}"
        if not self.strategies:
            return "strategies", f"must name at least one of {list(STRATEGIES)}"
        for s in self.strategies:
            if s not in STRATEGIES:
                return "strategies", f"{s!r} is not a strategy; use some of {list(STRATEGIES)}"
        return None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "") -> BalancerConfig:
        """Settings from a parsed TOML table (``source`` names the file in errors).

        Raises:
            BalancerConfigError: an unknown key, a value of the wrong type, or a value out
                of range (one line: file, key, problem, what to write).
        """
        where = f"{source}: " if source else ""
        types = {f.name: f.type for f in fields(cls)}
        defaults = cls()
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in types:
                known = ", ".join(sorted(types))
                raise BalancerConfigError(
                    f"{where}balancer.{key}: unknown key; the keys are: {known}",
                    path=source,
                    key=f"balancer.{key}",
                )
            kwargs[key] = _convert(key, value, getattr(defaults, key), where, source)
        try:
            return cls(**kwargs)
        except BalancerConfigError as e:
            raise BalancerConfigError(f"{where}{e}", path=source, key=e.key) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> BalancerConfig:
        """Settings from the TOML file ``path`` (its ``[balancer]`` table, or its top level).

        Raises:
            BalancerConfigError: the file is missing, unreadable or not TOML, or a setting
                is wrong (see :meth:`from_mapping`).
        """
        p = Path(path)
        try:
            with open(p, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise BalancerConfigError(
                f"{p}: no such file; write one with a [balancer] table, e.g. "
                "'[balancer]\\nthreshold = 0.3'",
                path=str(p),
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise BalancerConfigError(f"{p}: not valid TOML: {e}", path=str(p)) from None
        except OSError as e:
            raise BalancerConfigError(f"{p}: cannot read: {e.strerror or e}", path=str(p)) from e
        table = data.get("balancer", data)
        if not isinstance(table, Mapping):
            raise BalancerConfigError(f"{p}: balancer: must be a table", path=str(p))
        return cls.from_mapping(table, source=str(p))


def _convert(key: str, value: Any, default: Any, where: str, source: str) -> Any:
    def bad(expected: str) -> BalancerConfigError:
        return BalancerConfigError(
            f"{where}balancer.{key}: must be {expected}, got {value!r}",
            path=source,
            key=f"balancer.{key}",
        )

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad('a list of strings, e.g. ["postcopy", "cold"]')
        return tuple(value)
    raise bad(type(default).__name__)  # pragma: no cover - every field is one of the above
