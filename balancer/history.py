"""What the balancer remembers between rounds: :class:`MoveHistory`.

The policy is pure (``plan(view, cfg, history, now)``); everything it must remember lives
here and is recorded by its caller (the daemon, or the simulator):

* every round's measured imbalance and whether it was "hot" (above the threshold, or a node
  overloaded): the hysteresis reads the last ``hold_rounds`` of them;
* every move, from the moment it is requested (in flight: counts against the caps) to its
  outcome, with the measured downtime, total time and bytes of its migration report: the
  cool-downs, the no-return rule, the destination back-off and the cost model read them.

A history is immutable; ``with_*`` return a new one.  :meth:`MoveHistory.pruned` drops what no
rule can read any more (moves finished before the back-off window, rounds beyond the hold).

The cool-down is KubeVirt's descheduler plugin ``KubevirtMigrationAware`` (enabled in the
``KubeVirtRelieveAndMigrate`` profile, openshift/cluster-kube-descheduler-operator PR 1881):
after a move a container rests ``max(cooldown_s, duration of its last move)``, doubled for
every further move within ``backoff_window_s`` (48 h), capped at ``cooldown_max_s`` (6 h).
jaula counts failed moves too (the issue: a failed move backs off the container and its
destination).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace

from balancer.config import BalancerConfig
from balancer.costmodel import MigrationSample, PredictedCost


@dataclass(frozen=True, slots=True)
class MoveRecord:
    """One move the balancer requested.  ``finished_s`` is None while it is in flight; ``ok``
    then says whether the container runs on ``destination`` (False: it stayed on ``source``).
    ``memory_bytes`` and ``dirty_bytes_per_s`` are the container's when it was chosen;
    ``downtime_s``, ``total_s`` and ``bytes_sent`` come from its migration report."""

    container: str
    source: str
    destination: str
    strategy: str
    started_s: float
    memory_bytes: int
    dirty_bytes_per_s: float = 0.0
    predicted: PredictedCost | None = None
    finished_s: float | None = None
    ok: bool = False
    downtime_s: float = 0.0
    total_s: float = 0.0
    bytes_sent: int = 0

    @property
    def in_flight(self) -> bool:
        return self.finished_s is None


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round: when (``at_s``), the ``imbalance`` measured, and whether it was ``hot``."""

    at_s: float
    imbalance: float
    hot: bool


@dataclass(frozen=True)
class MoveHistory:
    """Moves (oldest first) and rounds (oldest first); see the module docstring."""

    moves: tuple[MoveRecord, ...] = ()
    rounds: tuple[RoundRecord, ...] = ()

    # -- recording ---------------------------------------------------------------------------

    def with_round(self, at_s: float, imbalance: float, hot: bool) -> MoveHistory:
        return replace(self, rounds=(*self.rounds, RoundRecord(at_s, imbalance, hot)))

    def with_started(self, move: MoveRecord) -> MoveHistory:
        return replace(self, moves=(*self.moves, move))

    def with_finished(
        self,
        container: str,
        *,
        finished_s: float,
        ok: bool,
        downtime_s: float = 0.0,
        total_s: float = 0.0,
        bytes_sent: int = 0,
    ) -> MoveHistory:
        """The history with ``container``'s move in flight given its outcome.

        Raises:
            KeyError: ``container`` has no move in flight.
        """
        for i in range(len(self.moves) - 1, -1, -1):
            m = self.moves[i]
            if m.container == container and m.in_flight:
                done = replace(
                    m,
                    finished_s=finished_s,
                    ok=ok,
                    downtime_s=downtime_s,
                    total_s=total_s if total_s > 0 else finished_s - m.started_s,
                    bytes_sent=bytes_sent,
                )
                return replace(self, moves=(*self.moves[:i], done, *self.moves[i + 1 :]))
        raise KeyError(f"container {container!r} has no move in flight")

    def pruned(self, now_s: float, cfg: BalancerConfig) -> MoveHistory:
        """Without what no rule reads any more: finished moves older than the back-off window
        (the cost model's samples of them go too) and all but the last ``hold_rounds``
        rounds."""
        horizon = now_s - cfg.backoff_window_s
        moves = tuple(m for m in self.moves if m.in_flight or (m.finished_s or 0.0) >= horizon)
        return MoveHistory(moves, self.rounds[-cfg.hold_rounds :])

    # -- reading -----------------------------------------------------------------------------

    @functools.cached_property
    def _finished_by_container(self) -> dict[str, list[MoveRecord]]:
        out: dict[str, list[MoveRecord]] = {}
        for m in self.moves:
            if not m.in_flight:
                out.setdefault(m.container, []).append(m)
        return out

    @functools.cached_property
    def _failures_by_destination(self) -> dict[str, list[MoveRecord]]:
        out: dict[str, list[MoveRecord]] = {}
        for m in self.moves:
            if not m.in_flight and not m.ok:
                out.setdefault(m.destination, []).append(m)
        return out

    def in_flight(self) -> tuple[MoveRecord, ...]:
        return tuple(m for m in self.moves if m.in_flight)

    def samples(self) -> Iterable[MigrationSample]:
        """The measured migrations (successful moves), oldest first, for the cost model."""
        for m in self.moves:
            if not m.in_flight and m.ok and m.total_s > 0:
                yield MigrationSample(
                    m.strategy,
                    m.memory_bytes,
                    m.dirty_bytes_per_s,
                    m.downtime_s,
                    m.total_s,
                    m.bytes_sent,
                )

    def hot_streak(self) -> int:
        """How many of the latest rounds in a row were hot."""
        n = 0
        for r in reversed(self.rounds):
            if not r.hot:
                break
            n += 1
        return n

    def cooldown_until_s(self, container: str, now_s: float, cfg: BalancerConfig) -> float:
        """Until when ``container`` rests after its moves (0.0: it does not).

        ``max(cooldown_s, last move's total_s) * 2 ** (moves within the window - 1)``, at most
        ``cooldown_max_s``, from the end of its last move (KubeVirt's three layers).
        """
        recent = [
            m
            for m in self._finished_by_container.get(container, ())
            if (m.finished_s or 0.0) >= now_s - cfg.backoff_window_s
        ]
        if not recent:
            return 0.0
        last = recent[-1]
        base = max(cfg.cooldown_s, last.total_s)
        rest = min(cfg.cooldown_max_s, base * 2.0 ** (len(recent) - 1))
        return (last.finished_s or 0.0) + rest

    def left_node(self, container: str, now_s: float, cfg: BalancerConfig) -> str | None:
        """The node ``container`` last left (by a successful move within the back-off
        window): it never goes straight back there."""
        for m in reversed(self._finished_by_container.get(container, ())):
            if (m.finished_s or 0.0) < now_s - cfg.backoff_window_s:
                return None
            if m.ok:
                return m.source
        return None

    def destination_backoff_until_s(
        self, destination: str, now_s: float, cfg: BalancerConfig
    ) -> float:
        """Until when ``destination`` takes no move after failed ones (0.0: it takes them):
        ``destination_backoff_s * 2 ** (failures within the window - 1)``, capped at
        ``cooldown_max_s``, from the last failure."""
        fails = [
            m
            for m in self._failures_by_destination.get(destination, ())
            if (m.finished_s or 0.0) >= now_s - cfg.backoff_window_s
        ]
        if not fails:
            return 0.0
        rest = min(cfg.cooldown_max_s, cfg.destination_backoff_s * 2.0 ** (len(fails) - 1))
        return (fails[-1].finished_s or 0.0) + rest
