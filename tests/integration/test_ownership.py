"""Container ownership and node membership in the cluster state, with real node services,
real CRIU and, for ``etcd``, a real etcd member on loopback (once per backend where it
applies).

What is proved: ``run`` claims the id for its node, a migration moves the claim to the
destination at its commit (cold and post-copy) and ``rm`` gives it up; an export made with
``--leave-running`` cannot be imported on another node while the original is owned (the
double-import of issue 13), and can be once the original is removed; a store that cannot
answer refuses a migration before anything freezes, and one lost at the commit itself
rolls the migration back, the container running on the source only; a node service killed
is ``lost`` once its lease expires, its containers listed as ``unknown (node lost)``, and
``ready`` with its containers again when it restarts; one stalled past its lease is
``lost``, and registers again by itself when it runs on.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.etcd import StateNodes, wait_until
from tests.helpers.nodes import Cluster2, in_process_node, make_cluster
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def _id(c: Cluster2, node: str, name: str) -> str:
    return str(json.loads(c.local(node).out("inspect", name))[0]["Id"])


def _continues_on(c: Cluster2, name: str, node: str) -> None:
    j = c.local(node)
    c.assert_only_on(name, node)
    n = ticks(j, name)[-1]
    wait_ticks(j, name, n + 5)
    assert_continuous(ticks(j, name))


def _node_ls(c: Cluster2) -> dict[str, str]:
    """node -> its row of `jaula node ls` (the whole line)."""
    out = c.op("node", "ls", timeout=60).stdout.splitlines()
    assert out[0].split()[:2] == ["NODE", "STATE"], out
    return {line.split()[0]: line for line in out[1:]}


def test_migration_moves_the_ownership(state_nodes: StateNodes) -> None:
    c = state_nodes.cluster
    n1 = c.local("node1")
    n1.run("run", "-d", "--name", "owned", "busybox", "sh", "-c", COUNTER)
    cid = _id(c, "node1", "owned")
    assert state_nodes.owner(cid) == "node1"
    before = state_nodes.store().owner(cid)
    assert before is not None
    wait_ticks(n1, "owned", 5)
    rep = json.loads(c.op("migrate", "owned", "node2", "--json").stdout)
    assert state_nodes.owner(cid) == "node2"
    assert rep["owner_revision"] > before.revision  # the fencing token grew
    _continues_on(c, "owned", "node2")
    rep = json.loads(c.op("migrate", "owned", "node1", "--strategy", "postcopy", "--json").stdout)
    assert state_nodes.owner(cid) == "node1" and rep["postcopy_error"] == ""
    _continues_on(c, "owned", "node1")
    # node2 keeps the record of its departure; removing it does not touch node1's claim
    c.local("node2").run("rm", "owned")
    assert state_nodes.owner(cid) == "node1"
    n1.run("rm", "-f", "owned")
    assert state_nodes.owner(cid) is None


def test_double_import_of_a_running_container_is_refused(
    state_nodes: StateNodes, tmp_path: Path
) -> None:
    c = state_nodes.cluster
    n1, n2 = c.local("node1"), c.local("node2")
    n1.run("run", "-d", "--name", "orig", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "orig", 3)
    export = tmp_path / "orig.tar"
    n1.run("checkpoint", "--leave-running", "--export", str(export), "orig")
    p = n2.run("restore", "--import", str(export), check=False, timeout=120)
    assert p.returncode == 125, p.stderr
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "owned by node node1" in err, err
    assert n2.container_ids() == []
    _continues_on(c, "orig", "node1")
    # once the original is gone, the export may come to life elsewhere: it was the claim
    cid = _id(c, "node1", "orig")
    n1.run("rm", "-f", "orig")
    n2.run("restore", "--import", str(export), timeout=120)
    assert state_nodes.owner(cid) == "node2"
    c.assert_only_on("orig", "node2")


def test_node_killed_is_lost_then_ready_with_its_containers(state_nodes: StateNodes) -> None:
    c = state_nodes.cluster
    c.local("node2").run("run", "-d", "--name", "stays", "busybox", "sh", "-c", COUNTER)
    cid = _id(c, "node2", "stays")
    rows = _node_ls(c)
    assert rows["node1"].split()[1] == "ready" and rows["node2"].split()[1] == "ready", rows
    # a clean stop gives the lease up at once
    c.kill("node2", signal.SIGTERM)
    assert _node_ls(c)["node2"].split()[1] == "lost"
    c.start("node2")
    assert _node_ls(c)["node2"].split()[1] == "ready"
    # killed: lost once its lease expires, its container unknown, never started elsewhere
    c.kill("node2", signal.SIGKILL)
    row = wait_until(
        lambda: (r := _node_ls(c)["node2"]).split()[1] == "lost" and r, 30.0, "node2 lost"
    )
    assert f"{cid[:12]} unknown (node lost)" in row, row
    assert state_nodes.owner(cid) == "node2"
    assert c.local("node1").container_ids() == []
    c.start("node2")
    row = _node_ls(c)["node2"]
    assert row.split()[1] == "ready" and "stays" in row, row
    assert state_nodes.owner(cid) == "node2"
    _continues_on(c, "stays", "node2")
    # a service that stalls past its lease (stopped here) is lost, and registers again
    # by itself when it renews and finds the lease gone
    pid = c.procs["node2"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _node_ls(c)["node2"].split()[1] == "lost", 30.0, "node2 lost")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: _node_ls(c)["node2"].split()[1] == "ready", 30.0, "node2 ready")
    assert state_nodes.owner(cid) == "node2"


def test_store_unavailable_refuses_before_the_freeze_or_rolls_back_at_the_commit(
    tmp_path: Path, busybox_image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd stopped for real: first before the migration (refused at preflight), then by
    node1's source session right before its commit's compare-and-swap (patched in node1's
    in-process service): the migration rolls back, the container runs on node1 only, and
    once etcd is back the owner is still node1."""
    import asyncio

    from migrate.source import SourceSession
    from tests.helpers.etcd import ETCD, state_for

    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd not installed (make setup installs etcd-server)")
    root = tmp_path / "cluster"
    c = make_cluster(root, busybox_image_layout)
    commit = SourceSession._commit
    stopped: list[str] = []
    with state_for(root, "etcd", ("node1", "node2"), ("alice",)) as etcd:
        assert etcd is not None
        sn = StateNodes(c, etcd, "etcd")

        async def etcd_gone_at_commit(self: SourceSession) -> None:
            if stopped == ["armed"]:  # the second migration only
                await asyncio.to_thread(etcd.kill, 0)
                stopped.append(self.session)
            await commit(self)

        monkeypatch.setattr(SourceSession, "_commit", etcd_gone_at_commit)
        try:
            with in_process_node(c, "node1"):
                c.start("node2")
                n1 = c.local("node1")
                n1.run("run", "-d", "--name", "kept", "busybox", "sh", "-c", COUNTER)
                cid = _id(c, "node1", "kept")
                wait_ticks(n1, "kept", 3)
                # the store down before the migration: refused before any freeze
                etcd.kill(0)
                p = c.op("migrate", "kept", "node2", "--from", "node1", check=False)
                assert p.returncode == 125, p.stderr
                assert "cluster state is unavailable" in p.stderr, p.stderr
                assert "nothing was frozen" in p.stderr, p.stderr
                _continues_on(c, "kept", "node1")
                etcd.start(0)
                assert sn.owner(cid) == "node1"
                # the store lost at the commit point itself: rolled back
                stopped.append("armed")
                p = c.op("migrate", "kept", "node2", "--from", "node1", check=False, timeout=180)
                assert len(stopped) == 2, "the patched commit did not run"
                assert p.returncode == 125, p.stderr
                assert "ownership move" in p.stderr, p.stderr
                assert "keeps running on node1" in p.stderr, p.stderr
                _continues_on(c, "kept", "node1")
                assert c.local("node2").container_ids() == []
                etcd.start(0)
                assert sn.owner(cid) == "node1"
        finally:
            sn.close()
            problems = c.close()
            assert not problems, "\n".join(problems)


