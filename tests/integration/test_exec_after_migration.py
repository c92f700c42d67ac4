"""``jaula exec`` after a migration between two node services: the exec'd process is in
every namespace of the migrated init, its time namespace included, and reads the same
CLOCK_MONOTONIC (issue 11, item 2).  After a migration the init's clock is the source's
clock carried over (CRIU's new time namespace on the destination), so a process left in the
destination host's namespace reads another clock; here both nodes share one host and the
difference is the migration's downtime, which the bracketed reading of
:mod:`tests.linux.test_exec_namespaces` detects without a timing bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.containers import wait_lines
from tests.helpers.exec_probe import INIT, PROBE, assert_one_clock_and_namespaces, probe
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def test_exec_reads_the_clock_of_pid_1_after_a_migration(
    nodes: Cluster2, python_image_layout: Path
) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    for j in (n1, n2):
        j.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    n1.run("run", "-d", "--name", "clk", "jaula-python", "python3", "-c", INIT)
    wait_lines(n1, "clk", r"^ready$")
    assert_one_clock_and_namespaces(probe(n1, "clk"))
    nodes.op("migrate", "clk", "node2")
    nodes.assert_only_on("clk", "node2")
    assert_one_clock_and_namespaces(probe(n2, "clk"))
    # and through the destination's node service, as an operator would
    p = nodes.op("--node", "node2", "exec", "clk", "python3", "-c", PROBE)
    assert_one_clock_and_namespaces(json.loads(p.stdout))
