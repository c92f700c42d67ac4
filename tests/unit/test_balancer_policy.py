"""The balancer's pure policy (balancer/): each rule shown to bite, the cost model learning,
the configuration's errors, and a smoke run of the simulator.  No root, no node service."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from balancer import (
    BalancerConfig,
    BalancerConfigError,
    ClusterView,
    ClusterViewError,
    ContainerView,
    CostModel,
    Layer,
    MigrationSample,
    MoveHistory,
    MoveRecord,
    NodeView,
    Reason,
    imbalance,
    node_load,
    plan,
)
from benchmarks import balancer_sim
from runtime.state import ContainerStatus

GIB = 1 << 30
RUN = ContainerStatus.RUNNING


def node(name: str, cpu: float, mem: float, **kw: object) -> NodeView:
    return NodeView(name, 16.0, 64 * GIB, cpu, mem, **kw)  # type: ignore[arg-type]


def ctr(cid: str, on: str, cpu: float = 1.5, mem: int = 2 * GIB, **kw: object) -> ContainerView:
    return ContainerView(cid, on, kw.pop("status", RUN), cpu, mem, **kw)  # type: ignore[arg-type]


def hot_view(containers: list[ContainerView] | None = None, **n1: object) -> ClusterView:
    """n0 loaded (90 % CPU), n1 and n2 idle; eight containers on n0 by default."""
    cs = containers if containers is not None else [ctr(f"c{i}", "n0") for i in range(8)]
    return ClusterView.of(
        0.0, [node("n0", 90, 40), node("n1", 10, 10, **n1), node("n2", 10, 10)], cs
    )


def rounds(view: ClusterView, cfg: BalancerConfig, n: int, h: MoveHistory | None = None):
    """Run ``n`` rounds 10 s apart on the same view; the decisions and the history."""
    h = h or MoveHistory()
    out = []
    for i in range(n):
        d = plan(view, cfg, h, 1000.0 + 10.0 * i)
        h = d.record(h)
        out.append(d)
    return out, h


CFG = BalancerConfig()


# -- load and imbalance -----------------------------------------------------------------------


def test_load_is_the_mean_of_cpu_and_memory_and_imbalance_the_cv() -> None:
    assert node_load(80, 40) == pytest.approx(0.6)
    assert imbalance([0.5, 0.5, 0.5]) == 0.0
    assert imbalance([0.2, 0.6]) == pytest.approx(0.5)  # stddev 0.2 / mean 0.4
    assert imbalance([0.7]) == 0.0 and imbalance([0.0, 0.0]) == 0.0


def test_a_balanced_cluster_moves_nothing() -> None:
    view = ClusterView.of(0, [node("a", 50, 30), node("b", 52, 31)], [ctr("x", "a")])
    d = plan(view, CFG, MoveHistory(), 0.0)
    assert d.reason is Reason.BALANCED and not d.moves and not d.hot


# -- hysteresis -------------------------------------------------------------------------------


def test_a_spike_shorter_than_the_hold_moves_nothing() -> None:
    calm = ClusterView.of(
        0,
        [node("n0", 30, 20), node("n1", 25, 20), node("n2", 28, 20)],
        [ctr(f"c{i}", "n0") for i in range(8)],
    )
    h = MoveHistory()
    seen = []
    for i, view in enumerate([hot_view(), hot_view(), calm, hot_view(), hot_view()]):
        d = plan(view, CFG, h, 10.0 * i)
        h = d.record(h)
        seen.append(d.reason)
    assert seen == [Reason.HOLDING, Reason.HOLDING, Reason.BALANCED, Reason.HOLDING, Reason.HOLDING]
    d = plan(hot_view(), CFG, h, 50.0)  # the third hot round in a row
    assert d.reason is Reason.MOVES and d.moves


def test_moves_carry_gain_cost_and_strategy_and_lower_the_imbalance() -> None:
    ds, _ = rounds(hot_view(), CFG, 3)
    d = ds[-1]
    assert d.imbalance_after < d.imbalance
    for m in d.moves:
        assert m.source == "n0" and m.destination in ("n1", "n2")
        assert m.gain > 0 and m.relief >= (1 + CFG.margin) * m.cost_score
        assert m.cost.downtime_s > 0 and m.cost.total_s >= m.cost.downtime_s
        assert m.cost.bytes > 0 and m.strategy in CFG.strategies


# -- the destination --------------------------------------------------------------------------


def test_a_move_that_would_overload_the_target_is_not_made() -> None:
    # the only other node sits at 75 % CPU: a 10-point container would take it past 80 %
    view = ClusterView.of(
        0, [node("n0", 99, 60), node("n1", 75, 10)], [ctr("big", "n0", cpu=1.6, mem=1 * GIB)]
    )
    ds, _ = rounds(view, CFG, 3)
    assert not ds[-1].moves and ds[-1].reason is Reason.NO_CANDIDATE
    roomy = ClusterView.of(
        0, [node("n0", 99, 60), node("n1", 60, 10)], [ctr("big", "n0", cpu=1.6, mem=1 * GIB)]
    )
    ds, _ = rounds(roomy, CFG, 3)
    assert [m.destination for m in ds[-1].moves] == ["n1"]


def test_a_target_is_filled_only_up_to_the_midpoint() -> None:
    # one 40-point container: n1 would end above the midpoint of 60 % and 20 %
    view = ClusterView.of(
        0, [node("n0", 99, 21), node("n1", 20, 20)], [ctr("lump", "n0", cpu=6.4, mem=1 * GIB)]
    )
    cfg = BalancerConfig(overload_percent=100)
    ds, _ = rounds(view, cfg, 3)
    assert not ds[-1].moves


def test_cpu_flags_must_be_present_on_the_destination() -> None:
    cs = [ctr(f"c{i}", "n0", cpu_flags=frozenset({"avx512f"})) for i in range(8)]
    view = ClusterView.of(
        0,
        [
            node("n0", 90, 40),
            node("n1", 10, 10, cpu_flags=frozenset({"sse4_2"})),
            node("n2", 15, 10, cpu_flags=frozenset({"sse4_2", "avx512f"})),
        ],
        cs,
    )
    ds, _ = rounds(view, CFG, 3)
    assert ds[-1].moves and {m.destination for m in ds[-1].moves} == {"n2"}


def test_a_destination_with_the_image_layers_is_cheaper() -> None:
    layers = (Layer("sha256:a", 400_000_000),)
    cs = [ctr("c0", "n0", image_layers=layers)]
    view = ClusterView.of(
        0,
        [
            node("n0", 90, 40),
            node("n1", 10, 10),
            node("n2", 10, 10, image_layers=frozenset({"sha256:a"})),
        ],
        cs,
    )
    ds, _ = rounds(view, CFG, 3)
    (m,) = ds[-1].moves
    assert m.destination == "n2"
    model = CostModel()
    bare = model.predict(m.strategy, 2 * GIB, 0.0, missing_layer_bytes=400_000_000)
    assert m.cost.bytes < bare.bytes and m.cost.total_s < bare.total_s


def test_a_failed_destination_backs_off() -> None:
    failed = MoveHistory().with_started(MoveRecord("c7", "n0", "n1", "cold", 900.0, GIB))
    failed = failed.with_finished("c7", finished_s=990.0, ok=False)
    ds, _ = rounds(hot_view(), CFG, 3, failed)
    assert ds[-1].moves and all(m.destination == "n2" for m in ds[-1].moves)
    assert failed.destination_backoff_until_s("n1", 1000.0, CFG) == 990.0 + 300.0


def test_a_node_a_move_just_arrived_at_takes_no_other_until_it_settles() -> None:
    # c7 arrived on n1 at 995 s; n1 still reports no load for it (its figures lag)
    arrived = MoveHistory().with_started(MoveRecord("c7", "n0", "n1", "cold", 900.0, GIB))
    arrived = arrived.with_finished("c7", finished_s=995.0, ok=True, total_s=5.0)
    view = hot_view([ctr(f"c{i}", "n0") for i in range(7)] + [ctr("c7", "n1", cpu=0.0)])
    cfg = BalancerConfig(hold_rounds=1)
    d = plan(view, cfg, arrived, 1000.0)
    assert d.moves and all(m.destination == "n2" for m in d.moves), d.moves
    later = plan(view, cfg, arrived, 995.0 + cfg.settle_s + 1.0)
    assert "n1" in {m.destination for m in later.moves}, later.moves


# -- the containers ---------------------------------------------------------------------------


def test_a_pinned_container_is_never_moved() -> None:
    cs = [ctr(f"c{i}", "n0", labels={"jaula.balance": "false"}) for i in range(8)]
    ds, _ = rounds(hot_view(cs), CFG, 6)
    assert all(not d.moves for d in ds)
    assert ds[-1].reason is Reason.NO_CANDIDATE


def test_a_migrating_container_is_never_picked_and_counts_in_flight() -> None:
    cs = [ctr("busy", "n0", cpu=4.0, status=ContainerStatus.MIGRATING), ctr("c1", "n0")]
    ds, _ = rounds(hot_view(cs), CFG, 3)
    assert "busy" not in {m.container for m in ds[-1].moves}
    assert ds[-1].in_flight == 1


def test_the_caps_bound_moves_in_the_cluster_and_per_node() -> None:
    nodes = [node(f"hot{i}", 95, 50) for i in range(6)] + [node(f"cold{i}", 5, 5) for i in range(6)]
    cs = [ctr(f"h{i}-{j}", f"hot{i}") for i in range(6) for j in range(10)]
    view = ClusterView.of(0, nodes, cs)
    ds, h = rounds(view, CFG, 3)
    moves = ds[-1].moves
    assert len(moves) == CFG.max_in_flight
    touching: dict[str, int] = {}
    for m in moves:
        for n in (m.source, m.destination):
            touching[n] = touching.get(n, 0) + 1
    assert max(touching.values()) <= CFG.max_in_flight_per_node
    d = plan(view, CFG, h, 1030.0)  # five in flight, none finished
    assert d.reason is Reason.CAPS and not d.moves
    tight = BalancerConfig(max_in_flight=1, max_in_flight_per_node=1)
    ds, _ = rounds(view, tight, 3)
    assert len(ds[-1].moves) == 1


def test_cooldown_is_kubevirts_max_floor_duration_doubled_and_capped() -> None:
    def moved(h: MoveHistory, at: float, total: float = 30.0) -> MoveHistory:
        h = h.with_started(MoveRecord("c", "a", "b", "cold", at - total, GIB))
        return h.with_finished("c", finished_s=at, ok=True, total_s=total)

    h = moved(MoveHistory(), 1000.0)
    assert h.cooldown_until_s("c", 1001.0, CFG) == 1000.0 + 900.0
    h2 = moved(h, 5000.0)
    assert h2.cooldown_until_s("c", 5001.0, CFG) == 5000.0 + 1800.0  # doubled within 48 h
    slow = moved(MoveHistory(), 1000.0, total=2000.0)
    assert slow.cooldown_until_s("c", 1001.0, CFG) == 1000.0 + 2000.0  # the move's own time
    h6 = MoveHistory()
    for k in range(6):
        h6 = moved(h6, 1000.0 + k * 100.0)
    assert h6.cooldown_until_s("c", 1600.0, CFG) == 1500.0 + 6 * 3600.0  # capped at 6 h
    late = 1000.0 + 49 * 3600.0  # the first move is out of the 48 h window
    assert moved(h, late).cooldown_until_s("c", late, CFG) == late + 900.0
    assert MoveHistory().cooldown_until_s("c", 0.0, CFG) == 0.0


def test_a_container_cooling_down_is_not_picked() -> None:
    h = MoveHistory().with_started(MoveRecord("c0", "n5", "n0", "cold", 900.0, GIB))
    h = h.with_finished("c0", finished_s=950.0, ok=True, total_s=50.0)
    cs = [ctr("c0", "n0", cpu=3.0), ctr("c1", "n0", cpu=0.8)]
    view = ClusterView.of(0, [node("n0", 90, 40), node("n1", 10, 10), node("n5", 40, 40)], cs)
    ds, _ = rounds(view, CFG, 3, h)
    assert [m.container for m in ds[-1].moves] == ["c1"]


def test_never_straight_back_to_the_node_it_left() -> None:
    h = MoveHistory().with_started(MoveRecord("c0", "n1", "n0", "cold", 0.0, GIB))
    h = h.with_finished("c0", finished_s=10.0, ok=True, total_s=10.0)
    cfg = BalancerConfig(cooldown_s=0.0, cooldown_max_s=0.0)  # only the no-return rule left
    view = ClusterView.of(
        0, [node("n0", 90, 40), node("n1", 10, 10), node("n2", 30, 20)], [ctr("c0", "n0")]
    )
    ds, _ = rounds(view, cfg, 3, h)
    assert [(m.container, m.destination) for m in ds[-1].moves] == [("c0", "n2")]
    assert h.left_node("c0", 1000.0, cfg) == "n1"


def test_smaller_containers_are_preferred_when_the_gain_is_equal() -> None:
    # both take 12.5 load points off n0 (same gain); "small" has half the memory
    cs = [ctr("large", "n0", cpu=1.0, mem=4 * GIB), ctr("small", "n0", cpu=1.5, mem=2 * GIB)]
    cfg = BalancerConfig(max_in_flight=1, max_in_flight_per_node=1)
    ds, _ = rounds(hot_view(cs), cfg, 3)
    (m,) = ds[-1].moves
    assert m.container == "small"


def test_a_draining_node_is_emptied_without_waiting_for_the_hold() -> None:
    cs = [ctr(f"c{i}", "n0", cpu=0.5, mem=GIB) for i in range(3)]
    cs.append(ctr("pin", "n0", labels={"jaula.balance": "false"}))
    view = ClusterView.of(
        0, [node("n0", 30, 20, draining=True), node("n1", 30, 20), node("n2", 32, 20)], cs
    )
    d = plan(view, CFG, MoveHistory(), 0.0)
    assert d.reason is Reason.MOVES
    assert {m.why for m in d.moves} == {"drain"} and len(d.moves) == 2  # per-node cap
    assert "pin" not in {m.container for m in d.moves}
    assert all(m.destination != "n0" for m in d.moves)
    only_pin = ClusterView.of(0, view.nodes, [cs[-1]])
    d = plan(only_pin, CFG, MoveHistory(), 0.0)
    assert d.reason is Reason.NO_CANDIDATE and "1 container(s) cannot move" in d.detail


# -- the cost model ---------------------------------------------------------------------------


def test_the_cost_model_starts_from_the_readme_table() -> None:
    m = CostModel()
    cold, post = m.predict("cold", GIB, 0.1 * GIB), m.predict("postcopy", GIB, 0.1 * GIB)
    assert 2.0 < cold.downtime_s < 4.5 and post.downtime_s < 0.6
    assert m.predict("cold", 16 << 20, 0.0).downtime_s < cold.downtime_s


def test_the_cost_model_learns_from_reports() -> None:
    rng = random.Random(1)
    # this cluster's post-copy is slow: 8 s of downtime per GiB (the prior says ~0.14 s)
    reports = []
    for _ in range(200):
        mem = rng.randint(64, 4096) << 20
        reports.append(
            MigrationSample("postcopy", mem, 0.0, 0.1 + 8.0 * mem / GIB, 1.0 + 3.0 * mem / GIB, mem)
        )
    learnt = CostModel(reports)
    assert learnt.predict("postcopy", 2 * GIB, 0.0).downtime_s == pytest.approx(16.1, rel=0.1)
    assert CostModel().predict("postcopy", 2 * GIB, 0.0).downtime_s < 1.0
    assert learnt.fits["postcopy"].own_samples == 200
    # and the policy follows: with post-copy slow, a 256 MiB container moves cold
    h = MoveHistory()
    for i, r in enumerate(reports):
        h = h.with_started(MoveRecord(f"x{i}", "z", "y", "postcopy", 0.0, r.memory_bytes))
        h = h.with_finished(
            f"x{i}",
            finished_s=1.0,
            ok=True,
            downtime_s=r.downtime_s,
            total_s=r.total_s,
            bytes_sent=r.bytes_sent,
        )
    cs = [ctr("c0", "n0", cpu=3.0, mem=256 << 20)]
    fresh, _ = rounds(hot_view(cs), CFG, 3)
    taught, _ = rounds(hot_view(cs), CFG, 3, h)
    assert fresh[-1].moves[0].strategy == "postcopy"
    assert taught[-1].moves[0].strategy == "cold"


# -- configuration and view -------------------------------------------------------------------


def test_config_from_toml_and_its_one_line_errors(tmp_path: Path) -> None:
    f = tmp_path / "balancer.toml"
    f.write_text("[balancer]\nthreshold = 0.25\nhold_rounds = 5\nstrategies = ['cold']\n")
    cfg = BalancerConfig.from_toml(f)
    assert (cfg.threshold, cfg.hold_rounds, cfg.strategies) == (0.25, 5, ("cold",))
    for text, needle in [
        ("[balancer]\nthreshhold = 0.3\n", "balancer.threshhold: unknown key"),
        ("[balancer]\nhold_rounds = 'three'\n", "balancer.hold_rounds: must be an integer"),
        ("[balancer]\nmargin = 1.5\n", "balancer.margin: is a fraction below 1"),
        ("[balancer]\ncooldown_s = 600\ncooldown_max_s = 60\n", "balancer.cooldown_max_s"),
        ("[balancer]\nstrategies = ['precopy']\n", "'precopy' is not a strategy"),
        ("[balancer\n", "not valid TOML"),
    ]:
        f.write_text(text)
        with pytest.raises(BalancerConfigError) as e:
            BalancerConfig.from_toml(f)
        msg = str(e.value)
        assert needle in msg and str(f) in msg and "\n" not in msg, msg
    with pytest.raises(BalancerConfigError, match="no such file"):
        BalancerConfig.from_toml(tmp_path / "missing.toml")


def test_an_inconsistent_view_is_refused() -> None:
    with pytest.raises(ClusterViewError, match="'nowhere'"):
        ClusterView.of(0, [node("a", 1, 1)], [ctr("x", "nowhere")])
    with pytest.raises(ClusterViewError, match="twice"):
        ClusterView.of(0, [node("a", 1, 1), node("a", 2, 2)], [])


# -- the simulator ----------------------------------------------------------------------------


def test_the_simulator_runs_the_three_policies_on_a_small_cluster() -> None:
    population = balancer_sim.make_containers(12, random.Random(3))
    truth = balancer_sim.TruthModel.from_readme()
    out = {}
    for policy in balancer_sim.POLICIES:
        sc = balancer_sim.make_scenario("drain", 12, 1.0, random.Random(4))
        sc.duration_s = 900.0
        out[policy] = balancer_sim.run(sc, policy, population, CFG, truth, seed=5)
    assert len(out["jaula"].series) == 90
    assert out["none"].moves == [] and out["none"].left_on_drained == 20
    pinned = sum(c.pinned for c in population if c.home == 0)
    assert out["jaula"].left_on_drained == pinned
    assert out["jaula"].undone() == 0
    table = balancer_sim.table(list(out.values()))
    assert table.count("\n") == 2 + 3 and "| 12 | drain | jaula |" in table
