"""Mistakes an operator makes with the cluster CLI, with two real node services: each is
refused at once with a message that says what to do, and nothing is done on the wrong node.
(Found by a new user's trial of the README.)"""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers.counter import COUNTER, wait_ticks
from tests.helpers.jaula import JAULA, REPO
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def test_node_option_on_a_local_only_command_is_refused(nodes: Cluster2) -> None:
    n1 = nodes.local("node1")
    n1.run("run", "-d", "--name", "cnt", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "cnt", 3)
    # as the trial did: the local state root is node1's, the command names node2
    p = n1.run("--node", "node2", "pause", "cnt", check=False)
    assert p.returncode == 125
    assert "--node works with" in p.stderr and "pause" in p.stderr, p.stderr
    assert nodes.where("cnt")["node1"] == "running"  # node1's container was not paused
    p = nodes.op("--node", "node1", "logs", "-f", "cnt", check=False)
    assert p.returncode == 125 and "logs -f is local only" in p.stderr, p.stderr


def test_a_second_service_on_one_state_root_is_refused(nodes: Cluster2) -> None:
    p = subprocess.run(
        [*JAULA, "node", "serve", "--config", str(nodes.files.nodes["node2"])],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert p.returncode == 125
    assert "already serves the state root" in p.stderr, p.stderr
    assert nodes.op("--node", "node2", "ps").returncode == 0  # the first one still serves


def test_migrating_from_or_to_a_stopped_node_fails_at_once_and_says_why(nodes: Cluster2) -> None:
    n1 = nodes.local("node1")
    n1.run("run", "-d", "--name", "cnt", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "cnt", 3)
    nodes.kill("node2")
    p = nodes.op("migrate", "cnt", "node2", check=False, timeout=120)
    assert p.returncode == 125
    assert "node2 did not answer the migration offer" in p.stderr, p.stderr
    assert "keeps running on node1" in p.stderr, p.stderr
    nodes.kill("node1")
    p = nodes.op("migrate", "--from", "node1", "cnt", "node2", check=False, timeout=120)
    assert p.returncode == 125 and "node1 is not reachable" in p.stderr, p.stderr
    p = nodes.op("migrate", "cnt", "node2", check=False, timeout=120)
    assert p.returncode == 125 and "not reachable, so not asked: node1, node2" in p.stderr
    nodes.start("node1")  # for the fixture's leak check, and to see it is still there
    assert nodes.where("cnt")["node1"] == "running"
