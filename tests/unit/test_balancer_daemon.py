"""The balancing daemon's logic without root: the view it builds from ``node_metrics``
replies, a round against a scripted node client and a real ``files`` cluster state in
tmp_path (moves requested only while leading, outcomes recorded with their measured cost,
failures backed off), and the history a new leader rebuilds from the event log."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from balancer import BalancerConfig
from balancer.daemon import (
    EV_FAILED,
    EV_FINISHED,
    EV_ROUND,
    EV_STARTED,
    Balancer,
    history_from_events,
    view_from_metrics,
)
from migrate.cluster_state import MemberStatus
from migrate.cluster_state.files import FilesState
from migrate.errors import MigrationError
from runtime.state import ContainerStatus

GIB = 1 << 30
CFG = BalancerConfig(
    interval_s=1.0,
    hold_rounds=1,
    load_from="containers",
    strategies=("cold",),
    memory_reserve_bytes=0,
)


def report(node: str, *ctrs: tuple[str, float, str]) -> dict[str, Any]:
    return {
        "node": node,
        "at_s": 0.0,
        "window_s": 10.0,
        "cpu_cores": 4.0,
        "memory_bytes": 16 * GIB,
        "cpu_percent": 50.0,
        "memory_percent": 10.0,
        "cpu_flags": ["fpu"],
        "image_layers": ["l1"],
        "containers": [
            {
                "id": cid,
                "name": cid,
                "status": status,
                "cpu_cores": cores,
                "memory_bytes": 64 << 20,
                "dirty_bytes_per_s": 0.0,
                "image_layers": ["l1"],
                "pids": 1,
            }
            for cid, cores, status in ctrs
        ],
    }


class FakeNodes:
    """Answers metrics from ``reports``; migrate requests are recorded and answered with a
    report (or ``fail``'s error)."""

    def __init__(self, reports: dict[str, dict[str, Any]], fail: str | None = None) -> None:
        self.reports = reports
        self.fail = fail
        self.migrations: list[dict[str, Any]] = []

    async def request(
        self, node: str, mtype: str, wait_s: float = 30.0, on_progress: Any = None, **f: Any
    ) -> dict[str, Any]:
        if mtype == "metrics":
            if node not in self.reports:
                raise MigrationError(f"{node}: not reachable")
            return self.reports[node]
        assert mtype == "migrate"
        self.migrations.append({"source": node, **f})
        if self.fail:
            raise MigrationError(f"{node}: {self.fail}")
        return {"report": {"downtime_s": 0.25, "total_s": 1.5, "bytes_sent": 12345}}


def loaded() -> dict[str, dict[str, Any]]:
    return {
        "n1": report("n1", ("a", 2.0, "running"), ("b", 1.0, "running")),
        "n2": report("n2"),
        "n3": report("n3"),
    }


def test_view_uses_the_containers_share_and_the_members() -> None:
    r = loaded()
    r["n2"]["containers"] = report("n2", ("b", 1.0, "migrating"))["containers"]
    r["n3"]["containers"] = report("n3", ("old", 3.0, "migrated"))["containers"]
    members = {"n2": MemberStatus.DRAINING, "n3": MemberStatus.LOST}
    v = view_from_metrics(r, members, CFG, 1.0)
    n1, n2, n3 = v.nodes
    assert n1.cpu_percent == pytest.approx(75.0)  # 3 of 4 cores, not the host's 50 %
    assert n2.draining and not n2.accepts and n3.schedulable is False
    by = {c.id: c for c in v.containers}
    assert set(by) == {"a", "b"}  # the migrated copy is not load
    assert by["b"].status is ContainerStatus.MIGRATING and by["b"].node == "n1"
    host = view_from_metrics(r, {}, BalancerConfig(), 1.0)
    assert host.nodes[0].cpu_percent == 50.0


def daemon(tmp_path: Path, nodes: FakeNodes) -> tuple[Balancer, FilesState]:
    st = FilesState(tmp_path / "state")
    return Balancer(CFG, nodes, ["n1", "n2", "n3"], st, "alice"), st


def test_a_round_moves_records_the_measured_cost_and_events(tmp_path: Path) -> None:
    nodes = FakeNodes(loaded())
    b, st = daemon(tmp_path, nodes)
    lead = st.campaign("balancer", "alice")
    b.lead = lead

    async def go() -> None:
        r = await b.round()
        assert r.started, r.decision
        await b.wait_moves(10)

    asyncio.run(go())
    assert nodes.migrations and nodes.migrations[0]["source"] == "n1"
    assert nodes.migrations[0]["strategy"] == "cold"
    done = [m for m in b.history.moves if not m.in_flight]
    assert done and done[0].ok and done[0].downtime_s == 0.25 and done[0].bytes_sent == 12345
    kinds = [e.kind for e in st.events_since(0)]
    assert kinds[0] == EV_ROUND and EV_STARTED in kinds and EV_FINISHED in kinds
    # a new leader rebuilds the cool-down from the log
    h = history_from_events(st.events_since(0), CFG)
    moved = done[0].container
    assert h.cooldown_until_s(moved, done[0].finished_s or 0.0, CFG) > (done[0].finished_s or 0)
    assert h.in_flight() == ()
    lead.resign()
    st.close()


def test_no_move_once_leadership_is_lost(tmp_path: Path) -> None:
    nodes = FakeNodes(loaded())
    b, st = daemon(tmp_path, nodes)
    lead = st.campaign("balancer", "alice")
    b.lead = lead
    lead.resign()  # lost before the round acts
    r = asyncio.run(b.round())
    assert r.decision.moves and not r.started
    assert nodes.migrations == []
    assert EV_STARTED not in [e.kind for e in st.events_since(0)]
    st.close()


def test_a_failed_move_is_recorded_and_backs_off(tmp_path: Path) -> None:
    nodes = FakeNodes(loaded(), fail="destination refused the offer")
    b, st = daemon(tmp_path, nodes)

    async def go() -> None:
        await b.round()
        await b.wait_moves(10)

    asyncio.run(go())
    failed = [e for e in st.events_since(0) if e.kind == EV_FAILED]
    assert failed and "refused" in failed[0].data["error"]
    dest = failed[0].data["destination"]
    now = failed[0].data["finished_s"]
    assert b.history.destination_backoff_until_s(dest, now, CFG) > now
    st.close()


def test_an_unreachable_node_is_left_out(tmp_path: Path) -> None:
    r = loaded()
    del r["n3"]
    b, st = daemon(tmp_path, FakeNodes(r))
    view, down = asyncio.run(b.collect())
    assert [n.name for n in view.nodes] == ["n1", "n2"] and "n3" in down
    st.close()


def test_dry_run_requests_nothing(tmp_path: Path) -> None:
    nodes = FakeNodes(loaded())
    b, st = daemon(tmp_path, nodes)
    b.dry_run = True
    r = asyncio.run(b.round())
    assert r.decision.moves and not r.started and nodes.migrations == []
    st.close()


def test_prometheus_exporter_serves_the_round_and_the_moves(tmp_path: Path) -> None:
    import socket
    import urllib.request

    from balancer.prometheus import Exporter

    nodes = FakeNodes(loaded())
    b, st = daemon(tmp_path, nodes)
    b.exporter = Exporter()

    async def go() -> None:
        await b.round()
        await b.wait_moves(10)

    asyncio.run(go())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = b.exporter.serve(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'jaula_node_cpu_percent{node="n1"} 75.0' in text
    assert 'jaula_container_cpu_cores{container="a",node="n1"} 2.0' in text
    assert 'jaula_balancer_moves_total{result="finished"} 1.0' in text
    assert "jaula_migration_downtime_seconds_count 1.0" in text
    assert "jaula_migration_bytes_sum 12345.0" in text
    st.close()


def test_labels_pin_a_container_and_bad_ones_are_refused() -> None:
    from runtime.errors import ConfigError
    from runtime.spec import parse_labels

    assert parse_labels(["jaula.balance=false", "team=a=b"]) == ("jaula.balance=false", "team=a=b")
    for bad in ("nolabel", "=x", " k=v"):
        with pytest.raises(ConfigError, match="--label"):
            parse_labels([bad])
    r = loaded()
    r["n1"]["containers"][0]["labels"] = {"jaula.balance": "false"}
    by = {c.id: c for c in view_from_metrics(r, {}, CFG, 1.0).containers}
    assert by["a"].pinned and not by["b"].pinned


def test_a_move_in_flight_counts_on_its_destination() -> None:
    """Both busy containers of n1 must not chase n2: the first one's load is on its way."""
    from balancer import MoveHistory, plan

    view = view_from_metrics(
        {"n1": report("n1", ("a", 1.0, "migrating"), ("b", 1.0, "running")), "n2": report("n2")},
        {},
        CFG,
        1.0,
    )
    first = plan(view, CFG, MoveHistory(), 10.0)
    assert [m.container for m in first.moves] == ["b"]  # a is migrating: not picked
    # now a's move (to n2) is ours and in flight; b must stay
    from balancer.history import MoveRecord

    h = MoveHistory().with_started(MoveRecord("a", "n1", "n2", "cold", 9.0, 64 << 20))
    d = plan(view, CFG, h, 10.0)
    assert d.moves == (), d


def test_a_move_that_ends_after_the_history_was_rebuilt_is_still_recorded(
    tmp_path: Path,
) -> None:
    from balancer.history import MoveHistory

    nodes = FakeNodes(loaded())
    b, st = daemon(tmp_path, nodes)

    async def go() -> None:
        r = await b.round()
        assert r.started
        b.history = MoveHistory()  # leadership lost and won again while the move ran
        await b.wait_moves(10)

    asyncio.run(go())
    done = [m for m in b.history.moves if not m.in_flight]
    assert len(done) == 1 and done[0].ok and done[0].downtime_s == 0.25
    st.close()