def test_etcd_without_quorum_refuses_then_works_again(
    tmp_path: Path, busybox_image_layout: Path
) -> None:
    """A 3-member etcd with two members killed: a migration is refused before anything
    freezes and the container keeps running; once they are back, it migrates."""
    from tests.helpers.etcd import ETCD, state_for
    from tests.helpers.nodes import serving

    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd not installed (make setup installs etcd-server)")
    root = tmp_path / "cluster"
    c = make_cluster(root, busybox_image_layout)
    with state_for(root, "etcd", ("node1", "node2"), ("alice",), members=3) as etcd:
        assert etcd is not None
        sn = StateNodes(c, etcd, "etcd")
        try:
            with serving(c):
                n1 = c.local("node1")
                n1.run("run", "-d", "--name", "q", "busybox", "sh", "-c", COUNTER)
                cid = _id(c, "node1", "q")
                wait_ticks(n1, "q", 3)
                etcd.kill(1)
                etcd.kill(2)
                p = c.op("migrate", "q", "node2", "--from", "node1", check=False, timeout=180)
                assert p.returncode == 125, p.stderr
                assert "cluster state is unavailable" in p.stderr, p.stderr
                assert "nothing was frozen" in p.stderr, p.stderr
                _continues_on(c, "q", "node1")
                etcd.start()
                c.op("migrate", "q", "node2", "--from", "node1", timeout=180)
                assert sn.owner(cid) == "node2"
                _continues_on(c, "q", "node2")
        finally:
            sn.close()


