"""The balancing daemon against real node services on 127.0.0.1 with real containers and
real CRIU: the ``metrics`` request, a loaded node relieved, a balanced cluster left alone,
one leader of two daemons, and a drained node emptied.  Waits are bounded polls; nothing
asserts how long anything took."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migrate.cli import Nodes
from tests.helpers.balancer import (
    BURN,
    BURST,
    BUSY_COUNTER,
    IDLE,
    JAULA_ALL,
    balancers,
    big_busy,
    events,
    op_all,
    register,
    running_on,
    state_of,
    wait_receiving,
    write_config,
)
from tests.helpers.containers import wait_for
from tests.helpers.counter import assert_continuous, ticks
from tests.helpers.jaula import Jaula
from tests.helpers.nodes import Cluster2, in_process_node, make_cluster, serving
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

THREE = ("node1", "node2", "node3")


@pytest.fixture
def three(tmp_path: Path, busybox_image_layout: Path) -> Iterator[Cluster2]:
    """node1..node3 serving, busybox on each, operators alice and bob."""
    c = make_cluster(
        tmp_path / "cluster",
        busybox_image_layout,
        import_on=THREE,
        nodes=THREE,
        operators=("alice", "bob"),
    )
    with serving(c, *THREE):
        yield c


def metrics(c: Cluster2, node: str) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        return await Nodes(c.files.clients["alice"]).request(node, "metrics", wait_s=20.0)

    return asyncio.run(ask())


def moves(c: Cluster2) -> list[Any]:
    return [e for e in events(c) if e.kind.startswith("balancer.move.")]


def rounds(c: Cluster2, by: str | None = None) -> list[Any]:
    return [e for e in events(c) if e.kind == "balancer.round" and by in (None, e.node)]


def test_metrics_report_node_and_container_usage(three: Cluster2) -> None:
    n1 = three.local("node1")
    n1.run("run", "-d", "--name", "burn", "--cpus", "0.5", "busybox", "sh", "-c", BURN)
    n1.run("run", "-d", "--name", "idle", "busybox", "sh", "-c", IDLE)

    def usage() -> dict[str, dict[str, Any]]:
        m = metrics(three, "node1")
        by = {c["name"]: c for c in m["containers"]}
        return by if by["burn"]["cpu_cores"] > 0.2 else {}

    by = wait_for(usage, 30, "the burner's CPU use in node1's metrics")
    m = metrics(three, "node1")
    assert m["node"] == "node1" and m["cpu_cores"] >= 1 and m["memory_bytes"] > 0
    assert 0 <= m["cpu_percent"] <= 100 and 0 < m["memory_percent"] <= 100
    assert by["burn"]["cpu_cores"] < 0.8, by["burn"]  # --cpus 0.5 holds it
    assert by["idle"]["cpu_cores"] < 0.1, by["idle"]
    assert by["burn"]["memory_bytes"] > 0 and by["burn"]["status"] == "running"
    assert by["burn"]["image_layers"] and set(by["burn"]["image_layers"]) <= set(m["image_layers"])
    assert metrics(three, "node2")["containers"] == []


def test_node_serves_prometheus_metrics(tmp_path: Path, busybox_image_layout: Path) -> None:
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    port = _free_port()
    with c.files.nodes["node1"].open("a") as f:  # node2 keeps the default: no endpoint
        f.write(f"metrics_port = {port}\n")
    try:
        c.start("node1")
        c.start("node2")
        n1 = c.local("node1")
        n1.run("run", "-d", "--name", "burn", "--cpus", "0.5", "busybox", "sh", "-c", BURN)
        n1.run("run", "-d", "--name", "mover", "busybox", "sh", "-c", IDLE)
        c.op("migrate", "mover", "node2")

        def burning() -> Series:
            m = _scrape(port)
            return (
                m if m.get(("jaula_container_cpu_cores", _by(m, "name", "burn")), 0.0) > 0.2 else {}
            )

        got = wait_for(burning, 30, "the burner's CPU use in node1's /metrics")
        assert 0 <= got[("jaula_node_cpu_percent", (("node", "node1"),))] <= 100
        assert got[("jaula_node_memory_bytes", (("node", "node1"),))] > 0
        assert got[("jaula_container_cpu_cores", _by(got, "name", "burn"))] < 0.8
        assert _by(got, "name", "mover") == (), "a migrated container has no gauges here"
        cold = (("node", "node1"), ("strategy", "cold"))
        finished = (("node", "node1"), ("result", "finished"), ("strategy", "cold"))
        assert got[("jaula_node_migrations_total", finished)] == 1
        assert got[("jaula_node_migration_downtime_seconds_count", cold)] == 1
        assert got[("jaula_node_migration_downtime_seconds_sum", cold)] > 0
        assert got[("jaula_node_migration_bytes_sum", cold)] > 0
        inf = (("le", "+Inf"), *cold)
        assert got[("jaula_node_migration_bytes_bucket", inf)] == 1
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Series:
    """``GET /metrics`` over loopback: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _by(m: Series, label: str, value: str) -> tuple[tuple[str, str], ...]:
    """The labels of the container series whose ``label`` is ``value`` (``()``: none)."""
    return next(
        (ls for name, ls in m if name == "jaula_container_cpu_cores" and (label, value) in ls), ()
    )


