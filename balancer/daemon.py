"""The balancing daemon: ``jaula balancer run --config FILE`` (:mod:`balancer.cli`).

One round every ``interval_s``::

    campaign("balancer") ──► leader? ──no──► standby: campaign again (every interval_s)
                               │yes
    ┌──────────────────────────┘
    │  every node service: metrics  (migrate.metrics; the operator client `migrate` uses)
    │  the cluster state: members (draining, lost)
    │  view = ClusterView(...)   decision = policy.plan(view, cfg, history, now)
    │  event balancer.round {imbalance, hot, reason, detail, moves}
    │  for each planned move, while still the leader:
    │      event balancer.move.started ──► source node: migrate {container, destination,
    │      strategy} ──► migrated {report} | error
    │      history.with_finished(downtime, total, bytes)   (the cost model learns from it)
    │      event balancer.move.finished {predicted, measured} | balancer.move.failed {error}
    └── sleep interval_s; leadership lost ──► stop acting, campaign again

What it never does: start a move when it is not (or no longer) the leader; move a container
that is migrating (the policy skips a ``migrating`` status and the moves it has in flight);
send a container to a draining node, or leave one on it (``jaula node drain``: the member is
``draining`` in the cluster state, :meth:`ClusterState.set_draining`).  A node that does not
answer its ``metrics`` request is left out of the round (neither source nor destination); a
member whose lease is lost is not a destination.

A new leader rebuilds the history it needs from the event log (the finished moves for the
cool-downs, the no-return rule and the cost model; the last rounds for the hold), so a
hand-over neither forgets a cool-down nor restarts the hold.  Moves an old leader left
unfinished are not carried over: the nodes' ``migrating`` status covers them.

Errors: a node's failure is an event and a back-off (:class:`balancer.history.MoveHistory`),
never the daemon's end; a cluster state that cannot answer ends the leadership (no state, no
events, no fencing: no moves) and the daemon campaigns again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from balancer.cluster import ClusterView, ContainerView, Layer, NodeView
from balancer.config import BalancerConfig
from balancer.costmodel import PredictedCost
from balancer.history import MoveHistory, MoveRecord
from balancer.policy import Decision, PlannedMove, node_load, plan
from migrate.cluster_state import (
    ClusterState,
    Event,
    Leadership,
    MemberStatus,
    NotLeader,
    StateUnavailable,
)
from migrate.errors import MigrationError
from runtime.errors import JaulaError
from runtime.state import ContainerStatus

log = structlog.get_logger(__name__)

ELECTION = "balancer"
#: the statuses that put load on a node (the rest: stopped, checkpointed, migrated away)
LIVE = frozenset({ContainerStatus.RUNNING, ContainerStatus.PAUSED, ContainerStatus.MIGRATING})

EV_ROUND = "balancer.round"
EV_STARTED = "balancer.move.started"
EV_FINISHED = "balancer.move.finished"
EV_FAILED = "balancer.move.failed"
EV_LEADER = "balancer.leader"


class NodeClient(Protocol):
    """Request/reply with a node service (:class:`migrate.cli.Nodes` is the real one)."""

    async def request(
        self, node: str, mtype: str, wait_s: float = 30.0, on_progress: Any = None, **fields: Any
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Round:
    """One round's outcome: the ``view`` it saw, the ``decision``, the nodes that did not
    answer (``unreachable``: name -> error), and the moves it started (``started``)."""

    view: ClusterView
    decision: Decision
    unreachable: Mapping[str, str]
    started: tuple[PlannedMove, ...] = ()


def view_from_metrics(
    reports: Mapping[str, Mapping[str, Any]],
    members: Mapping[str, MemberStatus],
    cfg: BalancerConfig,
    at_s: float,
) -> ClusterView:
    """The :class:`ClusterView` of the ``node_metrics`` replies ``reports`` (node -> reply,
    fields in :mod:`migrate.metrics`) and the cluster state's ``members`` (node -> status;
    a node absent there is taken as ready).

    With ``cfg.load_from == "containers"`` a node's CPU and memory percentages are its
    containers' share of the host (nodes that share one host all report the host's).  Only
    running, paused and migrating containers are load; a container reported by two nodes
    (the two ends of a migration) appears once, as migrating.

    Raises:
        ClusterViewError: the reports are inconsistent (see :meth:`ClusterView.validate`).
    """
    nodes: list[NodeView] = []
    containers: dict[str, ContainerView] = {}
    for name, r in sorted(reports.items()):
        flags = frozenset(str(f) for f in r.get("cpu_flags", ()))
        live = []
        for c in r["containers"]:
            try:
                status = ContainerStatus(c["status"])
            except ValueError:
                continue
            if status not in LIVE:
                continue
            live.append(c)
            cv = ContainerView(
                str(c["id"]),
                name,
                status,
                float(c.get("cpu_cores", 0.0)),
                int(c.get("memory_bytes", 0)),
                float(c.get("dirty_bytes_per_s", 0.0)),
                labels=dict(c.get("labels", {})),
                image_layers=tuple(Layer(str(d), 0) for d in c.get("image_layers", ())),
                cpu_flags=flags,
            )
            other = containers.get(cv.id)
            if other is not None:  # both ends of a migration: it is migrating, from its source
                if other.status is not ContainerStatus.MIGRATING:
                    containers[cv.id] = ContainerView(
                        other.id,
                        other.node,
                        ContainerStatus.MIGRATING,
                        other.cpu_cores,
                        other.memory_bytes,
                        other.dirty_bytes_per_s,
                        other.labels,
                        other.image_layers,
                        other.cpu_flags,
                    )
                continue
            containers[cv.id] = cv
        cores = float(r["cpu_cores"])
        mem = int(r["memory_bytes"])
        if cfg.load_from == "containers":
            cpu_pct = 100.0 * sum(float(c.get("cpu_cores", 0.0)) for c in live) / cores
            mem_pct = 100.0 * sum(int(c.get("memory_bytes", 0)) for c in live) / mem
        else:
            cpu_pct, mem_pct = float(r["cpu_percent"]), float(r["memory_percent"])
        member = members.get(name, MemberStatus.READY)
        nodes.append(
            NodeView(
                name,
                cores,
                mem,
                min(cpu_pct, 1000.0),
                min(mem_pct, 1000.0),
                cpu_flags=flags,
                image_layers=frozenset(str(d) for d in r.get("image_layers", ())),
                draining=member is MemberStatus.DRAINING,
                schedulable=member is not MemberStatus.LOST,
            )
        )
    return ClusterView.of(at_s, nodes, containers.values())


def _cost_json(p: PredictedCost | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "strategy": p.strategy,
        "downtime_s": p.downtime_s,
        "bytes": p.bytes,
        "total_s": p.total_s,
    }


def move_json(m: PlannedMove) -> dict[str, Any]:
    """A planned move as JSON (events, ``balancer plan --json``)."""
    return {
        "container": m.container,
        "source": m.source,
        "destination": m.destination,
        "strategy": m.strategy,
        "why": m.why,
        "gain": m.gain,
        "relief": m.relief,
        "cost_score": m.cost_score,
        "imbalance_after": m.imbalance_after,
        "memory_bytes": m.memory_bytes,
        "dirty_bytes_per_s": m.dirty_bytes_per_s,
        "predicted": _cost_json(m.cost),
    }


def decision_json(d: Decision, view: ClusterView | None = None) -> dict[str, Any]:
    """A decision as JSON (the ``balancer.round`` event's data, ``balancer plan --json``)."""
    out: dict[str, Any] = {
        "at_s": d.at_s,
        "imbalance": d.imbalance,
        "hot": d.hot,
        "hot_rounds": d.hot_rounds,
        "reason": d.reason.value,
        "detail": d.detail,
        "imbalance_after": d.imbalance_after,
        "candidates": d.candidates,
        "in_flight": d.in_flight,
        "moves": [move_json(m) for m in d.moves],
    }
    if view is not None:
        out["loads"] = {
            n.name: round(node_load(n.cpu_percent, n.memory_percent), 4) for n in view.nodes
        }
        out["draining"] = sorted(n.name for n in view.nodes if n.draining)
    return out


def history_from_events(events: Iterable[Event], cfg: BalancerConfig) -> MoveHistory:
    """The history a leader needs, rebuilt from the event log (module docstring): finished
    moves (with their measured cost) and the last ``hold_rounds`` rounds; a move started
    and never finished is dropped."""
    h = MoveHistory()
    for e in events:
        d = e.data
        try:
            if e.kind == EV_ROUND:
                h = h.with_round(float(d["at_s"]), float(d["imbalance"]), bool(d["hot"]))
            elif e.kind == EV_STARTED:
                p = d.get("predicted")
                h = h.with_started(
                    MoveRecord(
                        str(d["container"]),
                        str(d["source"]),
                        str(d["destination"]),
                        str(d["strategy"]),
                        float(d["started_s"]),
                        int(d.get("memory_bytes", 0)),
                        float(d.get("dirty_bytes_per_s", 0.0)),
                        PredictedCost(
                            str(p["strategy"]),
                            float(p["downtime_s"]),
                            int(p["bytes"]),
                            float(p["total_s"]),
                        )
                        if isinstance(p, Mapping)
                        else None,
                    )
                )
            elif e.kind in (EV_FINISHED, EV_FAILED):
                h = h.with_finished(
                    str(d["container"]),
                    finished_s=float(d["finished_s"]),
                    ok=e.kind == EV_FINISHED,
                    downtime_s=float(d.get("downtime_s", 0.0)),
                    total_s=float(d.get("total_s", 0.0)),
                    bytes_sent=int(d.get("bytes_sent", 0)),
                )
        except (KeyError, TypeError, ValueError):
            continue  # an event of another version, or one cut short: it teaches nothing
    done = tuple(m for m in h.moves if not m.in_flight)
    return MoveHistory(done, h.rounds).pruned(time.time(), cfg)


class Balancer:
    """The daemon (module docstring).

    Args:
        cfg: the policy's settings.
        nodes: the client to the node services (an operator's keypair).
        node_names: the cluster's nodes (from the cluster file).
        state: the cluster state (leadership, members, events).
        me: who this balancer is in the cluster (its operator name): the leader's name and
            the events' author.
        dry_run: decide and record rounds, never request a move.
        clock: seconds, ``time.time``.
    """

    def __init__(
        self,
        cfg: BalancerConfig,
        nodes: NodeClient,
        node_names: Iterable[str],
        state: ClusterState,
        me: str,
        *,
        dry_run: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.nodes = nodes
        self.node_names = sorted(node_names)
        self.state = state
        self.me = me
        self.dry_run = dry_run
        self.clock = clock
        self.history = MoveHistory()
        self.rounds = 0
        self.moves: set[asyncio.Task[None]] = set()
        self.lead: Leadership | None = None
        #: a balancer.prometheus.Exporter to feed, or None
        self.exporter: Any = None

    # -- sensing ----------------------------------------------------------------------------
    async def collect(self) -> tuple[ClusterView, dict[str, str]]:
        """Every node's metrics and the members' statuses, as a view; and the nodes that did
        not answer (name -> why).

        Raises:
            StateUnavailable: the cluster state cannot answer.
        """

        async def one(name: str) -> dict[str, Any] | str:
            try:
                return await self.nodes.request(name, "metrics", wait_s=15.0)
            except (MigrationError, JaulaError, OSError) as e:
                return str(e) or type(e).__name__

        got = await asyncio.gather(*(one(n) for n in self.node_names))
        reports = {n: r for n, r in zip(self.node_names, got, strict=True) if isinstance(r, dict)}
        down = {n: r for n, r in zip(self.node_names, got, strict=True) if isinstance(r, str)}
        members = {m.name: m.status for m in await asyncio.to_thread(self.state.members)}
        return view_from_metrics(reports, members, self.cfg, self.clock()), down

    def _event(self, kind: str, data: Mapping[str, Any]) -> None:
        self.state.append_event(kind, self.me, data)

    # -- one round --------------------------------------------------------------------------
    async def round(self, act: bool = True) -> Round:
        """Sense, decide, record, and (when ``act``, not a dry run, and still the leader)
        start the planned moves as tasks of their own.

        Raises:
            StateUnavailable: the cluster state cannot answer.
            ClusterViewError: the nodes' reports are inconsistent.
        """
        view, down = await self.collect()
        now = self.clock()
        d = plan(view, self.cfg, self.history, now)
        self.rounds += 1
        acting = act and not self.dry_run
        # the round now; each move once it is requested (Decision.record would add them all)
        self.history = self.history.with_round(now, d.imbalance, d.hot).pruned(now, self.cfg)
        if self.exporter is not None:
            self.exporter.observe_round(view, d)
        data = decision_json(d, view)
        if down:
            data["unreachable"] = down
        await asyncio.to_thread(self._event, EV_ROUND, data)
        log.info(
            "balancer.round",
            imbalance=round(d.imbalance, 4),
            reason=d.reason.value,
            detail=d.detail,
            moves=len(d.moves),
        )
        started = []
        if acting:
            for m in d.moves:
                if self.lead is not None and not self.lead.held():
                    log.warning("balancer.leadership_lost_mid_round", skipped=m.container)
                    break
                self.history = self.history.with_started(m.record(now))
                await asyncio.to_thread(self._event, EV_STARTED, {**move_json(m), "started_s": now})
                t = asyncio.create_task(self._move(m, now))
                self.moves.add(t)
                t.add_done_callback(self.moves.discard)
                started.append(m)
        return Round(view, d, down, tuple(started))

    async def _move(self, m: PlannedMove, started_s: float) -> None:
        """Request one move from its source; record its outcome (history and event)."""
        try:
            r = await self.nodes.request(
                m.source,
                "migrate",
                wait_s=self.cfg.move_timeout_s,
                container=m.container,
                destination=m.destination,
                strategy=m.strategy,
            )
            rep = r["report"]
        except (MigrationError, JaulaError, OSError, KeyError) as e:
            now = self.clock()
            self._finish(m, started_s, finished_s=now, ok=False)
            if self.exporter is not None:
                self.exporter.observe_move(False, 0.0, 0.0, 0)
            log.warning("balancer.move_failed", container=m.container, error=str(e))
            data = {**move_json(m), "finished_s": now, "error": str(e)[:2000]}
            await self._event_quietly(EV_FAILED, data)
            return
        now = self.clock()
        downtime = float(rep.get("downtime_s", 0.0))
        total = float(rep.get("total_s", 0.0))
        sent = int(rep.get("bytes_sent", 0))
        self._finish(
            m,
            started_s,
            finished_s=now,
            ok=True,
            downtime_s=downtime,
            total_s=total,
            bytes_sent=sent,
        )
        if self.exporter is not None:
            self.exporter.observe_move(True, downtime, total, sent)
        log.info("balancer.moved", container=m.container, to=m.destination, downtime_s=downtime)
        data = {
            **move_json(m),
            "finished_s": now,
            "downtime_s": downtime,
            "total_s": total,
            "bytes_sent": sent,
        }
        await self._event_quietly(EV_FINISHED, data)

    def _finish(self, m: PlannedMove, started_s: float, **outcome: Any) -> None:
        """Record ``m``'s outcome; a history rebuilt meanwhile (leadership lost and won
        again) no longer has it in flight, so it is added back first."""
        try:
            self.history = self.history.with_finished(m.container, **outcome)
        except KeyError:
            h = self.history.with_started(m.record(started_s))
            self.history = h.with_finished(m.container, **outcome)

    async def _event_quietly(self, kind: str, data: Mapping[str, Any]) -> None:
        try:
            await asyncio.to_thread(self._event, kind, data)
        except (StateUnavailable, MigrationError) as e:
            log.error("balancer.event_lost", kind=kind, error=str(e))

    async def wait_moves(self, timeout_s: float | None = None) -> None:
        """Wait for the moves in flight to report (at most ``timeout_s``)."""
        if self.moves:
            await asyncio.wait(set(self.moves), timeout=timeout_s)

    # -- the daemon ---------------------------------------------------------------------------
    async def _campaign(self, stop: asyncio.Event) -> Leadership | None:
        announced = False
        while not stop.is_set():
            try:
                return await asyncio.to_thread(
                    self.state.campaign, ELECTION, self.me, None, self.cfg.interval_s
                )
            except NotLeader as e:
                if not announced:
                    log.info("balancer.standby", leader=e.leader)
                    announced = True
            except StateUnavailable as e:
                log.warning("balancer.state_unavailable", error=str(e))
                await _sleep_or_stop(stop, self.cfg.interval_s)
        return None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Campaign, then lead round after round until ``stop`` is set (or cancelled);
        leadership lost: stop acting and campaign again.  Leadership is resigned and the
        moves in flight are waited for (up to ``interval_s``) on the way out."""
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                lead = await self._campaign(stop)
                if lead is None:
                    break
                self.lead = lead
                try:
                    await self._lead(lead, stop)
                finally:
                    self.lead = None
                    lead.resign()
        finally:
            await self.wait_moves(self.cfg.interval_s)

    async def _lead(self, lead: Leadership, stop: asyncio.Event) -> None:
        log.info("balancer.leading", me=self.me, token=lead.token)
        events = await asyncio.to_thread(self.state.events_since, 0, 1_000_000)
        self.history = history_from_events(events, self.cfg)
        await asyncio.to_thread(self._event, EV_LEADER, {"token": lead.token})
        while not stop.is_set() and lead.held():
            try:
                await self.round()
            except StateUnavailable as e:
                log.error("balancer.state_unavailable", error=str(e))
                return  # no state, no events, no fencing: no moves; campaign again
            except (MigrationError, JaulaError, ValueError) as e:
                log.error("balancer.round_failed", error=str(e))
            await _sleep_or_stop(stop, self.cfg.interval_s, lead)
        if not lead.held():
            log.warning("balancer.leadership_lost", me=self.me)


async def _sleep_or_stop(
    stop: asyncio.Event, seconds: float, lead: Leadership | None = None
) -> None:
    """Sleep ``seconds``, waking early when ``stop`` is set or ``lead`` is lost."""
    end = time.monotonic() + seconds
    while not stop.is_set() and (lead is None or lead.held()):
        left = end - time.monotonic()
        if left <= 0:
            return
        try:
            await asyncio.wait_for(stop.wait(), min(left, 0.2))
        except TimeoutError:
            pass