@pytest.mark.parametrize("strategy", ["cold", "postcopy"])
def test_etcd_leader_killed_at_the_commit_leaves_one_copy(
    strategy: str, tmp_path: Path, busybox_image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-member etcd whose leader is SIGKILLed, for real, as node1's source session enters
    its commit (the compare-and-swap of the owner key runs while the remaining two members
    elect a new leader): the migration either completes or rolls back cleanly; either way
    the container runs on exactly one node, which the store names as its owner, its counter
    continues without gap or repeat, and the other node keeps nothing running (node2 nothing
    at all after a rollback; node1 only its ``migrated`` record after a completion)."""
    import asyncio

    from migrate.source import SourceSession
    from tests.helpers.etcd import ETCD, state_for

    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd not installed (make setup installs etcd-server)")
    root = tmp_path / "cluster"
    c = make_cluster(root, busybox_image_layout)
    commit = SourceSession._commit
    killed: list[str] = []
    with state_for(root, "etcd", ("node1", "node2"), ("alice",), members=3) as etcd:
        assert etcd is not None
        sn = StateNodes(c, etcd, "etcd")

        async def leader_killed_at_commit(self: SourceSession) -> None:
            lead = await asyncio.to_thread(etcd.leader)
            assert lead is not None, "no etcd leader at the commit"
            await asyncio.to_thread(etcd.kill, etcd.members.index(lead))
            killed.append(lead.name)
            await commit(self)

        monkeypatch.setattr(SourceSession, "_commit", leader_killed_at_commit)
        try:
            with in_process_node(c, "node1"):
                c.start("node2")
                n1 = c.local("node1")
                n1.run("run", "-d", "--name", "lk", "busybox", "sh", "-c", COUNTER)
                cid = _id(c, "node1", "lk")
                wait_ticks(n1, "lk", 5)
                p = c.op(
                    "migrate", "lk", "node2", "--from", "node1", "--strategy", strategy,
                    check=False, timeout=180,
                )  # fmt: skip
                assert len(killed) == 1, "the patched commit did not run"
                assert len(etcd.running()) == 2
                if p.returncode == 0:  # completed: the new leader took the CAS
                    where = "node2"
                    assert c.where("lk")["node1"] == "migrated", c.where("lk")
                else:  # rolled back cleanly, saying so
                    assert p.returncode == 125, p.stderr
                    assert "keeps running on node1" in p.stderr, p.stderr
                    where = "node1"
                    assert c.local("node2").container_ids() == []
                _continues_on(c, "lk", where)
                etcd.wait_healthy()
                assert sn.owner(cid) == where
        finally:
            sn.close()
            problems = c.close()
            assert not problems, "\n".join(problems)