def test_loaded_node_is_relieved_and_nothing_moves_back(three: Cluster2, tmp_path: Path) -> None:
    n1 = three.local("node1")
    for name in ("burn1", "burn2"):
        n1.run("run", "-d", "--name", name, "--cpus", "0.5", "busybox", "sh", "-c", BUSY_COUNTER)
    n1.run("run", "-d", "--name", "idle", "busybox", "sh", "-c", IDLE)
    with balancers(three, write_config(tmp_path / "b.toml")) as d:
        d.start("alice")
        done = wait_for(
            lambda: [e for e in moves(three) if e.kind == "balancer.move.finished"],
            120,
            f"a finished move; balancer log:\n{d.log('alice')}",
        )
        assert done[0].data["source"] == "node1", done[0].data
        first = done[0].seq
        # ten rounds after the move: nothing else moves (no bounce, no second move)
        wait_for(
            lambda: len([e for e in rounds(three) if e.seq > first]) >= 10,
            120,
            f"ten rounds after the move; log:\n{d.log('alice')}",
        )
        assert [e.seq for e in moves(three) if e.seq > first] == [], moves(three)
        assert d.alive("alice"), d.log("alice")
    moved = done[0].data
    where = {name: running_on(three, name) for name in ("burn1", "burn2", "idle")}
    assert where["idle"] == ["node1"], where
    assert sorted(where["burn1"] + where["burn2"]) == sorted(["node1", moved["destination"]])
    # the moved one counts on where it was: every tick once, in order
    name = "burn1" if where["burn1"] == [moved["destination"]] else "burn2"
    dest = three.local(moved["destination"])
    before = len(ticks(dest, name))
    wait_for(lambda: len(ticks(dest, name)) > before + 5, 30, f"{name} counting on")
    assert_continuous(ticks(dest, name))
    assert moved["downtime_s"] > 0 and moved["bytes_sent"] > 0, moved
    assert moved["predicted"]["strategy"] == "cold"
    # status shows the move and the cool-down
    out = op_all(three, "balancer", "status", "--config", str(tmp_path / "b.toml")).stdout
    assert "finished" in out and "cooling down" in out, out


def test_six_busy_containers_spread_and_stay(three: Cluster2, tmp_path: Path) -> None:
    # the test: six bounded CPU-busy containers (a tenth of a core each, so that two
    # shared cores cope) and two idle ones, all on node1 of three
    n1 = three.local("node1")
    busy = [f"busy{i}" for i in range(6)]
    for name in busy:
        n1.run("run", "-d", "--name", name, "--cpus", "0.1", "busybox", "sh", "-c", BUSY_COUNTER)
    for name in ("idle1", "idle2"):
        n1.run("run", "-d", "--name", name, "busybox", "sh", "-c", IDLE)
    cfg = write_config(tmp_path / "b.toml")
    threshold = 0.3  # the default (balancer.config)
    with balancers(three, cfg) as d:
        d.start("alice")
        # balanced again: a round under the threshold after a finished move, none in flight
        settled = wait_for(
            lambda: _settled(three, threshold),
            300,
            f"the imbalance under {threshold}; log:\n{d.log('alice')}",
        )
        wait_for(
            lambda: len([e for e in rounds(three) if e.seq > settled]) >= 10,
            120,
            f"ten rounds after balance; log:\n{d.log('alice')}",
        )
        assert d.alive("alice"), d.log("alice")
    assert [e for e in moves(three) if e.seq > settled] == [], "moved in the ten rounds after"
    done = [e.data for e in moves(three) if e.kind == "balancer.move.finished"]
    assert done and all(m["source"] == "node1" for m in done), done  # nothing moved back
    assert len({m["container"] for m in done}) == len(done), done  # none moved twice
    where = {name: running_on(three, name) for name in [*busy, "idle1", "idle2"]}
    assert all(len(w) == 1 for w in where.values()), where
    assert {w[0] for w in where.values()} == set(THREE), where  # every node took some
    for name, (node,) in where.items():  # every counter counts on, every tick once, in order
        if name in busy:
            j = three.local(node)
            n = len(ticks(j, name))
            _wait_ticks(j, name, n + 3)
            assert_continuous(ticks(j, name))


