"""The balancer's policy against a simulated cluster, side by side with two others.

``python -m benchmarks.balancer_sim`` (or ``make bench-balancer``) runs, for 100 and 1,000
nodes with 20 containers each, five workloads:

* ``steady``: every container's load constant (the control: nothing should move);
* ``diurnal``: three tenant groups, each node's containers belong to one, whose CPU follows
  ``1 + 0.9 sin(2 pi t / 24 h + phase)`` with the phases 120 degrees apart (24 h at 100
  nodes; 6 h, the first quarter day, at 1,000 to bound the run time);
* ``spike``: 3 % of the nodes see their containers' CPU x4 for 30 minutes from t = 10 min,
  and another 3 % for 20 s at t = 5 min (shorter than the hold); 2 h;
* ``drain``: node 0 is drained at t = 5 min; 1 h;
* ``join``: one node more, empty, from t = 0; 1 h.

Three policies see the same inputs each round (10 s): ``none`` (no balancing, no drain),
``proxmox`` (Proxmox VE's published rule: imbalance threshold 0.3 held for 3 rounds with the
counter reset after a move, margin 10 % relative imbalance drop, the best single move per
round, one move in flight; its maintenance-mode evacuation for the drain, one container at a
time to the node that leaves the imbalance lowest) and ``jaula`` (:func:`balancer.policy.plan`
with the default :class:`~balancer.config.BalancerConfig`).  Both balancers use the same
imbalance (stddev / mean, see :mod:`balancer.policy` on Proxmox's sqrt(n-1)) and get each
move's strategy the same way (the cheapest by jaula's prior cost model), so the downtime
compares the moves chosen, not the strategies.

Migration cost (the simulator's truth): per strategy, downtime and total time linear in
memory, least squares over the README's Benchmarks table (memhog 16/256/1024 MiB, Redis,
idle shell, medians), times a log-normal noise of sigma 0.15 (the table's spread); bytes =
memory + 11.5 MB.  The truth ignores the dirty rate (the table does not vary it).  A move
takes its total time to finish; until then the container counts on its source and is
``migrating``.  jaula's policy learns from the reports of its own moves.

Reported per workload: imbalance over time (plot), time from the disturbance to the first
round at or under the threshold, share of rounds above it, number of moves, moves undone
within an hour (the container moved back to a node it left, within an hour of leaving it),
total downtime, decision time per round (median and max) and the final imbalance.  Results
in ``results/balancer-<date>/``: ``summary.md``, ``runs.json`` and ``imbalance.png``.
The workload parameters were fixed before the first run and are not tuned to the goals.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.cluster import BALANCE_LABEL, ClusterView, ContainerView, Layer, NodeView
from balancer.config import BalancerConfig
from balancer.costmodel import README_PRIOR, CostModel
from balancer.history import MoveHistory
from balancer.policy import imbalance, node_load, plan
from runtime.state import ContainerStatus

GIB = 1 << 30
MIB = 1 << 20
ROUND_S = 10.0
NODE_CORES = 16.0
NODE_MEMORY = 64 * GIB
SYS_CPU_PCT = 3.0
SYS_MEM_PCT = 5.0
PER_NODE = 20
POLICIES = ("none", "proxmox", "jaula")
WORKLOADS = ("steady", "diurnal", "spike", "drain", "join")
UNDO_WINDOW_S = 3600.0


# -- the simulator's truth about migration cost ----------------------------------------------


def _line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


@dataclass(frozen=True)
class TruthModel:
    """Downtime and total time linear in memory per strategy (README table), with noise."""

    downtime: dict[str, tuple[float, float]]
    total: dict[str, tuple[float, float]]
    sigma: float = 0.15

    @classmethod
    def from_readme(cls) -> TruthModel:
        down, tot = {}, {}
        for s in ("cold", "postcopy"):
            rows = [p for p in README_PRIOR if p.strategy == s]
            xs = [p.memory_bytes / GIB for p in rows]
            down[s] = _line_fit(xs, [p.downtime_s for p in rows])
            tot[s] = _line_fit(xs, [p.total_s for p in rows])
        return cls(down, tot)

    def sample(
        self, strategy: str, memory_bytes: int, rng: random.Random
    ) -> tuple[float, float, int]:
        g = memory_bytes / GIB
        a, b = self.downtime[strategy]
        c, d = self.total[strategy]
        noise = math.exp(rng.gauss(0.0, self.sigma))
        down = max(0.1, a + b * g) * noise
        total = max(down + 0.3, (c + d * g) * noise)
        return down, total, int(memory_bytes + 11.5e6)


# -- the cluster ------------------------------------------------------------------------------


@dataclass
class SimContainer:
    id: str
    node: str
    home: int  # the node index it started on (its tenant group, its spike)
    cpu_base: float
    memory_bytes: int
    dirty_bytes_per_s: float
    layers: tuple[Layer, ...]
    pinned: bool
    migrating: bool = False
    view: ContainerView | None = None
    view_key: tuple[Any, ...] = ()


@dataclass
class Pending:
    container: str
    destination: str
    finish_s: float
    downtime_s: float
    total_s: float
    bytes_sent: int


@dataclass
class Scenario:
    workload: str
    nodes: int
    duration_s: float
    disturbance_s: float
    factor: Callable[[SimContainer, float], float]
    drain_at_s: float | None = None
    join: bool = False
    spike_nodes: frozenset[int] = frozenset()


def make_scenario(workload: str, n: int, diurnal_hours: float, rng: random.Random) -> Scenario:
    if workload == "steady":
        return Scenario(workload, n, 3600.0, 0.0, lambda c, t: 1.0)
    if workload == "diurnal":
        day = 86400.0

        def diurnal(c: SimContainer, t: float) -> float:
            phase = (c.home % 3) * 2.0 * math.pi / 3.0
            return 1.0 + 0.9 * math.sin(2.0 * math.pi * t / day + phase)

        return Scenario(workload, n, diurnal_hours * 3600.0, 0.0, diurnal)
    if workload == "spike":
        k = max(1, round(0.03 * n))
        picked = rng.sample(range(n), 2 * k)
        long_nodes, brief_nodes = frozenset(picked[:k]), frozenset(picked[k:])

        def spike(c: SimContainer, t: float) -> float:
            if c.home in long_nodes and 600.0 <= t < 2400.0:
                return 4.0
            if c.home in brief_nodes and 300.0 <= t < 320.0:
                return 4.0
            return 1.0

        return Scenario(workload, n, 7200.0, 600.0, spike, spike_nodes=long_nodes)
    if workload == "drain":
        return Scenario(workload, n, 3600.0, 300.0, lambda c, t: 1.0, drain_at_s=300.0)
    if workload == "join":
        return Scenario(workload, n, 3600.0, 0.0, lambda c, t: 1.0, join=True)
    raise ValueError(f"unknown workload {workload!r}; use one of {', '.join(WORKLOADS)}")


def _lognormal(rng: random.Random, median: float, sigma: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, median * math.exp(rng.gauss(0.0, sigma))))


def make_containers(n: int, rng: random.Random) -> list[SimContainer]:
    """20 containers per node; CPU log-normal (median 0.25 cores, sigma 1), memory log-normal
    (median 512 MiB, sigma 1, 16 MiB-8 GiB), dirty rate 2 % of memory per second (median,
    sigma 1, at most 50 %), one of 30 images (a shared base layer and two of its own), 2 %
    labelled jaula.balance=false."""
    base = Layer("sha256:base", 80_000_000)
    images = [
        (
            base,
            Layer(f"sha256:img{i}a", rng.randint(20, 200) * 1_000_000),
            Layer(f"sha256:img{i}b", rng.randint(1, 50) * 1_000_000),
        )
        for i in range(30)
    ]
    out = []
    for node in range(n):
        for j in range(PER_NODE):
            mem = int(_lognormal(rng, 512 * MIB, 1.0, 16 * MIB, 8 * GIB))
            out.append(
                SimContainer(
                    id=f"c{node}-{j}",
                    node=f"node{node}",
                    home=node,
                    cpu_base=_lognormal(rng, 0.25, 1.0, 0.01, 8.0),
                    memory_bytes=mem,
                    dirty_bytes_per_s=mem * _lognormal(rng, 0.02, 1.0, 0.0, 0.5),
                    layers=images[rng.randrange(30)],
                    pinned=rng.random() < 0.02,
                )
            )
    return out


# -- the baseline -----------------------------------------------------------------------------


class ProxmoxBaseline:
    """Proxmox VE's rule (``PVE::HA::Manager::load_balance``): no move while one is in flight;
    the imbalance must exceed 0.3 for 3 rounds in a row (the counter is reset when it
    triggers); the best single move (lowest imbalance after) is made if it lowers the
    imbalance by at least 10 % of its value.  Each container's candidate destination is the
    least loaded node (all nodes have one capacity here, so it is the best one for every
    container: the brute force loses nothing).  Maintenance (drain): one container at
    a time, to the node that leaves the imbalance lowest, memory permitting."""

    def __init__(self, threshold: float = 0.3, hold: int = 3, margin: float = 0.1) -> None:
        self.threshold, self.hold, self.margin = threshold, hold, margin
        self.rounds = 0

    def decide(self, view: ClusterView, busy: bool) -> list[tuple[ContainerView, str]]:
        if busy:
            return []
        nodes = list(view.nodes)
        idx = {nd.name: i for i, nd in enumerate(nodes)}
        loads = [node_load(nd.cpu_percent, nd.memory_percent) for nd in nodes]
        counted = [not nd.draining for nd in nodes]
        cl = [x for x, k in zip(loads, counted, strict=True) if k]
        n, s1, s2 = len(cl), math.fsum(cl), math.fsum(x * x for x in cl)
        imb = imbalance(cl)
        dests = sorted((i for i, nd in enumerate(nodes) if nd.accepts), key=lambda i: loads[i])[:9]

        def after(c: ContainerView, si: int, di: int) -> float:
            src, dst = nodes[si], nodes[di]
            ls = node_load(
                src.cpu_percent - 100 * c.cpu_cores / src.cpu_cores,
                src.memory_percent - 100 * c.memory_bytes / src.memory_bytes,
            )
            ld = node_load(
                dst.cpu_percent + 100 * c.cpu_cores / dst.cpu_cores,
                dst.memory_percent + 100 * c.memory_bytes / dst.memory_bytes,
            )
            a1, a2 = s1, s2
            if counted[si]:
                a1 += ls - loads[si]
                a2 += ls * ls - loads[si] ** 2
            a1 += ld - loads[di]
            a2 += ld * ld - loads[di] ** 2
            mean = a1 / n
            return math.sqrt(max(0.0, a2 / n - mean * mean)) / mean if mean > 0 else 0.0

        def fits(c: ContainerView, di: int) -> bool:
            return nodes[di].free_memory_bytes > c.memory_bytes

        movable = [
            c
            for c in view.containers
            if c.status is ContainerStatus.RUNNING and c.labels.get(BALANCE_LABEL) != "false"
        ]
        draining = [c for c in movable if nodes[idx[c.node]].draining]
        if draining:
            c = min(draining, key=lambda c: c.id)
            si = idx[c.node]
            options = [(after(c, si, di), di) for di in dests if di != si and fits(c, di)]
            return [(c, nodes[min(options)[1]].name)] if options else []
        if imb <= self.threshold:
            self.rounds = 0
            return []
        self.rounds += 1
        if self.rounds < self.hold:
            return []
        self.rounds = 0
        best: tuple[float, str, ContainerView, int] | None = None
        # equal capacities: the least loaded node is every container's best destination
        # (the variance drop 2 d (l_s - l_d - d) grows as l_d falls), so one is enough
        for c in movable:
            si = idx[c.node]
            for di in [d for d in dests if d != si][:1]:
                if di == si or not fits(c, di):
                    continue
                a = after(c, si, di)
                if best is None or (a, c.id) < (best[0], best[1]):
                    best = (a, c.id, c, di)
        if best is None or imb <= 0 or (imb - best[0]) / imb < self.margin:
            return []
        return [(best[2], nodes[best[3]].name)]


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    nodes: int
    policy: str
    series: list[tuple[float, float]] = field(default_factory=list)
    moves: list[dict[str, Any]] = field(default_factory=list)
    decide_ms: list[float] = field(default_factory=list)
    threshold_first_under_s: float | None = None
    above_share: float = 0.0
    final_imbalance: float = 0.0
    start_imbalance: float = 0.0
    peak_imbalance: float = 0.0
    final_max_load: float = 0.0
    left_on_drained: int = 0

    def undone(self) -> int:
        """Moves whose container went back to the node it left within an hour of leaving."""
        by_c: dict[str, list[dict[str, Any]]] = {}
        for m in self.moves:
            by_c.setdefault(m["container"], []).append(m)
        n = 0
        for ms in by_c.values():
            ms.sort(key=lambda m: m["start_s"])
            for i, m in enumerate(ms):
                if any(
                    later["destination"] == m["source"]
                    and later["start_s"] - m["finish_s"] <= UNDO_WINDOW_S
                    for later in ms[i + 1 :]
                ):
                    n += 1
        return n


def run(
    scenario: Scenario,
    policy: str,
    containers0: Sequence[SimContainer],
    cfg: BalancerConfig,
    truth: TruthModel,
    seed: int,
) -> Result:
    rng = random.Random(seed)
    n = scenario.nodes + (1 if scenario.join else 0)
    names = [f"node{i}" for i in range(n)]
    cs = [
        SimContainer(
            c.id,
            c.node,
            c.home,
            c.cpu_base,
            c.memory_bytes,
            c.dirty_bytes_per_s,
            c.layers,
            c.pinned,
        )
        for c in containers0
    ]
    by_id = {c.id: c for c in cs}
    node_layers: dict[str, set[str]] = {nm: set() for nm in names}
    for c in cs:
        node_layers[c.node].update(layer.digest for layer in c.layers)
    history = MoveHistory()
    baseline = ProxmoxBaseline()
    prior_model = CostModel(strategies=cfg.strategies)
    pending: list[Pending] = []
    res = Result(scenario.workload, scenario.nodes, policy)
    t = 0.0
    above = rounds = 0
    was_above = False
    while t < scenario.duration_s:
        # finish the moves due by now
        for p in [p for p in pending if p.finish_s <= t]:
            pending.remove(p)
            c = by_id[p.container]
            c.node, c.migrating = p.destination, False
            node_layers[p.destination].update(layer.digest for layer in c.layers)
            if policy == "jaula":
                history = history.with_finished(
                    c.id,
                    finished_s=p.finish_s,
                    ok=True,
                    downtime_s=p.downtime_s,
                    total_s=p.total_s,
                    bytes_sent=p.bytes_sent,
                )
            for m in res.moves:
                if m["container"] == c.id and m["finish_s"] is None:
                    m["finish_s"] = p.finish_s
        # measure
        draining_node = (
            "node0" if scenario.drain_at_s is not None and t >= scenario.drain_at_s else None
        )
        cpu_used = dict.fromkeys(names, 0.0)
        mem_used = dict.fromkeys(names, 0)
        views = []
        for c in cs:
            cpu = c.cpu_base * round(scenario.factor(c, t), 2)
            cpu_used[c.node] += cpu
            mem_used[c.node] += c.memory_bytes
            status = ContainerStatus.MIGRATING if c.migrating else ContainerStatus.RUNNING
            key = (c.node, status, cpu)
            if key != c.view_key or c.view is None:
                c.view = ContainerView(
                    c.id,
                    c.node,
                    status,
                    cpu,
                    c.memory_bytes,
                    c.dirty_bytes_per_s,
                    {BALANCE_LABEL: "false"} if c.pinned else {},
                    c.layers,
                )
                c.view_key = key
            views.append(c.view)
        nodes = [
            NodeView(
                nm,
                NODE_CORES,
                NODE_MEMORY,
                min(100.0, SYS_CPU_PCT + 100.0 * cpu_used[nm] / NODE_CORES),
                min(100.0, SYS_MEM_PCT + 100.0 * mem_used[nm] / NODE_MEMORY),
                image_layers=frozenset(node_layers[nm]),
                draining=nm == draining_node,
            )
            for nm in names
        ]
        view = ClusterView(t, tuple(nodes), tuple(views))
        counted = [node_load(nd.cpu_percent, nd.memory_percent) for nd in nodes if not nd.draining]
        imb = imbalance(counted)
        res.series.append((t, imb))
        if rounds == 0:
            res.start_imbalance = imb
        res.peak_imbalance = max(res.peak_imbalance, imb)
        rounds += 1
        if imb > cfg.threshold:
            above += 1
        if t >= scenario.disturbance_s:
            if imb > cfg.threshold:
                was_above = True
            elif was_above and res.threshold_first_under_s is None:
                res.threshold_first_under_s = t - scenario.disturbance_s
        # decide
        chosen: list[tuple[str, str, str]] = []
        t0 = time.perf_counter()
        if policy == "jaula":
            d = plan(view, cfg, history, t)
            history = d.record(history).pruned(t, cfg)
            chosen = [(m.container, m.destination, m.strategy) for m in d.moves]
        elif policy == "proxmox":
            for cv, dest in baseline.decide(view, busy=bool(pending)):
                best = min(
                    (
                        prior_model.predict(s, cv.memory_bytes, cv.dirty_bytes_per_s)
                        for s in prior_model.strategies
                    ),
                    key=lambda p: (
                        cfg.cost_per_downtime_s * p.downtime_s + cfg.cost_per_total_s * p.total_s
                    ),
                )
                chosen.append((cv.id, dest, best.strategy))
        res.decide_ms.append((time.perf_counter() - t0) * 1000.0)
        for cid, dest, strategy in chosen:
            c = by_id[cid]
            down, total, nbytes = truth.sample(strategy, c.memory_bytes, rng)
            c.migrating = True
            pending.append(Pending(cid, dest, t + total, down, total, nbytes))
            res.moves.append(
                {
                    "container": cid,
                    "source": c.node,
                    "destination": dest,
                    "strategy": strategy,
                    "start_s": t,
                    "finish_s": None,
                    "downtime_s": down,
                    "total_s": total,
                    "memory_bytes": c.memory_bytes,
                }
            )
        t += ROUND_S
    res.above_share = above / max(1, rounds)
    res.final_imbalance = res.series[-1][1]
    res.final_max_load = max(node_load(nd.cpu_percent, nd.memory_percent) for nd in nodes)
    if scenario.drain_at_s is not None:
        res.left_on_drained = sum(1 for c in cs if c.node == "node0")
    for m in res.moves:
        if m["finish_s"] is None:
            m["finish_s"] = m["start_s"] + m["total_s"]
    return res


# -- report -----------------------------------------------------------------------------------


def _fmt_s(v: float | None, was: bool) -> str:
    if v is None:
        return "never" if was else "-"
    return f"{v:.0f}"


def table(results: Sequence[Result]) -> str:
    head = (
        "| nodes | workload | policy | imbalance start / peak / final | time to <= 0.3 s "
        "| rounds > 0.3 | moves | undone <= 1 h | downtime total s | decide ms p50 / max "
        "| max node load final | left on drained |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        was_above = any(i > 0.3 for _, i in r.series)
        rows.append(
            f"| {r.nodes} | {r.workload} | {r.policy} | {r.start_imbalance:.3f} / "
            f"{r.peak_imbalance:.3f} / {r.final_imbalance:.3f} | "
            f"{_fmt_s(r.threshold_first_under_s, was_above)} | {100 * r.above_share:.0f} % | "
            f"{len(r.moves)} | {r.undone()} | {sum(m['downtime_s'] for m in r.moves):.1f} | "
            f"{statistics.median(r.decide_ms):.1f} / {max(r.decide_ms):.1f} | "
            f"{100 * r.final_max_load:.0f} % | "
            f"{r.left_on_drained if r.workload == 'drain' else '-'} |"
        )
    return head + "\n".join(rows) + "\n"


def goals(results: Sequence[Result]) -> str:
    """The issue's goal figures for jaula against the baseline, per workload and size."""
    lines = [
        (
            "| nodes | workload | final imbalance <= baseline | moves <= half "
            "| downtime <= half | undone = 0 | round < 1 s |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    keyed = {(r.nodes, r.workload, r.policy): r for r in results}
    for (n, w, p), j in keyed.items():
        if p != "jaula":
            continue
        b = keyed.get((n, w, "proxmox"))
        if b is None:
            continue
        jd = sum(m["downtime_s"] for m in j.moves)
        bd = sum(m["downtime_s"] for m in b.moves)

        def yn(ok: bool) -> str:
            return "yes" if ok else "**no**"

        lines.append(
            f"| {n} | {w} | {yn(j.final_imbalance <= b.final_imbalance + 1e-9)} "
            f"({j.final_imbalance:.3f} vs {b.final_imbalance:.3f}) | "
            f"{yn(len(j.moves) <= len(b.moves) / 2)} ({len(j.moves)} vs {len(b.moves)}) | "
            f"{yn(jd <= bd / 2 + 1e-9)} ({jd:.1f} vs {bd:.1f} s) | {yn(j.undone() == 0)} "
            f"({j.undone()}) | {yn(max(j.decide_ms) < 1000)} ({max(j.decide_ms):.0f} ms) |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.nodes for r in results})
    works = [w for w in WORKLOADS if any(r.workload == w for r in results)]
    fig, axes = plt.subplots(
        len(sizes), len(works), figsize=(4 * len(works), 3 * len(sizes)), squeeze=False
    )
    for i, n in enumerate(sizes):
        for j, w in enumerate(works):
            ax = axes[i][j]
            for r in results:
                if r.nodes == n and r.workload == w:
                    ax.plot(
                        [t / 3600 for t, _ in r.series],
                        [v for _, v in r.series],
                        label=r.policy,
                        linewidth=1,
                    )
            ax.axhline(0.3, linestyle="--", color="grey", linewidth=0.8)
            ax.set_title(f"{w}, {n} nodes", fontsize=9)
            ax.set_xlabel("hours", fontsize=8)
            ax.set_ylabel("imbalance (stddev/mean)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000", help="node counts, comma-separated")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument(
        "--diurnal-hours",
        default="",
        help="per size, e.g. 24,6 (default: 24 at <= 100 nodes, 6 above)",
    )
    ap.add_argument(
        "--minutes", type=float, default=0.0, help="cut every run to this many minutes (smoke runs)"
    )
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--out", default="", help="results folder (default results/balancer-DATE)")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        print(
            f"balancer_sim: --sizes {args.sizes!r}: give node counts such as 100,1000",
            file=sys.stderr,
        )
        return 2
    works = [w for w in args.workloads.split(",") if w]
    pols = [p for p in args.policies.split(",") if p]
    for w in works:
        if w not in WORKLOADS:
            print(
                f"balancer_sim: unknown workload {w!r}; use {','.join(WORKLOADS)}", file=sys.stderr
            )
            return 2
    for p in pols:
        if p not in POLICIES:
            print(f"balancer_sim: unknown policy {p!r}; use {','.join(POLICIES)}", file=sys.stderr)
            return 2
    dh = [float(x) for x in args.diurnal_hours.split(",") if x]
    cfg = BalancerConfig()
    truth = TruthModel.from_readme()
    results: list[Result] = []
    for k, n in enumerate(sizes):
        hours = dh[k] if k < len(dh) else (24.0 if n <= 100 else 6.0)
        population = make_containers(n, random.Random(args.seed * 1000 + n))
        for w in works:
            sc = make_scenario(w, n, hours, random.Random(args.seed + n))
            if args.minutes:
                sc.duration_s = min(sc.duration_s, 60.0 * args.minutes)
            for p in pols:
                t0 = time.perf_counter()
                r = run(sc, p, population, cfg, truth, seed=args.seed)
                print(
                    f"balancer_sim: {n} nodes {w} {p}: {len(r.moves)} moves, final "
                    f"imbalance {r.final_imbalance:.3f} ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                )
                results.append(r)
    out = Path(args.out or f"results/balancer-{dt.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)
    md = (
        f"# Balancer simulation ({dt.datetime.now().isoformat(timespec='seconds')})\n\n"
        f"`python -m benchmarks.balancer_sim {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f", seed {args.seed}, rounds of {ROUND_S:g} s, {PER_NODE} containers per node, "
        f"nodes of {NODE_CORES:g} cores and {NODE_MEMORY // GIB} GiB.\n\n"
        + table(results)
        + "\n## The issue's goals for jaula against the Proxmox baseline\n\n"
        + goals(results)
    )
    (out / "summary.md").write_text(md)
    (out / "runs.json").write_text(
        json.dumps(
            [
                {
                    "nodes": r.nodes,
                    "workload": r.workload,
                    "policy": r.policy,
                    "series": r.series[:: max(1, len(r.series) // 500)],
                    "moves": r.moves,
                    "decide_ms_p50": statistics.median(r.decide_ms),
                    "decide_ms_max": max(r.decide_ms),
                    "undone": r.undone(),
                    "final_imbalance": r.final_imbalance,
                }
                for r in results
            ],
            indent=1,
        )
    )
    try:
        plot(results, out / "imbalance.png")
    except ImportError:
        print(
            "balancer_sim: matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr
        )
    print(md)
    print(f"balancer_sim: results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
