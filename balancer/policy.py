"""The balancing policy: ``plan(view, cfg, history, now_s) -> Decision``, pure.

One call per round (``cfg.interval_s``).  It reads the cluster (:mod:`balancer.cluster`), the
settings (:mod:`balancer.config`) and what it must remember (:mod:`balancer.history`), and
returns the moves to request now, each with its predicted gain and cost, or the reason it
does nothing.  It performs no I/O; the caller records the decision
(:meth:`Decision.record`) and the moves' outcomes (:meth:`MoveHistory.with_finished`).

The rules, and whose they are
-----------------------------
1. **Load and imbalance** (Proxmox VE's ``proxmox-resource-scheduling`` crate,
   ``NodeStats::load`` and ``calculate_node_imbalance``): a node's load is the mean of its
   CPU and memory use, as fractions; the imbalance is the population standard deviation of
   the node loads divided by their mean (the coefficient of variation).  Proxmox then
   divides by ``sqrt(n - 1)``, the largest CV ``n`` nodes can have; jaula does not, because
   that makes the same threshold mean a cluster ``sqrt(n - 1)`` times more skewed as the
   cluster grows (at 1,000 nodes a threshold of 0.3 would need a CV of 9.5).  Draining
   nodes are left out: their load is leaving.
2. **Hysteresis** (Proxmox, ``PVE::HA::Manager::load_balance``): nothing moves until the
   round has been hot for ``hold_rounds`` rounds in a row.  Hot = imbalance above
   ``threshold`` or, with ``trigger_on_overload`` (oVirt's ``EvenDistribution`` balancer
   acts on a host above ``HighUtilization`` for ``CpuOverCommitDurationMinutes``), a node
   at or above ``overload_percent`` CPU or memory.  A spike shorter than the hold moves
   nothing.  Unlike Proxmox, the counter is not reset after a move: a cluster that stays
   hot keeps being relieved each round, within the caps.
3. **Simulate every candidate** (Proxmox's ``score_best_balancing_migration_candidates``
   brute force): each candidate (container, destination) move is applied to the node loads
   and the imbalance after it is computed.  The search is bounded so that a round at 1,000
   nodes and 20,000 containers takes milliseconds: sources are the most loaded nodes
   (overloaded ones, or those above the mean), destinations the ``candidate_nodes`` least
   loaded, and the imbalance after a move is computed incrementally from the sums of the
   loads and of their squares (O(1) per candidate).  For nodes of equal capacity the best
   destination of any container is the least loaded node (the variance drop,
   ``2 d (l_s - l_d - d)``, grows as ``l_d`` falls), so the bound loses nothing there.
4. **Cost** (jaula's own; the weighing is VMware DRS's CostBenefit): each candidate's
   downtime, bytes and total time are predicted per strategy by
   :class:`~balancer.costmodel.CostModel`, which learns from the cluster's migration
   reports; the cheapest allowed strategy is chosen.  ``cost = cost_per_downtime_s *
   downtime_s + cost_per_total_s * total_s``, in the same unit as the gain below.
5. **Gain against cost, with a margin** (Proxmox: ``margin``, 10 %): a move's *relief* is
   how much of the load gap between its source and destination it closes, in node loads
   (``gap_before - |gap_after|``; ``2 d`` for nodes of equal capacity when ``d`` moves),
   which does not depend on the cluster's size (Proxmox's relative imbalance drop per
   move shrinks as ``1/n``, so a fixed 10 % of it can never be met on a large cluster).
   The cost is in the same unit: ``cost_per_downtime_s = 0.02`` says one second of
   downtime is worth 2 % of a node levelled.  A move is made only if the imbalance falls
   and ``relief >= (1 + margin) * cost``: the gain exceeds the cost by the margin, and a
   crumb of a container, whose relief is below the fixed part of any migration's cost,
   never moves.  Candidates are ranked by ``gain * (1 - cost / relief)`` (the imbalance
   drop, less the share of it the cost eats), ties to the smaller container (DRS prefers
   the cheaper move).
6. **The destination stays below the overload line** after the move, CPU and memory
   (oVirt: a destination must be under a fraction of ``HighUtilization`` so that the move
   does not overload it "to prevent bouncing"), keeps ``memory_reserve_bytes`` free, has
   the CPU flags the container needs, and is filled only up to the midpoint of the two
   loads (Incus's cluster rebalancer: a target's score may not pass the midpoint of the
   busiest and the target's scores), so that a move never makes the destination the more
   loaded of the two.  Destinations that already hold the image's layers predict a
   cheaper move (fewer bytes, less time).
7. **Caps** (KubeVirt: ``parallelMigrationsPerCluster`` 5 and
   ``parallelOutboundMigrationsPerNode`` 2, also the descheduler's ``evictionLimits``,
   openshift/cluster-kube-descheduler-operator PR 589): at most ``max_in_flight`` moves in
   the cluster and ``max_in_flight_per_node`` touching one node (source or destination:
   stricter than KubeVirt's outbound-only count, so that an empty node is not stampeded).
8. **Cool-down with backoff, no return, opt-out, busy** (KubeVirt's
   ``KubevirtMigrationAware``: cool-down ``max(15 min, last migration's duration)``,
   doubled per migration within 48 h, capped at 6 h; VMs already migrating are never
   picked): see :meth:`MoveHistory.cooldown_until_s`.  A container never goes straight back
   to the node it last left (the descheduler's users' complaint: moved workloads bounce
   back); ``jaula.balance=false`` containers are never moved; a destination whose move
   failed backs off (:meth:`MoveHistory.destination_backoff_until_s`).
9. **Drain** (``NodeView.draining``): its containers leave regardless of the hysteresis,
   gain, cool-down and no-return rules, within the caps and the destination checks, to the
   destination that leaves the cluster best balanced.
10. **Moves in flight count where they go**: a container being moved is still reported by
    its source until it has arrived, so its load is applied to its destination before any
    candidate is simulated (the hysteresis still reads the measured imbalance).  Without
    this a second move chases the same empty destination before the first has arrived
    (seen on three real nodes: both busy containers of node1 went to node2).  A container
    that has just arrived is reported with no CPU use until its destination has two samples
    of it running (:mod:`migrate.metrics`), so a node a move arrived at within the last
    ``settle_s`` is no destination either (seen on three real nodes: of six busy containers
    on node1, the second round sent two more to node2, which the first round had filled).

Several moves may be planned in one round (up to the caps); each is applied to the working
loads before the next is chosen, and balancing stops once the projected cluster is no
longer hot, so a round does not overshoot.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from balancer.cluster import ClusterView, ContainerView, NodeView
from balancer.config import BalancerConfig
from balancer.costmodel import CostModel, PredictedCost
from balancer.history import MoveHistory, MoveRecord
from runtime.state import ContainerStatus

_EPS = 1e-12


def node_load(cpu_percent: float, memory_percent: float) -> float:
    """A node's load, 0.0-1.0 (more when over-committed): the mean of its CPU and memory use
    (Proxmox's ``NodeStats::load``)."""
    return (cpu_percent + memory_percent) / 200.0


def imbalance(loads: Sequence[float]) -> float:
    """The population standard deviation of ``loads`` over their mean; 0.0 for fewer than two
    loads or a mean of 0 (Proxmox's coefficient of variation, without its ``sqrt(n-1)``)."""
    n = len(loads)
    if n < 2:
        return 0.0
    s1 = math.fsum(loads)
    s2 = math.fsum(x * x for x in loads)
    return _cv(s1, s2, n)


def _cv(s1: float, s2: float, n: int) -> float:
    if n < 2 or s1 <= _EPS:
        return 0.0
    mean = s1 / n
    var = max(0.0, s2 / n - mean * mean)
    return math.sqrt(var) / mean


class Reason(enum.StrEnum):
    """Why a round planned what it planned."""

    MOVES = "moves"  #: moves planned (see ``Decision.moves``)
    BALANCED = "balanced"  #: imbalance at or below the threshold, no node overloaded
    HOLDING = "holding"  #: hot, but not yet for ``hold_rounds`` rounds
    CAPS = "caps"  #: the in-flight caps leave no room
    NO_CANDIDATE = "no-candidate"  #: nothing may move (pinned, cooling down, no destination)
    NOT_WORTH = "not-worth"  #: no move's gain beats its cost by the margin
    TOO_FEW_NODES = "too-few-nodes"  #: fewer than two nodes to balance between


@dataclass(frozen=True, slots=True)
class PlannedMove:
    """One move to request: ``container`` from ``source`` to ``destination`` with
    ``strategy``.

    Attributes:
        why: ``"balance"`` or ``"drain"``.
        gain: predicted drop in the cluster's imbalance (imbalance before - after).
        relief: how much of the source/destination load gap the move closes, in node
            loads (``gap_before - |gap_after|``).
        cost: predicted downtime, bytes and total time.
        cost_score: ``cost_per_downtime_s * downtime_s + cost_per_total_s * total_s``.
        imbalance_after: predicted imbalance once this (and the moves before it) are done.
        memory_bytes, dirty_bytes_per_s: the container's, as seen now.
    """

    container: str
    source: str
    destination: str
    strategy: str
    why: str
    gain: float
    relief: float
    cost: PredictedCost
    cost_score: float
    imbalance_after: float
    memory_bytes: int
    dirty_bytes_per_s: float

    def record(self, started_s: float) -> MoveRecord:
        """The history record of this move, requested at ``started_s``."""
        return MoveRecord(
            self.container,
            self.source,
            self.destination,
            self.strategy,
            started_s,
            self.memory_bytes,
            self.dirty_bytes_per_s,
            self.cost,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """What one round decided.

    Attributes:
        at_s: the round's time (``now_s``).
        imbalance: measured now; ``hot``: above the threshold or a node overloaded;
            ``hot_rounds``: hot rounds in a row, this one included.
        reason, detail: why (an enum and one line for people).
        moves: the moves to request now, in order.
        imbalance_after: predicted once they are done.
        candidates: (container, destination) pairs simulated.
        in_flight: moves already in flight when the round started.
    """

    at_s: float
    imbalance: float
    hot: bool
    hot_rounds: int
    reason: Reason
    detail: str
    moves: tuple[PlannedMove, ...] = ()
    imbalance_after: float = 0.0
    candidates: int = 0
    in_flight: int = 0

    def record(self, history: MoveHistory) -> MoveHistory:
        """``history`` with this round and its moves (in flight from ``at_s``) added."""
        h = history.with_round(self.at_s, self.imbalance, self.hot)
        for m in self.moves:
            h = h.with_started(m.record(self.at_s))
        return h


class _Work:
    """The mutable working copy of the node figures one :func:`plan` call simulates on."""

    __slots__ = ("busy", "counted", "cpu", "index", "load", "mem", "n", "nodes", "s1", "s2")

    def __init__(self, nodes: Sequence[NodeView]) -> None:
        self.nodes = list(nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.cpu = [n.cpu_percent for n in self.nodes]
        self.mem = [n.memory_percent for n in self.nodes]
        self.load = [node_load(c, m) for c, m in zip(self.cpu, self.mem, strict=True)]
        self.counted = [not n.draining for n in self.nodes]
        loads = [x for x, k in zip(self.load, self.counted, strict=True) if k]
        self.n = len(loads)
        self.s1 = math.fsum(loads)
        self.s2 = math.fsum(x * x for x in loads)
        self.busy = [0] * len(self.nodes)

    def imbalance(self) -> float:
        return _cv(self.s1, self.s2, self.n)

    def mean(self) -> float:
        return self.s1 / self.n if self.n else 0.0

    def overloaded(self, i: int, line: float) -> bool:
        return self.cpu[i] >= line or self.mem[i] >= line

    def apply(self, si: int, di: int, c: ContainerView) -> None:
        ns, nd = self.nodes[si], self.nodes[di]
        cs, ms = _points(c, ns)
        cd, md = _points(c, nd)
        for i, dc, dm in ((si, -cs, -ms), (di, cd, md)):
            old = self.load[i]
            self.cpu[i] = max(0.0, self.cpu[i] + dc)
            self.mem[i] = max(0.0, self.mem[i] + dm)
            new = node_load(self.cpu[i], self.mem[i])
            self.load[i] = new
            if self.counted[i]:
                self.s1 += new - old
                self.s2 += new * new - old * old
        self.busy[si] += 1
        self.busy[di] += 1


def _points(c: ContainerView, n: NodeView) -> tuple[float, float]:
    """The CPU and memory percentage points ``c`` occupies on ``n``."""
    return 100.0 * c.cpu_cores / n.cpu_cores, 100.0 * c.memory_bytes / n.memory_bytes


@dataclass(slots=True)
class _Best:
    score: float
    memory_bytes: int
    key: tuple[str, str]
    move: PlannedMove
    si: int
    di: int
    c: ContainerView

    def beats(self, other: _Best | None) -> bool:
        if other is None:
            return True
        if self.score != other.score:
            return self.score > other.score
        if self.memory_bytes != other.memory_bytes:
            return self.memory_bytes < other.memory_bytes  # DRS: the smaller move
        return self.key < other.key


def plan(view: ClusterView, cfg: BalancerConfig, history: MoveHistory, now_s: float) -> Decision:
    """The moves to request this round, or why there are none (see the module docstring).

    Args:
        view: the cluster now (not validated here: see :meth:`ClusterView.validate`).
        cfg: the settings.
        history: the rounds and moves recorded so far (by :meth:`Decision.record` and
            :meth:`MoveHistory.with_finished`).
        now_s: the round's time, on the history's clock.

    Returns:
        A :class:`Decision`; ``decision.moves`` is empty unless ``reason`` is ``MOVES``.
    """
    work = _Work(view.nodes)
    imb = work.imbalance()
    line = cfg.overload_percent
    over = [i for i in range(len(work.nodes)) if work.counted[i] and work.overloaded(i, line)]
    hot = imb > cfg.threshold or (cfg.trigger_on_overload and bool(over))
    hot_rounds = history.hot_streak() + 1 if hot else 0
    draining = [i for i, n in enumerate(work.nodes) if n.draining]

    def decision(reason: Reason, detail: str, **kw: object) -> Decision:
        return Decision(now_s, imb, hot, hot_rounds, reason, detail, **kw)  # type: ignore[arg-type]

    triggered = hot and hot_rounds >= cfg.hold_rounds
    if not draining:
        if work.n < 2:
            return decision(Reason.TOO_FEW_NODES, f"{work.n} node(s) to balance between")
        if not hot:
            return decision(
                Reason.BALANCED,
                f"imbalance {imb:.3f} <= threshold {cfg.threshold}, no node at >= {line:g} %",
                imbalance_after=imb,
            )
        if not triggered:
            return decision(
                Reason.HOLDING,
                f"hot for {hot_rounds}/{cfg.hold_rounds} rounds (imbalance {imb:.3f}, "
                f"{len(over)} node(s) overloaded)",
                imbalance_after=imb,
            )

    # -- what is already moving ---------------------------------------------------------------
    busy_containers: set[str] = set()
    in_flight = 0
    by_id = {c.id: c for c in view.containers}
    for m in history.in_flight():
        busy_containers.add(m.container)
        in_flight += 1
        moving = by_id.get(m.container)
        if (
            moving is not None
            and moving.node == m.source
            and {m.source, m.destination} <= set(work.index)
        ):
            # its load is on its way: count it where it goes (else a second move chases
            # the same empty destination before the first has arrived)
            work.apply(work.index[m.source], work.index[m.destination], moving)
            continue
        for name in (m.source, m.destination):
            if name in work.index:
                work.busy[work.index[name]] += 1
    by_node = view.containers_by_node()
    for c in view.containers:
        if c.status is ContainerStatus.MIGRATING and c.id not in busy_containers:
            busy_containers.add(c.id)
            in_flight += 1
            if c.node in work.index:
                work.busy[work.index[c.node]] += 1
    # nodes a move arrived at within settle_s: their figures do not show it yet (point 10)
    settling = {
        m.destination
        for m in history.moves
        if not m.in_flight and m.ok and (m.finished_s or 0.0) > now_s - cfg.settle_s
    }
    budget = cfg.max_in_flight - in_flight
    if budget <= 0:
        return decision(
            Reason.CAPS,
            f"{in_flight} move(s) in flight, cap {cfg.max_in_flight}",
            imbalance_after=imb,
            in_flight=in_flight,
        )

    model = CostModel(
        history.samples(),
        prior_weight=cfg.prior_weight,
        link_bytes_per_s=cfg.link_bytes_per_s,
        strategies=cfg.strategies,
    )
    base_costs: dict[str, tuple[PredictedCost, float]] = {}

    def base_cost(c: ContainerView) -> tuple[PredictedCost, float]:
        got = base_costs.get(c.id)
        if got is None:
            best: tuple[PredictedCost, float] | None = None
            for s in model.strategies:
                p = model.predict(s, c.memory_bytes, c.dirty_bytes_per_s)
                score = cfg.cost_per_downtime_s * p.downtime_s + cfg.cost_per_total_s * p.total_s
                if best is None or score < best[1]:
                    best = (p, score)
            assert best is not None  # BalancerConfig requires at least one strategy
            got = base_costs[c.id] = best
        return got

    def dest_cost(c: ContainerView, d: NodeView) -> tuple[PredictedCost, float]:
        p, score = base_cost(c)
        missing = sum(
            layer.size_bytes for layer in c.image_layers if layer.digest not in d.image_layers
        )
        if not missing:
            return p, score
        extra_s = missing / cfg.link_bytes_per_s
        return (
            PredictedCost(p.strategy, p.downtime_s, p.bytes + missing, p.total_s + extra_s),
            score + cfg.cost_per_total_s * extra_s,
        )

    planned: list[PlannedMove] = []
    planned_ids: set[str] = set()
    candidates = 0
    seen_candidate = False  # an eligible (container, destination) pair, worth it or not
    now_imb = work.imbalance()  # with the moves in flight counted where they go

    def destinations(exclude: int = -1) -> list[int]:
        order = sorted(
            (i for i, n in enumerate(work.nodes) if n.accepts and i != exclude),
            key=lambda i: work.load[i],
        )
        out: list[int] = []
        for i in order:
            if work.busy[i] >= cfg.max_in_flight_per_node:
                continue
            if history.destination_backoff_until_s(work.nodes[i].name, now_s, cfg) > now_s:
                continue
            if work.nodes[i].name in settling:
                continue
            out.append(i)
            if len(out) > cfg.candidate_nodes:
                break
        return out

    def fits(c: ContainerView, di: int) -> tuple[float, float] | None:
        d = work.nodes[di]
        if c.cpu_flags and not c.cpu_flags <= d.cpu_flags:
            return None
        cd, md = _points(c, d)
        cpu_after, mem_after = work.cpu[di] + cd, work.mem[di] + md
        if cpu_after > line or mem_after > line:
            return None
        free = d.memory_bytes * (1.0 - work.mem[di] / 100.0) - c.memory_bytes
        if free < cfg.memory_reserve_bytes:
            return None
        return cpu_after, mem_after

    def movable(c: ContainerView) -> bool:
        return (
            c.status is ContainerStatus.RUNNING
            and not c.pinned
            and c.id not in busy_containers
            and c.id not in planned_ids
        )

    def evaluate(si: int, c: ContainerView, di: int, drain: bool) -> _Best | None:
        nonlocal candidates, seen_candidate
        after = fits(c, di)
        if after is None:
            return None
        s, d = work.nodes[si], work.nodes[di]
        cs, ms = _points(c, s)
        ls, ld = work.load[si], work.load[di]
        ls_after = node_load(max(0.0, work.cpu[si] - cs), max(0.0, work.mem[si] - ms))
        ld_after = node_load(*after)
        if not drain and ld_after > (ls + ld) / 2.0 + _EPS:
            return None  # Incus: fill a target only up to the midpoint
        candidates += 1
        s1, s2 = work.s1, work.s2
        if work.counted[si]:
            s1 += ls_after - ls
            s2 += ls_after * ls_after - ls * ls
        s1 += ld_after - ld
        s2 += ld_after * ld_after - ld * ld
        imb_after = _cv(s1, s2, work.n)
        gain = now_imb - imb_after
        cost, cost_score = dest_cost(c, d)
        relief = (ls - ld) - abs(ls_after - ld_after)
        seen_candidate = True
        if drain:
            score = -imb_after - 1e-3 * cost_score
        else:
            if gain <= _EPS or relief <= _EPS or relief < (1.0 + cfg.margin) * cost_score:
                return None
            score = gain * (1.0 - cost_score / relief)
        move = PlannedMove(
            c.id,
            s.name,
            d.name,
            cost.strategy,
            "drain" if drain else "balance",
            gain,
            relief,
            cost,
            cost_score,
            imb_after,
            c.memory_bytes,
            c.dirty_bytes_per_s,
        )
        return _Best(score, c.memory_bytes, (c.id, d.name), move, si, di, c)

    def take(best: _Best) -> None:
        nonlocal now_imb, budget
        work.apply(best.si, best.di, best.c)
        now_imb = work.imbalance()
        planned.append(best.move)
        planned_ids.add(best.c.id)
        budget -= 1

    # -- 1. drain: every container on a draining node leaves --------------------------------
    blocked_drain = 0
    for si in draining:
        for c in sorted(by_node.get(work.nodes[si].name, ()), key=lambda c: c.memory_bytes):
            if budget <= 0 or work.busy[si] >= cfg.max_in_flight_per_node:
                break
            if not movable(c):
                blocked_drain += c.id not in busy_containers and c.id not in planned_ids
                continue
            best: _Best | None = None
            for di in destinations(si)[: cfg.candidate_nodes]:
                cand = evaluate(si, c, di, drain=True)
                if cand is not None and cand.beats(best):
                    best = cand
            if best is None:
                blocked_drain += 1
                continue
            take(best)

    # -- 2. balance ---------------------------------------------------------------------------
    def still_hot() -> bool:
        if now_imb > cfg.threshold:
            return True
        return cfg.trigger_on_overload and any(
            work.counted[i] and work.overloaded(i, line) for i in range(len(work.nodes))
        )

    if triggered and work.n >= 2:
        while budget > 0 and still_hot():
            mean = work.mean()
            if cfg.trigger_on_overload and now_imb <= cfg.threshold:
                pool = [
                    i
                    for i in range(len(work.nodes))
                    if work.counted[i] and work.overloaded(i, line)
                ]
            else:
                pool = [
                    i for i in range(len(work.nodes)) if work.counted[i] and work.load[i] > mean
                ]
            pool.sort(key=lambda i: work.load[i], reverse=True)
            best = None
            sources = 0
            all_dests = destinations()
            for si in pool:
                if sources >= cfg.candidate_nodes:
                    break
                if work.busy[si] >= cfg.max_in_flight_per_node:
                    continue
                here = [c for c in by_node.get(work.nodes[si].name, ()) if movable(c)]
                here = [c for c in here if history.cooldown_until_s(c.id, now_s, cfg) <= now_s]
                if not here:
                    continue
                sources += 1
                dests = [di for di in all_dests if di != si][: cfg.candidate_nodes]
                for c in here:
                    back = history.left_node(c.id, now_s, cfg)
                    for di in dests:
                        if work.nodes[di].name == back:
                            continue  # never straight back to the node it left
                        cand = evaluate(si, c, di, drain=False)
                        if cand is not None and cand.beats(best):
                            best = cand
            if best is None:
                break
            take(best)

    moves = tuple(planned)
    if moves:
        n_drain = sum(m.why == "drain" for m in moves)
        detail = f"{len(moves)} move(s) ({n_drain} drain), imbalance {imb:.3f} -> {now_imb:.3f}"
        if blocked_drain:
            detail += f"; {blocked_drain} container(s) on draining nodes cannot move now"
        return decision(
            Reason.MOVES,
            detail,
            moves=moves,
            imbalance_after=now_imb,
            candidates=candidates,
            in_flight=in_flight,
        )
    if not triggered and draining:
        reason = (
            Reason.NO_CANDIDATE if blocked_drain else (Reason.HOLDING if hot else Reason.BALANCED)
        )
        return decision(
            reason,
            f"drain: {blocked_drain} container(s) cannot move now; imbalance {imb:.3f}",
            imbalance_after=imb,
            candidates=candidates,
            in_flight=in_flight,
        )
    if seen_candidate:
        return decision(
            Reason.NOT_WORTH,
            f"{candidates} candidate move(s), none relieves more than (1 + margin "
            f"{cfg.margin:g}) x its cost (imbalance {imb:.3f})",
            imbalance_after=imb,
            candidates=candidates,
            in_flight=in_flight,
        )
    return decision(
        Reason.NO_CANDIDATE,
        "no container may move to any destination now (pinned, cooling down, in flight, "
        "or no destination fits under the overload line)",
        imbalance_after=imb,
        candidates=candidates,
        in_flight=in_flight,
    )