def _wait_ticks(j: Jaula, name: str, n: int, timeout_s: float = 60) -> None:
    """Until container ``name`` has counted ``n`` ticks on ``j``'s node."""
    wait_for(lambda: len(ticks(j, name)) >= n, timeout_s, f"{name} counting to {n}")


def _settled(c: Cluster2, threshold: float) -> int | None:
    """The seq of the first round under ``threshold`` after a finished move with no move in
    flight, or None."""
    ev = [e for e in events(c) if e.kind == "balancer.round" or e.kind.startswith("balancer.move.")]
    in_flight = 0
    finished = False
    for e in ev:
        if e.kind == "balancer.move.started":
            in_flight += 1
        elif e.kind in ("balancer.move.finished", "balancer.move.failed"):
            in_flight -= 1
            finished = finished or e.kind == "balancer.move.finished"
        elif finished and in_flight == 0 and e.data["imbalance"] <= threshold:
            return e.seq
    return None


def test_balanced_cluster_sees_no_move(three: Cluster2, tmp_path: Path) -> None:
    for node in THREE:
        three.local(node).run("run", "-d", "--name", f"idle-{node}", "busybox", "sh", "-c", IDLE)
    cfg = write_config(tmp_path / "b.toml")
    plan = op_all(three, "balancer", "plan", "--config", str(cfg)).stdout
    assert "no move" in plan, plan
    with balancers(three, cfg) as d:
        d.start("alice")
        wait_for(lambda: len(rounds(three)) >= 6, 90, f"six rounds; log:\n{d.log('alice')}")
    assert moves(three) == []
    reasons = {e.data["reason"] for e in rounds(three)}
    assert reasons <= {"balanced", "holding", "not-worth", "no-candidate"}, reasons
    for node in THREE:
        assert running_on(three, f"idle-{node}") == [node]


def test_a_brief_spike_moves_nothing(three: Cluster2, tmp_path: Path) -> None:
    # a hold of 30 rounds (about 30 s at 1 s rounds): the burst (about 4 s, seen for at
    # most the nodes' 10 s averaging window after it) makes some rounds hot, never 30 in a row
    cfg = write_config(tmp_path / "b.toml", hold_rounds=30)
    # the same base load everywhere, counting the bursters' memory once they are idle:
    # one idle container on node1 (and the two bursters), three on node2 and node3
    for node, n in (("node1", 1), ("node2", 3), ("node3", 3)):
        for i in range(n):
            three.local(node).run(
                "run", "-d", "--name", f"idle-{node}-{i}", "busybox", "sh", "-c", IDLE
            )
    n1 = three.local("node1")
    with balancers(three, cfg) as d:
        d.start("alice")
        wait_for(lambda: len(rounds(three)) >= 2, 60, f"two rounds; log:\n{d.log('alice')}")
        before = max(e.seq for e in rounds(three))
        for name in ("spike1", "spike2"):
            n1.run("run", "-d", "--name", name, "--cpus", "0.5", "busybox", "sh", "-c", BURST)
        hot = wait_for(
            lambda: [e for e in rounds(three) if e.seq > before and e.data["hot"]],
            60,
            f"a hot round from the spike; log:\n{d.log('alice')}",
        )[0]
        # the spike is over (a round that is not hot after it), and ten rounds more
        wait_for(
            lambda: _rounds_after_cooling(three, hot.seq) >= 10,
            120,
            "ten rounds after the spike",
        )
        assert d.alive("alice"), d.log("alice")
    assert moves(three) == []
    spiked = [e for e in rounds(three) if e.seq >= hot.seq and e.data["hot"]]
    assert {e.data["reason"] for e in spiked} == {"holding"}, [e.data for e in spiked]
    for name in ("idle-node1-0", "spike1", "spike2"):
        assert running_on(three, name) == ["node1"], (name, three.where(name))


