"""A container's ``--restart`` policy goes with it: after a migration between two node
services, the destination's monitor restarts its init when it dies, as the source's would
have.  Before, the policy file stayed behind and the migrated container silently became
``--restart=no``."""

from __future__ import annotations

import os
import signal

import pytest

from runtime.poll import wait_for
from tests.helpers.containers import inspect
from tests.helpers.counter import COUNTER, wait_ticks
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


@pytest.mark.parametrize("strategy", ["cold", "postcopy"])
def test_the_restart_policy_holds_after_a_migration(nodes: Cluster2, strategy: str) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    n1.run("run", "-d", "--name", "rp", "--restart=always", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "rp", 3)
    nodes.op("migrate", "rp", "node2", "--strategy", strategy)
    nodes.assert_only_on("rp", "node2")
    info = inspect(n2, "rp")
    assert info["HostConfig"]["RestartPolicy"]["Name"] == "always", info["HostConfig"]
    pid = int(info["State"]["Pid"])
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        st = inspect(n2, "rp")["State"]
        return st["Status"] == "running" and int(st["Pid"]) not in (0, pid)

    assert wait_for(restarted, 30), f"not restarted on node2: {inspect(n2, 'rp')['State']}"
    assert int(inspect(n2, "rp")["RestartCount"]) >= 1