def _rounds_after_cooling(c: Cluster2, seq: int) -> int:
    """How many rounds came after the first round after ``seq`` that is not hot."""
    after = [e for e in rounds(c) if e.seq > seq]
    cool = next((i for i, e in enumerate(after) if not e.data["hot"]), None)
    return 0 if cool is None else len(after) - cool - 1


def test_two_daemons_only_the_leader_acts(three: Cluster2, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "b.toml")
    st = state_of(three)
    try:
        with balancers(three, cfg) as d:
            d.start("alice")
            wait_for(lambda: st.leader("balancer") == "alice", 30, "alice leading")
            d.start("bob")
            wait_for(lambda: len(rounds(three, "alice")) >= 4, 60, "four rounds by alice")
            assert rounds(three, "bob") == [], "bob acted while alice led"
            assert d.alive("bob"), d.log("bob")  # waiting as a standby
            d.kill("alice", signal.SIGKILL)  # no resignation: the lock goes with the process
            wait_for(lambda: st.leader("balancer") == "bob", 60, f"bob leading:\n{d.log('bob')}")
            wait_for(lambda: len(rounds(three, "bob")) >= 2, 60, "rounds by bob")
            last_alice = max(e.seq for e in rounds(three, "alice"))
            assert min(e.seq for e in rounds(three, "bob")) > last_alice
    finally:
        st.close()


def test_drain_empties_a_node(three: Cluster2, tmp_path: Path) -> None:
    n1 = three.local("node1")
    for name in ("a", "b"):
        n1.run("run", "-d", "--name", name, "busybox", "sh", "-c", IDLE)
    register(three, *THREE)
    out = op_all(three, "node", "drain", "node1").stdout
    assert "node1 draining" in out
    with balancers(three, write_config(tmp_path / "b.toml")) as d:
        d.start("alice")
        wait_for(
            lambda: (
                running_on(three, "a") != ["node1"]
                and running_on(three, "b") != ["node1"]
                and len([e for e in moves(three) if e.kind == "balancer.move.finished"]) >= 2
            ),
            180,
            f"node1 emptied; log:\n{d.log('alice')}",
        )
    for name in ("a", "b"):
        where = running_on(three, name)
        assert len(where) == 1 and where[0] in ("node2", "node3"), (name, where)
    assert all(e.data["why"] == "drain" for e in moves(three)), moves(three)
    op_all(three, "node", "undrain", "node1")
    st = state_of(three)
    try:
        assert {m.name: m.status.value for m in st.members()}["node1"] == "ready"
    finally:
        st.close()


def test_drain_of_an_unknown_node_is_refused(three: Cluster2) -> None:
    p = subprocess.run(
        [
            *JAULA_ALL,
            "--client-config",
            str(three.files.clients["alice"]),
            "node",
            "drain",
            "nodeX",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 125 and "unknown node 'nodeX'" in p.stderr, p.stderr


def test_a_refused_move_leaves_the_container_and_is_not_retried(
    tmp_path: Path, busybox_image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from migrate.destination import DestinationSession
    from migrate.errors import PreflightError

    refused: list[str] = []

    def refuse(self: DestinationSession, cfg: Any) -> None:
        refused.append(cfg.name)
        raise PreflightError("not enough disk here (refused by the test)")

    monkeypatch.setattr(DestinationSession, "_check_space_and_names", refuse)
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    try:
        with in_process_node(c, "node2"):  # node2 refuses every offer at its preflight
            c.start("node1")
            n1 = c.local("node1")
            for name in ("burn1", "burn2"):
                n1.run("run", "-d", "--name", name, "--cpus", "0.5", "busybox", "sh", "-c", BURN)
            with balancers(c, write_config(tmp_path / "b.toml")) as d:
                d.start("alice")
                failed = wait_for(
                    lambda: [e for e in moves(c) if e.kind == "balancer.move.failed"],
                    120,
                    f"a failed move; log:\n{d.log('alice')}",
                )
                after = failed[0].seq
                wait_for(
                    lambda: len([e for e in rounds(c) if e.seq > after]) >= 5,
                    90,
                    f"five rounds after the failure; log:\n{d.log('alice')}",
                )
            assert refused, "node2's preflight never ran"
            assert "refused by the test" in failed[0].data["error"], failed[0].data
            started = [e for e in moves(c) if e.kind == "balancer.move.started"]
            assert len(started) == 1, started  # node2 backs off: no retry at once
            for name in ("burn1", "burn2"):
                assert running_on(c, name) == ["node1"], (name, c.where(name))
            assert c.local("node2").container_ids() == []
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def test_destination_killed_mid_move_leaves_the_container_and_backs_off(
    tmp_path: Path, busybox_image_layout: Path
) -> None:
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    cfg = write_config(tmp_path / "b.toml", destination_backoff_s=3600.0)
    try:
        c.start("node1")
        c.start("node2")
        n1 = c.local("node1")
        for name in ("big1", "big2"):  # 300 MB of upper dir each: a transfer to break into
            n1.run(
                "run", "-d", "--name", name, "--cpus", "0.5", "busybox", "sh", "-c", big_busy(300)
            )
        for name in ("big1", "big2"):
            _wait_ticks(n1, name, 1, 120)
        with balancers(c, cfg) as d:
            d.start("alice")
            # the source is in its transfer phase: node2 has 20 MB of the rootfs; then the
            # destination's service dies for real (SIGKILL to the process this test started)
            victim = wait_receiving(c, ("node2",), 20 << 20, 180)
            c.kill(victim, signal.SIGKILL)
            failed = wait_for(
                lambda: [e for e in moves(c) if e.kind == "balancer.move.failed"],
                120,
                f"a failed move; log:\n{d.log('alice')}\nnode1: {c.log('node1')}",
            )
            c.start("node2")  # back, and able to take a move: only the back-off keeps it idle
            back = max(e.seq for e in rounds(c))
            wait_for(
                lambda: len([e for e in rounds(c) if e.seq > back]) >= 5,
                90,
                f"five rounds with node2 back; log:\n{d.log('alice')}",
            )
            assert d.alive("alice"), d.log("alice")
        f = failed[0].data
        assert f["source"] == "node1" and f["destination"] == "node2", f
        started = [e for e in moves(c) if e.kind == "balancer.move.started"]
        assert len(started) == 1, started  # not retried at once
        after = [e for e in rounds(c) if e.seq > back]
        assert all("node2" not in e.data.get("unreachable", {}) for e in after), after
        assert {e.data["reason"] for e in after} == {"no-candidate"}, after
        # the back-off is recorded: the failed container cools down (balancer status)
        st = json.loads(op_all(c, "balancer", "status", "--config", str(cfg), "--json").stdout)
        assert f["container"] in st["cooling_down"], st
        for name in ("big1", "big2"):
            assert running_on(c, name) == ["node1"], (name, c.where(name))
        n = len(ticks(n1, "big1"))
        wait_for(lambda: len(ticks(n1, "big1")) > n + 5, 60, "big1 counting on node1")
        assert_continuous(ticks(n1, "big1"))
        assert c.local("node2").container_ids() == []
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def test_a_container_labelled_balance_false_is_never_moved(three: Cluster2, tmp_path: Path) -> None:
    n1 = three.local("node1")
    for name in ("pin1", "pin2"):
        n1.run(
            "run", "-d", "--name", name, "--cpus", "0.5", "--label", "jaula.balance=false",
            "busybox", "sh", "-c", BURN,
        )  # fmt: skip
    assert metrics(three, "node1")["containers"][0]["labels"] == {"jaula.balance": "false"}
    with balancers(three, write_config(tmp_path / "b.toml")) as d:
        d.start("alice")
        wait_for(
            lambda: sum(e.data["hot"] for e in rounds(three)) >= 6,
            120,
            f"six hot rounds; log:\n{d.log('alice')}",
        )
    assert moves(three) == []
    assert "no-candidate" in {e.data["reason"] for e in rounds(three)}
    for name in ("pin1", "pin2"):
        assert running_on(three, name) == ["node1"]
